"""``panns-jax finetune DATA --workdir DIR``: fine-tune a PANN on your own labelled audio.

    panns-jax finetune DATA --model Cnn14 --strategy finetune --workdir DIR
    panns-jax finetune labels.csv --model DIR/best --strategy freeze_l1 --steps 500 --workdir W

DATA is a folder per class (``DATA/<class name>/**/<audio>``) or a CSV/TSV manifest with
``file`` and ``label`` columns (and optionally ``fold`` or ``split``); see
:mod:`panns_jax.finetune`. Bad data, a bad model or a bad value is one ``error:`` line and
exit status 2 before anything is built or written.
"""

from __future__ import annotations

import argparse
import logging as pylogging
import os
import sys
from typing import Optional, Sequence

import panns_jax
from panns_jax import checkpoints, recipe
from panns_jax.cli import infer

_PACKAGE = os.path.dirname(os.path.abspath(panns_jax.__file__)) + os.sep


def build_parser() -> argparse.ArgumentParser:
    """The arguments of ``panns-jax finetune``."""
    parser = argparse.ArgumentParser(
        prog="panns-jax finetune",
        description="Fine-tune a PANN on a folder per class or a CSV/TSV manifest.",
    )
    parser.add_argument("data", help="folder of class folders, or a CSV/TSV manifest")
    parser.add_argument("--workdir", required=True, help="where checkpoints and results go")
    add_model_arguments(parser, "; with --strategy scratch also an architecture")
    parser.add_argument("--strategy", choices=recipe.STRATEGIES, default="finetune")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default 10000)")
    parser.add_argument("--batch-size", type=int, default=None, help="clips per step (32)")
    parser.add_argument(
        "--clip-seconds",
        type=float,
        default=None,
        help="seconds per clip, cropped or padded (default: the longest recording, <= 10 s)",
    )
    parser.add_argument("--learning-rate", type=float, default=None, help="default 1e-4")
    parser.add_argument(
        "--clips-per-class",
        type=int,
        default=None,
        help="train on this many seeded clips of each class (single-label data; default all)",
    )
    parser.add_argument("--fold", type=int, default=None, help="held-out fold (fold column)")
    parser.add_argument("--holdout", type=float, default=0.1, help="validation fraction (0.1)")
    parser.add_argument("--seed", type=int, default=0)
    infer.add_conv_backend_argument(parser)
    parser.add_argument(
        "--max-bad-fraction",
        type=float,
        default=0.05,
        help="unusable files (missing, unreadable, outside DATA) skipped up to this fraction",
    )
    parser.add_argument(
        "--data-dir",
        default=None,
        help="where the decoded records are built (default: panns_jax_data beside --workdir)",
    )
    return parser


def add_model_arguments(parser: argparse.ArgumentParser, scratch: str = "") -> None:
    """``--model NAME_OR_CHECKPOINT``, ``--arch`` and ``--overrides``, as ``finetune`` and
    ``probe`` take them; ``scratch`` says what else ``--model`` may name."""
    parser.add_argument(
        "--model",
        default="Cnn14",
        help="pretrained model: a zoo name (downloaded once), a panns_jax checkpoint directory "
        f"or an original .pth{scratch} (default Cnn14)",
    )
    parser.add_argument("--arch", default=None, help="architecture of a .pth (default Cnn14)")
    parser.add_argument(
        "--overrides",
        type=checkpoints.parse_overrides,
        default=None,
        help="JSON object of architecture arguments of a .pth (or of a scratch model)",
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``panns-jax finetune``; returns the exit status (2: bad data or setup)."""
    args = build_parser().parse_args(argv)
    from absl import logging

    from panns_jax import finetune  # Imports TensorFlow and the training loop.

    logging.set_verbosity(logging.INFO)  # The loop's progress: steps, loss, ETA, evaluations.
    absl_logger = logging.get_absl_logger()
    if not any(isinstance(f, _OwnLines) for f in absl_logger.filters):
        absl_logger.addFilter(_OwnLines())
    data_dir = args.data_dir or finetune.data_dir_beside(args.workdir)
    try:
        finetune.check_outputs_outside(args.data, args.workdir, data_dir)
        config = finetune.make_config(
            args.data,
            strategy=args.strategy,
            model=args.model,
            arch=args.arch,
            overrides=args.overrides,
            holdout=args.holdout,
            max_bad_fraction=args.max_bad_fraction,
            clip_seconds=args.clip_seconds,
            data_dir=data_dir,
            arg=_arg(args),
        )
        for key, value in (("batch_size", args.batch_size), ("learning_rate", args.learning_rate)):
            if value is not None:
                config[key] = value
        config.conv_backend = args.conv_backend
        summary = finetune.run(config, args.workdir)
    except recipe.ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(finetune.format_results(summary))
    metric = "accuracy" if "accuracy" in summary else "mAP"
    kept = [("best", f"highest {metric}"), ("model", "last step")]
    kept = [(os.path.join(args.workdir, name), why) for name, why in kept]
    print("checkpoints: " + ", ".join(f"{p} ({why})" for p, why in kept if os.path.isdir(p)))
    return 0


class _OwnLines(pylogging.Filter):
    """Keep the libraries' INFO chatter (orbax's per-save lines) out of the progress log."""

    def filter(self, record: pylogging.LogRecord) -> bool:
        own = record.pathname.startswith(_PACKAGE)
        return record.levelno >= pylogging.WARNING or own


def _arg(args: argparse.Namespace) -> str:
    """transfer_config's arguments of the flags given."""
    given = {
        "steps": args.steps,
        "fold": args.fold,
        "seed": args.seed,
        "clips_per_class": args.clips_per_class,
    }
    return ",".join(f"{k}={v}" for k, v in given.items() if v is not None)
