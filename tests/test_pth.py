"""panns_jax.pth: .pth files read and written without torch, compared with torch itself."""

from __future__ import annotations

import collections
import io
import json
import os
import pickle
import struct
import subprocess
import sys
import time

import golden_utils as G
import jax
import numpy as np
import pth_hostile as H
import pytest
import serving_utils as S
import soundfile as sf

from panns_jax import convert, models, pth
from panns_jax.cli import convert as convert_command

try:
    import torch
except ImportError:  # The hostile-file tests need no torch; the comparisons with it do.
    torch = None
needs_torch = pytest.mark.skipif(
    torch is None,
    reason="the comparison with torch.load needs the torch extra (pip install 'panns_jax[torch]')",
)

FORMATS = ["zip", "legacy"]
# Random words that the tensors are cut from, each at its own offset. At least the largest
# golden tensor (Wavegram_Logmel_Cnn14's conv_block6.conv2.weight: 37.7M words), small
# enough to draw in well under a second.
POOL_WORDS = 48_000_000


@pytest.fixture(scope="module")
def random_bits():
    """Random 32-bit words: as float32 they include NaN payloads, infinities and subnormals,
    which any decoding through floats (rather than bytes) would change."""
    return np.random.default_rng(0).integers(0, 2**32, POOL_WORDS, dtype=np.uint32)


def _manifest_state(name: str, bits: np.ndarray) -> "collections.OrderedDict[str, np.ndarray]":
    """Every key, shape and dtype of golden model ``name``, each filled with different random
    bits: views into ``bits`` at distinct offsets (no copies of the big tensors)."""
    state = collections.OrderedDict()
    offset, used = 0, set()
    for key, shape, dtype, _ in G.manifest()["models"][name]["state_dict"]:
        count = int(np.prod(shape)) * np.dtype(dtype).itemsize // 4
        assert len(bits) - count > 10_000, (name, key, "raise POOL_WORDS")
        offset %= len(bits) - count
        while offset in used:
            offset = (offset + 1) % (len(bits) - count)
        used.add(offset)
        words = bits[offset : offset + count]
        # 8-byte types (the int64 batch-norm counters, 0-d) are copied: aligned as torch's.
        state[key] = (
            (words.copy() if np.dtype(dtype).itemsize > 4 else words).view(dtype).reshape(shape)
        )
        offset += count + 7  # Neighbouring tensors never share their words' alignment.
    return state


def _torch_save(obj, fmt: str) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save(obj, buffer, _use_new_zipfile_serialization=fmt == "zip")
    buffer.seek(0)
    return buffer


def _bits(array: np.ndarray) -> np.ndarray:
    """The raw bits, so that NaN payloads compare too (8 bytes a word where they fit:
    fewer, wider comparisons)."""
    flat = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
    return flat.view(np.uint64) if flat.size % 8 == 0 else flat


def _layouts() -> list:
    """Golden models grouped by state_dict layout (keys, shapes, dtypes): models of one
    layout (Cnn14 and its dropout/SpecAugment/SED-pooling variants) give identical files."""
    groups: dict = {}
    for name in G.model_names():
        entries = G.manifest()["models"][name]["state_dict"]
        groups.setdefault(tuple((k, tuple(s), d) for k, s, d, _ in entries), []).append(name)
    return [pytest.param(names, id="+".join(names)) for names in groups.values()]


@needs_torch
@pytest.mark.parametrize("names", _layouts())
def test_reader_is_bit_identical_to_torch_load(names, random_bits, tmp_path):
    """Every golden model's state_dict (all 29, as 24 distinct layouts: every key at its full
    shape, 5.75 GB in all), in both formats, each file written once by torch.save."""
    G.require_golden()
    state = _manifest_state(names[0], random_bits)
    tensors = collections.OrderedDict((k, torch.from_numpy(v)) for k, v in state.items())
    for fmt in FORMATS:
        path = tmp_path / f"{fmt}.pth"
        torch.save(
            {"model": tensors, "iteration": 600000},
            path,
            _use_new_zipfile_serialization=fmt == "zip",
        )
        # mmap: torch's arrays are the file's pages, not another copy (zip format only).
        reference = torch.load(path, map_location="cpu", weights_only=True, mmap=fmt == "zip")
        ours = pth.load(str(path))
        assert ours["iteration"] == reference["iteration"] == 600000
        assert isinstance(ours["model"], collections.OrderedDict)
        assert list(ours["model"]) == list(reference["model"]) == list(state)
        for key, tensor in reference["model"].items():
            got, want = ours["model"][key], tensor.numpy()
            assert got.dtype == want.dtype and got.shape == want.shape, (fmt, key)
            assert np.array_equal(_bits(got), _bits(want)), (fmt, key)
        del reference, ours
        path.unlink()
    # The tensors were all different: a reader that swapped two same-shaped ones would fail.
    firsts = [v.reshape(-1)[:2].tobytes() for v in state.values() if v.size >= 2]
    assert len(set(firsts)) == len(firsts)


