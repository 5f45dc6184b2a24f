"""``export()``: resolve the model, trace it, write it, validate it in its runtime, move it
into place. Nothing is written under the output path unless the export validates."""

from __future__ import annotations

import dataclasses
import functools
import gc
import os
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import jax
import numpy as np

from panns_jax import checks, fileio, models
from panns_jax.export import runtimes, serving, validation, writers
from panns_jax.export.formats import check_format, default_out
from panns_jax.export.source import Source, resolve_source


@dataclasses.dataclass
class ExportResult:
    """What was written: path, format, input shape (None = any) and validation errors."""

    path: str
    format: str
    model: str
    sample_rate: int
    input_shape: Tuple[Optional[int], Optional[int]]
    min_samples: int
    outputs: Dict[str, Tuple[Optional[int], ...]]
    errors: Dict[str, Tuple[float, float]]  # output -> (max abs error, bound), worst case.

    def summary(self) -> str:
        shape = ", ".join("any" if d is None else str(d) for d in self.input_shape)
        lines = [
            f"wrote {self.format} {self.path}",
            f"  model {self.model} @ {self.sample_rate} Hz; input waveform ({shape})"
            + (f", at least {self.min_samples} samples" if self.input_shape[1] is None else ""),
        ]
        for key, (err, bound) in self.errors.items():
            lines.append(f"  {key}: max abs error {err:.3g} <= {bound:.3g} (validated)")
        return "\n".join(lines)


def check_shape_options(seconds: Optional[float], batch_size: Optional[int]) -> None:
    """``seconds`` positive and finite, ``batch_size`` a positive integer, each or None."""
    if seconds is not None:
        checks.positive_seconds(seconds, "seconds")
    if batch_size is not None:
        checks.positive_integer(batch_size, "batch size")


def check_output(out: str, format: str, overwrite: bool, source: Any = None) -> None:
    """Raise unless writing an export of ``format`` to ``out`` is safe.

    It refuses to overwrite without ``overwrite``, to replace the source checkpoint, and
    to replace anything but an export of the same kind (never an arbitrary directory).
    """
    out = os.path.abspath(out)
    if isinstance(source, (str, os.PathLike)) and os.path.exists(source):
        source = os.path.abspath(source)
        if (
            os.path.exists(out)
            and os.path.samefile(out, source)
            or out.startswith(source.rstrip(os.sep) + os.sep)
        ):
            raise ValueError(f"{out} is (inside) the source checkpoint; choose another output")
    if not os.path.lexists(out):
        return
    if not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True (--overwrite) to replace it")
    is_savedmodel = os.path.isfile(os.path.join(out, "saved_model.pb"))
    if format == "savedmodel" and not is_savedmodel:
        raise FileExistsError(
            f"{out} exists and is not a SavedModel directory; refusing to "
            "replace it: choose another output or remove it yourself"
        )
    if format != "savedmodel" and not os.path.isfile(out):
        raise FileExistsError(f"{out} exists and is not a file; refusing to replace it")


def _validation_inputs(
    validation_batch: Optional[np.ndarray],
    sample_rate: int,
    shape: Tuple[Optional[int], ...],
    min_samples: int,
) -> List[np.ndarray]:
    """The batches an export is validated on: the caller's, or deterministic test audio.

    Raises a ValueError for a batch whose shape the export does not accept.
    """
    if validation_batch is not None:
        batches = [np.asarray(validation_batch, np.float32)]
    else:
        batches = validation.validation_batches(sample_rate, shape[1], min_samples, shape[0])
    for batch in batches:
        validation.check_fits(batch, shape, min_samples)
    return batches


