"""models.depthwise on CPU equals XLA's own depthwise conv and its gradients, up to round-off.

Bounds: each output of a convolution or of its gradients is a sum of n products. Two
float32 evaluations of it, summed in different orders, differ by at most about
2 * n * eps * sum |products| (the worst case of recursive summation, for each side); the
``sum |products|`` of every output is the same computation on |x|, |w|, |dy|.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from panns_jax.models import depthwise, layers, mobilenet

EPS = float(jnp.finfo(jnp.float32).eps)


def _xla(x, w, strides, padding):
    return jax.lax.conv_general_dilated(
        x,
        w,
        strides,
        padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=x.shape[-1],
    )


def _normalised_errors(x, w, dy, strides, padding):
    """max |ours - XLA| / bound for y, dx and dw (<= 1 means within round-off)."""
    ours_y, ours_vjp = jax.vjp(lambda a, b: depthwise.depthwise_conv(a, b, strides, padding), x, w)
    ref = functools.partial(_xla, strides=strides, padding=padding)
    ref_y, ref_vjp = jax.vjp(ref, x, w)
    abs_y, abs_vjp = jax.vjp(ref, jnp.abs(x), jnp.abs(w))  # sums of |products|
    taps = w.shape[0] * w.shape[1]
    terms = {"y": taps, "dx": taps, "dw": dy.shape[0] * dy.shape[1] * dy.shape[2]}
    got = dict(zip(("y", "dx", "dw"), (ours_y, *jax.jit(ours_vjp)(dy))))
    want = dict(zip(("y", "dx", "dw"), (ref_y, *ref_vjp(dy))))
    scale = dict(zip(("y", "dx", "dw"), (abs_y, *abs_vjp(jnp.abs(dy)))))
    errors = {}
    for key in got:
        assert got[key].shape == want[key].shape and got[key].dtype == want[key].dtype, key
        bound = 2 * terms[key] * EPS * np.asarray(scale[key], np.float64) + 1e-30
        errors[key] = float(np.max(np.abs(np.asarray(got[key], np.float64) - want[key]) / bound))
    return errors


def _data(shape, kernel=3, seed=0):
    n, h, w, c = shape
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=shape), jnp.float32)
    k = jnp.asarray(rng.normal(size=(kernel, kernel, 1, c)), jnp.float32)
    return x, k, rng


CASES = [
    ((2, 12, 8, 16), (1, 1), ((1, 1), (1, 1))),  # MobileNet's: 3x3, stride 1, pad 1
    ((2, 11, 7, 8), (1, 1), ((1, 1), (1, 1))),  # odd map sizes
    ((2, 12, 8, 16), (2, 2), ((1, 1), (1, 1))),  # stride 2 (standard MobileNets)
    ((2, 11, 7, 8), (2, 2), ((1, 1), (1, 1))),  # stride 2, odd sizes: the last row unused
    ((3, 9, 2, 24), (2, 1), ((0, 1), (1, 1))),  # mixed strides, asymmetric padding
    ((layers.MAX_UNROLLED_BATCH + 2, 4, 3, 2), (1, 1), ((1, 1), (1, 1))),  # big batch
]


@pytest.mark.parametrize("shape, strides, padding", CASES)
def test_forward_and_gradients_match_xla(shape, strides, padding):
    x, w, rng = _data(shape)
    out_shape = jax.eval_shape(lambda: _xla(x, w, strides, padding)).shape
    dy = jnp.asarray(rng.normal(size=out_shape), jnp.float32)
    errors = _normalised_errors(x, w, dy, strides, padding)
    assert max(errors.values()) <= 1.0, errors


def test_sabotaged_kernel_fails(monkeypatch):
    """Negative control: reading the kernel transposed (w[kw, kh]) breaks all three."""
    original = depthwise._taps

    def transposed(xp, kernel, out_hw, strides):
        for (kh, kw), tap in original(xp, kernel, out_hw, strides):
            yield (kw, kh), tap

    monkeypatch.setattr(depthwise, "_taps", transposed)
    shape, strides, padding = CASES[2]
    x, w, rng = _data(shape)
    dy = jnp.asarray(rng.normal(size=(2, 6, 4, 16)), jnp.float32)
    errors = _normalised_errors(x, w, dy, strides, padding)
    assert min(errors.values()) > 10.0, errors


def test_cpu_lowering_has_no_grouped_convolution():
    """On CPU the shifted multiply-adds run, forward and backward, not XLA's conv."""
    x, w, _ = _data((1, 8, 4, 8))
    conv = functools.partial(depthwise.depthwise_conv, strides=(1, 1), padding=((1, 1), (1, 1)))
    text = (
        jax.jit(jax.value_and_grad(lambda a, b: conv(a, b).sum(), argnums=(0, 1)))
        .lower(x, w)
        .as_text()
    )
    assert "convolution" not in text
    assert jax.default_backend() == "cpu"


