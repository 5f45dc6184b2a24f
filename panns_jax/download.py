"""Verified downloads into the cache: one file fetched over HTTP, resumed, checked, locked.

A :class:`Target` names one file: where it comes from, where it belongs and what it must
be (its size where known, its md5 where published). Beside the file the cache keeps:

    <file>          the verified file, renamed into place only once verified
    <file>.part     a download in progress, resumed with an HTTP ``Range`` request
    <file>.json     the record of the verified file: its size, mtime, md5 and sha256
    <file>.lock     held while one process fetches the file or derives from it
    <stem>.<hash>/  directories derived from the file (the zoo's converted checkpoint),
                    named by the first 16 hex digits of its sha256 and removed with it

A file without a published md5 is trusted on first use: the sha256 of its first download
is recorded, and every later copy must match it. A cached file whose size or modification
time differs from its record is hashed again before it is used.

Downloads stream with a progress bar, time out, and retry with a growing pause, each try
resuming where the last one stopped. ``PANNS_JAX_OFFLINE=1`` keeps them from starting: a
missing file is then one error that names the URL and the path where a copy belongs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import shutil
import sys
import time
import urllib.error
import urllib.request
from typing import Any, Dict, Iterator, Optional, Tuple

from panns_jax import fileio

TIMEOUT_S = 30.0  # Per connect and per read.
RETRIES = 4  # Further tries after the first, each resuming where the last one stopped.
BACKOFF_S = 1.0  # The pause before the first retry, doubled before each further one.
CHUNK = 1 << 20
MAX_UNKNOWN_SIZE = 2 << 30  # The most bytes streamed for a file of unknown size.
USER_AGENT = "panns_jax (+https://zenodo.org/record/3987831)"
# Answers that a retry would get again: the file is missing or forbidden at that URL.
_FINAL_HTTP_CODES = (401, 403, 404, 410)
_DISK_ERRNOS = (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT)


class DownloadError(ValueError):
    """A file that cannot be fetched or verified. The message says why and what to do."""


@dataclasses.dataclass(frozen=True)
class Target:
    """One file of the cache: the name people use for it, its URL, its path, its facts."""

    name: str
    url: str
    path: str
    md5: Optional[str] = None  # As published; compared in lower case.
    size: Optional[int] = None  # Bytes, where known.

    @property
    def file(self) -> str:
        return os.path.basename(self.path)

    @property
    def directory(self) -> str:
        return os.path.dirname(self.path)

    @property
    def record_path(self) -> str:
        return self.path + ".json"

    @property
    def part_path(self) -> str:
        return self.path + ".part"


def offline() -> bool:
    """Whether ``PANNS_JAX_OFFLINE`` forbids the network."""
    return os.environ.get("PANNS_JAX_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


# ----------------------------------------------------------------------------
# The record of a verified file, and the checks against it.
# ----------------------------------------------------------------------------


def read_record(target: Target) -> Dict[str, Any]:
    """What was recorded when the file was verified; empty when nothing was."""
    try:
        with open(target.record_path, encoding="utf-8") as f:
            record = json.load(f)
        return record if isinstance(record, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_record(target: Target, record: Dict[str, Any]) -> None:
    with fileio.staged(target.record_path) as staging:
        with open(staging, "w", encoding="utf-8") as f:
            json.dump(record, f, indent=2)


def _hash_file(path: str) -> Tuple[str, str, int]:
    md5, sha256, size = hashlib.md5(), hashlib.sha256(), 0
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            md5.update(block)
            sha256.update(block)
            size += len(block)
    return md5.hexdigest(), sha256.hexdigest(), size


def _expected(target: Target, record: Dict[str, Any]) -> Tuple[str, Optional[str]]:
    """The kind of digest a copy must match, and its value when one is known.

    A published md5 wins. Without one, the sha256 recorded at the first download is the
    reference, and before that download there is none.
    """
    if target.md5:
        return "md5", target.md5.lower()
    if record.get("sha256") and record.get("file") == target.file:
        return "sha256", record["sha256"]
    return "sha256", None


def _check(target: Target, path: str, source: str) -> Tuple[str, str, int]:
    """Hash ``path`` and return its md5, sha256 and size.

    Raises :class:`DownloadError`, naming what was expected and what was found, when the
    size or the digest is not the target's. ``source`` says where the bytes came from.
    """
    md5, sha256, size = _hash_file(path)
    if target.size is not None and size != target.size:
        raise DownloadError(
            f"{source}: {size} bytes, but {target.file} has {target.size} bytes (md5 {md5})"
        )
    kind, want = _expected(target, read_record(target))
    got = md5 if kind == "md5" else sha256
    if want is not None and got != want:
        origin = "published" if kind == "md5" else "recorded at its first download"
        raise DownloadError(
            f"{source}: {kind} mismatch for {target.file}: expected {want} ({origin}), "
            f"got {got} ({size} bytes)"
        )
    return md5, sha256, size


def _trust(target: Target, md5: str, sha256: str) -> None:
    """Record the digests and the stat of the verified file in the cache.

    A later stat that differs from the recorded one makes :func:`verified` hash it again.
    """
    stat = os.stat(target.path)
    kind, _ = _expected(target, read_record(target))
    _write_record(
        target,
        {
            "name": target.name,
            "file": target.file,
            "size": stat.st_size,
            "mtime_ns": stat.st_mtime_ns,
            "md5": md5,
            "sha256": sha256,
            "verified_by": "published md5" if kind == "md5" else "sha256 of the first download",
        },
    )


def _stat_matches(target: Target, record: Dict[str, Any]) -> bool:
    try:
        stat = os.stat(target.path)
    except OSError:
        return False
    return (
        record.get("file") == target.file
        and record.get("size") == stat.st_size
        and record.get("mtime_ns") == stat.st_mtime_ns
        and bool(record.get("sha256"))
        and (not target.md5 or record.get("md5") == target.md5.lower())
    )


def verification(target: Target) -> str:
    """How a copy of the target is checked, in words (``panns-jax download --list``)."""
    if target.md5:
        return "md5 (published)"
    if read_record(target).get("sha256"):
        return "sha256 (recorded at first download)"
    if target.size:
        return "size, and the sha256 recorded at first download"
    return "sha256 recorded at first download"


# ----------------------------------------------------------------------------
# What lives beside the file, and removing it.
# ----------------------------------------------------------------------------


def derived_dir(target: Target, sha256: str) -> str:
    """The directory for what is derived from the copy with this sha256."""
    stem = os.path.splitext(target.file)[0]
    return os.path.join(target.directory, f"{stem}.{sha256[:16]}")


def remove_derived(target: Target) -> None:
    """Remove every directory derived from the file, whatever copy it came from."""
    prefix = os.path.splitext(target.file)[0] + "."
    for name in os.listdir(target.directory):
        path = os.path.join(target.directory, name)
        if name.startswith(prefix) and os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)


def _discard(target: Target) -> None:
    """Remove a bad file, its partial download and what was derived from it.

    The record stays: it holds the sha256 that a copy without a published md5 must match.
    """
    remove_derived(target)
    for path in (target.path, target.part_path):
        if os.path.exists(path):
            os.remove(path)


# ----------------------------------------------------------------------------
# The lock, and the cache's own failures.
# ----------------------------------------------------------------------------


@contextlib.contextmanager
def locked(target: Target) -> Iterator[None]:
    """Hold ``<file>.lock`` while the block runs, so one process at a time fetches the file.

    A cache directory that cannot be used (read-only, full) fails as one
    :class:`DownloadError` line, whether the lock or the block meets it.
    """
    import filelock

    try:
        os.makedirs(target.directory, exist_ok=True)
        lock = filelock.FileLock(target.path + ".lock")
        try:
            lock.acquire(timeout=0)
        except filelock.Timeout:
            print(
                f"waiting for another process that is fetching {target.file} ...", file=sys.stderr
            )
            lock.acquire()
    except OSError as err:
        raise DownloadError(_cache_problem(target, err)) from None
    try:
        yield
    except OSError as err:
        raise DownloadError(_cache_problem(target, err)) from None
    finally:
        lock.release()


def _cache_problem(target: Target, err: OSError) -> str:
    return (
        f"the cache {target.directory} is not usable ({err.strerror or err}"
        f"{': ' + err.filename if getattr(err, 'filename', None) else ''}); free some space "
        "or set PANNS_JAX_HOME to a writable directory"
    )


def _missing_message(target: Target, why: str) -> str:
    return (
        f"{target.name}: {why}; download {target.url} and put it at {target.path} "
        f"(or run `panns-jax download {target.name} --from FILE`)"
    )


# ----------------------------------------------------------------------------
# The verified file: from the cache, from a download, or from the user's copy.
# ----------------------------------------------------------------------------


def verified(target: Target, *, progress: bool = True) -> Dict[str, Any]:
    """The record of the target's verified file in the cache, downloading it when missing.

    A cached file whose stat matches its record is used as it is. Any other cached file is
    hashed again, and when it is not the target it is removed with what was derived from
    it. Call this under :func:`locked`.
    """
    record = read_record(target)
    if os.path.exists(target.path):
        if _stat_matches(target, record):
            return record
        _reverify(target)
        return read_record(target)
    if offline():
        raise DownloadError(
            _missing_message(target, "not in the cache and PANNS_JAX_OFFLINE is set")
        )
    _download(target, progress)
    return read_record(target)


def _reverify(target: Target) -> None:
    """Hash a cached file that changed on disk or was never recorded, and record it."""
    try:
        md5, sha256, _ = _check(target, target.path, target.path)
    except DownloadError as err:
        _discard(target)
        raise DownloadError(
            f"the cached file is corrupted ({err}); it was removed: run again "
            f"to download it afresh, or put a good copy at {target.path}"
        ) from None
    _trust(target, md5, sha256)


def install(target: Target, source: str) -> Dict[str, Any]:
    """Verify the user's copy ``source`` of the target and copy it into the cache.

    ``source`` stays where it is. A different file already cached is removed with what was
    derived from it. Returns the new record. Call this under :func:`locked`.
    """
    try:
        md5, sha256, _ = _check(target, source, source)
    except OSError as err:
        raise DownloadError(f"{source}: cannot be read ({err.strerror or err})") from None
    with fileio.staged(target.path) as staging:
        try:
            shutil.copyfile(source, staging)
        except OSError as err:
            raise DownloadError(f"cannot copy {source} into {target.directory} ({err})") from None
        if _hash_file(staging)[1] != sha256:
            raise DownloadError(f"{source} changed while it was copied; try again")
        if os.path.exists(target.path) and _hash_file(target.path)[1] != sha256:
            _discard(target)  # The staged copy is a sibling: discarding leaves it alone.
    _trust(target, md5, sha256)
    return read_record(target)


# ----------------------------------------------------------------------------
# HTTP: tries, one try, and the bytes of one response.
# ----------------------------------------------------------------------------


def _download(target: Target, progress: bool) -> None:
    """Fetch the target into ``<file>.part``, verify it there, and rename it into place."""
    _fetch_with_retries(target, progress)
    part = target.part_path
    try:
        md5, sha256, _ = _check(target, part, f"download from {target.url}")
    except DownloadError as err:
        os.remove(part)
        raise DownloadError(f"{err}; nothing was kept: try again, or check the mirror") from None
    os.replace(part, target.path)
    _trust(target, md5, sha256)


def _fetch_with_retries(target: Target, progress: bool) -> None:
    """Try the download up to ``RETRIES + 1`` times, each try resuming the partial file."""
    limit = target.size if target.size is not None else MAX_UNKNOWN_SIZE
    delay, last_error = BACKOFF_S, ""
    for attempt in range(RETRIES + 1):
        if attempt:
            time.sleep(delay)
            delay *= 2
        have = _partial_size(target.part_path, limit)
        try:
            _fetch(target, have, limit, progress)
            return
        except DownloadError:
            raise
        except Exception as err:  # Network and protocol errors: http.client raises its own.
            last_error = _retry_reason(target, err)
    raise DownloadError(
        _missing_message(
            target, f"cannot download {target.url} after {RETRIES + 1} tries ({last_error})"
        )
    )


def _partial_size(part: str, limit: int) -> int:
    """The bytes a partial download already holds; one larger than the file is removed."""
    have = os.path.getsize(part) if os.path.exists(part) else 0
    if have > limit:
        os.remove(part)
        return 0
    return have


def _retry_reason(target: Target, err: Exception) -> str:
    """Why a try failed, in a few words for the final error if every try fails.

    Raises :class:`DownloadError` instead when no retry can succeed: the server refuses
    the file, or the disk refuses its bytes.
    """
    if isinstance(err, urllib.error.HTTPError):
        if err.code == 416:  # The partial file is not a prefix the server can extend.
            with contextlib.suppress(FileNotFoundError):
                os.remove(target.part_path)
            return "HTTP 416 (range not satisfiable); restarting"
        if err.code in _FINAL_HTTP_CODES:
            raise DownloadError(
                _missing_message(target, f"{target.url} answered HTTP {err.code} {err.reason}")
            ) from None
        return f"HTTP {err.code} {err.reason}"
    if isinstance(err, OSError):  # URLError, timeouts, resets.
        if err.errno in _DISK_ERRNOS:
            raise DownloadError(
                f"cannot write {target.part_path} ({err}); set PANNS_JAX_HOME to a writable "
                "directory with enough free space"
            ) from None
        return f"{type(err).__name__}: {getattr(err, 'reason', err)}"
    return f"{type(err).__name__}: {err}"  # http.client.IncompleteRead and its kind.


def _fetch(target: Target, have: int, limit: int, progress: bool) -> None:
    """One try: write the rest of the file to ``<file>.part``, which holds ``have`` bytes."""
    headers = {"User-Agent": USER_AGENT}
    if have:
        headers["Range"] = f"bytes={have}-"
    request = urllib.request.Request(target.url, headers=headers)
    with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
        start = _resumed_at(response, have, target.part_path)
        total = _announced_total(response, start, limit, target)
        written = _stream(response, target, start, total, limit, progress)
    if total is not None and written < total:
        raise OSError(f"connection closed after {written} of {total} bytes")


def _resumed_at(response: Any, have: int, part: str) -> int:
    """The byte where the response's body belongs in the partial file.

    It is 0 when the server sends the whole file, which then rewrites the partial one. A
    range other than the one asked for removes the partial file and fails the try, so the
    next try starts over.
    """
    if not (have and response.status == 206):
        return 0
    content_range = response.headers.get("Content-Range", "")
    try:
        start = int(content_range.split()[1].split("-")[0])
    except (IndexError, ValueError):
        start = -1
    if start != have:
        os.remove(part)
        raise OSError(f"server resumed at {content_range!r}, not at byte {have}")
    return start


def _announced_total(response: Any, start: int, limit: int, target: Target) -> Optional[int]:
    """The file's size as the response announces it; None when it announces none."""
    length = response.headers.get("Content-Length")
    total = start + int(length) if length and length.isdigit() else None
    if total is not None and total > limit:
        what = f"{target.size} bytes" if target.size is not None else "the size limit"
        raise DownloadError(
            f"{target.url}: the server announces {total} bytes, but {target.file} "
            f"has {what}; nothing was kept: check the mirror"
        )
    return total


def _stream(
    response: Any, target: Target, start: int, total: Optional[int], limit: int, progress: bool
) -> int:
    """Write the response's body to the partial file from byte ``start``; return its end.

    A body that runs past ``limit`` removes the partial file: it is not the target.
    """
    bar = _progress_bar(target.file, total, start) if progress else None
    written = start
    try:
        with open(target.part_path, "ab" if start else "wb") as out:
            while block := response.read(CHUNK):
                written += len(block)
                if written > limit:
                    raise DownloadError(
                        f"{target.url}: more than {limit} bytes, but {target.file} "
                        "is smaller; nothing was kept: check the mirror"
                    )
                out.write(block)
                if bar is not None:
                    bar.update(len(block))
    except DownloadError:
        os.remove(target.part_path)
        raise
    finally:
        if bar is not None:
            bar.close()
    return written


def _progress_bar(description: str, total: Optional[int], initial: int) -> Any:
    """A tqdm bar on stderr, drawn on a terminal only (``disable=None``), not into logs."""
    from tqdm import tqdm

    return tqdm(
        total=total,
        initial=initial,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=description,
        file=sys.stderr,
        dynamic_ncols=True,
        disable=None,
    )
