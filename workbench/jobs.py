"""A generic job queue in SQLite and the worker process that drains it.

* Jobs are rows of the ``jobs`` table (queued -> running -> succeeded | failed | cancelled).
* Every job kind belongs to a **lane** (``LANE_OF_KIND``, default ``train``): ``train`` for
  training and latency measurement (CPU-heavy work that must not share the cores), ``light``
  for the shorter work the UI asks for (ingest, export, evaluate, predict), so an upload never
  waits for a long training to finish.
* ONE worker process per lane (an exclusive ``flock`` on ``<data dir>/worker.lock`` for the
  train lane, ``worker-<lane>.lock`` for the others) claims its lane's queued jobs one by one
  with a single atomic UPDATE and runs the handler registered for the job's kind. It is
  started detached (``start_new_session``) so it outlives the browser tab, the Streamlit
  server or the CLI that asked for it.
* Handlers are registered by kind (``register_handler``); ``workbench.runs`` registers
  ``train``, ``workbench.postrun`` ``evaluate``/``export``, ``workbench.tasks``
  ``ingest``/``predict``/``measure``.
* Every write is a short transaction; SQLite runs in WAL mode with a busy timeout
  (storage.db), so the UI reading progress never blocks the worker writing it.
* ``reconcile`` makes the database tell the truth after a crash: a job marked running whose
  lane's worker is gone is failed with "worker died", and a training run is offered for resume.
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
from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from storage.db import get_sessionmaker
from storage.models import Job, Run, RunEvent, utcnow
from workbench.settings import Settings, get_settings

log = logging.getLogger("workbench.jobs")

TERMINAL = ("succeeded", "failed", "cancelled")
# Modules imported by the worker so that they register their handlers.
HANDLER_MODULES = ("workbench.runs", "workbench.postrun", "workbench.tasks")

# Lanes: one worker process each, so light jobs never queue behind a long training.
DEFAULT_LANE = "train"
LANES = ("train", "light")
LANE_OF_KIND: dict[str, str] = {"train": "train", "ingest": "light", "export": "light", "evaluate": "light",
                                "predict": "light",
                                # Latency measurement shares the train lane: timings taken while a
                                # training holds the cores would be inflated.
                                "measure": "train"}


def lane_of(kind: str) -> str:
    """The lane whose worker runs jobs of this kind (unknown kinds: the default lane)."""
    return LANE_OF_KIND.get(kind, DEFAULT_LANE)


def _check_lane(lane: str) -> str:
    if lane not in LANES:
        raise ValueError(f"unknown worker lane {lane!r}; known lanes: {', '.join(LANES)}")
    return lane


def _lane_filter(lane: str) -> Any:
    """SQL condition selecting the jobs of one lane."""
    own = [k for k, v in LANE_OF_KIND.items() if v == lane]
    cond = Job.kind.in_(own)
    if lane == DEFAULT_LANE:  # unknown kinds land here, so they fail readably instead of waiting forever
        cond = or_(cond, Job.kind.not_in(list(LANE_OF_KIND)))
    return cond


def friendly(exc: BaseException) -> str:
    """One readable line for an exception (no traceback)."""
    msg = str(exc).strip()
    if not msg:
        msg = exc.__class__.__name__
    if len(msg) > 600:
        msg = msg[:600] + "…"
    return msg


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

    def save_result(self, result: dict[str, Any]) -> None:
        """Merge ``result`` into the job's payload (where pages read a job's outcome)."""
        set_payload(self.session_factory, self.job_id, {**self.payload, **result})

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


def claim_next_job(session_factory: sessionmaker[Session], worker_pid: int, lane: str = DEFAULT_LANE
                   ) -> Optional[Job]:
    """Atomically take the lane's oldest queued job (one UPDATE ... RETURNING: no check-then-act race)."""
    oldest = (select(Job.id).where(Job.status == "queued", _lane_filter(lane)).order_by(Job.id).limit(1)
              .scalar_subquery())
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


def set_payload(session_factory: sessionmaker[Session], job_id: int, payload: dict[str, Any]) -> None:
    import json

    safe = json.loads(json.dumps(payload, default=str))  # e.g. paths: stored as text
    with session_factory.begin() as s:
        s.execute(update(Job).where(Job.id == job_id).values(payload=safe))


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
def _lane_file(settings: Settings, lane: str, ext: str) -> Path:
    _check_lane(lane)
    return settings.data_dir / (f"worker.{ext}" if lane == DEFAULT_LANE else f"worker-{lane}.{ext}")


def lock_path(settings: Settings, lane: str = DEFAULT_LANE) -> Path:
    return _lane_file(settings, lane, "lock")


def pid_path(settings: Settings, lane: str = DEFAULT_LANE) -> Path:
    return _lane_file(settings, lane, "pid")


