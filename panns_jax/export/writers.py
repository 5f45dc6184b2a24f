"""Exporters, one per format. Each writes ``serve`` (see :mod:`.serving`) to ``path``."""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple

import jax

from panns_jax.export.formats import require
from panns_jax.export.serving import output_shapes, tracing


def write_onnx(
    serve: Callable, spec: jax.ShapeDtypeStruct, path: str, name: str, opset: int = 18
) -> None:
    """jax2onnx on a jaxpr traced beforehand.

    jax2onnx monkey-patches flax.linen layers with its own pooling and conv primitives
    while it traces. Replaying a jaxpr traced beforehand keeps the conversion at the
    level of lax primitives, which it supports best, with the same symbolic dims.
    """
    jax2onnx = require("jax2onnx", "ONNX export")
    from jax.extend import core as jex_core

    with tracing():
        closed = jax.make_jaxpr(serve)(spec)
    keys = sorted(output_shapes(serve, spec))  # A flattened dict's order: sorted keys.
    replay = jex_core.jaxpr_as_fun(closed)
    model = jax2onnx.to_onnx(
        lambda w: tuple(replay(w)),
        [spec],
        model_name=name,
        opset=opset,
        input_names=["waveform"],
        output_names=keys,
        return_mode="proto",
    )
    with open(path, "wb") as f:
        f.write(model.SerializeToString())


def _tf_concrete_function(
    serve: Callable, shape: Tuple[Optional[int], ...], min_samples: int, platforms: Sequence[str]
):
    """jax2tf (native StableHLO serialization) of ``serve`` for a (B, L) shape, None = any."""
    tf = require("tensorflow", "SavedModel/TFLite export")
    from jax.experimental import jax2tf

    poly = ", ".join(("b", "l")[i] if d is None else str(d) for i, d in enumerate(shape))
    constraints = [f"l >= {min_samples}"] if shape[1] is None else []
    converted = jax2tf.convert(
        serve,
        polymorphic_shapes=[f"({poly})"],
        polymorphic_constraints=constraints,
        with_gradient=False,
        native_serialization_platforms=tuple(platforms),
    )
    function = tf.function(
        converted,
        autograph=False,
        input_signature=[tf.TensorSpec(shape, tf.float32, name="waveform")],
    )
    with tracing():  # jax2tf traces here, once.
        return function.get_concrete_function()


def write_savedmodel(
    serve: Callable,
    shape: Tuple[Optional[int], ...],
    min_samples: int,
    path: str,
    platforms: Sequence[str] = ("cpu",),
) -> None:
    """A SavedModel with one ``serving_default`` signature (XlaCallModule, weights inlined)."""
    tf = require("tensorflow", "SavedModel export")
    concrete = _tf_concrete_function(serve, shape, min_samples, platforms)
    # Only the concrete function is saved: a tf.function attribute would be re-traced
    # by the saver outside of tracing().
    tf.saved_model.save(tf.Module(), path, signatures={"serving_default": concrete})


def write_tflite(
    serve: Callable, shape: Tuple[Optional[int], ...], min_samples: int, path: str
) -> None:
    """The StableHLO of jax2tf lowered to TFLite builtins (float32, no quantisation)."""
    tf = require("tensorflow", "TFLite export")
    concrete = _tf_concrete_function(serve, shape, min_samples, ("cpu",))
    converter = tf.lite.TFLiteConverter.from_concrete_functions([concrete], tf.Module())
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    with open(path, "wb") as f:
        f.write(converter.convert())
