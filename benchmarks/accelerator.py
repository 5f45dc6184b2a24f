"""Cnn14 on this machine's accelerator: train and inference speed, MFU, memory, input rate.

    python benchmarks/accelerator.py                  # the paper's step, on jax.default_backend()
    python benchmarks/accelerator.py --peak-tflops 989 --peak-tflops-fp32 495
    python benchmarks/accelerator.py --dry-run        # tiny shapes, two steps: checks the script

What it measures, all on one device through the training loop's own code
(``panns_jax.train.create_train_state`` and ``compile_steps``, so the donated, sharded
step that ``python -m panns_jax.main`` runs):

* the train step at the paper's batch (32 mixup pairs: 64 clips of 10 s, mixed on the
  log-mel) in bfloat16 (``compute_dtype``, float32 parameters) and in float32: clips/s
  (32 trained examples per step, as the training log counts them) and model FLOP
  utilisation (MFU): 3x the paper-style forward operations of ``panns_jax.models.profile``
  (2 per multiply-accumulate) of 32 examples per step, over the device's dense peak;
* the inference forward (the eval step) at batch 64 of 10 s clips in float32;
* the memory of each step: XLA's own account of the compiled step (arguments, outputs and
  temporaries, less what donation aliases) and, where the device reports it, its peak in use;
* the input pipeline's feeding rate on this host's cores: the balanced sampler over an
  AudioSet-shaped pack (``benchmarks/input_pipeline.py``'s synthetic pack and measurement).

Peaks are dense (no sparsity) per chip. XLA computes float32 convolutions and products at
DEFAULT precision, which is TF32 on NVIDIA Ampere and later and one bfloat16 pass on TPUs,
so the float32 MFU is against that peak. Unknown devices need ``--peak-tflops`` (and
``--peak-tflops-fp32``); on a CPU the peak is ``benchmarks/peak.py``'s float32 derivation.
The default run takes under 4 minutes on a GPU host; most of it is compilation.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import input_pipeline  # noqa: E402
import peak  # noqa: E402

from panns_jax import model_builder, models, recipe, tasks, train  # noqa: E402
from panns_jax.models import profile  # noqa: E402

# Dense peak TFLOP/s per chip: (bfloat16, float32 at XLA's DEFAULT precision). Matched in
# order against jax's device_kind, so the more specific names come first. Sources: NVIDIA's
# H100/H200 (SXM) and A100 datasheets (TF32 tensor cores), Google Cloud's TPU pages.
PEAK_TFLOPS: List[Tuple[str, Tuple[float, float]]] = [
    ("H100 PCIe", (756.0, 378.0)),
    ("H100 NVL", (835.0, 418.0)),
    ("H200", (989.4, 494.7)),
    ("H100", (989.4, 494.7)),
    ("A100", (312.0, 156.0)),
    ("TPU v6", (918.0, 918.0)),
    ("TPU v5 lite", (197.0, 197.0)),
    ("TPU v5e", (197.0, 197.0)),
    ("TPU v5", (459.0, 459.0)),
    ("TPU v4", (275.0, 275.0)),
]


@dataclass
class Sizes:
    """What one run measures: shapes, steps and the input pipeline's synthetic pack."""

    pairs: int  # mixup pairs per train step (the paper: 32)
    seconds: float  # clip length
    inference_batch: int
    steps: int  # timed steps after the warm-up
    pack_clips: int
    pipeline_batches: int


PAPER = Sizes(
    pairs=32, seconds=10.0, inference_batch=64, steps=10, pack_clips=600, pipeline_batches=20
)
DRY_RUN = Sizes(pairs=2, seconds=0.5, inference_batch=4, steps=1, pack_clips=24, pipeline_batches=2)


def device_peaks(
    device: Any, args: argparse.Namespace
) -> Tuple[Optional[float], Optional[float], str]:
    """(bfloat16, float32) peak FLOP/s of ``device`` and where they come from."""
    if args.peak_tflops:
        fp32 = args.peak_tflops_fp32 or args.peak_tflops
        return args.peak_tflops * 1e12, fp32 * 1e12, "given (--peak-tflops)"
    if device.platform == "cpu":
        cpu = peak.cpu_peak()
        return cpu.gflops * 1e9, cpu.gflops * 1e9, cpu.describe()
    for name, (bf16, fp32) in PEAK_TFLOPS:
        if name.lower() in device.device_kind.lower():
            return bf16 * 1e12, fp32 * 1e12, f"table entry {name!r}: {bf16:g} / {fp32:g} TFLOP/s"
    return None, None, f"unknown device {device.device_kind!r}: pass --peak-tflops for MFU"


