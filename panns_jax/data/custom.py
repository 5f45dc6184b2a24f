"""Your own labelled audio as a dataset: a folder per class, or a manifest (CSV or TSV).

    DATA/<class name>/**/<audio>       single-label; the classes are the folder names
    DATA/labels.csv                    columns file, label[, fold | split]

A manifest's ``file`` is relative to the manifest's folder (DATA); a ``label`` of several
names separated by ``;`` makes the task multi-label. A ``fold`` column (1..K) gives K-fold
cross-validation, a ``split`` column (``train`` / ``valid`` / ``test``) fixed splits; without
either, a seeded hold-out of ``holdout`` of each class's files validates.

:func:`scan` reads the layout without decoding a sample: it probes each file's header,
counts, names and skips unusable files (missing, empty, unreadable, outside DATA), and
raises :class:`panns_jax.recipe.ConfigError` (one line) for data nothing can be trained on.
:func:`register` makes the scan a config of the ``custom_audio`` TFDS builder, named by the
data, a fingerprint of its files (paths, sizes, modification times, the manifest's bytes)
and the sample rate: a build is reused until a file changes, and then made anew.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import hashlib
import io
import json
import os
import re
import sys
import threading
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from panns_jax import audio, tasks
from panns_jax.data import audio_io, common
from panns_jax.recipe import ConfigError

NAME = "custom_audio"
SPLITS = ("train", "valid", "test")
DEFAULT_HOLDOUT = 0.1
MANIFEST_EXTENSIONS = (".csv", ".tsv", ".txt")
# What scan() probes. Formats libsndfile reads are checked here; the others (m4a, webm, ...)
# decode through librosa's backends, which only the build runs.
_MAX_NAMED = 5  # Skipped files named in an error.


@dataclasses.dataclass(frozen=True)
class Entry:
    """One usable recording: its path below the root, label ids, fold (0: none) and split."""

    path: str
    labels: Tuple[int, ...]
    fold: int = 0
    split: str = "train"


@dataclasses.dataclass
class Scan:
    """What :func:`scan` found in DATA: the classes, the usable recordings and their
    partition, the skipped files and the fingerprint of it all."""

    source: str  # What the user named: the folder or the manifest.
    root: str  # The real path every file lies below.
    classes: Tuple[str, ...]
    task: str  # tasks.SINGLELABEL or tasks.MULTILABEL
    partition: str  # 'holdout', 'split' or 'folds'
    entries: Tuple[Entry, ...]
    num_folds: int
    skipped: List[Tuple[str, str]]
    durations: List[float]  # Seconds of the files whose header says.
    fingerprint: str

    @property
    def splits(self) -> Tuple[str, ...]:
        """The splits of the build, in SPLITS order."""
        present = {e.split for e in self.entries}
        return tuple(s for s in SPLITS if s in present)

    @property
    def eval_split(self) -> str:
        """The split that validates: 'valid', else 'test', else (folds) 'train'."""
        return next((s for s in ("valid", "test") if s in self.splits), "train")

    def counts(self, split: Optional[str] = None) -> np.ndarray:
        """Recordings per class (of one split, or all)."""
        counts = np.zeros(len(self.classes), np.int64)
        for e in self.entries:
            if split is None or e.split == split:
                counts[list(e.labels)] += 1
        return counts

    def slug(self) -> str:
        """A short name of the data for its build directory: ``<name>-<hash of the path>``."""
        base = os.path.splitext(os.path.basename(os.path.normpath(self.source)))[0]
        name = re.sub(r"[^A-Za-z0-9_]+", "_", base).strip("_").lower()[:32] or "data"
        return f"{name}-{hashlib.sha256(self.root.encode()).hexdigest()[:8]}"


# ----------------------------------------------------------------------------
# Reading the layout.
# ----------------------------------------------------------------------------


@dataclasses.dataclass
class _Row:
    """One candidate recording before the partition: where, what, which fold or split."""

    name: str  # How messages name it: the manifest's file name, or the path below DATA.
    path: str
    labels: Tuple[str, ...]
    fold: str = ""
    split: str = ""
    stat: Tuple[int, int] = (0, 0)  # Size and modification time (ns): the fingerprint's.


def _inside(root: str, relative: str) -> str:
    """The real path of ``root/relative``; BadExample if it is not a file below ``root``.

    Symbolic links are resolved first, so neither ``..`` nor a link leads outside DATA.
    """
    if _text(relative) != relative:
        raise common.BadExample("bad name: the file name is not UTF-8 text; rename the file")
    if not relative.strip() or "\0" in relative or os.path.isabs(relative):
        raise common.BadExample(f"outside DATA: {relative!r} is not a path below {root}")
    real = os.path.realpath(os.path.join(root, relative))
    if os.path.commonpath([root, real]) != root:
        raise common.BadExample(f"outside DATA: {relative!r} leads to {real}, not below {root}")
    if not os.path.exists(real):
        raise common.BadExample(f"missing: no such file {relative!r}")
    if not os.path.isfile(real):
        raise common.BadExample(f"missing: {relative!r} is not a file")
    return real


def _probe(path: str) -> Optional[float]:
    """Seconds of audio in ``path`` (None when only decoding can tell); BadExample for a file
    that is empty or that libsndfile cannot read although it should."""
    import soundfile as sf

    if os.path.getsize(path) == 0:
        raise common.BadExample("bad audio: empty file (0 bytes)")
    try:
        info = sf.info(path)
        audio.check_rate(os.path.basename(path), info.samplerate)
    except audio.AudioError as err:
        raise common.BadExample(f"bad audio: {err}") from None
    except Exception as err:  # pylint: disable=broad-except
        extension = os.path.splitext(path)[1].lower()
        mp3 = extension == ".mp3" and "MP3" in sf.available_formats()  # libsndfile >= 1.1
        if extension in audio.SOUNDFILE_EXTENSIONS or mp3:
            why = str(err).split("': ", 1)[-1]  # libsndfile's reason, without the path.
            raise common.BadExample(f"bad audio: not readable ({why})") from None
        return None
    if info.frames <= 0:
        raise common.BadExample("bad audio: contains no audio samples")
    return info.frames / info.samplerate


def _text(path: str) -> str:
    """A path as valid UTF-8 text (a file name of other bytes gets replacement characters)."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _is_audio(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in (
        audio_io.AUDIO_EXTENSIONS
    )


