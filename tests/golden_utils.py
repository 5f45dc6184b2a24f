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

from panns_jax import tolerance

PROJECT_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("PANNS_JAX_SHARED", PROJECT_ROOT.parent / "shared"))
GOLDEN = SHARED / "golden"
AUDIO = SHARED / "audio"

# golden/README.md, "Tolerances": the library's one rule (panns_jax.tolerance).
LOGMEL_ATOL_DB = tolerance.LOGMEL_ATOL_DB
RELATIVE_RTOL = tolerance.RELATIVE_RTOL
PROBABILITY_ATOL = tolerance.PROBABILITY_ATOL


MISSING = (
    f"golden oracle not found at {GOLDEN}: the team's shared/ folder must sit beside "
    "the project root (or set PANNS_JAX_SHARED)"
)


def require_golden() -> pathlib.Path:
    """The oracle's folder.

    A missing oracle FAILS the test, since a skipped parity test proves nothing.
    """
    if not (GOLDEN / "manifest.json").exists():
        pytest.fail(MISSING, pytrace=False)
    return GOLDEN


@functools.lru_cache(maxsize=None)
def manifest() -> dict:
    return json.loads((require_golden() / "manifest.json").read_text())


def model_names() -> list:
    """Names in the manifest.

    Called at collection time, so that a missing oracle is a collection error, never an
    empty (silently skipped) parameter list.
    """
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
    """Recipe weights + calibrated BN stats of model ``name`` (front-end entries excluded).

    A fresh copy on every call, which the caller may change.
    """
    return {key: value.copy() for key, value in _recipe_state(name).items()}


# The recipe draws Cnn14's 80M weights in ~2 s, and several tests in a row load the same model;
# a copy takes ~0.1 s. Two models are kept (up to ~0.7 GB).
@functools.lru_cache(maxsize=2)
def _recipe_state(name: str) -> Dict[str, np.ndarray]:
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
    return tolerance.check(key, got, ref, reference_name="golden")[0]
