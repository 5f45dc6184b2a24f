"""Transfer learning: the paper's four strategies train exactly what they should, a
pretrained tiny PANN transfers to a held-out single-label task, cross-validation, configs."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from builder_utils import prepare

from panns_jax import (
    checkpoints,
    crossval,
    loader,
    model_builder,
    models,
    recipe,
    tasks,
    train,
    transfer,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SR = 32000
TINY = {"widths": (8, 16, 32, 64), "embedding_size": 32}  # The demo's narrow Cnn10, narrower.
TASK_CLASSES = ("low_tone", "chirp", "click_train", "hiss")  # Demo sound types, one per clip.


def transfer_config(strategy: str, **changes):
    """configs/esc50.py shrunk to a tiny Cnn10 on 1 s clips."""
    from configs import esc50

    c = esc50.get_config(f"strategy={strategy}")
    c.model = "Cnn10"
    c.model_overrides.widths = TINY["widths"]
    c.model_overrides.embedding_size = TINY["embedding_size"]
    c.clip_seconds, c.batch_size, c.eval_batch_size = 1.0, 4, 16
    c.num_devices = 1
    c.num_train_steps, c.eval_every, c.checkpoint_every, c.log_every = 4, 0, 100, 1
    for key, value in changes.items():
        c[key] = value
    return c


def _leaves(tree):
    return {
        jax.tree_util.keystr(p): np.asarray(v)
        for p, v in jax.tree_util.tree_leaves_with_path(jax.device_get(tree))
    }


def _bitwise_equal(a, b) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


@pytest.fixture(scope="module")
def pretrained():
    """Variables of the tiny Cnn10 (10 classes) standing in for a pretrained checkpoint."""
    return jax.device_get(models.init(models.get("Cnn10", **TINY), jax.random.key(7), SR))


@pytest.mark.parametrize("strategy", transfer.STRATEGIES)
def test_each_strategy_updates_exactly_its_parameters(strategy, pretrained):
    config = transfer_config(strategy)
    base = transfer.PretrainedBase(
        "Cnn10", dict(TINY), None if strategy == "scratch" else pretrained
    )
    model = transfer.build_model(config, base, num_classes=4)
    optimizer = train.make_optimizer(config, model_builder.for_config(config))
    variables = jax.jit(
        lambda rng: transfer.merge_pretrained(
            model.init(rng, jnp.zeros((1, SR)), train=False), base.variables
        )
    )(jax.random.key(0))
    state = train.TrainState.create(variables, optimizer, jax.random.key(1))
    before_params, before_stats = _leaves(state.params), _leaves(state.batch_stats)
    pretrained_params = _leaves({"base": pretrained["params"]})

    # Initialisation: the base is the checkpoint, except from scratch.
    key = "['base']['conv_block1']['conv1']['kernel']"
    assert _bitwise_equal(before_params[key], pretrained_params[key]) == (strategy != "scratch")

    step = jax.jit(
        train.make_train_step(
            model, optimizer, tasks.get(config.get("task")), recipe.mixup_alpha(config)
        )
    )
    rng = np.random.default_rng(0)
    for _ in range(3):  # Mixup is on: the loader's 2B clips.
        batch = {
            "audio": rng.uniform(-0.3, 0.3, (8, SR)).astype(np.float32),
            "labels": np.eye(4, dtype=np.float32)[rng.integers(0, 4, 8)],
        }
        state, step_metrics = step(state, batch)
        assert np.isfinite(float(step_metrics["loss"]))
    after_params, after_stats = _leaves(state.params), _leaves(state.batch_stats)

    frozen_base = strategy in ("freeze_l1", "freeze_l3")
    head = {"fc_transfer"} | ({"fc_hidden1", "fc_hidden2"} if strategy == "freeze_l3" else set())
    assert {k.split("'")[1] for k in before_params} == {"base"} | head
    for name, value in before_params.items():
        in_base = name.startswith("['base']")
        unused = name.startswith("['base']['fc_audioset']")  # Replaced by the new head.
        should_train = not in_base or not (frozen_base or unused)
        changed = not _bitwise_equal(value, after_params[name])
        assert changed == should_train, (strategy, name, changed)
    for name, value in before_stats.items():  # All BatchNorms are in the base.
        assert _bitwise_equal(value, after_stats[name]) == frozen_base, (strategy, name)

    # Frozen leaves carry no optimiser state: Adam keeps 3 moments per trained scalar.
    trained = sum(
        v.size
        for k, v in before_params.items()
        if not k.startswith("['base']") or not (frozen_base or "fc_audioset" in k)
    )
    moments = sum(np.size(x) for x in jax.tree_util.tree_leaves(state.opt_state)) - 1
    assert moments == 3 * trained

    # The exported checkpoint computes what the trained Transfer model computes.
    host = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
    exported = transfer.to_checkpoint(model, base, host, step=3, labels=list(TASK_CLASSES))
    audio = rng.uniform(-0.3, 0.3, (2, SR)).astype(np.float32)
    want = jax.jit(model.apply)(host, audio)
    if strategy == "freeze_l3":
        assert "transfer_head" in exported.overrides
    else:  # A plain registry model: the inference tools read it.
        assert exported.model == "Cnn10" and exported.overrides["num_classes"] == 4
        got = jax.jit(exported.build_model().apply)(exported.variables, audio)
        head = exported.variables["params"]["fc_audioset"]
        for name in ("kernel", "bias"):
            assert _bitwise_equal(np.asarray(head[name]), host["params"]["fc_transfer"][name])
        _assert_same_linear_head(got, want, head)
        dropped_bias = dict(got, logits=got["logits"] - head["bias"])  # A broken fold fails.
        with pytest.raises(AssertionError, match="logits differ"):
            _assert_same_linear_head(dropped_bias, want, head)


def _assert_same_linear_head(got, want, head):
    """``logits = embedding @ kernel + bias`` in both models, from embeddings that the same
    base layers computed (compiled apart: their sums may be ordered differently).

    The embeddings must agree within the golden rule for a float32 forward pass
    (panns_jax.tolerance); each model's logits within a dot product's float32 round-off,
    gamma_n (|h| @ |W| + |b|) with n = width + 1 (Higham 2002, sec. 3.1), of the float64 head on
    its own embedding; so the two logits differ by at most both round-offs plus the float64
    head of the embeddings' actual difference.
    """
    from panns_jax import tolerance

    kernel, bias = (np.asarray(head[k], np.float64) for k in ("kernel", "bias"))
    h_got, h_want = (np.asarray(o["embedding"], np.float64) for o in (got, want))
    problem, _, _ = tolerance.check("embedding", h_got, h_want, "the Transfer model's")
    assert not problem, problem
    n = kernel.shape[0] + 1
    unit = float(np.finfo(np.float32).eps) / 2
    gamma = n * unit / (1 - n * unit)
    bound = sum(gamma * (np.abs(h) @ np.abs(kernel) + np.abs(bias)) for h in (h_got, h_want))
    bound += np.abs((h_got - h_want) @ kernel)
    diff = np.abs(np.asarray(got["logits"], np.float64) - np.asarray(want["logits"], np.float64))
    assert np.all(diff <= bound), f"logits differ by {np.max(diff):.3g} (bound {np.min(bound):.3g})"


def _pretrain_sources(n: int = 160):
    """panns_demo-style multi-label clips (1 s), in memory."""
    from panns_jax.data import ArraySource, panns_demo

    clips = [panns_demo.synthesize_clip(0, 0, i, SR, SR) for i in range(n)]
    source = ArraySource(
        np.stack([c["audio"] for c in clips]),
        [c["labels"] for c in clips],
        num_classes=len(panns_demo.CLASS_NAMES),
    )
    return {"train": source, "eval": source}


def _task_source(per_class_per_fold: int = 10, folds: int = 2):
    """Single-label 4-way task: which demo sound type a 1 s clip holds (one event + noise)."""
    from panns_jax.data import ArraySource, panns_demo

    rng = np.random.default_rng(123)
    audio, labels, fold_ids = [], [], []
    for fold in range(1, folds + 1):
        for label, name in enumerate(TASK_CLASSES):
            for _ in range(per_class_per_fold):
                length = int(SR * rng.uniform(0.5, 1.0))
                start = int(rng.integers(0, SR - length + 1))
                clip = 0.003 * rng.standard_normal(SR)
                event = panns_demo._synth(name, rng, length, SR)  # pylint: disable=protected-access
                clip[start : start + length] += event * 10 ** (rng.uniform(-16, -4) / 20)
                audio.append((0.9 * clip / max(1.0, np.abs(clip).max())).astype(np.float32))
                labels.append(label)
                fold_ids.append(fold)
    return ArraySource(
        np.stack(audio),
        np.asarray(labels),
        num_classes=len(TASK_CLASSES),
        columns={"fold": fold_ids},
    )


def test_pretrained_checkpoint_transfers_to_a_held_out_task_with_cross_validation(tmp_path):
    # 1. Pretrain a tiny PANN on panns_demo-style tagging (40 steps).
    from configs import demo

    pre = demo.get_config()
    pre.model_overrides.widths = TINY["widths"]
    pre.model_overrides.embedding_size = TINY["embedding_size"]
    pre.clip_seconds, pre.batch_size, pre.eval_batch_size, pre.learning_rate = 1.0, 8, 32, 3e-3
    pre.num_train_steps, pre.eval_every, pre.checkpoint_every, pre.log_every = 40, 0, 40, 20
    pre.num_devices = 1
    train.train_and_evaluate(pre, str(tmp_path / "pretrain"), sources=_pretrain_sources())
    checkpoint = str(tmp_path / "pretrain" / "model")
    assert checkpoints.load(checkpoint).overrides["num_classes"] == 10

    # 2. Freeze_L1 on a 4-class single-label task, 2-fold cross-validation.
    config = transfer_config(
        "freeze_l1",
        num_train_steps=40,
        batch_size=8,
        eval_every=40,
        learning_rate=1e-2,
        mixup="none",
    )
    config.transfer.checkpoint = checkpoint
    config.transfer.num_folds = 2
    workdir = tmp_path / "cv"
    results = crossval.cross_validate(config, str(workdir), sources={"train": _task_source()})
    accuracies = [r["accuracy"] for r in results["folds"].values()]
    assert len(accuracies) == 2
    assert results["mean"]["accuracy"] == pytest.approx(np.mean(accuracies))
    print(crossval.format_results(results))
    assert min(accuracies) > 0.5, results  # Chance: 0.25 (40 held-out clips per fold).
    assert json.loads((workdir / "cv_results.json").read_text())["mean"] == results["mean"]
    assert "mean" in crossval.format_results(results)

    # The held-out fold's model is an ordinary 4-class checkpoint; its frozen trunk is the
    # pretrained one, bit for bit.
    fold_model, variables, meta = loader.load(str(workdir / "fold1" / "model"))
    assert fold_model.num_classes == 4
    # Training records its task, so the folded head still reads as single-label; the
    # pretraining run's as multi-label (the negative control of the same field).
    assert meta.task == "singlelabel"
    assert loader.load(checkpoint).metadata.task == "multilabel"
    pretrained = checkpoints.load(checkpoint).variables
    for name, value in _leaves(pretrained).items():
        if "fc_audioset" not in name:
            assert _bitwise_equal(value, _leaves(variables)[name]), name

    # A finished fold is not retrained.
    again = crossval.cross_validate(config, str(workdir), sources={"train": _task_source()})
    assert again["folds"] == results["folds"]


def test_base_from_a_pytorch_state_dict(tmp_path):
    pytest.importorskip("torch", reason="PyTorch not installed: .pth I/O unavailable")
    from panns_jax import convert

    model = models.get("Cnn10", **TINY, num_classes=10)
    variables = models.init(model, jax.random.key(3), SR)
    path = str(tmp_path / "tiny.pth")
    convert.write_torch_checkpoint(path, convert.to_state_dict(variables, model))
    config = transfer_config("finetune")
    config.transfer.checkpoint = path
    base = transfer.load_base(config)
    assert base.name == "Cnn10" and base.overrides["num_classes"] == 10  # Read from the file.
    for name, value in _leaves(variables).items():
        np.testing.assert_array_equal(_leaves(base.variables)[name], value)
    # The same loader serves --checkpoint of inference and export.
    loaded = loader.load(path, model="Cnn10", overrides=TINY)
    assert loaded.metadata.overrides == {**TINY, "num_classes": 10}


def test_configs_strategies_and_folds():
    from configs import esc50, gtzan, ravdess

    for module, dataset, folds, seconds in (
        (esc50, "esc50/32k", 5, 5.0),
        (gtzan, "gtzan_genres/32k", 10, 30.0),
        (ravdess, "ravdess/32k", 4, 5.0),
    ):
        for strategy in transfer.STRATEGIES:
            c = module.get_config(f"strategy={strategy},fold=2")
            assert (c.dataset, c.transfer.num_folds, c.clip_seconds) == (dataset, folds, seconds)
            assert c.task == "singlelabel" and transfer.strategy_of(c) == strategy
            assert c.eval_folds == (2,) and 2 not in c.train_folds
            assert len(c.train_folds) == folds - 1
        last = crossval.fold_config(c, folds)
        assert last.eval_folds == (folds,) and last.train_folds == tuple(range(1, folds))
    with pytest.raises(ValueError, match="strategy"):
        esc50.get_config("strategy=linear_probe")
    with pytest.raises(ValueError, match="fold"):
        esc50.get_config("fold=6")
    with pytest.raises(ValueError, match="needs a pretrained model"):
        transfer.load_base(esc50.get_config("strategy=finetune"))


def test_clips_per_class_and_eval_segments_in_the_transfer_configs():
    from configs import dcase2018_task2, esc50, msos
    from panns_jax import config_checks
    from panns_jax.data import inputs, sources

    c = esc50.get_config("fold=2,clips_per_class=3")
    assert c.clips_per_class == 3 and esc50.get_config().clips_per_class is None
    assert dcase2018_task2.get_config().eval_segments and not msos.get_config().eval_segments
    c.model_overrides.widths, c.transfer.checkpoint = (8, 16, 32, 64), "unused"
    for bad in (0, -2):
        changed = c.copy_and_resolve_references()
        changed.clips_per_class = bad
        with pytest.raises(config_checks.ConfigError, match="clips_per_class must be None"):
            config_checks._check_fields(changed)
    # Five folds of two classes, 10 clips of each: fold 2 held out leaves 8 per class.
    labels = np.arange(20) % 2
    folds = np.arange(20) // 4 + 1
    source = sources.ArraySource(np.zeros((20, 160), np.int16), labels, 2, {"fold": folds})
    source.class_names = ("dog", "rooster")
    made = inputs.make_inputs(c, 32000, {"train": source})
    np.testing.assert_array_equal(np.bincount(labels[made.train.records]), [3, 3])
    assert not set(folds[made.train.records]) & {2}
    made.train.close()
    c.clips_per_class = 9
    with pytest.raises(config_checks.ConfigError, match="class 'dog' has 8 training clips"):
        inputs.make_inputs(c, 32000, {"train": source})


# ----------------------------------------------------------------------------
# The real entry points on TFDS builds of small fake downloads.
# ----------------------------------------------------------------------------

ESC50_ROWS = [(fold, target) for fold in range(1, 6) for target in (0, 1)]  # dog, rooster
GTZAN_PER_GENRE = 10  # Tracks 0..9: one per fold (fold = track number mod 10 + 1).
CLIP = SR // 2  # 0.5 s clips at the builders' 32 kHz: no resampling in the fixture.


def _noise_wav(path, seed: int, tone_hz: float) -> np.ndarray:
    import soundfile as sf

    rng = np.random.default_rng(seed)
    t = np.arange(CLIP) / SR
    x = 0.3 * np.sin(2 * np.pi * tone_hz * t) + 0.05 * rng.standard_normal(CLIP)
    pcm = np.round(np.clip(x, -1, 1) * 32767).astype(np.int16)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    sf.write(path, pcm, SR, subtype="PCM_16")
    return pcm.astype(np.float32) / 32768


@pytest.fixture(scope="module")
def fake_downloads(tmp_path_factory):
    """ESC-50 and GTZAN manual-download layouts (a few 0.5 s wavs), built with TFDS, and a
    tiny pretrained Cnn10 checkpoint. ESC-50's csv also holds hostile rows: files outside
    the download (``../``, absolute) and folds 99 and -3, which the build must skip."""
    import csv

    from panns_jax import data as pdata
    from panns_jax.data import transfer as tsets

    root = tmp_path_factory.mktemp("fake_downloads")
    esc = root / "esc50_manual" / "ESC-50-master"
    waves = {}
    rows = []
    for i, (fold, target) in enumerate(ESC50_ROWS):
        name = f"{fold}-{100 + i}-A-{target}.wav"
        waves[name] = _noise_wav(str(esc / "audio" / name), i, 300.0 * (1 + target))
        rows.append((name, fold, target))
    outside = root / "secret.wav"  # Readable audio, but not part of the download.
    _noise_wav(str(outside), 98, 440.0)
    _noise_wav(str(esc / "meta_audio.wav"), 99, 440.0)
    _noise_wav(str(esc / "audio" / "9-999-A-0.wav"), 97, 440.0)
    hostile = [
        ("../meta_audio.wav", 1, 0),
        (str(outside), 2, 0),
        ("9-999-A-0.wav", 99, 0),
        ("9-999-A-0.wav", -3, 0),
    ]
    os.makedirs(esc / "meta")
    with open(esc / "meta" / "esc50.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filename", "fold", "target", "category", "esc10", "src_file", "take"])
        for name, fold, target in rows + hostile:
            w.writerow([name, fold, target, tsets.ESC50_CLASSES[target], False, "x", "A"])
    for g, genre in enumerate(("blues", "rock")):
        for track in range(GTZAN_PER_GENRE):
            path = root / "gtzan_manual" / "genres" / genre / f"{genre}.{track:05d}.wav"
            _noise_wav(str(path), 100 + 10 * g + track, 200.0 * (1 + g))

    tfds_dir = str(root / "tfds")
    builders = {}
    for cls, manual, budget in (
        (pdata.Esc50, "esc50_manual", 0.3),
        (pdata.GtzanGenres, "gtzan_manual", None),
    ):
        builder = prepare(cls, tfds_dir, root / manual, max_bad_fraction=budget)
        builders[builder.name] = builder

    pretrained_model = models.get("Cnn10", **TINY, num_classes=10)  # The demo's 10 classes.
    pretrained = jax.device_get(models.init(pretrained_model, jax.random.key(5), SR))
    checkpoints.save(
        str(root / "pretrained"),
        checkpoints.ModelCheckpoint("Cnn10", pretrained, {**TINY, "num_classes": 10}),
    )
    return {
        "root": root,
        "tfds": tfds_dir,
        "builders": builders,
        "waves": waves,
        "pretrained": pretrained,
        "pretrained_model": pretrained_model,
        "checkpoint": str(root / "pretrained"),
        "outside": str(outside),
    }


def test_esc50_build_refuses_rows_outside_the_download_and_bad_folds(fake_downloads):
    report = fake_downloads["builders"]["esc50"].bad_data_report["train"]
    assert report["total"] == len(ESC50_ROWS) + 4 and report["skipped"] == 4, report
    assert report["skipped_names"] == [
        "../meta_audio.wav",
        fake_downloads["outside"],
        "9-999-A-0.wav",
        "9-999-A-0.wav",
    ]
    index = fake_downloads["builders"]["esc50"].example_index("train")
    assert sorted(index.columns["fold"].tolist()) == sorted(f for f, _ in ESC50_ROWS)
    from panns_jax.data import common

    with pytest.raises(common.BadExample, match="outside manual_dir: '../x.wav'"):
        common.path_below("/data/ESC-50-master/audio", "../x.wav")
    with pytest.raises(common.BadExample, match="outside manual_dir: '/etc/passwd'"):
        common.path_below("/data/ESC-50-master/audio", "/etc/passwd")
    assert common.path_below("/d/audio", "sub/../a.wav") == "/d/audio/a.wav"  # Control.


def _run(module_args, tmp_path, name):
    import subprocess
    import sys

    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    result = subprocess.run(
        [sys.executable, "-m", *module_args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    (tmp_path / f"{name}.log").write_text(result.stdout + result.stderr)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def _tiny_run_flags(fake_downloads):
    return [
        f"--config.transfer.checkpoint={fake_downloads['checkpoint']}",
        f"--config.data_dir={fake_downloads['tfds']}",
        "--config.clip_seconds=0.5",
        "--config.batch_size=2",
        "--config.eval_batch_size=4",
        "--config.num_train_steps=2",
        "--config.eval_every=2",
        "--config.checkpoint_every=2",
        "--config.log_every=1",
        "--config.num_devices=1",
        "--config.learning_rate=0.01",
    ]


def _embedding(fake_downloads, wave) -> np.ndarray:
    """The pretrained base's embedding of ``wave``, computed without the transfer code."""
    model = fake_downloads["pretrained_model"]
    out = jax.jit(model.apply)(fake_downloads["pretrained"], wave[None])
    return np.asarray(out["embedding"], np.float64)[0]


