"""tf.data input pipeline: balanced or uniform sampling, per-host shards, resume.

Data flow (per host)::

  k = start, start+1, ...                      (position in this host's stream)
    -> sampler(k) -> record id                 (stateless, tf ops only)
    -> read record (ArrayRecord random access / in-memory array)
    -> random crop or zero-pad to clip_samples (stateless, seeded by k)
    -> batch(per-host batch) -> {'audio': f32 [B, L], 'labels': f32 [B, C]}

The sampler is a pure function of (seed, host, k), which buys three things:
reproducibility, O(1) resume (the iterator state is just the number of batches
handed out) and no per-class tf.data objects, so 527 classes cost nothing.

Balanced sampling (Kong et al. 2020, Sec. IV-A; TRAINING.md Sec. 3): the stream
is a sequence of fresh random permutations of all classes; each time class c
comes up it yields the next example of its own shuffled list, reshuffled after
every pass. Because every permutation contains c exactly once, draw k = e*C + j
is class perm_e[j] and it is that class's e-th draw, so its example is
shuffle_{c, e // n_c}[e % n_c]: both permutations are evaluated lazily with
`tf.random.experimental.index_shuffle`. This is the paper's sampler exactly in
distribution (not in the numpy random numbers). Multi-label clips are in the
list of each of their classes. Classes without examples in a host's shard (or
fold selection) are left out of the permutations.

Uniform sampling: epoch e is a fresh random permutation of the examples.

Data sources: TFDS datasets written in ArrayRecord format (the default of the
panns_jax builders) are read by random access; datasets in TFRecord format and
numpy arrays (`ArraySource`) are held in memory, which suits small sets only.
"""

from __future__ import annotations

import json
import threading
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Union

from absl import logging
import numpy as np
import tensorflow as tf

try:  # Keep TF off accelerators: JAX owns them.
  tf.config.set_visible_devices([], 'GPU')
except Exception:  # pylint: disable=broad-except
  pass

import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

from panns_jax.data import common  # pylint: disable=g-import-not-at-top

Batch = Dict[str, np.ndarray]
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

  def read(self, ds: tf.data.Dataset, num_parallel_calls: int) -> tf.data.Dataset:
    """Adds 'audio' (int16 [n]) and 'label_ids' (int32 [m]) to each element.

    Elements of `ds` are dicts with an int64 'record'; order is preserved.
    """
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

  def __init__(self, audio: Union[np.ndarray, Sequence[np.ndarray]],
               labels: Union[np.ndarray, Sequence[Sequence[int]]],
               num_classes: Optional[int] = None,
               columns: Optional[Mapping[str, Sequence[int]]] = None):
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
      raise ValueError('num_classes is required unless labels are multi-hot.')
    if len(label_lists) != len(self._audio):
      raise ValueError(f'{len(self._audio)} clips but {len(label_lists)} labels')
    self.num_classes = int(num_classes)
    self.index = common.ExampleIndex(label_lists, columns)
    self._labels = self.index.label_lists()

  @classmethod
  def from_tfds(cls, builder: tfds.core.DatasetBuilder, split: str) -> 'ArraySource':
    """Loads a prepared split into memory (any file format)."""
    features = builder.info.features
    label_key = 'labels' if 'labels' in features else 'label'
    num_classes = _num_classes(features[label_key])
    audio, labels, columns = [], [], {c: [] for c in common.INDEX_COLUMNS
                                      if c in features}
    for ex in tfds.as_numpy(builder.as_dataset(split, shuffle_files=False)):
      audio.append(ex['audio'])
      labels.append(np.atleast_1d(ex[label_key]))
      for c in columns:
        columns[c].append(int(ex[c]))
    return cls(audio, labels, num_classes, columns)

  def _get(self, record):
    return self._audio[int(record)], self._labels[int(record)].astype(np.int32)

  def read(self, ds, num_parallel_calls):
    def fn(el):
      audio, ids = tf.numpy_function(self._get, [el['record']],
                                     (tf.int16, tf.int32), stateful=False)
      audio.set_shape([self.fixed_length])
      ids.set_shape([None])
      return dict(el, audio=audio, label_ids=ids)
    return ds.map(fn, num_parallel_calls=num_parallel_calls, deterministic=True)


