"""A registry model with a new head for a transfer task (Kong et al. 2020, Sec. V).

:class:`Transfer` is a model like the others, so that every loader that builds a model
from a checkpoint's ``(name, overrides)`` builds it too: a checkpoint of a Freeze_L3
run stores the base architecture's overrides plus a ``transfer_head`` entry
(:data:`HEAD_KEY`), which :func:`panns_jax.models.get` turns back into this module.
How the strategies train it lives in :mod:`panns_jax.transfer`.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from panns_jax import frontend as fe

HEAD_KEY = "transfer_head"  # Overrides entry of a head that a registry model can't hold.
HEAD_FIELDS = ("layers", "hidden_size", "num_classes", "output")
# The Transfer attribute that each field of a ``transfer_head`` entry holds.
_HEAD_ATTRIBUTES = dict(zip(HEAD_FIELDS, ("head_layers", "hidden_size", "num_classes", "output")))
OUTPUTS = ("softmax", "sigmoid")


class Transfer(nn.Module):
    """``base`` (a registry model) -> its ``embedding`` -> a new head for the target task.

    Attributes:
      base: the pretrained model; its variables live under ``base/``.
      num_classes: classes of the target task.
      head_layers: 1 (``fc_transfer``) or 3 (the paper's Freeze_L3: two ReLU layers
        ``fc_hidden1/2``, then ``fc_transfer``).
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

    @property
    def frontend(self) -> fe.FrontendConfig:
        """The base's front end: the input's sample rate, window and hop."""
        return self.base.frontend

    @property
    def uses_logmel(self) -> bool:
        """Whether the base holds the original's STFT / mel buffers (``panns_jax.convert``)."""
        return getattr(self.base, "uses_logmel", True)

    @property
    def cpu_library_fusions(self) -> bool:
        """The base's (``models.jit_options``)."""
        return getattr(self.base, "cpu_library_fusions", False)

    @property
    def declared_outputs(self) -> Any:
        """The base's (``models.outputs``): the head replaces only the clip scores."""
        return self.base.declared_outputs

    @nn.compact
    def __call__(
        self, waveform: jax.Array, train: bool = False, mixup_lambda: Optional[jax.Array] = None
    ) -> Dict[str, jax.Array]:
        if self.freeze_base:
            if train and mixup_lambda is not None:  # The eval-mode base would skip mixup.
                waveform = fe.mixup(waveform, mixup_lambda)
            outputs = dict(self.base(waveform, train=False))
        else:
            outputs = dict(self.base(waveform, train=train, mixup_lambda=mixup_lambda))
        if "embedding" not in outputs:
            raise ValueError(
                f"{type(self.base).__name__} has no clip 'embedding' output: "
                "transfer needs a clip-level model (not a decision-level SED head)"
            )
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
        outputs["clipwise_output"] = (
            jax.nn.softmax(logits) if self.output == "softmax" else jax.nn.sigmoid(logits)
        )
        return outputs


def head_spec(model: Transfer) -> Dict[str, Any]:
    """The ``transfer_head`` overrides entry that rebuilds ``model``'s head."""
    return {field: getattr(model, attribute) for field, attribute in _HEAD_ATTRIBUTES.items()}


def from_head_spec(base: nn.Module, head: Mapping[str, Any]) -> Transfer:
    """The :class:`Transfer` of a checkpoint's ``transfer_head`` entry around ``base``.

    Raises a one-line ValueError for an entry that :func:`head_spec` cannot have written.
    The head's base is frozen: the model is built for inference, where a frozen base
    runs in eval mode anyway.
    """
    if not isinstance(head, Mapping) or set(head) != set(HEAD_FIELDS):
        raise ValueError(
            f"{HEAD_KEY} must be an object with keys {list(HEAD_FIELDS)}, got {head!r}"
        )
    layers, hidden, classes, output = (head[k] for k in HEAD_FIELDS)
    if not (
        isinstance(layers, int)
        and layers >= 1
        and isinstance(classes, int)
        and classes >= 1
        and (hidden is None or isinstance(hidden, int) and hidden >= 1)
        and output in OUTPUTS
    ):
        raise ValueError(
            f"{HEAD_KEY} has bad values: {dict(head)!r} (layers >= 1, "
            f"num_classes >= 1, hidden_size null or >= 1, output in {OUTPUTS})"
        )
    attributes = {attribute: head[field] for field, attribute in _HEAD_ATTRIBUTES.items()}
    return Transfer(base=base, freeze_base=True, **attributes)
