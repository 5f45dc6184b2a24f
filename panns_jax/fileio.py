"""Files written whole or not at all.

Every file panns_jax writes for a user (checkpoints' side files, converted ``.pth``, the
model zoo's cache, tag/SED outputs, exports) goes through :func:`staged`, so a failure or a
kill mid-write never leaves a truncated file under the real name, and an existing file is
kept until the new one is complete.
"""

import contextlib
import os
import shutil
import uuid
from typing import Iterator

__all__ = ["staged"]


@contextlib.contextmanager
def staged(path: str) -> Iterator[str]:
    """Yield a temporary sibling of ``path`` to write; rename it onto ``path`` on success.

    The sibling is ``.<basename>.<random>.part`` in the same directory (so the rename is
    atomic: same file system) and the caller creates it with ``open`` as usual, so it gets
    the umask's mode (``tempfile.mkstemp`` would make it 0o600). On normal exit it is flushed
    to disk and replaces ``path`` (``os.replace``); on an exception it is removed and the
    exception propagates, leaving ``path`` as it was. Writers that add their own suffix to a
    path (``numpy.savez``, ``savefig`` without ``format=``) should be given an open file. A
    directory may be staged too (removed whole on an exception), but ``os.replace`` cannot
    replace an existing directory: the caller removes the old one first.
    """
    directory, base = os.path.split(os.path.abspath(path))
    staging = os.path.join(directory, f".{base}.{uuid.uuid4().hex[:12]}.part")
    try:
        yield staging
        _fsync(staging)
        os.replace(staging, path)
    except BaseException:
        if os.path.isdir(staging) and not os.path.islink(staging):  # A SavedModel export.
            shutil.rmtree(staging, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.remove(staging)
        raise


def _fsync(path: str) -> None:
    """Flush ``path``'s data to disk so the rename never exposes an empty file after a crash
    (for a directory, its entries)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
