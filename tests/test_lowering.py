"""Every family's steps lower for GPU and TPU, and no CPU-only path leaks into those modules.

The train step (float32 and bfloat16), the eval step and the inference forward of one member
of every family, and of Cnn14 at the paper's batch (32 mixup pairs of 10 s clips), are
lowered for ``cpu``, ``cuda`` and ``tpu`` with the data-parallel and FSDP shardings of an
abstract 8-device mesh (tests/lowering_utils.py). Nothing is compiled or allocated. A
``cuda`` or ``tpu`` module may hold none of the operations that only the CPU branches of
``lax.platform_dependent`` emit (:func:`lowering_utils.cpu_only_ops`), and every ``cpu``
module must hold those its model's CPU branches emit, so that the markers are known to match
what they look for. The negative controls put each CPU branch on the default branch and
check that the leak is caught. Last, ``benchmarks/accelerator.py --dry-run`` (what to run the
day a GPU is at hand) runs here on tiny shapes, so that the script itself is known to work.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
from typing import Any, Dict, Iterable, Optional

import jax
import lowering_utils as lu
import pytest

LOGMEL_CONV = {"example slice", "col2im", "kernel product"}
# fast1d's product gradients on 1-D convs and its max-pool gradient.
WAVEFORM = {"example slice", "col2im", "kernel product", "first max"}
# The CPU-only operations each family's cpu train step holds: BatchNorm's unrolled batch sums
# everywhere, same_conv's product gradients on 2-D convs, depthwise taps in the MobileNets.
CPU_TRAIN_OPS = {
    "Cnn14": LOGMEL_CONV,
    "ResNet22": LOGMEL_CONV,
    "MobileNetV1": LOGMEL_CONV | {"depthwise tap"},
    "MobileNetV2": LOGMEL_CONV | {"depthwise tap"},
    "Res1dNet31": WAVEFORM,
    "LeeNet11": WAVEFORM,
    "DaiNet19": WAVEFORM,
    "Wavegram_Logmel_Cnn14": LOGMEL_CONV | {"first max"},
    "Cnn14_DecisionLevelAtt": LOGMEL_CONV,
}
# The forward passes of the MobileNets run the depthwise CPU branch; no other family's does.
CPU_FORWARD_OPS = {"MobileNetV1": {"depthwise tap"}, "MobileNetV2": {"depthwise tap"}}
SHARDINGS = {"data-parallel": None, "fsdp": lu.FSDP_MIN_SIZE}
# Tiny shapes for the families: 4 mixup pairs (8 clips, one per device) of 1 s.
TINY = dict(batch_size=4, eval_batch_size=8)


def check_lowerings(
    name: str, config_overrides: Dict[str, Any], clip_seconds: float, sharding: str
) -> Dict[str, Dict[str, str]]:
    """Lower the steps of ``name`` for every platform and check each module; returns the
    texts as ``{step: {platform: text}}``."""
    config = lu.family_config(name, fsdp_min_size=SHARDINGS[sharding], **config_overrides)
    steps = lu.Steps(config, lu.abstract_mesh(), clip_seconds=clip_seconds)
    if sharding == "fsdp":
        assert steps.sharded, "FSDP sharded no parameter: the FSDP lowering would test nothing"
    texts: Dict[str, Dict[str, str]] = {}
    for step, traced in steps.traced().items():
        texts[step] = {platform: lu.lower_text(traced, platform) for platform in lu.PLATFORMS}
        for platform, text in texts[step].items():
            assert f"mhlo.num_partitions = {lu.MESH_DEVICES}" in text, (step, platform)
            expected = CPU_TRAIN_OPS[name] if step == "train" else CPU_FORWARD_OPS.get(name, set())
            found = lu.cpu_only_ops(text)
            if platform == "cpu":
                missing = expected - set(found)
                assert not missing, f"{name} {step} cpu module lacks its CPU ops {missing}"
            else:
                assert_no_cpu_ops(text, f"{name} {step} {platform}")
                if name in CPU_FORWARD_OPS:  # The default branch: XLA's grouped convolution.
                    groups = re.findall(r"feature_group_count = (\d+)", text)
                    assert max(map(int, groups)) > 1, f"{name} {step} {platform}: no depthwise conv"
    return texts


def assert_no_cpu_ops(text: str, what: str) -> None:
    """Fail, naming them, if the module ``text`` holds CPU-only operations."""
    found = lu.cpu_only_ops(text)
    assert not found, f"CPU-only operations in the {what} module: {found}"


@pytest.mark.parametrize(
    "name, dtype, sharding",
    [(name, "float32", "data-parallel") for name in lu.FAMILIES]
    + [(name, "bfloat16", "fsdp") for name in lu.FAMILIES],
)
def test_family_steps_lower_for_every_platform(name, dtype, sharding):
    texts = check_lowerings(name, {**TINY, "compute_dtype": dtype}, 1.0, sharding)
    if dtype == "bfloat16":
        assert "bf16" in texts["train"]["cuda"], "the bfloat16 step computes nothing in bf16"


@pytest.mark.parametrize("sharding", list(SHARDINGS))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cnn14_at_the_papers_batch_lowers_for_every_platform(dtype, sharding):
    # The paper's step: 32 pairs mixed on the log-mel (64 clips) of 10 s; inference at 64.
    config = {"compute_dtype": dtype, "eval_batch_size": 64}
    texts = check_lowerings("Cnn14", config, 10.0, sharding)
    assert "tensor<64x320000xf32>" in texts["train"]["tpu"]
    assert "tensor<64x320000xf32>" in texts["forward"]["cuda"]


def _swapped_platform_dependent(module: Optional[str], original: Any) -> Any:
    """``lax.platform_dependent`` whose default branch is the CPU branch, for the CPU
    branches defined in ``module`` (a module name; None: all of them)."""

    def patched(*args: Any, cpu: Any = None, default: Any = None, **branches: Any) -> Any:
        target = cpu.func if isinstance(cpu, functools.partial) else cpu
        if cpu is not None and (module is None or target.__module__ == module):
            default = cpu
        return original(*args, cpu=cpu, default=default, **branches)

    return patched


@pytest.mark.parametrize(
    "module, name, kinds",
    [
        ("panns_jax.models.layers", "ResNet22", {"example slice"}),
        ("panns_jax.models.same_conv", "Cnn14", {"col2im", "kernel product"}),
        ("panns_jax.models.depthwise", "MobileNetV1", {"depthwise tap"}),
        ("panns_jax.models.fast1d", "LeeNet11", {"col2im", "kernel product", "first max"}),
    ],
)
def test_a_cpu_branch_on_the_default_branch_is_caught(monkeypatch, module, name, kinds):
    monkeypatch.setattr(
        jax.lax,
        "platform_dependent",
        _swapped_platform_dependent(module, jax.lax.platform_dependent),
    )
    config = lu.family_config(name, **TINY)
    steps = lu.Steps(config, lu.abstract_mesh(), clip_seconds=1.0)
    for platform in ("cuda", "tpu"):
        text = lu.lower_text(steps.traced()["train"], platform)
        with pytest.raises(AssertionError, match="CPU-only operations") as caught:
            assert_no_cpu_ops(text, f"{name} train {platform}")
        assert kinds <= set(lu.cpu_only_ops(text)), caught.value


def _kinds(texts: Iterable[str]) -> set:
    return set().union(*(lu.cpu_only_ops(text) for text in texts))


def test_the_markers_do_not_match_the_default_branches_run_on_cpu(monkeypatch):
    # Every platform_dependent call forced onto its default branch, lowered for the CPU:
    # the same module a GPU gets, so the markers must find nothing in it either, while the
    # CPU branches of the same steps hold every kind.
    names = ("MobileNetV1", "LeeNet11")

    def train_texts() -> list:
        return [
            lu.lower_text(
                lu.Steps(
                    lu.family_config(name, **TINY), lu.abstract_mesh(), clip_seconds=1.0
                ).traced()["train"],
                "cpu",
            )
            for name in names
        ]

    assert _kinds(train_texts()) == set(lu.MARKERS)

    original = jax.lax.platform_dependent

    def default_only(*args, cpu=None, default=None, **branches):
        return original(*args, cpu=default, default=default, **branches)

    monkeypatch.setattr(jax.lax, "platform_dependent", default_only)
    assert _kinds(train_texts()) == set()


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow  # 40 s of compiling; .ci/run runs it in its slow step.
def test_accelerator_benchmark_dry_run():
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    script = os.path.join(ROOT, "benchmarks", "accelerator.py")
    done = subprocess.run(
        [sys.executable, script, "--dry-run"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {
        "train bfloat16": r"train bfloat16 +([\d.]+) clips/s +([\d.]+)% ",
        "train float32": r"train float32 +([\d.]+) clips/s +([\d.]+)% ",
        "inference": r"inference float32 \(batch 4\) +([\d.]+) clips/s +([\d.]+)% ",
        "input pipeline": r"input pipeline \(\d+ host cores\) +([\d.]+) clips/s",
    }
    for what, pattern in rows.items():
        match = re.search(pattern, done.stdout)
        assert match, f"no {what} row in:\n{done.stdout}"
        assert all(float(v) > 0 for v in match.groups()), match.group(0)
