"""oneDNN's convolution kernels: float32 round-off bounds against float64, the build and its
cache, and one-line errors when they cannot be built."""

from __future__ import annotations

import functools
import importlib.metadata
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from onednn_utils import pad_one_row_lower
from roundoff import as_dtype, conv_bounds, conv_exact, conv_results, random, run, worst_ratio

from panns_jax.kernels import onednn
from panns_jax.models import backends, fast1d, same_conv

# (input shape, kernel shape, geometry): same_conv's 2-D convs (pad) and fast1d's 1-D convs
# ((stride, (left, right), dilation)) with the models' shapes in small.
CASES = {
    "2-D first conv, one input channel": ((2, 20, 16, 1), (3, 3, 1, 32), 1),
    "2-D 3x3, tiny map": ((2, 6, 4, 16), (3, 3, 16, 24), 1),
    "2-D 3x3, large map": ((2, 20, 16, 16), (3, 3, 16, 8), 1),
    "2-D 5x5": ((2, 20, 16, 16), (5, 5, 16, 8), 2),
    "2-D 1x1": ((2, 12, 8, 16), (1, 1, 16, 32), 0),
    "1-D k3": ((2, 40, 8), (3, 8, 16), (1, (1, 1), 1)),
    "1-D k3 dilation 2": ((2, 40, 8), (3, 8, 16), (1, (2, 2), 2)),
    "1-D k1": ((2, 30, 8), (1, 8, 4), (1, (0, 0), 1)),
    "1-D k11 stride 5": ((2, 101, 1), (11, 1, 8), (5, (5, 5), 1)),
    "1-D k20 stride 4 unpadded": ((2, 120, 1), (20, 1, 8), (4, (0, 0), 1)),
}


def _case(name: str):
    """(our conv, its plain lax twin, float32-exact inputs, sum lengths) of a case."""
    x_shape, w_shape, geometry = CASES[name]
    x, w = random(np.random.default_rng(0), x_shape, w_shape)
    if len(x_shape) == 4:
        pad = geometry
        ours = functools.partial(same_conv.same_conv, pad=pad)
        plain = functools.partial(same_conv._conv, pad=pad)
    else:
        ours = functools.partial(fast1d.conv, geometry=geometry)
        plain = functools.partial(fast1d._conv, geometry=geometry)
    y = jax.eval_shape(plain, jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32))
    (dy,) = random(np.random.default_rng(1), y.shape)
    taps, ci, co = int(np.prod(w_shape[:-2])), w_shape[-2], w_shape[-1]
    terms = (taps * ci, taps * co, int(np.prod(y.shape[:-1])))
    return ours, plain, [x, w, dy], terms


@pytest.fixture(scope="module")
def exact():
    """Each case's float64 results (XLA's conv and autodiff) and absolute-value scales."""
    return {name: conv_exact(_case(name)[1], *_case(name)[2]) for name in CASES}


def _on_onednn(conv, args):
    """``conv``'s forward and gradients traced with the oneDNN backend, and its jaxpr."""
    with backends.tracing_with("onednn"):  # run() and make_jaxpr trace afresh inside.
        got = run(functools.partial(conv_results, conv), *args)
        jaxpr = str(jax.make_jaxpr(functools.partial(conv_results, conv))(*args))
    return got, jaxpr


@pytest.mark.parametrize("name", list(CASES))
def test_kernels_meet_float32_roundoff_bound(exact, name):
    conv, _, args, terms = _case(name)
    got, jaxpr = _on_onednn(conv, as_dtype(args, jnp.float32))
    for target in onednn.TARGETS:  # All three results came from oneDNN.
        assert f"target_name={target}" in jaxpr
    reference, scales = exact[name]
    assert worst_ratio(got, reference, conv_bounds(scales, terms, np.float32)) <= 1


@pytest.mark.parametrize("name", ["2-D 3x3, large map", "1-D k3 dilation 2"])
def test_kernels_with_padding_off_by_one_fail_the_bound(monkeypatch, exact, name):
    """Negative control: the kernels given one more row of padding above and one fewer below
    (the same output shape) break the bound."""
    pad_one_row_lower(monkeypatch)
    conv, _, args, terms = _case(name)
    got, _ = _on_onednn(conv, as_dtype(args, jnp.float32))
    reference, scales = exact[name]
    bounds = conv_bounds(scales, terms, np.float32)
    for result in range(3):  # The forward pass and both gradients each fail.
        one = slice(result, result + 1)
        assert worst_ratio(got[one], reference[one], bounds[one]) > 1


def test_xla_equivalent_is_the_plain_convolution_and_its_gradients(exact):
    """The float64 twin that tests/float64_decisions.py runs for each oneDNN call."""
    name = "1-D k11 stride 5"
    _, plain, args, _ = _case(name)
    geometry = (5, 5, 5, 0, 1)
    with jax.enable_x64(True):
        x, w, dy = as_dtype(args, jnp.float64)
        got = [
            onednn.xla_equivalent("OnednnConv", (x, w), geometry, None),
            onednn.xla_equivalent("OnednnConvBackwardData", (dy, w), geometry, x.shape),
            onednn.xla_equivalent("OnednnConvBackwardWeights", (x, dy), geometry, w.shape),
        ]
    for ours, reference in zip(got, exact[name][0]):
        np.testing.assert_array_equal(np.asarray(ours), reference)
    with pytest.raises(ValueError, match="OnednnConv"):
        onednn.xla_equivalent("Other", (x, w), geometry, None)


