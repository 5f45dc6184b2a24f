"""The one door from "a model" to a module, its variables and what they mean.

    from panns_jax import loader
    module, variables, meta = loader.load("ckpt/best")      # any checkpoint we write
    module, variables, meta = loader.load("Cnn14")          # a released model (zoo)
    module, variables, meta = loader.load("x.pth", model="Cnn10", overrides={...})
    module, variables, meta = loader.load(model="MobileNetV1")  # random weights
    probabilities = module.apply(variables, waveform)["clipwise_output"]

Every entry point (tag, sed, embed, export, stream, HEAR, transfer learning, the
notebooks) loads through :func:`load`, so each kind of checkpoint works everywhere. The
kinds are these:

* A panns_jax checkpoint directory (:mod:`panns_jax.checkpoints`) of any run. That covers
  plain training, a transfer run's folded Freeze_L1 or fine-tuned model (a registry model
  with the task's class count), and a Freeze_L3 model, whose ``transfer_head`` override
  :func:`panns_jax.models.get` turns into a
  :class:`~panns_jax.models.transfer_head.Transfer`. The directory records its own
  architecture, so ``overrides`` are refused.
* An original PANNs ``.pth``, converted in memory without torch. ``model`` names its
  architecture and ``overrides`` its further arguments. The class count is read from its
  head.
* The name of a released model (:mod:`panns_jax.zoo`), downloaded, verified and converted
  on first use. An existing path of the same name wins.
* Nothing: ``model`` (default :data:`DEFAULT_MODEL`) initialised at random from ``seed``.
  Its ``metadata.kind`` is ``random``; its outputs mean nothing, and callers say so.

Errors are one line. A source that is neither a path nor a zoo name raises
``FileNotFoundError``; everything else raises a ``ValueError`` such as
:class:`~panns_jax.checkpoints.CheckpointError`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Any, Dict, Iterator, Mapping, Optional, Tuple

import flax.linen as nn
import jax

from panns_jax import checkpoints, fileio, models, tasks, zoo
from panns_jax.models import transfer_head

DEFAULT_MODEL = "Cnn14"
# Where, in the user cache, the records of verified checkpoints in read-only directories go
# (the ``records`` of :func:`panns_jax.checkpoints.load`).
RECORDS_DIR = "verified"
KINDS = ("checkpoint", "pth", "zoo", "random")
# How errors name the sources that record their own architecture. The first text says
# why overrides are refused; the second begins the sentence that names the architecture.
_RECORDED = {
    "checkpoint": (
        "{source}: a panns_jax checkpoint directory records its own overrides",
        "{source} holds",
    ),
    "zoo": ("{source} is a pretrained model with its own architecture", "{source} is a pretrained"),
}


@dataclasses.dataclass(frozen=True)
class Metadata:
    """What a loaded model is and how to read its outputs.

    Attributes:
      name: the registry architecture (``Cnn14``); a Freeze_L3 model's base architecture.
      overrides: the registry overrides that rebuild ``module`` with
        :func:`panns_jax.models.get` (a Freeze_L3 model's include ``transfer_head``).
      labels: the class names, one per output class: the checkpoint's own, else AudioSet's
        527 for a 527-class head, else ``class 0``, ``class 1``, ...
      sample_rate: the rate (Hz) the module's input must have.
      task: ``multilabel`` (independent sigmoid scores, the paper's AudioSet tagging) or
        ``singlelabel`` (one class per clip: a softmax head, or a checkpoint that records
        a single-label training task).
      kind: where the weights came from: ``checkpoint``, ``pth``, ``zoo`` or ``random``.
      source: the path or zoo name given (None for random weights).
      step: the training step (iteration) of the weights; 0 for random ones.
      outputs: what ``module.apply`` returns (:func:`panns_jax.models.outputs`).
    """

    name: str
    overrides: Mapping[str, Any]
    labels: Tuple[str, ...]
    sample_rate: int
    task: str
    kind: str
    source: Optional[str]
    step: int
    outputs: models.Outputs


@dataclasses.dataclass(frozen=True)
class Loaded:
    """A module, its ``{'params', 'batch_stats'}`` and its :class:`Metadata`.

    It unpacks as ``module, variables, metadata = load(...)``.
    """

    module: nn.Module
    variables: Dict[str, Any]
    metadata: Metadata

    def __iter__(self) -> Iterator[Any]:
        return iter((self.module, self.variables, self.metadata))


def labels_for(module: nn.Module, given: Optional[Any]) -> Tuple[str, ...]:
    """The checkpoint's class names, else AudioSet's for 527 classes, else placeholders."""
    if given is not None:
        return tuple(given)
    from panns_jax import audio  # Its decoders are not needed to load a model.

    classes = getattr(module, "num_classes", None)
    names = audio.audioset_labels()
    if classes is None or classes == len(names):
        return tuple(names)
    return tuple(f"class {i}" for i in range(classes))


def task_of(module: nn.Module, extra: Optional[Mapping[str, Any]] = None) -> str:
    """The task whose outputs ``module`` gives, as :mod:`panns_jax.tasks` names it.

    A transfer head's activation decides it (:func:`panns_jax.tasks.for_output`). Any
    other module gives the task its checkpoint's ``extra`` records, as a folded Freeze_L1
    or fine-tuned model of ESC-50 does, and multi-label tagging when none is recorded.
    """
    if isinstance(module, transfer_head.Transfer):
        return tasks.for_output(module.output)
    recorded = (extra or {}).get(tasks.CHECKPOINT_KEY)
    return recorded if recorded in tasks.TASKS else tasks.MULTILABEL


def _finish(
    checkpoint: checkpoints.ModelCheckpoint,
    kind: str,
    source: Optional[str],
    module: Optional[nn.Module] = None,
) -> Loaded:
    module = module if module is not None else checkpoint.build_model()
    variables = {k: v for k, v in checkpoint.variables.items() if k in checkpoints.COLLECTIONS}
    metadata = Metadata(
        name=checkpoint.model,
        overrides=dict(checkpoint.overrides),
        labels=labels_for(module, checkpoint.labels),
        sample_rate=models.sample_rate(module),
        task=task_of(module, checkpoint.extra),
        kind=kind,
        source=source,
        step=int(checkpoint.step),
        outputs=models.outputs(module),
    )
    return Loaded(module, variables, metadata)


def load(
    source: Optional[str] = None,
    *,
    model: Optional[str] = None,
    overrides: Optional[Mapping[str, Any]] = None,
    seed: int = 0,
) -> Loaded:
    """The module, variables and metadata of ``source``; see the module docstring.

    Args:
      source: a checkpoint directory, an original ``.pth``, a zoo name, or None (random).
      model: the architecture. A ``.pth`` needs it, random weights default to
        :data:`DEFAULT_MODEL`, and any other source must hold the architecture it names.
      overrides: further architecture arguments of a ``.pth`` or random model. A
        checkpoint directory or zoo model records its own, so they are refused there.
      seed: the random initialisation's seed (random weights only).
    """
    overrides = dict(overrides or {})
    if source is None:
        return _random(model or DEFAULT_MODEL, overrides, seed)
    source = os.fspath(source)
    exists = os.path.exists(source)
    if not exists and not zoo.is_zoo_name(source):
        raise FileNotFoundError(
            f"{source}: no such checkpoint directory or .pth file, nor a "
            "pretrained model name (`panns-jax download --list`)"
        )
    if not exists or checkpoints.is_model_checkpoint(source):
        return _recorded(source, "checkpoint" if exists else "zoo", model, overrides)
    return _pth(source, model, overrides)


def _random(name: str, overrides: Dict[str, Any], seed: int) -> Loaded:
    module = models.get(name, **overrides)
    variables = models.init(module, jax.random.key(seed), models.sample_rate(module))
    checkpoint = checkpoints.ModelCheckpoint(model=name, variables=variables, overrides=overrides)
    return _finish(checkpoint, "random", None, module)


def _recorded(source: str, kind: str, model: Optional[str], overrides: Dict[str, Any]) -> Loaded:
    """A checkpoint directory or a zoo model, which record their own architecture.

    Overrides are refused for them, and ``model`` only checks what they hold.
    """
    what, holds = (text.format(source=source) for text in _RECORDED[kind])
    if overrides:
        raise ValueError(f"{what}; --overrides applies to a .pth or a random model only")
    if kind == "checkpoint":  # A read-only directory's record goes to the user cache.
        records = os.path.join(fileio.cache_dir(), RECORDS_DIR)
        checkpoint = checkpoints.load(source, records=records)
    else:
        checkpoint = zoo.load(source)
    if model and model != checkpoint.model:
        raise ValueError(f"{holds} {checkpoint.model}, not {model}")
    return _finish(checkpoint, kind, source)


def _pth(source: str, model: Optional[str], overrides: Dict[str, Any]) -> Loaded:
    """An original ``.pth`` of architecture ``model``, converted in memory."""
    if os.path.isdir(source):
        raise ValueError(f"{source}: not a panns_jax checkpoint directory")
    if not model:
        raise ValueError(
            f"{source}: not a panns_jax checkpoint directory; name the architecture "
            "of an original .pth with --model"
        )
    from panns_jax import convert  # The .pth reader: not needed for our own checkpoints.

    state, step = convert.read_torch_checkpoint(source)
    checkpoint = convert.torch_to_checkpoint(state, model, step=step, overrides=overrides)
    return _finish(checkpoint, "pth", source)


def add_arguments(
    parser: argparse.ArgumentParser, *, checkpoint_default: str, model_default: str
) -> None:
    """Add ``--checkpoint``, ``--model`` and ``--overrides``, the options every command line
    uses to name the model it hands to :func:`load`.

    The defaults differ by command, so each command states its own in the help text.
    """
    parser.add_argument(
        "--checkpoint",
        default=None,
        help="panns_jax checkpoint directory, original PANNs .pth, or a pretrained model "
        "name such as Cnn14 (`panns-jax download --list`; downloaded and cached on first "
        f"use); default: {checkpoint_default}",
    )
    parser.add_argument(
        "--model",
        default=None,
        help=f"architecture name (default: the checkpoint's, else {model_default})",
    )
    parser.add_argument(
        "--overrides",
        type=checkpoints.parse_overrides,
        default=None,
        help="JSON object of architecture arguments for a .pth or a random model, "
        "e.g. '{\"widths\": [16, 32, 64, 128]}'",
    )