def _folder_rows(root: str) -> List[_Row]:
    """One row per audio file of ``root/<class>/**``; a class folder without any is an error."""
    try:
        listed = list(os.scandir(root))
    except OSError as err:
        raise ConfigError(f"{root} cannot be listed: {err.strerror or err}") from None
    classes = sorted(d.name for d in listed if d.is_dir() and not d.name.startswith("."))
    rows: List[_Row] = []
    for name in classes:
        if not name.isprintable():
            raise ConfigError(f"class folder {name!r} has an unprintable name: rename it")
        found = []
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, name)):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            found += [os.path.join(dirpath, f) for f in sorted(filenames) if _is_audio(f)]
        if not found:
            raise ConfigError(
                f"class {name!r} ({os.path.join(root, name)}) holds no audio file "
                f"({', '.join(audio_io.AUDIO_EXTENSIONS[:4])}, ...): add recordings or "
                "remove the folder"
            )
        for path in found:
            relative = os.path.relpath(path, root)
            rows.append(_Row(relative, relative, (name,)))
    if not rows:
        raise ConfigError(
            f"{root} holds no class folders with audio files (DATA/<class name>/<file>.wav, "
            "...): put each class's recordings in a folder named after it, or pass a CSV/TSV "
            "manifest"
        )
    return rows


def _manifest_table(path: str) -> Tuple[Dict[str, int], List[List[str]], bytes]:
    """The columns (lower-case name -> index), the rows and the bytes of a manifest.

    Tab-separated if its header holds a tab, else comma-separated.
    """
    try:
        with open(path, "rb") as f:
            raw = f.read()
        text = raw.decode("utf-8-sig")
        header = text.splitlines()[0] if text.strip() else ""
        rows = list(csv.reader(io.StringIO(text), delimiter="\t" if "\t" in header else ","))
    except UnicodeDecodeError as err:
        raise ConfigError(f"manifest {path} is not UTF-8 text ({err}): save it as UTF-8") from None
    except (OSError, csv.Error) as err:  # Unreadable, a NUL byte, a field past csv's limit.
        raise ConfigError(f"manifest {path} cannot be read as CSV/TSV: {err}") from None
    columns = {c.strip().lower(): i for i, c in enumerate(rows[0])} if rows else {}
    missing = [c for c in ("file", "label") if c not in columns]
    if missing:
        raise ConfigError(
            f"manifest {path}: its header has no {' and no '.join(missing)} column (found "
            f"{sorted(columns)}); the first line must name the columns, e.g. file,label"
        )
    if "fold" in columns and "split" in columns:
        raise ConfigError(f"manifest {path} has both a fold and a split column: keep one")
    return columns, rows[1:], raw


