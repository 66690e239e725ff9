"""``python -m workbench.worker [--lane train|light]``: the process that drains one lane's queue.

It claims the lane's queued jobs one by one (workbench.jobs.claim_next_job) and runs each
kind's handler from the handler table (workbench.handlers). ``reconcile`` makes the database
tell the truth after a crash: a job marked running whose worker is gone is failed, and its
kind's orphan hook runs (a training run is offered for resume; one whose worker on another
host stopped renewing its lease is resumed automatically, up to ``WORKBENCH_AUTO_RESUMES``
times). A job of this host is checked against this host's lane lock and pid (fast: no
waiting); a job of another host once its lease ran out (workbench.workers: a heartbeat thread
renews it while the worker lives). Reconcile runs at worker start and every
``RECONCILE_EVERY_S`` seconds (or the lease, if shorter) in the drain loop, so a job whose
worker died (the other lane's, another host's, a killed one) does not stay "running". At start
the worker also runs the garbage collector (workbench.gc) with its default grace period.
Several train workers may share one data dir and database when they present different host ids
(``--host-id``, ``WORKBENCH_HOST_ID``): docs/SCALING.md.
"""
from __future__ import annotations

import argparse
import fcntl
import logging
import os
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from storage.db import get_sessionmaker
from storage.models import Job, utcnow
from workbench import gc, lanes, workers
from workbench.handlers import get_handler
from workbench.jobs import JobContext, JobOutcome, claim_next_job, finish_job
from workbench.settings import Settings, SettingsError, check_host_id, get_settings
from workbench.status import JobKind, JobStatus

log = logging.getLogger("workbench.worker")
_RUNNING = (JobStatus.RUNNING, JobStatus.LEGACY_WORKING)
RECONCILE_EVERY_S = 60.0


def _is_orphan(status: str, pid: int | None, job_lane: str, lane: str, current_worker: int | None,
               live: dict[str, int | None]) -> bool:
    if status == JobStatus.LEGACY_WORKING:  # nothing runs such a row any more
        return True
    if current_worker is not None and job_lane == lane:
        return pid != current_worker  # the caller holds this lane's lock: any other pid is dead
    return live.get(job_lane) is None or not lanes.pid_alive(pid)


def _orphan_message(pid: int | None, job_lane: str, kind: str, host: str | None = None) -> str:
    if host is not None:
        return (f"worker died: the worker on host {host} (pid {pid}) stopped renewing its lease while running "
                f"this {kind} job")
    if job_lane == lanes.DEFAULT_LANE:
        return f"worker died (pid {pid}) while running this job"
    return (f"worker died: the {job_lane}-lane worker (pid {pid}) stopped while running this {kind} job; "
            "please start it again")


def reconcile(session_factory: sessionmaker[Session] | None = None, settings: Settings | None = None,
              *, current_worker: int | None = None, lane: str = lanes.DEFAULT_LANE) -> list[int]:
    """Fail jobs marked running whose worker is gone (every lane, every host); returns their ids.

    ``current_worker``: the pid of the ``lane`` worker calling this (it holds that lane's lock).
    Jobs of this host (or claimed before leases: no host) are checked against their own lane's
    worker here; jobs of another host are orphans once their lease ran out.
    """
    settings = settings or get_settings()
    sf = session_factory or get_sessionmaker(settings.database_url)
    live = {ln: lanes.worker_pid(settings, ln) for ln in lanes.LANES if current_worker is None or ln != lane}
    me = settings.host_id
    with sf() as s:
        running = s.execute(select(Job.id, Job.worker_pid, Job.run_id, Job.kind, Job.status, Job.host_id,
                                   Job.lease_until).where(Job.status.in_(_RUNNING))).all()
    fixed: list[int] = []
    now = utcnow()
    for job_id, pid, run_id, kind, status, host, lease_until in running:
        job_lane = lanes.lane_of(kind)
        remote = host is not None and host != me
        if remote:
            if lease_until is not None and lease_until >= now:
                continue
            # The UPDATE re-checks the lease: a heartbeat landing meanwhile keeps the job alive.
            still_expired: Any = or_(Job.lease_until.is_(None), Job.lease_until < now)
        elif not _is_orphan(status, pid, job_lane, lane, current_worker, live):
            continue
        else:
            still_expired = Job.id == job_id
        with sf.begin() as s:
            changed = s.execute(update(Job).where(Job.id == job_id, Job.status.in_(_RUNNING), still_expired)
                                .values(status=JobStatus.FAILED, finished_at=utcnow(), lease_until=None,
                                        error=_orphan_message(pid, job_lane, kind, host if remote else None))
                                ).rowcount  # type: ignore[attr-defined]
            spec = get_handler(kind)
            if changed and spec is not None and remote and spec.on_lease_lost is not None:
                spec.on_lease_lost(s, workers.LostWorker(job_id, run_id, pid, str(host), settings))
            elif changed and spec is not None and spec.on_orphan is not None:
                spec.on_orphan(s, run_id, pid)
        if changed:
            if remote:
                log.warning("job %s of host %s: lease expired, marked failed", job_id, host)
            fixed.append(job_id)
    return fixed


