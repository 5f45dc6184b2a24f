"""What oneDNN's convolutions would buy over XLA:CPU's: same-process A/B timings.

    pip install onednn-cpu-gomp onednn-devel-cpu-gomp     # oneDNN 3.2 (GNU OpenMP), headers
    python benchmarks/onednn_conv.py                      # Cnn6 and Cnn14: forward, train step
    python benchmarks/onednn_conv.py --models Cnn6 --layers   # and each conv shape alone

XLA:CPU in jax 0.10.2 hands no convolution to oneDNN (its oneDNN options are accepted and do
nothing; benchmarks/train_step.py says how that was checked). This script compiles
onednn_conv.cc (oneDNN's forward, backward-data and backward-weights convolutions as jax.ffi
handlers) with g++ into a temporary directory, swaps them in for the convolution and CPU
gradients of ``panns_jax.models.same_conv`` and ``fast1d`` (1-D convs as 2-D ones of width 1)
on convs of at most
``--max-channels`` output channels (wider ones ran slower on oneDNN, whose calls here
reorder the weights every time), checks the three against XLA's on a small conv and the
swapped forward against XLA's, and times XLA's model, the swapped one and the PyTorch
baseline, interleaved. A measurement for deciding
whether to ship such a kernel, not a code path of the library.

On a 2-core AMD EPYC (Zen 5), batch 8, float32, one run (load 0.6-1.7, its own; malloc tuned
for both sides, as panns_jax.main runs): the 3x3 and 5x5 convs of 64-512 output channels run
1.22-1.56x faster on oneDNN, those of 1024 and 2048 channels 0.56x and 0.43x (each call also
reorders their 38 and 151 MB of weights), Cnn6's 1-channel first conv 0.89x. With
--max-channels 512: Cnn6's forward 1.22x XLA's speed (1.27x PyTorch's, XLA's 1.04x) and its
train step 1.26x (1.16x PyTorch's, XLA's 0.92x); Cnn14's forward 1.22x (1.21x PyTorch's,
XLA's 0.99x) and train step 1.21x (1.21x PyTorch's, XLA's 1.00x); ResNet22 1.21x / 1.18x,
Wavegram-Logmel-Cnn14 1.24x / 1.15x. Outputs agree with XLA's to 2.4e-7 (Cnn6) and 6e-8
(Cnn14). LeeNet24's 1-D convs, as 2-D convs of width 1, ran 0.34x (forward) and 0.49x (train
step) of XLA's speed: the 1-D trunks would need oneDNN's own 1-D layouts or other kernels.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import subprocess
import sys
import tempfile
from typing import Tuple

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
from panns_jax.models import fast1d, same_conv  # noqa: E402

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "onednn_conv.cc")
TARGETS = ("OnednnConv", "OnednnConvBackwardData", "OnednnConvBackwardWeights")


def build_and_register() -> None:
    """Compile onednn_conv.cc against the installed oneDNN and register its handlers."""
    import ctypes

    include, lib = os.path.join(sys.prefix, "include"), os.path.join(sys.prefix, "lib")
    if not os.path.exists(os.path.join(include, "oneapi", "dnnl", "dnnl.hpp")):
        sys.exit("oneDNN not found: pip install onednn-cpu-gomp onednn-devel-cpu-gomp")
    library = os.path.join(tempfile.mkdtemp(prefix="onednn_conv_"), "onednn_conv.so")
    command = ["g++", "-O2", "-std=c++17", "-shared", "-fPIC", "-w"]
    command += [f"-I{jax.ffi.include_dir()}", f"-I{include}", SOURCE, "-o", library]
    command += [f"-L{lib}", "-ldnnl", f"-Wl,-rpath,{lib}"]
    subprocess.run(command, check=True)
    handle = ctypes.cdll.LoadLibrary(library)
    for target in TARGETS:
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(handle, target)), "cpu")


def _call(target: str, like, *args: jax.Array, geometry: Tuple[int, ...]) -> jax.Array:
    names = ("stride", "pad_top", "pad_bottom", "pad_w", "dilation")
    attributes = {name: np.int64(value) for name, value in zip(names, geometry)}
    return jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(like.shape, jnp.float32))(
        *args, **attributes
    )


def _conv4d(x: jax.Array, w: jax.Array, geometry: Tuple[int, ...]) -> jax.Array:
    stride, top, bottom, pad_w, dilation = geometry
    n, h, width, _ = x.shape
    kh, kw, _, out = w.shape
    length = (h + top + bottom - (kh - 1) * dilation - 1) // stride + 1
    shape = jax.ShapeDtypeStruct((n, length, width + 2 * pad_w - kw + 1, out), jnp.float32)
    return _call("OnednnConv", shape, x, w, geometry=geometry)


def _grads4d(x, w, dy, geometry):
    dx = _call("OnednnConvBackwardData", x, dy, w, geometry=geometry)
    return dx, _call("OnednnConvBackwardWeights", w, x, dy, geometry=geometry)


def onednn_conv(x: jax.Array, w: jax.Array, pad: int) -> jax.Array:
    """same_conv's convolution (NHWC x HWIO, stride 1, ``pad`` zeros around) on oneDNN."""
    return _conv4d(x, w, (1, pad, pad, pad, 1))


