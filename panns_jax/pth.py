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
with numpy arrays) and ``_codecs.encode`` (how protocol 2 pickles ``bytes``).

The pickles are run by an interpreter of this module, not by Python's unpickler, so that
a file can do nothing a file of weights does not need. It runs only the opcodes of data
(containers, numbers, strings, the memo, calls of the allow-list); it never sets an
attribute, and an opcode that changes an object (BUILD, SETITEM, APPEND) applies only to
the dicts, lists and sets the pickle made itself, to numpy's array and dtype rebuilds
(once each), and to nothing else. A tensor's storage, size, stride and offset are copied
and checked when it is rebuilt, and checked again against the bytes the file really holds
when its array is made. What a file may cost is bounded by the file: see the limits below.

The writer emits the zip layout that ``torch.load(weights_only=True)`` reads, from
dicts, lists, tuples, strings, numbers and numpy arrays.
"""

from __future__ import annotations

import codecs
import collections
import io
import math
import os
import reprlib
import struct
import zipfile
import zlib
from typing import Any, BinaryIO, Callable, Dict, List, Mapping, Optional, Tuple, Union

import numpy as np

PathOrFile = Union[str, os.PathLike, BinaryIO]

# torch.serialization: the legacy stream starts with these two pickled integers.
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001

# What one file may cost. Each bound is far above what a checkpoint needs (Cnn14: 327 MB,
# 81M float32 parameters, a 9 KB pickle of 2,600 opcodes) and keeps what any file costs, in
# memory and in time, within a few times its own size plus a fixed amount.
#: Most dimensions of a tensor or a numpy array (numpy's own limit is 32 or 64).
MAX_DIMS = 64
#: Deepest nesting of containers (a checkpoint nests 2 to 5 deep).
MAX_DEPTH = 100
#: Most pickle opcodes one file may run (a state_dict takes about 35 a tensor; one opcode
#: makes at most one object, so the pickles of any file cost at most about 250 MB).
MAX_OPCODES = 2**20
#: Longest line of a text opcode (a global's name; protocol 0's numbers and strings).
MAX_LINE = 2**16
#: The arrays of all tensors may hold at most this many times the bytes of the storages
#: the file holds, plus TENSOR_SLACK bytes (a zero stride repeats one element).
TENSOR_FACTOR, TENSOR_SLACK = 2, 2**24
#: Deflated records may inflate to at most this many times the file's size, plus
#: INFLATE_SLACK bytes, in all (torch writes its records stored, not deflated).
INFLATE_FACTOR, INFLATE_SLACK = 16, 2**26
# Sizes, strides, offsets and element counts are below this.
_MAX_INDEX = 2**62


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


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 3, 40, 40


def _describe(value: Any) -> str:
    """A short one-line repr of a value from the file, whatever its size or depth."""
    try:
        text = _REPR.repr(value)
    except Exception:  # An int of more than 4300 digits, say.
        text = f"<a {type(value).__name__}>"
    return text if len(text) <= 60 else text[:57] + "..."


def _printable(text: str, limit: int = 80) -> str:
    """``text`` from the file with control characters escaped, cut to ``limit``."""
    text = text[: limit + 1].encode("unicode_escape").decode("ascii")
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ----------------------------------------------------------------------------
# What the allow-listed globals build: frozen, checked values.
# ----------------------------------------------------------------------------


class _StorageType:
    """What ``torch.FloatStorage`` and its kind unpickle to. Only the element type matters."""

    __slots__ = ("name", "dtype")

    def __init__(self, name: str):
        self.name = name
        self.dtype = _np_dtype(_STORAGE_DTYPES[name])


class _Storage:
    """A storage named by a persistent id; the loader attaches its bytes once read."""

    __slots__ = ("dtype", "key", "numel", "array", "root", "offset")

    def __init__(self, dtype: np.dtype, key: str, numel: int):
        self.dtype, self.key, self.numel = dtype, key, numel
        self.array: Optional[np.ndarray] = None
        self.root: Optional["_Storage"] = None  # Legacy views: elements [offset, +numel).
        self.offset = 0

    def data(self) -> np.ndarray:
        if self.root is not None:
            return self.root.data()[self.offset : self.offset + self.numel]
        if self.array is None:
            raise PthError(f"storage {_describe(self.key)} has no data in the file")
        return self.array


def _index(value: Any, what: str) -> int:
    """``value`` as a size, stride, offset or count: an integer in [0, 2**62)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise PthError(f"{what} is {_describe(value)}, not an integer")
    if not 0 <= int(value) < _MAX_INDEX:
        raise PthError(f"{what} {_describe(value)} is out of range")
    return int(value)


def _indices(values: Any, what: str) -> Tuple[int, ...]:
    if type(values) not in (tuple, list):
        raise PthError(f"{what} is {_describe(values)}, not a tuple of integers")
    if len(values) > MAX_DIMS:
        raise PthError(f"{what} has {len(values)} dimensions; at most {MAX_DIMS} are read")
    return tuple(_index(v, what) for v in values)


