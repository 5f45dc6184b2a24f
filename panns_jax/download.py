"""Verified downloads into the cache: one file fetched over HTTP, resumed, checked, locked.

A :class:`Target` names one file: where it comes from, where it belongs and what it must
be (its size where known, its md5 where published). Beside the file the cache keeps:

    <file>          the verified file, renamed into place only once verified
    <file>.part     a download in progress, resumed with an HTTP ``Range`` request
    <file>.json     the record of the verified file: its size, mtime, md5 and sha256
    <file>.lock     held while one process fetches the file or derives from it
    <stem>.<hash>/  directories derived from the file (the zoo's converted checkpoint),
                    named by the first 16 hex digits of its sha256 and removed with it

The file's name is a plain name (:func:`file_name_problem`), so these paths, and the
temporary siblings that :func:`panns_jax.fileio.staged` renames into place, all lie in the
target's directory: nothing else is ever written, renamed or deleted. No symbolic link
there is followed: one in place of the file, its partial download, its record or its lock
(or a partial download hard-linked to another name) stops the work with one line, and
:func:`forget` and :func:`clear_links` remove the link itself, never what it points to. A
record whose digests are not hex is ignored (a derived directory is named by one).

A file without a published md5 is trusted on first use, and only a good first copy has its
sha256 recorded: one whose size is known and matches, or whose download received all of
its announced ``Content-Length``, and which the caller's check accepts (the zoo reads and
converts it). Every later copy must match that sha256 until :func:`forget` clears it. A
cached file whose size or modification time differs from its record is hashed again before
it is used.

Downloads stream with a progress bar, time out, and retry with a growing pause, each try
resuming where the last one stopped. All the tries of one download share one deadline,
:data:`DEADLINE_FLOOR_S` plus the file's size at the minimum rate (:data:`MIN_RATE_BPS`,
``PANNS_JAX_MIN_RATE`` bytes/s), so a server that trickles cannot hold it forever. The lock
waits as long as another process's download and conversion may take
(``PANNS_JAX_LOCK_TIMEOUT`` seconds when set), then fails with one line naming the lock.
``PANNS_JAX_OFFLINE=1`` keeps downloads from starting: a missing file is then one error that
names the URL and the path where a copy belongs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import math
import os
import re
import shutil
import stat
import sys
import time
import urllib.error
import urllib.request
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

from panns_jax import fileio

TIMEOUT_S = 30.0  # Per connect and per read, and never past the download's deadline.
RETRIES = 4  # Further tries after the first, each resuming where the last one stopped.
BACKOFF_S = 1.0  # The pause before the first retry, doubled before each further one.
CHUNK = 1 << 20
MAX_UNKNOWN_SIZE = 2 << 30  # The most bytes streamed or installed for a file of unknown size.
MIN_RATE_BPS = 50_000.0  # The slowest average rate a download may keep (PANNS_JAX_MIN_RATE).
DEADLINE_FLOOR_S = 60.0  # Added to every deadline: connecting and a slow start.
LOCK_TIMEOUT_S: Optional[float] = None  # None: the holder's deadline (PANNS_JAX_LOCK_TIMEOUT).
CONVERT_ALLOWANCE_S = 600.0  # What a lock holder may spend deriving from the file.
ASSUMED_SIZE = 500_000_000  # A file of unknown size, for the lock's wait (largest: 426 MB).
MAX_NAME = 200  # Room for the suffixes and the staging names within 255 bytes.
USER_AGENT = "panns_jax (+https://zenodo.org/record/3987831)"
# Answers that a later try may not get: the server is busy or failed for a moment.
_RETRY_HTTP_CODES = (408, 425, 429, 500, 502, 503, 504)
_DISK_ERRNOS = (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT)
_RESERVED_SUFFIXES = (".json", ".part", ".lock")
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)

# Reads a candidate file and raises when it is not what the target must be.
Check = Callable[[str], Any]


class DownloadError(ValueError):
    """A file that cannot be fetched or verified. The message says why and what to do."""


class _PinMismatch(DownloadError):
    """A copy whose sha256 is not the one recorded when the file was first verified."""


def file_name_problem(name: Any) -> Optional[str]:
    """Why ``name`` cannot name a file of the cache, or None when it can.

    It must be a plain name: no separator, no ``..``, not absolute, not hidden (the
    temporary siblings are hidden) and not ending in a suffix the cache keeps beside it.
    """
    if not isinstance(name, str) or not name:
        return "it must be a non-empty string"
    if len(name) > MAX_NAME:
        return f"it is longer than {MAX_NAME} characters"
    if any(sep and sep in name for sep in ("/", "\\", os.sep, os.altsep)):
        return "it holds a path separator"
    if ".." in name or os.path.isabs(name) or name.startswith("."):
        return "it must not hold '..', be absolute or start with '.'"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "it holds a control character"
    if name.endswith(_RESERVED_SUFFIXES):
        return f"it ends in one of {', '.join(_RESERVED_SUFFIXES)}, which the cache keeps"
    return None


@dataclasses.dataclass(frozen=True)
class Target:
    """One file of the cache: the name people use for it, its URL, its path, its facts."""

    name: str
    url: str
    path: str
    md5: Optional[str] = None  # As published; compared in lower case.
    size: Optional[int] = None  # Bytes, where known.

    def __post_init__(self) -> None:
        problem = file_name_problem(os.path.basename(self.path))
        if problem:
            raise DownloadError(f"{self.path!r} cannot be a file of the cache: {problem}")

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

    @property
    def lock_path(self) -> str:
        return self.path + ".lock"


def offline() -> bool:
    """Whether ``PANNS_JAX_OFFLINE`` forbids the network."""
    return os.environ.get("PANNS_JAX_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _env_number(name: str, default: float, *, zero: bool = False) -> float:
    """A positive number (or 0 where ``zero``) from the variable ``name``, else ``default``."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero):
        raise DownloadError(f"{name}={text!r}: not a positive number")
    return value


