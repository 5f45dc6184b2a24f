"""Model resolution: what to export, from a checkpoint, a ``.pth``, a zoo name or objects."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Dict, Mapping, Optional, Tuple, Union

if TYPE_CHECKING:
    from panns_jax import checkpoints

Source = Union[str, os.PathLike, "checkpoints.ModelCheckpoint", Tuple[Any, Mapping[str, Any]]]


def resolve_source(
    source: Source, model_name: Optional[str] = None, overrides: Optional[Mapping[str, Any]] = None
) -> Tuple[Any, Dict[str, Any], str]:
    """``(model, variables, name)`` of a checkpoint path, a ModelCheckpoint or
    ``(model, variables)``.

    Paths and zoo names go through :func:`panns_jax.loader.load`. That covers a panns_jax
    checkpoint directory of any kind, an original PANNs ``.pth``, and a pretrained model
    name. A ``.pth`` needs ``model_name``, and ``overrides`` for a model built with other
    arguments.
    """
    from panns_jax import checkpoints

    if isinstance(source, tuple):
        model, variables = source
        return model, dict(variables), model_name or type(model).__name__
    if isinstance(source, checkpoints.ModelCheckpoint):
        return source.build_model(), dict(source.variables), source.model
    from panns_jax import loader

    model, variables, meta = loader.load(os.fspath(source), model=model_name, overrides=overrides)
    return model, variables, meta.name