class TfdsSource(Source):
  """A prepared ArrayRecord TFDS split, read by random access.

  Records are fetched in chunks through one Python call (array_record reads
  them in C++) and decoded by TF ops in parallel.
  """

  def __init__(self, builder: tfds.core.DatasetBuilder, split: str):
    self.builder, self.split = builder, split
    self._features = builder.info.features
    self._label_key = 'labels' if 'labels' in self._features else 'label'
    self.num_classes = _num_classes(self._features[self._label_key])
    self.fixed_length = self._features['audio'].shape[0]
    self._raw = builder.as_data_source(split).data_source
    self._lock = threading.Lock()
    text = (builder.info.metadata or {}).get(common.index_key(split))
    if text:
      self.index = common.ExampleIndex.decode(text)
    else:  # Built by another tool: one pass over the labels.
      logging.warning('%s/%s has no stored example index; scanning labels.',
                      builder.name, split)
      self.index = ArraySource.from_tfds(builder, split).index
    if len(self.index) != len(self._raw):
      raise ValueError(f'Example index of {builder.name}/{split} has '
                       f'{len(self.index)} entries, the data {len(self._raw)}.')

  def _get_many(self, records):
    with self._lock:
      return np.array(self._raw.__getitems__([int(r) for r in records]),
                      dtype=object)

  def read(self, ds, num_parallel_calls, chunk: int = 16):
    def fetch(el):
      raw = tf.numpy_function(self._get_many, [el['record']], tf.string,
                              stateful=False)
      raw.set_shape(el['record'].shape)
      return dict(el, raw=raw)

    def decode(el):
      el = dict(el)
      ex = self._features.deserialize_example(el.pop('raw'))
      ids = tf.reshape(tf.cast(ex[self._label_key], tf.int32), [-1])
      return dict(el, audio=ex['audio'], label_ids=ids)

    ds = ds.batch(chunk).map(fetch, num_parallel_calls=num_parallel_calls,
                             deterministic=True).unbatch()
    return ds.map(decode, num_parallel_calls=num_parallel_calls,
                  deterministic=True)


def _num_classes(feature) -> int:
  if isinstance(feature, tfds.features.Sequence):
    feature = feature.feature
  return int(feature.num_classes)


def get_builder(name: str, data_dir: Optional[str] = None,
                **kwargs) -> tfds.core.DatasetBuilder:
  """`tfds.builder(name)`; prepares datasets that need no download (panns_demo)."""
  import panns_jax.data  # pylint: disable=g-import-not-at-top,unused-import  (registers)
  builder = tfds.builder(name, data_dir=data_dir, **kwargs)
  if not builder.is_prepared():
    if getattr(builder, 'MANUAL_DOWNLOAD_INSTRUCTIONS', None):
      raise FileNotFoundError(
          f'{name} is not prepared in {builder.data_dir}. Build it with '
          f'download_config=tfds.download.DownloadConfig(manual_dir=...):\n'
          f'{builder.MANUAL_DOWNLOAD_INSTRUCTIONS}')
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        try_download_gcs=False))
  return builder


def make_source(dataset: Union[str, tfds.core.DatasetBuilder, Source],
                split: str, data_dir: Optional[str] = None) -> Source:
  """A Source for a builder name ('audioset/16k'), a builder, or a Source."""
  if isinstance(dataset, Source):
    return dataset
  builder = (dataset if isinstance(dataset, tfds.core.DatasetBuilder)
             else get_builder(dataset, data_dir))
  if builder.info.file_format == tfds.core.FileFormat.ARRAY_RECORD:
    return TfdsSource(builder, split)
  logging.warning('%s is stored as %s (no random access): loading %s into '
                  'memory.', builder.name, builder.info.file_format, split)
  return ArraySource.from_tfds(builder, split)


# ----------------------------------------------------------------------------
# Selection of records: folds, then this host's contiguous shard.
# ----------------------------------------------------------------------------


