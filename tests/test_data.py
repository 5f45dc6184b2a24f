"""Tests of the dataset builders (panns_jax.data): values, labels, bad data."""

import csv
import os

import h5py
import librosa
import numpy as np
import pytest
import soundfile as sf
from builder_utils import prepare

from panns_jax import audio
from panns_jax import data as pdata
from panns_jax.data import audio_io, common, panns_demo, transfer

SR = 32000
CLIP = 10 * SR
MIDS = [mid for mid, _ in audio.audioset_classes()]


def _pcm16(seed, n, channels=1):
    rng = np.random.default_rng(seed)
    shape = (n,) if channels == 1 else (n, channels)
    return rng.integers(-12000, 12000, shape).astype(np.int16)


def _write(path, samples, sr, **kw):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    sf.write(path, samples, sr, **kw)


def _records(builder, split):
    """All stored examples of a split as numpy dicts, in record order."""
    source = builder.as_data_source(split)
    return [
        {k: np.asarray(v) if k == "labels" else v for k, v in source[i].items()}
        for i in range(len(source))
    ]


def _segments_csv(path, rows):
    with open(path, "w") as f:
        f.write("# Segments csv created Sun Mar  5 10:54:31 2017\n")
        f.write("# num_ytids=%d, num_segs=%d, num_unique_labels=527\n" % (len(rows), len(rows)))
        f.write("# YTID, start_seconds, end_seconds, positive_labels\n")
        for ytid, labels in rows:
            f.write(f'{ytid}, 30.000, 40.000, "{",".join(labels)}"\n')


# ---------------------------------------------------------------------------
# audio_io
# ---------------------------------------------------------------------------


def test_audio_io_is_lossless_for_16bit_at_target_rate(tmp_path):
    pcm = _pcm16(0, 1000)
    pcm[:4] = [-32768, 32767, 1, -1]
    _write(str(tmp_path / "a.wav"), pcm, SR, subtype="PCM_16")
    np.testing.assert_array_equal(audio_io.load_int16(str(tmp_path / "a.wav"), SR), pcm)
    padded = audio_io.load_int16(str(tmp_path / "a.wav"), SR, 1500)
    np.testing.assert_array_equal(padded[:1000], pcm)
    assert not padded[1000:].any() and len(padded) == 1500
    np.testing.assert_array_equal(audio_io.load_int16(str(tmp_path / "a.wav"), SR, 10), pcm[:10])


def test_audio_io_stereo_resample_and_errors(tmp_path):
    stereo = _pcm16(1, 4410, channels=2)
    _write(str(tmp_path / "s.flac"), stereo, 44100, subtype="PCM_16")
    got = audio_io.load_audio(str(tmp_path / "s.flac"), 16000)
    expected = librosa.resample(
        stereo.mean(1).astype(np.float32) / 32768,
        orig_sr=44100,
        target_sr=16000,
        res_type="soxr_hq",
    )
    assert got.shape == (1600,)
    np.testing.assert_allclose(got, expected, atol=1e-6)
    (tmp_path / "empty.wav").write_bytes(b"")
    (tmp_path / "bad.wav").write_bytes(b"RIFF\x00\x01garbage" * 10)
    _write(str(tmp_path / "nosamples.wav"), np.zeros(0, np.int16), SR)
    for name, reason in [
        ("empty.wav", "empty"),
        ("bad.wav", "not a readable"),
        ("missing.wav", "no such file"),
        ("nosamples.wav", "no audio samples"),
    ]:
        with pytest.raises(audio_io.AudioDecodeError, match=reason):
            audio_io.load_audio(str(tmp_path / name), SR)


