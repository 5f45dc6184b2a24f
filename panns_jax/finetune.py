"""Fine-tuning on your own audio: a folder per class or a manifest, with no code.

    panns-jax finetune DATA --model Cnn14 --strategy finetune --workdir DIR
    python -m panns_jax.main --config=configs/custom.py:data=DATA,strategy=finetune --workdir=DIR

:func:`make_config` scans DATA (:mod:`panns_jax.data.custom`: every bad input is one
:class:`~panns_jax.recipe.ConfigError` line before anything is built), resolves the model
(a zoo name, a checkpoint directory or a ``.pth``, as every ``--checkpoint`` takes them, or a
registry architecture for ``scratch``) and returns the transfer config of
:func:`panns_jax.recipe.transfer_config` on that data. :func:`run` builds the data once
(decoded and resampled into records; reused until a file changes), then trains with
:func:`panns_jax.train.train_and_evaluate`, the loop ``panns_jax.main`` runs. The
checkpoints carry the data's class names, which ``panns-jax tag / sed / embed`` print.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Dict, List, Mapping, Optional, Tuple

import jax
import ml_collections
import numpy as np

from panns_jax import config_checks, fileio, loader, models, recipe, report, tasks, train, transfer
from panns_jax.data import common, custom, pipeline
from panns_jax.recipe import ConfigError

DEFAULT_MODEL = "Cnn14"
MAX_DEFAULT_CLIP_SECONDS = 10.0
RESULTS_FILE = "finetune_results.json"
DATA_FILE = "finetune_data.json"  # The data a workdir's run trains on (its build's name).
# Config arguments of configs/custom.py besides transfer_config's (strategy, fold, steps, ...).
OWN_ARGS = ("data", "model", "arch", "holdout", "max_bad_fraction", "data_dir", "clip_seconds")


def default_clip_seconds(found: custom.Scan) -> float:
    """The longest recording, rounded up to 0.1 s, at most 10 s (10 s when no header says)."""
    if not found.durations:
        return MAX_DEFAULT_CLIP_SECONDS
    return min(MAX_DEFAULT_CLIP_SECONDS, math.ceil(max(found.durations) * 10 - 1e-6) / 10)


def data_dir_beside(workdir: str) -> str:
    """Where the records of own data go by default: ``panns_jax_data`` beside the workdir,
    shared by the runs of one parent folder."""
    return os.path.join(os.path.dirname(os.path.abspath(workdir)), "panns_jax_data")


def check_outputs_outside(data: str, *outputs: Optional[str]) -> None:
    """ConfigError when an output folder lies inside a DATA folder of class folders, where a
    later scan would take it for a class."""
    if not os.path.isdir(data):
        return  # A manifest lists its files: folders beside it are not read.
    root = os.path.realpath(data)
    for output in filter(None, outputs):
        real = os.path.realpath(output)
        if os.path.commonpath([root, real]) == root:
            raise ConfigError(f"{output} lies inside {data}: choose a folder outside the data")


def resolve_model(
    strategy: str, model: str, arch: Optional[str], overrides: Mapping[str, Any]
) -> Tuple[str, Dict[str, Any], Optional[str], int]:
    """``(config.model, config.model_overrides, config.transfer.checkpoint, sample rate)``.

    ``model`` is a checkpoint directory, a ``.pth`` (of architecture ``arch``) or a zoo
    name, loaded through :func:`panns_jax.loader.load`; for ``scratch`` also a registry
    architecture, whose weights are random. An existing path wins over a name.
    """
    overrides = dict(overrides or {})
    if strategy == "scratch" and not os.path.exists(model) and model in models.names():
        try:
            rate = models.sample_rate(models.get(model, **overrides))
        except (TypeError, ValueError) as err:
            raise ConfigError(f"--overrides do not fit {model}: {err}") from None
        return model, overrides, None, rate
    meta = load_model(model, arch, overrides).metadata
    return meta.name, overrides if is_pth_path(model) else {}, model, meta.sample_rate


def is_pth_path(model: str) -> bool:
    """Whether ``model`` names an original ``.pth`` file (whose architecture ``--arch`` says)."""
    return os.path.isfile(model) and model.endswith((".pth", ".pt"))


def load_model(
    model: str, arch: Optional[str] = None, overrides: Optional[Mapping[str, Any]] = None
) -> loader.Loaded:
    """``(module, variables, metadata)`` of ``--model``: a zoo name, a checkpoint directory or
    a ``.pth`` of architecture ``arch``; a ConfigError line naming it when it cannot load."""
    is_pth = is_pth_path(model)
    try:
        return loader.load(
            model,
            model=(arch or DEFAULT_MODEL) if is_pth else None,
            overrides=overrides if is_pth else None,
        )
    except (OSError, ValueError, ImportError) as err:  # One line each, naming the model.
        text = (str(err).splitlines() or [type(err).__name__])[0]
        named = text if text.startswith(model) else f"{model}: {text}"
        raise ConfigError(f"--model {named}") from None


def make_config(
    data: str,
    *,
    strategy: str = "finetune",
    model: str = DEFAULT_MODEL,
    arch: Optional[str] = None,
    overrides: Optional[Mapping[str, Any]] = None,
    holdout: float = custom.DEFAULT_HOLDOUT,
    max_bad_fraction: float = common.DEFAULT_MAX_BAD_FRACTION,
    clip_seconds: Optional[float] = None,
    data_dir: Optional[str] = None,
    arg: Optional[str] = None,
) -> ml_collections.ConfigDict:
    """The transfer config of ``strategy`` from ``model`` on the audio in ``data``.

    ``arg`` holds further :func:`panns_jax.recipe.transfer_config` arguments (``fold=2``,
    ``steps=500``, ``seed=1``, ``mixup=none``, ...). ConfigError for bad data or a bad model.
    """
    if strategy not in recipe.STRATEGIES:
        raise ConfigError(f"strategy must be one of {recipe.STRATEGIES}, got {strategy!r}")
    args = recipe.parse_arg(arg)
    if "sr" in args:
        raise ConfigError("own data is stored at the model's own sample rate: drop sr=")
    seed = _integer(args.pop("seed", 0), "seed")
    check_outputs_outside(data, data_dir)
    found = custom.scan(data, holdout=holdout, seed=seed, max_bad_fraction=max_bad_fraction)
    if "fold" in args and found.partition != "folds":
        raise ConfigError(f"{data} has no fold column: a fold cannot be held out (drop fold)")
    name, model_overrides, checkpoint, rate = resolve_model(strategy, model, arch, overrides or {})
    args["strategy"] = strategy
    config = recipe.transfer_config(
        custom.NAME,
        num_folds=max(found.num_folds, 1),
        clip_seconds=default_clip_seconds(found) if clip_seconds is None else clip_seconds,
        arg=",".join(f"{k}={v}" for k, v in args.items()),
        model=name,
    )
    config.seed = seed
    config.model_overrides.update(model_overrides)
    config.transfer.checkpoint = checkpoint
    config.dataset = custom.register(found, rate, max_bad_fraction)
    config.data_dir = data_dir
    config.task = found.task
    config.eval_segments = True  # A recording longer than clip_seconds: its segments' mean.
    config.train_split, config.eval_split = "train", found.eval_split
    if found.partition != "folds":  # Splits of their own (a hold-out, a split column).
        config.train_folds = config.eval_folds = None
    return config


def config_from_arg(arg: Optional[str]) -> ml_collections.ConfigDict:
    """``configs/custom.py``'s config: ``data=DATA`` and :func:`make_config`'s other
    arguments (``model``, ``arch``, ``holdout``, ``max_bad_fraction``, ``data_dir``,
    ``clip_seconds``) as ``key=value``, the rest passed to ``transfer_config``."""
    args = recipe.parse_arg(arg)
    if not isinstance(args.get("data"), str):
        raise ConfigError("configs/custom.py needs data=DATA (a folder per class or a manifest)")
    own = {k: args.pop(k) for k in OWN_ARGS if k in args}
    numbers = {}
    for key in ("holdout", "max_bad_fraction", "clip_seconds"):
        if key in own:
            numbers[key] = _number(own.pop(key), key)
    return make_config(
        own.pop("data"),
        strategy=args.pop("strategy", "finetune"),
        model=own.pop("model", DEFAULT_MODEL),
        arch=own.pop("arch", None),
        data_dir=own.pop("data_dir", None),
        arg=",".join(f"{k}={v}" for k, v in args.items()),
        **numbers,
    )


def _number(value: Any, name: str) -> float:
    try:
        result = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(result):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    return result


def _integer(value: Any, name: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be an integer, got {value!r}") from None


def class_names(config: ml_collections.ConfigDict) -> Tuple[str, ...]:
    """The class names of the own data a config trains on."""
    return custom.registered_scan(config.dataset).classes


def run(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, Any]:
    """Check ``config``, build its data unless built, train it in ``workdir`` and write the
    last evaluation (summary and per-class AP) to ``workdir/finetune_results.json``, with its
    pictures (:func:`write_pictures`).

    A workdir resumes only a run on the same data (same files, same partition): rerun on
    changed data, the loop would resume the finished run and train nothing new.
    """
    config_checks.validate_config(config, workdir)  # Before anything is built or written.
    _check_same_data(config, workdir)
    builder = custom.prepare(config.dataset, config.get("data_dir"))
    for old in custom.older_builds(builder):
        print(f"note: {old} holds an older build of the same data; delete it to free space")
    os.makedirs(workdir, exist_ok=True)
    _write_json(os.path.join(workdir, DATA_FILE), {"dataset": config.dataset})
    result = train.train_and_evaluate(config, workdir)
    summary = results_summary(config, result)
    if "test" in custom.registered_scan(config.dataset).splits and config.eval_split != "test":
        best = os.path.join(
            workdir, "best" if os.path.isdir(os.path.join(workdir, "best")) else "model"
        )
        test = evaluate_checkpoint(config, best, "test")
        summary["test"] = results_summary(config, test, split="test", checkpoint=best)
    _write_json(os.path.join(workdir, RESULTS_FILE), summary)
    if jax.process_index() == 0:
        write_pictures(summary, workdir)
    return summary


def evaluate_checkpoint(config: ml_collections.ConfigDict, path: str, split: str) -> Dict[str, Any]:
    """The task's metrics of the checkpoint ``path`` on ``split`` of the config's data, each
    recording scored by its segments of ``clip_seconds`` as the loop's evaluation does."""
    module, variables, meta = loader.load(path)
    task = tasks.get(config.task)
    batches = pipeline.make_eval_iterator(
        custom.prepare(config.dataset, config.get("data_dir")),
        split,
        batch_size=config.eval_batch_size,
        clip_samples=recipe.clip_samples(config, meta.sample_rate),
        segments=bool(config.eval_segments),
        with_record=True,
    )
    scores_of = models.jit_inference(
        module,
        lambda v, audio: task.scores(module.apply(v, audio)),
        config.get("conv_backend") or "auto",
    )
    return task.evaluate_rows(*pipeline.eval_rows(batches, lambda x: scores_of(variables, x)))