def _process(process_index, process_count):
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} not in [0, {process_count})')
  return int(process_index), int(process_count)


def select_records(index: common.ExampleIndex, *, folds: Optional[Sequence[int]],
                   process_index: int, process_count: int) -> np.ndarray:
  """Record ids of this host: disjoint contiguous shards covering the selection."""
  records = np.arange(len(index), dtype=np.int64)
  if folds is not None:
    if 'fold' not in index.columns:
      raise ValueError('folds= given but the dataset has no fold column.')
    records = records[np.isin(index.columns['fold'], np.asarray(folds))]
  bounds = np.linspace(0, len(records), process_count + 1).round().astype(int)
  return records[bounds[process_index]:bounds[process_index + 1]]


# ----------------------------------------------------------------------------
# Stateless samplers and cropping.
# ----------------------------------------------------------------------------


def _seed_keys(seed: int, process_index: int) -> Dict[str, tf.Tensor]:
  state = np.random.SeedSequence([seed, process_index]).generate_state(8, np.uint64)
  keys = (state >> np.uint64(1)).astype(np.int64).reshape(4, 2)
  return {name: tf.constant(k) for name, k in
          zip(('class', 'member', 'uniform', 'crop'), keys)}


def _fold_in(key, *data):
  for d in data:
    key = tf.random.experimental.stateless_fold_in(key, tf.cast(d, tf.int64))
  return key


def _shuffle(i, key, n):
  return tf.random.experimental.index_shuffle(i, key, tf.cast(n, tf.int64) - 1)


