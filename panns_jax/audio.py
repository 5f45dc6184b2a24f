"""Reading audio for inference: decode, downmix, resample and chunk, with clear errors.

Long recordings are never decoded at once: :func:`iter_chunks` reads blocks with
``soundfile.SoundFile.read``, downmixes them and resamples them with a streaming
soxr resampler (bit-identical to librosa's default ``soxr_hq`` on the whole
signal), and keeps at most one chunk window plus one block in memory.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import importlib.resources
import os
from typing import Iterator, List, Optional, Tuple, Union

import numpy as np

# Samples read from disk at a time (at the file's rate) when streaming.
BLOCK_FRAMES = 1 << 20


class AudioError(ValueError):
    """An audio file that cannot be used; the message names the file and the reason."""


def _check_path(path: str) -> None:
    if not os.path.exists(path):
        raise AudioError(f"{path}: no such file")
    if os.path.isdir(path):
        raise AudioError(f"{path}: is a directory, not an audio file")
    if os.path.getsize(path) == 0:
        raise AudioError(f"{path}: empty file (0 bytes)")


def resample(samples: np.ndarray, orig_rate: int, target_rate: int) -> np.ndarray:
    """Float32 ``samples`` (last axis = time) at ``target_rate``, with librosa's default
    soxr HQ resampler, as the original inference; the identity when the rates agree."""
    samples = np.asarray(samples, np.float32)
    if orig_rate == target_rate:
        return samples
    import librosa

    return librosa.resample(samples, orig_sr=orig_rate, target_sr=target_rate,
                            res_type="soxr_hq").astype(np.float32)


def _check_samples(name: str, samples: np.ndarray) -> None:
    if not np.all(np.isfinite(samples)):
        raise AudioError(f"{name}: contains NaN or Inf samples")


def load_audio(path: str, sample_rate: int) -> np.ndarray:
    """Mono float32 samples of ``path`` at ``sample_rate`` Hz, all in memory.

    Reads anything soundfile reads (wav, flac, ogg, mp3 with libsndfile >= 1.1),
    falling back to librosa's audioread backends; averages channels; resamples
    with librosa's default (soxr) resampler, as the original inference does.
    """
    import soundfile as sf

    _check_path(path)
    try:
        samples, rate = sf.read(path, dtype="float32", always_2d=True)
        samples = samples.mean(axis=1)
    except Exception as sf_error:  # Not a format libsndfile knows: try librosa's backends.
        samples, rate = _librosa_load(path, sf_error)
    if samples.size == 0:
        raise AudioError(f"{path}: contains no audio samples")
    _check_samples(path, samples)
    return np.ascontiguousarray(resample(samples, rate, sample_rate))


def _librosa_load(path: str, sf_error: Exception) -> Tuple[np.ndarray, int]:
    import warnings

    try:
        import librosa

        with warnings.catch_warnings():  # audioread deprecation noise.
            warnings.simplefilter("ignore")
            samples, rate = librosa.load(path, sr=None, mono=True)
    except Exception:
        raise AudioError(f"{path}: not a readable audio file ({sf_error})") from None
    return samples, int(rate)


def _sf_blocks(path: str, sample_rate: int, block_frames: int) -> Iterator[np.ndarray]:
    """Mono blocks of ``path`` at ``sample_rate``; the whole file at once if soundfile can't."""
    import soundfile as sf

    _check_path(path)
    try:
        handle = sf.SoundFile(path)
    except Exception as sf_error:  # Decoded whole by audioread (mp4, m4a, ...).
        samples, rate = _librosa_load(path, sf_error)
        if samples.size:
            _check_samples(path, samples)
        yield resample(samples, rate, sample_rate) if samples.size else samples.astype(np.float32)
        return
    with handle:
        if handle.frames == 0:
            return
        resampler = None
        if handle.samplerate != sample_rate:
            import soxr

            # librosa.resample(res_type='soxr_hq') == soxr HQ; streaming gives the same samples.
            resampler = soxr.ResampleStream(handle.samplerate, sample_rate, 1, dtype="float32",
                                            quality="HQ")
        remaining = handle.frames
        while remaining > 0:
            try:
                block = handle.read(min(block_frames, remaining), dtype="float32", always_2d=True)
            except Exception as err:
                raise AudioError(f"{path}: decoding failed ({err})") from None
            if len(block) == 0:
                break  # Truncated file: libsndfile stops early.
            remaining -= len(block)
            block = block.mean(axis=1)
            _check_samples(path, block)
            if resampler is not None:
                block = resampler.resample_chunk(block, last=remaining <= 0)
            yield block
        if resampler is not None and remaining > 0:
            yield resampler.resample_chunk(np.zeros(0, np.float32), last=True)


