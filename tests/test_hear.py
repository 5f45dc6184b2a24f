"""The HEAR API: scene and timestamp embeddings equal the model applied directly, in the
caller's array family, and bad rates, hops and sounds are refused with one clear error."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import serving_utils as S

from panns_jax import audio, hear, loader
from panns_jax.tagger import AudioTagger

WAV, SR = S.WAV, S.SR


def test_hear_api(cnn6_checkpoint, direct):
    import jax.numpy as jnp

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


# -------------------------------------------------------------------- refusals


def test_non_finite_embeddings_are_an_error(env):
    """A NaN in the embedding layer (fc1) is an error, not NaN embeddings."""
    module, _, meta = loader.load(env["ckpt"])
    variables = S.nan_variables(env, ("fc1", "bias", 0))
    tagger = AudioTagger(module, variables, meta)
    with pytest.raises(ValueError, match="non-finite embeddings"):
        hear.PannsHearModel(tagger, timestamp_window_s=0.5, input_sample_rate=SR)


def test_hear_rejects_bad_rates_hops_and_empty_sounds(env):
    tagger = AudioTagger.load(env["ckpt"])
    for kwargs, message in [
        (dict(input_sample_rate=7), "input_sample_rate must be"),
        (dict(timestamp_hop_s=0), "timestamp_hop_s must be a positive"),
        (dict(timestamp_hop_s=-1), "timestamp_hop_s must be a positive"),
        (dict(timestamp_hop_s=1e-4), "timestamp_hop_s 0.0001 s is below 0.001 s"),
        (dict(timestamp_window_s=float("nan")), "timestamp_window_s"),
    ]:
        with pytest.raises(ValueError, match=message):
            hear.PannsHearModel(tagger, **kwargs)
    model = hear.PannsHearModel(tagger, timestamp_window_s=0.5, input_sample_rate=SR)
    with pytest.raises(ValueError, match="0 samples per sound"):
        hear.get_scene_embeddings(np.zeros((2, 0), np.float32), model)
    with pytest.raises(ValueError, match="must be float"):
        hear.get_scene_embeddings(np.zeros((1, SR), np.int16), model)