def min_rate_bps() -> float:
    """The slowest average download rate in bytes/s: ``PANNS_JAX_MIN_RATE``, else the default."""
    return _env_number("PANNS_JAX_MIN_RATE", MIN_RATE_BPS)


def deadline_s(size: int) -> float:
    """The most seconds all the tries of a download of ``size`` bytes may take."""
    return DEADLINE_FLOOR_S + size / min_rate_bps()


def lock_timeout_s(target: Target) -> float:
    """How long to wait for another process's lock on the target.

    ``PANNS_JAX_LOCK_TIMEOUT`` when set, else :data:`LOCK_TIMEOUT_S` when set, else the
    longest the holder may take: its download's deadline and a conversion.
    """
    fixed = LOCK_TIMEOUT_S if LOCK_TIMEOUT_S is not None else -1.0
    chosen = _env_number("PANNS_JAX_LOCK_TIMEOUT", fixed, zero=True)
    if chosen >= 0:
        return chosen
    size = target.size if target.size is not None else ASSUMED_SIZE
    return deadline_s(size) + CONVERT_ALLOWANCE_S


# ----------------------------------------------------------------------------
# The cache's entries: what each path is, without following a link.
# ----------------------------------------------------------------------------


def _kind(path: str) -> str:
    """``missing``, ``file``, ``dir``, ``link`` or ``other``; a link is never followed."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return "missing"
    if stat.S_ISLNK(mode):
        return "link"
    if stat.S_ISREG(mode):
        return "file"
    return "dir" if stat.S_ISDIR(mode) else "other"


def is_cached(target: Target) -> bool:
    """Whether the target's path holds a regular file (a link there does not count)."""
    return _kind(target.path) == "file"


def real_directory(path: str) -> bool:
    """Whether ``path`` is a directory itself, not a link to one."""
    return _kind(path) == "dir"


