"""Inference throughput of jitted panns_jax models vs plain PyTorch, on this machine, as ratios.

    python benchmarks/inference.py                              # every family, batch 8 x 10 s
    python benchmarks/inference.py --models MobileNetV1 --batch 2 --seconds 2 --repeats 1

Both sides run eval-mode forwards of ``--seconds`` clips with the same weights (random;
converted with ``panns_jax.convert.to_state_dict``): panns_jax through
``models.jit_inference`` (as the tagger compiles it; the convolutions of ``--conv-backend``,
default ``auto``: oneDNN's where installed) with only ``clipwise_output`` and ``embedding``
returned,
PyTorch under ``torch.inference_mode()`` (benchmarks/torch_baselines.py, checked against
the golden outputs by tests/test_torch_baselines.py). Reported: clips/s of the best of
``--repeats`` timed runs after a warm-up (and compilation), the two sides interleaved run
by run so that load from other processes hits both alike; the achieved GFLOP/s (the
paper-style operation count of ``panns_jax.models.profile``: 2 per multiply-accumulate,
the STFT as the original's DFT convolutions) and its shares of this CPU's float32 peak
(benchmarks/peak.py prints how that is derived) and of the measured float32 matmul ceiling
(``peak.matmul_ceiling``: the fastest large matrix product of XLA, numpy or PyTorch on this
machine; skip it with --no-ceiling). The load average is printed before and after: run it on
a quiet machine, both sides use every core. ``--malloc both`` (the default) prints a table
with glibc's default malloc in both processes (how panns_inference and a plain PyTorch
process run), then one with ``panns_jax.malloc.tune_malloc()`` in both (as panns_jax.main
runs): PyTorch's eval forwards reuse their large buffers with it and run 1.3-2.5x faster,
ours about as fast. On a 2-core AMD EPYC (Zen 5), one run: default Cnn14 1.43x, Cnn6 1.31x,
1-D CNNs 2.00-2.70x; tuned Cnn14 1.03x, Cnn6 1.00x, ResNet22 1.01x, MobileNetV1 / V2 1.21x /
1.78x, 1-D CNNs 1.01-1.05x, Wavegram-Logmel 1.02x.

On the 2-core AMD EPYC (Zen 4) development machine, batch 8 x 10 s, four runs within 15
minutes (ceiling 198-209 GFLOP/s): Cnn14 at 88-94% of the ceiling, Cnn6 at 93-98%, PyTorch
at 66-80%; ratios Cnn14 1.18-1.40x, Cnn6 1.22-1.27x. Where a forward runs at the ceiling,
its ratio is set by how far below it PyTorch runs; Cnn6's 1.3x takes convolution kernels
faster than XLA's, which top out near the ceiling (oneDNN's direct ones exceed it by ~17%
on deep maps: benchmarks/peak.py).
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peak  # noqa: E402
from timing import DEFAULT_MODELS, interleaved_best_times, load_line  # noqa: E402

from panns_jax import convert, malloc, models  # noqa: E402
from panns_jax.cli.infer import add_conv_backend_argument, resolved_conv_backend  # noqa: E402
from panns_jax.models import profile  # noqa: E402

MALLOC_LINES = {
    "default": "malloc: glibc's default on both sides (as panns_inference and a plain process run)",
    "tuned": "malloc: tune_malloc() on both sides (as panns_jax.main runs; PyTorch gains the most)",
}


def print_table(args, cpu, ceiling, torch, torch_baselines) -> None:
    """One row per model and batch: both sides' clips/s, their ratio and shares of peak."""
    print(
        f"{'model':22s} {'batch':>5s} {'panns_jax':>11s} {'PyTorch':>11s} {'ratio':>6s}  "
        f"{peak.shares_header('ours', ceiling):>28s}  {peak.shares_header('torch', ceiling):>29s}"
    )
    for name in args.models:
        model = models.get(name)
        rate = models.sample_rate(model)
        samples = int(round(args.seconds * rate))
        variables = models.init(model, jax.random.key(0), samples)
        flops_per_clip = profile.multiply_adds(model, samples)
        baseline = None
        if not args.no_torch:
            baseline = torch_baselines.build(name, convert.to_state_dict(variables, model))
        # As the tagger, the CLI and the HEAR API compile it.
        forward = models.jit_inference(
            model,
            lambda v, x: {
                k: v_
                for k, v_ in model.apply(v, x).items()
                if k in ("clipwise_output", "embedding")
            },
            args.conv_backend,
        )
        for batch in args.batches:
            clips = np.random.default_rng(0).uniform(-0.5, 0.5, (batch, samples)).astype(np.float32)
            device_clips = jax.device_put(clips)
            torch_clips = torch.from_numpy(clips)

            def torch_run():
                with torch.inference_mode():
                    baseline(torch_clips)

            runs = {"jax": lambda: jax.block_until_ready(forward(variables, device_clips))}
            if baseline is not None:
                runs["torch"] = torch_run
            times = interleaved_best_times(runs, args.repeats)
            flops = flops_per_clip * batch
            ours = batch / times["jax"]
            line = f"{name:22s} {batch:5d} {ours:7.2f} c/s "
            if "torch" in times:
                theirs = batch / times["torch"]
                line += f"{theirs:7.2f} c/s {ours / theirs:5.2f}x  "
            else:
                line += f"{'-':>11s} {'-':>6s}  "
            line += f"{peak.shares(flops / times['jax'] / 1e9, cpu.gflops, ceiling):>28s}"
            if "torch" in times:
                torch_rate = flops / times["torch"] / 1e9
                line += f"  {peak.shares(torch_rate, cpu.gflops, ceiling):>29s}"
            print(line, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    parser.add_argument("--batch", "--batches", dest="batches", nargs="+", type=int, default=[8])
    parser.add_argument("--seconds", type=float, default=10.0, help="clip length")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (default: torch's own, the core count)",
    )
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch baseline")
    add_conv_backend_argument(parser)
    parser.add_argument(
        "--malloc",
        choices=("default", "tuned", "both"),
        default="both",
        help="glibc's default malloc, tune_malloc() on both sides, or one table of each",
    )
    peak.add_arguments(parser)
    args = parser.parse_args()
    args.conv_backend = resolved_conv_backend(parser, args.conv_backend)

    import torch
    import torch_baselines

    unknown = [n for n in args.models if n not in models.REGISTRY]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(models.names())}")
    missing = [n for n in args.models if n not in torch_baselines.BASELINES and not args.no_torch]
    if missing:
        parser.error(
            f"no PyTorch baseline for {', '.join(missing)} (have: "
            f"{', '.join(torch_baselines.BASELINES)}); use --no-torch"
        )
    if args.threads:
        torch.set_num_threads(args.threads)
    cpu = peak.cpu_peak(args.fma_units, args.vector_bits)
    print(
        f"jax {jax.__version__} on {jax.devices()[0].device_kind} ({jax.default_backend()}); "
        f"torch {torch.__version__} with {torch.get_num_threads()} threads; "
        f"{os.cpu_count()} cores; {args.conv_backend} convolutions"
    )
    print(cpu.describe())
    ceiling = peak.report_ceiling(args)
    modes = ("default", "tuned") if args.malloc == "both" else (args.malloc,)
    for mode in modes:  # Default first: mallopt cannot be undone.
        if mode == "tuned" and not malloc.tune_malloc():
            print("tune_malloc() unavailable (not glibc): no tuned table")
            continue
        print(MALLOC_LINES[mode])
        print(load_line())
        print_table(args, cpu, ceiling, torch, torch_baselines)
    print(load_line())


if __name__ == "__main__":
    main()
