"""``panns-jax tag | sed | embed`` with golden recipe weights, and the subcommand dispatcher.

Every check compares against the model applied directly (``model.apply`` on the same
samples), so a test cannot pass on outputs that are merely well-formed.
"""

from __future__ import annotations

import csv
import io
import json
from unittest import mock

import numpy as np
import pytest
import serving_utils as S
import soundfile as sf

from panns_jax import audio, cli, tolerance
from panns_jax.kernels import onednn
from panns_jax.tagger import AudioTagger

WAV, SR, TOL = S.WAV, S.SR, S.TOL


@pytest.fixture(scope="module")
def long_reference(direct, long_wav):
    """The model applied directly to each chunk's sample range of the whole decoded file."""
    full = audio.load_audio(long_wav, SR)
    assert len(full) == 180 * SR
    return [direct(full[s : s + 10 * SR]) for s in S.LONG_STARTS]


def _tag_json(capsys, *argv) -> list:
    assert cli.main(["tag", *argv, "--format", "json", "--no-progress"]) == 0
    return json.loads(capsys.readouterr().out)


# ----------------------------------------------------------------------------- tag


def test_cli_tag_json_equals_model_applied_directly(cnn6_checkpoint, direct, capsys):
    result = _tag_json(capsys, WAV, "--checkpoint", cnn6_checkpoint, "--top-k", "3")
    assert len(result) == 1 and result[0]["file"] == WAV and result[0]["chunks"] == 1
    # 7 s < the 10 s window: the whole recording, unpadded, as the original.
    S.assert_top(result[0]["labels"], direct(audio.load_audio(WAV, SR))["clipwise_output"][0])


def test_cli_tag_on_onednn_equals_model_applied_directly(cnn6_checkpoint, direct, capsys):
    """--conv-backend onednn: the same top classes as XLA's model, within the golden rule."""
    argv = ["--checkpoint", cnn6_checkpoint, "--top-k", "3", "--conv-backend", "onednn"]
    with mock.patch.object(onednn, "conv", wraps=onednn.conv) as conv:
        result = _tag_json(capsys, WAV, *argv)
    assert conv.call_count > 0
    reference = direct(audio.load_audio(WAV, SR))["clipwise_output"][0]
    labels = result[0]["labels"]
    assert [row["index"] for row in labels] == np.argsort(-reference)[:3].tolist()
    got = np.array([row["probability"] for row in labels])
    problem, _, _ = tolerance.check("clipwise_output", got, reference[np.argsort(-reference)[:3]])
    assert problem == ""


def test_cli_tag_csv_and_output_file(cnn6_checkpoint, direct, tmp_path, capsys):
    out = tmp_path / "tags.csv"
    argv = ["tag", WAV, "--checkpoint", cnn6_checkpoint, "--top-k", "4", "--format", "csv"]
    assert cli.main([*argv, "--output", str(out)]) == 0
    assert capsys.readouterr().out == ""
    rows = list(csv.DictReader(out.open()))
    probabilities = direct(audio.load_audio(WAV, SR))["clipwise_output"][0]
    S.assert_top(
        [
            {"index": int(r["index"]), "label": r["label"], "probability": float(r["probability"])}
            for r in rows
        ],
        probabilities,
    )
    assert [int(r["rank"]) for r in rows] == [1, 2, 3, 4]


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
        S.assert_top(r["labels"], direct(x)["clipwise_output"][0])


