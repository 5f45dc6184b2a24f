"""The transfer sets with published train/test splits (panns_jax.data.transfer): DCASE 2019
Task 1, DCASE 2018 Task 2 and MSoS built from small fake downloads laid out as published,
their configs, and a short training run on one of them."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import librosa
import numpy as np
import pytest
import soundfile as sf
from builder_utils import prepare

from panns_jax import data as pdata
from panns_jax.data import transfer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SR = 32000  # The builders' default config.
DCASE2019_DIR = "TAU-urban-acoustic-scenes-2019-development"


def _pcm16(seed: int, frames: int, channels: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (frames,) if channels == 1 else (frames, channels)
    return rng.integers(-12000, 12000, shape).astype(np.int16)


def _wav(path, samples: np.ndarray, rate: int) -> np.ndarray:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    sf.write(str(path), samples, rate, subtype="PCM_16")
    return samples


def _table(path, header, rows, delimiter=","):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, delimiter=delimiter, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def _records(builder, split):
    """``{audio_id: example}`` of a split, and the ids in record order."""
    source = builder.as_data_source(split)
    examples = [source[i] for i in range(len(source))]
    ids = [e["audio_id"].decode() for e in examples]
    return dict(zip(ids, examples)), ids


def _resampled(samples: np.ndarray, rate: int) -> np.ndarray:
    """What the builders store for int16 ``samples`` (mono or frames x channels) at ``rate``."""
    mono = samples.astype(np.float32).reshape(len(samples), -1).mean(axis=1) / 32768
    return np.round(librosa.resample(mono, orig_sr=rate, target_sr=SR, res_type="soxr_hq") * 32768)


# ----------------------------------------------------------------------------
# The fake downloads.
# ----------------------------------------------------------------------------

# (csv file name, scene in the list, scene in meta.csv); the last two rows of 'train' are bad.
DCASE2019_TRAIN = [
    ("audio/airport-barcelona-0-0-a.wav", "airport", "airport"),
    ("audio/bus-lyon-1-10-a.wav", "bus", "bus"),
    ("audio/tram-vienna-2-20-a.wav", "tram", "tram"),
    ("audio/park-paris-3-30-a.wav", "park", "public_square"),  # meta.csv disagrees.
    ("../outside.wav", "park", "park"),  # Not below the download.
]
DCASE2019_TEST = [
    ("audio/metro_station-helsinki-4-40-a.wav", "metro_station", "metro_station"),
    ("audio/street_traffic-london-5-50-a.wav", "street_traffic", "street_traffic"),
]


def _dcase2019(manual) -> dict:
    """TAU Urban Acoustic Scenes 2019 (development): 0.1 s stereo 48 kHz wavs, tab-separated
    meta.csv and fold-1 lists, file names relative to the set's folder."""
    root = manual / DCASE2019_DIR
    clips, meta = {}, []
    _wav(manual / "outside.wav", _pcm16(0, 4800, 2), 48000)
    for i, (name, _, scene) in enumerate(DCASE2019_TRAIN + DCASE2019_TEST):
        if not name.startswith(".."):
            clips[name] = _wav(root / name, _pcm16(10 + i, 4800, channels=2), 48000)
        city = name.split("-")[1] if "-" in name else "x"
        meta.append((name, scene, f"{city}-{i}", "a"))
    header = ["filename", "scene_label", "identifier", "source_label"]
    _table(root / "meta.csv", header, meta, "\t")
    for listing, rows in (
        ("fold1_train.csv", DCASE2019_TRAIN),
        ("fold1_evaluate.csv", DCASE2019_TEST),
    ):
        lines = [(name, scene) for name, scene, _ in rows]
        _table(root / "evaluation_setup" / listing, ["filename", "scene_label"], lines, "\t")
    return clips


DCASE2018_TRAIN = [  # fname, label, seconds; the last row's label is no class of the set.
    ("00044347.wav", "Hi-hat", 0.3),
    ("001ca53d.wav", "Saxophone", 30.0),
    ("002d256b.wav", "Trumpet", 0.5),
    ("0033e230.wav", "Not_a_class", 0.3),
]
DCASE2018_TEST = [  # The last row names a file outside the download.
    ("00326aa9.wav", "Oboe", 0.3),
    ("0038a046.wav", "Bass_drum", 1.0),
    ("0053c8b5.wav", "Writing", 0.4),
    ("/etc/hostname", "Writing", 0.3),
]


