"""Audio tagging and embeddings from Python: a model with its variables, fed by files or arrays.

    tagger = AudioTagger.load("Cnn14")  # a zoo name, a checkpoint directory, a .pth + model=
    tagger.tag("rec.wav", top_k=5); tagger.detect("rec.wav"); tagger.embed("rec.wav")

A recording no longer than the chunk window (default 10 s) is processed whole,
without padding or cropping, as the original inference does (golden/TRAINING.md
§11). Longer recordings are streamed from disk and cut into windows of
``window`` seconds every ``hop`` seconds (default: ``hop = window``), the last one
ending at the recording's end; each window is exactly the model applied to that
sample range. Tags of a long recording aggregate the chunks' ``clipwise_output``
with ``max`` (default: a sound present in any chunk is present in the recording)
or ``mean``. Chunks of equal length are batched, across files too
(:meth:`AudioTagger.run`, through :class:`panns_jax.scheduler.ChunkScheduler`).

Sound event detection (:meth:`AudioTagger.detect`) runs the same chunks; the stitching,
event finding and plots are :mod:`panns_jax.sed`. The ``panns-jax`` command is
:mod:`panns_jax.cli`.
"""

from __future__ import annotations

import functools
import sys
import warnings
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from panns_jax import audio, checks, loader, models, sed
from panns_jax.models import backends, transfer_head
from panns_jax.scheduler import ChunkedOutput, ChunkScheduler

Source = Union[str, np.ndarray]

DEFAULT_WINDOW_S = 10.0
DEFAULT_SED_WINDOW_S = 1.0
DEFAULT_SED_HOP_S = 0.1
WHOLE = 1 << 62  # The window of ``window_s=None``: every recording in one chunk.
# Compute dtypes of inference. Parameters and the log-mel front end stay float32 in both, as
# in training's ``compute_dtype`` (panns_jax.model_builder.registry_model).
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def with_compute_dtype(module: Any, dtype: str) -> Any:
    """``module`` computing in ``dtype`` with its float32 parameters and front end.

    A transfer head computes in its base's dtype, so a :class:`Transfer` gets a new base.
    """
    if isinstance(module, transfer_head.Transfer):
        return module.clone(base=with_compute_dtype(module.base, dtype))
    return module.clone(dtype=DTYPES[checks.compute_dtype(dtype)])


def _as_float32(outputs: Dict[str, jax.Array]) -> Dict[str, jax.Array]:
    """Every floating output as float32 (a float32 output is returned as it is)."""
    return {
        k: v.astype(jnp.float32) if jnp.issubdtype(v.dtype, jnp.floating) else v
        for k, v in outputs.items()
    }


