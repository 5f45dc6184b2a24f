"""Training and evaluation loop, readable top to bottom.

Sections: mesh and shardings -> input -> model and train state -> train/eval steps ->
checkpoint / resume -> the loop (log, evaluate, checkpoint, stop on NaN).

The recipe is the paper's (Kong et al. 2020, Sec. IV; golden/TRAINING.md): batch 32,
Adam with AMSGrad at lr 1e-3, binary cross-entropy on the sigmoid outputs, mixup
(alpha 1) and SpecAugment inside the model, balanced sampling, evaluation every 2000
steps. Data parallel over a ``jax.sharding.Mesh`` with a 'data' axis; parameters
replicated, or the largest ones sharded FSDP-style over the same axis.

The loop does not care what it trains: a :class:`Task` (``config.task``) owns the loss
and the metrics (multi-label tagging or single-label classification), and
``config.transfer`` (:mod:`panns_jax.transfer`) swaps in a pretrained base with a new
head and an optimiser mask that freezes part of it.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Dict, Mapping, Optional, Tuple

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from panns_jax import checkpoints, frontend, metrics, models, optim, transfer

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
    def create(cls, variables: Mapping[str, Any], optimizer: optax.GradientTransformation,
               rng: jax.Array) -> "TrainState":
        """Step 0 of ``variables`` (``{'params', 'batch_stats'?}``) with a fresh optimizer."""
        params = variables["params"]
        return cls(step=jnp.zeros([], jnp.int32), params=params,
                   batch_stats=variables.get("batch_stats", {}),
                   opt_state=optimizer.init(params), rng=rng)


# ----------------------------------------------------------------------------
# Mesh and shardings: the one place that decides where arrays live.
# ----------------------------------------------------------------------------


def make_mesh(num_devices: Optional[int] = None) -> Mesh:
    """A 1-D mesh over every device of every host (or the first ``num_devices``), axis 'data'."""
    devices = jax.devices()[:num_devices] if num_devices else jax.devices()
    return Mesh(np.asarray(devices), ("data",))


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


def build_model(config: ml_collections.ConfigDict, num_classes: int):
    overrides = dict(config.get("model_overrides", {}) or {})
    overrides["num_classes"] = num_classes
    if config.get("compute_dtype", "float32") == "bfloat16":
        overrides["dtype"] = jnp.bfloat16
    return models.get(config.model, **overrides), overrides


class Task:
    """What is learnt: the loss on the model's outputs, the eval scores and metrics.

    Scenic-style, so that the loop never branches on the kind of problem. Targets are
    always the loader's ``(B, C)`` float rows (multi-hot, or one-hot for a single label;
    mixed pairwise under mixup).
    """

    name: str = ""
    best_metric: str = "mAP"  # The metric the 'best' checkpoint maximises.
    summary_keys: Tuple[str, ...] = ("mAP", "mAUC", "d_prime")

    def loss(self, outputs: Dict[str, jax.Array], targets: jax.Array) -> jax.Array:
        raise NotImplementedError

    def scores(self, outputs: Dict[str, jax.Array]) -> jax.Array:
        """Per-class scores that evaluation ranks (probabilities)."""
        return outputs["clipwise_output"]

    def evaluate(self, scores: np.ndarray, targets: np.ndarray) -> Dict[str, Any]:
        return metrics.evaluate(scores, targets)


class MultiLabelTask(Task):
    """Audio tagging as in the paper: BCE on the sigmoid outputs; mAP, mAUC, d'."""

    name = "multilabel"

    def loss(self, outputs, targets):
        return binary_cross_entropy(outputs["clipwise_output"], targets)


class SingleLabelTask(Task):
    """One class per clip (ESC-50, GTZAN, RAVDESS): softmax cross-entropy on the logits.

    Accuracy counts the top-scoring class being a label of the clip; mAP/mAUC/d' are
    reported beside it (per-class one-vs-rest).
    """

    name = "singlelabel"
    best_metric = "accuracy"
    summary_keys = ("accuracy", "mAP", "mAUC", "d_prime")

    def loss(self, outputs, targets):
        logits = outputs["logits"].astype(jnp.float32)
        return jnp.mean(optax.softmax_cross_entropy(logits, targets))

    def scores(self, outputs):
        return jax.nn.softmax(outputs["logits"].astype(jnp.float32), axis=-1)

    def evaluate(self, scores, targets):
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


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """The paper's optimiser; for transfer runs, masked so that frozen parameters get
    ``optax.set_to_zero()`` (and no Adam state)."""
    optimizer = optim.paper_optimizer(config.learning_rate, config.b1, config.b2, config.eps,
                                      config.get("grad_clip_norm"))
    strategy = transfer.strategy_of(config)
    if strategy is None:
        return optimizer
    return optax.multi_transform(
        {"trained": optimizer, "frozen": optax.set_to_zero()},
        lambda params: transfer.param_labels(params, strategy))


