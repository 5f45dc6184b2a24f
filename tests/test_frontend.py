"""Front end: parity with the original's log-mel, SpecAugment and mixup statistics, errors."""

from __future__ import annotations

import dataclasses

import golden_utils as G
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from panns_jax import frontend as fe

# One golden model per distinct front-end setting (golden/README.md, "Front ends").
FRONTENDS = {
    "Cnn14": fe.FrontendConfig(),
    "Cnn14_mel32": fe.FrontendConfig(mel_bins=32),
    "Cnn14_mel128": fe.FrontendConfig(mel_bins=128),
    "Cnn14_16k": fe.FrontendConfig(sample_rate=16000, window_size=512, hop_size=160, fmax=8000),
    "Cnn14_8k": fe.FrontendConfig(sample_rate=8000, window_size=256, hop_size=80, fmax=4000),
}


def _filterbank_key(c: fe.FrontendConfig) -> str:
    return f"sr{c.sample_rate}_nfft{c.window_size}_mels{c.mel_bins}_fmin{c.fmin:g}_fmax{c.fmax:g}"


@pytest.mark.parametrize("stft", fe.STFT_METHODS)
@pytest.mark.parametrize("name", sorted(FRONTENDS))
def test_logmel_matches_golden(name, stft):
    G.require_golden()
    config = dataclasses.replace(FRONTENDS[name], stft=stft)
    assert G.manifest()["models"][name]["frontend"]["mel_filterbank"] == _filterbank_key(config)
    reference = G.outputs(name)
    logmel = jax.jit(lambda x: fe.logmel(x, config))
    for case in ("batch", "odd"):
        got = np.asarray(logmel(G.inputs()[case]))
        assert got.dtype == np.float32
        assert G.check_array(f"{case}/logmel", got, reference[f"{case}/logmel"]) == ""


@pytest.mark.parametrize("name", sorted(FRONTENDS))
def test_mel_matrix_matches_golden(name):
    G.require_golden()
    c = FRONTENDS[name]
    ours = fe.mel_filterbank(c.sample_rate, c.window_size, c.mel_bins, c.fmin, c.fmax)
    golden = G.mel_filterbanks()[_filterbank_key(c)]
    np.testing.assert_allclose(ours, golden, rtol=1e-6, atol=1e-9)


def _golden_logmel_error(compute) -> float:
    """Max |error| in dB of an alternative log-mel against the golden Cnn14 'batch' case."""
    reference = G.outputs("Cnn14")["batch/logmel"]
    return float(np.max(np.abs(np.asarray(compute(G.inputs()["batch"])) - reference)))


def _variant_logmel(x, window=None, pad_mode="reflect", log=fe.power_to_db):
    c = fe.FrontendConfig()
    mel = fe.mel_filterbank(c.sample_rate, c.window_size, c.mel_bins, c.fmin, c.fmax)
    if window is not None:
        x = jnp.pad(jnp.asarray(x), ((0, 0), (512, 512)), mode=pad_mode)
        idx = np.arange(501)[:, None] * 320 + np.arange(1024)[None]
        spec = jnp.fft.rfft(x[:, idx] * window, axis=-1)
        power = jnp.abs(spec) ** 2
    else:
        power = fe.power_spectrogram(x, 1024, 320, pad_mode=pad_mode)
    return log(jnp.matmul(power, mel, precision="highest"))


def test_negative_controls_fail_the_parity_check():
    """The logmel tolerance catches a symmetric window, zero padding and a soft log floor."""
    G.require_golden()
    assert _golden_logmel_error(_variant_logmel) <= G.LOGMEL_ATOL_DB
    symmetric = np.hanning(1024).astype(np.float32)  # Symmetric, not periodic.
    assert _golden_logmel_error(lambda x: _variant_logmel(x, window=symmetric)) > G.LOGMEL_ATOL_DB
    assert (
        _golden_logmel_error(lambda x: _variant_logmel(x, pad_mode="constant")) > G.LOGMEL_ATOL_DB
    )
    soft_floor = lambda m: 10 * jnp.log10(m + 1e-10)
    assert _golden_logmel_error(lambda x: _variant_logmel(x, log=soft_floor)) > G.LOGMEL_ATOL_DB


FLOAT32_UNIT_ROUNDOFF = 2.0**-24


