"""The conv backend switch: which convolutions it hands to oneDNN, that a function carries
its backend into every trace, that exports never hold the kernel, and sharded steps."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from roundoff import as_dtype, conv_bounds, conv_exact, conv_results, random, worst_ratio

from panns_jax import models
from panns_jax.models import backends, depthwise, fast1d, same_conv


def _grads(conv):
    """The forward pass and both gradients of ``conv(x, w)`` summed: one traced function."""

    def both(x, w):
        y, vjp = jax.vjp(conv, x, w)
        return (y, *vjp(jnp.ones_like(y)))

    return both


def _text(fn, *shapes, dtype=jnp.float32) -> str:
    """``fn`` lowered at float ``shapes``, as StableHLO text (nothing compiled or run)."""
    return jax.jit(fn).lower(*(jax.ShapeDtypeStruct(s, dtype) for s in shapes)).as_text()


CONV_2D = (_grads(functools.partial(same_conv.same_conv, pad=1)), (2, 8, 4, 16), (3, 3, 16, 32))
CONV_1D = (_grads(functools.partial(fast1d.conv, geometry=(1, (1, 1), 1))), (2, 30, 8), (3, 8, 16))


def test_unknown_backend_is_refused_with_the_choices():
    choices = r"unknown conv backend 'mkl': choose one of auto, xla, onednn"
    with pytest.raises(ValueError, match=choices):
        models.with_conv_backend(lambda: None, "mkl")
    with pytest.raises(ValueError, match="unknown conv backend"):
        with backends.tracing_with("cudnn"):
            pass
    assert models.CONV_BACKENDS == ("auto", "xla", "onednn")


@pytest.mark.parametrize("fn, x, w", [CONV_2D, CONV_1D], ids=["2-D", "1-D"])
def test_a_function_carries_its_backend_into_every_trace(fn, x, w):
    onednn_fn = models.with_conv_backend(fn, "onednn")
    text = _text(onednn_fn, x, w)  # Traced outside any block.
    for target in ("OnednnConv", "OnednnConvBackwardData", "OnednnConvBackwardWeights"):
        assert f"@{target}" in text or f'"{target}"' in text, target
    assert "Onednn" not in _text(fn, x, w)  # The default: XLA's convolutions.
    with backends.tracing_with("onednn"):  # For functions first traced inside the block.
        assert "Onednn" in _text(lambda x, w: fn(x, w), x, w)
        assert "Onednn" not in _text(models.with_conv_backend(fn, "xla"), x, w)
    assert backends.current() == "xla"  # The block restored the default.


def test_what_stays_on_xlas_convolutions():
    """Other dtypes, convs wider than ONEDNN_MAX_CHANNELS, and the depthwise and 1x1 convs
    of the MobileNets trace no oneDNN call; a conv at the limit does."""
    fn, x, w = CONV_2D
    onednn_fn = models.with_conv_backend(fn, "onednn")
    for dtype in (jnp.bfloat16, jnp.float64):
        with jax.enable_x64(dtype == jnp.float64):
            assert "Onednn" not in _text(onednn_fn, x, w, dtype=dtype), dtype
    limit = backends.ONEDNN_MAX_CHANNELS
    assert "Onednn" in _text(onednn_fn, x, (3, 3, 16, limit))
    assert "Onednn" not in _text(onednn_fn, x, (3, 3, 16, limit + 1))
    dn = ("NHWC", "HWIO", "NHWC")
    depthwise_conv = functools.partial(
        depthwise.conv_general_dilated,
        window_strides=(1, 1),
        padding=((1, 1), (1, 1)),
        dimension_numbers=dn,
        feature_group_count=16,
    )
    pointwise = functools.partial(
        depthwise.conv_general_dilated,
        window_strides=(1, 1),
        padding=((0, 0), (0, 0)),
        dimension_numbers=dn,
    )
    grads = models.with_conv_backend(_grads(depthwise_conv), "onednn")
    assert "Onednn" not in _text(grads, x, (3, 3, 1, 16))
    assert "Onednn" not in _text(
        models.with_conv_backend(_grads(pointwise), "onednn"), x, (1, 1, 16, 8)
    )


def test_exports_trace_xlas_convolutions_inside_an_onednn_block():
    fn, x, w = CONV_2D
    with backends.tracing_with("onednn"):
        with depthwise.plain_lax_convolutions():
            assert "Onednn" not in _text(lambda x, w: fn(x, w), x, w)
        assert "Onednn" in _text(lambda x, w: fn(x, w), x, w)


@pytest.mark.parametrize("name", ["Cnn6", "LeeNet11", "ResNet22"])
def test_a_model_traced_with_onednn_runs_each_conv_it_takes_on_it(name):
    """Every conv kernel of at most ONEDNN_MAX_CHANNELS outputs but the 1x1 shortcuts is one
    oneDNN call in the forward pass."""
    model = models.get(name)
    samples = int(models.sample_rate(model))
    variables = jax.eval_shape(
        functools.partial(models.init, model, num_samples=samples), jax.random.key(0)
    )
    kernels = [
        leaf.shape
        for path, leaf in jax.tree_util.tree_leaves_with_path(variables["params"])
        if jax.tree_util.keystr(path).endswith("['kernel']") and leaf.ndim >= 3
    ]
    expected = sum(
        1 for k in kernels if k[-1] <= backends.ONEDNN_MAX_CHANNELS and np.prod(k[:-2]) > 1
    )
    assert expected >= 4
    forward = models.with_conv_backend(lambda v, x: model.apply(v, x), "onednn")
    audio = jax.ShapeDtypeStruct((1, samples), jnp.float32)
    text = jax.jit(forward).lower(variables, audio).as_text()
    assert text.count("stablehlo.custom_call @OnednnConv(") == expected


def test_a_sharded_step_on_eight_devices_meets_the_bound():
    """oneDNN's calls on eight devices at once (one XLA thread each): the batch sharded, the
    weight gradient all-reduced, every result within float32 round-off of float64."""
    assert jax.device_count() >= 8, "conftest forces 8 host devices"
    mesh = jax.make_mesh((8,), ("data",))
    rows, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    conv = functools.partial(same_conv.same_conv, pad=1)
    x, w = random(np.random.default_rng(0), (16, 20, 8, 16), (3, 3, 16, 32))
    (dy,) = random(np.random.default_rng(1), (16, 20, 8, 32))
    step = jax.jit(
        models.with_conv_backend(lambda *a: tuple(conv_results(conv, *a)), "onednn"),
        in_shardings=(rows, replicated, rows),
        out_shardings=(rows, rows, replicated),
    )
    args = as_dtype([x, w, dy], jnp.float32)
    assert "Onednn" in step.lower(*args).as_text()
    got = [np.asarray(r) for r in step(*args)]
    exact, scales = conv_exact(functools.partial(same_conv._conv, pad=1), x, w, dy)
    terms = (9 * 16, 9 * 32, 16 * 20 * 8)
    # The all-reduce adds 8 partial sums: 7 more additions on top of each device's.
    bounds = conv_bounds(scales, (terms[0], terms[1], terms[2] + 8), np.float32)
    assert worst_ratio(got, exact, bounds) <= 1


def test_onednn_needs_no_kernel_where_jax_computes_elsewhere(monkeypatch):
    """On a GPU or TPU the backend is accepted and nothing is built; on the CPU a missing
    oneDNN is an error (the control)."""
    from panns_jax.kernels import onednn

    def missing():
        raise onednn.OneDnnUnavailable("oneDNN is not installed")

    monkeypatch.setattr(onednn, "load", missing)
    with pytest.raises(onednn.OneDnnUnavailable):
        backends.prepare("onednn")
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert backends.prepare("onednn") == "onednn"


def test_auto_means_onednn_on_the_cpu_where_it_is_installed(monkeypatch):
    """The default of the configs, the tagger and the commands: with the [onednn] extra
    installed (as in the test environment) a function wrapped with "auto" runs oneDNN's
    kernel; $PANNS_JAX_CONV_BACKEND=xla (this suite's conftest) makes it XLA's."""
    fn, x, w = CONV_2D
    monkeypatch.delenv(backends.ENV, raising=False)
    assert backends.prepare("auto") == "onednn"
    assert "OnednnConvBackwardWeights" in _text(models.with_conv_backend(fn, "auto"), x, w)
    monkeypatch.setenv(backends.ENV, "xla")
    assert backends.prepare("auto") == "xla"
    assert "Onednn" not in _text(models.with_conv_backend(fn, "auto"), x, w)
    monkeypatch.setenv(backends.ENV, "mkl")
    with pytest.raises(ValueError, match=r"\$PANNS_JAX_CONV_BACKEND='mkl': set it to xla or"):
        backends.prepare("auto")


def test_auto_means_xla_without_onednn_elsewhere_or_when_it_cannot_build(monkeypatch, caplog):
    from panns_jax.kernels import onednn

    monkeypatch.delenv(backends.ENV, raising=False)
    assert onednn.installed()
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert backends.prepare("auto") == "xla"  # On a GPU or TPU nothing is built.
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")

    def must_not_build():
        raise AssertionError("built without oneDNN installed")

    monkeypatch.setattr(onednn, "installed", lambda: False)
    monkeypatch.setattr(onednn, "load", must_not_build)
    assert backends.prepare("auto") == "xla"

    def no_compiler():
        raise onednn.OneDnnUnavailable("building oneDNN's kernel needs a C++ compiler")

    monkeypatch.setattr(onednn, "installed", lambda: True)
    monkeypatch.setattr(onednn, "load", no_compiler)
    monkeypatch.setattr(backends, "_told_unavailable", False)
    with caplog.at_level("WARNING", logger=backends.__name__):
        assert backends.prepare("auto") == "xla"
        assert backends.prepare("auto") == "xla"
    said = [r.getMessage() for r in caplog.records if r.name == backends.__name__]
    assert said == ["using XLA's convolutions: building oneDNN's kernel needs a C++ compiler"]
    with pytest.raises(onednn.OneDnnUnavailable):  # Asked for by name, it is an error.
        backends.prepare("onednn")
