"""PyTorch ``.pth`` files without PyTorch: a restricted reader and a writer.

The reader takes both layouts of ``torch.save``: the zip archive of torch >= 1.6
(``<root>/data.pkl`` plus one raw record per storage under ``<root>/data/``) and the
legacy stream of torch < 1.6 (magic-number, protocol and system-info
pickles, the object pickle, the list of storage keys, then every storage as an int64
element count followed by its bytes). Tensors become numpy arrays directly (bfloat16 via
``ml_dtypes``, which JAX already depends on), with the same bits ``torch.load`` gives.

Like ``torch.load(weights_only=True)`` it refuses every pickled global outside a small
allow-list: the tensor rebuild functions, storage types, ``OrderedDict``, ``torch.Size``,
numpy arrays, dtypes and scalars (the original training script saves its sampler state
with numpy arrays) and ``_codecs.encode`` (how protocol 2 pickles ``bytes``). Nothing
named in the file is ever called unless it is on that list, so no pickled code runs.

The writer emits the zip layout that ``torch.load(weights_only=True)`` reads, from
dicts, lists, tuples, strings, numbers and numpy arrays.
"""

from __future__ import annotations

import collections
import io
import math
import os
import struct
import zipfile
import zlib
from typing import Any, BinaryIO, Dict, List, Mapping, Optional, Tuple, Union

import numpy as np

PathOrFile = Union[str, os.PathLike, BinaryIO]

# torch.serialization: the legacy stream starts with these two pickled integers.
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001


class PthError(ValueError):
    """A file that is not a readable, weights-only PyTorch checkpoint."""


def _bfloat16() -> np.dtype:
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16)


# torch.<Name>Storage -> element type. Complex and quantized storages are refused.
_STORAGE_DTYPES = {
    "FloatStorage": "float32",
    "DoubleStorage": "float64",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
}


def _np_dtype(name: str) -> np.dtype:
    return _bfloat16() if name == "bfloat16" else np.dtype(name)


class _StorageType:
    """What ``torch.FloatStorage`` and its kind unpickle to. Only the element type matters.

    Each lookup makes a fresh one, with slots and a ``__setstate__`` that refuses, so a
    pickle's BUILD can alter neither it nor what later files read.
    """

    __slots__ = ("name", "dtype")

    def __init__(self, name: str):
        self.name = name
        self.dtype = _np_dtype(_STORAGE_DTYPES[name])

    def __setstate__(self, state: Any) -> None:
        raise PthError("a pickle tries to modify a storage type")


class _Storage:
    """A storage named by a persistent id; its bytes are attached once they are read."""

    def __init__(self, dtype: np.dtype, key: str, numel: int):
        self.dtype, self.key, self.numel = dtype, key, int(numel)
        self.array: Optional[np.ndarray] = None
        self.root: Optional[Tuple["_Storage", int]] = None  # Legacy views: (root, offset).

    def data(self) -> np.ndarray:
        if self.root is not None:
            root, offset = self.root
            return root.data()[offset : offset + self.numel]
        if self.array is None:
            raise PthError(f"storage {self.key!r} has no data in the file")
        return self.array


class _PendingTensor:
    """A tensor whose storage bytes may come later in the stream (legacy format)."""

    def __init__(self, storage: Any, offset: Any, size: Any, stride: Any):
        if not isinstance(storage, _Storage):
            raise PthError("a tensor is rebuilt from something that is not a storage")
        try:
            self.offset = int(offset)
            self.size = tuple(int(s) for s in size)
            self.stride = tuple(int(s) for s in stride)
        except (TypeError, ValueError):
            raise PthError("a tensor has a malformed size, stride or offset") from None
        if len(self.size) != len(self.stride):
            raise PthError(f"a tensor has size {self.size} but stride {self.stride}")
        if self.offset < 0 or min(self.size + self.stride, default=0) < 0:
            raise PthError("a tensor has a negative size, stride or offset")
        self.storage = storage

    def resolve(self) -> np.ndarray:
        data = self.storage.data()
        if 0 in self.size:
            return np.zeros(self.size, data.dtype)
        last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride))
        if last >= len(data):
            raise PthError(
                f"a tensor of size {self.size} reaches past the end of its storage "
                f"({len(data)} elements): the file is damaged"
            )
        contiguous = tuple(math.prod(self.size[i + 1 :]) for i in range(len(self.size)))
        view = data[self.offset : last + 1]
        if self.stride == contiguous or len(self.size) == 0:
            return view.reshape(self.size)
        item = data.dtype.itemsize
        return np.lib.stride_tricks.as_strided(
            view, self.size, tuple(s * item for s in self.stride), writeable=False
        ).copy()


