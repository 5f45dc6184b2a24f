"""``panns-jax probe DATA_OR_DATASET --model M``: how well a model's embeddings separate classes.

    panns-jax probe DATA --model Cnn14                    # a folder per class or a manifest
    panns-jax probe esc50 --model DIR/best --data-dir TFDS_DIR --output-dir RESULTS
    panns-jax probe labels.csv --model ckpt --json

A logistic regression and a kNN classifier are fitted on each recording's embedding (cached,
so a second probe of the same model and data embeds nothing) and scored by the data's
protocol (:mod:`panns_jax.probe`). The table, or with ``--json`` the JSON results, goes to
stdout. Bad data, a bad model or a bad value is one ``error:`` line and exit status 2 before
anything is written.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from typing import Optional, Sequence

from panns_jax.cli import finetune


def build_parser() -> argparse.ArgumentParser:
    """The arguments of ``panns-jax probe``."""
    parser = argparse.ArgumentParser(
        prog="panns-jax probe",
        description="Linear-probe benchmark of a model's embeddings: logistic regression and "
        "kNN on a folder per class, a CSV/TSV manifest or a transfer set "
        "(esc50, gtzan, ravdess, dcase2019_task1, dcase2018_task2, msos).",
    )
    parser.add_argument(
        "data", metavar="DATA_OR_DATASET", help="folder of class folders, manifest, or set name"
    )
    finetune.add_model_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print the JSON results")
    parser.add_argument(
        "--output-dir", default=None, help="write probe_results.json and pictures here"
    )
    parser.add_argument(
        "--cache-dir", default=None, help="embedding cache (default: probe/ in the user cache)"
    )
    parser.add_argument(
        "--data-dir",
        default=None,
        help="TFDS data dir: of a transfer set's build, or where own data's records go "
        "(default: data/ in the cache dir)",
    )
    parser.add_argument(
        "--clip-seconds",
        type=float,
        default=None,
        help="segment length; longer recordings are averaged over segments (default: the "
        "set's, or own data's shortest recording within 1-10 s)",
    )
    parser.add_argument("--holdout", type=float, default=0.1, help="eval fraction (0.1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=32, help="clips per batch (32)")
    parser.add_argument(
        "--max-bad-fraction",
        type=float,
        default=0.05,
        help="unusable files skipped up to this fraction",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``panns-jax probe``; returns the exit status (2: bad data or setup)."""
    args = build_parser().parse_args(argv)
    from panns_jax import probe  # Imports TensorFlow and JAX.
    from panns_jax.recipe import ConfigError

    try:  # TFDS prints its build progress: stdout holds only the table or the JSON.
        with contextlib.redirect_stdout(sys.stderr):
            results = probe.run(
                args.data,
                args.model,
                arch=args.arch,
                overrides=args.overrides,
                cache_dir=args.cache_dir,
                data_dir=args.data_dir,
                output_dir=args.output_dir,
                clip_seconds=args.clip_seconds,
                holdout=args.holdout,
                seed=args.seed,
                max_bad_fraction=args.max_bad_fraction,
                batch_size=args.batch_size,
                progress=not args.no_progress and sys.stderr.isatty(),
            )
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(results, indent=2) if args.json else probe.format_table(results))
    return 0
