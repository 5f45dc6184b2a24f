"""panns-jax tag | sed | embed and the Python API, with golden recipe weights.

Every check compares against the model applied directly (``model.apply`` on the
same samples), so a test cannot pass on outputs that are merely well-formed.
"""

from __future__ import annotations

import csv
import io
import json

import golden_utils as G
import jax
import numpy as np
import pytest
import soundfile as sf

from panns_jax import audio, checkpoints, cli, convert
from panns_jax.sed import detect_events
from panns_jax.tagger import aggregate_chunks, load_tagger

WAV = str(G.AUDIO / "R9_ZSCveAHg_7s.wav")
SR = 32000
TOL = dict(rtol=1e-5, atol=2e-6)  # Batched/jitted vs direct: float reassociation only.


def _checkpoint(tmp_path_factory, name: str) -> str:
    G.require_golden()
    path = tmp_path_factory.mktemp("ckpt") / name
    checkpoints.save(str(path), convert.torch_to_checkpoint(G.load_state(name), name))
    return str(path)


@pytest.fixture(scope="module")
def cnn6_checkpoint(tmp_path_factory):
    return _checkpoint(tmp_path_factory, "Cnn6")


@pytest.fixture(scope="module")
def cnn6(cnn6_checkpoint):
    return load_tagger(cnn6_checkpoint, None)


@pytest.fixture(scope="module")
def direct(cnn6):
    """The model applied directly to one waveform: the reference of every check."""
    apply = jax.jit(cnn6.model.apply)
    return lambda x: jax.device_get(apply(cnn6.variables, np.asarray(x, np.float32)[None]))


@pytest.fixture(scope="module")
def long_wav(tmp_path_factory):
    """A 3-minute 32 kHz recording: tones, noise and silence that change over time."""
    rng = np.random.default_rng(0)
    t = np.arange(180 * SR) / SR
    x = 0.3 * np.sin(2 * np.pi * (200 + 20 * t) * t) * (np.sin(2 * np.pi * t / 23) > 0)
    x += 0.05 * rng.standard_normal(len(t)) * (np.sin(2 * np.pi * t / 37) > 0.3)
    path = tmp_path_factory.mktemp("audio") / "long.wav"
    sf.write(path, x.astype(np.float32), SR, subtype="FLOAT")
    return str(path)


def _tag_json(capsys, *argv) -> list:
    assert cli.main(["tag", *argv, "--format", "json", "--no-progress"]) == 0
    return json.loads(capsys.readouterr().out)


def _assert_top(labels: list, probabilities: np.ndarray) -> None:
    top = np.argsort(-probabilities, kind="stable")[: len(labels)]
    assert [row["index"] for row in labels] == top.tolist()
    np.testing.assert_allclose([row["probability"] for row in labels], probabilities[top], **TOL)
    assert labels[0]["label"] == audio.audioset_labels()[top[0]]


# ----------------------------------------------------------------------------- tag


def test_cli_tag_json_equals_model_applied_directly(cnn6_checkpoint, direct, capsys):
    result = _tag_json(capsys, WAV, "--checkpoint", cnn6_checkpoint, "--top-k", "3")
    assert len(result) == 1 and result[0]["file"] == WAV and result[0]["chunks"] == 1
    # 7 s < the 10 s window: the whole recording, unpadded, as the original.
    _assert_top(result[0]["labels"], direct(audio.load_audio(WAV, SR))["clipwise_output"][0])


def test_cli_tag_csv_and_output_file(cnn6_checkpoint, direct, tmp_path, capsys):
    out = tmp_path / "tags.csv"
    assert (
        cli.main(
            [
                "tag",
                WAV,
                "--checkpoint",
                cnn6_checkpoint,
                "--top-k",
                "4",
                "--format",
                "csv",
                "--output",
                str(out),
            ]
        )
        == 0
    )
    assert capsys.readouterr().out == ""
    rows = list(csv.DictReader(out.open()))
    probabilities = direct(audio.load_audio(WAV, SR))["clipwise_output"][0]
    _assert_top(
        [
            {"index": int(r["index"]), "label": r["label"], "probability": float(r["probability"])}
            for r in rows
        ],
        probabilities,
    )
    assert [int(r["rank"]) for r in rows] == [1, 2, 3, 4]


