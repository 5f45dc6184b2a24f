"""tf.data input pipeline: balanced or uniform sampling, multi-host, resume.

Data flow (per host; G = global batch, B = G / number of hosts)::

  step = start, start+1, ...                  tf.data.Dataset.range
    -> one numpy call per batch (parallel, ordered tf.data map):
       k = step*G + h*B .. step*G + h*B+B-1   this host's (h) slice of the
                                              global stream's positions
       sampler(k) -> record ids               stateless hash permutations
       read records                           ArrayRecord random access / memory
       random crop or zero-pad, int16/32768   offsets hashed from (seed, k)
    -> prefetch -> {'audio': f32 [B, L], 'labels': f32 multi-hot [B, C]}

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
cost ~2 ms of CPU per clip, the batch-level path ~0.5 ms
(benchmarks/input_pipeline.py).

Balanced sampling (Kong et al. 2020, Sec. IV-A; TRAINING.md Sec. 3): the stream
is a sequence of fresh random permutations of all classes; each time class c
comes up it yields the next example of its own shuffled list, reshuffled after
every pass. Because every permutation contains c exactly once, draw k = e*C + j
is class perm_e[j] and it is that class's e-th draw, so its example is
shuffle_{c, e // n_c}[e % n_c]. Both permutations are evaluated lazily by
`permute` (a keyed Feistel network with cycle walking, a bijection of [0, n)).
This is the paper's sampler in distribution (not in numpy's random numbers).
Multi-label clips are in the list of each of their classes. Classes without
examples in the selection (folds, `fraction`) are left out of the permutations.

Uniform sampling: epoch e = k // N is a fresh random permutation of the N
examples.

Evaluation is sharded by records instead: host h reads the h-th contiguous
part of the selection, every example exactly once over all hosts.

Data sources: TFDS datasets written in ArrayRecord format (the default of the
panns_jax builders) are read by random access; datasets in TFRecord format and
numpy arrays (`ArraySource`) are held in memory, which suits small sets only.
"""

from __future__ import annotations

import atexit
import json
import threading
import weakref
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
from absl import logging

from panns_jax import tf_cpu

tf = tf_cpu.import_tensorflow()  # Keep TF off accelerators: JAX owns them.

import tensorflow_datasets as tfds  # noqa: E402  (after tf_cpu hid the accelerators)

from panns_jax.data import common  # noqa: E402

Batch = Dict[str, np.ndarray]
Example = Tuple[np.ndarray, np.ndarray]  # (int16 audio [n], int32 label ids)
_STATE_VERSION = 1


# ----------------------------------------------------------------------------
# Sources: random access to (audio int16 [n], label ids int32 [m]) by record id.
# ----------------------------------------------------------------------------


class Source:
    """Random access to the examples of one split, plus their labels."""

    num_classes: int
    index: common.ExampleIndex
    fixed_length: Optional[int] = None  # Samples per clip if all are equal.

    @property
    def num_examples(self) -> int:
        return len(self.index)

    def read(self, records: np.ndarray) -> List[Example]:
        """(int16 audio, int32 label ids) of each record id. Thread-safe."""
        raise NotImplementedError


