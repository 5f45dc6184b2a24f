"""A function run in float32 and in float64 side by side, float32 following float64's decisions.

:func:`paired` interprets a closed jaxpr twice at once, primitive by primitive: a float64
copy (every float32 value, constant and dtype promoted) and a float32 copy. Wherever the
program decides something from float values (a comparison, ``max`` / ``min`` / ``clamp``,
the winner of a max-pool window or of a max reduction, a float turned into an integer), the
float32 copy takes the float64 copy's decision. Each float32 value is then its own float32
arithmetic on the branch that exact arithmetic takes, so its distance to float64 is
round-off only, never a ReLU input within round-off of zero that landed on the other side
(a "kink"), which another CPU's kernels or another fusion may flip. Both copies run in one
program when the caller jits :func:`paired`'s function, so the float32 copy is rounded as
XLA's fusions round it.

Code under a name scope listed in ``own_decisions`` keeps float32's decisions: the clamps
of PyTorch's BCE guard float32's range where a sigmoid rounds to exactly 0 or 1, a branch
that float32 cannot follow float64 out of (``log(0)`` is ``-inf`` whichever branch says).

Scalar float32 literals are decimals written in the code (0.9, 1e-8, -100): the float64
copy uses that decimal (the shortest one that rounds to the literal), as a float64 program
written with the same source would. Array constants (STFT and mel kernels, the stored
batch) are promoted exactly.
"""

from __future__ import annotations

from typing import Any, Callable, List, Sequence, Tuple

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np

from panns_jax.kernels import onednn

# Primitives that decide from float values in ways that the rules below do not replay;
# meeting one on float operands outside `own_decisions` is an error, never a silent pass.
UNSUPPORTED = {
    "sort",
    "top_k",
    "cummax",
    "cummin",
    "select_and_gather_add",
    "floor",
    "ceil",
    "round",
    "rem",
    "reduce_precision",
    "while",
    "scan",
}
# Operands known to 10 of float32's 24 bits (relative to the tensor's largest magnitude).
# On the training oracle's batch every deciding site of the 11 models resolves its operands
# but 12 of Res1dNet31 (its last layers, a BatchNorm over two values per channel, where
# float32 is off by 0.3) and 2 of Cnn14_DecisionLevelAtt's attention head.
RESOLUTION = 2.0**-10
CALLS = ("jit", "pjit", "custom_jvp_call", "custom_vjp_call", "closed_call", "remat")


def _is_float(x) -> bool:
    return jnp.issubdtype(jnp.result_type(x), jnp.floating)


def up(x):
    """``x`` in float64 (complex128): every float32 value and dtype promoted."""
    x = jnp.asarray(x)
    if x.dtype == jnp.float32:
        return x.astype(jnp.float64)
    if x.dtype == jnp.complex64:
        return x.astype(jnp.complex128)
    return x


def _integer_literals(jaxpr, found=None) -> set:
    """Every integral float or integer scalar literal of ``jaxpr`` (counts, sizes)."""
    found = set() if found is None else found
    for eqn in jaxpr.eqns:
        for v in eqn.invars:
            if isinstance(v, jax.extend.core.Literal) and np.shape(v.val) == ():
                x = float(np.asarray(v.val))
                if np.isfinite(x) and x == int(x) and x > 1:
                    found.add(int(x))
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            _integer_literals(sub, found)
    return found


def exact_constants(jaxpr) -> list:
    """The float64 numbers behind the program's computed float32 constants: ``1 / ln 10``
    (``log10``) and ``n / (n - 1)`` for every count ``n`` (BatchNorm's unbiased variance)."""
    return [1 / np.log(10.0), np.log(10.0)] + [
        n / (n - 1) for n in sorted(_integer_literals(jaxpr))
    ]


def literal64(value, constants=()):
    """A float32 scalar literal as the float64 number the code wrote.

    A short decimal (at most 6 significant digits: 0.9, 1e-8, -100) or one of
    ``constants`` that rounds to the literal; otherwise the literal promoted exactly.
    """
    value = np.asarray(value)
    if value.shape != () or value.dtype != np.float32:
        return up(value)
    text = str(np.float32(value))
    digits = len(text.lower().split("e")[0].replace("-", "").replace(".", "").strip("0"))
    if digits <= 6:
        return jnp.asarray(float(text), jnp.float64)
    for c in constants:
        if np.float32(c) == value:
            return jnp.asarray(c, jnp.float64)
    return up(value)


def _params64(params: dict) -> dict:
    def promote(value):
        if isinstance(value, np.dtype) or (
            isinstance(value, type) and issubclass(value, np.generic)
        ):
            if np.dtype(value) == np.float32:
                return np.dtype(np.float64)
            if np.dtype(value) == np.complex64:
                return np.dtype(np.complex128)
        return value

    return {k: promote(v) for k, v in params.items()}


