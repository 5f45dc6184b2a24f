"""Training recovers by itself: resume skips damaged checkpoint steps, and 'best' and its
score are replaced together, whatever moment a crash picks."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_config import logged_losses as _losses

from panns_jax import checkpointing, checkpoints, fileio, models, train

# ----------------------------------------------------------------------------
# Resume from the newest intact step.
# ----------------------------------------------------------------------------


def _damage(step_dir: str, how: str) -> None:
    """What a full disk, a killed copy or a careless hand leaves in one checkpoint step."""
    if how == "truncated":  # The largest array file cut in half.
        state = os.path.join(step_dir, "state")
        files = [os.path.join(root, f) for root, _, names in os.walk(state) for f in names]
        largest = max(files, key=os.path.getsize)
        with open(largest, "r+b") as f:
            f.truncate(os.path.getsize(largest) // 2)
    elif how == "deleted":  # The train state item gone, the rest of the step there.
        shutil.rmtree(os.path.join(step_dir, "state"))
    elif how == "bad_json":  # The data-iterator state cut mid-file.
        path = os.path.join(step_dir, "data", "metadata")
        with open(path, "w") as f:
            f.write('{"step": 1')
    else:
        raise ValueError(how)


def _manager(directory):
    import orbax.checkpoint as ocp

    return ocp.CheckpointManager(
        directory, options=ocp.CheckpointManagerOptions(max_to_keep=10, create=True)
    )


def _args(template):
    import orbax.checkpoint as ocp

    abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), template)
    return ocp.args.Composite(state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore())


def _saved(workdir, steps=(3, 6, 9)):
    """A checkpoint directory with steps whose state holds the step number."""
    import orbax.checkpoint as ocp

    manager = _manager(os.path.join(workdir, "checkpoints"))
    noise = np.random.default_rng(0).standard_normal(50_000).astype(np.float32)
    template = {"w": jnp.asarray(noise), "b": jnp.zeros(3)}  # Incompressible: the largest file.
    for step in steps:
        manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(
                    jax.tree_util.tree_map(lambda x, step=step: x + step, template)
                ),
                data=ocp.args.JsonSave({"step": step}),
            ),
        )
    manager.wait_until_finished()
    return manager, template


@pytest.mark.parametrize("how", ["truncated", "deleted", "bad_json"])
def test_resume_skips_a_damaged_latest_step_and_says_why(tmp_path, caplog, how):
    manager, template = _saved(str(tmp_path))
    _damage(str(tmp_path / "checkpoints" / "9"), how)
    with caplog.at_level(logging.WARNING):
        step, restored = checkpointing.restore_newest_intact(
            manager, _args(template), str(tmp_path)
        )
    assert step == 6 and restored["data"] == {"step": 6}
    np.testing.assert_array_equal(restored["state"]["w"], np.asarray(template["w"]) + 6)
    assert "step 9" in caplog.text and "cannot be restored" in caplog.text
    reason = {"truncated": "reading array", "deleted": "state", "bad_json": "JSONDecodeError"}
    assert reason[how] in caplog.text, caplog.text
    assert "resuming from step 6" in caplog.text
    # Moved aside (not deleted), so that the run can write step 9 again.
    assert os.path.isdir(tmp_path / "checkpoints_unreadable" / "9")
    assert manager.all_steps() == [3, 6]
    import orbax.checkpoint as ocp

    manager.save(
        9,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(template), data=ocp.args.JsonSave({"step": 9})
        ),
    )
    manager.wait_until_finished()
    assert manager.all_steps() == [3, 6, 9]


def test_resume_walks_back_over_several_damaged_steps(tmp_path, caplog):
    manager, template = _saved(str(tmp_path))
    _damage(str(tmp_path / "checkpoints" / "9"), "deleted")
    _damage(str(tmp_path / "checkpoints" / "6"), "truncated")
    with caplog.at_level(logging.WARNING):
        step, restored = checkpointing.restore_newest_intact(
            manager, _args(template), str(tmp_path)
        )
    assert step == 3 and restored["data"] == {"step": 3}
    assert "step 9" in caplog.text and "step 6" in caplog.text
    assert sorted(os.listdir(tmp_path / "checkpoints_unreadable")) == ["6", "9"]


def test_resume_with_nothing_intact_is_a_clear_error_and_moves_nothing(tmp_path):
    manager, template = _saved(str(tmp_path), steps=(3,))
    _damage(str(tmp_path / "checkpoints" / "3"), "truncated")
    with pytest.raises(RuntimeError, match=r"no checkpoint .* can be restored \(newest, step 3"):
        checkpointing.restore_newest_intact(manager, _args(template), str(tmp_path))
    assert os.listdir(tmp_path / "checkpoints") == ["3"]
    assert not os.path.exists(tmp_path / "checkpoints_unreadable")


def test_intact_checkpoints_resume_from_the_latest(tmp_path, caplog):
    """Negative control: nothing damaged, nothing skipped or moved."""
    manager, template = _saved(str(tmp_path))
    with caplog.at_level(logging.WARNING):
        step, restored = checkpointing.restore_newest_intact(
            manager, _args(template), str(tmp_path)
        )
    assert step == 9 and restored["data"] == {"step": 9}
    assert "cannot be restored" not in caplog.text
    assert not os.path.exists(tmp_path / "checkpoints_unreadable")
    assert checkpointing.restore_newest_intact(
        _manager(str(tmp_path / "empty")), _args(template), str(tmp_path)
    ) == (None, None)


def test_training_resumes_from_the_newest_intact_step(data_dir, tmp_path, caplog):
    """The training loop itself: a truncated step 9 is skipped, steps 7-9 are trained again
    from step 6 and give the losses the undamaged run logged (same program, same data)."""
    import train_config

    config = train_config.get_config()
    config.data_dir, config.num_train_steps, config.num_devices = str(data_dir), 9, 1
    straight, damaged = str(tmp_path / "straight"), str(tmp_path / "damaged")
    train.train_and_evaluate(config, straight)
    shutil.copytree(straight, damaged)
    _damage(os.path.join(damaged, "checkpoints", "9"), "truncated")
    os.remove(os.path.join(damaged, "train_log.jsonl"))
    with caplog.at_level(logging.WARNING):
        train.train_and_evaluate(config, damaged)
    assert "checkpoint step 9" in caplog.text and "resuming from step 6" in caplog.text
    want, got = _losses(straight), _losses(damaged)
    assert sorted(got) == [7, 8, 9]
    for step in (7, 8, 9):  # Same program, same inputs: the same bits.
        assert got[step] == want[step], step
    assert sorted(os.listdir(os.path.join(damaged, "checkpoints")), key=int) == ["3", "6", "9"]


# ----------------------------------------------------------------------------
# 'best' and its score: one atomic replacement, at any crash point.
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_variables():
    model = models.get("Cnn10", widths=(8, 16, 32, 64), embedding_size=32, num_classes=3)
    return jax.device_get(models.init(model, jax.random.key(0), 16000))


def _checkpoint(variables, step):
    """A checkpoint whose every parameter is offset by ``step``: its weights say which it is."""
    shifted = jax.tree_util.tree_map(lambda x: np.asarray(x) + step, variables)
    return checkpoints.ModelCheckpoint(
        model="Cnn10",
        variables=shifted,
        step=step,
        overrides={"widths": (8, 16, 32, 64), "embedding_size": 32, "num_classes": 3},
    )


def _check_best(workdir, variables, allowed_steps):
    """``best`` exists, its weights pass their digest, and best_map.json names the same step
    as the weights and the checkpoint's metadata, with that step's score."""
    best = os.path.join(workdir, "best")
    loaded = checkpoints.load(best)
    with open(os.path.join(best, "best_map.json")) as f:
        score = json.load(f)
    assert loaded.step in allowed_steps, loaded.step
    assert score == {"mAP": SCORES[loaded.step], "step": loaded.step}, (score, loaded.step)
    assert loaded.extra == score
    kernel = jax.tree_util.tree_leaves(loaded.variables["params"])[0]
    original = jax.tree_util.tree_leaves(variables["params"])[0]
    np.testing.assert_array_equal(kernel, np.asarray(original) + loaded.step)
    leftovers = [n for n in os.listdir(workdir) if n.startswith(".")]
    assert leftovers == [], leftovers


SCORES = {1: 0.5, 2: 0.75}


def _install_best_by_remove_and_rename(workdir, checkpoint, score):
    """A non-atomic replacement: remove 'best', rename the new one in, then write the score
    (the score also in the metadata here, so that only the crash windows can fail)."""
    checkpoint = dataclasses.replace(checkpoint, extra=score)
    checkpoints.save(os.path.join(workdir, ".best.tmp-old"), checkpoint)
    shutil.rmtree(os.path.join(workdir, "best"))
    os.replace(os.path.join(workdir, ".best.tmp-old"), os.path.join(workdir, "best"))
    with open(os.path.join(workdir, "best", "best_map.json"), "w") as f:
        json.dump(score, f)


def _crash_states(monkeypatch, tmp_path, install, variables):
    """Every state of the workdir a kill -9 during ``install`` (replacing best of step 1 by
    step 2) can leave: a copy taken before each rename, exchange or removal of an entry of
    the workdir, and the final state."""
    workdir = str(tmp_path / "run")
    os.makedirs(workdir)
    checkpointing.install_best(workdir, _checkpoint(variables, 1), {"mAP": SCORES[1], "step": 1})
    states = []

    def snapshot():
        target = str(tmp_path / f"state{len(states)}")
        shutil.copytree(workdir, target, symlinks=True)
        states.append(target)

    def at_top(*paths):
        return any(os.path.dirname(os.path.abspath(p)) == workdir for p in paths)

    def hooked(real, n_paths):
        def call(*args, **kwargs):
            if at_top(*[a for a in args[:n_paths] if isinstance(a, (str, os.PathLike))]):
                snapshot()
            return real(*args, **kwargs)

        return call

    monkeypatch.setattr(os, "replace", hooked(os.replace, 2))
    monkeypatch.setattr(os, "rename", hooked(os.rename, 2))
    monkeypatch.setattr(shutil, "rmtree", hooked(shutil.rmtree, 1))
    monkeypatch.setattr(fileio, "_exchange", hooked(fileio._exchange, 2))
    install(workdir, _checkpoint(variables, 2), {"mAP": SCORES[2], "step": 2})
    monkeypatch.undo()
    snapshot()
    return states


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two_renames"])
def test_best_and_its_score_survive_a_crash_at_any_point(
    monkeypatch, tmp_path, tiny_variables, exchange
):
    if not exchange:  # Filesystems without RENAME_EXCHANGE (or non-Linux): the fallback.
        monkeypatch.setattr(fileio, "_exchange", lambda a, b: False)
    states = _crash_states(monkeypatch, tmp_path, checkpointing.install_best, tiny_variables)
    assert len(states) >= 3  # Before the swap, inside it, after it.
    seen = set()
    for state in states:
        checkpointing.recover_exports(state)  # What the next run does first.
        _check_best(state, tiny_variables, allowed_steps=(1, 2))
        seen.add(checkpoints.load(os.path.join(state, "best")).step)
    assert seen == {1, 2}  # Crashes before the swap keep the old, after it the new.
    _check_best(states[-1], tiny_variables, allowed_steps=(2,))


def test_a_remove_then_rename_replacement_loses_best_or_mispairs_its_score(
    monkeypatch, tmp_path, tiny_variables
):
    """Negative control: the check above catches the remove-rename-then-write sequence."""
    states = _crash_states(
        monkeypatch, tmp_path, _install_best_by_remove_and_rename, tiny_variables
    )
    failures = 0
    for state in states:
        checkpointing.recover_exports(state)
        try:
            _check_best(state, tiny_variables, allowed_steps=(1, 2))
        except (AssertionError, FileNotFoundError, checkpoints.CheckpointError):
            failures += 1
    assert failures >= 1


def test_recovery_puts_back_a_best_moved_aside_by_an_interrupted_swap(tmp_path, tiny_variables):
    """The two-rename fallback's window: 'best' moved to .best.old-*, the new one staged."""
    workdir = str(tmp_path)
    checkpointing.install_best(
        workdir, _checkpoint(tiny_variables, 1), {"mAP": SCORES[1], "step": 1}
    )
    os.replace(os.path.join(workdir, "best"), os.path.join(workdir, ".best.old-abc"))
    checkpoints.save(os.path.join(workdir, ".best.staged-1"), _checkpoint(tiny_variables, 2))
    assert (
        checkpointing.read_best_score(workdir) == -1.0
    )  # Without recovery the score is unknown...
    checkpointing.recover_exports(workdir)
    _check_best(workdir, tiny_variables, allowed_steps=(1,))
    assert (
        checkpointing.read_best_score(workdir) == SCORES[1]
    )  # ...with it, the old best and its score.
