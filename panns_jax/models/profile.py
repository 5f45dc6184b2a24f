"""Parameter and operation counts of a model, as the paper's Table XII reports them.

``multiply_adds`` walks the layers that actually run (by intercepting every
``nn.Conv``, ``nn.Dense`` and ``BatchNorm`` call of a forward pass on a 10 s clip)
and counts like the original code: 2 operations per multiply-accumulate of every
convolution and dense layer, 1 per bias output, 2 per element entering a
BatchNorm, plus the STFT of the log-mel front end as the original's two
DFT convolutions (real and imaginary, ``n_freq x n_fft`` per frame).
"""

from __future__ import annotations

import math
from typing import Dict

import flax.linen as nn
import jax
import jax.numpy as jnp

from panns_jax.models import layers


def multiply_adds(model: nn.Module, num_samples: int) -> int:
    """Paper-style operation count of one forward pass on a ``(1, num_samples)`` clip."""
    total = 0

    def count(next_fun, args, kwargs, context):
        nonlocal total
        module = context.module
        out = next_fun(*args, **kwargs)
        if context.method_name != "__call__":
            return out
        if isinstance(module, nn.Conv):
            x = args[0]
            kernel = math.prod(module.kernel_size)
            in_per_group = x.shape[-1] // module.feature_group_count
            total += 2 * out.size * kernel * in_per_group + (out.size if module.use_bias else 0)
        elif isinstance(module, nn.Dense):
            total += 2 * out.size * args[0].shape[-1] + (out.size if module.use_bias else 0)
        elif isinstance(module, layers.BatchNorm):
            total += 2 * args[0].size
        return out

    variables = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, num_samples)), train=False)
    )
    with nn.intercept_methods(count):
        jax.eval_shape(lambda v: model.apply(v, jnp.zeros((1, num_samples))), variables)
    if getattr(model, "uses_logmel", True):
        c = model.frontend
        frames = c.num_frames(num_samples)
        total += 2 * 2 * c.n_freq * c.window_size * frames  # Real and imaginary DFT convs.
    return int(total)


def summary(name: str, **overrides) -> Dict[str, object]:
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
