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
import warnings
from typing import Any, BinaryIO, Iterator, List, Optional, Tuple, Union

import numpy as np

# The formats libsndfile reads itself: a file of them that it cannot read is a bad file, not
# one for another decoder.
SOUNDFILE_EXTENSIONS = (
    ".wav",
    ".flac",
    ".ogg",
    ".oga",
    ".opus",
    ".au",
    ".aif",
    ".aiff",
    ".aifc",
    ".w64",
    ".caf",
    ".snd",
)
# The one list of audio file extensions: what `panns-jax tag DIR` picks up and what the dataset
# builders index. soundfile decodes those above; the rest goes through librosa/audioread.
AUDIO_EXTENSIONS = SOUNDFILE_EXTENSIONS + (".mp3", ".m4a", ".aac", ".webm", ".mp4", ".mkv")

# Samples decoded at a time when streaming, counted at the OUTPUT rate: a file that
# declares a low rate is read in proportionally fewer frames, so resampling up never
# makes a block larger than this.
BLOCK_FRAMES = 1 << 20
# Sample rates a recording may declare. Below 1 kHz nothing audible to these models is
# left (and a 40 KB file at 1 Hz would be 11 hours at 32 kHz): such a header is damaged
# or mislabelled. Above 1 MHz no audio format is real.
MIN_SAMPLE_RATE = 1000
MAX_SAMPLE_RATE = 1_000_000
# Peak amplitudes that make a recording's tags suspicious (see :func:`level_warning`).
SILENCE_PEAK = 1.0 / 32768  # Below one 16-bit step: digital silence.
LOUD_PEAK = 2.0  # Float samples far beyond full scale (1.0): wrong scaling upstream.


class AudioError(ValueError):
    """An audio file that cannot be used. The message names the file and the reason."""


class AudioWarning(UserWarning):
    """Audio that is used but may give misleading results (truncated, silent, too loud)."""


def check_rate(name: str, rate: int) -> None:
    """Refuse sample rates no real recording has (a damaged or hostile header)."""
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise AudioError(
            f"{name}: declares a sample rate of {rate} Hz, outside "
            f"{MIN_SAMPLE_RATE}..{MAX_SAMPLE_RATE} Hz; the header is damaged or "
            "the file is not audio (re-encode it with its true rate)"
        )


def as_waveform(array: Any, name: str = "<waveform>") -> np.ndarray:
    """A float32 copy of an array of samples, with integer PCM scaled to [-1, 1).

    int16 / int32 are divided by 2**15 / 2**31, as soundfile reads PCM files. Other
    integer, boolean and complex arrays are refused rather than silently misread.
    """
    array = np.asarray(array)
    if np.issubdtype(array.dtype, np.complexfloating):
        raise AudioError(
            f"{name}: complex samples ({array.dtype}); pass real audio samples "
            "(e.g. np.real(x) if the imaginary part is known to be 0)"
        )
    if array.dtype == np.int16:
        return array.astype(np.float32) / np.float32(1 << 15)
    if array.dtype == np.int32:
        return (array.astype(np.float64) / (1 << 31)).astype(np.float32)
    if not np.issubdtype(array.dtype, np.floating):
        raise AudioError(
            f"{name}: samples of dtype {array.dtype} are not supported; pass "
            "float samples in [-1, 1] or int16 / int32 PCM"
        )
    return array.astype(np.float32)


def level_warning(name: str, peak: float) -> Optional[str]:
    """A warning for silent or far-too-loud audio, whose tags mean little, or None."""
    if peak < SILENCE_PEAK:
        return f"{name}: digital silence (peak {peak:.2g}); its tags describe no sound"
    if peak > LOUD_PEAK:
        return (
            f"{name}: peak amplitude {peak:.3g} is far above full scale (1.0); float samples "
            "should lie in [-1, 1] (int16 PCM: divide by 32768), so its tags are unreliable"
        )
    return None


def _check_path(path: str) -> None:
    if not os.path.exists(path):
        raise AudioError(f"{path}: no such file")
    if os.path.isdir(path):
        raise AudioError(f"{path}: is a directory, not an audio file")
    if os.path.getsize(path) == 0:
        raise AudioError(f"{path}: empty file (0 bytes)")


def resample(samples: np.ndarray, orig_rate: int, target_rate: int) -> np.ndarray:
    """Float32 ``samples`` (last axis = time) at ``target_rate``.

    It uses librosa's default soxr HQ resampler, as the original inference does, and is
    the identity when the rates agree.
    """
    samples = np.asarray(samples, np.float32)
    if orig_rate == target_rate:
        return samples
    import librosa

    return librosa.resample(
        samples, orig_sr=orig_rate, target_sr=target_rate, res_type="soxr_hq"
    ).astype(np.float32)


def _check_samples(name: str, samples: np.ndarray) -> None:
    if not np.all(np.isfinite(samples)):
        raise AudioError(f"{name}: contains NaN or Inf samples")