@needs_torch
@pytest.mark.parametrize("fmt", FORMATS)
def test_views_scalars_bf16_and_numpy_values_match_torch(fmt):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    state = collections.OrderedDict(
        strided=base[:, 1:4],
        transposed=base.t(),
        row=base[2],
        scalar=torch.tensor(3.5),
        empty=torch.zeros(0, 3),
        bf16=torch.randn(5, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16),
        half=torch.linspace(-2, 2, 7).half(),
        ints=torch.arange(-3, 3, dtype=torch.int32),
        flags=torch.tensor([True, False]),
        bytes=torch.arange(4, dtype=torch.uint8),
    )
    reference = torch.load(_torch_save({"model": state}, fmt), weights_only=True)
    # The original training script also saves its sampler state, with numpy values.
    obj = {
        "model": state,
        "iteration": 2**40,
        "sampler": {
            "indexes_per_class": [np.arange(3), np.arange(5.0)],
            "queue": [1, 0],
            "pos": np.int64(4),
        },
    }
    ours = pth.load(_torch_save(obj, fmt))
    for key, tensor in reference["model"].items():
        got = ours["model"][key]
        want = (
            tensor.view(torch.int16).numpy() if tensor.dtype == torch.bfloat16 else tensor.numpy()
        )
        assert got.shape == tuple(tensor.shape), key
        assert np.array_equal(got.view(np.int16) if got.dtype.name == "bfloat16" else got, want), (
            key
        )
    assert ours["model"]["bf16"].dtype.name == "bfloat16"
    assert ours["iteration"] == 2**40
    np.testing.assert_array_equal(ours["sampler"]["indexes_per_class"][1], np.arange(5.0))
    assert ours["sampler"]["pos"] == 4 and ours["sampler"]["queue"] == [1, 0]


@needs_torch
def test_crc32_is_checked_unless_torch_wrote_none():
    """torch.load reads files saved with set_crc32_options(False) (every CRC 0): so do we.
    Where CRCs were written, a flipped bit in a tensor is caught."""
    state = {"model": collections.OrderedDict(w=torch.arange(64, dtype=torch.float32))}
    before = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        unchecked = _torch_save(state, "zip")
    finally:
        torch.serialization.set_crc32_options(before)
    ours = pth.load(unchecked)
    assert np.array_equal(ours["model"]["w"], np.arange(64, dtype=np.float32))
    assert torch.serialization.get_crc32_options()
    data = bytearray(_torch_save(state, "zip").getvalue())
    index = data.index(np.arange(64, dtype=np.float32).tobytes()) + 100
    data[index] ^= 1
    assert torch.load(io.BytesIO(bytes(data)), weights_only=True)["model"]["w"][25] != 25
    with pytest.raises(pth.PthError, match="data/0 fails its CRC-32 check: the file is damaged"):
        pth.load(io.BytesIO(bytes(data)))


@needs_torch
def test_a_deflated_archive_reads_as_torch_reads_it():
    """torch writes its records stored. Re-zipped with deflate (as an archiver may), the file
    is one torch.load reads, and so do we, through zipfile's decompressing reader."""
    import zipfile

    state = {"model": collections.OrderedDict(w=torch.arange(5000, dtype=torch.float32))}
    plain = zipfile.ZipFile(_torch_save(state, "zip"))
    deflated = io.BytesIO()
    with zipfile.ZipFile(deflated, "w", zipfile.ZIP_DEFLATED) as archive:
        for info in plain.infolist():
            archive.writestr(info.filename, plain.read(info))
    assert len(deflated.getvalue()) < 20000 / 2  # Compressed indeed.
    want = torch.load(io.BytesIO(deflated.getvalue()), weights_only=True)["model"]["w"]
    deflated.seek(0)
    assert np.array_equal(pth.load(deflated)["model"]["w"], want.numpy())


