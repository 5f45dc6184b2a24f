"""Our train step does what the original's does, step for step (golden/train oracle).

For each of the oracle's 11 models (every family and mixup placement): the recipe weights,
the oracle's batch and lambda, dropout and SpecAugment off, and three steps of OUR public
training path (``train.make_train_step``, ``train.make_optimizer``, the model's own mixup,
``tasks.binary_cross_entropy``), traced once and run in float32 and float64 side by side,
float32 taking every decision (ReLU, clamp, max-pool) as float64 takes it
(tests/float64_decisions.py). Then:

* the float64 run must be within float64's round-off of the oracle's float64 run, tensor by
  tensor: 2^-29 of PyTorch float32's distance (x K64) wherever float32 knows the tensor to
  10 bits, and no further than PyTorch float32 elsewhere (tests/train_oracle.py, ``bound``).
  With the original's own STFT kernel and float32 mixing weights, both read from facts and
  from the oracle itself, that is 1e-12 or closer on every model: it proves the training
  math on every processor (a ReLU input would have to sit within 1e-16 of zero to flip);
* the float32 run, which meets no kink, must be within K x PyTorch float32's own distance
  to float64 (+ a float32 floor) tensor by tensor, the state after 3 steps worst tensor
  against PyTorch's worst, the losses likewise (tests/train_oracle.py derives K and the
  floor);

jitted (as training runs it) and op by op. Four broken implementations must fail both.

``pytest tests/test_train_parity.py -s`` prints the per-model table of worst errors.
"""

from __future__ import annotations

from typing import Tuple
from unittest import mock

import float64_decisions as F
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import train_oracle as T

from panns_jax import frontend, recipe
from panns_jax.kernels import onednn
from panns_jax.models import backends, layers

RESULTS = {}  # (model, 'jit' | 'eager') -> Comparison, for the table printed at the end.


@pytest.fixture(scope="module", autouse=True)
def table():
    yield
    if RESULTS:
        print("\n" + T.format_table(RESULTS))


def test_training_oracle_is_complete():
    """All 11 oracle files are there (a missing oracle fails, it never skips)."""
    missing = [name for name in T.ORACLE_MODELS if not T.oracle_path(name).exists()]
    assert not missing, f"missing training oracle files in {T.TRAIN_ORACLE}: {missing}"
    for name in T.ORACLE_MODELS:
        oracle = T.load_oracle(name)
        assert oracle["x"].shape[0] == 4 and oracle["lam"].shape == (2,)
        assert T.oracle_keys(oracle, "grad") and T.oracle_keys(oracle, "step1")


def test_the_oracles_float32_mixing_weights_are_read_back_exactly():
    """The oracle mixed with float32([λi, 1−λi]) rounded from float64 λi; LeeNet11's first
    BatchNorm pins the 1−λi it used: one float32 candidate reproduces the oracle's running
    variance to float64 round-off, its neighbours and 1 − (stored λi) do not."""
    fit = T.oracle_mixing_weights()
    oracle = T.load_oracle(T.MIXING_SOURCE[0])
    # A variance over n = 2 x 10667 terms is within n * eps64 of exact, and reading the
    # batch's part out of the running variance (subtracting 0.9 x the old one) multiplies
    # that by at most |running| / |0.1 x batch part| < 10 on these channels.
    n = 2 * ((oracle["x"].shape[1] - 1) // 3 + 1)
    roundoff = 10 * n * T.EPS64  # 4.7e-11
    assert fit.residual <= roundoff, fit
    np.testing.assert_array_equal(fit.weights[0::2], oracle["lam"])
    assert np.all(np.abs(fit.weights[1::2] - (1 - oracle["lam"].astype(np.float64))) < 1e-7)
    # Negative controls: the next float32 candidate, and 1 − λi from the stored λi in float64
    # (what the step computes), miss by float32-sized amounts.
    assert fit.runner_up > 100 * roundoff, fit
    assert fit.naive > 100 * roundoff, fit


def _check(name: str, jit: bool, conv_backend: str = "xla") -> None:
    with mock.patch.object(onednn, "grads", wraps=onednn.grads) as grads:
        with backends.tracing_with(conv_backend):  # The step is traced inside (F.paired).
            runs = T.run_oracle_steps(name, jit=jit)
    # The convolutions' gradients ran on oneDNN exactly when the backend says so.
    assert (grads.call_count > 0) == (conv_backend == "onednn")
    mode = conv_backend if conv_backend != "xla" else "jit" if jit else "eager"
    exact = T.compare(name, runs.f64, precision=64)
    result = T.compare(name, runs.f32)
    RESULTS[(name, mode)] = result
    RESULTS[(name, f"{mode}64")] = exact
    assert runs.decisions > 0  # The step decides (ReLU, max-pool, ...); float64 took them.
    assert exact.ok, "float64:\n" + "\n".join(exact.problems)
    assert result.ok, "float32 with float64's decisions:\n" + "\n".join(result.problems)


# The slowest to compile or run are marked slow to keep the README's suite under 20 minutes;
# .ci/run runs them anyway (`-m slow` on this file).
SLOW_TO_COMPILE = (
    "Cnn14",
    "DaiNet19",
    "MobileNetV1",
    "MobileNetV2",
    "ResNet22",
    "Res1dNet31",
    "Wavegram_Logmel_Cnn14",
    "Cnn14_DecisionLevelAtt",
    "Cnn14_mixup_time_domain",
)


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=pytest.mark.slow) if n in SLOW_TO_COMPILE else n
        for n in T.ORACLE_MODELS
    ],
)
def test_jitted_step_matches_original(name):
    _check(name, jit=True)


