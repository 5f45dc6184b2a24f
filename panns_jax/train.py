"""The training loop and its steps, readable top to bottom.

Sections, in order: mesh and shardings, input, model and train state, steps, checkpoint and
resume, and the loop (log, evaluate, checkpoint, stop on a non-finite loss). The recipe is the
paper's (Kong et al. 2020, Sec. IV; golden/TRAINING.md). Batches are split over the 'data'
axis of a mesh; parameters are replicated, or the largest sharded FSDP-style over that axis.
A :class:`panns_jax.tasks.Task` owns the loss and metrics, a
:class:`panns_jax.model_builder.ModelBuilder` the model, so the loop never asks what it trains.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple

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
    checkpointing,
    config_checks,
    frontend,
    metrics,
    model_builder,
    models,
    multihost,
    optim,
    recipe,
    tasks,
)
from panns_jax.kernels import onednn


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or Inf. The last good checkpoint is kept."""


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


@dataclasses.dataclass
class Run:
    """What stays fixed while a run trains: its config, places, model, task, data and writers."""

    config: ml_collections.ConfigDict
    workdir: str
    mesh: Mesh
    task: tasks.Task
    builder: model_builder.ModelBuilder
    model: flax.linen.Module
    inputs: Any  # panns_jax.data.inputs.Inputs
    manager: Any  # orbax.checkpoint.CheckpointManager
    writer: Any  # clu.metric_writers.MetricWriter


# ----------------------------------------------------------------------------
# Mesh and shardings: the one place that decides where arrays live.
# ----------------------------------------------------------------------------


def make_mesh(num_devices: Optional[int] = None) -> Mesh:
    """A 1-D mesh over every device of every host (or the first ``num_devices``), axis 'data'.

    Devices are ordered host by host, so host h holds rows h*B .. h*B+B-1 of each global
    batch (B = batch / hosts), the rows its input pipeline reads.
    """
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    if num_devices and jax.process_count() > 1 and num_devices != len(devices):
        raise recipe.ConfigError(
            f"config.num_devices={num_devices} on {jax.process_count()} "
            f"processes: a multi-host run uses all {len(devices)} devices; "
            "unset config.num_devices"
        )
    return Mesh(np.asarray(devices[:num_devices] if num_devices else devices), ("data",))


def _leaf_sharding(mesh: Mesh, x: Any, fsdp_min_size: Optional[int]) -> NamedSharding:
    """FSDP for arrays of >= ``fsdp_min_size`` elements, along their largest divisible axis."""
    devices = mesh.shape["data"]
    if fsdp_min_size and x.size >= fsdp_min_size and devices > 1:
        for axis in np.argsort(x.shape)[::-1]:
            if x.shape[axis] % devices == 0:
                names = [None] * len(x.shape)
                names[axis] = "data"
                return NamedSharding(mesh, P(*names))
    return NamedSharding(mesh, P())


def param_sharding(mesh: Mesh, shapes: Any, fsdp_min_size: Optional[int]) -> Any:
    """Each leaf's sharding: replicated, or FSDP from ``fsdp_min_size`` elements on."""
    return jax.tree_util.tree_map(lambda x: _leaf_sharding(mesh, x, fsdp_min_size), shapes)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows of a batch split over 'data'."""
    return NamedSharding(mesh, P("data"))


def global_batch(mesh: Mesh, local: Dict[str, np.ndarray]) -> Dict[str, jax.Array]:
    """Host-local numpy batch -> global arrays sharded over 'data' along the batch axis."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


# ----------------------------------------------------------------------------
# Input.
# ----------------------------------------------------------------------------


def create_inputs(
    config: ml_collections.ConfigDict, sample_rate: int, sources: Optional[Mapping[str, Any]]
) -> Any:
    """The run's :class:`panns_jax.data.inputs.Inputs`; logs the share this process reads."""
    from panns_jax.data import inputs  # Imports TensorFlow (CPU only): kept out of model code.

    made = inputs.make_inputs(config, sample_rate, sources)
    logging.info("%s", inputs.describe_shards(made))
    return made


