"""MobileNet's separable convolutions made fast on CPU: depthwise 3x3 and pointwise 1x1.

XLA:CPU runs grouped convolutions with ``feature_group_count == channels`` (the 3x3
depthwise convs of MobileNetV1/V2, Kong et al. 2020, Sec. III-F) 16-55x slower than the
same arithmetic written as nine shifted, broadcast multiply-adds, and their gradients
4-11x slower (per layer at MobileNetV1's shapes, batch 8 of 10 s clips, 2 cores). On CPU
:func:`depthwise_conv` therefore computes, with the same sums reassociated:

* the forward pass as ``sum over taps (kh, kw) of x_pad[shifted by (kh, kw), strided] *
  w[kh, kw]``: one elementwise fusion, no im2col buffer;
* the input gradient as the same shifted sum over the stride-dilated, padded output
  gradient with the kernel flipped (a transposed convolution);
* the weight gradient as, per tap, ``x_pad[shifted] * dy`` summed over the batch and
  blocks of rows in one elementwise pass, then one reduction of what is left.

:func:`avg_pool` (the pool MobileNets apply after each depthwise conv) is written as
strided slices so that XLA fuses the conv into it.

Other backends (GPU/TPU) keep XLA's convolution and XLA's own gradient, selected at
lowering time with ``lax.platform_dependent`` as in :mod:`panns_jax.models.same_conv`.
:func:`pointwise_conv` computes 1x1 convs as matrix products (on every backend).
MobileNetV1 / V2 against the original on 2 CPU cores: forward 1.7x / 2.5x, train step
1.2x / 1.2x (README, Speed).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Iterator, Sequence, Tuple

import jax
import jax.numpy as jnp
from jax import lax

from panns_jax.models import backends, layers, same_conv

_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")
# Set while exporters trace (see :func:`plain_lax_convolutions`).
_PLAIN_LAX = [False]
Pairs = Tuple[Tuple[int, int], Tuple[int, int]]


def _xla_conv(x: jax.Array, w: jax.Array, strides: Tuple[int, int], padding: Pairs) -> jax.Array:
    return lax.conv_general_dilated(
        x,
        w,
        strides,
        padding,
        dimension_numbers=_DIMENSION_NUMBERS,
        feature_group_count=x.shape[-1],
    )


def _taps(xp: jax.Array, kernel: Tuple[int, int], out_hw, strides):
    """Yield ``((kh, kw), xp[:, kh + s*i, kw + s*j, :])`` for every tap of the kernel."""
    (oh, ow), (sh, sw) = out_hw, strides
    n, _, _, c = xp.shape
    for kh in range(kernel[0]):
        for kw in range(kernel[1]):
            yield (
                (kh, kw),
                lax.slice(
                    xp,
                    (0, kh, kw, 0),
                    (n, kh + (oh - 1) * sh + 1, kw + (ow - 1) * sw + 1, c),
                    (1, sh, sw, 1),
                ),
            )


def _pad(x: jax.Array, padding) -> jax.Array:
    return lax.pad(
        x, jnp.array(0, x.dtype), ((0, 0, 0), *((lo, hi, 0) for lo, hi in padding), (0, 0, 0))
    )


def _correlate(xp: jax.Array, w: jax.Array, strides: Tuple[int, int]) -> jax.Array:
    """Valid depthwise correlation of an already padded ``xp``: sum of shifted multiply-adds.

    It is one loop fusion when its consumer is elementwise: MobileNets pool it with
    :func:`avg_pool`, strided slices, in the same loop. When a reduce-window pool
    consumes it, XLA:CPU's YNNPACK fusion copies out every shifted input and broadcast
    weight instead, and MobileNetV1's train step takes 1.2x longer.
    """
    kernel = w.shape[:2]
    out_hw = tuple((size - k) // s + 1 for size, k, s in zip(xp.shape[1:3], kernel, strides))
    y = None
    for (kh, kw), tap in _taps(xp, kernel, out_hw, strides):
        term = tap * w[kh, kw, 0]
        y = term if y is None else y + term
    return y


def _shifted_conv(
    x: jax.Array, w: jax.Array, strides: Tuple[int, int], padding: Pairs
) -> jax.Array:
    """The depthwise conv as a sum of ``kh * kw`` shifted, broadcast multiply-adds."""
    return _correlate(_pad(x, padding), w, strides)


def avg_pool(x: jax.Array, size: int) -> jax.Array:
    """Non-overlapping ``size`` x ``size`` average pool (floor) as a sum of strided slices.

    An elementwise sum, so XLA:CPU fuses the depthwise conv before it into the same loop
    (each conv output is read once) instead of a YNNPACK reduce-window fusion that first
    copies out every shifted input and broadcast weight of that conv. The gradient
    repeats each output gradient / size^2 over its window by a broadcast. The strided
    slices' own gradient, one interior-padded copy per window position, makes a
    MobileNetV1 train step 3-6% slower. Size 1 is the identity.
    """
    return x if size == 1 else _avg_pool(x, size, tuple(x.shape))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _avg_pool(x, size, shape):
    h, w = (shape[1] // size) * size, (shape[2] // size) * size
    total = None
    for i in range(size):
        for j in range(size):
            part = x[:, i:h:size, j:w:size]
            total = part if total is None else total + part
    return total * jnp.asarray(1.0 / (size * size), x.dtype)


def _avg_pool_fwd(x, size, shape):
    return _avg_pool(x, size, shape), None


def _avg_pool_bwd(size, shape, _, g):
    n, h, w, c = shape
    rows, cols = g.shape[1], g.shape[2]
    g = g * jnp.asarray(1.0 / (size * size), g.dtype)
    window = jnp.broadcast_to(g[:, :, None, :, None], (n, rows, size, cols, size, c))
    dx = window.reshape(n, rows * size, cols * size, c)
    return (jnp.pad(dx, ((0, 0), (0, h - rows * size), (0, w - cols * size), (0, 0))),)


_avg_pool.defvjp(_avg_pool_fwd, _avg_pool_bwd)


def _xla_grads(x, w, dy, strides, padding):
    _, vjp = jax.vjp(functools.partial(_xla_conv, strides=strides, padding=padding), x, w)
    return vjp(dy)


def _input_grad(x_shape, w, dy, strides, padding):
    """dx as a stride-1 valid shifted sum over dy dilated by the stride, with w flipped.

    With y[i] = sum_k x_pad[s*i + k] w[k]: dx[j] = sum_k dyd[j + lo - k] w[k], where dyd
    holds dy[i] at s*i; so pad dyd by (K - 1 - lo) in front and correlate with w reversed.
    """
    kernel = w.shape[:2]
    config = [(0, 0, 0)]
    for size, k, s, (lo, _), out in zip(x_shape[1:3], kernel, strides, padding, dy.shape[1:3]):
        front = k - 1 - lo
        back = size + k - 1 - front - ((out - 1) * s + 1)
        config.append((front, back, s - 1))
    config.append((0, 0, 0))
    dyp = lax.pad(dy, jnp.array(0, dy.dtype), config)
    return _correlate(dyp, w[::-1, ::-1], (1, 1))


# Products summed per output of the weight gradient's elementwise pass (see _weight_grad).
_TERMS_PER_PASS = 40


def _weight_grad(x, w, dy, strides, padding):
    """dw[kh, kw, 0, c] = sum over (n, i, j) of x_pad[n, s*i + kh, s*j + kw, c] dy[n, i, j, c].

    It takes two passes. Per tap, one elementwise pass sums the products over the batch
    and over ``split`` blocks of rows (up to ``_TERMS_PER_PASS`` terms, an array 1 / terms
    the size of dy). Then one reduction sums what is left of all taps. A reduction per
    tap over the whole product takes 4-6x longer, since XLA:CPU writes each product out
    before reducing it. Batches over ``layers.MAX_UNROLLED_BATCH`` take that reduction
    all the same, since the elementwise pass unrolls the sum over the batch in the graph.
    """
    xp = _pad(x, padding)
    n, rows = dy.shape[:2]
    if n > layers.MAX_UNROLLED_BATCH:
        partials = {
            index: jnp.sum(tap * dy, axis=0, dtype=jnp.float32)
            for index, tap in _taps(xp, w.shape[:2], dy.shape[1:3], strides)
        }
        return _sum_taps(partials, w.shape)
    split = max(
        d for d in range(1, rows + 1) if rows % d == 0 and (d == 1 or n * d <= _TERMS_PER_PASS)
    )
    block = rows // split
    partials = {}
    for index, tap in _taps(xp, w.shape[:2], dy.shape[1:3], strides):
        acc = None
        for b in range(n):
            for r in range(0, rows, block):
                term = tap[b, r : r + block].astype(jnp.float32) * dy[b, r : r + block].astype(
                    jnp.float32
                )
                acc = term if acc is None else acc + term
        partials[index] = acc
    return _sum_taps(partials, w.shape)


def _sum_taps(partials, shape):
    """Each tap's partial sums (same shape, channels last) summed: the kernel ``shape``."""
    ordered = [partials[(kh, kw)] for kh in range(shape[0]) for kw in range(shape[1])]
    return jnp.sum(jnp.stack(ordered), axis=tuple(range(1, ordered[0].ndim))).reshape(shape)


