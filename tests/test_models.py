"""Model behaviour beyond eval parity: registry, train mode, dtypes, operation counts."""

from __future__ import annotations

import functools
import subprocess
import sys

import golden_utils as G
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from panns_jax import models
from panns_jax.models import layers, profile, transfer_head

SMALL = dict(num_classes=5)


def _small_cnn():
    # Cnn6 is the cheapest log-mel model; 1 s of audio keeps the tests fast.
    return models.get("Cnn6", **SMALL)


def test_registry_knows_every_golden_model():
    names = G.model_names()
    assert len(names) == 29, "shared/README.md: the oracle covers 29 original models"
    missing = [n for n in names if n not in models.REGISTRY]
    assert missing == []


def test_unknown_name_suggests_close_matches():
    with pytest.raises(ValueError, match="Did you mean Cnn14"):
        models.get("cnn14")


def test_overrides_change_attributes():
    model = models.get("Cnn14", num_classes=50, embedding_size=128)
    assert (model.num_classes, model.embedding_size) == (50, 128)


def test_eval_is_deterministic_and_train_uses_rngs():
    model = _small_cnn()
    x = jnp.asarray(np.random.default_rng(0).uniform(-0.5, 0.5, (4, 32000)), jnp.float32)
    variables = models.init(model, jax.random.key(0), 32000)
    eval_a = model.apply(variables, x)
    eval_b = model.apply(variables, x)
    np.testing.assert_array_equal(eval_a["clipwise_output"], eval_b["clipwise_output"])

    def train(seed):
        rngs = {"dropout": jax.random.key(seed), "specaug": jax.random.key(seed + 1)}
        return model.apply(variables, x, train=True, rngs=rngs, mutable=["batch_stats"])

    (out_a, stats_a), (out_b, _) = train(0), train(0)
    out_c, _ = train(5)
    np.testing.assert_array_equal(out_a["clipwise_output"], out_b["clipwise_output"])
    assert not np.allclose(out_a["clipwise_output"], out_c["clipwise_output"])
    assert not np.allclose(out_a["clipwise_output"], eval_a["clipwise_output"])
    # Running statistics moved towards the batch statistics.
    before = variables["batch_stats"]["bn0"]["mean"]
    after = stats_a["batch_stats"]["bn0"]["mean"]
    assert not np.allclose(before, after)


def test_mixup_halves_the_batch_inside_the_model():
    model = _small_cnn()
    variables = models.init(model, jax.random.key(0), 32000)
    x = jnp.asarray(np.random.default_rng(1).uniform(-0.5, 0.5, (4, 32000)), jnp.float32)
    rngs = {"dropout": jax.random.key(0), "specaug": jax.random.key(1)}
    out, _ = model.apply(
        variables,
        x,
        train=True,
        mixup_lambda=jnp.array([0.3, 0.9]),
        rngs=rngs,
        mutable=["batch_stats"],
    )
    assert out["clipwise_output"].shape == (2, 5)


def test_batchnorm_running_variance_is_unbiased_like_pytorch():
    bn = layers.BatchNorm()
    x = jnp.asarray(np.random.default_rng(0).normal(2.0, 3.0, (6, 5, 4)), jnp.float32)
    variables = bn.init(jax.random.key(0), x, use_running_average=False)
    y, updates = bn.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
    flat = np.asarray(x).reshape(-1, 4)
    np.testing.assert_allclose(updates["batch_stats"]["mean"], 0.1 * flat.mean(0), rtol=1e-5)
    np.testing.assert_allclose(
        updates["batch_stats"]["var"], 0.9 + 0.1 * flat.var(0, ddof=1), rtol=1e-5
    )
    np.testing.assert_allclose(
        np.asarray(y).reshape(-1, 4), (flat - flat.mean(0)) / np.sqrt(flat.var(0) + 1e-5), atol=1e-4
    )


