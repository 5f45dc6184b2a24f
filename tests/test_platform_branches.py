"""The branches that GPUs and TPUs take, run on the CPU and checked against float64 autodiff.

Every ``lax.platform_dependent`` call of the models (BatchNorm's channel sums, the plain
convolutions' gradients, the depthwise convolution and its gradients, the 1-D convolutions'
and max-pools' gradients) is forced onto one
branch by replacing ``jax.lax.platform_dependent`` for the test. The default branch (what a
GPU or TPU lowers, tests/test_lowering.py) and the CPU branch then run here on the same
float32 inputs. Each result must lie within a round-off bound of the float64 autodiff of the
plain formula, and the two branches within twice that bound of each other; the default
branch run in float64 must meet the same bound at float64's unit round-off. A perturbed
branch (an off-by-one a port could make; every convolution's on both branches) must fail
the comparison.

The bound on each element of a result computed from ``n``-term sums is ``K * gamma_n * S``,
with ``gamma_n = n u / (1 - n u)`` (Higham, Accuracy and Stability of Numerical Algorithms,
2nd ed., Sec. 3.1: the error of an ``n``-term dot product in any summation order) and ``u``
the unit round-off (2^-24 in float32, 2^-53 in float64). ``S`` is the same result computed
on absolute values in float64 (a convolution of ``|x|`` and ``|w|``; for BatchNorm, every
subtraction made an addition): the size of the terms that cancel. ``K`` counts the separate
sources whose errors add: 1 for a convolution or a sum, 4 for BatchNorm (its mean, its
variance, the reciprocal square root and the final sum; ``n`` there grows by 8 for the
handful of operations on top of each sum).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from roundoff import (
    as_dtype,
    conv_bounds,
    conv_exact,
    conv_results,
    gamma,
    off_by_one,
    random,
    run,
    worst_ratio,
)

from panns_jax import models
from panns_jax.models import depthwise, fast1d, layers, same_conv

DN = ("NHWC", "HWIO", "NHWC")
DN_1D = ("NWC", "WIO", "NWC")


def force(
    monkeypatch: pytest.MonkeyPatch, branch: str, perturb: Optional[Callable[..., Any]] = None
) -> List[str]:
    """Make every ``lax.platform_dependent`` call run its ``branch`` ('cpu' or 'default'),
    with its arguments passed through ``perturb`` if given; returns the names of the
    functions called, in order."""
    called: List[str] = []

    def forced(*args: Any, default: Any = None, **branches: Any) -> Any:
        fn = branches["cpu"] if branch == "cpu" else default
        target = fn.func if isinstance(fn, functools.partial) else fn
        called.append(target.__name__)
        return fn(*(perturb(*args) if perturb else args))

    monkeypatch.setattr(jax.lax, "platform_dependent", forced)
    return called


# ----------------------------------------------------------------------------
# BatchNorm: layers.batch_normalize and its channel sums.
# ----------------------------------------------------------------------------

BN_SHAPE = (8, 12, 10, 16)


def bn_results(*args: jax.Array) -> List[jax.Array]:
    """Forward (y, mean, var) and gradient (dx, dscale, dbias) of batch_normalize at
    ``(x, scale, bias)`` for the cotangents ``(dy, dmean, dvar)``."""
    x, scale, bias, dy, dmean, dvar = args
    outputs, vjp = jax.vjp(
        lambda x, s, b: layers.batch_normalize(x, s, b, layers.BN_EPSILON), x, scale, bias
    )
    return [*outputs, *vjp((dy, dmean, dvar))]


def bn_exact(
    x: np.ndarray,
    scale: np.ndarray,
    bias: np.ndarray,
    dy: np.ndarray,
    dmean: np.ndarray,
    dvar: np.ndarray,
) -> Tuple[List[np.ndarray], List[np.ndarray], int]:
    """The same by float64 autodiff of the plain formula, and the absolute-value scales."""
    with jax.enable_x64(True):
        eps = layers.BN_EPSILON

        def plain(x, s, b):
            mean = jnp.mean(x, axis=(0, 1, 2))
            var = jnp.mean((x - mean) ** 2, axis=(0, 1, 2))
            return (x - mean) / jnp.sqrt(var + eps) * s + b, mean, var

        args = as_dtype([x, scale, bias], jnp.float64)
        outputs, vjp = jax.vjp(plain, *args)
        exact = [
            np.asarray(r) for r in (*outputs, *vjp(tuple(as_dtype([dy, dmean, dvar], jnp.float64))))
        ]
    n = x.size // x.shape[-1]
    axes = (0, 1, 2)
    r = 1 / np.sqrt(exact[2] + eps)
    centred = np.abs(x) + np.mean(np.abs(x), axis=axes)  # bounds |x - mean| and its error
    scales = [
        centred * np.abs(scale) * r + np.abs(bias),  # y
        np.mean(np.abs(x), axis=axes),  # mean
        np.mean(centred**2, axis=axes),  # var
        np.abs(scale) * r * (np.abs(dy) + np.abs(dy).sum(axes) / n)
        + np.abs(scale) * r * centred * r * (np.abs(dy) * centred * r).sum(axes) / n
        + (np.abs(dmean) + 2 * np.abs(dvar) * centred) / n,  # dx
        (np.abs(dy) * centred * r).sum(axes),  # dscale
        np.abs(dy).sum(axes),  # dbias
    ]
    return exact, scales, n


def bn_bounds(scales: Sequence[np.ndarray], n: int, dtype: Any) -> List[np.ndarray]:
    """BatchNorm's bounds: ``4 gamma_{n+8}`` times each result's scale."""
    return [4 * gamma(n + 8, dtype) * s for s in scales]


def drop_first_example(*arrays: jax.Array) -> tuple:
    """A perturbed channel sum's input: the batch without its first example."""
    return tuple(a[1:] for a in arrays)