def test_bfloat16_keeps_dtypes():
    x = jnp.ones((1, 6, 4, 8), jnp.bfloat16)
    w = jnp.ones((3, 3, 1, 8), jnp.bfloat16)
    y, (dx, dw) = jax.value_and_grad(
        lambda a, b: depthwise.depthwise_conv(a, b).astype(jnp.float32).sum(), argnums=(0, 1)
    )(x, w)
    assert dx.dtype == dw.dtype == jnp.bfloat16
    assert float(dx[0, 2, 1, 0]) == 9.0  # an interior input feeds all nine taps
    assert float(dw[1, 1, 0, 0]) == 24.0  # the centre tap sees every one of the 6x4 inputs


def test_dispatch():
    dn = ("NHWC", "HWIO", "NHWC")
    x = jnp.ones((1, 8, 8, 4))
    pads = ((1, 1), (1, 1))
    jaxpr = str(
        jax.make_jaxpr(
            lambda a: depthwise.conv_general_dilated(
                a, jnp.ones((3, 3, 1, 4)), (1, 1), pads, dimension_numbers=dn, feature_group_count=4
            )
        )(x)
    )
    assert "custom_vjp" in jaxpr and "platform_index" in jaxpr
    # Channel multiplier 2 and ordinary convs keep lax / same_conv.
    grouped = depthwise.conv_general_dilated(
        x, jnp.ones((3, 3, 1, 8)), (1, 1), pads, dimension_numbers=dn, feature_group_count=4
    )
    np.testing.assert_array_equal(grouped[0, 4, 4], jnp.full((8,), 9.0))
    jaxpr = str(
        jax.make_jaxpr(
            lambda a: depthwise.conv_general_dilated(
                a, jnp.ones((3, 3, 4, 4)), (1, 1), pads, dimension_numbers=dn
            )
        )(x)
    )
    assert "custom_vjp" in jaxpr and "platform_index" not in jaxpr  # same_conv's
    with depthwise.plain_lax_convolutions():  # as exporters trace: one lax conv
        jaxpr = str(
            jax.make_jaxpr(
                lambda a: depthwise.conv_general_dilated(
                    a,
                    jnp.ones((3, 3, 1, 4)),
                    (1, 1),
                    pads,
                    dimension_numbers=dn,
                    feature_group_count=4,
                )
            )(x)
        )
    assert "platform_index" not in jaxpr and "feature_group_count=4" in jaxpr


def test_depthwise_layer_owns_the_kernel_of_a_grouped_conv():
    """The depthwise layer owns the same ``kernel`` as an nn.Conv with feature groups."""
    x = jnp.ones((1, 8, 4, 16))
    ours = mobilenet.depthwise_conv2d(16, 3, "dw", jnp.float32)
    plain = nn.Conv(
        16, (3, 3), padding=((1, 1), (1, 1)), feature_group_count=16, use_bias=False, name="dw"
    )
    p_ours = ours.init(jax.random.key(0), x)
    p_plain = plain.init(jax.random.key(0), x)
    assert jax.tree_util.tree_structure(p_ours) == jax.tree_util.tree_structure(p_plain)
    np.testing.assert_array_equal(p_ours["params"]["kernel"], p_plain["params"]["kernel"])
    assert p_ours["params"]["kernel"].shape == (3, 3, 1, 16)


