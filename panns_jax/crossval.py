"""Cross-validation of a transfer config over the folds of ESC-50 (5), GTZAN (10) and
RAVDESS (4), as the paper reports them (Kong et al. 2020, Sec. VI-D)::

    python -m panns_jax.crossval cv --config=configs/esc50.py:strategy=freeze_l1 --workdir=DIR
    python -m panns_jax.crossval train --config=configs/esc50.py:strategy=freeze_l1,fold=2 ...

It drives the training loop (:func:`panns_jax.train.train_and_evaluate`) once per held-out
fold; what a strategy trains is :mod:`panns_jax.transfer`. The sets with published
train/test splits (DCASE 2019 Task 1, DCASE 2018 Task 2, MSoS) have no folds: ``cv`` refuses
them in one line, and ``python -m panns_jax.main`` trains them.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Dict, List, Mapping, Optional, Sequence

import jax
import ml_collections
import numpy as np

from panns_jax import config_checks, recipe, train, transfer
from panns_jax.recipe import ConfigError


def count_folds(config: ml_collections.ConfigDict) -> int:
    """The folds of the transfer set of ``config``.

    Raises ConfigError for a set with published train/test splits instead of folds.
    """
    transfer_fields = config.get("transfer")
    folds = transfer_fields.get("num_folds") if transfer_fields is not None else None
    if not folds:
        raise ConfigError(
            f"{config.dataset} has no folds to cross-validate (it trains on split "
            f"{config.train_split!r} and evaluates on {config.eval_split!r}): run "
            "python -m panns_jax.main with this config instead"
        )
    return int(folds)


def fold_config(config: ml_collections.ConfigDict, fold: int) -> ml_collections.ConfigDict:
    """``config`` training on every fold but ``fold`` and evaluating on ``fold``."""
    num_folds = count_folds(config)
    if not 1 <= fold <= num_folds:
        raise ConfigError(f"fold {fold} not in 1..{num_folds}")
    c = ml_collections.ConfigDict(config.to_dict())
    c.train_folds = tuple(f for f in range(1, num_folds + 1) if f != fold)
    c.eval_folds = (fold,)
    c.transfer.fold = fold
    return c


def cross_validate(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    folds: Optional[Sequence[int]] = None,
    sources: Optional[Mapping] = None,
) -> Dict[str, Any]:
    """Train and evaluate one model per held-out fold in ``workdir/foldK``.

    Each fold resumes like any run; a finished fold (``foldK/result.json``) is not redone.
    Writes and returns ``{'folds': {K: {accuracy, mAP, ...}}, 'mean': {...}}``
    (``workdir/cv_results.json``). ``sources`` as :func:`panns_jax.train.train_and_evaluate`.
    """
    folds = list(folds or range(1, count_folds(config) + 1))
    fold_configs = {fold: fold_config(config, fold) for fold in folds}  # All refused early.
    config_checks.validate_config(fold_configs[folds[0]], workdir)
    per_fold: Dict[str, Dict[str, float]] = {}
    for fold in folds:
        fold_dir = os.path.join(workdir, f"fold{fold}")
        result_path = os.path.join(fold_dir, "result.json")
        if os.path.exists(result_path):
            with open(result_path) as f:
                per_fold[str(fold)] = json.load(f)
            continue
        result = train.train_and_evaluate(fold_configs[fold], fold_dir, sources=sources)
        summary = {k: float(v) for k, v in result.items() if np.ndim(v) == 0}
        if jax.process_index() == 0:
            with open(result_path, "w") as f:
                json.dump(summary, f, indent=2)
        per_fold[str(fold)] = summary
    keys = sorted(set.intersection(*(set(r) for r in per_fold.values())))
    mean = {k: float(np.mean([r[k] for r in per_fold.values()])) for k in keys}
    results = {"strategy": transfer.strategy_of(config), "folds": per_fold, "mean": mean}
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "cv_results.json"), "w") as f:
            json.dump(results, f, indent=2)
    return results


def format_results(results: Mapping[str, Any]) -> str:
    """Per-fold and mean accuracy (or mAP) as a small table."""
    key = "accuracy" if "accuracy" in results["mean"] else "mAP"
    lines = [f"fold  {key}"]
    lines += [f"{fold:>4}  {r[key]:.4f}" for fold, r in results["folds"].items()]
    lines.append(
        f"mean  {results['mean'][key]:.4f}  ({results['strategy']}, {len(results['folds'])} folds)"
    )
    return "\n".join(lines)


def main() -> None:
    """``python -m panns_jax.crossval {train|cv} --config=... --workdir=... [--folds=1,3]``.

    Flags are defined here, not at import: a program may import this module beside
    main.py's flags of the same names.
    """
    from absl import app, flags
    from ml_collections import config_flags

    config_flag = config_flags.DEFINE_config_file("config", None, "Transfer config file.")
    workdir_flag = flags.DEFINE_string("workdir", None, "Output directory (cv: foldK/ per fold).")
    folds_flag = flags.DEFINE_list("folds", None, "cv: only these folds (default: all).")
    flags.mark_flags_as_required(["config", "workdir"])

    def run(argv: Sequence[str]) -> None:
        command = argv[1] if len(argv) > 1 else "cv"
        config, workdir = config_flag.value, workdir_flag.value
        try:
            if command == "train":
                result = train.train_and_evaluate(config, workdir)
                print(json.dumps({k: float(v) for k, v in result.items() if np.ndim(v) == 0}))
            elif command == "cv":
                print(
                    format_results(
                        cross_validate(
                            config,
                            workdir,
                            folds=_folds(folds_flag.value, count_folds(config)),
                        )
                    )
                )
            else:
                raise app.UsageError(f"unknown command {command!r}: use 'train' or 'cv'")
        except ConfigError as err:  # A refused config: one line, not a traceback.
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(2) from None

    app.run(run, flags_parser=recipe.parse_flags)


def _folds(values: Optional[Sequence[str]], num_folds: int) -> Optional[List[int]]:
    """``--folds=1,3`` as numbers, each in 1..num_folds (ConfigError otherwise)."""
    if not values:
        return None
    try:
        folds = [int(f) for f in values]
    except ValueError:
        raise ConfigError(
            f"--folds must be fold numbers in 1..{num_folds}, got {','.join(values)}"
        ) from None
    bad = [f for f in folds if not 1 <= f <= num_folds]
    if bad:
        raise ConfigError(f"--folds: {bad} not in 1..{num_folds}")
    return folds


if __name__ == "__main__":
    main()
