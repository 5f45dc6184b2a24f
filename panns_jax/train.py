"""Training and evaluation loop, readable top to bottom.

Sections: mesh and shardings -> input -> model and train state -> train/eval steps ->
checkpoint / resume -> the loop (log, evaluate, checkpoint, stop on NaN).

The recipe is the paper's (Kong et al. 2020, Sec. IV; golden/TRAINING.md): batch 32,
Adam with AMSGrad at lr 1e-3, binary cross-entropy on the sigmoid outputs, mixup
(alpha 1) and SpecAugment inside the model, balanced sampling, evaluation every 2000
steps. Data parallel over a ``jax.sharding.Mesh`` with a 'data' axis; parameters
replicated, or the largest ones sharded FSDP-style over the same axis.

The loop does not care what it trains: a :class:`Task` (``config.task``) owns the loss
and the metrics (multi-label tagging or single-label classification), and a
:class:`panns_jax.model_builder.ModelBuilder` owns the model: a registry model, or
(``config.transfer``) a pretrained base with a new head and an optimiser mask that freezes
part of it.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import json
import os
import re
import shutil
import tempfile
import time
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Sequence, Tuple

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from panns_jax import (
    checkpoints,
    fileio,
    frontend,
    loader,
    metrics,
    model_builder,
    models,
    optim,
    recipe,
    tasks,
)

Batch = Dict[str, np.ndarray]


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or Inf; the last good checkpoint is kept."""


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array

    @classmethod
    def create(
        cls, variables: Mapping[str, Any], optimizer: optax.GradientTransformation, rng: jax.Array
    ) -> "TrainState":
        """Step 0 of ``variables`` (``{'params', 'batch_stats'?}``) with a fresh optimizer."""
        params = variables["params"]
        return cls(
            step=jnp.zeros([], jnp.int32),
            params=params,
            batch_stats=variables.get("batch_stats", {}),
            opt_state=optimizer.init(params),
            rng=rng,
        )


# ----------------------------------------------------------------------------
# Mesh and shardings: the one place that decides where arrays live.
# ----------------------------------------------------------------------------


def make_mesh(num_devices: Optional[int] = None) -> Mesh:
    """A 1-D mesh over every device of every host (or the first ``num_devices``), axis 'data'.

    Devices are ordered host by host, so host h holds rows h*B .. h*B+B-1 of each global
    batch (B = batch / hosts): the rows its input pipeline reads (panns_jax.data.pipeline).
    """
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    if num_devices and jax.process_count() > 1 and num_devices != len(devices):
        raise ConfigError(
            f"config.num_devices={num_devices} on {jax.process_count()} "
            f"processes: a multi-host run uses all {len(devices)} devices; "
            "unset config.num_devices"
        )
    return Mesh(np.asarray(devices[:num_devices] if num_devices else devices), ("data",))


def param_sharding(mesh: Mesh, shapes: Any, fsdp_min_size: Optional[int]) -> Any:
    """Replicated parameters, or FSDP: arrays of >= ``fsdp_min_size`` elements are split
    over 'data' along their largest axis that the device count divides."""
    replicated = NamedSharding(mesh, P())
    devices = mesh.shape["data"]

    def spec(x):
        if not fsdp_min_size or x.size < fsdp_min_size or devices == 1:
            return replicated
        for axis in np.argsort(x.shape)[::-1]:
            if x.shape[axis] % devices == 0:
                names = [None] * len(x.shape)
                names[axis] = "data"
                return NamedSharding(mesh, P(*names))
        return replicated

    return jax.tree_util.tree_map(spec, shapes)


def global_batch(mesh: Mesh, local: Batch) -> Dict[str, jax.Array]:
    """Host-local numpy batch -> global arrays sharded over 'data' along the batch axis."""
    sharding = NamedSharding(mesh, P("data"))
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


# ----------------------------------------------------------------------------
# Model, loss and steps.
# ----------------------------------------------------------------------------


build_model = model_builder.registry_model  # (module, overrides) of config.model.


class Task:
    """What is learnt: the loss on the model's outputs, the eval scores and metrics.

    Scenic-style, so that the loop never branches on the kind of problem. Targets are
    always the loader's ``(B, C)`` float rows (multi-hot, or one-hot for a single label;
    mixed pairwise under mixup).
    """

    name: str = ""
    output: str = "sigmoid"  # Activation of a new head's clipwise_output (transfer).
    best_metric: str = "mAP"  # The metric the 'best' checkpoint maximises.
    summary_keys: Tuple[str, ...] = ("mAP", "mAUC", "d_prime")  # Logged and printed.

    def loss(self, outputs: Dict[str, jax.Array], targets: jax.Array) -> jax.Array:
        raise NotImplementedError

    def scores(self, outputs: Dict[str, jax.Array]) -> jax.Array:
        """Per-class scores that evaluation ranks (probabilities)."""
        return outputs["clipwise_output"]

    def evaluate(self, scores: np.ndarray, targets: np.ndarray) -> Dict[str, Any]:
        return metrics.evaluate(scores, targets)

    def summary(self, result: Mapping[str, Any]) -> str:
        """``summary_keys`` of an evaluation as one line, e.g. ``mAP 0.4312  mAUC ...``."""
        return "  ".join(f"{k} {float(result[k]):.4f}" for k in self.summary_keys)


