"""``panns-jax finetune DATA`` and ``configs/custom.py``: own audio to a checkpoint whose labels
are the data's classes, through the training loop ``panns_jax.main`` runs; every kind of bad
data one ``error:`` line, exit status 2, nothing written."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from custom_data_utils import CLASSES, class_folders, manifest, sound, tree, write_audio

from panns_jax import checkpoints, cli, loader, recipe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SR = 32000
TINY = {"widths": (8, 16, 32, 64), "embedding_size": 32}
QUICK = ["--steps", "3", "--batch-size", "4", "--clip-seconds", "1"]


def test_finetune_a_folder_per_class_then_tag_prints_the_folder_names(
    tiny_pretrained, tmp_path, capsys
):
    data, runs = str(tmp_path / "DATA"), tmp_path / "runs"
    written = class_folders(data)
    workdir = str(runs / "birds")
    args = ["finetune", data, "--model", tiny_pretrained, "--strategy", "freeze_l1", *QUICK]
    assert cli.main([*args, "--workdir", workdir]) == 0
    out = capsys.readouterr().out
    assert "accuracy" in out and "on 3 valid recordings" in out
    for name in CLASSES:  # The per-class table.
        assert any(line.split()[:1] == [name] for line in out.splitlines()), out
    results = json.loads((runs / "birds" / "finetune_results.json").read_text())
    assert list(results["per_class"]) == list(CLASSES) and results["task"] == "singlelabel"
    assert 0 <= results["accuracy"] <= 1 and results["num_examples"] == 3
    matrix = np.array(results["confusion_matrix"])  # True classes x predicted ones.
    assert matrix.shape == (3, 3) and matrix.sum() == 3
    assert np.trace(matrix) / 3 == pytest.approx(results["accuracy"])
    for picture in ("confusion_matrix.png", "per_class_ap.png"):
        assert (runs / "birds" / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    for kind in ("model", "best"):
        saved = checkpoints.load(os.path.join(workdir, kind))
        assert saved.labels == list(CLASSES) and saved.overrides["num_classes"] == 3
    assert loader.load(os.path.join(workdir, "model")).metadata.task == "singlelabel"
    tags = tmp_path / "tags.json"
    wav = os.path.join(data, written["noise"][0])
    tag = ["tag", wav, "--checkpoint", os.path.join(workdir, "model"), "--format", "json"]
    assert cli.main([*tag, "--top-k", "3", "--output", str(tags), "--no-progress"]) == 0
    (record,) = json.loads(tags.read_text())
    assert sorted(entry["label"] for entry in record["labels"]) == sorted(CLASSES)

    # The records were built once, beside the workdir; a second run on the same files reuses
    # them (the finished run only evaluates again).
    (build,) = os.listdir(runs / "panns_jax_data" / "custom_audio")
    info = runs / "panns_jax_data" / "custom_audio" / build / "1.0.0" / "dataset_info.json"
    stamp = info.stat().st_mtime_ns
    assert cli.main([*args, "--workdir", workdir]) == 0
    assert os.listdir(runs / "panns_jax_data" / "custom_audio") == [build]
    assert info.stat().st_mtime_ns == stamp

    # Changed data does not resume the finished run (which would train nothing new): the
    # workdir is refused, in one line, before anything is built.
    write_audio(wav, sound("noise", np.random.default_rng(8), 1.2, SR), SR)
    before = tree(str(tmp_path))
    capsys.readouterr()
    assert cli.main([*args, "--workdir", workdir]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "holds a fine-tuning run on other data" in line and tree(str(tmp_path)) == before
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("a folder of something else")
    assert cli.main([*args, "--workdir", str(tmp_path / "notes")]) == 2  # Not empty, no run.
    assert "is not empty and holds no fine-tuning run" in capsys.readouterr().err


def test_configs_custom_trains_a_multilabel_manifest_through_main(tiny_pretrained, tmp_path):
    """``python -m panns_jax.main --config=configs/custom.py:data=MANIFEST,...``: a manifest
    with several labels per file and a split column; mAP at the end."""
    rng = np.random.default_rng(4)
    rows = []
    for i, split in enumerate(["train"] * 9 + ["valid"] * 3):
        kinds = [CLASSES[i % 3]] + ([CLASSES[(i + 1) % 3]] if i % 2 else [])
        x = sum(sound(k, rng, 1.0, 16000) for k in kinds)
        write_audio(str(tmp_path / "DATA" / f"{i}.flac"), x, 16000)
        rows.append((f"{i}.flac", ";".join(kinds), split))
    path = manifest(str(tmp_path / "DATA" / "labels.csv"), rows, ("file", "label", "split"))
    workdir = tmp_path / "run"
    arg = f"data={path},strategy=finetune,model={tiny_pretrained},steps=2,clip_seconds=1"
    flags = ["--config.batch_size=4", "--config.num_devices=1", "--config.log_every=1"]
    flags += [f"--config.data_dir={tmp_path / 'records'}", f"--workdir={workdir}"]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    done = subprocess.run(
        [sys.executable, "-m", "panns_jax.main", f"--config=configs/custom.py:{arg}", *flags],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "final eval mAP" in done.stdout
    saved = checkpoints.load(str(workdir / "model"))
    assert saved.labels == list(CLASSES)
    assert loader.load(str(workdir / "model")).metadata.task == "multilabel"


def _corrupt(path) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(b"RIFF\x10\x00\x00\x00WAVEjunk" + bytes(range(64)))


def _bad_empty(data):
    os.makedirs(data)


def _bad_class_unreadable(data):
    class_folders(data, per_class=3)
    for i in range(3):
        _corrupt(os.path.join(data, "broken", f"{i}.wav"))


def _bad_class_without_audio(data):
    class_folders(data, per_class=3)
    os.makedirs(os.path.join(data, "notes"))
    with open(os.path.join(data, "notes", "todo.txt"), "w") as f:
        f.write("record more")


def _manifest_of(data, values, header, extra=()):
    """Four files a class in ``data`` and a manifest of them with ``values`` in the third
    column (None: two columns only), plus ``extra`` rows."""
    written = class_folders(data, per_class=4)
    rows = [
        (path, kind, value)[: len(header)]
        for (kind, path), value in zip([(k, p) for k in CLASSES for p in written[k]], values)
    ]
    return manifest(os.path.join(data, "labels.csv"), rows + list(extra), header)


def _bad_unseen_label(data):
    path = _manifest_of(data, ["train"] * 12, ("file", "label", "split"))
    rows = open(path).read().splitlines()
    rows[4] = rows[4].replace("high_tone,train", "owl,test")  # A label no train row has.
    rows[8] = rows[8].replace(",train", ",valid")
    with open(path, "w") as f:
        f.write("\n".join(rows) + "\n")
    return path


def _bad_outside(data):
    extra = [("../../etc/passwd", "noise"), ("/etc/passwd", "noise")]
    return _manifest_of(data, [None] * 12, ("file", "label"), extra)


def _bad_missing(data):
    return _manifest_of(data, [None] * 12, ("file", "label"), [("noise/gone.wav", "noise")])


def _bad_fold_values(data):
    return _manifest_of(data, ["1", "2", "x", "0"] * 3, ("file", "label", "fold"))


def _bad_split_values(data):
    return _manifest_of(data, ["train", "dev", "valid"] * 4, ("file", "label", "split"))


def _bad_one_class(data):
    class_folders(data, per_class=3)
    import shutil

    for name in CLASSES[1:]:
        shutil.rmtree(os.path.join(data, name))


BAD_DATA = {
    "empty_folder": (_bad_empty, "holds no class folders"),
    "class_with_no_readable_file": (_bad_class_unreadable, "class 'broken' has no readable file"),
    "class_folder_without_audio": (_bad_class_without_audio, "class 'notes' .* holds no audio"),
    "label_unseen_in_train": (_bad_unseen_label, "label 'owl' of test file .* is in no train row"),
    "rows_outside_data": (_bad_outside, r"2 of 14 recordings unusable .*outside DATA"),
    "missing_file": (_bad_missing, r"1 of 13 recordings unusable .*missing"),
    "unknown_fold_values": (_bad_fold_values, r"fold column holds \['0', 'x'\]"),
    "unknown_split_values": (_bad_split_values, r"split column holds \['dev'\]"),
    "one_class_only": (_bad_one_class, "holds one class only \\('high_tone'\\)"),
    "no_such_data": (lambda data: None, "no such folder or manifest file"),
}


@pytest.mark.parametrize("case", sorted(BAD_DATA))
def test_bad_data_is_one_line_exit_2_and_nothing_written(case, tiny_pretrained, tmp_path, capsys):
    import re

    make, message = BAD_DATA[case]
    data = str(tmp_path / "DATA")
    given = make(data) or data
    before = tree(str(tmp_path))
    workdir = str(tmp_path / "runs" / "x")
    code = cli.main(["finetune", given, "--model", tiny_pretrained, *QUICK, "--workdir", workdir])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert re.search(message, lines[0]), lines[0]
    assert tree(str(tmp_path)) == before  # No workdir, no records, nothing else.


def _demo_pretrained(workdir: str) -> str:
    """A tiny Cnn10 trained 100 steps on panns_demo-style tagging clips (1 s, in memory)."""
    from configs import demo
    from panns_jax import train
    from panns_jax.data import ArraySource, panns_demo

    clips = [panns_demo.synthesize_clip(0, 0, i, SR, SR) for i in range(160)]
    source = ArraySource(
        np.stack([c["audio"] for c in clips]),
        [c["labels"] for c in clips],
        num_classes=len(panns_demo.CLASS_NAMES),
    )
    c = demo.get_config()
    c.model_overrides.widths, c.model_overrides.embedding_size = TINY["widths"], 32
    c.clip_seconds, c.batch_size, c.eval_batch_size, c.learning_rate = 1.0, 8, 32, 3e-3
    c.num_train_steps, c.eval_every, c.checkpoint_every, c.log_every = 100, 0, 100, 20
    c.num_devices = 1
    train.train_and_evaluate(c, workdir, sources={"train": source, "eval": source})
    return os.path.join(workdir, "model")


@pytest.mark.slow
def test_finetune_from_a_demo_pretrained_checkpoint_learns_a_synthetic_folder(tmp_path, capsys):
    checkpoint = _demo_pretrained(str(tmp_path / "pretrain"))
    data = str(tmp_path / "DATA")
    class_folders(data, per_class=16, seed=7)
    workdir = str(tmp_path / "runs" / "tones")
    args = ["finetune", data, "--model", checkpoint, "--strategy", "finetune", "--holdout", "0.25"]
    args += [
        "--steps",
        "80",
        "--batch-size",
        "8",
        "--clip-seconds",
        "1",
        "--learning-rate",
        "0.001",
    ]
    assert cli.main([*args, "--workdir", workdir]) == 0
    results = json.loads(open(os.path.join(workdir, "finetune_results.json")).read())
    out = capsys.readouterr().out
    assert results["num_examples"] == 12  # 4 of each class's 16 held out.
    assert results["accuracy"] >= 0.9, out  # Chance: 1/3.

    # The linear probe of the same pretrained embeddings separates the classes too.
    probe = ["probe", data, "--model", checkpoint, "--holdout", "0.25", "--json"]
    assert cli.main([*probe, "--cache-dir", str(tmp_path / "cache"), "--no-progress"]) == 0
    probed = json.loads(capsys.readouterr().out)
    (row,) = probed["rows"]
    assert row["num_eval"] == 12 and row["logistic"]["accuracy"] >= 0.9, probed


BAD_SETUP = {
    # The zoo is offline in the tests, its cache empty: the download is refused in one line.
    "zoo_model_not_cached": (["--model", "Cnn14"], r"--model Cnn14: .*PANNS_JAX_OFFLINE"),
    "no_such_model": (["--model", "nowhere/ckpt"], "--model nowhere/ckpt: no such checkpoint"),
    "fold_without_fold_column": (["--fold", "2"], "has no fold column"),
    "bad_batch_size": (["--batch-size", "0"], "config.batch_size must be an integer >= 1"),
    "clip_too_short": (["--clip-seconds", "0.1"], r"clips of 0\.1 s are too short for Cnn10"),
    "scratch_overrides_unfit": (
        ["--strategy", "scratch", "--model", "Cnn10", "--overrides", '{"wings": 2}'],
        "--overrides do not fit Cnn10",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_SETUP))
def test_bad_setup_is_one_line_exit_2_and_nothing_written(case, tiny_pretrained, tmp_path, capsys):
    import re

    flags, message = BAD_SETUP[case]
    data = str(tmp_path / "DATA")
    class_folders(data, per_class=3)
    before = tree(str(tmp_path))
    args = ["finetune", data, "--model", tiny_pretrained, "--steps", "2", *flags]
    assert cli.main([*args, "--workdir", str(tmp_path / "runs" / "x")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and re.search(message, lines[0]), lines
    assert tree(str(tmp_path)) == before


def test_a_split_manifest_reports_valid_and_the_best_checkpoint_on_test(
    tiny_pretrained, tmp_path, capsys, monkeypatch
):
    from panns_jax import audio, finetune, models, tasks
    from panns_jax.data import audio_io

    backends = []  # The test split is scored with the config's conv backend.
    jit_inference = models.jit_inference

    def recording(model, fn, backend, **options):
        backends.append(backend)
        return jit_inference(model, fn, backend, **options)

    monkeypatch.setattr(finetune.models, "jit_inference", recording)

    rng = np.random.default_rng(11)
    rows = []
    for i, split in enumerate(["train"] * 9 + ["valid"] * 3 + ["test"] * 6):
        kind = CLASSES[i % 3]
        write_audio(str(tmp_path / "DATA" / f"{i}.wav"), sound(kind, rng, 1.5, SR), SR)
        rows.append((f"{i}.wav", kind, split))
    path = manifest(str(tmp_path / "DATA" / "labels.tsv"), rows, ("file", "label", "split"), True)
    workdir = str(tmp_path / "runs" / "split")
    args = ["finetune", path, "--model", tiny_pretrained, "--strategy", "finetune", *QUICK]
    assert cli.main([*args, "--workdir", workdir]) == 0
    out = capsys.readouterr().out
    assert "on 3 valid recordings" in out and "on 6 test recordings (best)" in out
    assert backends == ["auto"]
    summary = json.loads(open(os.path.join(workdir, "finetune_results.json")).read())
    test = summary["test"]
    assert test["num_examples"] == 6 and list(test["per_class"]) == list(CLASSES)

    assert (tmp_path / "runs" / "split" / "confusion_matrix_test.png").is_file()
    assert np.sum(test["confusion_matrix"]) == 6

    # The same numbers from the test files themselves, through the loader, one by one: each
    # 1.5 s recording scored by the mean of its two 1 s segments (0-1 s and 0.5-1.5 s).
    module, variables, _ = loader.load(os.path.join(workdir, "best"))
    task = tasks.get("singlelabel")
    scores, targets = [], []
    for name, kind, split in rows:
        if split == "test":
            samples = audio_io.float_to_int16(audio.load_audio(str(tmp_path / "DATA" / name), SR))
            x = samples.astype(np.float32) / 32768
            segments = np.stack([x[:SR], x[len(x) - SR :]])
            scores.append(np.asarray(task.scores(module.apply(variables, segments))).mean(0))
            targets.append(np.eye(3)[CLASSES.index(kind)])
    want = task.evaluate(np.stack(scores), np.stack(targets))
    assert test["accuracy"] == pytest.approx(want["accuracy"])
    assert test["mAP"] == pytest.approx(want["mAP"], abs=1e-6)


def test_model_is_a_zoo_name_downloaded_once_and_transferred(zoo_env, tmp_path, capsys):
    """``--model Cnn6`` from a local mirror of the zoo (the tests' server): downloaded,
    verified, then its .pth is the base; the checkpoint is a 3-class Cnn6 named by folders."""
    pytest.importorskip("torch", reason="the zoo's test mirror writes .pth files with torch")
    data = str(tmp_path / "DATA")
    class_folders(data, per_class=3)
    workdir = str(tmp_path / "runs" / "zoo")
    args = ["finetune", data, "--model", "Cnn6", "--strategy", "freeze_l1", *QUICK]
    assert cli.main([*args, "--steps", "1", "--workdir", workdir]) == 0
    saved = checkpoints.load(os.path.join(workdir, "model"))
    assert saved.model == "Cnn6" and saved.labels == list(CLASSES)
    assert saved.overrides["num_classes"] == 3
    cached = os.listdir(zoo_env["PANNS_JAX_HOME"])
    assert "Cnn6_mAP=0.343.pth" in cached, cached


def test_outputs_inside_a_folder_of_classes_are_refused(tiny_pretrained, tmp_path, capsys):
    """Inside DATA, the workdir or the records would read as a class on the next scan."""
    data = str(tmp_path / "DATA")
    class_folders(data, per_class=3)
    before = tree(str(tmp_path))
    for where in (
        ["--workdir", os.path.join(data, "run")],
        ["--workdir", str(tmp_path / "w"), "--data-dir", os.path.join(data, "noise", "records")],
    ):
        assert cli.main(["finetune", data, "--model", tiny_pretrained, *where]) == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert "inside" in line and "choose a folder outside the data" in line
    assert tree(str(tmp_path)) == before


@pytest.mark.parametrize("argv, backend", [([], "auto"), (["--conv-backend", "onednn"], "onednn")])
def test_conv_backend_reaches_the_training_config(
    argv, backend, tiny_pretrained, tmp_path, monkeypatch, capsys
):
    from panns_jax import finetune

    seen = []

    def stop(config, workdir):
        seen.append(config.conv_backend)
        raise recipe.ConfigError("stopped before training")

    monkeypatch.setattr(finetune, "run", stop)
    data = str(tmp_path / "DATA")
    class_folders(data)
    args = ["finetune", data, "--model", tiny_pretrained, "--workdir", str(tmp_path / "run")]
    assert cli.main([*args, *QUICK, *argv]) == 2
    assert seen == [backend]
    assert capsys.readouterr().err.strip() == "error: stopped before training"