def test_directories_globs_and_progress_bar(cnn6_checkpoint, direct, tmp_path, capsys):
    rng = np.random.default_rng(2)
    (tmp_path / "sub").mkdir()
    clips = [0.1 * rng.standard_normal(2 * SR).astype(np.float32) for _ in range(3)]
    for i, x in enumerate(clips):  # Equal lengths: one batch across files.
        sf.write(tmp_path / "sub" / f"c{i}.wav", x, SR, subtype="FLOAT")
    (tmp_path / "sub" / "notes.txt").write_text("not listed: not an audio extension")
    inputs = [str(tmp_path / "sub"), str(tmp_path / "sub" / "c1.*")]
    argv = ["--checkpoint", cnn6_checkpoint, "--top-k", "2", "--format", "json"]
    assert cli.main(["tag", *inputs, *argv]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert [r["file"].rsplit("/", 1)[1] for r in result] == ["c0.wav", "c1.wav", "c2.wav", "c1.wav"]
    for r, i in zip(result, [0, 1, 2, 1]):
        S.assert_top(r["labels"], direct(clips[i])["clipwise_output"][0])
    assert "4/4" in captured.err  # tqdm's progress bar on stderr.


def test_cli_tag_long_file_aggregates_chunks(cnn6_checkpoint, long_wav, long_reference, capsys):
    argv = [long_wav, "--checkpoint", cnn6_checkpoint, "--hop", "40", "--top-k", "5"]
    (r,) = _tag_json(capsys, *argv)
    assert r["chunks"] == 6 and r["duration_s"] == 180
    S.assert_top(r["labels"], np.max([ref["clipwise_output"][0] for ref in long_reference], axis=0))
    (r,) = _tag_json(capsys, *argv, "--aggregate", "mean")
    S.assert_top(
        r["labels"], np.mean([ref["clipwise_output"][0] for ref in long_reference], axis=0)
    )


# ------------------------------------------------------------------------------ sed


def test_cli_sed_csv_and_png(tmp_path_factory, tmp_path, capsys):
    ckpt = S.golden_checkpoint(tmp_path_factory, "Cnn14_DecisionLevelMax")
    plots, frames = tmp_path / "plots", tmp_path / "frames"
    argv = ["sed", WAV, "--checkpoint", ckpt, "--threshold", "0.5"]
    assert cli.main([*argv, "--plot-dir", str(plots), "--framewise-dir", str(frames)]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    found = AudioTagger.load(ckpt).detect(WAV, threshold=0.5)
    assert len(rows) == len(found.events) > 0
    for row, event in zip(rows, found.events):
        assert row["label"] == event["label"] and row["file"] == WAV
        assert float(row["onset"]) == pytest.approx(event["onset"], abs=1e-3)
        assert float(row["offset"]) == pytest.approx(event["offset"], abs=1e-3)
        assert float(row["score"]) == pytest.approx(event["score"], abs=1e-4)
    saved = np.load(frames / "R9_ZSCveAHg_7s.npz")
    np.testing.assert_allclose(saved["framewise"], found.framewise, **TOL)
    png = plots / "R9_ZSCveAHg_7s.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    image = matplotlib.image.imread(str(png))
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert image[..., :3].std() > 0.05  # Not a blank canvas.


# ---------------------------------------------------------------------------- embed


def test_cli_embed_npz_and_npy(cnn6_checkpoint, direct, long_wav, long_reference, tmp_path):
    out = tmp_path / "emb.npz"
    argv = ["embed", WAV, long_wav, "--checkpoint", cnn6_checkpoint, "--hop", "40"]
    assert cli.main([*argv, "--per-chunk", "--output", str(out)]) == 0
    saved = np.load(out)
    assert saved["files"].tolist() == [WAV, long_wav]
    assert saved["file_index"].tolist() == [0] + [1] * 6
    np.testing.assert_allclose(saved["start_s"], [0] + [s / SR for s in S.LONG_STARTS])
    expected = [direct(audio.load_audio(WAV, SR))["embedding"][0]]
    expected += [ref["embedding"][0] for ref in long_reference]
    np.testing.assert_allclose(saved["embeddings"], np.stack(expected), rtol=1e-5, atol=1e-5)
    npy = tmp_path / "emb.npy"  # Default: one embedding per file, the mean over chunks.
    assert cli.main([*argv, "--output", str(npy)]) == 0
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
    inputs = [str(tmp_path / b) for b in bad] + [WAV, str(tmp_path / "*.none")]
    code = cli.main(["tag", *inputs, "--checkpoint", cnn6_checkpoint])
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
        missing = str(tmp_path / "missing.flac")
        argv = [command, missing, "--checkpoint", cnn6_checkpoint]
        code = cli.main([*argv, "--output", str(tmp_path / "out.npz")])
        assert code == 1
        err = capsys.readouterr().err
        assert f"{tmp_path / 'missing.flac'}: no such file" in err
    assert cli.main(["tag", WAV, "--checkpoint", str(tmp_path)]) == 2  # Not a checkpoint.


# ----------------------------------------------------------------------- dispatcher


@pytest.mark.parametrize("command", ["export", "stream", "download"])
def test_delegated_subcommands_run_their_modules_main(command, monkeypatch):
    """``panns-jax export | stream | download ARGS`` is ``panns_jax.cli.<command>.main(ARGS)``:
    the arguments (``-h`` included) reach that module's own parser untouched."""
    import importlib

    module = importlib.import_module(f"panns_jax.cli.{command}")
    seen = []
    monkeypatch.setattr(module, "main", lambda argv: seen.append(list(argv)) or 7)
    assert cli.main([command, "-h", "--x", "1"]) == 7
    assert seen == [["-h", "--x", "1"]]
    # Negative control: tag parses its own options and refuses unknown ones.
    with pytest.raises(SystemExit):
        cli.main(["tag", WAV, "--x", "1"])