class _BalancedSampler:
  """k -> position in `records`; see the module docstring."""

  def __init__(self, index: common.ExampleIndex, records: np.ndarray,
               num_classes: int, keys):
    members = [[] for _ in range(num_classes)]
    for pos, rec in enumerate(records):
      for c in index.labels_of(int(rec)):
        members[c].append(pos)
    self.class_ids = np.array([c for c in range(num_classes) if members[c]],
                              np.int64)
    if not len(self.class_ids):
      raise ValueError('Balanced sampling needs labelled examples; none found.')
    counts = np.array([len(members[c]) for c in self.class_ids], np.int64)
    self._counts = tf.constant(counts)
    self._offsets = tf.constant(np.concatenate([[0], np.cumsum(counts)[:-1]]))
    self._members = tf.constant(np.concatenate(
        [members[c] for c in self.class_ids]).astype(np.int64))
    self._class_ids = tf.constant(self.class_ids)
    self._keys = keys

  def __call__(self, k):
    num = tf.constant(len(self.class_ids), tf.int64)
    epoch, j = k // num, k % num
    slot = _shuffle(j, _fold_in(self._keys['class'], epoch), num)
    c = tf.gather(self._class_ids, slot)
    n = tf.gather(self._counts, slot)
    member_key = _fold_in(self._keys['member'], c, epoch // n)
    m = _shuffle(epoch % n, member_key, n)
    return tf.gather(self._members, tf.gather(self._offsets, slot) + m)


class _UniformSampler:

  def __init__(self, num: int, keys):
    if num == 0:
      raise ValueError('No examples to sample from.')
    self._num, self._keys = num, keys

  def __call__(self, k):
    n = tf.constant(self._num, tf.int64)
    return _shuffle(k % n, _fold_in(self._keys['uniform'], k // n), n)


def _fit(audio, length: int, offset):
  audio = audio[offset:offset + length]
  audio = tf.pad(audio, [[0, length - tf.shape(audio)[0]]])
  return tf.ensure_shape(audio, [length])


def _finish(el, length, num_classes, crop_key=None):
  """Crops/pads audio and makes multi-hot labels of one example."""
  audio = el['audio']
  if crop_key is None:  # Evaluation: keep the start (as the packer does).
    offset = tf.constant(0, tf.int64)
  else:
    excess = tf.maximum(tf.cast(tf.shape(audio)[0], tf.int64) - length, 0)
    offset = tf.random.stateless_uniform(
        [], _fold_in(crop_key, el['k']), minval=0, maxval=excess + 1,
        dtype=tf.int64)
  labels = tf.minimum(tf.reduce_sum(
      tf.one_hot(el['label_ids'], num_classes, dtype=tf.float32), 0), 1.0)
  out = {'audio': _fit(audio, length, offset), 'labels': labels}
  for key in ('mask', 'record'):
    if key in el:
      out[key] = el[key]
  return out


def _to_float(batch):
  return dict(batch, audio=tf.cast(batch['audio'], tf.float32) / 32768.0)


def _options(deterministic: bool = True) -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = deterministic
  options.experimental_optimization.map_parallelization = True
  return options


# ----------------------------------------------------------------------------
# Iterators.
# ----------------------------------------------------------------------------


class TrainIterator:
  """Endless iterator of training batches (numpy dicts) with a tiny state.

  The state is {'step': batches handed out, ...}: restoring rebuilds the
  pipeline at stream position step * batch_size, which is O(1). Save it next to
  the train state (`get_state()` is JSON-able; `save`/`restore` write a file).
  """

  def __init__(self, source: Source, *, batch_size: int, clip_samples: int,
               balanced: bool, seed: int, records: np.ndarray,
               process_index: int, with_record: bool = False,
               prefetch: int = 2,
               num_parallel_calls: int = tf.data.AUTOTUNE):
    self.source, self.batch_size = source, int(batch_size)
    self.clip_samples, self.balanced, self.seed = int(clip_samples), balanced, int(seed)
    self.records = records
    self._keys = _seed_keys(seed, process_index)
    self._sampler = (_BalancedSampler(source.index, records, source.num_classes,
                                      self._keys)
                     if balanced else _UniformSampler(len(records), self._keys))
    self._with_record = with_record
    self._prefetch, self._npc = prefetch, num_parallel_calls
    self._records_tf = tf.constant(records, tf.int64)
    self._step = 0
    self._it: Optional[Iterator[Batch]] = None

  @property
  def num_classes(self) -> int:
    return self.source.num_classes

  def dataset(self, start_step: int = 0) -> tf.data.Dataset:
    """The tf.data pipeline from batch `start_step` on."""
    start = start_step * self.batch_size
    ds = tf.data.Dataset.range(start, np.iinfo(np.int64).max)
    ds = ds.map(lambda k: {'k': k, 'record': tf.gather(
        self._records_tf, self._sampler(k))},
                num_parallel_calls=self._npc, deterministic=True)
    ds = self.source.read(ds, self._npc)
    ds = ds.map(lambda el: _finish(el, self.clip_samples, self.num_classes,
                                   self._keys['crop']),
                num_parallel_calls=self._npc, deterministic=True)
    if not self._with_record:
      ds = ds.map(lambda el: {k: v for k, v in el.items() if k != 'record'})
    ds = ds.batch(self.batch_size, drop_remainder=True).map(_to_float)
    return ds.prefetch(self._prefetch).with_options(_options())

  def __iter__(self) -> 'TrainIterator':
    return self

  def __next__(self) -> Batch:
    if self._it is None:
      self._it = self.dataset(self._step).as_numpy_iterator()
    batch = next(self._it)
    self._step += 1
    return batch

  def _fingerprint(self) -> Dict[str, Any]:
    return {'seed': self.seed, 'balanced': self.balanced,
            'batch_size': self.batch_size, 'num_records': int(len(self.records)),
            'clip_samples': self.clip_samples}

  def get_state(self) -> Dict[str, Any]:
    return {'version': _STATE_VERSION, 'step': self._step, **self._fingerprint()}

  def set_state(self, state: Mapping[str, Any]) -> None:
    """Continues the stream after batch `state['step']` (same config only)."""
    mismatch = {k: (state.get(k), v) for k, v in self._fingerprint().items()
                if state.get(k) != v}
    if mismatch:
      raise ValueError(f'Iterator state is for another pipeline: {mismatch} '
                       '(saved, current)')
    self._step = int(state['step'])
    self._it = None

  def save(self, path: str) -> None:
    with tf.io.gfile.GFile(path, 'w') as f:
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

  def __init__(self, source: Source, *, batch_size: int, clip_samples: int,
               records: np.ndarray, max_records_per_host: int,
               fallback_record: int, with_record: bool = False,
               num_parallel_calls: int = tf.data.AUTOTUNE):
    self.source, self.batch_size, self.clip_samples = source, batch_size, clip_samples
    self.records = records
    self.num_batches = -(-max_records_per_host // batch_size)
    self._fallback = fallback_record
    self._with_record, self._npc = with_record, num_parallel_calls

  @property
  def num_examples(self) -> int:
    return len(self.records)

  def dataset(self) -> tf.data.Dataset:
    n = len(self.records)
    padded = np.full(self.num_batches * self.batch_size, self._fallback, np.int64)
    padded[:n] = self.records
    mask = np.arange(len(padded)) < n
    ds = tf.data.Dataset.from_tensor_slices({'record': padded, 'mask': mask})
    ds = self.source.read(ds, self._npc)
    ds = ds.map(lambda el: _finish(el, self.clip_samples,
                                   self.source.num_classes),
                num_parallel_calls=self._npc, deterministic=True)

    def zero_padding(el):
      keep = tf.cast(el['mask'], tf.float32)
      out = dict(el, labels=el['labels'] * keep,
                 audio=el['audio'] * tf.cast(el['mask'], tf.int16))
      if not self._with_record:
        del out['record']
      return out

    ds = ds.map(zero_padding).batch(self.batch_size).map(_to_float)
    return ds.prefetch(2).with_options(_options())

  def __iter__(self) -> Iterator[Batch]:
    return self.dataset().as_numpy_iterator()

  def __len__(self) -> int:
    return self.num_batches


def _local_batch(batch_size: int, process_count: int) -> int:
  if batch_size % process_count:
    raise ValueError(f'Global batch {batch_size} not divisible by '
                     f'{process_count} processes.')
  return batch_size // process_count


def make_train_iterator(
    dataset: Union[str, tfds.core.DatasetBuilder, Source],
    split: str = 'train',
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
) -> TrainIterator:
  """Endless training batches of this host.

  Args:
    dataset: TFDS name (e.g. 'audioset/32k', 'panns_demo'), builder or Source.
    split: e.g. 'balanced_train', 'unbalanced_train', 'train'.
    batch_size: global batch; each host gets batch_size / process_count.
    clip_samples: random crop (or zero-pad at the end) to this many samples.
    balanced: the paper's class-balanced sampler; False: uniform shuffling.
    seed: stream seed (the host index is folded in).
    data_dir: TFDS data dir.
    folds: keep only examples whose `fold` is in this list (ESC-50, GTZAN...).
    process_index, process_count: default to jax.process_index()/count().
    with_record: also return 'record' (int64 [B], the record id) per example.

  Returns:
    A TrainIterator yielding {'audio': f32 [B, clip_samples] in [-1, 1),
    'labels': f32 multi-hot [B, C]}.
  """
  process_index, process_count = _process(process_index, process_count)
  source = make_source(dataset, split, data_dir)
  records = select_records(source.index, folds=folds,
                           process_index=process_index,
                           process_count=process_count)
  return TrainIterator(
      source, batch_size=_local_batch(batch_size, process_count),
      clip_samples=clip_samples, balanced=balanced, seed=seed, records=records,
      process_index=process_index, with_record=with_record, prefetch=prefetch,
      num_parallel_calls=num_parallel_calls)


def make_eval_iterator(
    dataset: Union[str, tfds.core.DatasetBuilder, Source],
    split: str = 'eval',
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
      raise ValueError('Clips vary in length: pass clip_samples.')
    clip_samples = source.fixed_length
  shards = [select_records(source.index, folds=folds, process_index=i,
                           process_count=process_count)
            for i in range(process_count)]
  non_empty = [s for s in shards if len(s)]
  if not non_empty:
    raise ValueError(f'No examples selected in {split}.')
  return EvalIterable(
      source, batch_size=_local_batch(batch_size, process_count),
      clip_samples=clip_samples, records=shards[process_index],
      max_records_per_host=max(len(s) for s in shards),
      fallback_record=int(non_empty[0][0]), with_record=with_record)