def _check_same_data(config: ml_collections.ConfigDict, workdir: str) -> None:
    """ConfigError when ``workdir`` holds a run on other data, or something else."""
    marker = os.path.join(workdir, DATA_FILE)
    if os.path.isfile(marker):
        with open(marker) as f:
            previous = json.load(f).get("dataset")
        if previous != config.dataset:
            raise ConfigError(
                f"{workdir} holds a fine-tuning run on other data ({previous}; the data's files "
                "or partition changed since): choose a new --workdir, or delete that one"
            )
    elif os.path.isdir(workdir) and os.listdir(workdir):
        raise ConfigError(f"{workdir} is not empty and holds no fine-tuning run: choose another")


def _write_json(path: str, value: Any) -> None:
    with fileio.staged(path) as staging, open(staging, "w") as f:
        json.dump(value, f, indent=2)


def results_summary(
    config: ml_collections.ConfigDict,
    result: Mapping[str, Any],
    split: Optional[str] = None,
    checkpoint: Optional[str] = None,
) -> Dict[str, Any]:
    """The task's metrics and each class's AP and AUC, as JSON-ready numbers, of an evaluation
    on ``split`` (default: the config's eval split) of ``checkpoint`` (default: the run)."""
    names = class_names(config)
    per_class = {
        name: {"average_precision": _float(ap), "auc": _float(auc)}
        for name, ap, auc in zip(names, result["average_precision"], result["auc"])
    }
    keys = tasks.get(config.task).summary_keys
    split = split or config.eval_split
    folds = config.get("eval_folds") if split == config.eval_split else None
    summary = {
        "task": config.task,
        "strategy": transfer.strategy_of(config),
        "eval_split": split,
        "eval_folds": list(folds) if folds else None,
        "checkpoint": checkpoint,
        "num_examples": int(result["num_examples"]),
        **{k: _float(result[k]) for k in keys},
        "per_class": per_class,
    }
    if "confusion_matrix" in result:  # Rows: true classes; columns: predicted ones.
        summary["confusion_matrix"] = np.asarray(result["confusion_matrix"]).tolist()
    return summary