class ArraySource(Source):
    """Examples held in memory (tests, the demo, small TFRecord datasets).

    Args:
      audio: int16 array [N, L], float array in [-1, 1] (converted to int16), or
        a sequence of 1-D arrays of varying length.
      labels: multi-hot [N, C], a sequence of label-id sequences, or int [N].
      num_classes: C (required unless labels are multi-hot).
      columns: optional int columns (e.g. {'fold': [...]}) for `folds=` filters.
    """

    def __init__(
        self,
        audio: Union[np.ndarray, Sequence[np.ndarray]],
        labels: Union[np.ndarray, Sequence[Sequence[int]]],
        num_classes: Optional[int] = None,
        columns: Optional[Mapping[str, Sequence[int]]] = None,
    ):
        def as_int16(x):
            x = np.asarray(x)
            if x.dtype == np.int16:
                return x
            from panns_jax.data import audio_io  # pylint: disable=g-import-not-at-top

            return audio_io.float_to_int16(x)

        if isinstance(audio, np.ndarray) and audio.ndim == 2:
            self._audio = as_int16(audio)
            self.fixed_length = audio.shape[1]
        else:
            self._audio = [as_int16(a) for a in audio]
            lengths = {len(a) for a in self._audio}
            self.fixed_length = lengths.pop() if len(lengths) == 1 else None
        if isinstance(labels, np.ndarray) and labels.ndim == 2:
            num_classes = labels.shape[1]
            label_lists = [np.flatnonzero(row) for row in labels]
        elif isinstance(labels, np.ndarray) and labels.ndim == 1:
            label_lists = [[int(l)] for l in labels]
        else:
            label_lists = [list(l) for l in labels]
        if num_classes is None:
            raise ValueError("num_classes is required unless labels are multi-hot.")
        if len(label_lists) != len(self._audio):
            raise ValueError(f"{len(self._audio)} clips but {len(label_lists)} labels")
        self.num_classes = int(num_classes)
        self.index = common.ExampleIndex(label_lists, columns)
        self._labels = self.index.label_lists()

    @classmethod
    def from_tfds(cls, builder: tfds.core.DatasetBuilder, split: str) -> "ArraySource":
        """Loads a prepared split into memory (any file format)."""
        features = builder.info.features
        label_key = "labels" if "labels" in features else "label"
        num_classes = _num_classes(features[label_key])
        audio, labels, columns = [], [], {c: [] for c in common.INDEX_COLUMNS if c in features}
        for ex in tfds.as_numpy(builder.as_dataset(split, shuffle_files=False)):
            audio.append(ex["audio"])
            labels.append(np.atleast_1d(ex[label_key]))
            for c in columns:
                columns[c].append(int(ex[c]))
        return cls(audio, labels, num_classes, columns)

    def read(self, records):
        return [(self._audio[r], self._labels[r].astype(np.int32)) for r in records]


