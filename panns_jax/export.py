"""Export a PANNs model to ONNX, a TensorFlow SavedModel or LiteRT (TFLite), validated.

    panns-jax export --checkpoint DIR --format onnx --out cnn14.onnx
    python -m panns_jax.export --model MobileNetV2 --format tflite --out m.tflite --seconds 10

    from panns_jax import export
    result = export.export("ckpt/cnn14", format="savedmodel", out="cnn14_savedmodel")
    runner = export.load("cnn14.onnx"); runner(waveform_batch)["clipwise_output"]

The exported graph maps a float32 waveform batch ``waveform (B, samples)`` at the
model's sample rate to the subset of ``clipwise_output``, ``clipwise_logits``,
``embedding`` and ``framewise_output`` that the model has (as the JAX model does).

Input shapes per format (see :data:`FORMATS`):

==========  ======================================  ===============================
format      exporter / runtime                      input shape
==========  ======================================  ===============================
onnx        jax2onnx / onnxruntime                  (B, L): any batch, any L >= the
                                                    model's minimum (1 s for most)
savedmodel  jax2tf (StableHLO) / TensorFlow         (B, L), as onnx
tflite      jax2tf + TFLite converter / LiteRT      (1, L) fixed: default 10 s
==========  ======================================  ===============================

``seconds=`` fixes L and ``batch_size=`` B for any format. Models whose output shape logic cannot be
expressed for a symbolic length (the decision-level SED heads; Wavegram models, which
need an even ``floor(L / 320)``) fall back to a fixed window of ``DEFAULT_SECONDS``
with a message on stderr.

The STFT is exported as a strided convolution with the windowed DFT basis (as
torchlibrosa computes it) instead of ``jnp.fft.rfft``, which neither TFLite builtins
nor jax2onnx lower; it stays float32 and is checked against the FFT model.

Every export is validated before it is moved into place: the file is loaded in its
own runtime and its outputs on a validation batch (default: a deterministic chirp +
noise batch; or yours) must match the JAX model within the golden tolerances
(``golden/README.md``: logits/embeddings 5e-4 * max|ref|, probabilities 5e-4
absolute). A mismatch raises :class:`ExportValidationError` and writes nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import gc
import os
import shutil
import sys
import tempfile
from typing import (
    TYPE_CHECKING,
    Any,
    Callable,
    Dict,
    Iterator,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    Union,
)

import jax
import jax.numpy as jnp
import numpy as np

from panns_jax import frontend as fe
from panns_jax import models

if TYPE_CHECKING:
    from panns_jax import checkpoints

FORMATS = ("onnx", "savedmodel", "tflite")
OUTPUT_KEYS = ("clipwise_output", "clipwise_logits", "embedding", "framewise_output")
DEFAULT_SECONDS = 10.0  # Fixed window when a format or model needs one (a PANNs training clip).
_MIN_SECONDS_CANDIDATES = (1.0, 2.0, 5.0)  # Shortest clip a length-polymorphic export accepts.

# golden/README.md, "Tolerances" (float32 implementations).
RELATIVE_TOLERANCE = 5e-4  # logits, embeddings: max|got - ref| <= 5e-4 * max|ref|.
PROBABILITY_TOLERANCE = 5e-4  # probabilities: max|got - ref| <= 5e-4.

Source = Union[str, os.PathLike, "checkpoints.ModelCheckpoint", Tuple[Any, Mapping[str, Any]]]


class ExportValidationError(RuntimeError):
    """The exported file does not reproduce the JAX model; nothing was written."""


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


# ----------------------------------------------------------------------------
# Export-friendly front end.
# ----------------------------------------------------------------------------


def dft_kernel(n_fft: int) -> np.ndarray:
    """``(n_fft, 1, 2 * n_freq)`` conv kernel: ``hann[n] cos(2 pi k n / N) | -hann[n] sin(...)``.

    The original's ``conv_real`` / ``conv_imag`` STFT weights (torchlibrosa), built in
    float64 and rounded once to float32.
    """
    real, imag = fe.windowed_dft_basis(n_fft)
    return np.concatenate([real, imag]).T.astype(np.float32)[:, None, :]


def dft_power_spectrogram(
    waveform: jax.Array, n_fft: int, hop: int, pad_mode: str = "reflect"
) -> jax.Array:
    """:func:`panns_jax.frontend.power_spectrogram` as one strided conv (no FFT, no gather).

    Lowers to plain convolutions in ONNX/TFLite/StableHLO and works for symbolic
    lengths; costs ``n_fft`` MACs per output bin instead of ``log n_fft``.
    """
    x = jnp.asarray(waveform).astype(jnp.float32)
    pad = n_fft // 2
    x = jnp.pad(x, ((0, 0), (pad, pad)), mode=pad_mode)
    y = jax.lax.conv_general_dilated(
        x[:, :, None],
        jnp.asarray(dft_kernel(n_fft)),
        window_strides=(hop,),
        padding="VALID",
        dimension_numbers=("NWC", "WIO", "NWC"),
        precision=jax.lax.Precision.HIGHEST,
    )
    n_freq = n_fft // 2 + 1
    real, imag = y[..., :n_freq], y[..., n_freq:]
    return real * real + imag * imag


@contextlib.contextmanager
def export_friendly_frontend() -> Iterator[None]:
    """Trace models with :func:`dft_power_spectrogram` in place of the FFT STFT.

    Patches ``panns_jax.frontend.power_spectrogram`` while a trace runs (not thread
    safe: trace exports from one thread). A ``method='dft'`` option of
    ``frontend.power_spectrogram`` would make this patch unnecessary.
    """
    from panns_jax.models import depthwise

    original = fe.power_spectrogram
    fe.power_spectrogram = dft_power_spectrogram
    try:
        # Depthwise convs as one lax conv: exporters have a native op for it, and
        # jax2onnx cannot lower the CPU/other-backend switch of models/depthwise.py.
        with depthwise.plain_lax_convolutions():
            yield
    finally:
        fe.power_spectrogram = original


# ----------------------------------------------------------------------------
# The function that gets exported.
# ----------------------------------------------------------------------------


def resolve_source(
    source: Source, model_name: Optional[str] = None, overrides: Optional[Mapping[str, Any]] = None
) -> Tuple[Any, Dict[str, Any], str]:
    """``(model, variables, name)`` of a checkpoint path, a ModelCheckpoint or
    ``(model, variables)``.

    Paths: a panns_jax checkpoint directory, or an original PANNs ``.pth`` (needs
    ``model_name``, and ``overrides`` for a model built with other arguments).
    """
    from panns_jax import checkpoints

    if isinstance(source, tuple):
        model, variables = source
        return model, dict(variables), model_name or type(model).__name__
    if isinstance(source, checkpoints.ModelCheckpoint):
        return source.build_model(), dict(source.variables), source.model
    from panns_jax import convert

    if overrides and checkpoints.is_model_checkpoint(os.fspath(source)):
        raise ValueError(
            f"{source}: a panns_jax checkpoint directory records its own "
            "overrides; --overrides applies to .pth files only"
        )
    loaded = convert.load_model_checkpoint(source, model_name, overrides=overrides)
    return loaded.build_model(), dict(loaded.variables), loaded.model


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


def _input_spec(
    model: Any,
    serve: Callable,
    seconds: Optional[float],
    batch_size: Optional[int],
    dynamic_length: bool,
) -> Tuple[jax.ShapeDtypeStruct, int]:
    """The input spec to trace with and the shortest accepted clip.

    A symbolic length needs a lower bound that makes every pooling in the trunk
    provably non-empty; the shortest of 1, 2, 5 s that works is used. Falls back to
    a fixed ``DEFAULT_SECONDS`` window when none does (decision-level heads).
    """
    rate = models.sample_rate(model)
    if dynamic_length and seconds is None:
        for min_seconds in _MIN_SECONDS_CANDIDATES:
            spec = _symbolic_spec(int(min_seconds * rate), batch_size)
            try:
                with export_friendly_frontend():
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


def _static_shape(shape) -> Tuple[Optional[int], ...]:
    return tuple(d if isinstance(d, int) else None for d in shape)


# ----------------------------------------------------------------------------
# Writers, one per format. Each writes to ``path`` (a staging path) and returns the
# output names in the order the runtime returns them.
# ----------------------------------------------------------------------------


def _import(module: str, what: str):
    import importlib

    try:
        if module == "tensorflow":
            from panns_jax import tf_cpu

            return tf_cpu.import_tensorflow()
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(
            f"{what} needs {module.split('.')[0]}: pip install 'panns_jax[export]'"
        ) from None


def _write_onnx(
    serve: Callable, spec: jax.ShapeDtypeStruct, path: str, name: str, opset: int = 18
) -> None:
    """jax2onnx on a jaxpr traced beforehand.

    jax2onnx monkey-patches flax.linen layers while it traces (its own pooling and
    conv primitives); replaying a jaxpr traced before keeps the conversion at the
    level of lax primitives, which it supports best, with the same symbolic dims.
    """
    jax2onnx = _import("jax2onnx", "ONNX export")
    from jax.extend import core as jex_core

    with export_friendly_frontend():
        closed = jax.make_jaxpr(serve)(spec)
    keys = sorted(_output_shapes(serve, spec))  # A flattened dict's order: sorted keys.
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


def _output_shapes(serve: Callable, spec: jax.ShapeDtypeStruct) -> Dict[str, tuple]:
    with export_friendly_frontend():
        shapes = jax.eval_shape(serve, spec)
    return {k: v.shape for k, v in shapes.items()}


def _tf_concrete_function(
    serve: Callable, shape: Tuple[Optional[int], ...], min_samples: int, platforms: Sequence[str]
):
    """jax2tf (native StableHLO serialization) of ``serve`` for a (B, L) shape, None = any."""
    tf = _import("tensorflow", "SavedModel/TFLite export")
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
    with export_friendly_frontend():  # jax2tf traces here, once.
        return function.get_concrete_function()


def _write_savedmodel(
    serve: Callable,
    shape: Tuple[Optional[int], ...],
    min_samples: int,
    path: str,
    platforms: Sequence[str] = ("cpu",),
) -> None:
    """A SavedModel with one ``serving_default`` signature (XlaCallModule, weights inlined)."""
    tf = _import("tensorflow", "SavedModel export")
    concrete = _tf_concrete_function(serve, shape, min_samples, platforms)
    # Only the concrete function is saved: a tf.function attribute would be re-traced
    # by the saver outside of export_friendly_frontend().
    tf.saved_model.save(tf.Module(), path, signatures={"serving_default": concrete})


def _write_tflite(
    serve: Callable, shape: Tuple[Optional[int], ...], min_samples: int, path: str
) -> None:
    """The StableHLO of jax2tf lowered to TFLite builtins (float32, no quantisation)."""
    tf = _import("tensorflow", "TFLite export")
    concrete = _tf_concrete_function(serve, shape, min_samples, ("cpu",))
    converter = tf.lite.TFLiteConverter.from_concrete_functions([concrete], tf.Module())
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    with open(path, "wb") as f:
        f.write(converter.convert())


# ----------------------------------------------------------------------------
# Runtimes: load an export and call it on numpy batches.
# ----------------------------------------------------------------------------


def detect_format(path: str) -> str:
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "saved_model.pb")):
        return "savedmodel"
    ext = os.path.splitext(path)[1].lower()
    if ext == ".onnx":
        return "onnx"
    if ext in (".tflite", ".litert"):
        return "tflite"
    raise ValueError(
        f"{path}: cannot tell the format (expected a .onnx or .tflite file or a "
        "SavedModel directory)"
    )


def load(
    path: str, format: Optional[str] = None, num_threads: Optional[int] = None
) -> Callable[[np.ndarray], Dict[str, np.ndarray]]:
    """A callable ``waveform (B, L) float32 -> {output: np.ndarray}`` running an export.

    ONNX runs in onnxruntime, SavedModels in TensorFlow, TFLite in the LiteRT
    interpreter (``ai-edge-litert``; ``tf.lite`` when it is absent).
    """
    format = format or detect_format(path)
    if format == "onnx":
        ort = _import("onnxruntime", "running ONNX exports")
        options = ort.SessionOptions()
        if num_threads:
            options.intra_op_num_threads = num_threads
            options.inter_op_num_threads = 1
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        input_name = session.get_inputs()[0].name

        def run_onnx(waveform: np.ndarray) -> Dict[str, np.ndarray]:
            values = session.run(None, {input_name: np.asarray(waveform, np.float32)})
            return dict(zip(names, values))

        return run_onnx
    if format == "savedmodel":
        tf = _import("tensorflow", "running SavedModel exports")
        signature = tf.saved_model.load(path).signatures["serving_default"]

        def run_savedmodel(waveform: np.ndarray) -> Dict[str, np.ndarray]:
            out = signature(waveform=tf.constant(np.asarray(waveform, np.float32)))
            return {k: v.numpy() for k, v in out.items()}

        return run_savedmodel
    if format == "tflite":
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError:
            Interpreter = _import("tensorflow", "running TFLite exports").lite.Interpreter
        interpreter = Interpreter(model_path=path, num_threads=num_threads)
        runner = interpreter.get_signature_runner()

        def run_tflite(waveform: np.ndarray) -> Dict[str, np.ndarray]:
            out = runner(waveform=np.ascontiguousarray(waveform, np.float32))
            return {k: np.array(v) for k, v in out.items()}

        return run_tflite
    raise ValueError(f"unknown format {format!r}; expected one of {FORMATS}")


# ----------------------------------------------------------------------------
# Validation.
# ----------------------------------------------------------------------------


def tolerance(key: str, reference: np.ndarray) -> float:
    """The golden tolerance of one output array (golden/README.md, "Tolerances")."""
    if key.endswith(("logits", "embedding")):
        return RELATIVE_TOLERANCE * float(np.max(np.abs(reference))) if reference.size else 0.0
    return PROBABILITY_TOLERANCE


def compare(
    got: Mapping[str, np.ndarray], want: Mapping[str, np.ndarray]
) -> Tuple[Dict[str, Tuple[float, float]], list]:
    """Per output ``(max abs error, bound)`` and a list of failures (empty when all pass)."""
    errors, failures = {}, []
    for key, ref in want.items():
        ref = np.asarray(ref, np.float64)
        if key not in got:
            failures.append(f"{key}: missing from the export's outputs")
            continue
        value = np.asarray(got[key], np.float64)
        if value.shape != ref.shape:
            failures.append(f"{key}: shape {value.shape} != JAX {ref.shape}")
            continue
        err = float(np.max(np.abs(value - ref))) if ref.size else 0.0
        bound = tolerance(key, ref)
        errors[key] = (err, bound)
        if not err <= bound:  # NaN fails too.
            failures.append(f"{key}: max abs error {err:.3g} > {bound:.3g}")
    return errors, failures


def validation_batches(
    sample_rate: int, length: Optional[int], min_samples: int, batch_size: Optional[int]
) -> list:
    """Deterministic test audio like the golden inputs: a log chirp + noise and AM tones over
    a noise floor with a gap of digital silence (frames at the log floor); plus an
    odd-length clip when the length is free."""
    rng = np.random.default_rng(0)
    n = length or int(5 * sample_rate)
    t = np.arange(n) / sample_rate
    duration = n / sample_rate
    chirp = 0.5 * np.sin(2 * np.pi * 50 * duration / np.log(200) * (200 ** (t / duration) - 1))
    tones = 0.3 * np.sin(2 * np.pi * 440 * t) * (1 + 0.8 * np.sin(2 * np.pi * 2 * t))
    # A -50 dBFS noise floor as real recordings have: bins ~100 dB below full scale are
    # float32 round-off, where the FFT and the DFT-matrix STFT differ by > 0.1 dB.
    tones += 3e-3 * rng.standard_normal(n)
    tones[n // 3 : n // 3 + n // 10] = 0.0
    rows = [chirp + 0.05 * rng.standard_normal(n), tones]
    rows += [rng.uniform(-0.5, 0.5, n) for _ in range(max(0, (batch_size or 2) - 2))]
    batches = [np.stack(rows[: batch_size or 2]).astype(np.float32)]
    if length is None:
        odd = max(min_samples, int(1.5 * sample_rate)) + 1
        batches.append(batches[0][: batch_size or 1, :odd])
    return batches


def _check_fits(batch: np.ndarray, shape: Tuple[Optional[int], ...], min_samples: int) -> None:
    if batch.ndim != 2 or any(d is not None and d != b for d, b in zip(shape, batch.shape)):
        raise ValueError(
            f"validation batch of shape {batch.shape} does not fit the exported "
            f"input shape {shape} (None = any)"
        )
    if batch.shape[1] < min_samples:
        raise ValueError(
            f"validation batch has {batch.shape[1]} samples; the export needs at "
            f"least {min_samples}"
        )


# ----------------------------------------------------------------------------
# The entry point.
# ----------------------------------------------------------------------------


def check_shape_options(seconds: Optional[float], batch_size: Optional[int]) -> None:
    """``seconds`` positive and finite, ``batch_size`` a positive integer (or None)."""
    import math

    if seconds is not None and not (
        isinstance(seconds, (int, float)) and math.isfinite(seconds) and seconds > 0
    ):
        raise ValueError(f"seconds must be a positive, finite clip length, got {seconds!r}")
    if batch_size is not None and (
        isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
    ):
        raise ValueError(f"batch size must be a positive integer, got {batch_size!r}")


def check_output(out: str, format: str, overwrite: bool, source: Any = None) -> None:
    """Refuse to overwrite without ``overwrite``, to replace the source checkpoint, or to
    replace anything but an export of the same kind (never an arbitrary directory)."""
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
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; expected one of {', '.join(FORMATS)}")
    check_shape_options(seconds, batch_size)
    if out is not None:
        check_output(out, format, overwrite, source)
    model, variables, name = resolve_source(source, model_name)
    out = os.path.abspath(
        out
        or {"onnx": f"{name}.onnx", "tflite": f"{name}.tflite", "savedmodel": f"{name}_savedmodel"}[
            format
        ]
    )
    check_output(out, format, overwrite, source)
    serve = serving_function(model, variables)
    if format == "tflite":  # LiteRT graphs have static shapes here: fix batch and length.
        batch_size = batch_size or 1
    spec, min_samples = _input_spec(
        model, serve, seconds, batch_size, dynamic_length=format != "tflite"
    )
    static = _static_shape(spec.shape)
    rate = models.sample_rate(model)

    directory = os.path.dirname(out)
    os.makedirs(directory, exist_ok=True)
    staging_dir = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=directory)
    staging = os.path.join(staging_dir, os.path.basename(out))
    try:
        if format == "onnx":
            _write_onnx(serve, spec, staging, name, opset=onnx_opset)
        elif format == "savedmodel":
            _write_savedmodel(serve, static, min_samples, staging, platforms)
        else:
            _write_tflite(serve, static, min_samples, staging)

        runner = load(staging, format)
        # The JAX model with its FFT front end. A fresh closure: jit caches traces per
        # function, and ``serve`` was traced with the DFT front end above. Variables are
        # an argument, not constants folded into the executable (80 M floats for Cnn14).
        forward = jax.jit(lambda v, x: serving_function(model, v)(x))
        reference = functools.partial(forward, variables)
        if validation_batch is not None:
            batches = [np.asarray(validation_batch, np.float32)]
        else:
            batches = validation_batches(rate, static[1], min_samples, static[0])
        worst: Dict[str, Tuple[float, float]] = {}
        for batch in batches:
            _check_fits(batch, static, min_samples)
            errors, failures = compare(runner(batch), jax.device_get(reference(batch)))
            if failures:
                raise ExportValidationError(
                    f"{format} export of {name} does not match the JAX model on a "
                    f"{batch.shape} batch (nothing written):\n  " + "\n  ".join(failures)
                )
            for key, (err, bound) in errors.items():
                if key not in worst or err / max(bound, 1e-30) > worst[key][0] / max(
                    worst[key][1], 1e-30
                ):
                    worst[key] = (err, bound)
        if os.path.exists(out):
            shutil.rmtree(out) if os.path.isdir(out) else os.remove(out)
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging_dir, ignore_errors=True)
        runner = reference = forward = None
        gc.collect()  # Converter/runtime copies of the weights: GBs for Cnn14.
    return ExportResult(
        path=out,
        format=format,
        model=name,
        sample_rate=rate,
        input_shape=static,
        min_samples=min_samples if static[1] is None else static[1],
        outputs={k: _static_shape(s) for k, s in _output_shapes(serve, spec).items()},
        errors=worst,
    )


# ----------------------------------------------------------------------------
# Command line.
# ----------------------------------------------------------------------------


def _load_validation_batch(path: str, sample_rate: int) -> np.ndarray:
    """A ``.npy`` / ``.npz`` (first array) batch, or an audio file as a batch of one."""
    if path.endswith(".npy"):
        return np.load(path).astype(np.float32)
    if path.endswith(".npz"):
        with np.load(path) as data:
            return data[data.files[0]].astype(np.float32)
    from panns_jax import audio

    return np.asarray(audio.load_audio(path, sample_rate), np.float32)[None]


def _parse_overrides(text: str) -> Dict[str, Any]:
    from panns_jax import checkpoints

    return checkpoints.parse_overrides(text)


def main_export(argv: Optional[Sequence[str]] = None) -> int:
    """``panns-jax export``: write and validate an ONNX / SavedModel / TFLite export."""
    parser = argparse.ArgumentParser(
        prog="panns-jax export",
        description="Export a PANNs model to ONNX, a TensorFlow "
        "SavedModel or LiteRT (TFLite); the export is validated against the JAX model.",
    )
    parser.add_argument(
        "--checkpoint",
        default=None,
        help="panns_jax checkpoint directory, original PANNs .pth, or a "
        "pretrained model name such as Cnn14 (`panns-jax download "
        "--list`; downloaded and cached on first use); default: none, "
        "a randomly initialised --model",
    )
    parser.add_argument(
        "--model", default=None, help="architecture name (default: the checkpoint's, else Cnn14)"
    )
    parser.add_argument(
        "--overrides",
        type=_parse_overrides,
        default=None,
        help="JSON object of architecture arguments for a .pth",
    )
    parser.add_argument("--format", choices=FORMATS, required=True)
    parser.add_argument(
        "--out",
        default=None,
        help="output .onnx / .tflite file or SavedModel directory "
        "(default: MODEL.onnx, MODEL.tflite, MODEL_savedmodel)",
    )
    parser.add_argument(
        "--seconds",
        type=float,
        default=None,
        help="fixed clip length (default: any length for onnx/savedmodel, "
        f"{DEFAULT_SECONDS:g} s for tflite)",
    )
    parser.add_argument(
        "--batch-size", type=int, default=None, help="fixed batch size (default: any; 1 for tflite)"
    )
    parser.add_argument(
        "--validation",
        default=None,
        help="validate on this .npy/.npz batch or audio file instead of test "
        "signals (its shape must fit the export)",
    )
    parser.add_argument(
        "--platforms",
        default="cpu",
        help="savedmodel: comma-separated XLA platforms, e.g. cpu,cuda",
    )
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)

    try:
        check_shape_options(args.seconds, args.batch_size)  # Before loading anything.
        if args.out is not None:
            check_output(args.out, args.format, args.overwrite, args.checkpoint)
        if args.checkpoint is None:
            name = args.model or "Cnn14"
            model = models.get(name, **(args.overrides or {}))
            print(
                f"warning: no checkpoint given; exporting a randomly initialised {name}",
                file=sys.stderr,
            )
            variables = models.init(model, jax.random.key(0), models.sample_rate(model))
        else:
            model, variables, name = resolve_source(args.checkpoint, args.model, args.overrides)
        validation = None
        if args.validation:
            validation = _load_validation_batch(args.validation, models.sample_rate(model))
        result = export(
            (model, variables),
            args.format,
            args.out,
            model_name=name,
            seconds=args.seconds,
            batch_size=args.batch_size,
            validation_batch=validation,
            overwrite=args.overwrite,
            platforms=tuple(p for p in args.platforms.split(",") if p),
        )
    except ExportValidationError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError, FileExistsError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(result.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main_export())
