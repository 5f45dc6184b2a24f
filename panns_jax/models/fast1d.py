"""The 1-D convolution and max-pool of the raw-waveform networks, with fast CPU gradients.

XLA:CPU differentiates a 1-D convolution into two more convolutions, and a max-pool into a
select-and-scatter. On the long maps of the waveform trunks (LeeNet, DaiNet, Res1dNet and
Wavegram-Logmel's wavegram, Kong et al. 2020, Sec. III-D and III-E: 16k-53k samples of 64
to 128 channels in a 5 s clip) all three are slower than the same sums written as matrix
products and elementwise passes. On CPU this module therefore computes, with the same sums
reassociated:

* the weight gradient of :func:`conv` as one matrix product of the unfolded input (the
  kernel's taps, strided and dilated as the conv reads them, side by side: kernel x the
  input) and the output gradient;
* the input gradient of a stride-1 conv as one product of the output gradient and the
  kernel, followed by a sum of the taps' columns at their shifts (col2im). Strided convs
  (the first conv, on the waveform itself) keep XLA's input gradient;
* the gradient of :func:`max_pool1d` as one elementwise pass over the pooling windows that
  routes each output gradient to the first maximum of its window, the element XLA's
  select-and-scatter (and PyTorch) picks.

A train step at batch 8 x 5 s on 2 cores (``benchmarks/train_step.py``'s step, the two
gradients interleaved in one run) takes 0.89x (LeeNet24), 0.94x (DaiNet19) and 0.91x
(Res1dNet31) of its time with XLA's gradients; Wavegram-Logmel-Cnn14's, whose time goes to
its 2-D trunk, is unchanged.
Other backends (GPU/TPU) keep XLA's own gradients, selected at lowering time with
``lax.platform_dependent`` as in :mod:`panns_jax.models.same_conv`. The forward passes are
``lax.conv_general_dilated`` and ``reduce_window``, so inference and exports compute XLA's
own operations, unless the oneDNN backend is chosen (:mod:`panns_jax.models.backends`): then
the forward pass and both gradients of float32 convs run on oneDNN's kernels on CPU.
"""

from __future__ import annotations

import functools
from typing import Any, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from panns_jax.models import backends, same_conv

_DIMENSION_NUMBERS = ("NWC", "WIO", "NWC")
# A conv's static arguments: stride, (left, right) padding, dilation.
Geometry = Tuple[int, Tuple[int, int], int]


def _conv(x: jax.Array, w: jax.Array, geometry: Geometry) -> jax.Array:
    stride, padding, dilation = geometry
    return lax.conv_general_dilated(
        x, w, (stride,), (padding,), rhs_dilation=(dilation,), dimension_numbers=_DIMENSION_NUMBERS
    )


def _xla_grads(x, w, dy, geometry):
    _, vjp = jax.vjp(functools.partial(_conv, geometry=geometry), x, w)
    return vjp(dy)


def _onednn_geometry(geometry: Geometry) -> Tuple[int, int, int, int, int]:
    stride, (left, right), dilation = geometry
    return (stride, left, right, 0, dilation)


def _onednn_conv(x, w, geometry):
    from panns_jax.kernels import onednn

    return onednn.conv(x, w, _onednn_geometry(geometry))


def _onednn_grads(x, w, dy, geometry):
    from panns_jax.kernels import onednn

    return onednn.grads(x, w, dy, _onednn_geometry(geometry))


def _forward(x, w, geometry):
    """The convolution: oneDNN's on CPU when the backend takes it, else XLA's."""
    xla, onednn = (functools.partial(f, geometry=geometry) for f in (_conv, _onednn_conv))
    return backends.convolve(x, w, xla, onednn)


def _weight_grad_unfolded(x, dy, kernel, geometry):
    """dW[k] = sum over (n, t) of x_pad[n, t * stride + k * dilation]^T dy[n, t], one product."""
    stride, (left, right), dilation = geometry
    ci, (n, t, co) = x.shape[-1], dy.shape
    xp = jnp.pad(x, ((0, 0), (left, right), (0, 0)))
    span = stride * (t - 1) + 1
    cols = jnp.concatenate(
        [xp[:, k * dilation : k * dilation + span : stride] for k in range(kernel)], axis=-1
    )
    grad = lax.dot_general(
        cols.reshape(n * t, kernel * ci), dy.reshape(n * t, co), (((0,), (0,)), ((), ()))
    )
    return grad.reshape(kernel, ci, co)


