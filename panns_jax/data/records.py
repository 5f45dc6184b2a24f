"""Stored records -> (int16 samples, int32 label ids), without TensorFlow ops.

The panns_jax builders store each clip as a serialized tf.train.Example with the
audio as one bytes value (int16, little-endian) and the labels as packed int64s.
`parse_example` finds those two fields by walking the protobuf wire format in
Python (a few dozen varints per record) and views the audio bytes as int16 where
they lie, without copying them; anything else falls back to TensorFlow's parser.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Dict, Tuple

import numpy as np

Example = Tuple[np.ndarray, np.ndarray]  # (int16 audio [n], int32 label ids)


def _varint(buf: bytes, pos: int) -> Tuple[int, int]:
    result = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7


def _example_fields(raw: bytes) -> Dict[str, Tuple[str, Any]]:
    """Features of a serialized tf.train.Example without copying bytes values.

    Returns name -> ('bytes', range of the first value in `raw`) or
    ('ints', [int64 values]). Covers what TFDS writes (single bytes values,
    packed int64 lists). Raises ValueError on anything else.
    """

    def fields(start, end):
        pos = start
        while pos < end:
            tag, pos = _varint(raw, pos)
            if tag & 7 != 2:
                raise ValueError("unexpected wire type")
            n, pos = _varint(raw, pos)
            yield tag >> 3, pos, pos + n
            pos += n

    out = {}
    for num, s, e in fields(0, len(raw)):  # Example.features
        if num != 1:
            continue
        for num2, s2, e2 in fields(s, e):  # Features.feature map entries
            if num2 != 1:
                continue
            name, value = None, None
            for num3, s3, e3 in fields(s2, e2):  # key = 1, value (Feature) = 2
                if num3 == 1:
                    name = bytes(raw[s3:e3]).decode()
                elif num3 == 2:
                    value = next(fields(s3, e3), None)
            if name is None:
                raise ValueError("map entry without key")
            if value is None:  # Empty feature list.
                out[name] = ("ints", [])
                continue
            kind, s4, e4 = value
            if kind == 1:  # BytesList: first value.
                _, s5, e5 = next(fields(s4, e4))
                out[name] = ("bytes", range(s5, e5))
            elif kind == 3:  # Int64List, packed.
                ints = []
                for _, s5, e5 in fields(s4, e4):
                    pos = s5
                    while pos < e5:
                        v, pos = _varint(raw, pos)
                        ints.append(v - (1 << 64) if v >= 1 << 63 else v)
                out[name] = ("ints", ints)
            else:
                out[name] = ("other", None)
    return out


def parse_example(raw: bytes, label_key: str) -> Example:
    """(int16 audio, int32 label ids) of one serialized tf.train.Example.

    `raw` is bytes or any buffer (a memoryview of a reused read buffer is fine: the
    audio returned is a view into it).
    """
    try:
        fields = _example_fields(raw)
        kind, value = fields["audio"]
        samples = (
            np.frombuffer(raw, np.int16, len(value) // 2, value.start)
            if kind == "bytes"
            else np.asarray(value, np.int16)
        )
        return samples, np.asarray(fields[label_key][1], np.int32)
    except (KeyError, ValueError, IndexError, StopIteration):  # Other layout.
        from panns_jax import tf_cpu  # pylint: disable=g-import-not-at-top

        tf = tf_cpu.import_tensorflow()
        feature = tf.train.Example.FromString(bytes(raw)).features.feature
        audio = feature["audio"]
        samples = (
            np.frombuffer(audio.bytes_list.value[0], np.int16)
            if audio.bytes_list.value
            else np.asarray(audio.int64_list.value, np.int16)
        )
        return samples, np.asarray(feature[label_key].int64_list.value, np.int32)


# ----------------------------------------------------------------------------
# ArrayRecord files written uncompressed with one record per chunk (what the
# panns_jax builders write), read by positional reads into a reused buffer.
#
# The file is a Riegeli record file: 64 KiB blocks, each starting with a 24-byte
# block header; between them, chunks (a 40-byte chunk header, then its data). A
# "simple" chunk's data is a compression byte (0: none), the varint length of the
# record sizes, the sizes (varints), then the records. The last block holds the
# postscript (records whose field 1 is the footer's offset); the footer chunk's
# records are a metadata record, then per chunk (offset, decoded size, records).
# array_record's own reader costs ~0.3 ms of CPU per 10 s clip on top of the
# ~0.03 ms read from the page cache (copies, hashing of each chunk): more than
# everything else the input pipeline does with a clip. This reader skips the
# hashes: a record whose chunk header does not say what the footer said fails.
# ----------------------------------------------------------------------------

_BLOCK = 1 << 16
_BLOCK_HEADER = 24
_CHUNK_HEADER = 40
_SIMPLE_CHUNK = ord("r")
_MAX_IOV = 512  # Pairs of (data, block header) per preadv call (IOV_MAX is 1024).


def _varint_length(v: np.ndarray) -> np.ndarray:
    """Bytes of the varint encoding of each non-negative v."""
    bits = np.maximum(np.floor(np.log2(np.maximum(v, 1).astype(np.float64))) + 1, 1)
    return ((bits + 6) // 7).astype(np.int64)


def _simple_records(data) -> list:
    """The records of an uncompressed simple chunk's data, as memoryview slices."""
    data = memoryview(data)
    if data[0] != 0:
        raise ValueError("compressed chunk")
    length, pos = _varint(data, 1)
    sizes, end = [], pos + length
    while pos < end:
        size, pos = _varint(data, pos)
        sizes.append(size)
    out = []
    for size in sizes:
        out.append(data[pos : pos + size])
        pos += size
    return out


