"""``panns-jax export`` / ``python -m panns_jax.export``: the command line of
:func:`panns_jax.export.export`.

Parses the arguments, checks them before loading anything, and turns errors into one line
on stderr and an exit status (1: the export does not validate; 2: bad arguments or input).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np

from panns_jax import checks, loader, models
from panns_jax.export.formats import FORMATS
from panns_jax.export.pipeline import check_output, export
from panns_jax.export.serving import DEFAULT_SECONDS
from panns_jax.export.source import resolve_source
from panns_jax.export.validation import ExportValidationError


def build_parser() -> argparse.ArgumentParser:
    """The ``panns-jax export`` parser."""
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
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``panns-jax export``: write and validate an ONNX / SavedModel / TFLite export."""
    args = build_parser().parse_args(argv)
    try:
        check_arguments(args)  # Before loading anything.
        model, variables, name = _model(args)
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


def check_arguments(args: argparse.Namespace) -> None:
    """The shape options and the output path; ValueError (FileExistsError) naming them."""
    if args.seconds is not None:
        checks.positive_seconds(args.seconds, "--seconds")
    if args.batch_size is not None:
        checks.positive_integer(args.batch_size, "batch size")
    if args.out is not None:
        check_output(args.out, args.format, args.overwrite, args.checkpoint)


def _model(args: argparse.Namespace) -> Tuple[Any, Dict[str, Any], str]:
    """``(module, variables, name)`` of ``--checkpoint``, else a random ``--model``."""
    if args.checkpoint is not None:
        return resolve_source(args.checkpoint, args.model, args.overrides)
    module, variables, meta = loader.load(model=args.model, overrides=args.overrides)
    print(
        f"warning: no checkpoint given; exporting a randomly initialised {meta.name}",
        file=sys.stderr,
    )
    return module, variables, meta.name


def _load_validation_batch(path: str, sample_rate: int) -> np.ndarray:
    """A ``.npy`` / ``.npz`` (first array) batch, or an audio file as a batch of one."""
    if path.endswith(".npy"):
        return np.load(path).astype(np.float32)
    if path.endswith(".npz"):
        with np.load(path) as data:
            return data[data.files[0]].astype(np.float32)
    from panns_jax import audio

    return np.asarray(audio.load_audio(path, sample_rate), np.float32)[None]


if __name__ == "__main__":
    sys.exit(main())