# ---------------------------------------------------------------------------
# audioset
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def audioset_manual(tmp_path_factory):
    """A fake AudioSet download: csvs, audio in several layouts, packs, bad data."""
    root = tmp_path_factory.mktemp("audioset_manual")
    expected = {}  # ytid -> (int16 audio at 32 kHz, label ids)
    # Y<id>.wav, mono 32 kHz, 3 s -> zero-padded at the end.
    a = _pcm16(10, 3 * SR)
    _write(str(root / "audio" / "Yaaaaaaaaa-1.wav"), a, SR, subtype="PCM_16")
    expected["aaaaaaaaa-1"] = (np.concatenate([a, np.zeros(CLIP - len(a), np.int16)]), [0, 1])
    # <id>.flac in a split folder, stereo 44.1 kHz, 11 s -> resampled, first 10 s.
    b = _pcm16(11, 11 * 44100, channels=2)
    path_b = str(root / "balanced_train" / "bbbbbbbbb_2.flac")
    _write(path_b, b, 44100, subtype="PCM_16")
    ref = librosa.load(path_b, sr=SR, mono=True, res_type="soxr_hq")[0]
    expected["bbbbbbbbb_2"] = (np.round(ref[:CLIP] * 32768).astype(np.int16), [137])
    # [Y]<id>_<start>_<end>.wav as segment downloaders write, 16 kHz.
    c = _pcm16(12, 10 * 16000)
    path_c = str(root / "audio" / "Ycccccccccc3_30000_40000.wav")
    _write(path_c, c, 16000, subtype="PCM_16")
    ref = librosa.load(path_c, sr=SR, mono=True, res_type="soxr_hq")[0]
    expected["cccccccccc3"] = (
        np.round(np.pad(ref, (0, max(0, CLIP - len(ref))))[:CLIP] * 32768).astype(np.int16),
        [2, 526],
    )
    # Bad inputs: corrupt, empty, missing, unknown label (file present).
    (root / "audio" / "Yddddddddddd.wav").write_bytes(b"RIFF\x10\x00\x00\x00WAVEjunk" * 5)
    (root / "audio" / "Yeeeeeeeeeee.wav").write_bytes(b"")
    _write(str(root / "audio" / "Yggggggggggg.wav"), _pcm16(13, 100), SR)
    _segments_csv(
        str(root / "balanced_train_segments.csv"),
        [
            ("aaaaaaaaa-1", [MIDS[0], MIDS[1]]),
            ("bbbbbbbbb_2", [MIDS[137]]),
            ("cccccccccc3", [MIDS[526], MIDS[2]]),
            ("ddddddddddd", [MIDS[5]]),
            ("eeeeeeeeeee", [MIDS[5]]),
            ("fffffffffff", [MIDS[5]]),
            ("ggggggggggg", [MIDS[5], "/m/not_a_class"]),
        ],
    )
    # eval from csv: one good row.
    _write(str(root / "eval" / "Yhhhhhhhhhhh.wav"), _pcm16(14, CLIP + 5), SR, subtype="PCM_16")
    expected["hhhhhhhhhhh"] = (_pcm16(14, CLIP + 5)[:CLIP], [3])
    _segments_csv(str(root / "eval_segments.csv"), [("hhhhhhhhhhh", [MIDS[3]])])
    # unbalanced_train from two original-style HDF5 packs (one fill-value row).
    pack_dir = root / "hdf5s" / "waveforms" / "unbalanced_train"
    os.makedirs(pack_dir)
    packs = []
    for part in range(2):
        n = 3
        wave = np.stack([_pcm16(100 + 10 * part + i, CLIP) for i in range(n)])
        target = np.zeros((n, 527), bool)
        names = []
        for i in range(n):
            target[i, [part * 10 + i, 500 + i]] = True
            names.append(f"Y{'p' * 9}{part}{i}.wav".encode())
        if part == 1:  # Row missing at packing time: fill values.
            names[2], wave[2], target[2] = b"", 0, False
        with h5py.File(pack_dir / f"unbalanced_train_part{part:02d}.h5", "w") as f:
            f.create_dataset("audio_name", data=np.array(names, dtype="S20"))
            f.create_dataset("waveform", data=wave, dtype=np.int16)
            f.create_dataset("target", data=target, dtype=bool)
            f.attrs.create("sample_rate", data=32000, dtype=np.int32)
        packs.append((names, wave, target))
    return root, expected, packs


@pytest.fixture(scope="module")
def audioset_32k(audioset_manual, tmp_path_factory):
    root, _, _ = audioset_manual
    return prepare(pdata.Audioset, tmp_path_factory.mktemp("tfds"), root, max_bad_fraction=0.6)


