"""Registry of every PANNs architecture by its original class name.

    model = panns_jax.models.get("Cnn14")                  # the paper's Cnn14
    model = panns_jax.models.get("Cnn14", num_classes=50)  # any attribute overridden
    variables = panns_jax.models.init(model, jax.random.key(0))
    out = model.apply(variables, waveform)                  # dict of outputs

Each family module exposes ``MODELS = {name: (module class, kwargs)}``. Variants are
keyword arguments of a few families, never copied classes.
"""

from __future__ import annotations

import functools
from typing import Any, Dict, List, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from panns_jax.models import cnn, conv1d, mobilenet, resnet, transfer_head, wavegram
from panns_jax.models.backends import BACKENDS as CONV_BACKENDS
from panns_jax.models.backends import with_conv_backend
from panns_jax.models.layers import CLASSIFIER, CLASSIFIER_PARAMS, Outputs

_FAMILY_MODULES = [cnn, resnet, mobilenet, conv1d, wavegram]
_FAMILY_CLASSES = {
    cnn: cnn.Cnn,
    resnet: resnet.ResNet,
    mobilenet: mobilenet.MobileNet,
    wavegram: wavegram.Wavegram,
}


def _build_registry() -> Dict[str, Tuple[type, dict]]:
    registry: Dict[str, Tuple[type, dict]] = {}
    for module in _FAMILY_MODULES:
        for name, spec in module.MODELS.items():
            cls, kwargs = spec if isinstance(spec, tuple) else (_FAMILY_CLASSES[module], spec)
            if name in registry:
                raise RuntimeError(f"model {name!r} registered twice")
            registry[name] = (cls, kwargs)
    return registry


REGISTRY = _build_registry()


def names() -> List[str]:
    """All registered model names."""
    return sorted(REGISTRY)


def get(name: str, **overrides: Any) -> nn.Module:
    """Build the model registered as ``name``, with ``overrides`` replacing its attributes.

    A ``transfer_head`` entry (what a Freeze_L3 run's checkpoint stores) wraps the model
    in a :class:`~panns_jax.models.transfer_head.Transfer` with that head.
    """
    if transfer_head.HEAD_KEY in overrides:
        overrides = dict(overrides)
        head = overrides.pop(transfer_head.HEAD_KEY)
        return transfer_head.from_head_spec(get(name, **overrides), head)
    try:
        cls, kwargs = REGISTRY[name]
    except KeyError:
        import difflib

        close = difflib.get_close_matches(name, REGISTRY, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(
            f"unknown model {name!r}.{hint} Known models: {', '.join(names())}"
        ) from None
    return cls(**{**kwargs, **overrides})


def sample_rate(model: nn.Module) -> int:
    """The sample rate a model's input must have."""
    return model.frontend.sample_rate


def outputs(model: nn.Module) -> Outputs:
    """What ``model.apply`` returns: decision-level or not, and its embedding's key.

    The model's class declares them (``declared_outputs``), so that callers need not trace
    the model to find out. tests/test_models.py checks every declaration against a trace.
    """
    declared = getattr(type(model), "declared_outputs", None)
    if declared is None:
        raise TypeError(
            f"{type(model).__name__} declares no outputs: give its class a "
            "declared_outputs (panns_jax.models.layers.Outputs)"
        )
    return model.declared_outputs


def init(
    model: nn.Module, rng: jax.Array, num_samples: Optional[int] = None, batch_size: int = 1
) -> dict:
    """``{'params', 'batch_stats'}`` of ``model``, initialised in eval mode on zeros.

    The input has ``batch_size`` rows of ``num_samples`` samples (default: 10 s).
    """
    num_samples = num_samples or 10 * sample_rate(model)
    dummy = jnp.zeros((batch_size, num_samples), jnp.float32)
    return dict(jax.jit(lambda r: model.init(r, dummy, train=False))(rng))


def takes_length(model: nn.Module, num_samples: int) -> bool:
    """Whether ``model`` takes waveforms of ``num_samples``: shorter ones leave its pooling no
    time to reduce. Traced abstractly (``jax.eval_shape``); nothing is computed."""
    audio = jax.ShapeDtypeStruct((1, num_samples), jnp.float32)
    try:
        jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), audio)
    except (ValueError, TypeError):  # A zero-size reduction or a negative dimension.
        return False
    return True


def count_params(params: Any) -> int:
    """Number of scalars in a parameter tree."""
    return int(sum(x.size for x in jax.tree_util.tree_leaves(params)))


# XLA:CPU (jax 0.10) hands matrix products, reductions and elementwise ops (those next to
# convolutions included) to YNNPACK by default. At inference XLA's own kernels are faster for
# every family but the depthwise MobileNets (batch 8 x 10 s, 2 cores, benchmarks/inference.py):
# Cnn14 1.05-1.13x, Cnn6 1.05-1.09x, LeeNet24 1.2x, Wavegram-Logmel-Cnn14 1.16x. Train steps
# of every family are fastest with YNNPACK's products and reductions but without its
# elementwise fusions (batch 8 x 5 s, interleaved, two runs each): Cnn6 1.12x, Cnn14
# 1.08-1.12x, ResNet22 1.12-1.18x, MobileNetV1 1.02-1.10x, Wavegram-Logmel-Cnn14 1.02-1.03x,
# LeeNet24 0.98-1.06x the default's speed.
_YNN_FUSIONS = "xla_cpu_experimental_ynn_fusion_type"
_NO_CPU_LIBRARY_FUSIONS = {_YNN_FUSIONS: ""}
_CPU_TRAINING_FUSIONS = {_YNN_FUSIONS: "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_REDUCE"}


@functools.lru_cache(maxsize=None)
def _compiler_takes(option: str, value: str) -> bool:
    """Whether this jax and XLA compile with ``option=value`` (one tiny compile, once)."""
    try:
        jit = jax.jit(lambda x: x + 1, compiler_options={option: value})
        jit.lower(jnp.float32(0)).compile()
    except Exception:  # noqa: BLE001 - an older jax (TypeError) or XLA (unknown option).
        return False
    return True


def jit_options(model: nn.Module, *, training: bool = False) -> Dict[str, Any]:
    """Keyword arguments for ``jax.jit`` of ``model``'s inference forward or, with
    ``training``, of its train step.

    On CPU they choose XLA's library fusions: none at inference for models that run faster
    without them (their class's ``cpu_library_fusions``), and YNNPACK's products and
    reductions without its elementwise fusions in training. Elsewhere, and where this jax
    does not know the option, there are none. They change one compilation, never the process.
    """
    if jax.default_backend() != "cpu":
        return {}
    if training:
        options = _CPU_TRAINING_FUSIONS
    elif getattr(model, "cpu_library_fusions", False):
        return {}
    else:
        options = _NO_CPU_LIBRARY_FUSIONS
    if not all(_compiler_takes(key, value) for key, value in options.items()):
        return {}
    return {"compiler_options": dict(options)}


def jit_inference(model: nn.Module, fn: Any, conv_backend: str = "auto", **jit_kwargs: Any) -> Any:
    """``jax.jit`` of ``fn``, an inference forward of ``model``, as the tagger, the commands,
    streaming, probes and fine-tuning's evaluation compile theirs: with
    :func:`jit_options` and the convolutions of ``conv_backend``
    (:mod:`~panns_jax.models.backends`; ``"auto"``: oneDNN's on CPU where installed)."""
    return jax.jit(with_conv_backend(fn, conv_backend), **jit_options(model), **jit_kwargs)