def onednn_grads(x, w, dy, pad):
    return _grads4d(x, w, dy, (1, pad, pad, pad, 1))


def _as_2d(geometry) -> Tuple[int, ...]:
    stride, (left, right), dilation = geometry
    return (stride, left, right, 0, dilation)


def onednn_conv1d(x: jax.Array, w: jax.Array, geometry) -> jax.Array:
    """fast1d's convolution (NWC x WIO, its geometry) on oneDNN, as a 2-D conv of width 1."""
    return _conv4d(x[:, :, None], w[:, None], _as_2d(geometry))[:, :, 0]


def onednn_grads1d(x, w, dy, geometry):
    dx, dw = _grads4d(x[:, :, None], w[:, None], dy[:, :, None], _as_2d(geometry))
    return dx[:, :, 0], dw[:, 0]


def _static_argument(static: tuple, named: dict):
    """The one static argument, which the modules pass by position or keyword (pad=,
    geometry=)."""
    (value,) = static or tuple(named.values())
    return value


@contextlib.contextmanager
def onednn_convolutions(max_channels: int):
    """Within: models traced here run same_conv's and fast1d's convs of at most
    ``max_channels`` outputs on oneDNN (the other platforms' branches keep XLA's conv)."""
    saved = []

    def swap(module, conv_fn, grads_fn):
        conv, cpu_grads = module._conv, module._cpu_grads
        saved.append((module, conv, cpu_grads, module._xla_grads))

        def swapped_conv(x, w, *static, **named):
            geometry = _static_argument(static, named)
            fits = w.shape[-1] <= max_channels
            return conv_fn(x, w, geometry) if fits else conv(x, w, geometry)

        def swapped_grads(x, w, dy, *static, **named):
            geometry = _static_argument(static, named)
            fits = w.shape[-1] <= max_channels
            return grads_fn(x, w, dy, geometry) if fits else cpu_grads(x, w, dy, geometry)

        def xla_grads(x, w, dy, *static, **named):
            geometry = _static_argument(static, named)
            return jax.vjp(lambda x, w: conv(x, w, geometry), x, w)[1](dy)

        module._conv, module._cpu_grads, module._xla_grads = swapped_conv, swapped_grads, xla_grads

    swap(same_conv, onednn_conv, onednn_grads)
    swap(fast1d, onednn_conv1d, onednn_grads1d)
    try:
        yield
    finally:
        for module, conv, cpu_grads, xla_grads in saved:
            module._conv, module._cpu_grads, module._xla_grads = conv, cpu_grads, xla_grads


