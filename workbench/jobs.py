"""A generic job queue in SQLite and the worker process that drains it.

* Jobs are rows of the ``jobs`` table (queued -> running -> succeeded | failed | cancelled).
* ONE worker process at a time (an exclusive ``flock`` on ``<data dir>/worker.lock``) claims
  queued jobs one by one with a single atomic UPDATE and runs the handler registered for the
  job's kind. It is started detached (``start_new_session``) so it outlives the browser tab
  or the CLI that asked for it.
* Handlers are registered by kind (``register_handler``); ``workbench.runs`` registers
  ``train``, other modules (e.g. ``workbench.postrun``) may register more.
* Every write is a short transaction; SQLite runs in WAL mode with a busy timeout
  (storage.db), so the UI reading progress never blocks the worker writing it.
* ``reconcile`` makes the database tell the truth after a crash: a job marked running whose
  worker is gone is failed with "worker died", and its run is offered for resume.
"""
from __future__ import annotations

import fcntl
import importlib
import logging
import os
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import psutil
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from storage.db import get_sessionmaker
from storage.models import Job, Run, RunEvent, utcnow
from workbench.settings import Settings, get_settings

log = logging.getLogger("workbench.jobs")

TERMINAL = ("succeeded", "failed", "cancelled")
# Modules imported by the worker so that they register their handlers.
HANDLER_MODULES = ("workbench.runs", "workbench.postrun")


# ---------------------------------------------------------------------------------------------
# Handlers
# ---------------------------------------------------------------------------------------------
@dataclass
class JobContext:
    """What a handler gets: the job, the database, and cheap ways to report."""

    job_id: int
    kind: str
    run_id: Optional[int]
    payload: dict[str, Any]
    session_factory: sessionmaker[Session]
    settings: Settings
    stop_requested: Callable[[], bool] = field(default=lambda: False)  # worker asked to shut down

    def progress(self, snapshot: dict[str, Any]) -> None:
        set_progress(self.session_factory, self.job_id, snapshot)

    def event(self, message: str, level: str = "info", data: Optional[dict[str, Any]] = None) -> None:
        if self.run_id is not None:
            add_event(self.session_factory, self.run_id, message, level, data)


@dataclass
class JobOutcome:
    status: str = "succeeded"  # succeeded | failed | cancelled
    error: Optional[str] = None


Handler = Callable[[JobContext], Optional[JobOutcome]]
_HANDLERS: dict[str, Handler] = {}


def register_handler(kind: str, handler: Handler) -> None:
    _HANDLERS[kind] = handler


def get_handler(kind: str) -> Handler | None:
    if kind not in _HANDLERS:
        load_handlers()
    return _HANDLERS.get(kind)


def load_handlers() -> None:
    for name in HANDLER_MODULES:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            if exc.name != name:  # the module exists but is broken: say so
                log.warning("handler module %s failed to import: %s", name, exc)


# ---------------------------------------------------------------------------------------------
# Short transactions
# ---------------------------------------------------------------------------------------------
def enqueue(session: Session, kind: str, run_id: Optional[int] = None,
            payload: Optional[dict[str, Any]] = None) -> Job:
    """Add a queued job inside the caller's transaction."""
    job = Job(kind=kind, status="queued", run_id=run_id, payload=payload or {}, created_at=utcnow())
    session.add(job)
    session.flush()
    return job


def claim_next_job(session_factory: sessionmaker[Session], worker_pid: int) -> Optional[Job]:
    """Atomically take the oldest queued job (one UPDATE ... RETURNING: no check-then-act race)."""
    oldest = select(Job.id).where(Job.status == "queued").order_by(Job.id).limit(1).scalar_subquery()
    with session_factory.begin() as s:
        job_id = s.execute(
            update(Job).where(Job.id == oldest, Job.status == "queued")
            .values(status="running", worker_pid=worker_pid, started_at=utcnow(), error=None)
            .returning(Job.id)
        ).scalar()
        return s.get(Job, job_id) if job_id is not None else None


