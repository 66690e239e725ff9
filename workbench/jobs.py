"""The job queue: rows of the ``jobs`` table, queued -> running -> succeeded | failed | cancelled.

It knows nothing of its clients: which kinds exist and who runs them is the handler table's
business (workbench.handlers), which lane a kind runs on is workbench.lanes'. Every write is a
short transaction; SQLite runs in WAL mode with a busy timeout (storage.db), so the UI reading
progress never blocks the worker writing it.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from storage.models import Job, RunEvent, utcnow
from workbench.settings import Settings
from workbench.status import JobStatus
from workbench.workers import parse_needs


def friendly(exc: BaseException) -> str:
    """One readable line for an exception (no traceback)."""
    msg = str(exc).strip() or exc.__class__.__name__
    return msg[:600] + "…" if len(msg) > 600 else msg


@dataclass
class JobContext:
    """What a handler gets: the job, the database, and cheap ways to report."""

    job_id: int
    kind: str
    run_id: int | None
    payload: dict[str, Any]
    session_factory: sessionmaker[Session]
    settings: Settings
    stop_requested: Callable[[], bool] = field(default=lambda: False)  # worker asked to shut down

    def progress(self, snapshot: dict[str, Any]) -> None:
        set_progress(self.session_factory, self.job_id, snapshot)

    def save_result(self, result: dict[str, Any]) -> None:
        """Merge ``result`` into the job's payload (where pages read a job's outcome)."""
        set_payload(self.session_factory, self.job_id, {**self.payload, **result})

    def event(self, message: str, level: str = "info", data: dict[str, Any] | None = None) -> None:
        if self.run_id is not None:
            add_event(self.session_factory, self.run_id, message, level, data)


@dataclass
class JobOutcome:
    status: JobStatus = JobStatus.SUCCEEDED  # succeeded | failed | cancelled
    error: str | None = None


Handler = Callable[[JobContext], "JobOutcome | None"]


def enqueue(session: Session, kind: str, run_id: int | None = None, payload: dict[str, Any] | None = None) -> Job:
    """Add a queued job inside the caller's transaction (a NeedsError for unreadable ``needs``)."""
    parse_needs(payload)
    job = Job(kind=str(kind), status=JobStatus.QUEUED, run_id=run_id, payload=payload or {}, created_at=utcnow())
    session.add(job)
    session.flush()
    return job


def claim_next_job(session_factory: sessionmaker[Session], worker_pid: int, kinds: Collection[str],
                   *, or_not_in: Collection[str] | None = None, worker_id: str | None = None,
                   host_id: str | None = None, lease_s: float | None = None,
                   can_run: Callable[[dict[str, Any]], bool] | None = None) -> Job | None:
    """Atomically take the oldest queued job of ``kinds`` (one UPDATE ... RETURNING: no check-then-act race).

    ``or_not_in``: also take jobs whose kind is not in this set (so unknown kinds fail readably
    instead of waiting forever). ``worker_id``/``host_id``/``lease_s``: the claim's owner and
    lease (workbench.workers). ``can_run(payload)``: jobs it refuses are left queued for
    another worker; the claim only considers the jobs it was shown (ids up to the newest read),
    so a job queued meanwhile is never taken unchecked.
    """
    cond: Any = Job.kind.in_(list(kinds))
    if or_not_in is not None:
        cond = or_(cond, Job.kind.not_in(list(or_not_in)))
    oldest = select(Job.id).where(Job.status == JobStatus.QUEUED, cond)
    if can_run is not None:
        with session_factory() as s:
            queued = s.execute(select(Job.id, Job.payload).where(Job.status == JobStatus.QUEUED, cond)).all()
        if not queued:
            return None
        refused = [job_id for job_id, payload in queued if not can_run(dict(payload or {}))]
        oldest = oldest.where(Job.id <= max(job_id for job_id, _ in queued))
        if refused:
            oldest = oldest.where(Job.id.not_in(refused))
    oldest = oldest.order_by(Job.id).limit(1)
    now = utcnow()
    claim: dict[str, Any] = dict(status=JobStatus.RUNNING, worker_pid=worker_pid, started_at=now, error=None,
                                 progress=None,  # drops a "waiting for a worker that has..." note
                                 worker_id=worker_id, host_id=host_id, heartbeat_at=now,
                                 lease_until=now + timedelta(seconds=lease_s) if lease_s else None)
    with session_factory.begin() as s:
        if s.get_bind().dialect.name == "postgresql":
            # Under READ COMMITTED two workers would pick the same oldest row; the loser would
            # wait for the winner's lock, then match nothing and go idle with work still queued.
            # SKIP LOCKED makes each worker take the oldest row no other claim holds.
            oldest = oldest.with_for_update(skip_locked=True)
        # SQLite: one writer at a time, so the single UPDATE is already atomic.
        job_id = s.execute(
            update(Job).where(Job.id == oldest.scalar_subquery(), Job.status == JobStatus.QUEUED)
            .values(**claim).returning(Job.id)
        ).scalar()
        return s.get(Job, job_id) if job_id is not None else None


def finish_job(session_factory: sessionmaker[Session], job_id: int, status: str, error: str | None = None,
               *, worker_id: str | None = None) -> bool:
    """Record a job's end; with ``worker_id``, only while that worker still holds it running (a
    job another host failed after this worker's lease ran out keeps that verdict). Returns
    whether it was written."""
    cond = [Job.id == job_id]
    if worker_id is not None:
        cond += [Job.worker_id == worker_id, Job.status == JobStatus.RUNNING]
    with session_factory.begin() as s:
        return bool(s.execute(update(Job).where(*cond).values(status=status, error=error, finished_at=utcnow(),
                                                              lease_until=None))
                    .rowcount)  # type: ignore[attr-defined]


def set_payload(session_factory: sessionmaker[Session], job_id: int, payload: dict[str, Any]) -> None:
    safe = json.loads(json.dumps(payload, default=str))  # e.g. paths: stored as text
    with session_factory.begin() as s:
        s.execute(update(Job).where(Job.id == job_id).values(payload=safe))


def set_progress(session_factory: sessionmaker[Session], job_id: int, snapshot: dict[str, Any]) -> None:
    with session_factory.begin() as s:
        s.execute(update(Job).where(Job.id == job_id).values(progress={**snapshot, "updated": time.time()}))


def add_event(session_factory: sessionmaker[Session], run_id: int, message: str, level: str = "info",
              data: dict[str, Any] | None = None) -> None:
    with session_factory.begin() as s:
        s.add(RunEvent(run_id=run_id, message=message, level=level, data=data, created_at=utcnow()))
