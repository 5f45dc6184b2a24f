"""Log-mel front end, SpecAugment and mixup as pure, jittable JAX functions.

Everything here follows the original PANNs front end (torchlibrosa), see
Kong et al. 2020, Sec. III-A and ``golden/README.md``:

* 32 kHz audio, periodic Hann window of 1024 samples, hop 320 (10 ms), centred
  frames with reflect padding -> ``T = 1 + floor(L / hop)`` frames (1001 for 10 s);
* power spectrogram ``|rfft|^2`` -> Slaney mel filterbank (64 bins, 50-14000 Hz);
* log-mel ``10 * log10(max(mel, 1e-10))`` with no top_db clipping.

:attr:`FrontendConfig.stft` chooses one of two STFT implementations, which agree to
float32 round-off. ``"fft"``, the fast default, is ``jnp.fft.rfft`` of gathered frames.
``"dft"`` is one strided convolution with the windowed DFT basis, as torchlibrosa
computes it. Exporters lower it to plain convolutions, since ONNX and TFLite builtins
have no rfft (see :mod:`panns_jax.export`).

Shapes are batch first: waveforms ``(B, L)``, log-mels ``(B, T, mel_bins)``.
The power spectrum and the log are always computed in float32, whatever the
model's compute dtype: ``|STFT|^2`` of full-scale audio overflows float16 and
loses the 1e-10 floor in bfloat16.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Tuple

import jax
import jax.numpy as jnp
import numpy as np

# Paper, Sec. III-A: 1e-10 floor of the power mel spectrogram before the log.
LOG_FLOOR = 1e-10
STFT_METHODS = ("fft", "dft")  # See FrontendConfig.stft.


@dataclasses.dataclass(frozen=True)
class FrontendConfig:
    """Settings of a log-mel front end (defaults: the paper's 32 kHz setting)."""

    sample_rate: int = 32000  # Paper: 32 kHz audio.
    window_size: int = 1024  # Paper: Hann window of 1024 samples.
    hop_size: int = 320  # Paper: hop of 320 samples (10 ms at 32 kHz).
    mel_bins: int = 64  # Paper: 64 mel bins.
    fmin: float = 50.0  # Paper: 50 Hz ...
    fmax: float = 14000.0  # ... to 14 kHz.
    # How |STFT|^2 is computed (same values to float32 round-off): "fft" (jnp.fft.rfft,
    # fastest) or "dft" (a strided conv with the windowed DFT basis: what exporters lower).
    stft: str = "fft"

    @property
    def n_freq(self) -> int:
        """Frequency bins of the STFT: ``window_size // 2 + 1``."""
        return self.window_size // 2 + 1

    def num_frames(self, num_samples: int) -> int:
        """Frame count of a clip of ``num_samples`` samples (centred frames)."""
        return 1 + num_samples // self.hop_size

    def validate(self) -> None:
        """Raise a ValueError naming the first setting that no front end can have."""
        if self.stft not in STFT_METHODS:
            raise ValueError(f"stft must be one of {STFT_METHODS}, got {self.stft!r}")
        if self.window_size <= 0 or self.hop_size <= 0 or self.mel_bins <= 0:
            raise ValueError(f"window_size, hop_size and mel_bins must be positive: {self}")
        if not 0 <= self.fmin < self.fmax <= self.sample_rate / 2:
            raise ValueError(
                f"need 0 <= fmin < fmax <= sample_rate / 2, got fmin={self.fmin}, "
                f"fmax={self.fmax}, sample_rate={self.sample_rate}"
            )


# The paper's front ends at its three sample rates (32, 16 and 8 kHz, 64 mel bins): their
# mel matrices ship as librosa computes them, so a command that tags at one of them never
# imports librosa and scipy.signal (about a second). tests/test_frontend.py checks each file
# against librosa's own output.
SHIPPED_FILTERBANKS = (
    (32000, 1024, 64, 50.0, 14000.0),
    (16000, 512, 64, 50.0, 8000.0),
    (8000, 256, 64, 50.0, 4000.0),
)


def filterbank_asset(sample_rate: int, n_fft: int, mel_bins: int, fmin: float, fmax: float) -> str:
    """The path of the shipped mel matrix of these arguments (it exists for the
    :data:`SHIPPED_FILTERBANKS` only)."""
    name = f"mel_{sample_rate}_{n_fft}_{mel_bins}_{fmin:g}_{fmax:g}.npy"
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", name)


def librosa_filterbank(
    sample_rate: int, n_fft: int, mel_bins: int, fmin: float, fmax: float
) -> np.ndarray:
    """librosa's Slaney-scale, Slaney-normalised mel matrix (``htk=False, norm='slaney'``, as
    the original), transposed to ``(n_fft // 2 + 1, mel_bins)``, float32."""
    import librosa  # Host-only; imported lazily to keep `import panns_jax` light.

    matrix = librosa.filters.mel(
        sr=sample_rate, n_fft=n_fft, n_mels=mel_bins, fmin=fmin, fmax=fmax, htk=False, norm="slaney"
    )
    return np.ascontiguousarray(matrix.T.astype(np.float32))


@functools.lru_cache(maxsize=None)
def mel_filterbank(
    sample_rate: int, n_fft: int, mel_bins: int, fmin: float, fmax: float
) -> np.ndarray:
    """Slaney-scale, Slaney-normalised mel matrix ``(n_fft // 2 + 1, mel_bins)``, read-only.

    Built once on the host (the shipped file of :data:`SHIPPED_FILTERBANKS`, else
    :func:`librosa_filterbank`) and used as ``mel = power @ M``.
    """
    args = (int(sample_rate), int(n_fft), int(mel_bins), float(fmin), float(fmax))
    if args in SHIPPED_FILTERBANKS:
        matrix = np.load(filterbank_asset(*args), allow_pickle=False)
    else:
        matrix = librosa_filterbank(*args)
    matrix.setflags(write=False)
    return matrix


def _hann_window64(n: int) -> np.ndarray:
    k = np.arange(n, dtype=np.float64)
    return 0.5 - 0.5 * np.cos(2.0 * np.pi * k / n)


@functools.lru_cache(maxsize=None)
def hann_window(n: int) -> np.ndarray:
    """Periodic Hann window (``scipy.signal.get_window('hann', n, fftbins=True)``), float32."""
    window = _hann_window64(n).astype(np.float32)
    window.setflags(write=False)
    return window


def windowed_dft_basis(n_fft: int) -> Tuple[np.ndarray, np.ndarray]:
    """float64 ``(n_freq, n_fft)`` ``hann[n] cos(2 pi k n / N)`` and ``-hann[n] sin(...)``.

    These are the original's (torchlibrosa's) DFT-as-convolution STFT weights, before
    rounding.
    """
    n = np.arange(n_fft, dtype=np.float64)
    k = np.arange(n_fft // 2 + 1, dtype=np.float64)[:, None]
    window = _hann_window64(n_fft)  # Rounded once with the product, as the original's.
    angle = 2.0 * np.pi * k * n / n_fft
    return window * np.cos(angle), -window * np.sin(angle)


@functools.lru_cache(maxsize=None)
def _frame_indices(num_padded: int, n_fft: int, hop: int) -> np.ndarray:
    num_frames = 1 + (num_padded - n_fft) // hop
    return np.arange(num_frames)[:, None] * hop + np.arange(n_fft)[None, :]


def validate_waveform(waveform: Any, min_samples: int, name: str = "waveform") -> None:
    """Raise a ``ValueError`` that names the problem with a waveform batch.

    Rank, dtype and length are always checked. NaN/Inf are checked only when the array
    is concrete (outside of ``jit``), since tracers carry no values.
    """
    shape = getattr(waveform, "shape", None)
    dtype = getattr(waveform, "dtype", None)
    if shape is None or dtype is None:
        raise ValueError(f"{name} must be an array, got {type(waveform).__name__}")
    if len(shape) not in (1, 2):
        raise ValueError(
            f"{name} must have shape (samples,) or (batch, samples), got shape {tuple(shape)}; "
            "downmix multichannel audio to mono first"
        )
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(
            f"{name} has integer dtype {dtype}: scale it to float in [-1, 1] first "
            "(e.g. int16 samples / 32768.0)"
        )
    if shape[-1] < min_samples:
        raise ValueError(
            f"{name} has {shape[-1]} samples, shorter than one analysis window "
            f"({min_samples} samples); pad the audio or use a longer clip"
        )
    if not isinstance(waveform, jax.core.Tracer):
        if not bool(np.all(np.isfinite(np.asarray(waveform, dtype=np.float32)))):
            raise ValueError(f"{name} contains NaN or Inf samples")


@functools.lru_cache(maxsize=None)
def dft_kernel(n_fft: int) -> np.ndarray:
    """``(n_fft, 1, 2 * n_freq)`` conv kernel: ``hann[n] cos(2 pi k n / N) | -hann[n] sin(...)``.

    The original's ``conv_real`` / ``conv_imag`` STFT weights (torchlibrosa), built in
    float64 and rounded once to float32.
    """
    real, imag = windowed_dft_basis(n_fft)
    kernel = np.ascontiguousarray(np.concatenate([real, imag]).T.astype(np.float32)[:, None, :])
    kernel.setflags(write=False)
    return kernel


def power_spectrogram(
    waveform: jax.Array, n_fft: int, hop: int, pad_mode: str = "reflect", method: str = "fft"
) -> jax.Array:
    """``|STFT|^2`` of ``(B, L)`` float audio -> ``(B, T, n_fft // 2 + 1)`` float32.

    Frames are centred, with ``n_fft // 2`` samples of reflect padding on both sides
    (numpy ``'reflect'``, edge not repeated), a periodic Hann window and no scaling.

    ``method`` is :attr:`FrontendConfig.stft`. ``"fft"`` takes an rfft of gathered frames.
    ``"dft"`` is one strided conv with :func:`dft_kernel`, with no FFT and no gather, so
    it lowers to plain convolutions in ONNX, TFLite and StableHLO and for symbolic
    lengths. It costs ``n_fft`` MACs per output bin instead of ``O(log n_fft)``.
    """
    if method not in STFT_METHODS:
        raise ValueError(f"STFT method must be one of {STFT_METHODS}, got {method!r}")
    x = jnp.asarray(waveform).astype(jnp.float32)
    pad = n_fft // 2
    x = jnp.pad(x, ((0, 0), (pad, pad)), mode=pad_mode)
    if method == "dft":
        y = jax.lax.conv_general_dilated(
            x[:, :, None],
            jnp.asarray(dft_kernel(n_fft)),
            window_strides=(hop,),
            padding="VALID",
            dimension_numbers=("NWC", "WIO", "NWC"),
            precision=jax.lax.Precision.HIGHEST,
        )
        n_freq = n_fft // 2 + 1
        real, imag = y[..., :n_freq], y[..., n_freq:]
        return real * real + imag * imag
    frames = x[:, _frame_indices(x.shape[-1], n_fft, hop)]  # (B, T, n_fft)
    spectrum = jnp.fft.rfft(frames * hann_window(n_fft), axis=-1)
    return jnp.real(spectrum) ** 2 + jnp.imag(spectrum) ** 2


def power_to_db(power: jax.Array, amin: float = LOG_FLOOR) -> jax.Array:
    """``10 * log10(max(power, amin))`` (ref 1.0, no top_db clipping)."""
    return 10.0 * jnp.log10(jnp.maximum(power.astype(jnp.float32), amin))


def logmel(waveform: jax.Array, config: FrontendConfig = FrontendConfig()) -> jax.Array:
    """Log-mel spectrogram ``(B, T, mel_bins)`` in float32 of ``(B, L)`` or ``(L,)`` audio.

    Jittable. Shape, dtype and length are checked at trace time, NaN/Inf only when
    called eagerly on concrete arrays (see :func:`validate_waveform`).
    """
    validate_waveform(waveform, min_samples=config.window_size)
    x = jnp.asarray(waveform)
    if x.ndim == 1:
        x = x[None]
    power = power_spectrogram(x, config.window_size, config.hop_size, method=config.stft)
    mel_matrix = mel_filterbank(
        config.sample_rate, config.window_size, config.mel_bins, config.fmin, config.fmax
    )
    mel = jnp.matmul(power, mel_matrix, precision=jax.lax.Precision.HIGHEST)
    return power_to_db(mel)


# ----------------------------------------------------------------------------
# SpecAugment (Park et al. 2019), as used by PANNs (Kong et al. 2020, Sec. IV-C):
# 2 time stripes of width < 64 frames and 2 frequency stripes of width < 8 bins.
# ----------------------------------------------------------------------------


def _stripe_mask(
    rng: jax.Array, batch: int, size: int, max_width: int, num_stripes: int
) -> jax.Array:
    """Boolean ``(batch, size)`` mask, True where one of ``num_stripes`` stripes drops.

    Per stripe: width ``w ~ U{0, ..., max_width - 1}`` (0 drops nothing), start
    ``s ~ U{0, ..., size - w - 1}`` so the stripe lies inside the axis
    (torchlibrosa ``DropStripes``).
    """
    width_key, start_key = jax.random.split(rng)
    widths = jax.random.randint(width_key, (batch, num_stripes), 0, max_width)
    # randint's upper bound is exclusive: start in [0, size - w).
    starts = jax.random.randint(start_key, (batch, num_stripes), 0, jnp.maximum(size - widths, 1))
    positions = jnp.arange(size)[None, None, :]
    inside = (positions >= starts[..., None]) & (positions < (starts + widths)[..., None])
    return jnp.any(inside, axis=1)


def spec_augment(
    rng: jax.Array,
    features: jax.Array,
    time_drop_width: int = 64,
    time_stripes_num: int = 2,
    freq_drop_width: int = 8,
    freq_stripes_num: int = 2,
) -> jax.Array:
    """Zero random time and frequency stripes of ``(B, T, F, ...)`` features per example.

    Stripes are drawn independently per example from ``rng``. Dropped values are set to
    exactly 0 (the original applies this after ``bn0``).
    """
    if features.ndim < 3:
        raise ValueError(
            f"spec_augment expects (batch, time, freq, ...), got shape {features.shape}"
        )
    batch, time, freq = features.shape[:3]
    time_key, freq_key = jax.random.split(rng)
    drop_time = _stripe_mask(time_key, batch, time, time_drop_width, time_stripes_num)
    drop_freq = _stripe_mask(freq_key, batch, freq, freq_drop_width, freq_stripes_num)
    drop = drop_time[:, :, None] | drop_freq[:, None, :]
    drop = drop.reshape(drop.shape + (1,) * (features.ndim - 3))
    return jnp.where(drop, jnp.zeros((), features.dtype), features)


# ----------------------------------------------------------------------------
# Mixup (Zhang et al. 2018) as in PANNs: alpha = 1, examples 2i and 2i+1 mixed
# with weights (lambda_i, 1 - lambda_i), halving the batch.
# ----------------------------------------------------------------------------


def sample_mixup_lambda(rng: jax.Array, num_pairs: int, alpha: float = 1.0) -> jax.Array:
    """One ``lambda ~ Beta(alpha, alpha)`` per pair of examples, shape ``(num_pairs,)``."""
    return jax.random.beta(rng, alpha, alpha, (num_pairs,), dtype=jnp.float32)


def mixup(x: jax.Array, lam: jax.Array) -> jax.Array:
    """Mix pairs ``out[i] = lam[i] * x[2i] + (1 - lam[i]) * x[2i + 1]``.

    ``x`` has an even leading dimension 2B (waveforms, log-mels, feature maps or
    targets), and the result has B rows. The same ``lam`` mixes inputs and targets.
    """
    if x.shape[0] % 2:
        raise ValueError(f"mixup needs an even batch (pairs 2i, 2i+1), got {x.shape[0]} examples")
    pairs = x.shape[0] // 2
    if lam.shape != (pairs,):
        raise ValueError(f"mixup lambda must have shape ({pairs},), got {lam.shape}")
    lam = lam.reshape((pairs,) + (1,) * (x.ndim - 1)).astype(x.dtype)
    return lam * x[0::2] + (1 - lam) * x[1::2]
