"""The released PANNs checkpoints: their table, their cache, and a conversion done once.

The table is the original release, Zenodo record 3987831 (Kong et al. 2020; Table III of
the paper gives the mAPs). ``load("Cnn14")`` returns a checkpoint ready for inference. Its
first use fetches the ``.pth`` and verifies it (:mod:`panns_jax.download`), then converts
it without torch (:mod:`panns_jax.pth`) into a panns_jax checkpoint stored beside it under
the file's sha256. Later uses load that checkpoint, whose weights digest
:func:`panns_jax.checkpoints.load` checks, and read the ``.pth`` again only when its size
or modification time changed. A file lock per release file makes concurrent processes
download and convert it once.

Environment:

* ``PANNS_JAX_HOME`` is the cache directory. Without it the cache is
  ``$XDG_CACHE_HOME/panns_jax``, else ``~/.cache/panns_jax``.
* ``PANNS_JAX_MIRROR`` is a base URL that serves the release files under their own names.
* ``PANNS_JAX_ZOO_TABLE`` is a JSON list of entries (``name, arch, file, map, md5, size,
  purpose``) that extend or replace the built-in ones by name, for mirrors of re-trained
  files and for tests.
* ``PANNS_JAX_OFFLINE=1`` forbids the network (:func:`panns_jax.download.offline`).
* ``PANNS_JAX_MIN_RATE`` (bytes/s) and ``PANNS_JAX_LOCK_TIMEOUT`` (seconds) bound a
  download and the wait for another process's lock (:mod:`panns_jax.download`).

Every entry is checked when the table is read: a ``file`` is a plain ``.pth`` name (no
separator, no ``..``, not absolute), so the zoo only ever writes, renames or deletes inside
its cache directory, and each field has its type. A file without a published md5 has the
sha256 of its first complete copy recorded only once that copy converts, and :func:`forget`
(``panns-jax download NAME --force``) clears a wrong one.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
import sys
import urllib.parse
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

from panns_jax import download, fileio

if TYPE_CHECKING:  # Imported where used: reading the table needs neither.
    from panns_jax import checkpoints

ZENODO_RECORD = "3987831"
ZENODO_URL = "https://zenodo.org/record/3987831/files/{file}?download=1"


class ZooError(ValueError):
    """A name or a table that the zoo cannot use. The message says why and what to do."""


class ZooTableError(ZooError):
    """A table entry that the zoo cannot use: a name outside the cache, a field's type."""


@dataclasses.dataclass(frozen=True)
class ZooEntry:
    """One released checkpoint: our name, its registry architecture, file and facts."""

    name: str
    arch: str
    file: str
    map: float  # AudioSet eval mAP as released (the file name says it).
    md5: Optional[str] = None  # As published by third-party registries of the record.
    size: Optional[int] = None  # Bytes, where known.
    purpose: str = ""

    def __post_init__(self) -> None:
        problem = _entry_problem(self)
        if problem:
            raise ZooTableError(f"zoo entry {self.name!r}: {problem}")


_MD5 = re.compile(r"[0-9a-fA-F]{32}")


def _entry_problem(entry: ZooEntry) -> Optional[str]:
    """What is wrong with an entry's fields, or None; each must have its type."""
    for field in ("name", "arch"):
        value = getattr(entry, field)
        if not isinstance(value, str) or not value.strip() or not value.isprintable():
            return f"{field} {value!r} must be a non-empty one-line string"
    name_problem = download.file_name_problem(entry.file)
    if name_problem or not entry.file.endswith(".pth"):
        why = name_problem or "it must end in .pth"
        return f"file {entry.file!r} must be a plain .pth file name of the cache ({why})"
    map_ = entry.map
    if isinstance(map_, bool) or not isinstance(map_, (int, float)) or not math.isfinite(map_):
        return f"map {map_!r} must be a number"
    if entry.md5 is not None and not (isinstance(entry.md5, str) and _MD5.fullmatch(entry.md5)):
        return f"md5 {entry.md5!r} must be 32 hex digits or null"
    size = entry.size
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size <= 0):
        return f"size {size!r} must be a positive integer (bytes) or null"
    if not isinstance(entry.purpose, str):
        return f"purpose {entry.purpose!r} must be a string"
    return None