def test_audioset_csv_values_and_labels(audioset_32k, audioset_manual):
    _, expected, _ = audioset_manual
    got = _records(audioset_32k, "balanced_train")
    assert [r["audio_id"].decode() for r in got] == [
        "aaaaaaaaa-1",
        "bbbbbbbbb_2",
        "cccccccccc3",
    ]  # csv order, bad rows gone
    for r in got:
        audio, labels = expected[r["audio_id"].decode()]
        assert r["audio"].dtype == np.int16 and r["audio"].shape == (CLIP,)
        assert sorted(r["labels"].tolist()) == sorted(labels)
        # Exact for 16-bit sources at 32 kHz; resampled ones within 1 LSB of librosa.
        np.testing.assert_allclose(r["audio"].astype(int), audio.astype(int), atol=1)
    np.testing.assert_array_equal(got[0]["audio"], expected["aaaaaaaaa-1"][0])
    ev = _records(audioset_32k, "eval")
    assert len(ev) == 1
    np.testing.assert_array_equal(ev[0]["audio"], expected["hhhhhhhhhhh"][0])
    assert ev[0]["labels"].tolist() == [3]
    names = audioset_32k.info.features["labels"].feature.names
    assert names[:2] == MIDS[:2] and len(names) == 527


def test_audioset_bad_inputs_are_skipped_and_reported(audioset_32k):
    report = audioset_32k.info.metadata["bad_data/balanced_train"]
    assert report["total"] == 7 and report["skipped"] == 4
    assert sorted(report["skipped_names"]) == [
        "ddddddddddd",
        "eeeeeeeeeee",
        "fffffffffff",
        "ggggggggggg",
    ]
    assert audioset_32k.info.splits["balanced_train"].num_examples == 3
    # The report survives reloading the prepared dataset.
    reloaded = pdata.Audioset(
        data_dir=os.path.dirname(os.path.dirname(os.path.dirname(audioset_32k.data_dir)))
    )
    assert reloaded.info.metadata["bad_data/balanced_train"]["skipped"] == 4


def test_audioset_reads_original_hdf5_packs(audioset_32k, audioset_manual):
    _, _, packs = audioset_manual
    got = _records(audioset_32k, "unbalanced_train")
    want = [(n, w, t) for names, wave, target in packs for n, w, t in zip(names, wave, target) if n]
    assert len(got) == 5 == len(want)
    for r, (name, wave, target) in zip(got, want):
        assert r["audio_id"].decode() == name.decode()[1:-4]
        np.testing.assert_array_equal(r["audio"], wave)
        assert sorted(r["labels"].tolist()) == np.flatnonzero(target).tolist()
    assert audioset_32k.info.metadata["bad_data/unbalanced_train"]["skipped"] == 1
    index = audioset_32k.example_index("unbalanced_train")
    assert [l.tolist() for l in index.label_lists()] == [sorted(r["labels"].tolist()) for r in got]


def test_audioset_16k_resamples_packs(audioset_manual, tmp_path):
    root, _, packs = audioset_manual
    pack_only = tmp_path / "manual"
    os.makedirs(pack_only)
    os.symlink(root / "hdf5s", pack_only / "hdf5s")
    builder = prepare(
        pdata.Audioset, tmp_path / "tfds", pack_only, config="16k", max_bad_fraction=0.5
    )
    assert list(builder.info.splits.keys()) == ["unbalanced_train"]
    first = _records(builder, "unbalanced_train")[0]
    ref = librosa.resample(
        packs[0][1][0].astype(np.float32) / 32768,
        orig_sr=32000,
        target_sr=16000,
        res_type="soxr_hq",
    )
    assert first["audio"].shape == (160000,)
    np.testing.assert_allclose(
        first["audio"].astype(int), np.round(ref * 32768).astype(int), atol=1
    )


def test_build_fails_past_bad_fraction(audioset_manual, tmp_path):
    root, _, _ = audioset_manual
    with pytest.raises(common.TooManyBadExamplesError, match="skipped 4 of 7"):
        prepare(pdata.Audioset, tmp_path, root)  # default budget 5%


def test_audioset_without_inputs_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="No AudioSet csv or HDF5"):
        prepare(pdata.Audioset, tmp_path / "d", tmp_path)


