"""oneDNN's CPU convolutions as JAX operations: built on demand, cached, registered once.

    pip install 'panns-jax[onednn]'       # oneDNN (pip's onednn-cpu-gomp) and its headers

XLA:CPU in jax 0.10 hands no convolution to oneDNN, and its own convolutions and their
gradients run slower than PyTorch's (which calls oneDNN) on the PANNs shapes.
``onednn_conv.cc`` (shipped beside this module) wraps oneDNN's forward, backward-data and
backward-weights convolutions as XLA FFI handlers. :func:`load` compiles it with the C++
compiler (``$CXX``, else ``g++``) against the installed oneDNN once per source, jax and
oneDNN version, into ``kernels/`` of the user cache (:func:`panns_jax.fileio.cache_dir`; a
file lock keeps concurrent processes from building twice), loads it and registers the
handlers with JAX for the CPU. The models use it where it is installed, or when asked to
(:mod:`panns_jax.models.backends`); nothing here runs at import.

The library built here runs in your process, so the cache directory must be writable by you
alone, as the user cache is.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.metadata
import importlib.resources
import os
import platform
import shutil
import subprocess
import threading
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from panns_jax import fileio

__all__ = [
    "OneDnnUnavailable",
    "conv",
    "grads",
    "installed",
    "library_path",
    "load",
    "xla_equivalent",
]

INSTALL_HINT = "pip install 'panns-jax[onednn]'"
TARGETS = ("OnednnConv", "OnednnConvBackwardData", "OnednnConvBackwardWeights")
# The pip distributions that carry oneDNN's shared library and its headers.
_RUNTIME, _HEADERS = "onednn-cpu-gomp", "onednn-devel-cpu-gomp"
_BUILD_TIMEOUT_S = 600
# (stride, pad_top, pad_bottom, pad_w, dilation): the handlers' attributes. For a 1-D conv the
# time axis is the only one and pad_w is 0.
Geometry = Tuple[int, int, int, int, int]
GEOMETRY_NAMES = ("stride", "pad_top", "pad_bottom", "pad_w", "dilation")

# The kernel's C++ source, shipped as package data beside this module.
_SOURCE = importlib.resources.files("panns_jax.kernels").joinpath("onednn_conv.cc")
_lock = threading.Lock()
_loaded: Optional[str] = None  # The library this process loaded.
_registered = False  # Whether its handlers are registered with JAX.


class OneDnnUnavailable(RuntimeError):
    """oneDNN's kernel cannot be used here; the message says why and what to do."""


def _dist_file(distribution: str, suffix: str) -> str:
    """The installed file of ``distribution`` whose path ends with ``suffix``."""
    try:
        files = importlib.metadata.files(distribution) or []
    except importlib.metadata.PackageNotFoundError:
        raise OneDnnUnavailable(f"oneDNN is not installed: {INSTALL_HINT}") from None
    for file in files:
        if str(file).replace(os.sep, "/").endswith(suffix):
            return os.path.abspath(str(file.locate()))
    raise OneDnnUnavailable(f"{distribution} has no {suffix}: reinstall it with {INSTALL_HINT}")


def installed() -> bool:
    """Whether oneDNN's runtime distribution is installed (the ``[onednn]`` extra)."""
    try:
        importlib.metadata.version(_RUNTIME)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _locations() -> Tuple[str, str, str]:
    """(oneDNN's include dir, its library dir, its version)."""
    header = _dist_file(_HEADERS, "oneapi/dnnl/dnnl.hpp")
    library = _dist_file(_RUNTIME, "/libdnnl.so")
    include = os.path.dirname(os.path.dirname(os.path.dirname(header)))
    return include, os.path.dirname(library), importlib.metadata.version(_RUNTIME)


def _source() -> bytes:
    return _SOURCE.read_bytes()


def library_path() -> str:
    """Where the built kernel for this source, jax, jaxlib and oneDNN version lives."""
    _, _, version = _locations()
    key = hashlib.sha256(_source())
    jaxlib = importlib.metadata.version("jaxlib")
    for part in (jax.__version__, jaxlib, version, platform.machine()):
        key.update(b"\0" + part.encode())
    return os.path.join(fileio.cache_dir(), "kernels", f"onednn_conv-{key.hexdigest()[:16]}.so")


def _compile(path: str) -> None:
    """Build the kernel into ``path`` (written whole or not at all)."""
    include, lib, _ = _locations()
    compiler = os.environ.get("CXX") or "g++"
    if shutil.which(compiler) is None:
        raise OneDnnUnavailable(
            f"building oneDNN's kernel needs a C++ compiler: install g++ or set $CXX ({compiler!r} "
            "is not on PATH)"
        )
    with fileio.staged(path) as staging, importlib.resources.as_file(_SOURCE) as source:
        command = [compiler, "-O2", "-std=c++17", "-shared", "-fPIC", "-w"]
        command += [f"-I{jax.ffi.include_dir()}", f"-I{include}", str(source), "-o", staging]
        command += [f"-L{lib}", "-ldnnl", f"-Wl,-rpath,{lib}"]
        try:
            done = subprocess.run(
                command, capture_output=True, text=True, timeout=_BUILD_TIMEOUT_S, check=False
            )
        except subprocess.TimeoutExpired:
            raise OneDnnUnavailable(
                f"building oneDNN's kernel took over {_BUILD_TIMEOUT_S} s; the XLA backend needs "
                "no build"
            ) from None
        if done.returncode != 0:
            lines = [line for line in done.stderr.splitlines() if line.strip()]
            last = lines[-1] if lines else f"exit status {done.returncode}"
            raise OneDnnUnavailable(f"building oneDNN's kernel failed: {last}")


