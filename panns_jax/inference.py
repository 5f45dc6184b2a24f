"""Audio tagging, sound event detection and embeddings, from the command line and Python.

    panns-jax tag  rec.wav                  # pretrained Cnn14, downloaded once (panns_jax.zoo)
    panns-jax tag  rec.wav more/*.flac --checkpoint DIR --top-k 5 --format json
    panns-jax sed  rec.wav --checkpoint DIR --threshold 0.3 --output events.csv --plot-dir plots
    panns-jax embed audio_dir/ --checkpoint DIR --per-chunk --output emb.npz

    tagger = AudioTagger.from_pretrained("Cnn14")  # or .from_checkpoint("ckpt/cnn14")
    tagger.tag("rec.wav", top_k=5); tagger.detect("rec.wav"); tagger.embed("rec.wav")

A recording no longer than the chunk window (default 10 s) is processed whole,
without padding or cropping, as the original inference does (golden/TRAINING.md
§11). Longer recordings are streamed from disk and cut into windows of
``window`` seconds every ``hop`` seconds (default: ``hop = window``), the last one
ending at the recording's end; each window is exactly the model applied to that
sample range. Tags of a long recording aggregate the chunks' ``clipwise_output``
with ``max`` (default: a sound present in any chunk is present in the recording)
or ``mean``. Chunks of equal length are batched, across files too.

Sound event detection works with every model: decision-level models
(Cnn14_DecisionLevel*) give ``framewise_output`` natively (100 frames/s, stitched
across chunks); clip-level models are slid over the recording in short windows
(default 1 s every 0.1 s), each window's ``clipwise_output`` becoming the frame at
its centre.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import functools
import glob
import json
import math
import os
import sys
import uuid
import warnings
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from panns_jax import audio, checkpoints, models
from panns_jax import frontend as fe

Source = Union[str, np.ndarray]

DEFAULT_WINDOW_S = 10.0
DEFAULT_SED_WINDOW_S = 1.0
DEFAULT_SED_HOP_S = 0.1
MAX_BATCH_SIZE = 1024  # Chunks held before a flush: 1024 x 10 s at 32 kHz is 1.3 GB.
MIN_HOP_S = 0.01  # One 10 ms frame: finer hops multiply the work with no new information.


@dataclasses.dataclass
class ChunkedOutput:
    """Model outputs for the chunks of one recording.

    Attributes:
      source: the file path, or ``'<waveform>'``.
      starts: start sample of each chunk, ``(n,)``.
      window: samples per chunk (the whole recording when it fits one window).
      num_samples: length of the recording at the model's sample rate.
      outputs: output name -> array ``(n, ...)``, row i for chunk i.
      error: why the recording failed (outputs are then empty).
      warnings: why its results may mislead (truncated, silent or far too loud).
    """

    source: str
    starts: np.ndarray
    window: int
    num_samples: int
    outputs: Dict[str, np.ndarray]
    error: Optional[str] = None
    warnings: List[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class SedResult:
    """Framewise probabilities of one recording and the events found in them.

    ``framewise[i]`` holds the class probabilities of the frame centred at
    ``times[i]`` seconds; every frame spans ``frame_hop`` seconds.
    Events are ``{onset, offset, label, index, score}``, score = peak probability.
    """

    source: str
    times: np.ndarray
    framewise: np.ndarray
    frame_hop: float
    duration: float
    events: List[Dict[str, Any]]


class AudioTagger:
    """A PANNs model with its variables, ready for files and waveforms.

    Without ``variables`` the model is randomly initialised (useful only to try
    the pipeline: its labels are meaningless).

    Attributes:
      batch_size: chunks of equal length run together up to this many; smaller
        batches are padded with silent rows to a power of two to bound recompiles.
    """

    def __init__(
        self,
        model_name: str = "Cnn14",
        variables: Optional[Dict[str, Any]] = None,
        seed: int = 0,
        *,
        overrides: Optional[Dict[str, Any]] = None,
        batch_size: int = 8,
        labels: Optional[Sequence[str]] = None,
    ):
        self.model_name = model_name
        self.model = models.get(model_name, **(overrides or {}))
        self.sample_rate = models.sample_rate(self.model)
        self.frame_hop_samples = self.model.frontend.hop_size
        self.pretrained = variables is not None
        check_batch_size(batch_size)
        self.variables = variables or models.init(
            self.model, jax.random.key(seed), self.sample_rate
        )
        self.batch_size = batch_size
        num_classes = getattr(self.model, "num_classes", 527)
        if labels is not None and len(labels) != num_classes:
            raise ValueError(f"{len(labels)} labels for a {num_classes}-class model")
        if labels is None:  # AudioSet's names, or placeholders for another class count.
            labels = audio.audioset_labels()
            if num_classes != len(labels):
                labels = [f"class {i}" for i in range(num_classes)]
        self.labels = list(labels)
        self._forward = jax.jit(self._apply, static_argnames="keys")
        self._forward_all = jax.jit(self.model.apply)
        self._fit_cache: Dict[int, bool] = {}

    @classmethod
    def from_checkpoint(
        cls, checkpoint: str, model_name: Optional[str] = None, **kwargs: Any
    ) -> "AudioTagger":
        """A tagger from a panns_jax checkpoint directory, an original ``.pth`` or a zoo name."""
        return load_tagger(checkpoint, model_name, **kwargs)

    @classmethod
    def from_pretrained(cls, name: str = "Cnn14", **kwargs: Any) -> "AudioTagger":
        """A tagger with released AudioSet weights (:mod:`panns_jax.zoo`): ``Cnn14``,
        ``Cnn14_DecisionLevelMax``, ``MobileNetV1``, ... Downloaded, verified and
        converted on first use, then loaded from the cache."""
        from panns_jax import zoo

        loaded = zoo.load(name)
        return cls(
            loaded.model,
            variables=loaded.variables,
            overrides=loaded.overrides,
            labels=loaded.labels,
            **kwargs,
        )

    # ------------------------------------------------------------------ model
    def _apply(
        self, variables: Dict[str, Any], x: jax.Array, keys: Tuple[str, ...]
    ) -> Dict[str, jax.Array]:
        out = self.model.apply(variables, x)
        return {k: out[k] for k in keys}

    @functools.cached_property
    def output_keys(self) -> Tuple[str, ...]:
        shapes = jax.eval_shape(
            self.model.apply,
            self.variables,
            jax.ShapeDtypeStruct((1, self.sample_rate), jnp.float32),
        )
        return tuple(shapes)

    @property
    def is_decision_level(self) -> bool:
        """Whether the model has a native ``framewise_output`` (Cnn14_DecisionLevel*)."""
        return "framewise_output" in self.output_keys

    @property
    def embedding_key(self) -> str:
        return "embedding" if "embedding" in self.output_keys else "segmentwise_embedding"

    def _fits(self, num_samples: int) -> bool:
        """Whether the model takes ``num_samples`` (shape-checked by tracing, cached)."""
        if num_samples not in self._fit_cache:
            try:
                jax.eval_shape(
                    self.model.apply,
                    self.variables,
                    jax.ShapeDtypeStruct((1, num_samples), jnp.float32),
                )
                self._fit_cache[num_samples] = True
            except ValueError:
                self._fit_cache[num_samples] = False
        return self._fit_cache[num_samples]

    @functools.cached_property
    def min_samples(self) -> int:
        """Shortest input the model accepts (Cnn14: 9920 samples at 32 kHz), by bisection."""
        lo, hi = 1, 1 << 22
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if self._fits(mid) else (mid + 1, hi)
        return lo

    def check_length(self, num_samples: int, name: str = "<waveform>") -> None:
        """Raise an :class:`audio.AudioError` when the model cannot take ``num_samples``."""
        if self._fits(num_samples):
            return
        need = self.min_samples
        sr = self.sample_rate
        if num_samples >= need:  # Wavegram_Logmel: some lengths fail above the minimum.
            raise audio.AudioError(
                f"{name}: {self.model_name} cannot process inputs of "
                f"{num_samples} samples ({num_samples / sr:.3f} s)"
            )
        raise audio.AudioError(
            f"{name}: {num_samples} samples ({num_samples / sr:.3f} s at {sr} Hz) is too short "
            f"for {self.model_name}, which needs at least {need} samples ({need / sr:.3f} s)"
        )

    def predict(self, waveform: np.ndarray) -> Dict[str, np.ndarray]:
        """All outputs of the model for one whole mono waveform at the model's rate."""
        x = audio.as_waveform(waveform)
        self.check_length(x.shape[-1])
        return jax.device_get(dict(self._forward_all(self.variables, jnp.asarray(x[None]))))

    def predict_batch(self, waveforms: np.ndarray, keys: Sequence[str]) -> Dict[str, np.ndarray]:
        """Outputs ``keys`` for a batch ``(B, L)``, jitted; padded to a power-of-two batch."""
        x = np.asarray(waveforms, np.float32)
        n = len(x)
        padded = 1 << max(n - 1, 0).bit_length()
        if padded > n:  # Silent rows: eval-mode rows are independent, so this is harmless.
            x = np.concatenate([x, np.zeros((padded - n, x.shape[1]), np.float32)])
        out = self._forward(self.variables, jnp.asarray(x), tuple(keys))
        return {k: np.asarray(v)[:n] for k, v in jax.device_get(out).items()}

    # ---------------------------------------------------------------- chunks
    def run(
        self,
        sources: Sequence[Source],
        keys: Sequence[str],
        *,
        window_s: Optional[float] = DEFAULT_WINDOW_S,
        hop_s: Optional[float] = None,
        align: int = 1,
        progress: bool = False,
    ) -> Iterator[ChunkedOutput]:
        """Outputs ``keys`` for the chunks of every source, yielded in input order.

        Chunks of equal length are batched across sources; a source that fails
        (unreadable, too short, NaN samples) yields a result with ``error`` set and
        never stops the others. ``window_s=None`` processes every source whole.
        """
        sr = self.sample_rate
        window = (1 << 62) if window_s is None else self.window_samples(window_s)
        hop = window if hop_s is None else self.hop_samples(hop_s)
        keys = tuple(keys)
        states: Dict[int, _SourceState] = {}
        groups: Dict[int, List[Tuple[int, int, np.ndarray]]] = {}
        next_index = 0

        def flush(length: int) -> None:
            items = groups.pop(length, [])
            for begin in range(0, len(items), self.batch_size):
                batch = items[begin : begin + self.batch_size]
                try:
                    out = self.predict_batch(np.stack([x for _, _, x in batch]), keys)
                except ValueError as err:  # The model rejects this length.
                    for i, _, _ in batch:
                        states[i].fail(f"{states[i].name}: {err}")
                    continue
                for row, (i, c, _) in enumerate(batch):
                    values = {k: v[row] for k, v in out.items()}
                    bad = [k for k, v in values.items() if not np.all(np.isfinite(v))]
                    if bad:  # Damaged weights or extreme input: never a NaN result.
                        states[i].fail(
                            f"{states[i].name}: the model produced non-finite "
                            f"{', '.join(bad)} (NaN/Inf); check the checkpoint "
                            "and the input's scale"
                        )
                    states[i].outputs[c] = values

        def finished() -> Iterator[ChunkedOutput]:
            nonlocal next_index
            while next_index in states and states[next_index].complete:
                yield states.pop(next_index).result(window, keys)
                next_index += 1

        bar = _progress(len(sources), progress)
        for index, source in enumerate(sources):
            name = source if isinstance(source, str) else "<waveform>"
            state = states[index] = _SourceState(name)
            try:
                for chunk in audio.iter_chunks(source, sr, window, hop, align=align):
                    self.check_length(len(chunk.samples), name)
                    state.starts.append(chunk.start)
                    if chunk.last:
                        state.num_samples = chunk.total
                        state.warnings = list(chunk.warnings)
                        level = audio.level_warning(name, chunk.peak)
                        if level:
                            state.warnings.append(level)
                    group = groups.setdefault(len(chunk.samples), [])
                    group.append((index, len(state.starts) - 1, chunk.samples))
                    if len(group) >= self.batch_size:
                        flush(len(chunk.samples))
                    elif sum(map(len, groups.values())) > 4 * self.batch_size:
                        for length in list(groups):  # Bound memory: many distinct lengths.
                            flush(length)
                state.done = True
            except audio.AudioError as err:
                state.fail(str(err))
                for length in list(groups):
                    groups[length] = [item for item in groups[length] if item[0] != index]
            if bar is not None:
                bar.update(1)
            yield from finished()
        for length in list(groups):
            flush(length)
        if bar is not None:
            bar.close()
        yield from finished()

    def run_one(self, source: Source, keys: Sequence[str], **kwargs: Any) -> ChunkedOutput:
        """:meth:`run` for one source; raises :class:`audio.AudioError` when it fails."""
        (result,) = self.run([source], keys, **kwargs)
        if result.error:
            raise audio.AudioError(result.error)
        for message in result.warnings:
            warnings.warn(message, audio.AudioWarning, stacklevel=3)
        return result

    # ------------------------------------------------------------ validation
    def window_samples(self, window_s: float, what: str = "window") -> int:
        """Samples of a chunk window of ``window_s`` seconds; ValueError unless the model
        can take that length."""
        seconds = _positive_seconds(window_s, what)
        samples = int(round(seconds * self.sample_rate))
        if samples < 1 or not self._fits(samples):
            need = self.min_samples
            raise ValueError(
                f"{what} {window_s:g} s ({samples} samples) is too short for "
                f"{self.model_name}, which needs at least {need / self.sample_rate:g}"
                f" s ({need} samples)"
            )
        return samples

    def hop_samples(self, hop_s: float, what: str = "hop") -> int:
        """Samples between chunk starts; at least one 10 ms frame (no one-sample hops)."""
        seconds = _positive_seconds(hop_s, what)
        if seconds < MIN_HOP_S:
            raise ValueError(
                f"{what} {hop_s:g} s is below {MIN_HOP_S:g} s (one frame); finer "
                "hops multiply the work without new information"
            )
        return int(round(seconds * self.sample_rate))

    # ------------------------------------------------------------------ tasks
    def clipwise(
        self,
        source: Source,
        *,
        window_s: Optional[float] = DEFAULT_WINDOW_S,
        hop_s: Optional[float] = None,
        aggregate: str = "max",
    ) -> np.ndarray:
        """Class probabilities of a recording: chunk ``clipwise_output`` aggregated."""
        result = self.run_one(source, ["clipwise_output"], window_s=window_s, hop_s=hop_s)
        return aggregate_chunks(result.outputs["clipwise_output"], aggregate)

    def tag(
        self,
        source: Source,
        top_k: int = 10,
        *,
        window_s: Optional[float] = DEFAULT_WINDOW_S,
        hop_s: Optional[float] = None,
        aggregate: str = "max",
    ) -> List[Dict[str, Any]]:
        """Top-k labels ``[{index, label, probability}]`` of a file path or waveform."""
        return self.top_labels(
            self.clipwise(source, window_s=window_s, hop_s=hop_s, aggregate=aggregate), top_k
        )

    def top_labels(self, probabilities: np.ndarray, top_k: int) -> List[Dict[str, Any]]:
        check_top_k(top_k)
        order = np.argsort(-probabilities, kind="stable")[:top_k]
        return [
            {"index": int(i), "label": self.labels[i], "probability": float(probabilities[i])}
            for i in order
        ]

    def embed(
        self,
        source: Source,
        *,
        window_s: Optional[float] = DEFAULT_WINDOW_S,
        hop_s: Optional[float] = None,
        per_chunk: bool = False,
    ) -> np.ndarray:
        """The model's embedding: ``(E,)`` (mean over chunks) or ``(n_chunks, E)``.

        Decision-level models have no clip embedding: theirs is the mean over time of
        ``segmentwise_embedding``.
        """
        result = self.run_one(source, [self.embedding_key], window_s=window_s, hop_s=hop_s)
        chunks = chunk_embeddings(result.outputs[self.embedding_key])
        return chunks if per_chunk else chunks.mean(axis=0)

    def sed_settings(
        self, window_s: Optional[float] = None, hop_s: Optional[float] = None
    ) -> Dict[str, Any]:
        """Chunking used by :meth:`detect` (see the module docstring)."""
        if window_s is not None:
            self.window_samples(window_s)
        if hop_s is not None:
            self.hop_samples(hop_s)
        if self.is_decision_level:
            return dict(
                window_s=window_s or DEFAULT_WINDOW_S, hop_s=hop_s, align=self.frame_hop_samples
            )
        return dict(
            window_s=window_s or DEFAULT_SED_WINDOW_S, hop_s=hop_s or DEFAULT_SED_HOP_S, align=1
        )

    def detect(
        self,
        source: Source,
        threshold: float = 0.3,
        *,
        window_s: Optional[float] = None,
        hop_s: Optional[float] = None,
    ) -> SedResult:
        """Framewise probabilities and thresholded events of a recording."""
        check_threshold(threshold)
        settings = self.sed_settings(window_s, hop_s)
        key = "framewise_output" if self.is_decision_level else "clipwise_output"
        return self.sed_result(self.run_one(source, [key], **settings), threshold)

    def sed_result(self, result: ChunkedOutput, threshold: float) -> SedResult:
        """Stitch the chunk outputs of :meth:`run` (with :meth:`sed_settings`) into frames."""
        sr = self.sample_rate
        if "framewise_output" in result.outputs:
            frame_hop = self.frame_hop_samples / sr
            framewise = stitch_framewise(
                result.outputs["framewise_output"],
                result.starts,
                result.window,
                result.num_samples,
                self.frame_hop_samples,
            )
            times = np.arange(len(framewise)) * frame_hop
        else:
            framewise = result.outputs["clipwise_output"]
            times = (result.starts + min(result.window, result.num_samples) / 2) / sr
            frame_hop = (
                float(np.median(np.diff(result.starts))) / sr
                if len(times) > 1
                else min(result.window, result.num_samples) / sr
            )
        duration = result.num_samples / sr
        events = detect_events(framewise, times, frame_hop, threshold, self.labels, duration)
        return SedResult(result.source, times, framewise, frame_hop, duration, events)