def _rebuild_tensor(storage, offset, size, stride, *_):
    return _PendingTensor(storage, offset, size, stride)


def _rebuild_tensor_v2(
    storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None
):
    return _PendingTensor(storage, offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, hooks=None, state=None):
    if not isinstance(data, _PendingTensor):
        raise PthError("a parameter wraps something that is not a tensor")
    return data


def _torch_size(sizes=()):
    return tuple(int(s) for s in sizes)


def _codecs_encode(text, encoding="utf-8"):
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise PthError("_codecs.encode is allowed only to decode pickled bytes")
    return text.encode("latin1")


def _numpy_reconstruct(subtype, shape, dtype):
    if subtype is not np.ndarray:
        raise PthError("only plain numpy arrays may be reconstructed")
    return np.ndarray.__new__(np.ndarray, shape, dtype)


def _numpy_scalar(dtype, data=None):
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise PthError("only numeric numpy scalars may be unpickled")
    if not isinstance(data, bytes) or len(data) != dtype.itemsize:
        raise PthError("a numpy scalar has the wrong number of bytes")
    return np.frombuffer(data, dtype)[0]


def _allowed_globals() -> Dict[Tuple[str, str], Any]:
    allowed: Dict[Tuple[str, str], Any] = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
        ("torch", "Size"): _torch_size,
        ("_codecs", "encode"): _codecs_encode,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "_reconstruct")] = _numpy_reconstruct
        allowed[(module, "scalar")] = _numpy_scalar
    for name in (
        "float16",
        "float32",
        "float64",
        "int8",
        "int16",
        "int32",
        "int64",
        "uint8",
        "uint16",
        "uint32",
        "uint64",
        "bool",
    ):
        dtype_class = type(np.dtype(name))  # numpy >= 1.25: numpy.dtypes.Float32DType etc.
        allowed[(dtype_class.__module__, dtype_class.__name__)] = dtype_class
    return allowed


_ALLOWED = _allowed_globals()


def _unpickler(file: BinaryIO, persistent_load):
    import pickle

    class Unpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            if module == "torch" and name in _STORAGE_DTYPES:
                return _StorageType(name)
            try:
                return _ALLOWED[(module, name)]
            except (KeyError, TypeError):
                raise PthError(
                    f"refused: the file asks for the Python object {module}.{name}, which is "
                    "not a tensor, storage, number, string or container; a file of weights "
                    "never needs it, so it may be malicious. Nothing from it was run"
                ) from None

        def persistent_load(self, pid: Any) -> Any:
            return persistent_load(pid)

    return Unpickler(file, encoding="utf-8")


def _decode(value: Any) -> Any:
    return value.decode("ascii") if isinstance(value, bytes) else value


