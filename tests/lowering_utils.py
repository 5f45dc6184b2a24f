"""Lowering the training and inference steps for platforms this machine does not have.

``jax.jit(...).trace(...).lower(lowering_platforms=...)`` emits the StableHLO module that a
GPU (``cuda``) or TPU would compile, without such a device and without compiling. The state
and the batches are abstract (``jax.eval_shape``, ``jax.ShapeDtypeStruct``) and their
shardings name an abstract 8-device mesh, so even the paper's batch of Cnn14 allocates
nothing. :func:`cpu_only_ops` reads a module for the operations that only the CPU branches of
``lax.platform_dependent`` emit (``models/layers.py``, ``same_conv.py``, ``depthwise.py``).
"""

from __future__ import annotations

import collections
import importlib
import re
from typing import Any, Dict, Tuple

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import AbstractMesh, NamedSharding
from jax.sharding import PartitionSpec as P

from panns_jax import model_builder, recipe, tasks, train

PLATFORMS = ("cpu", "cuda", "tpu")
MESH_DEVICES = 8
# One member of every family: the config file and its argument (None: the paper's recipe).
FAMILIES = {
    "Cnn14": ("cnn14", None),
    "ResNet22": ("resnet22", None),
    "MobileNetV1": ("mobilenetv1", None),
    "MobileNetV2": ("mobilenetv2", None),
    "Res1dNet31": ("res1dnet31", None),
    "LeeNet11": ("leenet11", None),
    "DaiNet19": ("dainet19", None),
    "Wavegram_Logmel_Cnn14": ("wavegram_logmel_cnn14", None),
    "Cnn14_DecisionLevelAtt": ("cnn14", "head=att"),
}
# Elements from which FSDP shards a parameter: small enough that every family shards some.
FSDP_MIN_SIZE = 2**14


def family_config(name: str, **overrides: Any) -> ml_collections.ConfigDict:
    """The config file of family member ``name`` (``configs/``), with ``overrides`` set."""
    module, arg = FAMILIES[name]
    config = importlib.import_module(f"configs.{module}").get_config(arg)
    if config.model != name:
        raise AssertionError(f"configs/{module}.py:{arg} trains {config.model}, not {name}")
    config.update(overrides)
    return config


def abstract_mesh() -> AbstractMesh:
    """A 1-D 'data' mesh of ``MESH_DEVICES`` devices that need not exist."""
    return AbstractMesh((MESH_DEVICES,), ("data",))


class Steps:
    """The jitted train step, eval step and inference forward of a config, with abstract
    arguments sharded as ``panns_jax.train`` shards them (FSDP from ``fsdp_min_size``)."""

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        mesh: AbstractMesh,
        *,
        clip_seconds: float,
        num_classes: int = 527,
    ) -> None:
        builder = model_builder.for_config(config)
        task = tasks.get(config.get("task"))
        self.model = builder.build(num_classes, output=task.output)
        optimizer = train.make_optimizer(config, builder)
        samples = int(round(clip_seconds * builder.sample_rate()))
        init = lambda rng: train._init_state(rng, None, builder, self.model, optimizer, samples)
        shapes = jax.eval_shape(init, jax.random.key(0))
        shardings = train.param_sharding(mesh, shapes, config.get("fsdp_min_size"))
        self.state = jax.tree_util.tree_map(
            lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings
        )
        self.sharded = [s.spec for s in jax.tree_util.tree_leaves(shardings) if s.spec != P()]
        rows, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
        spec = lambda n, w: jax.ShapeDtypeStruct((n, w), jnp.float32, sharding=rows)
        n = recipe.examples_per_step(config)
        self.batch = {"audio": spec(n, samples), "labels": spec(n, num_classes)}
        self.eval_audio = spec(config.eval_batch_size, samples)
        state_shardings = jax.tree_util.tree_map(lambda s: s.sharding, self.state)
        self.train_step = jax.jit(
            train.make_train_step(self.model, optimizer, task, recipe.mixup_alpha(config)),
            in_shardings=(state_shardings, rows),
            out_shardings=(state_shardings, replicated),
            donate_argnums=0,
        )
        self.eval_step = jax.jit(
            train.make_eval_step(self.model, task),
            in_shardings=(state_shardings.params, state_shardings.batch_stats, rows),
            out_shardings=rows,
        )
        model = self.model
        self.forward = jax.jit(
            lambda variables, audio: model.apply(variables, audio),
            in_shardings=(
                {"params": state_shardings.params, "batch_stats": state_shardings.batch_stats},
                rows,
            ),
        )

    def traced(self) -> Dict[str, Any]:
        """``{'train', 'eval', 'forward'}``: each jitted function traced on its arguments."""
        variables = {"params": self.state.params, "batch_stats": self.state.batch_stats}
        return {
            "train": self.train_step.trace(self.state, self.batch),
            "eval": self.eval_step.trace(
                self.state.params, self.state.batch_stats, self.eval_audio
            ),
            "forward": self.forward.trace(variables, self.eval_audio),
        }


