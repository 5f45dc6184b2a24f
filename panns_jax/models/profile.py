"""Parameter and operation counts of a model, as the paper's Table XII reports them.

``multiply_adds`` walks the layers that actually run, by intercepting every ``nn.Conv``,
``nn.Dense`` and ``BatchNorm`` call of a forward pass on a 10 s clip. It counts as the
original code does. Each multiply-accumulate of a convolution or dense layer is 2
operations, each bias output 1, and each element entering a BatchNorm 2. The log-mel
front end adds its STFT, counted as the original's two DFT convolutions (real and
imaginary, ``n_freq x n_fft`` per frame).
"""

from __future__ import annotations

import math
from typing import Any, Dict, List

import flax.linen as nn
import jax
import jax.numpy as jnp

from panns_jax.models import layers


def _layer_operations(module: nn.Module, args: tuple, out: jax.Array) -> int:
    """Paper-style operations of one call of ``module`` on ``args`` that returned ``out``.

    Convolutions and dense layers count 2 per multiply-accumulate and 1 per bias output.
    A BatchNorm counts 2 per input element. Every other layer counts nothing.
    """
    if isinstance(module, nn.Conv):
        kernel = math.prod(module.kernel_size)
        in_per_group = args[0].shape[-1] // module.feature_group_count
        return 2 * out.size * kernel * in_per_group + (out.size if module.use_bias else 0)
    if isinstance(module, nn.Dense):
        return 2 * out.size * args[0].shape[-1] + (out.size if module.use_bias else 0)
    if isinstance(module, layers.BatchNorm):
        return 2 * args[0].size
    return 0


def multiply_adds(model: nn.Module, num_samples: int) -> int:
    """Paper-style operation count of one forward pass on a ``(1, num_samples)`` clip."""
    counts: List[int] = []

    def count(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__":
            counts.append(_layer_operations(context.module, args, out))
        return out

    variables = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, num_samples)), train=False)
    )
    with nn.intercept_methods(count):
        jax.eval_shape(lambda v: model.apply(v, jnp.zeros((1, num_samples))), variables)
    total = sum(counts)
    if getattr(model, "uses_logmel", True):
        c = model.frontend
        frames = c.num_frames(num_samples)
        total += 2 * 2 * c.n_freq * c.window_size * frames  # Real and imaginary DFT convs.
    return int(total)


def summary(name: str, **overrides: Any) -> Dict[str, object]:
    """Facts about a registered model: parameters, operations, input and output shapes."""
    from panns_jax import models

    model = models.get(name, **overrides)
    rate = models.sample_rate(model)
    num_samples = 10 * rate
    variables = jax.eval_shape(lambda: models.init(model, jax.random.key(0), num_samples))
    outputs = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((1, num_samples))), variables)
    return {
        "model": name,
        "family": type(model).__name__,
        "sample_rate": rate,
        "input": f"(batch, samples) float32; 10 s = {num_samples} samples",
        "trainable_params": models.count_params(variables["params"]),
        "batch_stats": models.count_params(variables.get("batch_stats", {})),
        "multiply_adds": multiply_adds(model, num_samples),
        "outputs": {k: tuple(v.shape) for k, v in sorted(outputs.items())},
    }
