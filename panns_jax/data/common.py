"""Machinery shared by the panns_jax TFDS builders.

Every builder here

* writes ArrayRecord files by default (random access is what the balanced
  sampler needs, see sampling.py) with `disable_shuffling`, so records are in
  the order of their integer keys (the order of the source csv / folder walk);
* counts bad inputs (missing, empty or corrupt audio, unknown labels), logs
  each by name, skips it, and fails the build only past `max_bad_fraction`;
* saves an *example index* in `info.metadata`: the label ids (and small integer
  columns such as `fold`) of every stored example, in record order, so the
  pipeline can build per-class streams and fold filters without reading audio.
"""

from __future__ import annotations

import base64
import collections
import concurrent.futures
import dataclasses
import inspect
import io
import itertools
import os
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from etils import epath
from tensorflow_datasets.core import writer as tfds_writer

from panns_jax.data import audio_io

DEFAULT_MAX_BAD_FRACTION = 0.05
# Integer per-example features copied into the example index (for filtering).
INDEX_COLUMNS = ("fold", "actor")
# Bad inputs logged at WARNING by name; the rest of a split at INFO.
_MAX_WARNINGS_PER_SPLIT = 50
SAMPLE_RATES = (32000, 16000, 8000)


class BadExample(ValueError):
    """One input that must be skipped. The message names it and says why."""


class TooManyBadExamplesError(RuntimeError):
    """More than `max_bad_fraction` of a split's inputs were unusable."""


@dataclasses.dataclass
class BadDataTracker:
    """Counts and logs the skipped inputs of one split, and enforces the budget."""

    builder: str
    split: str
    max_bad_fraction: float
    total: int = 0
    bad: List[Tuple[str, str]] = dataclasses.field(default_factory=list)

    def add_good(self) -> None:
        """Count one usable input."""
        self.total += 1

    def add_bad(self, name: str, reason: str) -> None:
        """Count and log one skipped input."""
        self.total += 1
        self.bad.append((name, reason))
        level = logging.WARNING if len(self.bad) <= _MAX_WARNINGS_PER_SPLIT else logging.INFO
        logging.log(level, "%s/%s: skipping %s: %s", self.builder, self.split, name, reason)

    def finish(self) -> Dict[str, Any]:
        """Logs the summary and returns the report.

        Raises TooManyBadExamplesError past the budget.
        """
        frac = len(self.bad) / max(self.total, 1)
        reasons = collections.Counter(r.split(":")[0] for _, r in self.bad)
        msg = (
            f"{self.builder}/{self.split}: skipped {len(self.bad)} of "
            f"{self.total} inputs ({100 * frac:.2f}%; budget "
            f"{100 * self.max_bad_fraction:.2f}%)"
        )
        if self.bad:
            logging.warning("%s; by reason: %s", msg, dict(reasons))
        else:
            logging.info(msg)
        if self.total == 0:
            raise TooManyBadExamplesError(f"{self.builder}/{self.split}: no inputs found")
        if frac > self.max_bad_fraction:
            raise TooManyBadExamplesError(
                msg
                + ". First ones: "
                + "; ".join(f"{n} ({r})" for n, r in self.bad[:10])
                + ". Fix the inputs or raise max_bad_fraction."
            )
        return {
            "total": self.total,
            "skipped": len(self.bad),
            "skipped_names": [n for n, _ in self.bad[:1000]],
        }


