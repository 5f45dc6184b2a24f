"""Plain PyTorch baselines of every family: Cnn14/Cnn6, ResNet22/38/54, MobileNetV1/V2,
LeeNet11/24, DaiNet19, Res1dNet31/51, Wavegram(_Logmel)_Cnn14 (benchmarks/inference.py and
benchmarks/train_step.py time them against panns_jax).

Written from the behavioural spec (golden/ARCHITECTURES.md §1-7), with the
original state_dict key names, so ``panns_jax.convert.to_state_dict`` output loads
with ``load_state_dict(strict=True)``. In training mode they draw the original's dropouts and
SpecAugment stripes (TRAINING.md §4.2), so that a timed train step does the original's
work. The front end is ``torch.stft`` (centred, reflect padding, periodic Hann) and the
Slaney mel matrix of ``panns_jax.frontend.mel_filterbank``; the original's DFT-as-conv
kernels are kept as (unused) buffers only so that checkpoints load strictly.

    python benchmarks/torch_baselines.py --check   # compare with the golden outputs
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Dict

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from panns_jax import frontend as fe


class _Stft(nn.Module):
    """Holds ``stft.conv_real/conv_imag.weight`` for strict loading; forward uses torch.stft."""

    def __init__(self, n_fft: int):
        super().__init__()
        self.conv_real = nn.Conv1d(1, n_fft // 2 + 1, n_fft, bias=False)
        self.conv_imag = nn.Conv1d(1, n_fft // 2 + 1, n_fft, bias=False)
        for conv in (self.conv_real, self.conv_imag):
            conv.weight.requires_grad_(False)


class _SpectrogramExtractor(nn.Module):
    def __init__(self, n_fft: int):
        super().__init__()
        self.stft = _Stft(n_fft)


class _LogmelExtractor(nn.Module):
    def __init__(self, config: fe.FrontendConfig):
        super().__init__()
        mel = fe.mel_filterbank(
            config.sample_rate, config.window_size, config.mel_bins, config.fmin, config.fmax
        )
        self.melW = nn.Parameter(torch.from_numpy(np.array(mel)), requires_grad=False)


class LogmelStem(nn.Module):
    """waveform (B, L) -> bn0(log-mel) as an image (B, 1, T, F)."""

    def __init__(self, config: fe.FrontendConfig = fe.FrontendConfig()):
        super().__init__()
        self.config = config
        self.spectrogram_extractor = _SpectrogramExtractor(config.window_size)
        self.logmel_extractor = _LogmelExtractor(config)
        window = torch.from_numpy(np.array(fe.hann_window(config.window_size)))
        self.register_buffer("window", window, persistent=False)
        self.bn0 = nn.BatchNorm2d(config.mel_bins)

    def logmel(self, waveform: torch.Tensor) -> torch.Tensor:
        spec = torch.stft(
            waveform,
            self.config.window_size,
            self.config.hop_size,
            window=self.window,
            center=True,
            pad_mode="reflect",
            return_complex=True,
        )  # (B, n_freq, T)
        power = spec.real**2 + spec.imag**2
        mel = torch.matmul(power.transpose(1, 2), self.logmel_extractor.melW)  # (B, T, F)
        return 10.0 * torch.log10(torch.clamp(mel, min=fe.LOG_FLOOR))

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        x = self.logmel(waveform)[:, None]  # (B, 1, T, F)
        x = x.transpose(1, 3)  # bn0 normalises per mel bin.
        x = self.bn0(x).transpose(1, 3)
        return _spec_augment(x) if self.training else x


def _spec_augment(x: torch.Tensor, time_width: int = 64, freq_width: int = 8) -> torch.Tensor:
    """SpecAugment as the original trains with it (TRAINING.md §4.2): per example, two time
    stripes then two frequency stripes, each of width 0..max-1 at a start that keeps it
    inside the axis, set to exactly 0."""
    mask = torch.ones(x.shape[0], 1, x.shape[2], x.shape[3], dtype=x.dtype)
    for axis, max_width in ((2, time_width), (3, freq_width)):
        size = x.shape[axis]
        for n in range(x.shape[0]):
            for _ in range(2):
                width = int(torch.randint(0, max_width, (1,)))
                start = int(torch.randint(0, size - width, (1,)))
                mask[n].narrow(axis - 1, start, width).zero_()
    return x * mask


def _dropout(module: nn.Module, x: torch.Tensor, p: float) -> torch.Tensor:
    """The original's ``F.dropout(x, p, training=self.training)``."""
    return F.dropout(x, p, module.training) if p else x