class AudioTagger:
    """A PANNs model with its variables, ready for files and waveforms.

    Built from what :func:`panns_jax.loader.load` returns, ``AudioTagger(module, variables,
    metadata)``, or in one step by :meth:`load`. Random weights (``metadata.kind ==
    'random'``) only try the pipeline: their labels are meaningless.

    Attributes:
      model, variables: the Flax module and its ``{'params', 'batch_stats'}``.
      metadata: the loader's :class:`panns_jax.loader.Metadata` (name, labels, rate, kind).
      labels: one class name per output class (``metadata.labels``).
      batch_size: chunks of equal length run together up to this many; smaller
        batches are padded with silent rows to a power of two to bound recompiles.
      dtype: the compute dtype, ``float32`` (default) or ``bfloat16``. In bfloat16 the
        network computes in bf16 from float32 parameters after a float32 log-mel front
        end; every output is returned as float32.
      conv_backend: the convolutions' kernels on CPU: ``auto`` (default: oneDNN's where
        ``pip install 'panns-jax[onednn]'`` installed it, else XLA's), ``xla`` or ``onednn``
        (:mod:`panns_jax.models.backends`); the attribute holds the one in use.
    """

    def __init__(
        self,
        module: Any,
        variables: Dict[str, Any],
        metadata: loader.Metadata,
        *,
        batch_size: int = 8,
        dtype: str = "float32",
        conv_backend: str = "auto",
    ):
        self.batch_size = checks.batch_size(batch_size)
        self.dtype = checks.compute_dtype(dtype)
        if self.dtype != "float32":  # float32 keeps the loaded module as it is.
            module = with_compute_dtype(module, self.dtype)
        self.model = module
        self.variables = variables
        self.metadata = metadata
        self.model_name = metadata.name
        self.pretrained = metadata.kind != "random"
        self.sample_rate = models.sample_rate(module)
        self.frame_hop_samples = module.frontend.hop_size
        checks.labels_fit(metadata.labels, getattr(module, "num_classes", 527))
        self.labels = list(metadata.labels)
        self.conv_backend = backends.prepare(conv_backend)
        self._forward = models.jit_inference(
            module, self._apply, self.conv_backend, static_argnames="keys"
        )
        self._forward_all = models.jit_inference(
            module, lambda v, x: _as_float32(module.apply(v, x)), self.conv_backend
        )
        self._fit_cache: Dict[int, bool] = {}

    @classmethod
    def load(
        cls,
        source: Optional[str] = None,
        *,
        batch_size: int = 8,
        dtype: str = "float32",
        conv_backend: str = "auto",
        **load_args: Any,
    ) -> "AudioTagger":
        """A tagger of whatever :func:`panns_jax.loader.load` takes: a panns_jax checkpoint
        directory of any kind, an original ``.pth``, a zoo name such as ``"Cnn14"``
        (downloaded, verified and converted on first use), or None for random weights.

        ``load_args`` are the loader's keywords: ``model`` (the architecture: required for
        a ``.pth``, the random model's), ``overrides`` (architecture arguments of a ``.pth``
        or a random model, e.g. the widths of a narrow Cnn10) and ``seed``. ``dtype`` is
        the compute dtype and ``conv_backend`` the convolutions' kernels (see the class).
        """
        checks.batch_size(batch_size)  # Before loading: bad values cost no model.
        checks.compute_dtype(dtype)
        backends.prepare(conv_backend)  # Checked (oneDNN's kernel built) first too.
        return cls(
            *loader.load(source, **load_args),
            batch_size=batch_size,
            dtype=dtype,
            conv_backend=conv_backend,
        )

    # ------------------------------------------------------------------ model
    def _apply(
        self, variables: Dict[str, Any], x: jax.Array, keys: Tuple[str, ...]
    ) -> Dict[str, jax.Array]:
        out = self.model.apply(variables, x)
        return _as_float32({k: out[k] for k in keys})

    @property
    def is_decision_level(self) -> bool:
        """Whether the model has a native ``framewise_output`` (Cnn14_DecisionLevel*)."""
        return self.metadata.outputs.decision_level

    @property
    def embedding_key(self) -> str:
        """``embedding`` (clip models) or ``segmentwise_embedding`` (decision-level)."""
        return self.metadata.outputs.embedding

    def _fits(self, num_samples: int) -> bool:
        """Whether the model takes ``num_samples`` (shape-checked by tracing, cached)."""
        if num_samples not in self._fit_cache:
            self._fit_cache[num_samples] = models.takes_length(self.model, num_samples)
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
        window = WHOLE if window_s is None else self.window_samples(window_s)
        hop = window if hop_s is None else self.hop_samples(hop_s)
        scheduler = ChunkScheduler(self.predict_batch, keys, self.batch_size, window)
        bar = _progress(len(sources), progress)
        for source in sources:
            self._schedule(scheduler, source, window, hop, align)
            if bar is not None:
                bar.update(1)
            yield from scheduler.ready()
        if bar is not None:
            bar.close()
        yield from scheduler.drain()

    def _schedule(
        self, scheduler: ChunkScheduler, source: Source, window: int, hop: int, align: int
    ) -> None:
        """Read ``source`` chunk by chunk into ``scheduler``; a reading error fails it."""
        name = source if isinstance(source, str) else "<waveform>"
        index = scheduler.open(name)
        try:
            for chunk in audio.iter_chunks(source, self.sample_rate, window, hop, align=align):
                self.check_length(len(chunk.samples), name)
                scheduler.add(index, chunk.start, chunk.samples)
                if chunk.last:
                    level = audio.level_warning(name, chunk.peak)
                    notes = list(chunk.warnings) + ([level] if level else [])
                    scheduler.close(index, chunk.total, notes)
                if scheduler.failed(index):  # Its model outputs failed: stop reading it.
                    return
        except audio.AudioError as err:
            scheduler.fail(index, str(err))

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
        seconds = checks.positive_seconds(window_s, what)
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
        return int(round(checks.hop_seconds(hop_s, what) * self.sample_rate))

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
        checks.top_k(top_k)
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
        return sed.output_key(self.metadata.outputs)

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
        checks.probability(threshold, "threshold")
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


# ---------------------------------------------------------------------------
# Pure helpers.
# ---------------------------------------------------------------------------


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