def execute_job(job: Job, session_factory: sessionmaker[Session], settings: Settings,
                stop_requested: Callable[[], bool] = lambda: False) -> JobOutcome:
    """Run one claimed job to a terminal state (never raises)."""
    ctx = JobContext(job.id, job.kind, job.run_id, dict(job.payload or {}), session_factory, settings,
                     stop_requested)
    spec = get_handler(job.kind)
    try:
        workers.parse_needs(job.payload)
        bad_needs = None
    except workers.NeedsError as exc:
        bad_needs = str(exc)
    if bad_needs is not None:
        outcome = JobOutcome(JobStatus.FAILED, bad_needs)
    elif spec is None:
        outcome = JobOutcome(JobStatus.FAILED, f"no handler registered for job kind {job.kind!r}")
    else:
        try:
            outcome = spec.handle(ctx) or JobOutcome()
        except Exception as exc:  # noqa: BLE001 - a handler bug must not kill the worker
            outcome = JobOutcome(JobStatus.FAILED, f"{type(exc).__name__}: {exc}")
            ctx.event(f"Job {job.id} ({job.kind}) crashed: {outcome.error}", "error",
                      {"traceback": traceback.format_exc()[-4000:]})
    if not finish_job(session_factory, job.id, outcome.status, outcome.error, worker_id=job.worker_id):
        log.warning("job %s was taken over by another worker; its outcome here (%s) is not recorded",
                    job.id, outcome.status)
    return outcome


class _Stop:
    requested = False


@dataclass
class _Me:
    """This worker: its pid, id, host, what it has and its heartbeat."""

    pid: int
    id: str
    host_id: str
    resources: workers.Resources
    heartbeat: workers.Heartbeat


def _drain(sf: sessionmaker[Session], settings: Settings, me: _Me | int, lane: str, once: bool,
           idle_exit_s: float | None, poll_s: float) -> None:
    if isinstance(me, int):  # a bare pid (tests driving the loop): an unregistered worker, no heartbeats
        me = _Me(me, workers.new_worker_id(settings.host_id, lane), settings.host_id, workers.detect_resources(),
                 workers.Heartbeat(sf, "", settings.lease_s))
    kinds = lanes.kinds_of(lane)
    # The default lane also takes unknown kinds, so they fail readably instead of waiting forever.
    unknown = [str(k) for k in JobKind] if lane == lanes.DEFAULT_LANE else None
    every = min(RECONCILE_EVERY_S, settings.lease_s)
    idle_since = last_reconcile = time.monotonic()
    while not _Stop.requested:
        tick = time.monotonic() - last_reconcile >= every
        if tick:
            last_reconcile = time.monotonic()
            try:
                reconcile(sf, settings, current_worker=me.pid, lane=lane)
            except Exception:  # noqa: BLE001 - a failed check must not stop the queue; next tick retries
                log.warning("reconcile failed", exc_info=True)
        job = claim_next_job(sf, me.pid, kinds, or_not_in=unknown, worker_id=me.id, host_id=me.host_id,
                             lease_s=settings.lease_s,
                             can_run=lambda payload: workers.can_run(payload, me.resources))
        if job is not None:
            me.heartbeat.set_job(job.id)
            try:
                execute_job(job, sf, settings, lambda: _Stop.requested or me.heartbeat.lost.is_set())
            finally:
                me.heartbeat.set_job(None)
            idle_since = time.monotonic()
            if once:
                return
            continue
        if tick or once:
            try:
                workers.flag_unrunnable(sf, kinds, lane, or_not_in=unknown)
            except Exception:  # noqa: BLE001 - only a message
                log.warning("could not flag jobs no worker can run", exc_info=True)
        if once or (idle_exit_s is not None and time.monotonic() - idle_since > idle_exit_s):
            return
        time.sleep(poll_s)