class ConvBlock(nn.Module):
    """Two 3x3 conv-BN-ReLU, or one 5x5 (Cnn6), then an average pool."""

    def __init__(self, cin: int, cout: int, kernel: int = 3):
        super().__init__()
        pad = kernel // 2
        self.conv1 = nn.Conv2d(cin, cout, kernel, padding=pad, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.two = kernel == 3
        if self.two:
            self.conv2 = nn.Conv2d(cout, cout, kernel, padding=pad, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor, pool) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        if self.two:
            x = F.relu(self.bn2(self.conv2(x)))
        return F.avg_pool2d(x, pool) if pool not in (1, (1, 1)) else x


def _clip_head(model: nn.Module, x: torch.Tensor, dropout: float = 0.5) -> Dict[str, torch.Tensor]:
    """[mean over freq] -> max_t + mean_t -> dropout -> fc1 + ReLU -> h;
    (embedding = dropout 0.5 of h, sigmoid(fc_audioset(h))).

    ``x`` is (B, C, T, F) for the 2-D models and (B, C, T) for the 1-D ones; the dropouts act
    in training mode only (MobileNetV2 has none before fc1)."""
    if x.dim() == 4:
        x = x.mean(dim=3)
    x = x.max(dim=2).values + x.mean(dim=2)
    h = F.relu(model.fc1(_dropout(model, x, dropout)))
    return {
        "clipwise_output": torch.sigmoid(model.fc_audioset(h)),
        "embedding": _dropout(model, h, 0.5),
    }


class Cnn(LogmelStem):
    """Cnn14 (3x3 blocks, 6 widths, last unpooled) and Cnn6 (5x5 blocks, 4 widths)."""

    def __init__(
        self,
        widths=(64, 128, 256, 512, 1024, 2048),
        kernel: int = 3,
        embedding: int = 2048,
        num_classes: int = 527,
    ):
        super().__init__()
        self.pools = [2] * 5 + [1] if len(widths) == 6 else [2] * len(widths)
        cin = 1
        for i, width in enumerate(widths, start=1):
            setattr(self, f"conv_block{i}", ConvBlock(cin, width, kernel))
            cin = width
        self.num_blocks = len(widths)
        self.fc1 = nn.Linear(cin, embedding)
        self.fc_audioset = nn.Linear(embedding, num_classes)

    def forward(self, waveform: torch.Tensor) -> Dict[str, torch.Tensor]:
        x = super().forward(waveform)
        for i in range(1, self.num_blocks + 1):
            x = _dropout(self, getattr(self, f"conv_block{i}")(x, self.pools[i - 1]), 0.2)
        return _clip_head(self, x)


def _conv_pool_bn(cin: int, cout: int, stride: int, groups: int = 1) -> list:
    # MobileNet downsampling: stride-1 conv -> avg pool s -> BN (pool slot kept when s = 1).
    return [
        nn.Conv2d(cin, cout, 3, padding=1, groups=groups, bias=False),
        nn.AvgPool2d(stride) if stride > 1 else nn.Identity(),
        nn.BatchNorm2d(cout),
        nn.ReLU(),
    ]


class MobileNetV1(LogmelStem):
    def __init__(self, num_classes: int = 527):
        super().__init__()
        layers = [nn.Sequential(*_conv_pool_bn(1, 32, 2))]
        dw = (
            [(32, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2), (256, 256, 1), (256, 512, 2)]
            + [(512, 512, 1)] * 5
            + [(512, 1024, 2), (1024, 1024, 1)]
        )
        for cin, cout, s in dw:
            layers.append(
                nn.Sequential(
                    *_conv_pool_bn(cin, cin, s, groups=cin),
                    nn.Conv2d(cin, cout, 1, bias=False),
                    nn.BatchNorm2d(cout),
                    nn.ReLU(),
                )
            )
        self.features = nn.Sequential(*layers)
        self.fc1 = nn.Linear(1024, 1024)
        self.fc_audioset = nn.Linear(1024, num_classes)

    def forward(self, waveform: torch.Tensor) -> Dict[str, torch.Tensor]:
        return _clip_head(self, self.features(super().forward(waveform)))


class _InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, t: int):
        super().__init__()
        hidden = round(cin * t)
        expand = (
            []
            if t == 1
            else [nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()]
        )
        dw = _conv_pool_bn(hidden, hidden, stride, groups=hidden)
        dw[-1] = nn.ReLU6()
        self.conv = nn.Sequential(
            *expand, *dw, nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)
        )
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileNetV2(LogmelStem):
    def __init__(self, num_classes: int = 527):
        super().__init__()
        first = _conv_pool_bn(1, 32, 2)
        first[-1] = nn.ReLU6()
        layers = [nn.Sequential(*first)]
        cin = 32
        for t, c, n, s in [
            (1, 16, 1, 1),
            (6, 24, 2, 2),
            (6, 32, 3, 2),
            (6, 64, 4, 2),
            (6, 96, 3, 2),
            (6, 160, 3, 1),
            (6, 320, 1, 1),
        ]:
            for r in range(n):
                layers.append(_InvertedResidual(cin, c, s if r == 0 else 1, t))
                cin = c
        layers.append(
            nn.Sequential(nn.Conv2d(cin, 1280, 1, bias=False), nn.BatchNorm2d(1280), nn.ReLU6())
        )
        self.features = nn.Sequential(*layers)
        self.fc1 = nn.Linear(1280, 1024)
        self.fc_audioset = nn.Linear(1024, num_classes)

    def forward(self, waveform: torch.Tensor) -> Dict[str, torch.Tensor]:
        return _clip_head(self, self.features(super().forward(waveform)), dropout=0.0)


