"""The golden tolerance rule: how close a float32 output must be to its reference.

One rule for every comparison of model outputs (the golden parity tests, the export
validation, the PyTorch baselines' check), from the golden oracle's README ("Tolerances",
``shared/golden/README.md``). It comes from a measured float32 study there: the same
networks in float64 and with an independent FFT front end stay within a tenth of these
bounds on every model, while a symmetric Hann window, BN eps 1e-4, zero padding or a soft
log floor break them. It assumes true float32 matmuls and convolutions.

==================================================  ==========================================
output (last ``/`` part of the key)                 check
==================================================  ==========================================
``logmel``                                          ``max|got - ref| <= 0.02`` (dB)
``*logits``, ``*embedding``, ``fc1_input``          ``max|got - ref| <= 5e-4 * max|ref|``
anything else (probabilities, attention)            ``max|got - ref| <= 5e-4``
==================================================  ==========================================
"""

from __future__ import annotations

from typing import Tuple

import numpy as np

__all__ = [
    "LOGMEL_ATOL_DB",
    "PROBABILITY_ATOL",
    "RELATIVE_KEYS",
    "RELATIVE_RTOL",
    "bound",
    "check",
    "max_abs_error",
]

LOGMEL_ATOL_DB = 0.02  # log-mel in dB (measured worst case 8.5e-3 dB, 128 mels).
# Key suffixes checked relative to max|ref|: *_logits, embedding, segmentwise_embedding,
# fc1_input (measured worst case 1.2e-4 * max|ref|).
RELATIVE_KEYS = ("logits", "embedding", "fc1_input")
RELATIVE_RTOL = 5e-4
PROBABILITY_ATOL = 5e-4  # Probabilities in [0, 1] (measured worst case 1.2e-4).


def bound(key: str, reference: np.ndarray) -> float:
    """The largest ``max|got - reference|`` allowed for output ``key`` (``case/output`` or
    ``output``)."""
    output = key.split("/")[-1]
    if output == "logmel":
        return LOGMEL_ATOL_DB
    if output.endswith(RELATIVE_KEYS):
        reference = np.asarray(reference)
        return RELATIVE_RTOL * float(np.max(np.abs(reference))) if reference.size else 0.0
    return PROBABILITY_ATOL


def max_abs_error(got: np.ndarray, reference: np.ndarray) -> float:
    """``max|got - reference|`` in float64 (0 for empty arrays, NaN when either has a NaN)."""
    got = np.asarray(got, np.float64)
    reference = np.asarray(reference, np.float64)
    return float(np.max(np.abs(got - reference))) if reference.size else 0.0


def check(
    key: str, got: np.ndarray, reference: np.ndarray, reference_name: str = "golden"
) -> Tuple[str, float, float]:
    """``(problem, error, bound)`` of ``got`` against ``reference``.

    ``problem`` is empty when ``got`` passes, else one line saying why not: a shape
    mismatch, or the error over its bound. NaN never passes.
    """
    got, reference = np.asarray(got), np.asarray(reference)
    if got.shape != reference.shape:
        return f"{key}: shape {got.shape} != {reference_name} {reference.shape}", np.nan, np.nan
    err, limit = max_abs_error(got, reference), bound(key, reference)
    problem = "" if err <= limit else f"{key}: max abs error {err:.3g} > {limit:.3g}"
    return problem, err, limit
