"""Streaming SED equals the same windows applied offline, whatever the block sizes."""

from __future__ import annotations

import importlib.util

import golden_utils as G
import jax
import numpy as np
import pytest

from panns_jax import convert, models, streaming


def _golden(name: str):
    G.require_golden()
    model = models.get(name)
    return model, convert.from_state_dict(G.load_state(name), model, name=name)


def _recording() -> np.ndarray:
    """Golden `batch` row 0 (5 s of a real recording) then row 1 (chirp + noise): 10 s."""
    batch = G.inputs()["batch"]
    return np.concatenate([batch[0], batch[1]])


def _feed_random_blocks(tagger, waveform, seed=0):
    """Blocks of 10 ms ... 1 s, drawn at random."""
    rng = np.random.default_rng(seed)
    steps, start = [], 0
    while start < waveform.size:
        size = int(rng.integers(tagger.sample_rate // 100, tagger.sample_rate + 1))
        steps += tagger.push(waveform[start : start + size])
        start += size
    return steps


def test_clip_model_stream_equals_windows_applied_offline():
    model, variables = _golden("MobileNetV1")
    tagger = streaming.StreamingTagger(model, variables, window=1.0, hop=0.25)
    assert not tagger.decision_level and tagger.warmup_seconds == 1.0
    waveform = _recording()
    times, probs, _ = streaming.collect(_feed_random_blocks(tagger, waveform))

    # Reference: the model applied directly to each window, independently of the tagger.
    window, hop = 32000, 8000
    ends = np.arange(window, waveform.size + 1, hop)
    forward = jax.jit(lambda x: model.apply(variables, x)["clipwise_output"])
    want = np.concatenate([np.asarray(forward(waveform[None, e - window : e])) for e in ends])
    np.testing.assert_allclose(times, ends / 32000)  # Warm-up: first frame at 1 s.
    assert probs.shape == want.shape == (len(ends), 527)
    assert float(np.max(np.abs(probs - want))) <= G.PROBABILITY_ATOL
    offline_times, offline_probs = tagger.offline_frames(waveform)
    np.testing.assert_allclose(offline_times, times)
    assert float(np.max(np.abs(offline_probs - probs))) <= G.PROBABILITY_ATOL


def test_decision_level_stream_emits_each_frame_once_as_offline():
    model, variables = _golden("Cnn14_DecisionLevelMax")
    tagger = streaming.StreamingTagger(model, variables, window=3.2, hop=0.64)
    assert tagger.decision_level
    waveform = _recording()[: 160000 + 32000 * 3 // 2]  # 6.5 s: not a whole number of hops.
    steps = _feed_random_blocks(tagger, waveform, seed=1)
    times, probs, _ = streaming.collect(steps)

    window, hop, frame = 102400, 20480, 320
    ends = np.arange(window, waveform.size + 1, hop)
    forward = jax.jit(lambda x: model.apply(variables, x)["framewise_output"])
    want = [np.asarray(forward(waveform[None, ends[0] - window : ends[0]]))[0, : window // frame]]
    for e in ends[1:]:
        out = np.asarray(forward(waveform[None, e - window : e]))[0]
        want.append(out[(window - hop) // frame : window // frame])
    want = np.concatenate(want)
    np.testing.assert_allclose(times, np.arange(len(want)) * 0.01, atol=1e-9)  # Each once.
    assert probs.shape == want.shape
    assert float(np.max(np.abs(probs - want))) <= G.PROBABILITY_ATOL


def test_ring_buffer_keeps_the_latest_samples():
    rng = np.random.default_rng(0)
    ring, stream = streaming.RingBuffer(100), np.zeros(0, np.float32)
    for _ in range(50):
        block = rng.standard_normal(int(rng.integers(0, 250))).astype(np.float32)
        ring.write(block)
        stream = np.concatenate([stream, block])
        want = np.concatenate([np.zeros(max(0, 100 - stream.size), np.float32), stream[-100:]])
        np.testing.assert_array_equal(ring.latest(), want)
    assert ring.total == stream.size


def test_hysteresis_events():
    detector = streaming.Hysteresis(2, on=0.5, off=0.3, labels=["a", "b"])
    p = np.array([[0.1, 0.6], [0.55, 0.45], [0.4, 0.2], [0.29, 0.9], [0.6, 0.9]])
    events = detector.update(np.arange(5.0), p)
    assert [(e.kind, e.time, e.label) for e in events] == [
        ("onset", 0.0, "b"),
        ("onset", 1.0, "a"),
        ("offset", 2.0, "b"),
        ("offset", 3.0, "a"),
        ("onset", 3.0, "b"),
        ("onset", 4.0, "a"),
    ]
    assert [(e.kind, e.label) for e in detector.close(5.0)] == [("offset", "a"), ("offset", "b")]


def test_rejects_bad_window_and_hop():
    model = models.get("MobileNetV1")
    with pytest.raises(ValueError, match="multiples"):
        streaming.StreamingTagger(model, {}, window=1.0, hop=0.015, decision_level=False)
    with pytest.raises(ValueError, match="hop <= window"):
        streaming.StreamingTagger(model, {}, window=1.0, hop=2.0, decision_level=False)


def test_cli_streams_a_file(tmp_path, capsys):
    import soundfile as sf

    G.require_golden()
    path = tmp_path / "clip.wav"
    sf.write(path, G.inputs()["batch"][0][:64000], 32000)
    rc = streaming.main_stream(
        [
            str(path),
            "--model",
            "MobileNetV1",
            "--block",
            "0.05",
            "--hop",
            "0.5",
            "--on-threshold",
            "0.0",
            "--off-threshold",
            "0.0",
            "--frames",
        ]
    )
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "real-time factor" in captured.err and "warm-up 1 s" in captured.err
    assert "onset" in captured.out and "frame" in captured.out


def test_mic_without_sounddevice_is_a_clear_error(monkeypatch, capsys):
    import sys

    if importlib.util.find_spec("sounddevice") is None:
        monkeypatch.setitem(sys.modules, "sounddevice", None)
    else:
        pytest.skip("sounddevice is installed")
    rc = streaming.main_stream(["--mic", "--model", "MobileNetV1"])
    assert rc == 2 and "sounddevice" in capsys.readouterr().err
