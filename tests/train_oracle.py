"""Our train step, run the way ``../shared/golden/train`` ran the original, and compared.

The oracle (golden/train/README.md) ran 3 steps of the ORIGINAL recipe on one fixed batch
with dropout and SpecAugment switched off, in float32 and float64, and kept fingerprints
(values at ``idx/K`` in PyTorch layout, and norms) of the step-1 gradient, the BatchNorm
running statistics after step 1 and every tensor after step 3. :func:`run_oracle_steps` runs
OUR public pieces the same way: ``models.get`` with SpecAugment off, the golden recipe's
weights through ``convert.from_state_dict``, ``train.make_train_step`` with the paper's
config and ``train.make_optimizer``, mixup at the model's own place with the stored
lambda, traced once and run in float32 and float64 side by side, float32 taking float64's
decisions (:mod:`float64_decisions`). Two constants are the original's own float32 numbers
rather than ours, since float64 resolves them: the STFT kernel (:func:`original_dft_kernel`)
and the mixing weights (:func:`oracle_mixing_weights`). :func:`compare` judges either run
against the oracle's float64 with PyTorch float32's own distance to float64 as the yardstick.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple
from unittest import mock

import flax.linen as nn
import float64_decisions as F
import golden_utils as G
import jax
import jax.numpy as jnp
import numpy as np
import optax

from panns_jax import convert, frontend, model_builder, models, recipe, tasks, train
from panns_jax.models import layers

TRAIN_ORACLE = G.GOLDEN / "train"
# golden/train/README.md: every family and every mixup placement.
ORACLE_MODELS = (
    "Cnn14",
    "Cnn6",
    "ResNet22",
    "MobileNetV1",
    "MobileNetV2",
    "LeeNet11",
    "DaiNet19",
    "Res1dNet31",
    "Wavegram_Logmel_Cnn14",
    "Cnn14_mixup_time_domain",
    "Cnn14_DecisionLevelAtt",
)
STEPS = 3

EPS32 = float(np.finfo(np.float32).eps)  # 1.19e-7
EPS64 = float(np.finfo(np.float64).eps)  # 2.2e-16
# Tolerance = K * (PyTorch float32's distance to float64 for that tensor) + FLOOR.
# K: two float32 implementations of the same sums differ from the exact result by errors of
# the same size but independent signs and orders of summation (XLA's blocked reductions vs
# ATen's, fused vs unfused BatchNorm), so ours may land a few times further out than
# PyTorch's on any one tensor; 8 leaves room for that, while the negative controls land far
# beyond the bound (measured on Cnn6): a biased running variance 34x (BN statistics), optax's
# amsgrad 45x (losses of steps 2-3), mixup after conv_block1 1.7e4x and BatchNorm statistics
# under stop_gradient 2.6e5x (gradients).
K = 8.0
# FLOOR: where PyTorch float32 happens to land (almost) on float64, a relative error of a
# few dozen float32 roundings (a BatchNorm statistic or a gradient entry is a sum of a few
# hundred to a few thousand rounded terms: sqrt(n) eps ~ 30 eps).
FLOOR = 64 * EPS32  # 7.6e-6
# A float64 run is held to float64's round-off. Where PyTorch float32 knows a tensor to at
# least 10 bits (its error <= LINEAR), its error is first order in float32's round-off,
# and the same computation in float64 lands eps64 / eps32 = 2^-29 as far out: our float64
# run must be within K64 x that + FLOOR64. K64 is K for the same reasons, x4 because the
# bound compares two single runs (ours and the oracle's float64 both round): measured worst
# 5x (Res1dNet31's BatchNorms over two values per channel), typical 0.01-1x. That proves the
# training math to ~1e-12 wherever float32 resolves it, with the oracle's own STFT kernel
# and mixing weights (original_dft_kernel, oracle_mixing_weights); each broken step above
# misses the bound by 1e10 or more. Where float32 knows a tensor to fewer bits (a gradient
# that vanishes exactly, weights after Adam steps driven by such gradients, a loss through
# a saturated sigmoid), float32's error no longer measures the conditioning: there the
# float64 run must be at least as close to the oracle as PyTorch float32 is. Res1dNet31's
# losses after two and three steps are such: ours are 2e-2 from the oracle's float64 (PyTorch
# float32: 0.16), and moving one input sample by one float32 step moves our own float64
# losses by 4-5%.
LINEAR = 2.0**-10
K64 = 32.0
FLOOR64 = 64 * EPS64  # 1.4e-14


def bound(yardstick: float, precision: int) -> float:
    """The largest error vs the oracle's float64 that round-off allows a run of
    ``precision`` bits on a quantity PyTorch float32 computes ``yardstick`` away."""
    if precision == 32:
        return K * yardstick + FLOOR
    if yardstick <= LINEAR:
        return K64 * yardstick * EPS64 / EPS32 + FLOOR64
    return yardstick + FLOOR64


def oracle_path(name: str):
    return TRAIN_ORACLE / f"{name}.npz"


@functools.lru_cache(maxsize=None)
def load_oracle(name: str) -> Dict[str, np.ndarray]:
    """The oracle of ``name``; a missing file is an error (the tests must fail, not skip)."""
    path = oracle_path(name)
    if not path.exists():
        raise FileNotFoundError(
            f"training oracle {path} is missing: the team's shared/ folder "
            "must sit beside the project root (or set PANNS_JAX_SHARED)"
        )
    return dict(np.load(path))


# The original's mixing vector [λ0, 1−λ0, λ1, 1−λ1] is float64 (numpy's beta draws) and
# becomes a float32 tensor (golden/TRAINING.md §4.1), each entry rounded on its own; both of
# the oracle's runs mixed inputs and targets with it. So 1−λi as the oracle used it is
# float32(1 − λi in float64), which the stored float32 λi pins down only to a few float32
# steps: float32(1 − stored λi) can be another value, 4e-8 away, and float64 resolves that.
# It is read back from the oracle itself (:func:`oracle_mixing_weights`).
MIXING_SOURCE = ("LeeNet11", "conv_block1")  # Mixup on the waveform, then one conv + BN.
MIXING_ULPS = 4  # float32 candidates tried on each side of float32(1 − stored λi).


@dataclasses.dataclass(frozen=True)
class MixingFit:
    """The float32 mixing vector that reproduces the oracle, and how well the others do."""

    weights: np.ndarray  # (4,) float32: [λ0, 1−λ0, λ1, 1−λ1] as the original multiplied.
    residual: float  # Max relative error of the first BN's batch variance with ``weights``.
    runner_up: float  # The same for the next best candidate.
    naive: float  # The same for [λ0, 1 − λ0, ...] computed from the stored λ in float64.


def _neighbours(value: np.float32, count: int) -> List[np.float32]:
    below, above, out = value, value, [value]
    for _ in range(count):
        below = np.nextafter(below, np.float32(-np.inf))
        above = np.nextafter(above, np.float32(np.inf))
        out += [below, above]
    return out


@functools.lru_cache(maxsize=None)
def oracle_mixing_weights() -> MixingFit:
    """Recover the float32 mixing vector of the oracle's runs from its own numbers.

    LeeNet11 mixes the raw waveform, then its first BatchNorm normalises one strided
    convolution of the mixture (golden/ARCHITECTURES.md §6). The oracle's float64 running
    variance after step 1 gives that BatchNorm's unbiased batch variance per channel, an
    exact quadratic function of the four weights, computed here in float64 numpy from the
    stored batch and the recipe's kernel. The stored λi are taken as they are; each 1−λi is
    searched among the float32 values within MIXING_ULPS steps of float32(1 − λi). Exactly
    one pair reproduces the oracle to float64 round-off; the others miss by 1e-8 or more.
    """
    name, block = MIXING_SOURCE
    oracle = load_oracle(name)
    state = G.load_state(name)
    kernel = np.asarray(state[f"{block}.conv1.weight"], np.float64)[:, 0, :]  # (C, 3)
    key = f"{block}.bn1.running_var"
    idx = oracle[f"idx/{key}"]
    initial = np.asarray(state[key], np.float64)[idx]
    # running = m * running + (1 - m) * unbiased batch variance (layers.BN_MOMENTUM = 0.9).
    momentum = layers.BN_MOMENTUM
    batch_var = (oracle[f"f64/step1/val/{key}"] - momentum * initial) / (1 - momentum)
    x = np.pad(oracle["x"].astype(np.float64), ((0, 0), (1, 1)))  # Conv k3, stride 3, pad 1.
    frames = (oracle["x"].shape[1] - 1) // 3 + 1
    taps = np.stack([x[:, 3 * np.arange(frames) + j] for j in range(3)], -1)
    per_clip = np.einsum("bnk,ck->bcn", taps, kernel[idx])  # Each source clip's conv output.

    def misfit(weights: np.ndarray) -> float:
        w = np.asarray(weights, np.float64)
        mixed = np.concatenate(
            [w[2 * i] * per_clip[2 * i] + w[2 * i + 1] * per_clip[2 * i + 1] for i in (0, 1)],
            axis=1,
        )  # (C, pairs * frames): BatchNorm1d's statistics run over batch and time.
        return float(np.max(np.abs(mixed.var(axis=1, ddof=1) / batch_var - 1)))

    lam = oracle["lam"].astype(np.float32)
    candidates = [
        np.array([lam[0], a0, lam[1], a1], np.float32)
        for a0 in _neighbours(np.float32(1 - np.float64(lam[0])), MIXING_ULPS)
        for a1 in _neighbours(np.float32(1 - np.float64(lam[1])), MIXING_ULPS)
    ]
    fits = sorted((misfit(w), i) for i, w in enumerate(candidates))
    naive = misfit(np.array([lam[0], 1 - np.float64(lam[0]), lam[1], 1 - np.float64(lam[1])]))
    return MixingFit(candidates[fits[0][1]], fits[0][0], fits[1][0], naive)


@functools.lru_cache(maxsize=None)
def original_dft_kernel(n_fft: int) -> np.ndarray:
    """The STFT kernel as the original builds it, for ``frontend.dft_kernel``'s place.

    The original raises ``exp(-2 pi i / N)`` to the integer powers ``n k`` with numpy's
    complex power, windows it in float64 and rounds to float32 (golden/README.md gives the
    formula). Powers up to N^2 / 2 carry up to 2e-11 of error, so ~0.1% of the float32 entries
    land one float32 step from ``frontend.dft_kernel``'s correctly rounded ones: invisible
    in float32, but a ~1e-13 difference in the log-mel that float64 resolves.
    """
    n = np.arange(n_fft)
    basis = np.power(np.exp(-2j * np.pi / n_fft), np.outer(n, n[: n_fft // 2 + 1]))
    basis = basis * frontend._hann_window64(n_fft)[:, None]
    kernel = np.concatenate([basis.real, basis.imag], axis=1).astype(np.float32)
    return np.ascontiguousarray(kernel[:, None, :])


_OUR_MIXUP = frontend.mixup  # Before run_oracle_steps patches it.


def mix_as_the_oracle(x: jax.Array, lam: jax.Array) -> jax.Array:
    """The step's own ``frontend.mixup`` with the oracle's 1−λi: what our ``1 − λi`` lacks
    of float32(1 − λi in float64), ~1e-8, is added to the odd rows' weight."""
    weights = oracle_mixing_weights().weights.astype(np.float64)
    excess = weights[1::2] - (1 - weights[0::2])
    excess = jnp.asarray(excess).astype(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
    return _OUR_MIXUP(x, lam) + excess * x[1::2]


def oracle_keys(oracle: Dict[str, np.ndarray], part: str) -> List[str]:
    prefix = f"f64/{part}/norm/"
    return sorted(k[len(prefix) :] for k in oracle if k.startswith(prefix))


def build_model(name: str, **overrides):
    """``name`` as the oracle ran it: SpecAugment off where the model has it, and the STFT
    as the original computes it, a convolution with the windowed DFT basis rounded once to
    float32 (``stft="dft"``), so that both precisions start from the original's kernel.
    (The default FFT front end rounds the window alone; its log-mel equals this one to
    float32 round-off, as tests/test_frontend.py checks.)"""
    cls, _ = models.REGISTRY[name]
    fields = {f.name for f in dataclasses.fields(cls)}
    if "spec_augment" in fields:
        overrides.setdefault("spec_augment", False)
    model = models.get(name, **overrides)
    if "frontend" in fields and "frontend" not in overrides:
        model = model.clone(frontend=dataclasses.replace(model.frontend, stft="dft"))
    return model


def initial_variables(name: str, model) -> Dict[str, Any]:
    """The recipe weights + calibrated BN stats (golden/README.md) as our variables."""
    return convert.from_state_dict(G.load_state(name), model, name=name)


def _no_dropout(next_fun, args, kwargs, context):
    """flax interceptor: every ``nn.Dropout`` returns its input (the oracle's dropout off)."""
    if isinstance(context.module, nn.Dropout) and context.method_name == "__call__":
        return args[0]
    return next_fun(*args, **kwargs)


class RecordGradsState(NamedTuple):
    grads: Any


def record_grads() -> optax.GradientTransformation:
    """An identity transform that keeps the incoming gradient in its state, so that the
    train step's gradient can be read back from ``state.opt_state[0]``."""
    return optax.GradientTransformation(
        lambda params: RecordGradsState(jax.tree_util.tree_map(jnp.zeros_like, params)),
        lambda updates, state, params=None: (updates, RecordGradsState(updates)),
    )


def torch_layout(variables: Dict[str, Any], model, dtype=np.float32) -> Dict[str, np.ndarray]:
    """``{state_dict key: array}`` of our variables (the converter's mapping)."""
    return convert.to_state_dict(
        jax.device_get(variables), model, include_frontend=False, dtype=dtype
    )


@dataclasses.dataclass
class Run:
    """What our train step did, in PyTorch layout (state_dict keys)."""

    losses: np.ndarray
    grads: Dict[str, np.ndarray]
    step1: Dict[str, np.ndarray]
    final: Dict[str, np.ndarray]
    initial: Dict[str, np.ndarray]


@dataclasses.dataclass
class Runs:
    """The float32 run (float64's decisions) and the float64 run of the same steps."""

    f32: Run
    f64: Run
    decisions: int  # Deciding primitives in one step (comparisons, max, max-pool, ...).
    unresolved: List[str]  # Sites of step 1 where float32 kept its own decisions.
    seconds: float


# Where float32 keeps its own decisions: the network's ReLUs, max-pools and clamps (its
# kinks) follow float64, but the loss and the optimiser decide on values that float32 may
# round far from float64's without any kink: a sigmoid saturated to exactly 1 (the BCE's
# clamps at -100 and 1e-12), and the AMSGrad maximum of second moments, whose float32 and
# float64 candidates differ by as much as the gradients of a saturated loss do. Pairing
# float64's branch with float32's far value there would be neither computation.
LOSS_SCOPE = "oracle_loss"
OPTIMIZER_SCOPE = "oracle_optimizer"


class _ScopedTask:
    """The task with its loss under LOSS_SCOPE."""

    def __init__(self, task):
        self._task = task

    def __getattr__(self, name):
        return getattr(self._task, name)

    def loss(self, outputs, targets):
        # The oracle clips the mixed targets to [0, 1] (golden/train/README.md): with its
        # float32 weights a class both clips hold mixes to 1 + 4e-8.
        with jax.named_scope(LOSS_SCOPE):
            return self._task.loss(outputs, jnp.clip(targets, 0, 1))


def _scoped(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """``tx`` with its update under OPTIMIZER_SCOPE."""

    def update(updates, state, params=None):
        with jax.named_scope(OPTIMIZER_SCOPE):
            return tx.update(updates, state, params)

    return optax.GradientTransformation(tx.init, update)


def run_oracle_steps(
    name: str,
    *,
    jit: bool,
    optimizer: Optional[optax.GradientTransformation] = None,
    interceptors: Sequence[Callable] = (),
    patches: Sequence = (),
    steps: int = STEPS,
    model_overrides: Optional[dict] = None,
    train_options: bool = True,
) -> Runs:
    """Our ``train.make_train_step`` for ``steps`` steps on the oracle's batch, in float32
    with float64's decisions and in float64 (:mod:`float64_decisions`), side by side.

    ``optimizer`` replaces the paper's (negative controls); ``interceptors`` are extra
    flax method interceptors and ``patches`` extra ``mock.patch`` context managers that
    perturb the model (negative controls). With ``jit``, the step compiles with the train
    step's ``models.jit_options`` unless ``train_options`` is False: XLA's defaults, under
    which this float32 + float64 program of Cnn6 takes 2.4x less time; the negative controls
    prove what the comparison detects, whatever the kernels. Everything else is the public
    training path, traced once into the program both precisions run.
    """
    oracle = load_oracle(name)
    config = recipe.base_config(name)
    model = build_model(name, **(model_overrides or {}))
    variables = initial_variables(name, model)
    tx = optax.chain(
        record_grads(),
        _scoped(optimizer or train.make_optimizer(config, model_builder.for_config(config))),
    )
    state = train.TrainState.create(variables, tx, jax.random.key(0))
    batch = {"audio": jnp.asarray(oracle["x"]), "labels": jnp.asarray(oracle["targets"])}
    lam = jnp.asarray(oracle["lam"])
    step_fn = train.make_train_step(
        model, tx, _ScopedTask(tasks.get(config.get("task"))), recipe.mixup_alpha(config)
    )
    with contextlib.ExitStack() as stack:
        # The stored lambda instead of a draw, and the oracle's float32 1−λi: mixup itself
        # stays the step's own.
        stack.enter_context(
            mock.patch.object(frontend, "sample_mixup_lambda", lambda rng, pairs, alpha=1.0: lam)
        )
        stack.enter_context(mock.patch.object(frontend, "mixup", mix_as_the_oracle))
        # The STFT kernel's float32 entries as the original rounded them.
        stack.enter_context(mock.patch.object(frontend, "dft_kernel", original_dft_kernel))
        for patch in patches:
            stack.enter_context(patch)
        for interceptor in (_no_dropout, *interceptors):
            stack.enter_context(nn.intercept_methods(interceptor))
        interpreter, out_tree = F.paired(
            step_fn, state, batch, own_decisions=(LOSS_SCOPE, OPTIMIZER_SCOPE)
        )
    state_leaves, state_tree = jax.tree_util.tree_flatten(state)
    batch_leaves = jax.tree_util.tree_leaves(batch)
    initial = {d: torch_layout(variables, model, d) for d in (np.float32, np.float64)}

    def paired_step(state32, state64, batch32, batch64):
        # The state lists are the caller's to give away: op by op, each old state array is
        # freed after its last use.
        state32.extend(batch32)
        state64.extend(batch64)
        return interpreter(state32, state64, consume=True)

    start = time.perf_counter()
    with jax.enable_x64(True):
        # The states are donated: Cnn14's 81M parameters, gradients and three AMSGrad
        # moments in both precisions, in and out, would otherwise hold 13 GB.
        options = models.jit_options(model, training=True) if train_options else {}
        step = jax.jit(paired_step, donate_argnums=(0, 1), **options) if jit else paired_step
        batch64 = [F.up(x) for x in batch_leaves]
        trace = _steps(step, out_tree, state_leaves, batch_leaves, batch64, steps)
        seconds = time.perf_counter() - start
        runs = [
            _to_run(trace[bits], model, initial[dtype], state_tree, dtype)
            for bits, dtype in ((32, np.float32), (64, np.float64))
        ]
    unresolved = [w for w, ok in zip(interpreter.sites, trace[32]["resolved"]) if not ok]
    return Runs(*runs, interpreter.decisions, unresolved, seconds)


def _steps(step, out_tree, state32, batch32, batch64, steps: int) -> Dict[int, dict]:
    """``steps`` paired steps from ``state32`` (and its float64 copy); per precision the
    losses, step 1's gradients and BatchNorm statistics, and the final state leaves."""
    states = {32: [jnp.array(x) for x in state32], 64: [F.up(x) for x in state32]}
    trace = {bits: {"losses": []} for bits in (32, 64)}
    for i in range(steps):
        out32, out64, resolved = step(states.pop(32), states.pop(64), batch32, batch64)
        for bits, out in ((32, out32), (64, out64)):
            new_state, metrics = jax.tree_util.tree_unflatten(out_tree, out)
            states[bits] = jax.tree_util.tree_leaves(new_state)
            trace[bits]["losses"].append(float(metrics["loss"]))
            if i == 0:
                trace[bits]["resolved"] = np.asarray(resolved)
                trace[bits]["grads"] = jax.device_get(new_state.opt_state[0].grads)
                trace[bits]["step1"] = jax.device_get(new_state.batch_stats)
    for bits in (32, 64):
        trace[bits]["final"] = jax.device_get(states[bits])
    return trace


def _to_run(trace: dict, model, initial, state_tree, dtype) -> Run:
    final = jax.tree_util.tree_unflatten(state_tree, trace["final"])
    return Run(
        losses=np.asarray(trace["losses"]),
        grads=torch_layout({"params": trace["grads"]}, model, dtype),
        step1=torch_layout({"batch_stats": trace["step1"]}, model, dtype),
        final=torch_layout(
            {"params": final.params, "batch_stats": final.batch_stats}, model, dtype
        ),
        initial=initial,
    )


# ----------------------------------------------------------------------------
# Comparison with the oracle.
# ----------------------------------------------------------------------------


def _sample(oracle, key, values: np.ndarray) -> np.ndarray:
    return np.asarray(values, np.float64).ravel()[oracle[f"idx/{key}"]]


def relative_error(
    got: np.ndarray,
    ref: np.ndarray,
    got_norm: float,
    ref_norm: float,
    origin: Optional[np.ndarray] = None,
) -> float:
    """max(relative L2 error of the sampled values, |norm ratio - 1|).

    With ``origin`` (the weights before training) the error is relative to the distance
    travelled ``ref - origin`` instead of to ``ref``: three Adam steps move a weight by
    ~3e-3, so relative to the weight itself any optimiser would look right.
    """
    scale = ref if origin is None else ref - origin
    denom = float(np.linalg.norm(scale))
    if denom == 0.0:
        return 0.0 if float(np.max(np.abs(got - ref), initial=0.0)) == 0.0 else np.inf
    err = float(np.linalg.norm(got - ref)) / denom
    if origin is None and ref_norm > 0:
        err = max(err, abs(got_norm / ref_norm - 1.0))
    return err


@dataclasses.dataclass
class Row:
    part: str
    key: str
    ours: float
    yardstick: float  # PyTorch float32's error.
    bound: float

    @property
    def ok(self) -> bool:
        return self.ours <= self.bound


@dataclasses.dataclass
class Comparison:
    """Per tensor errors vs float64 (ours, PyTorch float32's) and what failed."""

    rows: List[Row]
    losses: Tuple[float, float, float]  # Our worst loss error, PyTorch's, bound.
    problems: List[str]

    @property
    def ok(self) -> bool:
        return not self.problems

    def worst(self, part: str, resolved: bool = False) -> Tuple[float, float]:
        """Our worst error on ``part`` and PyTorch float32's worst. With ``resolved``, only
        over tensors that float32 resolves at all (PyTorch's error < 1): a gradient that
        vanishes exactly (a shift that the next training-mode BatchNorm or a softmax
        removes) is pure round-off in float32, and so is the Adam step it drives."""
        rows = [r for r in self.rows if r.part == part and (not resolved or r.yardstick < 1)]
        if not rows:
            return float("nan"), float("nan")
        return max(r.ours for r in rows), max(r.yardstick for r in rows)


def compare(name: str, run: Run, precision: int = 32) -> Comparison:
    """Judge ``run`` against the oracle's float64 run (golden/train/README.md, "How to use it").

    The yardstick of each tensor is PyTorch float32's distance to float64. A float32 run
    must be within K x yardstick + FLOOR tensor by tensor (gradients, BN statistics), the
    state after 3 steps (relative to the distance travelled) as our worst tensor against
    PyTorch's worst, and the three losses likewise. A float64 run (``precision=64``) is
    held to float64's round-off the same way (:func:`bound`).
    """
    oracle = load_oracle(name)
    rows: List[Row] = []
    problems: List[str] = []
    for part in ("grad", "step1", "final"):
        rows += _part_rows(oracle, part, run, precision, problems)
    for part in ("grad", "step1", "final"):
        part_rows = [r for r in rows if r.part == part]
        if part == "final":
            worst = max(r.ours for r in part_rows)
            worst_yardstick = max(r.yardstick for r in part_rows)
            final_bound = bound(worst_yardstick, precision)
            if worst > final_bound:
                key = max(part_rows, key=lambda r: r.ours).key
                problems.append(
                    f"final: our worst tensor {key} is {worst:.3g} from float64 "
                    f"(the yardstick's worst {worst_yardstick:.3g}, bound {final_bound:.3g})"
                )
        else:
            problems += [
                f"{r.part}/{r.key}: {r.ours:.3g} from float64 > {r.bound:.3g} "
                f"(yardstick: {r.yardstick:.3g})"
                for r in part_rows
                if not r.ok
            ]
    ref_losses = oracle["f64/losses"]
    loss_err = float(np.max(np.abs(run.losses - ref_losses) / np.abs(ref_losses)))
    loss_yard = float(np.max(np.abs(oracle["f32/losses"] - ref_losses) / np.abs(ref_losses)))
    loss_bound = bound(loss_yard, precision)
    if not loss_err <= loss_bound:
        problems.append(
            f"losses {run.losses} vs float64 {ref_losses}: relative error "
            f"{loss_err:.3g} > {loss_bound:.3g} (yardstick: {loss_yard:.3g})"
        )
    return Comparison(rows, (loss_err, loss_yard, loss_bound), problems)


def _part_rows(oracle, part, run, precision, problems) -> List[Row]:
    """One row per tensor of ``part`` (grad, step1, final); missing tensors and gradients
    the original has not are added to ``problems``."""
    attr = {"grad": "grads", "step1": "step1", "final": "final"}[part]
    ours_all = getattr(run, attr)
    # The front end's STFT / mel kernels are constants of ours, not state.
    keys = [k for k in oracle_keys(oracle, part) if k not in convert.FRONTEND_KEYS]
    missing = [k for k in keys if k not in ours_all]
    if missing:
        problems.append(f"{part}: tensors the oracle has and we lack: {missing[:5]}")
    if part == "grad":  # Parameters the original never runs get no gradient from us.
        problems += [
            f"grad/{key}: nonzero, but the original has no gradient"
            for key, value in ours_all.items()
            if key not in keys and np.any(value != 0)
        ]
    rows = []
    for key in (k for k in keys if k in ours_all):
        ref = oracle[f"f64/{part}/val/{key}"]
        ref_norm = float(oracle[f"f64/{part}/norm/{key}"])
        ours = _sample(oracle, key, ours_all[key])
        ours_norm = float(np.linalg.norm(np.asarray(ours_all[key], np.float64)))
        origin = _sample(oracle, key, run.initial[key]) if part == "final" else None
        yard = oracle[f"f32/{part}/val/{key}"]
        yard_norm = float(oracle[f"f32/{part}/norm/{key}"])
        e_yard = relative_error(yard, ref, yard_norm, ref_norm, origin)
        e_ours = relative_error(ours, ref, ours_norm, ref_norm, origin)
        rows.append(Row(part, key, e_ours, e_yard, bound(e_yard, precision)))
    return rows


def format_table(results: Dict[Tuple[str, str], Comparison]) -> str:
    """Per model and mode (``jit`` / ``eager``: float32 with float64's decisions; ``jit64`` /
    ``eager64``: float64): our worst relative error vs the oracle's float64 next to PyTorch
    float32's."""
    lines = [
        f"{'model':<24} {'mode':<8} {'gradients (ours / torch)':<26} "
        f"{'BN stats after step 1':<24} {'weights after 3 steps':<24} {'losses':<22} ok",
        "-" * 132,
    ]
    for (name, mode), c in sorted(
        results.items(),
        key=lambda kv: (
            ORACLE_MODELS.index(kv[0][0]) if kv[0][0] in ORACLE_MODELS else 99,
            kv[0][1],
        ),
    ):
        cells = [
            f"{c.worst(part, True)[0]:9.2e} / {c.worst(part, True)[1]:9.2e}"
            for part in ("grad", "step1", "final")
        ]
        lines.append(
            f"{name:<24} {mode:<8} {cells[0]:<26} {cells[1]:<24} {cells[2]:<24} "
            f"{c.losses[0]:8.2e} / {c.losses[1]:8.2e}  {'yes' if c.ok else 'NO'}"
        )
    lines.append(
        "errors: max over tensors of the relative L2 error of the oracle's sampled "
        "values (and |norm ratio - 1|) against float64; weights relative to the "
        "distance travelled in 3 steps; losses: max relative error of steps 1-3. "
        "Tensors that float32 cannot resolve (PyTorch's own error >= 1: exactly "
        "vanishing gradients) are left out of the table, not out of the test."
    )
    return "\n".join(lines)


def main() -> None:
    """``python tests/train_oracle.py [eager|jit ...] [MODEL ...]``: the table, all models."""
    import sys

    args = sys.argv[1:]
    modes = [a for a in args if a in ("eager", "jit")] or ["eager", "jit"]
    names = [a for a in args if a not in ("eager", "jit")] or list(ORACLE_MODELS)
    results = {}
    for name in names:
        for mode in modes:
            runs = run_oracle_steps(name, jit=mode == "jit")
            results[(name, mode)] = compare(name, runs.f32)
            results[(name, f"{mode}64")] = compare(name, runs.f64, precision=64)
            problems = results[(name, mode)].problems + results[(name, f"{mode}64")].problems
            print(f"{name} {mode}: {runs.seconds:.0f} s; problems: {problems[:3]}", flush=True)
        print(format_table(results), flush=True)


if __name__ == "__main__":
    main()