class MultiLabelTask(Task):
    """Audio tagging as in the paper: BCE on the sigmoid outputs; mAP, mAUC, d'."""

    name = "multilabel"

    def loss(self, outputs: Dict[str, jax.Array], targets: jax.Array) -> jax.Array:
        return binary_cross_entropy(outputs["clipwise_output"], targets)


class SingleLabelTask(Task):
    """One class per clip (ESC-50, GTZAN, RAVDESS): softmax cross-entropy on the logits.

    Accuracy counts the top-scoring class being a label of the clip; mAP/mAUC/d' are
    reported beside it (per-class one-vs-rest).
    """

    name = "singlelabel"
    output = "softmax"
    best_metric = "accuracy"
    summary_keys = ("accuracy", "mAP", "mAUC", "d_prime")

    def loss(self, outputs: Dict[str, jax.Array], targets: jax.Array) -> jax.Array:
        logits = outputs["logits"].astype(jnp.float32)
        return jnp.mean(optax.softmax_cross_entropy(logits, targets))

    def scores(self, outputs: Dict[str, jax.Array]) -> jax.Array:
        return jax.nn.softmax(outputs["logits"].astype(jnp.float32), axis=-1)

    def evaluate(self, scores: np.ndarray, targets: np.ndarray) -> Dict[str, Any]:
        result = metrics.evaluate(scores, targets)
        scores, targets = np.asarray(scores), np.asarray(targets)
        top = np.argmax(scores, axis=1)
        result["accuracy"] = float(np.mean(targets[np.arange(len(top)), top] > 0.5))
        return result


TASKS = {"multilabel": MultiLabelTask, "singlelabel": SingleLabelTask}


def get_task(config: ml_collections.ConfigDict) -> Task:
    """The :class:`Task` of ``config.task`` (default 'multilabel', the paper's tagging)."""
    name = config.get("task", "multilabel") or "multilabel"
    if name not in TASKS:
        raise ValueError(f"config.task must be one of {sorted(TASKS)}, got {name!r}")
    return TASKS[name]()


def make_optimizer(
    config: ml_collections.ConfigDict, builder: Optional[model_builder.ModelBuilder] = None
) -> optax.GradientTransformation:
    """The paper's optimiser; where the builder freezes parameters, masked so that frozen
    ones get ``optax.set_to_zero()`` (and no Adam state). ``builder``: the config's."""
    optimizer = optim.paper_optimizer(
        config.learning_rate, config.b1, config.b2, config.eps, config.get("grad_clip_norm")
    )
    builder = builder or model_builder.for_config(config)
    if builder.param_labels({}) is None:  # Nothing frozen: no mask, the plain state.
        return optimizer
    return optax.multi_transform(
        {"trained": optimizer, "frozen": optax.set_to_zero()}, builder.param_labels
    )


