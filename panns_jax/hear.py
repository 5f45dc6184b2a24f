"""HEAR-benchmark API (Turian et al. 2022) for any PANNs model; passes ``hear-validator``.

    from panns_jax import hear
    model = hear.load_model("ckpt/cnn14")   # or "Cnn14" (pretrained), or a .pth + model_name
    scene = hear.get_scene_embeddings(audio, model)        # (n_sounds, 2048)
    emb, ts = hear.get_timestamp_embeddings(audio, model)  # (n, n_timestamps, 2048), (n, n_ts) ms

    hear-validator panns_jax.hear -m ckpt/cnn14            # the official check

``audio`` is float32 ``(n_sounds, n_samples)`` at ``model.sample_rate`` as numpy, jax,
torch or TensorFlow arrays; results come back in the same array family (torch: on the
input's device).

* Sample rate: HEAR accepts only 16, 22.05, 44.1 and 48 kHz. A model whose own rate is
  one of those reads it directly; the others (the paper's 32 kHz, 8 kHz) take 48 kHz
  input by default and resample it to their rate with soxr HQ, as ``load_audio`` does.
  ``input_sample_rate=`` picks another rate (e.g. the model's own, to skip resampling).
* Scene embedding: the model's ``embedding`` of each whole sound (unpadded, as the
  original inference). Decision-level models have none; theirs is the mean over
  time of ``segmentwise_embedding``.
* Timestamp embeddings: the scene embedding of a window of ``timestamp_window_s``
  (default 1 s) centred on each timestamp, every ``timestamp_hop_s`` (default
  50 ms, HEAR's upper bound). The sound is zero-padded by half a window at both
  ends, so timestamps are ``0, hop, 2 hop, ...`` up to the sound's length. The
  trunk's own frames (Cnn14: one per 320 ms) would be too coarse for a 50 ms hop.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Tuple

import numpy as np

from panns_jax import checks, tf_cpu
from panns_jax.audio import MAX_SAMPLE_RATE, resample  # (``audio`` is the HEAR API's argument)
from panns_jax.tagger import AudioTagger, chunk_embeddings

tf = tf_cpu.import_tensorflow()

# The only input rates the HEAR API allows (hear-validator's ACCEPTABLE_SAMPLE_RATE).
HEAR_SAMPLE_RATES = (16000, 22050, 44100, 48000)
MIN_INPUT_RATE = 8000  # input_sample_rate= may also be a model's own rate (8 kHz and up).
MIN_TIMESTAMP_HOP_S = 0.001


def default_input_rate(model_rate: int) -> int:
    """The model's own rate where HEAR allows it, else 48 kHz (32 kHz = 48 kHz x 2/3)."""
    return model_rate if model_rate in HEAR_SAMPLE_RATES else 48000


def _check_input_rate(rate: Any) -> None:
    """ValueError unless ``rate`` is an integer rate the resampler and the models take."""
    if not checks.is_integer(rate) or not MIN_INPUT_RATE <= rate <= MAX_SAMPLE_RATE:
        raise ValueError(
            f"input_sample_rate must be a positive integer rate in "
            f"{MIN_INPUT_RATE}..{MAX_SAMPLE_RATE} Hz (HEAR uses "
            f"{', '.join(map(str, HEAR_SAMPLE_RATES))}), got {rate!r}"
        )


class PannsHearModel(tf.Module):
    """An :class:`panns_jax.tagger.AudioTagger` with the attributes HEAR expects.

    A ``tf.Module`` because hear-validator and the HEAR evaluation kit accept only
    TensorFlow or PyTorch modules; the computation is the tagger's jitted JAX model.
    """

    def __init__(
        self,
        tagger: AudioTagger,
        timestamp_window_s: float = 1.0,
        timestamp_hop_s: float = 0.05,
        input_sample_rate: Optional[int] = None,
    ):
        super().__init__(name="panns_jax_hear_model")
        self.tagger = tagger
        self.model_sample_rate = tagger.sample_rate
        rate = (
            default_input_rate(tagger.sample_rate)
            if input_sample_rate is None
            else input_sample_rate
        )
        _check_input_rate(rate)
        self.sample_rate = int(rate)
        self.timestamp_window = tagger.window_samples(timestamp_window_s, "timestamp_window_s")
        hop_s = checks.hop_seconds(timestamp_hop_s, "timestamp_hop_s", MIN_TIMESTAMP_HOP_S)
        self.timestamp_hop = int(round(hop_s * self.model_sample_rate))
        tagger.check_length(self.timestamp_window, f"timestamp window ({timestamp_window_s} s)")
        self.scene_embedding_size = int(
            self._embed(np.zeros((1, self.timestamp_window), np.float32)).shape[-1]
        )
        self.timestamp_embedding_size = self.scene_embedding_size

    def to_model_rate(self, array: np.ndarray) -> np.ndarray:
        """``(n, L)`` at ``sample_rate`` -> at the model's rate (soxr HQ, librosa's default)."""
        return resample(array, self.sample_rate, self.model_sample_rate)

    def _embed(self, waveforms: np.ndarray) -> np.ndarray:
        """``(B, L)`` -> ``(B, E)`` in batches of the tagger's batch size."""
        key = self.tagger.embedding_key
        parts = [
            chunk_embeddings(
                self.tagger.predict_batch(waveforms[i : i + self.tagger.batch_size], [key])[key]
            )
            for i in range(0, len(waveforms), self.tagger.batch_size)
        ]
        embeddings = np.concatenate(parts).astype(np.float32)
        if not np.all(np.isfinite(embeddings)):
            raise ValueError(
                "the model produced non-finite embeddings (NaN/Inf); check the "
                "checkpoint and the audio's scale"
            )
        return embeddings


