"""Training recovers by itself: resume skips damaged checkpoint steps, and 'best' and its
score are replaced together, whatever moment a crash picks. Model checkpoints are read from
their one weights file while a record says the files are the ones verified, and any damage
after that is one line."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_config import logged_losses as _losses

from panns_jax import checkpointing, checkpoints, fileio, models, train, weightfile

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


# ----------------------------------------------------------------------------
# Model checkpoints: weights.bin, read alone while verified.json vouches for the files.
# ----------------------------------------------------------------------------


def _saved_model(tmp_path, variables, name="ckpt"):
    return checkpoints.save(str(tmp_path / name), _checkpoint(variables, 0))


def _same(a, b):
    flat_a = flax_flat(a)
    flat_b = flax_flat(b)
    return flat_a.keys() == flat_b.keys() and all(
        flat_a[k].dtype == flat_b[k].dtype and np.array_equal(flat_a[k], flat_b[k]) for k in flat_a
    )


def flax_flat(variables):
    import flax

    return {
        k: np.asarray(v)
        for k, v in flax.traverse_util.flatten_dict(
            {c: variables[c] for c in checkpoints.COLLECTIONS}
        ).items()
    }


def _forbid(monkeypatch, *names):
    """Make each checkpoints.<name> fail the test when called."""
    for name in names:

        def refuse(*args, name=name, **kwargs):
            raise AssertionError(f"checkpoints.{name} was called")

        monkeypatch.setattr(checkpoints, name, refuse)


def test_a_verified_checkpoint_is_read_from_weights_bin_alone(
    tmp_path, tiny_variables, monkeypatch
):
    path = _saved_model(tmp_path, tiny_variables)
    assert sorted(os.listdir(path)) == [
        "panns_jax.json",
        "variables",
        "verified.json",
        "weights.bin",
    ]
    want = _checkpoint(tiny_variables, 0).variables
    _forbid(monkeypatch, "_restore_variables", "weights_digest", "_check_shapes")
    loaded = checkpoints.load(path)
    assert _same(loaded.variables, want)
    # Negative control: a copy (new inodes) is not what was verified: orbax and every check.
    copy = shutil.copytree(path, tmp_path / "copy")
    with pytest.raises(AssertionError, match="_restore_variables was called"):
        checkpoints.load(str(copy))


def test_a_changed_checkpoint_is_verified_once_then_read_fast(
    tmp_path, tiny_variables, monkeypatch
):
    path = shutil.copytree(_saved_model(tmp_path, tiny_variables), tmp_path / "copy")
    calls = []
    for name in ("_restore_variables", "weights_digest", "_check_shapes"):
        real = getattr(checkpoints, name)
        monkeypatch.setattr(
            checkpoints, name, lambda *a, real=real, name=name: calls.append(name) or real(*a)
        )
    first = checkpoints.load(str(path))
    # The orbax weights and weights.bin each get their digest.
    assert calls == ["_restore_variables", "weights_digest", "weights_digest", "_check_shapes"]
    calls.clear()
    second = checkpoints.load(str(path))
    assert calls == [] and _same(first.variables, second.variables)


def test_the_digest_is_the_one_older_checkpoints_recorded(tmp_path, tiny_variables):
    """Path, dtype, shape and bytes of each leaf, paths sorted as joined by '/'."""
    import hashlib

    import flax

    variables = _checkpoint(tiny_variables, 0).variables
    digest = hashlib.sha256()
    for collection in checkpoints.COLLECTIONS:
        flat = flax.traverse_util.flatten_dict(dict(variables[collection]), sep="/")
        for key in sorted(flat):
            value = np.ascontiguousarray(flat[key])
            digest.update(f"{collection}/{key}|{value.dtype.str}|{value.shape}\n".encode())
            digest.update(value.tobytes())
    assert checkpoints.weights_digest(variables) == "sha256:" + digest.hexdigest()
    path = _saved_model(tmp_path, tiny_variables)
    with open(os.path.join(path, checkpoints.METADATA_FILE)) as f:
        assert json.load(f)["digest"] == "sha256:" + digest.hexdigest()
    variables["params"]["conv_block1"]["conv1"]["kernel"][0, 0, 0, 0] += 1  # Negative control.
    assert checkpoints.weights_digest(variables) != "sha256:" + digest.hexdigest()


def _flip(path, offset_from_end=100):
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) - offset_from_end)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x40]))


def _orbax_data(path):
    files = glob_files(os.path.join(path, checkpoints.VARIABLES_DIR))
    return max((f for f in files if os.sep + "d" + os.sep in f), key=os.path.getsize)


def glob_files(root):
    return [os.path.join(r, f) for r, _, names in os.walk(root) for f in names]


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _edit_digest(path):
    meta = os.path.join(path, checkpoints.METADATA_FILE)
    with open(meta) as f:
        data = json.load(f)
    data["digest"] = "sha256:" + "0" * 64
    with open(meta, "w") as f:
        json.dump(data, f)


DAMAGE = {
    "weights.bin truncated": (
        lambda p: _truncate(os.path.join(p, "weights.bin")),
        "weights.bin: .* lie outside the file's",
    ),
    "weights.bin flipped byte": (
        lambda p: _flip(os.path.join(p, "weights.bin")),
        "weights.bin: the weights do not match the digest",
    ),
    "weights.bin wrong magic": (
        lambda p: _flip(os.path.join(p, "weights.bin"), os.path.getsize(p + "/weights.bin")),
        "weights.bin: not a panns_jax weights file",
    ),
    "orbax data flipped byte": (
        lambda p: _flip(_orbax_data(p), os.path.getsize(_orbax_data(p)) // 2),
        "the weights (do not match the digest in panns_jax.json|cannot be read)",
    ),
    "digest edited": (_edit_digest, "the weights do not match the digest in panns_jax.json"),
}


@pytest.mark.parametrize("where", ["in place", "in a copy"])
@pytest.mark.parametrize("case", list(DAMAGE))
def test_damage_to_any_file_is_one_line_after_it_was_verified(
    tmp_path, tiny_variables, case, where
):
    path = _saved_model(tmp_path, tiny_variables)
    checkpoints.load(path)  # Verified and recorded: the damage comes after.
    if where == "in a copy":
        path = str(shutil.copytree(path, tmp_path / "copy"))
    damage, message = DAMAGE[case]
    damage(path)
    with pytest.raises(checkpoints.CheckpointError) as err:
        checkpoints.load(path)
    assert len(str(err.value).splitlines()) == 1
    assert re.search(message, str(err.value)), str(err.value)


def test_negative_control_without_the_record_damage_in_place_goes_unseen(
    tmp_path, tiny_variables, monkeypatch
):
    """What the stat record guards against: trusted blindly, a flipped byte loads silently."""
    path = _saved_model(tmp_path, tiny_variables)
    _flip(os.path.join(path, "weights.bin"))
    monkeypatch.setattr(checkpoints, "_verified", lambda *args: True)
    loaded = checkpoints.load(path)
    assert not _same(loaded.variables, _checkpoint(tiny_variables, 0).variables)


def test_a_read_only_checkpoint_is_recorded_in_the_records_directory(
    tmp_path, tiny_variables, monkeypatch
):
    path = str(shutil.copytree(_saved_model(tmp_path, tiny_variables), tmp_path / "copy"))
    os.remove(os.path.join(path, checkpoints.STAMP_FILE))
    real = fileio.staged

    def read_only(target):  # Root writes through 0o555, so the refusal is simulated.
        if os.path.dirname(os.path.abspath(target)) == path:
            raise PermissionError(13, "Permission denied", target)
        return real(target)

    monkeypatch.setattr(fileio, "staged", read_only)
    records = str(tmp_path / "records")
    checkpoints.load(path, records=records)
    assert not os.path.exists(os.path.join(path, checkpoints.STAMP_FILE))
    assert len(os.listdir(records)) == 1
    with pytest.raises(AssertionError, match="called"):  # Negative control: no records.
        with monkeypatch.context() as m:
            _forbid(m, "_restore_variables")
            checkpoints.load(path)
    _forbid(monkeypatch, "_restore_variables", "weights_digest")
    want = _checkpoint(tiny_variables, 0).variables
    assert _same(checkpoints.load(path, records=records).variables, want)


def test_a_checkpoint_without_weights_bin_loads_through_orbax_and_is_recorded(
    tmp_path, tiny_variables, monkeypatch
):
    path = _saved_model(tmp_path, tiny_variables)
    for name in ("weights.bin", checkpoints.STAMP_FILE):
        os.remove(os.path.join(path, name))
    want = _checkpoint(tiny_variables, 0).variables
    assert _same(checkpoints.load(path).variables, want)
    assert os.path.exists(os.path.join(path, checkpoints.STAMP_FILE))
    _forbid(monkeypatch, "weights_digest", "_check_shapes", "_read_weights_file")
    assert _same(checkpoints.load(path).variables, want)  # Orbax, without the checks.


def test_a_record_of_files_changed_moments_before_it_is_not_written(tmp_path, tiny_variables):
    path = str(shutil.copytree(_saved_model(tmp_path, tiny_variables), tmp_path / "copy"))
    os.remove(os.path.join(path, checkpoints.STAMP_FILE))
    checkpoints._record_verified(path, "sha256:x")  # The copy's files are brand new.
    assert not os.path.exists(os.path.join(path, checkpoints.STAMP_FILE))
    checkpoints._record_verified(path, "sha256:x", wait=True)  # A save waits them out.
    assert checkpoints._verified(path, "sha256:x")
    assert not checkpoints._verified(path, "sha256:y")  # Another digest: not verified.


# ----------------------------------------------------------------------------
# weights.bin's reader: hostile headers fail in one line, within the file's size in memory.
# ----------------------------------------------------------------------------


def _file_by_hand(path, header, data=b"\0" * 256):
    import struct

    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(weightfile.MAGIC + struct.pack("<Q", len(text)) + text + data)
    return str(path)


def _entry(**fields):
    return {"key": ["params", "w"], "dtype": "<f4", "shape": [8, 8], "offset": 0, **fields}


HOSTILE = {
    "huge shape": ({"arrays": [_entry(shape=[2**40, 2**40])]}, "lie outside the file's"),
    "negative size": ({"arrays": [_entry(shape=[-1, 8])]}, "is not a list of sizes"),
    "object dtype": ({"arrays": [_entry(dtype="|O")]}, "is not a numeric dtype"),
    "void dtype": ({"arrays": [_entry(dtype="|V4")]}, "is not a numeric dtype"),
    "huge sub-array dtype": (
        {"arrays": [_entry(dtype="(99999999999,99999999999)<f4")]},
        "is not a numeric dtype",
    ),
    "unaligned offset": ({"arrays": [_entry(offset=4)]}, "is not a multiple of 64"),
    "overlap": (
        {"arrays": [_entry(shape=[8]), _entry(key=["params", "b"], shape=[48])]},
        "overlap another array",
    ),
    "repeated key": (
        {"arrays": [_entry(shape=[16]), _entry(shape=[16], offset=64)]},
        "appears twice",
    ),
    "trailing bytes": ({"arrays": [_entry(shape=[4])]}, "the arrays end at data byte 16"),
    "not JSON": (b"{arrays: nope", "the header is not valid JSON"),
    "nested past the stack": (b"[" * 200_000, "the header is not valid JSON"),
    "no arrays": ({"tensors": []}, "no list of 'arrays'"),
    "key not names": ({"arrays": [_entry(key="params/w")]}, "is not a list of names"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_a_hostile_header_is_one_line_and_allocates_nothing(tmp_path, case):
    import tracemalloc

    header, message = HOSTILE[case]
    path = _file_by_hand(tmp_path / "w.bin", header)
    tracemalloc.start()
    try:
        with pytest.raises(weightfile.WeightFileError) as err:
            weightfile.read(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert message in str(err.value) and len(str(err.value).splitlines()) == 1, str(err.value)
    # The header is read and parsed (a few times its size), nothing of what it declares.
    assert peak < 4 * os.path.getsize(path) + (64 << 10), peak


def test_negative_control_a_good_file_is_read_within_its_size_and_the_tracer_sees_it(tmp_path):
    import tracemalloc

    path = _file_by_hand(
        tmp_path / "w.bin", {"arrays": [_entry(shape=[1 << 20])]}, b"\1" * (4 << 20)
    )
    tracemalloc.start()
    try:
        ((key, array),) = weightfile.read(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert key == ("params", "w") and array.shape == (1 << 20,)
    assert 4 << 20 <= peak < os.path.getsize(path) + (64 << 10)


@pytest.mark.parametrize(
    "declared, message",
    [(1 << 62, "the header declares"), (None, "wrong magic bytes")],
    ids=["header length past the end", "empty file"],
)
def test_a_cut_or_lying_prefix_is_one_line(tmp_path, declared, message):
    import struct

    path = tmp_path / "w.bin"
    prefix = b"" if declared is None else weightfile.MAGIC + struct.pack("<Q", declared)
    path.write_bytes(prefix + b"{}")
    with pytest.raises(weightfile.WeightFileError, match=message):
        weightfile.read(str(path))


def test_every_stored_dtype_and_shape_round_trips_aligned(tmp_path):
    rng = np.random.default_rng(0)
    arrays = [
        (("params", "f32"), rng.standard_normal((3, 5)).astype(np.float32)),
        (("params", "f16"), rng.standard_normal(7).astype(np.float16)),
        (("params", "i64"), np.arange(5, dtype=np.int64)),
        (("params", "flag"), np.array([True, False, True])),
        (("batch_stats", "scalar"), np.array(3.5, np.float32)),
        (("batch_stats", "empty"), np.zeros((0, 4), np.float64)),
        (("params", "big_endian"), np.arange(3, dtype=">i4")),
    ]
    weightfile.write(str(tmp_path / "w.bin"), arrays)
    got = weightfile.read(str(tmp_path / "w.bin"))
    assert [k for k, _ in got] == [k for k, _ in arrays]
    for (_, want), (_, value) in zip(arrays, got):
        assert value.dtype == want.dtype and value.shape == want.shape
        np.testing.assert_array_equal(value, want)
        assert value.ctypes.data % weightfile.ALIGN == 0 or value.size == 0
    with pytest.raises(ValueError, match="cannot be stored"):  # Only numeric dtypes.
        weightfile.write(str(tmp_path / "o.bin"), [(("params", "o"), np.array([None]))])


def test_weights_of_a_dtype_the_file_cannot_hold_stay_in_orbax_alone(tmp_path, tiny_variables):
    import ml_dtypes

    checkpoint = _checkpoint(tiny_variables, 0)
    checkpoint.variables = jax.tree_util.tree_map(
        lambda x: np.asarray(x).astype(ml_dtypes.bfloat16), checkpoint.variables
    )
    path = checkpoints.save(str(tmp_path / "bf16"), checkpoint)
    assert not os.path.exists(os.path.join(path, checkpoints.WEIGHTS_FILE))
    for _ in range(2):  # Verified, then read through orbax alone.
        loaded = checkpoints.load(path).variables
        assert _same(loaded, checkpoint.variables)
        assert flax_flat(loaded)[("params", "fc1", "bias")].dtype == ml_dtypes.bfloat16


class _LateWriter:
    """A checkpointer whose save fails while one of its writes is still in flight: that
    write lands in the staging directory after the error, as tensorstore's threads can."""

    def __init__(self, delay):
        self.delay, self.landed, self.thread = delay, threading.Event(), None

    def save(self, directory, _):
        def late_write():
            time.sleep(self.delay)
            os.makedirs(directory, exist_ok=True)
            with open(os.path.join(directory, "late"), "w") as f:
                f.write("x")
            self.landed.set()

        self.thread = threading.Thread(target=late_write)
        self.thread.start()
        raise OSError(27, "File too large")

    def close(self):
        pass  # Like orbax's close, it cannot wait for tensorstore's own threads.


def test_a_failed_save_leaves_nothing_even_when_a_write_lands_after_the_error(
    tmp_path, tiny_variables, monkeypatch
):
    writer = _LateWriter(delay=0.05)
    monkeypatch.setattr(checkpoints, "_this_process_checkpointer", lambda: writer)
    with pytest.raises(OSError, match="File too large"):
        checkpoints.save(str(tmp_path / "out"), _checkpoint(tiny_variables, 0))
    writer.thread.join()
    assert writer.landed.is_set()  # The write did land after the error: removing once fails.
    assert os.listdir(tmp_path) == []