def test_pointwise_matches_xla_and_owns_an_nn_conv_kernel():
    """1x1 convs as a product: forward and both gradients within round-off of XLA's conv."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(2, 6, 4, 24)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(1, 1, 24, 16)), jnp.float32)
    dy = jnp.asarray(rng.normal(size=(2, 6, 4, 16)), jnp.float32)

    def ref(a, b):
        return jax.lax.conv_general_dilated(
            a, b, (1, 1), ((0, 0), (0, 0)), dimension_numbers=("NHWC", "HWIO", "NHWC")
        )

    got_y, got_vjp = jax.vjp(depthwise.pointwise_conv, x, w)
    want_y, want_vjp = jax.vjp(ref, x, w)
    abs_y, abs_vjp = jax.vjp(ref, jnp.abs(x), jnp.abs(w))
    terms = (24, 16, 2 * 6 * 4)  # products summed per output of y, dx, dw
    for got, want, scale, n in zip(
        (got_y, *got_vjp(dy)), (want_y, *want_vjp(dy)), (abs_y, *abs_vjp(jnp.abs(dy))), terms
    ):
        assert got.shape == want.shape
        assert np.all(np.abs(np.asarray(got, np.float64) - want) <= 2 * n * EPS * scale + 1e-30)
    layer = mobilenet.pointwise_conv2d(16, "pw", jnp.float32)
    params = layer.init(jax.random.key(0), x)["params"]
    assert params["kernel"].shape == (1, 1, 24, 16) and set(params) == {"kernel"}
    np.testing.assert_array_equal(
        layer.apply({"params": params}, x), depthwise.pointwise_conv(x, params["kernel"])
    )


def _pool_agrees_with_flax(pool, shape):
    """(forward within round-off, gradient equal) of ``pool(x, 2)`` against nn.avg_pool.

    The forward is a four-term sum times 0.25 on both sides, summed in possibly another
    order, so the two agree within 4 eps x the sum of |terms| / 4. The gradient places
    g / 4 (exact) on each window and zeros on the floored rows/columns, so the two are
    equal.
    """
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=shape), jnp.float32)

    def ref(a):
        return nn.avg_pool(a, (2, 2), strides=(2, 2), padding="VALID")

    ours, ours_vjp = jax.vjp(lambda a: pool(a, 2), x)
    want, want_vjp = jax.vjp(ref, x)
    assert ours.shape == want.shape == (shape[0], shape[1] // 2, shape[2] // 2, shape[3])
    g = jnp.asarray(rng.normal(size=want.shape), jnp.float32)
    forward_ok = bool(np.all(np.abs(ours - want) <= 4 * EPS * ref(jnp.abs(x))))
    return forward_ok, bool(np.array_equal(ours_vjp(g)[0], want_vjp(g)[0]))


@pytest.mark.parametrize("shape", [(2, 8, 6, 3), (2, 9, 7, 3), (1, 250, 32, 4)])
def test_avg_pool_matches_flax_forward_and_gradient(shape):
    assert _pool_agrees_with_flax(depthwise.avg_pool, shape) == (True, True)


def test_avg_pool_negative_control():
    """A gradient spread one row off its window fails the comparison."""

    shape = (2, 9, 7, 3)

    @functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
    def broken(x, size):
        return depthwise.avg_pool(x, size)

    def fwd(x, size):
        return depthwise.avg_pool(x, size), None

    def bwd(size, _, g):
        (dx,) = depthwise._avg_pool_bwd(size, shape, None, g)
        return (jnp.roll(dx, 1, axis=1),)

    broken.defvjp(fwd, bwd)
    assert _pool_agrees_with_flax(broken, shape) == (True, False)
