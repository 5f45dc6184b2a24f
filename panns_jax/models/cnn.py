"""The plain CNN family: Cnn6, Cnn10, Cnn14 and all Cnn14 ablations of the paper.

One module covers them all. It is configured by its block widths and kernel, embedding
size, front end, mixup point, SpecAugment and head (clip-level, or decision-level
max/avg/attention). Kong et al. 2020, Sec. III-B/C and Tables II-III; Sec. V for the
ablations.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from panns_jax import frontend as fe
from panns_jax.models import layers
from panns_jax.models.layers import BatchNorm, ConvBlock, Dtype

HEADS = ("clip", "decision_max", "decision_avg", "decision_att")


class Cnn(layers.LogmelNetwork):
    """Log-mel CNN: stem -> ConvBlocks (avg 2x2 pools, dropout 0.2) -> head.

    Attributes:
      widths: output channels of conv_block1..N.
      pool_sizes: pool of each block; Cnn14's last block has (1, 1).
      kernel_size: 3 (two 3x3 convs per block) or 5 (one 5x5 conv, Cnn6).
      embedding_size: fc1 width (Cnn14 ablation: 32/128/512/2048).
      head: 'clip' or a decision-level head for SED ('decision_max', 'decision_avg',
        'decision_att').
      mixup_domain: 'logmel' (after bn0 + SpecAugment) or 'waveform' (before the
        front end, Cnn14_mixup_time_domain).
      spec_augment / trunk_dropout: the paper's regularisation ablations.
    """

    widths: Sequence[int] = (64, 128, 256, 512, 1024, 2048)
    pool_sizes: Sequence[Tuple[int, int]] = ((2, 2),) * 5 + ((1, 1),)
    kernel_size: int = 3
    head: str = "clip"
    mixup_domain: str = "logmel"
    trunk_dropout: float = 0.2

    @property
    def declared_outputs(self) -> layers.Outputs:
        """What apply returns (``models.outputs``).

        A decision-level head adds a framewise output and embeds each segment.
        """
        return layers.CLIP_OUTPUTS if self.head == "clip" else layers.DECISION_LEVEL_OUTPUTS

    @nn.compact
    def __call__(
        self, waveform: jax.Array, train: bool = False, mixup_lambda: Optional[jax.Array] = None
    ) -> dict:
        layers.check_choice("head", self.head, HEADS)
        if train and mixup_lambda is not None and self.mixup_domain == "waveform":
            waveform = fe.mixup(waveform, mixup_lambda)
        x, outputs = layers.logmel_stem(
            self,
            waveform,
            train=train,
            mixup_lambda=mixup_lambda,
            apply_mixup=self.mixup_domain == "logmel",
        )
        num_frames = outputs["logmel"].shape[1]

        for i, (width, pool) in enumerate(zip(self.widths, self.pool_sizes), start=1):
            x = ConvBlock(
                width,
                pool_size=pool,
                kernel_size=self.kernel_size,
                dtype=self.dtype,
                name=f"conv_block{i}",
            )(x, train)
            x = nn.Dropout(self.trunk_dropout)(
                x, deterministic=not train or self.trunk_dropout == 0
            )

        x = jnp.mean(x, axis=2)  # Mean over frequency -> (B, t, C).
        if self.head == "clip":
            return layers.clip_head(self, x, train=train, outputs=outputs)
        ratio = 1  # Frames per segment: the product of the time pools (32 for Cnn14).
        for pool in self.pool_sizes:
            ratio *= pool[0]
        return self._decision_level_head(x, num_frames, ratio, train, outputs)

    def _decision_level_head(
        self, x: jax.Array, num_frames: int, ratio: int, train: bool, outputs: dict
    ) -> dict:
        """Segment-wise classifier + pooling over time (Kong et al. 2020, Sec. VI SED).

        The segments are smoothed over time as in the original, by max-pool(3, 1, pad 1)
        plus avg-pool(3, 1, pad 1), where the average counts the zero padding (edge
        divisor 3).
        """
        max_smooth = nn.max_pool(x, (3,), strides=(1,), padding=((1, 1),))
        avg_smooth = nn.avg_pool(x, (3,), strides=(1,), padding=((1, 1),), count_include_pad=True)
        x = max_smooth + avg_smooth
        outputs["fc1_input"] = x.astype(jnp.float32)
        x = nn.Dropout(0.5)(x, deterministic=not train)
        x = nn.relu(nn.Dense(self.embedding_size, dtype=self.dtype, name="fc1")(x))
        outputs["segmentwise_embedding"] = x.astype(jnp.float32)
        x = nn.Dropout(0.5)(x, deterministic=not train)

        if self.head == "decision_att":
            att_block = AttentionBlock(
                self.num_classes, dtype=self.dtype, name=layers.ATTENTION_CLASSIFIER
            )
            outputs.update(att_block(x))
        else:
            logits = nn.Dense(self.num_classes, dtype=self.dtype, name=layers.CLASSIFIER)(x)
            logits = logits.astype(jnp.float32)
            segmentwise = jax.nn.sigmoid(logits)
            outputs["segmentwise_logits"] = logits
            outputs["segmentwise_output"] = segmentwise
            if self.head == "decision_max":
                outputs["clipwise_logits"] = jnp.max(logits, axis=1)
                outputs["logits"] = outputs["clipwise_logits"]
                outputs["clipwise_output"] = jnp.max(segmentwise, axis=1)
            else:
                outputs["clipwise_output"] = jnp.mean(segmentwise, axis=1)
        outputs["framewise_output"] = layers.frames_to_framewise(
            outputs["segmentwise_output"], num_frames, ratio
        )
        return outputs


class AttentionBlock(nn.Module):
    """Attention pooling of Cnn14_DecisionLevelAtt (``att_block``).

    ``att`` and ``cla`` are 1x1 Conv1d with bias. The attention is the softmax over time
    of clamp(att, -10, 10), and the clip output sum_t attention * sigmoid(cla).
    ``bn_att`` exists in the original but is never used. It is created so that
    checkpoints round-trip.
    """

    num_classes: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> dict:
        att_logits = layers.conv1d(self.num_classes, 1, "att", self.dtype, use_bias=True)(x)
        cla_logits = layers.conv1d(self.num_classes, 1, "cla", self.dtype, use_bias=True)(x)
        att_logits = att_logits.astype(jnp.float32)
        cla_logits = cla_logits.astype(jnp.float32)
        layers.init_only(self, lambda: BatchNorm(name="bn_att")(att_logits))
        attention = jax.nn.softmax(jnp.clip(att_logits, -10, 10), axis=1)
        segmentwise = jax.nn.sigmoid(cla_logits)
        return {
            "att_logits": att_logits,
            "cla_logits": cla_logits,
            "attention": attention,
            "segmentwise_output": segmentwise,
            "clipwise_output": jnp.sum(attention * segmentwise, axis=1),
        }


_CNN14 = dict(widths=(64, 128, 256, 512, 1024, 2048), pool_sizes=((2, 2),) * 5 + ((1, 1),))
_CNN10 = dict(widths=(64, 128, 256, 512), pool_sizes=((2, 2),) * 4, embedding_size=512)


def _frontend(**kwargs) -> fe.FrontendConfig:
    return fe.FrontendConfig(**kwargs)


# Registered names -> keyword arguments of ``Cnn`` (merged into panns_jax.models.REGISTRY).
MODELS = {
    "Cnn6": dict(_CNN10, kernel_size=5),
    "Cnn10": dict(_CNN10),
    "Cnn14": dict(_CNN14),
    "Cnn14_no_specaug": dict(_CNN14, spec_augment=False),
    "Cnn14_no_dropout": dict(_CNN14, trunk_dropout=0.0),
    "Cnn14_emb512": dict(_CNN14, embedding_size=512),
    "Cnn14_emb128": dict(_CNN14, embedding_size=128),
    "Cnn14_emb32": dict(_CNN14, embedding_size=32),
    "Cnn14_mixup_time_domain": dict(_CNN14, mixup_domain="waveform"),
    # Paper Sec. V-D: 16 kHz / 8 kHz with the window and hop scaled to keep 1001 frames.
    "Cnn14_16k": dict(
        _CNN14, frontend=_frontend(sample_rate=16000, window_size=512, hop_size=160, fmax=8000)
    ),
    "Cnn14_8k": dict(
        _CNN14, frontend=_frontend(sample_rate=8000, window_size=256, hop_size=80, fmax=4000)
    ),
    "Cnn14_mel32": dict(_CNN14, frontend=_frontend(mel_bins=32)),
    "Cnn14_mel128": dict(_CNN14, frontend=_frontend(mel_bins=128)),
    "Cnn14_DecisionLevelMax": dict(_CNN14, head="decision_max"),
    "Cnn14_DecisionLevelAvg": dict(_CNN14, head="decision_avg"),
    "Cnn14_DecisionLevelAtt": dict(_CNN14, head="decision_att"),
}