class _Tensor:
    """A rebuilt tensor: its storage, size, stride and offset, copied, checked and frozen.

    No opcode can change it (the interpreter modifies only containers, and ``__setattr__``
    refuses); its view is checked against the storage's declared size now and against the
    bytes the file holds when :meth:`array` makes it.
    """

    __slots__ = ("storage", "offset", "size", "stride")

    def __init__(self, storage: Any, offset: Any, size: Any, stride: Any):
        if not isinstance(storage, _Storage):
            raise PthError("a tensor is rebuilt from something that is not a storage")
        size, stride = _indices(size, "a tensor's size"), _indices(stride, "a tensor's stride")
        if len(size) != len(stride):
            raise PthError(f"a tensor has size {size} but stride {stride}")
        for name, value in (
            ("storage", storage),
            ("offset", _index(offset, "a tensor's offset")),
            ("size", size),
            ("stride", stride),
        ):
            object.__setattr__(self, name, value)
        self._check(storage.numel)

    def __setattr__(self, name: str, value: Any) -> None:
        raise PthError("refused: the file tries to modify a tensor after it was rebuilt")

    def _check(self, numel: int) -> None:
        if 0 in self.size:
            return
        last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride))
        if last >= numel:
            raise PthError(
                f"a tensor of size {self.size} reaches element {last} of a storage of "
                f"{numel} elements: the file is damaged"
            )

    def array(self, budget: "_Budget") -> np.ndarray:
        """The tensor's values: a view of its storage, or a copy when strided."""
        data = self.storage.data()
        self._check(len(data))
        count = math.prod(self.size)
        budget.add_tensor(count * data.dtype.itemsize)
        if count == 0:
            return np.zeros(self.size, data.dtype)
        contiguous = tuple(math.prod(self.size[i + 1 :]) for i in range(len(self.size)))
        if self.stride == contiguous:
            return data[self.offset : self.offset + count].reshape(self.size)
        last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride))
        item = data.dtype.itemsize
        return np.lib.stride_tricks.as_strided(
            data[self.offset : last + 1],
            self.size,
            tuple(s * item for s in self.stride),
            writeable=False,
        ).copy()


class _Dtype:
    """What ``numpy.dtype(spec, align, copy)`` unpickles to; one BUILD sets its byte order."""

    __slots__ = ("dtype", "built")

    def __init__(self, dtype: np.dtype):
        self.dtype, self.built = dtype, False

    def build(self, state: Any) -> None:
        if self.built:
            raise PthError("refused: the file tries to modify a numpy dtype twice")
        if type(state) is not tuple or len(state) not in (8, 9) or state[0] not in (3, 4):
            raise PthError(f"a numpy dtype with the malformed state {_describe(state)}")
        if state[1] not in ("<", ">", "|", "=") or any(v is not None for v in state[2:5]):
            raise PthError("a structured or unknown numpy dtype (only numeric dtypes are read)")
        if state[1] in "<>":
            self.dtype = self.dtype.newbyteorder(state[1])
        self.built = True


class _NumpyArray:
    """What ``numpy``'s ``_reconstruct`` unpickles to: empty until one BUILD fills it."""

    __slots__ = ("array",)

    def __init__(self) -> None:
        self.array: Optional[np.ndarray] = None

    def build(self, state: Any) -> None:
        if self.array is not None:
            raise PthError("refused: the file tries to modify a numpy array after it was built")
        if type(state) is tuple and len(state) == 5 and state[0] == 1:
            state = state[1:]
        if type(state) is not tuple or len(state) != 4:
            raise PthError(f"a numpy array with the malformed state {_describe(state)}")
        shape, dtype, fortran, raw = state
        shape = _indices(shape, "a numpy array's shape")
        if not isinstance(dtype, _Dtype) or type(fortran) is not bool:
            raise PthError("a numpy array of a non-numeric dtype or with a malformed state")
        if type(raw) not in (bytes, bytearray):
            raise PthError("a numpy array whose data are not bytes (object arrays are refused)")
        if len(raw) != math.prod(shape) * dtype.dtype.itemsize:
            raise PthError(
                f"a numpy array of shape {shape} and {len(raw)} bytes: the file is damaged"
            )
        order = "F" if fortran else "C"
        self.array = np.frombuffer(raw, dtype.dtype).reshape(shape, order=order).copy("K")


class _Global:
    """An allow-listed global as a pickle sees it: it may be called, never changed."""

    __slots__ = ("name", "function")

    def __init__(self, name: str, function: Callable[..., Any]):
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "function", function)

    def __setattr__(self, name: str, value: Any) -> None:
        raise PthError(f"refused: the file tries to modify {self.name}")

    def call(self, args: tuple) -> Any:
        try:
            return self.function(*args)
        except TypeError as err:
            raise PthError(
                f"{self.name} is called with arguments it does not take ({_printable(str(err))})"
            ) from None


def _rebuild_tensor(storage, offset, size, stride, *_) -> _Tensor:
    return _Tensor(storage, offset, size, stride)


def _rebuild_tensor_v2(
    storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None
) -> _Tensor:
    return _Tensor(storage, offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, hooks=None, state=None) -> _Tensor:
    if not isinstance(data, _Tensor):
        raise PthError("a parameter wraps something that is not a tensor")
    return data


def _torch_size(sizes=()) -> Tuple[int, ...]:
    return _indices(sizes, "a torch.Size")


def _key(value: Any) -> Any:
    """``value`` if it may be a dict key or set member: no hashing costs more than reading."""
    if type(value) in (str, bytes, bool, type(None)) or (
        type(value) is int and -(2**60) < value < 2**60
    ):
        return value
    raise PthError(
        f"a dict key or set member {_describe(value)}: only strings, bytes and integers "
        "below 2**60 are read as keys"
    )


def _ordered_dict(items=()) -> "collections.OrderedDict[Any, Any]":
    if type(items) not in (tuple, list):
        raise PthError("an OrderedDict is rebuilt from something that is not a list of pairs")
    result: "collections.OrderedDict[Any, Any]" = collections.OrderedDict()
    for pair in items:
        if type(pair) not in (tuple, list) or len(pair) != 2:
            raise PthError("an OrderedDict is rebuilt from something that is not a list of pairs")
        result[_key(pair[0])] = pair[1]
    return result


