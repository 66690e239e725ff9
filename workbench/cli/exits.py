"""Exit codes of every `workbench` command, and turning user errors into exit code 2.

0 ok, 1 failed, 2 bad input (a plain message on stderr, no traceback).
"""
from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable

from core.names import is_id

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2

Command = Callable[[argparse.Namespace], int]


def fail(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return EXIT_BAD_INPUT


def guard(fn: Command, errors: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError)) -> Command:
    """Turn user errors (``errors``: the ValueError family, missing files) into exit code 2 with a message."""

    @functools.wraps(fn)
    def wrapper(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except errors as e:
            return fail(str(e))

    return wrapper


def id_arg(kind: str) -> Callable[[str], int]:
    """An argparse type for a RUN or SEARCH id: ASCII digits only. ``int`` alone would read
    "٣" as run 3; argparse answers anything else with exit code 2 and this message."""
    def parse(text: str) -> int:
        if not is_id(text):
            raise argparse.ArgumentTypeError(f"{kind} must be a {kind.lower()} id (a whole number such as 3), "
                                             f"got {text!r}")
        return int(text)

    return parse
