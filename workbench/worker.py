"""``python -m workbench.worker``: the background process that runs queued jobs."""
from __future__ import annotations

import argparse
import logging
import sys

from workbench.jobs import run_worker


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workbench.worker")
    parser.add_argument("--once", action="store_true", help="run at most one job, then exit")
    parser.add_argument("--idle-exit", type=float, default=None,
                        help="exit after this many seconds with an empty queue (default: never)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s worker %(process)d %(levelname)s %(message)s")
    return run_worker(once=args.once, idle_exit_s=args.idle_exit)


if __name__ == "__main__":
    sys.exit(main())