def _codecs_encode(text, encoding="utf-8") -> bytes:
    if type(text) is not str or encoding not in ("latin1", "latin-1"):
        raise PthError("_codecs.encode is allowed only to decode pickled bytes")
    return text.encode("latin1")


def _numpy_dtype(spec, align=False, copy=False) -> _Dtype:
    if type(spec) is not str or len(spec) > 16:
        raise PthError(f"a numpy dtype {_describe(spec)}: only numeric dtypes are read")
    try:
        dtype = np.dtype(spec)
    except TypeError:
        raise PthError(f"unknown numpy dtype {_describe(spec)}") from None
    if dtype.kind not in "biufc" or dtype.fields is not None or dtype.subdtype is not None:
        raise PthError(f"a numpy dtype {_describe(spec)}: only numeric dtypes are read")
    return _Dtype(dtype)


def _numpy_dtype_class(dtype: np.dtype) -> Callable[..., _Dtype]:
    def build(spec=None, align=False, copy=False) -> _Dtype:
        result = _Dtype(dtype) if spec is None else _numpy_dtype(spec)
        if type(result.dtype) is not type(dtype):
            raise PthError(f"a numpy dtype {_describe(spec)} rebuilt as {dtype}")
        return result

    return build


def _ndarray(*args) -> None:
    raise PthError("numpy.ndarray may only be named as the type numpy's _reconstruct rebuilds")


def _numpy_reconstruct(subtype, shape, dtype) -> _NumpyArray:
    if subtype is not _NDARRAY:
        raise PthError("only plain numpy arrays may be reconstructed")
    return _NumpyArray()


def _numpy_scalar(dtype, data=None) -> np.generic:
    if not isinstance(dtype, _Dtype):
        raise PthError("only numeric numpy scalars may be unpickled")
    if type(data) is not bytes or len(data) != dtype.dtype.itemsize:
        raise PthError("a numpy scalar has the wrong number of bytes")
    return np.frombuffer(data, dtype.dtype)[0]


_NDARRAY = _Global("numpy.ndarray", _ndarray)


def _allowed_globals() -> Dict[Tuple[str, str], _Global]:
    functions: Dict[Tuple[str, str], Callable[..., Any]] = {
        ("collections", "OrderedDict"): _ordered_dict,
        ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
        ("torch", "Size"): _torch_size,
        ("_codecs", "encode"): _codecs_encode,
        ("numpy", "dtype"): _numpy_dtype,
    }
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        functions[(module, "_reconstruct")] = _numpy_reconstruct
        functions[(module, "scalar")] = _numpy_scalar
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
        key = (dtype_class.__module__, dtype_class.__name__)
        functions[key] = _numpy_dtype_class(np.dtype(name))
    allowed = {key: _Global(".".join(key), f) for key, f in functions.items()}
    allowed[("numpy", "ndarray")] = _NDARRAY
    return allowed


_ALLOWED = _allowed_globals()


def _find_class(module: str, name: str) -> Any:
    if module == "torch" and name in _STORAGE_DTYPES:
        return _StorageType(name)
    found = _ALLOWED.get((module, name))
    if found is None:
        raise PthError(
            f"refused: the file asks for the Python object {_printable(f'{module}.{name}')}, "
            "which is not a tensor, storage, number, string or container; a file of weights "
            "never needs it, so it may be malicious. Nothing from it was run"
        )
    return found


def _what(value: Any) -> str:
    """What a pickle tried to change or call, in words."""
    if isinstance(value, _Global):
        return value.name
    names = {
        _StorageType: "a storage type",
        _Storage: "a storage",
        _Tensor: "a tensor after it was rebuilt",
        _NumpyArray: "a numpy array",
        _Dtype: "a numpy dtype",
    }
    return names.get(type(value), f"a {type(value).__name__}")


# ----------------------------------------------------------------------------
# The pickle interpreter.
# ----------------------------------------------------------------------------


class _Budget:
    """What one file has cost so far, against the limits derived from its size."""

    def __init__(self, size: int):
        self.size = size
        self.opcodes = 0
        self.records = 0  # Compressed bytes of the zip records read.
        self.inflated = 0
        self.storage_bytes = 0
        self.tensor_bytes = 0

    def add_record(self, name: str, compressed: int, inflated: Optional[int]) -> None:
        self.records += compressed
        if self.records > self.size:
            raise PthError(
                f"record {name} overlaps others: the archive's directory points several "
                "records at the same bytes, which no zip writer does; refused"
            )
        if inflated is not None:
            self.inflated += inflated
            limit = INFLATE_FACTOR * self.size + INFLATE_SLACK
            if self.inflated > limit:
                raise PthError(
                    f"record {name} would inflate to {inflated} bytes; a file of {self.size} "
                    f"bytes may inflate to at most {limit} ({INFLATE_FACTOR} times its size "
                    f"+ {INFLATE_SLACK >> 20} MiB) in all: refused"
                )

    def add_tensor(self, nbytes: int) -> None:
        self.tensor_bytes += nbytes
        limit = TENSOR_FACTOR * self.storage_bytes + TENSOR_SLACK
        if self.tensor_bytes > limit:
            raise PthError(
                f"its tensors would take more than {limit} bytes from {self.storage_bytes} "
                f"bytes of storage (at most {TENSOR_FACTOR} times the storages + "
                f"{TENSOR_SLACK >> 20} MiB are built; a zero or overlapping stride repeats "
                "elements): refused"
            )