def finish_job(session_factory: sessionmaker[Session], job_id: int, status: str, error: Optional[str] = None) -> None:
    with session_factory.begin() as s:
        s.execute(update(Job).where(Job.id == job_id).values(status=status, error=error, finished_at=utcnow()))


def set_progress(session_factory: sessionmaker[Session], job_id: int, snapshot: dict[str, Any]) -> None:
    with session_factory.begin() as s:
        s.execute(update(Job).where(Job.id == job_id).values(progress={**snapshot, "updated": time.time()}))


def add_event(session_factory: sessionmaker[Session], run_id: int, message: str, level: str = "info",
              data: Optional[dict[str, Any]] = None) -> None:
    with session_factory.begin() as s:
        s.add(RunEvent(run_id=run_id, message=message, level=level, data=data, created_at=utcnow()))


# ---------------------------------------------------------------------------------------------
# Worker liveness
# ---------------------------------------------------------------------------------------------
def lock_path(settings: Settings) -> Path:
    return settings.data_dir / "worker.lock"


def pid_path(settings: Settings) -> Path:
    return settings.data_dir / "worker.pid"


def pid_alive(pid: Optional[int]) -> bool:
    """A live, non-zombie process with this pid."""
    if not pid:
        return False
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def worker_pid(settings: Optional[Settings] = None) -> Optional[int]:
    """The pid of the live worker, or None. The lock, not the pid file, is the truth."""
    settings = settings or get_settings()
    lp = lock_path(settings)
    if not lp.exists():
        return None
    with open(lp, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                return int(pid_path(settings).read_text().strip() or 0) or -1
            except (OSError, ValueError):
                return -1  # locked but the pid file is not written yet
        fcntl.flock(f, fcntl.LOCK_UN)
        return None


def ensure_worker(settings: Optional[Settings] = None, *, idle_exit_s: float = 120.0) -> int:
    """Start a detached worker process unless one is alive; returns its pid (-1: starting)."""
    settings = settings or get_settings()
    settings.ensure_dirs()
    pid = worker_pid(settings)
    if pid is not None:
        return pid
    logs = settings.data_dir / "logs"
    logs.mkdir(exist_ok=True)
    env = dict(os.environ, WORKBENCH_DATA_DIR=str(settings.data_dir), DATABASE_URL=settings.database_url)
    repo_root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (repo_root, env.get("PYTHONPATH", "")) if p)
    with open(logs / "worker.log", "ab") as out:
        # New session: Ctrl-C in the CLI or a Streamlit restart does not reach the worker.
        proc = subprocess.Popen([sys.executable, "-m", "workbench.worker", "--idle-exit", str(idle_exit_s)],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True, cwd=repo_root)
    return proc.pid


# ---------------------------------------------------------------------------------------------
# Reconcile
# ---------------------------------------------------------------------------------------------
def reconcile(session_factory: Optional[sessionmaker[Session]] = None, settings: Optional[Settings] = None,
              *, current_worker: Optional[int] = None) -> list[int]:
    """Fail jobs marked running whose worker is gone; returns their ids.

    ``current_worker``: the pid of the worker calling this (it holds the lock, so any other
    pid recorded on a running job is dead by construction).
    """
    settings = settings or get_settings()
    sf = session_factory or get_sessionmaker(settings.database_url)
    live = worker_pid(settings) if current_worker is None else current_worker
    fixed: list[int] = []
    with sf() as s:
        running = s.execute(select(Job.id, Job.worker_pid, Job.run_id).where(Job.status == "running")).all()
    for job_id, pid, run_id in running:
        if current_worker is not None:
            dead = pid != current_worker
        else:
            dead = live is None or not pid_alive(pid)
        if not dead:
            continue
        msg = f"worker died (pid {pid}) while running this job"
        with sf.begin() as s:
            changed = s.execute(update(Job).where(Job.id == job_id, Job.status == "running")
                                .values(status="failed", error=msg, finished_at=utcnow())).rowcount
            if changed and run_id is not None:
                run = s.get(Run, run_id)
                if run is not None and run.status == "running":
                    from workbench.runs import last_checkpoint_epoch  # lazy: runs imports this module

                    epoch = last_checkpoint_epoch(s, run)
                    resumable = epoch is not None
                    run.status, run.finished_at = "failed", utcnow()
                    run.error = (f"Worker died (pid {pid}) during training. "
                                 + (f"Resume from the checkpoint after epoch {epoch}." if resumable
                                    else "No checkpoint was written yet: resume restarts it."))
                    s.add(RunEvent(run_id=run_id, level="error", message=run.error, created_at=utcnow(),
                                   data={"resumable": True, "checkpoint_epoch": epoch}))
        if changed:
            fixed.append(job_id)
    return fixed


