"""The tag command on the example recording, with golden recipe weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf

import golden_utils as G
from panns_jax import audio, checkpoints, convert, inference


@pytest.fixture(scope="module")
def cnn6_checkpoint(tmp_path_factory):
    G.require_golden()
    path = tmp_path_factory.mktemp("ckpt") / "cnn6"
    checkpoints.save(str(path), convert.torch_to_checkpoint(G.load_state("Cnn6"), "Cnn6"))
    return str(path)


def test_cli_tag_json_equals_model_applied_directly(cnn6_checkpoint, capsys):
    wav = str(G.AUDIO / "R9_ZSCveAHg_7s.wav")
    assert inference.main(["tag", wav, "--checkpoint", cnn6_checkpoint, "--top-k", "3",
                           "--format", "json"]) == 0
    result = json.loads(capsys.readouterr().out)
    tagger = inference.AudioTagger("Cnn6", variables=checkpoints.load(cnn6_checkpoint).variables)
    probabilities = tagger.predict(audio.load_audio(wav, 32000))["clipwise_output"][0]
    top = np.argsort(-probabilities)[:3]
    assert [row["index"] for row in result[0]["labels"]] == top.tolist()
    np.testing.assert_allclose([row["probability"] for row in result[0]["labels"]],
                               probabilities[top], rtol=1e-6)
    assert result[0]["labels"][0]["label"] == audio.audioset_labels()[top[0]]


def test_stereo_44k_is_downmixed_and_resampled(tmp_path):
    t = np.arange(44100) / 44100
    left = 0.5 * np.sin(2 * np.pi * 440 * t)
    sf.write(tmp_path / "stereo.flac", np.stack([left, -left * 0.5], axis=1), 44100)
    samples = audio.load_audio(str(tmp_path / "stereo.flac"), 32000)
    assert samples.dtype == np.float32 and abs(len(samples) - 32000) <= 1
    assert 0.115 < np.abs(samples).max() < 0.135  # (0.5 - 0.25) / 2 = 0.125 after the downmix.


def test_bad_files_name_the_file_and_reason(tmp_path, cnn6_checkpoint, capsys):
    (tmp_path / "empty.wav").write_bytes(b"")
    (tmp_path / "text.wav").write_text("not audio at all")
    good = str(G.AUDIO / "R9_ZSCveAHg_7s.wav")
    code = inference.main(["tag", str(tmp_path / "empty.wav"), str(tmp_path / "missing.wav"),
                           str(tmp_path / "text.wav"), good, "--checkpoint", cnn6_checkpoint])
    captured = capsys.readouterr()
    assert code == 1
    assert "empty.wav: empty file" in captured.err
    assert "missing.wav: no such file" in captured.err
    assert "text.wav: not a readable audio file" in captured.err
    assert "3 of 4 file(s) failed" in captured.err
    assert good in captured.out  # The good file still completes.