def _dcase2018(manual) -> dict:
    """FSDKaggle2018: 44.1 kHz mono wavs of 0.3 s to 30 s and the two comma-separated csvs."""
    clips = {}
    for split, rows in (("train", DCASE2018_TRAIN), ("test", DCASE2018_TEST)):
        for i, (fname, _, seconds) in enumerate(rows):
            if not fname.startswith("/"):
                path = manual / f"FSDKaggle2018.audio_{split}" / fname
                clips[fname] = _wav(path, _pcm16(30 + i, int(seconds * 44100)), 44100)
    meta = manual / "FSDKaggle2018.meta"
    _table(
        meta / "train_post_competition.csv",
        ["fname", "label", "manually_verified", "freesound_id", "license"],
        [
            (f, label, i % 2, 1000 + i, "Attribution")
            for i, (f, label, _) in enumerate(DCASE2018_TRAIN)
        ],
    )
    _table(
        meta / "test_post_competition_scoring_clips.csv",
        ["fname", "label", "usage", "freesound_id", "license"],
        [(f, label, "Private", 2000 + i, "CC0") for i, (f, label, _) in enumerate(DCASE2018_TEST)],
    )
    return clips


MSOS_DEVELOPMENT = [  # Category, Event, File; the last row's category is none of the five.
    ("Nature", "Birds", "birds_01.wav"),
    ("Music", "Guitar", "guitar_07.wav"),
    ("Human", "Laughter", "laugh_03.wav"),
    ("Effects", "Beep", "beep_11.wav"),
    ("Urban", "Traffic", "traffic_02.wav"),
    ("Animals", "Dog", "dog_05.wav"),
]
MSOS_EVALUATION = [  # File, Event, Category; the last row's file is missing.
    ("eval_0001.wav", "Rain", "Nature"),
    ("eval_0002.wav", "Speech", "Human"),
    ("eval_0003.wav", "Siren", "Urban"),
    ("eval_0004.wav", "Piano", "Music"),
]


