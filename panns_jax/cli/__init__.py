"""The command lines: ``panns-jax`` and its subcommands, each in a module of this package.

    panns-jax tag | sed | embed ...   # panns_jax.cli.infer: tagging, SED, embeddings of files
    panns-jax export ...              # panns_jax.cli.export (also python -m panns_jax.export)
    panns-jax stream FILE | --mic     # panns_jax.cli.stream
    panns-jax download NAME | --list  # panns_jax.cli.download: the model zoo
    panns-jax finetune DATA ...       # panns_jax.cli.finetune: fine-tune on your own audio
    panns-jax probe DATA --model M    # panns_jax.cli.probe: linear-probe benchmark of embeddings

:func:`main` only dispatches. The export, stream and download modules parse their own
arguments (``-h`` included) and are imported when run, so TensorFlow, sounddevice, the
network and the training loop stay out of tag / sed / embed.
"""

from __future__ import annotations

import argparse
from typing import Callable, Optional, Sequence

from panns_jax.cli import infer

# Subcommands whose arguments their own modules parse: `panns-jax export ...` runs
# `panns_jax.cli.export.main([...])`.
DELEGATED_HELP = {
    "export": "export to ONNX / SavedModel / LiteRT (panns-jax export -h)",
    "stream": "streaming tagging of a file or microphone (panns-jax stream -h)",
    "download": "download, verify and convert released checkpoints (panns-jax download -h)",
    "finetune": "fine-tune on your own labelled audio (panns-jax finetune -h)",
    "probe": "linear-probe benchmark of a model's embeddings (panns-jax probe -h)",
}


def build_parser() -> argparse.ArgumentParser:
    """The ``panns-jax`` parser: one subcommand each for tag, sed, embed, export, stream,
    download, finetune and probe."""
    parser = argparse.ArgumentParser(
        prog="panns-jax", description="PANNs audio tagging, SED and embeddings in JAX"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    infer.add_commands(sub)
    for name, help_text in DELEGATED_HELP.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``panns-jax tag | sed | embed | export | stream | download | finetune | probe``; returns the
    exit status (1 when any file failed, 2 on bad setup)."""
    parser = build_parser()
    args, rest = parser.parse_known_args(None if argv is None else [str(a) for a in argv])
    if args.command in DELEGATED_HELP:
        return _delegated(args.command)(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return infer.run(args)


def _delegated(command: str) -> Callable[[Sequence[str]], int]:
    """The ``main`` of a delegated subcommand's module, imported now."""
    if command == "export":
        from panns_jax.cli import export

        return export.main
    if command == "stream":
        from panns_jax.cli import stream

        return stream.main
    if command == "finetune":
        from panns_jax.cli import finetune

        return finetune.main
    if command == "probe":
        from panns_jax.cli import probe

        return probe.main
    from panns_jax.cli import download

    return download.main