def _cpu_grads(x, w, dy, strides, padding):
    dx = _input_grad(x.shape, w, dy, strides, padding)
    dw = _weight_grad(x, w, dy, strides, padding)
    return dx.astype(x.dtype), dw.astype(w.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def depthwise_conv(
    x: jax.Array, w: jax.Array, strides: Tuple[int, int] = (1, 1), padding: Pairs = ((1, 1), (1, 1))
) -> jax.Array:
    """NHWC x HWIO depthwise conv (``w`` is ``(kh, kw, 1, C)``, one filter per channel of x).

    ``strides`` and explicit ``padding`` ((top, bottom), (left, right)) are as in
    ``lax.conv_general_dilated``. CPU computes shifted multiply-adds, other backends
    XLA's conv.
    """
    return _forward(x, w, strides, padding)


def _forward(x, w, strides, padding):
    return lax.platform_dependent(
        x,
        w,
        cpu=functools.partial(_shifted_conv, strides=strides, padding=padding),
        default=functools.partial(_xla_conv, strides=strides, padding=padding),
    )


def _depthwise_fwd(x, w, strides, padding):
    return _forward(x, w, strides, padding), (x, w)


def _depthwise_bwd(strides, padding, residuals, dy):
    x, w = residuals
    return lax.platform_dependent(
        x,
        w,
        dy,
        cpu=functools.partial(_cpu_grads, strides=strides, padding=padding),
        default=functools.partial(_xla_grads, strides=strides, padding=padding),
    )


depthwise_conv.defvjp(_depthwise_fwd, _depthwise_bwd)


@contextlib.contextmanager
def plain_lax_convolutions() -> Iterator[None]:
    """Trace depthwise and 1x1 convs as one ``lax.conv_general_dilated`` while the block runs.

    For exporters (ONNX, TFLite), which convert a depthwise conv into their own native
    op. jax2onnx cannot lower ``lax.platform_dependent`` either. Plain convolutions trace
    with XLA's backend (:mod:`panns_jax.models.backends`): an export holds no CPU kernel of
    this process. The switch is not thread safe, so exports are traced from one thread (as
    ``panns_jax.export`` does).
    """
    previous = _PLAIN_LAX[0]
    _PLAIN_LAX[0] = True
    try:
        with backends.tracing_with("xla"):
            yield
    finally:
        _PLAIN_LAX[0] = previous


def is_depthwise(
    lhs_shape: Sequence[Any], rhs_shape: Sequence[Any], feature_group_count: int
) -> bool:
    """Whether an NHWC x HWIO conv is depthwise with channel multiplier 1."""
    return (
        len(lhs_shape) == 4
        and len(rhs_shape) == 4
        and feature_group_count > 1
        and isinstance(lhs_shape[-1], int)
        and lhs_shape[-1] == feature_group_count
        and rhs_shape[2] == 1
        and rhs_shape[3] == feature_group_count
    )


def pointwise_conv(x: jax.Array, w: jax.Array) -> jax.Array:
    """A 1x1 NHWC x HWIO conv as one matrix product over the channel axis.

    It computes the same sums as the conv. What differs is the gradient. XLA:CPU computes
    a 1x1 conv's weight gradient as a convolution whose window is the whole (time, freq)
    map, after transposing both operands (0.6 s of a 1.9 s MobileNetV1 train step at
    8 x 5 s for features.1's 32->64 conv alone). A product's gradient is two products.

    The product is taken on ``x`` flattened to (positions, channels), so that the weight
    gradient contracts one axis, which XLA:CPU computes without first transposing the
    output gradient. Contracting (batch, time, freq) of the 4-D arrays, it writes a
    transposed copy of the output gradient (10 ms of features.1's backward at 8 x 5 s).
    """
    flat = x.reshape(-1, x.shape[-1])
    y = lax.dot_general(flat, w[0, 0], (((1,), (0,)), ((), ())))
    return y.reshape(*x.shape[:-1], w.shape[-1])


def conv_general_dilated(*args: Any, **kwargs: Any) -> jax.Array:
    """Drop-in for ``lax.conv_general_dilated`` (flax's ``Conv.conv_general_dilated``).

    Depthwise NHWC convs with explicit padding go through :func:`depthwise_conv`, and
    unpadded 1x1 convs through :func:`pointwise_conv`. Every other conv goes to
    :func:`same_conv.conv_general_dilated`.
    """
    call = same_conv.conv_arguments(*args, **kwargs)
    lhs, rhs, strides, padding = (call[k] for k in ("lhs", "rhs", "window_strides", "padding"))
    groups = call["feature_group_count"]
    fast = not _PLAIN_LAX[0] and same_conv.is_plain(call)
    if fast and is_depthwise(lhs.shape, rhs.shape, groups):
        pads = tuple((int(lo), int(hi)) for lo, hi in padding)
        return depthwise_conv(lhs, rhs, tuple(int(s) for s in strides), pads)
    if (
        fast
        and tuple(rhs.shape[:2]) == (1, 1)
        and groups == 1
        and tuple(strides) == (1, 1)
        and all(int(lo) == 0 and int(hi) == 0 for lo, hi in padding)
    ):
        return pointwise_conv(lhs, rhs)
    return same_conv.conv_general_dilated(**call)