# ---------------------------------------------------------------------------
# transfer sets
# ---------------------------------------------------------------------------


def test_esc50(tmp_path):
    root = tmp_path / "manual" / "ESC-50-master"
    rows = [
        ("1-100-A-0.wav", 1, 0, "dog"),
        ("1-101-A-49.wav", 1, 49, "hand_saw"),
        ("2-102-A-10.wav", 2, 10, "rain"),
        ("2-103-A-3.wav", 2, 3, "not_a_class"),
        ("3-104-A-5.wav", 3, 5, "cat"),
    ]  # last one: file missing
    clips = {}
    for i, (fn, *_rest) in enumerate(rows[:4]):
        clips[fn] = _pcm16(20 + i, 22050)  # 0.5 s at 44.1 kHz
        _write(str(root / "audio" / fn), clips[fn], 44100, subtype="PCM_16")
    os.makedirs(root / "meta")
    with open(root / "meta" / "esc50.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filename", "fold", "target", "category", "esc10", "src_file", "take"])
        for fn, fold, target, cat in rows:
            w.writerow([fn, fold, target, cat, False, fn[2:5], "A"])
    builder = prepare(pdata.Esc50, tmp_path / "tfds", tmp_path / "manual", max_bad_fraction=0.5)
    got = _records(builder, "train")
    assert [(r["audio_id"].decode(), int(r["label"]), int(r["fold"])) for r in got] == [
        ("1-100-A-0.wav", 0, 1),
        ("1-101-A-49.wav", 49, 1),
        ("2-102-A-10.wav", 10, 2),
    ]
    for r in got:
        ref = librosa.resample(
            clips[r["audio_id"].decode()].astype(np.float32) / 32768,
            orig_sr=44100,
            target_sr=SR,
            res_type="soxr_hq",
        )
        assert r["audio"].shape == (16000,)
        np.testing.assert_allclose(r["audio"].astype(int), np.round(ref * 32768), atol=1)
    assert builder.info.features["label"].names == list(transfer.ESC50_CLASSES)
    assert builder.bad_data_report["train"]["skipped"] == 2
    assert builder.example_index("train").columns["fold"].tolist() == [1, 1, 2]
    # Through the pipeline: single-label records, fold selection.
    ev = pdata.make_eval_iterator(
        builder,
        "train",
        batch_size=4,
        clip_samples=16000,
        folds=[1],
        process_index=0,
        process_count=1,
    )
    (batch,) = list(ev)
    assert batch["mask"].tolist() == [True, True, False, False]
    assert batch["labels"].shape == (4, 50)
    assert np.flatnonzero(batch["labels"][0]).tolist() == [0]
    assert np.flatnonzero(batch["labels"][1]).tolist() == [49]
    np.testing.assert_array_equal(batch["audio"][1], got[1]["audio"] / np.float32(32768))


def test_gtzan(tmp_path):
    root = tmp_path / "manual" / "genres"
    blues = _pcm16(30, 2205)
    _write(str(root / "blues" / "blues.00003.au"), blues, 22050, subtype="PCM_16")
    _write(
        str(root / "rock" / "rock.00012.wav"), _pcm16(31, 2205, channels=2), 22050, subtype="PCM_16"
    )
    _write(str(root / "notagenre" / "x.00000.wav"), _pcm16(32, 100), 22050)
    (root / "jazz").mkdir()
    (root / "jazz" / "jazz.00054.wav").write_bytes(b"\x00" * 100)  # corrupt, as in Kaggle's copy
    for i in range(6):  # Keep the bad fraction at 2 / 10.
        _write(str(root / "pop" / f"pop.{i:05d}.wav"), _pcm16(40 + i, 441), 22050)
    builder = prepare(
        pdata.GtzanGenres, tmp_path / "tfds", tmp_path / "manual", max_bad_fraction=0.25
    )
    got = _records(builder, "train")
    assert [r["audio_id"].decode() for r in got][:2] == ["blues.00003.au", "pop.00000.wav"]
    assert len(got) == 8 and builder.bad_data_report["train"]["skipped"] == 2
    by_id = {r["audio_id"].decode(): r for r in got}
    assert int(by_id["blues.00003.au"]["label"]) == 0
    assert int(by_id["rock.00012.wav"]["label"]) == transfer.GTZAN_GENRES.index("rock")
    assert int(by_id["rock.00012.wav"]["fold"]) == 3
    ref = librosa.resample(
        blues.astype(np.float32) / 32768, orig_sr=22050, target_sr=SR, res_type="soxr_hq"
    )
    np.testing.assert_allclose(
        by_id["blues.00003.au"]["audio"].astype(int), np.round(ref * 32768), atol=1
    )


