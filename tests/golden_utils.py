"""Access to the team's golden oracle of the original PyTorch PANNs (``../shared/golden``)."""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import pathlib
from typing import Dict

import numpy as np
import pytest

PROJECT_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("PANNS_JAX_SHARED", PROJECT_ROOT.parent / "shared"))
GOLDEN = SHARED / "golden"
AUDIO = SHARED / "audio"

# golden/README.md, "Tolerances": recommended per-array checks for float32.
LOGMEL_ATOL_DB = 0.02
RELATIVE_KEYS = ("logits", "embedding", "fc1_input")  # *_logits, embedding, segmentwise_embedding
RELATIVE_RTOL = 5e-4
PROBABILITY_ATOL = 5e-4


MISSING = (
    f"golden oracle not found at {GOLDEN}: the team's shared/ folder must sit beside "
    "the project root (or set PANNS_JAX_SHARED)"
)


def require_golden() -> pathlib.Path:
    """The oracle's folder; a missing oracle FAILS the test (a skipped parity test proves
    nothing)."""
    if not (GOLDEN / "manifest.json").exists():
        pytest.fail(MISSING, pytrace=False)
    return GOLDEN


@functools.lru_cache(maxsize=None)
def manifest() -> dict:
    return json.loads((require_golden() / "manifest.json").read_text())


def model_names() -> list:
    """Names in the manifest. Called at collection time: a missing oracle is a collection
    error, never an empty (silently skipped) parameter list."""
    path = GOLDEN / "manifest.json"
    if not path.exists():
        raise FileNotFoundError(MISSING)
    return list(json.loads(path.read_text())["models"])


@functools.lru_cache(maxsize=None)
def recipe():
    spec = importlib.util.spec_from_file_location("golden_recipe", require_golden() / "recipe.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_state(name: str) -> Dict[str, np.ndarray]:
    """Recipe weights + calibrated BN stats of model ``name`` (front-end entries excluded)."""
    return recipe().load_state(str(require_golden()), name)


@functools.lru_cache(maxsize=None)
def inputs() -> Dict[str, np.ndarray]:
    return dict(np.load(require_golden() / "inputs.npz"))


def outputs(name: str) -> Dict[str, np.ndarray]:
    return dict(np.load(require_golden() / "outputs" / f"{name}.npz"))


def mel_filterbanks() -> Dict[str, np.ndarray]:
    return dict(np.load(require_golden() / "mel_filterbanks.npz"))


def check_array(key: str, got: np.ndarray, ref: np.ndarray) -> str:
    """Empty string when ``got`` matches ``ref`` within the README's tolerance, else why not."""
    got = np.asarray(got, np.float64)
    ref = np.asarray(ref, np.float64)
    if got.shape != ref.shape:
        return f"{key}: shape {got.shape} != golden {ref.shape}"
    err = float(np.max(np.abs(got - ref))) if ref.size else 0.0
    output = key.split("/")[-1]
    if output == "logmel":
        bound = LOGMEL_ATOL_DB
    elif output.endswith(RELATIVE_KEYS):
        bound = RELATIVE_RTOL * float(np.max(np.abs(ref)))
    else:
        bound = PROBABILITY_ATOL
    return "" if err <= bound else f"{key}: max abs error {err:.3g} > {bound:.3g}"
