"""``--json`` output for every command that prints results: one JSON document on stdout.

Services return dataclasses; this turns them (and the datetimes, paths, enums and numpy
scalars inside) into JSON. Messages for people go to stderr when ``--json`` is given, so
stdout stays parseable.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from datetime import date, datetime
from enum import Enum
from pathlib import Path
from typing import Any, TextIO


def jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | set):
        return [jsonable(v) for v in obj]
    if isinstance(obj, datetime | date):
        return obj.isoformat()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, Enum):
        return obj.value
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        return obj.item()
    if hasattr(obj, "tolist") and callable(obj.tolist):  # numpy arrays
        return obj.tolist()
    return obj


def print_json(obj: Any) -> None:
    print(json.dumps(jsonable(obj), indent=2, ensure_ascii=False))


def add_json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="machine-readable output (JSON on stdout)")


def human(args: argparse.Namespace) -> TextIO:
    """Where messages for people go: stderr under --json, else stdout."""
    return sys.stderr if getattr(args, "json", False) else sys.stdout
