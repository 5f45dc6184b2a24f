"""Training-step throughput: panns_jax vs a plain PyTorch step, same machine, as ratios.

    python benchmarks/train_step.py                          # every family, batch 8 x 5 s
    python benchmarks/train_step.py --model MobileNetV1      # one model
    python benchmarks/train_step.py --models Cnn14 --batch 32 --seconds 10  # the paper's step
    python benchmarks/train_step.py --models Cnn14 --dtype bfloat16 --no-torch  # GPU: MFU

Both steps: the model's forward in training mode (BatchNorm batch statistics; log-mel front
end where the model has one; the original's dropouts and SpecAugment stripes: panns_jax
inside its jitted step, the PyTorch baselines of benchmarks/torch_baselines.py as the
original draws them), binary cross-entropy on the sigmoid outputs, backward, Adam with
AMSGrad. The convolutions are the library's default's (``--conv-backend auto``: oneDNN's where
installed); the header names the ones timed. The two sides' steps are interleaved (best of
--steps each, after a warm-up).
Achieved GFLOP/s count a step as 3x the paper-style forward operations of
``panns_jax.models.profile`` (backward = 2x forward), against this CPU's float32 peak
(benchmarks/peak.py prints the derivation) or ``--peak-tflops`` on an accelerator.

Cnn14 notes (before the depthwise / all-family rewrite of this script):
Measured on the 2-core AVX-512 CI machine (torch 2.13 CPU, jax 0.10.2), float32, both in
one process with tune_malloc() (as panns_jax.main runs; it speeds up PyTorch as well):
  batch 8 x 5 s:   panns_jax 2.71 clips/s, PyTorch 3.43 clips/s -> 0.76-0.79x
  batch 32 x 10 s: panns_jax 1.33 clips/s, PyTorch 2.00 clips/s -> 0.67x
  (with XLA's own conv gradients instead of models/same_conv.py: 1.4x and 1.7x longer steps;
  before tune_malloc's unbounded thresholds the 32 x 10 s step re-faulted its 9 GB buffer:
  0.58x)
Where the time goes (jax.profiler vs torch.profiler, 8 x 5 s): PyTorch spends 0.54 s in
forward convs, 1.29 s in conv backward and 0.47 s elsewhere; we spend ~0.75 s in forward
convs, ~1.7 s in conv gradients and ~0.5 s elsewhere, with 87% of both cores busy. Per
layer, XLA:CPU's forward conv runs at 33-80% of oneDNN's speed, slowest on the 64-channel
and 31x4 maps (the same convs with time and frequency swapped run 1.5-1.9x faster, but the
transposes eat the gain in a whole step), and the conv gradients of the largest maps at
35-60%. Tried without a step-level gain beyond noise: gather-based unfolding with the
weight-gradient product split per core (1.4x faster in isolation), a swapped (freq, time)
conv layout, XLA flags (xnnpack/onednn/ynn fusion types, fast math, scheduler), bfloat16.
With XLA's convolutions the CPU goal (>= 1.0x) is not met for every family. XLA's oneDNN
switches (``xla_cpu_use_onednn``, ``xla_cpu_experimental_onednn_custom_call``,
``xla_cpu_experimental_onednn_fusion_type``) are accepted by jax 0.10.2 but hand no
convolution or product to oneDNN, in float32 or bfloat16: the compiled HLO keeps XLA's own
ops and ONEDNN_VERBOSE prints nothing, so oneDNN's kernels are reachable only from a
compiled extension (jax.ffi): ``--conv-backend onednn``, the default where installed
(panns_jax.kernels.onednn; benchmarks/onednn_conv.py compares the two in one process).

XLA:CPU's YNNPACK fusions (on by default in jax 0.10.2: products, reductions, elementwise
ops) speed these steps up; with all of them off (``xla_cpu_experimental_ynn_fusion_type=""``,
2-core AMD EPYC, 8 x 5 s) the steps took 1.07-1.53x longer for every family but Cnn6 (1.06x
faster). Without the elementwise ones alone they are faster still (Cnn6 1.12x, Cnn14
1.08-1.12x, ResNet22 1.12-1.18x the default's speed): the train step compiles that way
(``panns_jax.models.jit_options(model, training=True)``), and so does this script.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import peak  # noqa: E402
from timing import DEFAULT_MODELS, interleaved_best_times, load_line  # noqa: E402

from panns_jax import malloc, model_builder, models, optim, tasks, train  # noqa: E402
from panns_jax.cli.infer import add_conv_backend_argument, resolved_conv_backend  # noqa: E402
from panns_jax.models import profile  # noqa: E402


def jax_step(name: str, batch: int, samples: int, dtype: str, conv_backend: str = "auto"):
    """A jitted panns_jax train step on fixed random clips, as a no-argument callable."""
    config = ml_collections.ConfigDict(
        {
            "model": name,
            "model_overrides": {},
            "compute_dtype": dtype,
            "mixup": "none",
            "mixup_alpha": 1.0,
        }
    )
    model, _ = model_builder.registry_model(config, num_classes=527)
    tx = optim.paper_optimizer()
    variables = models.init(model, jax.random.key(0), samples)
    state = train.TrainState.create(variables, tx, jax.random.key(1))
    rng = np.random.default_rng(0)
    clips = {
        "audio": jnp.asarray(rng.uniform(-0.5, 0.5, (batch, samples)), jnp.float32),
        "labels": jnp.asarray(rng.random((batch, 527)) < 0.02, jnp.float32),
    }
    step_fn = train.make_train_step(model, tx, tasks.get(None), None)
    step = jax.jit(
        models.with_conv_backend(step_fn, conv_backend),
        donate_argnums=0,
        **models.jit_options(model, training=True),  # As panns_jax.train compiles it.
    )
    holder = {"state": state}

    def run():
        holder["state"], metrics = step(holder["state"], clips)
        metrics["loss"].block_until_ready()

    return run


def torch_step(name: str, batch: int, samples: int):
    import torch
    import torch_baselines

    torch.manual_seed(0)
    model = torch_baselines.BASELINES[name]().train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, amsgrad=True)
    rng = np.random.default_rng(0)
    audio = torch.from_numpy(rng.uniform(-0.5, 0.5, (batch, samples)).astype(np.float32))
    labels = torch.from_numpy((rng.random((batch, 527)) < 0.02).astype(np.float32))
    loss_fn = torch.nn.BCELoss()

    def run():
        optimizer.zero_grad()
        loss = loss_fn(model(audio)["clipwise_output"], labels)
        loss.backward()
        optimizer.step()

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", "--model", nargs="+", default=DEFAULT_MODELS)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per side (best of)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    add_conv_backend_argument(parser)
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch baseline")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="device peak (e.g. 989 for H100 bf16 dense); default: this CPU's",
    )
    peak.add_arguments(parser)
    args = parser.parse_args()
    unknown = [n for n in args.models if n not in models.REGISTRY]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(models.names())}")
    if not args.no_torch:
        import torch
        import torch_baselines

        missing = [n for n in args.models if n not in torch_baselines.BASELINES]
        if missing:
            parser.error(f"no PyTorch baseline for {', '.join(missing)}; use --no-torch")
        if args.threads:
            torch.set_num_threads(args.threads)
    malloc.tune_malloc()  # as panns_jax.main does: reuse freed activation buffers
    args.conv_backend = resolved_conv_backend(parser, args.conv_backend)

    device = jax.devices()[0]
    if args.peak_tflops:
        peak_gflops = args.peak_tflops * 1e3
        peak_text = f"peak {args.peak_tflops:g} TFLOP/s (given)"
    else:
        cpu = peak.cpu_peak(args.fma_units, args.vector_bits)
        peak_gflops, peak_text = cpu.gflops, cpu.describe()
    print(
        f"device: {device.device_kind} ({jax.default_backend()}), batch {args.batch} x "
        f"{args.seconds:g} s clips, {args.dtype}, {args.conv_backend} convolutions"
        + (
            ""
            if args.no_torch
            else f"; torch {torch.__version__} with {torch.get_num_threads()} threads"
        )
    )
    print(peak_text)
    ceiling = peak.report_ceiling(args) if device.platform == "cpu" else None
    print(load_line())
    print(
        f"{'model':22s} {'panns_jax':>11s} {'PyTorch':>11s} {'ratio':>6s}  "
        f"{peak.shares_header('ours', ceiling):>28s}  {peak.shares_header('torch', ceiling):>29s}"
    )
    for name in args.models:
        model = models.get(name)
        samples = int(round(args.seconds * models.sample_rate(model)))
        runs = {"jax": jax_step(name, args.batch, samples, args.dtype, args.conv_backend)}
        if not args.no_torch:
            runs["torch"] = torch_step(name, args.batch, samples)
        times = interleaved_best_times(runs, args.steps)
        # Paper-style operations (2 per MAC) of a forward pass, x3 for forward + backward.
        flops = 3 * profile.multiply_adds(model, samples) * args.batch
        ours = args.batch / times["jax"]
        line = f"{name:22s} {ours:7.2f} c/s "
        if "torch" in times:
            theirs = args.batch / times["torch"]
            line += f"{theirs:7.2f} c/s {ours / theirs:5.2f}x  "
        else:
            line += f"{'-':>11s} {'-':>6s}  "
        line += f"{peak.shares(flops / times['jax'] / 1e9, peak_gflops, ceiling):>28s}"
        if "torch" in times:
            torch_rate = flops / times["torch"] / 1e9
            line += f"  {peak.shares(torch_rate, peak_gflops, ceiling):>29s}"
        print(line, flush=True)
    print(load_line())


if __name__ == "__main__":
    main()
