"""One worker process per lane and host: which kinds each lane runs, its lock, its pid, starting it.

``train`` runs training and latency measurement (CPU-heavy work that must not share the cores);
``light`` runs the shorter work the UI asks for (ingest, export, evaluate, predict), so an upload
never waits for a long training. A worker holds an exclusive ``flock`` on
``<data dir>/hosts/<host id>/worker.lock`` (train) or ``worker-<lane>.lock``; the lock, not the
pid file, is the truth about whether this host's worker lives. Locks are per host (a data dir
shared by several hosts holds one folder each), and only ever taken by processes of that host,
so they never rely on flock across machines: between hosts, job leases decide (workbench.workers).
Workers start detached (``start_new_session``) so they outlive the
browser tab, the Streamlit server or the CLI that asked for them.
"""
from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from storage.db import get_sessionmaker
from workbench import jobs
from workbench.settings import Settings, get_settings
from workbench.status import JobKind, Lane

DEFAULT_LANE = Lane.TRAIN
LANES = tuple(str(lane) for lane in Lane)
LANE_OF_KIND: dict[JobKind, Lane] = {
    JobKind.TRAIN: Lane.TRAIN,
    # Latency measurement shares the train lane: timings taken while a training holds the
    # cores would be inflated.
    JobKind.MEASURE: Lane.TRAIN,
    JobKind.SEARCH: Lane.TRAIN,  # trains trials: the cores are its
    JobKind.INGEST: Lane.LIGHT,
    JobKind.EXPORT: Lane.LIGHT,
    JobKind.EVALUATE: Lane.LIGHT,
    JobKind.PREDICT: Lane.LIGHT,
}


def lane_of(kind: str) -> Lane:
    """The lane whose worker runs jobs of this kind (unknown kinds: the default lane)."""
    return LANE_OF_KIND.get(kind, DEFAULT_LANE)  # type: ignore[call-overload]


def kinds_of(lane: str) -> list[str]:
    return [str(k) for k, v in LANE_OF_KIND.items() if v == lane]


def check_lane(lane: str) -> Lane:
    if lane not in LANES:
        raise ValueError(f"unknown worker lane {lane!r}; known lanes: {', '.join(LANES)}")
    return Lane(lane)


def host_dir(settings: Settings) -> Path:
    """This host's folder in the data dir: its lane locks and pid files."""
    return settings.data_dir / "hosts" / settings.host_id


def _lane_file(settings: Settings, lane: str, ext: str) -> Path:
    check_lane(lane)
    return host_dir(settings) / (f"worker.{ext}" if lane == DEFAULT_LANE else f"worker-{lane}.{ext}")


def lock_path(settings: Settings, lane: str = DEFAULT_LANE) -> Path:
    return _lane_file(settings, lane, "lock")


def pid_path(settings: Settings, lane: str = DEFAULT_LANE) -> Path:
    return _lane_file(settings, lane, "pid")


def pid_alive(pid: int | None) -> bool:
    """A live, non-zombie process with this pid (one being torn down after a kill has no command
    line any more: not alive either)."""
    if not pid:
        return False
    try:
        proc = psutil.Process(pid)
        return bool(proc.status() != psutil.STATUS_ZOMBIE and proc.cmdline())
    except psutil.Error:
        return False


def worker_pid(settings: Settings | None = None, lane: str = DEFAULT_LANE) -> int | None:
    """The pid of the lane's live worker, or of one just started that has not taken the lock yet
    (-1: starting, pid not known), or None."""
    settings = settings or get_settings()
    lp = lock_path(settings, lane)
    if not lp.exists():
        return _starting_pid(settings, lane)
    with open(lp, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                return int(pid_path(settings, lane).read_text().strip() or 0) or -1
            except (OSError, ValueError):
                return -1  # locked but the pid file is not written yet
        fcntl.flock(f, fcntl.LOCK_UN)
        return _starting_pid(settings, lane)


def _starting_pid(settings: Settings, lane: str) -> int | None:
    """A worker ``ensure_worker`` started that is still importing (seconds on a busy machine): without
    this, a caller polling every half second started a new worker each time, each slowing the rest."""
    try:
        pid = int(pid_path(settings, lane).read_text().strip() or 0)
    except (OSError, ValueError):
        return None
    try:
        cmd = psutil.Process(pid).cmdline() if pid_alive(pid) else []
    except psutil.Error:
        return None
    return pid if "workbench.worker" in cmd else None


def ensure_worker(settings: Settings | None = None, *, lane: str = DEFAULT_LANE, idle_exit_s: float = 120.0) -> int:
    """Start a detached worker for a lane unless one is alive; returns its pid (-1: starting)."""
    lane = check_lane(lane)
    settings = settings or get_settings()
    settings.ensure_dirs()
    pid = worker_pid(settings, lane)
    # A worker killed a moment ago may leave its lock held a few seconds longer (a child process it
    # forked still has the file open): wait for it rather than trust a dead pid and start nothing.
    deadline = time.monotonic() + 20.0
    while pid is not None and pid > 0 and not pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
        pid = worker_pid(settings, lane)
    if pid is not None:
        return pid
    logs = settings.data_dir / "logs"
    logs.mkdir(exist_ok=True)
    host_dir(settings).mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, WORKBENCH_DATA_DIR=str(settings.data_dir), DATABASE_URL=settings.database_url,
               WORKBENCH_HOST_ID=settings.host_id)
    repo_root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (repo_root, env.get("PYTHONPATH", "")) if p)
    log_name = ("worker" if lane == DEFAULT_LANE else f"worker-{lane}") + f"-{settings.host_id}.log"
    with open(logs / log_name, "ab") as out:
        # New session: Ctrl-C in the CLI or a Streamlit restart does not reach the worker.
        proc = subprocess.Popen([sys.executable, "-m", "workbench.worker", "--idle-exit", str(idle_exit_s),
                                 "--lane", lane],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True, cwd=repo_root)
    pid_path(settings, lane).write_text(str(proc.pid))  # "starting" until it holds the lock (worker_pid)
    return proc.pid


def submit(kind: str, payload: dict[str, Any], *, run_id: int | None = None, settings: Settings | None = None) -> int:
    """Queue a job and make sure its lane's worker runs; returns the job id."""
    settings = settings or get_settings()
    with get_sessionmaker(settings.database_url).begin() as s:
        job_id = jobs.enqueue(s, kind, run_id, payload).id
    ensure_worker(settings, lane=lane_of(kind))
    return job_id