@pytest.fixture(scope="module")
def bn_case() -> tuple:
    c = BN_SHAPE[-1]
    x, dy = random(np.random.default_rng(0), BN_SHAPE, BN_SHAPE)
    x = 3 * x + 1  # a mean away from zero: cancellation in x - mean
    scale, bias, dmean, dvar = random(np.random.default_rng(1), (c,), (c,), (c,), (c,))
    args = [x, scale, bias, dy, dmean, dvar]
    return args, *bn_exact(*args)


@pytest.mark.parametrize("branch", ["default", "cpu"])
def test_batchnorm_branch_matches_float64_autodiff(monkeypatch, bn_case, branch):
    args, exact, scales, n = bn_case
    called = force(monkeypatch, branch)
    got = run(bn_results, *as_dtype(args, jnp.float32))
    assert called == ["reduced" if branch == "default" else "unrolled"]
    assert worst_ratio(got, exact, bn_bounds(scales, n, np.float32)) <= 1


def test_batchnorm_branches_agree(monkeypatch, bn_case):
    args, _, scales, n = bn_case
    results = {}
    for branch in ("default", "cpu"):
        force(monkeypatch, branch)
        results[branch] = run(bn_results, *as_dtype(args, jnp.float32))
    twice = [2 * b for b in bn_bounds(scales, n, np.float32)]
    assert worst_ratio(results["default"], results["cpu"], twice) <= 1


def test_batchnorm_default_branch_in_float64(monkeypatch, bn_case):
    args, exact, scales, n = bn_case
    called = force(monkeypatch, "default")
    with jax.enable_x64(True):
        got = run(bn_results, *as_dtype(args, jnp.float64))
    assert called == ["reduced"]
    assert worst_ratio(got, exact, bn_bounds(scales, n, np.float64)) <= 1


def test_a_perturbed_batchnorm_default_branch_fails(monkeypatch, bn_case):
    args, exact, scales, n = bn_case
    force(monkeypatch, "default", perturb=drop_first_example)
    got = run(bn_results, *as_dtype(args, jnp.float32))
    assert worst_ratio(got, exact, bn_bounds(scales, n, np.float32)) > 1


# ----------------------------------------------------------------------------
# Convolutions: same_conv (plain, gradients only) and depthwise (forward and gradients).
# ----------------------------------------------------------------------------


