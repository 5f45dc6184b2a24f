"""The two conv backends, XLA's and oneDNN's, and PyTorch: same-process A/B timings.

    pip install -e ".[onednn]"                                # oneDNN 3.2 and its headers
    python benchmarks/onednn_conv.py                          # Cnn6 and Cnn14
    python benchmarks/onednn_conv.py --models LeeNet24 DaiNet19 Res1dNet31
    python benchmarks/onednn_conv.py --models Cnn6 --layers   # and each conv shape alone

For each model: its inference forward (batch 8 x 10 s, as benchmarks/inference.py compiles
it) and its train step (8 x 5 s, benchmarks/train_step.py's) with conv_backend "xla" and
"onednn" (``panns_jax.models.with_conv_backend``; panns_jax.kernels.onednn builds the kernel
on first use), and the PyTorch baseline, interleaved, best of --repeats, malloc tuned for
all three (as panns_jax.main runs). It first checks the kernels against XLA's convolution
on a 2-D and a 1-D geometry (tests/test_onednn.py bounds them against float64), and prints
the forward's largest difference from XLA's. ``--layers`` times each conv shape of Cnn6 and
Cnn14 alone; ``--max-channels`` moves the widest conv handed to oneDNN, for this process.

On a 2-core AMD EPYC (Zen 5), one run over every family (load 1.9-2.1, its own), oneDNN /
XLA: forwards Cnn14 1.17x, Cnn6 1.31x, ResNet22 1.34x, MobileNetV1 / V2 1.04x / 1.14x, the
1-D CNNs 1.32-1.47x, Wavegram-Logmel-Cnn14 1.39x; train steps 1.19-1.36x for all but the
MobileNets (1.03-1.04x); the train steps against PyTorch's, which draw the original's dropouts
and SpecAugment stripes, are benchmarks/train_step.py's (README's Speed). Per layer: the 3x3 and
5x5 convs of 64-512 output channels run 1.22-1.56x faster on oneDNN, those of 1024 and 2048
channels 0.56x and 0.43x (each call reorders their 38 and 151 MB of weights), Cnn6's
1-channel first conv 0.89x; Res1dNet31's step with its 1024 and 2048-channel 1-D convs on
oneDNN too ran 0.91x as fast. Outputs differ from XLA's by at most 4.2e-7.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

from panns_jax import malloc

malloc.tune_malloc()  # As panns_jax.main and benchmarks/train_step.py run.

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch_baselines  # noqa: E402
import train_step  # noqa: E402
from timing import interleaved_best_times, load_line  # noqa: E402

from panns_jax import convert, models  # noqa: E402
from panns_jax.kernels import onednn  # noqa: E402
from panns_jax.models import backends, same_conv  # noqa: E402


def check_kernels() -> None:
    """The kernels against XLA's convolution and its gradients: one 2-D conv of same_conv and
    one strided, dilated, unevenly padded 1-D conv of fast1d (tests/test_onednn.py bounds
    them against float64)."""
    rng = np.random.default_rng(0)
    for label, x_shape, w_shape, geometry in (
        ("2-D", (2, 12, 9, 16), (5, 5, 16, 32), (1, 2, 2, 2, 1)),
        ("1-D", (2, 50, 16), (3, 16, 32), (2, 3, 1, 0, 2)),
    ):
        x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
        w = jnp.asarray(rng.standard_normal(w_shape), jnp.float32)
        y, vjp = jax.vjp(lambda x, w: onednn.xla_conv(x, w, geometry), x, w)
        dy = jnp.asarray(rng.standard_normal(y.shape), jnp.float32)
        got = (onednn.conv(x, w, geometry), *onednn.grads(x, w, dy, geometry))
        errors = [
            float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b))) for a, b in zip(got, (y, *vjp(dy)))
        ]
        print(
            f"{label} max |oneDNN - XLA| / max |XLA|: conv %.1e, input grad %.1e, weight grad %.1e"
            % tuple(errors)
        )


def layer_table(repeats: int) -> None:
    """Each conv shape of Cnn6 and Cnn14 at batch 8 x 10 s alone: XLA (as inference compiles
    it) vs oneDNN."""
    rng = np.random.default_rng(0)
    shapes = [(1001, 64, 1, 64, 5), (500, 32, 64, 128, 5), (250, 16, 128, 256, 5)]
    shapes += [(125, 8, 256, 512, 5), (1001, 64, 64, 64, 3), (500, 32, 128, 128, 3)]
    shapes += [(250, 16, 256, 256, 3), (125, 8, 512, 512, 3), (62, 4, 1024, 1024, 3)]
    shapes += [(31, 2, 2048, 2048, 3)]
    options = {"compiler_options": {"xla_cpu_experimental_ynn_fusion_type": ""}}
    print(
        f"{'(time, freq, in, out, kernel)':32s} {'XLA GFLOP/s':>12s} {'oneDNN':>8s} {'ratio':>6s}"
    )
    for h, w, ci, co, k in shapes:
        x = jnp.asarray(rng.standard_normal((8, h, w, ci)), jnp.float32)
        kernel = jnp.asarray(rng.standard_normal((k, k, ci, co)), jnp.float32)
        ours = jax.jit(functools.partial(same_conv._conv, pad=k // 2), **options)
        p = k // 2
        theirs = jax.jit(functools.partial(onednn.conv, geometry=(1, p, p, p, 1)))
        times = interleaved_best_times(
            {
                "xla": lambda: jax.block_until_ready(ours(x, kernel)),
                "onednn": lambda: jax.block_until_ready(theirs(x, kernel)),
            },
            repeats,
        )
        flops = 2 * 8 * h * w * ci * co * k * k / 1e9
        print(
            f"{str((h, w, ci, co, k)):32s} {flops / times['xla']:12.0f} "
            f"{flops / times['onednn']:8.0f} {times['xla'] / times['onednn']:5.2f}x"
        )


def forward_runs(name: str, seconds: float):
    """The inference forward of ``name`` (as benchmarks/inference.py times it) three ways."""
    import torch

    model = models.get(name)
    samples = int(round(seconds * models.sample_rate(model)))
    variables = models.init(model, jax.random.key(0), samples)
    clips = np.random.default_rng(0).uniform(-0.5, 0.5, (8, samples)).astype(np.float32)

    def compiled(backend):
        forward = lambda v, x: model.apply(v, x)["clipwise_output"]  # noqa: E731
        return models.jit_inference(model, forward, backend).lower(variables, clips).compile()

    xla, on_onednn = compiled("xla"), compiled("onednn")
    err = float(jnp.max(jnp.abs(xla(variables, clips) - on_onednn(variables, clips))))
    print(f"{name}: forward max |oneDNN - XLA| = {err:.2e} (clipwise_output in [0, 1])")
    baseline = torch_baselines.build(name, convert.to_state_dict(variables, model))
    torch_clips = torch.from_numpy(clips)

    def torch_run():
        with torch.inference_mode():
            baseline(torch_clips)

    return {
        "xla": lambda: jax.block_until_ready(xla(variables, clips)),
        "onednn": lambda: jax.block_until_ready(on_onednn(variables, clips)),
        "torch": torch_run,
    }


def train_runs(name: str, seconds: float):
    """benchmarks/train_step.py's steps of ``name`` three ways."""
    model = models.get(name)
    samples = int(round(seconds * models.sample_rate(model)))
    steps = {b: train_step.jax_step(name, 8, samples, "float32", b) for b in ("xla", "onednn")}
    return {**steps, "torch": train_step.torch_step(name, 8, samples)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["Cnn6", "Cnn14"])
    parser.add_argument(
        "--max-channels",
        type=int,
        default=backends.ONEDNN_MAX_CHANNELS,
        help="the widest conv (output channels) handed to oneDNN",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", action="store_true", help="also time each conv shape alone")
    args = parser.parse_args()
    if jax.default_backend() != "cpu":
        sys.exit("this benchmark compares CPU kernels: run it where JAX's backend is the CPU")
    backends.ONEDNN_MAX_CHANNELS = args.max_channels  # This process only: a binary's setting.
    onednn.load()
    check_kernels()
    print(load_line())
    if args.layers:
        layer_table(args.repeats)
    for name in args.models:
        for what, runs, seconds in (
            ("forward 8 x 10 s", forward_runs, 10.0),
            ("train step 8 x 5 s", train_runs, 5.0),
        ):
            times = interleaved_best_times(runs(name, seconds), args.repeats)
            xla, dnnl, torch = times["xla"], times["onednn"], times["torch"]
            print(
                f"{name} {what}: XLA {xla:.3f} s, oneDNN {dnnl:.3f} s, PyTorch {torch:.3f} s "
                f"-> oneDNN/XLA {xla / dnnl:.2f}x; vs PyTorch: XLA {torch / xla:.2f}x, "
                f"oneDNN {torch / dnnl:.2f}x",
                flush=True,
            )
    print(load_line())


if __name__ == "__main__":
    main()
