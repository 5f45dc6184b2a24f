"""Exports reproduce the golden outputs of the original PANNs in their own runtimes.

MobileNetV2 runs by default (each format converts in seconds); Cnn14 and
Wavegram_Logmel_Cnn14 (80 M parameters, minutes per export on 2 cores) are ``slow``.
Skips with the reason when the export extra (``pip install -e ".[export]"``) is absent.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import golden_utils as G
import jax
import numpy as np
import pytest

from panns_jax import checkpoints, convert, export, models
from panns_jax import frontend as fe

RUNTIMES = {
    "onnx": ("jax2onnx", "onnxruntime"),
    "savedmodel": ("tensorflow",),
    "tflite": ("tensorflow",),
}
FAST, SLOW = ["MobileNetV2"], ["Cnn14", "Wavegram_Logmel_Cnn14"]
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


def test_dft_front_end_matches_fft_within_golden_tolerance():
    G.require_golden()
    for case in ("batch", "odd"):
        x = G.inputs()[case]
        with export.export_friendly_frontend():
            got = jax.jit(fe.logmel)(x)
        want = fe.logmel(x)
        assert float(np.max(np.abs(np.asarray(got) - np.asarray(want)))) <= G.LOGMEL_ATOL_DB
        assert (
            float(np.max(np.abs(np.asarray(got) - G.outputs("Cnn14")[f"{case}/logmel"])))
            <= G.LOGMEL_ATOL_DB
        )
    assert fe.power_spectrogram is not export.dft_power_spectrogram  # Patch undone.


def test_mismatching_export_fails_and_writes_nothing(golden_models, tmp_path, monkeypatch):
    """Negative control: a symmetric Hann window in the exported STFT must fail validation."""
    require("tflite")
    model, variables = golden_models("MobileNetV2")
    n = model.frontend.window_size
    symmetric = (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n) / (n - 1))).astype(np.float32)
    real_kernel = export.dft_kernel

    def bad_kernel(n_fft):
        periodic = fe.hann_window(n_fft)
        return (
            real_kernel(n_fft)
            / np.where(periodic == 0, 1, periodic)[:, None, None]
            * (symmetric[:, None, None])
        )

    monkeypatch.setattr(export, "dft_kernel", bad_kernel)
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
    rc = export.main_export(
        ["--checkpoint", ckpt, "--format", "tflite", "--out", str(out), "--seconds", "2"]
    )
    assert rc == 0, capsys.readouterr().err
    assert out.exists() and "validated" in capsys.readouterr().out
    rc = export.main_export(["--checkpoint", ckpt, "--format", "tflite", "--out", str(out)])
    assert rc == 2 and "exists" in capsys.readouterr().err  # No silent overwrite.


def test_missing_runtime_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "jax2onnx", None)  # As if not installed.
    with pytest.raises(ImportError, match=r"panns_jax\[export\]"):
        export._write_onnx(
            lambda x: {"y": x},
            jax.ShapeDtypeStruct((1, 32000), np.float32),
            "/nonexistent/m.onnx",
            "m",
        )