@dataclasses.dataclass
class _SourceState:
    name: str
    starts: List[int] = dataclasses.field(default_factory=list)
    outputs: Dict[int, Dict[str, np.ndarray]] = dataclasses.field(default_factory=dict)
    num_samples: int = 0
    done: bool = False
    error: Optional[str] = None
    warnings: List[str] = dataclasses.field(default_factory=list)

    def fail(self, message: str) -> None:
        self.error = self.error or message

    @property
    def complete(self) -> bool:
        return self.error is not None or (self.done and len(self.outputs) == len(self.starts))

    def result(self, window: int, keys: Sequence[str]) -> ChunkedOutput:
        if self.error:
            return ChunkedOutput(self.name, np.zeros(0, np.int64), window, 0, {}, self.error)
        outputs = {k: np.stack([self.outputs[c][k] for c in range(len(self.starts))]) for k in keys}
        return ChunkedOutput(
            self.name,
            np.asarray(self.starts, np.int64),
            min(window, self.num_samples),
            self.num_samples,
            outputs,
            warnings=self.warnings,
        )


def _positive_seconds(value: float, what: str) -> float:
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number of seconds, got {value!r}") from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"{what} must be a positive, finite number of seconds, got {value!r}")
    return seconds


def check_batch_size(batch_size: int) -> None:
    if (
        isinstance(batch_size, bool)
        or not isinstance(batch_size, (int, np.integer))
        or not 1 <= batch_size <= MAX_BATCH_SIZE
    ):
        raise ValueError(
            f"batch size must be an integer in 1..{MAX_BATCH_SIZE}, got {batch_size!r}"
        )


