"""Building blocks shared by the PANNs model families.

Layout conventions (see ``golden/ARCHITECTURES.md``):

* 2-D networks see the log-mel as an NHWC image ``(B, time, mel, C)``; kernel and
  pool sizes are written ``(time, freq)`` as in the paper.
* 1-D networks use ``(B, samples, C)``.
* Submodule names mirror the original PyTorch module paths (``conv_block1.bn1``,
  ``features.3.conv.0``), so ``panns_jax.convert`` maps parameters to state_dict
  keys with one generic rule instead of a table per model.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
from typing import Any, Callable, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from panns_jax import frontend as fe
from panns_jax.models import fast1d, same_conv

Dtype = Any


@dataclasses.dataclass(frozen=True)
class Outputs:
    """What a model's ``apply`` returns, declared by its class so that callers need not trace it.

    Attributes:
      decision_level: whether the model has a native ``framewise_output``. The paper's
        decision-level SED heads have one. Clip models have only ``clipwise_output``
        (``golden/ARCHITECTURES.md`` §8).
      embedding: the key of the model's embedding. Clip models return one vector per clip
        as ``embedding``, decision-level models one per segment as
        ``segmentwise_embedding``.
    """

    decision_level: bool
    embedding: str


CLIP_OUTPUTS = Outputs(decision_level=False, embedding="embedding")
DECISION_LEVEL_OUTPUTS = Outputs(decision_level=True, embedding="segmentwise_embedding")


class Network(nn.Module):
    """The attributes that every PANNs network has and that the shared parts read.

    :func:`clip_head`, :func:`logmel_stem` and ``models.sample_rate`` read them. The
    ``frontend`` holds the input's sample rate and the log-mel settings. The clip head has
    ``embedding_size`` units and ``num_classes`` outputs (527 AudioSet classes, Kong et al.
    2020, Sec. III). ``dtype`` is the compute dtype.

    The class attribute ``uses_logmel`` says whether the original holds STFT and mel
    buffers (read by ``panns_jax.convert``), and ``declared_outputs`` what apply returns
    (``models.outputs``). ``cpu_library_fusions`` says whether XLA:CPU should hand the
    network's convolutions to its kernel libraries at inference (``models.jit_options``).
    Families override these where they differ, and the default ``embedding_size`` where
    theirs is not 2048.
    """

    embedding_size: int = 2048
    num_classes: int = 527
    frontend: fe.FrontendConfig = fe.FrontendConfig()
    dtype: Dtype = jnp.float32

    uses_logmel = True
    declared_outputs = CLIP_OUTPUTS
    cpu_library_fusions = False


class LogmelNetwork(Network):
    """A network on the log-mel front end (:func:`logmel_stem`).

    It applies SpecAugment in training unless ``spec_augment`` is off (Cnn14_no_specaug,
    paper Sec. V).
    """

    spec_augment: bool = True


# Every BatchNorm of the original uses eps 1e-5 and momentum 0.1
# (running <- 0.9 * running + 0.1 * batch statistic).
BN_EPSILON = 1e-5
BN_MOMENTUM = 0.9


def _batch_statistics(x: jax.Array) -> Tuple[jax.Array, jax.Array]:
    """Mean and biased variance over all axes but the last (two passes, as PyTorch)."""
    axes = tuple(range(x.ndim - 1))
    mean = jnp.mean(x, axis=axes)
    return mean, jnp.mean(jnp.square(x - mean), axis=axes)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_normalize(
    x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float
) -> Tuple[jax.Array, jax.Array, jax.Array]:
    """Normalise float32 ``x`` by its batch statistics: ``(y, mean, biased variance)``.

    The gradient is the textbook BatchNorm backward (Ioffe & Szegedy 2015): two channel
    sums of the output gradient, sum(dy) and sum(dy * xhat), then one elementwise pass,
    ``dx = scale / std * (dy - mean(dy) - xhat * mean(dy * xhat))``. Autodiff through
    the mean and the variance computes the same sums (up to round-off) in more
    reductions, each its own pass over the activations. The BatchNorm backward of a
    MobileNetV1 train step (8 x 5 s, CPU) takes 1.4x longer that way.
    """
    return _batch_normalize_fwd(x, scale, bias, epsilon)[0]


def _normalized(x, mean, var, scale, bias, epsilon):
    return (x - mean) * (scale * jax.lax.rsqrt(var + epsilon)) + bias


def _batch_normalize_fwd(x, scale, bias, epsilon):
    mean, var = _batch_statistics(x)
    y = _normalized(x, mean, var, scale, bias, epsilon)
    return (y, mean, var), (x, mean, jax.lax.rsqrt(var + epsilon), scale)


# Largest batch whose items are added one by one on CPU (an unrolled sum in the graph) by
# the BatchNorm backward here and the depthwise weight gradient (models/depthwise.py).
MAX_UNROLLED_BATCH = 64


def _channel_sums(*arrays: jax.Array) -> jax.Array:
    """Each array summed over all axes but the last, stacked: ``(len(arrays), channels)``.

    On CPU the batch items are first added elementwise (one loop fusion for all arrays,
    an array the size of one example each), then one reduction sums the rest. That makes
    a MobileNetV1 train step 8% faster than one XLA:CPU reduction per array over the
    whole batch. Other backends, and batches over ``MAX_UNROLLED_BATCH``, take plain
    reductions.
    """

    def reduced(*arrays):
        return jnp.stack([jnp.sum(a, axis=tuple(range(a.ndim - 1))) for a in arrays])

    def unrolled(*arrays):
        firsts = [functools.reduce(operator.add, [a[i] for i in range(a.shape[0])]) for a in arrays]
        return jnp.sum(jnp.stack(firsts), axis=tuple(range(1, firsts[0].ndim)))

    if arrays[0].shape[0] > MAX_UNROLLED_BATCH:
        return reduced(*arrays)
    return jax.lax.platform_dependent(*arrays, cpu=unrolled, default=reduced)


def _batch_normalize_bwd(epsilon, residuals, cotangents):
    x, mean, inv_std, scale = residuals
    dy, dmean, dvar = cotangents
    count = x.size // x.shape[-1]
    xhat = (x - mean) * inv_std
    sum_dy, sum_dy_xhat = _channel_sums(dy, dy * xhat)
    dx = (scale * inv_std) * (dy - sum_dy / count - xhat * (sum_dy_xhat / count))
    # The statistics' own cotangents (zero unless a caller differentiates through them):
    # d mean / dx = 1 / count, d var / dx = 2 (x - mean) / count.
    dx = dx + (dmean + 2 * dvar * (x - mean)) / count
    return dx, sum_dy_xhat, sum_dy


batch_normalize.defvjp(_batch_normalize_fwd, _batch_normalize_bwd)


class BatchNorm(nn.Module):
    """BatchNorm over all axes but the last, matching PyTorch's BatchNorm{1,2}d.

    It differs from ``flax.linen.BatchNorm`` in one way that matters for parity of
    training. The running variance is updated with the *unbiased* batch variance
    (n / (n - 1)), as PyTorch does, while normalisation uses the biased one.
    Statistics are always computed in float32.
    """

    epsilon: float = BN_EPSILON
    momentum: float = BN_MOMENTUM
    dtype: Optional[Dtype] = None

    @nn.compact
    def __call__(self, x: jax.Array, use_running_average: bool = True) -> jax.Array:
        features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
        running_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
        running_var = self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)

        x32 = x.astype(jnp.float32)
        if use_running_average:
            y = _normalized(x32, running_mean.value, running_var.value, scale, bias, self.epsilon)
        else:
            y, mean, var = batch_normalize(x32, scale, bias, self.epsilon)
            if not self.is_initializing():
                count = x.size // features
                unbiased = var * (count / max(count - 1, 1))
                running_mean.value = self.momentum * running_mean.value + (1 - self.momentum) * mean
                running_var.value = (
                    self.momentum * running_var.value + (1 - self.momentum) * unbiased
                )
        return y.astype(self.dtype or x.dtype)


def conv2d(
    features: int,
    kernel: int,
    name: str,
    dtype: Dtype,
    *,
    groups: int = 1,
    use_bias: bool = False,
    conv_general_dilated: Callable[..., jax.Array] = same_conv.conv_general_dilated,
) -> nn.Conv:
    """Stride-1, 'same'-padded 2-D conv without bias (every PANNs conv but one).

    It convolves with ``conv_general_dilated``, a drop-in for ``lax.conv_general_dilated``.
    The default, :func:`same_conv.conv_general_dilated`, is fast on very short inputs and
    has a fast gradient on CPU.
    """
    pad = kernel // 2
    return nn.Conv(
        features,
        (kernel, kernel),
        padding=((pad, pad), (pad, pad)),
        feature_group_count=groups,
        use_bias=use_bias,
        dtype=dtype,
        name=name,
        conv_general_dilated=conv_general_dilated,
    )


def conv1d(
    features: int,
    kernel: int,
    name: str,
    dtype: Dtype,
    *,
    stride: int = 1,
    padding: int = 0,
    dilation: int = 1,
    use_bias: bool = False,
) -> nn.Conv:
    """1-D conv with PyTorch-style explicit symmetric padding.

    It convolves with :func:`fast1d.conv_general_dilated`, whose gradient is fast on CPU.
    """
    return nn.Conv(
        features,
        (kernel,),
        strides=(stride,),
        padding=((padding, padding),),
        kernel_dilation=(dilation,),
        use_bias=use_bias,
        dtype=dtype,
        name=name,
        conv_general_dilated=fast1d.conv_general_dilated,
    )


def pool2d(x: jax.Array, size: Tuple[int, int], kind: str = "avg") -> jax.Array:
    """Non-overlapping 2-D pooling that floors the length (PyTorch's default).

    ``kind`` is 'avg', 'max' or 'avg+max' (the sum of both). Size (1, 1) is the identity.
    """
    size = tuple(size)
    if size == (1, 1):
        return x
    if kind == "avg":
        return nn.avg_pool(x, size, strides=size, padding="VALID")
    if kind == "max":
        return nn.max_pool(x, size, strides=size, padding="VALID")
    if kind == "avg+max":
        return nn.avg_pool(x, size, strides=size, padding="VALID") + nn.max_pool(
            x, size, strides=size, padding="VALID"
        )
    raise ValueError(f"unknown pool kind {kind!r}; expected 'avg', 'max' or 'avg+max'")


class ConvBlock(nn.Module):
    """PANNs ConvBlock: (conv 3x3 -> BN -> ReLU) x 2 -> pool, or one 5x5 conv (Cnn6)."""

    features: int
    pool_size: Tuple[int, int] = (2, 2)
    pool_type: str = "avg"
    kernel_size: int = 3
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        num_convs = 1 if self.kernel_size == 5 else 2
        for i in range(1, num_convs + 1):
            x = conv2d(self.features, self.kernel_size, f"conv{i}", self.dtype)(x)
            x = nn.relu(
                BatchNorm(dtype=self.dtype, name=f"bn{i}")(x, use_running_average=not train)
            )
        return pool2d(x, self.pool_size, self.pool_type)


def logmel_stem(
    module: nn.Module,
    waveform: jax.Array,
    *,
    train: bool,
    mixup_lambda: Optional[jax.Array],
    time_drop_width: int = 64,
    apply_mixup: bool = True,
) -> Tuple[jax.Array, dict]:
    """Front end shared by every log-mel model: log-mel -> bn0 -> SpecAugment -> mixup.

    Must be called inside ``module``'s ``@nn.compact`` method. It creates the module's
    ``bn0`` (one BatchNorm channel per mel bin, statistics over batch and time), and reads
    its ``frontend``, ``spec_augment`` and ``dtype`` attributes.

    Returns the ``(B, T, mel, 1)`` features and the model's outputs dict, which starts
    with ``'logmel'`` (float32, before bn0). SpecAugment draws from the ``'specaug'`` rng
    stream. Its frequency stripes are at most ``mel_bins // 8`` wide (8 for 64 mels, 4
    for 32, 16 for 128), as in the original.
    """
    frontend = module.frontend
    x = fe.logmel(waveform, frontend)  # (B, T, F) float32, always.
    outputs = {"logmel": x}
    x = BatchNorm(name="bn0")(x, use_running_average=not train)
    x = x[..., None]
    if train and module.spec_augment:
        rng = module.make_rng("specaug")
        x = fe.spec_augment(
            rng,
            x,
            time_drop_width=time_drop_width,
            time_stripes_num=2,
            freq_drop_width=frontend.mel_bins // 8,
            freq_stripes_num=2,
        )
    if train and apply_mixup and mixup_lambda is not None:
        x = fe.mixup(x, mixup_lambda)
    return x.astype(module.dtype), outputs


# The classifier layers, named as the original's (Kong et al. 2020). Every model's is
# ``fc_audioset`` but Cnn14_DecisionLevelAtt's, whose classifier is its attention block.
# Transfer learning replaces them. Their state_dict keys are ``<name>.*`` by the
# converter's naming rule.
CLASSIFIER = "fc_audioset"
ATTENTION_CLASSIFIER = "att_block"
CLASSIFIER_PARAMS = (CLASSIFIER, ATTENTION_CLASSIFIER)


def clip_head(
    module: nn.Module,
    features_btc: jax.Array,
    *,
    train: bool,
    outputs: dict,
    dropout_before_fc1: bool = True,
) -> dict:
    """Clip-level head H(C -> E) of every clip model (ARCHITECTURES.md §1).

    ``features_btc`` is the trunk output already averaged over frequency, ``(B, t, C)``.
    The head sums its max and its mean over time, applies dropout 0.5, then fc1 + ReLU,
    giving h. The classifier reads h. The returned ``embedding`` is dropout 0.5 of h, so
    that this dropout only affects transfer heads, as in the original.

    Must be called inside ``module``'s ``@nn.compact`` method, where it creates ``fc1``
    and ``fc_audioset``. It reads the module's ``embedding_size``, ``num_classes`` and
    ``dtype``.
    """
    dtype = module.dtype
    x = jnp.max(features_btc, axis=1) + jnp.mean(features_btc, axis=1)
    outputs["fc1_input"] = x.astype(jnp.float32)
    if dropout_before_fc1:
        x = nn.Dropout(0.5)(x, deterministic=not train)
    h = nn.relu(nn.Dense(module.embedding_size, dtype=dtype, name="fc1")(x))
    logits = nn.Dense(module.num_classes, dtype=dtype, name=CLASSIFIER)(h).astype(jnp.float32)
    outputs["embedding"] = nn.Dropout(0.5)(h, deterministic=not train).astype(jnp.float32)
    outputs["clipwise_logits"] = logits
    outputs["logits"] = logits
    outputs["clipwise_output"] = jax.nn.sigmoid(logits)
    return outputs


def frames_to_framewise(segmentwise: jax.Array, num_frames: int, ratio: int) -> jax.Array:
    """Bring ``(B, t, C)`` segment outputs back to ``num_frames`` frames.

    As in the original SED code, every segment is repeated ``ratio`` times (nearest
    neighbour) and copies of the last frame pad the result up to ``num_frames``.
    """
    x = jnp.repeat(segmentwise, ratio, axis=1)
    missing = num_frames - x.shape[1]
    if missing > 0:
        x = jnp.concatenate([x, jnp.repeat(x[:, -1:], missing, axis=1)], axis=1)
    return x[:, :num_frames]


def check_choice(what: str, value: Any, choices: Sequence[Any]) -> None:
    """Raise a ValueError naming ``what`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; expected one of {tuple(choices)}")


def init_only(module: nn.Module, module_fn: Callable[[], Any]) -> None:
    """Create parameters that the original declares but never runs.

    Some original models own modules that ``forward`` never touches (e.g.
    DaiNet19's first ``downsample``). They count in the paper's parameter
    numbers and appear in checkpoints, so we create them at init time only.
    """
    if module.is_initializing():
        module_fn()