def pid_alive(pid: Optional[int]) -> bool:
    """A live, non-zombie process with this pid."""
    if not pid:
        return False
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def worker_pid(settings: Optional[Settings] = None, lane: str = DEFAULT_LANE) -> Optional[int]:
    """The pid of the lane's live worker, or None. The lock, not the pid file, is the truth."""
    settings = settings or get_settings()
    lp = lock_path(settings, lane)
    if not lp.exists():
        return None
    with open(lp, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                return int(pid_path(settings, lane).read_text().strip() or 0) or -1
            except (OSError, ValueError):
                return -1  # locked but the pid file is not written yet
        fcntl.flock(f, fcntl.LOCK_UN)
        return None


def ensure_worker(settings: Optional[Settings | str] = None, *, lane: Optional[str] = None,
                  idle_exit_s: float = 120.0) -> int:
    """Start a detached worker for a lane (default: train) unless one is alive; returns its pid (-1: starting).

    ``ensure_worker("light")`` is short for ``ensure_worker(lane="light")``.
    """
    if isinstance(settings, str):
        settings, lane = None, settings
    lane = _check_lane(lane or DEFAULT_LANE)
    settings = settings or get_settings()
    settings.ensure_dirs()
    pid = worker_pid(settings, lane)
    if pid is not None:
        return pid
    logs = settings.data_dir / "logs"
    logs.mkdir(exist_ok=True)
    env = dict(os.environ, WORKBENCH_DATA_DIR=str(settings.data_dir), DATABASE_URL=settings.database_url)
    repo_root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (repo_root, env.get("PYTHONPATH", "")) if p)
    log_name = "worker.log" if lane == DEFAULT_LANE else f"worker-{lane}.log"
    with open(logs / log_name, "ab") as out:
        # New session: Ctrl-C in the CLI or a Streamlit restart does not reach the worker.
        proc = subprocess.Popen([sys.executable, "-m", "workbench.worker", "--idle-exit", str(idle_exit_s),
                                 "--lane", lane],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True, cwd=repo_root)
    return proc.pid


# ---------------------------------------------------------------------------------------------
# Reconcile
# ---------------------------------------------------------------------------------------------
def reconcile(session_factory: Optional[sessionmaker[Session]] = None, settings: Optional[Settings] = None,
              *, current_worker: Optional[int] = None, lane: str = DEFAULT_LANE) -> list[int]:
    """Fail jobs marked running whose lane's worker is gone (every lane); returns their ids.

    ``current_worker``: the pid of the ``lane`` worker calling this (it holds that lane's lock,
    so any other pid recorded on a running job of its lane is dead by construction). Jobs of
    the other lanes are checked against their own lane's worker.
    Rows left in the old in-server status "working" (before the light lane existed) are failed too.
    """
    settings = settings or get_settings()
    sf = session_factory or get_sessionmaker(settings.database_url)
    live = {ln: worker_pid(settings, ln) for ln in LANES if current_worker is None or ln != lane}
    fixed: list[int] = []
    with sf() as s:
        running = s.execute(select(Job.id, Job.worker_pid, Job.run_id, Job.kind, Job.status)
                            .where(Job.status.in_(["running", "working"]))).all()
    for job_id, pid, run_id, kind, status in running:
        job_lane = lane_of(kind)
        if status == "working":  # an in-server thread job of an older version: nothing runs it any more
            dead = True
        elif current_worker is not None and job_lane == lane:
            dead = pid != current_worker
        else:
            dead = live.get(job_lane) is None or not pid_alive(pid)
        if not dead:
            continue
        msg = (f"worker died (pid {pid}) while running this job" if job_lane == DEFAULT_LANE else
               f"worker died: the {job_lane}-lane worker (pid {pid}) stopped while running this {kind} job; "
               "please start it again")
        with sf.begin() as s:
            changed = s.execute(update(Job).where(Job.id == job_id, Job.status.in_(["running", "working"]))
                                .values(status="failed", error=msg, finished_at=utcnow())).rowcount
            if changed and run_id is not None and job_lane == DEFAULT_LANE:
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
               poll_s: float = 0.5, lane: str = DEFAULT_LANE) -> int:
    """Drain one lane's queue. Returns 0; returns 3 at once if another worker holds that lane's lock."""
    settings = settings or get_settings()
    settings.ensure_dirs()
    lane = _check_lane(lane)
    lock_file = open(lock_path(settings, lane), "a+")
    try:
        fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        log.info("another %s-lane worker is running; exiting", lane)
        lock_file.close()
        return 3
    me = os.getpid()
    pid_path(settings, lane).write_text(str(me))

    def _on_term(signum: int, _frame: Any) -> None:
        # Finish cleanly: the running job stops at its next batch and stays resumable.
        _Stop.requested = True
    signal.signal(signal.SIGTERM, _on_term)

    try:
        sf = get_sessionmaker(settings.database_url)
        reconcile(sf, settings, current_worker=me, lane=lane)
        load_handlers()
        idle_since = time.monotonic()
        while not _Stop.requested:
            job = claim_next_job(sf, me, lane)
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
            if pid_path(settings, lane).read_text().strip() == str(me):
                pid_path(settings, lane).unlink()
        except OSError:
            pass
        fcntl.flock(lock_file, fcntl.LOCK_UN)
        lock_file.close()
    return 0


__all__ = ["JobContext", "JobOutcome", "register_handler", "get_handler", "enqueue", "claim_next_job",
           "finish_job", "set_progress", "set_payload", "add_event", "lane_of", "LANE_OF_KIND", "LANES",
           "friendly", "ensure_worker", "worker_pid", "pid_alive", "reconcile",
           "execute_job", "run_worker", "TERMINAL"]
