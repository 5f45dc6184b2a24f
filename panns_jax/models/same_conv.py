"""A 'same'-padded stride-1 2-D convolution that stays fast on CPU, forward and backward.

XLA's CPU convolution is ~100x slower when the time axis has fewer than ~6 rows
(e.g. Cnn14's deep blocks on a 1 s window). Extra zero rows at the end of time are
what the padding adds anyway, so :func:`conv_general_dilated` pads such inputs to 6
rows and crops the output: identical results at the fast speed.

XLA:CPU differentiates a convolution into two more convolutions, and two of those
shapes are slow there (measured on a 2-core AVX-512 machine, batch 8 of 5 s clips,
``benchmarks/train_step.py``):

* the weight gradient of a conv on a large map (Cnn14's first blocks) is a convolution
  whose "kernel" is the whole (time, freq) map: 3-4x slower than the forward conv;
* the input gradient on a tiny map (Cnn14's last blocks, 31x4 and 15x2) runs 2-4x
  slower than the forward conv.

On CPU this module computes both as matrix products instead (same sums, reassociated):
the weight gradient of a large map (3x3 kernels) as one product of a frequency-unfolded
input and time-shifted output gradients, the input gradient of a tiny map as one product
followed by a sum of the kernel taps' columns at their shifts (col2im). A Cnn14 train step takes
1.4x (batch 8 x 5 s) to 1.7x (32 x 10 s) longer without them (jax 0.10.2). The first
conv on the log-mel (one input channel) takes both gradients as products (im2col,
col2im). Other backends (GPU/TPU) keep XLA's own gradient, selected at lowering time
with ``lax.platform_dependent``. The forward pass is ``lax.conv_general_dilated``, so
inference and exports compute XLA's own convolution, unless the oneDNN backend is chosen
(:mod:`panns_jax.models.backends`): then the forward pass and both gradients of float32 convs
run on oneDNN's kernels on CPU.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Dict, Mapping, Tuple

import jax
import jax.numpy as jnp
from jax import lax

from panns_jax.models import backends

_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")
# Maps with fewer (time x freq) positions than this are "tiny": input gradient as col2im.
# Larger maps take the unfolded weight gradient. Tuned on whole Cnn14 train steps
# (benchmarks/train_step.py): a threshold of 1024, or col2im alone, is slower.
_TINY_MAP = 256
# The unfolded weight gradient needs enough input channels to make a useful matrix product,
# and a small kernel: a 5x5 kernel unfolds the input five-fold, and Cnn6's train step
# (5x5 convs) is 1.06x faster with XLA's weight gradient (benchmarks/train_step.py).
_MIN_UNFOLD_CHANNELS = 16
_MAX_UNFOLD_KERNEL = 3
# Fewer time rows than this make XLA:CPU's convolution ~100x slower.
_MIN_FAST_ROWS = 6


def _conv(x: jax.Array, w: jax.Array, pad: int) -> jax.Array:
    return lax.conv_general_dilated(
        x, w, (1, 1), ((pad, pad), (pad, pad)), dimension_numbers=_DIMENSION_NUMBERS
    )


def _xla_grads(x, w, dy, pad):
    _, vjp = jax.vjp(functools.partial(_conv, pad=pad), x, w)
    return vjp(dy)


def _onednn_conv(x, w, pad):
    from panns_jax.kernels import onednn

    return onednn.conv(x, w, (1, pad, pad, pad, 1))


def _onednn_grads(x, w, dy, pad):
    from panns_jax.kernels import onednn

    return onednn.grads(x, w, dy, (1, pad, pad, pad, 1))


def _forward(x, w, pad):
    """The convolution: oneDNN's on CPU when the backend takes it, else XLA's."""
    xla, onednn = (functools.partial(f, pad=pad) for f in (_conv, _onednn_conv))
    return backends.convolve(x, w, xla, onednn)


def _weight_grad_unfolded(x, dy, kernel, pad):
    """dW[kh, kw] = sum over (n, t, f) of x_pad[n, t + kh, f + kw]^T dy[n, t, f], one product.

    The input is unfolded along frequency only (kw: kernel x the input, not kernel^2 as
    a full im2col) and dy is stacked at the kernel's time shifts (kh), so every tap comes
    out of a single (kernel*Ci, rows) x (rows, kernel*Co) matrix product.
    """
    n, h, w_, ci = x.shape
    co = dy.shape[-1]
    xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    x_kw = jnp.concatenate([xp[:, :, k : k + w_] for k in range(kernel)], axis=-1)
    dy_kh = jnp.concatenate(
        [jnp.pad(dy, ((0, 0), (k, kernel - 1 - k), (0, 0), (0, 0))) for k in range(kernel)], axis=-1
    )
    grad = lax.dot_general(
        x_kw.reshape(-1, kernel * ci), dy_kh.reshape(-1, kernel * co), (((0,), (0,)), ((), ()))
    )  # [kw * Ci + i, kh * Co + o]
    return grad.reshape(kernel, ci, kernel, co).transpose(2, 0, 1, 3)


def _weight_grad_im2col(x, dy, kernel, pad):
    """dW = im2col(x)^T dy: one product, for inputs with few channels (the first conv)."""
    n, h, w_, ci = x.shape
    xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    cols = jnp.concatenate(
        [xp[:, kh : kh + h, kw : kw + w_] for kh in range(kernel) for kw in range(kernel)],
        axis=-1,
    )
    grad = lax.dot_general(
        cols.reshape(-1, kernel * kernel * ci),
        dy.reshape(-1, dy.shape[-1]),
        (((0,), (0,)), ((), ())),
    )
    return grad.reshape(kernel, kernel, ci, dy.shape[-1])


def _input_grad_col2im(w, dy, pad):
    """dx = col2im(dy @ W^T) with the taps' columns summed as shifted slices (one loop)."""
    kernel, _, ci, co = w.shape
    n, h, w_, _ = dy.shape
    cols = lax.dot_general(
        dy.reshape(-1, co), w.reshape(kernel * kernel * ci, co), (((1,), (1,)), ((), ()))
    ).reshape(n, h, w_, kernel, kernel, ci)
    cols = jnp.pad(cols, ((0, 0), (pad, pad), (pad, pad), (0, 0), (0, 0), (0, 0)))
    dx = None
    for kh in range(kernel):
        for kw in range(kernel):
            top, left = 2 * pad - kh, 2 * pad - kw
            tap = cols[:, top : top + h, left : left + w_, kh, kw]
            dx = tap if dx is None else dx + tap
    return dx


