"""Validation: an export's outputs against the JAX model's, with the golden tolerance rule.

The rule is :mod:`panns_jax.tolerance` (golden/README.md, "Tolerances"): logits and
embeddings within ``5e-4 * max|ref|``, probabilities within ``5e-4``, as the golden
parity tests check the JAX model against the original.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from panns_jax import tolerance

Errors = Dict[str, Tuple[float, float]]  # output -> (max abs error, bound)


class ExportValidationError(RuntimeError):
    """The exported file does not reproduce the JAX model. Nothing is written then."""


def compare(
    got: Mapping[str, np.ndarray], want: Mapping[str, np.ndarray]
) -> Tuple[Errors, List[str]]:
    """Per output ``(max abs error, bound)`` and a list of failures (empty when all pass)."""
    errors, failures = {}, []
    for key, ref in want.items():
        if key not in got:
            failures.append(f"{key}: missing from the export's outputs")
            continue
        problem, err, bound = tolerance.check(key, got[key], ref, reference_name="JAX")
        if problem:
            failures.append(problem)
        if not np.isnan(bound):  # A shape mismatch has no error to report.
            errors[key] = (err, bound)
    return errors, failures


def validation_batches(
    sample_rate: int, length: Optional[int], min_samples: int, batch_size: Optional[int]
) -> List[np.ndarray]:
    """Deterministic test audio like the golden inputs.

    The first row is a log chirp plus noise. The second holds AM tones over a noise
    floor, with a gap of digital silence (frames at the log floor). Larger batches add
    rows of uniform noise. When the length is free, a second batch of odd length follows.
    """
    rng = np.random.default_rng(0)
    n = length or int(5 * sample_rate)
    t = np.arange(n) / sample_rate
    duration = n / sample_rate
    chirp = 0.5 * np.sin(2 * np.pi * 50 * duration / np.log(200) * (200 ** (t / duration) - 1))
    tones = 0.3 * np.sin(2 * np.pi * 440 * t) * (1 + 0.8 * np.sin(2 * np.pi * 2 * t))
    # A -50 dBFS noise floor as real recordings have: bins ~100 dB below full scale are
    # float32 round-off, where the FFT and the DFT-matrix STFT differ by > 0.1 dB.
    tones += 3e-3 * rng.standard_normal(n)
    tones[n // 3 : n // 3 + n // 10] = 0.0
    rows = [chirp + 0.05 * rng.standard_normal(n), tones]
    rows += [rng.uniform(-0.5, 0.5, n) for _ in range(max(0, (batch_size or 2) - 2))]
    batches = [np.stack(rows[: batch_size or 2]).astype(np.float32)]
    if length is None:
        odd = max(min_samples, int(1.5 * sample_rate)) + 1
        batches.append(batches[0][: batch_size or 1, :odd])
    return batches


def check_fits(batch: np.ndarray, shape: Tuple[Optional[int], ...], min_samples: int) -> None:
    """A validation batch must have a shape the export accepts (None = any)."""
    if batch.ndim != 2 or any(d is not None and d != b for d, b in zip(shape, batch.shape)):
        raise ValueError(
            f"validation batch of shape {batch.shape} does not fit the exported "
            f"input shape {shape} (None = any)"
        )
    if batch.shape[1] < min_samples:
        raise ValueError(
            f"validation batch has {batch.shape[1]} samples; the export needs at "
            f"least {min_samples}"
        )


def validate(
    runner: Callable[[np.ndarray], Mapping[str, np.ndarray]],
    reference: Callable[[np.ndarray], Mapping[str, np.ndarray]],
    batches: Sequence[np.ndarray],
    description: str,
) -> Errors:
    """The worst ``(error, bound)`` per output of ``runner`` against ``reference`` over
    ``batches``.

    Raises :class:`ExportValidationError` on the first batch that fails.
    """
    worst: Errors = {}
    for batch in batches:
        errors, failures = compare(runner(batch), reference(batch))
        if failures:
            raise ExportValidationError(
                f"{description} does not match the JAX model on a {batch.shape} batch "
                "(nothing written):\n  " + "\n  ".join(failures)
            )
        for key, (err, bound) in errors.items():
            if key not in worst or err / max(bound, 1e-30) > worst[key][0] / max(
                worst[key][1], 1e-30
            ):
                worst[key] = (err, bound)
    return worst
