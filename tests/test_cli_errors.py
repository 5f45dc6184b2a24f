"""Hostile and mistaken inputs through the real ``panns-jax tag | sed | embed`` and
``panns-jax-convert`` command lines.

Every case runs an entry point (``cli.main``, the convert command's ``main``, or a
subprocess) and asserts the exit status, the one clear line on stderr, and that nothing on
disk changed but what the command was asked to write. A tiny Cnn10 (widths 8..64, 5 named
classes) keeps every compile short.

The stream, HEAR and export commands' cases are in tests/test_streaming.py,
tests/test_hear.py and tests/test_export.py; the audio reader's in tests/test_audio.py; the
.pth reader's in tests/test_pth.py; training's in tests/test_main.py, tests/test_checkpointing.py
and tests/test_transfer.py.
"""

from __future__ import annotations

import glob
import json
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
import serving_utils as S
from serving_utils import one_error_line, run_main, snapshot

from panns_jax import checkpoints, cli, loader
from panns_jax.cli import convert as convert_cli
from panns_jax.kernels import onednn

LABELS, OVERRIDES, OVERRIDES_JSON = S.LABELS, S.OVERRIDES, S.OVERRIDES_JSON


# -------------------------------------------------------- table: refused before any work

# (id, argv with {root}/{ckpt} placeholders, message). All exit 2, change nothing on
# disk, and load no model (the loader is patched to fail).
REFUSED = [
    # Numeric options: values that would give silently wrong answers.
    (
        "batch-size-negative",
        ["tag", "{root}/good.wav", "--batch-size", "-1"],
        "batch size must be an integer in 1..1024, got -1",
    ),
    (
        "batch-size-zero",
        ["embed", "{root}/good.wav", "--batch-size", "0"],
        "batch size must be an integer",
    ),
    (
        "top-k-negative",
        ["tag", "{root}/good.wav", "--top-k", "-1"],
        "top-k must be a positive integer, got -1",
    ),
    ("top-k-zero", ["tag", "{root}/good.wav", "--top-k", "0"], "top-k must be a positive"),
    (
        "threshold-above-1",
        ["sed", "{root}/good.wav", "--threshold", "1.5"],
        "threshold must be a probability in [0, 1], got 1.5",
    ),
    (
        "threshold-negative",
        ["sed", "{root}/good.wav", "--threshold", "-0.1"],
        "threshold must be a probability in [0, 1]",
    ),
    # Chunk windows and hops: refused, never clamped to one sample.
    ("hop-tiny", ["tag", "{root}/good.wav", "--hop", "0.00001"], "--hop 1e-05 s is below 0.01 s"),
    ("hop-negative", ["sed", "{root}/good.wav", "--hop", "-1"], "--hop must be a positive"),
    (
        "window-nan",
        ["tag", "{root}/good.wav", "--window", "nan"],
        "--window must be a positive, finite number of seconds, got nan",
    ),
    ("window-inf", ["embed", "{root}/good.wav", "--window", "inf"], "got inf"),
    # Outputs onto inputs.
    (
        "sed-output-is-input",
        ["sed", "{root}/good.wav", "--output", "{root}/good.wav"],
        "--output {root}/good.wav is also an input",
    ),
    (
        "tag-output-is-input",
        ["tag", "{root}", "--output", "{root}/silence.wav"],
        "--output {root}/silence.wav is also an input",
    ),
    (
        "plot-dir-is-input",
        ["sed", "{root}/good.wav", "--plot-dir", "{root}/good.wav"],
        "is also an input",
    ),
    # Outputs that cannot be written, checked before computing.
    (
        "output-missing-dir",
        ["tag", "{root}/good.wav", "--output", "{root}/nope/tags.json"],
        "directory {root}/nope does not exist; create it first",
    ),
    (
        "embed-output-missing-dir",
        ["embed", "{root}/good.wav", "--output", "{root}/no/e.npz"],
        "directory {root}/no does not exist",
    ),
    ("output-is-dir", ["tag", "{root}/good.wav", "--output", "{root}"], "is a directory"),
    (
        "framewise-dir-is-file",
        ["sed", "{root}/good.wav", "--framewise-dir", "{root}/short.wav"],
        "exists and is not a directory",
    ),
    # Embeddings are .npz or .npy, so the file written is the one reported.
    (
        "embed-output-extension",
        ["embed", "{root}/good.wav", "--output", "{root}/emb.txt"],
        "end the name with one of those",
    ),
]


