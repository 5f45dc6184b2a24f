"""What a training run keeps in its workdir, and how it survives a crash.

``workdir/checkpoints/<step>`` holds the full train state and the input iterator's state
(orbax), for exact resume. ``workdir/model`` and ``workdir/best`` are inference checkpoints in
the format of :mod:`panns_jax.checkpoints`, which every entry point loads. ``best`` records its
score in its metadata's ``extra`` (the one place the loop reads it back) and, for people and
scripts, in ``best/best_map.json`` (``best_<metric>.json`` for other metrics). Both change in
one directory swap.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from typing import Any, Dict, Optional, Tuple

import jax
import orbax.checkpoint as ocp
from absl import logging

from panns_jax import checkpoints, fileio, multihost

# What a crash in checkpoints.save, fileio.replace_dir or install_best can leave in a workdir.
_LEFTOVER = tuple(
    f"{dot}{name}.{kind}-"
    for dot in (".", "..")
    for name in ("best", "model")
    for kind in ("staged", "tmp", "old")
)


def first_line(err: BaseException) -> str:
    """``Type: first line of the message`` of ``err``, at most 200 characters of it."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:200] if text else ''}"


# ----------------------------------------------------------------------------
# Train-state checkpoints: save, and restore the newest intact step.
# ----------------------------------------------------------------------------


def make_manager(workdir: str, keep: int) -> ocp.CheckpointManager:
    """The orbax manager of ``workdir/checkpoints``, keeping the newest ``keep`` steps."""
    return ocp.CheckpointManager(
        os.path.join(workdir, "checkpoints"),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
    )


def save_state(manager: ocp.CheckpointManager, step: int, state: Any, data: Any) -> None:
    """Save the train state and the input iterator's state (JSON) as ``step``."""
    manager.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data)),
    )


def restore_state(
    manager: ocp.CheckpointManager, abstract_state: Any, workdir: str
) -> Tuple[Optional[int], Any, Any]:
    """``(step, state, data)`` of the newest intact checkpoint, or ``(None, None, None)``."""
    args = ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
    )
    step, restored = restore_newest_intact(manager, args, workdir)
    if step is None:
        return None, None, None
    return step, restored["state"], restored["data"]


def _try_restore(manager: Any, step: int, args: Any) -> Tuple[Any, Optional[str]]:
    """``(restored, None)``, or ``(None, why)`` when the step does not read back."""
    try:
        return manager.restore(step, args=args), None
    except Exception as err:  # orbax, tensorstore and json errors: the step is unreadable.
        return None, first_line(err)


def _move_aside(manager: Any, workdir: str, skipped: list) -> str:
    """Move the unreadable steps to ``workdir/checkpoints_unreadable`` (process 0 does it)."""
    aside = os.path.join(workdir, "checkpoints_unreadable")
    if jax.process_index() == 0:
        os.makedirs(aside, exist_ok=True)
        for bad, _ in skipped:
            target = os.path.join(aside, str(bad))
            while os.path.lexists(target):
                target += "+"
            os.replace(os.path.join(str(manager.directory), str(bad)), target)
    multihost.rendezvous("unreadable checkpoints moved")
    manager.reload()
    return aside


def restore_newest_intact(manager: Any, args: Any, workdir: str) -> Tuple[Optional[int], Any]:
    """Restore the newest step of ``manager`` that reads back; ``(None, None)`` if there is none.

    Newer steps that fail to restore (a truncated or deleted file, damaged JSON) are logged
    with the reason and moved to ``workdir/checkpoints_unreadable/``, so that the run can save
    those steps again. All processes agree on each attempt: one failing is enough to skip the
    step. If no step restores, nothing is moved, and a :class:`RuntimeError` says why the
    newest failed (for example a changed config).
    """
    skipped = []
    for step in sorted(manager.all_steps(), reverse=True):
        restored, reason = _try_restore(manager, step, args)
        if multihost.all_processes(reason is None):
            break
        reason = reason or "unreadable on another process"
        logging.warning(
            "checkpoint step %d in %s cannot be restored (%s); skipping it",
            step,
            manager.directory,
            reason,
        )
        skipped.append((step, reason))
    else:
        if skipped:
            raise RuntimeError(
                f"no checkpoint in {manager.directory} can be restored (newest, step "
                f"{skipped[0][0]}: {skipped[0][1]}); if the config changed, train in a new "
                f"--workdir; otherwise move {manager.directory} away to start afresh"
            )
        return None, None
    if skipped:
        aside = _move_aside(manager, workdir, skipped)
        logging.warning(
            "resuming from step %d, the newest intact checkpoint; skipped step(s) %s, moved to %s",
            step,
            ", ".join(str(b) for b, _ in skipped),
            aside,
        )
    return step, restored


