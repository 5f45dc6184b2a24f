"""Inference throughput of jitted panns_jax models vs plain PyTorch, on this machine, as ratios.

    python benchmarks/inference.py [--models Cnn14 MobileNetV1 Cnn6] [--batches 1 8]
                                   [--repeats 3] [--threads N]

Both sides run eval-mode forwards of 10 s clips at 32 kHz with the same weights
(random; converted with ``panns_jax.convert.to_state_dict``): panns_jax through
``jax.jit(model.apply)`` with only ``clipwise_output`` and ``embedding`` returned,
PyTorch under ``torch.inference_mode()`` (benchmarks/torch_baselines.py). Reported:
clips/s of the best of ``--repeats`` timed runs after a warm-up (and compilation).
Run it on a quiet machine: both sides use every core.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import best_time  # noqa: E402

from panns_jax import convert, models  # noqa: E402



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["Cnn14", "MobileNetV1", "Cnn6"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's own, the core count)")
    args = parser.parse_args()

    import torch

    import torch_baselines

    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} ({jax.default_backend()}); "
          f"torch {torch.__version__} with {torch.get_num_threads()} threads; "
          f"{os.cpu_count()} cores")
    print(f"{'model':12s} {'batch':>5s} {'panns_jax':>12s} {'torch':>12s} {'ratio':>7s}")
    for name in args.models:
        model = models.get(name)
        variables = models.init(model, jax.random.key(0))
        baseline = torch_baselines.build(name, convert.to_state_dict(variables, model))
        forward = jax.jit(lambda v, x: {k: v_ for k, v_ in model.apply(v, x).items()
                                        if k in ("clipwise_output", "embedding")})
        for batch in args.batches:
            clips = np.random.default_rng(0).uniform(-0.5, 0.5, (batch, 320000)).astype(np.float32)
            device_clips = jax.device_put(clips)
            jax_time = best_time(
                lambda: jax.block_until_ready(forward(variables, device_clips)), args.repeats)
            torch_clips = torch.from_numpy(clips)

            def torch_run():
                with torch.inference_mode():
                    baseline(torch_clips)

            torch_time = best_time(torch_run, args.repeats)
            ours, theirs = batch / jax_time, batch / torch_time
            print(f"{name:12s} {batch:5d} {ours:8.2f} c/s {theirs:8.2f} c/s {ours / theirs:6.2f}x",
                  flush=True)


if __name__ == "__main__":
    main()