class _Source:
    """The bytes of one pickle: from ``file``, at most ``left`` of them."""

    def __init__(self, file: BinaryIO, left: int):
        self.file, self.left, self.position = file, left, 0

    def _truncated(self) -> PthError:
        return PthError(
            f"the file ends inside a pickle (at its byte {self.position}): it is truncated "
            "or damaged; download or copy it again"
        )

    def read(self, count: int) -> bytes:
        if count > self.left:
            raise self._truncated()
        data = self.file.read(count)
        if len(data) != count:
            raise self._truncated()
        self.left -= count
        self.position += count
        return data

    def readline(self) -> bytes:
        line = self.file.readline(min(self.left, MAX_LINE + 1))
        self.left -= len(line)
        self.position += len(line)
        if not line.endswith(b"\n"):
            if len(line) > MAX_LINE:
                raise PthError(f"a pickle opcode's line is longer than {MAX_LINE} bytes")
            raise self._truncated()
        return line[:-1]


_STOP = object()


class _Interpreter:
    """Runs one pickle with the opcodes of ``_OPCODES``; see the module's docstring."""

    def __init__(
        self,
        source: _Source,
        budget: _Budget,
        persistent_load: Optional[Callable[[Any], Any]] = None,
    ):
        self.source, self.budget, self.persistent_load = source, budget, persistent_load
        self.stack: List[Any] = []
        self.marks: List[List[Any]] = []
        self.memo: Dict[int, Any] = {}

    def load(self) -> Any:
        read, budget = self.source.read, self.budget
        while True:
            start = self.source.position
            code = read(1)
            op = _OPCODES.get(code)
            if op is None:
                raise PthError(f"a pickle with the unknown opcode {code!r} at its byte {start}")
            budget.opcodes += 1
            if budget.opcodes > MAX_OPCODES:
                raise PthError(
                    f"the file's pickles run more than {MAX_OPCODES} opcodes "
                    "(a state_dict takes about 35 a tensor): refused"
                )
            try:
                if op(self) is _STOP:
                    return self.stack.pop()
            except IndexError:
                raise PthError(
                    f"a damaged pickle: the opcode {code!r} at its byte {start} finds too few "
                    "values"
                ) from None
            except (ValueError, UnicodeDecodeError, struct.error, OverflowError) as err:
                if isinstance(err, PthError):
                    raise
                raise PthError(
                    f"a damaged pickle: the opcode {code!r} at its byte {start} fails "
                    f"({_printable(str(err))})"
                ) from None

    def push(self, value: Any) -> None:
        self.stack.append(value)

    def pop_mark(self) -> List[Any]:
        items = self.stack
        self.stack = self.marks.pop()
        return items

    def target(self, kinds: Tuple[type, ...], verb: str) -> Any:
        value = self.stack[-1]
        if type(value) not in kinds:
            raise PthError(
                f"refused: the file tries to {verb} {_what(value)}; a pickle of weights changes "
                "only the containers it made"
            )
        return value

    def length(self, fmt: str) -> int:
        (count,) = struct.unpack(fmt, self.source.read(struct.calcsize(fmt)))
        if count < 0:
            raise PthError("a pickle with a negative length")
        return count

    def memo_get(self, index: int) -> None:
        try:
            self.push(self.memo[index])
        except KeyError:
            raise PthError(
                f"a damaged pickle: memo entry {index} is read before it is written"
            ) from None

    def persistent(self, pid: Any) -> None:
        if self.persistent_load is None:
            raise PthError("a pickle names a storage where none may be")
        self.push(self.persistent_load(pid))


def _op_proto(vm: _Interpreter) -> None:
    version = vm.source.read(1)[0]
    if version > 5:
        raise PthError(f"pickle protocol {version}; 5 is the newest")


def _op_pop(vm: _Interpreter) -> None:
    if vm.stack:
        vm.stack.pop()
    else:
        vm.pop_mark()


def _op_mark(vm: _Interpreter) -> None:
    vm.marks.append(vm.stack)
    vm.stack = []


def _op_int(vm: _Interpreter) -> None:
    line = vm.source.readline()
    vm.push(line == b"01" if line in (b"00", b"01") else int(line))  # Protocol 0's bools.


def _op_long(vm: _Interpreter) -> None:
    line = vm.source.readline()
    vm.push(int(line[:-1] if line.endswith(b"L") else line))


def _op_counted_long(fmt: str) -> Callable[[_Interpreter], None]:
    def op(vm: _Interpreter) -> None:
        data = vm.source.read(vm.length(fmt))
        vm.push(int.from_bytes(data, "little", signed=True))

    return op


def _op_string(vm: _Interpreter) -> None:
    line = vm.source.readline()
    if len(line) < 2 or line[:1] not in (b"'", b'"') or line[-1:] != line[:1]:
        raise PthError("a pickle with a malformed STRING opcode")
    vm.push(codecs.escape_decode(line[1:-1])[0].decode("utf-8"))


def _op_counted(fmt: str, make: Callable[[bytes], Any]) -> Callable[[_Interpreter], None]:
    def op(vm: _Interpreter) -> None:
        vm.push(make(vm.source.read(vm.length(fmt))))

    return op


def _op_fixed(fmt: str) -> Callable[[_Interpreter], None]:
    def op(vm: _Interpreter) -> None:
        vm.push(struct.unpack(fmt, vm.source.read(struct.calcsize(fmt)))[0])

    return op


def _op_constant(value: Any) -> Callable[[_Interpreter], None]:
    return lambda vm: vm.push(value)


