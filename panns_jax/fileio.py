"""Files written whole or not at all.

Every file panns_jax writes for a user (checkpoints' side files, converted ``.pth``, the
model zoo's cache, tag/SED outputs, exports) goes through :func:`staged`, so a failure or a
kill mid-write never leaves a truncated file under the real name, and an existing file is
kept until the new one is complete. :func:`cache_dir` is where the user cache lives (the
model zoo, compiled programs, built kernels, probe embeddings).
"""

import contextlib
import ctypes
import os
import shutil
import uuid
from typing import Iterator

__all__ = ["cache_dir", "replace_dir", "staged", "write_probe"]


@contextlib.contextmanager
def staged(path: str) -> Iterator[str]:
    """Yield a temporary sibling of ``path`` to write; rename it onto ``path`` on success.

    The sibling is ``.<basename>.<random>.part`` in the same directory, so the rename stays
    on one file system and is atomic. The caller creates it with ``open`` as usual, so it
    gets the umask's mode (``tempfile.mkstemp`` would make it 0o600). When the block ends
    normally the sibling is flushed to disk and replaces ``path`` (``os.replace``). When it
    raises, the sibling is removed, ``path`` is left alone, and the exception propagates.
    Writers that add their own suffix to a path (``numpy.savez``, ``savefig`` without
    ``format=``) should be given an open file. A directory may be staged too. It is removed
    whole on an exception, and on success it replaces an existing one by
    :func:`replace_dir`.
    """
    directory, base = os.path.split(os.path.abspath(path))
    staging = os.path.join(directory, f".{base}.{uuid.uuid4().hex[:12]}.part")
    try:
        yield staging
        _fsync(staging)
        if os.path.isdir(staging) and not os.path.islink(staging):
            replace_dir(staging, path)
        else:
            os.replace(staging, path)
    except BaseException:
        if os.path.isdir(staging) and not os.path.islink(staging):  # A SavedModel export.
            shutil.rmtree(staging, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.remove(staging)
        raise


def _fsync(path: str) -> None:
    """Flush ``path``'s data (a directory's entries) to disk, so that after a crash the
    rename never exposes an empty file."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _exchange(a: str, b: str) -> bool:
    """Swap two paths in one ``renameat2(RENAME_EXCHANGE)``; False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    result = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    return result == 0


def replace_dir(staging: str, path: str) -> None:
    """Move the complete directory ``staging`` to ``path``, replacing what is there.

    Where the kernel allows, an existing ``path`` is exchanged with ``staging`` in one
    atomic step and then removed. Elsewhere the existing directory is moved aside first, so
    a crash at worst leaves it beside ``path`` as ``.NAME.old-*``, never half written.
    """
    if not os.path.lexists(path):
        os.replace(staging, path)
        return
    if _exchange(staging, path):
        shutil.rmtree(staging, ignore_errors=True)  # Now the old directory.
        return
    parent, base = os.path.split(path)
    old = os.path.join(parent, f".{base}.old-{uuid.uuid4().hex[:12]}")
    os.replace(path, old)
    os.replace(staging, path)
    shutil.rmtree(old, ignore_errors=True)


def write_probe(directory: str) -> None:
    """Create and remove a hidden file in ``directory``; OSError if that cannot be done.

    Trying is the only reliable test: root ignores mode bits, read-only mounts do not.
    """
    probe = os.path.join(directory, f".panns_jax-probe-{uuid.uuid4().hex[:12]}")
    os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    os.remove(probe)


def cache_dir() -> str:
    """``$PANNS_JAX_HOME``, else ``$XDG_CACHE_HOME/panns_jax``, else ``~/.cache/panns_jax``."""
    home = os.environ.get("PANNS_JAX_HOME")
    if home:
        return os.path.abspath(os.path.expanduser(home))
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = xdg if xdg else os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.abspath(os.path.join(base, "panns_jax"))