def _bn_gradient_errors(batch_normalize, shape=(4, 6, 5, 3)):
    """max |ours - float64 autodiff| / round-off bound for dx, dscale, dbias (<= 1: within).

    The reference differentiates the plain formula (mean, biased variance, normalise) in
    float64 on the same float32 inputs, with cotangents on y and on the statistics. In
    float32 each channel sum over ``count`` terms errs by at most count * eps x its sum
    of |terms|, the variance (hence 1/std) by about count * eps relative; dx inherits
    that relative error on each of its three terms (2x margin).
    """
    rng = np.random.default_rng(0)
    count = int(np.prod(shape[:-1]))
    x = rng.normal(1.0, 2.0, shape).astype(np.float32)
    scale = rng.uniform(0.5, 1.5, 3).astype(np.float32)
    bias = rng.normal(size=3).astype(np.float32)
    dy = rng.normal(size=shape).astype(np.float32)
    dmean, dvar = rng.normal(size=3).astype(np.float32), rng.normal(size=3).astype(np.float32)

    def plain(x, scale, bias):
        mean = jnp.mean(x, axis=(0, 1, 2))
        var = jnp.mean(jnp.square(x - mean), axis=(0, 1, 2))
        return (x - mean) * (scale * jax.lax.rsqrt(var + 1e-5)) + bias, mean, var

    got = jax.vjp(lambda *a: batch_normalize(*a, 1e-5), x, scale, bias)[1]((dy, dmean, dvar))
    with jax.enable_x64(True):
        args = [np.float64(a) for a in (x, scale, bias)]
        want = jax.vjp(plain, *args)[1]((np.float64(dy), np.float64(dmean), np.float64(dvar)))
        want = [np.asarray(w) for w in want]
    x64 = np.float64(x)
    inv = 1 / np.sqrt(x64.var(axis=(0, 1, 2)) + 1e-5)
    xhat = (x64 - x64.mean(axis=(0, 1, 2))) * inv
    ady, adyx = np.abs(dy), np.abs(dy * xhat)
    eps = np.finfo(np.float32).eps
    stats = (np.abs(dmean) + 2 * np.abs(dvar) * np.abs(xhat) / inv) / count
    bounds = (
        2
        * count
        * eps
        * (
            np.abs(scale) * inv * (ady + ady.mean((0, 1, 2)) + np.abs(xhat) * adyx.mean((0, 1, 2)))
            + stats
        ),
        2 * count * eps * adyx.sum((0, 1, 2)),
        2 * count * eps * ady.sum((0, 1, 2)),
    )
    return [float(np.max(np.abs(np.float64(g) - w) / b)) for g, w, b in zip(got, want, bounds)]


@pytest.mark.parametrize("shape", [(4, 6, 5, 3), (layers.MAX_UNROLLED_BATCH + 2, 3, 2, 3)])
def test_batchnorm_backward_matches_autodiff_within_round_off(shape):
    """Both ways of taking the channel sums: batch items added first, plain reductions."""
    assert max(_bn_gradient_errors(layers.batch_normalize, shape)) <= 1.0


def test_batchnorm_backward_negative_control():
    """A backward without the xhat * mean(dy * xhat) term of dx fails the comparison."""

    @functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
    def broken(x, scale, bias, epsilon):
        return layers.batch_normalize(x, scale, bias, epsilon)

    def bwd(epsilon, residuals, cotangents):
        x, mean, inv_std, scale = residuals
        dy, axes, count = cotangents[0], (0, 1, 2), x.size // x.shape[-1]
        xhat = (x - mean) * inv_std
        dx = scale * inv_std * (dy - jnp.sum(dy, axes) / count)
        return dx, jnp.sum(dy * xhat, axes), jnp.sum(dy, axes)

    broken.defvjp(layers._batch_normalize_fwd, bwd)
    errors = _bn_gradient_errors(broken)
    assert errors[0] > 10 and max(errors[1:]) <= 1, errors


def test_bfloat16_compute_keeps_float32_params_and_outputs():
    model = models.get("Cnn6", dtype=jnp.bfloat16, **SMALL)
    variables = models.init(model, jax.random.key(0), 32000)
    assert all(v.dtype == jnp.float32 for v in jax.tree_util.tree_leaves(variables))
    x = jnp.asarray(np.random.default_rng(0).uniform(-0.5, 0.5, (2, 32000)), jnp.float32)
    out = jax.jit(model.apply)(variables, x)
    full = _small_cnn().apply(variables, x)
    assert out["clipwise_output"].dtype == jnp.float32 and out["logmel"].dtype == jnp.float32
    np.testing.assert_allclose(out["clipwise_output"], full["clipwise_output"], atol=0.05)


