"""Sound event detection: frames stitched from chunks equal the model applied to them,
events follow the threshold, and the output read is the model's own."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import serving_utils as S

from panns_jax import audio, models, sed
from panns_jax.sed import detect_events
from panns_jax.tagger import AudioTagger

WAV, SR, TOL = S.WAV, S.SR, S.TOL


@pytest.fixture(scope="module")
def sed_tagger(tmp_path_factory):
    return AudioTagger.load(S.golden_checkpoint(tmp_path_factory, "Cnn14_DecisionLevelMax"))


@pytest.fixture(scope="module")
def cnn6(tmp_path_factory):
    return AudioTagger.load(S.golden_checkpoint(tmp_path_factory, "Cnn6"))


def test_sed_decision_level_framewise_equals_model(sed_tagger):
    apply = jax.jit(sed_tagger.model.apply)
    x = audio.load_audio(WAV, SR)
    found = sed_tagger.detect(WAV, threshold=0.5)
    ref = jax.device_get(apply(sed_tagger.variables, x[None]))["framewise_output"][0]
    assert found.framewise.shape == ref.shape == (1 + len(x) // 320, 527)
    np.testing.assert_allclose(found.framewise, ref, **TOL)
    np.testing.assert_allclose(found.times, np.arange(len(ref)) * 0.01)
    # Long recording: 25 s in 10 s chunks, each frame from its chunk's direct output.
    long = np.concatenate([x, x[::-1], x, x[: 4 * SR]])
    found = sed_tagger.detect(long, threshold=0.5)
    assert found.framewise.shape == (1 + len(long) // 320, 527)
    starts = audio.chunk_starts(len(long), 10 * SR, 10 * SR, align=320)
    assert starts == [0, 10 * SR, (len(long) - 10 * SR) // 320 * 320]
    chunk_out = [
        jax.device_get(apply(sed_tagger.variables, long[None, s : s + 10 * SR]))[
            "framewise_output"
        ][0]
        for s in starts
    ]
    np.testing.assert_allclose(found.framewise[:1000], chunk_out[0][:1000], **TOL)
    # Chunks 1 and 2 overlap in frames 1500-2000: each frame from the nearer centre.
    np.testing.assert_allclose(found.framewise[1000:1750], chunk_out[1][:750], **TOL)
    np.testing.assert_allclose(found.framewise[1750:], chunk_out[2][250:], **TOL)


def test_sed_events_follow_the_threshold():
    labels = ["a", "b"]
    framewise = np.array([[0.1, 0.9], [0.6, 0.9], [0.7, 0.2], [0.2, 0.8]], np.float32)
    events = detect_events(framewise, np.arange(4) * 0.5, 0.5, 0.5, labels, 2.0)
    assert events == [
        {"onset": 0.0, "offset": 0.75, "label": "b", "index": 1, "score": pytest.approx(0.9)},
        {"onset": 0.25, "offset": 1.25, "label": "a", "index": 0, "score": pytest.approx(0.7)},
        {"onset": 1.25, "offset": 1.75, "label": "b", "index": 1, "score": pytest.approx(0.8)},
    ]


def test_sed_clip_model_sliding_windows(cnn6):
    direct = S.direct(cnn6)
    x = audio.load_audio(WAV, SR)[: 3 * SR]
    found = cnn6.detect(x, threshold=0.9, window_s=1.0, hop_s=0.5)
    starts = np.arange(0, 2 * SR + 1, SR // 2)
    np.testing.assert_allclose(found.times, (starts + SR / 2) / SR)
    for k, s in enumerate(starts):
        np.testing.assert_allclose(
            found.framewise[k], direct(x[s : s + SR])["clipwise_output"][0], **TOL
        )
    assert found.frame_hop == 0.5 and found.duration == 3.0
    expected = detect_events(found.framewise, found.times, 0.5, 0.9, cnn6.labels, 3.0)
    assert found.events == expected and expected  # Random-ish weights saturate some classes.


def test_output_key_is_the_models_framewise_output_where_it_has_one(sed_tagger, cnn6):
    decision = models.outputs(models.get("Cnn14_DecisionLevelMax"))
    clip = models.outputs(models.get("MobileNetV1"))
    assert sed.output_key(decision) == "framewise_output"
    assert sed.output_key(clip) == "clipwise_output"
    # The tagger asks the same function, with the loader's metadata.
    assert sed_tagger.sed_key == "framewise_output" and cnn6.sed_key == "clipwise_output"