def same_conv_case(x_shape: Tuple[int, ...], w_shape: Tuple[int, ...]) -> tuple:
    """(same_conv, its plain lax twin, float32-exact inputs, sum lengths) of one shape."""
    kernel, pad = w_shape[0], w_shape[0] // 2
    x, w = random(np.random.default_rng(2), x_shape, w_shape)
    (dy,) = random(np.random.default_rng(3), (*x_shape[:3], w_shape[-1]))
    conv = functools.partial(same_conv.same_conv, pad=pad)
    plain = lambda x, w: lax.conv_general_dilated(
        x, w, (1, 1), ((pad, pad),) * 2, dimension_numbers=DN
    )
    n, h, wd, ci = x_shape
    terms = (kernel * kernel * ci, kernel * kernel * w_shape[-1], n * h * wd)
    return conv, plain, [x, w, dy], terms


# Each shape takes another CPU path of same_conv._cpu_grads.
SAME_CONV_CASES = {
    "first conv (im2col, col2im)": ((2, 20, 16, 1), (3, 3, 1, 32)),
    "tiny map (col2im input gradient)": ((2, 6, 4, 16), (3, 3, 16, 24)),
    "large map (unfolded weight gradient)": ((2, 20, 16, 16), (3, 3, 16, 8)),
    "5x5 kernel, large map (XLA's gradients)": ((2, 20, 16, 16), (5, 5, 16, 8)),
}
DEPTHWISE_CASES = {
    "stride 1": ((2, 12, 10, 8), (1, 1), ((1, 1), (1, 1))),
    "stride 2, uneven padding": ((2, 13, 10, 8), (2, 2), ((0, 1), (1, 1))),
}


def depthwise_case(x_shape: Tuple[int, ...], strides: Tuple[int, int], padding: Any) -> tuple:
    """(depthwise_conv, its plain lax twin, float32-exact inputs, sum lengths)."""
    c = x_shape[-1]
    x, w = random(np.random.default_rng(4), x_shape, (3, 3, 1, c))
    conv = functools.partial(depthwise.depthwise_conv, strides=strides, padding=padding)
    plain = lambda x, w: lax.conv_general_dilated(
        x, w, strides, padding, dimension_numbers=DN, feature_group_count=c
    )
    y = jax.eval_shape(plain, jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32))
    (dy,) = random(np.random.default_rng(5), y.shape)
    terms = (9, 9, int(np.prod(y.shape[:3])))
    return conv, plain, [x, w, dy], terms


def fast1d_case(x_shape: Tuple[int, ...], w_shape: Tuple[int, ...], geometry: Any) -> tuple:
    """(fast1d.conv, its plain lax twin, float32-exact inputs, sum lengths)."""
    x, w = random(np.random.default_rng(6), x_shape, w_shape)
    stride, padding, dilation = geometry
    conv = functools.partial(fast1d.conv, geometry=geometry)
    plain = lambda x, w: lax.conv_general_dilated(
        x, w, (stride,), (padding,), rhs_dilation=(dilation,), dimension_numbers=DN_1D
    )
    y = jax.eval_shape(plain, jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32))
    (dy,) = random(np.random.default_rng(7), y.shape)
    kernel, ci, co = w_shape
    terms = (kernel * ci, kernel * co, y.shape[0] * y.shape[1])
    return conv, plain, [x, w, dy], terms


# Each geometry is one of the waveform networks' (stride, padding, dilation).
FAST1D_CASES = {
    "k3 (LeeNet, DaiNet)": ((2, 40, 8), (3, 8, 16), (1, (1, 1), 1)),
    "k3 dilation 2 (Res1dNet, wavegram)": ((2, 40, 8), (3, 8, 16), (1, (2, 2), 2)),
    "k1 (shortcuts)": ((2, 30, 8), (1, 8, 4), (1, (0, 0), 1)),
    "k11 stride 5 (Res1dNet's first conv)": ((2, 101, 1), (11, 1, 8), (5, (5, 5), 1)),
    "k20 stride 4 unpadded (DaiNet's first conv, shorter)": (
        (2, 120, 1),
        (20, 1, 8),
        (4, (0, 0), 1),
    ),
}


def conv_cases() -> Dict[str, tuple]:
    cases = {f"same_conv {k}": same_conv_case(*v) for k, v in SAME_CONV_CASES.items()}
    cases.update({f"depthwise {k}": depthwise_case(*v) for k, v in DEPTHWISE_CASES.items()})
    cases.update({f"fast1d {k}": fast1d_case(*v) for k, v in FAST1D_CASES.items()})
    return cases


