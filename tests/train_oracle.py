"""Our train step, run the way ``../shared/golden/train`` ran the original, and compared.

The oracle (golden/train/README.md) ran 3 steps of the ORIGINAL recipe on one fixed batch
with dropout and SpecAugment switched off, in float32 and float64, and kept fingerprints
(values at ``idx/K`` in PyTorch layout, and norms) of the step-1 gradient, the BatchNorm
running statistics after step 1 and every tensor after step 3. :func:`run_oracle_steps` runs
OUR public pieces the same way: ``models.get`` with SpecAugment off, the golden recipe's
weights through ``convert.from_state_dict``, ``train.make_train_step`` with the paper's
config and ``train.make_optimizer``, mixup at the model's own place with the stored
lambda. :func:`compare` judges our float32 run against float64 with PyTorch float32's own
distance to float64 as the yardstick; :func:`kink_census` finds the ReLU / clamp inputs
and max-pool ties that sit within round-off of their kink (where a gradient may legally
jump), by running the same computation in float32 and float64 side by side.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple
from unittest import mock

import flax.linen as nn
import golden_utils as G
import jax
import jax.numpy as jnp
import numpy as np
import optax

from panns_jax import convert, frontend, model_builder, models, recipe, tasks, train

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


def oracle_keys(oracle: Dict[str, np.ndarray], part: str) -> List[str]:
    prefix = f"f64/{part}/norm/"
    return sorted(k[len(prefix) :] for k in oracle if k.startswith(prefix))


def build_model(name: str, **overrides):
    """``name`` as the oracle ran it: SpecAugment off where the model has it."""
    cls, _ = models.REGISTRY[name]
    fields = {f.name for f in dataclasses.fields(cls)}
    if "spec_augment" in fields:
        overrides.setdefault("spec_augment", False)
    return models.get(name, **overrides)


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


def torch_layout(variables: Dict[str, Any], model) -> Dict[str, np.ndarray]:
    """``{state_dict key: array}`` of our variables (the converter's mapping)."""
    return convert.to_state_dict(jax.device_get(variables), model, include_frontend=False)


@dataclasses.dataclass
class Run:
    """What our train step did, in PyTorch layout (state_dict keys, float32 arrays)."""

    losses: np.ndarray
    grads: Dict[str, np.ndarray]
    step1: Dict[str, np.ndarray]
    final: Dict[str, np.ndarray]
    initial: Dict[str, np.ndarray]
    seconds: float


def run_oracle_steps(
    name: str,
    *,
    jit: bool,
    optimizer: Optional[optax.GradientTransformation] = None,
    interceptors: Sequence[Callable] = (),
    patches: Sequence = (),
    steps: int = STEPS,
    model_overrides: Optional[dict] = None,
) -> Run:
    """Our ``train.make_train_step`` for ``steps`` steps on the oracle's batch.

    ``optimizer`` replaces the paper's (negative controls); ``interceptors`` are extra
    flax method interceptors and ``patches`` extra ``mock.patch`` context managers that
    perturb the model (negative controls). Everything else is the public training path.
    """
    oracle = load_oracle(name)
    config = recipe.base_config(name)
    model = build_model(name, **(model_overrides or {}))
    variables = initial_variables(name, model)
    tx = optax.chain(
        record_grads(), optimizer or train.make_optimizer(config, model_builder.for_config(config))
    )
    state = train.TrainState.create(variables, tx, jax.random.key(0))
    batch = {"audio": jnp.asarray(oracle["x"]), "labels": jnp.asarray(oracle["targets"])}
    lam = jnp.asarray(oracle["lam"])
    step_fn = train.make_train_step(
        model, tx, tasks.get(config.get("task")), recipe.mixup_alpha(config)
    )
    if jit:
        step_fn = jax.jit(step_fn)
    losses, step1_stats, grads = [], None, None
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        # The stored lambda instead of a draw: mixup itself stays the step's own.
        stack.enter_context(
            mock.patch.object(frontend, "sample_mixup_lambda", lambda rng, pairs, alpha=1.0: lam)
        )
        for patch in patches:
            stack.enter_context(patch)
        for interceptor in (_no_dropout, *interceptors):
            stack.enter_context(nn.intercept_methods(interceptor))
        for i in range(steps):
            state, step_metrics = step_fn(state, batch)
            losses.append(float(step_metrics["loss"]))
            if i == 0:
                grads = jax.device_get(state.opt_state[0].grads)
                step1_stats = jax.device_get(state.batch_stats)
    seconds = time.perf_counter() - start
    final = torch_layout({"params": state.params, "batch_stats": state.batch_stats}, model)
    return Run(
        losses=np.asarray(losses),
        grads=torch_layout({"params": grads}, model),
        step1=torch_layout({"batch_stats": step1_stats}, model),
        final=final,
        initial=torch_layout(variables, model),
        seconds=seconds,
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
    torch: float
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
    loss_step1_ok: bool = True  # Step 1's loss (before any update) within its bound.

    @property
    def ok(self) -> bool:
        return not self.problems

    def worst(self, part: str, resolved: bool = False) -> Tuple[float, float]:
        """Our worst error on ``part`` and PyTorch float32's worst. With ``resolved``, only
        over tensors that float32 resolves at all (PyTorch's error < 1): a gradient that
        vanishes exactly (a shift that the next training-mode BatchNorm or a softmax
        removes) is pure round-off in float32, and so is the Adam step it drives."""
        rows = [r for r in self.rows if r.part == part and (not resolved or r.torch < 1)]
        if not rows:
            return float("nan"), float("nan")
        return max(r.ours for r in rows), max(r.torch for r in rows)


def compare(name: str, run: Run, parts: Sequence[str] = ("grad", "step1", "final")) -> Comparison:
    """Judge ``run`` against the oracle of ``name`` (golden/train/README.md, "How to use it").

    Gradients and BN statistics tensor by tensor within K x PyTorch's error + FLOOR; the
    state after 3 steps (relative to the distance travelled) as our worst tensor against
    PyTorch's worst; the three losses within K x PyTorch's loss error + FLOOR.
    """
    oracle = load_oracle(name)
    rows: List[Row] = []
    problems: List[str] = []
    sources = {"grad": run.grads, "step1": run.step1, "final": run.final}
    for part in parts:
        ours_all = sources[part]
        # The front end's STFT / mel kernels are constants of ours, not state.
        keys = [k for k in oracle_keys(oracle, part) if k not in convert.FRONTEND_KEYS]
        missing = [k for k in keys if k not in ours_all]
        if missing:
            problems.append(f"{part}: tensors the oracle has and we lack: {missing[:5]}")
        for key in keys:
            if key not in ours_all:
                continue
            ref = oracle[f"f64/{part}/val/{key}"]
            ref_norm = float(oracle[f"f64/{part}/norm/{key}"])
            pt = oracle[f"f32/{part}/val/{key}"]
            pt_norm = float(oracle[f"f32/{part}/norm/{key}"])
            ours = _sample(oracle, key, ours_all[key])
            ours_norm = float(np.linalg.norm(np.asarray(ours_all[key], np.float64)))
            origin = _sample(oracle, key, run.initial[key]) if part == "final" else None
            e_ours = relative_error(ours, ref, ours_norm, ref_norm, origin)
            e_torch = relative_error(pt, ref, pt_norm, ref_norm, origin)
            rows.append(Row(part, key, e_ours, e_torch, K * e_torch + FLOOR))
        if part == "grad":  # Parameters the original never runs get no gradient from us.
            for key, value in ours_all.items():
                if key not in keys and np.any(value != 0):
                    problems.append(f"grad/{key}: nonzero, but the original has no gradient")
    for part in parts:
        part_rows = [r for r in rows if r.part == part]
        if part == "final":
            worst, worst_torch = max(r.ours for r in part_rows), max(r.torch for r in part_rows)
            bound = K * worst_torch + FLOOR
            if worst > bound:
                key = max(part_rows, key=lambda r: r.ours).key
                problems.append(
                    f"final: our worst tensor {key} is {worst:.3g} from float64 "
                    f"(PyTorch float32's worst {worst_torch:.3g}, bound {bound:.3g})"
                )
        else:
            problems += [
                f"{r.part}/{r.key}: {r.ours:.3g} from float64 > {r.bound:.3g} "
                f"(PyTorch float32: {r.torch:.3g})"
                for r in part_rows
                if not r.ok
            ]
    ref_losses = oracle["f64/losses"]
    loss_err = float(np.max(np.abs(run.losses - ref_losses) / np.abs(ref_losses)))
    loss_torch = float(np.max(np.abs(oracle["f32/losses"] - ref_losses) / np.abs(ref_losses)))
    loss_bound = K * loss_torch + FLOOR
    if not loss_err <= loss_bound:
        problems.append(
            f"losses {run.losses} vs float64 {ref_losses}: relative error "
            f"{loss_err:.3g} > {loss_bound:.3g} (PyTorch float32: {loss_torch:.3g})"
        )
    step1_err = abs(run.losses[0] - ref_losses[0]) / abs(ref_losses[0])
    step1_torch = abs(oracle["f32/losses"][0] - ref_losses[0]) / abs(ref_losses[0])
    return Comparison(
        rows,
        (loss_err, loss_torch, loss_bound),
        problems,
        bool(step1_err <= K * step1_torch + FLOOR),
    )


# ----------------------------------------------------------------------------
# Kinks: where float32 round-off may legitimately flip a gradient.
# ----------------------------------------------------------------------------

# A ReLU / clamp input or a max-pool runner-up is "at a kink" when its float64 distance to
# the kink is within KINK_FACTOR x the largest float32 round-off measured on that tensor
# (float32 vs float64 of the same computation): another order of summation (XLA's fusions
# under jit, another CPU) moves values by errors of that size.
KINK_FACTOR = 4.0


@dataclasses.dataclass
class Kink:
    where: str  # Module path (flax name stack) and primitive.
    count: int  # Elements within KINK_FACTOR x round-off of the kink.
    size: int
    margin: float  # Smallest float64 distance to the kink.
    roundoff: float  # Largest |float32 - float64| of that distance on the tensor.
    order: int  # Position in the forward computation (top-level equation index).

    def __str__(self) -> str:
        return (
            f"{self.where}: {self.count} of {self.size} within {KINK_FACTOR:g} x round-off "
            f"{self.roundoff:.2g} of the kink (closest {self.margin:.2g})"
        )


def _up(x):
    x = jnp.asarray(x)
    if x.dtype == jnp.float32:
        return x.astype(jnp.float64)
    if x.dtype == jnp.complex64:
        return x.astype(jnp.complex128)
    return x


def _params64(params: dict) -> dict:
    def up(value):
        if isinstance(value, np.dtype) or (
            isinstance(value, type) and issubclass(value, np.generic)
        ):
            if np.dtype(value) == np.float32:
                return np.dtype(np.float64)
            if np.dtype(value) == np.complex64:
                return np.dtype(np.complex128)
        return value

    return {k: up(v) for k, v in params.items()}


def _window_patches(x, params, init):
    """The windows of a ``reduce_window_max`` stacked on a new leading axis."""
    xp = jax.lax.pad(x, jnp.asarray(init, x.dtype), [(lo, hi, 0) for lo, hi in params["padding"]])
    dims, strides = params["window_dimensions"], params["window_strides"]
    out = [(n - d) // s + 1 for n, d, s in zip(xp.shape, dims, strides)]
    patches = []
    for offset in np.ndindex(*dims):
        limit = [o + (m - 1) * s + 1 for o, m, s in zip(offset, out, strides)]
        patches.append(jax.lax.slice(xp, offset, limit, strides))
    return jnp.stack(patches)


def _top2_gap(stacked):
    """Gap between the largest and second largest value along axis 0 (inf if one value).

    A tie at exactly 0 is a tie of ReLU outputs whose gradient is 0 whichever wins (an
    input near 0 is already a ReLU kink): not counted.
    """
    if stacked.shape[0] < 2:
        return jnp.full(stacked.shape[1:], jnp.inf, stacked.dtype)
    top = jnp.sort(stacked, axis=0)
    return jnp.where(top[-1] == 0, jnp.inf, top[-1] - top[-2])


def _margins(name, params, ins):
    """Distance of each element to its kink, or None for smooth primitives."""
    if name in ("max", "min") and all(jnp.issubdtype(x.dtype, jnp.floating) for x in ins):
        return jnp.abs(ins[0] - ins[1])  # ReLU (x vs 0), relu6, clip, BCE's clamp at -100.
    if name == "clamp":
        lo, x, hi = ins
        return jnp.minimum(jnp.abs(x - lo), jnp.abs(hi - x))
    if name == "reduce_window_max":
        return _top2_gap(_window_patches(ins[0], params, -jnp.inf))
    if name == "reduce_max":
        axes = tuple(params["axes"])
        x = jnp.moveaxis(ins[0], axes, tuple(range(len(axes))))
        return _top2_gap(x.reshape((-1,) + x.shape[len(axes) :]))
    return None


def kink_census(fn: Callable, *args) -> Tuple[List[Kink], List[int]]:
    """Run ``fn(*args)`` in float32 and in float64 side by side, primitive by primitive
    (the same jaxpr, every float32 value and dtype promoted in the float64 copy), and list
    the kinks (max/min/clamp operands, max-pool and max-reduction runners-up) whose float64
    distance is within ``KINK_FACTOR`` x that tensor's float32 round-off.

    The two copies run as one jitted program, so the float32 copy is rounded as XLA's
    fusions round it (as in a jitted train step). Also returns, for each leaf of ``args``,
    the position of its first use (-1 if unused): a kink at or after a parameter's first use
    can move that parameter's gradient.
    """
    closed = jax.make_jaxpr(fn)(*args)
    sites: List[Tuple[str, int]] = []
    backend = jax.default_backend()

    def read(env, v, precision):
        if isinstance(v, jax.extend.core.Literal):
            return _up(v.val) if precision == 64 else jnp.asarray(v.val)
        return env[v]

    def run(jaxpr, consts, in32, in64, scope, stats, order=None):
        env32, env64 = {}, {}
        for v, c in zip(jaxpr.constvars, consts):
            env32[v], env64[v] = jnp.asarray(c), _up(c)
        for v, a, b in zip(jaxpr.invars, in32, in64):
            env32[v], env64[v] = a, b
        for i, eqn in enumerate(jaxpr.eqns):
            position = i if order is None else order
            a = [read(env32, v, 32) for v in eqn.invars]
            b = [read(env64, v, 64) for v in eqn.invars]
            name, params = eqn.primitive.name, eqn.params
            where = "/".join(s for s in (scope, str(eqn.source_info.name_stack)) if s)
            inner = params.get("jaxpr") or params.get("call_jaxpr")
            if name == "platform_index":  # lax.platform_dependent: this backend's branch.
                index = next(
                    i
                    for i, group in enumerate(params["platforms"])
                    if group is None or backend in group
                )
                out32 = out64 = [np.int32(index)]
            elif name == "cond" and isinstance(a[0], np.integer):
                branch = params["branches"][int(a[0])]
                out32, out64 = run(
                    branch.jaxpr, branch.consts, a[1:], b[1:], where, stats, position
                )
            elif inner is not None and name in (
                "jit",
                "pjit",
                "custom_jvp_call",
                "custom_vjp_call",
                "closed_call",
                "remat",
            ):
                out32, out64 = run(
                    getattr(inner, "jaxpr", inner),
                    getattr(inner, "consts", ()),
                    a,
                    b,
                    where,
                    stats,
                    position,
                )
            else:
                out32 = eqn.primitive.bind(*a, **params)
                out64 = eqn.primitive.bind(*b, **_params64(params))
                if not eqn.primitive.multiple_results:
                    out32, out64 = [out32], [out64]
                m32 = _margins(name, params, a)
                if m32 is not None:
                    m64 = _margins(name, params, b)
                    finite = jnp.isfinite(m64)
                    roundoff = jnp.max(jnp.where(finite, jnp.abs(m32 - m64), 0))
                    close = finite & (m64 <= KINK_FACTOR * roundoff)
                    sites.append((f"{where}:{name}", int(m64.size), position))
                    stats.append((jnp.sum(close), jnp.min(m64), roundoff))
            for v, x32, x64 in zip(eqn.outvars, out32, out64):
                env32[v], env64[v] = x32, x64
        return (
            [read(env32, v, 32) for v in jaxpr.outvars],
            [read(env64, v, 64) for v in jaxpr.outvars],
        )

    def both(flat):
        sites.clear()  # Static (where, size) of each site, filled while tracing.
        stats: list = []
        run(closed.jaxpr, closed.consts, flat, [_up(x) for x in flat], "", stats)
        return stats

    with jax.enable_x64(True):
        flat = [jnp.asarray(x) for x in jax.tree_util.tree_leaves(args)]
        stats = jax.device_get(jax.jit(both)(flat))
    kinks = [
        Kink(where, int(count), size, float(margin), float(roundoff), position)
        for (where, size, position), (count, margin, roundoff) in zip(sites, stats)
        if count
    ]
    first_use = [
        next((i for i, eqn in enumerate(closed.jaxpr.eqns) if v in eqn.invars), -1)
        for v in closed.jaxpr.invars
    ]
    return kinks, first_use


def step1_kinks(
    name: str, *, model_overrides: Optional[dict] = None
) -> Tuple[List[Kink], Dict[str, int]]:
    """Kinks of step 1's forward pass and loss on the oracle's batch (what its gradient
    depends on), traced as the train step computes them (dropout off, the stored lambda),
    and each parameter's first use in that computation, by state_dict key."""
    oracle = load_oracle(name)
    config = recipe.base_config(name)
    model = build_model(name, **(model_overrides or {}))
    variables = initial_variables(name, model)
    lam = jnp.asarray(oracle["lam"])
    targets = frontend.mixup(jnp.asarray(oracle["targets"]), lam)
    task = tasks.get(config.get("task"))

    def loss(params, audio):
        outputs, _ = model.apply(
            {"params": params, "batch_stats": variables["batch_stats"]},
            audio,
            train=True,
            mixup_lambda=lam,
            mutable=["batch_stats"],
        )
        return task.loss(outputs, targets)

    with nn.intercept_methods(_no_dropout):
        kinks, first_use = kink_census(loss, variables["params"], jnp.asarray(oracle["x"]))
    leaves, treedef = jax.tree_util.tree_flatten(variables["params"])
    orders = jax.tree_util.tree_unflatten(
        treedef, [np.full(np.shape(x), o, np.float32) for x, o in zip(leaves, first_use)]
    )
    return kinks, {k: int(v.flat[0]) for k, v in torch_layout({"params": orders}, model).items()}


def unexplained(
    comparison: Comparison, kinks: Sequence[Kink], first_use: Dict[str, int]
) -> List[str]:
    """The problems of ``comparison`` that no kink explains.

    A kink moves a gradient legitimately only upstream of it: a gradient problem is
    explained by a kink at or after the parameter's first use. The weights after 3 steps
    and the losses of steps 2-3 follow from any moved gradient. BatchNorm statistics are
    continuous functions of the forward values (a kink moves a value by its round-off),
    so nothing explains a statistics problem, nor a step-1 loss problem.
    """
    last = max((k.order for k in kinks), default=-1)
    left = []
    for problem in comparison.problems:
        part, _, rest = problem.partition("/")
        key = rest.split(":")[0]
        if part == "grad" and key in first_use and 0 <= first_use[key] <= last:
            continue
        if problem.startswith("final:") and kinks:
            continue
        if problem.startswith("losses") and kinks and comparison.loss_step1_ok:
            continue
        left.append(problem)
    return left


def format_table(results: Dict[Tuple[str, str], Comparison]) -> str:
    """Per model and mode: our worst relative error vs float64 next to PyTorch float32's."""
    lines = [
        f"{'model':<24} {'mode':<6} {'gradients (ours / torch)':<26} "
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
            f"{name:<24} {mode:<6} {cells[0]:<26} {cells[1]:<24} {cells[2]:<24} "
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
            run = run_oracle_steps(name, jit=mode == "jit")
            results[(name, mode)] = compare(name, run)
            print(
                f"{name} {mode}: {run.seconds:.0f} s; problems: "
                f"{results[(name, mode)].problems[:3]}",
                flush=True,
            )
        print(format_table(results), flush=True)


if __name__ == "__main__":
    main()