def _manifest_rows(path: str) -> Tuple[List[_Row], List[Tuple[str, str]], bytes, Optional[str]]:
    """The rows of a manifest, the malformed ones (no file or no label) to skip, its bytes
    and its partition column (``fold``, ``split`` or None)."""
    columns, table, raw = _manifest_table(path)
    rows, bad = [], []

    def cell(row: List[str], column: str) -> str:
        index = columns.get(column)
        return row[index].strip() if index is not None and index < len(row) else ""

    for number, row in enumerate(table, start=2):
        if not any(c.strip() for c in row):
            continue
        file = cell(row, "file")
        labels = tuple(dict.fromkeys(l.strip() for l in cell(row, "label").split(";")))
        labels = tuple(l for l in labels if l)
        name = file or f"line {number}"
        if not file or not labels or not all(l.isprintable() for l in labels):
            bad.append((name, f"malformed row: line {number} needs a file and a label"))
            continue
        rows.append(_Row(name, file, labels, cell(row, "fold"), cell(row, "split").lower()))
    if not rows and not bad:
        raise ConfigError(f"manifest {path} lists no recordings: add a row per file")
    return rows, bad, raw, next((c for c in ("fold", "split") if c in columns), None)


def _check_rows(root: str, rows: List[_Row]) -> Tuple[List[_Row], List[Any], List[float]]:
    """The usable rows, the skipped ones (name, why) and the known durations."""
    good, bad, durations = [], [], []
    for row in rows:
        try:
            real = _inside(root, row.path)
            seconds = _probe(real)
        except common.BadExample as err:
            bad.append((_text(row.name), str(err)))
            continue
        stat = os.stat(real)
        relative = os.path.relpath(real, root)
        good.append(dataclasses.replace(row, path=relative, stat=(stat.st_size, stat.st_mtime_ns)))
        durations += [] if seconds is None else [seconds]
    return good, bad, durations


def _check_budget(source: str, total: int, bad: List[Tuple[str, str]], budget: float) -> None:
    """ConfigError naming the first unusable files when more than ``budget`` of them are;
    else each skipped file is logged by name."""
    if total and len(bad) / total > budget:
        named = "; ".join(f"{n} ({why})" for n, why in bad[:_MAX_NAMED])
        raise ConfigError(
            f"{source}: {len(bad)} of {total} recordings unusable ({100 * len(bad) / total:.0f}%"
            f", more than max_bad_fraction {100 * budget:.0f}%): {named}"
            f"{' ...' if len(bad) > _MAX_NAMED else ''}; fix or remove them, or raise "
            "max_bad_fraction"
        )
    for name, why in bad:
        logging.warning("%s: skipping %s: %s", source, name, why)


def _classes(source: str, rows: List[_Row], good: List[_Row], bad: List[Any]) -> Tuple[str, ...]:
    """The sorted class names; ConfigError for a class left without a readable file or for a
    single class."""
    usable = {l for r in good for l in r.labels}
    for name in sorted({l for r in rows for l in r.labels} - usable):
        files = {r.name for r in rows if name in r.labels}
        named = "; ".join(f"{n} ({why})" for n, why in bad if n in files)
        raise ConfigError(
            f"{source}: class {name!r} has no readable file ({named[:300]}): add readable "
            "recordings of it or remove it"
        )
    if not usable:
        raise ConfigError(f"{source} holds no usable recording: see the files it names above")
    if len(usable) < 2:
        raise ConfigError(
            f"{source} holds one class only ({', '.join(map(repr, sorted(usable)))}): a "
            "classifier needs at least two; add recordings of other classes"
        )
    return tuple(sorted(usable))


