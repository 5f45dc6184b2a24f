"""Raw-waveform 1-D networks: LeeNet11/24, DaiNet19, Res1dNet31/51.

Kong et al. 2020, Sec. III-D and ``golden/ARCHITECTURES.md`` §6. The input is ``(B, L)``
audio at ``frontend.sample_rate``, with no log-mel front end and no SpecAugment. Mixup
mixes the raw waveform. Activations are laid out ``(B, samples, C)``, and head H has no
mean over frequency.
"""

from __future__ import annotations

from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from panns_jax import frontend as fe
from panns_jax.models import fast1d, layers
from panns_jax.models.layers import BatchNorm, Dtype, conv1d


class WaveformNetwork(layers.Network):
    """A network on the raw waveform: no STFT / mel buffers in the original state_dict."""

    uses_logmel = False


def _waveform_input(
    module: nn.Module,
    waveform: jax.Array,
    min_samples: int,
    train: bool,
    mixup_lambda: Optional[jax.Array],
) -> jax.Array:
    """The ``(B', L, 1)`` input of a 1-D trunk from ``(B, L)`` audio (§6).

    The audio is validated, then mixed up when training with a ``mixup_lambda``.
    """
    fe.validate_waveform(waveform, min_samples=1)
    x = jnp.asarray(waveform)
    x = x[None] if x.ndim == 1 else x
    if x.shape[-1] < min_samples:
        raise ValueError(
            f"{type(module).__name__} needs at least {min_samples} samples "
            f"({min_samples / module.frontend.sample_rate:.3f} s), got {x.shape[-1]}; "
            "pad the audio or use a longer clip"
        )
    if train and mixup_lambda is not None:
        x = fe.mixup(x, mixup_lambda)
    return x[..., None].astype(module.dtype)


def _head(x: jax.Array, module: nn.Module, train: bool) -> dict:
    """Head H on the (B, t, C) trunk output (no frequency axis to average)."""
    return layers.clip_head(module, x, train=train, outputs={})


class LeeNetConvBlock(nn.Module):
    """LeeNetConvBlock (1 conv) / LeeNetConvBlock2 (2 convs).

    (conv k3 -> BN -> ReLU) x ``num_convs`` -> [max-pool 3, pad 1]. The stride applies to
    the first conv.
    """

    features: int
    stride: int = 1
    pool: bool = True
    num_convs: int = 1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        for i in range(1, self.num_convs + 1):
            stride = self.stride if i == 1 else 1
            x = conv1d(self.features, 3, f"conv{i}", self.dtype, stride=stride, padding=1)(x)
            x = nn.relu(
                BatchNorm(dtype=self.dtype, name=f"bn{i}")(x, use_running_average=not train)
            )
        return fast1d.max_pool1d(x, 3, padding=1) if self.pool else x


class LeeNet(WaveformNetwork):
    """LeeNet11 (1 conv per block) / LeeNet24 (2 convs per block, dropout 0.1), §6.

    Block 1 has stride 3 and no pool. The others have stride 1 and max-pool 3 (pad 1),
    except where ``pools`` says otherwise (LeeNet24's last block).
    """

    widths: Sequence[int] = (64, 64, 64, 128, 128, 128, 128, 128, 256)
    pools: Sequence[bool] = (False,) + (True,) * 8
    num_convs: int = 1
    trunk_dropout: float = 0.0
    embedding_size: int = 512

    @nn.compact
    def __call__(
        self, waveform: jax.Array, train: bool = False, mixup_lambda: Optional[jax.Array] = None
    ) -> dict:
        x = _waveform_input(self, waveform, 1, train, mixup_lambda)
        last = len(self.widths)
        for i, (width, pool) in enumerate(zip(self.widths, self.pools), start=1):
            x = LeeNetConvBlock(
                width,
                stride=3 if i == 1 else 1,
                pool=pool,
                num_convs=self.num_convs,
                dtype=self.dtype,
                name=f"conv_block{i}",
            )(x, train)
            if i < last and self.trunk_dropout:
                x = nn.Dropout(self.trunk_dropout)(x, deterministic=not train)
        return _head(x, self, train)


class DaiNetResBlock(nn.Module):
    """4 x conv k3 (+BN, ReLU but the last) + shortcut (identity, or 1x1 conv -> BN) -> ReLU.

    ``downsample`` and ``bn_downsample`` always exist, as in the original, but only run
    when the shapes differ. For the 64->64 block they are created at init only.
    """

    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        origin = x
        for i in range(1, 5):
            x = conv1d(self.features, 3, f"conv{i}", self.dtype, padding=1)(x)
            x = BatchNorm(dtype=self.dtype, name=f"bn{i}")(x, use_running_average=not train)
            x = nn.relu(x) if i < 4 else x

        def shortcut() -> jax.Array:
            y = conv1d(self.features, 1, "downsample", self.dtype)(origin)
            return BatchNorm(dtype=self.dtype, name="bn_downsample")(
                y, use_running_average=not train
            )

        if origin.shape == x.shape:
            layers.init_only(self, shortcut)
            return nn.relu(x + origin)
        return nn.relu(x + shortcut())


