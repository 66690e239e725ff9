"""Exit codes of every `workbench` command, and turning user errors into exit code 2.

0 ok, 1 failed, 2 bad input (a plain message on stderr, no traceback).
"""
from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable

EXIT_OK = 0
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
