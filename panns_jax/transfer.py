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

Freezing is an optimiser mask, never a copy of the model. :func:`param_labels` labels the
frozen leaves, which :func:`panns_jax.optim.paper_optimizer` leaves bitwise unchanged and
without Adam state. The base's own classifier (``fc_audioset``) is unused by every strategy
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

The training loop reaches all of this through :class:`TransferBuilder` (see
:mod:`panns_jax.model_builder`); cross-validation over the folds of ESC-50, GTZAN and
RAVDESS, which drives the loop, is :mod:`panns_jax.crossval`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict, Mapping, Optional, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from panns_jax import checkpoints, loader, models, tasks, zoo
from panns_jax.models.transfer_head import HEAD_KEY as _HEAD_KEY
from panns_jax.models.transfer_head import Transfer, head_spec
from panns_jax.recipe import STRATEGIES, ConfigError

FROZEN_BASE = ("freeze_l1", "freeze_l3")
BASE = "base"  # Name of the pretrained submodule (the original's ``Transfer_Cnn14.base``).


# ----------------------------------------------------------------------------
# Config -> pretrained base -> Transfer model.
# ----------------------------------------------------------------------------


def strategy_of(config: ml_collections.ConfigDict) -> Optional[str]:
    """``config.transfer.strategy`` (validated), or None when the config is no transfer run."""
    transfer = config.get("transfer")
    strategy = transfer.get("strategy") if transfer is not None else None
    if strategy is not None and strategy not in STRATEGIES:
        raise ConfigError(f"config.transfer.strategy must be one of {STRATEGIES}, got {strategy!r}")
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
    directory, an original ``.pth`` or a released model's name), or ``config.model``
    untrained for ``scratch``."""
    strategy = strategy_of(config)
    path = config.transfer.get("checkpoint")
    if not path:
        if strategy != "scratch":
            raise ConfigError(
                f"strategy {strategy!r} needs a pretrained model: set "
                "--config.transfer.checkpoint=DIR (a panns_jax checkpoint, e.g. "
                "WORKDIR/best) or a PyTorch PANNs .pth"
            )
        overrides = dict(config.get("model_overrides", {}) or {})
        return PretrainedBase(config.model, overrides)
    is_pth = os.path.isfile(path) and path.endswith((".pth", ".pt"))
    # A .pth is config.model (+ model_overrides) with the class count of its own head.
    try:
        _, variables, meta = loader.load(
            path,
            model=config.model if is_pth else None,
            overrides=config.get("model_overrides") if is_pth else None,
        )
    except (OSError, ValueError, ImportError) as err:  # Each one line, naming the file.
        raise ConfigError(f"config.transfer.checkpoint: {err}") from err
    if _HEAD_KEY in meta.overrides:
        raise ConfigError(
            f"{path} is a Freeze_L3 transfer checkpoint; transfer from a "
            "registry-model checkpoint instead"
        )
    base = PretrainedBase(meta.name, dict(meta.overrides), variables, meta.labels)
    wanted = (config.get("model_overrides") or {}).get("frontend")
    if wanted is not None and wanted != base.build().frontend:
        raise ConfigError(
            f"config front end {wanted} differs from the checkpoint's "
            f"{base.build().frontend}: the data's sample rate must be the model's"
        )
    if strategy == "scratch":
        base.variables = None  # Same architecture, random initialisation: the baseline.
    return base


def build_model(
    config: ml_collections.ConfigDict,
    base: PretrainedBase,
    num_classes: int,
    output: str = "softmax",
) -> Transfer:
    """The :class:`Transfer` model of ``config.transfer.strategy`` around ``base``."""
    strategy = strategy_of(config)
    dtype = jnp.bfloat16 if config.get("compute_dtype", "float32") == "bfloat16" else None
    return Transfer(
        base=base.build(dtype),
        num_classes=num_classes,
        head_layers=3 if strategy == "freeze_l3" else 1,
        hidden_size=config.transfer.get("hidden_size"),
        freeze_base=strategy in FROZEN_BASE,
        output=output,
    )


def merge_pretrained(
    variables: Mapping[str, Any], pretrained: Optional[Mapping[str, Any]]
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
            raise ValueError(
                f"pretrained {collection} do not fit the base model: {_tree_difference(want, got)}"
            )
        result[collection][BASE] = jax.tree_util.tree_map(
            lambda fresh, value: jnp.asarray(value, fresh.dtype),
            result[collection][BASE],
            dict(pretrained[collection]),
        )
    return result


def _tree_difference(want: Any, got: Any) -> str:
    flat_want = flax.traverse_util.flatten_dict(want, sep="/")
    flat_got = flax.traverse_util.flatten_dict(got, sep="/")
    lines = [f"missing {k}" for k in flat_want if k not in flat_got]
    lines += [f"unexpected {k}" for k in flat_got if k not in flat_want]
    lines += [
        f"{k}: {flat_got[k]} vs {flat_want[k]}"
        for k in flat_want
        if k in flat_got and flat_got[k] != flat_want[k]
    ]
    return "; ".join(lines[:8]) + (" ..." if len(lines) > 8 else "")


def param_labels(params: Mapping[str, Any], strategy: Optional[str]) -> Any:
    """'trained' or 'frozen' per parameter leaf (the ``optax.multi_transform`` labels).

    Parameters of models without a ``base`` (plain training) are all trained.
    """

    def label(path, _):
        keys = [getattr(p, "key", str(p)) for p in path]
        if not keys or keys[0] != BASE:
            return "trained"
        # The base's own classifier is unused once the new head exists.
        if strategy in FROZEN_BASE or (len(keys) > 1 and keys[1] in models.CLASSIFIER_PARAMS):
            return "frozen"
        return "trained"

    return jax.tree_util.tree_map_with_path(label, params)


def trainable_mask(params: Mapping[str, Any], strategy: Optional[str]) -> Any:
    """True for the leaves the optimiser updates (see :func:`param_labels`)."""
    return jax.tree_util.tree_map(lambda l: l == "trained", param_labels(params, strategy))


# ----------------------------------------------------------------------------
# Export and loading: checkpoints the inference tools read.
# ----------------------------------------------------------------------------


def to_checkpoint(
    model: Transfer,
    base: PretrainedBase,
    variables: Mapping[str, Any],
    step: int,
    labels: Optional[Sequence[str]],
) -> checkpoints.ModelCheckpoint:
    """A model checkpoint of a trained :class:`Transfer`.

    A linear head is folded into the base architecture (``fc_audioset`` := ``fc_transfer``,
    ``num_classes`` = the task's), which computes the same logits at inference: the
    checkpoint is a plain registry model that ``panns-jax tag`` and ``AudioTagger`` read
    (its ``clipwise_output`` is the sigmoid of those logits; rankings are the same).
    A Freeze_L3 head has no registry equivalent: its checkpoint holds the whole Transfer
    tree and a ``transfer_head`` entry in its overrides, from which
    :func:`panns_jax.models.get` (and so every checkpoint loader) rebuilds the model.
    Both record the task in ``extra`` (``task``: ``singlelabel`` for a softmax head), which
    :func:`panns_jax.loader.load` reports, since a folded head does not say it.
    """
    task = {tasks.CHECKPOINT_KEY: tasks.for_output(model.output)}
    params = dict(variables["params"])
    batch_stats = dict(variables.get("batch_stats", {}))
    overrides = {k: v for k, v in base.overrides.items() if k != "dtype"}
    if model.head_layers == 1:
        base_params = dict(params[BASE])
        head = params["fc_transfer"]
        base_params[models.CLASSIFIER] = {"kernel": head["kernel"], "bias": head["bias"]}
        folded = {"params": base_params, "batch_stats": batch_stats.get(BASE, {})}
        return checkpoints.ModelCheckpoint(
            model=base.name,
            variables=folded,
            step=step,
            overrides={**overrides, "num_classes": model.num_classes},
            labels=list(labels) if labels else None,
            extra=task,
        )
    return checkpoints.ModelCheckpoint(
        model=base.name,
        variables={"params": params, "batch_stats": batch_stats},
        step=step,
        overrides={**overrides, _HEAD_KEY: head_spec(model)},
        labels=list(labels) if labels else None,
        extra=task,
    )


# ----------------------------------------------------------------------------
# The training loop's model builder (panns_jax.model_builder.ModelBuilder).
# ----------------------------------------------------------------------------


class TransferBuilder:
    """A transfer run's model for the loop: the strategy's :class:`Transfer`, the base's
    pretrained weights merged at init, the strategy's optimiser mask, the folded export.

    The base is loaded on first use, so that an optimiser or a train step can be made from
    the config alone.
    """

    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config
        self.strategy = strategy_of(config)
        self._base: Optional[PretrainedBase] = None

    @property
    def base(self) -> PretrainedBase:
        if self._base is None:
            self._base = load_base(self.config)
        return self._base

    def validate(self) -> None:
        if self.strategy != "scratch":
            path = self.config.transfer.get("checkpoint")
            if path and not os.path.exists(path) and not zoo.is_zoo_name(path):
                raise ConfigError(
                    f"config.transfer.checkpoint {path}: no such checkpoint directory, "
                    ".pth file or released model (panns-jax download --list)"
                )

    def describe(self) -> str:
        return (
            f"transfer ({self.strategy}) from "
            f"{self.config.transfer.get('checkpoint') or 'random init'}: {self.base.name}"
        )

    def sample_rate(self) -> int:
        return models.sample_rate(self.base.build())

    def build(self, num_classes: int, output: str = "sigmoid") -> Transfer:
        return build_model(self.config, self.base, num_classes, output=output)

    def pretrained(self) -> Optional[Dict[str, Any]]:
        variables = self.base.variables
        if not variables:
            return None
        return {k: variables[k] for k in ("params", "batch_stats") if k in variables}

    def init(
        self,
        model: Transfer,
        rng: jax.Array,
        clip_samples: int,
        pretrained: Optional[Mapping[str, Any]],
    ) -> Dict[str, Any]:
        return merge_pretrained(models.init(model, rng, clip_samples), pretrained)

    def param_labels(self, params: Any) -> Any:
        return param_labels(params, self.strategy)

    def to_checkpoint(
        self,
        model: Transfer,
        variables: Mapping[str, Any],
        step: int,
        labels: Optional[Sequence[str]],
    ) -> checkpoints.ModelCheckpoint:
        return to_checkpoint(model, self.base, variables, step, labels)