# oneDNN's kernels in the jitted step (conv_backend="onednn"); the float64 copy runs XLA's
# convolution in their place (tests/float64_decisions.py). One 2-D and one 1-D model in the
# suite, the other families in the slow step.
@pytest.mark.parametrize(
    "name",
    [
        "Cnn6",
        "LeeNet11",
        pytest.param("ResNet22", marks=pytest.mark.slow),
        pytest.param("Res1dNet31", marks=pytest.mark.slow),
        pytest.param("Wavegram_Logmel_Cnn14", marks=pytest.mark.slow),
    ],
)
def test_jitted_step_on_onednn_matches_original(name):
    _check(name, jit=True, conv_backend="onednn")


# Op by op: a minute (Cnn6) to two (Cnn14, at 19 GB) per model on 2 cores. .ci/run's `-m slow`
# step runs the four smallest families; `python -m pytest -m slow` runs all eleven.
@pytest.mark.slow
@pytest.mark.parametrize("name", T.ORACLE_MODELS)
def test_step_matches_original_without_jit(name):
    """Op by op (no jit): the path a user debugging with ``jax.disable_jit`` takes."""
    _check(name, jit=False)


def _planted_kink():
    """``(w, x)`` in float32 where ``(x @ w)[3, 0]`` sits within round-off of 0 and this
    CPU's float32 matrix product gives it the other sign than float64 does."""
    for seed in range(100):
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((16, 64)).astype(np.float32)
        w = (rng.standard_normal((64, 8)) / 8).astype(np.float32)
        x64 = x.astype(np.float64)
        w[0, 0] -= np.float32((x64[3] @ w.astype(np.float64)[:, 0]) / x64[3, 0])
        h32 = float(np.asarray(jnp.asarray(x) @ jnp.asarray(w))[3, 0])
        h64 = float(x64[3] @ w.astype(np.float64)[:, 0])
        if (h32 > 0) != (h64 > 0):
            return w, x
    raise AssertionError("no seed put float32 and float64 on both sides of the kink")