def write_pictures(summary: Mapping[str, Any], workdir: str) -> List[str]:
    """The pictures of each evaluation of ``summary`` in ``workdir``: per-class AP and, for
    a single-label task, the confusion matrix (``*_test.png`` for the test split)."""
    written = []
    for part, suffix in ((summary, ""), (summary.get("test"), "_test")):
        if part:
            ap = {name: v["average_precision"] for name, v in part["per_class"].items()}
            title = f"{part['eval_split']} ({part['num_examples']} recordings)"
            pictures = report.results_pngs(
                workdir, ap, part.get("confusion_matrix"), suffix=suffix, title=title
            )
            written += list(pictures.values())
    return written


def _float(value: Any) -> Optional[float]:
    return float(value) if np.isfinite(value) else None


def format_results(summary: Mapping[str, Any]) -> str:
    """The headline metric (accuracy, or mAP for multi-label) and a table of per-class AP, for
    the validation and (when the data has one) the test split."""
    lines = _format_one(summary)
    if summary.get("test"):
        lines += ["", *_format_one(summary["test"])]
    return "\n".join(lines)


def _format_one(summary: Mapping[str, Any]) -> List[str]:
    key = "accuracy" if summary["task"] == tasks.SINGLELABEL else "mAP"
    where = summary["eval_split"] + (
        f" fold {summary['eval_folds'][0]}" if summary.get("eval_folds") else ""
    )
    of = f" ({os.path.basename(summary['checkpoint'])})" if summary.get("checkpoint") else ""
    lines = [f"{key} {summary[key]:.4f} on {summary['num_examples']} {where} recordings{of}"]
    width = max([5] + [len(n) for n in summary["per_class"]])
    lines.append(f"{'class':<{width}}  AP      AUC")
    for name, scores in summary["per_class"].items():
        shown = [f"{v:.4f}" if v is not None else "  -   " for v in scores.values()]
        lines.append(f"{name:<{width}}  {shown[0]}  {shown[1]}")
    return lines
