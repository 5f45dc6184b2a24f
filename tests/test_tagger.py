"""AudioTagger from Python, with golden recipe weights and the tiny Cnn10.

Every output is compared with the model applied directly (``model.apply`` on the same
samples), so a test cannot pass on outputs that are merely well-formed.
"""

from __future__ import annotations

from unittest import mock

import numpy as np
import pytest
import serving_utils as S
import soundfile as sf

from panns_jax import audio, loader, tolerance
from panns_jax.kernels import onednn
from panns_jax.tagger import AudioTagger, aggregate_chunks

SR = S.SR


def test_chunks_equal_the_model_on_their_sample_ranges(cnn6, direct, long_wav, monkeypatch):
    full = audio.load_audio(long_wav, SR)
    assert len(full) == 180 * SR
    reference = [direct(full[s : s + 10 * SR]) for s in S.LONG_STARTS]

    def whole_file_read(*args, **kwargs):
        raise AssertionError("a long recording must be streamed, not decoded whole")

    monkeypatch.setattr(sf, "read", whole_file_read)
    result = cnn6.run_one(long_wav, ["clipwise_output", "embedding"], window_s=10.0, hop_s=40.0)
    assert result.starts.tolist() == S.LONG_STARTS and result.window == 10 * SR
    assert result.num_samples == 180 * SR
    for k, ref in enumerate(reference):
        np.testing.assert_allclose(
            result.outputs["clipwise_output"][k], ref["clipwise_output"][0], **S.TOL
        )
        np.testing.assert_allclose(
            result.outputs["embedding"][k], ref["embedding"][0], rtol=1e-5, atol=1e-5
        )
    # Aggregation over chunks as documented: max (default) and mean.
    clip = result.outputs["clipwise_output"]
    np.testing.assert_array_equal(aggregate_chunks(clip), clip.max(axis=0))
    np.testing.assert_array_equal(aggregate_chunks(clip, "mean"), clip.mean(axis=0))


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


def test_int16_is_scaled_and_complex_refused(env):
    tagger = AudioTagger.load(env["ckpt"])
    pcm = (env["noise"] * 32767).astype(np.int16)
    as_float = pcm.astype(np.float32) / 32768
    np.testing.assert_array_equal(tagger.embed(pcm), tagger.embed(as_float))
    # Negative control: unscaled int16 samples give another answer, and a warning says why.
    with pytest.warns(audio.AudioWarning, match="far above full scale"):
        unscaled = tagger.embed(pcm.astype(np.float32))
    assert not np.allclose(unscaled, tagger.embed(as_float))
    with pytest.raises(audio.AudioError, match="complex samples"):
        tagger.tag(env["noise"] + 1j * env["noise"])
    with pytest.raises(ValueError, match="batch size must be an integer"):
        AudioTagger.load(model="Cnn10", overrides=S.OVERRIDES, batch_size=-1)
    # Hops are refused, not clamped to one sample.
    with pytest.raises(ValueError, match="hop must be a positive"):
        tagger.tag(env["noise"], hop_s=-1)
    with pytest.raises(ValueError, match="top-k must be a positive"):
        tagger.tag(env["noise"], top_k=0)


def test_load_is_the_constructor_of_what_the_loader_returns(env, monkeypatch):
    """``AudioTagger.load(source, **loader keywords)`` is ``AudioTagger(*loader.load(...))``:
    the loader's labels, name and kind; a bad batch size is refused before loading."""
    tagger = AudioTagger.load(env["ckpt"], batch_size=3)
    module, variables, meta = loader.load(env["ckpt"])
    assert tagger.metadata == meta and tagger.labels == S.LABELS == list(meta.labels)
    assert tagger.model_name == "Cnn10" and tagger.pretrained and tagger.batch_size == 3
    same = AudioTagger(module, variables, meta, batch_size=3)
    np.testing.assert_array_equal(same.embed(env["noise"]), tagger.embed(env["noise"]))
    random = AudioTagger.load(model="Cnn10", overrides=S.OVERRIDES, seed=1)
    assert not random.pretrained and random.labels == [f"class {i}" for i in range(5)]
    # Negative control: other weights give other embeddings.
    assert not np.allclose(random.embed(env["noise"]), tagger.embed(env["noise"]))

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the batch size was checked")

    monkeypatch.setattr(loader, "load", no_model)
    with pytest.raises(ValueError, match="batch size must be an integer in 1..1024, got 0"):
        AudioTagger.load(env["ckpt"], batch_size=0)