def _stft_power_bound(x: np.ndarray, n_fft: int, hop: int) -> tuple:
    """float64 ``|X|^2`` of the centred Hann frames of ``x`` and the largest float32 error of
    one STFT path in each bin.

    Per frame with windowed samples ``v``, a float32 ``X_k = sum_n v_n e^(-2 pi i k n / N)``
    errs by at most ``(1 + 2 sqrt(N)) u sum|v|``: ``u sum|v|`` for rounding the basis and
    the products once each, and ``2 sqrt(N) u sum|v|`` for accumulating N terms (the
    probabilistic bound of Higham & Mary 2019, lambda = 2; the FFT's log2(N) is smaller).
    Then ``||X| + dX|^2 - |X|^2`` bounds the power error; digital silence must be exact.
    """
    padded = np.pad(x.astype(np.float64), ((0, 0), (n_fft // 2, n_fft // 2)), mode="reflect")
    starts = np.arange(1 + (padded.shape[1] - n_fft) // hop)[:, None] * hop
    v = padded[:, starts + np.arange(n_fft)] * fe.hann_window(n_fft).astype(np.float64)
    magnitude = np.abs(np.fft.rfft(v, axis=-1))
    dx = (1 + 2 * np.sqrt(n_fft)) * FLOAT32_UNIT_ROUNDOFF * np.sum(np.abs(v), -1, keepdims=True)
    return magnitude**2, (magnitude + dx) ** 2 - magnitude**2


def _stft_power(x: np.ndarray, n_fft: int, hop: int, method: str) -> np.ndarray:
    power = jax.jit(lambda a: fe.power_spectrogram(a, n_fft, hop, method=method))(x)
    return np.asarray(power, np.float64)


def test_dft_stft_equals_fft_stft_to_float32_roundoff(monkeypatch):
    """The exporters' DFT-convolution STFT (stft="dft") and the FFT agree within the sum of
    their round-off bounds in every bin, at every transform size.

    A symmetric Hann window in the DFT basis (a relative change ~1/N) is far outside them.
    """
    G.require_golden()
    for n_fft, hop in ((1024, 320), (512, 160), (256, 80)):
        for case in ("batch", "odd"):  # Real audio, a chirp, tones over digital silence.
            x = G.inputs()[case]
            _, bound = _stft_power_bound(x, n_fft, hop)
            dft, fft = (_stft_power(x, n_fft, hop, m) for m in ("dft", "fft"))
            assert dft.shape == fft.shape == bound.shape
            assert np.all(np.abs(dft - fft) <= 2 * bound), (n_fft, case)

    n_fft, hop = 1024, 320
    x = G.inputs()["batch"]
    symmetric = np.hanning(n_fft) / np.where(fe.hann_window(n_fft) == 0, 1, fe.hann_window(n_fft))
    real_kernel = fe.dft_kernel
    monkeypatch.setattr(
        fe, "dft_kernel", lambda n: (real_kernel(n) * symmetric[:, None, None]).astype(np.float32)
    )
    dft = _stft_power(x, n_fft, hop, "dft")
    _, bound = _stft_power_bound(x, n_fft, hop)
    assert np.max(np.abs(dft - _stft_power(x, n_fft, hop, "fft")) / (2 * bound)) > 10


def test_unknown_stft_method_is_a_clear_error():
    with pytest.raises(ValueError, match="stft must be one of"):
        fe.FrontendConfig(stft="wavelet").validate()
    with pytest.raises(ValueError, match="STFT method must be one of"):
        fe.logmel(np.zeros((1, 4096), np.float32), fe.FrontendConfig(stft="rfft"))


def test_ten_seconds_give_1001_frames():
    x = np.zeros((1, 320000), np.float32)
    assert fe.logmel(x).shape == (1, 1001, 64)
    assert fe.FrontendConfig().num_frames(320000) == 1001


def test_logmel_matches_librosa_power_path():
    """Independent check against librosa's STFT and mel (float64 reference)."""
    import librosa

    rng = np.random.default_rng(0)
    x = (0.3 * rng.standard_normal(16000)).astype(np.float32)
    spec = (
        np.abs(
            librosa.stft(
                x.astype(np.float64),
                n_fft=1024,
                hop_length=320,
                window="hann",
                center=True,
                pad_mode="reflect",
            )
        )
        ** 2
    )
    mel = librosa.feature.melspectrogram(
        S=spec, sr=32000, n_fft=1024, n_mels=64, fmin=50, fmax=14000, htk=False, norm="slaney"
    )
    ref = 10 * np.log10(np.maximum(mel, 1e-10)).T
    np.testing.assert_allclose(np.asarray(fe.logmel(x))[0], ref, atol=2e-3)


def test_bfloat16_input_gives_float32_logmel():
    x = (
        np.asarray(G.inputs()["batch"])
        if G.GOLDEN.exists()
        else np.random.default_rng(0).uniform(-1, 1, (2, 32000)).astype(np.float32)
    )
    full = fe.logmel(x)
    half = jax.jit(fe.logmel)(jnp.asarray(x, jnp.bfloat16))
    assert half.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(half)))
    # bfloat16 samples carry ~3 significant digits: the spectrum differs by < 1 dB where it matters.
    assert float(jnp.median(jnp.abs(half - full))) < 0.5
    # Full-scale audio: |STFT|^2 reaches ~1e5-1e6, which float16 cannot hold.
    loud = jnp.ones((1, 4096), jnp.float16)
    assert bool(jnp.all(jnp.isfinite(fe.logmel(loud))))


@pytest.mark.parametrize(
    "waveform, message",
    [
        (np.zeros((1, 1, 32000), np.float32), "shape"),
        (np.zeros((1, 500), np.float32), "shorter than one analysis window"),
        (np.array([[0.0] * 2000 + [np.nan] + [0.0] * 2000], np.float32), "NaN"),
        (np.array([[0.0] * 2000 + [np.inf] + [0.0] * 2000], np.float32), "NaN or Inf"),
        (np.zeros((1, 32000), np.int16), "integer dtype"),
    ],
)
def test_bad_input_raises_clear_value_error(waveform, message):
    with pytest.raises(ValueError, match=message):
        fe.logmel(waveform)


def test_spec_augment_stripes():
    """2 time stripes < 64 frames and 2 freq stripes < 8 bins per example, set to exactly 0."""
    batch, time, freq = 512, 1001, 64
    x = jnp.ones((batch, time, freq, 1))
    y = np.asarray(jax.jit(fe.spec_augment)(jax.random.key(0), x))[..., 0]
    dropped_frames = np.all(y == 0, axis=2)  # A whole frame zeroed = a time stripe.
    dropped_bins = np.all(y == 0, axis=1)
    assert set(np.unique(y)) <= {0.0, 1.0}
    assert dropped_frames.sum(1).max() <= 2 * 63 and dropped_bins.sum(1).max() <= 2 * 7
    # Two widths uniform in 0..63 drop 63 frames on average minus overlaps (original: 61.7).
    assert 55 < dropped_frames.sum(1).mean() < 66
    assert 5.5 < dropped_bins.sum(1).mean() < 7.5
    # Each example draws its own stripes; the same key gives the same stripes.
    assert len({tuple(row) for row in dropped_frames[:50]}) > 45
    np.testing.assert_array_equal(y, np.asarray(fe.spec_augment(jax.random.key(0), x))[..., 0])
    assert not np.array_equal(y, np.asarray(fe.spec_augment(jax.random.key(1), x))[..., 0])


def test_spec_augment_narrow_widths_for_32_mels():
    x = jnp.ones((256, 200, 32))
    y = np.asarray(fe.spec_augment(jax.random.key(3), x, freq_drop_width=4))
    assert np.all(y == 0, axis=1).sum(1).max() <= 2 * 3


def test_mixup_pairs_and_lambda_distribution():
    x = jnp.arange(8 * 3, dtype=jnp.float32).reshape(8, 3)
    lam = jnp.array([0.0, 0.25, 0.5, 1.0])
    got = np.asarray(fe.mixup(x, lam))
    want = np.stack(
        [
            float(l) * np.asarray(x[2 * i]) + (1 - float(l)) * np.asarray(x[2 * i + 1])
            for i, l in enumerate(lam)
        ]
    )
    np.testing.assert_allclose(got, want)
    lams = np.asarray(fe.sample_mixup_lambda(jax.random.key(0), 20000, alpha=1.0))
    assert lams.min() >= 0 and lams.max() <= 1
    assert abs(lams.mean() - 0.5) < 0.01 and abs(lams.var() - 1 / 12) < 0.005  # Beta(1, 1).
    with pytest.raises(ValueError, match="even batch"):
        fe.mixup(jnp.ones((3, 2)), jnp.ones((1,)))


@pytest.mark.parametrize("args", fe.SHIPPED_FILTERBANKS)
def test_each_shipped_filterbank_is_librosas_to_the_last_float32_bit(args):
    """A shipped matrix is librosa's float64 computation rounded to float32; another
    librosa version may differ by round-off of float64, which moves a float32 value by at
    most one unit in the last place."""
    shipped = np.load(fe.filterbank_asset(*args), allow_pickle=False)
    computed = fe.librosa_filterbank(*args)
    assert shipped.dtype == np.float32 and shipped.shape == computed.shape
    np.testing.assert_array_max_ulp(shipped, computed, maxulp=1)
    assert fe.mel_filterbank(*args) is fe.mel_filterbank(*args)  # Read once.
    np.testing.assert_array_equal(fe.mel_filterbank(*args), shipped)
    # Negative control: another band edge moves the matrix by far more than a last bit.
    sr, n_fft, bins, fmin, fmax = args
    other = fe.librosa_filterbank(sr, n_fft, bins, fmin, fmax - 500)
    with pytest.raises(AssertionError):
        np.testing.assert_array_max_ulp(shipped, other, maxulp=1)


def test_the_paper_front_end_needs_neither_librosa_nor_scipy():
    import subprocess
    import sys

    code = (
        "import sys; from panns_jax import frontend as fe\n"
        "fe.mel_filterbank(32000, 1024, 64, 50.0, 14000.0)\n"
        "print(sorted(m for m in ('librosa', 'scipy.signal') if m in sys.modules))\n"
        "fe.mel_filterbank(32000, 1024, 128, 50.0, 14000.0)\n"  # Not shipped: librosa.
        "print('librosa' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["[]", "True"]