def check_top_k(top_k: int) -> None:
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
        raise ValueError(f"top-k must be a positive integer, got {top_k!r}")


def check_threshold(threshold: float) -> None:
    if not (isinstance(threshold, (int, float, np.floating)) and 0.0 <= threshold <= 1.0):
        raise ValueError(f"threshold must be a probability in [0, 1], got {threshold!r}")


def _progress(total: int, enabled: bool):
    if not enabled or total < 2:
        return None
    from tqdm import tqdm

    return tqdm(total=total, file=sys.stderr, unit="file", dynamic_ncols=True)


# ---------------------------------------------------------------------------
# Pure helpers: aggregation, stitching, events.
# ---------------------------------------------------------------------------


def aggregate_chunks(clipwise: np.ndarray, how: str = "max") -> np.ndarray:
    """Recording probabilities from chunk probabilities ``(n, C)``: max or mean over chunks."""
    if how == "max":
        return clipwise.max(axis=0)
    if how == "mean":
        return clipwise.mean(axis=0)
    raise ValueError(f"unknown aggregation {how!r}; expected 'max' or 'mean'")


def chunk_embeddings(embeddings: np.ndarray) -> np.ndarray:
    """``(n, E)``; segment-wise ``(n, t, E)`` embeddings are averaged over time."""
    return embeddings.mean(axis=1) if embeddings.ndim == 3 else embeddings


