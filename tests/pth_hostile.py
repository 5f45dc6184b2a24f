"""Hostile ``.pth`` files, each written by a few lines of Python, with proofs of their harm.

Every case writes one file that attacks one weakness a ``.pth`` reader may have, and proves
by construction that the file does what it claims: from its opcodes, its declared sizes, or
what Python's own unpickler (with harmless stand-ins for the globals) makes of it. No proof
runs anything hostile. :func:`run_commands` runs every case through the two command lines
in a fresh process; tests/test_pth.py starts it and checks the results.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import io
import json
import pickle
import pickletools
import struct
import sys
import time
import traceback
import types
import zipfile
import zlib
from typing import Any, Callable, Dict, List, Optional

MiB = 1 << 20
GiB = 1 << 30
PROTO = b"\x80\x02"


# ---------------------------------------------------------------- pickle opcodes


def pint(value: int) -> bytes:
    """An integer: BININT1, BININT or LONG1."""
    if 0 <= value < 256:
        return b"K" + bytes([value])
    if -(2**31) <= value < 2**31:
        return b"J" + struct.pack("<i", value)
    data = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(data)]) + data


def pstr(text: str) -> bytes:
    """A string: BINUNICODE."""
    data = text.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def pglobal(module: str, name: str) -> bytes:
    """GLOBAL module.name."""
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def ptuple(values: tuple) -> bytes:
    """A tuple of integers: MARK, the integers, TUPLE."""
    return b"(" + b"".join(pint(v) for v in values) + b"t"


def tensor(
    key: str,
    numel: int,
    size: bytes,
    stride: bytes,
    offset: int = 0,
    storage: str = "FloatStorage",
) -> bytes:
    """``_rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())`` as torch
    writes it; ``size`` and ``stride`` are opcodes that push a tuple."""
    pid = b"(" + pstr("storage") + pglobal("torch", storage) + pstr(key) + pstr("cpu")
    return (
        pglobal("torch._utils", "_rebuild_tensor_v2")
        + b"("
        + pid
        + pint(numel)
        + b"tQ"
        + pint(offset)
        + size
        + stride
        + b"\x89"
        + pglobal("collections", "OrderedDict")
        + b")RtR"
    )


def state_dict(value: bytes, key: str = "fc1.weight") -> bytes:
    """``{'model': {key: value}}``: what the commands read, with one hostile value."""
    return PROTO + b"}(" + pstr("model") + b"}(" + pstr(key) + value + b"uu."


def floats(count: int) -> bytes:
    return struct.pack(f"<{count}f", *range(count))


# ---------------------------------------------------------------- zip archives


@dataclasses.dataclass
class Entry:
    """One zip record: ``data`` as stored in the file (deflated already if ``method`` is 8);
    ``size`` is the uncompressed size the directory declares (default: ``len(data)``)."""

    name: str
    data: bytes
    method: int = 0
    flags: int = 0
    size: Optional[int] = None
    crc: Optional[int] = None


def zip_bytes(entries: List[Entry]) -> bytes:
    """A zip archive of ``entries`` written field by field (zip64 sizes where needed), so
    that a record may declare anything."""
    out, directory = io.BytesIO(), []
    for e in entries:
        name = e.name.encode()
        size = len(e.data) if e.size is None else e.size
        crc = (zlib.crc32(e.data) if e.method == 0 else 0) if e.crc is None else e.crc
        big = size >= 0xFFFFFFFF
        extra = struct.pack("<HHQ", 1, 8, size) if big else b""
        declared = 0xFFFFFFFF if big else size
        fields = struct.pack("<HHHHHIII", 45, e.flags, e.method, 0, 33, crc, len(e.data), declared)
        offset = out.tell()
        out.write(b"PK\x03\x04" + fields + struct.pack("<HH", len(name), len(extra)) + name + extra)
        out.write(e.data)
        directory.append(
            b"PK\x01\x02"
            + struct.pack("<H", 45)
            + fields
            + struct.pack("<HHHHHII", len(name), len(extra), 0, 0, 0, 0, offset)
            + name
            + extra
        )
    start = out.tell()
    out.write(b"".join(directory))
    end = struct.pack("<HHHHIIH", 0, 0, len(entries), len(entries), out.tell() - start, start, 0)
    out.write(b"PK\x05\x06" + end)
    return out.getvalue()


def torch_entries(pickled: bytes, storages: Dict[str, bytes]) -> List[Entry]:
    """The records of torch's zip layout: data.pkl, byteorder, one per storage, version."""
    return [
        Entry("archive/data.pkl", pickled),
        Entry("archive/byteorder", b"little"),
        *(Entry(f"archive/data/{k}", v) for k, v in storages.items()),
        Entry("archive/version", b"3\n"),
    ]