def check_kernels() -> None:
    """The kernels against XLA's convolution and its gradients: one 2-D conv of same_conv and
    one strided, dilated, unevenly padded 1-D conv of fast1d."""
    rng = np.random.default_rng(0)
    cases = [
        ("2-D", same_conv._conv, onednn_conv, onednn_grads, (2, 12, 9, 16), (5, 5, 16, 32), 2),
        (
            "1-D",
            fast1d._conv,
            onednn_conv1d,
            onednn_grads1d,
            (2, 50, 16),
            (3, 16, 32),
            (2, (3, 1), 2),
        ),
    ]
    for label, xla_conv, conv, grads, x_shape, w_shape, geometry in cases:
        x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
        w = jnp.asarray(rng.standard_normal(w_shape), jnp.float32)
        y, vjp = jax.vjp(lambda x, w: xla_conv(x, w, geometry), x, w)
        dy = jnp.asarray(rng.standard_normal(y.shape), jnp.float32)
        got = (conv(x, w, geometry), *grads(x, w, dy, geometry))
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
        theirs = jax.jit(functools.partial(onednn_conv, pad=k // 2))
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


def forward_runs(name: str, seconds: float, max_channels: int):
    """The inference forward of ``name`` (as benchmarks/inference.py times it) three ways."""
    import torch

    model = models.get(name)
    samples = int(round(seconds * models.sample_rate(model)))
    variables = models.init(model, jax.random.key(0), samples)
    clips = np.random.default_rng(0).uniform(-0.5, 0.5, (8, samples)).astype(np.float32)

    def compiled():
        fn = jax.jit(lambda v, x: model.apply(v, x)["clipwise_output"], **models.jit_options(model))
        return fn.lower(variables, clips).compile()

    xla = compiled()
    with onednn_convolutions(max_channels):
        onednn = compiled()
    err = float(jnp.max(jnp.abs(xla(variables, clips) - onednn(variables, clips))))
    print(f"{name}: forward max |oneDNN - XLA| = {err:.2e} (clipwise_output in [0, 1])")
    baseline = torch_baselines.build(name, convert.to_state_dict(variables, model))
    torch_clips = torch.from_numpy(clips)

    def torch_run():
        with torch.inference_mode():
            baseline(torch_clips)

    return {
        "xla": lambda: jax.block_until_ready(xla(variables, clips)),
        "onednn": lambda: jax.block_until_ready(onednn(variables, clips)),
        "torch": torch_run,
    }


def train_runs(name: str, seconds: float, max_channels: int):
    """benchmarks/train_step.py's steps of ``name`` three ways (the jax ones traced here)."""
    model = models.get(name)
    samples = int(round(seconds * models.sample_rate(model)))
    xla = train_step.jax_step(name, 8, samples, "float32")
    xla()
    with onednn_convolutions(max_channels):
        onednn = train_step.jax_step(name, 8, samples, "float32")
        onednn()
    return {"xla": xla, "onednn": onednn, "torch": train_step.torch_step(name, 8, samples)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["Cnn6", "Cnn14"])
    parser.add_argument("--max-channels", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", action="store_true", help="also time each conv shape alone")
    args = parser.parse_args()
    if jax.default_backend() != "cpu":
        sys.exit("this benchmark compares CPU kernels: run it where JAX's backend is the CPU")
    build_and_register()
    check_kernels()
    print(load_line())
    if args.layers:
        layer_table(args.repeats)
    for name in args.models:
        for what, runs, seconds in (
            ("forward 8 x 10 s", forward_runs, 10.0),
            ("train step 8 x 5 s", train_runs, 5.0),
        ):
            times = interleaved_best_times(runs(name, seconds, args.max_channels), args.repeats)
            xla, onednn, torch = times["xla"], times["onednn"], times["torch"]
            print(
                f"{name} {what}: XLA {xla:.3f} s, oneDNN {onednn:.3f} s, PyTorch {torch:.3f} s "
                f"-> oneDNN/XLA {xla / onednn:.2f}x; vs PyTorch: XLA {torch / xla:.2f}x, "
                f"oneDNN {torch / onednn:.2f}x",
                flush=True,
            )
    print(load_line())


if __name__ == "__main__":
    main()
