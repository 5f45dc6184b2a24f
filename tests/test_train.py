"""Training: sharding invariance, learning, exact resume after kill -9, metrics, NaN stop."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_config import logged_losses as _losses

from panns_jax import checkpoints, metrics, model_builder, models, optim, recipe, tasks, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(data_dir, **changes):
    """The demo config shrunk to seconds (tests/train_config.py), 6 steps on 1 device."""
    import train_config

    c = train_config.get_config()
    c.data_dir = str(data_dir)
    c.num_train_steps = 6
    c.num_devices = 1  # Sharding is covered by its own test; 1 device compiles fastest.
    for key, value in changes.items():
        c[key] = value
    return c


def test_metrics_equal_scikit_learn():
    from sklearn.metrics import average_precision_score, roc_auc_score

    rng = np.random.default_rng(0)
    targets = (rng.random((200, 6)) < 0.3).astype(np.float32)
    scores = np.round(rng.random((200, 6)) * 0.5 + 0.4 * targets, 2)  # Rounded: ties too.
    result = metrics.evaluate(scores, targets)
    # Both are float64 sums over the 200 ranked clips: n eps64 relative each (Higham 2002,
    # sec. 3.1), in another order.
    rtol = 2 * len(scores) * float(np.finfo(np.float64).eps)
    np.testing.assert_allclose(
        result["average_precision"],
        average_precision_score(targets, scores, average=None),
        rtol=rtol,
        atol=0,
    )
    np.testing.assert_allclose(
        result["auc"], roc_auc_score(targets, scores, average=None), rtol=rtol, atol=0
    )
    assert result["mAP"] == pytest.approx(np.mean(result["average_precision"]))
    from scipy.stats import norm

    assert result["d_prime"] == pytest.approx(np.sqrt(2) * norm.ppf(result["mAUC"]))


def _run_optax_amsgrad(w0, grads):
    import optax

    tx = optax.amsgrad(1e-3, 0.9, 0.999, 1e-8)
    params = jnp.asarray(w0)
    state = tx.init(params)
    for g in grads:
        updates, state = tx.update(jnp.asarray(g), state, params)
        params = params + updates
    return params


def test_amsgrad_matches_pytorch():
    torch = pytest.importorskip("torch", reason="PyTorch not installed: reference unavailable")
    rng = np.random.default_rng(0)
    w0 = rng.standard_normal((5, 3)).astype(np.float32)
    grads = [rng.standard_normal((5, 3)).astype(np.float32) * s for s in (1.0, 0.01, 3.0, 0.1, 1.0)]
    weight = torch.nn.Parameter(torch.from_numpy(w0.copy()))
    reference = torch.optim.Adam([weight], lr=1e-3, betas=(0.9, 0.999), eps=1e-8, amsgrad=True)
    tx = optim.paper_optimizer()
    params = jnp.asarray(w0)
    state = tx.init(params)
    for g in grads:
        weight.grad = torch.from_numpy(g)
        reference.step()
        updates, state = tx.update(jnp.asarray(g), state, params)
        params = params + updates
    # Float32 round-off of two implementations of the same arithmetic: each step rounds the
    # new weight (half an ulp of |w| each side) and computes an update of size <= lr from m,
    # v, a square root and bias corrections (~10 roundings, each side).
    eps32 = float(np.finfo(np.float32).eps)
    bound = len(grads) * eps32 * (np.abs(w0) + 1e-3 + 20 * 1e-3)
    diff = np.abs(np.asarray(params, np.float64) - weight.detach().numpy())
    assert np.all(diff <= bound), np.max(diff / bound)
    # And the test can tell: optax's amsgrad (max of the bias-corrected v) is far outside.
    assert (
        np.max(np.abs(np.asarray(params) - np.asarray(_run_optax_amsgrad(w0, grads))) / bound) > 100
    )


def _first_step(config, num_devices):
    """Loss, gradient, and parameters before / after one train step on a fixed batch, on
    ``num_devices`` (the gradient is read back from an identity transform's state)."""
    import optax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = train.make_mesh(num_devices)
    model, _ = model_builder.registry_model(config, num_classes=10)
    record = optax.GradientTransformation(
        lambda params: (params,), lambda updates, state, params=None: (updates, (updates,))
    )
    tx = optax.chain(record, optim.paper_optimizer())
    variables = model.init(jax.random.key(0), jnp.zeros((1, 32000)), train=False)
    state = train.TrainState.create(variables, tx, jax.random.key(1))
    rng = np.random.default_rng(0)
    batch = {
        "audio": rng.uniform(-0.5, 0.5, (16, 32000)).astype(np.float32),
        "labels": (rng.random((16, 10)) < 0.3).astype(np.float32),
    }
    replicated = NamedSharding(mesh, P())
    state = jax.device_put(state, replicated)
    step = jax.jit(
        train.make_train_step(model, tx, tasks.get(config.get("task")), recipe.mixup_alpha(config)),
        in_shardings=(replicated, NamedSharding(mesh, P("data"))),
        out_shardings=(replicated, replicated),
    )
    new_state, step_metrics = step(state, train.global_batch(mesh, batch))
    return (
        float(step_metrics["loss"]),
        jax.device_get(new_state.opt_state[0][0]),
        jax.device_get(state.params),
        jax.device_get(new_state.params),
    )


def _compiled_steps(config):
    """``config``'s model, optimiser, task, abstract train state, samples per clip, and its
    train and eval steps compiled by ``train.compile_steps`` on one device (10 classes)."""
    mesh, task = train.make_mesh(1), tasks.get(None)
    builder = model_builder.for_config(config)
    model = builder.build(10, output=task.output)
    optimizer = train.make_optimizer(config, builder)
    samples = recipe.clip_samples(config, builder.sample_rate())
    _, abstract = train.create_train_state(config, mesh, builder, model, optimizer, samples)
    steps = train.compile_steps(config, mesh, model, optimizer, task, abstract, (samples, 10))
    return (model, optimizer, task, abstract, samples, *steps)


def test_train_and_eval_steps_compile_with_their_jit_options():
    """The train step compiles with models.jit_options(training=True) (YNNPACK's products
    and reductions, not its elementwise fusions), the eval step as inference (no YNNPACK
    fusion for a Cnn10 on CPU). The controls: the same step under XLA's default options
    compiles to other YNNPACK fusions, so the options are what made the difference."""
    config = tiny_config("unused")
    model, optimizer, task, abstract, samples, step, scores = _compiled_steps(config)
    training = models.jit_options(model, training=True)
    assert training and models.jit_options(model)  # Both apply to this family on CPU.

    def fusions(text):
        return text.count("__ynn_fusion")

    def train_step(**options):
        step_fn = train.make_train_step(model, optimizer, task, recipe.mixup_alpha(config))
        jitted = jax.jit(step_fn, **options)
        batch = jax.ShapeDtypeStruct((recipe.examples_per_step(config), samples), jnp.float32)
        labels = jax.ShapeDtypeStruct((recipe.examples_per_step(config), 10), jnp.float32)
        return jitted.lower(abstract, {"audio": batch, "labels": labels}).compile().as_text()

    assert fusions(step.as_text()) == fusions(train_step(**training)) >= 1
    assert fusions(train_step()) > fusions(step.as_text())  # The default adds elementwise ones.
    assert fusions(scores.as_text()) == 0


def test_steps_compile_with_the_configs_conv_backend(monkeypatch):
    """config.conv_backend='onednn' puts oneDNN's convolutions (forward and both gradients)
    into the compiled train step and its forward into the eval step, and so does the default
    ('auto', oneDNN being installed here); 'auto' meaning XLA's ($PANNS_JAX_CONV_BACKEND=xla,
    as this suite sets it) and 'xla' put none."""
    kernels = ("OnednnConv", "OnednnConvBackwardData", "OnednnConvBackwardWeights")
    assert tiny_config("unused").conv_backend == "auto"
    monkeypatch.delenv("PANNS_JAX_CONV_BACKEND")
    for config in (tiny_config("unused", conv_backend="onednn"), tiny_config("unused")):
        *_, step, scores = _compiled_steps(config)
        assert all(f'custom_call_target="{k}"' in step.as_text() for k in kernels)
        assert 'custom_call_target="OnednnConv"' in scores.as_text()
    *_, step, scores = _compiled_steps(tiny_config("unused", conv_backend="xla"))
    assert "Onednn" not in step.as_text() + scores.as_text()
    monkeypatch.setenv("PANNS_JAX_CONV_BACKEND", "xla")
    *_, step, scores = _compiled_steps(tiny_config("unused"))
    assert "Onednn" not in step.as_text() + scores.as_text()


def test_an_unusable_conv_backend_is_a_config_error(monkeypatch):
    from panns_jax.kernels import onednn

    def missing():
        raise onednn.OneDnnUnavailable("oneDNN is not installed: pip install 'panns-jax[onednn]'")

    monkeypatch.setattr(onednn, "load", missing)
    with pytest.raises(recipe.ConfigError) as error:
        _compiled_steps(tiny_config("unused", conv_backend="onednn"))
    assert str(error.value) == (
        "config.conv_backend='onednn': oneDNN is not installed: pip install 'panns-jax[onednn]'"
    )
    monkeypatch.setenv("PANNS_JAX_CONV_BACKEND", "mkl")
    with pytest.raises(recipe.ConfigError) as error:
        _compiled_steps(tiny_config("unused"))
    assert str(error.value) == (
        "config.conv_backend='auto': $PANNS_JAX_CONV_BACKEND='mkl': set it to xla or onednn, "
        "or unset it"
    )


# Slow (a minute each, several processes or eight devices); .ci/run's `-m slow` step runs it.
@pytest.mark.slow
def test_eight_devices_give_the_same_loss_as_one(tmp_path):
    """8 devices compute the step of 1, up to the order of the gradient's reductions.

    Tolerances from float32 round-off, not from this machine: each gradient entry sums
    n = 16 clips x 101 frames x 64 mel bins (~1e5) products, in another order on 8 devices
    (per-device sums, then an all-reduce), so the two gradients may differ by about
    sqrt(n) eps |terms|; we allow 4 sqrt(n) eps x the tensor's largest entry. Adam's first
    update is u(g) = -lr g / (|g| + eps_adam) (m and v bias-corrected to g and g^2), which
    flips by up to 2 lr where g's sign is within that round-off of zero:
    |u(g) - u(g')| <= 2 lr min(1, |g - g'| / (max(|g|, |g'|) + eps_adam)) exactly, and the
    new weights carry one more float32 rounding of the weight itself.
    """
    assert jax.device_count() >= 8, "conftest forces 8 host devices"
    config = tiny_config(tmp_path)
    loss_1, grads_1, params_0, params_1 = _first_step(config, 1)
    loss_8, grads_8, _, params_8 = _first_step(config, 8)
    eps32 = float(np.finfo(np.float32).eps)
    terms = 16 * config.clip_seconds * 100 * 64  # Clips x frames x mel bins per entry.
    # The loss is a mean of 16 x 10 terms, each from a ~1e5-term forward computation.
    assert loss_8 == pytest.approx(loss_1, rel=4 * np.sqrt(terms) * eps32)
    lr, eps_adam = config.learning_rate, config.eps

    def check(path, g1, g8, w0, w1, w8):
        name = jax.tree_util.keystr(path)
        g1, g8 = np.asarray(g1, np.float64), np.asarray(g8, np.float64)
        bound_g = 4 * np.sqrt(terms) * eps32 * np.max(np.abs(g1))
        assert np.max(np.abs(g8 - g1)) <= bound_g, f"{name}: gradients differ"
        flip = (
            2
            * lr
            * np.minimum(1, np.abs(g8 - g1) / (np.maximum(np.abs(g1), np.abs(g8)) + eps_adam))
        )
        bound_w = flip + 2 * eps32 * (np.abs(np.asarray(w0, np.float64)) + lr)
        diff = np.abs(np.asarray(w8, np.float64) - np.asarray(w1, np.float64))
        assert np.all(diff <= bound_w), (
            f"{name}: weights differ by up to {np.max(diff):.3g} where the "
            "gradients' round-off allows less"
        )

    jax.tree_util.tree_map_with_path(check, grads_1, grads_8, params_0, params_1, params_8)


def test_demo_training_learns_and_leaves_an_inference_checkpoint(data_dir, tmp_path, monkeypatch):
    config = tiny_config(
        data_dir,
        num_train_steps=40,
        eval_every=40,
        checkpoint_every=20,
        log_every=1,
        batch_size=8,
        eval_batch_size=16,
        learning_rate=3e-3,
    )
    monkeypatch.chdir(tmp_path.parent)  # A relative workdir, as users type it.
    result = train.train_and_evaluate(config, tmp_path.name)
    losses = _losses(str(tmp_path))
    first, last = (
        np.mean([losses[s] for s in range(1, 6)]),
        np.mean([losses[s] for s in range(36, 41)]),
    )
    assert last < 0.85 * first
    # 10 classes, 1-3 labels per clip: random scores give an mAP of about 0.2.
    initial = np.genfromtxt(
        tmp_path / "eval" / "per_class_step00000000.csv", delimiter=",", skip_header=1, usecols=2
    )
    assert result["mAP"] > 0.3 and result["mAP"] > np.mean(initial) + 0.05
    for name in ("model", "best"):
        loaded = checkpoints.load(str(tmp_path / name))
        assert loaded.model == "Cnn10" and loaded.overrides["num_classes"] == 10
    assert (tmp_path / "eval" / "per_class_step00000040.csv").exists()


def _run_main(workdir, data_dir, steps, wait=True):
    cmd = [
        sys.executable,
        "-m",
        "panns_jax.main",
        f"--config={ROOT}/tests/train_config.py",
        f"--workdir={workdir}",
        f"--config.data_dir={data_dir}",
        f"--config.num_train_steps={steps}",
    ]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    process = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    if wait:
        _, err = process.communicate(timeout=600)
        assert process.returncode == 0, err[-3000:]
    return process


# Slow (a minute each, several processes or eight devices); .ci/run's `-m slow` step runs it.
@pytest.mark.slow
def test_killed_and_resumed_run_equals_uninterrupted(data_dir, tmp_path):
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    _run_main(straight, data_dir, 12)
    process = _run_main(crashed, data_dir, 12, wait=False)
    deadline = time.time() + 300
    # Wait for the step-6 checkpoint to be committed, then kill -9 mid-run.
    while not (crashed / "checkpoints" / "6" / "_CHECKPOINT_METADATA").exists():
        assert process.poll() is None, process.stderr.read()[-3000:]
        assert time.time() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    _run_main(crashed, data_dir, 12)
    want, got = _losses(straight), _losses(crashed)
    assert sorted(got) == list(range(1, 13))
    # The same program on the same inputs and device count from an exact restore: the
    # same float32 operations in the same order, so the same bits (no round-off to allow).
    for step in range(1, 13):
        assert got[step] == want[step], step


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(data_dir, tmp_path, monkeypatch):
    make_step = train.make_train_step

    def poisoned(model, optimizer, task, mixup_alpha):
        step_fn = make_step(model, optimizer, task, mixup_alpha)

        def wrapped(state, batch):
            new_state, step_metrics = step_fn(state, batch)
            loss = jnp.where(state.step >= 4, jnp.nan, step_metrics["loss"])
            return new_state, {**step_metrics, "loss": loss}

        return wrapped

    monkeypatch.setattr(train, "make_train_step", poisoned)
    config = tiny_config(data_dir, num_train_steps=8, checkpoint_every=3, log_every=100)
    with pytest.raises(train.NonFiniteLossError, match="loss became nan at step 6"):
        train.train_and_evaluate(config, str(tmp_path))
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["3"]


# Slow (a minute each, several processes or eight devices); .ci/run's `-m slow` step runs it.
@pytest.mark.slow
def test_resume_onto_a_different_number_of_devices(data_dir, tmp_path):
    """A checkpoint written by 8 devices resumes on 2 and continues the same run.

    Tolerances from float32 round-off, as in test_eight_devices_give_the_same_loss_as_one:
    after the restore the two runs compute the same steps, but the cross-device reductions
    (BatchNorm's batch statistics, the loss mean, the gradient) sum ``terms`` values in
    another order, a relative error of about sqrt(terms) eps; 4x margin. Each step since
    the restore adds one such error, through the weights it changed.
    """
    config = tiny_config(data_dir)
    straight, moved = str(tmp_path / "straight"), str(tmp_path / "moved")
    train.train_and_evaluate(tiny_config(data_dir, num_train_steps=6, num_devices=8), straight)
    train.train_and_evaluate(tiny_config(data_dir, num_train_steps=3, num_devices=8), moved)
    assert sorted(os.listdir(os.path.join(moved, "checkpoints"))) == ["3"]
    restored = checkpoints.load(os.path.join(moved, "model")).variables  # At step 3.
    train.train_and_evaluate(tiny_config(data_dir, num_train_steps=6, num_devices=2), moved)
    want, got = _losses(straight), _losses(moved)
    with open(os.path.join(moved, "train_log.jsonl")) as f:
        logged = [json.loads(line)["step"] for line in f]
    assert logged == list(range(1, 7)), "the 2-device run must resume at step 4, not restart"
    eps32 = float(np.finfo(np.float32).eps)
    terms = 2 * config.batch_size * config.clip_seconds * 100 * 64  # Mixup's clips x frames x mels.
    rel = 4 * np.sqrt(terms) * eps32
    for step in range(1, 4):  # Before the restore: the same run on 8 devices, bit for bit.
        assert got[step] == want[step], step
    for step in range(4, 7):  # Steps after the restore ran on 2 devices.
        assert got[step] == pytest.approx(want[step], rel=(step - 3) * rel, abs=0), step
    final = checkpoints.load(os.path.join(moved, "model"))
    reference = checkpoints.load(os.path.join(straight, "model"))

    def check(path, a, b, start):
        name = jax.tree_util.keystr(path)
        a, b, start = (np.asarray(x, np.float64) for x in (a, b, start))
        if name.startswith("['batch_stats']"):
            # Running averages of batch statistics, each a reduction: relative to their size.
            bound = 3 * rel * np.max(np.abs(b))
        else:
            # Three updates, each off by the gradient's relative round-off: relative to the
            # largest change since the restore, plus a float32 rounding of the weight.
            bound = 3 * rel * np.max(np.abs(b - start)) + 2 * eps32 * np.abs(b)
        diff = np.abs(a - b)
        assert np.all(diff <= bound), f"{name}: {np.max(diff):.3g} > {np.min(bound):.3g}"

    jax.tree_util.tree_map_with_path(check, final.variables, reference.variables, restored)


def test_evaluate_scores_a_recording_by_the_mean_of_its_segments():
    """On 4 devices, the eval scores of recordings cut into segments are their segments'
    mean; labels and counts are per recording. Negative control: the first segment alone."""
    from panns_jax.data import pipeline, sources

    rng = np.random.default_rng(0)
    lengths = [250, 100, 420, 90, 300, 600, 120]
    audio = [rng.uniform(-0.9, 0.9, n).astype(np.float32) for n in lengths]
    labels = np.array([0, 1, 2, 0, 1, 2, 1])
    source = sources.ArraySource(audio, labels, num_classes=3)
    batches = pipeline.make_eval_iterator(
        source, batch_size=8, clip_samples=100, segments=True, process_index=0, process_count=1
    )
    mesh = train.make_mesh(4)
    weights = jnp.array([[1.0, -1.0, 0.5]])

    def eval_fn(params, batch_stats, x):  # Any per-row function of the audio.
        return jax.nn.softmax(jnp.mean(x, axis=1, keepdims=True) * 50 * weights)

    class State:
        params, batch_stats = {}, {}

    task = tasks.get("singlelabel")
    result = train.evaluate(jax.jit(eval_fn), State(), batches, mesh, task)
    int16 = [samples for samples, _ in source.read(np.arange(7))]
    want = []
    for x in int16:
        x = x.astype(np.float32) / 32768
        starts = [min(k * 100, len(x) - 100) for k in range(-(-len(x) // 100))]
        rows = np.stack([x[s : s + 100] for s in starts])
        want.append(np.asarray(eval_fn(None, None, rows)).mean(axis=0))
    expected = task.evaluate(np.stack(want), np.eye(3, dtype=np.float32)[labels])
    assert result["num_examples"] == 7
    assert result["accuracy"] == expected["accuracy"]
    np.testing.assert_allclose(result["average_precision"], expected["average_precision"])
    firsts = np.stack([np.asarray(eval_fn(None, None, x[None, :100] / 32768))[0] for x in int16])
    first_only = task.evaluate(firsts, np.eye(3, dtype=np.float32)[labels])
    assert not np.allclose(first_only["average_precision"], expected["average_precision"])