@pytest.mark.parametrize("case, argv, message", REFUSED, ids=[c[0] for c in REFUSED])
def test_refused_before_any_work(env, capsys, monkeypatch, case, argv, message):
    root = str(env["root"])

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were validated")

    monkeypatch.setattr(loader, "load", no_model)
    fill = lambda s: s.format(root=root, ckpt=env["ckpt"])  # noqa: E731
    before = snapshot(root)
    code, out, err = run_main(
        cli.main, [fill(a) for a in argv] + ["--checkpoint", env["ckpt"]], capsys
    )
    assert code == 2, err
    assert fill(message) in one_error_line(err)
    assert snapshot(root) == before


def test_an_unusable_conv_backend_is_one_line_before_loading(env, capsys, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the backend was ready")

    def missing():
        raise onednn.OneDnnUnavailable("oneDNN is not installed: pip install 'panns-jax[onednn]'")

    monkeypatch.setattr(loader, "load", no_model)
    monkeypatch.setattr(onednn, "load", missing)
    argv = ["tag", env["root"] / "good.wav", "--checkpoint", env["ckpt"]]
    argv += ["--conv-backend", "onednn"]
    code, out, err = run_main(cli.main, argv, capsys)
    assert code == 2 and out == ""
    assert one_error_line(err) == "error: oneDNN is not installed: pip install 'panns-jax[onednn]'"


def test_read_only_output_directory(env, tmp_path, capsys):
    # A directory no file can be created in: mode 0o555, or (root ignores modes) sysfs.
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    if os.geteuid() == 0:
        locked = pathlib.Path("/sys")
    try:
        argv = ["tag", env["root"] / "good.wav", "--output", locked / "t.json"]
        code, _, err = run_main(cli.main, [*argv, "--checkpoint", env["ckpt"]], capsys)
    finally:
        (tmp_path / "locked").chmod(0o755)
    assert code == 2 and f"cannot write in {locked}" in one_error_line(err)


# ---------------------------------------------------- damaged weights, wrong answers


def test_flipped_bit_in_weights_is_an_error_not_nan(env, tmp_path, capsys):
    damaged = tmp_path / "damaged"
    shutil.copytree(env["ckpt"], damaged)
    data_file = max(glob.glob(f"{damaged}/variables/**/d/*", recursive=True), key=os.path.getsize)
    blob = bytearray(open(data_file, "rb").read())
    blob[len(blob) // 2] ^= 0x40
    open(data_file, "wb").write(bytes(blob))
    # Negative control: orbax alone reads the damaged weights without complaint.
    silently = checkpoints.load(str(damaged), verify=False).variables
    leaves = jax.tree_util.tree_leaves(silently)
    originals = jax.tree_util.tree_leaves({k: env["variables"][k] for k in checkpoints.COLLECTIONS})
    assert any(not np.array_equal(a, b) for a, b in zip(leaves, originals))
    code, out, err = run_main(
        cli.main,
        ["tag", env["root"] / "good.wav", "--checkpoint", damaged, "--format", "json"],
        capsys,
    )
    assert code == 2 and out == ""
    assert "the weights do not match the digest" in one_error_line(err)


def test_non_finite_outputs_fail_per_file_and_json_stays_valid(env, tmp_path, capsys):
    ckpt = S.save_tiny(tmp_path / "nan", S.nan_variables(env, ("fc_audioset", "bias", 2)))
    out_file = tmp_path / "tags.json"
    wav = env["root"] / "good.wav"
    code, _, err = run_main(
        cli.main,
        ["tag", wav, "--checkpoint", ckpt, "--format", "json", "--output", out_file],
        capsys,
    )
    assert code == 1
    assert "the model produced non-finite clipwise_output (NaN/Inf)" in one_error_line(err)
    assert json.loads(out_file.read_text()) == []  # Strict JSON: no NaN token.


# ------------------------------------------------------ audio: warnings, sample rates


def test_warnings_for_truncated_silent_and_loud_files(env, capsys):
    root = env["root"]
    files = ["truncated.wav", "silence.wav", "loud.wav", "good.wav"]
    argv = ["tag", *[root / f for f in files], "--checkpoint", env["ckpt"], "--format", "json"]
    code, out, err = run_main(cli.main, [*argv, "--no-progress"], capsys)
    assert code == 0, err
    assert [r["file"] for r in json.loads(out)] == [str(root / f) for f in files]
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert warnings == [
        f"warning: {root}/truncated.wav: truncated file: its header declares 2.000 s of audio "
        "but only 0.500 s are present; using what is there",
        f"warning: {root}/silence.wav: digital silence (peak 0); its tags describe no sound",
        f"warning: {root}/loud.wav: peak amplitude {np.abs(env['noise'] * 1e6).max():.3g} is far "
        "above full scale (1.0); float "
        "samples should lie in [-1, 1] (int16 PCM: divide by 32768), so its tags are unreliable",
    ]


def test_absurd_sample_rates_are_refused_and_good_files_complete(env, capsys):
    root = env["root"]
    inputs = [root / "rate10.wav", root / "good.wav", root / "rate1.wav"]
    argv = ["tag", *inputs, "--checkpoint", env["ckpt"], "--format", "json"]
    code, out, err = run_main(cli.main, argv, capsys)
    assert code == 1
    for rate in (10, 1):
        assert (
            f"error: {root}/rate{rate}.wav: declares a sample rate of {rate} Hz, outside "
            "1000..1000000 Hz"
        ) in err
    assert [r["file"] for r in json.loads(out)] == [str(root / "good.wav")]


# ------------------------------------------------------------------- output names


def test_sed_names_are_unique_and_npz_records_its_source(env, tmp_path, capsys):
    for sub, name in (("a", "good"), ("b", "good"), ("c", "good_2")):
        (tmp_path / sub).mkdir()
        shutil.copy(env["root"] / "good.wav", tmp_path / sub / f"{name}.wav")
    inputs = [tmp_path / "a/good.wav", tmp_path / "b/good.wav", tmp_path / "c/good_2.wav"]
    out = tmp_path / "frames"
    argv = ["sed", *inputs, "--checkpoint", env["ckpt"], "--framewise-dir", out, "--hop", "0.5"]
    code, _, err = run_main(cli.main, [*argv, "--output", tmp_path / "events.csv"], capsys)
    assert code == 0, err
    sources = {}
    for name in sorted(os.listdir(out)):
        with np.load(out / name) as data:
            sources[name] = str(data["source"])
            assert list(data["labels"]) == LABELS
    assert sources == {
        "good.npz": str(inputs[0]),
        "good_2.npz": str(inputs[1]),
        "good_2_2.npz": str(inputs[2]),
    }


def test_embed_output_is_named_as_reported(env, tmp_path, capsys):
    out = tmp_path / "emb.npy"
    code, _, err = run_main(
        cli.main,
        ["embed", env["root"] / "good.wav", "--checkpoint", env["ckpt"], "--output", out],
        capsys,
    )
    assert code == 0 and f"to {out}" in err
    assert os.listdir(tmp_path) == ["emb.npy"] and np.load(out).shape == (1, 32)


# ------------------------------------------------------------- checkpoint metadata


def _edit_metadata(env, tmp_path, edit) -> str:
    path = tmp_path / "edited"
    shutil.copytree(env["ckpt"], path)
    meta_file = path / checkpoints.METADATA_FILE
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps(edit(meta)))
    return str(path)


METADATA_CASES = [
    ("a-list", lambda m: [m], "expected a JSON object, got a list"),
    ("no-model", lambda m: {k: v for k, v in m.items() if k != "model"}, "missing key 'model'"),
    ("unknown-model", lambda m: {**m, "model": "Cnn99"}, "unknown model 'Cnn99'"),
    ("overrides-not-object", lambda m: {**m, "overrides": [1, 2]}, "'overrides' must be an object"),
    (
        "unknown-override",
        lambda m: {**m, "overrides": {**m["overrides"], "colour": "red"}},
        "cannot be built",
    ),
    (
        "shape-changing-override",
        lambda m: {**m, "overrides": {**m["overrides"], "widths": [8, 16, 32, 128]}},
        "the weights do not fit Cnn10 with the overrides in panns_jax.json",
    ),
    ("labels-count", lambda m: {**m, "labels": ["one"]}, "1 labels for a 5-class model"),
    ("step-string", lambda m: {**m, "step": "seven"}, "'step' must be an integer"),
]


@pytest.mark.parametrize("case, edit, message", METADATA_CASES, ids=[c[0] for c in METADATA_CASES])
def test_damaged_metadata_is_one_line(env, tmp_path, capsys, case, edit, message):
    ckpt = _edit_metadata(env, tmp_path, edit)
    before = snapshot(tmp_path)
    code, out, err = run_main(
        cli.main, ["tag", env["root"] / "good.wav", "--checkpoint", ckpt], capsys
    )
    assert code == 2 and out == ""
    line = one_error_line(err)
    assert message in line and ckpt in line
    assert snapshot(tmp_path) == before


def test_narrow_model_round_trips_through_pth_with_overrides(env, tmp_path, capsys):
    pth = tmp_path / "narrow.pth"
    assert convert_cli.main(["to-torch", env["ckpt"], "--out", str(pth)]) == 0
    capsys.readouterr()
    # Without the overrides: one clear diagnosis, no misleading class-count hint.
    code, _, err = run_main(
        convert_cli.main, ["from-torch", pth, "--model", "Cnn10", "--out", tmp_path / "x"], capsys
    )
    assert code == 2 and "every layer of Cnn10 is there with other sizes" in err
    assert "pass num_classes" not in err and not (tmp_path / "x").exists()
    wav = env["root"] / "good.wav"
    code, want, err = run_main(
        cli.main, ["tag", wav, "--checkpoint", env["ckpt"], "--format", "json"], capsys
    )
    assert code == 0, err
    argv = ["tag", wav, "--checkpoint", pth, "--model", "Cnn10", "--overrides", OVERRIDES_JSON]
    code, got, err = run_main(cli.main, [*argv, "--format", "json"], capsys)
    assert code == 0, err
    want, got = json.loads(want), json.loads(got)
    # The .pth has no class names: same indices and probabilities, placeholder labels.
    assert [r["index"] for r in got[0]["labels"]] == [r["index"] for r in want[0]["labels"]]
    np.testing.assert_array_equal(
        [r["probability"] for r in got[0]["labels"]], [r["probability"] for r in want[0]["labels"]]
    )


# -------------------------------------------------------------- panns-jax-convert


def _from_torch(pth, out) -> list:
    return ["from-torch", pth, "--model", "Cnn10", "--overrides", OVERRIDES_JSON, "--out", out]


def test_convert_overwrite_refuses_a_directory_that_is_not_a_checkpoint(env, tmp_path, capsys):
    pth = tmp_path / "model.pth"
    assert convert_cli.main(["to-torch", env["ckpt"], "--out", str(pth)]) == 0
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    capsys.readouterr()
    before = snapshot(tmp_path)
    code, _, err = run_main(convert_cli.main, [*_from_torch(pth, precious), "--overwrite"], capsys)
    assert code == 2
    assert "exists and is not a panns_jax checkpoint" in one_error_line(err)
    assert snapshot(tmp_path) == before
    # Replacing one of our checkpoints is what --overwrite is for.
    target = tmp_path / "ours"
    shutil.copytree(env["ckpt"], target)
    code, _, err = run_main(convert_cli.main, [*_from_torch(pth, target), "--overwrite"], capsys)
    assert code == 0, err
    assert checkpoints.load(str(target)).overrides == OVERRIDES
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []  # No staging left.


def test_created_files_keep_the_umask(env, tmp_path, capsys):
    umask = os.umask(0o022)
    try:
        pth = tmp_path / "model.pth"
        pth.write_bytes(b"replaced")
        os.chmod(pth, 0o644)
        assert convert_cli.main(["to-torch", env["ckpt"], "--out", str(pth)]) == 0
        argv = [str(a) for a in _from_torch(pth, tmp_path / "ck")]
        assert convert_cli.main(argv) == 0
    finally:
        os.umask(umask)
    assert oct(os.stat(pth).st_mode & 0o777) == oct(0o644)  # mkstemp made it 0o600.
    assert oct(os.stat(tmp_path / "ck").st_mode & 0o777) == oct(0o755)  # mkdtemp: 0o700.


def test_full_disk_is_one_line_and_leaves_nothing(env, tmp_path):
    """A file-size limit makes every write past 64 KB fail as a full disk would; the one
    line names the output, and orbax's background threads print nothing more."""
    pth = tmp_path / "model.pth"
    assert convert_cli.main(["to-torch", env["ckpt"], "--out", str(pth)]) == 0
    out = tmp_path / "out"

    script = textwrap.dedent(f"""
        import resource, runpy, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # Writes fail with EFBIG instead.
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))
        sys.argv = ["panns-jax-convert", "from-torch", {str(pth)!r}, "--model", "Cnn10",
                    "--overrides", {OVERRIDES_JSON!r}, "--out", {str(out)!r}]
        runpy.run_module("{convert_cli.__name__}", run_name="__main__")
    """)
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=S.ROOT,
        timeout=300,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), done.stderr
    assert lines[0] == (
        f"error: cannot write {out}: File too large ({tmp_path}); nothing was written"
    )
    assert sorted(os.listdir(tmp_path)) == ["model.pth"]