def _write(
    format: str,
    serve: Callable,
    spec: jax.ShapeDtypeStruct,
    min_samples: int,
    path: str,
    name: str,
    onnx_opset: int,
    platforms: Sequence[str],
) -> None:
    """Write ``serve`` traced at ``spec`` to ``path`` with the exporter of ``format``."""
    if format == "onnx":
        writers.write_onnx(serve, spec, path, name, opset=onnx_opset)
        return
    shape = serving.static_shape(spec.shape)
    if format == "savedmodel":
        writers.write_savedmodel(serve, shape, min_samples, path, platforms)
    else:
        writers.write_tflite(serve, shape, min_samples, path)


def _reference(model: Any, variables: Mapping[str, Any]) -> runtimes.Runner:
    """The model as given (FFT front end), run by JAX: what an export must reproduce.

    The variables are an argument of the jitted function, not constants folded into the
    executable (80 M floats for Cnn14).
    """
    forward = jax.jit(lambda v, x: serving.serving_function(model, v)(x))
    return functools.partial(lambda v, x: jax.device_get(forward(v, x)), variables)


def export(
    source: Source,
    format: str = "onnx",
    out: Optional[str] = None,
    *,
    model_name: Optional[str] = None,
    seconds: Optional[float] = None,
    batch_size: Optional[int] = None,
    validation_batch: Optional[np.ndarray] = None,
    overwrite: bool = False,
    platforms: Sequence[str] = ("cpu",),
    onnx_opset: int = 18,
) -> ExportResult:
    """Export ``source`` as ``format`` to ``out`` and validate it in its runtime.

    Args:
      source: a panns_jax checkpoint directory, an original ``.pth`` (with
        ``model_name``), a ``ModelCheckpoint``, or ``(model, variables)``.
      format: 'onnx', 'savedmodel' or 'tflite'.
      out: output path (``.onnx`` / ``.tflite`` file, SavedModel directory).
      seconds: fix the clip length (default: any length for onnx/savedmodel,
        ``DEFAULT_SECONDS`` for tflite).
      batch_size: fix the batch size (default: any; 1 for tflite).
      validation_batch: ``(B, L)`` float32 audio to validate on (default:
        deterministic test signals); its length must fit the exported shape.
      platforms: SavedModel only: the XLA platforms the module is lowered for
        (e.g. ``('cpu', 'cuda')``).

    Raises:
      ExportValidationError: the export does not match the JAX model within the
        golden tolerances (the message has the measured errors; nothing written).
    """
    check_format(format)
    check_shape_options(seconds, batch_size)
    if out is not None:
        check_output(out, format, overwrite, source)
    model, variables, name = resolve_source(source, model_name)
    out = os.path.abspath(out or default_out(name, format))
    check_output(out, format, overwrite, source)
    serve = serving.serving_function(serving.export_model(model), variables)
    if format == "tflite":  # LiteRT graphs have static shapes here: fix batch and length.
        batch_size = batch_size or 1
    spec, min_samples = serving.input_spec(
        model, serve, seconds, batch_size, dynamic_length=format != "tflite"
    )
    static = serving.static_shape(spec.shape)
    rate = models.sample_rate(model)
    batches = _validation_inputs(validation_batch, rate, static, min_samples)

    os.makedirs(os.path.dirname(out), exist_ok=True)
    runner = reference = None
    try:
        # Staged: removed on failure; on success it replaces an existing export (a SavedModel
        # directory is swapped in by fileio.replace_dir, never removed first).
        with fileio.staged(out) as staging:
            _write(format, serve, spec, min_samples, staging, name, onnx_opset, platforms)
            runner = runtimes.load(staging, format)
            reference = _reference(model, variables)
            worst = validation.validate(runner, reference, batches, f"{format} export of {name}")
    finally:
        runner = reference = None
        gc.collect()  # Converter/runtime copies of the weights: GBs for Cnn14.
    return ExportResult(
        path=out,
        format=format,
        model=name,
        sample_rate=rate,
        input_shape=static,
        min_samples=min_samples if static[1] is None else static[1],
        outputs={k: serving.static_shape(s) for k, s in serving.output_shapes(serve, spec).items()},
        errors=worst,
    )
