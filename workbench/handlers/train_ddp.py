"""One process of a data-parallel train job, started by torchrun (``workbench.handlers.ddp_launch``).

``python -m torch.distributed.run --standalone --nproc_per_node N -m workbench.handlers.train_ddp SPEC``.
Every process trains its share; rank 0 writes progress, metrics and events to the database
(DATABASE_URL, the job's run) through ``DbCallback``, whose cancel poll ``train()`` passes on
to all processes, and leaves ``result.json``; a process that fails leaves ``error.rank<R>.json``.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from core.train import Callback, TrainConfig, train
from storage.db import get_sessionmaker
from workbench.handlers.train import DbCallback
from workbench.jobs import JobContext
from workbench.paths import RunPaths
from workbench.settings import get_settings


def _plain(obj: Any) -> Any:
    """numpy numbers and arrays as JSON can hold them."""
    return obj.tolist() if hasattr(obj, "tolist") else str(obj)


class RankZeroCallback(DbCallback):
    """``DbCallback`` that also stops the processes when the worker that started them is gone:
    nobody would read their outcome, and the run may already be resumed on another host."""

    def __init__(self, ctx: JobContext, run_id: int, verify_s: float, worker_pid: int):
        super().__init__(ctx, run_id, verify_s)
        self.worker_pid = worker_pid

    def should_stop(self) -> bool:
        return super().should_stop() or not _alive(self.worker_pid)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's (cannot be ours, but not gone either)
        return True
    return True


def _callback(spec: dict[str, Any], rank: int) -> Callback:
    if rank != 0:
        return Callback()
    settings = get_settings()
    ctx = JobContext(spec["job_id"], spec["kind"], spec["run_id"], spec["payload"],
                     get_sessionmaker(settings.database_url), settings)
    return RankZeroCallback(ctx, spec["run_id"], float(spec["verify_s"]), int(spec["worker_pid"]))


def run(spec: dict[str, Any], rank: int) -> dict[str, Any]:
    """Train this process's share; the result as rank 0 reports it."""
    run_dir = RunPaths(get_settings(), spec["run_id"]).root
    res = train([tuple(s) for s in spec["train"]], spec["classes"], spec["variant"], run_dir,
                TrainConfig.from_dict(spec["config"]), resolution=spec["resolution"],
                val_samples=[tuple(s) for s in spec["val"]] or None, callback=_callback(spec, rank),
                resume=bool(spec["resume"]))
    return {"status": res.status, "best": res.best, "history": res.history, "best_path": str(res.best_path),
            "last_path": str(res.last_path), "train_seconds": res.train_seconds, "summary": res.summary}


def main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    out_dir, rank = Path(spec["out_dir"]), int(os.environ.get("RANK", "0"))
    try:
        result = run(spec, rank)
    except Exception as exc:  # noqa: BLE001 - every failure (a cancel too) is reported to the worker
        error = {"rank": rank, "kind": type(exc).__name__, "message": str(exc)}
        (out_dir / f"error.rank{rank}.json").write_text(json.dumps(error))
        # Non-zero: torchrun then ends the other processes, which may wait in a collective.
        return 1
    if rank == 0:
        tmp = out_dir / "result.json.tmp"
        tmp.write_text(json.dumps(result, default=_plain))
        tmp.replace(out_dir / "result.json")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
