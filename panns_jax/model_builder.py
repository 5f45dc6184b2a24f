"""What the training loop trains: one interface, chosen from the config in one place.

The loop (:mod:`panns_jax.train`) asks a :class:`ModelBuilder` for the module, its initial
variables (pretrained weights merged), which parameters the optimiser may update, and the
checkpoint to export; it never looks at ``config.model`` or ``config.transfer`` itself.
:class:`RegistryBuilder` trains a registry model from random initialisation (the paper's
AudioSet tagging, Sec. IV); :class:`panns_jax.transfer.TransferBuilder` puts a pretrained
base under a new head (Sec. V). :func:`for_config` picks one.

Import order (no circle): train -> model_builder -> transfer -> models; crossval -> train.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Protocol, Sequence, Tuple, runtime_checkable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from panns_jax import checkpoints, models, transfer

Variables = Mapping[str, Any]  # {'params': ..., 'batch_stats': ...}
Labels = Optional[Sequence[str]]  # Class names, one per output, if the data has them.


@runtime_checkable
class ModelBuilder(Protocol):
    """How a run's model is built, initialised, partly frozen and exported."""

    def validate(self) -> None:
        """Raise ConfigError for what is wrong in the config's model fields, loading nothing."""

    def describe(self) -> str:
        """One line for the log: what is trained, from what."""

    def sample_rate(self) -> int:
        """The model's input rate (Hz): the data pipeline resamples to it."""

    def build(self, num_classes: int, output: str = "sigmoid") -> nn.Module:
        """The module for ``num_classes`` classes; ``output`` is the task's activation of
        ``clipwise_output`` where the model lets it be chosen ('sigmoid' or 'softmax')."""

    def pretrained(self) -> Optional[Dict[str, Any]]:
        """Host arrays that :meth:`init` merges in (a jit argument, not a constant), or None."""

    def init(
        self, model: nn.Module, rng: jax.Array, clip_samples: int, pretrained: Optional[Variables]
    ) -> Dict[str, Any]:
        """Jittable: ``{'params', 'batch_stats'}`` of ``model``, ``pretrained`` merged in."""

    def param_labels(self, params: Any) -> Optional[Any]:
        """'trained' / 'frozen' per parameter leaf (``optax.multi_transform`` labels), or
        None when every parameter trains."""

    def to_checkpoint(
        self, model: nn.Module, variables: Variables, step: int, labels: Labels
    ) -> checkpoints.ModelCheckpoint:
        """The inference checkpoint of trained host ``variables``."""


def registry_model(
    config: ml_collections.ConfigDict, num_classes: int
) -> Tuple[nn.Module, Dict[str, Any]]:
    """``config.model`` with ``config.model_overrides``, ``num_classes`` and the compute
    dtype; returns ``(module, overrides)``."""
    overrides = dict(config.get("model_overrides", {}) or {})
    overrides["num_classes"] = num_classes
    if config.get("compute_dtype", "float32") == "bfloat16":
        overrides["dtype"] = jnp.bfloat16
    return models.get(config.model, **overrides), overrides


class RegistryBuilder:
    """A registry model (``config.model``) from random initialisation; all of it trains.

    Its ``clipwise_output`` is the registry model's own (sigmoid); a task that needs other
    scores computes them from ``logits``, so ``output`` is not used.
    """

    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config

    def validate(self) -> None:
        pass  # validate_config checks config.model and its overrides.

    def describe(self) -> str:
        return f"{self.config.model} from random initialisation"

    def sample_rate(self) -> int:
        overrides = dict(self.config.get("model_overrides", {}) or {})
        return models.sample_rate(models.get(self.config.model, **overrides))

    def build(self, num_classes: int, output: str = "sigmoid") -> nn.Module:
        del output
        return registry_model(self.config, num_classes)[0]

    def pretrained(self) -> Optional[Dict[str, Any]]:
        return None

    def init(
        self,
        model: nn.Module,
        rng: jax.Array,
        clip_samples: int,
        pretrained: Optional[Variables] = None,
    ) -> Dict[str, Any]:
        del pretrained
        return models.init(model, rng, clip_samples)

    def param_labels(self, params: Any) -> Optional[Any]:
        return None

    def to_checkpoint(
        self, model: nn.Module, variables: Variables, step: int, labels: Labels
    ) -> checkpoints.ModelCheckpoint:
        overrides = {
            k: v
            for k, v in registry_model(self.config, model.num_classes)[1].items()
            if k != "dtype"
        }
        return checkpoints.ModelCheckpoint(
            model=self.config.model,
            variables=variables,
            overrides=overrides,
            step=step,
            labels=list(labels) if labels else None,
        )


def for_config(config: ml_collections.ConfigDict) -> ModelBuilder:
    """The builder of ``config``: transfer when ``config.transfer.strategy`` is set
    (validated), else the registry model. Loads nothing until asked."""
    if transfer.strategy_of(config) is not None:
        return transfer.TransferBuilder(config)
    return RegistryBuilder(config)
