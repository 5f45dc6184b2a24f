"""The CPU gradient of models.same_conv equals XLA's own conv gradient on every branch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from panns_jax.models import same_conv


def _lax_conv(x, w, pad):
    return jax.lax.conv_general_dilated(
        x, w, (1, 1), ((pad, pad), (pad, pad)), dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


@pytest.mark.parametrize(
    "shape, kernel, branch",
    [
        ((2, 40, 16, 32, 24), 3, "unfolded weight gradient (large map)"),
        ((2, 30, 12, 20, 8), 5, "XLA gradients (5x5 kernel, large map)"),
        ((2, 7, 3, 48, 40), 3, "col2im input gradient (tiny map)"),
        ((2, 6, 2, 16, 32), 5, "col2im, 5x5 kernel larger than the map"),
        ((2, 40, 16, 1, 8), 3, "XLA gradient (one input channel, im2col larger than dy)"),
        ((2, 40, 16, 1, 32), 3, "im2col / col2im products (the first conv: one input channel)"),
        ((2, 30, 12, 2, 64), 5, "im2col / col2im products, 5x5 kernel"),
    ],
)
def test_gradients_match_xla(shape, kernel, branch):
    n, h, w, ci, co = shape
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(n, h, w, ci)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(kernel, kernel, ci, co)), jnp.float32)
    dy = jnp.asarray(rng.normal(size=(n, h, w, co)), jnp.float32)
    pad = kernel // 2

    ours_y, ours_vjp = jax.vjp(lambda a, b: same_conv.same_conv(a, b, pad), x, k)
    ref_y, ref_vjp = jax.vjp(lambda a, b: _lax_conv(a, b, pad), x, k)
    np.testing.assert_array_equal(ours_y, ref_y)  # the forward pass is lax's own
    # The same float32 sums in another association: each dx entry sums kernel^2 * co
    # products, each dw entry n * h * w; reordering n terms moves a sum by ~sqrt(n) eps x
    # the terms' size, which the largest entry bounds (4x margin).
    terms = {"dx": kernel * kernel * co, "dw": n * h * w}
    for ours, ref, name in zip(jax.jit(ours_vjp)(dy), ref_vjp(dy), ("dx", "dw")):
        scale = float(jnp.max(jnp.abs(ref)))
        assert scale > 0
        atol = 4 * np.sqrt(terms[name]) * np.finfo(np.float32).eps * scale
        np.testing.assert_allclose(ours, ref, rtol=0, atol=atol, err_msg=f"{branch}: {name}")


def test_bfloat16_gradients_keep_dtypes():
    x = jnp.ones((1, 8, 4, 16), jnp.bfloat16)
    w = jnp.ones((3, 3, 16, 8), jnp.bfloat16)
    dx, dw = jax.grad(
        lambda a, b: same_conv.same_conv(a, b, 1).astype(jnp.float32).sum(), argnums=(0, 1)
    )(x, w)
    assert dx.dtype == dw.dtype == jnp.bfloat16
    # Interior input positions feed all 9 taps x 8 output channels.
    assert float(dx[0, 3, 1, 0]) == 72.0


def test_dispatch_keeps_other_convs_on_lax():
    x = jnp.ones((1, 8, 8, 4))
    w = jnp.ones((3, 3, 4, 4))
    dn = ("NHWC", "HWIO", "NHWC")
    plain = same_conv.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=dn)
    np.testing.assert_array_equal(plain, _lax_conv(x, w, 1))
    strided = same_conv.conv_general_dilated(x, w, (2, 2), ((1, 1), (1, 1)), dimension_numbers=dn)
    assert strided.shape == (1, 4, 4, 4)
    grouped = same_conv.conv_general_dilated(
        x,
        jnp.ones((3, 3, 1, 4)),
        (1, 1),
        ((1, 1), (1, 1)),
        dimension_numbers=dn,
        feature_group_count=4,
    )
    np.testing.assert_array_equal(grouped[0, 4, 4], jnp.full((4,), 9.0))
    # Only the same-padded stride-1 case is routed through the custom gradient.
    jaxpr = str(
        jax.make_jaxpr(
            lambda a: same_conv.conv_general_dilated(
                a, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=dn
            )
        )(x)
    )
    assert "custom_vjp" in jaxpr
    jaxpr = str(
        jax.make_jaxpr(
            lambda a: same_conv.conv_general_dilated(
                a, w, (2, 2), ((1, 1), (1, 1)), dimension_numbers=dn
            )
        )(x)
    )
    assert "custom_vjp" not in jaxpr


def test_sabotaged_im2col_fails(monkeypatch):
    """Negative control: reading the first conv's kernel transposed breaks both gradients."""
    original = same_conv._input_grad_col2im

    def transposed(w, dy, pad):
        return original(jnp.swapaxes(w, 0, 1), dy, pad)

    monkeypatch.setattr(same_conv, "_input_grad_col2im", transposed)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 12, 8, 1)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(3, 3, 1, 16)), jnp.float32)
    dy = jnp.asarray(rng.normal(size=(2, 12, 8, 16)), jnp.float32)
    ours = jax.vjp(lambda a, b: same_conv.same_conv(a, b, 1), x, k)[1](dy)[0]
    ref = jax.vjp(lambda a, b: _lax_conv(a, b, 1), x, k)[1](dy)[0]
    assert float(jnp.max(jnp.abs(ours - ref))) > 0.1 * float(jnp.max(jnp.abs(ref)))