class ExampleIndex:
    """Labels and integer columns of every example of a split, in record order.

    Labels are ragged (multi-label): `labels[offsets[i]:offsets[i+1]]`.
    """

    def __init__(
        self, labels: Sequence[Sequence[int]], columns: Optional[Mapping[str, Sequence[int]]] = None
    ):
        lengths = np.array([len(l) for l in labels], np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        self.flat_labels = (
            np.concatenate([np.asarray(l, np.int32) for l in labels])
            if len(labels)
            else np.zeros([0], np.int32)
        )
        self.columns = {k: np.asarray(v, np.int64) for k, v in (columns or {}).items()}

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def labels_of(self, i: int) -> np.ndarray:
        """The label ids of example i."""
        return self.flat_labels[self.offsets[i] : self.offsets[i + 1]]

    def label_lists(self) -> List[np.ndarray]:
        """The label ids of every example."""
        return np.split(self.flat_labels, self.offsets[1:-1])

    def encode(self) -> str:
        """The index as text for ``info.metadata``: a base64 compressed npz."""
        buf = io.BytesIO()
        np.savez_compressed(
            buf,
            offsets=self.offsets,
            flat_labels=self.flat_labels,
            **{"col_" + k: v for k, v in self.columns.items()},
        )
        return base64.b64encode(buf.getvalue()).decode("ascii")

    @classmethod
    def decode(cls, text: str) -> "ExampleIndex":
        """The index that :meth:`encode` wrote as ``text``."""
        with np.load(io.BytesIO(base64.b64decode(text))) as z:
            index = cls([])
            index.offsets = z["offsets"]
            index.flat_labels = z["flat_labels"]
            index.columns = {k[4:]: z[k] for k in z.files if k.startswith("col_")}
        return index


def index_key(split: str) -> str:
    """The ``info.metadata`` key of a split's example index."""
    return f"example_index/{split}"


def _labels_of_example(example: Mapping[str, Any]) -> List[int]:
    if "labels" in example:
        return [int(l) for l in example["labels"]]
    return [int(example["label"])]


Candidate = Tuple[str, Callable[[], Dict[str, Any]]]


def ordered_parallel_map(
    fn: Callable[[Any], Any], items: Iterable[Any], num_workers: int
) -> Iterator[Tuple[Any, Any]]:
    """Yields (item, fn(item) or the exception it raised), in input order.

    Threads suffice: decoding (libsndfile) and resampling (soxr) release the GIL.
    The window of pending work is bounded so memory stays flat on 2M clips.
    """

    def call(item):
        try:
            return fn(item)
        except Exception as e:  # pylint: disable=broad-except
            return e

    if num_workers <= 1:
        for item in items:
            yield item, call(item)
        return
    with concurrent.futures.ThreadPoolExecutor(num_workers) as pool:
        pending = collections.deque()
        it = iter(items)
        for item in itertools.islice(it, 4 * num_workers):
            pending.append((item, pool.submit(call, item)))
        while pending:
            item, fut = pending.popleft()
            for nxt in itertools.islice(it, 1):
                pending.append((nxt, pool.submit(call, nxt)))
            yield item, fut.result()


@dataclasses.dataclass
class AudioConfig(tfds.core.BuilderConfig):
    """Sample rate of the stored int16 audio."""

    sample_rate: int = 32000


def rate_configs(cls: type[AudioConfig] = AudioConfig, **kwargs: Any) -> List[AudioConfig]:
    """One config per supported rate: '32k' (default), '16k', '8k'."""
    return [
        cls(
            name=f"{sr // 1000}k",
            sample_rate=sr,
            description=f"Mono int16 audio at {sr} Hz.",
            **kwargs,
        )
        for sr in SAMPLE_RATES
    ]


class _UncompressedArrayRecordWriter(tfds_writer.ExampleWriter):
    """Writes ArrayRecord without compression.

    TFDS writes zstd:3, which shrinks 16-bit audio by only ~10-20% but makes
    every random read decompress the clip: ~1 ms of CPU per 10 s clip, more than
    the whole rest of the input pipeline (benchmarks/input_pipeline.py).
    """

    def write(self, path, examples):
        if self.file_format != tfds.core.FileFormat.ARRAY_RECORD:
            return super().write(path, examples)
        from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top

        writer = array_record_module.ArrayRecordWriter(os.fspath(path), "group_size:1,uncompressed")
        for _, serialized in examples:
            writer.write(serialized)
        writer.close()
        return None


class PannsBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base of the panns_jax builders (see the module docstring).

    Subclasses implement `_info_kwargs()`, which returns the features and the other
    DatasetInfo arguments, and `_split_generators`, which returns
    `self._generate_examples(split, candidates)` per split. `candidates` yields
    `(name, make_example)` pairs. `make_example()` returns the example dict, or raises
    BadExample or AudioDecodeError for an input to skip.
    """

    def __init__(
        self,
        *,
        max_bad_fraction: Optional[float] = None,
        num_workers: Optional[int] = None,
        file_format: Optional[str] = None,
        **kwargs: Any,
    ):
        super().__init__(file_format=file_format, **kwargs)
        if file_format is None and not self.data_path.exists():
            # Default to ArrayRecord (random access); an existing dataset keeps the
            # format recorded in its dataset_info.json.
            self.info.set_file_format("array_record", override=True)
        self.max_bad_fraction = (
            DEFAULT_MAX_BAD_FRACTION if max_bad_fraction is None else float(max_bad_fraction)
        )
        self.num_workers = num_workers or min(8, os.cpu_count() or 1)
        self.bad_data_report: Dict[str, Dict[str, Any]] = {}

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> Optional[epath.Path]:
        # TFDS's own lookup needs the `importlib_resources` backport on Python >= 3.9
        # (a TFDS bug; it is not installed): the source file is all it needs.
        return epath.Path(inspect.getfile(cls))

    def _info_kwargs(self) -> Dict[str, Any]:
        raise NotImplementedError

    def _example_writer(self) -> tfds_writer.ExampleWriter:
        return _UncompressedArrayRecordWriter(file_format=self.info.file_format)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            disable_shuffling=True,
            metadata=tfds.core.MetadataDict(sample_rate=self.sample_rate),
            **self._info_kwargs(),
        )

    @property
    def sample_rate(self) -> int:
        return self.builder_config.sample_rate

    @property
    def clip_samples(self) -> Optional[int]:
        """Samples per clip of a fixed-length set (its config's ``clip_seconds``), else None."""
        seconds = getattr(self.builder_config, "clip_seconds", None)
        return None if seconds is None else int(round(seconds * self.sample_rate))

    def _tagging_info(self, class_names: Sequence[str], **more: Any) -> Dict[str, Any]:
        """The ``_info_kwargs`` of a multi-label tagging set of fixed-length clips.

        Its features are ``audio``, ``labels`` (any number of ``class_names``) and
        ``audio_id``.
        """
        return dict(
            description=type(self).__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "audio": audio_feature(self.sample_rate, self.clip_samples),
                    "labels": tfds.features.Sequence(tfds.features.ClassLabel(names=class_names)),
                    "audio_id": tfds.features.Text(),
                }
            ),
            supervised_keys=("audio", "labels"),
            **more,
        )

    def example_index(self, split: str) -> Optional[ExampleIndex]:
        """The stored example index of a prepared split (None if absent)."""
        text = (self.info.metadata or {}).get(index_key(split))
        return ExampleIndex.decode(text) if text else None

    def _generate_examples(self, split: str, candidates: Iterable[Candidate]):
        """Decodes candidates in parallel, skips bad ones, records the index."""
        tracker = BadDataTracker(self.name, split, self.max_bad_fraction)
        labels, columns = [], collections.defaultdict(list)
        key = 0
        for (name, _), result in ordered_parallel_map(
            lambda c: c[1](), candidates, self.num_workers
        ):
            if isinstance(result, audio_io.AudioDecodeError):
                kind = "missing" if "no such file" in str(result) else "bad audio"
                tracker.add_bad(name, f"{kind}: {result}")
                continue
            if isinstance(result, BadExample):
                tracker.add_bad(name, str(result))
                continue
            if isinstance(result, Exception):
                tracker.add_bad(name, f"unexpected error: {result!r}")
                continue
            tracker.add_good()
            labels.append(_labels_of_example(result))
            for col in INDEX_COLUMNS:
                if col in result:
                    columns[col].append(int(result[col]))
            yield key, result
            key += 1
        report = tracker.finish()
        self.bad_data_report[split] = report
        self.info.metadata[f"bad_data/{split}"] = report
        self.info.metadata[index_key(split)] = ExampleIndex(labels, columns).encode()