def _op_tuple_of(count: int) -> Callable[[_Interpreter], None]:
    def op(vm: _Interpreter) -> None:
        items = tuple(vm.stack[len(vm.stack) - count :]) if count else ()
        if len(items) != count:
            raise IndexError
        del vm.stack[len(vm.stack) - count :]
        vm.push(items)

    return op


def _op_append(vm: _Interpreter) -> None:
    value = vm.stack.pop()
    vm.target((list,), "append to").append(value)


def _op_appends(vm: _Interpreter) -> None:
    items = vm.pop_mark()
    vm.target((list,), "append to").extend(items)


def _pairs(items: List[Any]) -> List[Tuple[Any, Any]]:
    if len(items) % 2:
        raise PthError("a damaged pickle: a dict's items are not in pairs")
    return [(_key(items[i]), items[i + 1]) for i in range(0, len(items), 2)]


def _op_dict(vm: _Interpreter) -> None:
    vm.push(dict(_pairs(vm.pop_mark())))


def _op_setitem(vm: _Interpreter) -> None:
    value = vm.stack.pop()
    key = _key(vm.stack.pop())
    vm.target((dict, collections.OrderedDict), "set an item of")[key] = value


def _op_setitems(vm: _Interpreter) -> None:
    pairs = _pairs(vm.pop_mark())
    target = vm.target((dict, collections.OrderedDict), "set an item of")
    for key, value in pairs:
        target[key] = value


def _op_additems(vm: _Interpreter) -> None:
    items = [_key(v) for v in vm.pop_mark()]
    vm.target((set,), "add to").update(items)


def _op_frozenset(vm: _Interpreter) -> None:
    vm.push(frozenset(_key(v) for v in vm.pop_mark()))


def _op_memo_put(read: Callable[[_Interpreter], int]) -> Callable[[_Interpreter], None]:
    def op(vm: _Interpreter) -> None:
        vm.memo[read(vm)] = vm.stack[-1]

    return op


def _op_memo_get(read: Callable[[_Interpreter], int]) -> Callable[[_Interpreter], None]:
    return lambda vm: vm.memo_get(read(vm))


def _op_global(vm: _Interpreter) -> None:
    module = vm.source.readline().decode("utf-8")
    vm.push(_find_class(module, vm.source.readline().decode("utf-8")))


def _op_stack_global(vm: _Interpreter) -> None:
    name, module = vm.stack.pop(), vm.stack.pop()
    if type(name) is not str or type(module) is not str:
        raise PthError("a damaged pickle: STACK_GLOBAL without two names")
    vm.push(_find_class(module, name))


def _op_reduce(vm: _Interpreter) -> None:
    args = vm.stack.pop()
    function = vm.stack[-1]
    if not isinstance(function, _Global):
        raise PthError(f"refused: the file calls {_what(function)}, which is not a function")
    if type(args) is not tuple:
        raise PthError(f"{function.name} is called with {_describe(args)}, not a tuple")
    vm.stack[-1] = function.call(args)


def _op_build(vm: _Interpreter) -> None:
    state = vm.stack.pop()
    target = vm.stack[-1]
    if isinstance(target, (_NumpyArray, _Dtype)):
        target.build(state)
    elif type(target) in (dict, collections.OrderedDict) and type(state) in (dict, type(None)):
        pass  # A state_dict's attributes (its _metadata): not data; dropped.
    else:
        raise PthError(
            f"refused: the file tries to modify {_what(target)}; a pickle of weights changes "
            "only the containers it made"
        )


def _refused(name: str) -> Callable[[_Interpreter], None]:
    def op(vm: _Interpreter) -> None:
        raise PthError(
            f"refused: the file builds an object with the pickle opcode {name}, which a file "
            "of weights never needs, so it may be malicious. Nothing from it was run"
        )

    return op


def _read_uint(fmt: str) -> Callable[[_Interpreter], int]:
    return lambda vm: struct.unpack(fmt, vm.source.read(struct.calcsize(fmt)))[0]


def _read_line_int(vm: _Interpreter) -> int:
    return int(vm.source.readline())


def _utf8(data: bytes) -> str:
    return str(data, "utf-8", "surrogatepass")