def test_a_failed_save_filters_only_orbax_reports_of_abandoned_writes(caplog):
    """After a failed save, orbax's write tasks that nobody retrieved may be reported when
    collected, as late as the interpreter's exit: those reports are dropped, nothing else."""
    import logging

    def fail():
        raise OSError(27, "File too large")

    asyncio_logger = logging.getLogger("asyncio")
    before = list(asyncio_logger.filters)
    try:
        with pytest.raises(OSError):
            convert_cli._quiet_orbax(fail)
        assert asyncio_logger.level == logging.NOTSET  # The level is restored.
        with caplog.at_level(logging.ERROR, logger="asyncio"):
            abandoned = "future: <Task coro=<NumpyHandler._open_and_write() at orbax/...>>"
            asyncio_logger.error("Task exception was never retrieved\n%s", abandoned)
            asyncio_logger.error("Task exception was never retrieved\nfuture: <Task mine>")
        assert [r.getMessage().splitlines()[-1] for r in caplog.records] == ["future: <Task mine>"]
    finally:
        asyncio_logger.filters[:] = before


def test_an_unusable_conv_backend_is_the_parsers_one_line(monkeypatch, capsys):
    """The benchmarks resolve --conv-backend through cli.infer.resolved_conv_backend."""
    import argparse

    from panns_jax.cli import infer

    parser = argparse.ArgumentParser(prog="bench")
    assert infer.resolved_conv_backend(parser, "auto") == "xla"  # As this suite sets it.
    monkeypatch.setenv("PANNS_JAX_CONV_BACKEND", "mkl")
    with pytest.raises(SystemExit) as stop:
        infer.resolved_conv_backend(parser, "auto")
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (
        "bench: error: $PANNS_JAX_CONV_BACKEND='mkl': set it to xla or onednn, or unset it"
    )
