"""``panns-jax export`` / ``python -m panns_jax.export``: the command line of :func:`export`.

Parses the arguments, checks them before loading anything, and turns errors into one line
on stderr and an exit status (1: the export does not validate; 2: bad arguments or input).
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

import numpy as np

from panns_jax import loader, models
from panns_jax.export.formats import FORMATS
from panns_jax.export.pipeline import check_output, check_shape_options, export
from panns_jax.export.serving import DEFAULT_SECONDS
from panns_jax.export.source import resolve_source
from panns_jax.export.validation import ExportValidationError


def _load_validation_batch(path: str, sample_rate: int) -> np.ndarray:
    """A ``.npy`` / ``.npz`` (first array) batch, or an audio file as a batch of one."""
    if path.endswith(".npy"):
        return np.load(path).astype(np.float32)
    if path.endswith(".npz"):
        with np.load(path) as data:
            return data[data.files[0]].astype(np.float32)
    from panns_jax import audio

    return np.asarray(audio.load_audio(path, sample_rate), np.float32)[None]


def main_export(argv: Optional[Sequence[str]] = None) -> int:
    """``panns-jax export``: write and validate an ONNX / SavedModel / TFLite export."""
    parser = argparse.ArgumentParser(
        prog="panns-jax export",
        description="Export a PANNs model to ONNX, a TensorFlow "
        "SavedModel or LiteRT (TFLite); the export is validated against the JAX model.",
    )
    loader.add_arguments(
        parser, checkpoint_default="none, a randomly initialised --model", model_default="Cnn14"
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
            model, variables, meta = loader.load(model=args.model, overrides=args.overrides)
            name = meta.name
            print(
                f"warning: no checkpoint given; exporting a randomly initialised {name}",
                file=sys.stderr,
            )
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
