"""The float32 peak of this CPU, derived from what /proc/cpuinfo says, and how it was derived.

    python benchmarks/peak.py            # prints the derivation
    python benchmarks/peak.py --fma-units 1

peak = cores x clock x float32 lanes per vector x 2 (an FMA is a multiply and an add)
x FMA units per core. Lanes come from the widest vector extension in the flags
(avx512f: 16, avx/avx2: 8, else 4); cores from this process's CPU affinity; the clock
from cpufreq's maximum when the kernel exposes it, else /proc/cpuinfo's "cpu MHz" (the
nominal clock under most hypervisors; turbo is ignored). FMA units per core are not in
/proc/cpuinfo: 2 is right for Intel server cores since Haswell (AVX2) and Skylake-SP Gold
6xxx/Platinum (AVX-512), and for AMD Zen 2-4 (Zen 4 runs AVX-512 on two 256-bit units,
so it peaks at AVX2's width: pass --vector-bits 256); some Xeon Silver/Gold 5xxx parts
have 1 AVX-512 unit (pass --fma-units 1). Under a hypervisor the clock is often the nominal
one while the cores run at their boost clock, so a derived peak can be off either way.

``matmul_ceiling`` measures instead: the float32 GFLOP/s of one large square matrix product
(4096 x 4096, best of 5 after a warm-up) as XLA:CPU compiles it, with and without its
YNNPACK fusions, and as numpy's BLAS and PyTorch (when installed) run it. The fastest is the
ceiling the benchmarks report shares of: what this machine's matrix libraries reach, and
about what XLA:CPU's convolutions reach on deep maps. It is not the hardware's limit: on the
2-core AMD EPYC (Zen 4) where the ceiling measures 203 GFLOP/s, PyTorch's oneDNN direct
convolutions run Cnn14's 125x8 and 62x4 maps (3x3, 512 and 1024 channels, batch 8) at
236-238 GFLOP/s, XLA's at 202-204. A model near the ceiling is as fast as XLA's kernels
allow; beyond it takes faster convolution kernels or fewer operations.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from typing import Dict, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import best_time  # noqa: E402

# The matrix product that measures the ceiling: size x size, float32, best of repeats.
_CEILING_SIZE, _CEILING_REPEATS = 4096, 5


@dataclass
class Peak:
    cores: int
    ghz: float
    lanes: int
    fma: bool
    fma_units: int
    source: str

    @property
    def gflops(self) -> float:
        return self.cores * self.ghz * self.lanes * (2 if self.fma else 1) * self.fma_units

    def describe(self) -> str:
        return (
            f"float32 peak {self.gflops:.0f} GFLOP/s = {self.cores} cores x {self.ghz:.2f} GHz"
            f" x {self.lanes} lanes x {2 if self.fma else 1} (FMA) x {self.fma_units} FMA"
            f" units/core [{self.source}]"
        )


def _cpuinfo() -> dict:
    info = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key and key not in info:
                    info[key] = value.strip()
    except OSError:
        pass
    return info


def cpu_peak(fma_units: int = 2, vector_bits: Optional[int] = None) -> Peak:
    """This machine's float32 peak (see the module docstring for the formula and caveats)."""
    info = _cpuinfo()
    flags = set(info.get("flags", "").split())
    width = vector_bits or (512 if "avx512f" in flags else 256 if "avx" in flags else 128)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    ghz, clock = None, "no clock found: assumed 2.0 GHz"
    try:
        with open("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq") as f:
            ghz, clock = int(f.read()) / 1e6, "cpufreq max"
    except (OSError, ValueError):
        if "cpu MHz" in info:
            ghz, clock = float(info["cpu MHz"]) / 1e3, "/proc/cpuinfo cpu MHz"
    flag_name = {512: "avx512f", 256: "avx2" if "avx2" in flags else "avx", 128: "sse"}[width]
    source = (
        f"{info.get('model name', 'unknown CPU')}; vector width from "
        f"{'--vector-bits' if vector_bits else flag_name}, clock from {clock}, "
        f"fma {'in' if 'fma' in flags else 'not in'} flags, FMA units assumed"
    )
    return Peak(
        cores=cores or 1,
        ghz=ghz or 2.0,
        lanes=width // 32,
        fma="fma" in flags,
        fma_units=fma_units,
        source=source,
    )


def _gflops(product) -> float:
    return 2 * _CEILING_SIZE**3 / best_time(product, _CEILING_REPEATS) / 1e9


def matmul_ceiling() -> Dict[str, float]:
    """GFLOP/s of a float32 square matrix product, by implementation, best first."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(0)
    shape = (_CEILING_SIZE, _CEILING_SIZE)
    a, b = (rng.standard_normal(shape, dtype=np.float32) for _ in range(2))
    rates = {"numpy": _gflops(lambda: a @ b)}
    device_a, device_b = jax.device_put(a), jax.device_put(b)
    variants = {"XLA": {}}
    if jax.default_backend() == "cpu":
        variants["XLA, YNNPACK off"] = {
            "compiler_options": {"xla_cpu_experimental_ynn_fusion_type": ""}
        }
    for label, options in variants.items():
        try:
            product = jax.jit(jnp.dot, **options)
            rates[label] = _gflops(lambda: product(device_a, device_b).block_until_ready())
        except Exception:  # A jax whose XLA does not know the option: measure the default only.
            continue
    try:
        import torch
    except ImportError:
        pass
    else:
        torch_a, torch_b = torch.from_numpy(a), torch.from_numpy(b)
        rates["PyTorch"] = _gflops(lambda: torch_a @ torch_b)
    return dict(sorted(rates.items(), key=lambda item: -item[1]))


def describe_ceiling(rates: Dict[str, float]) -> str:
    """One line: the measured ceiling and what each implementation reached."""
    best = next(iter(rates.values()))
    each = ", ".join(f"{name} {rate:.0f}" for name, rate in rates.items())
    return (
        f"float32 matmul ceiling {best:.0f} GFLOP/s measured ({_CEILING_SIZE}^2, best of "
        f"{_CEILING_REPEATS}: {each})"
    )


def report_ceiling(args: argparse.Namespace) -> Optional[float]:
    """The measured ceiling, printed with its breakdown; None under ``--no-ceiling``."""
    if args.no_ceiling:
        return None
    rates = matmul_ceiling()
    print(describe_ceiling(rates))
    return next(iter(rates.values()))


def shares_header(side: str, ceiling_gflops: Optional[float]) -> str:
    """The column title of :func:`shares` for ``side`` ("ours", "torch")."""
    return f"{side} GFLOP/s (peak{', ceiling' if ceiling_gflops else ''})"


def shares(gflops: float, peak_gflops: float, ceiling_gflops: Optional[float]) -> str:
    """``gflops`` with its share of the derived peak and, when measured, of the matmul ceiling."""
    text = f"{gflops:7.1f} ({gflops / peak_gflops:4.0%}"
    return text + (f", {gflops / ceiling_gflops:4.0%})" if ceiling_gflops else ")")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--fma-units",
        type=int,
        default=2,
        help="FMA units per core for the peak (default 2; see benchmarks/peak.py)",
    )
    parser.add_argument(
        "--vector-bits",
        type=int,
        default=None,
        choices=(128, 256, 512),
        help="override the vector width read from /proc/cpuinfo",
    )
    parser.add_argument(
        "--no-ceiling", action="store_true", help="skip measuring the matmul ceiling (~20 s)"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args()
    print(cpu_peak(args.fma_units, args.vector_bits).describe())
    report_ceiling(args)
