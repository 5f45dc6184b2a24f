"""Own data (panns_jax.data.custom): a folder per class and CSV/TSV manifests scanned without
decoding, partitioned (hold-out, folds, splits), built once into records and rebuilt only when
a file changes; files outside DATA or missing are skipped by name within the budget."""

from __future__ import annotations

import os

import numpy as np
import pytest
from custom_data_utils import CLASSES, class_folders, manifest, sound, write_audio

from panns_jax import tasks
from panns_jax.data import custom
from panns_jax.recipe import ConfigError

SR = 32000


@pytest.fixture
def folders(tmp_path):
    root = tmp_path / "DATA"
    written = class_folders(str(root))
    (root / "README.txt").write_text("not audio")  # Ignored: not an audio extension.
    (root / "noise" / ".hidden.wav").write_bytes(b"\0" * 10)  # Ignored: hidden.
    return str(root), written


def test_a_folder_per_class_is_a_single_label_task_with_a_seeded_stratified_holdout(folders):
    root, written = folders
    found = custom.scan(root)
    assert found.classes == CLASSES and found.task == tasks.SINGLELABEL
    assert found.partition == "holdout" and found.splits == ("train", "valid")
    assert sorted(e.path for e in found.entries) == sorted(p for v in written.values() for p in v)
    assert found.skipped == [] and len(found.durations) == 15
    assert all(1.0 <= d <= 2.0 for d in found.durations)
    # 10% of 5 files rounds to none: every class still holds one out, and trains on four.
    np.testing.assert_array_equal(found.counts("valid"), [1, 1, 1])
    np.testing.assert_array_equal(found.counts("train"), [4, 4, 4])
    for e in found.entries:
        assert CLASSES[e.labels[0]] == e.path.split(os.sep)[0]
    again, other = custom.scan(root), custom.scan(root, seed=3)
    held = lambda s: sorted(e.path for e in s.entries if e.split == "valid")  # noqa: E731
    assert held(again) == held(found) and again.fingerprint == found.fingerprint
    assert held(other) != held(found) and other.fingerprint != found.fingerprint
    half = custom.scan(root, holdout=0.5)
    np.testing.assert_array_equal(half.counts("valid"), [2, 2, 2])  # round(2.5) = 2


def test_the_build_decodes_downmixes_and_resamples_each_file_once(folders, tmp_path):
    from panns_jax import audio
    from panns_jax.data import audio_io

    root, _ = folders
    found = custom.scan(root)
    builder = custom.prepare(custom.register(found, SR), str(tmp_path / "records"))
    assert builder.info.features["label"].names == list(CLASSES)
    assert builder.info.metadata["fingerprint"] == found.fingerprint
    by_id = {}
    for split in ("train", "valid"):
        source = builder.as_data_source(split)
        for i in range(len(source)):
            ex = source[i]
            by_id[ex["audio_id"].decode()] = ex
    assert sorted(by_id) == sorted(e.path for e in found.entries)
    for path, ex in by_id.items():
        want = audio_io.float_to_int16(audio.load_audio(os.path.join(root, path), SR))
        np.testing.assert_array_equal(ex["audio"], want)  # Stereo averaged, FLAC, 48 kHz.
        assert CLASSES[ex["label"]] == path.split(os.sep)[0]
    index = builder.example_index("valid")
    assert sorted(index.flat_labels.tolist()) == [0, 1, 2]


def test_a_build_is_reused_until_a_file_changes(folders, tmp_path):
    root, written = folders
    records = str(tmp_path / "records")
    name = custom.register(custom.scan(root), SR)
    first = custom.prepare(name, records)
    info = os.path.join(os.fspath(first.data_path), "dataset_info.json")
    stamp = os.stat(info).st_mtime_ns
    assert custom.register(custom.scan(root), SR) == name  # Same files: same build.
    assert os.stat(os.fspath(custom.prepare(name, records).data_path)).st_mtime_ns
    assert os.stat(info).st_mtime_ns == stamp and custom.older_builds(first) == []

    changed = os.path.join(root, written["noise"][0])
    write_audio(changed, sound("noise", np.random.default_rng(9), 1.5, SR), SR)
    renamed = custom.register(custom.scan(root), SR)
    assert renamed != name and renamed.rsplit("-", 2)[0] == name.rsplit("-", 2)[0]
    second = custom.prepare(renamed, records)
    assert second.data_path != first.data_path and second.is_prepared()
    assert custom.older_builds(second) == [os.path.dirname(os.fspath(first.data_path))]
    assert custom.register(custom.scan(root), 16000).endswith("-16k")  # Another rate: a build.


def test_a_build_with_too_many_files_only_decoding_finds_bad_fails_leaving_nothing(tmp_path):
    data = tmp_path / "DATA"
    class_folders(str(data), per_class=4)
    for i in range(3):  # Not probed (libsndfile does not read m4a): the build decodes them.
        (data / "noise" / f"bad{i}.m4a").write_bytes(b"garbage" * 10)
    found = custom.scan(str(data))
    assert found.skipped == [] and len(found.entries) == 15
    records = tmp_path / "records"
    with pytest.raises(ConfigError, match=r"skipped 3 of 1[25] inputs .*raise max_bad_fraction"):
        custom.prepare(custom.register(found, SR), str(records))
    assert not records.exists()


