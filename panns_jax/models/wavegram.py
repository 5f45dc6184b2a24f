"""Wavegram models: Wavegram_Cnn14, Wavegram_Logmel_Cnn14, Wavegram_Logmel128_Cnn14.

Kong et al. 2020, Sec. III-E and ``golden/ARCHITECTURES.md`` §7: a learned 1-D
"Wavegram" encoder turns the waveform into a (time, bins, 4 groups) image that feeds
Cnn14's conv blocks, optionally concatenated with the log-mel branch's conv_block1.
"""

from __future__ import annotations

from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from panns_jax import frontend as fe
from panns_jax.models import fast1d, layers
from panns_jax.models.layers import BatchNorm, ConvBlock, Dtype, conv1d

GROUPS = 4  # The encoder's channels are read as 4 groups x `bins` frequency bins.


class ConvPreWavBlock(nn.Module):
    """conv k3 -> BN -> ReLU -> conv k3 dilation 2 -> BN -> ReLU -> max-pool 4 (floor)."""

    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        for i, dilation in ((1, 1), (2, 2)):
            x = conv1d(
                self.features, 3, f"conv{i}", self.dtype, padding=dilation, dilation=dilation
            )(x)
            x = nn.relu(
                BatchNorm(dtype=self.dtype, name=f"bn{i}")(x, use_running_average=not train)
            )
        return fast1d.max_pool1d(x, 4)


class Wavegram(layers.LogmelNetwork):
    """Wavegram encoder + Cnn14 trunk, with (``use_logmel``) or without the log-mel branch.

    Attributes:
      use_logmel: concatenate the log-mel conv_block1 output (channels first) with the
        Wavegram. Without it the log-mel stem (bn0, conv_block1) exists but never runs.
      wavegram_bins: frequency bins of the Wavegram image, 32 or 64 (Wavegram_Logmel128).
        pre_block3 has 4x as many channels. With the log-mel branch it must equal
        mel_bins // 2.
    """

    use_logmel: bool = True
    wavegram_bins: int = 32
    widths: Sequence[int] = (64, 128, 256, 512, 1024, 2048)  # conv_block1..6
    trunk_dropout: float = 0.2

    @property
    def uses_logmel(self) -> bool:
        """Whether the original owns STFT / mel buffers (used by ``panns_jax.convert``)."""
        return self.use_logmel

    def _encoder(self, waveform: jax.Array, train: bool) -> jax.Array:
        """(B, L) -> (B, t, bins, 64): pre_conv0 ... pre_block4 (§7 steps 1-6)."""
        x = waveform[..., None].astype(self.dtype)
        x = conv1d(self.widths[0], 11, "pre_conv0", self.dtype, stride=5, padding=5)(x)
        x = nn.relu(BatchNorm(dtype=self.dtype, name="pre_bn0")(x, use_running_average=not train))
        widths = (self.widths[0], self.widths[1], GROUPS * self.wavegram_bins)
        for i, width in enumerate(widths, start=1):
            x = ConvPreWavBlock(width, dtype=self.dtype, name=f"pre_block{i}")(x, train)
        b, t, _ = x.shape  # Channel c -> (group c // bins, bin c % bins); groups are channels.
        x = x.reshape(b, t, GROUPS, self.wavegram_bins).transpose(0, 1, 3, 2)
        return ConvBlock(self.widths[0], pool_size=(2, 1), dtype=self.dtype, name="pre_block4")(
            x, train
        )

    def _check_length(self, num_samples: int) -> None:
        """Raise a ValueError for a clip too short for the trunk, or one whose log-mel and
        Wavegram branches give different numbers of time steps."""
        wavegram_steps = -(-num_samples // 5) // 128  # ceil(L / 5), max-pools 4, 4, 4, avg 2.
        min_steps = 2 ** (len(self.widths) - 2)  # conv_block2..5 halve the time axis.
        if wavegram_steps < min_steps:
            min_samples = 5 * (128 * min_steps - 1) + 1  # 10236 for Cnn14's blocks.
            raise ValueError(
                f"{type(self).__name__} needs at least {min_samples} samples "
                f"({min_samples / self.frontend.sample_rate:.3f} s), "
                f"got {num_samples}"
            )
        if self.use_logmel:
            logmel_steps = self.frontend.num_frames(num_samples) // 2
            if logmel_steps != wavegram_steps:
                raise ValueError(
                    f"{type(self).__name__}: {num_samples} samples give {logmel_steps} log-mel "
                    f"steps but {wavegram_steps} Wavegram steps, which the original cannot "
                    f"concatenate; use a length L with floor(L / {self.frontend.hop_size}) even "
                    f"(e.g. a multiple of {2 * self.frontend.hop_size} samples)"
                )

    @nn.compact
    def __call__(
        self, waveform: jax.Array, train: bool = False, mixup_lambda: Optional[jax.Array] = None
    ) -> dict:
        fe.validate_waveform(waveform, min_samples=1)
        waveform = waveform[None] if waveform.ndim == 1 else waveform
        self._check_length(waveform.shape[-1])
        if self.use_logmel and self.frontend.mel_bins != 2 * self.wavegram_bins:
            raise ValueError(
                f"mel_bins ({self.frontend.mel_bins}) must be twice wavegram_bins "
                f"({self.wavegram_bins}) to concatenate the two branches"
            )
        mixup = train and mixup_lambda is not None
        outputs: dict = {}

        x = self._encoder(waveform, train)
        if mixup:
            x = fe.mixup(x, mixup_lambda)
        if self.use_logmel:
            mel, outputs = layers.logmel_stem(
                self, waveform, train=train, mixup_lambda=mixup_lambda
            )
            mel = ConvBlock(self.widths[0], dtype=self.dtype, name="conv_block1")(mel, train)
            x = jnp.concatenate([mel, x], axis=-1)  # Log-mel channels first.
        else:  # Constructed but never run by the original Wavegram_Cnn14.

            def unused_stem() -> None:
                BatchNorm(name="bn0")(jnp.zeros((1, 1, self.frontend.mel_bins)))
                ConvBlock(self.widths[0], dtype=self.dtype, name="conv_block1")(
                    jnp.zeros((1, 2, 2, 1), self.dtype)
                )

            layers.init_only(self, unused_stem)

        x = nn.Dropout(self.trunk_dropout)(x, deterministic=not train)
        for i, width in enumerate(self.widths[1:], start=2):
            pool = (2, 2) if i < len(self.widths) else (1, 1)
            x = ConvBlock(width, pool_size=pool, dtype=self.dtype, name=f"conv_block{i}")(x, train)
            x = nn.Dropout(self.trunk_dropout)(x, deterministic=not train)
        x = jnp.mean(x, axis=2)  # Mean over frequency -> (B, t, C).
        return layers.clip_head(self, x, train=train, outputs=outputs)


# Registered names -> keyword arguments of ``Wavegram``.
MODELS = {
    "Wavegram_Cnn14": dict(use_logmel=False),
    "Wavegram_Logmel_Cnn14": dict(use_logmel=True),
    "Wavegram_Logmel128_Cnn14": dict(
        use_logmel=True, wavegram_bins=64, frontend=fe.FrontendConfig(mel_bins=128)
    ),
}