def _folds(source: str, rows: List[_Row], ids: List[Tuple[int, ...]], classes) -> List[Entry]:
    """Entries of a fold column: folds 1..K (K >= 2), each class in two folds at least."""
    values = sorted({r.fold for r in rows})
    wrong = [v for v in values if not (v.isdigit() and int(v) >= 1)]
    if wrong:
        raise ConfigError(
            f"{source}: the fold column holds {wrong[:_MAX_NAMED]}, which are not fold numbers; "
            "number the folds 1, 2, ..., K on every row"
        )
    folds = sorted({int(v) for v in values})
    if len(folds) < 2 or folds != list(range(1, len(folds) + 1)):
        raise ConfigError(
            f"{source}: the fold column holds folds {folds}; use 1..K without gaps, K >= 2"
        )
    entries = [Entry(r.path, i, int(r.fold)) for r, i in zip(rows, ids)]
    seen = collections.defaultdict(set)
    for e in entries:
        for label in e.labels:
            seen[label].add(e.fold)
    for label, where in sorted(seen.items()):
        if len(where) < 2:
            raise ConfigError(
                f"{source}: class {classes[label]!r} is only in fold {min(where)}, so that "
                "fold would test a class never trained: spread each class over two folds or more"
            )
    return entries


def _fixed_splits(source: str, rows: List[_Row], ids, classes) -> List[Entry]:
    """Entries of a split column: train plus valid and/or test, no label unseen in train."""
    unknown = sorted({r.split for r in rows} - set(SPLITS))
    if unknown:
        raise ConfigError(
            f"{source}: the split column holds {unknown[:_MAX_NAMED]}; every row's split must "
            "be train, valid or test"
        )
    entries = [Entry(r.path, i, 0, r.split) for r, i in zip(rows, ids)]
    present = {e.split for e in entries}
    if "train" not in present or present == {"train"}:
        raise ConfigError(
            f"{source}: the split column needs train rows and valid or test rows (it has "
            f"{sorted(present)}); or drop the column for a hold-out of the training files"
        )
    trained = {l for e in entries if e.split == "train" for l in e.labels}
    for e in entries:
        for label in sorted(set(e.labels) - trained):
            raise ConfigError(
                f"{source}: label {classes[label]!r} of {e.split} file {e.path!r} is in no "
                f"train row: add train recordings of {classes[label]!r} or remove it from "
                f"{e.split}"
            )
    return entries


def _holdout(source: str, rows: List[_Row], ids, fraction: float, seed: int) -> List[Entry]:
    """A seeded hold-out, stratified by each file's rarest label: ``fraction`` of each
    class's files (at least one, never all) validate."""
    counts = collections.Counter(l for i in ids for l in i)
    strata = collections.defaultdict(list)
    for n, labels in enumerate(ids):
        strata[min(labels, key=lambda l: (counts[l], l))].append(n)
    rng = np.random.default_rng(seed)
    held = set()
    for label in sorted(strata):
        members = strata[label]
        take = min(len(members) - 1, max(1, int(round(fraction * len(members)))))
        held.update(int(m) for m in rng.permutation(members)[:take])
    trained = {l for n, i in enumerate(ids) if n not in held for l in i}
    held = {n for n in held if set(ids[n]) <= trained}  # Multi-label: nothing unseen.
    if not held:
        raise ConfigError(
            f"{source}: no recording is left to validate (a class needs two files to have "
            "one held out): add recordings, or give a split or fold column"
        )
    return [
        Entry(r.path, i, 0, "valid" if n in held else "train")
        for n, (r, i) in enumerate(zip(rows, ids))
    ]


