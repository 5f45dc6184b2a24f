"""HEAR-benchmark API (Turian et al. 2022) for any PANNs model.

    from panns_jax import hear
    model = hear.load_model("ckpt/cnn14")                  # or an original .pth + model_name
    scene = hear.get_scene_embeddings(audio, model)        # (n_sounds, 2048)
    emb, ts = hear.get_timestamp_embeddings(audio, model)  # (n, n_timestamps, 2048), (n, n_ts) ms

``audio`` is float32 ``(n_sounds, n_samples)`` at ``model.sample_rate`` as numpy,
jax or torch arrays; results come back in the same array family.

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

from typing import Any, Optional, Tuple

import numpy as np

from panns_jax import inference


class PannsHearModel:
    """An :class:`inference.AudioTagger` with the attributes HEAR expects."""

    def __init__(self, tagger: inference.AudioTagger, timestamp_window_s: float = 1.0,
                 timestamp_hop_s: float = 0.05):
        self.tagger = tagger
        self.sample_rate = tagger.sample_rate
        self.timestamp_window = int(round(timestamp_window_s * self.sample_rate))
        self.timestamp_hop = max(1, int(round(timestamp_hop_s * self.sample_rate)))
        tagger.check_length(self.timestamp_window, f"timestamp window ({timestamp_window_s} s)")
        self.scene_embedding_size = self._embed(
            np.zeros((1, self.timestamp_window), np.float32)).shape[-1]
        self.timestamp_embedding_size = self.scene_embedding_size

    def _embed(self, waveforms: np.ndarray) -> np.ndarray:
        """``(B, L)`` -> ``(B, E)`` in batches of the tagger's batch size."""
        key = self.tagger.embedding_key
        parts = [inference.chunk_embeddings(
            self.tagger.predict_batch(waveforms[i:i + self.tagger.batch_size], [key])[key])
            for i in range(0, len(waveforms), self.tagger.batch_size)]
        return np.concatenate(parts).astype(np.float32)


def load_model(model_file_path: str = "", model_name: Optional[str] = None, *,
               timestamp_window_s: float = 1.0, timestamp_hop_s: float = 0.05,
               batch_size: int = 8) -> PannsHearModel:
    """A model from a panns_jax checkpoint directory or original ``.pth`` (needs ``model_name``).

    An empty path gives a randomly initialised ``model_name`` (default Cnn14), for tests.
    """
    tagger = inference.load_tagger(model_file_path or None, model_name, batch_size=batch_size)
    return PannsHearModel(tagger, timestamp_window_s, timestamp_hop_s)


def _to_numpy(audio: Any) -> Tuple[np.ndarray, str]:
    kind = type(audio).__module__.split(".")[0]
    if kind == "torch":
        array = audio.detach().cpu().numpy()
    else:
        array = np.asarray(audio)
    if array.ndim != 2:
        raise ValueError(f"audio must be (n_sounds, n_samples), got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"audio must be float in [-1, 1], got dtype {array.dtype}")
    if not np.all(np.isfinite(array)):
        raise ValueError("audio contains NaN or Inf samples")
    return array.astype(np.float32), kind


def _from_numpy(array: np.ndarray, kind: str) -> Any:
    if kind == "torch":
        import torch

        return torch.from_numpy(np.ascontiguousarray(array))
    if kind in ("jax", "jaxlib"):
        import jax.numpy as jnp

        return jnp.asarray(array)
    return array


def get_scene_embeddings(audio: Any, model: PannsHearModel) -> Any:
    """``(n_sounds, scene_embedding_size)``: the model's embedding of each whole sound."""
    array, kind = _to_numpy(audio)
    model.tagger.check_length(array.shape[1], "audio")
    return _from_numpy(model._embed(array), kind)


def get_timestamp_embeddings(audio: Any, model: PannsHearModel) -> Tuple[Any, Any]:
    """``(n_sounds, n_timestamps, E)`` embeddings and ``(n_sounds, n_timestamps)`` times in ms."""
    array, kind = _to_numpy(audio)
    n, length = array.shape
    window, hop = model.timestamp_window, model.timestamp_hop
    padded = np.pad(array, ((0, 0), (window // 2, window - window // 2)))
    num_timestamps = 1 + length // hop
    starts = np.arange(num_timestamps) * hop
    embeddings = np.empty((n, num_timestamps, model.timestamp_embedding_size), np.float32)
    for i in range(n):  # One sound's windows at a time bounds memory.
        windows = np.lib.stride_tricks.sliding_window_view(padded[i], window)[starts]
        embeddings[i] = model._embed(windows)
    timestamps = np.broadcast_to(starts * 1000.0 / model.sample_rate, (n, num_timestamps))
    return (_from_numpy(embeddings, kind),
            _from_numpy(np.ascontiguousarray(timestamps, np.float32), kind))
