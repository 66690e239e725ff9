"""The ``workbench`` command: each area registers its own subcommands."""
from __future__ import annotations

import argparse
import sys

from workbench.cli import auto, data, export, recommend, train, ui


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="workbench",
                                     description="Transfer-learning workbench for image classification.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for area in (data, recommend, train, auto, export, ui):
        area.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("Interrupted.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