# The opcodes of pickle protocols 0 to 5 that data needs (facts of the pickle format).
_OPCODES: Dict[bytes, Callable[[_Interpreter], Any]] = {
    b"\x80": _op_proto,  # PROTO
    b"\x95": lambda vm: vm.source.read(8) and None,  # FRAME: a length hint only.
    b".": lambda vm: _STOP,  # STOP
    b"(": _op_mark,  # MARK
    b"0": _op_pop,  # POP
    b"1": lambda vm: vm.pop_mark() and None,  # POP_MARK
    b"2": lambda vm: vm.push(vm.stack[-1]),  # DUP
    b"I": _op_int,  # INT
    b"J": _op_fixed("<i"),  # BININT
    b"K": _op_fixed("<B"),  # BININT1
    b"M": _op_fixed("<H"),  # BININT2
    b"L": _op_long,  # LONG
    b"\x8a": _op_counted_long("<B"),  # LONG1
    b"\x8b": _op_counted_long("<i"),  # LONG4
    b"N": _op_constant(None),  # NONE
    b"\x88": _op_constant(True),  # NEWTRUE
    b"\x89": _op_constant(False),  # NEWFALSE
    b"F": lambda vm: vm.push(float(vm.source.readline())),  # FLOAT
    b"G": _op_fixed(">d"),  # BINFLOAT
    b"S": _op_string,  # STRING
    b"T": _op_counted("<i", lambda b: b.decode("utf-8")),  # BINSTRING
    b"U": _op_counted("<B", lambda b: b.decode("utf-8")),  # SHORT_BINSTRING
    b"V": lambda vm: vm.push(str(vm.source.readline(), "raw-unicode-escape")),  # UNICODE
    b"X": _op_counted("<I", _utf8),  # BINUNICODE
    b"\x8c": _op_counted("<B", _utf8),  # SHORT_BINUNICODE
    b"\x8d": _op_counted("<Q", _utf8),  # BINUNICODE8
    b"B": _op_counted("<I", bytes),  # BINBYTES
    b"C": _op_counted("<B", bytes),  # SHORT_BINBYTES
    b"\x8e": _op_counted("<Q", bytes),  # BINBYTES8
    b"\x96": _op_counted("<Q", bytearray),  # BYTEARRAY8
    b"]": lambda vm: vm.push([]),  # EMPTY_LIST
    b"a": _op_append,  # APPEND
    b"e": _op_appends,  # APPENDS
    b"l": lambda vm: vm.push(vm.pop_mark()),  # LIST
    b")": _op_constant(()),  # EMPTY_TUPLE
    b"t": lambda vm: vm.push(tuple(vm.pop_mark())),  # TUPLE
    b"\x85": _op_tuple_of(1),  # TUPLE1
    b"\x86": _op_tuple_of(2),  # TUPLE2
    b"\x87": _op_tuple_of(3),  # TUPLE3
    b"}": lambda vm: vm.push({}),  # EMPTY_DICT
    b"d": _op_dict,  # DICT
    b"s": _op_setitem,  # SETITEM
    b"u": _op_setitems,  # SETITEMS
    b"\x8f": lambda vm: vm.push(set()),  # EMPTY_SET
    b"\x90": _op_additems,  # ADDITEMS
    b"\x91": _op_frozenset,  # FROZENSET
    b"p": _op_memo_put(_read_line_int),  # PUT
    b"q": _op_memo_put(_read_uint("<B")),  # BINPUT
    b"r": _op_memo_put(_read_uint("<I")),  # LONG_BINPUT
    b"\x94": _op_memo_put(lambda vm: len(vm.memo)),  # MEMOIZE
    b"g": _op_memo_get(_read_line_int),  # GET
    b"h": _op_memo_get(_read_uint("<B")),  # BINGET
    b"j": _op_memo_get(_read_uint("<I")),  # LONG_BINGET
    b"c": _op_global,  # GLOBAL
    b"\x93": _op_stack_global,  # STACK_GLOBAL
    b"R": _op_reduce,  # REDUCE
    b"b": _op_build,  # BUILD
    b"Q": lambda vm: vm.persistent(vm.stack.pop()),  # BINPERSID
    b"P": lambda vm: vm.persistent(vm.source.readline().decode("ascii")),  # PERSID
    b"\x81": _refused("NEWOBJ"),
    b"\x92": _refused("NEWOBJ_EX"),
    b"i": _refused("INST"),
    b"o": _refused("OBJ"),
    b"\x82": _refused("EXT1"),
    b"\x83": _refused("EXT2"),
    b"\x84": _refused("EXT4"),
    b"\x97": _refused("NEXT_BUFFER"),
    b"\x98": _refused("READONLY_BUFFER"),
}


def _unpickle(
    file: BinaryIO,
    left: int,
    budget: _Budget,
    persistent_load: Optional[Callable[[Any], Any]] = None,
) -> Any:
    return _Interpreter(_Source(file, left), budget, persistent_load).load()


_PLAIN = (str, bytes, int, float, complex, bool, type(None))


def _resolve(value: Any, budget: _Budget) -> Any:
    """The unpickled object with each tensor, numpy array and dtype made, once each.

    Objects the pickle shares (its memo) stay shared: a graph of references is walked as a
    graph, not a tree. Nesting deeper than MAX_DEPTH and containers that hold themselves
    are refused.
    """
    done: Dict[int, Any] = {}
    active: set = set()

    def walk(item: Any, depth: int) -> Any:
        kind = type(item)
        if kind in _PLAIN:
            return item
        key = id(item)
        if key in done:
            return done[key]
        if depth >= MAX_DEPTH:
            raise PthError(f"containers nested more than {MAX_DEPTH} deep: not a checkpoint")
        if key in active:
            raise PthError("a container that holds itself: not a checkpoint")
        active.add(key)
        result: Any
        if kind is list:
            result = []
            for v in item:
                result.append(walk(v, depth + 1))
        elif kind is tuple:
            parts = []
            for v in item:
                parts.append(walk(v, depth + 1))
            result = tuple(parts)
        elif kind in (dict, collections.OrderedDict):
            result = kind()
            for k, v in item.items():
                result[k] = walk(v, depth + 1)
        elif kind in (set, frozenset, bytearray) or isinstance(item, np.generic):
            result = item  # Members are keys (strings, bytes, small integers); bytes.
        elif kind is _Tensor:
            result = item.array(budget)
        elif kind is _NumpyArray:
            if item.array is None:
                raise PthError("a numpy array without its data: the file is damaged")
            result = item.array
        elif kind is _Dtype:
            result = item.dtype
        elif kind in (_Storage, _StorageType):
            raise PthError(
                "the file holds a bare storage, not a tensor; it is not a checkpoint of weights"
            )
        else:
            raise PthError(f"the file holds {_what(item)} itself, not data")
        active.discard(key)
        done[key] = result
        return result

    return walk(value, 0)


def _decode(value: Any) -> Any:
    return value.decode("ascii") if isinstance(value, bytes) else value


