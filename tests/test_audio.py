"""Reading audio for the tagger: downmix and resampling as the original, chunks streamed
from disk equal to slices of the whole decoded file, and hostile sample rates refused in
bounded memory."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import serving_utils as S
import soundfile as sf

from panns_jax import audio

SR = S.SR


def test_stereo_44k_is_downmixed_and_resampled(tmp_path):
    t = np.arange(44100) / 44100
    left = 0.5 * np.sin(2 * np.pi * 440 * t)
    sf.write(tmp_path / "stereo.flac", np.stack([left, -left * 0.5], axis=1), 44100)
    samples = audio.load_audio(str(tmp_path / "stereo.flac"), 32000)
    assert samples.dtype == np.float32 and abs(len(samples) - 32000) <= 1
    assert 0.115 < np.abs(samples).max() < 0.135  # (0.5 - 0.25) / 2 = 0.125 after the downmix.


def test_streamed_decoding_equals_whole_file_decoding(tmp_path):
    """Blocks + a streaming soxr resampler give the samples of load_audio exactly."""
    rng = np.random.default_rng(3)
    path = tmp_path / "stereo.flac"
    sf.write(path, 0.3 * rng.standard_normal((30 * 44100, 2)), 44100)
    full = audio.load_audio(str(path), SR)
    chunks = list(audio.iter_chunks(str(path), SR, 8 * SR, 5 * SR, block_frames=100_000))
    assert [c.start for c in chunks] == audio.chunk_starts(len(full), 8 * SR, 5 * SR)
    assert chunks[-1].last and chunks[-1].total == len(full)
    for c in chunks:
        np.testing.assert_allclose(c.samples, full[c.start : c.start + 8 * SR], atol=1e-6)


def test_chunk_starts_cover_the_recording():
    assert audio.chunk_starts(100, 100, 30) == [0]  # No longer than the window: whole.
    assert audio.chunk_starts(250, 100, 100) == [0, 100, 150]
    assert audio.chunk_starts(250, 100, 100, align=32) == [0, 100, 128]
    assert audio.chunk_starts(205, 100, 100, align=32) == [0, 100]  # 5 samples left out.


def test_rate1_file_in_a_memory_capped_process(tmp_path):
    """A 40 KB file declaring 1 Hz would need > 13 GB resampled: a clear error instead,
    under a 1.5 GB cap."""
    rate1 = tmp_path / "rate1.wav"
    S.write_absurd_rate(rate1, 1, np.random.default_rng(0))
    script = textwrap.dedent(f"""
        import resource, sys
        resource.setrlimit(resource.RLIMIT_AS, (1500 << 20, 1500 << 20))
        from panns_jax import audio
        try:
            list(audio.iter_chunks({str(rate1)!r}, 32000, 320000, 320000))
        except audio.AudioError as err:
            print(err)
            sys.exit(3)
    """)
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=S.ROOT, timeout=120
    )
    assert done.returncode == 3, done.stderr
    assert "declares a sample rate of 1 Hz" in done.stdout


def test_decoded_blocks_are_bounded_in_output_samples(tmp_path):
    """A low (allowed) rate is read in proportionally fewer frames: blocks never grow by
    the resampling ratio (32x here). Counted in input frames, the first block would hold
    the whole 640000-sample file."""
    path = tmp_path / "low.wav"
    sf.write(path, np.random.default_rng(1).uniform(-0.5, 0.5, 20000).astype(np.float32), 1000)
    block = 1 << 16
    blocks = list(audio.decoded_blocks(str(path), SR, block_frames=block))
    sizes = [len(b) for b in blocks]
    # soxr HQ holds back < 1024 input samples (< 32768 output samples here) of latency.
    assert sum(sizes) == 20000 * 32 and max(sizes) <= block + 32768, sizes
    whole = audio.resample(sf.read(path, dtype="float32")[0], 1000, SR)
    np.testing.assert_array_equal(np.concatenate(blocks), whole)
