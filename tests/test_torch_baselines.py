"""The PyTorch baselines of benchmarks/inference.py reproduce the golden outputs.

They load ``panns_jax.convert.to_state_dict`` output strictly, so this also checks
that an export of our variables runs in a plain PyTorch model with the original keys.
"""

from __future__ import annotations

import importlib.util

import golden_utils as G
import jax
import jax.numpy as jnp
import pytest

from panns_jax import convert, models

torch = pytest.importorskip("torch")


def _baselines():
    path = G.PROJECT_ROOT / "benchmarks" / "torch_baselines.py"
    spec = importlib.util.spec_from_file_location("torch_baselines", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "name",
    [
        "Cnn6",
        "MobileNetV1",
        "MobileNetV2",
        "ResNet22",
        "LeeNet24",
        "DaiNet19",
        "Res1dNet31",
        "Wavegram_Logmel_Cnn14",
    ]
    + [
        pytest.param(n, marks=pytest.mark.slow)
        for n in ("Cnn14", "ResNet38", "ResNet54", "LeeNet11", "Res1dNet51", "Wavegram_Cnn14")
    ],
)
def test_torch_baseline_matches_golden(name):
    G.require_golden()
    model = models.get(name)
    variables = convert.from_state_dict(G.load_state(name), model, name=name)
    baseline = _baselines().build(name, convert.to_state_dict(variables, model))
    golden = G.outputs(name)
    for case in ("batch", "odd"):
        with torch.inference_mode():
            out = baseline(torch.from_numpy(G.inputs()[case]))
        for key in ("clipwise_output", "embedding"):
            problem = G.check_array(
                f"{name}/{case}/{key}", out[key].numpy(), golden[f"{case}/{key}"]
            )
            assert not problem, problem


def test_torch_baseline_rejects_a_wrong_checkpoint():
    """Strict loading is real: a Cnn6 state_dict does not fit MobileNetV1."""
    model = models.get("Cnn6")
    variables = models.init(model, jax.random.key(0), 32000)
    with pytest.raises(RuntimeError, match="Missing key"):
        _baselines().build("MobileNetV1", convert.to_state_dict(variables, model))


def _flax_dropout_rates(name: str, samples: int) -> list:
    """The rates of the dropouts our model draws in a training forward (eval_shape only)."""
    import flax.linen as nn

    model = models.get(name)
    variables = jax.eval_shape(lambda: models.init(model, jax.random.key(0), samples, 2))
    rates = []

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if isinstance(module, nn.Dropout) and context.method_name == "__call__":
            if module.rate > 0 and not kwargs.get("deterministic", args[1:2] == (True,)):
                rates.append(module.rate)
        return next_fun(*args, **kwargs)

    rngs = {"dropout": jax.random.key(1), "specaug": jax.random.key(2)}
    with nn.intercept_methods(interceptor):
        jax.eval_shape(
            lambda v: model.apply(
                v, jnp.zeros((2, samples)), train=True, rngs=rngs, mutable=["batch_stats"]
            ),
            variables,
        )
    return sorted(rates)


@pytest.mark.parametrize(
    "name, trunk",
    [
        # Dropouts on the training path besides the head's two 0.5 ones (ARCHITECTURES.md).
        ("Cnn14", [0.2] * 6),
        ("Cnn6", [0.2] * 4),
        ("ResNet22", [0.1] * 8 + [0.2] * 3),
        ("ResNet54", [0.1] * 16 + [0.2] * 3),
        ("MobileNetV1", []),
        ("MobileNetV2", None),  # Only the embedding's 0.5: nothing on the path to the loss.
        ("LeeNet11", []),
        ("LeeNet24", [0.1] * 8),
        ("DaiNet19", []),
        ("Res1dNet31", [0.1] * 14),
        ("Wavegram_Logmel_Cnn14", [0.2] * 6),
    ],
)
def test_torch_baseline_trains_with_the_original_dropouts(name, trunk, monkeypatch):
    """A timed train step of a baseline does the original's random work: the same dropouts
    as the spec and as our model, and SpecAugment stripes in the log-mel models."""
    module = _baselines()
    rates = []
    real = module._dropout

    def counting(owner, x, p):
        if p and owner.training:
            rates.append(p)
        return real(owner, x, p)

    monkeypatch.setattr(module, "_dropout", counting)
    baseline = module.BASELINES[name]().train()
    torch.manual_seed(0)
    samples = 32000
    out = baseline(torch.zeros(2, samples).uniform_(-0.5, 0.5))
    expected = sorted([0.5] if trunk is None else trunk + [0.5, 0.5])
    assert sorted(rates) == expected
    assert _flax_dropout_rates(name, samples) == expected
    assert torch.isfinite(out["clipwise_output"]).all()


def test_torch_baseline_spec_augment_zeroes_stripes_in_training_only(monkeypatch):
    module = _baselines()
    stem = module.BASELINES["Cnn6"]()
    audio = torch.zeros(4, 32000).uniform_(-0.5, 0.5)
    torch.manual_seed(0)
    with torch.no_grad():
        trained = module.LogmelStem.forward(stem.train(), audio)
        evaluated = module.LogmelStem.forward(stem.eval(), audio)
        monkeypatch.setattr(module, "_spec_augment", lambda x: x)
        plain = module.LogmelStem.forward(stem.train(), audio)
    zero_rows = (trained == 0).all(dim=3).squeeze(1).sum(dim=1)  # Zeroed frames per example.
    zero_bins = (trained == 0).all(dim=2).squeeze(1).sum(dim=1)  # Zeroed mel bins.
    assert (zero_rows > 0).all() and (zero_rows <= 2 * 63).all()
    assert (zero_bins > 0).any() and (zero_bins <= 2 * 7).all()
    assert not (evaluated == 0).all(dim=3).any() and not (plain == 0).all(dim=3).any()
    kept = trained != 0  # Everything outside the stripes is the plain training forward.
    torch.testing.assert_close(trained[kept], plain[kept], rtol=0, atol=0)
    assert kept.sum() == trained.numel() - (plain[~kept] != 0).sum()