def load_audio(path: str, sample_rate: int) -> np.ndarray:
    """Mono float32 samples of ``path`` at ``sample_rate`` Hz, all in memory.

    It reads anything soundfile reads (wav, flac, ogg, mp3 with libsndfile >= 1.1), and
    falls back to librosa's audioread backends. It averages the channels and resamples
    with librosa's default (soxr) resampler, as the original inference does. A truncated
    file is read as far as it goes, with an :class:`AudioWarning`.
    """
    import soundfile as sf

    _check_path(path)
    try:
        with sf.SoundFile(path) as handle:
            check_rate(path, handle.samplerate)
            note = truncation_warning(path, handle)
            samples = handle.read(dtype="float32", always_2d=True)
            rate = handle.samplerate
        samples = samples.mean(axis=1)
    except AudioError:
        raise
    except Exception as sf_error:  # Not a format libsndfile knows: try librosa's backends.
        note = None
        samples, rate = _librosa_load(path, sf_error)
        check_rate(path, rate)
    if samples.size == 0:
        raise AudioError(f"{path}: contains no audio samples")
    _check_samples(path, samples)
    if note:
        warnings.warn(note, AudioWarning, stacklevel=2)
    return np.ascontiguousarray(resample(samples, rate, sample_rate))


def _librosa_load(path: str, sf_error: Exception) -> Tuple[np.ndarray, int]:
    try:
        import librosa

        with warnings.catch_warnings():  # audioread deprecation noise.
            warnings.simplefilter("ignore")
            samples, rate = librosa.load(path, sr=None, mono=True)
    except Exception:
        raise AudioError(f"{path}: not a readable audio file ({sf_error})") from None
    return samples, int(rate)


def truncation_warning(path: str, handle: BinaryIO) -> Optional[str]:
    """A warning when a WAV's header declares more sample data than the file holds.

    libsndfile silently shortens such a file to what is present. The RIFF ``data``
    chunk's declared size tells how much is missing.
    """
    if handle.format not in ("WAV", "WAVEX"):
        return None
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 16)
        size = os.path.getsize(path)
    except OSError:
        return None
    if head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return None
    offset, block_align = 12, None
    while offset + 8 <= len(head):
        chunk, length = (
            head[offset : offset + 4],
            int.from_bytes(head[offset + 4 : offset + 8], "little"),
        )
        if chunk == b"fmt " and offset + 22 <= len(head):
            block_align = int.from_bytes(head[offset + 20 : offset + 22], "little")
        if chunk == b"data":
            present = size - (offset + 8)
            if length in (0, 0xFFFFFFFF) or length <= present or not block_align:
                return None  # 0 / 0xFFFFFFFF: a stream written without a final size.
            rate = handle.samplerate
            return (
                f"{path}: truncated file: its header declares "
                f"{length // block_align / rate:.3f} s of audio but only "
                f"{present // block_align / rate:.3f} s are present; using what is there"
            )
        offset += 8 + length + (length & 1)
    return None


