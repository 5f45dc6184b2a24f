"""Exports reproduce the golden outputs of the original PANNs in their own runtimes.

MobileNetV2 and LeeNet11 (a raw-waveform network: 1-D convs and max-pools) run by default
(each format converts in seconds); Cnn14 and
Wavegram_Logmel_Cnn14 (80 M parameters, minutes per export on 2 cores) are ``slow``.
Skips with the reason when the export extra (``pip install -e ".[export]"``) is absent.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import sys

import golden_utils as G
import jax
import numpy as np
import pytest
import serving_utils as S

from panns_jax import checkpoints, cli, convert, export, loader, models
from panns_jax import frontend as fe
from panns_jax.cli import export as export_cli
from panns_jax.export import writers

RUNTIMES = {
    "onnx": ("jax2onnx", "onnxruntime"),
    "savedmodel": ("tensorflow",),
    "tflite": ("tensorflow",),
}
FAST, SLOW = ["MobileNetV2", "LeeNet11"], ["Cnn14", "Wavegram_Logmel_Cnn14"]
CASES = [(n, f) for n in FAST for f in RUNTIMES] + [
    pytest.param(n, f, marks=pytest.mark.slow) for n in SLOW for f in RUNTIMES
]


def require(format: str) -> None:
    missing = [m for m in RUNTIMES[format] if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"{format} export needs {', '.join(missing)}: pip install -e '.[export]'")


@pytest.fixture(scope="module")
def golden_models():
    G.require_golden()
    cache = {}

    def get(name):
        if name not in cache:
            model = models.get(name)
            cache[name] = (model, convert.from_state_dict(G.load_state(name), model, name=name))
        return cache[name]

    return get


def _golden_mismatches(name: str, runner, cases, batch_limit=None) -> list:
    reference = G.outputs(name)
    problems = []
    for case in cases:
        x = G.inputs()[case][:batch_limit]
        got = runner(x)
        assert got, "the export returned no outputs"
        for key, value in got.items():
            problem = G.check_array(f"{case}/{key}", value, reference[f"{case}/{key}"][: len(x)])
            if problem:
                problems.append(problem)
    return problems


@pytest.mark.parametrize("name,format", CASES)
def test_export_reproduces_golden(golden_models, tmp_path, name, format):
    require(format)
    model, variables = golden_models(name)
    # TFLite takes a fixed window: the golden `batch` clips are 5 s. ONNX/SavedModel take
    # any length, so they also run the 48001-sample `odd` clip, except Wavegram models,
    # whose length must keep floor(L / 320) even (a fixed window then).
    fixed = format == "tflite" or name.startswith("Wavegram")
    seconds = 5.0 if fixed else None
    batch_size = 1 if format == "tflite" else None
    out = str(tmp_path / f"{name}.{format}")
    result = export.export(
        (model, variables), format, out, model_name=name, seconds=seconds, batch_size=batch_size
    )
    assert os.path.exists(out) and result.path == out
    assert set(result.outputs) == {"clipwise_output", "clipwise_logits", "embedding"}
    assert result.errors and all(err <= bound for err, bound in result.errors.values())
    assert result.input_shape == (batch_size, 160000 if fixed else None)
    cases = ("batch",) if fixed else ("batch", "odd")
    limit = batch_size
    assert _golden_mismatches(name, export.load(out), cases, limit) == []


def test_exported_model_has_the_dft_front_end_and_the_same_parameters():
    """The exporter builds the model with FrontendConfig(stft="dft"), wrappers included; the
    module it was given (and the process's front end) stay as they were."""
    from panns_jax.models import transfer_head

    model = models.get("MobileNetV2")
    exported = export.export_model(model)
    assert exported.frontend == dataclasses.replace(model.frontend, stft="dft")
    assert model.frontend.stft == "fft" and exported == model.clone(frontend=exported.frontend)
    wrapped = transfer_head.Transfer(base=model, num_classes=3)
    assert export.export_model(wrapped).base.frontend.stft == "dft"
    assert wrapped.base.frontend.stft == "fft"
    x = jax.ShapeDtypeStruct((1, 32000), np.float32)
    shapes = [jax.eval_shape(m.init, jax.random.key(0), x) for m in (model, exported)]
    assert jax.tree.structure(shapes[0]) == jax.tree.structure(shapes[1])


def test_mismatching_export_fails_and_writes_nothing(golden_models, tmp_path, monkeypatch):
    """Negative control: a symmetric Hann window in the exported STFT must fail validation."""
    require("tflite")
    model, variables = golden_models("MobileNetV2")
    n = model.frontend.window_size
    symmetric = (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n) / (n - 1))).astype(np.float32)
    real_kernel = fe.dft_kernel

    def bad_kernel(n_fft):
        periodic = fe.hann_window(n_fft)
        return (
            real_kernel(n_fft)
            / np.where(periodic == 0, 1, periodic)[:, None, None]
            * (symmetric[:, None, None])
        )

    monkeypatch.setattr(fe, "dft_kernel", bad_kernel)  # Only the exported (DFT) model sees it.
    out = tmp_path / "bad.tflite"
    with pytest.raises(export.ExportValidationError, match="max abs error"):
        export.export(
            (model, variables),
            "tflite",
            str(out),
            seconds=5.0,
            batch_size=1,
            validation_batch=G.inputs()["batch"][:1],
        )
    assert os.listdir(tmp_path) == []  # No file, no staging directory.


