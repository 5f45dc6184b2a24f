"""The released PANNs checkpoints: a verified download, a cache, a one-time conversion.

The table is the original release, Zenodo record 3987831 (Kong et al. 2020, Table III of
the paper for the mAPs). ``load("Cnn14")`` returns a checkpoint ready for inference:

1. the ``.pth`` is found in the cache, or downloaded (streamed with a progress bar,
   resumed with an HTTP ``Range`` request from ``<file>.part`` after an interruption,
   timeouts and a few retries) and verified before an atomic rename: its size where
   known, its md5 where published; otherwise the sha256 of the first download is
   recorded and every later copy must match it;
2. it is converted once, without torch (:mod:`panns_jax.pth`), into a panns_jax
   checkpoint stored beside it under its digest; later uses load that directory, whose
   weights digest :func:`panns_jax.checkpoints.load` checks, and never read the ``.pth``
   again unless its size or modification time changed (then it is re-verified).

A file lock per release file makes concurrent processes download and convert once.

Environment:
  ``PANNS_JAX_HOME``      cache directory (else ``$XDG_CACHE_HOME/panns_jax``, else
                          ``~/.cache/panns_jax``).
  ``PANNS_JAX_OFFLINE=1`` never use the network; a missing file is one error that names
                          the URL and the path where a manual download belongs.
  ``PANNS_JAX_MIRROR``    base URL serving the release files under their names.
  ``PANNS_JAX_ZOO_TABLE`` a JSON list of entries (``name, arch, file, map, md5, size,
                          purpose``) that extend or replace the built-in table by name:
                          for mirrors of re-trained files, and for tests.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import hashlib
import json
import os
import shutil
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import TYPE_CHECKING, Any, Dict, Iterator, Optional, Sequence, Tuple

from panns_jax import fileio

if TYPE_CHECKING:  # Imported where used: reading the zoo's table does not need it.
    from panns_jax import checkpoints

ZENODO_RECORD = "3987831"
ZENODO_URL = "https://zenodo.org/record/3987831/files/{file}?download=1"
TIMEOUT_S = 30.0  # Per connect and per read.
RETRIES = 4  # Further attempts after the first, resuming where the last one stopped.
BACKOFF_S = 1.0  # Doubled after every failed attempt.
CHUNK = 1 << 20
MAX_UNKNOWN_SIZE = 2 << 30  # Refuse to stream more than this when the size is not known.


class ZooError(ValueError):
    """The zoo cannot provide a verified checkpoint; the message says why and what to do."""


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
    """Name -> entry: the release, then ``PANNS_JAX_ZOO_TABLE``, then :func:`register`."""
    entries = {e.name: e for e in BUILTIN}
    extra = os.environ.get("PANNS_JAX_ZOO_TABLE")
    if extra:
        try:
            with open(extra, encoding="utf-8") as f:
                rows = json.load(f)
            for row in rows:
                entry = ZooEntry(**{**row, "arch": row.get("arch", row["name"])})
                entries[entry.name] = entry
        except (OSError, ValueError, TypeError, KeyError) as err:
            raise ZooError(
                f"PANNS_JAX_ZOO_TABLE={extra}: not a JSON list of entries with "
                f"name, file, map ({type(err).__name__}: {err})"
            ) from None
    entries.update(_registered)
    return entries


def get(name: str) -> ZooEntry:
    """The entry of ``name`` (``Cnn14``, or the file's stem ``Cnn14_mAP=0.431``)."""
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
    try:
        get(name)
    except ZooError:
        return False
    return True


def cache_dir() -> str:
    """``$PANNS_JAX_HOME``, else ``$XDG_CACHE_HOME/panns_jax``, else ``~/.cache/panns_jax``."""
    home = os.environ.get("PANNS_JAX_HOME")
    if home:
        return os.path.abspath(os.path.expanduser(home))
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = xdg if xdg else os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.abspath(os.path.join(base, "panns_jax"))


def url(entry: ZooEntry) -> str:
    """Where the file comes from: ``$PANNS_JAX_MIRROR/<file>``, else Zenodo."""
    quoted = urllib.parse.quote(entry.file)  # '=' becomes %3D.
    mirror = os.environ.get("PANNS_JAX_MIRROR")
    if mirror:
        return mirror.rstrip("/") + "/" + quoted
    return ZENODO_URL.format(file=quoted)


def offline() -> bool:
    return os.environ.get("PANNS_JAX_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


# ----------------------------------------------------------------------------
# The cache: <file>, <file>.json (what was verified), <stem>.<sha256[:16]>/ (converted).
# ----------------------------------------------------------------------------


def pth_path(entry: ZooEntry) -> str:
    return os.path.join(cache_dir(), entry.file)


def _record_path(entry: ZooEntry) -> str:
    return pth_path(entry) + ".json"


def _converted_path(entry: ZooEntry, sha256: str) -> str:
    return os.path.join(cache_dir(), f"{os.path.splitext(entry.file)[0]}.{sha256[:16]}")


def _read_record(entry: ZooEntry) -> Dict[str, Any]:
    try:
        with open(_record_path(entry), encoding="utf-8") as f:
            record = json.load(f)
        return record if isinstance(record, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_record(entry: ZooEntry, record: Dict[str, Any]) -> None:
    with fileio.staged(_record_path(entry)) as staging:
        with open(staging, "w", encoding="utf-8") as f:
            json.dump(record, f, indent=2)


def _hash_file(path: str) -> Tuple[str, str, int]:
    md5, sha256, size = hashlib.md5(), hashlib.sha256(), 0
    with open(path, "rb") as f:
        while True:
            block = f.read(CHUNK)
            if not block:
                break
            md5.update(block)
            sha256.update(block)
            size += len(block)
    return md5.hexdigest(), sha256.hexdigest(), size


def _expected(entry: ZooEntry, record: Dict[str, Any]) -> Tuple[str, Optional[str]]:
    """``(kind, digest)`` a file must match: the published md5, else the recorded sha256."""
    if entry.md5:
        return "md5", entry.md5.lower()
    if record.get("sha256") and record.get("file") == entry.file:
        return "sha256", record["sha256"]
    return "sha256", None


def _check(entry: ZooEntry, path: str, source: str) -> Tuple[str, str, int]:
    """Hash ``path``; raise :class:`ZooError` (expected vs got) when it is not the release."""
    md5, sha256, size = _hash_file(path)
    if entry.size is not None and size != entry.size:
        raise ZooError(
            f"{source}: {size} bytes, but {entry.file} has {entry.size} bytes (md5 {md5})"
        )
    kind, want = _expected(entry, _read_record(entry))
    got = md5 if kind == "md5" else sha256
    if want is not None and got != want:
        origin = "published" if kind == "md5" else "recorded at its first download"
        raise ZooError(
            f"{source}: {kind} mismatch for {entry.file}: expected {want} ({origin}), "
            f"got {got} ({size} bytes)"
        )
    return md5, sha256, size


def _trust(entry: ZooEntry, md5: str, sha256: str) -> None:
    """Record the verified file's digests and stat (a changed stat forces re-hashing)."""
    stat = os.stat(pth_path(entry))
    kind, _ = _expected(entry, _read_record(entry))
    _write_record(
        entry,
        {
            "name": entry.name,
            "file": entry.file,
            "size": stat.st_size,
            "mtime_ns": stat.st_mtime_ns,
            "md5": md5,
            "sha256": sha256,
            "verified_by": "published md5" if kind == "md5" else "sha256 of the first download",
        },
    )


def _stat_matches(entry: ZooEntry, record: Dict[str, Any]) -> bool:
    try:
        stat = os.stat(pth_path(entry))
    except OSError:
        return False
    return (
        record.get("file") == entry.file
        and record.get("size") == stat.st_size
        and record.get("mtime_ns") == stat.st_mtime_ns
        and bool(record.get("sha256"))
        and (not entry.md5 or record.get("md5") == entry.md5.lower())
    )


@contextlib.contextmanager
def _locked(entry: ZooEntry) -> Iterator[None]:
    """Hold ``<file>.lock`` (one process fetches or converts a file at a time); errors of
    the cache directory (read-only, full) become one :class:`ZooError` line."""
    import filelock

    try:
        os.makedirs(cache_dir(), exist_ok=True)
        lock = filelock.FileLock(pth_path(entry) + ".lock")
        try:
            lock.acquire(timeout=0)
        except filelock.Timeout:
            print(f"waiting for another process that is fetching {entry.file} ...", file=sys.stderr)
            lock.acquire()
    except OSError as err:
        raise ZooError(_cache_problem(err)) from None
    try:
        yield
    except OSError as err:
        raise ZooError(_cache_problem(err)) from None
    finally:
        lock.release()


def _cache_problem(err: OSError) -> str:
    return (
        f"the cache {cache_dir()} is not usable ({err.strerror or err}"
        f"{': ' + err.filename if getattr(err, 'filename', None) else ''}); free some space "
        "or set PANNS_JAX_HOME to a writable directory"
    )


def _missing_message(entry: ZooEntry, why: str) -> str:
    return (
        f"{entry.name}: {why}; download {url(entry)} and put it at {pth_path(entry)} "
        f"(or run `panns-jax download {entry.name} --from FILE`)"
    )


def _verified_pth(entry: ZooEntry, progress: bool) -> Dict[str, Any]:
    """The record of a verified ``.pth`` in the cache, downloading it if needed (locked)."""
    path = pth_path(entry)
    record = _read_record(entry)
    if os.path.exists(path):
        if _stat_matches(entry, record):
            return record
        try:  # Changed on disk, or never recorded: verify it again.
            md5, sha256, _ = _check(entry, path, path)
        except ZooError as err:
            _discard(entry)
            raise ZooError(
                f"the cached file is corrupted ({err}); it was removed: run again "
                f"to download it afresh, or put a good copy at {path}"
            ) from None
        _trust(entry, md5, sha256)
        return _read_record(entry)
    if offline():
        raise ZooError(_missing_message(entry, "not in the cache and PANNS_JAX_OFFLINE is set"))
    _download(entry, progress)
    return _read_record(entry)


def _discard(entry: ZooEntry) -> None:
    """Remove a bad ``.pth`` and every checkpoint converted from it (keep the record)."""
    stem = os.path.splitext(entry.file)[0]
    for name in os.listdir(cache_dir()):
        if name.startswith(stem + ".") and os.path.isdir(os.path.join(cache_dir(), name)):
            shutil.rmtree(os.path.join(cache_dir(), name), ignore_errors=True)
    for path in (pth_path(entry), pth_path(entry) + ".part"):
        if os.path.exists(path):
            os.remove(path)


def _download(entry: ZooEntry, progress: bool) -> None:
    """Stream ``url(entry)`` to ``<file>.part`` (resuming), verify, rename into place."""
    source = url(entry)
    final = pth_path(entry)
    part = final + ".part"
    limit = entry.size if entry.size is not None else MAX_UNKNOWN_SIZE
    delay, last_error = BACKOFF_S, ""
    for attempt in range(RETRIES + 1):
        if attempt:
            time.sleep(delay)
            delay *= 2
        have = os.path.getsize(part) if os.path.exists(part) else 0
        if have > limit:
            os.remove(part)
            have = 0
        try:
            done = _fetch(source, part, have, limit, entry, progress)
        except urllib.error.HTTPError as err:
            if err.code == 416:  # The partial file is not a prefix we can extend.
                os.remove(part)
                last_error = "HTTP 416 (range not satisfiable); restarting"
                continue
            if err.code in (401, 403, 404, 410):
                raise ZooError(
                    _missing_message(entry, f"{source} answered HTTP {err.code} {err.reason}")
                ) from None
            last_error = f"HTTP {err.code} {err.reason}"
            continue
        except ZooError:
            raise
        except OSError as err:  # URLError, timeouts, resets, IncompleteRead's cousins.
            if _is_disk_error(err):
                raise ZooError(
                    f"cannot write {part} ({err}); set PANNS_JAX_HOME to a writable "
                    "directory with enough free space"
                ) from None
            last_error = f"{type(err).__name__}: {getattr(err, 'reason', err)}"
            continue
        except Exception as err:  # http.client.IncompleteRead and other HTTP protocol errors.
            last_error = f"{type(err).__name__}: {err}"
            continue
        if done:
            break
    else:
        raise ZooError(
            _missing_message(
                entry, f"cannot download {source} after {RETRIES + 1} tries ({last_error})"
            )
        )
    try:
        md5, sha256, _ = _check(entry, part, f"download from {source}")
    except ZooError as err:
        os.remove(part)
        raise ZooError(f"{err}; nothing was kept: try again, or check the mirror") from None
    os.replace(part, final)
    _trust(entry, md5, sha256)


def _is_disk_error(err: OSError) -> bool:
    import errno

    return isinstance(err, OSError) and err.errno in (
        errno.ENOSPC,
        errno.EROFS,
        errno.EACCES,
        errno.EDQUOT,
    )


def _fetch(source: str, part: str, have: int, limit: int, entry: ZooEntry, progress: bool) -> bool:
    """One attempt: append the rest of the file to ``part``; True when it is complete."""
    headers = {"User-Agent": "panns_jax (+https://zenodo.org/record/3987831)"}
    if have:
        headers["Range"] = f"bytes={have}-"
    request = urllib.request.Request(source, headers=headers)
    with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
        start = 0
        if have and response.status == 206:
            content_range = response.headers.get("Content-Range", "")
            try:
                start = int(content_range.split()[1].split("-")[0])
            except (IndexError, ValueError):
                start = -1
            if start != have:  # Not the range asked for: start over on the next try.
                os.remove(part)
                raise OSError(f"server resumed at {content_range!r}, not at byte {have}")
        length = response.headers.get("Content-Length")
        total = start + int(length) if length and length.isdigit() else None
        if total is not None and total > limit:
            what = f"{entry.size} bytes" if entry.size is not None else "the size limit"
            raise ZooError(
                f"{source}: the server announces {total} bytes, but {entry.file} "
                f"has {what}; nothing was kept: check the mirror"
            )
        if start == 0 and have:
            have = 0  # A full response to a range request: rewrite from the start.
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(
                total=total,
                initial=start,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=entry.file,
                file=sys.stderr,
                dynamic_ncols=True,
                disable=None,
            )  # None: drawn on a terminal only, not into logs.
        written = start
        try:
            with open(part, "ab" if start else "wb") as out:
                while True:
                    block = response.read(CHUNK)
                    if not block:
                        break
                    written += len(block)
                    if written > limit:
                        raise ZooError(
                            f"{source}: more than {limit} bytes, but {entry.file} "
                            "is smaller; nothing was kept: check the mirror"
                        )
                    out.write(block)
                    if bar is not None:
                        bar.update(len(block))
        except ZooError:
            os.remove(part)
            raise
        finally:
            if bar is not None:
                bar.close()
        if total is not None and written < total:
            raise OSError(f"connection closed after {written} of {total} bytes")
        return True


# ----------------------------------------------------------------------------
# Public API.
# ----------------------------------------------------------------------------


def fetch(name: str, *, progress: bool = True) -> str:
    """Path of the verified ``.pth`` of ``name`` in the cache (downloaded when missing)."""
    entry = get(name)
    with _locked(entry):
        _verified_pth(entry, progress)
    return pth_path(entry)


def install(name: str, source: str) -> str:
    """Verify a file the user already has and copy it into the cache (it is left in place)."""
    entry = get(name)
    if not os.path.isfile(source):
        raise ZooError(f"{source}: no such file")
    with _locked(entry):
        try:
            md5, sha256, _ = _check(entry, source, source)
        except OSError as err:
            raise ZooError(f"{source}: cannot be read ({err.strerror or err})") from None
        final = pth_path(entry)
        with fileio.staged(final) as staging:
            try:
                shutil.copyfile(source, staging)
            except OSError as err:
                raise ZooError(f"cannot copy {source} into {cache_dir()} ({err})") from None
            if _hash_file(staging)[1] != sha256:  # Changed while being copied.
                raise ZooError(f"{source} changed while it was copied; try again")
            if os.path.exists(final) and _hash_file(final)[1] != sha256:
                _discard(entry)
        _trust(entry, md5, sha256)
        _converted(entry, _read_record(entry))
    return final


def _converted(entry: ZooEntry, record: Dict[str, Any]):
    """The converted checkpoint of the verified ``.pth``, converting it when needed."""
    from panns_jax import checkpoints, convert

    path = _converted_path(entry, record["sha256"])
    if checkpoints.is_model_checkpoint(path):
        try:
            return checkpoints.load(path)
        except (ValueError, OSError) as err:
            print(
                f"warning: converted checkpoint damaged ({str(err)[:200]}); converting "
                f"{entry.file} again",
                file=sys.stderr,
            )
    stem = os.path.splitext(entry.file)[0]
    for name in os.listdir(cache_dir()):  # Stale conversions (other digests) and damage.
        if name.startswith(stem + ".") and os.path.isdir(os.path.join(cache_dir(), name)):
            shutil.rmtree(os.path.join(cache_dir(), name), ignore_errors=True)
    state, step = convert.read_torch_checkpoint(pth_path(entry))
    checkpoint = convert.torch_to_checkpoint(state, entry.arch, step=step)
    if hasattr(checkpoint, "extra"):  # Where the weights came from, stored with them.
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


def load(name: str, *, progress: bool = True) -> checkpoints.ModelCheckpoint:
    """The :class:`~panns_jax.checkpoints.ModelCheckpoint` of zoo model ``name``.

    Downloads and converts on first use; later uses load the converted checkpoint.
    """
    entry = get(name)
    with _locked(entry):
        record = _verified_pth(entry, progress)
        return _converted(entry, record)


def pretrained(name: str = "Cnn14", *, progress: bool = True) -> Tuple[Any, Dict[str, Any]]:
    """``(model, variables)`` of zoo model ``name``, ready for ``model.apply``."""
    checkpoint = load(name, progress=progress)
    return checkpoint.build_model(), checkpoint.variables


def status(entry: ZooEntry) -> Dict[str, Any]:
    """What ``--list`` shows: cached or not, and how the file is verified."""
    record = _read_record(entry)
    cached = os.path.exists(pth_path(entry))
    converted = (
        cached
        and bool(record.get("sha256"))
        and os.path.isdir(_converted_path(entry, record["sha256"]))
    )
    if entry.md5:
        check = "md5 (published)"
    elif record.get("sha256"):
        check = "sha256 (recorded at first download)"
    else:
        check = (
            "size, and the sha256 recorded at first download"
            if entry.size
            else "sha256 recorded at first download"
        )
    return {
        "name": entry.name,
        "map": entry.map,
        "size": entry.size,
        "file": entry.file,
        "cached": "converted" if converted else ("yes" if cached else "no"),
        "verified_by": check,
        "purpose": entry.purpose,
    }


def _size_text(size: Optional[int]) -> str:
    return f"{size / 1e6:.1f} MB" if size else "?"


def main_download(argv: Optional[Sequence[str]] = None) -> int:
    """``panns-jax download NAME... | --all | --list [--from FILE]``."""
    parser = argparse.ArgumentParser(
        prog="panns-jax download",
        description="Download, verify and convert the released PANNs checkpoints "
        f"(Zenodo record {ZENODO_RECORD}) into the cache ({cache_dir()}).",
    )
    parser.add_argument("names", nargs="*", help="zoo names, e.g. Cnn14 MobileNetV1")
    parser.add_argument("--all", action="store_true", help="every model of the zoo")
    parser.add_argument(
        "--list",
        action="store_true",
        help="name, mAP, size, how it is verified, whether it is cached",
    )
    parser.add_argument(
        "--from",
        dest="source",
        metavar="FILE",
        default=None,
        help="verify and install a .pth you already have (one NAME)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(None if argv is None else list(argv))
    try:
        if args.list:
            print(f"{'name':24s} {'mAP':>6s} {'size':>9s}  {'cached':9s} verified by / use")
            for entry in table().values():
                s = status(entry)
                print(
                    f"{s['name']:24s} {s['map']:6.3f} {_size_text(s['size']):>9s}  "
                    f"{s['cached']:9s} {s['verified_by']}; {s['purpose']}"
                )
            print(f"cache: {cache_dir()}")
            return 0
        names = list(table()) if args.all else args.names
        if not names:
            parser.error("name at least one model, or pass --all or --list")
        if args.source is not None:
            if len(names) != 1:
                parser.error("--from FILE installs one model: name exactly one")
            path = install(names[0], args.source)
            print(f"{names[0]}: verified {args.source} and installed it as {path}")
            return 0
        for name in names:
            entry = get(name)
            checkpoint = load(name, progress=not args.no_progress)
            record = _read_record(entry)
            print(
                f"{entry.name}: {pth_path(entry)} ({record.get('verified_by')}: "
                f"{record.get('md5') if entry.md5 else record.get('sha256')}), "
                f"{checkpoint.model} ready"
            )
    except (ZooError, ValueError, OSError) as err:
        print(f"error: {str(err).splitlines()[0] if str(err) else err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main_download())