def decoded_blocks(
    path: str, sample_rate: int, block_frames: int = BLOCK_FRAMES, notes: Optional[List[str]] = None
) -> Iterator[np.ndarray]:
    """Mono float32 blocks of ``path`` at ``sample_rate``, of at most ~``block_frames``
    samples each (at ``sample_rate``): memory stays bounded whatever rate the file declares.

    Formats soundfile cannot stream are decoded whole by librosa's backends. Warnings
    (a truncated file) are appended to ``notes`` when given.
    """
    import soundfile as sf

    _check_path(path)
    try:
        handle = sf.SoundFile(path)
    except Exception as sf_error:  # Decoded whole by audioread (mp4, m4a, ...).
        samples, rate = _librosa_load(path, sf_error)
        check_rate(path, rate)
        if samples.size:
            _check_samples(path, samples)
        yield resample(samples, rate, sample_rate) if samples.size else samples.astype(np.float32)
        return
    with handle:
        check_rate(path, handle.samplerate)
        note = truncation_warning(path, handle)
        if note and notes is not None:
            notes.append(note)
        if handle.frames == 0:
            return
        # Input frames per block such that the resampled block has <= block_frames samples.
        step = max(1, min(block_frames, block_frames * handle.samplerate // sample_rate))
        resampler = None
        if handle.samplerate != sample_rate:
            import soxr

            # librosa.resample(res_type='soxr_hq') == soxr HQ; streaming gives the same samples.
            resampler = soxr.ResampleStream(
                handle.samplerate, sample_rate, 1, dtype="float32", quality="HQ"
            )
        remaining = handle.frames
        while remaining > 0:
            try:
                block = handle.read(min(step, remaining), dtype="float32", always_2d=True)
            except Exception as err:
                raise AudioError(f"{path}: decoding failed ({err})") from None
            if len(block) == 0:  # Truncated file: libsndfile stops early.
                if notes is not None and not note:
                    rate = handle.samplerate
                    notes.append(
                        f"{path}: truncated file: decoding stopped "
                        f"{remaining / rate:.3f} s before the declared end "
                        f"({handle.frames / rate:.3f} s); using what is there"
                    )
                break
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
    """``samples[start:start + len(samples)]`` of a recording. ``last`` ends the recording."""

    start: int
    samples: np.ndarray
    last: bool
    total: Optional[int] = None  # Length of the recording, known on the last chunk.
    peak: float = 0.0  # Last chunk: max |sample| of the whole recording.
    warnings: List[str] = dataclasses.field(default_factory=list)  # Last chunk: decoder notes.


def _source_blocks(
    source: Union[str, np.ndarray], sample_rate: int, block_frames: int, notes: List[str]
) -> Tuple[str, Iterator[np.ndarray]]:
    """The name of a chunking source and its mono blocks (see :func:`iter_chunks`).

    A path is decoded in blocks, with decoder warnings appended to ``notes``. An array is
    one block, checked to be a finite mono waveform.
    """
    if isinstance(source, str):
        return source, decoded_blocks(source, sample_rate, block_frames, notes)
    name = "<waveform>"
    array = as_waveform(source, name)
    if array.ndim != 1:
        raise AudioError(f"{name}: expected a mono waveform (samples,), got shape {array.shape}")
    _check_samples(name, array)
    return name, iter([array])


def iter_chunks(
    source: Union[str, np.ndarray],
    sample_rate: int,
    window: int,
    hop: int,
    *,
    align: int = 1,
    block_frames: int = BLOCK_FRAMES,
) -> Iterator[Chunk]:
    """Windows of ``window`` samples every ``hop`` samples of a mono recording.

    A recording of at most ``window`` samples is one chunk, whole and unpadded, as in the
    original inference. Otherwise chunks start at ``0, hop, 2 hop, ...``. If these miss
    the end, one more chunk ends at the last sample. Its start is rounded down to a
    multiple of ``align`` (e.g. the model's STFT hop), so that its frames stay on the
    recording's frame grid, which leaves out at most ``align - 1`` samples. Every chunk
    has ``window`` samples, so chunks batch together.

    ``source`` is a path (streamed in blocks of ``block_frames``) or a mono array at
    ``sample_rate``. Raises :class:`AudioError` naming the file for unusable audio.
    """
    if window <= 0 or hop <= 0:
        raise ValueError(f"window ({window}) and hop ({hop}) must be positive")
    notes: List[str] = []
    name, blocks = _source_blocks(source, sample_rate, block_frames, notes)
    buffer = np.zeros(0, np.float32)
    buffer_start = 0  # Recording offset of buffer[0].
    next_start = 0
    pending: Optional[Chunk] = None  # Held back so that the last chunk can be flagged.
    peak = 0.0
    for block in blocks:
        block = np.asarray(block, np.float32)
        if block.size:
            peak = max(peak, float(np.max(np.abs(block))))
        buffer = np.concatenate([buffer, block])
        # Full windows are emitted only once a sample past them exists, so that a
        # recording of exactly ``window`` samples stays one chunk.
        while next_start + window < buffer_start + len(buffer):
            offset = next_start - buffer_start
            if pending is not None:
                yield pending
            pending = Chunk(next_start, buffer[offset : offset + window].copy(), last=False)
            next_start += hop
        # Keep what the next chunks and an end-aligned last chunk may need.
        keep_from = min(next_start, buffer_start + len(buffer) - window - align)
        if keep_from > buffer_start:
            buffer = buffer[keep_from - buffer_start :]
            buffer_start = keep_from
    total = buffer_start + len(buffer)
    if total == 0:
        raise AudioError(f"{name}: contains no audio samples")
    end = dict(last=True, total=total, peak=peak, warnings=notes)
    if total <= window:
        yield Chunk(0, buffer.copy(), **end)
        return
    if next_start + window == total:  # One exact window is left.
        final = next_start
    else:
        final = (total - window) // align * align
    if pending is not None and final <= pending.start:  # Alignment left nothing new.
        yield dataclasses.replace(pending, **end)
        return
    if pending is not None:
        yield pending
    offset = final - buffer_start
    yield Chunk(final, buffer[offset : offset + window].copy(), **end)


@functools.lru_cache(maxsize=None)
def audioset_classes() -> Tuple[Tuple[str, str], ...]:
    """``(mid, display_name)`` of the 527 AudioSet classes, in model output order.

    They are read from the packaged copy of the release's class_labels_indices.csv, and
    this is its one reader. The dataset builders map the segment CSVs' mids through it,
    and the taggers name outputs with :func:`audioset_labels`.
    """
    text = importlib.resources.files("panns_jax").joinpath("assets/class_labels_indices.csv")
    with text.open("r", encoding="utf-8") as f:
        rows = sorted(csv.DictReader(f), key=lambda r: int(r["index"]))
    return tuple((row["mid"], row["display_name"]) for row in rows)


@functools.lru_cache(maxsize=None)
def audioset_labels() -> List[str]:
    """Display names of the 527 AudioSet classes, in model output order."""
    return [name for _, name in audioset_classes()]
