"""`panns_demo`: a small synthetic multi-label tagging set, generated locally.

Ten procedurally synthesised sound classes with distinct log-mel signatures
(steady lines at different heights, sweeps, broadband bursts, impulse trains,
harmonic stacks, modulations, low/high band noise), mixed 1-3 per clip. It
stands in for AudioSet in the README's demo job: no download, trains a small
CNN in minutes on a laptop CPU. Everything is a function of (seed, split, clip
number), so two builds are bit-identical.

By default there are 400 train and 100 eval clips of 2 s at 32 kHz. The clip length is
a config field, shorter than AudioSet's 10 s so that the demo is quick.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List

import numpy as np
import tensorflow_datasets as tfds

from panns_jax.data import audio_io, common

CLASS_NAMES = (
    "low_tone",  # steady sine 250-500 Hz
    "high_tone",  # steady sine 2.5-5 kHz
    "chirp",  # exponential up-sweep 300 Hz -> 6-10 kHz, repeated
    "noise_burst",  # broadband white-noise bursts of 50-200 ms
    "click_train",  # impulse train at 6-20 clicks/s
    "harmonic_note",  # 8-harmonic note, f0 120-400 Hz, plucked envelope
    "am_tone",  # 0.8-1.6 kHz tone, amplitude-modulated at 4-10 Hz
    "rumble",  # noise below 200 Hz
    "hiss",  # noise above 7 kHz
    "siren",  # tone sweeping sinusoidally around 1.5-3 kHz
)


def _band_noise(rng: np.random.Generator, n: int, sr: int, lo: float, hi: float) -> np.ndarray:
    spec = np.fft.rfft(rng.standard_normal(n))
    freqs = np.fft.rfftfreq(n, 1.0 / sr)
    spec[(freqs < lo) | (freqs > hi)] = 0
    x = np.fft.irfft(spec, n)
    return x / (np.abs(x).max() + 1e-9)


def _synth(name: str, rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    """One event of class `name`, `n` samples long, peak ~1."""
    t = np.arange(n) / sr
    if name == "low_tone":
        return np.sin(2 * np.pi * rng.uniform(250, 500) * t + rng.uniform(0, 6.3))
    if name == "high_tone":
        return np.sin(2 * np.pi * rng.uniform(2500, 5000) * t)
    if name == "chirp":
        period = rng.uniform(0.3, 0.6)
        f0, f1 = 300.0, rng.uniform(6000, 10000)
        tau = np.mod(t, period) / period
        inst_f = f0 * (f1 / f0) ** tau
        return np.sin(2 * np.pi * np.cumsum(inst_f) / sr)
    if name == "noise_burst":
        x = np.zeros(n)
        start = 0
        while start < n:
            length = int(rng.uniform(0.05, 0.2) * sr)
            x[start : start + length] = rng.uniform(-1, 1, len(x[start : start + length]))
            start += length + int(rng.uniform(0.1, 0.3) * sr)
        return x
    if name == "click_train":
        x = np.zeros(n)
        step = int(sr / rng.uniform(6, 20))
        for s in range(int(rng.integers(0, step)), n, step):
            x[s : s + 32] += np.exp(-np.arange(len(x[s : s + 32])) / 4.0)
        return x
    if name == "harmonic_note":
        f0 = rng.uniform(120, 400)
        note = sum(np.sin(2 * np.pi * k * f0 * t) / k for k in range(1, 9))
        period = rng.uniform(0.3, 0.7)
        return note * np.exp(-np.mod(t, period) * 8.0) / 2.0
    if name == "am_tone":
        carrier = np.sin(2 * np.pi * rng.uniform(800, 1600) * t)
        return carrier * (0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(4, 10) * t))
    if name == "rumble":
        return _band_noise(rng, n, sr, 30, 200)
    if name == "hiss":
        return _band_noise(rng, n, sr, 7000, min(14000, sr / 2))
    if name == "siren":
        fc = rng.uniform(1500, 3000)
        inst_f = fc + 0.3 * fc * np.sin(2 * np.pi * rng.uniform(0.5, 2) * t)
        return np.sin(2 * np.pi * np.cumsum(inst_f) / sr)
    raise ValueError(name)


def synthesize_clip(
    seed: int, split_id: int, index: int, sample_rate: int, clip_samples: int
) -> Dict[str, np.ndarray]:
    """Deterministic clip `index` of a split: float32 audio and label ids."""
    rng = np.random.default_rng([seed, split_id, index])
    num = int(rng.choice([1, 2, 3], p=[0.5, 0.3, 0.2]))
    labels = np.sort(rng.choice(len(CLASS_NAMES), num, replace=False))
    mix = 0.003 * rng.standard_normal(clip_samples)  # faint background
    for c in labels:
        # Events cover 50-100% of the clip so every label is clearly audible.
        length = int(clip_samples * rng.uniform(0.5, 1.0))
        start = int(rng.integers(0, clip_samples - length + 1))
        event = _synth(CLASS_NAMES[c], rng, length, sample_rate)
        ramp = min(256, length // 4)
        env = np.ones(length)
        env[:ramp] = np.linspace(0, 1, ramp)
        env[length - ramp :] = np.linspace(1, 0, ramp)
        mix[start : start + length] += event * env * 10 ** (rng.uniform(-16, -4) / 20)
    peak = np.abs(mix).max()
    if peak > 0.9:  # keep headroom; never clips
        mix *= 0.9 / peak
    return {"audio": mix.astype(np.float32), "labels": labels.astype(np.int64)}


@dataclasses.dataclass
class PannsDemoConfig(common.AudioConfig):
    clip_seconds: float = 2.0
    num_train: int = 400
    num_eval: int = 100
    seed: int = 0


class PannsDemo(common.PannsBuilder):
    """Synthetic 10-class multi-label tagging set (no download)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [
        PannsDemoConfig(name="default", description="2 s clips at 32 kHz."),
        PannsDemoConfig(
            name="10s", clip_seconds=10.0, description="10 s clips at 32 kHz (AudioSet-sized)."
        ),
    ]

    def _info_kwargs(self):
        return self._tagging_info(CLASS_NAMES)

    def _split_generators(self, dl_manager):
        del dl_manager
        cfg = self.builder_config
        return {
            "train": self._generate_examples("train", self._candidates(0, cfg.num_train)),
            "eval": self._generate_examples("eval", self._candidates(1, cfg.num_eval)),
        }

    def _candidates(self, split_id: int, count: int) -> List[common.Candidate]:
        cfg = self.builder_config

        def make(i: int) -> Callable[[], Dict[str, object]]:
            def fn():
                clip = synthesize_clip(cfg.seed, split_id, i, self.sample_rate, self.clip_samples)
                return {
                    "audio": audio_io.float_to_int16(clip["audio"]),
                    "labels": clip["labels"],
                    "audio_id": f"demo{split_id}_{i:05d}",
                }

            return fn

        return [(f"demo{split_id}_{i:05d}", make(i)) for i in range(count)]