def test_silence_gives_finite_outputs():
    model = _small_cnn()
    variables = models.init(model, jax.random.key(0), 32000)
    out = model.apply(variables, jnp.zeros((1, 32000)))
    assert all(bool(jnp.all(jnp.isfinite(v))) for v in out.values())


@pytest.mark.parametrize("name", G.model_names())
def test_multiply_adds_within_two_percent_of_table_xii(name):
    entry = G.manifest()["models"][name]
    model = models.get(name)
    got = profile.multiply_adds(model, 10 * models.sample_rate(model))
    assert abs(got / entry["paper_multiply_adds"] - 1) <= 0.02


def test_summary_cli_prints_params_and_multiply_adds():
    out = subprocess.run(
        [sys.executable, "-m", "panns_jax.models", "summary", "Cnn6"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "trainable_params: 4837455" in out.splitlines()
    ops = [line for line in out.splitlines() if line.startswith("multiply_adds: ")]
    assert len(ops) == 1 and int(ops[0].split(": ")[1]) == 21985715343


_NO_LIBRARY_FUSIONS = {"compiler_options": {"xla_cpu_experimental_ynn_fusion_type": ""}}


def test_jit_options_turn_library_fusions_off_for_all_but_the_mobilenets():
    for name in ("Cnn14", "Cnn6", "ResNet22", "LeeNet24", "Wavegram_Logmel_Cnn14"):
        assert models.jit_options(models.get(name)) == _NO_LIBRARY_FUSIONS, name
    for name in ("MobileNetV1", "MobileNetV2"):
        assert models.jit_options(models.get(name)) == {}, name
    for base, want in (("Cnn10", _NO_LIBRARY_FUSIONS), ("MobileNetV2", {})):
        transfer = transfer_head.Transfer(base=models.get(base), num_classes=3)
        assert models.jit_options(transfer) == want, base


def test_training_jit_options_keep_products_and_reductions_for_every_family():
    want = {
        "compiler_options": {
            "xla_cpu_experimental_ynn_fusion_type": (
                "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_REDUCE"
            )
        }
    }
    for name in ("Cnn14", "Cnn6", "ResNet22", "MobileNetV1", "MobileNetV2", "LeeNet24"):
        assert models.jit_options(models.get(name), training=True) == want, name


def test_jit_options_take_effect_in_the_compiled_forward():
    """The option reaches XLA: no YNNPACK fusion is left where the default makes several."""
    model = models.get("Cnn10", widths=(8, 16, 32, 64), embedding_size=32, num_classes=5)
    variables = models.init(model, jax.random.key(0), 32000)
    audio = jnp.zeros((2, 32000), jnp.float32)

    def compiled(**options):
        forward = jax.jit(lambda v, x: model.apply(v, x)["clipwise_output"], **options)
        return forward.lower(variables, audio).compile().as_text()

    assert compiled().count("__ynn_fusion") >= 2  # The default this option turns off.
    assert "__ynn_fusion" not in compiled(**models.jit_options(model))


def test_jit_inference_compiles_with_the_models_options_and_its_conv_backend(monkeypatch):
    """The inference door of the tagger, streaming, probes and fine-tuning's evaluation: the
    model's jit options (no YNNPACK fusion) and oneDNN's convolutions for "auto" where it
    means oneDNN (here through $PANNS_JAX_CONV_BACKEND), XLA's where it means XLA or when
    asked for by name."""
    model = models.get("Cnn10", widths=(8, 16, 32, 64), embedding_size=32, num_classes=5)
    variables = models.init(model, jax.random.key(0), 32000)
    audio = jnp.zeros((2, 32000), jnp.float32)

    def compiled(*backend):
        fn = lambda v, x: model.apply(v, x)["clipwise_output"]  # noqa: E731
        return models.jit_inference(model, fn, *backend).lower(variables, audio).compile()

    monkeypatch.setenv("PANNS_JAX_CONV_BACKEND", "onednn")
    text = compiled().as_text()
    assert 'custom_call_target="OnednnConv"' in text and "__ynn_fusion" not in text
    assert "Onednn" not in compiled("xla").as_text()
    monkeypatch.setenv("PANNS_JAX_CONV_BACKEND", "xla")
    assert "Onednn" not in compiled().as_text()
    assert "Onednn" in compiled("onednn").as_text()
