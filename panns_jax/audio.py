"""Reading audio files for inference: decode, downmix, resample, with clear errors."""

from __future__ import annotations

import csv
import functools
import importlib.resources
import os
from typing import List

import numpy as np


class AudioError(ValueError):
    """An audio file that cannot be used; the message names the file and the reason."""


def load_audio(path: str, sample_rate: int) -> np.ndarray:
    """Mono float32 samples of ``path`` at ``sample_rate`` Hz.

    Reads anything soundfile reads (wav, flac, ogg, mp3 with libsndfile >= 1.1),
    falling back to librosa's audioread backends; averages channels; resamples
    with librosa's default (soxr) resampler, as the original inference does.
    """
    import soundfile as sf

    if not os.path.exists(path):
        raise AudioError(f"{path}: no such file")
    if os.path.isdir(path):
        raise AudioError(f"{path}: is a directory, not an audio file")
    if os.path.getsize(path) == 0:
        raise AudioError(f"{path}: empty file (0 bytes)")
    try:
        samples, rate = sf.read(path, dtype="float32", always_2d=True)
        samples = samples.mean(axis=1)
    except Exception as sf_error:  # Not a format libsndfile knows: try librosa's backends.
        try:
            import librosa

            samples, rate = librosa.load(path, sr=None, mono=True)
        except Exception:
            raise AudioError(f"{path}: not a readable audio file ({sf_error})") from None
    if samples.size == 0:
        raise AudioError(f"{path}: contains no audio samples")
    if not np.all(np.isfinite(samples)):
        raise AudioError(f"{path}: contains NaN or Inf samples")
    if rate != sample_rate:
        import librosa

        samples = librosa.resample(samples, orig_sr=rate, target_sr=sample_rate)
    return np.ascontiguousarray(samples, dtype=np.float32)


@functools.lru_cache(maxsize=None)
def audioset_labels() -> List[str]:
    """Display names of the 527 AudioSet classes, in model output order."""
    text = importlib.resources.files("panns_jax").joinpath("assets/class_labels_indices.csv")
    with text.open("r", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return [row["display_name"] for row in sorted(rows, key=lambda r: int(r["index"]))]
