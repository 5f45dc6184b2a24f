"""Small own-data layouts written by the tests: a folder per class of synthetic sounds (sines
of different pitch vs noise; mixed sample rates, a stereo file, FLAC) and manifests."""

from __future__ import annotations

import csv
import os
from typing import Dict, List, Sequence

import numpy as np

CLASSES = ("high_tone", "low_tone", "noise")  # Sorted, as the folder layout names them.
RATES = (32000, 16000, 44100, 48000)


def sound(kind: str, rng: np.random.Generator, seconds: float, rate: int) -> np.ndarray:
    """A clip of ``kind``: a sine of a random pitch in its band, or white noise, plus a
    little noise, at a random level."""
    t = np.arange(int(seconds * rate)) / rate
    if kind == "noise":
        x = rng.standard_normal(t.size) * 0.2
    else:
        low, high = (2500.0, 5000.0) if kind == "high_tone" else (200.0, 500.0)
        x = 0.4 * np.sin(2 * np.pi * rng.uniform(low, high) * t + rng.uniform(0, 6.3))
        x += 0.005 * rng.standard_normal(t.size)
    return (x * 10 ** (rng.uniform(-12, 0) / 20)).astype(np.float32)


def write_audio(path: str, samples: np.ndarray, rate: int) -> None:
    import soundfile as sf

    os.makedirs(os.path.dirname(path), exist_ok=True)
    sf.write(path, samples, rate)


def class_folders(root: str, per_class: int = 5, seed: int = 0) -> Dict[str, List[str]]:
    """``root/<class>/...``: ``per_class`` clips of 1-2 s per class at mixed rates; in each
    class one is stereo, one FLAC and one in a subfolder. Returns class -> paths below root."""
    rng = np.random.default_rng(seed)
    written: Dict[str, List[str]] = {}
    for kind in CLASSES:
        for i in range(per_class):
            rate = RATES[i % len(RATES)]
            x = sound(kind, rng, rng.uniform(1.0, 2.0), rate)
            if i == 1:
                x = np.stack([x, 0.5 * x], axis=1)  # Stereo.
            name = f"{kind}_{i}" + (".flac" if i == 2 else ".wav")
            relative = os.path.join(kind, "more", name) if i == 3 else os.path.join(kind, name)
            write_audio(os.path.join(root, relative), x, rate)
            written.setdefault(kind, []).append(relative)
    return written


def manifest(path: str, rows: Sequence[Sequence[str]], header: Sequence[str], tsv=False) -> str:
    """A manifest file: ``header`` then ``rows``, comma- or tab-separated."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, delimiter="\t" if tsv else ",")
        writer.writerow(header)
        writer.writerows(rows)
    return path


def tree(root: str) -> Dict[str, int]:
    """Every file and folder below ``root`` (path -> size, -1 for folders): what a failed
    command must leave unchanged."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            found[os.path.relpath(os.path.join(dirpath, d), root)] = -1
        for f in filenames:
            path = os.path.join(dirpath, f)
            found[os.path.relpath(path, root)] = os.lstat(path).st_size
    return found