# ----------------------------------------------------------------------------
# Model and train state.
# ----------------------------------------------------------------------------


def make_optimizer(
    config: ml_collections.ConfigDict, builder: model_builder.ModelBuilder
) -> optax.GradientTransformation:
    """The paper's optimiser of ``config``; the parameters ``builder`` freezes stay as they are."""
    frozen = builder.param_labels if builder.param_labels({}) is not None else None
    args = (config.learning_rate, config.b1, config.b2, config.eps, config.get("grad_clip_norm"))
    return optim.paper_optimizer(*args, param_labels=frozen)


def _init_state(rng, pretrained, builder, model, optimizer, clip_samples) -> TrainState:
    """Jittable: the model's variables, pretrained ones merged in, and a fresh optimizer."""
    init_rng, state_rng = jax.random.split(rng)
    variables = builder.init(model, init_rng, clip_samples, pretrained)
    return TrainState.create(variables, optimizer, state_rng)


def create_train_state(
    config: ml_collections.ConfigDict,
    mesh: Mesh,
    builder: model_builder.ModelBuilder,
    model: flax.linen.Module,
    optimizer: optax.GradientTransformation,
    clip_samples: int,
) -> Tuple[TrainState, Any]:
    """The initial state, made with its shardings, and its abstract twin (what the steps
    compile for and what a checkpoint restores into)."""
    init = functools.partial(
        _init_state, builder=builder, model=model, optimizer=optimizer, clip_samples=clip_samples
    )
    rng, pretrained = jax.random.key(config.seed), builder.pretrained()
    shapes = jax.eval_shape(init, rng, pretrained)
    shardings = param_sharding(mesh, shapes, config.get("fsdp_min_size"))
    state = jax.jit(init, out_shardings=shardings)(rng, pretrained)
    abstract = jax.tree_util.tree_map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings
    )
    return state, abstract


# ----------------------------------------------------------------------------
# Steps: pure functions of the state and a batch; evaluation.
# ----------------------------------------------------------------------------