class DaiNet(WaveformNetwork):
    """DaiNet19: conv0 k80 s4 -> bn0 (no ReLU) -> 4 res blocks, max-pool 4 between them (§6)."""

    widths: Sequence[int] = (64, 128, 256, 512)
    embedding_size: int = 512

    @nn.compact
    def __call__(
        self, waveform: jax.Array, train: bool = False, mixup_lambda: Optional[jax.Array] = None
    ) -> dict:
        # conv0 maps L -> (L - 80) // 4 + 1, which must survive three max-pools of 4.
        min_samples = 80 + 4 * (4 ** (len(self.widths) - 1) - 1)
        x = _waveform_input(self, waveform, min_samples, train, mixup_lambda)
        x = conv1d(self.widths[0], 80, "conv0", self.dtype, stride=4)(x)
        x = BatchNorm(dtype=self.dtype, name="bn0")(x, use_running_average=not train)
        for i, width in enumerate(self.widths, start=1):
            if i > 1:
                x = fast1d.max_pool1d(x, 4)
            x = DaiNetResBlock(width, dtype=self.dtype, name=f"conv_block{i}")(x, train)
        return _head(x, self, train)


class BasicBlockWav1d(nn.Module):
    """Res1dNet block: [max-pool s] -> conv k3 -> BN -> ReLU -> dropout 0.1 -> conv k3 dil 2
    -> BN, + shortcut ([avg-pool s -> 1x1 conv -> BN] = ``downsample.0/1/2``) -> ReLU."""

    features: int
    stride: int = 1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        s = self.stride
        out = fast1d.max_pool1d(x, s) if s != 1 else x
        out = conv1d(self.features, 3, "conv1", self.dtype, padding=1)(out)
        out = nn.relu(BatchNorm(dtype=self.dtype, name="bn1")(out, use_running_average=not train))
        out = nn.Dropout(0.1)(out, deterministic=not train)
        out = conv1d(self.features, 3, "conv2", self.dtype, padding=2, dilation=2)(out)
        out = BatchNorm(dtype=self.dtype, name="bn2")(out, use_running_average=not train)
        if s != 1:  # Sequential(AvgPool1d, conv1x1, BN): slots 1 and 2 hold weights.
            x = nn.avg_pool(x, (s,), strides=(s,), padding="VALID")
            x = conv1d(self.features, 1, "downsample.1", self.dtype)(x)
            x = BatchNorm(dtype=self.dtype, name="downsample.2")(x, use_running_average=not train)
        elif x.shape[-1] != self.features:  # Sequential(conv1x1, BN); unused by Res1dNet31/51.
            x = conv1d(self.features, 1, "downsample.0", self.dtype)(x)
            x = BatchNorm(dtype=self.dtype, name="downsample.1")(x, use_running_average=not train)
        return nn.relu(out + x)


class Res1dNet(WaveformNetwork):
    """Res1dNet31/51: conv0 k11 s5 p5 -> bn0 (no ReLU) -> 7 layers of BasicBlockWav1d (§6)."""

    blocks: Sequence[int] = (2, 2, 2, 2, 2, 2, 2)
    widths: Sequence[int] = (64, 128, 256, 512, 1024, 1024, 2048)
    strides: Sequence[int] = (1, 4, 4, 4, 4, 4, 4)

    @nn.compact
    def __call__(
        self, waveform: jax.Array, train: bool = False, mixup_lambda: Optional[jax.Array] = None
    ) -> dict:
        reduction = 1
        for s in self.strides:
            reduction *= s
        # conv0 maps L -> ceil(L / 5); the layers then floor-divide by 4 six times.
        min_samples = 5 * (reduction - 1) + 1  # 20476 for the paper's strides.
        x = _waveform_input(self, waveform, min_samples, train, mixup_lambda)
        x = conv1d(self.widths[0], 11, "conv0", self.dtype, stride=5, padding=5)(x)
        x = BatchNorm(dtype=self.dtype, name="bn0")(x, use_running_average=not train)
        for i, (n, width, stride) in enumerate(zip(self.blocks, self.widths, self.strides), 1):
            for j in range(n):
                x = BasicBlockWav1d(
                    width,
                    stride=stride if j == 0 else 1,
                    dtype=self.dtype,
                    name=f"resnet.layer{i}.{j}",
                )(x, train)
        return _head(x, self, train)


_LEENET24 = dict(
    widths=(64, 96, 128, 128, 256, 256, 512, 512, 1024),
    pools=(False,) + (True,) * 7 + (False,),
    num_convs=2,
    trunk_dropout=0.1,
    embedding_size=1024,
)

# Registered names -> (family class, keyword arguments).
MODELS = {
    "LeeNet11": (LeeNet, {}),
    "LeeNet24": (LeeNet, _LEENET24),
    "DaiNet19": (DaiNet, {}),
    "Res1dNet31": (Res1dNet, dict(blocks=(2, 2, 2, 2, 2, 2, 2))),
    "Res1dNet51": (Res1dNet, dict(blocks=(2, 3, 4, 6, 4, 3, 2))),
}