def memory_of(compiled: Any) -> Optional[int]:
    """Bytes XLA plans for a compiled step: arguments, outputs and temporaries, less aliases."""
    try:
        m = compiled.memory_analysis()
    except (NotImplementedError, AttributeError, RuntimeError):
        return None
    if m is None:
        return None
    total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
    return int(total - m.alias_size_in_bytes)


def device_peak_bytes(device: Any) -> Optional[int]:
    """The device's high-water mark of memory in use, where it reports one (GPU, TPU)."""
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def time_steps(run: Any, steps: int) -> float:
    """Seconds per call of ``run`` over ``steps`` calls after two warm-up calls; ``run``
    returns an array that is waited for only at the end, so steps queue as in training."""
    for _ in range(2):
        jax.block_until_ready(run())
    start = time.perf_counter()
    out = None
    for _ in range(steps):
        out = run()
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / steps


def measure_steps(name: str, sizes: Sizes, dtype: str, with_inference: bool) -> Dict[str, Any]:
    """Train (and inference) speed and memory of model ``name`` in ``dtype`` on one device."""
    config = recipe.base_config(name)
    config.update(
        batch_size=sizes.pairs,
        eval_batch_size=sizes.inference_batch,
        clip_seconds=sizes.seconds,
        compute_dtype=dtype,
    )
    mesh = train.make_mesh(1)
    task, builder = tasks.get(config.task), model_builder.for_config(config)
    model = builder.build(527, output=task.output)
    optimizer = train.make_optimizer(config, builder)
    samples = recipe.clip_samples(config, builder.sample_rate())
    state, abstract = train.create_train_state(config, mesh, builder, model, optimizer, samples)
    start = time.perf_counter()
    train_fn, eval_fn = train.compile_steps(
        config, mesh, model, optimizer, task, abstract, (samples, 527)
    )
    compile_seconds = time.perf_counter() - start
    rng = np.random.default_rng(0)
    clips = recipe.examples_per_step(config)
    batch = train.global_batch(
        mesh,
        {
            "audio": rng.uniform(-0.5, 0.5, (clips, samples)).astype(np.float32),
            "labels": (rng.random((clips, 527)) < 0.02).astype(np.float32),
        },
    )
    holder = {"state": state}

    def train_once():
        holder["state"], metrics = train_fn(holder["state"], batch)
        return metrics["loss"]

    ops = profile.multiply_adds(model, samples)  # one example's forward, paper-style
    seconds = time_steps(train_once, sizes.steps)
    result = {
        "train_clips_per_s": sizes.pairs / seconds,
        "train_flops_per_s": 3 * ops * sizes.pairs / seconds,
        "train_step_ms": 1e3 * seconds,
        "train_memory": memory_of(train_fn),
        "compile_s": compile_seconds,
    }
    if with_inference:
        audio = train.global_batch(
            mesh, {"a": rng.uniform(-0.5, 0.5, (sizes.inference_batch, samples)).astype(np.float32)}
        )["a"]
        s = holder["state"]
        seconds = time_steps(lambda: eval_fn(s.params, s.batch_stats, audio), sizes.steps)
        result.update(
            infer_clips_per_s=sizes.inference_batch / seconds,
            infer_flops_per_s=ops * sizes.inference_batch / seconds,
            infer_memory=memory_of(eval_fn),
        )
    result["device_peak"] = device_peak_bytes(mesh.devices.flat[0])
    return result


