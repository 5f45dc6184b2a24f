"""Every model in the golden manifest reproduces the original PyTorch PANNs outputs.

Weights come from ``golden/recipe.py`` through ``panns_jax.convert`` (the converter's
key mapping is what these tests exercise), inputs from ``golden/inputs.npz``.
"""

from __future__ import annotations

from unittest import mock

import golden_utils as G
import jax
import numpy as np
import pytest
from onednn_utils import pad_one_row_lower

from panns_jax import convert, models
from panns_jax.kernels import onednn

MODEL_NAMES = G.model_names()


@pytest.fixture(scope="module")
def golden_dir():
    return G.require_golden()


def _apply(name: str, state: dict, conv_backend: str = "xla", **overrides):
    model = models.get(name, **overrides)
    variables = convert.from_state_dict(state, model, name=name)
    # Compiled as the tagger, the CLI and the HEAR API compile it.
    apply = models.with_conv_backend(lambda v, x: model.apply(v, x), conv_backend)
    forward = jax.jit(apply, **models.jit_options(model))
    return {case: jax.device_get(forward(variables, G.inputs()[case])) for case in ("batch", "odd")}


def _mismatches(name: str, got: dict) -> list:
    reference = G.outputs(name)
    problems = []
    for case, keys in G.manifest()["models"][name]["outputs"].items():
        for key in keys:
            if key not in got[case]:
                problems.append(f"{case}/{key}: missing from our outputs")
                continue
            problem = G.check_array(f"{case}/{key}", got[case][key], reference[f"{case}/{key}"])
            if problem:
                problems.append(problem)
    return problems


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_registered_with_golden_param_count(golden_dir, name):
    entry = G.manifest()["models"][name]
    model = models.get(name)
    shapes = jax.eval_shape(lambda: models.init(model, jax.random.key(0)))
    assert models.count_params(shapes["params"]) == entry["trainable_params"]
    if entry.get("paper_trainable_params"):  # Table XII of the paper.
        assert entry["trainable_params"] == entry["paper_trainable_params"]


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_state_dict_keys_and_shapes_equal_manifest(golden_dir, name):
    entry = G.manifest()["models"][name]
    want = {k: tuple(shape) for k, shape, _, _ in entry["state_dict"]}
    got = convert.expected_state_shapes(models.get(name))
    assert got == want


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_outputs_match_golden(golden_dir, name):
    got = _apply(name, G.load_state(name))
    assert _mismatches(name, got) == []


@pytest.mark.parametrize("name", ["Cnn14"])
def test_parity_catches_skipped_batchnorm(golden_dir, name):
    """Negative control: neutralising one BatchNorm (identity stats) must fail parity."""
    state = dict(G.load_state(name))
    state["conv_block3.bn1.running_mean"] = np.zeros_like(state["conv_block3.bn1.running_mean"])
    state["conv_block3.bn1.running_var"] = np.ones_like(state["conv_block3.bn1.running_var"])
    state["conv_block3.bn1.weight"] = np.ones_like(state["conv_block3.bn1.weight"])
    state["conv_block3.bn1.bias"] = np.zeros_like(state["conv_block3.bn1.bias"])
    assert _mismatches(name, _apply(name, state))


def test_parity_catches_wrong_pooling(golden_dir, monkeypatch):
    """Negative control: max instead of average pooling in the conv blocks must fail parity."""
    from panns_jax.models import layers

    pool2d = layers.pool2d
    monkeypatch.setattr(layers, "pool2d", lambda x, size, kind="avg": pool2d(x, size, "max"))
    got = _apply("Cnn10", G.load_state("Cnn10"))
    assert _mismatches("Cnn10", got)


# One model of each family, and Cnn14 with convs on both sides of ONEDNN_MAX_CHANNELS.
ONEDNN_MODELS = [
    "Cnn6",
    "Cnn14",
    "ResNet22",
    "MobileNetV1",
    "LeeNet24",
    "DaiNet19",
    "Res1dNet31",
    "Wavegram_Logmel_Cnn14",
]


@pytest.mark.parametrize("name", ONEDNN_MODELS)
def test_outputs_match_golden_on_onednn(golden_dir, name):
    with mock.patch.object(onednn, "conv", wraps=onednn.conv) as conv:
        got = _apply(name, G.load_state(name), conv_backend="onednn")
    assert conv.call_count > 0  # Convolutions ran on oneDNN.
    assert _mismatches(name, got) == []


def test_parity_catches_onednn_padding_off_by_one(golden_dir, monkeypatch):
    """Negative control: oneDNN's kernels padding one row more above, one fewer below."""
    pad_one_row_lower(monkeypatch)
    assert _mismatches("Cnn6", _apply("Cnn6", G.load_state("Cnn6"), conv_backend="onednn"))