def _foreign(target: Target) -> List[Tuple[str, str]]:
    """Each path where the cache keeps one of the target's files that holds something else:
    a link, a directory, a device, or a partial download that shares its data with another
    name (it is written in place). Pairs of the path and what it is."""
    found = []
    for path in (target.path, target.part_path, target.record_path, target.lock_path):
        kind = _kind(path)
        if kind == "file" and path == target.part_path and os.lstat(path).st_nlink > 1:
            kind = "hard link"
        if kind not in ("missing", "file"):
            what = {
                "link": "a symbolic link",
                "dir": "a directory",
                "hard link": "a hard link to another file",
            }.get(kind, "not a regular file")
            found.append((path, what))
    return found


def _refuse_foreign(target: Target) -> None:
    """Stop, in one line, at the first path that :func:`_foreign` finds."""
    for path, what in _foreign(target):
        raise DownloadError(
            f"{path} is {what}, where the cache keeps a file of its own and follows no link: "
            f"remove it, or run `panns-jax download {target.name} --force`"
        )


def clear_links(target: Target) -> None:
    """Remove the links and devices that :func:`_foreign` finds (never what a link points
    to); a directory there is an error for its owner to remove."""
    try:
        for path, what in _foreign(target):
            if what == "a directory":
                raise DownloadError(f"{path} is a directory, not a file of the cache: remove it")
            os.unlink(path)
    except OSError as err:
        raise DownloadError(_cache_problem(target, err)) from None


def _open_read(path: str) -> Any:
    """Open a regular file of the cache for reading; a link or a device there fails."""
    fd = os.open(path, os.O_RDONLY | _NOFOLLOW | _NONBLOCK)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file", path)
    return os.fdopen(fd, "rb")


