"""``panns-jax download``: fetch, verify and convert released checkpoints ahead of use.

    panns-jax download --list               # every model, its mAP, whether it is cached
    panns-jax download Cnn14 MobileNetV1    # or --all
    panns-jax download Cnn14 --from Cnn14_mAP=0.431.pth   # a copy you already have
    panns-jax download Cnn14_8k --force     # forget the cached copy and its recorded sha256

The table and the cache are :mod:`panns_jax.zoo`; the transfer and its checks are
:mod:`panns_jax.download`. Exit status: 0, or 2 with the error in one line.
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional, Sequence

from panns_jax import download, fileio, zoo


def build_parser() -> argparse.ArgumentParser:
    """The command's arguments: names, ``--all``, ``--list``, ``--from``, ``--force``,
    ``--no-progress``."""
    parser = argparse.ArgumentParser(
        prog="panns-jax download",
        description="Download, verify and convert the released PANNs checkpoints "
        f"(Zenodo record {zoo.ZENODO_RECORD}) into the cache ({fileio.cache_dir()}).",
    )
    parser.add_argument("names", nargs="*", help="zoo names, e.g. Cnn14 MobileNetV1")
    parser.add_argument("--all", action="store_true", help="every model of the zoo")
    parser.add_argument(
        "--list",
        action="store_true",
        help="name, mAP, size, how it is verified, whether it is cached",
    )
    parser.add_argument(
        "--from",
        dest="source",
        metavar="FILE",
        default=None,
        help="verify and install a .pth you already have (one NAME)",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="forget the cached copy, its recorded sha256 and its conversion, and download "
        "it again (with --from: install FILE in their place once it is verified); clears a "
        "wrong recorded digest",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``panns-jax download NAME... | --all | --list [--from FILE] [--force]``.

    Returns the exit status. Usage errors exit through argparse.
    """
    parser = build_parser()
    args = parser.parse_args(None if argv is None else list(argv))
    try:
        if args.list:
            _print_table()
            return 0
        names = list(zoo.table()) if args.all else args.names
        if not names:
            parser.error("name at least one model, or pass --all or --list")
        if args.source is not None and len(names) != 1:
            parser.error("--from FILE installs one model: name exactly one")
        if args.source is not None:  # --force: the copy replaces what is cached once verified.
            path = zoo.install(names[0], args.source, force=args.force)
            print(f"{names[0]}: verified {args.source} and installed it as {path}")
            return 0
        if args.force:
            for name in names:
                zoo.forget(name)
        _fetch(names, progress=not args.no_progress)
    except (ValueError, OSError) as err:  # DownloadError and ZooError are ValueErrors.
        print(f"error: {str(err).splitlines()[0] if str(err) else err}", file=sys.stderr)
        return 2
    return 0


def _print_table() -> None:
    """Every model of the zoo: its mAP, size, cache state, verification and use."""
    print(f"{'name':24s} {'mAP':>6s} {'size':>9s}  {'cached':9s} verified by / use")
    for entry in zoo.table().values():
        s = zoo.status(entry)
        print(
            f"{s['name']:24s} {s['map']:6.3f} {_size_text(s['size']):>9s}  "
            f"{s['cached']:9s} {s['verified_by']}; {s['purpose']}"
        )
    print(f"cache: {fileio.cache_dir()}")


def _fetch(names: List[str], *, progress: bool) -> None:
    """Download, verify and convert each model, and say where it is and how it was checked."""
    for name in names:
        entry = zoo.get(name)
        checkpoint = zoo.load(name, progress=progress)
        record = download.read_record(zoo.target(entry))
        digest = record.get("md5") if entry.md5 else record.get("sha256")
        print(
            f"{entry.name}: {zoo.pth_path(entry)} ({record.get('verified_by')}: {digest}), "
            f"{checkpoint.model} ready"
        )


def _size_text(size: Optional[int]) -> str:
    return f"{size / 1e6:.1f} MB" if size else "?"


if __name__ == "__main__":
    raise SystemExit(main())