class TfdsSource(Source):
    """A prepared ArrayRecord TFDS split, read by random access.

    Records are tf.train.Examples; the audio bytes are viewed as int16 without
    going through TF ops (one copy from the page cache, no decompression: the
    panns_jax builders write uncompressed ArrayRecord).
    """

    def __init__(self, builder: tfds.core.DatasetBuilder, split: str):
        from tensorflow_datasets.core.data_sources import base as ds_base  # pylint: disable=g-import-not-at-top

        self.builder, self.split = builder, split
        features = builder.info.features
        self._label_key = "labels" if "labels" in features else "label"
        self.num_classes = _num_classes(features[self._label_key])
        self.fixed_length = features["audio"].shape[0]
        instructions = ds_base.file_instructions(builder.info, split)
        self._files = [i.filename for i in instructions]
        self._skips = np.array([i.skip for i in instructions], np.int64)
        takes = np.array(
            [i.take if i.take >= 0 else i.examples_in_shard - i.skip for i in instructions],
            np.int64,
        )
        self._ends = np.cumsum(takes)
        self._readers: Dict[int, Any] = {}
        self._locks = [threading.Lock() for _ in self._files]
        self._open_lock = threading.Lock()
        text = (builder.info.metadata or {}).get(common.index_key(split))
        if text:
            self.index = common.ExampleIndex.decode(text)
        else:  # Built by another tool: one pass over the labels.
            logging.warning(
                "%s/%s has no stored example index; scanning labels.", builder.name, split
            )
            self.index = ArraySource.from_tfds(builder, split).index
        if len(self.index) != int(self._ends[-1] if len(self._ends) else 0):
            raise ValueError(
                f"Example index of {builder.name}/{split} has "
                f"{len(self.index)} entries, the data "
                f"{int(self._ends[-1])}."
            )

    def _reader(self, f: int):
        with self._open_lock:
            if f not in self._readers:
                from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top

                self._readers[f] = array_record_module.ArrayRecordReader(
                    self._files[f], "readahead_buffer_size:0"
                )
            return self._readers[f]

    def _parse(self, raw: bytes) -> Example:
        try:
            fields = _example_fields(raw)
            kind, value = fields["audio"]
            samples = (
                np.frombuffer(raw, np.int16, len(value) // 2, value.start)
                if kind == "bytes"
                else np.asarray(value, np.int16)
            )
            return samples, np.asarray(fields[self._label_key][1], np.int32)
        except (KeyError, ValueError, IndexError, StopIteration):  # Other layout.
            feature = tf.train.Example.FromString(raw).features.feature
            audio = feature["audio"]
            samples = (
                np.frombuffer(audio.bytes_list.value[0], np.int16)
                if audio.bytes_list.value
                else np.asarray(audio.int64_list.value, np.int16)
            )
            return samples, np.asarray(feature[self._label_key].int64_list.value, np.int32)

    def read(self, records):
        files = np.searchsorted(self._ends, records, side="right")
        out = []
        for r, f in zip(records, files):
            pos = int(r - (self._ends[f - 1] if f else 0) + self._skips[f])
            reader = self._reader(int(f))
            with self._locks[f]:
                raw = reader.read([pos])[0]
            out.append(self._parse(raw))
        return out


def _varint(buf: bytes, pos: int) -> Tuple[int, int]:
    result = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7


def _example_fields(raw: bytes) -> Dict[str, Tuple[str, Any]]:
    """Features of a serialized tf.train.Example without copying bytes values.

    Returns name -> ('bytes', range of the first value in `raw`) or
    ('ints', [int64 values]). Covers what TFDS writes (single bytes values,
    packed int64 lists); raises ValueError on anything else.
    """

    def fields(start, end):
        pos = start
        while pos < end:
            tag, pos = _varint(raw, pos)
            if tag & 7 != 2:
                raise ValueError("unexpected wire type")
            n, pos = _varint(raw, pos)
            yield tag >> 3, pos, pos + n
            pos += n

    out = {}
    for num, s, e in fields(0, len(raw)):  # Example.features
        if num != 1:
            continue
        for num2, s2, e2 in fields(s, e):  # Features.feature map entries
            if num2 != 1:
                continue
            name, value = None, None
            for num3, s3, e3 in fields(s2, e2):  # key = 1, value (Feature) = 2
                if num3 == 1:
                    name = raw[s3:e3].decode()
                elif num3 == 2:
                    value = next(fields(s3, e3), None)
            if name is None:
                raise ValueError("map entry without key")
            if value is None:  # Empty feature list.
                out[name] = ("ints", [])
                continue
            kind, s4, e4 = value
            if kind == 1:  # BytesList: first value.
                _, s5, e5 = next(fields(s4, e4))
                out[name] = ("bytes", range(s5, e5))
            elif kind == 3:  # Int64List, packed.
                ints = []
                for _, s5, e5 in fields(s4, e4):
                    pos = s5
                    while pos < e5:
                        v, pos = _varint(raw, pos)
                        ints.append(v - (1 << 64) if v >= 1 << 63 else v)
                out[name] = ("ints", ints)
            else:
                out[name] = ("other", None)
    return out


def _num_classes(feature) -> int:
    if isinstance(feature, tfds.features.Sequence):
        feature = feature.feature
    return int(feature.num_classes)


def get_builder(name: str, data_dir: Optional[str] = None, **kwargs) -> tfds.core.DatasetBuilder:
    """`tfds.builder(name)`; prepares datasets that need no download (panns_demo)."""

    builder = tfds.builder(name, data_dir=data_dir, **kwargs)
    if not builder.is_prepared():
        if getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None):
            raise FileNotFoundError(
                f"{name} is not prepared in {builder.data_dir}. Build it with "
                f"download_config=tfds.download.DownloadConfig(manual_dir=...):\n"
                f"{builder.MANUAL_DOWNLOAD_INSTRUCTIONS}"
            )
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(try_download_gcs=False)
        )
    return builder


def make_source(
    dataset: Union[str, tfds.core.DatasetBuilder, Source],
    split: str,
    data_dir: Optional[str] = None,
) -> Source:
    """A Source for a builder name ('audioset/16k'), a builder, or a Source."""
    if isinstance(dataset, Source):
        return dataset
    builder = (
        dataset if isinstance(dataset, tfds.core.DatasetBuilder) else get_builder(dataset, data_dir)
    )
    if builder.info.file_format == tfds.core.FileFormat.ARRAY_RECORD:
        return TfdsSource(builder, split)
    logging.warning(
        "%s is stored as %s (no random access): loading %s into memory.",
        builder.name,
        builder.info.file_format,
        split,
    )
    return ArraySource.from_tfds(builder, split)


