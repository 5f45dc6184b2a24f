"""Audio decoding shared by the dataset builders.

The builders store audio as int16 at the configured rate. The conversion here is
lossless for 16-bit sources already at that rate. soundfile returns ``v / 32768``,
``float_to_int16`` maps it back to ``v``, and the pipeline divides by 32768 again.
(The original packer multiplies by 32767 and truncates, which moves every sample
one LSB toward zero, TRAINING.md Sec. 2; packs from the original are copied as is.)
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from panns_jax import audio

AUDIO_EXTENSIONS = audio.AUDIO_EXTENSIONS  # The one list (panns_jax.audio).


# One decoder for the whole package: the builders count and skip what it rejects.
AudioDecodeError = audio.AudioError
load_audio = audio.load_audio
resample = audio.resample


def float_to_int16(samples: np.ndarray) -> np.ndarray:
    """Rounds float samples (full scale 1.0 = 32768) to int16, clipping."""
    scaled = np.round(np.asarray(samples, np.float64) * 32768.0)
    return np.clip(scaled, -32768, 32767).astype(np.int16)


def pad_or_truncate(samples: np.ndarray, length: Optional[int]) -> np.ndarray:
    """Zero-pads at the end or keeps the first `length` samples (TRAINING.md Sec. 2)."""
    if length is None or len(samples) == length:
        return samples
    if len(samples) > length:
        return samples[:length]
    return np.concatenate([samples, np.zeros(length - len(samples), samples.dtype)])


def load_int16(path: str, sample_rate: int, length: Optional[int] = None) -> np.ndarray:
    """`load_audio` -> int16 -> `pad_or_truncate`: what the builders store."""
    return pad_or_truncate(float_to_int16(load_audio(path, sample_rate)), length)
