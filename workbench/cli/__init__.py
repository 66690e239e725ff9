"""The ``workbench`` command: each area registers its own subcommands."""
from __future__ import annotations

import argparse
import sys

from workbench import version
from workbench.cli import auto, data, export, recommend, serve, train, ui


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="workbench",
                                     description="Transfer-learning workbench for image classification.",
                                     epilog="Exit codes: 0 ok, 1 failed, 2 bad input.")
    parser.add_argument("--version", action="version", version=f"workbench {version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for area in (data, recommend, train, auto, export, ui, serve):
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