def _storage_key(value: Any) -> str:
    key = _decode(value)
    if type(key) is not str or len(key) > 256:
        raise PthError(f"a storage named {_describe(value)}, not by a short string")
    return key


def _storage_from_pid(pid: Any, storages: Dict[str, _Storage]) -> _Storage:
    if type(pid) is not tuple or len(pid) < 5 or _decode(pid[0]) != "storage":
        raise PthError(
            f"unsupported persistent object {_describe(pid)} (only tensor storages are read)"
        )
    storage_type, key = pid[1], _storage_key(pid[2])
    numel = _index(pid[4], f"the size of storage {_describe(key)}")
    if not isinstance(storage_type, _StorageType):
        raise PthError(f"unsupported storage type {_describe(storage_type)}")
    storage = storages.setdefault(key, _Storage(storage_type.dtype, key, numel))
    if storage.dtype != storage_type.dtype or storage.numel != numel or storage.root is not None:
        raise PthError(f"storage {_describe(key)} is declared twice, differently")
    view = pid[5] if len(pid) > 5 else None
    if view is None:
        return storage
    if type(view) is not tuple or len(view) != 3:
        raise PthError(f"a storage view {_describe(view)} is malformed")
    view_key = _storage_key(view[0])
    offset = _index(view[1], "a storage view's offset")
    view_numel = _index(view[2], "a storage view's size")
    if offset + view_numel > numel:
        raise PthError(f"a storage view reaches past the end of storage {_describe(key)}")
    child = storages.setdefault(view_key, _Storage(storage.dtype, view_key, view_numel))
    if child.root is None and child is not storage:
        child.root, child.offset = storage, offset
    if child.root is not storage or child.offset != offset or child.numel != view_numel:
        raise PthError(f"storage view {_describe(view_key)} is declared twice, differently")
    return child


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