def _fingerprint(rows: List[_Row], manifest: bytes, holdout: float, seed: int) -> str:
    """sha256 of what a build holds: each file's path, size, time, labels and partition."""
    what = {
        "version": str(CustomAudio.VERSION),
        "rows": [(r.path, r.stat, r.labels, r.fold, r.split) for r in rows],
        "manifest": hashlib.sha256(manifest).hexdigest(),
        "holdout": holdout,
        "seed": seed,
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()


def scan(
    data: str,
    *,
    holdout: float = DEFAULT_HOLDOUT,
    seed: int = 0,
    max_bad_fraction: float = common.DEFAULT_MAX_BAD_FRACTION,
) -> Scan:
    """The classes, usable recordings and partition of ``data`` (a folder per class, or a
    CSV/TSV manifest), without decoding a sample; ConfigError (one line) for bad data."""
    if not 0 < holdout < 1:
        raise ConfigError(f"holdout must be a fraction in (0, 1), got {holdout!r}")
    if not 0 <= max_bad_fraction <= 1:
        raise ConfigError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction!r}")
    raw, column, bad = b"", None, []
    if os.path.isdir(data):
        root = os.path.realpath(data)
        rows = _folder_rows(root)
    elif os.path.isfile(data):
        if _is_audio(os.path.basename(data)):
            raise ConfigError(f"{data} is an audio file: pass the folder of class folders")
        root = os.path.dirname(os.path.realpath(data))
        rows, bad, raw, column = _manifest_rows(data)
    else:
        raise ConfigError(f"{data}: no such folder or manifest file")
    total = len(rows) + len(bad)  # Malformed manifest rows count as bad too.
    good, unusable, durations = _check_rows(root, rows)
    bad += unusable
    if not good:  # Nothing usable: how many and why says more than any class could.
        _check_budget(data, total, bad, max_bad_fraction)
    classes = _classes(data, rows, good, bad)
    _check_budget(data, total, bad, max_bad_fraction)
    ids = [tuple(sorted(classes.index(l) for l in r.labels)) for r in good]
    if column == "fold":
        entries = _folds(data, good, ids, classes)
    elif column == "split":
        entries = _fixed_splits(data, good, ids, classes)
    else:
        entries = _holdout(data, good, ids, holdout, seed)
    multi = any(len(i) > 1 for i in ids)
    return Scan(
        source=data,
        root=root,
        classes=classes,
        task=tasks.MULTILABEL if multi else tasks.SINGLELABEL,
        partition={"fold": "folds", "split": "split"}.get(column, "holdout"),
        entries=tuple(entries),
        num_folds=max((e.fold for e in entries), default=0),
        skipped=bad,
        durations=durations,
        fingerprint=_fingerprint(good, raw, holdout if column is None else 0.0, seed),
    )


# ----------------------------------------------------------------------------
# The TFDS builder: one config per scanned data and sample rate.
# ----------------------------------------------------------------------------


@dataclasses.dataclass
class CustomConfig(common.AudioConfig):
    """A scanned data folder or manifest, at one sample rate."""

    scan: Optional[Scan] = None
    max_bad_fraction: float = common.DEFAULT_MAX_BAD_FRACTION


_REGISTERED: Dict[str, CustomConfig] = {}


def register(
    found: Scan, sample_rate: int, max_bad_fraction: float = common.DEFAULT_MAX_BAD_FRACTION
) -> str:
    """The TFDS name (``custom_audio/<data>-<path hash>-<fingerprint>-<rate>k``) of ``found``
    at ``sample_rate``, known to this process's ``tfds.builder`` from now on."""
    if sample_rate not in common.SAMPLE_RATES:
        raise ConfigError(
            f"the model takes {sample_rate} Hz audio; own data is stored at "
            f"{', '.join(str(r) for r in common.SAMPLE_RATES)} Hz only"
        )
    name = f"{found.slug()}-{found.fingerprint[:12]}-{sample_rate // 1000}k"
    _REGISTERED[name] = CustomConfig(
        name=name,
        sample_rate=sample_rate,
        description=f"{found.source}: mono int16 audio at {sample_rate} Hz.",
        scan=found,
        max_bad_fraction=max_bad_fraction,
    )
    return f"{NAME}/{name}"


def registered_scan(dataset: str) -> Scan:
    """The scan behind a name :func:`register` returned in this process."""
    config = _REGISTERED.get(dataset.split("/", 1)[-1]) if dataset.startswith(NAME) else None
    if config is None:
        raise ConfigError(f"{dataset!r} names no own data registered in this process")
    return config.scan


