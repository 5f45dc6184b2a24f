"""Hostile and mistaken inputs through the real command lines (issue 16).

Every case runs an entry point (``cli.main``, ``convert_cli.main``, the stream and
export parsers, or a subprocess) and asserts the exit status, the one clear line on
stderr, and that nothing on disk changed but what the command was asked to write.
A tiny Cnn10 (widths 8..64, 5 named classes) keeps every compile short.

Covered here: items 2, 3, 4, 5, 7 and 8 (inference, convert, export, stream, HEAR) and 9.
The .pth reader's cases are in tests/test_pth.py; training's (items 1 and 6, and 7-8's
configs, work directories, dataset rows and folds) in tests/test_errors_train.py,
tests/test_resume.py and tests/test_transfer.py.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import pathlib
import shutil
import struct
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
import soundfile as sf

from panns_jax import audio, checkpoints, cli, convert_cli, hear, models, streaming
from panns_jax.tagger import AudioTagger, load_tagger

SR = 32000
OVERRIDES = {"widths": (8, 16, 32, 64), "embedding_size": 32, "num_classes": 5}
OVERRIDES_JSON = json.dumps({"widths": [8, 16, 32, 64], "embedding_size": 32})
LABELS = ["dog", "cat", "rain", "siren", "speech"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A checkpoint, a .pth of it, and a few audio files, in one directory."""
    root = tmp_path_factory.mktemp("errors")
    model = models.get("Cnn10", **OVERRIDES)
    variables = jax.device_get(models.init(model, jax.random.key(0), SR))
    ckpt = str(root / "ckpt")
    checkpoints.save(
        ckpt, checkpoints.ModelCheckpoint("Cnn10", variables, OVERRIDES, 7, labels=LABELS)
    )
    rng = np.random.default_rng(0)
    noise = (0.1 * rng.standard_normal(SR)).astype(np.float32)
    sf.write(root / "good.wav", noise, SR, subtype="FLOAT")
    sf.write(root / "silence.wav", np.zeros(SR, np.float32), SR)
    sf.write(root / "loud.wav", noise * 1e6, SR, subtype="FLOAT")
    sf.write(root / "short.wav", noise[: SR // 2], SR)
    pcm = (root / "short.wav").read_bytes()
    full = root / "full16.wav"
    sf.write(full, np.tile(noise, 2), SR, subtype="PCM_16")
    data = full.read_bytes()
    (root / "truncated.wav").write_bytes(data[: 44 + SR // 2 * 2])  # Header says 2 s; 0.5 s.
    for rate in (10, 1):  # 40 KB files declaring absurd rates (issue 16, item 4).
        header = bytearray(pcm[:44])
        header[24:28], header[28:32] = struct.pack("<I", rate), struct.pack("<I", 2 * rate)
        header[40:44], header[4:8] = struct.pack("<I", 40000), struct.pack("<I", 36 + 40000)
        (root / f"rate{rate}.wav").write_bytes(bytes(header) + rng.bytes(40000))
    return {"root": root, "ckpt": ckpt, "variables": variables, "noise": noise}


def snapshot(root) -> dict:
    """path -> (mode, sha256) of every file and directory under ``root``."""
    state = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            digest = ""
            if os.path.isfile(path):
                with open(path, "rb") as f:
                    digest = hashlib.sha256(f.read()).hexdigest()
            state[os.path.relpath(path, root)] = (os.stat(path).st_mode, digest)
    return state


def one_error_line(err: str) -> str:
    """The single ``error:`` line of stderr (asserts there is exactly one, no traceback)."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def run_main(main, argv, capsys):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# -------------------------------------------------------- table: refused before any work

# (id, argv with {root}/{ckpt} placeholders, message). All exit 2, change nothing on
# disk, and build no model (load_tagger is patched to fail).
REFUSED = [
    # Item 2: silent wrong answers.
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
    # Item 3: hops clamped to one sample.
    ("hop-tiny", ["tag", "{root}/good.wav", "--hop", "0.00001"], "--hop 1e-05 s is below 0.01 s"),
    ("hop-negative", ["sed", "{root}/good.wav", "--hop", "-1"], "--hop must be a positive"),
    # Item 5: outputs onto inputs.
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
    # Item 7: outputs that cannot be written, checked before computing.
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
    (
        "window-nan",
        ["tag", "{root}/good.wav", "--window", "nan"],
        "--window must be a positive, finite number of seconds, got nan",
    ),
    ("window-inf", ["embed", "{root}/good.wav", "--window", "inf"], "got inf"),
    # Item 8: unvalidated values.
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
    # Item 9: embed --output x.txt wrote x.txt.npz and reported x.txt.
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
        raise AssertionError("a model was built before the arguments were validated")

    monkeypatch.setattr(cli, "load_tagger", no_model)
    fill = lambda s: s.format(root=root, ckpt=env["ckpt"])  # noqa: E731
    before = snapshot(root)
    code, out, err = run_main(
        cli.main, [fill(a) for a in argv] + ["--checkpoint", env["ckpt"]], capsys
    )
    assert code == 2, err
    assert fill(message) in one_error_line(err)
    assert snapshot(root) == before


def test_read_only_output_directory(env, tmp_path, capsys):
    # A directory no file can be created in: mode 0o555, or (root ignores modes) sysfs.
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    if os.geteuid() == 0:
        locked = pathlib.Path("/sys")
    try:
        code, _, err = run_main(
            cli.main,
            [
                "tag",
                env["root"] / "good.wav",
                "--output",
                locked / "t.json",
                "--checkpoint",
                env["ckpt"],
            ],
            capsys,
        )
    finally:
        (tmp_path / "locked").chmod(0o755)
    assert code == 2 and f"cannot write in {locked}" in one_error_line(err)


# ------------------------------------------------------------ item 2: wrong answers


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
    variables = jax.tree_util.tree_map(np.array, env["variables"])
    variables["params"]["fc_audioset"]["bias"][2] = np.nan  # Digest of NaN weights: valid.
    ckpt = checkpoints.save(
        str(tmp_path / "nan"),
        checkpoints.ModelCheckpoint("Cnn10", variables, OVERRIDES, 0, labels=LABELS),
    )
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
    code, out, err = run_main(streaming.main_stream, [wav, "--checkpoint", ckpt], capsys)
    assert code == 1 and f"{wav}: the model produced non-finite" in one_error_line(err)
    # HEAR: a NaN in the embedding layer (fc1) is an error, not NaN embeddings.
    variables["params"]["fc1"]["bias"][0] = np.nan
    tagger = AudioTagger("Cnn10", variables, overrides=OVERRIDES)
    with pytest.raises(ValueError, match="non-finite embeddings"):
        hear.PannsHearModel(tagger, timestamp_window_s=0.5, input_sample_rate=SR)


def test_int16_is_scaled_and_complex_refused(env):
    tagger = load_tagger(env["ckpt"], None)
    pcm = (env["noise"] * 32767).astype(np.int16)
    as_float = pcm.astype(np.float32) / 32768
    np.testing.assert_array_equal(tagger.embed(pcm), tagger.embed(as_float))
    # Negative control: unscaled int16 (what the tagger did) gives another answer, and a
    # warning now says why.
    with pytest.warns(audio.AudioWarning, match="far above full scale"):
        unscaled = tagger.embed(pcm.astype(np.float32))
    assert not np.allclose(unscaled, tagger.embed(as_float))
    with pytest.raises(audio.AudioError, match="complex samples"):
        tagger.tag(env["noise"] + 1j * env["noise"])
    with pytest.raises(ValueError, match="batch size must be an integer"):
        AudioTagger("Cnn10", overrides=OVERRIDES, batch_size=-1)
    # Item 3: API hops are rejected, not clamped to one sample.
    with pytest.raises(ValueError, match="hop must be a positive"):
        tagger.tag(env["noise"], hop_s=-1)
    with pytest.raises(ValueError, match="top-k must be a positive"):
        tagger.tag(env["noise"], top_k=0)


def test_warnings_for_truncated_silent_and_loud_files(env, capsys):
    root = env["root"]
    files = ["truncated.wav", "silence.wav", "loud.wav", "good.wav"]
    code, out, err = run_main(
        cli.main,
        [
            "tag",
            *[root / f for f in files],
            "--checkpoint",
            env["ckpt"],
            "--format",
            "json",
            "--no-progress",
        ],
        capsys,
    )
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


# ---------------------------------------------------------- item 4: hostile sample rates


def test_absurd_sample_rates_are_refused_and_good_files_complete(env, capsys):
    root = env["root"]
    code, out, err = run_main(
        cli.main,
        [
            "tag",
            root / "rate10.wav",
            root / "good.wav",
            root / "rate1.wav",
            "--checkpoint",
            env["ckpt"],
            "--format",
            "json",
        ],
        capsys,
    )
    assert code == 1
    for rate in (10, 1):
        assert (
            f"error: {root}/rate{rate}.wav: declares a sample rate of {rate} Hz, outside "
            "1000..1000000 Hz"
        ) in err
    assert [r["file"] for r in json.loads(out)] == [str(root / "good.wav")]


def test_rate1_file_in_a_memory_capped_process(env):
    """The 40 KB 1 Hz file once needed > 13 GB: now a clear error under a 1.5 GB cap."""
    script = textwrap.dedent(f"""
        import resource, sys
        resource.setrlimit(resource.RLIMIT_AS, (1500 << 20, 1500 << 20))
        from panns_jax import audio
        try:
            list(audio.iter_chunks({str(env["root"] / "rate1.wav")!r}, 32000, 320000, 320000))
        except audio.AudioError as err:
            print(err)
            sys.exit(3)
    """)
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert done.returncode == 3, done.stderr
    assert "declares a sample rate of 1 Hz" in done.stdout


def test_decoded_blocks_are_bounded_in_output_samples(tmp_path):
    """A low (allowed) rate is read in proportionally fewer frames: blocks never grow by
    the resampling ratio (32x here). Counted in input frames, the first block would hold
    the whole 640000-sample file."""
    path = tmp_path / "low.wav"
    sf.write(path, np.random.default_rng(1).uniform(-0.5, 0.5, 20000).astype(np.float32), 1000)
    block = 1 << 16
    blocks = list(audio.decoded_blocks(str(path), SR, block_frames=block))
    sizes = [len(b) for b in blocks]
    # soxr HQ holds back < 1024 input samples (< 32768 output samples here) of latency.
    assert sum(sizes) == 20000 * 32 and max(sizes) <= block + 32768, sizes
    whole = audio.resample(sf.read(path, dtype="float32")[0], 1000, SR)
    np.testing.assert_array_equal(np.concatenate(blocks), whole)


# --------------------------------------------------------------- item 5: destruction


def test_convert_overwrite_refuses_a_directory_that_is_not_a_checkpoint(env, tmp_path, capsys):
    pth = tmp_path / "model.pth"
    assert convert_cli.main(["to-torch", env["ckpt"], "--out", str(pth)]) == 0
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    capsys.readouterr()
    before = snapshot(tmp_path)
    code, _, err = run_main(
        convert_cli.main,
        [
            "from-torch",
            pth,
            "--model",
            "Cnn10",
            "--overrides",
            OVERRIDES_JSON,
            "--out",
            precious,
            "--overwrite",
        ],
        capsys,
    )
    assert code == 2
    assert "exists and is not a panns_jax checkpoint" in one_error_line(err)
    assert snapshot(tmp_path) == before
    # Replacing one of our checkpoints is what --overwrite is for.
    target = tmp_path / "ours"
    shutil.copytree(env["ckpt"], target)
    code, _, err = run_main(
        convert_cli.main,
        [
            "from-torch",
            pth,
            "--model",
            "Cnn10",
            "--overrides",
            OVERRIDES_JSON,
            "--out",
            target,
            "--overwrite",
        ],
        capsys,
    )
    assert code == 0, err
    assert checkpoints.load(str(target)).overrides == OVERRIDES
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []  # No staging left.


def test_created_files_keep_the_umask(env, tmp_path, capsys):
    old = os.umask(0o022)
    try:
        pth = tmp_path / "model.pth"
        pth.write_bytes(b"old")
        os.chmod(pth, 0o644)
        assert convert_cli.main(["to-torch", env["ckpt"], "--out", str(pth)]) == 0
        assert (
            convert_cli.main(
                [
                    "from-torch",
                    str(pth),
                    "--model",
                    "Cnn10",
                    "--overrides",
                    OVERRIDES_JSON,
                    "--out",
                    str(tmp_path / "ck"),
                ]
            )
            == 0
        )
    finally:
        os.umask(old)
    assert oct(os.stat(pth).st_mode & 0o777) == oct(0o644)  # mkstemp made it 0o600.
    assert oct(os.stat(tmp_path / "ck").st_mode & 0o777) == oct(0o755)  # mkdtemp: 0o700.


def test_sed_names_are_unique_and_npz_records_its_source(env, tmp_path, capsys):
    for sub, name in (("a", "good"), ("b", "good"), ("c", "good_2")):
        (tmp_path / sub).mkdir()
        shutil.copy(env["root"] / "good.wav", tmp_path / sub / f"{name}.wav")
    inputs = [tmp_path / "a/good.wav", tmp_path / "b/good.wav", tmp_path / "c/good_2.wav"]
    out = tmp_path / "frames"
    code, _, err = run_main(
        cli.main,
        [
            "sed",
            *inputs,
            "--checkpoint",
            env["ckpt"],
            "--framewise-dir",
            out,
            "--hop",
            "0.5",
            "--output",
            tmp_path / "events.csv",
        ],
        capsys,
    )
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


# -------------------------------------------------------------- item 7: checkpoints


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


def test_full_disk_is_one_line_and_leaves_nothing(env, tmp_path):
    """A file-size limit makes every write past 64 KB fail as a full disk would; orbax's
    background threads once printed hundreds of lines before the real message."""
    pth = tmp_path / "model.pth"
    assert convert_cli.main(["to-torch", env["ckpt"], "--out", str(pth)]) == 0
    out = tmp_path / "out"

    script = textwrap.dedent(f"""
        import resource, runpy, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # Writes fail with EFBIG instead.
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))
        sys.argv = ["panns-jax-convert", "from-torch", {str(pth)!r}, "--model", "Cnn10",
                    "--overrides", {OVERRIDES_JSON!r}, "--out", {str(out)!r}]
        runpy.run_module("panns_jax.convert_cli", run_name="__main__")
    """)
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=ROOT,
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


# ---------------------------------------------------------------- item 8: values


def test_export_seconds_and_stream_window_are_validated(env, capsys):
    before = snapshot(env["root"])
    for argv, message in [
        (
            [
                "export",
                "--format",
                "onnx",
                "--seconds",
                "0",
                "--checkpoint",
                env["ckpt"],
                "--out",
                env["root"] / "m.onnx",
            ],
            "seconds must be a positive, finite clip length",
        ),
        (
            [
                "export",
                "--format",
                "savedmodel",
                "--checkpoint",
                env["ckpt"],
                "--out",
                env["root"],
                "--overwrite",
            ],
            "is not a SavedModel directory; refusing to replace",
        ),
        (
            ["stream", env["root"] / "good.wav", "--checkpoint", env["ckpt"], "--window", "0"],
            "--window must be a positive, finite number of seconds, got 0",
        ),
        (
            ["stream", env["root"] / "good.wav", "--checkpoint", env["ckpt"], "--hop", "nan"],
            "--hop must be a positive, finite number of seconds, got nan",
        ),
    ]:
        code, _, err = run_main(cli.main, argv, capsys)
        assert code == 2 and message in one_error_line(err), err
    assert snapshot(env["root"]) == before


def test_hear_rejects_bad_rates_hops_and_empty_sounds(env):
    tagger = load_tagger(env["ckpt"], None)
    for kwargs, message in [
        (dict(input_sample_rate=7), "input_sample_rate must be"),
        (dict(timestamp_hop_s=0), "timestamp_hop_s must be a positive"),
        (dict(timestamp_hop_s=-1), "timestamp_hop_s must be a positive"),
        (dict(timestamp_window_s=float("nan")), "timestamp_window_s"),
    ]:
        with pytest.raises(ValueError, match=message):
            hear.PannsHearModel(tagger, **kwargs)
    model = hear.PannsHearModel(tagger, timestamp_window_s=0.5, input_sample_rate=SR)
    with pytest.raises(ValueError, match="0 samples per sound"):
        hear.get_scene_embeddings(np.zeros((2, 0), np.float32), model)
    with pytest.raises(ValueError, match="must be float"):
        hear.get_scene_embeddings(np.zeros((1, SR), np.int16), model)


# ---------------------------------------------------------- item 9: usability gaps


def test_stream_prints_checkpoint_labels_and_refuses_short_files(env, capsys):
    code, out, err = run_main(
        streaming.main_stream,
        [
            env["root"] / "good.wav",
            "--checkpoint",
            env["ckpt"],
            "--frames",
            "--hop",
            "0.5",
            "--window",
            "0.5",
            "--on-threshold",
            "0",
            "--off-threshold",
            "0",
        ],
        capsys,
    )
    assert code == 0, err
    frames = [line for line in out.splitlines() if " frame " in line]
    assert len(frames) == 2 and all(
        any(f" {label} (" in line for label in LABELS) for line in frames
    )
    code, out, err = run_main(
        streaming.main_stream, [env["root"] / "short.wav", "--checkpoint", env["ckpt"]], capsys
    )
    assert code == 1 and out == ""
    assert (
        "short.wav: 0.500 s of audio is shorter than the 1 s window, so nothing was tagged; "
        "pass e.g. --window 0.5 --hop 0.25"
    ) in one_error_line(err)


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
    code, got, err = run_main(
        cli.main,
        [
            "tag",
            wav,
            "--checkpoint",
            pth,
            "--model",
            "Cnn10",
            "--overrides",
            OVERRIDES_JSON,
            "--format",
            "json",
        ],
        capsys,
    )
    assert code == 0, err
    want, got = json.loads(want), json.loads(got)
    # The .pth has no class names: same indices and probabilities, placeholder labels.
    assert [r["index"] for r in got[0]["labels"]] == [r["index"] for r in want[0]["labels"]]
    np.testing.assert_array_equal(
        [r["probability"] for r in got[0]["labels"]], [r["probability"] for r in want[0]["labels"]]
    )


def test_embed_output_is_named_as_reported(env, tmp_path, capsys):
    out = tmp_path / "emb.npy"
    code, _, err = run_main(
        cli.main,
        ["embed", env["root"] / "good.wav", "--checkpoint", env["ckpt"], "--output", out],
        capsys,
    )
    assert code == 0 and f"to {out}" in err
    assert os.listdir(tmp_path) == ["emb.npy"] and np.load(out).shape == (1, 32)
