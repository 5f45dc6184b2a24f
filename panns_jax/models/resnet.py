"""The log-mel ResNet family: ResNet22, ResNet38 and ResNet54 (Kong et al. 2020, Sec. III-E).

Stem -> conv_block1 -> ``resnet.layer1..4`` -> avg 2x2 -> conv_block_after1 -> clip head
(``golden/ARCHITECTURES.md`` §4). Strides are never inside a convolution: a stride-2
block average-pools 2x2 first (main path and shortcut alike).
"""

from __future__ import annotations

from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from panns_jax.models import layers
from panns_jax.models.layers import BatchNorm, ConvBlock, Dtype, conv2d, pool2d

BLOCK_DROPOUT = 0.1  # Inside every residual block, before its last conv.
TRUNK_DROPOUT = 0.2


def _bn(name: str, dtype: Dtype) -> BatchNorm:
    return BatchNorm(dtype=dtype, name=name)


def _conv_bn(
    x: jax.Array, features: int, kernel: int, index: int, train: bool, dtype: Dtype
) -> jax.Array:
    """``conv{index}`` -> ``bn{index}`` of a residual block (inside its compact method)."""
    x = conv2d(features, kernel, f"conv{index}", dtype)(x)
    return _bn(f"bn{index}", dtype)(x, not train)


def _shortcut(x: jax.Array, features: int, stride: int, train: bool, dtype: Dtype) -> jax.Array:
    """``downsample`` of the original: [avg 2x2] -> 1x1 conv -> BN, or the identity.

    Sequential indices count the pool. The layers are ``downsample.1/2`` when the stride
    is 2, and ``.0/.1`` when only the channel count changes. Called inside a block's
    ``@nn.compact`` method.
    """
    if stride == 1 and x.shape[-1] == features:
        return x
    first = 0 if stride == 1 else 1
    x = pool2d(x, (stride, stride))
    x = conv2d(features, 1, f"downsample.{first}", dtype)(x)
    return _bn(f"downsample.{first + 1}", dtype)(x, use_running_average=not train)


class ResidualBlock(nn.Module):
    """The attributes of a residual block: its width, its stride and the compute dtype.

    ``expansion`` is how many times ``features`` channels the block outputs.
    """

    features: int
    stride: int = 1
    dtype: Dtype = jnp.float32

    expansion = 1


class BasicBlock(ResidualBlock):
    """[avg 2x2] -> conv3x3 -> BN -> ReLU -> dropout 0.1 -> conv3x3 -> BN, + shortcut, ReLU."""

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        out = pool2d(x, (self.stride, self.stride))
        out = nn.relu(_conv_bn(out, self.features, 3, 1, train, self.dtype))
        out = nn.Dropout(BLOCK_DROPOUT)(out, deterministic=not train)
        out = _conv_bn(out, self.features, 3, 2, train, self.dtype)
        return nn.relu(out + _shortcut(x, self.features, self.stride, train, self.dtype))


class Bottleneck(ResidualBlock):
    """[avg 2x2] -> 1x1 -> BN -> ReLU -> 3x3 -> BN -> ReLU -> dropout 0.1 -> 1x1 (x4) -> BN,
    + shortcut of the *unpooled* input, ReLU.

    ``features`` is the bottleneck width. The block outputs 4x as many channels.
    """

    expansion = 4

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        out = pool2d(x, (self.stride, self.stride))
        out = nn.relu(_conv_bn(out, self.features, 1, 1, train, self.dtype))
        out = nn.relu(_conv_bn(out, self.features, 3, 2, train, self.dtype))
        out = nn.Dropout(BLOCK_DROPOUT)(out, deterministic=not train)
        width = self.features * self.expansion
        out = _conv_bn(out, width, 1, 3, train, self.dtype)
        return nn.relu(out + _shortcut(x, width, self.stride, train, self.dtype))


BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


class ResNet(layers.LogmelNetwork):
    """Log-mel ResNet (ARCHITECTURES.md §4).

    Attributes:
      block: 'basic' (ResNet22/38) or 'bottleneck' (ResNet54, expansion 4).
      blocks_per_layer: residual blocks in ``resnet.layer1..4``.
      widths: block widths of the four layers. Their outputs are ``expansion`` times
        these. The first block of layers 2-4 has stride 2.
    """

    block: str = "basic"
    blocks_per_layer: Sequence[int] = (2, 2, 2, 2)
    widths: Sequence[int] = (64, 128, 256, 512)

    @nn.compact
    def __call__(
        self, waveform: jax.Array, train: bool = False, mixup_lambda: Optional[jax.Array] = None
    ) -> dict:
        layers.check_choice("block", self.block, BLOCKS)
        block_cls = BLOCKS[self.block]
        x, outputs = layers.logmel_stem(self, waveform, train=train, mixup_lambda=mixup_lambda)

        def trunk_dropout(y: jax.Array) -> jax.Array:
            return nn.Dropout(TRUNK_DROPOUT)(y, deterministic=not train)

        x = trunk_dropout(
            ConvBlock(64, pool_size=(2, 2), dtype=self.dtype, name="conv_block1")(x, train)
        )
        for i, (num_blocks, width) in enumerate(zip(self.blocks_per_layer, self.widths), start=1):
            for j in range(num_blocks):
                stride = 2 if i > 1 and j == 0 else 1
                x = block_cls(width, stride, dtype=self.dtype, name=f"resnet.layer{i}.{j}")(
                    x, train
                )
        x = trunk_dropout(pool2d(x, (2, 2)))
        x = ConvBlock(2048, pool_size=(1, 1), dtype=self.dtype, name="conv_block_after1")(x, train)
        x = trunk_dropout(x)
        return layers.clip_head(self, jnp.mean(x, axis=2), train=train, outputs=outputs)


# Registered names -> keyword arguments of ``ResNet`` (merged into panns_jax.models.REGISTRY).
MODELS = {
    "ResNet22": dict(block="basic", blocks_per_layer=(2, 2, 2, 2)),
    "ResNet38": dict(block="basic", blocks_per_layer=(3, 4, 6, 3)),
    "ResNet54": dict(block="bottleneck", blocks_per_layer=(3, 4, 6, 3)),
}
