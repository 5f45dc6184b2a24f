"""Model checkpoints: a directory with the variables (orbax) and what built them (JSON).

    DIR/panns_jax.json   {"format": 1, "model": "Cnn14", "overrides": {...}, "step": 0,
                          "labels": null | [class names]}
    DIR/variables/       orbax checkpoint of {'params', 'batch_stats'}

Written atomically: everything goes to a temporary sibling directory that is renamed
into place only when complete, so a crash or an error never leaves a half checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from typing import Any, Dict, List, Optional

METADATA_FILE = "panns_jax.json"
VARIABLES_DIR = "variables"
FORMAT_VERSION = 1


@dataclasses.dataclass
class ModelCheckpoint:
    """A model's name, its registry overrides, its variables and its training step."""

    model: str
    variables: Dict[str, Any]
    overrides: Dict[str, Any] = dataclasses.field(default_factory=dict)
    step: int = 0
    labels: Optional[List[str]] = None  # Class names, when not AudioSet's 527.

    def build_model(self):
        from panns_jax import models

        return models.get(self.model, **self.overrides)


def _encode_overrides(overrides: Dict[str, Any]) -> Dict[str, Any]:
    """JSON-able overrides: a FrontendConfig becomes {"frontend": {...fields}}."""
    from panns_jax.frontend import FrontendConfig

    encoded = {}
    for key, value in overrides.items():
        if isinstance(value, FrontendConfig):
            value = {"__frontend__": dataclasses.asdict(value)}
        elif isinstance(value, tuple):
            value = list(value)
        encoded[key] = value
    return encoded


def _decode_overrides(overrides: Dict[str, Any]) -> Dict[str, Any]:
    from panns_jax.frontend import FrontendConfig

    decoded = {}
    for key, value in overrides.items():
        if isinstance(value, dict) and "__frontend__" in value:
            value = FrontendConfig(**value["__frontend__"])
        elif isinstance(value, list):
            value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
        decoded[key] = value
    return decoded


def is_model_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(path, METADATA_FILE))


def save(path: str, checkpoint: ModelCheckpoint, *, overwrite: bool = False) -> str:
    """Write ``checkpoint`` to directory ``path`` atomically; returns the absolute path."""
    import orbax.checkpoint as ocp

    path = os.path.abspath(path)
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True (--overwrite) to replace it")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    try:
        variables = {k: v for k, v in checkpoint.variables.items() if k in ("params", "batch_stats")}
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(os.path.join(staging, VARIABLES_DIR), variables)
        checkpointer.wait_until_finished()
        metadata = {"format": FORMAT_VERSION, "model": checkpoint.model,
                    "overrides": _encode_overrides(checkpoint.overrides), "step": int(checkpoint.step),
                    "labels": checkpoint.labels}
        with open(os.path.join(staging, METADATA_FILE), "w") as f:
            json.dump(metadata, f, indent=2)
        if os.path.exists(path):
            shutil.rmtree(path)
        os.replace(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return path


def load(path: str) -> ModelCheckpoint:
    """Read a checkpoint written by :func:`save` (variables as numpy arrays)."""
    import orbax.checkpoint as ocp

    path = os.path.abspath(path)
    if not is_model_checkpoint(path):
        raise FileNotFoundError(
            f"{path} is not a panns_jax checkpoint (no {METADATA_FILE}); convert an original "
            "PyTorch checkpoint with `panns-jax-convert from-torch CKPT.pth --model NAME --out DIR`")
    with open(os.path.join(path, METADATA_FILE)) as f:
        metadata = json.load(f)
    variables = ocp.StandardCheckpointer().restore(os.path.join(path, VARIABLES_DIR))
    variables = {k: v for k, v in variables.items()}
    return ModelCheckpoint(model=metadata["model"], variables=variables,
                           overrides=_decode_overrides(metadata.get("overrides", {})), step=metadata.get("step", 0),
                           labels=metadata.get("labels"))