CONV_CASES = conv_cases()
# The functions each branch calls, per module (same_conv's forward is platform-independent).
CALLED = {
    "same_conv": {"default": ["_xla_grads"], "cpu": ["_cpu_grads"]},
    "depthwise": {
        "default": ["_xla_conv", "_xla_grads"],
        "cpu": ["_shifted_conv", "_cpu_grads"],
    },
    "fast1d": {"default": ["_xla_grads"], "cpu": ["_cpu_grads"]},
}


@pytest.fixture(scope="module")
def exact_convs() -> Dict[str, Any]:
    """Each case's float64 results and scales, computed once."""
    return {name: conv_exact(case[1], *case[2]) for name, case in CONV_CASES.items()}


@pytest.mark.parametrize("branch", ["default", "cpu"])
@pytest.mark.parametrize("name", list(CONV_CASES))
def test_conv_branch_matches_float64_autodiff(monkeypatch, exact_convs, name, branch):
    conv, _, args, terms = CONV_CASES[name]
    exact, scales = exact_convs[name]
    called = force(monkeypatch, branch)
    got = run(functools.partial(conv_results, conv), *as_dtype(args, jnp.float32))
    assert called == CALLED[name.split()[0]][branch]
    assert worst_ratio(got, exact, conv_bounds(scales, terms, np.float32)) <= 1


@pytest.mark.parametrize("name", list(CONV_CASES))
def test_conv_branches_agree(monkeypatch, exact_convs, name):
    conv, _, args, terms = CONV_CASES[name]
    _, scales = exact_convs[name]
    results = {}
    for branch in ("default", "cpu"):
        force(monkeypatch, branch)
        results[branch] = run(functools.partial(conv_results, conv), *as_dtype(args, jnp.float32))
    twice = conv_bounds(scales, terms, np.float32, k=2)
    assert worst_ratio(results["default"], results["cpu"], twice) <= 1


@pytest.mark.parametrize("name", list(CONV_CASES))
def test_conv_default_branch_in_float64(monkeypatch, exact_convs, name):
    conv, _, args, terms = CONV_CASES[name]
    exact, scales = exact_convs[name]
    force(monkeypatch, "default")
    with jax.enable_x64(True):
        got = run(functools.partial(conv_results, conv), *as_dtype(args, jnp.float64))
    assert worst_ratio(got, exact, conv_bounds(scales, terms, np.float64)) <= 1


@pytest.mark.parametrize("branch", ["default", "cpu"])
@pytest.mark.parametrize("name", list(CONV_CASES))
def test_a_perturbed_conv_branch_fails(monkeypatch, exact_convs, name, branch):
    conv, _, args, terms = CONV_CASES[name]
    exact, scales = exact_convs[name]
    force(monkeypatch, branch, perturb=off_by_one)
    got = run(functools.partial(conv_results, conv), *as_dtype(args, jnp.float32))
    assert worst_ratio(got, exact, conv_bounds(scales, terms, np.float32)) > 1


def test_fast1d_routes_only_plain_1d_convs_through_its_gradient():
    x = jnp.asarray(np.arange(32.0).reshape(1, 8, 4))
    calls = {
        "plain": ((jnp.ones((3, 4, 4)), (1,), ((1, 1),)), {}, True),
        "dilated kernel": ((jnp.ones((3, 4, 4)), (1,), ((2, 2),)), {"rhs_dilation": (2,)}, True),
        "grouped": ((jnp.ones((3, 1, 4)), (1,), ((1, 1),)), {"feature_group_count": 4}, False),
        "input dilation": ((jnp.ones((3, 4, 4)), (1,), ((1, 1),)), {"lhs_dilation": (2,)}, False),
        "string padding": ((jnp.ones((3, 4, 4)), (1,), "SAME"), {}, False),
    }
    for what, (args, kwargs, routed) in calls.items():
        kwargs = {**kwargs, "dimension_numbers": DN_1D}
        ours = fast1d.conv_general_dilated(x, *args, **kwargs)
        np.testing.assert_array_equal(ours, lax.conv_general_dilated(x, *args, **kwargs), what)
        w, strides, padding = args
        conv = functools.partial(
            fast1d.conv_general_dilated, rhs=w, window_strides=strides, padding=padding, **kwargs
        )
        jaxpr = str(jax.make_jaxpr(conv)(x))
        assert ("custom_vjp" in jaxpr) == routed, what