# ----------------------------------------------------------------------------
# Inference exports: 'model' at the end, 'best' with its score.
# ----------------------------------------------------------------------------


def score_file(metric: str) -> str:
    """The name of the file inside ``best`` that holds its score."""
    return "best_map.json" if metric == "mAP" else f"best_{metric}.json"


def read_best_score(workdir: str, metric: str = "mAP") -> float:
    """The ``metric`` score recorded in ``workdir/best``'s metadata; -1 if there is none."""
    path = os.path.join(workdir, "best")
    if not os.path.exists(os.path.join(path, checkpoints.METADATA_FILE)):
        return -1.0
    try:
        return float(checkpoints.read_metadata(path).get("extra", {}).get(metric, -1.0))
    except (OSError, ValueError, TypeError) as err:
        logging.warning(
            "cannot read the best score in %s (%s); the next evaluation replaces 'best'",
            path,
            first_line(err),
        )
    return -1.0


def install_best(
    workdir: str, checkpoint: checkpoints.ModelCheckpoint, score: Dict[str, Any]
) -> str:
    """Make ``checkpoint`` ``workdir/best``, with ``score`` in its metadata and its score file.

    The checkpoint and the score file are staged in one hidden directory, which then replaces
    ``best`` in one rename-based swap (:func:`panns_jax.fileio.replace_dir`). So ``best`` and
    its score change together or not at all, and :func:`recover_exports` tidies what a crash
    can leave behind. Process 0 only.
    """
    metric = next(k for k in score if k != "step")
    checkpoint = dataclasses.replace(checkpoint, extra={**checkpoint.extra, **score})
    staged = os.path.join(workdir, f".best.staged-{os.getpid()}-{time.time_ns()}")
    checkpoints.save(staged, checkpoint)
    try:
        with fileio.staged(os.path.join(staged, score_file(metric))) as part, open(part, "w") as f:
            json.dump(score, f)
        fileio.replace_dir(staged, os.path.join(workdir, "best"))
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return os.path.join(workdir, "best")


def export(
    workdir: str,
    name: str,
    checkpoint: checkpoints.ModelCheckpoint,
    score: Optional[Dict[str, Any]] = None,
) -> None:
    """Write ``checkpoint`` as ``workdir/<name>``; with a ``score``, as ``best``. Process 0 only."""
    if score is None:
        checkpoints.save(os.path.join(workdir, name), checkpoint, overwrite=True)
    else:
        install_best(workdir, checkpoint, score)
    logging.info("wrote %s (step %d) in %s", name, checkpoint.step, workdir)


def _restore_moved_aside(workdir: str, names: list, export_name: str) -> None:
    """Put back the newest ``.<name>.old-*`` copy when ``<name>`` itself is missing."""
    path = os.path.join(workdir, export_name)
    olds = [
        n
        for n in names
        if n.startswith(f".{export_name}.old-")
        and checkpoints.is_model_checkpoint(os.path.join(workdir, n))
    ]
    if not os.path.lexists(path) and olds:
        newest = max(olds, key=lambda n: os.path.getmtime(os.path.join(workdir, n)))
        os.replace(os.path.join(workdir, newest), path)
        logging.warning("restored %s from %s (a crash interrupted its replacement)", path, newest)


def recover_exports(workdir: str) -> None:
    """Undo what a crash while replacing ``best`` or ``model`` can leave. Process 0 only.

    An old copy moved aside but not yet replaced is moved back; staged or old copies are
    removed.
    """
    if not os.path.isdir(workdir):
        return
    names = sorted(os.listdir(workdir))
    for export_name in ("best", "model"):
        _restore_moved_aside(workdir, names, export_name)
    for name in names:
        path = os.path.join(workdir, name)
        if name.startswith(_LEFTOVER) and os.path.lexists(path):
            shutil.rmtree(path, ignore_errors=True)