@needs_torch
def test_writer_is_read_by_torch_weights_only_and_loads_strict_into_the_original(tmp_path):
    """A .pth written without torch: torch.load(weights_only=True) reads it, the PyTorch
    Cnn6 loads it with strict=True and reproduces the golden outputs."""
    G.require_golden()
    model = models.get("Cnn6")
    state = convert.to_state_dict(convert.from_state_dict(G.load_state("Cnn6"), model), model)
    path = tmp_path / "cnn6.pth"
    convert.write_torch_checkpoint(str(path), state, iteration=123)
    loaded = torch.load(path, weights_only=True)
    assert loaded["iteration"] == 123 and list(loaded["model"]) == list(state)
    for key, value in state.items():
        assert loaded["model"][key].dtype == torch.from_numpy(value).dtype, key
        np.testing.assert_array_equal(loaded["model"][key].numpy(), value, err_msg=key)
    assert torch.load(path, weights_only=True, mmap=True)["model"].keys() == state.keys()

    sys.path.insert(0, str(G.PROJECT_ROOT / "benchmarks"))
    try:
        import torch_baselines
    finally:
        sys.path.remove(str(G.PROJECT_ROOT / "benchmarks"))
    baseline = torch_baselines.build("Cnn6", {k: v.numpy() for k, v in loaded["model"].items()})
    with torch.inference_mode():
        out = baseline(torch.from_numpy(G.inputs()["odd"]))
    problem = G.check_array(
        "odd/clipwise_output",
        out["clipwise_output"].numpy(),
        G.outputs("Cnn6")["odd/clipwise_output"],
    )
    assert not problem, problem
    # And our reader gives the same bits back.
    mine, step = convert.read_torch_checkpoint(str(path))
    assert step == 123 and all(np.array_equal(mine[k], state[k]) for k in state)


@needs_torch
def test_writer_round_trips_containers_and_dtypes():
    import ml_dtypes

    obj = {
        "model": collections.OrderedDict(
            a=np.arange(6, dtype=np.float64).reshape(2, 3)[:, ::2],
            b=np.array(7),
            c=np.arange(4, dtype=np.float32).astype(ml_dtypes.bfloat16),
            d=np.arange(3, dtype=">f4"),
            e=np.zeros((0, 2), np.int8),
        ),
        "iteration": -(2**40),
        "items": [1, 2.5, None, True, "é", (1, (2,))],
    }
    buffer = io.BytesIO()
    pth.save(buffer, obj)
    buffer.seek(0)
    reference = torch.load(buffer, weights_only=True)
    buffer.seek(0)
    ours = pth.load(buffer)
    assert ours["iteration"] == reference["iteration"] == -(2**40)
    assert ours["items"] == reference["items"] == [1, 2.5, None, True, "é", (1, (2,))]
    for key, value in obj["model"].items():
        assert tuple(reference["model"][key].shape) == value.shape, key
        np.testing.assert_array_equal(
            reference["model"][key].float().numpy(), value.astype(np.float32), err_msg=key
        )
        assert ours["model"][key].dtype == value.dtype.newbyteorder("="), key
        np.testing.assert_array_equal(ours["model"][key], value, err_msg=key)
    with pytest.raises(TypeError, match="cannot write"):
        pth.save(io.BytesIO(), {"x": object()})


class _Evil:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


@needs_torch
@pytest.mark.parametrize("fmt", FORMATS)
def test_pickled_code_is_refused_and_never_runs(tmp_path, fmt):
    target = tmp_path / "pwned"
    evil = {"model": {"fc1.weight": torch.zeros(2)}, "payload": _Evil(target)}
    path = tmp_path / "evil.pth"
    path.write_bytes(_torch_save(evil, fmt).getvalue())
    for reader in (pth.load, convert.read_torch_checkpoint):
        with pytest.raises(pth.PthError) as info:
            reader(str(path))
        message = str(info.value)
        assert "refused" in message and "system" in message and str(path) in message
        assert "\n" not in message and "weights_only=False" not in message
    assert not target.exists()
    control = tmp_path / "control"  # Negative control: a plain unpickler runs the payload.
    pickle.loads(pickle.dumps(_Evil(control)))
    assert control.exists()