def test_a_tsv_manifest_with_several_labels_is_multilabel_with_folds(tmp_path):
    rng = np.random.default_rng(1)
    rows = []
    for i in range(8):
        labels = [CLASSES[i % 3]] + ([CLASSES[(i + 1) % 3]] if i % 2 else [])
        path = tmp_path / "DATA" / "clips" / f"c{i}.wav"
        write_audio(str(path), sound(labels[0], rng, 1.0, 16000), 16000)
        rows.append((f"clips/c{i}.wav", " ; ".join(labels), str(i % 2 + 1)))
    path = manifest(str(tmp_path / "DATA" / "meta.tsv"), rows, ("File", "label", "fold"), tsv=True)
    found = custom.scan(path)
    assert found.task == tasks.MULTILABEL and found.partition == "folds"
    assert found.num_folds == 2 and found.splits == ("train",)
    assert found.root == os.path.realpath(str(tmp_path / "DATA"))
    assert [e.labels for e in found.entries][:2] == [(0,), (1, 2)]
    assert [e.fold for e in found.entries] == [1, 2] * 4
    builder = custom.prepare(custom.register(found, SR), str(tmp_path / "records"))
    assert builder.info.features["labels"].feature.names == list(CLASSES)
    index = builder.example_index("train")
    assert index.columns["fold"].tolist() == [1, 2] * 4
    assert index.labels_of(1).tolist() == [1, 2]


def test_a_split_column_gives_train_valid_and_test(tmp_path):
    rng = np.random.default_rng(2)
    rows = []
    for i, split in enumerate(["train"] * 6 + ["valid", "valid", "Test", "test"]):
        kind = CLASSES[i % 2]
        write_audio(str(tmp_path / f"{i}.wav"), sound(kind, rng, 1.0, SR), SR)
        rows.append((f"{i}.wav", kind, split))
    found = custom.scan(manifest(str(tmp_path / "m.csv"), rows, ("file", "label", "split")))
    assert found.partition == "split" and found.splits == ("train", "valid", "test")
    assert found.eval_split == "valid" and found.classes == CLASSES[:2]
    np.testing.assert_array_equal(found.counts("test"), [1, 1])


def test_rows_outside_data_or_missing_are_skipped_by_name_within_the_budget(tmp_path):
    data = tmp_path / "DATA"
    class_folders(str(data), per_class=4)
    outside = tmp_path / "secret.wav"
    write_audio(str(outside), sound("noise", np.random.default_rng(3), 1.0, SR), SR)
    os.symlink(outside, data / "noise" / "link.wav")  # A link out of DATA.
    os.symlink(data / "noise" / "noise_0.wav", data / "noise" / "inside.wav")  # Stays inside.
    rows = [(os.path.join(k, f"{k}_{i}.wav"), k) for k in CLASSES for i in (0, 1, 4)]
    hostile = [
        ("../secret.wav", "noise"),
        (str(outside), "noise"),
        ("noise/link.wav", "noise"),
        ("noise/missing.wav", "noise"),
        ("noise/inside.wav", "noise"),
    ]
    path = manifest(str(data / "labels.csv"), rows + hostile, ("file", "label"))
    found = custom.scan(path, max_bad_fraction=0.5)
    # noise_4.wav does not exist (four files a class: 0..3): it is skipped too.
    assert [n for n, _ in found.skipped] == [
        "high_tone/high_tone_4.wav",
        "low_tone/low_tone_4.wav",
        "noise/noise_4.wav",
        "../secret.wav",
        str(outside),
        "noise/link.wav",
        "noise/missing.wav",
    ]
    reasons = [why.split(":")[0] for _, why in found.skipped]
    assert reasons == ["missing"] * 3 + ["outside DATA"] * 3 + ["missing"]
    assert "noise/noise_0.wav" in [e.path for e in found.entries]  # The inside link's target.
    assert all(
        os.path.realpath(os.path.join(found.root, e.path)) != str(outside) for e in found.entries
    )
    with pytest.raises(ConfigError, match=r"7 of 14 recordings unusable .*max_bad_fraction"):
        custom.scan(path)
    # A folder per class skips the link out of DATA by name too.
    folder = custom.scan(str(data), max_bad_fraction=0.2)
    assert [(n, why.split(":")[0]) for n, why in folder.skipped] == [
        (os.path.join("noise", "link.wav"), "outside DATA")
    ]


