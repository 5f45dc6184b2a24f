"""Hostile cases of the zoo: the files beside the cache that must survive, and how a refusal
reads (tests/test_zoo.py, tests/test_download.py).

Each test's directory holds the cache (``cache/``), the table, and the files that the zoo
must never touch: ``x`` (that is ``cache/../x``) and ``outside/victim``, the target of the
links that a test plants in the cache. :class:`Outside` snapshots all of it but the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import time
from typing import Any, Dict, List, Sequence, Tuple

from panns_jax import cli

SENTINEL = b"a file beside the cache that the zoo must never touch\n"
_HASHED = 64 << 20  # Larger files (sparse sources) are compared by size and mtime.


class Outside:
    """The test's directory less the cache: made with its sentinels, frozen, compared."""

    def __init__(self, root: Any, cache: str):
        self.root, self.cache = str(root), os.path.abspath(cache)
        self.x = os.path.join(self.root, "x")
        self.victim = os.path.join(self.root, "outside", "victim")
        os.makedirs(os.path.dirname(self.victim), exist_ok=True)
        for path in (self.x, self.victim):
            with open(path, "wb") as f:
                f.write(SENTINEL)
        self.before: Dict[str, Tuple[Any, ...]] = {}

    def freeze(self) -> None:
        """Take the snapshot that :meth:`assert_unchanged` compares with."""
        self.before = self.snapshot()
        assert self.before[self.x][2] == hashlib.sha256(SENTINEL).hexdigest()
        assert self.before[self.victim][2] == hashlib.sha256(SENTINEL).hexdigest()

    def snapshot(self) -> Dict[str, Tuple[Any, ...]]:
        entries = {}
        for directory, dirs, files in os.walk(self.root):
            dirs[:] = [d for d in dirs if os.path.join(directory, d) != self.cache]
            for name in dirs + files:
                entries[os.path.join(directory, name)] = _entry(os.path.join(directory, name))
        return entries

    def assert_unchanged(self, *written: Any) -> None:
        """Nothing outside the cache changed, but the files the test itself ``written``."""
        after = self.snapshot()
        paths = (set(after) | set(self.before)) - {str(p) for p in written}
        changed = sorted(p for p in paths if after.get(p) != self.before.get(p))
        assert not changed, f"changed outside the cache: {changed}"


def _entry(path: str) -> Tuple[Any, ...]:
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        return ("link", os.readlink(path))
    if stat.S_ISDIR(st.st_mode):
        return ("dir",)
    if st.st_size > _HASHED:
        return ("file", st.st_size, st.st_mtime_ns)
    with open(path, "rb") as f:
        return ("file", st.st_size, hashlib.sha256(f.read()).hexdigest(), st.st_mtime_ns)


def run(capsys: Any, *argv: str) -> Tuple[int, str, float]:
    """``panns-jax ARGV`` in this process: its exit status, its stderr and its seconds."""
    capsys.readouterr()
    start = time.monotonic()
    code = cli.main([str(a) for a in argv])
    return code, capsys.readouterr().err, time.monotonic() - start


def assert_refused(result: Tuple[int, str, float], *needles: str) -> str:
    """A refusal: status 2, one to three lines ending in the error, no traceback, under
    60 s, and every needle in the message. Returns the stderr."""
    code, err, seconds = result
    lines = err.strip("\n").splitlines()
    assert code == 2, err
    assert 1 <= len(lines) <= 3 and lines[-1].startswith("error: "), err
    assert "Traceback" not in err and seconds < 60, (seconds, err)
    for needle in needles:
        assert needle in err, (needle, err)
    return err


def write_table(path: Any, rows: Sequence[Any]) -> None:
    """Write a ``PANNS_JAX_ZOO_TABLE`` file of ``rows`` (anything JSON can hold)."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(list(rows), f)


def table_rows(path: Any) -> List[Dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)