def _storage_from_pid(pid: Any, storages: Dict[str, _Storage]) -> _Storage:
    if not isinstance(pid, tuple) or not pid or _decode(pid[0]) != "storage" or len(pid) < 5:
        raise PthError(
            f"unsupported persistent object {_describe(pid)} (only tensor storages are read)"
        )
    storage_type, key, numel = pid[1], str(_decode(pid[2])), pid[4]
    if not isinstance(storage_type, _StorageType):
        raise PthError(f"unsupported storage type {_describe(storage_type)}")
    if not isinstance(numel, int) or numel < 0:
        raise PthError(f"storage {key!r} has an invalid size {numel!r}")
    if key not in storages:
        storages[key] = _Storage(storage_type.dtype, key, numel)
    storage = storages[key]
    view = pid[5] if len(pid) > 5 else None
    if view is None:
        return storage
    view_key, offset, view_numel = str(_decode(view[0])), int(view[1]), int(view[2])
    if view_key not in storages:
        child = _Storage(storage.dtype, view_key, view_numel)
        child.root = (storage, offset)
        storages[view_key] = child
    return storages[view_key]


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _resolve(value: Any) -> Any:
    """The unpickled object with every pending tensor replaced by its array."""
    if isinstance(value, _PendingTensor):
        return value.resolve()
    if isinstance(value, collections.OrderedDict):
        return collections.OrderedDict((k, _resolve(v)) for k, v in value.items())
    if isinstance(value, dict):
        return {k: _resolve(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_resolve(v) for v in value)
    if isinstance(value, (_Storage, _StorageType)):
        raise PthError(
            "the file holds a bare storage, not a tensor; it is not a checkpoint of weights"
        )
    return value


def _read_exact(file: BinaryIO, count: int, what: str) -> bytearray:
    # A bytearray rather than np.empty: numpy asks for huge pages, for which the kernel of a
    # loaded machine compacts memory (2-4x the system time, measured). The zero fill is cheap.
    buffer = bytearray(count)
    view = memoryview(buffer)
    got = 0
    while got < count:
        n = file.readinto(view[got:])
        if not n:
            raise PthError(
                f"the file ends inside {what} ({got} of {count} bytes): it is "
                "truncated; download or copy it again"
            )
        got += n
    return buffer


def _load_zip(file: BinaryIO, size: int) -> Any:
    try:
        archive = zipfile.ZipFile(file)
    except zipfile.BadZipFile:
        raise PthError(
            "a zip archive without its directory at the end: the file is truncated "
            "or damaged; download or copy it again"
        ) from None
    with archive:
        names = archive.namelist()
        pickles = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
            raise PthError(
                "a TorchScript archive, not a checkpoint: save its state_dict() "
                "with torch.save and read that"
            )
        if not pickles:
            raise PthError("a zip archive without data.pkl: not a PyTorch checkpoint")
        root = pickles[0][: -len("data.pkl")]
        storages: Dict[str, _Storage] = {}
        try:
            byteorder = "little"
            if f"{root}byteorder" in names:
                byteorder = (
                    bytes(_read_record(archive, file, archive.getinfo(f"{root}byteorder"), size))
                    .decode("ascii", "replace")
                    .strip()
                )
            pickled = _read_record(archive, file, archive.getinfo(pickles[0]), size)
            obj = _unpickler(
                io.BytesIO(pickled), lambda pid: _storage_from_pid(pid, storages)
            ).load()
            for key, storage in storages.items():
                if storage.root is not None:
                    continue
                name = f"{root}data/{key}"
                try:
                    info = archive.getinfo(name)
                except KeyError:
                    raise PthError(
                        f"storage record {name} is missing: the file is damaged"
                    ) from None
                nbytes = storage.numel * storage.dtype.itemsize
                if info.file_size != nbytes:
                    raise PthError(
                        f"storage record {name} holds {info.file_size} bytes, "
                        f"{nbytes} expected: the file is damaged"
                    )
                storage.array = _from_bytes(
                    _read_record(archive, file, info, size), storage.dtype, byteorder
                )
        except zipfile.BadZipFile as err:
            raise PthError(f"damaged zip archive ({err}): download or copy it again") from None
        except (EOFError, zipfile.LargeZipFile) as err:
            raise PthError(f"truncated or damaged archive ({err})") from None
        return _resolve(obj)


def _read_record(
    archive: zipfile.ZipFile, file: BinaryIO, info: zipfile.ZipInfo, size: int
) -> bytearray:
    """A record's bytes, with its CRC-32 checked.

    torch stores records uncompressed, and those are read straight from the file into one
    buffer (zipfile's reader would copy them twice). The CRC-32 is checked as zipfile checks
    it, except that a CRC of 0 means "not computed": torch.load reads the files that
    ``torch.serialization.set_crc32_options(False)`` writes.
    """
    name = info.filename
    stored = info.compress_type == zipfile.ZIP_STORED
    if info.compress_size > size or stored and info.file_size != info.compress_size:
        raise PthError(f"record {name} claims more bytes than the file has: the file is damaged")
    if not stored or info.flag_bits & 0x1:  # Compressed (torch.load reads those too).
        with archive.open(info) as f:
            return _read_exact(f, info.file_size, name)
    file.seek(info.header_offset)
    header = bytes(_read_exact(file, 30, f"the header of record {name}"))
    name_size, extra_size = struct.unpack("<HH", header[26:30])
    local_name = bytes(_read_exact(file, name_size, f"the header of record {name}")).decode(
        "utf-8" if info.flag_bits & 0x800 else "cp437"
    )
    if header[:4] != b"PK\x03\x04" or local_name != info.orig_filename:
        raise PthError(
            f"record {name} has a damaged local header: the file is damaged; "
            "download or copy it again"
        )
    file.seek(extra_size, io.SEEK_CUR)
    data = _read_exact(file, info.file_size, name)
    if info.CRC and zlib.crc32(data) != info.CRC:
        raise PthError(
            f"record {name} fails its CRC-32 check: the file is damaged; download or copy it again"
        )
    return data


def _from_bytes(data: bytearray, dtype: np.dtype, byteorder: str) -> np.ndarray:
    array = np.frombuffer(data, dtype)
    if byteorder == "big" and dtype.itemsize > 1:
        array = array.byteswap()
    return array


def _no_persistent_ids(pid: Any) -> Any:
    raise PthError("unexpected persistent id in a legacy header")


def _load_legacy(file: BinaryIO, size: int) -> Any:
    plain = _no_persistent_ids
    if _unpickler(file, plain).load() != LEGACY_MAGIC:
        raise PthError("a pickle, but not one written by torch.save (no magic number)")
    protocol = _unpickler(file, plain).load()
    if protocol != LEGACY_PROTOCOL:
        raise PthError(f"unknown legacy torch.save protocol {_describe(protocol)}")
    sys_info = _unpickler(file, plain).load()
    little = not isinstance(sys_info, dict) or sys_info.get("little_endian", True)
    storages: Dict[str, _Storage] = {}
    obj = _unpickler(file, lambda pid: _storage_from_pid(pid, storages)).load()
    keys = _unpickler(file, plain).load()
    if not isinstance(keys, list):
        raise PthError("the legacy storage list is malformed")
    for key in keys:
        storage = storages.get(str(_decode(key)))
        if storage is None or storage.root is not None:
            raise PthError(f"storage {key!r} is listed but never used: the file is damaged")
        header = bytes(_read_exact(file, 8, f"the header of storage {key}"))
        (numel,) = struct.unpack("<q" if little else ">q", header)
        nbytes = numel * storage.dtype.itemsize
        if numel != storage.numel:
            raise PthError(
                f"storage {key} holds {numel} elements, {storage.numel} expected: "
                "the file is damaged"
            )
        if nbytes > size:
            raise PthError(
                f"storage {key} claims more bytes than the file has: the file is "
                "truncated or damaged"
            )
        storage.array = _from_bytes(
            _read_exact(file, nbytes, f"storage {key}"),
            storage.dtype,
            "little" if little else "big",
        )
    return _resolve(obj)


def load(source: PathOrFile) -> Any:
    """The object a ``.pth`` holds, with numpy arrays for tensors; no torch needed.

    Raises :class:`PthError` (one line: what is wrong) for empty, truncated, damaged or
    non-checkpoint files, and for any pickled global outside the allow-list.
    """
    if isinstance(source, (str, os.PathLike)):
        name = os.fspath(source)
        if not os.path.isfile(name):
            raise FileNotFoundError(f"{name}: no such checkpoint file")
        with open(name, "rb") as f:
            return _load_named(f, name)
    return _load_named(source, getattr(source, "name", "<file>"))


def _load_named(file: BinaryIO, name: str) -> Any:
    import pickle

    start = file.tell()
    file.seek(0, io.SEEK_END)
    size = file.tell() - start
    file.seek(start)
    head = file.read(512)
    file.seek(start)
    try:
        if size == 0:
            raise PthError("empty file (0 bytes), not a checkpoint: download or copy it again")
        if head.startswith(b"PK\x03\x04"):
            return _load_zip(file, size)
        if head.startswith(b"\x80") and head[2:3] == b"\x8a":  # A pickled long: the magic.
            return _load_legacy(file, size)
        if len(head) > 262 and head[257:262] == b"ustar":
            raise PthError(
                "a tar archive: the pre-2018 torch.save format is not supported; "
                "re-save it with a newer PyTorch"
            )
        raise PthError(
            "not a PyTorch checkpoint (neither a torch.save zip archive nor a "
            "legacy torch.save stream)"
        )
    except PthError as err:
        raise PthError(f"{name}: {err}") from None
    except (EOFError, pickle.UnpicklingError, struct.error) as err:
        detail = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise PthError(
            f"{name}: truncated or damaged checkpoint ({detail}); download or copy it again"
        ) from None
    except (
        TypeError,
        ValueError,
        AttributeError,
        IndexError,
        KeyError,
        MemoryError,
        OverflowError,
    ) as err:
        detail = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise PthError(f"{name}: malformed checkpoint ({type(err).__name__}: {detail})") from None


# ----------------------------------------------------------------------------
# Writing: a protocol-2 pickle emitted opcode by opcode, in torch's zip layout.
# ----------------------------------------------------------------------------

_DTYPE_STORAGE = {v: k for k, v in _STORAGE_DTYPES.items()}


class _Writer:
    """Pickles plain containers, numbers, strings and arrays; arrays become tensors."""

    def __init__(self) -> None:
        self.out = io.BytesIO()
        self.storages: List[np.ndarray] = []

    def write(self, obj: Any) -> bytes:
        self.out.write(b"\x80\x02")
        self._save(obj)
        self.out.write(b".")
        return self.out.getvalue()

    def _global(self, module: str, name: str) -> None:
        self.out.write(b"c" + module.encode() + b"\n" + name.encode() + b"\n")

    def _save(self, obj: Any) -> None:
        w = self.out.write
        if obj is None:
            w(b"N")
        elif obj is True or obj is False:
            w(b"\x88" if obj else b"\x89")
        elif isinstance(obj, (int, np.integer)):
            self._int(int(obj))
        elif isinstance(obj, (float, np.floating)):
            w(b"G" + struct.pack(">d", float(obj)))
        elif isinstance(obj, str):
            data = obj.encode("utf-8", "surrogatepass")
            w(b"X" + struct.pack("<I", len(data)) + data)
        elif isinstance(obj, np.ndarray):
            self._tensor(obj)
        elif isinstance(obj, collections.OrderedDict):
            self._global("collections", "OrderedDict")
            w(b")R")
            self._items(obj)
        elif isinstance(obj, dict):
            w(b"}")
            self._items(obj)
        elif isinstance(obj, list):
            w(b"]")
            if obj:
                w(b"(")
                for item in obj:
                    self._save(item)
                w(b"e")
        elif isinstance(obj, tuple):
            w(b"(")
            for item in obj:
                self._save(item)
            w(b"t")
        else:
            raise TypeError(
                f"cannot write {type(obj).__name__} to a .pth: only dicts, lists, "
                "tuples, strings, numbers, None and numpy arrays"
            )

    def _items(self, mapping: Mapping[Any, Any]) -> None:
        if not mapping:
            return
        self.out.write(b"(")
        for key, value in mapping.items():
            self._save(key)
            self._save(value)
        self.out.write(b"u")

    def _int(self, value: int) -> None:
        if 0 <= value < 256:
            self.out.write(b"K" + bytes([value]))
        elif 0 <= value < 65536:
            self.out.write(b"M" + struct.pack("<H", value))
        elif -(2**31) <= value < 2**31:
            self.out.write(b"J" + struct.pack("<i", value))
        else:
            data = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
            self.out.write(b"\x8a" + bytes([len(data)]) + data)

    def _tensor(self, array: np.ndarray) -> None:
        dtype = "bfloat16" if array.dtype == _bfloat16() else array.dtype.name
        if dtype not in _DTYPE_STORAGE:
            raise TypeError(f"cannot write a {array.dtype} array as a tensor")
        data = array if array.flags.c_contiguous else array.copy(order="C")  # Keeps 0-d.
        if data.dtype.byteorder == ">":
            data = data.astype(data.dtype.newbyteorder("<"))
        key = str(len(self.storages))
        self.storages.append(data)
        w = self.out.write
        self._global("torch._utils", "_rebuild_tensor_v2")
        w(b"((")
        self._save("storage")
        self._global("torch", _DTYPE_STORAGE[dtype])
        self._save(key)
        self._save("cpu")
        self._int(int(data.size))
        w(b"tQ")
        self._int(0)
        self._save(tuple(int(n) for n in data.shape))
        strides = [int(np.prod(data.shape[i + 1 :])) for i in range(data.ndim)]
        self._save(tuple(strides))
        w(b"\x89")
        self._global("collections", "OrderedDict")
        w(b")Rt")
        w(b"R")


def _aligned_write(archive: zipfile.ZipFile, name: str, data: Any, alignment: int = 64) -> None:
    """A stored record whose bytes start on an ``alignment`` boundary (as torch aligns)."""
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    header = 30 + len(name.encode())
    offset = archive.fp.tell() + header + 4  # 4: the padding field's own header.
    pad = (-offset) % alignment
    info.extra = struct.pack("<HH", 0x4246, pad) + b"Z" * pad  # "FB": torch's padding id.
    archive.writestr(info, data)


def save(target: PathOrFile, obj: Any) -> None:
    """Write ``obj`` in torch's zip format (readable by ``torch.load(weights_only=True)``).

    ``obj`` may nest dicts (``OrderedDict`` kept), lists, tuples, strings, numbers, None
    and numpy arrays (float16/32/64, bfloat16, int8-64, uint8, bool), which become tensors.
    """
    writer = _Writer()
    pickled = writer.write(obj)
    if isinstance(target, (str, os.PathLike)):
        root = os.path.splitext(os.path.basename(os.fspath(target)))[0] or "archive"
        with open(target, "wb") as f:
            _write_archive(f, root, pickled, writer.storages)
    else:
        _write_archive(target, "archive", pickled, writer.storages)


def _write_archive(file: BinaryIO, root: str, pickled: bytes, storages: List[np.ndarray]) -> None:
    root = "".join(c if c.isalnum() or c in "_-." else "_" for c in root) or "archive"
    with zipfile.ZipFile(file, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        _aligned_write(archive, f"{root}/data.pkl", pickled)
        _aligned_write(archive, f"{root}/.format_version", b"1")
        _aligned_write(archive, f"{root}/.storage_alignment", b"64")
        _aligned_write(archive, f"{root}/byteorder", b"little")
        for key, data in enumerate(storages):
            _aligned_write(archive, f"{root}/data/{key}", data.reshape(-1).view(np.uint8).data)
        _aligned_write(archive, f"{root}/version", b"3\n")
