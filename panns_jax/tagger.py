"""Audio tagging and embeddings from Python: a model with its variables, fed by files or arrays.

    tagger = AudioTagger.from_pretrained("Cnn14")  # or .from_checkpoint("ckpt/cnn14")
    tagger.tag("rec.wav", top_k=5); tagger.detect("rec.wav"); tagger.embed("rec.wav")

A recording no longer than the chunk window (default 10 s) is processed whole,
without padding or cropping, as the original inference does (golden/TRAINING.md
§11). Longer recordings are streamed from disk and cut into windows of
``window`` seconds every ``hop`` seconds (default: ``hop = window``), the last one
ending at the recording's end; each window is exactly the model applied to that
sample range. Tags of a long recording aggregate the chunks' ``clipwise_output``
with ``max`` (default: a sound present in any chunk is present in the recording)
or ``mean``. Chunks of equal length are batched, across files too (:meth:`AudioTagger.run`).

Sound event detection (:meth:`AudioTagger.detect`) runs the same chunk batcher; the
stitching, event finding and plots are :mod:`panns_jax.sed`. The ``panns-jax`` command
is :mod:`panns_jax.cli`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
import warnings
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from panns_jax import audio, loader, models, sed, zoo

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


class AudioTagger:
    """A PANNs model with its variables, ready for files and waveforms.

    Without ``variables`` the model is randomly initialised (useful only to try
    the pipeline: its labels are meaningless).

    Attributes:
      batch_size: chunks of equal length run together up to this many; smaller
        batches are padded with silent rows to a power of two to bound recompiles.
      metadata: the loader's :class:`panns_jax.loader.Metadata` when built by
        :func:`load_tagger` / :meth:`from_loaded`, else None.
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
        check_batch_size(batch_size)
        if variables is None:  # The loader's random weights: one fallback for every tool.
            loaded = loader.load(model=model_name, overrides=overrides, seed=seed)
            module, variables, metadata = loaded
            labels = metadata.labels if labels is None else labels
            self._setup(model_name, module, variables, False, labels, batch_size, metadata)
            return
        model = models.get(model_name, **(overrides or {}))
        self._setup(model_name, model, variables, True, labels, batch_size)

    def _setup(
        self,
        model_name: str,
        model: Any,
        variables: Dict[str, Any],
        pretrained: bool,
        labels: Optional[Sequence[str]],
        batch_size: int,
        metadata: Any = None,
    ) -> None:
        check_batch_size(batch_size)
        self.model_name = model_name
        self.model = model
        self.sample_rate = models.sample_rate(model)
        self.frame_hop_samples = model.frontend.hop_size
        self.pretrained = pretrained
        self.variables = variables
        self.batch_size = batch_size
        self.metadata = metadata
        num_classes = getattr(model, "num_classes", 527)
        if labels is not None and len(labels) != num_classes:
            raise ValueError(f"{len(labels)} labels for a {num_classes}-class model")
        self.labels = list(loader.labels_for(model, labels))
        self._forward = jax.jit(self._apply, static_argnames="keys")
        self._forward_all = jax.jit(model.apply)
        self._fit_cache: Dict[int, bool] = {}

    @classmethod
    def from_loaded(cls, loaded: Any, *, batch_size: int = 8) -> "AudioTagger":
        """A tagger of what :func:`panns_jax.loader.load` returned (module, variables, metadata)."""
        module, variables, metadata = loaded
        tagger = cls.__new__(cls)
        labels = list(metadata.labels)
        pretrained = metadata.kind != "random"
        tagger._setup(metadata.name, module, variables, pretrained, labels, batch_size, metadata)
        return tagger

    @classmethod
    def from_checkpoint(
        cls, checkpoint: str, model_name: Optional[str] = None, **kwargs: Any
    ) -> "AudioTagger":
        """A tagger from a panns_jax checkpoint directory of any kind, an original ``.pth``
        (needs ``model_name``) or a zoo name (:func:`panns_jax.loader.load`)."""
        return load_tagger(checkpoint, model_name, **kwargs)

    @classmethod
    def from_pretrained(cls, name: str = "Cnn14", **kwargs: Any) -> "AudioTagger":
        """A tagger with released AudioSet weights (:mod:`panns_jax.zoo`): ``Cnn14``,
        ``Cnn14_DecisionLevelMax``, ``MobileNetV1``, ... Downloaded, verified and
        converted on first use, then loaded from the cache."""
        zoo.get(name)  # An unknown name: the zoo's error, with the names it has.
        return load_tagger(name, None, **kwargs)

    # ------------------------------------------------------------------ model
    def _apply(
        self, variables: Dict[str, Any], x: jax.Array, keys: Tuple[str, ...]
    ) -> Dict[str, jax.Array]:
        out = self.model.apply(variables, x)
        return {k: out[k] for k in keys}

    @property
    def is_decision_level(self) -> bool:
        """Whether the model has a native ``framewise_output`` (Cnn14_DecisionLevel*)."""
        return models.outputs(self.model).decision_level

    @property
    def embedding_key(self) -> str:
        """``embedding`` (clip models) or ``segmentwise_embedding`` (decision-level)."""
        return models.outputs(self.model).embedding

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
        seconds = positive_seconds(window_s, what)
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
        seconds = positive_seconds(hop_s, what)
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
        """The ``top_k`` classes of ``probabilities`` ``(C,)``, most probable first."""
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

    # -------------------------------------------------------------------- SED
    @property
    def sed_key(self) -> str:
        """The output SED reads: ``framewise_output``, else ``clipwise_output``."""
        return "framewise_output" if self.is_decision_level else "clipwise_output"

    def sed_settings(
        self, window_s: Optional[float] = None, hop_s: Optional[float] = None
    ) -> Dict[str, Any]:
        """Chunking used by :meth:`detect`: decision-level models are cut into frame-aligned
        chunks (default 10 s); clip models slide a short window (default 1 s every 0.1 s),
        each window's ``clipwise_output`` becoming the frame at its centre."""
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
    ) -> sed.SedResult:
        """Framewise probabilities and thresholded events of a recording."""
        sed.check_threshold(threshold)
        settings = self.sed_settings(window_s, hop_s)
        return self.sed_result(self.run_one(source, [self.sed_key], **settings), threshold)

    def sed_result(self, result: ChunkedOutput, threshold: float) -> sed.SedResult:
        """Stitch the chunk outputs of :meth:`run` (with :meth:`sed_settings`) into frames."""
        return sed.from_chunks(
            result.source,
            result.outputs,
            result.starts,
            result.window,
            result.num_samples,
            sample_rate=self.sample_rate,
            frame_hop_samples=self.frame_hop_samples,
            labels=self.labels,
            threshold=threshold,
        )


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


