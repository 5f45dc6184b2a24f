"""tf.data input pipeline: balanced or uniform sampling, multi-host, resume.

Data flow (per host; G = global batch, B = G / number of hosts)::

  step = start, start+1, ...                  tf.data.Dataset.range
    -> one numpy call per batch (parallel, ordered tf.data map):
       k = step*G + h*B .. step*G + h*B+B-1   this host's (h) slice of the
                                              global stream's positions
       sampler(k) -> record ids               stateless hash permutations (sampling.py)
       read records, one at a time            pread into a reused buffer / memory (sources.py)
       random crop or zero-pad, int16/32768   offsets hashed from (seed, k), written
                                              straight into the batch's float32 rows
    -> prefetch -> {'audio': f32 [B, L], 'labels': f32 multi-hot [B, C]}
       (the batch buffer is 64-byte aligned, so TF hands it on without a copy)

The sampler is a pure function of (seed, k) over the whole selection, the same
on every host, which buys four things: reproducibility, O(1) resume (the
iterator state is the number of batches handed out), a global batch that does
not depend on the topology (host h reads rows h*B .. h*B+B-1 of global batch
`step`, so 2 hosts x 2 devices and 1 host x 4 devices train on the same
batches, and a run resumes on another number of hosts with the same data
order), and no per-class tf.data objects, so 527 classes cost nothing.
Each host reads only its rows' records. Work is done per batch in numpy
rather than per example in TF ops: measured on
10 s clips, per-example tf.data maps (index_shuffle sampler, unbatch, decode)
cost ~2 ms of CPU per clip, the batch-level path ~0.6 ms
(benchmarks/input_pipeline.py: ~1,800 clips per CPU-second, balanced over 527
classes). Most of what is left is memory traffic: the float32 batch is twice the
int16 it is made from, and the page-cache copy of each record.

The samplers (balanced, Kong et al. 2020, Sec. IV-A, and uniform) and the record
selection (folds, evaluation shards) are in sampling.py. Evaluation is sharded by
records: host h reads the h-th contiguous part of the selection, so that all hosts
read every example exactly once.

Importing this module registers one ``atexit`` hook, which closes the iterators still
open at exit. Their tf.data threads call into Python and would hang interpreter
shutdown otherwise. TensorFlow is imported through :mod:`panns_jax.tf_cpu`, which hides
GPUs from it.
"""

from __future__ import annotations

import atexit
import json
import sys
import threading
import weakref
from typing import (
    Any,
    Callable,
    Dict,
    Iterable,
    Iterator,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    Union,
)

import numpy as np

from panns_jax import tf_cpu

tf = tf_cpu.import_tensorflow()  # Keep TF off accelerators: JAX owns them.

import tensorflow_datasets as tfds  # noqa: E402  (after tf_cpu hid the accelerators)

from panns_jax.data import sampling  # noqa: E402
from panns_jax.data.records import Example  # noqa: E402
from panns_jax.data.sources import Source, make_source  # noqa: E402

Batch = Dict[str, np.ndarray]
_STATE_VERSION = 1


def _process(process_index, process_count):
    if process_index is None or process_count is None:
        import jax  # pylint: disable=g-import-not-at-top

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} not in [0, {process_count})")
    return int(process_index), int(process_count)


_ALIGN = 64  # TF shares (does not copy) a numpy_function output aligned like this.


class _BatchBuffers:
    """Float32 batch buffers, 64-byte aligned, recycled once no batch refers to them.

    Aligned, the array a numpy_function returns becomes the TF tensor and then the
    numpy batch the caller gets, without a copy. TF copies unaligned ones, 41 MB for a
    batch of 32 ten-second clips. A buffer is reused only when nothing but this pool
    refers to its storage. Every numpy view of it holds a reference, and so does TF's
    tensor through the view it was given. A batch the caller holds, or any slice of one,
    is therefore never overwritten. The reuse saves the page faults of a fresh 41 MB
    allocation per batch.
    """

    def __init__(self, keep: int):
        self._keep = keep
        self._storage: List[np.ndarray] = []  # uint8, at most `keep`
        self._lock = threading.Lock()

    def empty(self, shape: Tuple[int, ...]) -> np.ndarray:
        nbytes = int(np.prod(shape)) * 4
        with self._lock:
            # The most recently used free buffer first: parts of it may still be in cache.
            for i in reversed(range(len(self._storage))):
                storage = self._storage[i]
                # References: the list, this name, getrefcount's argument.
                if sys.getrefcount(storage) == 3 and len(storage) >= nbytes + _ALIGN:
                    self._storage.append(self._storage.pop(i))
                    break
            else:
                storage = np.empty(nbytes + _ALIGN, np.uint8)
                if len(self._storage) < self._keep:
                    self._storage.append(storage)
            start = -storage.ctypes.data % _ALIGN
            return storage[start : start + nbytes].view(np.float32).reshape(shape)


