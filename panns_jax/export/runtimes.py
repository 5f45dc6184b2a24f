"""Runtimes: load a written export and call it on numpy batches (no JAX involved)."""

from __future__ import annotations

from typing import Callable, Dict, Optional

import numpy as np

from panns_jax.export.formats import FORMATS, detect_format, require

Runner = Callable[[np.ndarray], Dict[str, np.ndarray]]


def load(path: str, format: Optional[str] = None, num_threads: Optional[int] = None) -> Runner:
    """A callable ``waveform (B, L) float32 -> {output: np.ndarray}`` running an export.

    ONNX runs in onnxruntime, SavedModels in TensorFlow, TFLite in the LiteRT
    interpreter (``ai-edge-litert``, or ``tf.lite`` when it is absent).
    """
    format = format or detect_format(path)
    if format == "onnx":
        return _load_onnx(path, num_threads)
    if format == "savedmodel":
        return _load_savedmodel(path)
    if format == "tflite":
        return _load_tflite(path, num_threads)
    raise ValueError(f"unknown format {format!r}; expected one of {FORMATS}")


def _load_onnx(path: str, num_threads: Optional[int]) -> Runner:
    ort = require("onnxruntime", "running ONNX exports")
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


def _load_savedmodel(path: str) -> Runner:
    tf = require("tensorflow", "running SavedModel exports")
    signature = tf.saved_model.load(path).signatures["serving_default"]

    def run_savedmodel(waveform: np.ndarray) -> Dict[str, np.ndarray]:
        out = signature(waveform=tf.constant(np.asarray(waveform, np.float32)))
        return {k: v.numpy() for k, v in out.items()}

    return run_savedmodel


def _load_tflite(path: str, num_threads: Optional[int]) -> Runner:
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        Interpreter = require("tensorflow", "running TFLite exports").lite.Interpreter
    interpreter = Interpreter(model_path=path, num_threads=num_threads)
    runner = interpreter.get_signature_runner()

    def run_tflite(waveform: np.ndarray) -> Dict[str, np.ndarray]:
        out = runner(waveform=np.ascontiguousarray(waveform, np.float32))
        return {k: np.array(v) for k, v in out.items()}

    return run_tflite
