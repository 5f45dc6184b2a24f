"""Transfer learning as in the PANNs paper (Kong et al. 2020, Sec. V; golden/TRAINING.md §10).

A pretrained PANN becomes the submodule ``base`` of :class:`Transfer` (as the original's
``Transfer_Cnn14``), and a new head reads its ``embedding``. ``config.transfer.strategy``
picks one of the paper's four systems:

==========  =========================  ================  ==============================
strategy    base initialisation        base trained?     head on the embedding
==========  =========================  ================  ==============================
scratch     random                     yes               ``fc_transfer`` (linear)
finetune    pretrained                 yes               ``fc_transfer`` (linear)
freeze_l1   pretrained                 no (Freeze_L1)    ``fc_transfer`` (linear)
freeze_l3   pretrained                 no (Freeze_L3)    ``fc_hidden1/2`` + ``fc_transfer``
==========  =========================  ================  ==============================

Freezing is an optimiser mask (:func:`param_labels` -> ``optax.multi_transform`` with
``optax.set_to_zero()`` for frozen leaves, which then carry no Adam state), never a copy
of the model. The base's own classifier (``fc_audioset``) is unused by every strategy
and always frozen.

Frozen bases run in inference mode (BatchNorm running statistics, no SpecAugment, no
dropout inside the base) and the gradient stops at the embedding, so a frozen base is
bitwise unchanged, *including its BatchNorm statistics*, and its backward pass is
skipped. The original keeps BatchNorm in training mode when freezing (its running
statistics drift to the new data although no weight trains); we deliberately do not,
because then the frozen "feature extractor" would change under the head. Consequences:
mixup of a frozen base happens on the waveform (the base's own log-mel mixup is a
training-mode step), and the embedding dropout (0.5, which the original applies before
``fc_transfer``) is applied by the head.

Pretrained weights come from ``config.transfer.checkpoint``: a panns_jax checkpoint
directory (``DIR/best`` of a training run, or ``panns-jax-convert from-torch`` output) or
an original PyTorch ``.pth`` (architecture ``config.model``). The checkpoint's
architecture is authoritative; ``scratch`` uses it too (weights ignored) so that it is
the paper's same-architecture baseline.

Cross-validation of the fold-structured sets (ESC-50 5 folds, GTZAN 10, RAVDESS 4)::

    python -m panns_jax.transfer cv --config=configs/esc50.py:strategy=freeze_l1 --workdir=DIR
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from panns_jax import checkpoints, convert, frontend, models

STRATEGIES = ("scratch", "finetune", "freeze_l1", "freeze_l3")
FROZEN_BASE = ("freeze_l1", "freeze_l3")
BASE = "base"  # Name of the pretrained submodule (the original's ``Transfer_Cnn14.base``).
_BASE_CLASSIFIERS = ("fc_audioset", "att_block")  # Unused once the new head exists.
_HEAD_KEY = "transfer_head"  # Checkpoint overrides entry of heads a registry model can't hold.


class Transfer(nn.Module):
    """``base`` (a registry model) -> its ``embedding`` -> a new head for the target task.

    Attributes:
      base: the pretrained model; its variables live under ``base/``.
      num_classes: classes of the target task.
      head_layers: 1 (``fc_transfer``) or 3 (two ReLU layers ``fc_hidden1/2``, then
        ``fc_transfer``: the paper's Freeze_L3).
      hidden_size: width of the hidden layers (default: the embedding width).
      freeze_base: run the base in inference mode and stop the gradient at its embedding.
      output: activation of ``clipwise_output``, 'sigmoid' (multi-label) or 'softmax'.
    """

    base: nn.Module
    num_classes: int
    head_layers: int = 1
    hidden_size: Optional[int] = None
    freeze_base: bool = False
    output: str = "softmax"

    @nn.compact
    def __call__(self, waveform: jax.Array, train: bool = False,
                 mixup_lambda: Optional[jax.Array] = None) -> Dict[str, jax.Array]:
        if self.freeze_base:
            if train and mixup_lambda is not None:  # The eval-mode base would skip mixup.
                waveform = frontend.mixup(waveform, mixup_lambda)
            outputs = dict(self.base(waveform, train=False))
        else:
            outputs = dict(self.base(waveform, train=train, mixup_lambda=mixup_lambda))
        if "embedding" not in outputs:
            raise ValueError(f"{type(self.base).__name__} has no clip 'embedding' output: "
                             "transfer needs a clip-level model (not a decision-level SED head)")
        x = outputs["embedding"]
        if self.freeze_base:
            # In training mode the base applies this dropout itself (golden/TRAINING.md §10).
            x = nn.Dropout(0.5)(jax.lax.stop_gradient(x), deterministic=not train)
        dtype = getattr(self.base, "dtype", jnp.float32)
        width = self.hidden_size or x.shape[-1]
        for i in range(1, self.head_layers):
            x = nn.relu(nn.Dense(width, dtype=dtype, name=f"fc_hidden{i}")(x))
            x = nn.Dropout(0.5)(x, deterministic=not train)
        logits = nn.Dense(self.num_classes, dtype=dtype, name="fc_transfer")(x)
        logits = logits.astype(jnp.float32)
        for key in ("logits", "clipwise_logits", "clipwise_output"):
            outputs.pop(key, None)
        outputs["logits"] = outputs["clipwise_logits"] = logits
        outputs["clipwise_output"] = (jax.nn.softmax(logits) if self.output == "softmax"
                                      else jax.nn.sigmoid(logits))
        return outputs


# ----------------------------------------------------------------------------
# Config -> pretrained base -> Transfer model.
# ----------------------------------------------------------------------------


def strategy_of(config: ml_collections.ConfigDict) -> Optional[str]:
    """``config.transfer.strategy`` (validated), or None when the config is no transfer run."""
    transfer = config.get("transfer")
    strategy = transfer.get("strategy") if transfer is not None else None
    if strategy is not None and strategy not in STRATEGIES:
        raise ValueError(f"config.transfer.strategy must be one of {STRATEGIES}, got {strategy!r}")
    return strategy


@dataclasses.dataclass
class PretrainedBase:
    """The base architecture (registry name + overrides) and, unless scratch, its variables."""

    name: str
    overrides: Dict[str, Any]
    variables: Optional[Dict[str, Any]] = None
    labels: Optional[Sequence[str]] = None

    def build(self, dtype: Any = None) -> nn.Module:
        overrides = dict(self.overrides)
        if dtype is not None:
            overrides["dtype"] = dtype
        return models.get(self.name, **overrides)


def load_base(config: ml_collections.ConfigDict) -> PretrainedBase:
    """The base of a transfer run: ``config.transfer.checkpoint`` (a panns_jax checkpoint
    directory or an original ``.pth``), or ``config.model`` untrained for ``scratch``."""
    strategy = strategy_of(config)
    path = config.transfer.get("checkpoint")
    if not path:
        if strategy != "scratch":
            raise ValueError(f"strategy {strategy!r} needs a pretrained model: set "
                             "--config.transfer.checkpoint=DIR (a panns_jax checkpoint, e.g. "
                             "WORKDIR/best) or a PyTorch PANNs .pth")
        overrides = dict(config.get("model_overrides", {}) or {})
        return PretrainedBase(config.model, overrides)
    is_pth = os.path.isfile(path) and path.endswith((".pth", ".pt"))
    # A .pth is config.model (+ model_overrides) with the class count of its own head.
    checkpoint = convert.load_model_checkpoint(
        path, config.model if is_pth else None,
        overrides=config.get("model_overrides") if is_pth else None)
    if _HEAD_KEY in checkpoint.overrides:
        raise ValueError(f"{path} is a Freeze_L3 transfer checkpoint; transfer from a "
                         "registry-model checkpoint instead")
    base = PretrainedBase(checkpoint.model, dict(checkpoint.overrides),
                          checkpoint.variables, checkpoint.labels)
    wanted = (config.get("model_overrides") or {}).get("frontend")
    if wanted is not None and wanted != base.build().frontend:
        raise ValueError(f"config front end {wanted} differs from the checkpoint's "
                         f"{base.build().frontend}: the data's sample rate must be the model's")
    if strategy == "scratch":
        base.variables = None  # Same architecture, random initialisation: the baseline.
    return base


def build_model(config: ml_collections.ConfigDict, base: PretrainedBase, num_classes: int,
                output: str = "softmax") -> Transfer:
    """The :class:`Transfer` model of ``config.transfer.strategy`` around ``base``."""
    strategy = strategy_of(config)
    dtype = jnp.bfloat16 if config.get("compute_dtype", "float32") == "bfloat16" else None
    return Transfer(base=base.build(dtype), num_classes=num_classes,
                    head_layers=3 if strategy == "freeze_l3" else 1,
                    hidden_size=config.transfer.get("hidden_size"),
                    freeze_base=strategy in FROZEN_BASE, output=output)


def merge_pretrained(variables: Mapping[str, Any], pretrained: Optional[Mapping[str, Any]]
                     ) -> Dict[str, Any]:
    """``variables`` of a fresh :class:`Transfer` with ``base/`` replaced by ``pretrained``.

    Jittable; shapes must agree exactly (the head keeps its fresh initialisation).
    """
    result = {k: dict(v) for k, v in variables.items()}
    if pretrained is None:
        return result
    for collection in ("params", "batch_stats"):
        if collection not in result:
            continue
        want = jax.tree_util.tree_map(jnp.shape, result[collection][BASE])
        got = jax.tree_util.tree_map(jnp.shape, dict(pretrained.get(collection, {})))
        if want != got:
            raise ValueError(f"pretrained {collection} do not fit the base model: "
                             f"{_tree_difference(want, got)}")
        result[collection][BASE] = jax.tree_util.tree_map(
            lambda fresh, value: jnp.asarray(value, fresh.dtype),
            result[collection][BASE], dict(pretrained[collection]))
    return result


def _tree_difference(want: Any, got: Any) -> str:
    flat_want = flax.traverse_util.flatten_dict(want, sep="/")
    flat_got = flax.traverse_util.flatten_dict(got, sep="/")
    lines = [f"missing {k}" for k in flat_want if k not in flat_got]
    lines += [f"unexpected {k}" for k in flat_got if k not in flat_want]
    lines += [f"{k}: {flat_got[k]} vs {flat_want[k]}" for k in flat_want
              if k in flat_got and flat_got[k] != flat_want[k]]
    return "; ".join(lines[:8]) + (" ..." if len(lines) > 8 else "")


def param_labels(params: Mapping[str, Any], strategy: Optional[str]) -> Any:
    """'trained' or 'frozen' per parameter leaf (the ``optax.multi_transform`` labels).

    Parameters of models without a ``base`` (plain training) are all trained.
    """
    def label(path, _):
        keys = [getattr(p, "key", str(p)) for p in path]
        if not keys or keys[0] != BASE:
            return "trained"
        if strategy in FROZEN_BASE or (len(keys) > 1 and keys[1] in _BASE_CLASSIFIERS):
            return "frozen"
        return "trained"

    return jax.tree_util.tree_map_with_path(label, params)


def trainable_mask(params: Mapping[str, Any], strategy: Optional[str]) -> Any:
    """True for the leaves the optimiser updates (see :func:`param_labels`)."""
    return jax.tree_util.tree_map(lambda l: l == "trained", param_labels(params, strategy))


# ----------------------------------------------------------------------------
# Export and loading: checkpoints the inference tools read.
# ----------------------------------------------------------------------------


def to_checkpoint(model: Transfer, base: PretrainedBase, variables: Mapping[str, Any],
                  step: int, labels: Optional[Sequence[str]]) -> checkpoints.ModelCheckpoint:
    """A model checkpoint of a trained :class:`Transfer`.

    A linear head is folded into the base architecture (``fc_audioset`` := ``fc_transfer``,
    ``num_classes`` = the task's), which computes the same logits at inference: the
    checkpoint is a plain registry model that ``panns-jax tag`` and ``AudioTagger`` read
    (its ``clipwise_output`` is the sigmoid of those logits; rankings are the same).
    A Freeze_L3 head has no registry equivalent: its checkpoint holds the whole Transfer
    tree and a ``transfer_head`` entry in its overrides; read it with :func:`load`.
    """
    params = dict(variables["params"])
    batch_stats = dict(variables.get("batch_stats", {}))
    overrides = {k: v for k, v in base.overrides.items() if k != "dtype"}
    if model.head_layers == 1:
        base_params = dict(params[BASE])
        head = params["fc_transfer"]
        base_params["fc_audioset"] = {"kernel": head["kernel"], "bias": head["bias"]}
        folded = {"params": base_params, "batch_stats": batch_stats.get(BASE, {})}
        return checkpoints.ModelCheckpoint(
            model=base.name, variables=folded, step=step,
            overrides={**overrides, "num_classes": model.num_classes},
            labels=list(labels) if labels else None)
    head = {"layers": model.head_layers, "hidden_size": model.hidden_size,
            "num_classes": model.num_classes, "output": model.output}
    return checkpoints.ModelCheckpoint(
        model=base.name, variables={"params": params, "batch_stats": batch_stats}, step=step,
        overrides={**overrides, _HEAD_KEY: head}, labels=list(labels) if labels else None)


def load(path: str) -> Tuple[nn.Module, Dict[str, Any], Optional[Sequence[str]]]:
    """``(model, variables, labels)`` of any checkpoint a transfer run exports."""
    checkpoint = checkpoints.load(path)
    overrides = dict(checkpoint.overrides)
    head = overrides.pop(_HEAD_KEY, None)
    base = models.get(checkpoint.model, **overrides)
    if head is None:
        return base, checkpoint.variables, checkpoint.labels
    model = Transfer(base=base, num_classes=head["num_classes"], head_layers=head["layers"],
                     hidden_size=head["hidden_size"], freeze_base=True, output=head["output"])
    return model, checkpoint.variables, checkpoint.labels


# ----------------------------------------------------------------------------
# Cross-validation over the folds of ESC-50 / GTZAN / RAVDESS.
# ----------------------------------------------------------------------------


def fold_config(config: ml_collections.ConfigDict, fold: int) -> ml_collections.ConfigDict:
    """``config`` training on every fold but ``fold`` and evaluating on ``fold``."""
    num_folds = int(config.transfer.num_folds)
    if not 1 <= fold <= num_folds:
        raise ValueError(f"fold {fold} not in 1..{num_folds}")
    c = ml_collections.ConfigDict(config.to_dict())
    c.train_folds = tuple(f for f in range(1, num_folds + 1) if f != fold)
    c.eval_folds = (fold,)
    c.transfer.fold = fold
    return c


def cross_validate(config: ml_collections.ConfigDict, workdir: str, *,
                   folds: Optional[Sequence[int]] = None, sources: Optional[Mapping] = None
                   ) -> Dict[str, Any]:
    """Train and evaluate one model per held-out fold in ``workdir/foldK``.

    Each fold resumes like any run; a finished fold (``foldK/result.json``) is not redone.
    Writes and returns ``{'folds': {K: {accuracy, mAP, ...}}, 'mean': {...}}``
    (``workdir/cv_results.json``). ``sources`` as :func:`panns_jax.train.train_and_evaluate`.
    """
    from panns_jax import train  # train imports this module.

    folds = list(folds or range(1, int(config.transfer.num_folds) + 1))
    per_fold: Dict[str, Dict[str, float]] = {}
    for fold in folds:
        fold_dir = os.path.join(workdir, f"fold{fold}")
        result_path = os.path.join(fold_dir, "result.json")
        if os.path.exists(result_path):
            with open(result_path) as f:
                per_fold[str(fold)] = json.load(f)
            continue
        result = train.train_and_evaluate(fold_config(config, fold), fold_dir, sources=sources)
        summary = {k: float(v) for k, v in result.items() if np.ndim(v) == 0}
        if jax.process_index() == 0:
            with open(result_path, "w") as f:
                json.dump(summary, f, indent=2)
        per_fold[str(fold)] = summary
    keys = sorted(set.intersection(*(set(r) for r in per_fold.values())))
    mean = {k: float(np.mean([r[k] for r in per_fold.values()])) for k in keys}
    results = {"strategy": strategy_of(config), "folds": per_fold, "mean": mean}
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
    lines.append(f"mean  {results['mean'][key]:.4f}  ({results['strategy']}, "
                 f"{len(results['folds'])} folds)")
    return "\n".join(lines)


def main() -> None:
    """``python -m panns_jax.transfer {train|cv} --config=... --workdir=... [--folds=1,3]``.

    Flags are defined here, not at import: train.py imports this module beside main.py's
    flags of the same names.
    """
    from absl import app, flags
    from ml_collections import config_flags

    config_flag = config_flags.DEFINE_config_file("config", None, "Transfer config file.")
    workdir_flag = flags.DEFINE_string("workdir", None, "Output directory (cv: foldK/ per fold).")
    folds_flag = flags.DEFINE_list("folds", None, "cv: only these folds (default: all).")
    flags.mark_flags_as_required(["config", "workdir"])

    def run(argv: Sequence[str]) -> None:
        from panns_jax import train

        command = argv[1] if len(argv) > 1 else "cv"
        config, workdir = config_flag.value, workdir_flag.value
        if command == "train":
            result = train.train_and_evaluate(config, workdir)
            print(json.dumps({k: float(v) for k, v in result.items() if np.ndim(v) == 0}))
        elif command == "cv":
            folds = [int(f) for f in folds_flag.value] if folds_flag.value else None
            print(format_results(cross_validate(config, workdir, folds=folds)))
        else:
            raise app.UsageError(f"unknown command {command!r}: use 'train' or 'cv'")

    app.run(run)


if __name__ == "__main__":
    main()
