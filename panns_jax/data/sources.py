"""Random access to a split's examples: (int16 samples, int32 label ids) by record id.

A `Source` is what the samplers and iterators read from. TFDS datasets written in
ArrayRecord format (the default of the panns_jax builders) are read by random access
(`TfdsSource`). Datasets in TFRecord format and numpy arrays (`ArraySource`) are held
in memory, which suits small sets only.
"""

from __future__ import annotations

import threading
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
from absl import logging

from panns_jax import tf_cpu

tf_cpu.import_tensorflow()  # Keep TF off accelerators (JAX owns them) before TFDS uses it.

import tensorflow_datasets as tfds  # noqa: E402  (after tf_cpu hid the accelerators)

# The builders register themselves with TFDS on import: `get_builder` finds them by name.
from panns_jax.data import audioset, common, panns_demo, transfer  # noqa: E402, F401
from panns_jax.data import records as records_lib  # noqa: E402
from panns_jax.data.records import Example  # noqa: E402


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

    def examples(self, records: np.ndarray) -> Iterator[Example]:
        """The examples of `read`, one at a time: each is valid until the next is asked
        for, which lets a source reuse one read buffer. Thread-safe."""
        yield from self.read(records)


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

    def read(self, records: np.ndarray) -> List[Example]:
        return [(self._audio[r], self._labels[r].astype(np.int32)) for r in records]


class TfdsSource(Source):
    """A prepared ArrayRecord TFDS split, read by random access.

    Records are tf.train.Examples. Their audio bytes are viewed as int16 without going
    through TF ops: one copy from the page cache into a reused buffer, and no
    decompression, since the panns_jax builders write uncompressed ArrayRecord.
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
        """File f's reader: `records.ArrayRecordFile` for what the panns_jax builders
        write (uncompressed, one record per chunk), else array_record's own reader."""
        with self._open_lock:
            if f not in self._readers:
                try:
                    self._readers[f] = records_lib.ArrayRecordFile(self._files[f])
                except ValueError as e:
                    from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top

                    logging.info("Reading %s with array_record: %s", self._files[f], e)
                    self._readers[f] = array_record_module.ArrayRecordReader(
                        self._files[f], "readahead_buffer_size:0"
                    )
            return self._readers[f]

    def _positions(self, records: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """(file, position in that file) of each record id."""
        files = np.searchsorted(self._ends, records, side="right")
        starts = np.concatenate([[0], self._ends[:-1]])
        return files, np.asarray(records, np.int64) - starts[files] + self._skips[files]

    def examples(self, records: np.ndarray) -> Iterator[Example]:
        """Like `read`, one example at a time.

        Each one's audio is valid only until the next is asked for, because it lies in this
        iterator's read buffer, which is reused (in cache, no page faults).
        """
        buffer = bytearray()
        for f, pos in zip(*self._positions(records)):
            reader = self._reader(int(f))
            if isinstance(reader, records_lib.ArrayRecordFile):
                raw = reader.read_into(int(pos), buffer)
                buffer = raw.obj  # Grown if the record did not fit.
            else:
                with self._locks[f]:
                    raw = reader.read([int(pos)])[0]
            yield records_lib.parse_example(raw, self._label_key)

    def read(self, records: np.ndarray) -> List[Example]:
        return [(samples.copy(), ids) for samples, ids in self.examples(records)]


def _num_classes(feature) -> int:
    if isinstance(feature, tfds.features.Sequence):
        feature = feature.feature
    return int(feature.num_classes)


def get_builder(
    name: str, data_dir: Optional[str] = None, **kwargs: Any
) -> tfds.core.DatasetBuilder:
    """`tfds.builder(name)`, prepared first if it needs no download (panns_demo)."""

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