def binary_cross_entropy(probabilities: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean BCE on probabilities as PyTorch's BCELoss computes it: each log clamped at -100,
    and the gradient ``(p - t) / max(p (1 - p), 1e-12)``, finite where a saturated sigmoid
    rounds ``p`` to exactly 0 or 1 (differentiating the clamped logs gives 0 * inf = NaN)."""
    return _bce(probabilities.astype(jnp.float32), targets.astype(jnp.float32))


def _bce_terms(p: jax.Array) -> Tuple[jax.Array, jax.Array]:
    return jnp.maximum(jnp.log(p), -100.0), jnp.maximum(jnp.log1p(-p), -100.0)


@jax.custom_vjp
def _bce(p: jax.Array, targets: jax.Array) -> jax.Array:
    log_p, log_not_p = _bce_terms(p)
    return -jnp.mean(targets * log_p + (1 - targets) * log_not_p)


def _bce_fwd(p, targets):
    return _bce(p, targets), (p, targets)


def _bce_bwd(residuals, g):
    p, targets = residuals
    scale = g / p.size
    log_p, log_not_p = _bce_terms(p)
    return (scale * (p - targets) / jnp.maximum(p * (1 - p), 1e-12), scale * (log_not_p - log_p))


_bce.defvjp(_bce_fwd, _bce_bwd)


def make_train_step(
    model: flax.linen.Module,
    optimizer: optax.GradientTransformation,
    config: ml_collections.ConfigDict,
    builder: Optional[model_builder.ModelBuilder] = None,
) -> Callable[[TrainState, Dict[str, jax.Array]], Tuple[TrainState, Dict[str, jax.Array]]]:
    mixup_on = config.mixup != "none"
    task = get_task(config)
    labels_of = (builder or model_builder.for_config(config)).param_labels

    def train_step(state: TrainState, batch: Dict[str, jax.Array]):
        rng = jax.random.fold_in(state.rng, state.step)
        dropout_rng, specaug_rng, mixup_rng = jax.random.split(rng, 3)
        targets = batch["labels"]
        lam = None
        if mixup_on:  # The loader delivers 2B clips; pairs (2i, 2i+1) are mixed.
            lam = frontend.sample_mixup_lambda(mixup_rng, targets.shape[0] // 2, config.mixup_alpha)
            targets = frontend.mixup(targets, lam)

        def loss_fn(params):
            outputs, updates = model.apply(
                {"params": params, "batch_stats": state.batch_stats},
                batch["audio"],
                train=True,
                mixup_lambda=lam,
                rngs={"dropout": dropout_rng, "specaug": specaug_rng},
                mutable=["batch_stats"],
            )
            loss = task.loss(outputs, targets)
            return loss, updates["batch_stats"]

        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        labels = labels_of(params)
        if labels is not None:  # Frozen leaves pass through: bitwise, even for -0.0.
            params = jax.tree_util.tree_map(
                lambda label, new, old: new if label == "trained" else old,
                labels,
                params,
                state.params,
            )
        new_state = state.replace(
            step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state
        )
        return new_state, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

    return train_step


def make_eval_step(
    model: flax.linen.Module, task: Optional[Task] = None
) -> Callable[..., jax.Array]:
    task = task or MultiLabelTask()

    def eval_step(params, batch_stats, audio):
        outputs = model.apply({"params": params, "batch_stats": batch_stats}, audio)
        return task.scores(outputs)

    return eval_step


# ----------------------------------------------------------------------------
# Evaluation.
# ----------------------------------------------------------------------------


def evaluate(
    eval_fn: Callable[..., Any],
    state: TrainState,
    eval_batches: Iterable[Any],
    mesh: Mesh,
    task: Optional[Task] = None,
) -> Dict[str, Any]:
    """The task's metrics (mAP, mAUC, d'; accuracy) over the eval split, and
    ``num_examples``: each host's examples once, padded rows masked out.

    Every process calls it (collectives). Labels and mask travel as global arrays with the
    scores' sharding, so rows stay paired whatever the device order; every host gets all
    rows back and computes the same metrics.
    """
    scores, targets = [], []
    for batch in eval_batches:
        arrays = global_batch(mesh, {k: batch[k] for k in ("audio", "labels", "mask")})
        gathered = multihost_utils.process_allgather(
            {
                "scores": eval_fn(state.params, state.batch_stats, arrays["audio"]),
                "labels": arrays["labels"],
                "mask": arrays["mask"],
            },
            tiled=True,
        )
        mask = np.asarray(gathered["mask"])
        scores.append(np.asarray(gathered["scores"])[mask])
        targets.append(np.asarray(gathered["labels"])[mask])
    result = (task or MultiLabelTask()).evaluate(np.concatenate(scores), np.concatenate(targets))
    result["num_examples"] = int(sum(len(t) for t in targets))
    return result


def write_per_class_ap(
    workdir: str, step: int, result: Dict[str, Any], class_names: Optional[Sequence[str]]
) -> str:
    path = os.path.join(workdir, "eval", f"per_class_step{step:08d}.csv")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("index,label,average_precision,auc\n")
        for i, (ap, auc) in enumerate(zip(result["average_precision"], result["auc"])):
            name = class_names[i] if class_names and i < len(class_names) else str(i)
            f.write(f'{i},"{name}",{ap:.6f},{auc:.6f}\n')
    return path


# ----------------------------------------------------------------------------
# The loop.
# ----------------------------------------------------------------------------


# ----------------------------------------------------------------------------
# Config validation: every value checked before anything is compiled or written.
# ----------------------------------------------------------------------------

ConfigError = recipe.ConfigError


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, (bool, np.bool_)
    )


def _writable_dir(workdir: str) -> Optional[str]:
    """Why ``workdir`` cannot hold a run (None if it can): a file in its place, or a
    directory (itself or its first existing ancestor) where no file can be created."""
    path = os.path.abspath(workdir)
    probe = path
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        where = "is" if probe == path else f"is below {probe}, which is"
        return f"{workdir} {where} a file, not a directory: choose another --workdir"
    try:  # The only reliable test: root ignores mode bits, read-only mounts do not.
        fd, name = tempfile.mkstemp(prefix=".panns_jax_write_test-", dir=probe)
        os.close(fd)
        os.remove(name)
    except OSError as err:
        return f"{workdir} cannot be written ({probe}: {err.strerror}): choose a writable --workdir"
    return None


def validate_config(config: ml_collections.ConfigDict, workdir: Optional[str] = None) -> None:
    """Raise :class:`ConfigError` (one line: the field, its value, what it must be) for a
    config that cannot train, before anything is compiled or written; also checks that
    ``workdir`` can be written when given.
    """

    def fail(message: str) -> None:
        raise ConfigError(message)

    def check(key: str, ok, must: str) -> None:
        value = config.get(key)
        try:
            good = bool(ok(value))
        except (TypeError, ValueError):
            good = False
        if not good:
            fail(f"config.{key} must be {must}, got {value!r}")

    positive_int = lambda v: _is_int(v) and v >= 1  # noqa: E731
    finite_positive = lambda v: _is_number(v) and np.isfinite(v) and v > 0  # noqa: E731
    if not isinstance(config.get("model"), str) or config.model not in models.names():
        close = difflib.get_close_matches(str(config.get("model")), models.names(), n=3)
        fail(
            f"config.model {config.get('model')!r} is not a registered model"
            + (f" (did you mean {', '.join(close)}?)" if close else "")
            + "; panns_jax.models.names() lists them"
        )
    check("task", lambda v: v is None or v in TASKS, f"one of {sorted(TASKS)}")
    check("mixup", lambda v: v in ("none", "logmel", "wave"), "'none', 'logmel' or 'wave'")
    if config.mixup != "none":
        check("mixup_alpha", finite_positive, "a finite number > 0")
    check("batch_size", positive_int, "an integer >= 1 (clips per training step)")
    check("eval_batch_size", positive_int, "an integer >= 1")
    check("num_train_steps", positive_int, "an integer >= 1")
    check("checkpoint_every", positive_int, "an integer >= 1 (steps between checkpoints)")
    check("log_every", positive_int, "an integer >= 1 (steps between log lines)")
    check(
        "eval_every",
        lambda v: _is_int(v) and v >= 0,
        "an integer >= 0 (steps between evaluations; 0: only at the end)",
    )
    check("keep_checkpoints", lambda v: v is None or positive_int(v), "an integer >= 1")
    check("clip_seconds", finite_positive, "a finite number of seconds > 0")
    check("learning_rate", finite_positive, "a finite number > 0")
    for key in ("b1", "b2"):
        check(key, lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)")
    check("eps", finite_positive, "a finite number > 0")
    check(
        "grad_clip_norm",
        lambda v: v is None or finite_positive(v),
        "None (no clipping) or a finite number > 0",
    )
    check(
        "data_fraction", lambda v: v is None or (_is_number(v) and 0 < v <= 1), "a number in (0, 1]"
    )
    check("compute_dtype", lambda v: v in (None, "float32", "bfloat16"), "'float32' or 'bfloat16'")
    check("seed", _is_int, "an integer")
    check(
        "num_devices",
        lambda v: v is None or positive_int(v) and v <= jax.device_count(),
        f"None (all) or an integer in 1..{jax.device_count()} (the devices there are)",
    )
    check(
        "fsdp_min_size", lambda v: v is None or positive_int(v), "None (no FSDP) or an integer >= 1"
    )
    if not isinstance(config.get("dataset"), str) or not config.dataset:
        fail(f"config.dataset must be a TFDS dataset name, got {config.get('dataset')!r}")
    try:  # Cheap: builds the module (no tracing) so unknown overrides fail here.
        models.get(config.model, **dict(config.get("model_overrides") or {}))
    except (TypeError, ValueError) as err:
        fail(
            f"config.model_overrides do not fit {config.model}: "
            f"{str(err).splitlines()[0] if str(err) else type(err).__name__}"
        )

    model_builder.for_config(config).validate()  # The model's own fields (transfer's).
    transfer_fields = config.get("transfer")
    num_folds = transfer_fields.get("num_folds") if transfer_fields is not None else None
    for key in ("train_folds", "eval_folds"):
        folds = config.get(key)
        if folds is None:
            continue
        if (
            isinstance(folds, (str, bytes))
            or not hasattr(folds, "__len__")
            or not folds
            or not all(_is_int(f) for f in folds)
        ):
            fail(f"config.{key} must be a non-empty list of fold numbers, got {folds!r}")
        if num_folds and not all(1 <= f <= num_folds for f in folds):
            fail(f"config.{key} must hold folds in 1..{num_folds}, got {tuple(folds)}")
    devices = config.get("num_devices") or jax.device_count()
    pairs = 1 if config.mixup == "none" else 2  # The loader delivers 2B clips for mixup.
    if (config.batch_size * pairs) % devices:
        fail(
            f"config.batch_size {config.batch_size} ({config.batch_size * pairs} clips per "
            f"step) must divide over the {devices} devices: use a multiple of "
            f"{devices // np.gcd(devices, pairs)}"
        )
    if workdir is not None:
        problem = _writable_dir(workdir)
        if problem:
            fail(problem)


def _check_folds(source: Any, folds: Optional[Any], key: str, split: str) -> None:
    """Folds asked for must exist in the data (ESC-50 has 1..5): no silent empty selection."""
    if folds is None:
        return
    columns = getattr(getattr(source, "index", None), "columns", {}) or {}
    if "fold" not in columns:
        raise ConfigError(
            f"config.{key}={tuple(folds)} but split {split!r} has no folds: unset config.{key}"
        )
    present = sorted({int(f) for f in np.unique(columns["fold"])})
    missing = sorted(set(int(f) for f in folds) - set(present))
    if missing:
        raise ConfigError(
            f"config.{key}: fold(s) {missing} not in split {split!r}, whose folds are {present}"
        )


def _get_builder(data: Any, config: ml_collections.ConfigDict) -> Any:
    """The TFDS builder of ``config.dataset``; ConfigError for an unknown name, a missing
    rate config or a set that needs a manual download not yet built."""
    import tensorflow_datasets as tfds

    try:
        return data.get_builder(config.dataset, data_dir=config.get("data_dir"))
    except tfds.core.registered.DatasetNotFoundError as err:  # Then a list of every name.
        raise ConfigError(
            f"config.dataset {config.dataset!r}: {str(err).splitlines()[0]}"
        ) from None
    except FileNotFoundError as err:  # Not built: the builder says how to.
        lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [""]
        text = " ".join(lines)  # The manual-download instructions, when they are short.
        if len(text) > 400:
            text = lines[0].rstrip(":") + " (see MANUAL_DOWNLOAD_INSTRUCTIONS in panns_jax/data/)"
        raise ConfigError(f"config.dataset {config.dataset!r}: {text}") from None
    except ValueError as err:  # TFDS: e.g. "BuilderConfig 64k not found with version 1.0.0".
        found = re.search(r"BuilderConfig \S+ not found( with version [\d.]*\d)?", str(err))
        if not found:
            raise
        raise ConfigError(
            f"config.dataset {config.dataset!r}: {found.group(0).strip()} "
            "(panns_jax builders have 32k, 16k, 8k)"
        ) from None


def _input_pipelines(
    config, mixup_on: bool, sample_rate: int, sources: Optional[Mapping[str, Any]] = None
):
    from panns_jax import data  # Imports TensorFlow (CPU only); kept out of model code.

    per_step = config.batch_size * (2 if mixup_on else 1)
    clip_samples = int(round(config.clip_seconds * sample_rate))
    if sources is not None:  # In-memory data (tests, notebooks): {split: data.Source}.
        missing = {config.train_split, config.eval_split} - set(sources)
        if missing:
            raise ValueError(f"sources has no split {sorted(missing)} (it has {sorted(sources)})")
        # A caller may name the classes on the source (the fine-tuning notebook does).
        names = getattr(sources[config.train_split], "class_names", None)
    else:
        builder = _get_builder(data, config)
        features = builder.info.features
        # Multi-label sets store `labels` (a Sequence of ClassLabel), the single-label
        # transfer sets `label`; a FeaturesDict has `in` and `[]` but no `.get`.
        key = next((k for k in ("labels", "label") if k in features), None)
        labels = features[key] if key else None
        names = getattr(getattr(labels, "feature", labels), "names", None)
        # One Source per split: transfer configs train and evaluate folds of one split.
        sources = {
            split: data.make_source(builder, split)
            for split in {config.train_split, config.eval_split}
        }
    _check_folds(
        sources[config.train_split], config.get("train_folds"), "train_folds", config.train_split
    )
    _check_folds(
        sources[config.eval_split], config.get("eval_folds"), "eval_folds", config.eval_split
    )
    train = data.make_train_iterator(
        sources[config.train_split],
        batch_size=per_step,
        clip_samples=clip_samples,
        balanced=config.balanced,
        seed=config.seed,
        folds=config.get("train_folds"),
        fraction=config.get("data_fraction", 1.0),
    )
    evaluation = data.make_eval_iterator(
        sources[config.eval_split],
        batch_size=config.eval_batch_size,
        clip_samples=clip_samples,
        folds=config.get("eval_folds"),
    )
    return train, evaluation, names


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, *, sources: Optional[Mapping[str, Any]] = None
) -> Dict[str, Any]:
    """Train ``config`` in ``workdir``, resuming from its latest checkpoint if any.

    ``sources`` ({split name: ``panns_jax.data.Source``}, e.g. ``ArraySource``) replaces
    ``config.dataset`` by in-memory data. Returns the last evaluation's metrics.
    """
    validate_config(config, workdir)  # Before compiling, loading or writing anything.
    import orbax.checkpoint as ocp
    from clu import metric_writers  # Imports TensorFlow (seconds): after the checks.

    workdir = os.path.abspath(workdir)  # orbax needs absolute paths; users pass relative ones.
    mixup_on = config.mixup != "none"

    # Mesh and input.
    mesh = make_mesh(config.get("num_devices"))
    task = get_task(config)
    builder = model_builder.for_config(config)
    sample_rate = builder.sample_rate()  # Loads a pretrained model, if any.
    train_iter, eval_batches, class_names = _input_pipelines(config, mixup_on, sample_rate, sources)
    num_classes = train_iter.num_classes
    _log_shards(train_iter, eval_batches)

    # Model and train state, created directly with their shardings.
    model = builder.build(num_classes, output=task.output)
    pretrained = builder.pretrained()
    logging.info("training %s", builder.describe())
    optimizer = make_optimizer(config, builder)
    clip_samples = int(round(config.clip_seconds * sample_rate))

    def init_state(rng, pretrained):
        init_rng, state_rng = jax.random.split(rng)
        variables = builder.init(model, init_rng, clip_samples, pretrained)
        return TrainState.create(variables, optimizer, state_rng)

    abstract = jax.eval_shape(init_state, jax.random.key(config.seed), pretrained)
    state_sharding = param_sharding(mesh, abstract, config.get("fsdp_min_size"))
    state = jax.jit(init_state, out_shardings=state_sharding)(
        jax.random.key(config.seed), pretrained
    )
    del pretrained
    data_sharding = NamedSharding(mesh, P("data"))
    abstract_state = jax.tree_util.tree_map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), abstract, state_sharding
    )

    def rows(n: int, width: int) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct((n, width), jnp.float32, sharding=data_sharding)

    # Compiled ahead of time, then every process meets: see compile_everywhere.
    per_step = config.batch_size * (2 if mixup_on else 1)
    train_step = compile_everywhere(
        jax.jit(
            make_train_step(model, optimizer, config),
            in_shardings=(state_sharding, data_sharding),
            out_shardings=(state_sharding, NamedSharding(mesh, P())),
            donate_argnums=0,
        ),
        "train step",
        abstract_state,
        {"audio": rows(per_step, clip_samples), "labels": rows(per_step, num_classes)},
    )
    eval_step = compile_everywhere(
        jax.jit(
            make_eval_step(model, task),
            in_shardings=(state_sharding.params, state_sharding.batch_stats, data_sharding),
            out_shardings=data_sharding,
        ),
        "eval step",
        abstract_state.params,
        abstract_state.batch_stats,
        rows(config.eval_batch_size, clip_samples),
    )

    # Checkpoints: the full train state + data-iterator state, latest kept; resume if present.
    os.makedirs(workdir, exist_ok=True)  # Only now: a refused config leaves nothing behind.
    manager = ocp.CheckpointManager(
        os.path.join(workdir, "checkpoints"),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=config.get("keep_checkpoints", 2), create=True
        ),
    )
    latest, restored = restore_newest_intact(
        manager,
        ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
        ),
        workdir,
    )
    if latest is not None:
        state = restored["state"]
        train_iter.set_state(restored["data"])
        logging.info("resumed from step %d", latest)
        del restored

    writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
    if latest is None:
        writer.write_hparams({k: str(v) for k, v in config.to_dict().items()})
    best_key = task.best_metric
    if jax.process_index() == 0:
        recover_exports(workdir)  # A crash while replacing 'best' or 'model': tidy up.
    # Every process takes process 0's value: they must agree on when to export (a collective).
    best_value = _broadcast_float(
        _read_best(workdir, best_key) if jax.process_index() == 0 else 0.0
    )
    last_eval: Dict[str, Any] = {}
    step = int(jax.device_get(state.step))
    start_step, start_time = step, time.time()
    log_path = os.path.join(workdir, "train_log.jsonl")

    def save(step_now: int, last_loss) -> None:
        if not np.isfinite(float(last_loss)):  # Never checkpoint a diverged state.
            raise_non_finite(float(last_loss), step_now)
        manager.save(
            step_now,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(train_iter.get_state())
            ),
        )

    def raise_non_finite(loss: float, step_now: int) -> None:
        manager.wait_until_finished()
        raise NonFiniteLossError(
            f"loss became {loss} at step {step_now}; stopping. The last good checkpoint "
            f"(step {manager.latest_step()}) is kept in {workdir}/checkpoints; lower the "
            "learning rate or set grad_clip_norm before resuming"
        )

    def export_model(name: str, step_now: int, score: Optional[Dict[str, Any]] = None) -> None:
        """Every process calls it (gathering FSDP-sharded weights is a collective); only
        process 0 writes, with a writer that waits for no other process."""
        host = _to_host({"params": state.params, "batch_stats": state.batch_stats})
        if jax.process_index() != 0:
            return
        labels = list(class_names) if class_names else None
        checkpoint = builder.to_checkpoint(model, host, step_now, labels)
        # The task, so that the loader reports how to read the outputs (a head folded
        # into a registry model no longer says it was trained with a softmax).
        extra = {**checkpoint.extra, tasks.CHECKPOINT_KEY: task.name}
        checkpoint = dataclasses.replace(checkpoint, extra=extra)
        if score is None:
            checkpoints.save(os.path.join(workdir, name), checkpoint, overwrite=True)
        else:
            install_best(workdir, checkpoint, score)
        logging.info("wrote %s (step %d) in %s", name, step_now, workdir)

    def run_eval(step_now: int) -> Dict[str, Any]:
        """Evaluate, log, write per-class AP, and export 'best' when it improves."""
        nonlocal best_value
        results = evaluate(eval_step, state, eval_batches, mesh, task)
        writer.write_scalars(step_now, {f"eval/{k}": results[k] for k in task.summary_keys})
        logging.info(
            "eval at step %d over %d examples: %s",
            step_now,
            results["num_examples"],
            "  ".join(f"{k} {results[k]:.4f}" for k in task.summary_keys),
        )
        if jax.process_index() == 0:
            write_per_class_ap(workdir, step_now, results, class_names)
        if np.isfinite(results[best_key]) and results[best_key] > best_value:
            best_value = results[best_key]
            export_model("best", step_now, {best_key: float(best_value), "step": step_now})
        return results

    while step < config.num_train_steps:
        # Evaluate at step 0 (fresh runs) and every eval_every steps, as the original.
        if (
            config.eval_every
            and step % config.eval_every == 0
            and (step > start_step or latest is None)
        ):
            last_eval = run_eval(step)

        batch = global_batch(mesh, next(train_iter))
        state, step_metrics = train_step(state, batch)
        step += 1
        if step % config.log_every == 0 or step == config.num_train_steps or step == start_step + 1:
            loss = float(step_metrics["loss"])
            if not np.isfinite(loss):
                raise_non_finite(loss, step)
            elapsed = time.time() - start_time
            rate = (step - start_step) * config.batch_size / max(elapsed, 1e-9)
            eta = (config.num_train_steps - step) * config.batch_size / max(rate, 1e-9)
            writer.write_scalars(
                step,
                {
                    "train/loss": loss,
                    "train/learning_rate": config.learning_rate,
                    "train/grad_norm": float(step_metrics["grad_norm"]),
                    "train/clips_per_second": rate,
                    "train/step_time": elapsed / (step - start_step),
                    "train/eta_minutes": eta / 60,
                },
            )
            if jax.process_index() == 0:
                with open(log_path, "a") as f:
                    f.write(json.dumps({"step": step, "loss": loss}) + "\n")
                logging.info(
                    "step %d/%d loss %.5f  %.1f clips/s  ETA %.1f min",
                    step,
                    config.num_train_steps,
                    loss,
                    rate,
                    eta / 60,
                )
        if step % config.checkpoint_every == 0 or step == config.num_train_steps:
            save(step, step_metrics["loss"])

    manager.wait_until_finished()
    if config.eval_every:
        last_eval = run_eval(step)
    export_model("model", step)
    writer.flush()
    manager.close()
    train_iter.close()
    return last_eval


# ----------------------------------------------------------------------------
# Checkpoints: resume from the newest intact step; 'best' and its score replaced together.
# ----------------------------------------------------------------------------


_BARRIERS = itertools.count()


def rendezvous(name: str, timeout_s: int = 3600) -> None:
    """Wait until every process gets here, at a barrier of jax.distributed's coordination
    service (no device collective). No-op in a single-process run."""
    if jax.process_count() == 1:
        return
    from jax._src import distributed  # The client jax.distributed.initialize() made.

    key = f"panns_jax/{next(_BARRIERS)}/{name}"  # Unique and the same on every process.
    client = distributed.global_state.client
    if client is None:
        multihost_utils.sync_global_devices(key)
    else:
        client.wait_at_barrier(key, timeout_in_ms=timeout_s * 1000)


def compile_everywhere(jitted: Any, name: str, *abstract_args: Any) -> Any:
    """``jitted`` compiled for ``abstract_args``, once every process has compiled it.

    Compile times differ between hosts (load, a compilation-cache hit on one only), and
    CPU collectives (gloo) give up when a peer joins their first use more than 30 s late:
    compiling first and meeting at a barrier makes the first step start together.
    """
    compiled = jitted.lower(*abstract_args).compile()
    rendezvous(f"compiled {name}")
    return compiled


def _all_processes(ok: bool) -> bool:
    """True where ``ok`` holds on every process (a collective in multi-host runs)."""
    if jax.process_count() == 1:
        return ok
    return bool(np.all(multihost_utils.process_allgather(np.asarray([ok], np.int32))))


def _broadcast_float(value: float) -> float:
    """Process 0's ``value`` on every process, bit for bit (a float64 sent as 2 uint32s:
    JAX without x64 would round it to float32)."""
    if jax.process_count() == 1:
        return float(value)
    words = np.frombuffer(np.float64(value).tobytes(), np.uint32)
    words = np.asarray(multihost_utils.broadcast_one_to_all(words), np.uint32)
    return float(np.frombuffer(words.tobytes(), np.float64)[0])


def _to_host(tree: Any) -> Any:
    """numpy copies of global arrays. Fully replicated or local arrays are copied locally;
    arrays sharded across hosts (FSDP) are gathered, a collective: every process calls this
    (the shardings, hence the branch, are the same on all)."""
    leaves = jax.tree_util.tree_leaves(tree)
    if all(
        getattr(x, "is_fully_addressable", True) or getattr(x, "is_fully_replicated", True)
        for x in leaves
    ):
        return jax.device_get(tree)
    return multihost_utils.process_allgather(tree, tiled=True)


def _log_shards(train_iter: Any, eval_batches: Any) -> None:
    """Which rows of each global batch, and which eval records, this process reads."""
    records = np.asarray(eval_batches.records)
    logging.info(
        "process %d/%d reads rows %d..%d of each global batch of %d (sampled from %d "
        "examples) and eval records %s (%d of them)",
        jax.process_index(),
        jax.process_count(),
        train_iter.row_offset,
        train_iter.row_offset + train_iter.batch_size - 1,
        train_iter.global_batch_size,
        len(train_iter.records),
        f"{records[0]}..{records[-1]}" if len(records) else "none",
        len(records),
    )


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:200] if text else ''}"


def restore_newest_intact(manager: Any, args: Any, workdir: str) -> Tuple[Optional[int], Any]:
    """Restore the newest step of ``manager`` that reads back; (None, None) if there is none.

    Newer steps that fail to restore (a truncated or deleted file, damaged JSON) are
    logged with the reason and moved to ``workdir/checkpoints_unreadable/`` so the run
    can save those steps again. All processes agree on each attempt (one failing is
    enough to skip the step). If no step restores, nothing is moved and a
    :class:`RuntimeError` says why the newest failed (e.g. a changed config).
    """
    steps = sorted(manager.all_steps(), reverse=True)
    skipped = []
    for step in steps:
        try:
            restored, reason = manager.restore(step, args=args), None
        except Exception as err:  # orbax/tensorstore/json errors: the step is unreadable.
            restored, reason = None, _first_line(err)
        if _all_processes(reason is None):
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
        if jax.process_index() == 0:
            aside = os.path.join(workdir, "checkpoints_unreadable")
            os.makedirs(aside, exist_ok=True)
            for bad, _ in skipped:
                target = os.path.join(aside, str(bad))
                while os.path.lexists(target):
                    target += "+"
                os.replace(os.path.join(str(manager.directory), str(bad)), target)
        rendezvous("unreadable checkpoints moved")
        manager.reload()
        logging.warning(
            "resuming from step %d, the newest intact checkpoint; skipped step(s) %s, moved to %s",
            step,
            ", ".join(str(b) for b, _ in skipped),
            os.path.join(workdir, "checkpoints_unreadable"),
        )
    return step, restored


def _best_file(key: str) -> str:
    return "best_map.json" if key == "mAP" else f"best_{key}.json"


def _best_path(workdir: str, key: str) -> str:
    return os.path.join(workdir, "best", _best_file(key))


def _read_best(workdir: str, key: str = "mAP") -> float:
    """The score of ``workdir/best`` (-1 if none), from its best_map.json or, failing that,
    the score its panns_jax.json records."""
    path = _best_path(workdir, key)
    try:
        if os.path.exists(path):
            with open(path) as f:
                return float(json.load(f)[key])
        meta = os.path.join(workdir, "best", checkpoints.METADATA_FILE)
        if os.path.exists(meta):
            with open(meta) as f:
                return float(json.load(f).get("extra", {}).get(key, -1.0))
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        logging.warning(
            "cannot read the best score in %s (%s); the next evaluation replaces 'best'",
            os.path.dirname(path),
            _first_line(err),
        )
    return -1.0


# What a crash in checkpoints.save / fileio.replace_dir / install_best can leave in the workdir.
_LEFTOVER = tuple(
    f"{dot}{name}.{kind}-"
    for dot in (".", "..")
    for name in ("best", "model")
    for kind in ("staged", "tmp", "old")
)


def install_best(
    workdir: str, checkpoint: checkpoints.ModelCheckpoint, score: Dict[str, Any]
) -> str:
    """Make ``checkpoint`` ``workdir/best``, its score (``best_map.json``) inside it.

    The checkpoint and the score file are staged in one hidden directory, which then
    replaces ``best`` in one rename-based swap (:func:`panns_jax.fileio.replace_dir`):
    ``best`` and its score change together or not at all; :func:`recover_exports` tidies what
    a crash can leave behind. Process 0 only.
    """
    key = next(k for k in score if k != "step")
    checkpoint = dataclasses.replace(checkpoint, extra={**checkpoint.extra, **score})
    staged = os.path.join(workdir, f".best.staged-{os.getpid()}-{time.time_ns()}")
    checkpoints.save(staged, checkpoint)
    try:
        with fileio.staged(os.path.join(staged, _best_file(key))) as part, open(part, "w") as f:
            json.dump(score, f)
        fileio.replace_dir(staged, os.path.join(workdir, "best"))
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return os.path.join(workdir, "best")


def recover_exports(workdir: str) -> None:
    """Undo what a crash while replacing ``best`` or ``model`` can leave: the old copy moved
    aside but not yet replaced (moved back), staged or old copies (removed). Process 0 only.
    """
    if not os.path.isdir(workdir):
        return
    names = sorted(os.listdir(workdir))
    for export in ("best", "model"):
        path = os.path.join(workdir, export)
        olds = [
            n
            for n in names
            if n.startswith(f".{export}.old-")
            and checkpoints.is_model_checkpoint(os.path.join(workdir, n))
        ]
        if not os.path.lexists(path) and olds:
            newest = max(olds, key=lambda n: os.path.getmtime(os.path.join(workdir, n)))
            os.replace(os.path.join(workdir, newest), path)
            logging.warning(
                "restored %s from %s (a crash interrupted its replacement)", path, newest
            )
    for name in names:
        path = os.path.join(workdir, name)
        if name.startswith(_LEFTOVER) and os.path.lexists(path):
            shutil.rmtree(path, ignore_errors=True)