def test_cli_exports_a_checkpoint(golden_models, tmp_path, capsys):
    require("tflite")
    model, variables = golden_models("MobileNetV2")
    ckpt = checkpoints.save(
        str(tmp_path / "ckpt"), checkpoints.ModelCheckpoint("MobileNetV2", variables)
    )
    out = tmp_path / "m.tflite"
    rc = export_cli.main(
        ["--checkpoint", ckpt, "--format", "tflite", "--out", str(out), "--seconds", "2"]
    )
    assert rc == 0, capsys.readouterr().err
    assert out.exists() and "validated" in capsys.readouterr().out
    rc = export_cli.main(["--checkpoint", ckpt, "--format", "tflite", "--out", str(out)])
    assert rc == 2 and "exists" in capsys.readouterr().err  # No silent overwrite.


def test_missing_runtime_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "jax2onnx", None)  # As if not installed.
    with pytest.raises(ImportError, match=r"panns_jax\[export\]"):
        writers.write_onnx(
            lambda x: {"y": x},
            jax.ShapeDtypeStruct((1, 32000), np.float32),
            "/nonexistent/m.onnx",
            "m",
        )


def _tiny_model():
    """A Cnn10 of two narrow blocks at 16 kHz: seconds to export, the same code paths."""
    model = models.get(
        "Cnn10",
        num_classes=3,
        widths=(8, 16),
        pool_sizes=((2, 2), (2, 2)),
        embedding_size=16,
        frontend=fe.FrontendConfig(sample_rate=16000, window_size=512, hop_size=160, fmax=8000),
    )
    return model, models.init(model, jax.random.key(0), 16000)


def test_savedmodel_is_replaced_only_by_a_validated_export(tmp_path, monkeypatch):
    """A directory export is staged like a file: a failing export leaves the existing SavedModel
    and no staging directory; a passing one with overwrite=True replaces it."""
    require("savedmodel")
    model, variables = _tiny_model()
    out = tmp_path / "m_savedmodel"
    first = export.export((model, variables), "savedmodel", str(out), seconds=1.0)
    assert first.input_shape == (None, 16000) and (out / "saved_model.pb").is_file()
    before = sorted(p.name for p in out.rglob("*"))

    real_kernel = fe.dft_kernel
    monkeypatch.setattr(fe, "dft_kernel", lambda n: real_kernel(n) * np.float32(1.01))
    with pytest.raises(export.ExportValidationError, match="clipwise_logits"):
        export.export((model, variables), "savedmodel", str(out), seconds=1.0, overwrite=True)
    assert os.listdir(tmp_path) == ["m_savedmodel"]
    assert sorted(p.name for p in out.rglob("*")) == before
    monkeypatch.undo()

    second = export.export((model, variables), "savedmodel", str(out), overwrite=True)
    assert os.listdir(tmp_path) == ["m_savedmodel"] and second.input_shape == (None, None)
    x = np.random.default_rng(0).uniform(-0.5, 0.5, (3, 20001)).astype(np.float32)
    got = export.load(str(out))(x)
    want = jax.device_get(export.serving_function(model, variables)(x))
    assert export.compare(got, want)[1] == []


def test_validation_uses_the_golden_rule():
    """Export validation, the golden tests and the baselines share panns_jax.tolerance:
    logits relative to max|ref| (5e-4 * 20 = 0.01 here), probabilities 5e-4 absolute."""
    want = {"clipwise_logits": np.array([[10.0, -20.0]]), "clipwise_output": np.array([[0.5, 0.2]])}

    def shifted(logits, probabilities):
        return {
            "clipwise_logits": want["clipwise_logits"] + logits,
            "clipwise_output": want["clipwise_output"] + probabilities,
        }

    errors, failures = export.compare(shifted(0.009, -4e-4), want)
    assert failures == [] and errors["clipwise_logits"][1] == pytest.approx(0.01)
    assert errors["clipwise_output"] == (pytest.approx(4e-4), 5e-4)
    for got, bad in [
        (shifted(0.011, 0.0), "clipwise_logits"),
        (shifted(0.0, 6e-4), "clipwise_output"),
        (shifted(np.nan, 0.0), "clipwise_logits"),
        ({"clipwise_logits": want["clipwise_logits"][0]}, "clipwise_logits: shape"),
    ]:
        failures = export.compare(got, want)[1]
        assert failures and failures[0].startswith(bad), (bad, failures)
    assert G.check_array("batch/logmel", np.full(3, 0.019), np.zeros(3)) == ""
    assert "max abs error" in G.check_array("batch/logmel", np.full(3, 0.021), np.zeros(3))


# ----------------------------------------------------------- the command's refusals


def test_shape_options_and_outputs_are_checked_before_loading(env, capsys, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were validated")

    monkeypatch.setattr(loader, "load", no_model)
    before = S.snapshot(env["root"])
    common = ["export", "--checkpoint", env["ckpt"]]
    for argv, message in [
        (
            [*common, "--format", "onnx", "--seconds", "0", "--out", env["root"] / "m.onnx"],
            "--seconds must be a positive, finite number of seconds, got 0",
        ),
        (
            [*common, "--format", "onnx", "--batch-size", "0", "--out", env["root"] / "m.onnx"],
            "batch size must be a positive integer, got 0",
        ),
        (
            [*common, "--format", "savedmodel", "--out", env["root"], "--overwrite"],
            "is not a SavedModel directory; refusing to replace",
        ),
    ]:
        code, _, err = S.run_main(cli.main, argv, capsys)
        assert code == 2 and message in S.one_error_line(err), err
    assert S.snapshot(env["root"]) == before


def test_python_m_panns_jax_export_runs_the_command(tmp_path):
    """``python -m panns_jax.export`` is ``panns-jax export``: the same parser and checks."""
    import subprocess

    done = subprocess.run(
        [sys.executable, "-m", "panns_jax.export", "--format", "onnx", "--seconds", "-1"],
        capture_output=True,
        text=True,
        cwd=S.ROOT,
        timeout=300,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert done.returncode == 2, done.stderr
    assert "error: --seconds must be a positive, finite number of seconds, got -1" in done.stderr