def load() -> str:
    """Build (once per version, see :func:`library_path`), load and register the kernel.

    Returns the library's path. Raises :class:`OneDnnUnavailable` with one line saying what
    to do when oneDNN, its headers or a compiler are missing or the build fails. Safe to call
    from several threads; later calls return at once.
    """
    global _loaded, _registered
    with _lock:
        if _loaded is not None:
            return _loaded
        import filelock

        path = library_path()
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with filelock.FileLock(path + ".lock"):
                if not os.path.exists(path):
                    _compile(path)
        except OSError as error:  # An unwritable or full cache directory.
            raise OneDnnUnavailable(
                f"cannot build oneDNN's kernel into {os.path.dirname(path)} ({error}); set "
                "PANNS_JAX_HOME to a writable directory"
            ) from None
        try:
            handle = ctypes.cdll.LoadLibrary(path)
        except OSError as error:
            raise OneDnnUnavailable(
                f"cannot load oneDNN's kernel {path} ({error}); delete it to rebuild"
            ) from None
        if not _registered:  # JAX refuses a second handler under a name: once per process.
            for target in TARGETS:
                capsule = jax.ffi.pycapsule(getattr(handle, target))
                jax.ffi.register_ffi_target(target, capsule, "cpu")
            _registered = True
        _loaded = path
        return path


def _call(target: str, shape: Tuple[int, ...], *args: jax.Array, geometry: Geometry) -> jax.Array:
    attributes = {name: np.int64(value) for name, value in zip(GEOMETRY_NAMES, geometry)}
    out = jax.ShapeDtypeStruct(shape, jnp.float32)
    return jax.ffi.ffi_call(target, out)(*args, **attributes)


def output_shape(x_shape, w_shape, geometry: Geometry) -> Tuple[int, ...]:
    """The shape of ``conv(x, w, geometry)``: (N, T, C) or (N, T, F, C)."""
    stride, top, bottom, pad_w, dilation = geometry
    kernel = w_shape[0]
    length = (x_shape[1] + top + bottom - (kernel - 1) * dilation - 1) // stride + 1
    if len(x_shape) == 3:
        return (x_shape[0], length, w_shape[-1])
    return (x_shape[0], length, x_shape[2] + 2 * pad_w - w_shape[1] + 1, w_shape[-1])


def conv(x: jax.Array, w: jax.Array, geometry: Geometry) -> jax.Array:
    """NWC x WIO or NHWC x HWIO float32 convolution of ``geometry`` on oneDNN (CPU only)."""
    return _call("OnednnConv", output_shape(x.shape, w.shape, geometry), x, w, geometry=geometry)


def grads(x: jax.Array, w: jax.Array, dy: jax.Array, geometry: Geometry):
    """``conv``'s input and weight gradients for the output gradient ``dy`` on oneDNN."""
    dx = _call("OnednnConvBackwardData", x.shape, dy, w, geometry=geometry)
    return dx, _call("OnednnConvBackwardWeights", w.shape, x, dy, geometry=geometry)


def xla_conv(x: jax.Array, w: jax.Array, geometry: Geometry) -> jax.Array:
    """What :func:`conv` computes, as XLA's convolution (any float dtype, any platform)."""
    stride, top, bottom, pad_w, dilation = geometry
    if x.ndim == 3:
        return lax.conv_general_dilated(
            x,
            w,
            (stride,),
            ((top, bottom),),
            rhs_dilation=(dilation,),
            dimension_numbers=("NWC", "WIO", "NWC"),
        )
    return lax.conv_general_dilated(
        x,
        w,
        (stride, 1),
        ((top, bottom), (pad_w, pad_w)),
        rhs_dilation=(dilation, 1),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )


def xla_equivalent(target: str, args, geometry: Geometry, result_shape: Tuple[int, ...]):
    """What the handler ``target`` computes from ``args`` (its operands), as XLA computes it
    in the operands' dtype: the float64 twin of a oneDNN call, for round-off studies."""
    if target == "OnednnConv":
        return xla_conv(*args, geometry)
    if target == "OnednnConvBackwardData":
        dy, w = args
        zeros = jnp.zeros(result_shape, dy.dtype)
        return jax.vjp(lambda x: xla_conv(x, w, geometry), zeros)[1](dy)[0]
    if target == "OnednnConvBackwardWeights":
        x, dy = args
        zeros = jnp.zeros(result_shape, dy.dtype)
        return jax.vjp(lambda w: xla_conv(x, w, geometry), zeros)[1](dy)[0]
    raise ValueError(f"{target!r} is not one of oneDNN's handlers here: {', '.join(TARGETS)}")