def lower_text(traced: Any, platform: str) -> str:
    """The StableHLO text of ``traced`` lowered for ``platform`` alone (no compilation)."""
    return traced.lower(lowering_platforms=(platform,)).as_text()


# ----------------------------------------------------------------------------
# What only the CPU branches emit.
# ----------------------------------------------------------------------------

# The kinds that :func:`cpu_only_ops` counts.
MARKERS = ("example slice", "col2im", "kernel product", "depthwise tap", "first max")
_SLICE = re.compile(
    r"stablehlo\.slice %\S+ \[([^\]]*)\] : \(tensor<([0-9x]+)x\w+>\) -> tensor<([0-9x]+)x\w+>"
)
_DEF = re.compile(r"^\s*(%[\w#]+) = (stablehlo\.\w+)(.*)$")
_CONTRACTED = re.compile(r"contracting_dims = (\[[\d, ]*\] x \[[\d, ]*\])")
_WINDOW_TEST = re.compile(r"stablehlo\.compare\s+EQ, .*, SIGNED : \(tensor<\d+x\d+x\d+xi32>")
_RESHAPE = re.compile(r"stablehlo\.reshape (%[\w#]+) : .* -> tensor<([0-9x]+)x\w+>")


def _dims(text: str) -> Tuple[int, ...]:
    return tuple(int(d) for d in text.split("x"))


def cpu_only_ops(module_text: str) -> Dict[str, int]:
    """How many operations of each CPU-only kind ``module_text`` holds (none: an empty dict).

    * ``example slice``: one example sliced out of a batch (``[i:i+1, ...]`` of an array of
      rank 3 or more): the batch sums unrolled example by example of BatchNorm's backward
      (``layers._channel_sums``) and of the depthwise weight gradient.
    * ``col2im``: a matrix product reshaped into a rank-6 array, the per-tap columns of
      ``same_conv``'s input gradient, or one contracting both operands' second axes
      reshaped into a rank-3 array, those of ``fast1d``'s.
    * ``kernel product``: a matrix product contracting its operands' first axes whose result
      is reshaped into a convolution kernel larger than 1x1 (or, in 1-D, than 1):
      ``same_conv``'s and ``fast1d``'s weight gradients (im2col, unfolded). A 1x1 kernel's
      product is the pointwise conv, which every platform runs.
    * ``first max``: an equality test of a rank-3 integer array, the window positions of
      ``fast1d``'s max-pool gradient.
    * ``depthwise tap``: one tap ``w[kh, kw, 0]`` sliced out of a ``(K, K, 1, C)`` depthwise
      kernel: the shifted multiply-adds of the depthwise forward and input gradient.
    """
    found: Dict[str, int] = collections.Counter()
    products: Dict[str, str] = {}  # Each matrix product's result: its contracted axes.
    for line in module_text.splitlines():
        match = _SLICE.search(line)
        if match:
            bounds, source, result = match.group(1), _dims(match.group(2)), _dims(match.group(3))
            first = bounds.split(",")[0].strip().split(":")
            one_example = (
                len(source) >= 3
                and source[0] > 1
                and result[0] == 1
                and result[1:] == source[1:]
                and len(first) == 2
                and int(first[1]) - int(first[0]) == 1
            )
            found["example slice"] += one_example
            depthwise = len(source) == 4 and source[0] == source[1] > 1 and source[2] == 1
            found["depthwise tap"] += depthwise and result[:3] == (1, 1, 1)
        found["first max"] += bool(_WINDOW_TEST.search(line))
        definition = _DEF.match(line)
        if definition and definition.group(2) == "stablehlo.dot_general":
            contracted = _CONTRACTED.search(definition.group(3))
            products[definition.group(1)] = contracted.group(1) if contracted else ""
        reshape = _RESHAPE.search(line)
        if reshape and reshape.group(1) in products:
            dims, contracted = _dims(reshape.group(2)), products[reshape.group(1)]
            found["col2im"] += len(dims) == 6 or (len(dims) == 3 and contracted == "[1] x [1]")
            kernel = contracted == "[0] x [0]" and len(dims) in (3, 4) and dims[0] > 1
            found["kernel product"] += kernel
    return {kind: count for kind, count in found.items() if count}