def deflate(data: bytes) -> bytes:
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    return c.compress(data) + c.flush()


def zeros_unit() -> bytes:
    """A raw deflate block that inflates to 1 MiB of zeros and resets the window
    (a full flush), so that copies of it concatenate."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    return c.compress(bytes(MiB)) + c.flush(zlib.Z_FULL_FLUSH)


def zeros_stream(mebibytes: int) -> bytes:
    """A raw deflate stream of ``mebibytes`` MiB of zeros, about 1 KB a MiB."""
    return zeros_unit() * mebibytes + b"\x03\x00"  # An empty final fixed-Huffman block.


# ---------------------------------------------------------------- what the files do


class NaiveUnpickler(pickle.Unpickler):
    """Python's unpickler with harmless stand-ins for the globals: the tensor rebuild
    records its arguments in a plain object (as a reader that validates only when the
    rebuild is called would keep them), storages are their persistent ids."""

    def __init__(self, pickled: bytes):
        super().__init__(io.BytesIO(pickled))

        def rebuild(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
            return types.SimpleNamespace(storage=storage, offset=offset, size=size, stride=stride)

        self.rebuild = rebuild

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return self.rebuild
        if module == "torch":
            return name
        raise pickle.UnpicklingError(f"no stand-in for {module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        return pid


def ops(pickled: bytes) -> List[tuple]:
    """``(opcode name, argument)`` of every opcode of ``pickled``."""
    return [(op.name, arg) for op, arg, _ in pickletools.genops(pickled)]


def archive_pickle(path: str) -> bytes:
    """The bytes of data.pkl as they lie in the file (stored records only)."""
    with zipfile.ZipFile(path) as archive:
        return archive.read("archive/data.pkl")


def model_value(pickled: bytes) -> Any:
    """The value of fc1.weight, as :class:`NaiveUnpickler` makes it."""
    return NaiveUnpickler(pickled).load()["model"]["fc1.weight"]


@dataclasses.dataclass
class Case:
    """A hostile file: ``write(path)`` makes it, ``prove(path)`` asserts its harm by
    construction, and ``message`` is part of the one line the commands must print."""

    name: str
    message: str
    write: Callable[[str], None]
    prove: Callable[[str], None]


def _save(path: str, entries: List[Entry]) -> None:
    with open(path, "wb") as f:
        f.write(zip_bytes(entries))


def _build_on_tensor(state: Dict[str, bytes]) -> Callable[[str], None]:
    """A tensor rebuilt with a valid view of 4 floats, then BUILD with ``state``."""
    items = b"".join(pstr(k) + v for k, v in state.items())
    value = tensor("0", 4, ptuple((4,)), ptuple((1,))) + b"}(" + items + b"ub"
    return lambda path: _save(path, torch_entries(state_dict(value), {"0": floats(4)}))


def _prove_build_huge(path: str) -> None:
    pickled = archive_pickle(path)
    assert [name for name, _ in ops(pickled)][-6:-2] == ["TUPLE", "SETITEMS", "BUILD", "SETITEMS"]
    rebuilt = model_value(pickled)
    # Applied after the rebuild: 2 elements, the second 2**40 elements before the storage.
    assert rebuilt.size == (2,) and rebuilt.stride == (-(2**40),) and rebuilt.storage[4] == 4


def _prove_build_leak(path: str) -> None:
    rebuilt = model_value(archive_pickle(path))
    first = rebuilt.offset + (rebuilt.size[0] - 1) * rebuilt.stride[0]
    assert rebuilt.storage[4] == 4 and first == -60  # 60 floats read from before the storage.


def _write_build_global(path: str) -> None:
    poison = (
        PROTO
        + pglobal("torch._utils", "_rebuild_tensor_v2")
        + b"N}("
        + pstr("__defaults__")
        + b")u\x86b0"  # (None, {'__defaults__': ()}): BUILD sets the attribute; POP.
    )
    good = state_dict(tensor("0", 4, ptuple((4,)), ptuple((1,))))
    _save(path, torch_entries(poison + good[len(PROTO) :], {"0": floats(4)}))


def _prove_build_global(path: str) -> None:
    pickled = archive_pickle(path)
    names = [name for name, _ in ops(pickled)]
    assert names[:6] == ["PROTO", "GLOBAL", "NONE", "EMPTY_DICT", "MARK", "BINUNICODE"]
    assert names[7:11] == ["SETITEMS", "TUPLE2", "BUILD", "POP"]
    unpickler = NaiveUnpickler(pickled)
    try:
        unpickler.load()
    except TypeError as err:  # The rebuild named by the file lost its defaults: every
        assert "metadata" in str(err)  # later call of it, by any file, fails.
    else:
        raise AssertionError("the BUILD left the function unchanged")
    assert unpickler.rebuild.__defaults__ == ()


def _write_zero_stride(path: str) -> None:
    side = 2**14
    value = tensor("0", 1, ptuple((side, side)), ptuple((0, 0)), storage="DoubleStorage")
    _save(path, torch_entries(state_dict(value), {"0": struct.pack("<d", 1.0)}))


def _prove_zero_stride(path: str) -> None:
    rebuilt = model_value(archive_pickle(path))
    assert rebuilt.storage[4] == 1 and rebuilt.stride == (0, 0)
    assert rebuilt.size[0] * rebuilt.size[1] * 8 == 2 * GiB  # float64, from 8 bytes.


DAG_DEPTH = 26


def _write_billion_laughs(path: str) -> None:
    value = b"]q\x00"  # x0 = []; x_i = [x_(i-1), x_(i-1)] by memo references.
    for i in range(1, DAG_DEPTH + 1):
        value += b"0(h" + bytes([i - 1]) + b"h" + bytes([i - 1]) + b"lq" + bytes([i])
    _save(path, torch_entries(state_dict(value), {}))


def tree_leaves(value: Any) -> int:
    """How many empty lists ``value`` holds when read as a tree (counted on the graph)."""
    counts: Dict[int, int] = {}
    order = [value]
    while order:  # Post-order without recursion: children first.
        item = order[-1]
        pending = [c for c in item if id(c) not in counts]
        if pending:
            order.extend(pending)
            continue
        order.pop()
        counts[id(item)] = sum(counts[id(c)] for c in item) if item else 1
    return counts[id(value)]


def _prove_billion_laughs(path: str) -> None:
    pickled = archive_pickle(path)
    assert len(pickled) < 400
    assert tree_leaves(model_value(pickled)) == 2**DAG_DEPTH  # 67M lists as a tree.


def _write_big_pickle(path: str) -> None:
    entries = torch_entries(state_dict(b"N"), {})
    entries[0] = Entry("archive/data.pkl", deflate(entries[0].data), 8, size=3 * GiB // 2)
    _save(path, entries)


def _prove_big_pickle(path: str) -> None:
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("archive/data.pkl")
    assert info.file_size == 3 * GiB // 2 and info.compress_size < 100
    assert info.compress_type == zipfile.ZIP_DEFLATED


BOMB_MIB = 10 * 1024  # 10 GiB.


def _write_bomb(declared: Optional[int]) -> Callable[[str], None]:
    """A storage record whose deflate stream really inflates to 10 GiB; it declares
    ``declared`` bytes (10 GiB when None), the pickle as many."""

    def write(path: str) -> None:
        size = BOMB_MIB * MiB if declared is None else declared
        value = tensor("0", size // 4, ptuple((size // 4,)), ptuple((1,)))
        entries = torch_entries(state_dict(value), {"0": b""})
        entries[2] = Entry("archive/data/0", zeros_stream(BOMB_MIB), 8, size=size, crc=0)
        _save(path, entries)

    return write


def _prove_bomb(declared: Optional[int]) -> Callable[[str], None]:
    def prove(path: str) -> None:
        unit = zeros_unit()
        inflater = zlib.decompressobj(-15)
        assert inflater.decompress(unit * 3 + b"\x03\x00") == bytes(3 * MiB) and inflater.eof
        with zipfile.ZipFile(path) as archive:
            info = archive.getinfo("archive/data/0")
        with open(path, "rb") as f:
            data = f.read()
        assert data.count(unit) == BOMB_MIB  # So the stream inflates to BOMB_MIB MiB.
        assert info.file_size == (BOMB_MIB * MiB if declared is None else declared)
        assert len(data) < 12 * MiB and info.compress_type == zipfile.ZIP_DEFLATED

    return prove


DIMS = 120_000


def _write_dims(path: str) -> None:
    ones = b"(K\x01" + b"2" * (DIMS - 1) + b"tq\x01"  # 120,000 ones by DUP; memo 1.
    value = tensor("0", 1, ones, b"h\x01")
    _save(path, torch_entries(state_dict(value), {"0": floats(1)}))


def _prove_dims(path: str) -> None:
    rebuilt = model_value(archive_pickle(path))
    assert len(rebuilt.size) == len(rebuilt.stride) == DIMS and set(rebuilt.size) == {1}


NESTING = 100_000


def _write_nested(path: str) -> None:
    pickled = PROTO + b"(" * NESTING + b"l" * NESTING + b"."
    _save(path, torch_entries(pickled, {}))


def _prove_nested(path: str) -> None:
    value, depth = pickle.loads(archive_pickle(path)), 0
    while value:
        value, depth = value[0], depth + 1
    assert depth == NESTING - 1  # NESTING lists, the innermost empty.


def _write_zip_flag(method: int, flags: int) -> Callable[[str], None]:
    def write(path: str) -> None:
        entries = torch_entries(state_dict(b"N"), {})
        entries[0] = Entry("archive/data.pkl", entries[0].data, method, flags)
        _save(path, entries)

    return write


def _prove_zip_refuses(error: type) -> Callable[[str], None]:
    def prove(path: str) -> None:
        with zipfile.ZipFile(path) as archive:
            try:
                archive.read("archive/data.pkl")
            except error:
                return
        raise AssertionError(f"zipfile reads it without {error.__name__}")

    return prove


def _write_numpy_uninitialized(path: str) -> None:
    value = (
        pglobal("numpy.core.multiarray", "_reconstruct")
        + b"("
        + pglobal("numpy", "ndarray")
        + ptuple((8192,))
        + pstr("f8")
        + b"tR"
    )
    _save(path, torch_entries(state_dict(value), {}))


def _prove_numpy_uninitialized(path: str) -> None:
    pickled = archive_pickle(path)
    array = pickle.loads(pickled)["model"]["fc1.weight"]  # numpy's own globals: harmless.
    assert array.shape == (8192,) and array.nbytes == 64 * 1024 > 10 * len(pickled)


MEMO_INDEX = 2**28


def _write_memo(path: str) -> None:
    value = b"Nr" + struct.pack("<I", MEMO_INDEX)  # None, memo[2**28] = it.
    _save(path, torch_entries(state_dict(value), {}))


def _prove_memo(path: str) -> None:
    # CPython's C unpickler grows its memo to twice the index and zeroes it: 4 GiB
    # (measured at 2**25: 535 MB of peak RSS for a 7-byte pickle).
    assert ("LONG_BINPUT", MEMO_INDEX) in ops(archive_pickle(path))


CASES = [
    Case(
        "build-replaces-stride-2**40",
        "refused: the file tries to modify a tensor after it was rebuilt",
        _build_on_tensor({"size": ptuple((2,)), "stride": ptuple((-(2**40),))}),
        _prove_build_huge,
    ),
    Case(
        "build-reads-before-storage",
        "refused: the file tries to modify a tensor after it was rebuilt",
        _build_on_tensor({"size": ptuple((64,)), "stride": ptuple((-1,)), "offset": pint(3)}),
        _prove_build_leak,
    ),
    Case(
        "build-on-allowed-function",
        "refused: the file tries to modify torch._utils._rebuild_tensor_v2",
        _write_build_global,
        _prove_build_global,
    ),
    Case(
        "zero-stride-2GiB",
        "its tensors would take more than",
        _write_zero_stride,
        _prove_zero_stride,
    ),
    Case(
        "memo-dag-depth-26",
        "'fc1.weight' is a list, not a numeric tensor",
        _write_billion_laughs,
        _prove_billion_laughs,
    ),
    Case(
        "pickle-declares-1.5GiB",
        "would inflate to 1610612736 bytes",
        _write_big_pickle,
        _prove_big_pickle,
    ),
    Case(
        "deflate-bomb-10GiB",
        "would inflate to 10737418240 bytes",
        _write_bomb(None),
        _prove_bomb(None),
    ),
    Case(
        "deflate-bomb-declaring-4-bytes",
        "inflates to more than its declared 4 bytes",
        _write_bomb(4),
        _prove_bomb(4),
    ),
    Case("tensor-120000-dims", "has 120000 dimensions", _write_dims, _prove_dims),
    Case("lists-nested-100000", "nested more than 100 deep", _write_nested, _prove_nested),
    Case(
        "compression-method-99",
        "compression method 99",
        _write_zip_flag(99, 0),
        _prove_zip_refuses(NotImplementedError),
    ),
    Case(
        "encrypted-record",
        "is encrypted",
        _write_zip_flag(0, 1),
        _prove_zip_refuses(RuntimeError),
    ),
    Case(
        "numpy-array-without-data",
        "a numpy array without its data",
        _write_numpy_uninitialized,
        _prove_numpy_uninitialized,
    ),
    Case(
        "memo-index-2**28",
        "is a NoneType, not a numeric tensor",
        _write_memo,
        _prove_memo,
    ),
]


# ---------------------------------------------------------------- the command-line run


def _peak_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/self/status")


def _measure(function: Callable[[], int]) -> Dict[str, Any]:
    """``function()``'s exit status, stderr, seconds and peak RSS (the peak is reset first
    where the kernel allows: otherwise it is the process's, an upper bound)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        reset = True
    except OSError:
        reset = False
    err, before = io.StringIO(), _peak_bytes()  # The resident size now, where reset.
    start = time.monotonic()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            code: Any = function()
        except BaseException:  # Recorded, not raised: a traceback fails the case.
            code = None
            traceback.print_exc()
    return {
        "code": code,
        "stderr": err.getvalue(),
        "seconds": time.monotonic() - start,
        "peak": _peak_bytes(),
        "before": before,
        "reset": reset,
    }


