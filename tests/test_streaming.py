"""Streaming SED equals the same windows applied offline, whatever the block sizes; the
``panns-jax stream`` command prints what the tagger finds and refuses bad input in one line."""

from __future__ import annotations

import dataclasses
import importlib.util

import golden_utils as G
import jax
import numpy as np
import pytest
import serving_utils as S
from serving_utils import one_error_line, run_main, snapshot

from panns_jax import cli, loader, streaming
from panns_jax.cli import stream


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    """``name -> (module, variables, metadata)`` of the golden recipe weights, loaded once."""
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = tuple(loader.load(S.golden_checkpoint(tmp_path_factory, name)))
        return cache[name]

    return get


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


def test_clip_model_stream_equals_windows_applied_offline(golden):
    model, variables, meta = golden("MobileNetV1")
    tagger = streaming.StreamingTagger(model, variables, meta, window=1.0, hop=0.25)
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


@pytest.mark.parametrize("means, calls_onednn", [("onednn", True), ("xla", False)])
def test_the_stream_runs_the_default_conv_backend(golden, monkeypatch, means, calls_onednn):
    """The stream compiles its forward through models.jit_inference with "auto": oneDNN's
    convolutions where "auto" means them ($PANNS_JAX_CONV_BACKEND here), XLA's otherwise."""
    from unittest import mock

    from panns_jax.kernels import onednn

    model, variables, meta = golden("Cnn6")
    monkeypatch.setenv("PANNS_JAX_CONV_BACKEND", means)
    with mock.patch.object(onednn, "conv", wraps=onednn.conv) as traced:
        tagger = streaming.StreamingTagger(model, variables, meta, window=1.0, hop=0.5)
        assert len(tagger.push(_recording()[:40000])) == 1
    assert traced.called == calls_onednn


def test_decision_level_stream_emits_each_frame_once_as_offline(golden):
    model, variables, meta = golden("Cnn14_DecisionLevelMax")
    tagger = streaming.StreamingTagger(model, variables, meta, window=3.2, hop=0.64)
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


def test_rejects_bad_window_and_hop(golden):
    model, _, meta = golden("MobileNetV1")
    with pytest.raises(ValueError, match="multiples"):
        streaming.StreamingTagger(model, {}, meta, window=1.0, hop=0.015)
    with pytest.raises(ValueError, match="hop <= window"):
        streaming.StreamingTagger(model, {}, meta, window=1.0, hop=2.0)
    with pytest.raises(ValueError, match="hop <= window"):  # Rounds to 0 samples.
        streaming.StreamingTagger(model, {}, meta, window=1.0, hop=1e-6)
    with pytest.raises(ValueError, match="window must be a positive, finite number of seconds"):
        streaming.StreamingTagger(model, {}, meta, window=float("nan"))


def test_labels_and_output_come_from_the_loaders_metadata(golden):
    model, variables, meta = golden("MobileNetV1")
    tagger = streaming.StreamingTagger(model, variables, meta, hop=0.5)
    assert tagger.labels == list(meta.labels) and not tagger.decision_level
    named = dataclasses.replace(meta, labels=tuple(f"l{i}" for i in range(527)))
    renamed = streaming.StreamingTagger(model, variables, named, hop=0.5)
    steps = renamed.push(np.zeros(32000, np.float32))
    assert renamed.labels[0] == "l0" and len(steps) == 1
    assert steps[0].probabilities.shape == (1, 527)


def test_cli_streams_a_file(tmp_path, capsys):
    import soundfile as sf

    G.require_golden()
    path = tmp_path / "clip.wav"
    sf.write(path, G.inputs()["batch"][0][:64000], 32000)
    rc = stream.main(
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
    rc = stream.main(["--mic", "--model", "MobileNetV1"])
    assert rc == 2 and "sounddevice" in capsys.readouterr().err


# ----------------------------------------------------------- the command's refusals


def test_non_finite_outputs_are_one_error(env, tmp_path, capsys):
    ckpt = S.save_tiny(tmp_path / "nan", S.nan_variables(env, ("fc_audioset", "bias", 2)))
    wav = env["root"] / "good.wav"
    code, out, err = run_main(stream.main, [wav, "--checkpoint", ckpt], capsys)
    assert code == 1 and f"{wav}: the model produced non-finite" in one_error_line(err)


def test_window_and_hop_are_validated_before_loading(env, capsys):
    before = snapshot(env["root"])
    wav = env["root"] / "good.wav"
    for argv, message in [
        (
            ["stream", wav, "--checkpoint", env["ckpt"], "--window", "0"],
            "--window must be a positive, finite number of seconds, got 0",
        ),
        (
            ["stream", wav, "--checkpoint", env["ckpt"], "--hop", "nan"],
            "--hop must be a positive, finite number of seconds, got nan",
        ),
    ]:
        code, _, err = run_main(cli.main, argv, capsys)
        assert code == 2 and message in one_error_line(err), err
    assert snapshot(env["root"]) == before


def test_stream_prints_checkpoint_labels_and_refuses_short_files(env, capsys):
    argv = [env["root"] / "good.wav", "--checkpoint", env["ckpt"], "--frames"]
    argv += ["--hop", "0.5", "--window", "0.5", "--on-threshold", "0", "--off-threshold", "0"]
    code, out, err = run_main(stream.main, argv, capsys)
    assert code == 0, err
    frames = [line for line in out.splitlines() if " frame " in line]
    assert len(frames) == 2 and all(
        any(f" {label} (" in line for label in S.LABELS) for line in frames
    )
    code, out, err = run_main(
        stream.main, [env["root"] / "short.wav", "--checkpoint", env["ckpt"]], capsys
    )
    assert code == 1 and out == ""
    assert (
        "short.wav: 0.500 s of audio is shorter than the 1 s window, so nothing was tagged; "
        "pass e.g. --window 0.5 --hop 0.25"
    ) in one_error_line(err)