class CustomAudio(common.PannsBuilder):
    """Your own labelled audio: a folder per class or a manifest (panns_jax.data.custom).

    Each config is one scanned data set at one rate, made by :func:`register`; the features
    are ``audio`` (mono int16 at the file's own length), ``label`` (single-label) or
    ``labels`` (multi-label), ``audio_id`` (the path below DATA) and, with a fold column,
    ``fold``. The splits are those of the scan: train, and valid and/or test.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}

    def __init__(self, *, max_bad_fraction: Optional[float] = None, **kwargs: Any):
        super().__init__(max_bad_fraction=max_bad_fraction, **kwargs)
        if max_bad_fraction is None and self.builder_config is not None:
            self.max_bad_fraction = self.builder_config.max_bad_fraction

    @classmethod
    def get_builder_config(cls, name: str, version: Any = None) -> Optional[CustomConfig]:
        """A config :func:`register` made (TFDS looks configs up by name here)."""
        return _REGISTERED.get(name) or super().get_builder_config(name, version)

    @property
    def sample_rate(self) -> int:
        config = self.builder_config
        return config.sample_rate if config is not None else common.SAMPLE_RATES[0]

    def _scan(self) -> Optional[Scan]:
        return getattr(self.builder_config, "scan", None)

    def _info_kwargs(self) -> Dict[str, Any]:
        found = self._scan()
        names = list(found.classes) if found else []
        key = "labels" if found and found.task == tasks.MULTILABEL else "label"
        label = tfds.features.ClassLabel(names=names)
        features = {
            "audio": common.audio_feature(self.sample_rate, None),
            key: tfds.features.Sequence(label) if key == "labels" else label,
            "audio_id": tfds.features.Text(),
        }
        if found and found.partition == "folds":
            features["fold"] = tfds.features.Scalar(dtype=np.int32)
        return dict(
            description=type(self).__doc__,
            features=tfds.features.FeaturesDict(features),
            supervised_keys=("audio", key),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # The data is the scan's; nothing is downloaded.
        found = self._scan()
        if found is None:
            raise ConfigError(
                f"{NAME} is built from a folder or manifest: run `panns-jax finetune DATA` or "
                "use configs/custom.py:data=DATA"
            )
        self.info.metadata["fingerprint"] = found.fingerprint
        self.info.metadata["source"] = os.path.abspath(found.source)
        return {s: self._generate_examples(s, self._candidates(found, s)) for s in found.splits}

    def _candidates(self, found: Scan, split: str) -> Iterator[common.Candidate]:
        """(path, decode) per recording of ``split``, with a progress bar of decoded files."""
        from tqdm import tqdm

        entries = [e for e in found.entries if e.split == split]
        bar = tqdm(
            total=len(entries), desc=f"decoding {split}", unit="file", file=sys.stderr, disable=None
        )
        lock = threading.Lock()  # The decoding threads count on one bar.
        multi = found.task == tasks.MULTILABEL
        try:
            for entry in entries:

                def make(entry=entry):
                    samples = audio_io.load_int16(_inside(found.root, entry.path), self.sample_rate)
                    example = {"audio": samples, "audio_id": _text(entry.path)}
                    example.update(
                        {"labels": list(entry.labels)} if multi else {"label": entry.labels[0]}
                    )
                    if found.partition == "folds":
                        example["fold"] = entry.fold
                    with lock:
                        bar.update(1)
                    return example

                yield entry.path, make
        finally:
            bar.close()

    def download_and_prepare(self, **kwargs: Any) -> None:  # pylint: disable=arguments-differ
        """TFDS's, with too many undecodable files one ConfigError line."""
        try:
            super().download_and_prepare(**kwargs)
        except common.TooManyBadExamplesError as err:
            raise ConfigError(f"{err}".splitlines()[0]) from None


def prepare(dataset: str, data_dir: Optional[str] = None) -> tfds.core.DatasetBuilder:
    """The builder of a registered ``dataset``, built (decoded, resampled) unless it is.

    A build that fails (too many files that only decoding finds unreadable) raises
    ConfigError and leaves none of the folders it made.
    """
    builder = tfds.builder(dataset, data_dir=data_dir)
    if builder.is_prepared():
        return builder
    root = os.fspath(builder.data_dir_root)
    made = [
        os.path.dirname(os.fspath(builder.data_path)),
        os.path.join(root, NAME),
        os.path.join(root, "downloads", "extracted"),
        os.path.join(root, "downloads"),
        root,
    ]
    made = [d for d in made if not os.path.exists(d)]
    try:
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(try_download_gcs=False)
        )
    except ConfigError:
        for folder in made:  # Innermost first; a folder something else wrote to stays.
            if os.path.isdir(folder) and not os.listdir(folder):
                os.rmdir(folder)
        raise
    return builder


def older_builds(builder: tfds.core.DatasetBuilder) -> List[str]:
    """Builds of the same data at the same rate from files since changed (to delete by hand)."""
    config = builder.builder_config.name
    prefix, rate = config.rsplit("-", 2)[0] + "-", config.rsplit("-", 1)[1]
    parent = os.path.join(os.fspath(builder.data_dir_root), NAME)
    return sorted(
        os.path.join(parent, d)
        for d in (os.listdir(parent) if os.path.isdir(parent) else [])
        if d.startswith(prefix) and d.endswith("-" + rate) and d != config
    )
