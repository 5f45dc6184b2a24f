"""Shared timing helpers of the benchmarks: best of N after a warm-up call."""

from __future__ import annotations

import os
import time
from typing import Callable, Dict


def best_time(fn: Callable[[], object], repeats: int) -> float:
    """Seconds of the fastest of ``repeats`` calls of ``fn``, after one warm-up call
    (JAX compilation, allocator growth); the minimum is the least noisy on shared machines."""
    fn()
    times = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def interleaved_best_times(runs: Dict[str, Callable[[], object]], repeats: int) -> Dict[str, float]:
    """Best-of-``repeats`` seconds of each run, after one warm-up each, taking turns
    (A, B, A, B, ...) so that a burst of load from elsewhere hits every side alike."""
    for fn in runs.values():
        fn()
    best = {name: float("inf") for name in runs}
    for _ in range(max(1, repeats)):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def load_line() -> str:
    """The 1/5/15-minute load averages against the core count: timings mean little when busy."""
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:
        return "load average: unavailable"
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} cores" + (
        "  (busy machine: ratios are unreliable)" if one > 1.5 * (os.cpu_count() or 1) else ""
    )


# One or two models of every family: log-mel CNN, ResNet, MobileNet, 1-D, Wavegram.
DEFAULT_MODELS = [
    "Cnn14",
    "Cnn6",
    "ResNet22",
    "MobileNetV1",
    "MobileNetV2",
    "LeeNet24",
    "DaiNet19",
    "Res1dNet31",
    "Wavegram_Logmel_Cnn14",
]
