"""The log-mel MobileNets: MobileNetV1 and MobileNetV2 (Kong et al. 2020, Sec. III-F).

Both trunks are written as the original ``nn.Sequential`` lists of layers, so each
layer's position is its state_dict index (``features.2.conv.3``), pooling and
activation slots included. Downsampling is an average pool of size s *between* a
stride-1 conv and its BN (``golden/ARCHITECTURES.md`` §5); there is no trunk dropout.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from panns_jax.models import depthwise, layers
from panns_jax.models.layers import BatchNorm, Dtype, conv2d

# A layer of a Sequential: ("conv", out, kernel, groups) | ("pool", s) | ("bn",) | ("relu",)
# | ("relu6",).
Layer = Tuple
# (module path, layers, residual) of one trunk block.
Block = Tuple[str, List[Layer], bool]


def _conv(out: int, kernel: int, groups: int = 1) -> Layer:
    return ("conv", out, kernel, groups)


def depthwise_conv2d(features: int, kernel: int, name: str, dtype: Dtype) -> nn.Conv:
    """:func:`layers.conv2d` with one filter per channel (groups = channels).

    It convolves with :func:`depthwise.conv_general_dilated`, because XLA:CPU's grouped
    convolution is 15-50x slower than the shifted multiply-adds used there on CPU. Its
    parameter is the ``kernel`` (HWIO with I = 1) of an ``nn.Conv`` with
    ``feature_group_count``, so checkpoints hold the same arrays.
    """
    return conv2d(
        features,
        kernel,
        name,
        dtype,
        groups=features,
        conv_general_dilated=depthwise.conv_general_dilated,
    )


def pointwise_conv2d(features: int, name: str, dtype: Dtype) -> nn.Conv:
    """A 1x1 conv computed as a matrix product by :func:`depthwise.pointwise_conv`.

    Its parameter is nn.Conv's ``kernel`` of shape (1, 1, in, out). Its gradient is two
    matrix products instead of XLA:CPU's slow whole-map weight-gradient convolution.
    """
    return conv2d(features, 1, name, dtype, conv_general_dilated=depthwise.conv_general_dilated)


def sequential(
    x: jax.Array, prefix: str, seq: Sequence[Layer], train: bool, dtype: Dtype
) -> jax.Array:
    """Run ``seq`` as a PyTorch nn.Sequential named ``prefix`` (inside a compact method)."""
    for i, layer in enumerate(seq):
        kind, name = layer[0], f"{prefix}.{i}"
        if kind == "conv" and layer[3] > 1:
            if layer[3] != layer[1] or x.shape[-1] != layer[1]:
                raise ValueError(f"{name}: only depthwise grouped convs are supported")
            x = depthwise_conv2d(layer[1], layer[2], name, dtype)(x)
        elif kind == "conv" and layer[2] == 1:
            x = pointwise_conv2d(layer[1], name, dtype)(x)
        elif kind == "conv":
            x = conv2d(layer[1], layer[2], name, dtype)(x)
        elif kind == "pool":
            x = depthwise.avg_pool(x, layer[1])
        elif kind == "bn":
            x = BatchNorm(dtype=dtype, name=name)(x, use_running_average=not train)
        elif kind == "relu":
            x = nn.relu(x)
        elif kind == "relu6":
            x = jax.nn.relu6(x)
        else:
            raise ValueError(f"unknown layer kind {kind!r}")
    return x


def conv_pool_bn(
    cin: int, cout: int, stride: int, act: str, depthwise: bool = False
) -> List[Layer]:
    """conv 3x3 (depthwise when asked) -> avg pool s -> BN -> activation."""
    return [_conv(cout, 3, cin if depthwise else 1), ("pool", stride), ("bn",), (act,)]


def mobilenet_v1_blocks() -> List[Block]:
    """``features.0`` conv_bn(1->32, s2), then 13 conv_dw (ARCHITECTURES.md §5)."""
    blocks: List[Block] = [("features.0", conv_pool_bn(1, 32, 2, "relu"), False)]
    dw = (
        [(32, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2), (256, 256, 1), (256, 512, 2)]
        + [(512, 512, 1)] * 5
        + [(512, 1024, 2), (1024, 1024, 1)]
    )
    for k, (cin, cout, s) in enumerate(dw, start=1):
        seq = conv_pool_bn(cin, cin, s, "relu", depthwise=True) + [
            _conv(cout, 1),
            ("bn",),
            ("relu",),
        ]
        blocks.append((f"features.{k}", seq, False))
    return blocks


def mobilenet_v2_blocks() -> List[Block]:
    """``features.0`` conv 1->32 s2, 17 InvertedResiduals, ``features.18`` 1x1 -> 1280."""
    blocks: List[Block] = [("features.0", conv_pool_bn(1, 32, 2, "relu6"), False)]
    settings = [
        (1, 16, 1, 1),
        (6, 24, 2, 2),
        (6, 32, 3, 2),
        (6, 64, 4, 2),
        (6, 96, 3, 2),
        (6, 160, 3, 1),
        (6, 320, 1, 1),
    ]  # (expansion t, channels c, repeats n, stride s)
    cin = 32
    for t, cout, n, s in settings:
        for r in range(n):
            stride = s if r == 0 else 1
            hidden = round(cin * t)
            expand = [] if t == 1 else [_conv(hidden, 1), ("bn",), ("relu6",)]
            seq = (
                expand
                + conv_pool_bn(hidden, hidden, stride, "relu6", depthwise=True)
                + [_conv(cout, 1), ("bn",)]
            )  # Linear bottleneck: no activation.
            blocks.append((f"features.{len(blocks)}.conv", seq, stride == 1 and cin == cout))
            cin = cout
    blocks.append((f"features.{len(blocks)}", [_conv(1280, 1), ("bn",), ("relu6",)], False))
    return blocks


VERSIONS = {1: mobilenet_v1_blocks, 2: mobilenet_v2_blocks}


class MobileNet(layers.LogmelNetwork):
    """Log-mel MobileNetV1 / V2 (ARCHITECTURES.md §5): stem -> features -> clip head.

    V1's head has the usual dropout 0.5 before fc1. V2's has only the embedding dropout,
    as in the original.
    """

    # YNNPACK's depthwise convolutions make inference 1.1-1.3x faster (models.jit_options).
    cpu_library_fusions = True

    version: int = 1
    embedding_size: int = 1024

    @nn.compact
    def __call__(
        self, waveform: jax.Array, train: bool = False, mixup_lambda: Optional[jax.Array] = None
    ) -> dict:
        if self.version not in VERSIONS:
            raise ValueError(f"unknown MobileNet version {self.version!r}; expected 1 or 2")
        x, outputs = layers.logmel_stem(self, waveform, train=train, mixup_lambda=mixup_lambda)
        for prefix, seq, residual in VERSIONS[self.version]():
            y = sequential(x, prefix, seq, train, self.dtype)
            x = x + y if residual else y
        return layers.clip_head(
            self,
            jnp.mean(x, axis=2),
            train=train,
            outputs=outputs,
            dropout_before_fc1=self.version == 1,
        )


# Registered names -> keyword arguments of ``MobileNet`` (merged into panns_jax.models.REGISTRY).
MODELS = {
    "MobileNetV1": dict(version=1),
    "MobileNetV2": dict(version=2),
}