# ----------------------------------------------------------------------------
# Max-pool: fast1d.max_pool1d's gradient, a selection (no arithmetic, so exact).
# ----------------------------------------------------------------------------

# (length, size, padding): floors with and without a dropped tail, -inf padding.
POOL_CASES = [(17, 3, 1), (18, 3, 1), (19, 4, 0), (16, 4, 0)]


def pool_inputs(length: int, size: int) -> Tuple[np.ndarray, np.ndarray]:
    """ReLU-like inputs (runs of zeros: windows whose maximum is tied) with repeated values."""
    rng = np.random.default_rng(8)
    x = np.maximum(np.round(4 * rng.standard_normal((2, length, 6))) / 4, 0)
    (dy,) = random(rng, (2, (length + 2) // size + 1, 6))  # cut to the pool's length
    return x, dy


def pool_grad(x: jax.Array, dy: jax.Array, size: int, padding: int) -> jax.Array:
    y, vjp = jax.vjp(lambda a: fast1d.max_pool1d(a, size, padding), x)
    return vjp(dy[:, : y.shape[1]])[0]


def exact_pool_grad(x: np.ndarray, dy: np.ndarray, size: int, padding: int) -> np.ndarray:
    """XLA's own gradient of the same reduce_window max in float64."""
    with jax.enable_x64(True):
        pool = lambda a: lax.reduce_window(
            a, -jnp.inf, lax.max, (1, size, 1), (1, size, 1), ((0, 0), (padding, padding), (0, 0))
        )
        x64 = jnp.asarray(x, jnp.float64)
        y, vjp = jax.vjp(pool, x64)
        return np.asarray(vjp(jnp.asarray(dy[:, : y.shape[1]], jnp.float64))[0])


@pytest.mark.parametrize("branch", ["default", "cpu"])
@pytest.mark.parametrize("length, size, padding", POOL_CASES)
def test_max_pool_gradient_is_xlas_selection(monkeypatch, branch, length, size, padding):
    x, dy = pool_inputs(length, size)
    windows = np.pad(x, ((0, 0), (padding, size), (0, 0)), constant_values=-np.inf)
    windows = windows[:, : (length + 2 * padding - size) // size * size + size]
    windows = windows.reshape(2, -1, size, 6)
    tied = (windows == windows.max(axis=2, keepdims=True)).sum(axis=2) > 1
    assert tied.any()  # the inputs exercise which of the tied maxima gets the gradient
    called = force(monkeypatch, branch)
    got = run(lambda a, b: [pool_grad(a, b, size, padding)], *as_dtype([x, dy], jnp.float32))[0]
    assert called == ["_first_max_grad" if branch == "cpu" else "_xla_pool_grad"]
    np.testing.assert_array_equal(got, exact_pool_grad(x, dy, size, padding))


def test_a_perturbed_max_pool_cpu_branch_fails(monkeypatch):
    length, size, padding = POOL_CASES[0]
    x, dy = pool_inputs(length, size)
    force(monkeypatch, "cpu", perturb=lambda x, dy: (x[:, ::-1], dy))
    got = run(lambda a, b: [pool_grad(a, b, size, padding)], *as_dtype([x, dy], jnp.float32))[0]
    assert np.any(got != exact_pool_grad(x, dy, size, padding))


def test_waveform_networks_differentiate_every_conv_and_pool_through_fast1d(monkeypatch):
    """LeeNet11's gradient takes fast1d's branch for its 9 convs and 8 max-pools."""
    called = force(monkeypatch, "cpu")
    model = models.get("LeeNet11")
    variables = models.init(model, jax.random.key(0), 3200)

    def loss(params):
        out = model.apply(
            {**variables, "params": params},
            jnp.zeros((1, 3200)),
            train=True,
            mutable=["batch_stats"],
            rngs={"dropout": jax.random.key(1)},
        )[0]
        return out["clipwise_output"].sum()

    jax.eval_shape(jax.grad(loss), variables["params"])
    assert called.count("_cpu_grads") == 9
    assert called.count("_first_max_grad") == 8