def test_configs_custom_makes_a_transfer_config_on_the_data(folders, tmp_path):
    from configs import custom as custom_config

    root, _ = folders
    c = custom_config.get_config(f"data={root},strategy=scratch,model=Cnn10,steps=7,seed=2")
    assert c.dataset.startswith("custom_audio/data-") and c.dataset.endswith("-32k")
    assert (c.task, c.train_split, c.eval_split) == ("singlelabel", "train", "valid")
    assert c.train_folds is None and c.eval_folds is None and c.num_train_steps == 7
    assert c.transfer.strategy == "scratch" and c.transfer.checkpoint is None
    assert c.model == "Cnn10" and c.clip_seconds <= 2.0 and c.seed == 2
    assert custom.registered_scan(c.dataset).classes == CLASSES
    assert c.eval_segments and c.clips_per_class is None
    few = custom_config.get_config(f"data={root},strategy=scratch,model=Cnn10,clips_per_class=2")
    assert few.clips_per_class == 2
    from panns_jax.cli import finetune as finetune_cli

    flags = finetune_cli.build_parser().parse_args(
        [root, "--workdir", "w", "--clips-per-class", "2"]
    )
    assert "clips_per_class=2" in finetune_cli._arg(flags).split(",")
    with pytest.raises(ConfigError, match="needs data=DATA"):
        custom_config.get_config("strategy=finetune")
    with pytest.raises(ConfigError, match="holdout must be a number"):
        custom_config.get_config(f"data={root},holdout=x")


def test_a_multilabel_holdout_validates_no_label_that_train_lacks(tmp_path):
    rng = np.random.default_rng(5)
    rows = []
    for i in range(20):  # 'rare' is on two files only: one may be held out, never both.
        labels = [CLASSES[i % 2]] + (["rare"] if i in (3, 4) else [])
        write_audio(str(tmp_path / f"{i}.wav"), sound(labels[0], rng, 1.0, SR), SR)
        rows.append((f"{i}.wav", ";".join(labels)))
    path = manifest(str(tmp_path / "m.csv"), rows, ("file", "label"))
    for seed in range(4):
        found = custom.scan(path, holdout=0.3, seed=seed)
        assert found.task == tasks.MULTILABEL and found.classes == (*CLASSES[:2], "rare")
        trained = found.counts("train")
        assert np.all(trained[found.counts("valid") > 0] > 0), seed
        assert 0 < sum(found.counts("valid")) < 20


def test_a_fold_manifest_config_holds_out_the_fold_asked_for(tmp_path):
    from configs import custom as custom_config
    from panns_jax import config_checks, crossval

    rng = np.random.default_rng(6)
    rows = []
    for i in range(9):
        write_audio(str(tmp_path / f"{i}.wav"), sound(CLASSES[i % 3], rng, 1.0, SR), SR)
        rows.append((f"{i}.wav", CLASSES[i % 3], str(i // 3 + 1)))
    path = manifest(str(tmp_path / "m.csv"), rows, ("file", "label", "fold"))
    c = custom_config.get_config(f"data={path},strategy=scratch,model=Cnn10,fold=2")
    assert (c.train_folds, c.eval_folds, c.transfer.num_folds) == ((1, 3), (2,), 3)
    assert c.train_split == c.eval_split == "train"
    config_checks.validate_config(c)
    assert crossval.fold_config(c, 3).eval_folds == (3,)
    with pytest.raises(ConfigError, match="fold must be in 1..3"):
        custom_config.get_config(f"data={path},strategy=scratch,model=Cnn10,fold=4")


@pytest.mark.parametrize(
    "content, message",
    [
        (
            b"path,class\na.wav,x\n",
            r"header has no file and no label column \(found \['class', 'path'\]\)",
        ),
        (b"file,label,fold,split\na.wav,x,1,train\n", "both a fold and a split column"),
        (b"file,label\na.wav,\xff\xfe\n", "is not UTF-8 text"),
        (
            b"file,label\na.wav,x\0y\n",
            r"1 of 1 recordings unusable .*line 2 needs a file and a label",
        ),
        (b"file,label\n" + b"x" * 200_000 + b",y\n", "cannot be read as CSV/TSV"),
        (b"file,label\n", "lists no recordings"),
        (b"", "header has no file and no label column"),
    ],
)
def test_a_manifest_that_cannot_be_read_is_one_error(tmp_path, content, message):
    path = tmp_path / "labels.csv"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=message):
        custom.scan(str(path))


def test_a_file_name_that_is_not_utf8_is_skipped_by_name(tmp_path):
    data = tmp_path / "DATA"
    class_folders(str(data), per_class=4)
    plain = str(data / "noise" / "plain.wav")
    write_audio(plain, sound("noise", np.random.default_rng(1), 1.0, SR), SR)
    os.rename(os.fsencode(plain), os.path.join(os.fsencode(str(data / "noise")), b"caf\xe9.wav"))
    found = custom.scan(str(data), max_bad_fraction=0.1)
    assert len(found.entries) == 12
    assert found.skipped == [
        (
            os.path.join("noise", "caf\ufffd.wav"),
            "bad name: the file name is not UTF-8 text; rename the file",
        )
    ]