def test_float32_follows_float64_decisions():
    """A ReLU input planted at a kink that float32 alone decides the other way, under a
    max-pool and a max reduction: the paired float32 copy takes float64's branch, so its
    gradient is float64's gradient rounded, where float32's own is off by a whole input."""
    w, x = _planted_kink()

    def f(w, x):
        h = jax.nn.relu(x @ w)
        pooled = jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (2, 1), (2, 1), "VALID")
        return jnp.sum(pooled) + jnp.sum(jnp.max(h, axis=1)) + jnp.sum(h)

    grad = jax.grad(f)
    interpreter, _ = F.paired(grad, w, x)
    with jax.enable_x64(True):
        (g32,), (g64,), resolved = interpreter([jnp.asarray(w), jnp.asarray(x)], [F.up(w), F.up(x)])
        own = np.asarray(grad(jnp.asarray(w), jnp.asarray(x)))
        exact = np.asarray(grad(F.up(w), F.up(x)))
    assert interpreter.decisions >= 3  # max (ReLU), its gradient's comparison, the pools.
    assert bool(np.all(resolved))  # float32 resolves every decided operand here.
    assert g32.dtype == jnp.float32 and g64.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(g64), exact, rtol=1e-14, atol=0)
    scale = float(np.abs(exact).max())
    assert float(np.abs(np.asarray(g32) - exact).max()) <= 64 * T.EPS32 * scale
    # Negative control: float32 deciding on its own takes the other branch at the kink.
    assert float(np.abs(own - exact).max()) > 1e3 * 64 * T.EPS32 * scale


# ----------------------------------------------------------------------------
# Negative controls: broken training steps that the same comparison must reject. They run
# on Cnn6 (the oracle's cheapest model; it has conv blocks, bn0 and mixup on the log-mel).
# ----------------------------------------------------------------------------

CONTROL = "Cnn6"


def _batchnorm_call(context) -> bool:
    return isinstance(context.module, layers.BatchNorm) and context.method_name == "__call__"


def _training(args, kwargs) -> bool:
    return not kwargs.get("use_running_average", args[1] if len(args) > 1 else True)


def _stats_without_gradient(next_fun, args, kwargs, context):
    """BatchNorm normalising with its batch statistics under stop_gradient."""
    y = next_fun(*args, **kwargs)  # Running statistics updated as usual.
    if not (_batchnorm_call(context) and _training(args, kwargs)):
        return y
    module, x = context.module, args[0].astype(jnp.float32)
    axes = tuple(range(x.ndim - 1))
    mean = jax.lax.stop_gradient(jnp.mean(x, axis=axes))
    var = jax.lax.stop_gradient(jnp.mean(jnp.square(x - mean), axis=axes))
    scale = module.get_variable("params", "scale")
    bias = module.get_variable("params", "bias")
    return ((x - mean) * (scale * jax.lax.rsqrt(var + module.epsilon)) + bias).astype(y.dtype)


def _biased_running_variance(next_fun, args, kwargs, context):
    """flax.linen.BatchNorm's update: the running variance moves towards the biased one."""
    if not (_batchnorm_call(context) and _training(args, kwargs)):
        return next_fun(*args, **kwargs)
    module, x = context.module, args[0].astype(jnp.float32)
    old = module.get_variable("batch_stats", "var")
    y = next_fun(*args, **kwargs)
    axes = tuple(range(x.ndim - 1))
    biased = jnp.mean(jnp.square(x - jnp.mean(x, axis=axes)), axis=axes)
    module.put_variable(
        "batch_stats", "var", module.momentum * old + (1 - module.momentum) * biased
    )
    return y


def _control(perturbation: str) -> Tuple[T.Comparison, T.Comparison]:
    oracle = T.load_oracle(CONTROL)
    kwargs = {}
    if perturbation == "bn_stop_gradient":
        kwargs["interceptors"] = [_stats_without_gradient]
    elif perturbation == "biased_running_var":
        kwargs["interceptors"] = [_biased_running_variance]
    elif perturbation == "optax_amsgrad":
        c = recipe.base_config(CONTROL)
        kwargs["optimizer"] = optax.amsgrad(c.learning_rate, c.b1, c.b2, c.eps)
    elif perturbation == "mixup_after_conv_block1":
        mixup, lam = frontend.mixup, jnp.asarray(oracle["lam"])

        def mix_after_block1(next_fun, args, kwargs_, context):
            y = next_fun(*args, **kwargs_)
            if context.module.name == "conv_block1" and context.method_name == "__call__":
                return mixup(y, lam)
            return y

        # The stem's mixup (of the (2B, T, F, 1) log-mel image) is skipped; targets (2-D)
        # are still mixed by the train step, and conv_block1's output is mixed instead.
        kwargs["patches"] = [
            mock.patch.object(
                frontend, "mixup", lambda x, lam_: x if x.ndim == 4 else mixup(x, lam_)
            )
        ]
        kwargs["interceptors"] = [mix_after_block1]
    runs = T.run_oracle_steps(CONTROL, jit=True, train_options=False, **kwargs)
    return T.compare(CONTROL, runs.f32), T.compare(CONTROL, runs.f64, precision=64)