# ---------------------------------------------------------------------------------------------
# The worker loop
# ---------------------------------------------------------------------------------------------
class _Stop:
    requested = False


def execute_job(job: Job, session_factory: sessionmaker[Session], settings: Settings,
                stop_requested: Callable[[], bool] = lambda: False) -> JobOutcome:
    """Run one claimed job to a terminal state (never raises)."""
    ctx = JobContext(job.id, job.kind, job.run_id, dict(job.payload or {}), session_factory, settings,
                     stop_requested)
    handler = get_handler(job.kind)
    if handler is None:
        outcome = JobOutcome("failed", f"no handler registered for job kind {job.kind!r}")
    else:
        try:
            outcome = handler(ctx) or JobOutcome()
        except Exception as exc:  # noqa: BLE001 - a handler bug must not kill the worker
            outcome = JobOutcome("failed", f"{type(exc).__name__}: {exc}")
            ctx.event(f"Job {job.id} ({job.kind}) crashed: {outcome.error}", "error",
                      {"traceback": traceback.format_exc()[-4000:]})
    finish_job(session_factory, job.id, outcome.status, outcome.error)
    return outcome


def run_worker(settings: Optional[Settings] = None, *, once: bool = False, idle_exit_s: Optional[float] = None,
               poll_s: float = 0.5) -> int:
    """Drain the queue. Returns 0; returns 3 at once if another worker holds the lock."""
    settings = settings or get_settings()
    settings.ensure_dirs()
    lock_file = open(lock_path(settings), "a+")
    try:
        fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        log.info("another worker is running; exiting")
        lock_file.close()
        return 3
    me = os.getpid()
    pid_path(settings).write_text(str(me))

    def _on_term(signum: int, _frame: Any) -> None:
        # Finish cleanly: the running job stops at its next batch and stays resumable.
        _Stop.requested = True
    signal.signal(signal.SIGTERM, _on_term)

    try:
        sf = get_sessionmaker(settings.database_url)
        reconcile(sf, settings, current_worker=me)
        load_handlers()
        idle_since = time.monotonic()
        while not _Stop.requested:
            job = claim_next_job(sf, me)
            if job is not None:
                execute_job(job, sf, settings, lambda: _Stop.requested)
                idle_since = time.monotonic()
                if once:
                    break
                continue
            if once or (idle_exit_s is not None and time.monotonic() - idle_since > idle_exit_s):
                break
            time.sleep(poll_s)
    finally:
        try:
            if pid_path(settings).read_text().strip() == str(me):
                pid_path(settings).unlink()
        except OSError:
            pass
        fcntl.flock(lock_file, fcntl.LOCK_UN)
        lock_file.close()
    return 0


__all__ = ["JobContext", "JobOutcome", "register_handler", "get_handler", "enqueue", "claim_next_job",
           "finish_job", "set_progress", "add_event", "ensure_worker", "worker_pid", "pid_alive", "reconcile",
           "execute_job", "run_worker", "TERMINAL"]