def _assemble(
    examples: Iterable[Example],
    audio: np.ndarray,
    num_classes: int,
    offset: Callable[[int, int], int],
) -> np.ndarray:
    """Writes each example's window into `audio` [B, L] and returns the multi-hot labels.

    A window holds int16 samples / 32768, zero-padded at the end. Window b starts at
    offset(b, samples - L) of a clip longer than L.
    """
    length = audio.shape[1]
    labels = np.zeros((len(audio), num_classes), np.float32)
    scale = np.float32(1 / 32768)
    for b, (samples, ids) in enumerate(examples):
        start = offset(b, len(samples) - length) if len(samples) > length else 0
        window = samples[start : start + length]
        np.multiply(window, scale, out=audio[b, : len(window)])
        audio[b, len(window) :] = 0
        labels[b, ids] = 1.0
    return labels


def _options() -> tf.data.Options:
    options = tf.data.Options()
    options.deterministic = True
    return options


def _batch_dataset(
    steps: tf.data.Dataset,
    batch: Callable[[int], Tuple[np.ndarray, ...]],
    outputs: Sequence[Tuple[str, tf.dtypes.DType, List[int]]],
    *,
    batch_size: int,
    with_record: bool,
    num_parallel_calls: int,
    prefetch: int,
) -> tf.data.Dataset:
    """``steps`` mapped, in order, to the numpy batches that ``batch(step)`` computes.

    ``batch`` returns one array per ``(key, dtype, shape)`` of ``outputs`` and then the
    ``batch_size`` int64 record ids, which the batches hold as ``'record'`` when
    ``with_record``.
    """
    dtypes = [dtype for _, dtype, _ in outputs] + [tf.int64]

    def make(step):
        *arrays, records = tf.numpy_function(batch, [step], dtypes, stateful=False)
        out = {key: tf.ensure_shape(a, shape) for (key, _, shape), a in zip(outputs, arrays)}
        if with_record:
            out["record"] = tf.ensure_shape(records, [batch_size])
        return out

    ds = steps.map(make, num_parallel_calls=num_parallel_calls, deterministic=True)
    return ds.prefetch(prefetch).with_options(_options())


# ----------------------------------------------------------------------------
# Iterators.
# ----------------------------------------------------------------------------


# tf.data threads that call back into Python (numpy_function) deadlock with
# interpreter shutdown if their iterator is still alive then: close them first.
_LIVE_ITERATORS = weakref.WeakSet()


@atexit.register
def _close_live_iterators() -> None:
    for it in list(_LIVE_ITERATORS):
        it.close()


class _NumpyIterator:
    """`ds.as_numpy_iterator()` that can be closed explicitly (and at exit)."""

    def __init__(self, ds: tf.data.Dataset):
        self._it = ds.as_numpy_iterator()
        _LIVE_ITERATORS.add(self)

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        if self._it is None:
            raise StopIteration
        try:
            return next(self._it)
        except StopIteration:
            self.close()
            raise

    def close(self) -> None:
        self._it = None


