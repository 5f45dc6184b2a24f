"""Cnn14 training-step throughput: panns_jax vs a plain PyTorch step, same machine, as a ratio.

    python benchmarks/train_step.py                          # batch 8 of 5 s clips (CPU-friendly)
    python benchmarks/train_step.py --batch 32 --seconds 10  # the paper's step
    python benchmarks/train_step.py --dtype bfloat16 --no-torch   # on a GPU: bf16 clips/s and MFU

Both steps: log-mel front end, Cnn14 forward in training mode (BatchNorm batch statistics),
binary cross-entropy on the sigmoid outputs, backward, Adam with AMSGrad. panns_jax also draws
SpecAugment stripes and dropout inside its jitted step; the PyTorch baseline
(benchmarks/torch_baselines.py) has neither, which favours it slightly.

Measured on the 2-core AVX-512 CI machine (torch 2.13 CPU, jax 0.10.2), float32, both in
one process with tune_malloc() (as train.py runs; it speeds up PyTorch as well):
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
The CPU goal (>= 1.0x) is not met.
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

from panns_jax import data, models, optim, train  # noqa: E402
from timing import best_time  # noqa: E402
from panns_jax.models import profile  # noqa: E402



def jax_step_time(batch: int, samples: int, dtype: str, steps: int) -> float:
    config = ml_collections.ConfigDict({"model": "Cnn14", "model_overrides": {},
                                        "compute_dtype": dtype, "mixup": "none",
                                        "mixup_alpha": 1.0})
    model, _ = train.build_model(config, num_classes=527)
    tx = optim.paper_optimizer()
    variables = models.init(model, jax.random.key(0), samples)
    state = train.TrainState.create(variables, tx, jax.random.key(1))
    rng = np.random.default_rng(0)
    clips = {"audio": jnp.asarray(rng.uniform(-0.5, 0.5, (batch, samples)), jnp.float32),
             "labels": jnp.asarray(rng.random((batch, 527)) < 0.02, jnp.float32)}
    step = jax.jit(train.make_train_step(model, tx, config), donate_argnums=0)
    holder = {"state": state}

    def run():
        holder["state"], metrics = step(holder["state"], clips)
        metrics["loss"].block_until_ready()

    return best_time(run, steps)


def torch_step_time(batch: int, samples: int, steps: int) -> float:
    import torch
    import torch_baselines

    torch.manual_seed(0)
    model = torch_baselines.BASELINES["Cnn14"]().train()
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

    return best_time(run, steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch baseline")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="device peak (e.g. 989 for H100 bf16 dense) to report MFU")
    args = parser.parse_args()
    samples = int(args.seconds * 32000)
    data.pipeline.tune_malloc()  # as train.py does: reuse freed activation buffers

    ours = jax_step_time(args.batch, samples, args.dtype, args.steps)
    ours_rate = args.batch / ours
    device = jax.devices()[0]
    print(f"device: {device.device_kind} ({jax.default_backend()}), batch {args.batch} x "
          f"{args.seconds:g} s clips, {args.dtype}")
    print(f"panns_jax Cnn14 train step: {ours * 1e3:9.1f} ms  {ours_rate:8.2f} clips/s")
    if args.peak_tflops:
        # Paper-style operations (2 per MAC) of a forward pass, x3 for forward + backward.
        flops = 3 * profile.multiply_adds(models.get("Cnn14"), samples) * args.batch
        print(f"MFU: {flops / ours / (args.peak_tflops * 1e12):.1%}")
    if not args.no_torch:
        import torch

        theirs = torch_step_time(args.batch, samples, args.steps)
        print(f"PyTorch Cnn14 train step:   {theirs * 1e3:9.1f} ms  {args.batch / theirs:8.2f} "
              f"clips/s (torch {torch.__version__}, {torch.get_num_threads()} threads)")
        print(f"ratio panns_jax / PyTorch: {theirs / ours:.2f}x")


if __name__ == "__main__":
    main()
