"""The PyTorch baselines of benchmarks/inference.py reproduce the golden outputs.

They load ``panns_jax.convert.to_state_dict`` output strictly, so this also checks
that an export of our variables runs in a plain PyTorch model with the original keys.
"""

from __future__ import annotations

import importlib.util

import golden_utils as G
import jax
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