def _remove_file(path: str) -> None:
    """Remove a file or a link (never what it points to); a directory is left alone."""
    if _kind(path) not in ("missing", "dir"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


# ----------------------------------------------------------------------------
# The record of a verified file, and the checks against it.
# ----------------------------------------------------------------------------


_HEX = {"md5": re.compile(r"[0-9a-f]{32}"), "sha256": re.compile(r"[0-9a-f]{64}")}


def read_record(target: Target) -> Dict[str, Any]:
    """What was recorded when the file was verified; empty when nothing was, or when the
    record is damaged (its digests must be hex: a derived directory is named by one)."""
    try:
        with _open_read(target.record_path) as f:
            record = json.loads(f.read().decode("utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(record, dict):
        return {}
    for key, pattern in _HEX.items():
        value = record.get(key)
        if value is not None and not (isinstance(value, str) and pattern.fullmatch(value)):
            return {}
    return record


def _write_record(target: Target, record: Dict[str, Any]) -> None:
    with fileio.staged(target.record_path) as staging:
        with open(staging, "w", encoding="utf-8") as f:
            json.dump(record, f, indent=2)


def _hash_file(path: str, *, in_cache: bool = True) -> Tuple[str, str, int]:
    """md5, sha256 and size of ``path``; a file of the cache is opened without following."""
    md5, sha256, size = hashlib.md5(), hashlib.sha256(), 0
    with _open_read(path) if in_cache else open(path, "rb") as f:
        while block := f.read(CHUNK):
            md5.update(block)
            sha256.update(block)
            size += len(block)
    return md5.hexdigest(), sha256.hexdigest(), size


def _expected(target: Target, record: Dict[str, Any]) -> Tuple[str, Optional[str]]:
    """The kind of digest a copy must match, and its value when one is known.

    A published md5 wins. Without one, the sha256 recorded when the file was first
    verified is the reference, and before that there is none.
    """
    if target.md5:
        return "md5", target.md5.lower()
    if isinstance(record.get("sha256"), str) and record.get("file") == target.file:
        return "sha256", record["sha256"]
    return "sha256", None


def _first_use(target: Target) -> bool:
    """Whether no digest vouches for a copy yet: no published md5 and nothing recorded."""
    return _expected(target, read_record(target))[1] is None


def _check_size(target: Target, size: int, source: str) -> None:
    """The size must be the target's where known, and at most the limit where not."""
    if target.size is not None and size != target.size:
        raise DownloadError(f"{source}: {size} bytes, but {target.file} has {target.size} bytes")
    if target.size is None and size > MAX_UNKNOWN_SIZE:
        raise DownloadError(
            f"{source}: {size} bytes, more than any checkpoint of unknown size may have "
            f"({MAX_UNKNOWN_SIZE} bytes)"
        )


def _check_digest(target: Target, md5: str, sha256: str, size: int, source: str) -> None:
    """The digest must be the published md5, else the recorded sha256, where known."""
    kind, want = _expected(target, read_record(target))
    got = md5 if kind == "md5" else sha256
    if want is not None and got != want:
        if kind == "md5":
            raise DownloadError(
                f"{source}: md5 mismatch for {target.file}: expected {want} (published), "
                f"got {got} ({size} bytes)"
            )
        raise _PinMismatch(
            f"{source}: sha256 mismatch for {target.file}: expected {want} (recorded when it "
            f"was first verified), got {got} ({size} bytes)"
        )


def _force_hint(target: Target) -> str:
    return (
        "if the recorded sha256 is the wrong one, `panns-jax download "
        f"{target.name} --force` forgets it and fetches the file again"
    )


def _run_check(check: Optional[Check], path: str, source: str) -> None:
    """Run the caller's check of a candidate file; whatever it raises refuses the file."""
    if check is None:
        return
    try:
        check(path)
    except Exception as err:  # The bytes are untrusted: any failure to read them refuses them.
        detail = str(err).splitlines()[0][:300] if str(err) else type(err).__name__
        raise DownloadError(f"{source}: not a checkpoint that loads ({detail})") from None


def _verify(
    target: Target, path: str, source: str, check: Optional[Check], complete: bool
) -> Tuple[str, str]:
    """Check the candidate at ``path``: its size, then its digest, and on first use that it
    is complete and passes ``check``. Returns its md5 and sha256."""
    _check_size(target, os.lstat(path).st_size, source)
    md5, sha256, size = _hash_file(path)
    _check_size(target, size, source)
    _check_digest(target, md5, sha256, size, source)
    if _first_use(target):
        if not complete and target.size is None:
            raise DownloadError(
                f"{source}: the server announced no length and {target.file} has no known "
                "size or md5, so a complete copy cannot be told from a cut one"
            )
        _run_check(check, path, source)
    return md5, sha256


def _trust(target: Target, md5: str, sha256: str) -> None:
    """Record the digests and the stat of the verified file in the cache.

    A later stat that differs from the recorded one makes :func:`verified` hash it again.
    """
    st = os.lstat(target.path)
    kind, _ = _expected(target, read_record(target))
    _write_record(
        target,
        {
            "name": target.name,
            "file": target.file,
            "size": st.st_size,
            "mtime_ns": st.st_mtime_ns,
            "md5": md5,
            "sha256": sha256,
            "verified_by": "published md5" if kind == "md5" else "sha256 of the first download",
        },
    )


def _stat_matches(target: Target, record: Dict[str, Any]) -> bool:
    try:
        st = os.lstat(target.path)
    except OSError:
        return False
    return (
        stat.S_ISREG(st.st_mode)
        and record.get("file") == target.file
        and record.get("size") == st.st_size
        and record.get("mtime_ns") == st.st_mtime_ns
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
    """The directory for what is derived from the copy with this sha256 (hex digits)."""
    if not _HEX["sha256"].fullmatch(sha256):
        raise DownloadError(f"{sha256!r} is not a sha256 in hex")
    stem = os.path.splitext(target.file)[0]
    return os.path.join(target.directory, f"{stem}.{sha256[:16]}")


def remove_derived(target: Target) -> None:
    """Remove every directory derived from the file, whatever copy it came from.

    Only ``<stem>.<16 hex digits>`` entries are touched; a link there is removed itself.
    """
    pattern = re.compile(re.escape(os.path.splitext(target.file)[0]) + r"\.[0-9a-f]{16}")
    try:
        names = os.listdir(target.directory)
    except FileNotFoundError:
        return
    for name in names:
        path = os.path.join(target.directory, name)
        if not pattern.fullmatch(name):
            continue
        if real_directory(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            _remove_file(path)


def _discard(target: Target) -> None:
    """Remove a bad file, its partial download and what was derived from it.

    The record stays: it holds the sha256 that a copy without a published md5 must match.
    """
    remove_derived(target)
    _remove_file(target.path)
    _remove_file(target.part_path)


def forget(target: Target) -> None:
    """Remove the file, its partial download, its record and what was derived from it.

    A link in any of their places is removed itself. The next use fetches the file and
    verifies it as on first use, so a wrong recorded sha256 is cleared this way.
    """
    clear_links(target)
    with locked(target):
        for path in (target.path, target.part_path, target.record_path):
            _remove_file(path)
        remove_derived(target)


# ----------------------------------------------------------------------------
# The lock, and the cache's own failures.
# ----------------------------------------------------------------------------


@contextlib.contextmanager
def locked(target: Target) -> Iterator[None]:
    """Hold ``<file>.lock`` while the block runs, so one process at a time fetches the file.

    The wait for another process is bounded (:func:`lock_timeout_s`). A link where the cache
    keeps one of its files, and a cache directory that cannot be used (read-only, full),
    fail as one :class:`DownloadError` line, whether the lock or the block meets them.
    """
    import filelock

    try:
        os.makedirs(target.directory, exist_ok=True)
        _refuse_foreign(target)
        timeout = lock_timeout_s(target)
        lock = filelock.FileLock(target.lock_path)
        try:
            lock.acquire(timeout=0)
        except filelock.Timeout:
            print(
                f"waiting for another process that is fetching {target.file} (it holds "
                f"{target.lock_path}; up to {timeout:.0f} s) ...",
                file=sys.stderr,
            )
            try:
                lock.acquire(timeout=timeout)
            except filelock.Timeout:
                raise DownloadError(
                    f"another process still holds {target.lock_path} after {timeout:.0f} s "
                    f"(it is fetching or converting {target.file}): run again once it is "
                    "done, or set PANNS_JAX_LOCK_TIMEOUT=SECONDS to wait longer"
                ) from None
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
        f"{': ' + str(err.filename) if getattr(err, 'filename', None) else ''}); free some "
        "space or set PANNS_JAX_HOME to a writable directory"
    )


def _missing_message(target: Target, why: str) -> str:
    return (
        f"{target.name}: {why}; download {target.url} and put it at {target.path} "
        f"(or run `panns-jax download {target.name} --from FILE`)"
    )


# ----------------------------------------------------------------------------
# The verified file: from the cache, from a download, or from the user's copy.
# ----------------------------------------------------------------------------


def verified(
    target: Target, *, progress: bool = True, check: Optional[Check] = None
) -> Dict[str, Any]:
    """The record of the target's verified file in the cache, downloading it when missing.

    A cached file whose stat matches its record is used as it is. Any other cached file is
    hashed again, and when it is not the target it is removed with what was derived from
    it. ``check(path)`` must accept a file before its sha256 is first recorded. Call this
    under :func:`locked`.
    """
    _refuse_foreign(target)
    record = read_record(target)
    if is_cached(target):
        if _stat_matches(target, record):
            return record
        _reverify(target, check)
        return read_record(target)
    if offline():
        raise DownloadError(
            _missing_message(target, "not in the cache and PANNS_JAX_OFFLINE is set")
        )
    _download(target, progress, check)
    return read_record(target)


def _reverify(target: Target, check: Optional[Check]) -> None:
    """Hash a cached file that changed on disk or was never recorded, and record it."""
    try:
        md5, sha256 = _verify(target, target.path, target.path, check, complete=True)
    except DownloadError as err:
        _discard(target)
        way_out = (
            _force_hint(target)
            if isinstance(err, _PinMismatch)
            else f"run again to download it afresh, or put a good copy at {target.path}"
        )
        raise DownloadError(
            f"the cached file is corrupted ({err}); it was removed: {way_out}"
        ) from None
    _trust(target, md5, sha256)


def install(
    target: Target, source: str, check: Optional[Check] = None, *, force: bool = False
) -> Dict[str, Any]:
    """Verify the user's copy ``source`` of the target and copy it into the cache.

    Its size is checked first, then its digest where one is known, then ``check(source)``
    (the zoo converts it), and only then is it copied in. ``force`` ignores a recorded
    sha256, which the copy's then replaces. ``source`` stays where it is. A different file
    already cached is removed with what was derived from it. Returns the new record. Call
    this under :func:`locked`.
    """
    _refuse_foreign(target)
    try:
        before = os.stat(source)
    except OSError as err:
        raise DownloadError(f"{source}: cannot be read ({err.strerror or err})") from None
    if not stat.S_ISREG(before.st_mode):
        raise DownloadError(f"{source}: not a regular file")
    _check_size(target, before.st_size, source)
    known = None
    if target.md5 or not (force or _first_use(target)):
        md5, known, size = _hash_source(source)
        try:
            _check_digest(target, md5, known, size, source)
        except _PinMismatch as err:
            raise DownloadError(f"{err}; nothing was installed: {_force_hint(target)}") from None
    try:
        _run_check(check, source, source)
    except DownloadError as err:
        raise DownloadError(f"{err}; nothing was installed") from None
    with fileio.staged(target.path) as staging:
        md5, sha256, size = _copy_hashing(source, staging)
        after = os.stat(source)
        changed = (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns)
        if changed or (known is not None and sha256 != known):
            raise DownloadError(f"{source} changed while it was copied; try again")
        _check_size(target, size, source)
        record = read_record(target)
        if not (_stat_matches(target, record) and record.get("sha256") == sha256):
            _discard(target)  # The staged copy is a sibling: discarding leaves it alone.
    _trust(target, md5, sha256)
    return read_record(target)


def _hash_source(source: str) -> Tuple[str, str, int]:
    try:
        return _hash_file(source, in_cache=False)
    except OSError as err:
        raise DownloadError(f"{source}: cannot be read ({err.strerror or err})") from None


def _copy_hashing(source: str, staging: str) -> Tuple[str, str, int]:
    """Copy ``source`` to ``staging`` and return the md5, sha256 and size of what was copied."""
    md5, sha256, size = hashlib.md5(), hashlib.sha256(), 0
    try:
        src = open(source, "rb")
    except OSError as err:
        raise DownloadError(f"{source}: cannot be read ({err.strerror or err})") from None
    with src, open(staging, "wb") as out:
        while True:
            try:
                block = src.read(CHUNK)
            except OSError as err:
                raise DownloadError(f"{source}: cannot be read ({err.strerror or err})") from None
            if not block:
                break
            out.write(block)  # An OSError here is the cache's: locked() says so.
            md5.update(block)
            sha256.update(block)
            size += len(block)
    return md5.hexdigest(), sha256.hexdigest(), size


# ----------------------------------------------------------------------------
# HTTP: tries, one try, and the bytes of one response.
# ----------------------------------------------------------------------------


class _Deadline:
    """One deadline for all the tries of a download: the floor, plus the file's size at the
    minimum rate. Without a known size, the announced one, else the bytes received so far."""

    def __init__(self, target: Target):
        self.target = target
        self.rate = min_rate_bps()
        self.start = time.monotonic()

    def budget(self, total: Optional[int], written: int) -> float:
        size = self.target.size if self.target.size is not None else total
        return DEADLINE_FLOOR_S + (size if size is not None else written) / self.rate

    def remaining(self, total: Optional[int], written: int) -> float:
        return self.budget(total, written) - (time.monotonic() - self.start)

    def socket_timeout(self, written: int) -> float:
        """The socket's timeout for one try: never past the deadline, nor above TIMEOUT_S."""
        return max(0.1, min(TIMEOUT_S, self.remaining(None, written)))

    def check(self, total: Optional[int], written: int, why: str = "", pause: float = 0) -> None:
        """Raise :class:`DownloadError` when the deadline has passed, or would during
        ``pause``."""
        if self.remaining(total, written) >= pause:
            return
        elapsed = time.monotonic() - self.start
        of = f"{written} of {total}" if total is not None else f"{written}"
        raise DownloadError(
            f"{self.target.url}: {of} bytes after {elapsed:.1f} s{why}, past the deadline of "
            f"{self.budget(total, written):.1f} s (at least {self.rate:,.0f} bytes/s); the "
            "partial download is kept for the next run to resume (PANNS_JAX_MIN_RATE sets "
            "the minimum rate)"
        )


def _download(target: Target, progress: bool, check: Optional[Check]) -> None:
    """Fetch the target into ``<file>.part``, verify it there, and rename it into place."""
    complete = _fetch_with_retries(target, progress)
    part = target.part_path
    try:
        md5, sha256 = _verify(target, part, f"download from {target.url}", check, complete)
    except DownloadError as err:
        _remove_file(part)
        way_out = (
            _force_hint(target)
            if isinstance(err, _PinMismatch)
            else "try again, or check the mirror"
        )
        raise DownloadError(f"{err}; nothing was kept: {way_out}") from None
    os.replace(part, target.path)
    _trust(target, md5, sha256)


def _fetch_with_retries(target: Target, progress: bool) -> bool:
    """Try the download up to ``RETRIES + 1`` times, each try resuming the partial file.

    Returns whether the last try received all of an announced length.
    """
    limit = target.size if target.size is not None else MAX_UNKNOWN_SIZE
    deadline = _Deadline(target)
    delay, last_error = BACKOFF_S, ""
    for attempt in range(RETRIES + 1):
        have = _partial_size(target, limit)
        if attempt:
            deadline.check(None, have, f" (the last try: {last_error})", pause=delay)
            time.sleep(delay)
            delay *= 2
        try:
            return _fetch(target, have, limit, progress, deadline)
        except DownloadError:
            raise
        except urllib.error.HTTPError as err:
            last_error = _http_answer(target, err, have)
        except Exception as err:  # Network and protocol errors: http.client raises its own.
            last_error = _retry_reason(target, err)
    raise DownloadError(
        _missing_message(
            target, f"cannot download {target.url} after {RETRIES + 1} tries ({last_error})"
        )
    )


def _partial_size(target: Target, limit: int) -> int:
    """The bytes a partial download already holds; one larger than the file is removed."""
    kind = _kind(target.part_path)
    if kind == "missing":
        return 0
    if kind != "file":
        _refuse_foreign(target)
    have = os.lstat(target.part_path).st_size
    if have > limit:
        _remove_file(target.part_path)
        return 0
    return have


def _http_answer(target: Target, err: urllib.error.HTTPError, have: int) -> str:
    """What the server answered, for the final error if every try fails.

    Raises :class:`DownloadError` when no retry can succeed. A 416 to a resumed request
    means the partial file is not a prefix the server can extend: it is removed and the
    next try starts over.
    """
    reason = " ".join(str(err.reason or "").split())[:100]
    answer = f"HTTP {err.code}{' ' + reason if reason else ''}"
    with contextlib.suppress(Exception):
        err.close()
    if err.code == 416 and have:
        _remove_file(target.part_path)
        return f"{answer} to a request from byte {have}"
    if err.code in _RETRY_HTTP_CODES:
        return answer
    raise DownloadError(_missing_message(target, f"{target.url} answered {answer}")) from None


def _retry_reason(target: Target, err: Exception) -> str:
    """Why a try failed, in a few words for the final error if every try fails.

    Raises :class:`DownloadError` instead when the disk refuses the file's bytes.
    """
    if isinstance(err, OSError):  # URLError, timeouts, resets.
        if err.errno in _DISK_ERRNOS:
            raise DownloadError(
                f"cannot write {target.part_path} ({err}); set PANNS_JAX_HOME to a writable "
                "directory with enough free space"
            ) from None
        return f"{type(err).__name__}: {getattr(err, 'reason', err)}"
    return f"{type(err).__name__}: {err}"  # http.client.IncompleteRead and its kind.


def _fetch(target: Target, have: int, limit: int, progress: bool, deadline: _Deadline) -> bool:
    """One try: write the rest of the file to ``<file>.part``, which holds ``have`` bytes.

    Returns whether the response announced its length (so all of it arrived).
    """
    headers = {"User-Agent": USER_AGENT}
    if have:
        headers["Range"] = f"bytes={have}-"
    request = urllib.request.Request(target.url, headers=headers)
    with urllib.request.urlopen(request, timeout=deadline.socket_timeout(have)) as response:
        start = _resumed_at(response, have, target.part_path)
        total = _announced_total(response, start, limit, target)
        written = _stream(response, target, start, total, limit, progress, deadline)
    if total is not None and written < total:
        raise OSError(f"connection closed after {written} of {total} bytes")
    return total is not None


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
        _remove_file(part)
        raise OSError(f"server resumed at {content_range!r}, not at byte {have}")
    return start


def _announced_total(response: Any, start: int, limit: int, target: Target) -> Optional[int]:
    """The file's size as the response announces it; None when it announces none."""
    length = response.headers.get("Content-Length", "").strip()
    total = start + int(length) if length.isdigit() else None
    whole = response.headers.get("Content-Range", "").rpartition("/")[2].strip()
    if total is not None and start and whole.isdigit() and int(whole) != total:
        raise OSError(f"the server announces {total} bytes and a file of {whole}")
    if total is not None and total > limit:
        what = f"{target.size} bytes" if target.size is not None else "the size limit"
        raise DownloadError(
            f"{target.url}: the server announces {total} bytes, but {target.file} "
            f"has {what}; nothing was kept: check the mirror"
        )
    return total


def _open_part(target: Target, append: bool) -> Any:
    """The partial file, opened to write without following a link."""
    flags = os.O_WRONLY | os.O_CREAT | _NOFOLLOW | (os.O_APPEND if append else os.O_TRUNC)
    return os.fdopen(os.open(target.part_path, flags, 0o666), "ab" if append else "wb")


def _stream(
    response: Any,
    target: Target,
    start: int,
    total: Optional[int],
    limit: int,
    progress: bool,
    deadline: _Deadline,
) -> int:
    """Write the response's body to the partial file from byte ``start``; return its end.

    Each read returns what one receive brings, so the deadline is checked as bytes arrive.
    A body that runs past ``limit`` removes the partial file: it is not the target.
    """
    bar = _progress_bar(target.file, total, start) if progress else None
    written = start
    read = getattr(response, "read1", response.read)
    try:
        with _open_part(target, append=bool(start)) as out:
            while block := read(CHUNK):
                written += len(block)
                if written > limit:
                    out.close()
                    _remove_file(target.part_path)
                    raise DownloadError(
                        f"{target.url}: more than {limit} bytes, but {target.file} "
                        "is smaller; nothing was kept: check the mirror"
                    )
                out.write(block)
                if bar is not None:
                    bar.update(len(block))
                deadline.check(total, written)
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
