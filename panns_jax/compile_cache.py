"""JAX's persistent compilation cache, kept in the user cache beside the model zoo.

    from panns_jax import compile_cache
    compile_cache.enable()            # this process: <zoo cache>/xla, e.g. ~/.cache/panns_jax/xla
    tagger = AudioTagger.load("Cnn14")
    tagger.tag("rec.wav")             # a later process with the same model and shape: no compile

The ``panns-jax tag | sed | embed | stream`` commands turn it on by default;
``--no-compilation-cache`` or ``PANNS_JAX_COMPILATION_CACHE=0`` turns it off. It changes
process-wide JAX settings, so library code never turns it on: a program that uses panns_jax
calls :func:`enable` itself.

Every compiled program is written (JAX's default skips those compiled in under a second,
which is all of ours on a CPU), and the directory is capped at :data:`MAX_BYTES`, least
recently used entries going first. JAX runs what it reads from the cache, so the directory
must be writable by you alone, as the user cache is.
"""

from __future__ import annotations

import os
from typing import Optional

ENV = "PANNS_JAX_COMPILATION_CACHE"
MAX_BYTES = 2 << 30
_OFF = ("0", "false", "no", "off")
_ON = ("", "1", "true", "yes", "on")


def default_dir() -> str:
    """``xla/`` in the user cache directory (:func:`panns_jax.fileio.cache_dir`)."""
    from panns_jax import fileio

    return os.path.join(fileio.cache_dir(), "xla")


def wanted_by_environment() -> bool:
    """Whether ``$PANNS_JAX_COMPILATION_CACHE`` leaves the cache on (unset: on).

    Raises ``ValueError`` naming the variable for a value that is neither on nor off.
    """
    value = os.environ.get(ENV, "").strip().lower()
    if value in _OFF:
        return False
    if value in _ON:
        return True
    raise ValueError(f"{ENV}={os.environ[ENV]!r}: expected 1 or 0 (on or off)")


def enable(path: Optional[str] = None, *, max_bytes: int = MAX_BYTES) -> str:
    """Turn JAX's persistent compilation cache on for this process; returns its directory.

    Args:
      path: the cache directory, created if missing; default :func:`default_dir`.
      max_bytes: the directory's size cap (least recently used entries are removed).

    Raises ``OSError`` when the directory cannot be created. Compilations done before the
    call are not written; call it before the first model runs.
    """
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    path = os.path.abspath(path or default_dir())
    os.makedirs(path, exist_ok=True)
    if jax.config.jax_compilation_cache_dir != path:
        compilation_cache.reset_cache()  # A cache opened in another directory is closed.
        jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_compilation_cache_max_size", int(max_bytes))
    return path


def enabled_dir() -> Optional[str]:
    """The directory of this process's persistent compilation cache, or None when off."""
    import jax

    return jax.config.jax_compilation_cache_dir