def train_step(
    state: TrainState,
    batch: Dict[str, jax.Array],
    *,
    model: flax.linen.Module,
    optimizer: optax.GradientTransformation,
    task: tasks.Task,
    mixup_alpha: Optional[float],
) -> Tuple[TrainState, Dict[str, jax.Array]]:
    """One optimiser step on ``batch`` (``audio`` and ``labels`` rows); returns loss and norm.

    Under mixup the loader delivers 2B clips and pairs (2i, 2i+1) are mixed inside the model,
    at the place its config names; the targets are mixed here with the same weights.
    """
    rng = jax.random.fold_in(state.rng, state.step)
    dropout_rng, specaug_rng, mixup_rng = jax.random.split(rng, 3)
    targets, lam = batch["labels"], None
    if mixup_alpha is not None:
        lam = frontend.sample_mixup_lambda(mixup_rng, targets.shape[0] // 2, mixup_alpha)
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
        return task.loss(outputs, targets), updates["batch_stats"]

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    new_state = state.replace(
        step=state.step + 1,
        params=optax.apply_updates(state.params, updates),
        batch_stats=batch_stats,
        opt_state=opt_state,
    )
    return new_state, {"loss": loss, "grad_norm": optax.tree.norm(grads)}


def make_train_step(
    model: flax.linen.Module,
    optimizer: optax.GradientTransformation,
    task: tasks.Task,
    mixup_alpha: Optional[float],
) -> Callable[..., Tuple[TrainState, Dict[str, jax.Array]]]:
    """``train_step(state, batch)`` of this model, optimiser, task and mixup (None: none)."""
    return functools.partial(
        train_step, model=model, optimizer=optimizer, task=task, mixup_alpha=mixup_alpha
    )


def eval_step(
    params: Any, batch_stats: Any, audio: jax.Array, *, model: flax.linen.Module, task: tasks.Task
) -> jax.Array:
    """The task's per-class scores of ``audio`` in inference mode."""
    return task.scores(model.apply({"params": params, "batch_stats": batch_stats}, audio))


def make_eval_step(model: flax.linen.Module, task: tasks.Task) -> Callable[..., jax.Array]:
    """``eval_step(params, batch_stats, audio)`` of this model and task."""
    return functools.partial(eval_step, model=model, task=task)


def compile_steps(
    config: ml_collections.ConfigDict,
    mesh: Mesh,
    model: flax.linen.Module,
    optimizer: optax.GradientTransformation,
    task: tasks.Task,
    abstract: TrainState,
    shapes: Tuple[int, int],
) -> Tuple[Any, Any]:
    """The train step (donating its state) and the eval step, compiled on every process.

    ``shapes`` is ``(samples per clip, classes)``.
    """
    samples, classes = shapes
    rows, sharded = batch_sharding(mesh), jax.tree_util.tree_map(lambda s: s.sharding, abstract)
    spec = lambda n, width: jax.ShapeDtypeStruct((n, width), jnp.float32, sharding=rows)
    per_step = recipe.examples_per_step(config)
    backend = config.get("conv_backend") or "auto"
    try:
        with_backend = functools.partial(models.with_conv_backend, name=backend)
        train_fn = with_backend(make_train_step(model, optimizer, task, recipe.mixup_alpha(config)))
        eval_fn = with_backend(make_eval_step(model, task))
    except (onednn.OneDnnUnavailable, ValueError) as err:
        # Missing, failing to build, or a bad $PANNS_JAX_CONV_BACKEND for "auto": one line.
        raise recipe.ConfigError(f"config.conv_backend={backend!r}: {err}") from None
    step = jax.jit(
        train_fn,
        in_shardings=(sharded, rows),
        out_shardings=(sharded, NamedSharding(mesh, P())),
        donate_argnums=0,
        **models.jit_options(model, training=True),
    )
    # Both steps compile with their models.jit_options: evaluation as inference does.
    scores = jax.jit(
        eval_fn,
        in_shardings=(sharded.params, sharded.batch_stats, rows),
        out_shardings=rows,
        **models.jit_options(model),
    )
    batch = {"audio": spec(per_step, samples), "labels": spec(per_step, classes)}
    params, stats = abstract.params, abstract.batch_stats
    eval_audio = spec(config.eval_batch_size, samples)
    return (
        multihost.compile_everywhere(step, "train step", abstract, batch),
        multihost.compile_everywhere(scores, "eval step", params, stats, eval_audio),
    )


def evaluate(
    eval_fn: Callable[..., Any],
    state: TrainState,
    eval_batches: Iterable[Any],
    mesh: Mesh,
    task: tasks.Task,
) -> Dict[str, Any]:
    """The task's metrics over the eval split, and ``num_examples``.

    Each host's examples count once, and padded rows are masked out. Every process calls it,
    since it gathers. Labels and mask travel as global arrays with the scores' sharding, so
    rows stay paired whatever the device order, and every host computes the same metrics.
    Batches of segments (they hold 'record') are scored per recording (its segments' mean).
    """
    rows: Dict[str, List[np.ndarray]] = {"scores": [], "labels": [], "record": []}
    for batch in eval_batches:
        local = {k: v for k, v in batch.items() if k in (*rows, "audio", "mask")}
        arrays = global_batch(mesh, local)
        arrays["scores"] = eval_fn(state.params, state.batch_stats, arrays.pop("audio"))
        gathered = multihost_utils.process_allgather(arrays, tiled=True)
        mask = np.asarray(gathered["mask"])
        for key in set(rows) & set(gathered):
            rows[key].append(np.asarray(gathered[key])[mask])
    return task.evaluate_rows(*(np.concatenate(v) if v else None for v in rows.values()))


# ----------------------------------------------------------------------------
# Checkpoint and resume.
# ----------------------------------------------------------------------------


def restore(run: Run, abstract: TrainState) -> Tuple[Optional[TrainState], Optional[int]]:
    """The newest intact checkpoint's state and step, the input set to it; or Nones."""
    step, state, data = checkpointing.restore_state(run.manager, abstract, run.workdir)
    if step is None:
        return None, None
    run.inputs.train.set_state(data)
    logging.info("resumed from step %d", step)
    return state, step


def non_finite(run: Run, loss: float, step: int) -> NonFiniteLossError:
    """The error that stops a diverged run, naming the last good checkpoint it keeps."""
    run.manager.wait_until_finished()
    return NonFiniteLossError(
        f"loss became {loss} at step {step}; stopping. The last good checkpoint "
        f"(step {run.manager.latest_step()}) is kept in {run.workdir}/checkpoints; lower the "
        "learning rate or set grad_clip_norm before resuming"
    )


def save_checkpoint(run: Run, state: TrainState, step: int, loss: jax.Array) -> None:
    """Checkpoint ``state`` and the input position as ``step``; a diverged state never."""
    if not np.isfinite(float(loss)):
        raise non_finite(run, float(loss), step)
    checkpointing.save_state(run.manager, step, state, run.inputs.train.get_state())


def export_model(
    run: Run, state: TrainState, name: str, step: int, score: Optional[Dict[str, Any]] = None
) -> None:
    """Write the inference checkpoint ``workdir/<name>``, recording the task.

    Every process calls it, since gathering FSDP-sharded weights is a collective. Only
    process 0 writes, with a writer that waits for no other process.
    """
    host = multihost.to_host({"params": state.params, "batch_stats": state.batch_stats})
    if jax.process_index() != 0:
        return
    labels = list(run.inputs.class_names) if run.inputs.class_names else None
    checkpoint = run.builder.to_checkpoint(run.model, host, step, labels)
    extra = {**checkpoint.extra, tasks.CHECKPOINT_KEY: run.task.name}
    checkpointing.export(run.workdir, name, dataclasses.replace(checkpoint, extra=extra), score)


# ----------------------------------------------------------------------------
# The loop.
# ----------------------------------------------------------------------------


def evaluate_and_log(
    run: Run, eval_fn: Any, state: TrainState, step: int, best: float
) -> Tuple[Dict[str, Any], float]:
    """Evaluate, log, write per-class AP, and export ``best`` when it improves.

    Returns the metrics and the best score so far.
    """
    results = evaluate(eval_fn, state, run.inputs.eval, run.mesh, run.task)
    keys = run.task.summary_keys
    run.writer.write_scalars(step, {f"eval/{k}": results[k] for k in keys})
    count, summary = results["num_examples"], run.task.summary(results)
    logging.info("eval at step %d over %d examples: %s", step, count, summary)
    if jax.process_index() == 0:
        path = os.path.join(run.workdir, "eval", f"per_class_step{step:08d}.csv")
        metrics.write_per_class(path, results, run.inputs.class_names)
    metric = run.task.best_metric
    if np.isfinite(results[metric]) and results[metric] > best:
        best = results[metric]
        export_model(run, state, "best", step, {metric: float(best), "step": step})
    return results, best


def log_train_metrics(
    run: Run, step: int, step_metrics: Dict[str, jax.Array], start: Tuple[int, float]
) -> None:
    """Write the step's loss, speed and ETA, or stop on a non-finite loss.

    ``start`` is the first step of this process and its wall time."""
    config = run.config
    loss = float(step_metrics["loss"])
    if not np.isfinite(loss):
        raise non_finite(run, loss, step)
    elapsed = time.time() - start[1]
    rate = (step - start[0]) * config.batch_size / max(elapsed, 1e-9)
    eta = (config.num_train_steps - step) * config.batch_size / max(rate, 1e-9)
    scalars = {"loss": loss, "learning_rate": config.learning_rate, "clips_per_second": rate}
    scalars.update(grad_norm=float(step_metrics["grad_norm"]), eta_minutes=eta / 60)
    scalars["step_time"] = elapsed / (step - start[0])
    run.writer.write_scalars(step, {f"train/{k}": v for k, v in scalars.items()})
    if jax.process_index() == 0:
        with open(os.path.join(run.workdir, "train_log.jsonl"), "a") as f:
            f.write(json.dumps({"step": step, "loss": loss}) + "\n")
        total, minutes = config.num_train_steps, eta / 60
        logging.info(
            f"step {step}/{total} loss {loss:.5f}  {rate:.1f} clips/s  ETA {minutes:.1f} min"
        )


def initial_best_score(run: Run) -> float:
    """The score of the run's ``best`` so far (-1 if none), the same on every process.

    Process 0 first tidies what a crash while replacing ``best`` or ``model`` left, then reads
    the score. Every process takes process 0's value, since they must agree on when to export.
    """
    score = 0.0
    if jax.process_index() == 0:
        checkpointing.recover_exports(run.workdir)
        score = checkpointing.read_best_score(run.workdir, run.task.best_metric)
    return multihost.broadcast_float(score)


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, *, sources: Optional[Mapping[str, Any]] = None
) -> Dict[str, Any]:
    """Train ``config`` in ``workdir``, resuming from its newest intact checkpoint if any.

    ``sources`` (``{split name: panns_jax.data.Source}``, e.g. ``ArraySource``) replaces
    ``config.dataset`` by in-memory data. Returns the last evaluation's metrics.
    """
    config_checks.validate_config(config, workdir)  # Before compiling, loading or writing.
    from clu import metric_writers  # Imports TensorFlow (seconds): after the checks.

    workdir = os.path.abspath(workdir)  # orbax needs absolute paths; users pass relative ones.
    mesh = make_mesh(config.get("num_devices"))
    task, builder = tasks.get(config.get("task")), model_builder.for_config(config)
    sample_rate = builder.sample_rate()  # Loads a pretrained model, if any.
    inputs = create_inputs(config, sample_rate, sources)

    model = builder.build(inputs.train.num_classes, output=task.output)
    logging.info("training %s", builder.describe())
    optimizer = make_optimizer(config, builder)
    samples = recipe.clip_samples(config, sample_rate)
    state, abstract = create_train_state(config, mesh, builder, model, optimizer, samples)
    shapes = (samples, inputs.train.num_classes)
    train_fn, eval_fn = compile_steps(config, mesh, model, optimizer, task, abstract, shapes)

    os.makedirs(workdir, exist_ok=True)  # Only now: a refused config leaves nothing behind.
    writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
    manager = checkpointing.make_manager(workdir, config.get("keep_checkpoints", 2))
    run = Run(config, workdir, mesh, task, builder, model, inputs, manager, writer)
    restored, resumed_at = restore(run, abstract)
    state = restored if restored is not None else state
    if resumed_at is None:
        writer.write_hparams({k: str(v) for k, v in config.to_dict().items()})
    best, last_eval = initial_best_score(run), {}
    step = int(jax.device_get(state.step))
    start = (step, time.time())
    while step < config.num_train_steps:
        # Evaluate at step 0 of a fresh run and every eval_every steps, as the original.
        fresh = step > start[0] or resumed_at is None
        if config.eval_every and step % config.eval_every == 0 and fresh:
            last_eval, best = evaluate_and_log(run, eval_fn, state, step, best)
        state, step_metrics = train_fn(state, global_batch(mesh, next(inputs.train)))
        step += 1
        if step % config.log_every == 0 or step in (config.num_train_steps, start[0] + 1):
            log_train_metrics(run, step, step_metrics, start)
        if step % config.checkpoint_every == 0 or step == config.num_train_steps:
            save_checkpoint(run, state, step, step_metrics["loss"])

    manager.wait_until_finished()
    if config.eval_every:
        last_eval, best = evaluate_and_log(run, eval_fn, state, step, best)
    export_model(run, state, "model", step)
    writer.flush()
    manager.close()
    inputs.train.close()
    return last_eval