def _msos(manual) -> dict:
    """The MSoS development and evaluation downloads, unzipped side by side (4 s clips made
    0.25 s at 44.1 kHz), with comma-separated logsheets in their own column orders."""
    dev = manual / "MSoS_challenge_2018_Development_v1-00"
    ev = manual / "MSoS_challenge_2018_Evaluation_v1-00"
    clips = {}
    for i, (category, _, name) in enumerate(MSOS_DEVELOPMENT):
        clips[name] = _wav(dev / "Development" / category / name, _pcm16(50 + i, 11025), 44100)
    for i, (name, _, _) in enumerate(MSOS_EVALUATION[:-1]):
        clips[name] = _wav(ev / "Evaluation" / name, _pcm16(60 + i, 11025), 44100)
    _table(dev / "Logsheet_Development.csv", ["Category", "Event", "File"], MSOS_DEVELOPMENT)
    _table(ev / "Logsheet_EvaluationMaster.csv", ["File", "Event", "Category"], MSOS_EVALUATION)
    return clips


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The three sets built at 32 kHz from their fake downloads: {name: (builder, clips)}."""
    root = tmp_path_factory.mktemp("split_sets")
    result = {}
    for cls, make, budget in (
        (pdata.Dcase2019Task1, _dcase2019, 0.5),
        (pdata.Dcase2018Task2, _dcase2018, 0.5),
        (pdata.Msos, _msos, 0.5),
    ):
        manual = root / f"{cls.name}_manual"
        clips = make(manual)
        builder = prepare(cls, root / "tfds", manual, max_bad_fraction=budget)
        result[cls.name] = (builder, clips)
    result["tfds"] = str(root / "tfds")
    return result


# ----------------------------------------------------------------------------
# The builds.
# ----------------------------------------------------------------------------


def test_dcase2019_task1_lists_scenes_and_averages_stereo(built):
    builder, clips = built["dcase2019_task1"]
    assert builder.info.features["label"].names == list(transfer.DCASE2019_SCENES)
    assert "fold" not in builder.info.features and set(builder.info.splits) == {"train", "test"}
    for split, rows, good in (("train", DCASE2019_TRAIN, 3), ("test", DCASE2019_TEST, 2)):
        got, ids = _records(builder, split)
        assert ids == [name for name, _, _ in rows[:good]]  # List order.
        for name, scene, _ in rows[:good]:
            example = got[name]
            assert int(example["label"]) == transfer.DCASE2019_SCENES.index(scene)
            assert example["identifier"].decode().startswith(name.split("-")[1])
            want = _resampled(clips[name], 48000)
            assert example["audio"].shape == (3200,)  # 0.1 s at 32 kHz.
            np.testing.assert_allclose(example["audio"].astype(int), want, atol=1)
    # Negative control: one channel alone is not what was stored.
    name = DCASE2019_TRAIN[0][0]
    left = _resampled(clips[name][:, :1], 48000)
    assert np.abs(_records(builder, "train")[0][name]["audio"] - left).max() > 100
    report = builder.bad_data_report
    assert report["train"]["skipped_names"] == ["audio/park-paris-3-30-a.wav", "../outside.wav"]
    assert report["test"]["skipped"] == 0


def test_dcase2018_task2_keeps_each_clip_length_and_skips_bad_rows(built):
    builder, clips = built["dcase2018_task2"]
    names = builder.info.features["label"].names
    assert names == list(transfer.DCASE2018_CLASSES) and len(names) == 41
    assert "fold" not in builder.info.features
    for split, rows in (("train", DCASE2018_TRAIN), ("test", DCASE2018_TEST)):
        got, ids = _records(builder, split)
        assert ids == [fname for fname, _, _ in rows[:-1]]
        for fname, label, seconds in rows[:-1]:
            assert int(got[fname]["label"]) == names.index(label)
            assert got[fname]["audio"].shape == (int(round(seconds * SR)),)
            np.testing.assert_allclose(
                got[fname]["audio"].astype(int), _resampled(clips[fname], 44100), atol=1
            )
        assert builder.bad_data_report[split]["skipped_names"] == [rows[-1][0]]
    index = builder.example_index("test")
    assert [int(l) for l in index.flat_labels] == [
        names.index(l) for _, l, _ in DCASE2018_TEST[:-1]
    ]


def test_msos_reads_both_logsheets_in_their_column_orders(built):
    builder, clips = built["msos"]
    assert builder.info.features["label"].names == list(transfer.MSOS_CATEGORIES)
    train, ids = _records(builder, "train")
    assert ids == [name for _, _, name in MSOS_DEVELOPMENT[:-1]]
    for category, _, name in MSOS_DEVELOPMENT[:-1]:
        assert int(train[name]["label"]) == transfer.MSOS_CATEGORIES.index(category)
        np.testing.assert_allclose(
            train[name]["audio"].astype(int), _resampled(clips[name], 44100), atol=1
        )
    test, ids = _records(builder, "test")
    assert ids == [name for name, _, _ in MSOS_EVALUATION[:-1]]
    for name, _, category in MSOS_EVALUATION[:-1]:
        assert int(test[name]["label"]) == transfer.MSOS_CATEGORIES.index(category)
    assert builder.bad_data_report["train"]["skipped_names"] == ["dog_05.wav"]
    assert builder.bad_data_report["test"]["skipped_names"] == ["eval_0004.wav"]


def test_a_logsheet_column_with_another_name_is_refused(tmp_path):
    _msos(tmp_path / "manual")
    sheet = (
        tmp_path
        / "manual"
        / "MSoS_challenge_2018_Evaluation_v1-00"
        / "Logsheet_EvaluationMaster.csv"
    )
    _table(sheet, ["Filename", "Event", "Category"], MSOS_EVALUATION)
    with pytest.raises(ValueError, match=r"no column \['File'\] in its header"):
        prepare(pdata.Msos, tmp_path / "tfds", tmp_path / "manual")


@pytest.mark.parametrize(
    "cls, make, missing, instructions",
    [
        (pdata.Dcase2019Task1, _dcase2019, "meta.csv beside", "zenodo.org/record/2589280"),
        (pdata.Dcase2018Task2, _dcase2018, "FSDKaggle2018.meta/", "zenodo.org/record/2552860"),
        (pdata.Msos, _msos, "Logsheet_Development.csv", "making_sense_of_sounds"),
    ],
)
def test_a_download_not_laid_out_as_published_is_a_clear_error(
    cls, make, missing, instructions, tmp_path
):
    _wav(tmp_path / "elsewhere" / "audio" / "a.wav", _pcm16(1, 100), 44100)  # Wrong layout.
    with pytest.raises(FileNotFoundError, match=f"{missing}.*{instructions}"):
        prepare(cls, tmp_path / "tfds", tmp_path / "elsewhere")
    # Negative control of the layout check: the complete layout is found (and built).
    make(tmp_path / "full")
    prepare(cls, tmp_path / "tfds_full", tmp_path / "full", max_bad_fraction=0.5)


def test_msos_without_the_evaluation_labels_names_them(tmp_path):
    _msos(tmp_path / "manual")
    os.remove(
        tmp_path
        / "manual"
        / "MSoS_challenge_2018_Evaluation_v1-00"
        / "Logsheet_EvaluationMaster.csv"
    )
    with pytest.raises(FileNotFoundError, match="Logsheet_EvaluationMaster.csv beside Evaluation/"):
        prepare(pdata.Msos, tmp_path / "tfds", tmp_path / "manual")


# ----------------------------------------------------------------------------
# Their configs.
# ----------------------------------------------------------------------------


def test_configs_train_on_train_and_evaluate_on_test_without_folds(tmp_path):
    from configs import dcase2018_task2, dcase2019_task1, msos
    from panns_jax import crossval, recipe

    for module, dataset, seconds in (
        (dcase2019_task1, "dcase2019_task1/32k", 10.0),
        (dcase2018_task2, "dcase2018_task2/32k", 4.0),
        (msos, "msos/32k", 4.0),
    ):
        c = module.get_config("strategy=freeze_l3,sr=16k")
        assert (c.dataset, c.clip_seconds) == (dataset.replace("32k", "16k"), seconds)
        assert (c.train_split, c.eval_split, c.task) == ("train", "test", "singlelabel")
        assert c.train_folds is None and c.eval_folds is None
        assert c.transfer.num_folds is None and c.transfer.strategy == "freeze_l3"
        with pytest.raises(recipe.ConfigError, match="has no folds.*drop the fold argument"):
            module.get_config("fold=1")
        with pytest.raises(recipe.ConfigError, match="has no folds to cross-validate"):
            crossval.cross_validate(module.get_config(), str(tmp_path / "cv"))
        assert not (tmp_path / "cv").exists()
    # Negative control: a set with folds still cross-validates.
    from configs import esc50

    assert crossval.count_folds(esc50.get_config()) == 5


def test_crossval_refuses_a_set_without_folds_in_one_line(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "panns_jax.crossval",
            "cv",
            "--config=configs/msos.py:strategy=scratch",
            f"--workdir={tmp_path / 'cv'}",
        ],
        cwd=ROOT,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert lines == [
        "error: msos/32k has no folds to cross-validate (it trains on split 'train' and "
        "evaluates on 'test'): run python -m panns_jax.main with this config instead"
    ]
    assert not (tmp_path / "cv").exists()


# ----------------------------------------------------------------------------
# Training on a build.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["dcase2019_task1", "dcase2018_task2", "msos"])
def test_each_config_trains_on_its_build_and_scores_every_test_clip(name, built, tmp_path, capsys):
    """The set's config file on its fake build, shrunk to a tiny Cnn10 and 2 steps: it trains
    on 'train', evaluates every clip of 'test' (DCASE 2018 Task 2: by the mean over 0.5 s
    segments) and reports accuracy and mAP@3; the checkpoint names the set's classes."""
    import importlib

    from panns_jax import checkpoints, train

    module = importlib.import_module(f"configs.{name}")
    c = module.get_config("strategy=scratch,mixup=none")
    c.model = "Cnn10"
    c.model_overrides.widths, c.model_overrides.embedding_size = (8, 16, 32, 64), 32
    c.data_dir = built["tfds"]
    c.clip_seconds, c.batch_size, c.eval_batch_size = 0.5, 2, 4
    c.num_train_steps, c.eval_every, c.checkpoint_every, c.log_every = 2, 2, 2, 1
    c.num_devices = 1
    result = train.train_and_evaluate(c, str(tmp_path / "run"))
    builder = built[name][0]
    assert result["num_examples"] == builder.info.splits["test"].num_examples > 0
    assert 0 <= result["accuracy"] <= result["map_at_3"] <= 1  # mAP@3 credits ranks 2 and 3.
    saved = checkpoints.load(str(tmp_path / "run" / "model"))
    assert saved.step == 2
    assert saved.labels == list(builder.info.features["label"].names)
    assert c.eval_segments == (name == "dcase2018_task2")

    # The linear probe of the trained model on the same build: fit on 'train', score 'test'.
    from panns_jax import cli, recipe

    args = ["probe", name, "--model", str(tmp_path / "run" / "model"), "--json"]
    args += ["--data-dir", built["tfds"], "--cache-dir", str(tmp_path / "cache"), "--no-progress"]
    capsys.readouterr()
    assert cli.main(args) == 0
    probed = json.loads(capsys.readouterr().out)
    (row,) = probed["rows"]
    assert (row["name"], row["num_eval"]) == ("test", result["num_examples"])
    assert row["num_train"] == builder.info.splits["train"].num_examples
    assert probed["classes"] == saved.labels
    assert probed["clip_seconds"] == recipe.TRANSFER_SETS[name].clip_seconds