@pytest.mark.parametrize(
    "payload",
    [
        b"\x80\x02cbuiltins\neval\nX\x06\x00\x00\x001+1==2\x85R.",  # eval("1+1==2")
        b"\x80\x02cposix\nsystem\nX\x04\x00\x00\x00true\x85R.",  # os.system("true")
    ],
)
def test_hand_made_pickles_naming_callables_are_refused(tmp_path, payload):
    """Legacy-format streams whose object pickle names a callable outside the allow-list."""
    header = b"".join(
        pickle.dumps(x, protocol=2)
        for x in (
            pth.LEGACY_MAGIC,
            pth.LEGACY_PROTOCOL,
            {"protocol_version": 1001, "little_endian": True},
        )
    )
    path = tmp_path / "hand.pth"
    path.write_bytes(header + payload)
    with pytest.raises(pth.PthError, match="refused"):
        pth.load(str(path))


def _one_line_error(path, match: str) -> str:
    with pytest.raises(pth.PthError) as info:
        convert.read_torch_checkpoint(str(path))
    message = str(info.value)
    assert match in message, message
    assert "\n" not in message and str(path) in message and "weights_only" not in message
    return message


@needs_torch
@pytest.mark.parametrize("fmt", FORMATS)
def test_truncated_files_fail_in_one_line(tmp_path, fmt):
    G.require_golden()
    state = {k: torch.from_numpy(v) for k, v in G.load_state("Cnn6").items()}
    data = _torch_save({"model": state, "iteration": 1}, fmt).getvalue()
    for fraction in (0.999, 0.5, 0.01):
        path = tmp_path / f"cut{fraction}.pth"
        path.write_bytes(data[: int(len(data) * fraction)])
        _one_line_error(path, "truncated")


@needs_torch
def test_empty_and_non_checkpoint_files_fail_in_one_line(tmp_path):
    cases = {
        "empty.pth": (b"", "empty file (0 bytes)"),
        "text.pth": (b"hello, I am not a checkpoint\n" * 10, "not a PyTorch checkpoint"),
        "random.pth": (np.random.default_rng(0).bytes(4096), "not a PyTorch checkpoint"),
        "pickle.pth": (pickle.dumps({"a": 1}, protocol=2), "not a PyTorch checkpoint"),
        "magicless.pth": (pickle.dumps(1 << 70, protocol=2), "no magic number"),
    }
    for name, (data, match) in cases.items():
        (tmp_path / name).write_bytes(data)
        _one_line_error(tmp_path / name, match)
    import zipfile

    with zipfile.ZipFile(tmp_path / "archive.pth", "w") as archive:
        archive.writestr("notes/readme.txt", "a zip, not a checkpoint")
    _one_line_error(tmp_path / "archive.pth", "without data.pkl")
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), tmp_path / "script.pth")
    _one_line_error(tmp_path / "script.pth", "TorchScript")
    with pytest.raises(FileNotFoundError, match="no such checkpoint file"):
        pth.load(str(tmp_path / "missing.pth"))


@needs_torch
def test_bf16_and_numpy_valued_state_dicts_convert(tmp_path):
    G.require_golden()
    recipe = G.load_state("Cnn6")
    bf16 = {
        k: torch.from_numpy(v).to(torch.bfloat16) if v.dtype == np.float32 else torch.from_numpy(v)
        for k, v in recipe.items()
    }
    torch.save({"model": bf16, "iteration": 3}, tmp_path / "bf16.pth")
    state, step = convert.read_torch_checkpoint(str(tmp_path / "bf16.pth"))
    assert step == 3
    for key, tensor in bf16.items():  # Widened exactly, as torch's .float() does.
        assert state[key].dtype == (np.float32 if tensor.is_floating_point() else np.int64)
        np.testing.assert_array_equal(
            state[key], tensor.float().numpy() if tensor.is_floating_point() else tensor.numpy()
        )
    # A state_dict of numpy arrays (the original's sampler state is numpy too).
    torch.save({"model": recipe, "iteration": 4}, tmp_path / "numpy.pth")
    state, step = convert.read_torch_checkpoint(str(tmp_path / "numpy.pth"))
    assert step == 4 and all(np.array_equal(state[k], recipe[k]) for k in recipe)
    out = tmp_path / "out"
    assert (
        convert_command.main(
            ["from-torch", str(tmp_path / "numpy.pth"), "--model", "Cnn6", "--out", str(out)]
        )
        == 0
    )
    assert (
        convert_command.main(
            [
                "from-torch",
                str(tmp_path / "bf16.pth"),
                "--model",
                "Cnn6",
                "--out",
                str(tmp_path / "out_bf16"),
            ]
        )
        == 0
    )
    # Entries that are not numbers: one line naming the key.
    torch.save({"model": {"fc1.weight": "a string"}}, tmp_path / "strings.pth")
    with pytest.raises(ValueError, match="'fc1.weight' is a str, not a numeric tensor"):
        convert.read_torch_checkpoint(str(tmp_path / "strings.pth"))