def _window_patches(x, params, init):
    """The windows of a ``reduce_window_*`` / ``select_and_scatter_add`` stacked on axis 0."""
    padding = params["padding"]
    xp = jax.lax.pad(x, jnp.asarray(init, x.dtype), [(lo, hi, 0) for lo, hi in padding])
    dims, strides = params["window_dimensions"], params["window_strides"]
    out = [(n - d) // s + 1 for n, d, s in zip(xp.shape, dims, strides)]
    patches = []
    for offset in np.ndindex(*dims):
        limit = [o + (m - 1) * s + 1 for o, m, s in zip(offset, out, strides)]
        patches.append(jax.lax.slice(xp, offset, limit, strides))
    return jnp.stack(patches)


def _pick(stacked32, stacked64, largest: bool):
    """Along axis 0: the float32 entry where float64 has its first largest (smallest)."""
    where = jnp.argmax(stacked64, 0) if largest else jnp.argmin(stacked64, 0)
    return jnp.take_along_axis(stacked32, where[None], 0)[0]


def _window_choice(x32, x64, params, largest: bool):
    dilations = (params.get("base_dilation"), params.get("window_dilation"))
    if any(d is not None and any(k != 1 for k in d) for d in dilations):
        raise NotImplementedError("a dilated max-pool window")
    init = -jnp.inf if largest else jnp.inf
    return _pick(_window_patches(x32, params, init), _window_patches(x64, params, init), largest)


def _reduce_choice(x32, x64, axes, largest: bool):
    def stacked(x):
        x = jnp.moveaxis(x, axes, tuple(range(len(axes))))
        return x.reshape((-1,) + x.shape[len(axes) :])

    return _pick(stacked(x32), stacked(x64), largest)


def _decided(name: str, params: dict, a: list, b: list, out32: list, out64: list):
    """float32's outputs of a deciding primitive under float64's decisions, or None."""
    if name in ("max", "min") and _is_float(a[0]):
        # float64's choice; where float64 ties (a ReLU of an exact 0), both candidates are
        # float64's answer and float32's own choice stands.
        if name == "max":
            first, second = b[0] > b[1], b[0] < b[1]
        else:
            first, second = b[0] < b[1], b[0] > b[1]
        return [jnp.where(first, a[0], jnp.where(second, a[1], out32[0]))]
    if name == "clamp" and _is_float(a[1]):
        lo, x, hi = a
        return [jnp.where(b[1] < b[0], lo, jnp.where(b[1] > b[2], hi, x))]
    if name in ("reduce_max", "reduce_min") and _is_float(a[0]):
        return [_reduce_choice(a[0], b[0], tuple(params["axes"]), name == "reduce_max")]
    if name in ("reduce_window_max", "reduce_window_min") and _is_float(a[0]):
        return [_window_choice(a[0], b[0], params, name == "reduce_window_max")]
    if name == "select_and_scatter_add":
        source, operand = a
        largest = params["select_prim"].name in ("ge", "gt")
        _, pullback = jax.vjp(lambda x: _window_choice(x, b[1], params, largest), operand)
        return [pullback(source)[0]]
    if name == "sign" and _is_float(a[0]):
        return [out64[0].astype(a[0].dtype)]
    if any(_is_float(x) for x in a) and not any(_is_float(y) for y in out64):
        return list(out64)  # Comparisons, argmax, float -> int conversions: float64's.
    return None


def _resolved(a: Sequence[Any], b: Sequence[Any]):
    """Whether float32 resolves these operands: every float one within ``RESOLUTION`` of
    its float64 copy's largest magnitude. Where it does not (a BatchNorm over two values
    of nearly equal size, as in Res1dNet31's last layer), float32's values are its own
    answer, not float64's rounded, and so are its decisions, as in PyTorch float32."""
    ok = jnp.asarray(True)
    for x, y in zip(a, b):
        if _is_float(x) and np.size(x) > 0:
            err = jnp.max(jnp.abs(x.astype(y.dtype) - y))
            ok &= err <= RESOLUTION * jnp.max(jnp.abs(y))
    return ok


class Interpreter:
    """Runs a closed jaxpr in float32 and float64 at once (see the module docstring)."""

    def __init__(self, closed, own_decisions: Sequence[str] = ()):
        self.closed = closed
        self.own = tuple(own_decisions)
        self.constants = exact_constants(closed.jaxpr)
        self.backend = jax.default_backend()
        self.decisions = 0  # Deciding primitives met, counted while tracing.
        self.sites: List[str] = []  # Where each one is (name stack), filled while tracing.
        self.resolved: List[Any] = []

    def __call__(
        self, flat32: List[Any], flat64: List[Any], consume: bool = False
    ) -> Tuple[list, list, Any]:
        """The flat outputs of both copies, and for each deciding site (``sites``) whether
        float32 resolved its operands, so that it took float64's decision.

        With ``consume`` the two lists are emptied once read, so that op by op each input
        is freed after its last use (a train step's inputs are the whole train state).
        """
        self.decisions, self.sites, self.resolved = 0, [], []
        in32, in64 = list(flat32), list(flat64)
        if consume:
            flat32.clear()
            flat64.clear()
        out32, out64 = self._run(self.closed.jaxpr, self.closed.consts, in32, in64, "")
        return out32, out64, jnp.stack(self.resolved) if self.resolved else jnp.zeros(0, bool)

    def _read(self, env, v, precision):
        if isinstance(v, jax.extend.core.Literal):
            return literal64(v.val, self.constants) if precision == 64 else jnp.asarray(v.val)
        return env[v]

    def _run(self, jaxpr, consts, in32, in64, scope):
        env32, env64 = {}, {}
        for v, c in zip(jaxpr.constvars, consts):
            env32[v], env64[v] = jnp.asarray(c), up(c)
        for v, x, y in zip(jaxpr.invars, in32, in64):
            env32[v], env64[v] = x, y
        in32.clear()  # The environment holds the inputs now, and drops each after its use.
        in64.clear()
        # Each value is dropped after its last use, so that op by op the interpreter holds
        # what a compiled step would, not every intermediate of both copies.
        last_use = {}
        for i, eqn in enumerate(jaxpr.eqns):
            for v in eqn.invars:
                if not isinstance(v, jax.extend.core.Literal):
                    last_use[v] = i
        keep = {v for v in jaxpr.outvars if not isinstance(v, jax.extend.core.Literal)}
        for i, eqn in enumerate(jaxpr.eqns):
            a = [self._read(env32, v, 32) for v in eqn.invars]
            b = [self._read(env64, v, 64) for v in eqn.invars]
            where = "/".join(s for s in (scope, str(eqn.source_info.name_stack)) if s)
            out32, out64 = self._eqn(eqn, a, b, where)
            for v in eqn.invars:
                literal = isinstance(v, jax.extend.core.Literal)
                if not literal and last_use[v] == i and v not in keep and v in env32:
                    del env32[v], env64[v]
            for v, x, y in zip(eqn.outvars, out32, out64):
                env32[v], env64[v] = x, y
        return (
            [self._read(env32, v, 32) for v in jaxpr.outvars],
            [self._read(env64, v, 64) for v in jaxpr.outvars],
        )

    def _eqn(self, eqn, a, b, where):
        name, params = eqn.primitive.name, eqn.params
        inner = params.get("jaxpr") or params.get("call_jaxpr")
        if name == "platform_index":  # lax.platform_dependent: this backend's branch.
            index = next(
                i
                for i, group in enumerate(params["platforms"])
                if group is None or self.backend in group
            )
            return [np.int32(index)], [np.int32(index)]
        if name == "cond":
            if not isinstance(a[0], (int, np.integer)):
                raise NotImplementedError(f"{where}: a cond on a traced index")
            branch = params["branches"][int(a[0])]
            return self._run(branch.jaxpr, branch.consts, a[1:], b[1:], where)
        if inner is not None and name in CALLS:
            jaxpr = getattr(inner, "jaxpr", inner)
            return self._run(jaxpr, getattr(inner, "consts", ()), a, b, where)
        if name == "ffi_call" and params["target_name"] in onednn.TARGETS:
            # oneDNN's float32-only kernels: the float64 copy computes the same convolution
            # with XLA's (a convolution decides nothing).
            attributes = dict(params["attributes"])
            geometry = tuple(int(attributes[k]) for k in onednn.GEOMETRY_NAMES)
            (result,) = params["result_avals"]
            twin = onednn.xla_equivalent(params["target_name"], b, geometry, result.shape)
            return list(eqn.primitive.bind(*a, **params)), [twin]
        own = any(scope in where for scope in self.own)
        if not own and name in UNSUPPORTED and any(_is_float(x) for x in a):
            raise NotImplementedError(f"{where}: {name} decides from floats; no replay rule")
        out32 = eqn.primitive.bind(*a, **params)
        out64 = eqn.primitive.bind(*b, **_params64(params))
        if not eqn.primitive.multiple_results:
            out32, out64 = [out32], [out64]
        if own:
            return out32, out64
        decided = _decided(name, params, a, b, out32, out64)
        if decided is None:
            return out32, out64
        self.decisions += 1
        # The operands that decide: for select_and_scatter_add the pooled input, not the
        # gradient it routes.
        operands = [1] if name == "select_and_scatter_add" else range(len(a))
        resolved = _resolved([a[i] for i in operands], [b[i] for i in operands])
        self.sites.append(where)
        self.resolved.append(resolved)
        return [jnp.where(resolved, d, o) for d, o in zip(decided, out32)], out64


def paired(fn: Callable, *args, own_decisions: Sequence[str] = ()) -> Tuple[Interpreter, Any]:
    """An :class:`Interpreter` of ``fn`` traced at ``args`` and the output tree structure.

    Call it with the flat float32 leaves and their float64 copies (:func:`up`); it returns
    the flat outputs of both copies.
    """
    closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
    return Interpreter(closed, own_decisions), jax.tree_util.tree_structure(out_shape)