def binary_cross_entropy(probabilities: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean BCE on probabilities, each log clamped at -100 as PyTorch's BCELoss does."""
    p = probabilities.astype(jnp.float32)
    log_p = jnp.maximum(jnp.log(p), -100.0)
    log_not_p = jnp.maximum(jnp.log1p(-p), -100.0)
    return -jnp.mean(targets * log_p + (1 - targets) * log_not_p)


def make_train_step(model, optimizer: optax.GradientTransformation, config):
    mixup_on = config.mixup != "none"
    task = get_task(config)
    strategy = transfer.strategy_of(config)

    def train_step(state: TrainState, batch: Dict[str, jax.Array]):
        rng = jax.random.fold_in(state.rng, state.step)
        dropout_rng, specaug_rng, mixup_rng = jax.random.split(rng, 3)
        targets = batch["labels"]
        lam = None
        if mixup_on:  # The loader delivers 2B clips; pairs (2i, 2i+1) are mixed.
            lam = frontend.sample_mixup_lambda(mixup_rng, targets.shape[0] // 2,
                                               config.mixup_alpha)
            targets = frontend.mixup(targets, lam)

        def loss_fn(params):
            outputs, updates = model.apply(
                {"params": params, "batch_stats": state.batch_stats}, batch["audio"], train=True,
                mixup_lambda=lam, rngs={"dropout": dropout_rng, "specaug": specaug_rng},
                mutable=["batch_stats"])
            loss = task.loss(outputs, targets)
            return loss, updates["batch_stats"]

        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        if strategy is not None:  # Frozen leaves pass through: bitwise, even for -0.0.
            params = jax.tree_util.tree_map(lambda keep, new, old: new if keep else old,
                                            transfer.trainable_mask(params, strategy),
                                            params, state.params)
        new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                                  opt_state=opt_state)
        return new_state, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

    return train_step


def make_eval_step(model, task: Optional[Task] = None):
    task = task or MultiLabelTask()

    def eval_step(params, batch_stats, audio):
        outputs = model.apply({"params": params, "batch_stats": batch_stats}, audio)
        return task.scores(outputs)

    return eval_step


# ----------------------------------------------------------------------------
# Evaluation.
# ----------------------------------------------------------------------------


def evaluate(eval_fn, state: TrainState, eval_batches, mesh: Mesh,
             task: Optional[Task] = None) -> Dict[str, Any]:
    """The task's metrics (mAP, mAUC, d'; accuracy) over the eval split (each example once;
    padded rows masked out)."""
    scores, targets = [], []
    for batch in eval_batches:
        audio = global_batch(mesh, {"audio": batch["audio"]})["audio"]
        probabilities = multihost_utils.process_allgather(
            eval_fn(state.params, state.batch_stats, audio), tiled=True)
        labels = multihost_utils.process_allgather(batch["labels"], tiled=True)
        mask = multihost_utils.process_allgather(batch["mask"], tiled=True)
        scores.append(np.asarray(probabilities)[np.asarray(mask)])
        targets.append(np.asarray(labels)[np.asarray(mask)])
    return (task or MultiLabelTask()).evaluate(np.concatenate(scores), np.concatenate(targets))


def write_per_class_ap(workdir: str, step: int, result: Dict[str, Any], class_names) -> str:
    path = os.path.join(workdir, "eval", f"per_class_step{step:08d}.csv")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("index,label,average_precision,auc\n")
        for i, (ap, auc) in enumerate(zip(result["average_precision"], result["auc"])):
            name = class_names[i] if class_names and i < len(class_names) else str(i)
            f.write(f"{i},\"{name}\",{ap:.6f},{auc:.6f}\n")
    return path


# ----------------------------------------------------------------------------
# The loop.
# ----------------------------------------------------------------------------