def test_a_kernel_error_is_a_python_exception():
    """oneDNN refusing a geometry (dilation 0) raises in Python; the process goes on."""
    x, w = jnp.ones((1, 8, 4, 2)), jnp.ones((3, 3, 2, 2))
    onednn.load()
    with pytest.raises(Exception, match="oneDNN: could not create a primitive descriptor"):
        jax.block_until_ready(jax.jit(lambda x, w: onednn.conv(x, w, (1, 0, 0, 0, 0)))(x, w))
    assert float(jax.jit(lambda x, w: onednn.conv(x, w, (1, 1, 1, 1, 1)))(x, w)[0, 3, 1, 0]) == 18


# ----------------------------------------------------------------------------
# The build: once per version into the user cache, and what a user sees when it cannot be.
# ----------------------------------------------------------------------------


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """An empty user cache and a process that has not loaded the kernel yet."""
    monkeypatch.setenv("PANNS_JAX_HOME", str(tmp_path))
    monkeypatch.setattr(onednn, "_loaded", None)
    return tmp_path


def test_the_kernel_is_built_once_into_the_user_cache(fresh_cache, monkeypatch):
    compiled = []
    compile_ = onednn._compile
    monkeypatch.setattr(onednn, "_compile", lambda path: compiled.append(compile_(path)))
    path = onednn.load()
    assert os.path.dirname(path) == str(fresh_cache / "kernels")
    assert len(compiled) == 1 and os.path.getsize(path) > 0
    assert onednn.load() == path and len(compiled) == 1  # This process: loaded already.
    monkeypatch.setattr(onednn, "_loaded", None)  # Another process: built already.
    assert onednn.load() == path and len(compiled) == 1
    assert sorted(os.listdir(fresh_cache / "kernels")) == sorted(
        [os.path.basename(path), os.path.basename(path) + ".lock"]
    )


def test_the_library_path_follows_source_and_versions(fresh_cache, monkeypatch):
    path = onednn.library_path()
    monkeypatch.setattr(onednn, "_source", lambda: b"// another kernel")
    assert onednn.library_path() != path
    monkeypatch.undo()
    monkeypatch.setenv("PANNS_JAX_HOME", str(fresh_cache))
    monkeypatch.setattr(jax, "__version__", "0.0.0")
    assert onednn.library_path() != path


def test_processes_building_at_once_compile_once(fresh_cache):
    script = textwrap.dedent(
        """
        from panns_jax.kernels import onednn
        compile_ = onednn._compile
        def counted(path):
            print("compiled")
            compile_(path)
        onednn._compile = counted
        print(onednn.load())
        """
    )
    env = {**os.environ, "PANNS_JAX_HOME": str(fresh_cache)}
    procs = [
        subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=600)[0].split() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert sum(out.count("compiled") for out in outputs) == 1
    assert outputs[0][-1] == outputs[1][-1] and os.path.exists(outputs[0][-1])


def _one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_missing_onednn_says_how_to_install_it(fresh_cache, monkeypatch):
    files = importlib.metadata.files

    def without_onednn(distribution):
        if distribution.startswith("onednn"):
            raise importlib.metadata.PackageNotFoundError(distribution)
        return files(distribution)

    monkeypatch.setattr(importlib.metadata, "files", without_onednn)
    with pytest.raises(onednn.OneDnnUnavailable) as error:
        onednn.load()
    assert _one_line(error) == "oneDNN is not installed: pip install 'panns-jax[onednn]'"


def test_missing_compiler_is_named(fresh_cache, monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler")
    with pytest.raises(onednn.OneDnnUnavailable) as error:
        onednn.load()
    assert "needs a C++ compiler" in _one_line(error) and "'no-such-compiler'" in str(error.value)
    assert onednn._loaded is None


def test_a_failed_build_leaves_no_library_and_the_next_one_builds(fresh_cache, monkeypatch):
    fails = fresh_cache / "failing-compiler"
    fails.write_text("#!/bin/sh\necho 'error: this compiler refuses' >&2\nexit 1\n")
    fails.chmod(0o755)
    monkeypatch.setenv("CXX", str(fails))
    with pytest.raises(onednn.OneDnnUnavailable) as error:
        onednn.load()
    assert _one_line(error) == "building oneDNN's kernel failed: error: this compiler refuses"
    assert not [f for f in os.listdir(fresh_cache / "kernels") if not f.endswith(".lock")]
    monkeypatch.delenv("CXX")
    assert os.path.exists(onednn.load())


def test_an_unwritable_cache_is_one_line(fresh_cache, monkeypatch):
    blocked = fresh_cache / "file"
    blocked.write_text("not a directory")
    monkeypatch.setenv("PANNS_JAX_HOME", str(blocked))
    with pytest.raises(onednn.OneDnnUnavailable) as error:
        onednn.load()
    assert _one_line(error).startswith(f"cannot build oneDNN's kernel into {blocked}/kernels (")
    assert str(error.value).endswith("set PANNS_JAX_HOME to a writable directory")