def _frozen_base_unchanged(fake_downloads, base_variables, skip=()):
    for name, value in _leaves(fake_downloads["pretrained"]).items():
        if not any(s in name for s in skip):
            assert _bitwise_equal(value, _leaves(base_variables)[name]), name


# Float32 round-off of the head: three 32-wide dot products and a softmax over 50 logits
# of magnitude ~1 accumulate a relative error of a few times 32 * 2**-24 (~2e-6) per layer;
# 3 layers x 4x margin.
HEAD_RTOL = 3 * 4 * 32 * 2.0**-24


def test_esc50_freeze_l3_trains_through_main_and_its_checkpoint_tags(fake_downloads, tmp_path):
    """`python -m panns_jax.main --config=configs/esc50.py:strategy=freeze_l3` on a TFDS build,
    then its checkpoint, with its `transfer_head` override, in AudioTagger, `panns-jax tag` and
    the export loader."""
    from panns_jax import cli, export
    from panns_jax.data.transfer import ESC50_CLASSES
    from panns_jax.tagger import AudioTagger

    workdir = tmp_path / "esc50"
    stdout = _run(
        [
            "panns_jax.main",
            "--config=configs/esc50.py:strategy=freeze_l3",
            *_tiny_run_flags(fake_downloads),
            f"--workdir={workdir}",
        ],
        tmp_path,
        "main",
    )
    assert "final eval" in stdout
    log = (workdir / "train_log.jsonl").read_text().splitlines()
    losses = [json.loads(l)["loss"] for l in log]
    assert len(losses) == 2 and np.all(np.isfinite(losses))

    path = str(workdir / "model")
    saved = checkpoints.load(path)
    assert saved.step == 2 and saved.labels == list(ESC50_CLASSES)
    assert saved.overrides["transfer_head"] == {
        "layers": 3,
        "hidden_size": None,
        "num_classes": 50,
        "output": "softmax",
    }
    _frozen_base_unchanged(fake_downloads, {k: v["base"] for k, v in saved.variables.items()})

    # Tagging: the frozen base's embedding through the trained 3-layer head, in numpy.
    wave = fake_downloads["waves"]["1-100-A-0.wav"]
    head = {
        k: {n: np.asarray(a, np.float64) for n, a in v.items()}
        for k, v in saved.variables["params"].items()
        if k != "base"
    }
    h = _embedding(fake_downloads, wave)
    h1 = np.maximum(h @ head["fc_hidden1"]["kernel"] + head["fc_hidden1"]["bias"], 0)
    h2 = np.maximum(h1 @ head["fc_hidden2"]["kernel"] + head["fc_hidden2"]["bias"], 0)
    logits = h2 @ head["fc_transfer"]["kernel"] + head["fc_transfer"]["bias"]
    want = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()

    tagger = AudioTagger.load(path)
    assert tagger.labels == list(ESC50_CLASSES)
    got = tagger.predict(wave)["clipwise_output"][0]
    np.testing.assert_allclose(got, want, rtol=HEAD_RTOL)
    # Negative control: the same head without its ReLUs is far outside the tolerance.
    no_relu = (h @ head["fc_hidden1"]["kernel"] + head["fc_hidden1"]["bias"]) @ head["fc_hidden2"][
        "kernel"
    ] + head["fc_hidden2"]["bias"]
    no_relu = no_relu @ head["fc_transfer"]["kernel"] + head["fc_transfer"]["bias"]
    no_relu = np.exp(no_relu - no_relu.max()) / np.exp(no_relu - no_relu.max()).sum()
    assert not np.allclose(got, no_relu, rtol=HEAD_RTOL, atol=0)

    # The CLI on a file of the download, and the exporters' loader.
    wav = str(fake_downloads["root"] / "esc50_manual" / "ESC-50-master" / "audio" / "1-100-A-0.wav")
    out = tmp_path / "tags.json"
    assert (
        cli.main(
            [
                "tag",
                wav,
                "--checkpoint",
                path,
                "--format",
                "json",
                "--top-k",
                "3",
                "--output",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    (record,) = json.loads(out.read_text())
    top = np.argsort(-want, kind="stable")[:3]
    assert [l["label"] for l in record["labels"]] == [ESC50_CLASSES[i] for i in top]
    np.testing.assert_allclose(
        [l["probability"] for l in record["labels"]], want[top], rtol=HEAD_RTOL
    )
    model, variables, _ = export.resolve_source(path)
    assert isinstance(model, transfer.Transfer) and model.head_layers == 3
    np.testing.assert_allclose(
        jax.jit(model.apply)(variables, wave[None])["clipwise_output"][0], want, rtol=HEAD_RTOL
    )
    from panns_jax import convert  # A .pth of it would fit no original model: refused.

    with pytest.raises(ValueError, match="no original PANNs layout"):
        convert.to_state_dict(variables, model)


def test_gtzan_cross_validation_through_the_transfer_cli(fake_downloads, tmp_path):
    """`python -m panns_jax.crossval cv --config=configs/gtzan.py:strategy=freeze_l1` on a
    TFDS build; the fold's Freeze_L1 checkpoint is a plain 10-genre Cnn10 that tags."""
    from panns_jax.data.transfer import GTZAN_GENRES
    from panns_jax.tagger import AudioTagger

    workdir = tmp_path / "gtzan"
    stdout = _run(
        [
            "panns_jax.crossval",
            "cv",
            "--config=configs/gtzan.py:strategy=freeze_l1",
            *_tiny_run_flags(fake_downloads),
            "--folds=1",
            f"--workdir={workdir}",
        ],
        tmp_path,
        "cv",
    )
    results = json.loads((workdir / "cv_results.json").read_text())
    assert list(results["folds"]) == ["1"] and results["strategy"] == "freeze_l1"
    accuracy = results["folds"]["1"]["accuracy"]
    assert accuracy in (0.0, 0.5, 1.0)  # Two held-out clips (track 0 of each genre).
    assert f"mean  {accuracy:.4f}" in stdout

    path = str(workdir / "fold1" / "model")
    saved = checkpoints.load(path)
    assert saved.model == "Cnn10" and saved.overrides == {**TINY, "num_classes": 10}
    assert saved.labels == list(GTZAN_GENRES) and "transfer_head" not in saved.overrides
    _frozen_base_unchanged(fake_downloads, saved.variables, skip=("fc_audioset",))

    wave = fake_downloads["waves"]["1-100-A-0.wav"]
    fc = {n: np.asarray(a, np.float64) for n, a in saved.variables["params"]["fc_audioset"].items()}
    want = 1 / (1 + np.exp(-(_embedding(fake_downloads, wave) @ fc["kernel"] + fc["bias"])))
    got = AudioTagger.load(path).predict(wave)["clipwise_output"][0]
    np.testing.assert_allclose(got, want, rtol=HEAD_RTOL)


@pytest.mark.parametrize("name, folds", [("esc50", 5), ("gtzan", 10)])
def test_probe_cross_validates_a_set_with_folds_by_its_name(name, folds, fake_downloads, capsys):
    """``panns-jax probe esc50`` (and gtzan) on the fake builds: a row per fold, each fold's
    recordings scored once, and the mean; the checkpoint's embeddings, the set's classes."""
    from panns_jax import cli

    root = fake_downloads["root"]
    args = ["probe", name, "--model", fake_downloads["checkpoint"], "--json", "--no-progress"]
    args += ["--data-dir", fake_downloads["tfds"], "--cache-dir", str(root / f"cache_{name}")]
    capsys.readouterr()
    assert cli.main(args) == 0
    results = json.loads(capsys.readouterr().out)
    builder = fake_downloads["builders"]["gtzan_genres" if name == "gtzan" else name]
    total = builder.info.splits["train"].num_examples
    assert [r["name"] for r in results["rows"]] == [f"fold {k}" for k in range(1, folds + 1)]
    assert sum(r["num_eval"] for r in results["rows"]) == total
    assert all(r["num_train"] + r["num_eval"] == total for r in results["rows"])
    assert results["classes"] == list(builder.info.features["label"].names)
    accuracy = [r["logistic"]["accuracy"] for r in results["rows"]]
    assert results["mean"]["logistic"]["accuracy"] == pytest.approx(np.mean(accuracy))
