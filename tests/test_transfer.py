"""Transfer learning: the paper's four strategies train exactly what they should, a
pretrained tiny PANN transfers to a held-out single-label task, cross-validation, configs."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from panns_jax import checkpoints, models, train, transfer

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
    return {jax.tree_util.keystr(p): np.asarray(v)
            for p, v in jax.tree_util.tree_leaves_with_path(jax.device_get(tree))}


def _bitwise_equal(a, b) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


@pytest.fixture(scope="module")
def pretrained():
    """Variables of the tiny Cnn10 (10 classes) standing in for a pretrained checkpoint."""
    return jax.device_get(models.init(models.get("Cnn10", **TINY), jax.random.key(7), SR))


@pytest.mark.parametrize("strategy", transfer.STRATEGIES)
def test_each_strategy_updates_exactly_its_parameters(strategy, pretrained):
    config = transfer_config(strategy)
    base = transfer.PretrainedBase("Cnn10", dict(TINY),
                                   None if strategy == "scratch" else pretrained)
    model = transfer.build_model(config, base, num_classes=4)
    optimizer = train.make_optimizer(config)
    variables = jax.jit(lambda rng: transfer.merge_pretrained(
        model.init(rng, jnp.zeros((1, SR)), train=False), base.variables))(jax.random.key(0))
    state = train.TrainState.create(variables, optimizer, jax.random.key(1))
    before_params, before_stats = _leaves(state.params), _leaves(state.batch_stats)
    pretrained_params = _leaves({"base": pretrained["params"]})

    # Initialisation: the base is the checkpoint, except from scratch.
    key = "['base']['conv_block1']['conv1']['kernel']"
    assert _bitwise_equal(before_params[key], pretrained_params[key]) == (strategy != "scratch")

    step = jax.jit(train.make_train_step(model, optimizer, config))
    rng = np.random.default_rng(0)
    for _ in range(3):  # Mixup is on: the loader's 2B clips.
        batch = {"audio": rng.uniform(-0.3, 0.3, (8, SR)).astype(np.float32),
                 "labels": np.eye(4, dtype=np.float32)[rng.integers(0, 4, 8)]}
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
    trained = sum(v.size for k, v in before_params.items()
                  if not k.startswith("['base']") or not (frozen_base or "fc_audioset" in k))
    moments = sum(np.size(x) for x in jax.tree_util.tree_leaves(state.opt_state)) - 1
    assert moments == 3 * trained

    # The exported checkpoint computes what the trained Transfer model computes.
    host = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
    exported = transfer.to_checkpoint(model, base, host, step=3, labels=list(TASK_CLASSES))
    audio = rng.uniform(-0.3, 0.3, (2, SR)).astype(np.float32)
    want = jax.jit(model.apply)(host, audio)["logits"]
    if strategy == "freeze_l3":
        assert "transfer_head" in exported.overrides
    else:  # A plain registry model: the inference tools read it.
        assert exported.model == "Cnn10" and exported.overrides["num_classes"] == 4
        got = jax.jit(exported.build_model().apply)(exported.variables, audio)["logits"]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _pretrain_sources(n: int = 160):
    """panns_demo-style multi-label clips (1 s), in memory."""
    from panns_jax.data import ArraySource, panns_demo

    clips = [panns_demo.synthesize_clip(0, 0, i, SR, SR) for i in range(n)]
    source = ArraySource(np.stack([c["audio"] for c in clips]), [c["labels"] for c in clips],
                         num_classes=len(panns_demo.CLASS_NAMES))
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
                clip[start:start + length] += event * 10 ** (rng.uniform(-16, -4) / 20)
                audio.append((0.9 * clip / max(1.0, np.abs(clip).max())).astype(np.float32))
                labels.append(label)
                fold_ids.append(fold)
    return ArraySource(np.stack(audio), np.asarray(labels), num_classes=len(TASK_CLASSES),
                       columns={"fold": fold_ids})


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
    config = transfer_config("freeze_l1", num_train_steps=40, batch_size=8, eval_every=40,
                             learning_rate=1e-2, mixup="none")
    config.transfer.checkpoint = checkpoint
    config.transfer.num_folds = 2
    workdir = tmp_path / "cv"
    results = transfer.cross_validate(config, str(workdir), sources={"train": _task_source()})
    accuracies = [r["accuracy"] for r in results["folds"].values()]
    assert len(accuracies) == 2 and results["mean"]["accuracy"] == pytest.approx(np.mean(accuracies))
    print(transfer.format_results(results))
    assert min(accuracies) > 0.5, results  # Chance: 0.25 (40 held-out clips per fold).
    assert json.loads((workdir / "cv_results.json").read_text())["mean"] == results["mean"]
    assert "mean" in transfer.format_results(results)

    # The held-out fold's model is an ordinary 4-class checkpoint; its frozen trunk is the
    # pretrained one, bit for bit.
    fold_model, variables, _ = transfer.load(str(workdir / "fold1" / "model"))
    assert fold_model.num_classes == 4
    pretrained = checkpoints.load(checkpoint).variables
    for name, value in _leaves(pretrained).items():
        if "fc_audioset" not in name:
            assert _bitwise_equal(value, _leaves(variables)[name]), name

    # A finished fold is not retrained.
    again = transfer.cross_validate(config, str(workdir), sources={"train": _task_source()})
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
    loaded = convert.load_model_checkpoint(path, "Cnn10", overrides=TINY)
    assert loaded.overrides == {**TINY, "num_classes": 10}


def test_configs_strategies_and_folds():
    from configs import esc50, gtzan, ravdess

    for module, dataset, folds, seconds in ((esc50, "esc50/32k", 5, 5.0),
                                            (gtzan, "gtzan_genres/32k", 10, 30.0),
                                            (ravdess, "ravdess/32k", 4, 5.0)):
        for strategy in transfer.STRATEGIES:
            c = module.get_config(f"strategy={strategy},fold=2")
            assert (c.dataset, c.transfer.num_folds, c.clip_seconds) == (dataset, folds, seconds)
            assert c.task == "singlelabel" and transfer.strategy_of(c) == strategy
            assert c.eval_folds == (2,) and 2 not in c.train_folds
            assert len(c.train_folds) == folds - 1
        last = transfer.fold_config(c, folds)
        assert last.eval_folds == (folds,) and last.train_folds == tuple(range(1, folds))
    with pytest.raises(ValueError, match="strategy"):
        esc50.get_config("strategy=linear_probe")
    with pytest.raises(ValueError, match="fold"):
        esc50.get_config("fold=6")
    with pytest.raises(ValueError, match="needs a pretrained model"):
        transfer.load_base(esc50.get_config("strategy=finetune"))
