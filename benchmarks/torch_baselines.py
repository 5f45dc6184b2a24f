"""Plain PyTorch Cnn14, Cnn6 and MobileNetV1: the baselines of benchmarks/inference.py.

Written from the behavioural spec (golden/ARCHITECTURES.md §1-3, §5), with the
original state_dict key names, so ``panns_jax.convert.to_state_dict`` output loads
with ``load_state_dict(strict=True)``. The front end is ``torch.stft`` (centred,
reflect padding, periodic Hann) and the Slaney mel matrix of
``panns_jax.frontend.mel_filterbank``; the original's DFT-as-conv kernels are kept
as (unused) buffers only so that checkpoints load strictly.

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
        mel = fe.mel_filterbank(config.sample_rate, config.window_size, config.mel_bins,
                                config.fmin, config.fmax)
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
        spec = torch.stft(waveform, self.config.window_size, self.config.hop_size,
                          window=self.window, center=True, pad_mode="reflect",
                          return_complex=True)  # (B, n_freq, T)
        power = spec.real ** 2 + spec.imag ** 2
        mel = torch.matmul(power.transpose(1, 2), self.logmel_extractor.melW)  # (B, T, F)
        return 10.0 * torch.log10(torch.clamp(mel, min=fe.LOG_FLOOR))

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        x = self.logmel(waveform)[:, None]  # (B, 1, T, F)
        x = x.transpose(1, 3)  # bn0 normalises per mel bin.
        x = self.bn0(x)
        return x.transpose(1, 3)


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

    def forward(self, x: torch.Tensor, pool: int) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        if self.two:
            x = F.relu(self.bn2(self.conv2(x)))
        return F.avg_pool2d(x, pool) if pool > 1 else x


def _clip_head(model: nn.Module, x: torch.Tensor) -> Dict[str, torch.Tensor]:
    """mean over freq -> max_t + mean_t -> fc1 + ReLU -> (embedding, sigmoid(fc_audioset))."""
    x = x.mean(dim=3)
    x = x.max(dim=2).values + x.mean(dim=2)
    h = F.relu(model.fc1(x))
    return {"clipwise_output": torch.sigmoid(model.fc_audioset(h)), "embedding": h}


class Cnn(LogmelStem):
    """Cnn14 (3x3 blocks, 6 widths, last unpooled) and Cnn6 (5x5 blocks, 4 widths)."""

    def __init__(self, widths=(64, 128, 256, 512, 1024, 2048), kernel: int = 3,
                 embedding: int = 2048, num_classes: int = 527):
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
            x = getattr(self, f"conv_block{i}")(x, self.pools[i - 1])
        return _clip_head(self, x)


def _conv_pool_bn(cin: int, cout: int, stride: int, groups: int = 1) -> list:
    # MobileNet downsampling: stride-1 conv -> avg pool s -> BN (pool slot kept when s = 1).
    return [nn.Conv2d(cin, cout, 3, padding=1, groups=groups, bias=False),
            nn.AvgPool2d(stride) if stride > 1 else nn.Identity(),
            nn.BatchNorm2d(cout), nn.ReLU()]


class MobileNetV1(LogmelStem):
    def __init__(self, num_classes: int = 527):
        super().__init__()
        layers = [nn.Sequential(*_conv_pool_bn(1, 32, 2))]
        dw = [(32, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2), (256, 256, 1),
              (256, 512, 2)] + [(512, 512, 1)] * 5 + [(512, 1024, 2), (1024, 1024, 1)]
        for cin, cout, s in dw:
            layers.append(nn.Sequential(*_conv_pool_bn(cin, cin, s, groups=cin),
                                        nn.Conv2d(cin, cout, 1, bias=False),
                                        nn.BatchNorm2d(cout), nn.ReLU()))
        self.features = nn.Sequential(*layers)
        self.fc1 = nn.Linear(1024, 1024)
        self.fc_audioset = nn.Linear(1024, num_classes)

    def forward(self, waveform: torch.Tensor) -> Dict[str, torch.Tensor]:
        return _clip_head(self, self.features(super().forward(waveform)))


BASELINES = {
    "Cnn14": lambda: Cnn(),
    "Cnn6": lambda: Cnn(widths=(64, 128, 256, 512), kernel=5, embedding=512),
    "MobileNetV1": lambda: MobileNetV1(),
}


def build(name: str, state_dict: Dict[str, np.ndarray]) -> nn.Module:
    """The baseline ``name`` in eval mode with ``state_dict`` loaded strictly."""
    model = BASELINES[name]()
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()},
                          strict=True)
    return model.eval()


def check(golden_dir: str) -> bool:
    """Golden recipe weights -> panns_jax -> to_state_dict -> baseline; compare with golden."""
    import importlib.util

    from panns_jax import convert, models

    spec = importlib.util.spec_from_file_location("golden_recipe",
                                                  os.path.join(golden_dir, "recipe.py"))
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    inputs = np.load(os.path.join(golden_dir, "inputs.npz"))
    ok = True
    for name in BASELINES:
        model = models.get(name)
        variables = convert.from_state_dict(recipe.load_state(golden_dir, name), model, name=name)
        baseline = build(name, convert.to_state_dict(variables, model))
        golden = np.load(os.path.join(golden_dir, "outputs", f"{name}.npz"))
        for case in ("batch", "odd"):
            with torch.inference_mode():
                out = baseline(torch.from_numpy(inputs[case]))
            for key, bound in (("clipwise_output", 5e-4), ("embedding", None)):
                ref = golden[f"{case}/{key}"]
                bound = bound or 5e-4 * float(np.abs(ref).max())
                err = float(np.abs(out[key].numpy() - ref).max())
                ok &= err <= bound
                print(f"{name:12s} {case:5s} {key:16s} max error {err:.2e} (bound {bound:.2e})"
                      f" {'ok' if err <= bound else 'FAIL'}")
    return ok


def default_golden_dir() -> str:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    shared = os.environ.get("PANNS_JAX_SHARED", os.path.join(os.path.dirname(root), "shared"))
    return os.path.join(shared, "golden")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the golden outputs")
    parser.add_argument("--golden", default=default_golden_dir())
    args = parser.parse_args()
    if args.check:
        sys.exit(0 if check(args.golden) else 1)
    parser.print_help()