def test_ravdess(tmp_path):
    manual = tmp_path / "manual"
    files = {
        "Actor_01/03-01-05-01-01-01-01.wav": (4, 1, 1, 0),
        "Actor_08/03-02-01-02-02-01-08.wav": (0, 8, 2, 1),
        "Actor_24/03-01-08-01-01-02-24.wav": (7, 24, 4, 0),
    }
    for i, name in enumerate(files):
        _write(str(manual / name), _pcm16(50 + i, 4800), 48000, subtype="PCM_16")
    _write(str(manual / "Actor_02" / "readme-not-a-clip.wav"), _pcm16(1, 10), 48000)
    builder = prepare(pdata.Ravdess, tmp_path / "tfds", manual, max_bad_fraction=0.3)
    got = {r["audio_id"].decode(): r for r in _records(builder, "train")}
    assert len(got) == 3 and builder.bad_data_report["train"]["skipped"] == 1
    for name, (label, actor, fold, channel) in files.items():
        r = got[os.path.basename(name)]
        assert (int(r["label"]), int(r["actor"]), int(r["fold"]), int(r["vocal_channel"])) == (
            label,
            actor,
            fold,
            channel,
        )
        assert r["audio"].shape == (3200,)


# ---------------------------------------------------------------------------
# panns_demo
# ---------------------------------------------------------------------------

_SMALL_DEMO = panns_demo.PannsDemoConfig(
    name="small", clip_seconds=0.5, num_train=24, num_eval=8, seed=3
)


def test_demo_is_deterministic_and_multilabel(tmp_path):
    builders = [
        prepare(pdata.PannsDemo, tmp_path / str(i), tmp_path, config=_SMALL_DEMO) for i in range(2)
    ]
    a, b = (_records(x, "train") for x in builders)
    assert len(a) == 24 and len(_records(builders[0], "eval")) == 8
    for ra, rb in zip(a, b):
        np.testing.assert_array_equal(ra["audio"], rb["audio"])
        np.testing.assert_array_equal(ra["labels"], rb["labels"])
    sizes = [len(r["labels"]) for r in a]
    assert set(sizes) <= {1, 2, 3} and len(set(sizes)) > 1
    assert a[0]["audio"].shape == (16000,) and np.abs(a[0]["audio"]).max() > 3000
    # Same content as the pure function, and the class list is exposed.
    clip = panns_demo.synthesize_clip(3, 0, 0, SR, 16000)
    np.testing.assert_array_equal(a[0]["audio"], audio_io.float_to_int16(clip["audio"]))
    assert builders[0].info.features["labels"].feature.names == list(pdata.DEMO_CLASS_NAMES)
    assert len(pdata.DEMO_CLASS_NAMES) == 10
    other = panns_demo.synthesize_clip(4, 0, 0, SR, 16000)["audio"]
    assert not np.array_equal(clip["audio"], other)