def _digest(state: Dict[str, Any]) -> str:
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode() + str(state[key].dtype).encode() + str(state[key].shape).encode())
        h.update(state[key].tobytes())
    return h.hexdigest()


def run_commands(spec_path: str) -> None:
    """Every case of the spec through ``panns-jax-convert from-torch`` and ``panns-jax tag``
    in this process, each followed by a read of the good checkpoint; then the good one
    through both commands. Writes the results as JSON to the spec's ``results``."""
    from panns_jax import cli, convert
    from panns_jax.cli import convert as convert_cli

    with open(spec_path) as f:
        spec = json.load(f)
    good, model = spec["good"], ["--model", "Cnn10", "--overrides", spec["overrides"]]
    want = _digest(convert.read_torch_checkpoint(good)[0])

    def commands(path: str, out: str) -> Dict[str, Callable[[], int]]:
        return {
            "from-torch": lambda: convert_cli.main(["from-torch", path, *model, "--out", out]),
            "tag": lambda: cli.main(["tag", spec["wav"], "--checkpoint", path, *model]),
        }

    results = []
    for case in spec["cases"]:
        for command, run in commands(case["path"], spec["out"]).items():
            result = _measure(run)
            state, step = convert.read_torch_checkpoint(good)
            result.update(case=case["name"], command=command, good=_digest(state) == want)
            results.append(result)
    for command, run in commands(good, spec["good_out"]).items():
        results.append(dict(_measure(run), case="good", command=command, good=True))
    with open(spec["results"], "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    run_commands(sys.argv[1])