@pytest.mark.parametrize(
    "perturbation, part",
    [
        ("bn_stop_gradient", "grad/"),
        ("mixup_after_conv_block1", "grad/"),
        ("optax_amsgrad", ("final:", "losses")),  # Differs from step 2 on (losses 2-3).
        ("biased_running_var", "step1/"),
    ],
)
def test_broken_training_fails_the_comparison(perturbation, part):
    for result in _control(perturbation):  # float32, then float64.
        assert not result.ok, f"{perturbation} passed the comparison with the original"
        assert any(p.startswith(part) for p in result.problems), result.problems
        if perturbation == "optax_amsgrad":  # Step 1 is the same for both AMSGrads.
            assert not any(p.startswith(("grad/", "step1/")) for p in result.problems)


def test_float64_sees_an_stft_kernel_one_float32_step_off_in_a_few_entries():
    """``frontend.dft_kernel`` rounds hann * cos correctly; the original's kernel differs in
    ~0.1% of its float32 entries by one step. float32 cannot tell; the float64 comparison
    must, or it could not tell the original's training math from a near miss."""
    kernels = (T.original_dft_kernel(1024), frontend.dft_kernel(1024))
    assert 0 < np.count_nonzero(kernels[0] != kernels[1]) < 2e-3 * kernels[0].size
    ours = mock.patch.object(frontend, "dft_kernel", frontend.dft_kernel)  # Over the oracle's.
    runs = T.run_oracle_steps(CONTROL, jit=True, patches=[ours], train_options=False)
    assert T.compare(CONTROL, runs.f32).ok
    result = T.compare(CONTROL, runs.f64, precision=64)
    assert not result.ok and any(p.startswith(("grad/", "step1/")) for p in result.problems)


def test_bce_gradient_is_pytorchs_where_probabilities_saturate():
    """A sigmoid that rounds to exactly 0 or 1 (DaiNet19 on the oracle's batch) must give
    PyTorch's finite gradient (p - t) / max(p (1 - p), 1e-12), not 0 * inf = NaN."""
    torch = pytest.importorskip("torch", reason="PyTorch not installed: reference unavailable")
    from panns_jax import tasks

    logits = np.array([[40.0, -120.0, 0.3, 17.0], [-3.0, 2.0, -17.0, 120.0]], np.float32)
    targets = np.array([[1.0, 0.0, 0.3, 0.5], [0.0, 1.0, 0.7, 0.0]], np.float32)
    p = np.asarray(jax.nn.sigmoid(jnp.asarray(logits)))
    assert np.any(p == 1.0) and np.any(p == 0.0)
    grad_p, grad_t = jax.grad(tasks.binary_cross_entropy, (0, 1))(
        jnp.asarray(p), jnp.asarray(targets)
    )
    p_t = torch.tensor(p, requires_grad=True)
    t_t = torch.tensor(targets, requires_grad=True)
    loss = torch.nn.functional.binary_cross_entropy(p_t, t_t)
    loss.backward()
    assert float(tasks.binary_cross_entropy(p, targets)) == pytest.approx(loss.item(), rel=1e-6)
    eps32 = np.finfo(np.float32).eps  # A few roundings of (p - t) / max(p (1 - p), 1e-12).
    np.testing.assert_allclose(grad_p, p_t.grad.numpy(), rtol=4 * eps32, atol=0)
    # The targets' gradient (never trained) uses the clamped logs: finite, where PyTorch's
    # is +-inf at saturation, and PyTorch's elsewhere.
    finite = np.isfinite(t_t.grad.numpy())
    assert np.all(np.isfinite(grad_t)) and not np.all(finite)
    np.testing.assert_allclose(
        np.asarray(grad_t)[finite], t_t.grad.numpy()[finite], rtol=4 * eps32, atol=0
    )