# ----------------------------------------------------------------------------
# Selection of records: folds, then (evaluation) this host's contiguous shard.
# ----------------------------------------------------------------------------


def _process(process_index, process_count):
    if process_index is None or process_count is None:
        import jax  # pylint: disable=g-import-not-at-top

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} not in [0, {process_count})")
    return int(process_index), int(process_count)


def select_records(
    index: common.ExampleIndex,
    *,
    folds: Optional[Sequence[int]],
    process_index: int = 0,
    process_count: int = 1,
) -> np.ndarray:
    """Record ids of this host: disjoint contiguous shards covering the selection
    (all of it for process_count=1, which is what training samples from)."""
    records = np.arange(len(index), dtype=np.int64)
    if folds is not None:
        if "fold" not in index.columns:
            raise ValueError("folds= given but the dataset has no fold column.")
        records = records[np.isin(index.columns["fold"], np.asarray(folds))]
    bounds = np.linspace(0, len(records), process_count + 1).round().astype(int)
    return records[bounds[process_index] : bounds[process_index + 1]]


# ----------------------------------------------------------------------------
# Stateless samplers (numpy, vectorised over a batch of stream positions k).
# ----------------------------------------------------------------------------

_U = np.uint64


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a well-spread 64-bit hash."""
    x = x + _U(0x9E3779B97F4A7C15)
    x = (x ^ (x >> _U(30))) * _U(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> _U(27))) * _U(0x94D049BB133111EB)
    return x ^ (x >> _U(31))


def hash_ints(*parts) -> np.ndarray:
    """Order-dependent uint64 hash of integer arrays (broadcast)."""
    with np.errstate(over="ignore"):
        h = np.zeros((), _U)
        for p in parts:
            h = _mix(h ^ np.asarray(p).astype(_U))
        return h


def permute(i, n, key) -> np.ndarray:
    """pi_key(i), where pi_key is a key-chosen permutation of [0, n).

    A 4-round Feistel network on the smallest 2h-bit domain holding n, with
    cycle walking back into [0, n); vectorised over i, n and key (broadcast).
    """
    i, n, key = np.broadcast_arrays(np.asarray(i, _U), np.asarray(n, _U), np.asarray(key, _U))
    half = np.ceil(np.ceil(np.log2(np.maximum(n, 2).astype(np.float64))) / 2)
    half = half.astype(_U)
    mask = (_U(1) << half) - _U(1)
    x = i.copy()
    todo = np.ones(x.shape, bool)
    while todo.any():
        xs, h, m, k = x[todo], half[todo], mask[todo], key[todo]
        for r in range(4):
            left, right = xs >> h, xs & m
            xs = (right << h) | (left ^ (hash_ints(k, r, right) & m))
        x[todo] = xs
        todo[todo] = xs >= n[todo]
    return x.astype(np.int64)


def _seed_keys(seed: int) -> Dict[str, np.uint64]:
    # The same keys on every host: the stream is global. ([seed, 0] is what a
    # single host used when the host index was folded in: its streams are kept.)
    state = np.random.SeedSequence([seed, 0]).generate_state(4, _U)
    return dict(zip(("class", "member", "uniform", "crop"), state))


class BalancedSampler:
    """k -> position in `records` (see the module docstring)."""

    def __init__(
        self,
        index: common.ExampleIndex,
        records: np.ndarray,
        num_classes: int,
        keys: Mapping[str, np.uint64],
    ):
        members = [[] for _ in range(num_classes)]
        for pos, rec in enumerate(records):
            for c in index.labels_of(int(rec)):
                members[c].append(pos)
        self.class_ids = np.array([c for c in range(num_classes) if members[c]], np.int64)
        if not len(self.class_ids):
            raise ValueError("Balanced sampling needs labelled examples; none found.")
        self.counts = np.array([len(members[c]) for c in self.class_ids], np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)[:-1]])
        self.members = np.concatenate([members[c] for c in self.class_ids]).astype(np.int64)
        self._keys = keys

    def __call__(self, k: np.ndarray) -> np.ndarray:
        num = len(self.class_ids)
        epoch, j = k // num, k % num
        slot = permute(j, num, hash_ints(self._keys["class"], epoch))
        n = self.counts[slot]
        m = permute(epoch % n, n, hash_ints(self._keys["member"], self.class_ids[slot], epoch // n))
        return self.members[self.offsets[slot] + m]


class UniformSampler:
    """k -> position: epoch k // N is a fresh permutation of the N positions."""

    def __init__(self, num: int, keys: Mapping[str, np.uint64]):
        if num == 0:
            raise ValueError("No examples to sample from.")
        self._num, self._keys = num, keys

    def __call__(self, k: np.ndarray) -> np.ndarray:
        return permute(k % self._num, self._num, hash_ints(self._keys["uniform"], k // self._num))


_BUFFERS = threading.local()


def _scratch(shape: Tuple[int, int]) -> np.ndarray:
    """A float32 buffer reused by the calling thread.

    Safe because TF copies numpy_function outputs into its own tensors before
    the thread can call again (tests/test_data_pipeline.py holds many batches and
    would see any aliasing); it saves a page-faulting 40 MB allocation per batch.
    """
    buf = getattr(_BUFFERS, "audio", None)
    if buf is None or buf.shape != shape:
        buf = _BUFFERS.audio = np.empty(shape, np.float32)
    return buf


def _assemble(
    examples: Sequence[Example],
    length: int,
    num_classes: int,
    offsets: Sequence[int],
    reuse: bool = False,
) -> Tuple[np.ndarray, np.ndarray]:
    """float32 audio [B, length] (window at offset, zero-padded) and multi-hot."""
    shape = (len(examples), length)
    audio = _scratch(shape) if reuse else np.empty(shape, np.float32)
    labels = np.zeros((len(examples), num_classes), np.float32)
    scale = np.float32(1 / 32768)
    for b, ((samples, ids), off) in enumerate(zip(examples, offsets)):
        window = samples[off : off + length]
        np.multiply(window, scale, out=audio[b, : len(window)])
        audio[b, len(window) :] = 0
        labels[b, ids] = 1.0
    return audio, labels


def _options() -> tf.data.Options:
    options = tf.data.Options()
    options.deterministic = True
    return options


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

    Global batch `step` holds stream positions step*G .. step*G+G-1 (G =
    `global_batch_size`); this host yields its `batch_size` = G / process_count
    rows starting at `row_offset` = process_index * batch_size. The state is
    {'step': batches handed out, ...} and names no host: restoring rebuilds the
    pipeline at that step, which is O(1), on any number of hosts. Save it next
    to the train state (`get_state()` is JSON-able; `save`/`restore` write a
    file).
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
        self._keys = _seed_keys(seed)
        self.sampler = (
            BalancedSampler(source.index, records, source.num_classes, self._keys)
            if balanced
            else UniformSampler(len(records), self._keys)
        )
        self._with_record = with_record
        self._prefetch, self._npc = prefetch, num_parallel_calls
        self._step = 0
        self._it: Optional[_NumpyIterator] = None

    @property
    def num_classes(self) -> int:
        return self.source.num_classes

    def batch(self, step: int, reuse: bool = False) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """This host's rows of global batch `step`: (audio, labels, records).

        reuse: write audio into a per-thread buffer (only for tf.numpy_function,
        which copies it).
        """
        k = (
            int(step) * self.global_batch_size
            + self.row_offset
            + np.arange(self.batch_size, dtype=np.int64)
        )
        records = self.records[self.sampler(k)]
        examples = self.source.read(records)
        excess = np.array([max(len(a) - self.clip_samples, 0) for a, _ in examples])
        offsets = hash_ints(self._keys["crop"], k) % (excess + 1).astype(_U)
        audio, labels = _assemble(
            examples, self.clip_samples, self.num_classes, offsets.astype(np.int64), reuse=reuse
        )
        return audio, labels, records

    def dataset(self, start_step: int = 0) -> tf.data.Dataset:
        """The tf.data pipeline from batch `start_step` on."""
        b, length, c = self.batch_size, self.clip_samples, self.num_classes

        def make(step):
            audio, labels, records = tf.numpy_function(
                lambda s: self.batch(s, reuse=True),
                [step],
                (tf.float32, tf.float32, tf.int64),
                stateful=False,
            )
            out = {
                "audio": tf.ensure_shape(audio, [b, length]),
                "labels": tf.ensure_shape(labels, [b, c]),
            }
            if self._with_record:
                out["record"] = tf.ensure_shape(records, [b])
            return out

        ds = tf.data.Dataset.range(start_step, np.iinfo(np.int64).max)
        ds = ds.map(make, num_parallel_calls=self._npc, deterministic=True)
        return ds.prefetch(self._prefetch).with_options(_options())

    def __iter__(self) -> "TrainIterator":
        return self

    def __next__(self) -> Batch:
        if self._it is None:
            self._it = _NumpyIterator(self.dataset(self._step))
        batch = next(self._it)
        self._step += 1
        return batch

    def close(self) -> None:
        """Stops the background pipeline; the next batch restarts it."""
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

    The last batch is zero-padded; 'mask' (bool [B]) marks real examples. All
    hosts yield the same number of batches (needed for multi-host jit).
    Iterate it once per evaluation.
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
    ):
        self.source, self.batch_size, self.clip_samples = source, batch_size, clip_samples
        self.records = records
        self.num_batches = -(-max_records_per_host // batch_size)
        self._with_record, self._npc = with_record, num_parallel_calls

    @property
    def num_examples(self) -> int:
        return len(self.records)

    def batch(self, i: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Batch i: (audio, labels, mask, records); padding rows are zeros, record -1."""
        records = self.records[i * self.batch_size : (i + 1) * self.batch_size]
        audio, labels = _assemble(
            self.source.read(records),
            self.clip_samples,
            self.source.num_classes,
            [0] * len(records),
        )
        pad = self.batch_size - len(records)
        mask = np.arange(self.batch_size) < len(records)
        return (
            np.pad(audio, [(0, pad), (0, 0)]),
            np.pad(labels, [(0, pad), (0, 0)]),
            mask,
            np.pad(records, (0, pad), constant_values=-1),
        )

    def dataset(self) -> tf.data.Dataset:
        b, length, c = self.batch_size, self.clip_samples, self.source.num_classes

        def make(i):
            audio, labels, mask, records = tf.numpy_function(
                self.batch, [i], (tf.float32, tf.float32, tf.bool, tf.int64), stateful=False
            )
            out = {
                "audio": tf.ensure_shape(audio, [b, length]),
                "labels": tf.ensure_shape(labels, [b, c]),
                "mask": tf.ensure_shape(mask, [b]),
            }
            if self._with_record:
                out["record"] = tf.ensure_shape(records, [b])
            return out

        ds = tf.data.Dataset.range(self.num_batches)
        ds = ds.map(make, num_parallel_calls=self._npc, deterministic=True)
        return ds.prefetch(2).with_options(_options())

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

    Returns:
      A TrainIterator yielding {'audio': f32 [B, clip_samples] in [-1, 1),
      'labels': f32 multi-hot [B, C]}.
    """
    process_index, process_count = _process(process_index, process_count)
    _local_batch(batch_size, process_count)  # Refuse an uneven split early.
    source = make_source(dataset, split, data_dir)
    records = select_records(source.index, folds=folds)  # Every host: all of it.
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if fraction < 1:
        keep = np.random.default_rng(seed).permutation(len(records))
        records = records[np.sort(keep[: max(1, int(round(fraction * len(records))))])]
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
) -> EvalIterable:
    """Re-iterable evaluation batches of this host: each example once, in order.

    Batches are {'audio': f32 [B, L], 'labels': f32 [B, C], 'mask': bool [B]};
    L = clip_samples (first samples kept, zero-padded at the end), or the
    dataset's fixed clip length when None.
    """
    process_index, process_count = _process(process_index, process_count)
    source = make_source(dataset, split, data_dir)
    if clip_samples is None:
        if source.fixed_length is None:
            raise ValueError("Clips vary in length: pass clip_samples.")
        clip_samples = source.fixed_length
    shards = [
        select_records(source.index, folds=folds, process_index=i, process_count=process_count)
        for i in range(process_count)
    ]
    if not any(len(s) for s in shards):
        raise ValueError(f"No examples selected in {split}.")
    return EvalIterable(
        source,
        batch_size=_local_batch(batch_size, process_count),
        clip_samples=clip_samples,
        records=shards[process_index],
        max_records_per_host=max(len(s) for s in shards),
        with_record=with_record,
    )
