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

The model is exported with ``FrontendConfig(stft="dft")``: its STFT is a strided
convolution with the windowed DFT basis (as torchlibrosa computes it) instead of
``jnp.fft.rfft``, which neither TFLite builtins nor jax2onnx lower; it stays float32 and
is checked against the FFT model.

Every export is validated before it is moved into place: the file is loaded in its
own runtime and its outputs on a validation batch (default: a deterministic chirp +
noise batch; or yours) must match the JAX model within the golden tolerances
(:mod:`panns_jax.tolerance`, from ``golden/README.md``: logits/embeddings
5e-4 * max|ref|, probabilities 5e-4 absolute). A mismatch raises
:class:`ExportValidationError` and writes nothing.

Modules: :mod:`.source` (what to export: ``resolve_source``), :mod:`.serving` (the
exported function and how it is traced), :mod:`.writers` (one exporter per format),
:mod:`.runtimes` (load an export and run it), :mod:`.validation` (compare with the JAX
model), :mod:`.pipeline` (``export()``: all of them, staged). The command line is
:mod:`panns_jax.cli.export`.
"""

from panns_jax.export.formats import FORMATS, detect_format
from panns_jax.export.pipeline import ExportResult, check_output, check_shape_options, export
from panns_jax.export.runtimes import load
from panns_jax.export.serving import (
    DEFAULT_SECONDS,
    OUTPUT_KEYS,
    export_model,
    serving_function,
    with_stft,
)
from panns_jax.export.source import Source, resolve_source
from panns_jax.export.validation import ExportValidationError, compare, validation_batches

__all__ = [
    "DEFAULT_SECONDS",
    "FORMATS",
    "OUTPUT_KEYS",
    "ExportResult",
    "ExportValidationError",
    "Source",
    "check_output",
    "check_shape_options",
    "compare",
    "detect_format",
    "export",
    "export_model",
    "load",
    "resolve_source",
    "serving_function",
    "validation_batches",
    "with_stft",
]
