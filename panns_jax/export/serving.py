"""The function that gets exported, and how it is traced.

The exported model is the JAX model with ``FrontendConfig(stft="dft")``. Its STFT is a
strided convolution with the windowed DFT basis (as torchlibrosa computes it) instead of
``jnp.fft.rfft``, which neither TFLite builtins nor jax2onnx lower. It has the same
weights and the same outputs to float32 round-off, and the export is validated against
the FFT model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from panns_jax import frontend as fe
from panns_jax import models

OUTPUT_KEYS = ("clipwise_output", "clipwise_logits", "embedding", "framewise_output")
DEFAULT_SECONDS = 10.0  # Fixed window when a format or model needs one (a PANNs training clip).
_MIN_SECONDS_CANDIDATES = (1.0, 2.0, 5.0)  # Shortest clip a length-polymorphic export accepts.


def with_stft(model: nn.Module, stft: str) -> nn.Module:
    """``model`` with every ``FrontendConfig`` field in its module tree set to ``stft``.

    It walks the dataclass fields, so wrappers (a transfer head's ``base``) are rebuilt
    too. The parameter tree stays the same, since the front end has no parameters.
    """
    changes = {}
    for field in dataclasses.fields(model):
        if field.name in ("parent", "name"):
            continue
        value = getattr(model, field.name)
        if isinstance(value, fe.FrontendConfig) and value.stft != stft:
            changes[field.name] = dataclasses.replace(value, stft=stft)
        elif isinstance(value, nn.Module):
            replaced = with_stft(value, stft)
            if replaced is not value:
                changes[field.name] = replaced
    return model.clone(**changes) if changes else model


def export_model(model: nn.Module) -> nn.Module:
    """The model as it is exported: the DFT-convolution STFT (see the module docstring)."""
    return with_stft(model, "dft")


@contextlib.contextmanager
def tracing() -> Iterator[None]:
    """Trace depthwise convs as one lax conv while an exporter traces.

    Exporters have a native op for it, and jax2onnx cannot lower the CPU/other-backend
    switch of ``models/depthwise.py``. The switch belongs to that module and is not
    thread safe, so exports are traced from one thread.
    """
    from panns_jax.models import depthwise

    with depthwise.plain_lax_convolutions():
        yield


def serving_function(
    model: Any, variables: Mapping[str, Any], output_keys: Sequence[str] = OUTPUT_KEYS
) -> Callable[[jax.Array], dict]:
    """``waveform (B, L) -> {output: array}`` in eval mode, the exported outputs only."""
    variables = {k: v for k, v in variables.items() if k in ("params", "batch_stats")}

    def serve(waveform: jax.Array) -> Dict[str, jax.Array]:
        outputs = model.apply(variables, waveform)
        return {k: outputs[k].astype(jnp.float32) for k in output_keys if k in outputs}

    return serve


def _symbolic_spec(min_samples: int, batch_size: Optional[int]) -> jax.ShapeDtypeStruct:
    batch = "B" if batch_size is None else str(batch_size)
    shape = jax.export.symbolic_shape(f"{batch}, L", constraints=(f"L >= {min_samples}",))
    return jax.ShapeDtypeStruct(shape, jnp.float32)


def input_spec(
    model: Any,
    serve: Callable,
    seconds: Optional[float],
    batch_size: Optional[int],
    dynamic_length: bool,
) -> Tuple[jax.ShapeDtypeStruct, int]:
    """The input spec to trace with and the shortest accepted clip.

    A symbolic length needs a lower bound that makes every pooling in the trunk
    provably non-empty. The shortest of 1, 2 and 5 s that works is used. When none does
    (decision-level heads), the input is a fixed ``DEFAULT_SECONDS`` window.
    """
    rate = models.sample_rate(model)
    if dynamic_length and seconds is None:
        for min_seconds in _MIN_SECONDS_CANDIDATES:
            spec = _symbolic_spec(int(min_seconds * rate), batch_size)
            try:
                with tracing():
                    jax.eval_shape(serve, spec)
                return spec, int(min_seconds * rate)
            except (jax.errors.InconclusiveDimensionOperation, TypeError, ValueError):
                continue
        print(
            f"note: {type(model).__name__} cannot be exported for any clip length; using a "
            f"fixed {DEFAULT_SECONDS:g} s window (pass seconds= / --seconds to choose)",
            file=sys.stderr,
        )
    length = int(round((seconds or DEFAULT_SECONDS) * rate))
    shape = (batch_size, length) if batch_size else jax.export.symbolic_shape(f"B, {length}")
    return jax.ShapeDtypeStruct(shape, jnp.float32), length


def static_shape(shape: Sequence[Any]) -> Tuple[Optional[int], ...]:
    """A (possibly symbolic) shape with ``None`` for every symbolic dimension."""
    return tuple(d if isinstance(d, int) else None for d in shape)


def output_shapes(serve: Callable, spec: jax.ShapeDtypeStruct) -> Dict[str, tuple]:
    """The shape of each output of ``serve`` on an input of ``spec``, traced as exported."""
    with tracing():
        shapes = jax.eval_shape(serve, spec)
    return {k: v.shape for k, v in shapes.items()}