class ArrayRecordFile:
    """Record i of an uncompressed, one-record-per-chunk ArrayRecord file, by pread.

    `read_into(i, buffer)` reads the record's bytes into `buffer` (grown as needed)
    and returns a memoryview of them. It is thread-safe (positional reads, no shared
    offset), but each thread must pass its own buffer. It raises ValueError for any other
    layout (compressed, several records per chunk), which array_record's reader reads.
    """

    def __init__(self, path: str):
        self.path = path
        self._fd = -1
        self._fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            self._open()
        except (ValueError, KeyError, IndexError) as e:
            self.close()
            raise ValueError(f"{path}: not an uncompressed one-record-per-chunk file ({e})") from e
        except BaseException:
            self.close()
            raise

    def _open(self) -> None:
        size = os.fstat(self._fd).st_size
        if size < _BLOCK:
            raise ValueError("shorter than one block")
        last = (size - 1) // _BLOCK * _BLOCK
        postscript = self._chunk(last + _BLOCK_HEADER, size - last - _BLOCK_HEADER)
        footer_offset = _proto_varints(_simple_records(postscript)[0])[1]
        if not 0 < footer_offset < last:
            raise ValueError("no footer")
        footer = self._chunk(footer_offset, last - footer_offset)
        entries = [_proto_varints(r) for r in _simple_records(footer)[1:]]
        if any(e.get(3) != 1 for e in entries):
            raise ValueError("several records per chunk")
        self._offsets = np.array([e[1] for e in entries], np.int64)
        decoded = np.array([e[2] for e in entries], np.int64)
        # Simple chunk of one uncompressed record: 0, varint(len(varint(D))), varint(D), record.
        prefix = 1 + _varint_length(_varint_length(decoded)) + _varint_length(decoded)
        self._data_sizes = prefix + decoded
        self._record_starts = _CHUNK_HEADER + prefix
        self._sizes = decoded

    def __len__(self) -> int:
        return len(self._offsets)

    # ``_close`` is bound when the class is defined: the os module may be gone when
    # __del__ runs at exit.
    def close(self, _close: Callable[[int], None] = os.close) -> None:
        if self._fd >= 0:
            _close(self._fd)
            self._fd = -1

    def __del__(self):
        self.close()

    def _chunk(self, offset: int, max_length: int) -> memoryview:
        """The data of the chunk at `offset` (`max_length` bounds header + data)."""
        buf = bytearray(max_length)
        view = self._read_logical(offset, _CHUNK_HEADER, buf)
        data_size = int.from_bytes(view[8:16], "little")
        if data_size + _CHUNK_HEADER > max_length:
            raise ValueError(f"chunk at {offset} runs past the file")
        view = self._read_logical(offset, _CHUNK_HEADER + data_size, buf)
        if view[24] != _SIMPLE_CHUNK:
            raise ValueError(f"chunk at {offset} is not a simple chunk")
        return view[_CHUNK_HEADER:]

    def _read_logical(self, offset: int, length: int, buf: bytearray) -> memoryview:
        """`length` bytes of the chunk stream from file offset `offset`, block headers left
        out: one preadv scattering the data into `buf` and the headers into a scratch."""
        out = memoryview(buf)
        skip = bytearray(_BLOCK_HEADER)
        done, pos = 0, offset
        while done < length:
            iov, want, start = [], 0, pos
            while done + want < length and len(iov) < 2 * _MAX_IOV:
                if pos % _BLOCK == 0:  # A block header: into the scratch.
                    iov.append(skip)
                    pos += _BLOCK_HEADER
                    continue
                n = min(_BLOCK - pos % _BLOCK, length - done - want)
                iov.append(out[done + want : done + want + n])
                want += n
                pos += n
            got = os.preadv(self._fd, iov, start)
            if got != pos - start:
                raise ValueError(f"{self.path}: short read at {start}")
            done += want
        return out[:length]

    def read_into(self, i: int, buffer: bytearray) -> memoryview:
        """The bytes of record i, read into `buffer`, or into a new bytearray if it is too
        small (the view's `.obj`: keep that one for the next read)."""
        length = int(self._record_starts[i] + self._sizes[i])
        if len(buffer) < length:
            buffer = bytearray(max(length, 2 * len(buffer)))
        view = self._read_logical(int(self._offsets[i]), length, buffer)
        header = view[:_CHUNK_HEADER]
        if (
            int.from_bytes(header[8:16], "little") != self._data_sizes[i]
            or header[24] != _SIMPLE_CHUNK
            or int.from_bytes(header[25:32], "little") != 1
            or int.from_bytes(header[32:40], "little") != self._sizes[i]
        ):
            raise ValueError(f"{self.path}: record {i} is not where the footer says")
        return view[int(self._record_starts[i]) :]


def _proto_varints(record) -> Dict[int, int]:
    """Field number -> value of the varint fields of a serialized protobuf message."""
    out, pos, record = {}, 0, memoryview(record)
    while pos < len(record):
        tag, pos = _varint(record, pos)
        if tag & 7 == 0:
            out[tag >> 3], pos = _varint(record, pos)
        elif tag & 7 == 2:
            n, pos = _varint(record, pos)
            pos += n
        elif tag & 7 in (1, 5):
            pos += 8 if tag & 7 == 1 else 4
        else:
            raise ValueError("unexpected wire type")
    return out
