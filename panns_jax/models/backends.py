"""Which kernels compute the models' convolutions on CPU: oneDNN's or XLA's.

    from panns_jax import models
    step = jax.jit(models.with_conv_backend(train_step, "onednn"))
    step(state, batch)                 # traced (and run) with oneDNN's convolutions

``"auto"`` (the default of the configs, the tagger and the commands) means ``"onednn"`` where
JAX computes on the CPU and oneDNN is installed (``pip install 'panns-jax[onednn]'``: the
extra is the switch), and ``"xla"`` elsewhere; when oneDNN is installed but its kernel cannot
be built (no C++ compiler, say) it logs why once and uses XLA's. ``$PANNS_JAX_CONV_BACKEND``
(``xla`` or ``onednn``) decides for ``"auto"`` where set. A model traced outside
:func:`with_conv_backend` and :func:`tracing_with` uses XLA's.

With ``"onednn"``, the convolutions of :mod:`~panns_jax.models.same_conv` (every plain
2-D conv) and :mod:`~panns_jax.models.fast1d` (the 1-D convs) and their gradients run on
oneDNN's kernels (:mod:`panns_jax.kernels.onednn`, built on first use) when they are float32
and have at most :data:`ONEDNN_MAX_CHANNELS` output channels; wider ones, other dtypes and
other platforms (through ``lax.platform_dependent``) keep XLA's. On a 2-core Zen 5 that
makes forwards 1.2-1.5x and train steps 1.2-1.4x faster for every family but the MobileNets
(1.0-1.1x; their depthwise and 1x1 convs keep their own kernels), which puts every family's
train step at or above PyTorch's speed (``benchmarks/onednn_conv.py``, README's Speed).

The choice is read while a function is traced, and JAX caches a function's trace by the
function, not by this choice: :func:`with_conv_backend` makes it part of the function, so
that the function is always traced with its backend (a ``jax.jit`` function that it calls
and that was traced before keeps its earlier trace). :func:`tracing_with` sets it for a
block, which holds only for functions first traced inside it: exports build theirs afresh
and trace with XLA's (:func:`panns_jax.models.depthwise.plain_lax_convolutions`).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import os
from typing import Any, Callable, Iterator, TypeVar

import jax
import jax.numpy as jnp

__all__ = [
    "BACKENDS",
    "ENV",
    "ONEDNN_MAX_CHANNELS",
    "current",
    "prepare",
    "tracing_with",
    "with_conv_backend",
]

BACKENDS = ("auto", "xla", "onednn")
ENV = "PANNS_JAX_CONV_BACKEND"  # What "auto" means where set: "xla" or "onednn".
# Wider convs ran slower on oneDNN (Cnn14's 1024 and 2048 channels: 0.56x and 0.43x of XLA's
# speed, benchmarks/onednn_conv.py --layers): each call reorders their weights.
ONEDNN_MAX_CHANNELS = 512
_BACKEND: contextvars.ContextVar[str] = contextvars.ContextVar("conv_backend", default="xla")
F = TypeVar("F", bound=Callable[..., Any])
_log = logging.getLogger(__name__)
_told_unavailable = False  # Whether "auto" has logged why oneDNN's kernel is not used.


def check(name: str) -> str:
    """``name`` if it is a backend, else a ``ValueError`` listing them."""
    if name not in BACKENDS:
        raise ValueError(f"unknown conv backend {name!r}: choose one of {', '.join(BACKENDS)}")
    return name


def current() -> str:
    """The backend that convolutions traced now use."""
    return _BACKEND.get()


def prepare(name: str) -> str:
    """Check ``name``, make its kernels ready and return the backend it stands for (``"auto"``
    resolved, see the module). ``"onednn"`` builds and registers oneDNN's kernel
    (:func:`panns_jax.kernels.onednn.load`) where JAX computes on the CPU, so a missing oneDNN
    or compiler raises :class:`~panns_jax.kernels.onednn.OneDnnUnavailable` here, in one
    line. On a GPU or TPU the models' convolutions are XLA's whatever the backend."""
    if check(name) == "auto":
        return _auto()
    if name == "onednn" and jax.default_backend() == "cpu":
        from panns_jax.kernels import onednn

        onednn.load()
    return name


def _auto() -> str:
    global _told_unavailable
    chosen = os.environ.get(ENV)
    if chosen:
        if chosen not in ("xla", "onednn"):
            raise ValueError(f"${ENV}={chosen!r}: set it to xla or onednn, or unset it")
        return prepare(chosen)
    if jax.default_backend() != "cpu":
        return "xla"
    from panns_jax.kernels import onednn

    if not onednn.installed():
        return "xla"
    try:
        onednn.load()
    except onednn.OneDnnUnavailable as err:
        if not _told_unavailable:
            _log.warning("using XLA's convolutions: %s", err)
            _told_unavailable = True
        return "xla"
    return "onednn"


@contextlib.contextmanager
def tracing_with(name: str) -> Iterator[None]:
    """Functions first traced inside the block use backend ``name`` (see the module)."""
    token = _BACKEND.set(prepare(name))
    try:
        yield
    finally:
        _BACKEND.reset(token)


def with_conv_backend(fn: F, name: str) -> F:
    """``fn``, tracing the models' convolutions with backend ``name`` whenever it runs.

    The backend is prepared (:func:`prepare`; ``"auto"`` resolved) now, so errors come before
    any tracing.
    """
    name = prepare(name)

    @functools.wraps(fn)
    def traced_with_backend(*args: Any, **kwargs: Any) -> Any:
        token = _BACKEND.set(name)
        try:
            return fn(*args, **kwargs)
        finally:
            _BACKEND.reset(token)

    return traced_with_backend  # type: ignore[return-value]


def convolve(
    x: jax.Array,
    w: jax.Array,
    xla_conv: Callable[[jax.Array, jax.Array], jax.Array],
    onednn_conv: Callable[[jax.Array, jax.Array], jax.Array],
) -> jax.Array:
    """``xla_conv(x, w)``, or ``onednn_conv(x, w)`` on CPU where oneDNN takes the conv."""
    if not onednn_takes(x, w):
        return xla_conv(x, w)
    return jax.lax.platform_dependent(x, w, cpu=onednn_conv, default=xla_conv)


def onednn_takes(x: jax.Array, w: jax.Array) -> bool:
    """Whether a convolution of ``x`` by ``w`` traced now runs on oneDNN (on CPU)."""
    return (
        _BACKEND.get() == "onednn"
        and x.dtype == jnp.float32
        and w.dtype == jnp.float32
        and w.shape[-1] <= ONEDNN_MAX_CHANNELS
    )