def load_model(
    model_file_path: str = "",
    model_name: Optional[str] = None,
    *,
    timestamp_window_s: float = 1.0,
    timestamp_hop_s: float = 0.05,
    input_sample_rate: Optional[int] = None,
    batch_size: int = 8,
    overrides: Optional[Mapping[str, Any]] = None,
) -> PannsHearModel:
    """A model from a panns_jax checkpoint directory of any kind, an original ``.pth``
    (needs ``model_name``, and ``overrides`` for one built with other arguments) or a
    pretrained model name such as ``"Cnn14"`` (``panns-jax download --list``), which is
    downloaded, verified and converted once, then read from the cache
    (:func:`panns_jax.loader.load`).

    An empty path gives a randomly initialised ``model_name`` (default Cnn14), for tests.
    """
    tagger = AudioTagger.load(
        model_file_path or None, model=model_name, overrides=overrides, batch_size=batch_size
    )
    return PannsHearModel(tagger, timestamp_window_s, timestamp_hop_s, input_sample_rate)


def _to_numpy(audio: Any) -> Tuple[np.ndarray, Any]:
    """The audio as numpy, and how to give results back in the caller's array family."""
    kind = type(audio).__module__.split(".")[0]
    if kind == "torch":
        array = audio.detach().cpu().numpy()
        kind = ("torch", audio.device)
    elif kind == "tensorflow":
        array = audio.numpy()
    else:
        array = np.asarray(audio)
    if array.ndim != 2:
        raise ValueError(f"audio must be (n_sounds, n_samples), got shape {array.shape}")
    if array.shape[1] == 0:
        raise ValueError(
            "audio has 0 samples per sound; pass (n_sounds, n_samples) with n_samples > 0"
        )
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"audio must be float in [-1, 1], got dtype {array.dtype}")
    if not np.all(np.isfinite(array)):
        raise ValueError("audio contains NaN or Inf samples")
    return array.astype(np.float32), kind


def _from_numpy(array: np.ndarray, kind: Any) -> Any:
    if isinstance(kind, tuple) and kind[0] == "torch":
        import torch

        return torch.from_numpy(np.ascontiguousarray(array)).to(kind[1])
    if kind == "tensorflow":
        return tf.convert_to_tensor(array)
    if kind in ("jax", "jaxlib"):
        import jax.numpy as jnp

        return jnp.asarray(array)
    return array


def get_scene_embeddings(audio: Any, model: PannsHearModel) -> Any:
    """``(n_sounds, scene_embedding_size)``: the model's embedding of each whole sound."""
    array, kind = _to_numpy(audio)
    array = model.to_model_rate(array)
    model.tagger.check_length(array.shape[1], "audio")
    return _from_numpy(model._embed(array), kind)


def get_timestamp_embeddings(audio: Any, model: PannsHearModel) -> Tuple[Any, Any]:
    """``(n_sounds, n_timestamps, E)`` embeddings and ``(n_sounds, n_timestamps)`` times in ms."""
    array, kind = _to_numpy(audio)
    array = model.to_model_rate(array)
    n, length = array.shape
    window, hop = model.timestamp_window, model.timestamp_hop
    padded = np.pad(array, ((0, 0), (window // 2, window - window // 2)))
    num_timestamps = 1 + length // hop
    starts = np.arange(num_timestamps) * hop
    embeddings = np.empty((n, num_timestamps, model.timestamp_embedding_size), np.float32)
    for i in range(n):  # One sound's windows at a time bounds memory.
        windows = np.lib.stride_tricks.sliding_window_view(padded[i], window)[starts]
        embeddings[i] = model._embed(windows)
    timestamps = np.broadcast_to(starts * 1000.0 / model.model_sample_rate, (n, num_timestamps))
    return (
        _from_numpy(embeddings, kind),
        _from_numpy(np.ascontiguousarray(timestamps, np.float32), kind),
    )
