"""``python -m panns_jax.models list | summary NAME``: what the registry holds."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from panns_jax import models
from panns_jax.models import profile


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m panns_jax.models", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="print every registered model name")
    summary = sub.add_parser("summary", help="parameter count, multiply-adds and output shapes")
    summary.add_argument("name", help="model name, e.g. Cnn14")
    args = parser.parse_args(argv)
    if args.command == "list":
        print("\n".join(models.names()))
        return 0
    try:
        info = profile.summary(args.name)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for key, value in info.items():
        if key == "outputs":
            print("outputs:")
            for out_name, shape in value.items():
                print(f"  {out_name}: {shape}")
        else:
            print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
