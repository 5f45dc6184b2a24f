"""``panns-jax-convert``: original PANNs ``.pth`` files <-> panns_jax checkpoint directories.

    panns-jax-convert from-torch Cnn14_mAP=0.431.pth --model Cnn14 --out ckpt/cnn14
    panns-jax-convert to-torch ckpt/cnn14 --out cnn14.pth

The mapping itself is :mod:`panns_jax.convert`. ``to-torch`` reads its input through the one
loader (:func:`panns_jax.loader.load`), so it takes what every other command takes.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
from typing import Any, Callable, Iterable, Optional

from panns_jax import checkpoints, convert, loader


def build_parser() -> argparse.ArgumentParser:
    """The two subcommands and their options."""
    parser = argparse.ArgumentParser(
        prog="panns-jax-convert",
        description="Convert PANNs checkpoints between PyTorch and panns_jax.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    a = sub.add_parser("from-torch", help="original .pth -> panns_jax checkpoint directory")
    a.add_argument("checkpoint", help="a .pth: {'model': state_dict, ...} or a bare state_dict")
    a.add_argument("--model", required=True, help="architecture, e.g. Cnn14")
    a.add_argument("--out", required=True, help="output checkpoint directory")
    a.add_argument(
        "--num-classes",
        type=int,
        default=None,
        help="classes of the model (default: those of the checkpoint's architecture, 527)",
    )
    a.add_argument(
        "--new-head",
        action="store_true",
        help="transfer: keep everything but the classifier, which is re-initialised "
        "for --num-classes classes",
    )
    a.add_argument(
        "--overrides",
        type=checkpoints.parse_overrides,
        default=None,
        help="JSON object of further architecture arguments, e.g. the widths of a "
        "narrow model exported with to-torch: '{\"widths\": [16, 32, 64, 128]}'",
    )
    a.add_argument(
        "--overwrite",
        action="store_true",
        help="replace --out if it is a panns_jax checkpoint (never another directory)",
    )
    b = sub.add_parser("to-torch", help="panns_jax checkpoint directory -> original .pth")
    b.add_argument(
        "checkpoint",
        help="panns_jax checkpoint directory (or anything panns_jax loads: a pretrained "
        "model name, a .pth with --model)",
    )
    b.add_argument("--model", default=None, help="architecture (default: the checkpoint's own)")
    b.add_argument("--out", required=True, help="output .pth path")
    return parser


def main(argv: Optional[Iterable[str]] = None) -> int:
    """Run ``panns-jax-convert from-torch | to-torch`` and return the exit status.

    The status is 0 on success and 2 on an error, which is printed as one line.
    """
    args = build_parser().parse_args(None if argv is None else list(argv))
    try:
        _check_output(args)  # Before reading or converting anything.
        if args.command == "from-torch":
            _from_torch(args)
        else:
            _to_torch(args)
    except (ValueError, FileNotFoundError, FileExistsError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # A full disk, a read-only or vanished directory.
        print(
            f"error: cannot write {args.out}: {err.strerror or err}"
            f"{f' ({err.filename})' if err.filename else ''}; nothing was written",
            file=sys.stderr,
        )
        return 2
    return 0


def _from_torch(args: argparse.Namespace) -> None:
    state, iteration = convert.read_torch_checkpoint(args.checkpoint)
    checkpoint = convert.torch_to_checkpoint(
        state,
        args.model,
        num_classes=args.num_classes,
        new_head=args.new_head,
        step=iteration,
        overrides=args.overrides,
    )
    path = _quiet_orbax(checkpoints.save, args.out, checkpoint, overwrite=args.overwrite)
    print(f"wrote {path} ({args.model}, iteration {iteration})")


def _to_torch(args: argparse.Namespace) -> None:
    model, variables, meta = loader.load(args.checkpoint, model=args.model)
    state = convert.to_state_dict(variables, model)
    convert.write_torch_checkpoint(args.out, state, meta.step)
    print(f"wrote {args.out} ({meta.name}, {len(state)} entries)")


def _check_output(args: argparse.Namespace) -> None:
    """Refuse an ``--out`` that cannot be written or that would destroy something.

    ``--out`` must differ from the input and lie in a writable directory. ``from-torch``
    replaces an existing path only with ``--overwrite`` and only when it is one of our
    checkpoints, never an arbitrary directory. ``to-torch`` writes a file, never onto a
    directory.
    """
    out, source = os.path.abspath(args.out), os.path.abspath(args.checkpoint)
    if os.path.exists(out) and os.path.exists(source) and os.path.samefile(out, source):
        raise ValueError(f"--out {args.out} is the input checkpoint; choose another path")
    if args.command == "from-torch" and os.path.lexists(out):
        if not args.overwrite:
            raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
        if not checkpoints.is_model_checkpoint(out):
            raise FileExistsError(
                f"{out} exists and is not a panns_jax checkpoint (no "
                f"{checkpoints.METADATA_FILE}); refusing to replace it: choose "
                "another --out or remove it yourself"
            )
    if args.command == "to-torch" and os.path.isdir(out):
        raise ValueError(f"--out {args.out} is a directory; give a .pth file name")
    parent = _nearest_existing_parent(out)
    if parent and (not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK)):
        raise ValueError(f"--out {args.out}: cannot write in {parent} (not a writable directory)")


def _nearest_existing_parent(path: str) -> str:
    """The closest ancestor of ``path`` that exists (saving creates the ones between)."""
    parent = os.path.dirname(path)
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent) if os.path.dirname(parent) != parent else ""
    return parent


def _quiet_orbax(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run ``function`` with the asyncio and orbax loggers and the exception hooks silenced.

    When a save fails (a full disk, say), orbax's background threads log every pending
    write ("Event loop is closed", hundreds of lines) before the real error surfaces. The
    caller reports that error in one line. The loggers and hooks are restored afterwards,
    on failure too.
    """
    names = ("asyncio", "absl", "orbax", "concurrent.futures")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    hooks = sys.excepthook, sys.unraisablehook, threading.excepthook
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    # tensorstore callbacks into a closed event loop print through these hooks.
    sys.excepthook = sys.unraisablehook = threading.excepthook = lambda *a: None
    try:
        return function(*args, **kwargs)
    except BaseException:
        # The failed save's other write tasks report "Task exception was never retrieved"
        # when they are collected, which may be as late as the interpreter's exit.
        asyncio_logger = logging.getLogger("asyncio")
        if not any(isinstance(f, _AbandonedOrbaxWrites) for f in asyncio_logger.filters):
            asyncio_logger.addFilter(_AbandonedOrbaxWrites())
        raise
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
        sys.excepthook, sys.unraisablehook, threading.excepthook = hooks


class _AbandonedOrbaxWrites(logging.Filter):
    """Drops asyncio's report of an orbax write task whose failure nobody retrieved: the
    save's own error is already reported, in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not ("exception was never retrieved" in text and "orbax" in text)


if __name__ == "__main__":
    raise SystemExit(main())