def _collect_garbage(settings: Settings) -> None:
    """Free what killed ingests and stale uploads left; never stops the worker from starting."""
    try:
        report = gc.collect_garbage(settings)
    except Exception:  # noqa: BLE001 - garbage can wait for the next start
        log.warning("garbage collection failed", exc_info=True)
        return
    if report.total.files:
        for line in gc.describe(report):
            log.info("gc: %s", line)


def run_worker(settings: Settings | None = None, *, once: bool = False, idle_exit_s: float | None = None,
               poll_s: float = 0.5, lane: str = lanes.DEFAULT_LANE) -> int:
    """Drain one lane's queue. Returns 0; returns 3 at once if another worker holds that lane's lock."""
    settings = settings or get_settings()
    settings.ensure_dirs()
    lane = lanes.check_lane(lane)
    lanes.host_dir(settings).mkdir(parents=True, exist_ok=True)
    lock_file = open(lanes.lock_path(settings, lane), "a+")
    try:
        fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        log.info("another %s-lane worker is running; exiting", lane)
        lock_file.close()
        return 3
    me = os.getpid()
    pid_file = lanes.pid_path(settings, lane)
    pid_file.write_text(str(me))

    def _on_term(signum: int, _frame: Any) -> None:
        _Stop.requested = True  # finish cleanly: the running job stops at its next batch, resumable
    signal.signal(signal.SIGTERM, _on_term)
    heartbeat: workers.Heartbeat | None = None
    try:
        sf = get_sessionmaker(settings.database_url)
        worker_id = workers.new_worker_id(settings.host_id, lane)
        resources = workers.detect_resources()
        workers.register(sf, worker_id, settings.host_id, lane, resources, settings.lease_s)
        log.info("worker %s: %s", worker_id, resources.describe())
        heartbeat = workers.Heartbeat(sf, worker_id, settings.lease_s)
        heartbeat.start()
        reconcile(sf, settings, current_worker=me, lane=lane)
        _collect_garbage(settings)
        _drain(sf, settings, _Me(me, worker_id, settings.host_id, resources, heartbeat), lane, once,
               idle_exit_s, poll_s)
        workers.unregister(sf, worker_id)
    finally:
        if heartbeat is not None:
            heartbeat.stop()
        try:
            if pid_file.read_text().strip() == str(me):
                pid_file.unlink()
        except OSError:
            pass
        fcntl.flock(lock_file, fcntl.LOCK_UN)
        lock_file.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workbench.worker")
    parser.add_argument("--once", action="store_true", help="run at most one job, then exit")
    parser.add_argument("--idle-exit", type=float, default=None,
                        help="exit after this many seconds with an empty queue (default: never)")
    parser.add_argument("--lane", choices=lanes.LANES, default=lanes.DEFAULT_LANE,
                        help="which jobs to run: train (training) or light (ingest, export, evaluate, predict)")
    parser.add_argument("--host-id", default=None,
                        help="name of this host's workers (default: WORKBENCH_HOST_ID, else hostname + a short id)")
    args = parser.parse_args(argv)
    try:
        if args.host_id:
            os.environ["WORKBENCH_HOST_ID"] = check_host_id(args.host_id)
        get_settings()
    except SettingsError as exc:
        parser.error(str(exc))
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
