"""``python -m workbench.worker [--lane train|light]``: the background process that runs one lane's queued jobs."""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile

from workbench.jobs import DEFAULT_LANE, LANES, run_worker
from workbench.settings import get_settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workbench.worker")
    parser.add_argument("--once", action="store_true", help="run at most one job, then exit")
    parser.add_argument("--idle-exit", type=float, default=None,
                        help="exit after this many seconds with an empty queue (default: never)")
    parser.add_argument("--lane", choices=LANES, default=DEFAULT_LANE,
                        help="which jobs to run: train (training) or light (ingest, export, evaluate, predict)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO,
                        format=f"%(asctime)s worker[{args.lane}] %(process)d %(levelname)s %(message)s")
    # Scratch files of this process (latency-measurement ONNX exports, library temp files) stay
    # inside the data dir, like everything else Workbench writes.
    scratch = get_settings().tmp_dir / f"worker-{args.lane}"
    scratch.mkdir(parents=True, exist_ok=True)
    os.environ["TMPDIR"] = tempfile.tempdir = str(scratch)
    return run_worker(once=args.once, idle_exit_s=args.idle_exit, lane=args.lane)


if __name__ == "__main__":
    sys.exit(main())