def stitch_framewise(
    framewise: np.ndarray, starts: np.ndarray, window: int, num_samples: int, frame_hop: int
) -> np.ndarray:
    """Framewise outputs ``(n, T_w, C)`` of chunks -> ``(1 + num_samples // frame_hop, C)``.

    Chunk starts are multiples of ``frame_hop``, so chunk frame j is recording frame
    ``start / frame_hop + j``. Where chunks overlap, each frame comes from the chunk
    whose centre is nearest; frames past the last chunk repeat its last frame, as
    the original pads its framewise output.
    """
    total = 1 + num_samples // frame_hop
    out = np.empty((total, framewise.shape[-1]), framewise.dtype)
    first = np.asarray(starts) // frame_hop
    centre = first + (window / frame_hop) / 2
    bounds = np.concatenate([[0], np.ceil((centre[:-1] + centre[1:]) / 2).astype(int), [total]])
    for k in range(len(first)):
        lo, hi = bounds[k], min(bounds[k + 1], first[k] + framewise.shape[1])
        out[lo:hi] = framewise[k, lo - first[k] : hi - first[k]]
        if hi < bounds[k + 1]:
            out[hi : bounds[k + 1]] = framewise[k, -1]
    return out


def detect_events(
    framewise: np.ndarray,
    times: np.ndarray,
    frame_hop: float,
    threshold: float,
    labels: Sequence[str],
    duration: Optional[float] = None,
) -> List[Dict[str, Any]]:
    """Runs of frames with probability >= ``threshold``, per class, sorted by onset.

    Frame i covers ``times[i] +- frame_hop / 2`` (clipped to the recording).
    """
    active = framewise >= threshold
    padded = np.pad(active, ((1, 1), (0, 0)))
    change = np.diff(padded.astype(np.int8), axis=0)
    events = []
    for c in np.flatnonzero(active.any(axis=0)):
        onsets = np.flatnonzero(change[:, c] == 1)
        offsets = np.flatnonzero(change[:, c] == -1)  # Exclusive frame index.
        for on, off in zip(onsets, offsets):
            onset = max(0.0, float(times[on]) - frame_hop / 2)
            offset = float(times[off - 1]) + frame_hop / 2
            if duration is not None:
                offset = min(offset, duration)
            events.append(
                {
                    "onset": round(onset, 4),
                    "offset": round(offset, 4),
                    "label": labels[c],
                    "index": int(c),
                    "score": float(framewise[on:off, c].max()),
                }
            )
    events.sort(key=lambda e: (e["onset"], -e["score"]))
    return events