def _input_pipelines(config, mixup_on: bool, sample_rate: int,
                     sources: Optional[Mapping[str, Any]] = None):
    from panns_jax import data  # Imports TensorFlow (CPU only); kept out of model code.

    data.pipeline.tune_malloc()  # Reuse the large batch buffers instead of re-mapping them.

    per_step = config.batch_size * (2 if mixup_on else 1)
    clip_samples = int(round(config.clip_seconds * sample_rate))
    if sources is not None:  # In-memory data (tests, notebooks): {split: data.Source}.
        missing = {config.train_split, config.eval_split} - set(sources)
        if missing:
            raise ValueError(f"sources has no split {sorted(missing)} (it has {sorted(sources)})")
        # A caller may name the classes on the source (the fine-tuning notebook does).
        names = getattr(sources[config.train_split], "class_names", None)
    else:
        builder = data.get_builder(config.dataset, data_dir=config.get("data_dir"))
        features = builder.info.features
        labels = features["labels"] if "labels" in features else features.get("label")
        names = getattr(getattr(labels, "feature", labels), "names", None)
        # One Source per split: transfer configs train and evaluate folds of one split.
        sources = {split: data.make_source(builder, split)
                   for split in {config.train_split, config.eval_split}}
    train = data.make_train_iterator(
        sources[config.train_split], batch_size=per_step, clip_samples=clip_samples,
        balanced=config.balanced, seed=config.seed, folds=config.get("train_folds"),
        fraction=config.get("data_fraction", 1.0))
    evaluation = data.make_eval_iterator(
        sources[config.eval_split], batch_size=config.eval_batch_size,
        clip_samples=clip_samples, folds=config.get("eval_folds"))
    return train, evaluation, names


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       sources: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """Train ``config`` in ``workdir``, resuming from its latest checkpoint if any.

    ``sources`` ({split name: ``panns_jax.data.Source``}, e.g. ``ArraySource``) replaces
    ``config.dataset`` by in-memory data. Returns the last evaluation's metrics.
    """
    import orbax.checkpoint as ocp
    from clu import metric_writers

    workdir = os.path.abspath(workdir)  # orbax needs absolute paths; users pass relative ones.
    os.makedirs(workdir, exist_ok=True)
    mixup_on = config.mixup != "none"
    if config.mixup not in ("none", "logmel", "wave"):
        raise ValueError(f"config.mixup must be 'none', 'logmel' or 'wave', got {config.mixup!r}")

    # Mesh and input.
    mesh = make_mesh(config.get("num_devices"))
    if (config.batch_size * (2 if mixup_on else 1)) % mesh.shape["data"]:
        raise ValueError(f"batch {config.batch_size} (x2 with mixup) must divide over "
                         f"{mesh.shape['data']} devices")
    task = get_task(config)
    strategy = transfer.strategy_of(config)
    base = transfer.load_base(config) if strategy else None
    sample_rate = models.sample_rate(
        base.build() if base else models.get(config.model, **config.get("model_overrides", {})))
    train_iter, eval_batches, class_names = _input_pipelines(config, mixup_on, sample_rate,
                                                             sources)
    num_classes = train_iter.num_classes

    # Model and train state, created directly with their shardings.
    if base is not None:
        model = transfer.build_model(config, base, num_classes,
                                     output="softmax" if task.name == "singlelabel" else "sigmoid")
        overrides, pretrained = {}, (base.variables and
                                     {k: base.variables[k] for k in ("params", "batch_stats")
                                      if k in base.variables})
        logging.info("transfer (%s) from %s: %s", strategy,
                     config.transfer.get("checkpoint") or "random init", base.name)
    else:
        model, overrides = build_model(config, num_classes)
        pretrained = None
    optimizer = make_optimizer(config)
    clip_samples = int(round(config.clip_seconds * sample_rate))

    def init_state(rng, pretrained):
        init_rng, state_rng = jax.random.split(rng)
        variables = models.init(model, init_rng, clip_samples)
        if base is not None:
            variables = transfer.merge_pretrained(variables, pretrained)
        return TrainState.create(variables, optimizer, state_rng)

    abstract = jax.eval_shape(init_state, jax.random.key(config.seed), pretrained)
    state_sharding = param_sharding(mesh, abstract, config.get("fsdp_min_size"))
    state = jax.jit(init_state, out_shardings=state_sharding)(jax.random.key(config.seed),
                                                              pretrained)
    del pretrained
    data_sharding = NamedSharding(mesh, P("data"))
    train_step = jax.jit(make_train_step(model, optimizer, config),
                         in_shardings=(state_sharding, data_sharding),
                         out_shardings=(state_sharding, NamedSharding(mesh, P())),
                         donate_argnums=0)
    eval_step = jax.jit(make_eval_step(model, task),
                        in_shardings=(state_sharding.params, state_sharding.batch_stats,
                                      data_sharding),
                        out_shardings=data_sharding)

    # Checkpoints: the full train state + data-iterator state, latest kept; resume if present.
    manager = ocp.CheckpointManager(
        os.path.join(workdir, "checkpoints"),
        options=ocp.CheckpointManagerOptions(max_to_keep=config.get("keep_checkpoints", 2),
                                             create=True))
    latest = manager.latest_step()
    if latest is not None:
        restored = manager.restore(latest, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(jax.tree_util.tree_map(
                lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                abstract, state_sharding)),
            data=ocp.args.JsonRestore()))
        state = restored["state"]
        train_iter.set_state(restored["data"])
        logging.info("resumed from step %d", latest)

    writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
    if latest is None:
        writer.write_hparams({k: str(v) for k, v in config.to_dict().items()})
    best_key = task.best_metric
    best_value = _read_best(workdir, best_key)
    last_eval: Dict[str, Any] = {}
    step = int(jax.device_get(state.step))
    start_step, start_time = step, time.time()
    log_path = os.path.join(workdir, "train_log.jsonl")

    def save(step_now: int, last_loss) -> None:
        if not np.isfinite(float(last_loss)):  # Never checkpoint a diverged state.
            raise_non_finite(float(last_loss), step_now)
        manager.save(step_now, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(train_iter.get_state())))

    def raise_non_finite(loss: float, step_now: int) -> None:
        manager.wait_until_finished()
        raise NonFiniteLossError(
            f"loss became {loss} at step {step_now}; stopping. The last good checkpoint "
            f"(step {manager.latest_step()}) is kept in {workdir}/checkpoints; lower the "
            "learning rate or set grad_clip_norm before resuming")

    def export_model(name: str, step_now: int) -> None:
        if jax.process_index() == 0:
            host = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
            labels = list(class_names) if class_names else None
            if base is not None:
                checkpoint = transfer.to_checkpoint(model, base, host, step_now, labels)
            else:
                export_overrides = {k: v for k, v in overrides.items() if k != "dtype"}
                checkpoint = checkpoints.ModelCheckpoint(
                    model=config.model, variables=host, overrides=export_overrides,
                    step=step_now, labels=labels)
            checkpoints.save(os.path.join(workdir, name), checkpoint, overwrite=True)

    def run_eval(step_now: int) -> Dict[str, Any]:
        """Evaluate, log, write per-class AP, and export 'best' when it improves."""
        nonlocal best_value
        results = evaluate(eval_step, state, eval_batches, mesh, task)
        writer.write_scalars(step_now, {f"eval/{k}": results[k] for k in task.summary_keys})
        if jax.process_index() == 0:
            write_per_class_ap(workdir, step_now, results, class_names)
        if np.isfinite(results[best_key]) and results[best_key] > best_value:
            best_value = results[best_key]
            export_model("best", step_now)
            _write_best(workdir, best_key, best_value, step_now)
        return results

    while step < config.num_train_steps:
        # Evaluate at step 0 (fresh runs) and every eval_every steps, as the original.
        if config.eval_every and step % config.eval_every == 0 and (step > start_step or latest is None):
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
            writer.write_scalars(step, {"train/loss": loss, "train/learning_rate": config.learning_rate,
                                        "train/grad_norm": float(step_metrics["grad_norm"]),
                                        "train/clips_per_second": rate,
                                        "train/step_time": elapsed / (step - start_step),
                                        "train/eta_minutes": eta / 60})
            if jax.process_index() == 0:
                with open(log_path, "a") as f:
                    f.write(json.dumps({"step": step, "loss": loss}) + "\n")
                logging.info("step %d/%d loss %.5f  %.1f clips/s  ETA %.1f min", step,
                             config.num_train_steps, loss, rate, eta / 60)
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


def _best_path(workdir: str, key: str) -> str:
    name = "best_map.json" if key == "mAP" else f"best_{key}.json"
    return os.path.join(workdir, "best", name)


def _read_best(workdir: str, key: str = "mAP") -> float:
    path = _best_path(workdir, key)
    if os.path.exists(path):
        with open(path) as f:
            return float(json.load(f)[key])
    return -1.0


def _write_best(workdir: str, key: str, value: float, step: int) -> None:
    if jax.process_index() == 0:
        with open(_best_path(workdir, key), "w") as f:
            json.dump({key: value, "step": step}, f)
