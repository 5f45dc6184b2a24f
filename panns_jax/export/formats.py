"""The export formats: names, default output paths, telling a path's format, optional imports."""

from __future__ import annotations

import importlib
import os
from types import ModuleType

FORMATS = ("onnx", "savedmodel", "tflite")


def default_out(name: str, format: str) -> str:
    """``NAME.onnx``, ``NAME.tflite`` or ``NAME_savedmodel`` (a directory)."""
    return {"onnx": f"{name}.onnx", "tflite": f"{name}.tflite", "savedmodel": f"{name}_savedmodel"}[
        format
    ]


def check_format(format: str) -> None:
    """Raise a ValueError unless ``format`` is one of :data:`FORMATS`."""
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; expected one of {', '.join(FORMATS)}")


def detect_format(path: str) -> str:
    """The format of an export on disk: a SavedModel directory, a ``.onnx`` or ``.tflite``."""
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


def require(module: str, what: str) -> ModuleType:
    """Import an optional exporter or runtime, or say which extra installs it."""
    try:
        if module == "tensorflow":
            from panns_jax import tf_cpu

            return tf_cpu.import_tensorflow()
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(
            f"{what} needs {module.split('.')[0]}: pip install 'panns_jax[export]'"
        ) from None