def test_cli_reports_damaged_pth_in_one_line_and_writes_nothing(tmp_path, capsys):
    (tmp_path / "empty.pth").write_bytes(b"")
    code = convert_command.main(
        [
            "from-torch",
            str(tmp_path / "empty.pth"),
            "--model",
            "Cnn6",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "empty file" in err
    assert "weights_only" not in err
    assert sorted(os.listdir(tmp_path)) == ["empty.pth"]


def test_a_pickle_cannot_alter_the_allow_listed_objects(tmp_path):
    """BUILD on an allowed storage type would change what later files mean: refused."""
    header = b"".join(
        pickle.dumps(x, protocol=2)
        for x in (
            pth.LEGACY_MAGIC,
            pth.LEGACY_PROTOCOL,
            {"protocol_version": 1001, "little_endian": True},
        )
    )
    path = tmp_path / "poison.pth"
    path.write_bytes(header + b"\x80\x02ctorch\nFloatStorage\n}X\x05\x00\x00\x00dtypeK\x01sb.")
    with pytest.raises(pth.PthError, match="modify a storage type"):
        pth.load(str(path))


# ------------------------------------------------------------------ hostile files
# tests/pth_hostile.py writes each file (a few lines of Python a case) and proves its harm.

CASES = {case.name: case for case in H.CASES}
COMMANDS = ["from-torch", "tag"]
PEAK_LIMIT = 1.5e9  # Bytes of resident memory a command may peak at on a hostile file,
GROWTH_LIMIT = 1e8  # and may add to what the process held before it.


@pytest.mark.parametrize("case", H.CASES, ids=lambda case: case.name)
def test_each_hostile_file_does_what_it_claims(case, tmp_path):
    """By construction (opcodes, declared sizes, what Python's unpickler makes of it with
    harmless stand-ins), so that no test of a refusal passes vacuously."""
    path = str(tmp_path / "hostile.pth")
    case.write(path)
    case.prove(path)


def _tiny_cnn10_pth(path) -> None:
    """A .pth of the command-line tests' tiny Cnn10 with finite values: shapes from
    eval_shape (nothing compiled), every value in [0.05, 0.2)."""
    model = models.get("Cnn10", **S.OVERRIDES)
    shapes = jax.eval_shape(lambda: models.init(model, jax.random.key(0), S.SR))
    rng = np.random.default_rng(0)
    variables = jax.tree_util.tree_map(
        lambda s: rng.uniform(0.05, 0.2, s.shape).astype(s.dtype), shapes
    )
    convert.write_torch_checkpoint(str(path), convert.to_state_dict(variables, model), 3)


@pytest.fixture(scope="module")
def command_runs(tmp_path_factory):
    """Every hostile file through ``panns-jax-convert from-torch`` and ``panns-jax tag`` in
    one fresh process (a crash there fails these tests, not pytest), each followed by a read
    of a good .pth in that process; then the good one through both commands. The directory
    of the inputs is snapshotted before and after."""
    root = tmp_path_factory.mktemp("hostile")
    run = tmp_path_factory.mktemp("hostile_run")
    for case in H.CASES:
        case.write(str(root / f"{case.name}.pth"))
    _tiny_cnn10_pth(root / "good.pth")
    noise = 0.1 * np.random.default_rng(0).standard_normal(S.SR)
    sf.write(root / "a.wav", noise.astype(np.float32), S.SR, subtype="FLOAT")
    spec = {
        "cases": [{"name": c.name, "path": str(root / f"{c.name}.pth")} for c in H.CASES],
        "good": str(root / "good.pth"),
        "wav": str(root / "a.wav"),
        "overrides": S.OVERRIDES_JSON,
        "out": str(root / "out"),
        "good_out": str(run / "good_out"),
        "results": str(run / "results.json"),
    }
    (run / "spec.json").write_text(json.dumps(spec))
    before = S.snapshot(root)
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import pth_hostile; "
        "pth_hostile.run_commands(sys.argv[2])"
    )
    tests = os.path.dirname(os.path.abspath(__file__))
    process = subprocess.run(
        [sys.executable, "-c", code, tests, str(run / "spec.json")],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=os.path.dirname(tests),
    )
    assert process.returncode == 0, (process.returncode, process.stderr[-3000:])
    results = json.loads((run / "results.json").read_text())
    return {
        "process": process,
        "results": {(r["case"], r["command"]): r for r in results},
        "changed": before != S.snapshot(root),
        "run": sorted(os.listdir(run)),
    }


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("name", list(CASES))
def test_hostile_file_fails_in_one_line_through_the_command(command_runs, name, command):
    """Exit status 2, one ``error:`` line naming the fault, no traceback, under 60 s and
    1.5 GB of peak memory (100 MB above the process's baseline); the same process then reads
    a good .pth bit for bit."""
    result = command_runs["results"][(name, command)]
    lines = result["stderr"].splitlines()
    assert result["code"] == 2, result
    assert "Traceback" not in result["stderr"] and 1 <= len(lines) <= 3, result["stderr"]
    assert lines[0].startswith("error: ") and CASES[name].message in lines[0], lines[0]
    assert result["seconds"] < 60 and result["peak"] < PEAK_LIMIT, result
    assert result["peak"] - result["before"] < GROWTH_LIMIT, result
    assert result["good"], "the good checkpoint read differently after this file"


def test_after_every_hostile_file_the_commands_still_work_and_nothing_changed(command_runs):
    """The good .pth converts and tags in the process that read every hostile file; no
    input changed and no output was left by a failed command."""
    results = command_runs["results"]
    for command in COMMANDS:
        good = results[("good", command)]
        assert good["code"] == 0 and "Traceback" not in good["stderr"], good
    assert "Traceback" not in command_runs["process"].stderr
    assert not command_runs["changed"]  # The inputs, and no out/ beside them.
    assert command_runs["run"] == ["good_out", "results.json", "spec.json"]
    assert all(r["reset"] for r in results.values()), "peaks are the process's, not per case"


def test_allowed_globals_never_change(tmp_path):
    """A BUILD on an allow-listed function is refused, the function and its token stay as
    they were, and the same process reads the next file."""
    path = tmp_path / "poison.pth"
    CASES["build-on-allowed-function"].write(str(path))
    before = {k: (g.function, g.function.__defaults__) for k, g in pth._ALLOWED.items()}
    with pytest.raises(pth.PthError, match="modify torch._utils._rebuild_tensor_v2"):
        pth.load(str(path))
    assert {k: (g.function, g.function.__defaults__) for k, g in pth._ALLOWED.items()} == before
    assert pth._rebuild_tensor_v2.__defaults__ == (False, None, None)
    with pytest.raises(pth.PthError, match="refused"):
        pth._ALLOWED[("torch._utils", "_rebuild_tensor_v2")].function = print
    buffer = io.BytesIO()
    pth.save(buffer, {"w": np.arange(6.0).reshape(2, 3)})
    buffer.seek(0)
    assert np.array_equal(pth.load(buffer)["w"], np.arange(6.0).reshape(2, 3))


def test_shared_objects_are_read_once_and_stay_shared(tmp_path):
    """A 2**26-leaf tree of memo references reads as its 27 distinct lists, in well under a
    second, with the sharing kept."""
    path = tmp_path / "dag.pth"
    CASES["memo-dag-depth-26"].write(str(path))
    start = time.monotonic()
    value = pth.load(str(path))["model"]["fc1.weight"]
    assert time.monotonic() - start < 1
    for _ in range(H.DAG_DEPTH):
        assert len(value) == 2 and value[0] is value[1]
        value = value[0]
    assert value == []


def _legacy(pickled: bytes, storages: bytes = b"", keys: bytes = b"\x80\x02]q\x00.") -> bytes:
    """A legacy torch.save stream: magic, protocol, system info, ``pickled``, the storage
    keys pickle and the storages' bytes (each an int64 count then the data)."""
    header = b"".join(
        pickle.dumps(x, protocol=2)
        for x in (pth.LEGACY_MAGIC, pth.LEGACY_PROTOCOL, {"little_endian": True})
    )
    return header + pickled + keys + storages


def _zip_file(pickled: bytes, storages=None) -> bytes:
    return H.zip_bytes(H.torch_entries(pickled, storages or {}))


FOUR = H.tensor("0", 4, H.ptuple((4,)), H.ptuple((1,)))
# numpy's pickle of np.array([1.0, 2.0]): _reconstruct(ndarray, (0,), 'b'), then a BUILD with
# (1, shape, dtype('<f8') (itself rebuilt and built), False, the bytes).
ARRAY = (
    H.pglobal("numpy.core.multiarray", "_reconstruct")
    + b"("
    + H.pglobal("numpy", "ndarray")
    + H.ptuple((0,))
    + H.pstr("b")
    + b"tR"
)
DTYPE = (
    H.pglobal("numpy", "dtype")
    + H.pstr("f8")
    + b"\x89\x88\x87R("
    + H.pint(3)
    + H.pstr("<")
    + b"NNN"
    + H.pint(-1)
    + H.pint(-1)
    + H.pint(0)
    + b"tb"
)
STATE = (
    b"("
    + H.pint(1)
    + H.ptuple((2,))
    + DTYPE
    + b"\x89B"
    + struct.pack("<I", 16)
    + struct.pack("<2d", 1.0, 2.0)
    + b"t"
)

REFUSED = [  # (id, file bytes, part of the one-line message)
    (
        "ndarray-called-directly",
        _zip_file(H.state_dict(H.pglobal("numpy", "ndarray") + b"(" + H.ptuple((8192,)) + b"tR")),
        "numpy.ndarray may only be named as the type",
    ),
    (
        "newobj",
        _zip_file(H.state_dict(H.pglobal("collections", "OrderedDict") + b")\x81")),
        "opcode NEWOBJ",
    ),
    (
        "float-key",
        _zip_file(H.PROTO + b"}G" + struct.pack(">d", 1.5) + b"Ns."),
        "only strings, bytes and integers below 2**60",
    ),
    ("tuple-key", _zip_file(H.PROTO + b"}" + H.ptuple((1, 2)) + b"Ns."), "a dict key"),
    ("list-holds-itself", _zip_file(H.PROTO + b"]q\x00h\x00a."), "holds itself"),
    (
        "setitem-on-tensor",
        _zip_file(H.state_dict(FOUR + b"(" + H.pstr("size") + H.ptuple((9,)) + b"u"), {}),
        "set an item of a tensor after it was rebuilt",
    ),
    (
        "append-to-allowed-class",
        _zip_file(H.PROTO + H.pglobal("collections", "OrderedDict") + b"Na."),
        "append to collections.OrderedDict",
    ),
    (
        "stack-global-os-system",
        _zip_file(H.PROTO + b"\x8c\x05posix\x8c\x06system\x93."),
        "refused: the file asks for the Python object posix.system",
    ),
    (
        "view-past-storage",
        _zip_file(
            H.state_dict(H.tensor("0", 4, H.ptuple((4,)), H.ptuple((1,)), offset=3)),
            {"0": H.floats(4)},
        ),
        "reaches element 6 of a storage of 4 elements",
    ),
    (
        "bare-storage",
        _zip_file(
            H.PROTO
            + b"("
            + H.pstr("storage")
            + H.pglobal("torch", "FloatStorage")
            + H.pstr("0")
            + H.pstr("cpu")
            + H.pint(1)
            + b"tQ.",
            {"0": H.floats(1)},
        ),
        "bare storage",
    ),
    (
        "long-global-name",
        _zip_file(H.PROTO + b"c" + b"m" * (pth.MAX_LINE + 1) + b"\nx\n."),
        f"longer than {pth.MAX_LINE} bytes",
    ),
    (
        "legacy-build-on-tensor",
        _legacy(
            H.state_dict(FOUR + b"}(" + H.pstr("stride") + H.ptuple((0,)) + b"ub"),
            keys=b"\x80\x02]q\x00X\x01\x00\x00\x000a.",
            storages=struct.pack("<q", 4) + H.floats(4),
        ),
        "refused: the file tries to modify a tensor after it was rebuilt",
    ),
    (
        "legacy-storage-past-end",
        _legacy(
            H.state_dict(FOUR),
            keys=b"\x80\x02]q\x00X\x01\x00\x00\x000a.",
            storages=struct.pack("<q", 4) + H.floats(3),
        ),
        "truncated",
    ),
]


@pytest.mark.parametrize("data, message", [r[1:] for r in REFUSED], ids=[r[0] for r in REFUSED])
def test_objects_a_pickle_may_not_build_call_or_change_are_refused(tmp_path, data, message):
    path = tmp_path / "hostile.pth"
    path.write_bytes(data)
    _one_line_error(path, message)


def test_the_limits_hold_for_any_count_of_opcodes(tmp_path, monkeypatch):
    """MAX_OPCODES (2**20 in earnest, 1000 here) is a budget of the whole file."""
    monkeypatch.setattr(pth, "MAX_OPCODES", 1000)
    path = tmp_path / "many.pth"
    path.write_bytes(_zip_file(H.PROTO + b"N0" * 600 + b"N."))
    _one_line_error(path, "more than 1000 opcodes")
    path.write_bytes(_zip_file(H.PROTO + b"N0" * 400 + b"N."))
    assert pth.load(str(path)) is None


def test_numpy_values_are_rebuilt_from_their_bytes_once(tmp_path):
    """numpy's arrays and dtypes take one BUILD each, from bytes in the file; a second is
    refused."""
    path = tmp_path / "numpy.pth"
    path.write_bytes(_zip_file(H.PROTO + ARRAY + STATE + b"b."))
    value = pth.load(str(path))
    assert value.dtype == np.float64 and np.array_equal(value, [1.0, 2.0])
    path.write_bytes(_zip_file(H.PROTO + ARRAY + STATE + b"b" + STATE + b"b."))
    _one_line_error(path, "modify a numpy array after it was built")


def test_damaged_files_fail_with_a_specific_line(tmp_path):
    """3000 random mutations of a zip and a legacy file (bytes flipped, cut, inserted,
    repeated), and of a pickle re-zipped with its CRC right: each reads or fails with one
    specific PthError line, never another exception nor the generic "malformed" line."""
    import random

    rng = random.Random(0)
    pickled = (
        H.PROTO
        + b"}("
        + H.pstr("model")
        + b"}("
        + H.pstr("fc1.weight")
        + FOUR
        + b"u"
        + H.pstr("sampler")
        + ARRAY
        + STATE
        + b"b"
        + H.pstr("iteration")
        + H.pint(2**40)
        + b"u."
    )
    storage = {"0": H.floats(4)}
    keys = b"\x80\x02]q\x00X\x01\x00\x00\x000a."
    legacy = _legacy(pickled, struct.pack("<q", 4) + H.floats(4), keys)
    assert np.array_equal(pth.load(io.BytesIO(_zip_file(pickled, storage)))["sampler"], [1, 2])
    assert pth.load(io.BytesIO(legacy))["iteration"] == 2**40

    def mutate(data: bytes) -> bytes:
        data = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            kind, i = rng.random(), rng.randrange(len(data))
            if kind < 0.5:
                data[i] = rng.randrange(256)
            elif kind < 0.7:
                del data[i : i + rng.randint(1, 8)]
            elif kind < 0.85:
                data[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 4)))
            else:
                j = rng.randrange(len(data))
                data[i:i] = data[j : j + rng.randint(1, 16)]
        return bytes(data)

    failed = 0
    for n in range(3000):
        data = (
            mutate(_zip_file(pickled, storage))
            if n % 3 == 0
            else mutate(legacy)
            if n % 3 == 1
            else _zip_file(mutate(pickled), storage)
        )
        try:
            pth.load(io.BytesIO(data))
        except pth.PthError as err:
            failed += 1
            assert "\n" not in str(err) and "malformed checkpoint (" not in str(err), str(err)
    assert failed > 2500