# ---------------------------------------------------------------------------
# Checks of user values, and pure helpers.
# ---------------------------------------------------------------------------


def positive_seconds(value: float, what: str) -> float:
    """``value`` as seconds; ValueError naming ``what`` unless positive and finite."""
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number of seconds, got {value!r}") from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"{what} must be a positive, finite number of seconds, got {value!r}")
    return seconds


def check_batch_size(batch_size: int) -> None:
    """ValueError unless ``batch_size`` is an integer in 1..MAX_BATCH_SIZE."""
    if (
        isinstance(batch_size, bool)
        or not isinstance(batch_size, (int, np.integer))
        or not 1 <= batch_size <= MAX_BATCH_SIZE
    ):
        raise ValueError(
            f"batch size must be an integer in 1..{MAX_BATCH_SIZE}, got {batch_size!r}"
        )


def check_top_k(top_k: int) -> None:
    """ValueError unless ``top_k`` is a positive integer."""
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
        raise ValueError(f"top-k must be a positive integer, got {top_k!r}")


def _progress(total: int, enabled: bool) -> Any:
    if not enabled or total < 2:
        return None
    from tqdm import tqdm

    return tqdm(total=total, file=sys.stderr, unit="file", dynamic_ncols=True)


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


# ---------------------------------------------------------------------------
# Loading.
# ---------------------------------------------------------------------------


def load_tagger(
    checkpoint: Optional[str],
    model_name: Optional[str],
    *,
    model_overrides: Optional[Dict[str, Any]] = None,
    batch_size: int = 8,
    seed: int = 0,
) -> AudioTagger:
    """A tagger of :func:`panns_jax.loader.load`: a panns_jax checkpoint directory of any
    kind, an original ``.pth``, a zoo name, or None (a random ``model_name``, default Cnn14).

    ``model_overrides`` are architecture arguments for a ``.pth`` or a random model (a
    checkpoint directory records its own), e.g. the widths of a narrow Cnn10 that was
    exported with ``panns-jax-convert to-torch``.
    """
    check_batch_size(batch_size)  # Before loading: a bad value costs no model.
    loaded = loader.load(checkpoint, model=model_name, overrides=model_overrides, seed=seed)
    return AudioTagger.from_loaded(loaded, batch_size=batch_size)