def _input_grad_col2im(w, dy, length, geometry):
    """dx = col2im(dy @ W^T) of a stride-1 conv: the taps' columns summed at their shifts."""
    _, (left, right), dilation = geometry
    kernel, ci, co = w.shape
    n, t, _ = dy.shape
    cols = lax.dot_general(
        dy.reshape(n * t, co), w.reshape(kernel * ci, co), (((1,), (1,)), ((), ()))
    ).reshape(n, t, kernel * ci)
    padded = length + left + right
    dx = None
    for k in range(kernel):
        shift = k * dilation
        columns = cols[:, :, k * ci : (k + 1) * ci]
        tap = jnp.pad(columns, ((0, 0), (shift, padded - t - shift), (0, 0)))
        dx = tap if dx is None else dx + tap
    return dx[:, left : left + length]


def _cpu_grads(x, w, dy, geometry):
    dw = _weight_grad_unfolded(x, dy, w.shape[0], geometry)
    if geometry[0] == 1:
        dx = _input_grad_col2im(w, dy, x.shape[1], geometry)
    else:
        dx, _ = _xla_grads(x, w, dy, geometry)
    return dx.astype(x.dtype), dw.astype(w.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv(x: jax.Array, w: jax.Array, geometry: Geometry) -> jax.Array:
    """NWC x WIO conv with ``geometry = (stride, (left, right) padding, dilation)``."""
    return _forward(x, w, geometry)


def _conv_fwd(x, w, geometry):
    return _forward(x, w, geometry), (x, w)


def _conv_bwd(geometry, residuals, dy):
    x, w = residuals
    cpu = _onednn_grads if backends.onednn_takes(x, w) else _cpu_grads
    return lax.platform_dependent(
        x,
        w,
        dy,
        cpu=functools.partial(cpu, geometry=geometry),
        default=functools.partial(_xla_grads, geometry=geometry),
    )


conv.defvjp(_conv_fwd, _conv_bwd)


def conv_general_dilated(*args: Any, **kwargs: Any) -> jax.Array:
    """Drop-in for ``lax.conv_general_dilated`` (flax's ``Conv.conv_general_dilated``).

    NWC x WIO convs with explicit padding, no input dilation and no groups go through
    :func:`conv`; every other call goes to lax.
    """
    call = same_conv.conv_arguments(*args, **kwargs)
    if not same_conv.in_layout(call, _DIMENSION_NUMBERS) or call["feature_group_count"] != 1:
        return lax.conv_general_dilated(**call)
    (stride,) = call["window_strides"]
    ((left, right),) = call["padding"]
    (dilation,) = call["rhs_dilation"] or (1,)
    return conv(call["lhs"], call["rhs"], (int(stride), (int(left), int(right)), int(dilation)))


def _reduce_window_max(x: jax.Array, size: int, padding: int) -> jax.Array:
    return nn.max_pool(x, (size,), strides=(size,), padding=((padding, padding),))


def _xla_pool_grad(x, dy, size, padding):
    _, vjp = jax.vjp(functools.partial(_reduce_window_max, size=size, padding=padding), x)
    return vjp(dy)[0]


def _first_max_grad(x, dy, size, padding):
    """Each window's output gradient at the window's first maximum, zeros elsewhere."""
    n, length, c = x.shape
    out = dy.shape[1]
    right = max(out * size - length - padding, 0)
    xp = jnp.pad(x, ((0, 0), (padding, right), (0, 0)), constant_values=-jnp.inf)
    windows = xp[:, : out * size].reshape(n, out, size, c)
    best, first = windows[:, :, 0], jnp.zeros((n, out, c), jnp.int32)
    for k in range(1, size):
        larger = windows[:, :, k] > best
        best = jnp.where(larger, windows[:, :, k], best)
        first = jnp.where(larger, k, first)
    zero = jnp.zeros((), dy.dtype)
    grad = jnp.stack([jnp.where(first == k, dy, zero) for k in range(size)], axis=2)
    grad = grad.reshape(n, out * size, c)
    grad = jnp.pad(grad, ((0, 0), (0, max(length + padding - out * size, 0)), (0, 0)))
    return grad[:, padding : padding + length]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _max_pool(x: jax.Array, size: int, padding: int) -> jax.Array:
    return _reduce_window_max(x, size, padding)


def _max_pool_fwd(x, size, padding):
    return _reduce_window_max(x, size, padding), x


def _max_pool_bwd(size, padding, x, dy):
    grad = lax.platform_dependent(
        x,
        dy,
        cpu=functools.partial(_first_max_grad, size=size, padding=padding),
        default=functools.partial(_xla_pool_grad, size=size, padding=padding),
    )
    return (grad,)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


def max_pool1d(x: jax.Array, size: int, padding: int = 0) -> jax.Array:
    """PyTorch's ``max_pool1d(kernel=stride=size, padding)`` on ``(B, L, C)``: pads with
    -inf, floors the length."""
    return _max_pool(x, size, padding)
