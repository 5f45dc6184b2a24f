"""Round-off bounds for float32 results against float64 ones, and the helpers to apply them.

The bound on each element of a result computed from ``n``-term sums is ``K * gamma_n * S``,
with ``gamma_n = n u / (1 - n u)`` (Higham, Accuracy and Stability of Numerical Algorithms,
2nd ed., Sec. 3.1: the error of an ``n``-term dot product in any summation order) and ``u``
the unit round-off (2^-24 in float32, 2^-53 in float64). ``S`` is the same result computed
on absolute values in float64: the size of the terms that cancel. ``K`` counts the separate
sources whose errors add. Any kernel (XLA's, oneDNN's, on any CPU) that sums the same
products in any order meets it; a wrong sum (a tap off by one) does not.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, List, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np


def gamma(n: int, dtype: Any) -> float:
    """Higham's gamma_n: the relative error bound of an ``n``-term dot product."""
    u = float(np.finfo(dtype).eps) / 2
    return n * u / (1 - n * u)


def worst_ratio(
    got: Sequence[jax.Array], exact: Sequence[np.ndarray], bounds: Sequence[np.ndarray]
) -> float:
    """The largest ``|got - exact| / bound`` over all elements of all results."""
    ratios = [
        np.max(np.abs(np.asarray(g, np.float64) - e) / b) for g, e, b in zip(got, exact, bounds)
    ]
    return float(max(ratios))


def run(fn: Callable[..., Any], *args: Any) -> List[np.ndarray]:
    """``fn(*args)`` traced afresh (so the current branch choice applies), as numpy."""
    return [np.asarray(r) for r in jax.jit(lambda *a: fn(*a))(*args)]


def as_dtype(arrays: Sequence[np.ndarray], dtype: Any) -> List[jax.Array]:
    """``arrays`` as jax arrays of ``dtype``."""
    return [jnp.asarray(a, dtype) for a in arrays]


def random(rng: np.random.Generator, *shapes: Sequence[int]) -> List[np.ndarray]:
    """float32-representable normal arrays (so float32 and float64 runs see equal inputs)."""
    return [rng.standard_normal(s).astype(np.float32).astype(np.float64) for s in shapes]


def conv_results(conv: Callable, x: jax.Array, w: jax.Array, dy: jax.Array) -> List[jax.Array]:
    """Forward and both gradients of ``conv(x, w)``."""
    y, vjp = jax.vjp(conv, x, w)
    return [y, *vjp(dy)]


def conv_exact(
    reference: Callable, x: np.ndarray, w: np.ndarray, dy: np.ndarray
) -> Tuple[List[np.ndarray], List[np.ndarray]]:
    """Float64 autodiff of ``reference``, and the same on absolute values (the scales)."""
    with jax.enable_x64(True):
        exact = run(functools.partial(conv_results, reference), *as_dtype([x, w, dy], jnp.float64))
        scales = run(
            functools.partial(conv_results, reference),
            *as_dtype([np.abs(x), np.abs(w), np.abs(dy)], jnp.float64),
        )
    return exact, scales


def conv_bounds(
    scales: Sequence[np.ndarray], terms: Sequence[int], dtype: Any, k: int = 1
) -> List[np.ndarray]:
    """Each result's bound; ``terms`` is (forward, input gradient, weight gradient) lengths."""
    return [k * gamma(n, dtype) * s for n, s in zip(terms, scales)]


def off_by_one(*args: jax.Array) -> tuple:
    """A perturbed branch's input. A forward pass's ``(x, w)`` gets the kernel's rows
    reversed (a convolution for a correlation); a backward pass's ``(x, w, dy)`` gets ``dy``
    moved by one row (a padding off by one)."""
    if len(args) == 2:
        x, w = args
        return x, w[::-1]
    x, w, dy = args
    return x, w, jnp.roll(dy, 1, axis=1)