def plot_sed(
    result: SedResult,
    path: str,
    labels: Sequence[str],
    *,
    top_k: int = 10,
    logmel: Optional[np.ndarray] = None,
) -> str:
    """The paper's SED figure: log-mel on top, the top-k classes' probabilities below.

    Classes are ranked by their maximum over time. Long recordings are drawn at
    most ~4000 columns wide (max over groups of frames, mean for the log-mel).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    top = np.argsort(-result.framewise.max(axis=0), kind="stable")[:top_k]
    activity = _pool_columns(result.framewise[:, top], np.max)
    fig, axes = plt.subplots(2, 1, figsize=(10, 6), sharex=False)
    if logmel is not None:
        image = _pool_columns(logmel, np.mean)
        axes[0].imshow(
            image.T,
            origin="lower",
            aspect="auto",
            cmap="jet",
            extent=(0, result.duration, 0, logmel.shape[1]),
        )
        axes[0].set_ylabel("mel bins")
    axes[0].set_title(f"log-mel spectrogram: {os.path.basename(result.source)}")
    axes[0].set_xlim(0, result.duration)
    axes[1].imshow(
        activity.T,
        origin="upper",
        aspect="auto",
        cmap="jet",
        vmin=0,
        vmax=1,
        extent=(0, result.duration, len(top), 0),
        interpolation="nearest",
    )
    axes[1].set_yticks(np.arange(len(top)) + 0.5)
    axes[1].set_yticklabels([labels[i] for i in top])
    axes[1].set_xlabel("seconds")
    axes[1].set_title("framewise probabilities of the top classes")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)
    return path


def _pool_columns(x: np.ndarray, reduce, max_columns: int = 4000) -> np.ndarray:
    factor = -(-len(x) // max_columns)
    if factor <= 1:
        return x
    pad = (-len(x)) % factor
    x = np.concatenate([x, np.repeat(x[-1:], pad, axis=0)])
    return reduce(x.reshape(-1, factor, *x.shape[1:]), axis=1)


def streamed_logmel(tagger: AudioTagger, source: Source, block_s: float = 60.0) -> np.ndarray:
    """Log-mel of a recording for plots, computed block by block (bounded memory)."""
    config = tagger.model.frontend
    block = int(block_s * tagger.sample_rate)
    hop = config.hop_size
    parts, frames_so_far = [], 0
    for chunk in audio.iter_chunks(source, tagger.sample_rate, block, block, align=hop):
        x = chunk.samples
        if len(x) < config.window_size:
            x = np.pad(x, (0, config.window_size - len(x)))
        frames = np.asarray(_jit_logmel(x[None], config))[0]
        part = frames[max(frames_so_far - chunk.start // hop, 0) :]
        parts.append(part)
        frames_so_far += len(part)
    return np.concatenate(parts)


# One compiled front end per (config, block length) for every file plotted, not one per call.
_jit_logmel = jax.jit(lambda x, config: fe.logmel(x, config), static_argnums=1)


# ---------------------------------------------------------------------------
# Loading and the command line.
# ---------------------------------------------------------------------------


def load_tagger(
    checkpoint: Optional[str],
    model_name: Optional[str],
    *,
    model_overrides: Optional[Dict[str, Any]] = None,
    **kwargs: Any,
) -> AudioTagger:
    """A tagger from a panns_jax checkpoint directory, an original ``.pth``, or none (random).

    ``model_overrides`` are architecture arguments for a ``.pth`` or a random model (a
    checkpoint directory records its own), e.g. the widths of a narrow Cnn10 that was
    exported with ``panns-jax-convert to-torch``.
    """
    if checkpoint is None:
        return AudioTagger(model_name or "Cnn14", overrides=model_overrides, **kwargs)
    from panns_jax import convert

    if model_overrides and checkpoints.is_model_checkpoint(checkpoint):
        raise ValueError(
            f"{checkpoint}: a panns_jax checkpoint directory records its own "
            "overrides; --overrides applies to .pth files only"
        )
    loaded = convert.load_model_checkpoint(checkpoint, model_name, overrides=model_overrides)
    return AudioTagger(
        loaded.model,
        variables=loaded.variables,
        overrides=loaded.overrides,
        labels=loaded.labels,
        **kwargs,
    )


def expand_inputs(items: Iterable[str]) -> Tuple[List[str], List[str]]:
    """Files named by paths, directories (searched recursively) and globs; plus errors."""
    files, errors = [], []
    for item in items:
        if os.path.isdir(item):
            found = sorted(
                os.path.join(root, f)
                for root, _, names in os.walk(item)
                for f in names
                if f.lower().endswith(audio.AUDIO_EXTENSIONS)
            )
            if not found:
                errors.append(
                    f"{item}: directory holds no audio files "
                    f"({', '.join(audio.AUDIO_EXTENSIONS[:4])}, ...)"
                )
            files += found
        elif glob.has_magic(item) and not os.path.exists(item):
            found = sorted(p for p in glob.glob(item, recursive=True) if os.path.isfile(p))
            if not found:
                errors.append(f"{item}: no files match")
            files += found
        else:
            files.append(item)  # Missing files are reported when read.
    return files, errors


def _add_common(parser: argparse.ArgumentParser, window_help: str, hop_help: str) -> None:
    parser.add_argument(
        "files", nargs="+", help="audio files, directories (searched recursively) or globs"
    )
    parser.add_argument(
        "--checkpoint",
        default=None,
        help="panns_jax checkpoint directory, original PANNs .pth, or a "
        "pretrained model name (`panns-jax download --list`); default: "
        "the pretrained --model, else Cnn14 (sed: Cnn14_DecisionLevelMax)",
    )
    parser.add_argument(
        "--random-weights",
        action="store_true",
        help="a randomly initialised --model instead of pretrained weights "
        "(its outputs are meaningless: to try the pipeline only)",
    )
    parser.add_argument(
        "--model", default=None, help="architecture name (default: the checkpoint's, else Cnn14)"
    )
    parser.add_argument(
        "--overrides",
        type=checkpoints.parse_overrides,
        default=None,
        help="JSON object of architecture arguments for a .pth or a random "
        "model, e.g. '{\"widths\": [16, 32, 64, 128]}'",
    )
    parser.add_argument("--window", type=float, default=None, help=window_help)
    parser.add_argument("--hop", type=float, default=None, help=hop_help)
    parser.add_argument(
        "--batch-size", type=int, default=8, help="chunks of equal length run together (default 8)"
    )
    parser.add_argument(
        "--output", default=None, help="output file (see the format options), written when complete"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="panns-jax", description="PANNs audio tagging, SED and embeddings in JAX"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    chunk_help = (
        "chunk length in seconds (default 10); a recording no longer than this is "
        "processed whole, unpadded"
    )
    hop_help = "seconds between chunk starts (default: the window, i.e. no overlap)"

    tag = sub.add_parser("tag", help="top-k AudioSet labels of audio files")
    _add_common(tag, chunk_help, hop_help)
    tag.add_argument("--top-k", type=int, default=10)
    tag.add_argument(
        "--aggregate",
        choices=("max", "mean"),
        default="max",
        help="how chunk probabilities of a long recording combine (default max)",
    )
    tag.add_argument("--format", choices=("table", "json", "csv"), default="table")

    sed = sub.add_parser("sed", help="framewise probabilities, event segments (CSV) and plots")
    _add_common(
        sed,
        "decision-level models: chunk seconds (default 10); clip models: "
        "sliding-window seconds (default 1)",
        "decision-level models: chunk hop (default: the window); clip models: "
        "sliding-window hop (default 0.1)",
    )
    sed.add_argument(
        "--threshold",
        type=float,
        default=0.3,
        help="probability above which a frame is part of an event (default 0.3)",
    )
    sed.add_argument("--top-k", type=int, default=10, help="classes drawn in the plot")
    sed.add_argument("--plot-dir", default=None, help="write <name>.png SED figures here")
    sed.add_argument(
        "--framewise-dir", default=None, help="write <name>.npz (times, framewise, labels) here"
    )

    emb = sub.add_parser("embed", help="embeddings per clip or per chunk to .npy/.npz")
    _add_common(emb, chunk_help, hop_help)
    emb.add_argument(
        "--per-chunk",
        action="store_true",
        help="one embedding per chunk (default: the mean over chunks)",
    )
    emb.set_defaults(output="embeddings.npz")
    # Listed for --help; `main` hands their arguments to their own parsers.
    sub.add_parser("export", help="export to ONNX / SavedModel / LiteRT (panns-jax export -h)")
    sub.add_parser("stream", help="streaming tagging of a file or microphone (panns-jax stream -h)")
    sub.add_parser(
        "download", help="download, verify and convert released checkpoints (panns-jax download -h)"
    )
    return parser


# Pretrained weights used when neither --checkpoint nor --model is given.
PRETRAINED_DEFAULT = {"tag": "Cnn14", "sed": "Cnn14_DecisionLevelMax", "embed": "Cnn14"}


def resolve_weights(args: argparse.Namespace) -> Tuple[Optional[str], Optional[str]]:
    """``(checkpoint, model)`` for :func:`load_tagger`: pretrained unless told otherwise.

    ``--checkpoint`` as given; else the pretrained ``--model`` (or the command's default)
    from the zoo; random weights (checkpoint None) only with ``--random-weights``.
    """
    if args.random_weights:
        if args.checkpoint is not None:
            raise ValueError("--random-weights and --checkpoint exclude each other")
        return None, args.model
    if args.checkpoint is not None:
        return args.checkpoint, args.model
    from panns_jax import zoo

    name = args.model or PRETRAINED_DEFAULT[args.command]
    if not zoo.is_zoo_name(name):
        raise ValueError(
            f"no pretrained {name} in the zoo (`panns-jax download --list`); "
            "pass --checkpoint DIR_OR_PTH, or --random-weights to try the "
            "pipeline with random weights"
        )
    if getattr(args, "overrides", None):
        raise ValueError(
            "--overrides applies to a .pth or --random-weights, not to a pretrained model"
        )
    return name, None


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``panns-jax tag | sed | embed | export | stream | download``.

    Exit status 1 when any file failed, 2 on bad setup.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "export":  # Deployment commands have their own parsers.
        from panns_jax import export

        return export.main_export(argv[1:])
    if argv and argv[0] == "stream":
        from panns_jax import streaming

        return streaming.main_stream(argv[1:])
    if argv and argv[0] == "download":
        from panns_jax import zoo

        return zoo.main_download(argv[1:])
    args = build_parser().parse_args(argv)
    files, input_errors = expand_inputs(args.files)
    try:  # Everything is checked before a model is built or a sample computed.
        check_arguments(args)
        check_outputs(args, files)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for message in input_errors:
        print(f"error: {message}", file=sys.stderr)
    try:
        checkpoint, model_name = resolve_weights(args)
        tagger = load_tagger(
            checkpoint, model_name, model_overrides=args.overrides, batch_size=args.batch_size
        )
        if args.window is not None:  # The model must take a window (tag / embed chunks).
            tagger.window_samples(args.window, "--window")
        if args.hop is not None:
            tagger.hop_samples(args.hop, "--hop")
    except (ValueError, FileNotFoundError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not tagger.pretrained:
        print(
            f"warning: --random-weights: {tagger.model_name} is randomly initialised, so its "
            "outputs are meaningless (this demonstrates the pipeline only)",
            file=sys.stderr,
        )
    command = {"tag": _tag, "sed": _sed, "embed": _embed}[args.command]
    try:
        failures = command(tagger, files, args)
    except OSError as err:  # Writing the outputs (a full disk, a vanished directory).
        print(
            f"error: cannot write the output: {_os_error(err)}; nothing was written",
            file=sys.stderr,
        )
        return 2
    total = len(files) + len(input_errors)
    if failures or input_errors:
        names = [f for f, _ in failures] + [m.split(":")[0] for m in input_errors]
        print(f"{len(names)} of {total} file(s) failed: {', '.join(names)}", file=sys.stderr)
        return 1
    return 0


def check_arguments(args: argparse.Namespace) -> None:
    """Ranges of the numeric options; ValueError naming the option."""
    check_batch_size(args.batch_size)
    for option in ("window", "hop"):
        if getattr(args, option) is not None:
            _positive_seconds(getattr(args, option), f"--{option}")
    if args.hop is not None and args.hop < MIN_HOP_S:
        raise ValueError(
            f"--hop {args.hop:g} s is below {MIN_HOP_S:g} s (one frame); finer "
            "hops multiply the work without new information"
        )
    if getattr(args, "top_k", None) is not None:
        check_top_k(args.top_k)
    if getattr(args, "threshold", None) is not None:
        check_threshold(args.threshold)


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def _check_writable_dir(directory: str, what: str) -> None:
    """``directory`` exists and a file can be created in it (tried, then removed)."""
    directory = directory or "."
    if not os.path.isdir(directory):
        raise ValueError(f"{what}: directory {directory} does not exist; create it first")
    probe = os.path.join(directory, f".panns_jax-probe-{uuid.uuid4().hex[:12]}")
    try:
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        os.remove(probe)
    except OSError as err:
        raise ValueError(f"{what}: cannot write in {directory} ({_os_error(err)})") from None


def check_outputs(args: argparse.Namespace, inputs: Sequence[str]) -> None:
    """Output paths must be writable and none may be an input: checked before computing."""
    outputs = [("--output", args.output, "file")]
    if args.command == "sed":
        outputs += [
            ("--plot-dir", args.plot_dir, "dir"),
            ("--framewise-dir", args.framewise_dir, "dir"),
        ]
    if args.command == "embed" and not args.output.endswith((".npz", ".npy")):
        raise ValueError(
            f"--output {args.output}: embeddings are written as .npz (with file "
            "names) or .npy (the array only); end the name with one of those"
        )
    for option, path, kind in outputs:
        if not path:
            continue
        what = f"{option} {path}"
        for source in inputs:
            if _same_file(path, source):
                raise ValueError(f"{what} is also an input; choose another output path")
        if kind == "file":
            if os.path.isdir(path):
                raise ValueError(f"{what} is a directory; give a file name")
            _check_writable_dir(os.path.dirname(os.path.abspath(path)), what)
        elif os.path.exists(path):
            if not os.path.isdir(path):
                raise ValueError(f"{what} exists and is not a directory")
            _check_writable_dir(path, what)
        else:  # Created after the checks; its parent must exist.
            _check_writable_dir(os.path.dirname(os.path.abspath(path)), what)


def _os_error(err: OSError) -> str:
    return f"{err.strerror or err}" + (f": {err.filename}" if err.filename else "")


def _results(
    tagger: AudioTagger, files: List[str], args, keys, **settings
) -> Iterator[ChunkedOutput]:
    settings.setdefault("window_s", args.window or DEFAULT_WINDOW_S)
    settings.setdefault("hop_s", args.hop)
    return tagger.run(files, keys, progress=not args.no_progress, **settings)


def _report(result: ChunkedOutput, failures: List[Tuple[str, str]]) -> bool:
    if result.error:
        failures.append((result.source, result.error))
        print(f"error: {result.error}", file=sys.stderr)
        return False
    for message in result.warnings:
        print(f"warning: {message}", file=sys.stderr)
    return True


@contextlib.contextmanager
def _staged(path: str) -> Iterator[str]:
    """A temporary sibling of ``path``, renamed to ``path`` when the block succeeds, so a
    failure or a kill never leaves a partial or truncated output."""
    directory, base = os.path.split(os.path.abspath(path))
    staging = os.path.join(directory, f".{base}.tmp-{uuid.uuid4().hex[:12]}")
    try:
        yield staging
        os.replace(staging, path)
    finally:
        if os.path.exists(staging):
            os.remove(staging)


@contextlib.contextmanager
def _open_output(path: Optional[str]) -> Iterator[Any]:
    """``path`` opened for writing (replaced only when complete), or stdout."""
    if path:
        with _staged(path) as staging, open(staging, "w", newline="") as f:
            yield f
    else:
        yield sys.stdout
        sys.stdout.flush()


def _tag(tagger: AudioTagger, files: List[str], args) -> List[Tuple[str, str]]:
    failures: List[Tuple[str, str]] = []
    results = []
    for result in _results(tagger, files, args, ["clipwise_output"]):
        if _report(result, failures):
            probabilities = aggregate_chunks(result.outputs["clipwise_output"], args.aggregate)
            results.append(
                {
                    "file": result.source,
                    "duration_s": round(result.num_samples / tagger.sample_rate, 4),
                    "chunks": len(result.starts),
                    "labels": tagger.top_labels(probabilities, args.top_k),
                }
            )
    with _open_output(args.output) as out:
        if args.format == "json":
            json.dump(results, out, indent=2, allow_nan=False)  # Non-finite rows failed above.
            out.write("\n")
        elif args.format == "csv":
            writer = csv.writer(out)
            writer.writerow(["file", "rank", "index", "label", "probability"])
            for r in results:
                for rank, row in enumerate(r["labels"], start=1):
                    writer.writerow(
                        [r["file"], rank, row["index"], row["label"], f"{row['probability']:.6f}"]
                    )
        else:
            for r in results:
                out.write(f"{r['file']}  ({r['duration_s']:.2f} s, {r['chunks']} chunk(s))\n")
                for row in r["labels"]:
                    out.write(f"  {row['probability']:.3f}  {row['label']}\n")
    return failures


def _stem(path: str, used: set) -> str:
    """``name`` of ``dir/name.ext``, made unique among the names in ``used``
    (``a/x.wav``, ``b/x.wav``, ``c/x_2.wav`` -> ``x``, ``x_2``, ``x_2_2``)."""
    stem = os.path.splitext(os.path.basename(path))[0] or "audio"
    candidate, n = stem, 1
    while candidate in used:
        n += 1
        candidate = f"{stem}_{n}"
    used.add(candidate)
    return candidate


def _sed(tagger: AudioTagger, files: List[str], args) -> List[Tuple[str, str]]:
    failures: List[Tuple[str, str]] = []
    settings = tagger.sed_settings(args.window, args.hop)
    key = "framewise_output" if tagger.is_decision_level else "clipwise_output"
    for directory in (args.plot_dir, args.framewise_dir):
        if directory:
            os.makedirs(directory, exist_ok=True)
    used: set = set()
    with _open_output(args.output) as out:
        writer = csv.writer(out)
        writer.writerow(["file", "onset", "offset", "label", "index", "score"])
        for result in tagger.run(files, [key], progress=not args.no_progress, **settings):
            if not _report(result, failures):
                continue
            sed = tagger.sed_result(result, args.threshold)
            for e in sed.events:
                writer.writerow(
                    [
                        sed.source,
                        f"{e['onset']:.3f}",
                        f"{e['offset']:.3f}",
                        e["label"],
                        e["index"],
                        f"{e['score']:.4f}",
                    ]
                )
            stem = _stem(sed.source, used) if (args.plot_dir or args.framewise_dir) else ""
            if args.framewise_dir:
                with (
                    _staged(os.path.join(args.framewise_dir, f"{stem}.npz")) as staging,
                    open(staging, "wb") as f,
                ):
                    np.savez(
                        f,
                        times=sed.times,
                        framewise=sed.framewise,
                        labels=np.asarray(tagger.labels),
                        source=np.asarray(sed.source),
                    )
            if args.plot_dir:
                try:
                    logmel = streamed_logmel(tagger, sed.source)
                    with _staged(os.path.join(args.plot_dir, f"{stem}.png")) as staging:
                        plot_sed(sed, staging, tagger.labels, top_k=args.top_k, logmel=logmel)
                except (audio.AudioError, OSError) as err:
                    failures.append((sed.source, str(err)))
                    print(f"error: {sed.source}: plot failed ({err})", file=sys.stderr)
    return failures


def _embed(tagger: AudioTagger, files: List[str], args) -> List[Tuple[str, str]]:
    failures: List[Tuple[str, str]] = []
    names, embeddings, file_index, starts = [], [], [], []
    for result in _results(tagger, files, args, [tagger.embedding_key]):
        if not _report(result, failures):
            continue
        chunks = chunk_embeddings(result.outputs[tagger.embedding_key])
        if args.per_chunk:
            embeddings.append(chunks)
            file_index += [len(names)] * len(chunks)
            starts += list(result.starts / tagger.sample_rate)
        else:
            embeddings.append(chunks.mean(axis=0, keepdims=True))
        names.append(result.source)
    output = args.output
    if embeddings:
        array = np.concatenate(embeddings).astype(np.float32)
        with _staged(output) as staging, open(staging, "wb") as f:
            if output.endswith(".npy"):
                np.save(f, array)
            else:
                extra = (
                    dict(
                        file_index=np.asarray(file_index, np.int64),
                        start_s=np.asarray(starts, np.float64),
                    )
                    if args.per_chunk
                    else {}
                )
                np.savez(f, embeddings=array, files=np.asarray(names), **extra)
        print(
            f"wrote {array.shape} embeddings of {len(names)} file(s) to {output}", file=sys.stderr
        )
    return failures


if __name__ == "__main__":
    sys.exit(main())
