"""Optimiser of the paper: Adam with AMSGrad, lr 1e-3, as PyTorch computes it.

optax's ``amsgrad`` keeps the maximum of the *bias-corrected* second moment. PyTorch,
which trained the released PANNs, keeps the maximum of the raw one and corrects
afterwards (golden/TRAINING.md §7):

    m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2;  v_max <- max(v_max, v)
    update = -lr / (1 - b1^t) * m / (sqrt(v_max) / sqrt(1 - b2^t) + eps)
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax


class ScaleByAmsgradTorchState(NamedTuple):
    count: jax.Array
    mu: optax.Updates
    nu: optax.Updates
    nu_max: optax.Updates


def scale_by_amsgrad_torch(
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8
) -> optax.GradientTransformation:
    """AMSGrad direction exactly as ``torch.optim.Adam(amsgrad=True)``, before the lr."""

    def init_fn(params):
        zeros = lambda: jax.tree_util.tree_map(jnp.zeros_like, params)
        return ScaleByAmsgradTorchState(jnp.zeros([], jnp.int32), zeros(), zeros(), zeros())

    def update_fn(updates, state, params=None):
        del params
        count = state.count + 1
        mu = jax.tree_util.tree_map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, updates)
        nu = jax.tree_util.tree_map(lambda v, g: b2 * v + (1 - b2) * g * g, state.nu, updates)
        nu_max = jax.tree_util.tree_map(jnp.maximum, state.nu_max, nu)
        t = count.astype(jnp.float32)
        correction1 = 1 - b1**t
        sqrt_correction2 = jnp.sqrt(1 - b2**t)
        new_updates = jax.tree_util.tree_map(
            lambda m, vm: (m / correction1) / (jnp.sqrt(vm) / sqrt_correction2 + eps), mu, nu_max
        )
        return new_updates, ScaleByAmsgradTorchState(count, mu, nu, nu_max)

    return optax.GradientTransformation(init_fn, update_fn)


def paper_optimizer(
    learning_rate: float = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    grad_clip_norm: Optional[float] = None,
    param_labels: Optional[Callable[[Any], Any]] = None,
) -> optax.GradientTransformation:
    """Adam + AMSGrad (PyTorch's), constant learning rate, optional global-norm clipping.

    ``param_labels`` maps parameters to 'trained' / 'frozen' labels. Frozen parameters then
    get no Adam state and stay bitwise unchanged (:func:`keep_unchanged`).
    """
    chain = [optax.clip_by_global_norm(grad_clip_norm)] if grad_clip_norm else []
    chain += [scale_by_amsgrad_torch(b1, b2, eps), optax.scale_by_learning_rate(learning_rate)]
    if param_labels is None:
        return optax.chain(*chain)
    return optax.multi_transform(
        {"trained": optax.chain(*chain), "frozen": keep_unchanged()}, param_labels
    )


def keep_unchanged() -> optax.GradientTransformation:
    """Updates of -0.0 and no state, so that a parameter it updates stays bitwise the same.

    ``x + (-0.0) == x`` for every float x, also for x = -0.0, where ``x + 0.0`` gives +0.0.
    """

    def update_fn(updates, state, params=None):
        del params
        return jax.tree_util.tree_map(lambda u: jnp.full_like(u, -0.0), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)