def chunk_starts(num_samples: int, window: int, hop: int, align: int = 1) -> List[int]:
    """Start offsets of the chunks of a recording (see :func:`iter_chunks`)."""
    if num_samples <= window:
        return [0]
    starts = list(range(0, num_samples - window + 1, hop))
    final = (num_samples - window) // align * align
    if starts[-1] + window < num_samples and final > starts[-1]:
        starts.append(final)
    return starts


@dataclasses.dataclass
class Chunk:
    """``samples[start:start + len(samples)]`` of a recording; ``last`` ends the recording."""

    start: int
    samples: np.ndarray
    last: bool
    total: Optional[int] = None  # Length of the recording, known on the last chunk.


def iter_chunks(source: Union[str, np.ndarray], sample_rate: int, window: int, hop: int, *,
                align: int = 1, block_frames: int = BLOCK_FRAMES) -> Iterator[Chunk]:
    """Windows of ``window`` samples every ``hop`` samples of a mono recording.

    A recording no longer than ``window`` is one chunk, whole and unpadded (as the
    original inference). Otherwise chunks start at ``0, hop, 2 hop, ...`` and, if
    these miss the end, one more chunk ends at the last sample (its start rounded
    down to a multiple of ``align``, e.g. the model's STFT hop, so that its frames
    stay on the recording's frame grid; at most ``align - 1`` samples are then left
    out). Every chunk has ``window`` samples, so chunks batch together.

    ``source`` is a path (streamed in blocks of ``block_frames``) or a mono array at
    ``sample_rate``. Raises :class:`AudioError` naming the file for unusable audio.
    """
    if window <= 0 or hop <= 0:
        raise ValueError(f"window ({window}) and hop ({hop}) must be positive")
    if isinstance(source, str):
        name, blocks = source, _sf_blocks(source, sample_rate, block_frames)
    else:
        name = "<waveform>"
        array = np.asarray(source, np.float32)
        if array.ndim != 1:
            raise AudioError(f"{name}: expected a mono waveform (samples,), "
                             f"got shape {array.shape}")
        _check_samples(name, array)
        blocks = iter([array])

    buffer = np.zeros(0, np.float32)
    buffer_start = 0  # Recording offset of buffer[0].
    next_start = 0
    pending: Optional[Chunk] = None  # Held back so that the last chunk can be flagged.
    for block in blocks:
        buffer = np.concatenate([buffer, np.asarray(block, np.float32)])
        # Full windows are emitted only once a sample past them exists, so that a
        # recording of exactly ``window`` samples stays one chunk.
        while next_start + window < buffer_start + len(buffer):
            offset = next_start - buffer_start
            if pending is not None:
                yield pending
            pending = Chunk(next_start, buffer[offset:offset + window].copy(), last=False)
            next_start += hop
        # Keep what the next chunks and an end-aligned last chunk may need.
        keep_from = min(next_start, buffer_start + len(buffer) - window - align)
        if keep_from > buffer_start:
            buffer = buffer[keep_from - buffer_start:]
            buffer_start = keep_from
    total = buffer_start + len(buffer)
    if total == 0:
        raise AudioError(f"{name}: contains no audio samples")
    if total <= window:
        yield Chunk(0, buffer.copy(), last=True, total=total)
        return
    if next_start + window == total:  # One exact window is left.
        final = next_start
    else:
        final = (total - window) // align * align
    if pending is not None and final <= pending.start:  # Alignment left nothing new.
        pending.last, pending.total = True, total
        yield pending
        return
    if pending is not None:
        yield pending
    offset = final - buffer_start
    yield Chunk(final, buffer[offset:offset + window].copy(), last=True, total=total)


@functools.lru_cache(maxsize=None)
def audioset_labels() -> List[str]:
    """Display names of the 527 AudioSet classes, in model output order."""
    text = importlib.resources.files("panns_jax").joinpath("assets/class_labels_indices.csv")
    with text.open("r", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return [row["display_name"] for row in sorted(rows, key=lambda r: int(r["index"]))]