class TrainIterator:
    """Endless iterator of training batches (numpy dicts) with a tiny state.

    Global batch `step` holds stream positions step*G .. step*G+G-1, where G is
    `global_batch_size`. This host yields its `batch_size` = G / process_count rows,
    starting at `row_offset` = process_index * batch_size.

    The state is {'step': batches handed out, ...} and names no host. Restoring it
    rebuilds the pipeline at that step, which is O(1), on any number of hosts. Save it
    next to the train state: `get_state()` is JSON-able, and `save`/`restore` write a
    file.
    """

    def __init__(
        self,
        source: Source,
        *,
        batch_size: int,
        clip_samples: int,
        balanced: bool,
        seed: int,
        records: np.ndarray,
        process_index: int = 0,
        process_count: int = 1,
        with_record: bool = False,
        prefetch: int = 2,
        num_parallel_calls: int = tf.data.AUTOTUNE,
    ):
        self.global_batch_size = int(batch_size)
        self.batch_size = _local_batch(self.global_batch_size, process_count)
        self.row_offset = int(process_index) * self.batch_size
        self.source = source
        self.clip_samples, self.balanced, self.seed = int(clip_samples), balanced, int(seed)
        self.records = records  # The whole selection, the same on every host.
        self._keys = sampling.seed_keys(seed)
        self.sampler = (
            sampling.BalancedSampler(source.index, records, source.num_classes, self._keys)
            if balanced
            else sampling.UniformSampler(len(records), self._keys)
        )
        self._with_record = with_record
        self._prefetch, self._npc = prefetch, num_parallel_calls
        self._step = 0
        self._it: Optional[_NumpyIterator] = None
        self._buffers = _BatchBuffers(keep=prefetch + 4)

    @property
    def num_classes(self) -> int:
        return self.source.num_classes

    def batch(self, step: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """This host's rows of global batch `step`: (audio, labels, records)."""
        k = (
            int(step) * self.global_batch_size
            + self.row_offset
            + np.arange(self.batch_size, dtype=np.int64)
        )
        records = self.records[self.sampler(k)]
        hashes = sampling.crop_hashes(self._keys, k)
        audio = self._buffers.empty((self.batch_size, self.clip_samples))
        labels = _assemble(
            self.source.examples(records),
            audio,
            self.num_classes,
            lambda b, excess: int(sampling.crop_offsets(hashes[b], excess)),
        )
        return audio, labels, records

    def dataset(self, start_step: int = 0) -> tf.data.Dataset:
        """The tf.data pipeline from batch `start_step` on."""
        b, length, c = self.batch_size, self.clip_samples, self.num_classes
        return _batch_dataset(
            tf.data.Dataset.range(start_step, np.iinfo(np.int64).max),
            self.batch,
            [("audio", tf.float32, [b, length]), ("labels", tf.float32, [b, c])],
            batch_size=b,
            with_record=self._with_record,
            num_parallel_calls=self._npc,
            prefetch=self._prefetch,
        )

    def __iter__(self) -> "TrainIterator":
        return self

    def __next__(self) -> Batch:
        if self._it is None:
            self._it = _NumpyIterator(self.dataset(self._step))
        batch = next(self._it)
        self._step += 1
        return batch

    def close(self) -> None:
        """Stops the background pipeline. The next batch restarts it."""
        if self._it is not None:
            self._it.close()
        self._it = None

    def _fingerprint(self) -> Dict[str, Any]:
        return {
            "seed": self.seed,
            "balanced": self.balanced,
            "batch_size": self.global_batch_size,
            "num_records": int(len(self.records)),
            "clip_samples": self.clip_samples,
        }

    def get_state(self) -> Dict[str, Any]:
        return {"version": _STATE_VERSION, "step": self._step, **self._fingerprint()}

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Continues the stream after batch `state['step']` (same config only)."""
        mismatch = {
            k: (state.get(k), v) for k, v in self._fingerprint().items() if state.get(k) != v
        }
        if mismatch:
            raise ValueError(f"Iterator state is for another pipeline: {mismatch} (saved, current)")
        self._step = int(state["step"])
        self.close()

    def save(self, path: str) -> None:
        with tf.io.gfile.GFile(path, "w") as f:
            json.dump(self.get_state(), f)

    def restore(self, path: str) -> None:
        with tf.io.gfile.GFile(path) as f:
            self.set_state(json.load(f))


class EvalIterable:
    """Every selected example exactly once, in record order, in fixed batches.

    The last batch is zero-padded, and 'mask' (bool [B]) marks real examples. All hosts
    yield the same number of batches, as multi-host jit needs. Iterate it once per
    evaluation.
    """

    def __init__(
        self,
        source: Source,
        *,
        batch_size: int,
        clip_samples: int,
        records: np.ndarray,
        max_records_per_host: int,
        with_record: bool = False,
        num_parallel_calls: int = tf.data.AUTOTUNE,
        starts: Optional[np.ndarray] = None,
    ):
        self.source, self.batch_size, self.clip_samples = source, batch_size, clip_samples
        self.records = records
        # Row i reads records[i] from sample starts[i]: segments of a longer recording.
        self.starts = np.zeros(len(records), np.int64) if starts is None else starts
        self.num_batches = -(-max_records_per_host // batch_size)
        self._with_record, self._npc = with_record, num_parallel_calls
        self._buffers = _BatchBuffers(keep=6)

    @property
    def num_examples(self) -> int:
        """Distinct recordings (a recording cut into segments counts once)."""
        return len(np.unique(self.records))

    def batch(self, i: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Batch i as (audio, labels, mask, records). Padding rows are zeros, with record -1."""
        rows = slice(i * self.batch_size, (i + 1) * self.batch_size)
        records, starts = self.records[rows], self.starts[rows]
        audio = self._buffers.empty((self.batch_size, self.clip_samples))
        labels = _assemble(
            self.source.examples(records),
            audio,
            self.source.num_classes,
            lambda b, excess: min(int(starts[b]), excess),
        )
        audio[len(records) :] = 0
        pad = self.batch_size - len(records)
        mask = np.arange(self.batch_size) < len(records)
        return audio, labels, mask, np.pad(records, (0, pad), constant_values=-1)

    def dataset(self) -> tf.data.Dataset:
        """The tf.data pipeline of the evaluation batches."""
        b, length, c = self.batch_size, self.clip_samples, self.source.num_classes
        return _batch_dataset(
            tf.data.Dataset.range(self.num_batches),
            self.batch,
            [
                ("audio", tf.float32, [b, length]),
                ("labels", tf.float32, [b, c]),
                ("mask", tf.bool, [b]),
            ],
            batch_size=b,
            with_record=self._with_record,
            num_parallel_calls=self._npc,
            prefetch=2,
        )

    def __iter__(self) -> Iterator[Batch]:
        return _NumpyIterator(self.dataset())

    def __len__(self) -> int:
        return self.num_batches


def _local_batch(batch_size: int, process_count: int) -> int:
    if batch_size % process_count:
        raise ValueError(f"Global batch {batch_size} not divisible by {process_count} processes.")
    return batch_size // process_count


def make_train_iterator(
    dataset: Union[str, tfds.core.DatasetBuilder, Source],
    split: str = "train",
    *,
    batch_size: int,
    clip_samples: int,
    balanced: bool = True,
    seed: int = 0,
    data_dir: Optional[str] = None,
    folds: Optional[Sequence[int]] = None,
    process_index: Optional[int] = None,
    process_count: Optional[int] = None,
    prefetch: int = 2,
    num_parallel_calls: int = tf.data.AUTOTUNE,
    with_record: bool = False,
    fraction: float = 1.0,
    clips_per_class: Optional[int] = None,
    names: Optional[Sequence[str]] = None,
) -> TrainIterator:
    """Endless training batches of this host: its rows of each global batch.

    Args:
      dataset: TFDS name (e.g. 'audioset/32k', 'panns_demo'), builder or Source.
      split: e.g. 'balanced_train', 'unbalanced_train', 'train'.
      batch_size: global batch; host h gets rows h*b .. h*b+b-1 of each, with
        b = batch_size / process_count (so the global batch at every step is the
        same whatever the number of hosts).
      clip_samples: random crop (or zero-pad at the end) to this many samples.
      balanced: the paper's class-balanced sampler; False: uniform shuffling.
      seed: stream seed (the same on every host).
      data_dir: TFDS data dir.
      folds: keep only examples whose `fold` is in this list (ESC-50, GTZAN...).
      process_index, process_count: default to jax.process_index()/count().
      with_record: also return 'record' (int64 [B], the record id) per example.
      fraction: train on this fraction of the examples, a subset fixed by
        `seed` (the paper's "amount of training data" ablation).
      clips_per_class: train on exactly this many examples of each class, chosen by
        `seed` (single-label data; the paper's Figs. 6-11). `names` (class names) make
        its error name the class that has too few.

    Returns:
      A TrainIterator yielding {'audio': f32 [B, clip_samples] in [-1, 1),
      'labels': f32 multi-hot [B, C]}.
    """
    process_index, process_count = _process(process_index, process_count)
    _local_batch(batch_size, process_count)  # Refuse an uneven split early.
    source = make_source(dataset, split, data_dir)
    records = sampling.select_records(source.index, folds=folds)  # Every host: all of it.
    records = sampling.subset(records, fraction, seed)
    if clips_per_class is not None:
        records = sampling.per_class(records, source.index, clips_per_class, seed, names)
    return TrainIterator(
        source,
        batch_size=batch_size,
        clip_samples=clip_samples,
        balanced=balanced,
        seed=seed,
        records=records,
        process_index=process_index,
        process_count=process_count,
        with_record=with_record,
        prefetch=prefetch,
        num_parallel_calls=num_parallel_calls,
    )


def make_eval_iterator(
    dataset: Union[str, tfds.core.DatasetBuilder, Source],
    split: str = "eval",
    *,
    batch_size: int,
    clip_samples: Optional[int] = None,
    data_dir: Optional[str] = None,
    folds: Optional[Sequence[int]] = None,
    process_index: Optional[int] = None,
    process_count: Optional[int] = None,
    with_record: bool = False,
    segments: bool = False,
) -> EvalIterable:
    """Re-iterable evaluation batches of this host: each example once, in order.

    Batches are {'audio': f32 [B, L], 'labels': f32 [B, C], 'mask': bool [B]}. L is
    clip_samples (the first samples kept, zero-padded at the end), or the dataset's
    fixed clip length when clip_samples is None.

    With ``segments``, a recording longer than L is read whole, as consecutive rows of L
    samples (the last one ends where the recording ends), and the batches hold 'record'
    (int64 [B], -1 on padding rows); :func:`panns_jax.metrics.mean_by_record` averages
    the rows' outputs per recording. The paper evaluates DCASE 2018 Task 2 so, with 4 s
    segments (Sec. VI-D).
    """
    process_index, process_count = _process(process_index, process_count)
    source = make_source(dataset, split, data_dir)
    if clip_samples is None:
        if source.fixed_length is None:
            raise ValueError("Clips vary in length: pass clip_samples.")
        clip_samples = source.fixed_length
    shards = [
        sampling.select_records(
            source.index, folds=folds, process_index=i, process_count=process_count
        )
        for i in range(process_count)
    ]
    if not any(len(s) for s in shards):
        raise ValueError(f"No examples selected in {split}.")
    starts = None
    if segments:
        plans = [segment_plan(source, s, clip_samples) for s in shards]
        shards, starts = [p[0] for p in plans], plans[process_index][1]
    return EvalIterable(
        source,
        batch_size=_local_batch(batch_size, process_count),
        clip_samples=clip_samples,
        records=shards[process_index],
        max_records_per_host=max(len(s) for s in shards),
        with_record=with_record or segments,
        starts=starts,
    )


def eval_rows(
    batches: Iterable[Batch], fn: Callable[[np.ndarray], Any]
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(fn(audio), labels, record)`` of every real row of ``batches`` (padding dropped), from
    eval batches that hold 'record' (``with_record`` or ``segments``), in one process."""
    outputs, labels, records = [], [], []
    for batch in batches:
        mask = np.asarray(batch["mask"])
        outputs.append(np.asarray(fn(batch["audio"]))[mask])
        labels.append(np.asarray(batch["labels"])[mask])
        records.append(np.asarray(batch["record"])[mask])
    return np.concatenate(outputs), np.concatenate(labels), np.concatenate(records)


def segment_plan(
    source: Source, records: np.ndarray, clip_samples: int
) -> Tuple[np.ndarray, np.ndarray]:
    """``(record, start)`` of every segment of ``clip_samples`` that covers each record.

    A record of n samples has max(1, ceil(n / clip_samples)) segments; a start past
    n - clip_samples is read from n - clip_samples, so no segment is mostly padding. Lengths
    come from the source's fixed length, or else from one read of every record.
    """
    if source.fixed_length is not None:
        lengths = np.full(len(records), source.fixed_length, np.int64)
    else:
        lengths = np.array([len(s) for s, _ in source.examples(records)], np.int64)
    counts = np.maximum(1, -(-lengths // clip_samples))
    firsts = np.repeat(np.cumsum(counts) - counts, counts)
    starts = (np.arange(int(counts.sum())) - firsts) * clip_samples
    return np.repeat(np.asarray(records, np.int64), counts), starts.astype(np.int64)
