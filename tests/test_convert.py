"""Converters between original PANNs PyTorch checkpoints and panns_jax checkpoints."""

from __future__ import annotations

import os
import subprocess
import sys

import golden_utils as G
import jax
import numpy as np
import pytest

from panns_jax import checkpoints, convert, models
from panns_jax.cli import convert as convert_command

try:
    import torch
except ImportError:  # The torch extra is optional: only .pth file I/O needs it.
    torch = None

needs_torch = pytest.mark.skipif(
    torch is None,
    reason="PyTorch not installed (pip install 'panns_jax[torch]'): .pth file I/O is not tested",
)
FILE_ROUND_TRIP_MODELS = ["Cnn6", "MobileNetV2", "Wavegram_Logmel_Cnn14"]


def _manifest_entries(name):
    return {
        k: (tuple(shape), dtype, kind)
        for k, shape, dtype, kind in G.manifest()["models"][name]["state_dict"]
    }


@pytest.mark.parametrize("name", G.model_names())
def test_round_trip_is_bit_exact_and_keys_equal_manifest(name):
    G.require_golden()
    recipe = G.load_state(name)
    model = models.get(name)
    exported = convert.to_state_dict(convert.from_state_dict(recipe, model, name=name), model)
    entries = _manifest_entries(name)
    assert set(exported) == set(entries)
    for key, (shape, dtype, kind) in entries.items():
        assert exported[key].shape == shape, key
        assert str(exported[key].dtype) == dtype, key
        if kind in ("param", "bn_running_mean", "bn_running_var"):
            np.testing.assert_array_equal(exported[key], recipe[key], err_msg=key)