def test_labels_must_fit_the_model(env):
    import dataclasses

    module, variables, meta = loader.load(env["ckpt"])
    wrong = dataclasses.replace(meta, labels=meta.labels[:4])
    with pytest.raises(ValueError, match="4 labels for a 5-class model"):
        AudioTagger(module, variables, wrong)


def test_non_finite_outputs_fail_a_recording_of_many_batches_once(env):
    """A recording of more chunks than a batch whose outputs are NaN fails with one error,
    and the recordings after it are still processed (each gets its own result). Five
    chunks in batches of two leave one that would share a batch with the next recording's
    chunk."""
    module, _, meta = loader.load(env["ckpt"])
    variables = S.nan_variables(env, ("fc_audioset", "bias", 2))
    tagger = AudioTagger(module, variables, meta, batch_size=2)
    long = np.tile(env["noise"], 5)  # Five 1 s chunks.
    results = list(tagger.run([long, env["noise"]], ["clipwise_output"], window_s=1.0))
    assert [r.source for r in results] == ["<waveform>", "<waveform>"]
    for result in results:
        assert result.error == (
            "<waveform>: the model produced non-finite clipwise_output (NaN/Inf); check the "
            "checkpoint and the input's scale"
        )
        assert result.outputs == {}
    # Negative control: the embedding does not pass through the NaN bias, so it is finite.
    results = list(tagger.run([long, env["noise"]], ["embedding"], window_s=1.0))
    assert [r.error for r in results] == [None, None]
    assert [len(r.starts) for r in results] == [5, 1]


def test_onednn_backend_tags_as_the_model_does(cnn6_checkpoint, direct, long_wav):
    """conv_backend='onednn': each chunk within the golden rule of XLA's model."""
    tagger = AudioTagger.load(cnn6_checkpoint, conv_backend="onednn")
    assert tagger.conv_backend == "onednn"
    with mock.patch.object(onednn, "conv", wraps=onednn.conv) as conv:
        keys = ["clipwise_output", "embedding"]
        result = tagger.run_one(long_wav, keys, window_s=10.0, hop_s=40.0)
    assert conv.call_count > 0
    full = audio.load_audio(long_wav, SR)
    for k, start in enumerate(S.LONG_STARTS):
        reference = direct(full[start : start + 10 * SR])
        for key in ("clipwise_output", "embedding"):
            problem, _, _ = tolerance.check(key, result.outputs[key][k], reference[key][0])
            assert problem == "", problem


def test_the_default_conv_backend_is_onednn_where_installed(cnn6_checkpoint, monkeypatch):
    """ "auto", the default, is the kernel in use where the [onednn] extra is installed (as
    here), and XLA's where $PANNS_JAX_CONV_BACKEND says so (as this suite sets it)."""
    assert AudioTagger.load(cnn6_checkpoint).conv_backend == "xla"
    monkeypatch.delenv("PANNS_JAX_CONV_BACKEND")
    assert AudioTagger.load(cnn6_checkpoint).conv_backend == "onednn"


def test_an_unknown_conv_backend_is_refused_before_loading(monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the backend was checked")

    monkeypatch.setattr(loader, "load", no_model)
    choices = "unknown conv backend 'mkl': choose one of auto, xla, onednn"
    with pytest.raises(ValueError, match=choices):
        AudioTagger.load("Cnn14", conv_backend="mkl")
