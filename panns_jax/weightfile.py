"""One file of named arrays: a JSON header and the arrays' raw bytes, read in one pass.

    magic          16 bytes  b"PANNSJAX-ARRAYS1"
    header length   8 bytes  little-endian unsigned
    header         JSON      {"arrays": [{"key": ["params", "fc1", "kernel"],
                                          "dtype": "<f4", "shape": [2048, 2048],
                                          "offset": 0}, ...]}
    data                     each array's C-order bytes at its offset from the data's start
                             (a multiple of 64), in offset order, the last one ending the file

No pickle and no code: the header is plain JSON, and only numpy's built-in numeric dtypes
(bool, integers, floats) are stored. Every field is checked against the file's size before
any array memory is allocated, so a damaged or hostile file costs at most its own size in
memory and fails with one :class:`WeightFileError` line. The arrays are read into one
64-byte-aligned buffer (no memory map: a file truncated by another process while mapped
would crash the reader with SIGBUS instead of failing with an error).
"""

from __future__ import annotations

import json
import math
import os
import struct
from typing import List, Sequence, Tuple

import numpy as np

MAGIC = b"PANNSJAX-ARRAYS1"
ALIGN = 64
MAX_HEADER_BYTES = 64 << 20  # Far above any model's few hundred entries.
MAX_NDIM = 32
_PREFIX = len(MAGIC) + 8

Key = Tuple[str, ...]


class WeightFileError(ValueError):
    """A weights file that cannot be read; the message says what is wrong (no path)."""


def supported(array: np.ndarray) -> bool:
    """Whether ``array``'s dtype is one this format stores: numpy's bool, ints and floats."""
    dtype = np.dtype(array.dtype)
    return dtype.kind in "biuf" and np.dtype(dtype.str) == dtype


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def write(path: str, arrays: Sequence[Tuple[Key, np.ndarray]]) -> None:
    """Write ``arrays`` (key, array) to a new file ``path`` and flush it to disk.

    The caller makes it atomic (a staging directory or file). Raises ``ValueError`` for a
    dtype :func:`supported` refuses.
    """
    entries, values, offset = [], [], 0
    for key, array in arrays:
        value = np.asarray(array)  # ascontiguousarray would make a 0-d array 1-d.
        value = value if value.flags.c_contiguous else value.copy(order="C")
        if not supported(value):
            raise ValueError(f"{'/'.join(key)}: dtype {value.dtype} cannot be stored")
        offset = _aligned(offset)
        entries.append(
            {
                "key": list(key),
                "dtype": value.dtype.str,
                "shape": list(value.shape),
                "offset": offset,
            }
        )
        values.append(value)
        offset += value.nbytes
    header = json.dumps({"arrays": entries}).encode()
    with open(path, "wb") as f:
        f.write(MAGIC + struct.pack("<Q", len(header)) + header)
        start = f.tell()
        for entry, value in zip(entries, values):
            f.write(b"\0" * (start + entry["offset"] - f.tell()))
            f.write(memoryview(value.reshape(-1).view(np.uint8)))
        f.flush()
        os.fsync(f.fileno())


def _dtype(entry: dict, where: str) -> np.dtype:
    text = entry.get("dtype")
    try:
        dtype = np.dtype(text) if isinstance(text, str) else None
    except (TypeError, ValueError):  # Not understood; a sub-array too large for C.
        dtype = None
    if dtype is None or dtype.kind not in "biuf" or dtype.str != text:
        raise WeightFileError(f"{where}: dtype {json.dumps(text)[:40]} is not a numeric dtype")
    return dtype


def _shape(entry: dict, where: str) -> Tuple[int, ...]:
    shape = entry.get("shape")
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_NDIM
        or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)
    ):
        raise WeightFileError(f"{where}: shape {json.dumps(shape)[:60]} is not a list of sizes")
    return tuple(shape)


def _key(entry: dict, where: str) -> Key:
    key = entry.get("key")
    if not isinstance(key, list) or not key or not all(isinstance(k, str) and k for k in key):
        raise WeightFileError(f"{where}: key {json.dumps(key)[:60]} is not a list of names")
    return tuple(key)


def _layout(header: bytes, data_bytes: int) -> List[Tuple[Key, np.dtype, tuple, int, int]]:
    """(key, dtype, shape, offset, nbytes) of every entry, checked against the data's size."""
    try:
        parsed = json.loads(header.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise WeightFileError(f"the header is not valid JSON ({str(err)[:100]})") from None
    entries = parsed.get("arrays") if isinstance(parsed, dict) else None
    if not isinstance(entries, list):
        raise WeightFileError("the header has no list of 'arrays'")
    layout, end, seen = [], 0, set()
    for number, entry in enumerate(entries):
        where = f"header entry {number}"
        if not isinstance(entry, dict):
            raise WeightFileError(f"{where} is not an object")
        key, dtype, shape = _key(entry, where), _dtype(entry, where), _shape(entry, where)
        offset = entry.get("offset")
        if not isinstance(offset, int) or isinstance(offset, bool) or offset % ALIGN:
            raise WeightFileError(f"{where}: offset {offset!r} is not a multiple of {ALIGN}")
        nbytes = dtype.itemsize * math.prod(shape)  # Python ints: no overflow.
        if offset < end or offset + nbytes > data_bytes:
            raise WeightFileError(
                f"{where} ({'/'.join(key)}): {nbytes} bytes at offset {offset} lie outside "
                f"the file's {data_bytes} data bytes or overlap another array (truncated or "
                "damaged)"
            )
        if key in seen:
            raise WeightFileError(f"{where}: {'/'.join(key)} appears twice")
        seen.add(key)
        layout.append((key, dtype, shape, offset, nbytes))
        end = offset + nbytes
    if end != data_bytes:
        raise WeightFileError(f"the arrays end at data byte {end} but the file has {data_bytes}")
    return layout


def read(path: str) -> List[Tuple[Key, np.ndarray]]:
    """The (key, array) pairs of ``path`` in file order; :class:`WeightFileError` if damaged.

    The arrays are views of one writable, 64-byte-aligned buffer of the file's data size.
    """
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        prefix = f.read(_PREFIX)
        if len(prefix) < _PREFIX or prefix[: len(MAGIC)] != MAGIC:
            raise WeightFileError("not a panns_jax weights file (wrong magic bytes)")
        (length,) = struct.unpack("<Q", prefix[len(MAGIC) :])
        if length > min(size - _PREFIX, MAX_HEADER_BYTES):
            raise WeightFileError(
                f"the header declares {length} bytes, the file holds {size - _PREFIX} after "
                "its start (truncated or damaged)"
            )
        data_bytes = size - _PREFIX - length
        layout = _layout(f.read(length), data_bytes)
        raw = np.empty(data_bytes + ALIGN, np.uint8)
        skip = (-raw.ctypes.data) % ALIGN
        buffer = raw[skip : skip + data_bytes]
        view, done = memoryview(buffer), 0
        while done < data_bytes:
            n = f.readinto(view[done:])
            if not n:
                raise WeightFileError(f"the file ended {data_bytes - done} bytes early while read")
            done += n
    return [
        (key, buffer[offset : offset + nbytes].view(dtype).reshape(shape))
        for key, dtype, shape, offset, nbytes in layout
    ]