def _e(
    name: str,
    map_: float,
    purpose: str,
    md5: Optional[str] = None,
    size: Optional[int] = None,
    arch: Optional[str] = None,
) -> ZooEntry:
    return ZooEntry(name, arch or name, f"{name}_mAP={map_:.3f}.pth", map_, md5, size, purpose)


_CNN14_SIZE = 327_428_481
BUILTIN = (
    _e(
        "Cnn14",
        0.431,
        "default tagger and 2048-d embedding, 32 kHz",
        "541141fa2ee191a88f24a3219fff024e",
        _CNN14_SIZE,
    ),
    _e("Cnn14_16k", 0.438, "16 kHz audio", "362fc5ff18f1d6ad2f6d464b45893f2c"),
    _e("Cnn14_8k", 0.416, "8 kHz audio (telephone band)"),
    _e(
        "Cnn14_DecisionLevelMax",
        0.385,
        "sound event detection: 100 frames/s (sed default)",
        size=_CNN14_SIZE,
    ),
    _e(
        "Cnn14_DecisionLevelAtt",
        0.425,
        "sound event detection, attention pooling",
        "c8281ca2b9967244b91d557aa941e8ca",
    ),
    _e("Cnn14_emb512", 0.420, "Cnn14 with a 512-d embedding"),
    _e("Cnn14_emb128", 0.412, "Cnn14 with a 128-d embedding"),
    _e("Cnn14_emb32", 0.364, "Cnn14 with a 32-d embedding"),
    _e("Cnn10", 0.380, "smaller CNN, 512-d embedding", "bfb1f1f9968938fa8ef4012b8471f5f6"),
    _e("Cnn6", 0.343, "smallest CNN, 512-d embedding", "e25e26b84585b14c7754c91e48efc9be"),
    _e("ResNet22", 0.430, "ResNet trunk", "cf36d413096793c4e15dc752a3abd599"),
    _e("ResNet38", 0.434, "the best ResNet", "bf12f36aaabac4e0855e22d3c3239c1b"),
    _e("ResNet54", 0.429, "the deepest ResNet", "4f1f1406d37a29e2379916885e18c5f3"),
    _e(
        "MobileNetV1",
        0.389,
        "mobile and embedded devices",
        "a419303e1c88aa1b9d2ac3811563d371",
        23_639_473,
    ),
    _e("MobileNetV2", 0.383, "mobile and embedded devices"),
    _e(
        "Wavegram_Cnn14",
        0.389,
        "learned front end on the raw waveform",
        "1e3506ab640371e0b5a417b15fd66d21",
    ),
    _e(
        "Wavegram_Logmel_Cnn14",
        0.439,
        "highest mAP of the release: wavegram + log-mel",
        "17fa9ab65af3c0eb5ffbc5f65552c4e1",
    ),
    _e("Res1dNet31", 0.365, "1-D CNN on the raw waveform"),
    _e("Res1dNet51", 0.355, "1-D CNN on the raw waveform"),
    _e("LeeNet11", 0.266, "1-D CNN on the raw waveform (comparison)"),
    _e("LeeNet24", 0.336, "1-D CNN on the raw waveform (comparison)"),
    _e("DaiNet19", 0.295, "1-D CNN on the raw waveform (comparison)"),
)

_registered: Dict[str, ZooEntry] = {}


def register(entry: ZooEntry) -> None:
    """Add or replace an entry for this process (``PANNS_JAX_ZOO_TABLE`` for every process)."""
    _registered[entry.name] = entry


def table() -> Dict[str, ZooEntry]:
    """Every entry by name: the release, then ``PANNS_JAX_ZOO_TABLE``, then :func:`register`.

    Each later source replaces the entries of the same name.
    """
    entries = {e.name: e for e in BUILTIN}
    extra = os.environ.get("PANNS_JAX_ZOO_TABLE")
    if extra:
        for entry in _read_table(extra):
            entries[entry.name] = entry
    entries.update(_registered)
    return entries


