"""A train job with ``processes > 1``: the worker starts ``torchrun`` and waits for it.

The processes run ``workbench.handlers.train_ddp``; rank 0 reports progress, metrics and events
to the database itself (the same ``DbCallback`` as a one-process run) and leaves its result in a
file. This side forwards a worker shutdown, and turns what the processes left behind into the
outcomes ``train()`` would have given in-process: a ``TrainResult``, or the same exceptions.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from core.data import DataError
from core.train import TrainingCancelled, TrainingError, TrainResult
from workbench.jobs import JobContext
from workbench.paths import RunPaths

CANCEL_GRACE_S = 60.0  # after a cancel, the processes stop themselves within a batch; then they are ended
POLL_S = 0.5
LOG_NAME = "processes.log"  # torchrun's and the processes' output, in the run folder


def spec_for(ctx: JobContext, todo: dict[str, Any], resume: bool, verify_s: float, out_dir: Path
             ) -> dict[str, Any]:
    """What each process needs to train: the job, the samples, the config (a JSON file's content)."""
    from dataclasses import asdict

    return {"job_id": ctx.job_id, "kind": ctx.kind, "run_id": ctx.run_id, "payload": ctx.payload,
            "train": todo["train"], "val": todo["val"], "classes": todo["classes"], "variant": todo["variant"],
            "resolution": todo["resolution"], "config": asdict(todo["cfg"]), "resume": resume,
            "verify_s": verify_s, "out_dir": str(out_dir), "worker_pid": os.getpid()}


def torchrun_command(processes: int, spec_path: Path) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
            "-m", "workbench.handlers.train_ddp", str(spec_path)]


def child_env(ctx: JobContext, processes: int) -> dict[str, str]:
    """The worker's environment, its data dir and database made explicit, the cores shared out."""
    threads = max(1, (os.cpu_count() or 1) // processes)
    return {**os.environ, "WORKBENCH_DATA_DIR": str(ctx.settings.data_dir),
            "DATABASE_URL": ctx.settings.database_url, "OMP_NUM_THREADS": str(threads)}


def train_in_processes(ctx: JobContext, todo: dict[str, Any], resume: bool, verify_s: float,
                       user_cancelled: Callable[[], bool]) -> TrainResult:
    """Run the training under torchrun; the result, or DataError / TrainingError / TrainingCancelled."""
    assert ctx.run_id is not None
    processes = int(todo["cfg"].processes)
    run_dir = RunPaths(ctx.settings, ctx.run_id).root
    out_dir = run_dir / "processes"
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("*.json"):  # a resumed run's earlier attempt
        old.unlink()
    spec_path = out_dir / "spec.json"
    spec_path.write_text(json.dumps(spec_for(ctx, todo, resume, verify_s, out_dir)))
    ctx.event(f"Training with {processes} processes (data-parallel); their output goes to "
              f"{LOG_NAME} in the run folder.")
    with open(run_dir / LOG_NAME, "ab") as log:
        proc = subprocess.Popen(torchrun_command(processes, spec_path), stdout=log, stderr=subprocess.STDOUT,
                                env=child_env(ctx, processes), start_new_session=True)
        rc = _wait(proc, ctx.stop_requested, user_cancelled)
    if ctx.stop_requested() and not (rc == 0 and (out_dir / "result.json").is_file()):
        raise TrainingCancelled("the worker was stopped")
    return read_outcome(out_dir, rc, processes, run_dir / LOG_NAME)


def _wait(proc: subprocess.Popen[bytes], worker_stopping: Callable[[], bool],
          user_cancelled: Callable[[], bool]) -> int:
    """Wait for torchrun; end it when the worker stops, or when a cancel is not obeyed in time."""
    cancelled_at: float | None = None
    while proc.poll() is None:
        if cancelled_at is None and user_cancelled():
            cancelled_at = time.monotonic()
        late = cancelled_at is not None and time.monotonic() - cancelled_at > CANCEL_GRACE_S
        if worker_stopping() or late:
            _end(proc)
            break
        time.sleep(POLL_S)
    return proc.wait()


def _end(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to torchrun (it stops its processes), then a kill of the whole group if it lingers."""
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait()


def read_outcome(out_dir: Path, rc: int, processes: int, log_path: Path) -> TrainResult:
    """Rank 0's result file; else the first process's error, raised as train() would raise it."""
    result = out_dir / "result.json"
    if rc == 0 and result.is_file():
        r = json.loads(result.read_text())
        return TrainResult(r["status"], r["best"], r["history"], Path(r["best_path"]), Path(r["last_path"]),
                           float(r["train_seconds"]), r["summary"])
    errors = [json.loads(p.read_text()) for p in sorted(out_dir.glob("error.rank*.json"))]
    # A cancel seen by all processes, unless one of them failed for a reason of its own.
    errors.sort(key=lambda e: e["kind"] == "TrainingCancelled")
    if not errors:
        raise TrainingError(f"A training process stopped unexpectedly (exit code {rc}) before it could say why. "
                            f"The last lines of {log_path.name} in the run folder: {_tail(log_path)}")
    kind, message = errors[0]["kind"], errors[0]["message"]
    if kind == "TrainingCancelled":
        raise TrainingCancelled(message)
    if kind == "DataError":
        raise DataError(message)
    if kind in ("TrainingError", "WeightsError", "DeviceError"):
        raise TrainingError(message)
    raise TrainingError(f"Training process {errors[0]['rank']} of {processes} crashed: {kind}: {message}")


def _tail(path: Path, chars: int = 600) -> str:
    try:
        return path.read_text(errors="replace")[-chars:].strip() or "(empty)"
    except OSError:
        return "(no log)"