def test_demo_classes_are_separable_on_log_spectra():
    """A linear model on band energies tags the demo well: a CNN can learn it."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import average_precision_score

    def features(split, n):
        x, y = [], []
        for i in range(n):
            clip = panns_demo.synthesize_clip(0, split, i, 16000, 8000)
            frames = librosa.util.frame(clip["audio"], frame_length=512, hop_length=256)
            spec = np.abs(np.fft.rfft(frames * np.hanning(512)[:, None], axis=0)) ** 2
            mel = librosa.filters.mel(sr=16000, n_fft=512, n_mels=32) @ spec
            logmel = np.log(mel + 1e-8)
            # Mean and max of each band, plus the band's temporal variability.
            x.append(np.concatenate([logmel.mean(1), logmel.max(1), logmel.std(1)]))
            y.append(np.isin(np.arange(10), clip["labels"]))
        return np.array(x), np.array(y)

    xt, yt = features(0, 300)
    xe, ye = features(1, 100)
    mu, sd = xt.mean(0), xt.std(0) + 1e-6
    aps = []
    for c in range(10):
        clf = LogisticRegression(max_iter=2000).fit((xt - mu) / sd, yt[:, c])
        aps.append(average_precision_score(ye[:, c], clf.decision_function((xe - mu) / sd)))
    assert np.mean(aps) > 0.85, aps


def _tfds_finds(names, imports: str, data_dir) -> dict:
    """In a fresh interpreter after ``imports``: which of ``names`` tfds.builder finds.

    TFDS also finds a dataset that is only prepared (files in its data dir, no builder
    registered), so the interpreter looks at an empty ``data_dir``: what it finds there was
    registered by ``imports``.
    """
    import json
    import os
    import subprocess
    import sys

    code = (
        "import json, sys\nimport tensorflow_datasets as tfds\n"
        f"{imports}\nfound = {{}}\n"
        "for name in sys.argv[1:]:\n"
        "    try:\n        tfds.builder(name)\n        found[name] = True\n"
        "    except tfds.core.registered.DatasetNotFoundError:\n        found[name] = False\n"
        "print(json.dumps(found))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, *names],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TFDS_DATA_DIR": str(data_dir)},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_importing_the_builders_module_registers_every_builder(tmp_path):
    from panns_jax.data import builders

    assert set(builders.NAMES) == {
        "audioset",
        "esc50",
        "gtzan_genres",
        "ravdess",
        "dcase2019_task1",
        "dcase2018_task2",
        "msos",
        "panns_demo",
        "custom_audio",
    }
    assert _tfds_finds(builders.NAMES, "import panns_jax.data.builders", tmp_path) == {
        name: True for name in builders.NAMES
    }
    # Negative control: the package alone imports no builder, so TFDS knows none of them.
    assert _tfds_finds(builders.NAMES, "import panns_jax.data", tmp_path) == {
        name: False for name in builders.NAMES
    }


def test_ravdess_trains_through_its_config_and_probes_by_name(tmp_path, capsys):
    """RAVDESS from a fake download of 8 actors (2 per speaker-independent fold) and two
    emotions: configs/ravdess.py trains on folds 2-4 and scores fold 1; ``panns-jax probe
    ravdess`` cross-validates the 4 folds."""
    import json

    from configs import ravdess
    from panns_jax import checkpoints, cli, train

    manual = tmp_path / "manual"
    for i, actor in enumerate((1, 2, 7, 8, 13, 14, 19, 20)):
        for emotion in (1, 5):
            name = f"Actor_{actor:02d}/03-01-{emotion:02d}-01-01-01-{actor:02d}.wav"
            _write(str(manual / name), _pcm16(10 * i + emotion, 4800), 48000, subtype="PCM_16")
    prepare(pdata.Ravdess, tmp_path / "tfds", manual)
    c = ravdess.get_config("strategy=scratch,mixup=none,fold=1")
    c.model = "Cnn10"
    c.model_overrides.widths, c.model_overrides.embedding_size = (8, 16, 32, 64), 32
    c.data_dir, c.clip_seconds, c.batch_size, c.eval_batch_size = str(tmp_path / "tfds"), 0.5, 2, 4
    c.num_train_steps, c.eval_every, c.checkpoint_every, c.log_every = 2, 2, 2, 1
    c.num_devices = 1
    result = train.train_and_evaluate(c, str(tmp_path / "run"))
    assert result["num_examples"] == 4  # Actors 1 and 2, two emotions each.
    model = str(tmp_path / "run" / "model")
    assert checkpoints.load(model).labels[4] == "angry"  # Emotion 05.

    capsys.readouterr()
    args = ["probe", "ravdess", "--model", model, "--data-dir", str(tmp_path / "tfds"), "--json"]
    assert cli.main([*args, "--cache-dir", str(tmp_path / "cache"), "--no-progress"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert [(r["num_train"], r["num_eval"]) for r in results["rows"]] == [(12, 4)] * 4
    assert results["clip_seconds"] == 5.0 and results["mean"]["knn"]["accuracy"] is not None
