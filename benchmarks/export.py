"""CPU throughput of the ONNX Runtime and LiteRT exports vs jitted JAX, and streaming cost.

    python benchmarks/export.py [--models MobileNetV1,MobileNetV2] [--threads 2]

Same machine, same clips (10 s at 32 kHz, batch 1 by default), reported as clips/s
and as ratios to JAX; plus eager PyTorch where ``benchmarks/torch_baselines.py`` has
the model and torch is installed. Every export is written to a temporary directory and
validated (``panns_jax.export``) before it is timed. The streaming part runs
:class:`panns_jax.streaming.StreamingTagger` (1 s window, 0.25 s hop) over a 30 s
recording fed in 20 ms blocks and reports the real-time factor (processing time /
audio time; goal <= 0.1 for MobileNetV1) and the latency from a sample's arrival to
the output that includes it (hop + block + compute; goal <= 1 s). Weights are
random: speed does not depend on them.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import jax
import numpy as np

from panns_jax import export, loader, models, streaming

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import best_time  # noqa: E402


def _clips(batch: int, samples: int) -> np.ndarray:
    return np.random.default_rng(0).uniform(-0.5, 0.5, (batch, samples)).astype(np.float32)


def _torch_baseline(name: str, model, variables, threads: int):
    """``benchmarks/torch_baselines.py``'s model for ``name``, when it and torch exist."""
    try:
        import torch
        import torch_baselines
    except ImportError:
        return None
    if name not in torch_baselines.BASELINES:
        return None
    from panns_jax import convert

    torch.set_num_threads(threads)
    net = torch_baselines.build(name, convert.to_state_dict(variables, model))

    def run(clips: np.ndarray):
        with torch.inference_mode():
            return net(torch.from_numpy(clips))

    return run


def throughput(name: str, args, workdir: str) -> None:
    model = models.get(name)
    rate = models.sample_rate(model)
    variables = models.init(model, jax.random.key(0), rate)
    clips = _clips(args.batch, int(args.seconds * rate))
    forward = jax.jit(lambda v, x: model.apply(v, x)["clipwise_output"])
    results = {
        "jax (jit)": args.batch
        / best_time(lambda: forward(variables, clips).block_until_ready(), args.repeats)
    }
    for format in ("onnx", "tflite"):
        path = os.path.join(workdir, f"{name}.{format}")
        export.export(
            (model, variables),
            format,
            path,
            model_name=name,
            seconds=args.seconds,
            batch_size=args.batch,
        )
        runner = export.load(path, num_threads=args.threads)
        label = {"onnx": "onnxruntime", "tflite": "litert"}[format]
        results[label] = args.batch / best_time(lambda: runner(clips), args.repeats)
    torch_baseline = _torch_baseline(name, model, variables, args.threads)
    if torch_baseline is not None:
        results["pytorch (eager)"] = args.batch / best_time(
            lambda: torch_baseline(clips), args.repeats
        )
    base = results["jax (jit)"]
    print(f"\n{name}: {args.seconds:g} s clips, batch {args.batch}, {args.threads} threads")
    for label, value in results.items():
        print(f"  {label:<18} {value:8.2f} clips/s   {value / base:5.2f}x jax")


def stream(name: str, args, workdir: str) -> None:
    model, variables, meta = loader.load(model=name)  # Random weights, seed 0.
    rate = meta.sample_rate
    t = np.arange(int(args.stream_seconds * rate)) / rate
    audio = (
        0.3 * np.sin(2 * np.pi * 440 * t * (1 + t / 10))
        + 0.05 * np.random.default_rng(0).standard_normal(t.size)
    ).astype(np.float32)
    block = int(args.block * rate)
    onnx_path = os.path.join(workdir, f"{name}_stream.onnx")
    export.export((model, variables), "onnx", onnx_path, model_name=name)
    backends = {"jax": None, "onnxruntime": export.load(onnx_path, num_threads=args.threads)}
    print(
        f"\nstreaming {name}: window {args.window:g} s, hop {args.hop:g} s, blocks "
        f"{args.block * 1000:g} ms, {args.stream_seconds:g} s of audio"
    )
    for label, predict in backends.items():
        tagger = streaming.StreamingTagger(
            model, variables, meta, window=args.window, hop=args.hop, predict=predict
        )
        tagger.warm_up()
        computes = []
        start = time.perf_counter()
        for samples in streaming.iter_blocks(audio, block):
            computes += [s.compute_seconds for s in tagger.push(samples)]
        wall = time.perf_counter() - start
        computes = np.array(computes)
        worst = tagger.latency_seconds + args.block + computes.max()
        print(
            f"  {label:<12} RTF {wall / args.stream_seconds:.3f}   per window "
            f"p50 {np.median(computes) * 1000:.1f} ms, p95 "
            f"{np.percentile(computes, 95) * 1000:.1f} ms; warm-up {tagger.warmup_seconds:g} s; "
            f"latency <= {worst:.2f} s (hop + block + max compute)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="MobileNetV1,MobileNetV2")
    parser.add_argument("--stream-model", default="MobileNetV1")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--window", type=float, default=1.0)
    parser.add_argument("--hop", type=float, default=streaming.DEFAULT_HOP)
    parser.add_argument("--block", type=float, default=0.02)
    parser.add_argument("--stream-seconds", type=float, default=30.0)
    args = parser.parse_args()
    print(
        f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), {os.cpu_count()} CPUs"
    )
    with tempfile.TemporaryDirectory() as workdir:
        for name in filter(None, args.models.split(",")):
            throughput(name, args, workdir)
        if args.stream_model:
            stream(args.stream_model, args, workdir)


if __name__ == "__main__":
    main()