class _BasicBlock(nn.Module):
    """[avg 2x2] -> conv3x3-BN-ReLU -> conv3x3-BN, + shortcut, ReLU (ARCHITECTURES.md §4)."""

    expansion = 1

    def __init__(self, cin: int, width: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv1 = nn.Conv2d(cin, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.downsample = _downsample(cin, width, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.avg_pool2d(x, 2) if self.stride == 2 else x
        out = _dropout(self, F.relu(self.bn1(self.conv1(out))), 0.1)
        out = self.bn2(self.conv2(out))
        return F.relu(out + (self.downsample(x) if self.downsample is not None else x))


class _Bottleneck(nn.Module):
    """[avg 2x2] -> 1x1 -> 3x3 -> 1x1 (x4), + shortcut of the unpooled input, ReLU."""

    expansion = 4

    def __init__(self, cin: int, width: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, 4 * width, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(4 * width)
        self.downsample = _downsample(cin, 4 * width, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.avg_pool2d(x, 2) if self.stride == 2 else x
        out = F.relu(self.bn1(self.conv1(out)))
        out = _dropout(self, F.relu(self.bn2(self.conv2(out))), 0.1)
        out = self.bn3(self.conv3(out))
        return F.relu(out + (self.downsample(x) if self.downsample is not None else x))


def _downsample(cin: int, cout: int, stride: int):
    if stride == 2:
        return nn.Sequential(
            nn.AvgPool2d(2), nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout)
        )
    if cin != cout:
        return nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))
    return None


class ResNet(LogmelStem):
    def __init__(self, block=_BasicBlock, blocks=(2, 2, 2, 2), num_classes: int = 527):
        super().__init__()
        self.conv_block1 = ConvBlock(1, 64)
        self.resnet = nn.Module()
        cin = 64
        for i, (n, width) in enumerate(zip(blocks, (64, 128, 256, 512)), start=1):
            layer = []
            for j in range(n):
                layer.append(block(cin, width, 2 if i > 1 and j == 0 else 1))
                cin = width * block.expansion
            setattr(self.resnet, f"layer{i}", nn.Sequential(*layer))
        self.conv_block_after1 = ConvBlock(cin, 2048)
        self.fc1 = nn.Linear(2048, 2048)
        self.fc_audioset = nn.Linear(2048, num_classes)

    def forward(self, waveform: torch.Tensor) -> Dict[str, torch.Tensor]:
        x = _dropout(self, self.conv_block1(super().forward(waveform), 2), 0.2)
        for i in range(1, 5):
            x = getattr(self.resnet, f"layer{i}")(x)
        x = _dropout(self, F.avg_pool2d(x, 2), 0.2)
        x = _dropout(self, self.conv_block_after1(x, 1), 0.2)
        return _clip_head(self, x)


class _LeeNetBlock(nn.Module):
    """(conv1d k3 pad 1 -> BN -> ReLU) x 1 or 2, stride on the first -> [max-pool 3, pad 1]."""

    def __init__(self, cin: int, cout: int, stride: int, pool: bool, convs: int):
        super().__init__()
        self.pool, self.convs = pool, convs
        self.conv1 = nn.Conv1d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm1d(cout)
        if convs == 2:
            self.conv2 = nn.Conv1d(cout, cout, 3, padding=1, bias=False)
            self.bn2 = nn.BatchNorm1d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        if self.convs == 2:
            x = F.relu(self.bn2(self.conv2(x)))
        return F.max_pool1d(x, 3, padding=1) if self.pool else x


class LeeNet(nn.Module):
    def __init__(
        self,
        widths=(64, 64, 64, 128, 128, 128, 128, 128, 256),
        convs: int = 1,
        last_pool: bool = True,
        embedding: int = 512,
        trunk_dropout: float = 0.0,
        num_classes: int = 527,
    ):
        super().__init__()
        self.trunk_dropout = trunk_dropout
        cin = 1
        for i, width in enumerate(widths, start=1):
            pool = i > 1 and (i < len(widths) or last_pool)
            setattr(
                self, f"conv_block{i}", _LeeNetBlock(cin, width, 3 if i == 1 else 1, pool, convs)
            )
            cin = width
        self.num_blocks = len(widths)
        self.fc1 = nn.Linear(cin, embedding)
        self.fc_audioset = nn.Linear(embedding, num_classes)

    def forward(self, waveform: torch.Tensor) -> Dict[str, torch.Tensor]:
        x = waveform[:, None]
        for i in range(1, self.num_blocks + 1):
            x = getattr(self, f"conv_block{i}")(x)
            if self.trunk_dropout and i < self.num_blocks:
                x = _dropout(self, x, self.trunk_dropout)
        return _clip_head(self, x)


class _DaiNetBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        for i in range(1, 5):
            setattr(
                self, f"conv{i}", nn.Conv1d(cin if i == 1 else cout, cout, 3, padding=1, bias=False)
            )
            setattr(self, f"bn{i}", nn.BatchNorm1d(cout))
        self.downsample = nn.Conv1d(cin, cout, 1, bias=False)
        self.bn_downsample = nn.BatchNorm1d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        for i in range(1, 5):
            out = getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(out))
            out = F.relu(out) if i < 4 else out
        shortcut = x if x.shape == out.shape else self.bn_downsample(self.downsample(x))
        return F.relu(out + shortcut)


class DaiNet19(nn.Module):
    def __init__(self, num_classes: int = 527):
        super().__init__()
        self.conv0 = nn.Conv1d(1, 64, 80, stride=4, bias=False)
        self.bn0 = nn.BatchNorm1d(64)
        cin = 64
        for i, width in enumerate((64, 128, 256, 512), start=1):
            setattr(self, f"conv_block{i}", _DaiNetBlock(cin, width))
            cin = width
        self.fc1 = nn.Linear(512, 512)
        self.fc_audioset = nn.Linear(512, num_classes)

    def forward(self, waveform: torch.Tensor) -> Dict[str, torch.Tensor]:
        x = self.bn0(self.conv0(waveform[:, None]))
        for i in range(1, 5):
            x = getattr(self, f"conv_block{i}")(F.max_pool1d(x, 4) if i > 1 else x)
        return _clip_head(self, x)


class _BasicBlockWav1d(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv1 = nn.Conv1d(cin, cout, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm1d(cout)
        self.conv2 = nn.Conv1d(cout, cout, 3, padding=2, dilation=2, bias=False)
        self.bn2 = nn.BatchNorm1d(cout)
        if stride != 1:
            self.downsample = nn.Sequential(
                nn.AvgPool1d(stride), nn.Conv1d(cin, cout, 1, bias=False), nn.BatchNorm1d(cout)
            )
        else:
            self.downsample = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.max_pool1d(x, self.stride) if self.stride != 1 else x
        out = _dropout(self, F.relu(self.bn1(self.conv1(out))), 0.1)
        out = self.bn2(self.conv2(out))
        return F.relu(out + (self.downsample(x) if self.downsample is not None else x))


class Res1dNet(nn.Module):
    def __init__(self, blocks=(2, 2, 2, 2, 2, 2, 2), num_classes: int = 527):
        super().__init__()
        self.conv0 = nn.Conv1d(1, 64, 11, stride=5, padding=5, bias=False)
        self.bn0 = nn.BatchNorm1d(64)
        self.resnet = nn.Module()
        cin = 64
        for i, (n, width, stride) in enumerate(
            zip(blocks, (64, 128, 256, 512, 1024, 1024, 2048), (1, 4, 4, 4, 4, 4, 4)), start=1
        ):
            layer = []
            for j in range(n):
                layer.append(_BasicBlockWav1d(cin, width, stride if j == 0 else 1))
                cin = width
            setattr(self.resnet, f"layer{i}", nn.Sequential(*layer))
        self.fc1 = nn.Linear(2048, 2048)
        self.fc_audioset = nn.Linear(2048, num_classes)

    def forward(self, waveform: torch.Tensor) -> Dict[str, torch.Tensor]:
        x = self.bn0(self.conv0(waveform[:, None]))
        for i in range(1, 8):
            x = getattr(self.resnet, f"layer{i}")(x)
        return _clip_head(self, x)


class _ConvPreWavBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1 = nn.Conv1d(cin, cout, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm1d(cout)
        self.conv2 = nn.Conv1d(cout, cout, 3, padding=2, dilation=2, bias=False)
        self.bn2 = nn.BatchNorm1d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))
        return F.max_pool1d(x, 4)


class Wavegram(LogmelStem):
    """Wavegram encoder + Cnn14's blocks 2-6, with or without the log-mel branch (§7)."""

    def __init__(self, use_logmel: bool = True, num_classes: int = 527):
        super().__init__()
        self.use_logmel = use_logmel
        if not use_logmel:  # Wavegram_Cnn14 owns no STFT / mel buffers.
            del self.spectrogram_extractor, self.logmel_extractor
        self.pre_conv0 = nn.Conv1d(1, 64, 11, stride=5, padding=5, bias=False)
        self.pre_bn0 = nn.BatchNorm1d(64)
        self.pre_block1 = _ConvPreWavBlock(64, 64)
        self.pre_block2 = _ConvPreWavBlock(64, 128)
        self.pre_block3 = _ConvPreWavBlock(128, 128)
        self.pre_block4 = ConvBlock(4, 64)
        self.conv_block1 = ConvBlock(1, 64)
        cin = 128 if use_logmel else 64
        for i, width in enumerate((128, 256, 512, 1024, 2048), start=2):
            setattr(self, f"conv_block{i}", ConvBlock(cin, width))
            cin = width
        self.fc1 = nn.Linear(2048, 2048)
        self.fc_audioset = nn.Linear(2048, num_classes)

    def forward(self, waveform: torch.Tensor) -> Dict[str, torch.Tensor]:
        a = F.relu(self.pre_bn0(self.pre_conv0(waveform[:, None])))
        a = self.pre_block3(self.pre_block2(self.pre_block1(a)))  # (B, 128, t)
        a = a.reshape(a.shape[0], 4, 32, a.shape[-1]).transpose(2, 3)  # (B, 4, t, 32)
        x = self.pre_block4(a, (2, 1))
        if self.use_logmel:
            x = torch.cat([self.conv_block1(super().forward(waveform), 2), x], dim=1)
        x = _dropout(self, x, 0.2)
        for i in range(2, 7):
            x = _dropout(self, getattr(self, f"conv_block{i}")(x, 2 if i < 6 else 1), 0.2)
        return _clip_head(self, x)


BASELINES = {
    "Cnn14": lambda: Cnn(),
    "Cnn6": lambda: Cnn(widths=(64, 128, 256, 512), kernel=5, embedding=512),
    "ResNet22": lambda: ResNet(),
    "ResNet38": lambda: ResNet(blocks=(3, 4, 6, 3)),
    "ResNet54": lambda: ResNet(block=_Bottleneck, blocks=(3, 4, 6, 3)),
    "MobileNetV1": lambda: MobileNetV1(),
    "MobileNetV2": lambda: MobileNetV2(),
    "LeeNet11": lambda: LeeNet(),
    "LeeNet24": lambda: LeeNet(
        (64, 96, 128, 128, 256, 256, 512, 512, 1024),
        convs=2,
        last_pool=False,
        embedding=1024,
        trunk_dropout=0.1,
    ),
    "DaiNet19": lambda: DaiNet19(),
    "Res1dNet31": lambda: Res1dNet(),
    "Res1dNet51": lambda: Res1dNet(blocks=(2, 3, 4, 6, 4, 3, 2)),
    "Wavegram_Cnn14": lambda: Wavegram(use_logmel=False),
    "Wavegram_Logmel_Cnn14": lambda: Wavegram(use_logmel=True),
}


def build(name: str, state_dict: Dict[str, np.ndarray]) -> nn.Module:
    """The baseline ``name`` in eval mode with ``state_dict`` loaded strictly."""
    model = BASELINES[name]()
    model.load_state_dict(
        {k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()}, strict=True
    )
    return model.eval()


def check(golden_dir: str, names=None) -> bool:
    """Golden recipe weights -> panns_jax -> to_state_dict -> baseline; compare with golden."""
    import importlib.util

    from panns_jax import convert, models, tolerance

    spec = importlib.util.spec_from_file_location(
        "golden_recipe", os.path.join(golden_dir, "recipe.py")
    )
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    inputs = np.load(os.path.join(golden_dir, "inputs.npz"))
    ok = True
    for name in names or BASELINES:
        model = models.get(name)
        variables = convert.from_state_dict(recipe.load_state(golden_dir, name), model, name=name)
        baseline = build(name, convert.to_state_dict(variables, model))
        golden = np.load(os.path.join(golden_dir, "outputs", f"{name}.npz"))
        for case in ("batch", "odd"):
            if f"{case}/clipwise_output" not in golden:
                continue
            with torch.inference_mode():
                out = baseline(torch.from_numpy(inputs[case]))
            for key in ("clipwise_output", "embedding"):
                # The golden rule (panns_jax.tolerance): 5e-4 absolute for probabilities,
                # 5e-4 * max|ref| for embeddings.
                problem, err, bound = tolerance.check(
                    key, out[key].numpy(), golden[f"{case}/{key}"]
                )
                ok &= not problem
                print(
                    f"{name:22s} {case:5s} {key:16s} max error {err:.2e} (bound {bound:.2e})"
                    f" {'FAIL ' + problem if problem else 'ok'}"
                )
    return ok


def default_golden_dir() -> str:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    shared = os.environ.get("PANNS_JAX_SHARED", os.path.join(os.path.dirname(root), "shared"))
    return os.path.join(shared, "golden")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the golden outputs")
    parser.add_argument("--golden", default=default_golden_dir())
    parser.add_argument(
        "--models",
        nargs="+",
        default=None,
        choices=sorted(BASELINES),
        help="check only these (default: every baseline)",
    )
    args = parser.parse_args()
    if args.check:
        sys.exit(0 if check(args.golden, args.models) else 1)
    parser.print_help()