def path_below(root: str, relative: Any) -> str:
    """`root/relative` for a file named by a dataset's csv.

    Raises BadExample for a name that is not a file below `root`. A csv row must not make
    a build read files elsewhere, so absolute paths and `..` escapes are refused. The
    check is on the normalised path, so symlinks inside the download that point
    elsewhere work.
    """
    if not isinstance(relative, str) or not relative.strip():
        raise BadExample(f"malformed csv row: file name {relative!r}")
    joined = os.path.normpath(os.path.join(root, relative))
    base = os.path.normpath(root)
    if os.path.isabs(relative) or "\0" in relative or os.path.commonpath([base, joined]) != base:
        raise BadExample(
            f"outside manual_dir: {relative!r} is not a file below {base}; "
            "fix the csv (file names are relative to that folder)"
        )
    return joined


def audio_feature(sample_rate: int, length: Optional[int]) -> tfds.features.Tensor:
    """int16 mono samples stored as raw bytes, so that decoding is one memcpy.

    It is a plain Tensor rather than tfds.features.Audio, because Audio ignores BYTES
    encoding (TFDS 4.9) and the default int64-list encoding triples size and parse time.
    The rate is in the description and in `info.metadata['sample_rate']`.
    """
    return tfds.features.Tensor(
        shape=(length,),
        dtype=np.int16,
        encoding=tfds.features.Encoding.BYTES,
        doc=f"Mono 16-bit PCM at {sample_rate} Hz (full scale 32768).",
    )


def index_audio_files(root: str, exclude_dirs: Sequence[str] = ()) -> Dict[str, List[str]]:
    """Maps file stem -> paths of every audio file below `root` (sorted walk)."""
    found = collections.defaultdict(list)
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in exclude_dirs)
        for fn in sorted(filenames):
            stem, ext = os.path.splitext(fn)
            if ext.lower() in audio_io.AUDIO_EXTENSIONS:
                found[stem].append(os.path.join(dirpath, fn))
    return found