_FIELDS = tuple(f.name for f in dataclasses.fields(ZooEntry))


def _read_table(path: str) -> List[ZooEntry]:
    """The entries of a ``PANNS_JAX_ZOO_TABLE`` file; any bad one raises :class:`ZooTableError`."""
    where = f"PANNS_JAX_ZOO_TABLE={path}"
    try:
        with open(path, encoding="utf-8") as f:
            rows = json.load(f)
    except (OSError, ValueError) as err:
        raise ZooTableError(f"{where}: cannot be read as JSON ({err})") from None
    if not isinstance(rows, list):
        raise ZooTableError(f"{where}: not a JSON list of entries")
    entries = []
    for number, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise ZooTableError(f"{where}: entry {number} is not an object")
        missing = [k for k in ("name", "file", "map") if k not in row]
        unknown = sorted(set(row) - set(_FIELDS))
        if missing or unknown:
            what = f"lacks {', '.join(missing)}" if missing else f"has unknown keys {unknown}"
            raise ZooTableError(f"{where}: entry {number} {what} (keys: {', '.join(_FIELDS)})")
        try:
            entries.append(ZooEntry(**{"arch": row["name"], **row}))
        except ZooTableError as err:
            raise ZooTableError(f"{where}: entry {number}: {err}") from None
    return entries