@pytest.mark.parametrize("name", ["Cnn14", "Cnn14_16k", "Cnn14_8k", "Cnn14_mel128"])
def test_exported_frontend_equals_the_originals(name):
    G.require_golden()
    config = models.get(name).frontend
    state = convert.frontend_state(config)
    key = G.manifest()["models"][name]["frontend"]["mel_filterbank"]
    np.testing.assert_array_equal(state["logmel_extractor.melW"], G.mel_filterbanks()[key])
    # golden/README.md: conv_real = hann[n] cos(2 pi k n / N), conv_imag = -hann[n] sin(...).
    n_fft = config.window_size
    n = np.arange(n_fft)
    k = np.arange(n_fft // 2 + 1)[:, None]
    hann = 0.5 - 0.5 * np.cos(2 * np.pi * n / n_fft)
    np.testing.assert_allclose(
        state["spectrogram_extractor.stft.conv_real.weight"][:, 0],
        hann * np.cos(2 * np.pi * k * n / n_fft),
        atol=1e-6,
    )
    np.testing.assert_allclose(
        state["spectrogram_extractor.stft.conv_imag.weight"][:, 0],
        -hann * np.sin(2 * np.pi * k * n / n_fft),
        atol=1e-6,
    )


def _cnn14_state():
    return G.load_state("Cnn14")


def test_missing_unexpected_and_misshaped_keys_are_all_listed():
    G.require_golden()
    state = _cnn14_state()
    del state["conv_block2.conv1.weight"]
    state["extra.weight"] = np.zeros(3, np.float32)
    state["fc1.bias"] = np.zeros(7, np.float32)
    with pytest.raises(convert.CheckpointMismatchError) as info:
        convert.from_state_dict(state, models.get("Cnn14"), name="Cnn14")
    message = str(info.value)
    assert "missing key(s): conv_block2.conv1.weight" in message
    assert "unexpected key(s): extra.weight" in message
    assert "shape mismatch for fc1.bias: checkpoint (7,), Cnn14 expects (2048,)" in message


def test_checkpoint_of_another_architecture_is_named():
    G.require_golden()
    with pytest.raises(convert.CheckpointMismatchError, match="looks like Cnn10"):
        convert.from_state_dict(G.load_state("Cnn10"), models.get("Cnn14"), name="Cnn14")


def _zero_state(shapes):
    """A state_dict of these shapes as zero-strided views: no weights allocated."""
    return {key: np.broadcast_to(np.zeros((), np.float32), shape) for key, shape in shapes.items()}


def test_checkpoint_of_a_variant_with_the_same_keys_is_named():
    """A Cnn14_mel128 checkpoint has Cnn14's keys with other sizes: the error names the
    registered variant it fits rather than asking for architecture arguments."""
    state = _zero_state(convert._expected_shapes("Cnn14_mel128"))
    with pytest.raises(convert.CheckpointMismatchError) as info:
        convert.from_state_dict(state, models.get("Cnn14"), name="Cnn14")
    message = str(info.value)
    assert "looks like Cnn14_mel128 (100% of keys and shapes match)" in message
    assert "other sizes" not in message


def test_class_count_mismatch_explains_the_way_out():
    G.require_golden()
    state = _cnn14_state()
    state["fc_audioset.weight"] = np.zeros((10, 2048), np.float32)
    state["fc_audioset.bias"] = np.zeros((10,), np.float32)
    with pytest.raises(convert.CheckpointMismatchError, match="10 classes"):
        convert.from_state_dict(state, models.get("Cnn14"), name="Cnn14")
    # Declaring the class count makes it load.
    variables = convert.from_state_dict(state, models.get("Cnn14", num_classes=10))
    assert variables["params"]["fc_audioset"]["kernel"].shape == (2048, 10)


def test_transfer_to_new_class_count_keeps_all_but_the_head():
    G.require_golden()
    state = _cnn14_state()
    checkpoint = convert.torch_to_checkpoint(state, "Cnn14", num_classes=10, new_head=True)
    params = checkpoint.variables["params"]
    assert params["fc_audioset"]["kernel"].shape == (2048, 10)
    np.testing.assert_array_equal(params["fc1"]["kernel"], state["fc1.weight"].T)
    np.testing.assert_array_equal(
        checkpoint.variables["batch_stats"]["bn0"]["var"], state["bn0.running_var"]
    )
    assert checkpoint.overrides == {"num_classes": 10}
    with pytest.raises(ValueError, match="needs num_classes"):
        convert.torch_to_checkpoint(state, "Cnn14", new_head=True)


def test_attention_head_is_replaced_whole_for_a_new_class_count():
    """Cnn14_DecisionLevelAtt's classifier is its whole attention block
    (models.CLASSIFIER_PARAMS): its bn_att has one channel per class too, so it is
    re-initialised with att and cla."""
    name, narrow = "Cnn14_DecisionLevelAtt", {"widths": (4, 8), "embedding_size": 16}
    narrow["pool_sizes"] = ((2, 2), (1, 1))
    model = models.get(name, **narrow)
    shapes = jax.eval_shape(lambda: models.init(model, jax.random.key(0)))
    rng = np.random.default_rng(0)
    variables = jax.tree_util.tree_map(lambda s: rng.standard_normal(s.shape, np.float32), shapes)
    state = convert.to_state_dict(variables, model)
    assert convert.head_classes(state) == 527
    checkpoint = convert.torch_to_checkpoint(
        state, name, num_classes=10, new_head=True, overrides=narrow
    )
    params, stats = checkpoint.variables["params"], checkpoint.variables["batch_stats"]
    assert params["att_block"]["cla"]["kernel"].shape == (1, 16, 10)
    assert params["att_block"]["bn_att"]["scale"].shape == (10,)
    assert stats["att_block"]["bn_att"]["mean"].shape == (10,)
    np.testing.assert_array_equal(params["fc1"]["kernel"], variables["params"]["fc1"]["kernel"])
    # Negative control: without a new head the class count is a mismatch, named as one.
    with pytest.raises(convert.CheckpointMismatchError, match="527 classes: pass num_classes"):
        convert.from_state_dict(state, models.get(name, **narrow, num_classes=10))


def test_checkpoint_directory_round_trip(tmp_path):
    G.require_golden()
    state = G.load_state("Cnn6")
    checkpoint = convert.torch_to_checkpoint(state, "Cnn6", step=7)
    path = checkpoints.save(str(tmp_path / "ckpt"), checkpoint)
    with pytest.raises(FileExistsError):
        checkpoints.save(path, checkpoint)
    loaded = checkpoints.load(path)
    assert (loaded.model, loaded.step, loaded.overrides) == ("Cnn6", 7, {})
    jax.tree_util.tree_map(np.testing.assert_array_equal, loaded.variables, checkpoint.variables)
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # No staging directories left behind.


@needs_torch
@pytest.mark.parametrize("name", FILE_ROUND_TRIP_MODELS)
def test_cli_pth_round_trip_is_bit_exact_and_reproduces_golden(tmp_path, name):
    G.require_golden()
    recipe = G.load_state(name)
    original = {k: torch.from_numpy(v) for k, v in recipe.items()}
    original.update(
        {
            k: torch.from_numpy(v)
            for k, v in convert.frontend_state(models.get(name).frontend).items()
            if convert.uses_logmel(models.get(name))
        }
    )
    torch.save(
        {
            "model": original,
            "iteration": 600000,
            "sampler": {
                "indexes_per_class": [np.arange(3), np.arange(5)],
                "queue": [1, 0],
                "pointers_of_classes": [0, 2],
            },
        },
        tmp_path / "in.pth",
    )

    assert (
        convert_command.main(
            [
                "from-torch",
                str(tmp_path / "in.pth"),
                "--model",
                name,
                "--out",
                str(tmp_path / "jax"),
            ]
        )
        == 0
    )
    loaded = checkpoints.load(str(tmp_path / "jax"))
    assert loaded.step == 600000
    model = loaded.build_model()
    out = jax.jit(model.apply)(loaded.variables, G.inputs()["odd"])
    reference = G.outputs(name)
    assert (
        G.check_array(
            "odd/clipwise_logits", out["clipwise_logits"], reference["odd/clipwise_logits"]
        )
        == ""
    )

    argv = ["to-torch", str(tmp_path / "jax"), "--out", str(tmp_path / "out.pth")]
    assert convert_command.main(argv) == 0
    exported = torch.load(tmp_path / "out.pth", weights_only=True)
    assert exported["iteration"] == 600000
    entries = _manifest_entries(name)
    assert set(exported["model"]) == set(entries)
    for key, (shape, dtype, kind) in entries.items():
        tensor = exported["model"][key]
        assert tuple(tensor.shape) == shape and str(tensor.dtype) == f"torch.{dtype}", key
        if kind != "bn_num_batches_tracked":
            np.testing.assert_array_equal(tensor.numpy(), original[key].numpy(), err_msg=key)


@needs_torch
def test_bare_state_dict_and_failures_write_nothing(tmp_path):
    G.require_golden()
    state = {k: torch.from_numpy(v) for k, v in G.load_state("Cnn10").items()}
    torch.save(state, tmp_path / "bare.pth")
    assert (
        convert_command.main(
            [
                "from-torch",
                str(tmp_path / "bare.pth"),
                "--model",
                "Cnn10",
                "--out",
                str(tmp_path / "ok"),
            ]
        )
        == 0
    )
    assert checkpoints.load(str(tmp_path / "ok")).model == "Cnn10"
    # Wrong architecture: an error, and no output directory (nor staging leftovers).
    assert (
        convert_command.main(
            [
                "from-torch",
                str(tmp_path / "bare.pth"),
                "--model",
                "Cnn14",
                "--out",
                str(tmp_path / "bad"),
            ]
        )
        == 2
    )
    assert sorted(os.listdir(tmp_path)) == ["bare.pth", "ok"]


@needs_torch
def test_pickled_code_is_never_executed(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    torch.save({"model": {"fc1.weight": torch.zeros(2)}, "payload": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="refused: .*posix.system") as info:
        convert.read_torch_checkpoint(str(tmp_path / "evil.pth"))
    assert "weights_only=False" not in str(info.value)  # Never advise running the pickle.
    assert not (tmp_path / "pwned").exists()


def test_checkpoint_keeps_structured_overrides_and_labels(tmp_path):
    from panns_jax import frontend, models

    overrides = {
        "num_classes": 3,
        "widths": (8, 16),
        "pool_sizes": ((2, 2), (2, 2)),
        "embedding_size": 16,
        "frontend": frontend.FrontendConfig(
            sample_rate=16000, window_size=512, hop_size=160, fmax=8000
        ),
    }
    model = models.get("Cnn10", **overrides)
    variables = models.init(model, jax.random.key(0), 16000)
    path = checkpoints.save(
        str(tmp_path / "c"),
        checkpoints.ModelCheckpoint(
            "Cnn10", jax.device_get(variables), overrides, 5, labels=["a", "b", "c"]
        ),
    )
    loaded = checkpoints.load(path)
    assert loaded.overrides == overrides and loaded.labels == ["a", "b", "c"]
    assert loaded.build_model() == model


def test_the_loader_names_what_is_wrong(tmp_path):
    from panns_jax import loader

    with pytest.raises(FileNotFoundError, match="no such checkpoint directory or .pth"):
        loader.load(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="not a panns_jax checkpoint directory"):
        loader.load(str(tmp_path))
    pth = tmp_path / "model.pth"
    pth.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="name the architecture"):
        loader.load(str(pth))


@pytest.mark.parametrize("module", ["panns_jax.convert", "panns_jax.cli.convert"])
def test_python_m_runs_the_command(module):
    """``python -m panns_jax.convert`` runs the command as ``panns_jax.cli.convert`` does."""
    done = subprocess.run(
        [sys.executable, "-m", module, "to-torch", "--help"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("usage: panns-jax-convert to-torch")


def test_the_console_script_is_the_command():
    """``panns-jax-convert`` (pyproject.toml's script target) is ``panns_jax.cli.convert``."""
    import importlib

    import tomllib

    with open(os.path.join(G.PROJECT_ROOT, "pyproject.toml"), "rb") as f:
        target = tomllib.load(f)["project"]["scripts"]["panns-jax-convert"]
    module, _, attr = target.partition(":")
    assert getattr(importlib.import_module(module), attr) is convert_command.main


def test_expected_shapes_allocate_no_weights():
    """Guessing the architecture of a mismatched checkpoint reads shapes, not weights: the
    peak of numpy's allocations while listing Cnn14's 323 MB state stays under a tenth of it."""
    import tracemalloc

    model = models.get("Cnn14")
    weights = sum(int(np.prod(s)) * 4 for s in convert.expected_state_shapes(model).values())
    tracemalloc.start()
    try:
        shapes = convert.expected_state_shapes(model)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert shapes["conv_block6.conv2.weight"] == (2048, 2048, 3, 3)
    assert weights > 300e6 and peak < weights / 10, (peak, weights)


def test_shipped_state_shapes_are_every_registered_models():
    """The shipped key-and-shape table is what the models build at their default settings."""
    shipped = convert._shipped_state_shapes()
    assert shipped == convert.state_shapes_table(), (
        "panns_jax/assets/state_shapes.json is stale: rewrite it with "
        'python -c "from panns_jax import convert; convert.write_state_shapes_table()"'
    )
    assert set(shipped) == set(models.names())
    assert shipped["Cnn14"]["conv_block6.conv2.weight"] == (2048, 2048, 3, 3)
    # Negative control: another setting of one model gives another listing.
    assert convert.expected_state_shapes(models.get("Cnn6", num_classes=10)) != shipped["Cnn6"]


def test_guessing_an_architecture_traces_no_registered_model(monkeypatch):
    """A mismatched checkpoint is named from the shipped table: with tracing made to fail,
    the guess is still exact."""
    state = _zero_state(convert.expected_state_shapes(models.get("Cnn10")))

    def no_tracing(model):
        raise AssertionError("expected_state_shapes traced a registered model")

    monkeypatch.setattr(convert, "expected_state_shapes", no_tracing)
    convert._expected_shapes.cache_clear()
    try:
        assert convert.guess_architecture(state) == ("Cnn10", 1.0)
    finally:
        convert._expected_shapes.cache_clear()