def _cpu_grads(x, w, dy, pad):
    kernel = w.shape[0]
    if kernel * kernel * x.shape[-1] <= dy.shape[-1]:
        # Few input channels (the first conv on the log-mel: 1 -> 32 or 64): im2col and
        # col2im hold no more numbers than dy, and both gradients become one product each
        # (XLA's take 5x longer at MobileNetV1's features.0, 8 x 5 s).
        dx = _input_grad_col2im(w, dy, pad)
        dw = _weight_grad_im2col(x, dy, kernel, pad)
        return dx.astype(x.dtype), dw.astype(w.dtype)
    dx, dw = None, None
    if x.shape[1] * x.shape[2] < _TINY_MAP:
        dx = _input_grad_col2im(w, dy, pad)
    elif x.shape[-1] >= _MIN_UNFOLD_CHANNELS and kernel <= _MAX_UNFOLD_KERNEL:
        dw = _weight_grad_unfolded(x, dy, kernel, pad)
    if dx is None or dw is None:
        xla_dx, xla_dw = _xla_grads(x, w, dy, pad)
        dx = xla_dx if dx is None else dx
        dw = xla_dw if dw is None else dw
    return dx.astype(x.dtype), dw.astype(w.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def same_conv(x: jax.Array, w: jax.Array, pad: int) -> jax.Array:
    """Stride-1 NHWC x HWIO conv with ``pad`` zeros on every side (a square odd kernel)."""
    return _forward(x, w, pad)


def _same_conv_fwd(x, w, pad):
    return _forward(x, w, pad), (x, w)


def _same_conv_bwd(pad, residuals, dy):
    x, w = residuals
    cpu = _onednn_grads if backends.onednn_takes(x, w) else _cpu_grads
    return lax.platform_dependent(
        x,
        w,
        dy,
        cpu=functools.partial(cpu, pad=pad),
        default=functools.partial(_xla_grads, pad=pad),
    )


same_conv.defvjp(_same_conv_fwd, _same_conv_bwd)


_LAX_SIGNATURE = inspect.signature(lax.conv_general_dilated)


def conv_arguments(*args: Any, **kwargs: Any) -> Dict[str, Any]:
    """The arguments of a ``lax.conv_general_dilated(*args, **kwargs)`` call by name.

    Defaults fill the arguments the call leaves out. The drop-ins here and in
    :mod:`panns_jax.models.depthwise` take lax's own signature this way instead of
    restating it.
    """
    bound = _LAX_SIGNATURE.bind(*args, **kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def in_layout(call: Mapping[str, Any], dimension_numbers: Tuple[str, str, str]) -> bool:
    """Whether a convolution (its :func:`conv_arguments`) is in ``dimension_numbers``'
    layout, with explicit padding, no input dilation, no batch groups, and the default
    precision and output type: what every fast convolution of :mod:`panns_jax.models`
    takes. Strides, kernel dilation and feature groups may be any.
    """
    lhs, rhs = call["lhs"], call["rhs"]
    rank = len(dimension_numbers[0])
    return (
        lhs.ndim == rank
        and rhs.ndim == rank
        and not isinstance(call["padding"], str)
        and not call["precision"]
        and call["preferred_element_type"] is None
        and call["batch_group_count"] == 1
        and (call["lhs_dilation"] is None or tuple(call["lhs_dilation"]) == (1,) * (rank - 2))
        and lax.conv_dimension_numbers(lhs.shape, rhs.shape, call["dimension_numbers"])
        == lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    )


def is_plain(call: Mapping[str, Any]) -> bool:
    """Whether the fast convolutions here and in :mod:`panns_jax.models.depthwise` compute
    a convolution (its :func:`conv_arguments`).

    They compute NHWC x HWIO (:func:`in_layout`) without kernel dilation. Strides and
    feature groups may be any.
    """
    return in_layout(call, _DIMENSION_NUMBERS) and (
        call["rhs_dilation"] is None or tuple(call["rhs_dilation"]) == (1, 1)
    )


def conv_general_dilated(*args: Any, **kwargs: Any) -> jax.Array:
    """Drop-in for ``lax.conv_general_dilated`` (flax's ``Conv.conv_general_dilated``).

    It pads stride-1 inputs shorter than 6 time rows, and routes plain same-padded
    stride-1 convs through :func:`same_conv`.
    """
    call = conv_arguments(*args, **kwargs)
    lhs, rhs, padding = call["lhs"], call["rhs"], call["padding"]
    stride_1 = tuple(call["window_strides"]) == (1, 1)
    rows = lhs.shape[1]
    # Symbolic lengths (shape-polymorphic export) keep the plain conv: comparing them
    # would add a length constraint to the exported graph.
    if isinstance(rows, int) and rows < _MIN_FAST_ROWS and lhs.ndim == 4 and stride_1:
        padded = jnp.pad(lhs, ((0, 0), (0, _MIN_FAST_ROWS - rows), (0, 0), (0, 0)))
        # The barrier keeps XLA from folding the pad back into the conv's own padding.
        out = conv_general_dilated(**{**call, "lhs": lax.optimization_barrier(padded)})
        return out[:, :rows]
    kernel = rhs.shape[0]
    plain = (
        stride_1
        and call["feature_group_count"] == 1
        and is_plain(call)
        and kernel == rhs.shape[1]
        and kernel % 2 == 1
        and kernel > 1
        and tuple(map(tuple, padding)) == ((kernel // 2,) * 2,) * 2
    )
    if not plain:
        return lax.conv_general_dilated(**call)
    return same_conv(lhs, rhs, kernel // 2)