def _load_zip(file: BinaryIO, size: int, budget: _Budget) -> Any:
    try:
        archive = zipfile.ZipFile(file)
    except Exception as err:  # BadZipFile, and whatever a forged directory makes it raise.
        raise PthError(
            "a zip archive without a readable directory at its end: the file is truncated "
            f"or damaged ({_printable(str(err) or type(err).__name__)}); download or copy "
            "it again"
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
        byteorder = "little"
        if f"{root}byteorder" in names:
            info = archive.getinfo(f"{root}byteorder")
            if info.file_size > 16:
                raise PthError(f"record {root}byteorder is {info.file_size} bytes: damaged")
            byteorder = bytes(_read_record(file, info, budget)).decode("ascii", "replace")
            if byteorder.strip() not in ("little", "big"):
                raise PthError(f"unknown byte order {_describe(byteorder)}")
            byteorder = byteorder.strip()
        pickled = _read_record(file, archive.getinfo(pickles[0]), budget)
        storages: Dict[str, _Storage] = {}
        obj = _unpickle(
            io.BytesIO(pickled), len(pickled), budget, lambda p: _storage_from_pid(p, storages)
        )
        del pickled
        for key, storage in storages.items():
            if storage.root is not None:
                continue
            name = f"{root}data/{key}"
            try:
                info = archive.getinfo(name)
            except KeyError:
                raise PthError(
                    f"storage record {_printable(name)} is missing: the file is damaged"
                ) from None
            nbytes = storage.numel * storage.dtype.itemsize
            if info.file_size != nbytes:
                raise PthError(
                    f"storage record {_printable(name)} holds {info.file_size} bytes, "
                    f"{nbytes} expected: the file is damaged"
                )
            storage.array = _from_bytes(_read_record(file, info, budget), storage.dtype, byteorder)
            budget.storage_bytes += nbytes
        return _resolve(obj, budget)


def _read_record(file: BinaryIO, info: zipfile.ZipInfo, budget: _Budget) -> bytearray:
    """A record's bytes, with its CRC-32 checked, each costing only what it holds.

    Records are read from the file directly (zipfile's reader would copy them twice), stored
    ones into one buffer, deflated ones inflated in chunks and never past their declared
    size. The CRC-32 is checked as zipfile checks it, except that a CRC of 0 means "not
    computed": torch.load reads the files that ``torch.serialization.set_crc32_options(False)``
    writes.
    """
    name = _printable(info.filename)
    if info.flag_bits & 0x1:
        raise PthError(f"record {name} is encrypted; a torch checkpoint never is")
    stored = info.compress_type == zipfile.ZIP_STORED
    if not stored and info.compress_type != zipfile.ZIP_DEFLATED:
        raise PthError(
            f"record {name} uses compression method {info.compress_type}; only stored and "
            "deflated records are read (as by torch.load)"
        )
    if info.compress_size > budget.size or stored and info.file_size != info.compress_size:
        raise PthError(f"record {name} claims more bytes than the file has: the file is damaged")
    budget.add_record(name, info.compress_size, None if stored else info.file_size)
    if info.header_offset < 0:  # Past the end, the reads below say the file ends.
        raise PthError(f"record {name} lies before the file's start: the file is damaged")
    file.seek(info.header_offset)
    header = bytes(_read_exact(file, 30, f"the header of record {name}"))
    name_size, extra_size = struct.unpack("<HH", header[26:30])
    local_name = bytes(_read_exact(file, name_size, f"the header of record {name}")).decode(
        "utf-8" if info.flag_bits & 0x800 else "cp437", "replace"
    )
    if header[:4] != b"PK\x03\x04" or local_name != info.orig_filename:
        raise PthError(
            f"record {name} has a damaged local header: the file is damaged; "
            "download or copy it again"
        )
    file.seek(extra_size, io.SEEK_CUR)
    if stored:
        data = _read_exact(file, info.file_size, f"record {name}")
    else:
        data = _inflate(file, info.compress_size, info.file_size, name)
    if info.CRC and zlib.crc32(data) != info.CRC:
        raise PthError(
            f"record {name} fails its CRC-32 check: the file is damaged; download or copy it again"
        )
    return data


_CHUNK = 1 << 20


def _inflate(file: BinaryIO, compressed: int, expected: int, name: str) -> bytearray:
    """A deflated record's ``expected`` bytes, inflated in chunks: never more are made."""
    inflater = zlib.decompressobj(-15)
    out = bytearray()
    left = compressed
    while left and not inflater.eof:
        chunk = file.read(min(left, _CHUNK))
        if not chunk:
            raise PthError(f"the file ends inside record {name}: it is truncated")
        left -= len(chunk)
        while chunk:
            out += inflater.decompress(chunk, min(expected - len(out) + 1, 16 * _CHUNK))
            if len(out) > expected:
                raise PthError(
                    f"record {name} inflates to more than its declared {expected} bytes: "
                    "the file is damaged"
                )
            chunk = inflater.unconsumed_tail
    if len(out) != expected or not inflater.eof:
        raise PthError(
            f"record {name} inflates to {len(out)} of its declared {expected} bytes: "
            "the file is damaged"
        )
    return out


def _from_bytes(data: bytearray, dtype: np.dtype, byteorder: str) -> np.ndarray:
    array = np.frombuffer(data, dtype)
    if byteorder == "big" and dtype.itemsize > 1:
        array = array.byteswap()
    return array


def _load_legacy(file: BinaryIO, size: int, budget: _Budget) -> Any:
    end = file.tell() + size

    def unpickle(persistent_load: Optional[Callable[[Any], Any]] = None) -> Any:
        return _unpickle(file, end - file.tell(), budget, persistent_load)

    if unpickle() != LEGACY_MAGIC:
        raise PthError("a pickle, but not one written by torch.save (no magic number)")
    protocol = unpickle()
    if protocol != LEGACY_PROTOCOL:
        raise PthError(f"unknown legacy torch.save protocol {_describe(protocol)}")
    sys_info = unpickle()
    little = not isinstance(sys_info, dict) or bool(sys_info.get("little_endian", True))
    storages: Dict[str, _Storage] = {}
    obj = unpickle(lambda pid: _storage_from_pid(pid, storages))
    keys = unpickle()
    if type(keys) is not list:
        raise PthError("the legacy storage list is malformed")
    for key in keys:
        storage = storages.get(_storage_key(key))
        if storage is None or storage.root is not None or storage.array is not None:
            raise PthError(
                f"storage {_describe(key)} is listed but never used, or twice: the file is damaged"
            )
        header = bytes(_read_exact(file, 8, f"the header of storage {_describe(key)}"))
        (numel,) = struct.unpack("<q" if little else ">q", header)
        nbytes = numel * storage.dtype.itemsize
        if numel != storage.numel:
            raise PthError(
                f"storage {_describe(key)} holds {numel} elements, {storage.numel} expected: "
                "the file is damaged"
            )
        if nbytes > end - file.tell():
            raise PthError(
                f"storage {_describe(key)} claims more bytes than the file has: the file is "
                "truncated or damaged"
            )
        storage.array = _from_bytes(
            _read_exact(file, nbytes, f"storage {_describe(key)}"),
            storage.dtype,
            "little" if little else "big",
        )
        budget.storage_bytes += nbytes
    return _resolve(obj, budget)


def load(source: PathOrFile) -> Any:
    """The object a ``.pth`` holds, with numpy arrays for tensors; no torch needed.

    Raises :class:`PthError` (one line: what is wrong) for empty, truncated, damaged,
    hostile or non-checkpoint files, for any pickled global outside the allow-list, and for
    files past the limits of this module (MAX_DIMS, MAX_DEPTH, MAX_OPCODES, TENSOR_FACTOR,
    INFLATE_FACTOR): nothing else escapes, and no file changes what later files read.
    """
    if isinstance(source, (str, os.PathLike)):
        name = os.fspath(source)
        if not os.path.isfile(name):
            raise FileNotFoundError(f"{name}: no such checkpoint file")
        with open(name, "rb") as f:
            return _load_named(f, name)
    return _load_named(source, getattr(source, "name", "<file>"))


def _one_line(text: str, limit: int = 200) -> str:
    line = text.splitlines()[0] if text.strip() else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _load_named(file: BinaryIO, name: str) -> Any:
    try:
        start = file.tell()
        file.seek(0, io.SEEK_END)
        size = file.tell() - start
        file.seek(start)
        head = file.read(512)
        file.seek(start)
        budget = _Budget(size)
        if size == 0:
            raise PthError("empty file (0 bytes), not a checkpoint: download or copy it again")
        if head.startswith(b"PK\x03\x04"):
            return _load_zip(file, size, budget)
        if head.startswith(b"\x80") and head[2:3] == b"\x8a":  # A pickled long: the magic.
            return _load_legacy(file, size, budget)
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
        message = f"{name}: {err}"
    except MemoryError:
        message = f"{name}: the file needs more memory than this machine has"
    except OSError as err:
        message = f"{name}: cannot read the file ({err.strerror or _one_line(str(err))})"
    except Exception as err:  # A bug, or a case no check foresaw: still one line.
        detail = _one_line(str(err)) or type(err).__name__
        message = f"{name}: malformed checkpoint ({type(err).__name__}: {detail})"
    raise PthError(message.replace("\n", "\\n").replace("\r", "\\r"))


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