def get(name: str) -> ZooEntry:
    """The entry of ``name``, given as ``Cnn14`` or as the file's stem ``Cnn14_mAP=0.431``.

    An unknown name raises :class:`ZooError`, which suggests the closest names.
    """
    entries = table()
    if name in entries:
        return entries[name]
    for entry in entries.values():
        if name in (entry.file, os.path.splitext(entry.file)[0]):
            return entry
    close = difflib.get_close_matches(name, list(entries), n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise ZooError(
        f"{name!r} is not a pretrained model of the zoo{hint}; "
        "`panns-jax download --list` shows them"
    )


def is_zoo_name(name: str) -> bool:
    """Whether :func:`get` knows ``name``; a table that cannot be read raises its error."""
    try:
        get(name)
    except ZooTableError:
        raise
    except ZooError:
        return False
    return True


def url(entry: ZooEntry) -> str:
    """Where the file comes from: ``$PANNS_JAX_MIRROR/<file>``, else Zenodo."""
    quoted = urllib.parse.quote(entry.file)  # '=' becomes %3D.
    mirror = os.environ.get("PANNS_JAX_MIRROR")
    if mirror:
        return mirror.rstrip("/") + "/" + quoted
    return ZENODO_URL.format(file=quoted)


def pth_path(entry: ZooEntry) -> str:
    """Where the verified ``.pth`` of ``entry`` lives in the cache."""
    return os.path.join(fileio.cache_dir(), entry.file)


def target(entry: ZooEntry) -> download.Target:
    """The entry as the downloader sees it: a URL, a path in the cache, the file's facts."""
    return download.Target(entry.name, url(entry), pth_path(entry), entry.md5, entry.size)


# ----------------------------------------------------------------------------
# The verified .pth and its converted checkpoint.
# ----------------------------------------------------------------------------


def fetch(name: str, *, progress: bool = True) -> str:
    """The path of the verified ``.pth`` of ``name`` in the cache, downloaded when missing."""
    entry = get(name)
    release = target(entry)
    converted: Dict[str, Any] = {}
    with download.locked(release):
        record = download.verified(release, progress=progress, check=_check(entry, converted))
        if converted:  # A first copy was converted to be trusted: keep the conversion.
            _converted(entry, record, converted["checkpoint"])
    return release.path


def install(name: str, source: str, *, force: bool = False) -> str:
    """Verify a ``.pth`` the user already has, copy it into the cache and convert it.

    Its size is checked before any byte is read, and it is converted before it is copied
    in. ``force`` replaces a recorded sha256 with the copy's, and links in the cache with
    files. ``source`` stays where it is. Returns the path of the cached copy.
    """
    entry = get(name)
    release = target(entry)
    if not os.path.isfile(source):
        raise download.DownloadError(f"{source}: no such file")
    if force:
        download.clear_links(release)
    converted: Dict[str, Any] = {}
    with download.locked(release):
        check = _check(entry, converted)
        record = download.install(release, source, check, force=force)
        _converted(entry, record, converted.get("checkpoint"))
    return release.path


def forget(name: str) -> None:
    """Remove the cached ``.pth`` of ``name``, its record (a recorded sha256 included) and
    its conversion, so that the next use fetches and verifies it as on first use."""
    download.forget(target(get(name)))


def load(name: str, *, progress: bool = True) -> checkpoints.ModelCheckpoint:
    """The :class:`~panns_jax.checkpoints.ModelCheckpoint` of zoo model ``name``.

    The first use downloads and converts it; later uses load the converted checkpoint.
    """
    entry = get(name)
    release = target(entry)
    converted: Dict[str, Any] = {}
    with download.locked(release):
        record = download.verified(release, progress=progress, check=_check(entry, converted))
        return _converted(entry, record, converted.get("checkpoint"))


def pretrained(name: str = "Cnn14", *, progress: bool = True) -> Tuple[Any, Dict[str, Any]]:
    """``(model, variables)`` of zoo model ``name``, ready for ``model.apply``."""
    checkpoint = load(name, progress=progress)
    return checkpoint.build_model(), checkpoint.variables


def _check(entry: ZooEntry, converted: Dict[str, Any]) -> download.Check:
    """The downloader's check of a candidate ``.pth``: the reader and the converter must
    accept it. The conversion is kept in ``converted`` so that it is not done twice."""

    def check(path: str) -> None:
        converted["checkpoint"] = _convert(entry, path)

    return check


def _converted(
    entry: ZooEntry,
    record: Dict[str, Any],
    fresh: Optional[checkpoints.ModelCheckpoint] = None,
) -> checkpoints.ModelCheckpoint:
    """The converted checkpoint of the verified ``.pth`` that ``record`` describes.

    An intact conversion is loaded. A missing or damaged one is saved from ``fresh`` (the
    conversion made to verify the file), else made again from the ``.pth``, after
    conversions of other copies of the file are removed.
    """
    from panns_jax import checkpoints

    release = target(entry)
    path = download.derived_dir(release, record["sha256"])
    if download.real_directory(path) and checkpoints.is_model_checkpoint(path):
        try:
            return checkpoints.load(path)
        except (ValueError, OSError) as err:
            print(
                f"warning: converted checkpoint damaged ({str(err)[:200]}); converting "
                f"{entry.file} again",
                file=sys.stderr,
            )
    download.remove_derived(release)
    checkpoint = fresh if fresh is not None else _convert(entry, pth_path(entry))
    checkpoint.extra = {
        "zoo": {
            "name": entry.name,
            "file": entry.file,
            "sha256": record["sha256"],
            "map": entry.map,
        }
    }
    checkpoints.save(path, checkpoint)
    return checkpoint


def _convert(entry: ZooEntry, path: str) -> checkpoints.ModelCheckpoint:
    """Read the ``.pth`` at ``path`` (without torch) and convert it for ``entry.arch``."""
    from panns_jax import convert

    state, step = convert.read_torch_checkpoint(path)
    return convert.torch_to_checkpoint(state, entry.arch, step=step)


def status(entry: ZooEntry) -> Dict[str, Any]:
    """What ``panns-jax download --list`` shows of an entry: its facts, whether it is
    cached (and converted), and how a copy of it is verified."""
    release = target(entry)
    record = download.read_record(release)
    cached = download.is_cached(release)
    converted = (
        cached
        and isinstance(record.get("sha256"), str)
        and download.real_directory(download.derived_dir(release, record["sha256"]))
    )
    return {
        "name": entry.name,
        "map": entry.map,
        "size": entry.size,
        "file": entry.file,
        "cached": "converted" if converted else ("yes" if cached else "no"),
        "verified_by": download.verification(release),
        "purpose": entry.purpose,
    }