def test_stereo_44k_is_downmixed_and_resampled(tmp_path):
    t = np.arange(44100) / 44100
    left = 0.5 * np.sin(2 * np.pi * 440 * t)
    sf.write(tmp_path / "stereo.flac", np.stack([left, -left * 0.5], axis=1), 44100)
    samples = audio.load_audio(str(tmp_path / "stereo.flac"), 32000)
    assert samples.dtype == np.float32 and abs(len(samples) - 32000) <= 1
    assert 0.115 < np.abs(samples).max() < 0.135  # (0.5 - 0.25) / 2 = 0.125 after the downmix.


def test_other_rates_channels_and_short_files(cnn6_checkpoint, direct, tmp_path, capsys):
    rng = np.random.default_rng(1)
    stereo = tmp_path / "stereo44k.flac"
    sf.write(stereo, 0.2 * rng.standard_normal((3 * 44100, 2)), 44100)
    mono8k = tmp_path / "mono8k.wav"
    sf.write(mono8k, 0.2 * rng.standard_normal(2 * 8000), 8000)
    short = tmp_path / "half_second.wav"
    sf.write(short, 0.2 * rng.standard_normal(SR // 2), SR)
    files = [str(stereo), str(mono8k), str(short)]
    result = _tag_json(capsys, *files, "--checkpoint", cnn6_checkpoint, "--top-k", "5")
    assert [r["file"] for r in result] == files
    # Reference decode: soundfile + channel mean + librosa.resample, as the original.
    import librosa

    for path, r in zip(files, result):
        x, rate = sf.read(path, dtype="float32", always_2d=True)
        x = librosa.resample(x.mean(axis=1), orig_sr=rate, target_sr=SR)
        assert r["duration_s"] == pytest.approx(len(x) / SR, abs=1e-4)
        _assert_top(r["labels"], direct(x)["clipwise_output"][0])


def test_directories_globs_and_progress_bar(cnn6_checkpoint, direct, tmp_path, capsys):
    rng = np.random.default_rng(2)
    (tmp_path / "sub").mkdir()
    clips = [0.1 * rng.standard_normal(2 * SR).astype(np.float32) for _ in range(3)]
    for i, x in enumerate(clips):  # Equal lengths: one batch across files.
        sf.write(tmp_path / "sub" / f"c{i}.wav", x, SR, subtype="FLOAT")
    (tmp_path / "sub" / "notes.txt").write_text("not listed: not an audio extension")
    assert (
        cli.main(
            [
                "tag",
                str(tmp_path / "sub"),
                str(tmp_path / "sub" / "c1.*"),
                "--checkpoint",
                cnn6_checkpoint,
                "--top-k",
                "2",
                "--format",
                "json",
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert [r["file"].rsplit("/", 1)[1] for r in result] == ["c0.wav", "c1.wav", "c2.wav", "c1.wav"]
    for r, i in zip(result, [0, 1, 2, 1]):
        _assert_top(r["labels"], direct(clips[i])["clipwise_output"][0])
    assert "4/4" in captured.err  # tqdm's progress bar on stderr.


# ----------------------------------------------------------------- long recordings


# 10 s chunks every 40 s, plus one ending at the recording's end (170 s, overlapping 160 s).
LONG_STARTS = [0, 40 * SR, 80 * SR, 120 * SR, 160 * SR, 170 * SR]


@pytest.fixture(scope="module")
def long_reference(direct, long_wav):
    """The model applied directly to each chunk's sample range of the whole decoded file."""
    full = audio.load_audio(long_wav, SR)
    assert len(full) == 180 * SR
    return [direct(full[s : s + 10 * SR]) for s in LONG_STARTS]


def test_chunks_equal_the_model_on_their_sample_ranges(cnn6, long_wav, long_reference, monkeypatch):
    def whole_file_read(*args, **kwargs):
        raise AssertionError("a long recording must be streamed, not decoded whole")

    monkeypatch.setattr(sf, "read", whole_file_read)
    result = cnn6.run_one(long_wav, ["clipwise_output", "embedding"], window_s=10.0, hop_s=40.0)
    assert result.starts.tolist() == LONG_STARTS and result.window == 10 * SR
    assert result.num_samples == 180 * SR
    for k, ref in enumerate(long_reference):
        np.testing.assert_allclose(
            result.outputs["clipwise_output"][k], ref["clipwise_output"][0], **TOL
        )
        np.testing.assert_allclose(
            result.outputs["embedding"][k], ref["embedding"][0], rtol=1e-5, atol=1e-5
        )
    # Aggregation over chunks as documented: max (default) and mean.
    clip = result.outputs["clipwise_output"]
    np.testing.assert_array_equal(aggregate_chunks(clip), clip.max(axis=0))
    np.testing.assert_array_equal(aggregate_chunks(clip, "mean"), clip.mean(axis=0))


def test_cli_tag_long_file_aggregates_chunks(cnn6_checkpoint, long_wav, long_reference, capsys):
    (r,) = _tag_json(
        capsys, long_wav, "--checkpoint", cnn6_checkpoint, "--hop", "40", "--top-k", "5"
    )
    assert r["chunks"] == 6 and r["duration_s"] == 180
    _assert_top(r["labels"], np.max([ref["clipwise_output"][0] for ref in long_reference], axis=0))
    (r,) = _tag_json(
        capsys,
        long_wav,
        "--checkpoint",
        cnn6_checkpoint,
        "--hop",
        "40",
        "--top-k",
        "5",
        "--aggregate",
        "mean",
    )
    _assert_top(r["labels"], np.mean([ref["clipwise_output"][0] for ref in long_reference], axis=0))


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


# ------------------------------------------------------------------------------ sed


@pytest.fixture(scope="module")
def sed_tagger(tmp_path_factory):
    return load_tagger(_checkpoint(tmp_path_factory, "Cnn14_DecisionLevelMax"), None)


def test_sed_decision_level_framewise_equals_model(sed_tagger, tmp_path):
    apply = jax.jit(sed_tagger.model.apply)
    x = audio.load_audio(WAV, SR)
    sed = sed_tagger.detect(WAV, threshold=0.5)
    ref = jax.device_get(apply(sed_tagger.variables, x[None]))["framewise_output"][0]
    assert sed.framewise.shape == ref.shape == (1 + len(x) // 320, 527)
    np.testing.assert_allclose(sed.framewise, ref, **TOL)
    np.testing.assert_allclose(sed.times, np.arange(len(ref)) * 0.01)
    # Long recording: 25 s in 10 s chunks, each frame from its chunk's direct output.
    long = np.concatenate([x, x[::-1], x, x[: 4 * SR]])
    sed = sed_tagger.detect(long, threshold=0.5)
    assert sed.framewise.shape == (1 + len(long) // 320, 527)
    starts = audio.chunk_starts(len(long), 10 * SR, 10 * SR, align=320)
    assert starts == [0, 10 * SR, (len(long) - 10 * SR) // 320 * 320]
    chunk_out = [
        jax.device_get(apply(sed_tagger.variables, long[None, s : s + 10 * SR]))[
            "framewise_output"
        ][0]
        for s in starts
    ]
    np.testing.assert_allclose(sed.framewise[:1000], chunk_out[0][:1000], **TOL)
    # Chunks 1 and 2 overlap in frames 1500-2000: each frame from the nearer centre.
    np.testing.assert_allclose(sed.framewise[1000:1750], chunk_out[1][:750], **TOL)
    np.testing.assert_allclose(sed.framewise[1750:], chunk_out[2][250:], **TOL)


def test_sed_events_follow_the_threshold():
    labels = ["a", "b"]
    framewise = np.array([[0.1, 0.9], [0.6, 0.9], [0.7, 0.2], [0.2, 0.8]], np.float32)
    events = detect_events(framewise, np.arange(4) * 0.5, 0.5, 0.5, labels, 2.0)
    assert events == [
        {"onset": 0.0, "offset": 0.75, "label": "b", "index": 1, "score": pytest.approx(0.9)},
        {"onset": 0.25, "offset": 1.25, "label": "a", "index": 0, "score": pytest.approx(0.7)},
        {"onset": 1.25, "offset": 1.75, "label": "b", "index": 1, "score": pytest.approx(0.8)},
    ]


def test_sed_clip_model_sliding_windows(cnn6, direct):
    x = audio.load_audio(WAV, SR)[: 3 * SR]
    sed = cnn6.detect(x, threshold=0.9, window_s=1.0, hop_s=0.5)
    starts = np.arange(0, 2 * SR + 1, SR // 2)
    np.testing.assert_allclose(sed.times, (starts + SR / 2) / SR)
    for k, s in enumerate(starts):
        np.testing.assert_allclose(
            sed.framewise[k], direct(x[s : s + SR])["clipwise_output"][0], **TOL
        )
    assert sed.frame_hop == 0.5 and sed.duration == 3.0
    expected = detect_events(sed.framewise, sed.times, 0.5, 0.9, cnn6.labels, 3.0)
    assert sed.events == expected and expected  # Random-ish weights saturate some classes.


def test_cli_sed_csv_and_png(sed_tagger, tmp_path, capsys):
    from panns_jax import checkpoints as ck

    ckpt = str(tmp_path / "ckpt")
    ck.save(ckpt, ck.ModelCheckpoint("Cnn14_DecisionLevelMax", sed_tagger.variables))
    plots, frames = tmp_path / "plots", tmp_path / "frames"
    assert (
        cli.main(
            [
                "sed",
                WAV,
                "--checkpoint",
                ckpt,
                "--threshold",
                "0.5",
                "--plot-dir",
                str(plots),
                "--framewise-dir",
                str(frames),
            ]
        )
        == 0
    )
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    sed = sed_tagger.detect(WAV, threshold=0.5)
    assert len(rows) == len(sed.events) > 0
    for row, event in zip(rows, sed.events):
        assert row["label"] == event["label"] and row["file"] == WAV
        assert float(row["onset"]) == pytest.approx(event["onset"], abs=1e-3)
        assert float(row["offset"]) == pytest.approx(event["offset"], abs=1e-3)
        assert float(row["score"]) == pytest.approx(event["score"], abs=1e-4)
    saved = np.load(frames / "R9_ZSCveAHg_7s.npz")
    np.testing.assert_allclose(saved["framewise"], sed.framewise, **TOL)
    png = plots / "R9_ZSCveAHg_7s.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    image = matplotlib.image.imread(str(png))
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert image[..., :3].std() > 0.05  # Not a blank canvas.


# ---------------------------------------------------------------------------- embed


def test_cli_embed_npz_and_npy(cnn6_checkpoint, direct, long_wav, long_reference, tmp_path):
    out = tmp_path / "emb.npz"
    assert (
        cli.main(
            [
                "embed",
                WAV,
                long_wav,
                "--checkpoint",
                cnn6_checkpoint,
                "--hop",
                "40",
                "--per-chunk",
                "--output",
                str(out),
            ]
        )
        == 0
    )
    saved = np.load(out)
    assert saved["files"].tolist() == [WAV, long_wav]
    assert saved["file_index"].tolist() == [0] + [1] * 6
    np.testing.assert_allclose(saved["start_s"], [0] + [s / SR for s in LONG_STARTS])
    expected = [direct(audio.load_audio(WAV, SR))["embedding"][0]]
    expected += [ref["embedding"][0] for ref in long_reference]
    np.testing.assert_allclose(saved["embeddings"], np.stack(expected), rtol=1e-5, atol=1e-5)
    npy = tmp_path / "emb.npy"  # Default: one embedding per file, the mean over chunks.
    assert (
        cli.main(
            [
                "embed",
                WAV,
                long_wav,
                "--checkpoint",
                cnn6_checkpoint,
                "--hop",
                "40",
                "--output",
                str(npy),
            ]
        )
        == 0
    )
    np.testing.assert_allclose(
        np.load(npy), [expected[0], np.mean(expected[1:], axis=0)], rtol=1e-5, atol=1e-5
    )


# ------------------------------------------------------------------------ bad input


def test_bad_files_name_the_file_and_reason(tmp_path, cnn6_checkpoint, capsys):
    (tmp_path / "empty.wav").write_bytes(b"")
    (tmp_path / "text.wav").write_text("not audio at all")
    sf.write(tmp_path / "zero.wav", np.zeros(0, np.float32), SR)  # Valid header, no samples.
    nan = np.full(SR, 0.1, np.float32)
    nan[100] = np.nan
    sf.write(tmp_path / "nan.wav", nan, SR, subtype="FLOAT")
    (tmp_path / "noise.xyz").write_bytes(np.random.default_rng(0).bytes(4096))
    sf.write(tmp_path / "tiny.wav", np.zeros(SR // 10, np.float32), SR)  # 0.1 s < Cnn6's 0.15 s.
    bad = ["empty.wav", "missing.wav", "text.wav", "zero.wav", "nan.wav", "noise.xyz", "tiny.wav"]
    code = cli.main(
        [
            "tag",
            *[str(tmp_path / b) for b in bad],
            WAV,
            str(tmp_path / "*.none"),
            "--checkpoint",
            cnn6_checkpoint,
        ]
    )
    captured = capsys.readouterr()
    assert code == 1
    for name, reason in [
        ("empty.wav", "empty file"),
        ("missing.wav", "no such file"),
        ("text.wav", "not a readable audio file"),
        ("zero.wav", "contains no audio samples"),
        ("nan.wav", "contains NaN or Inf samples"),
        ("noise.xyz", "not a readable audio file"),
        (
            "tiny.wav",
            "3200 samples (0.100 s at 32000 Hz) is too short for "
            "Cnn6, which needs at least 4800 samples",
        ),
        ("*.none", "no files match"),
    ]:
        lines = [line for line in captured.err.splitlines() if f"{name}: {reason}" in line]
        assert len(lines) == 1, (name, captured.err)
    assert "8 of 9 file(s) failed" in captured.err
    assert WAV in captured.out  # The good file still completes.


def test_single_bad_file_exits_nonzero(tmp_path, cnn6_checkpoint, capsys):
    for command in ("tag", "sed", "embed"):
        code = cli.main(
            [
                command,
                str(tmp_path / "missing.flac"),
                "--checkpoint",
                cnn6_checkpoint,
                "--output",
                str(tmp_path / "out.npz"),
            ]
        )
        assert code == 1
        err = capsys.readouterr().err
        assert f"{tmp_path / 'missing.flac'}: no such file" in err
    assert cli.main(["tag", WAV, "--checkpoint", str(tmp_path)]) == 2  # Not a checkpoint.


def test_api_errors_and_silence(cnn6):
    with pytest.raises(audio.AudioError, match="NaN"):
        cnn6.tag(np.array([0.0, np.nan] * SR, np.float32))
    with pytest.raises(audio.AudioError, match="too short for Cnn6"):
        cnn6.tag(np.zeros(4799, np.float32))
    assert cnn6.min_samples == 4800
    silence = np.zeros(3 * SR, np.float32)
    labels = cnn6.tag(silence, top_k=527)
    assert all(np.isfinite(row["probability"]) for row in labels)
    sed = cnn6.detect(silence)
    assert np.all(np.isfinite(sed.framewise)) and len(sed.times) == 21


# ----------------------------------------------------------------------------- HEAR


def test_hear_api(cnn6_checkpoint, direct):
    import jax.numpy as jnp

    from panns_jax import hear

    model = hear.load_model(
        cnn6_checkpoint, timestamp_window_s=0.5, timestamp_hop_s=0.25, input_sample_rate=SR
    )
    assert model.sample_rate == model.model_sample_rate == SR
    assert model.scene_embedding_size == model.timestamp_embedding_size == 512
    x = audio.load_audio(WAV, SR)
    sounds = np.stack([x[: 2 * SR], x[3 * SR : 5 * SR]])
    scene = hear.get_scene_embeddings(sounds, model)
    assert isinstance(scene, np.ndarray) and scene.shape == (2, 512)
    for i in range(2):
        np.testing.assert_allclose(
            scene[i], direct(sounds[i])["embedding"][0], rtol=1e-5, atol=1e-5
        )
    emb, ts = hear.get_timestamp_embeddings(jnp.asarray(sounds), model)
    assert isinstance(emb, jax.Array) and emb.shape == (2, 9, 512) and ts.shape == (2, 9)
    np.testing.assert_allclose(np.asarray(ts[1]), np.arange(9) * 250.0)
    padded = np.pad(sounds[1], (SR // 4, SR // 4))
    for k in (0, 4, 8):  # The window centred on timestamp k.
        window = padded[k * SR // 4 : k * SR // 4 + SR // 2]
        np.testing.assert_allclose(
            np.asarray(emb[1, k]), direct(window)["embedding"][0], rtol=1e-5, atol=1e-5
        )
    torch = pytest.importorskip("torch")
    scene_t = hear.get_scene_embeddings(torch.from_numpy(sounds), model)
    assert isinstance(scene_t, torch.Tensor)
    np.testing.assert_allclose(scene_t.numpy(), scene, rtol=1e-6)


def test_hear_model_takes_48khz_and_resamples(cnn6_checkpoint, direct):
    import librosa
    import tensorflow as tf

    from panns_jax import hear

    model = hear.load_model(cnn6_checkpoint, timestamp_window_s=0.5, timestamp_hop_s=0.05)
    assert isinstance(model, tf.Module)  # What hear-validator and the HEAR kit accept.
    assert model.sample_rate == 48000 and model.model_sample_rate == SR
    x = audio.load_audio(WAV, 48000)[: 2 * 48000]
    scene = hear.get_scene_embeddings(tf.constant(x[None]), model)
    assert isinstance(scene, tf.Tensor) and scene.dtype == tf.float32
    at_model_rate = librosa.resample(x, orig_sr=48000, target_sr=SR)
    assert len(at_model_rate) == 2 * SR
    np.testing.assert_allclose(
        scene.numpy()[0], direct(at_model_rate)["embedding"][0], rtol=1e-5, atol=1e-5
    )
    emb, ts = hear.get_timestamp_embeddings(x[None], model)
    assert emb.shape == (1, 41, 512)
    np.testing.assert_allclose(ts[0], np.arange(41) * 50.0, atol=1e-3)
    with pytest.raises(ValueError, match="positive"):
        hear.PannsHearModel(model.tagger, input_sample_rate=-1)


def test_hear_validator_passes(cnn6_checkpoint, capsys):
    """The official HEAR 2021 validator (pip install --no-deps hearvalidator; see .ci/run)."""
    validate = pytest.importorskip("hearvalidator.validate")
    validate.ValidateModel("panns_jax.hear", cnn6_checkpoint)()
    out = capsys.readouterr().out
    assert "Received tensorflow Module" in out and "Model sample rate is: 48000" in out
    assert "Received embedding of shape: (16, 41, 512)" in out
    assert "Received embedding of shape: (8, 512)" in out