def measure_input_pipeline(
    sizes: Sizes, clip_seconds: float, batch: int
) -> Tuple[float, float, float]:
    """(clips/s, clips per CPU-second, cores busy) of the balanced training iterator.

    The pack is ``benchmarks/input_pipeline.py``'s synthetic AudioSet one, built with the
    ``audioset`` TFDS builder in a temporary directory and removed afterwards.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow_datasets as tfds
    from absl import logging

    from panns_jax import data as pdata

    logging.set_verbosity(logging.WARNING)
    tfds.disable_progress_bar()
    clip_samples = int(round(clip_seconds * 32000))
    workdir = tempfile.mkdtemp(prefix="panns_accelerator_")
    try:
        manual = os.path.join(workdir, "manual")
        pack = os.path.join(manual, "hdf5s", "waveforms", "balanced_train.h5")
        input_pipeline.write_pack(pack, sizes.pack_clips, clip_samples=clip_samples)
        builder = pdata.Audioset(data_dir=os.path.join(workdir, "tfds"))
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=manual)
        )
        make = lambda: pdata.make_train_iterator(
            builder,
            "balanced_train",
            batch_size=batch,
            clip_samples=clip_samples,
            balanced=True,
            seed=0,
            process_index=0,
            process_count=1,
        )
        return input_pipeline.measure(make, sizes.pipeline_batches, warmup=2)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def fmt_bytes(n: Optional[int]) -> str:
    return "-" if n is None else f"{n / 2**30:.2f} GiB"


def fmt_mfu(flops: float, peak_flops: Optional[float]) -> str:
    return "-" if not peak_flops else f"{flops / peak_flops:.1%}"


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dry-run", action="store_true", help="tiny shapes and one timed step (checks the script)"
    )
    parser.add_argument("--peak-tflops", type=float, default=None, help="bfloat16 dense peak")
    parser.add_argument(
        "--peak-tflops-fp32",
        type=float,
        default=None,
        help="float32 peak at XLA's DEFAULT precision (default: --peak-tflops)",
    )
    parser.add_argument(
        "--model",
        default=None,
        help="a log-mel model of the registry (default Cnn14; Cnn6 in a dry run, which"
        " compiles 4x faster on a CPU)",
    )
    parser.add_argument("--steps", type=int, default=None, help="timed steps per measurement")
    parser.add_argument(
        "--no-input", action="store_true", help="skip the input pipeline measurement"
    )
    args = parser.parse_args(argv)
    sizes = DRY_RUN if args.dry_run else PAPER
    model = args.model or ("Cnn6" if args.dry_run else "Cnn14")
    if model not in models.REGISTRY:
        parser.error(f"unknown model {model!r}; known: {', '.join(models.names())}")
    if args.steps:
        sizes = Sizes(**{**sizes.__dict__, "steps": args.steps})

    begin = time.perf_counter()
    device = jax.devices()[0]
    bf16_peak, fp32_peak, peak_text = device_peaks(device, args)
    print(
        f"device: {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}; "
        f"{model}, {sizes.pairs} mixup pairs x {sizes.seconds:g} s per train step, "
        f"inference batch {sizes.inference_batch}" + ("  [dry run]" if args.dry_run else ""),
        flush=True,
    )
    print(f"peak: {peak_text}", flush=True)
    results = {
        "bfloat16": measure_steps(model, sizes, "bfloat16", with_inference=False),
        "float32": measure_steps(model, sizes, "float32", with_inference=True),
    }
    rows = []
    for dtype, peak_flops in (("bfloat16", bf16_peak), ("float32", fp32_peak)):
        r = results[dtype]
        rows.append(
            (
                f"train {dtype}",
                f"{r['train_clips_per_s']:.1f} clips/s",
                fmt_mfu(r["train_flops_per_s"], peak_flops),
                f"{1e3 / r['train_step_ms']:.2f} steps/s ({2 * sizes.pairs} clips loaded per step),"
                f" compiled in {r['compile_s']:.0f} s",
                fmt_bytes(r["train_memory"]),
            )
        )
    r = results["float32"]
    rows.append(
        (
            f"inference float32 (batch {sizes.inference_batch})",
            f"{r['infer_clips_per_s']:.1f} clips/s",
            fmt_mfu(r["infer_flops_per_s"], fp32_peak),
            "eval step: forward and sigmoid",
            fmt_bytes(r["infer_memory"]),
        )
    )
    if not args.no_input:
        wall, per_core, busy = measure_input_pipeline(sizes, sizes.seconds, 2 * sizes.pairs)
        rows.append(
            (
                f"input pipeline ({os.cpu_count()} host cores)",
                f"{wall:.0f} clips/s",
                "-",
                f"feeds {wall / (2 * sizes.pairs):.1f} train steps/s; {per_core:.0f} clips"
                f" per CPU-second, {busy:.1f} cores busy",
                "-",
            )
        )
    peak_bytes = max((v["device_peak"] or 0) for v in results.values()) or None
    header = ("measurement", "rate", "MFU", "detail", "step memory")
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    line = lambda row: "  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip()
    print(line(header))
    print(line(tuple("-" * w for w in widths)))
    for row in rows:
        print(line(row))
    print(f"device peak memory in use: {fmt_bytes(peak_bytes)} (where the device reports it)")
    print(f"total {time.perf_counter() - begin:.0f} s")


if __name__ == "__main__":
    main()
