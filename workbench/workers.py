"""Workers on one or many hosts: who they are, what they have, their heartbeats and leases.

A worker is one ``workbench.worker`` process. It registers a row in ``workers`` (host id,
lane, pid, resources) and, while it lives, a heartbeat thread renews two leases every
``lease_s / 3`` seconds: its own row's and the one on the job it runs (``jobs.lease_until``).
The lease on the job row is the one that decides: another host takes a job over only when
that row's lease ran out, with one conditional UPDATE, so two reconcilers cannot both win and
a late heartbeat cannot revive a job already taken (it matches no row and the worker stops).
The workers table says what each live worker has, so a job stating needs (payload
``"needs": {"gpus": 1, "memory_gb": 8, "cpus": 4}``) is claimed only by a worker that has them,
and says so in plain words while no live worker can run it.

Times are each host's clock (UTC): hosts must keep their clocks in step (NTP), to well within
the lease (docs/SCALING.md).
"""
from __future__ import annotations

import logging
import os
import secrets
import threading
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import Any

from sqlalchemy import delete, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from storage.models import Job, Worker, utcnow
from workbench.settings import Settings
from workbench.status import JobStatus

log = logging.getLogger("workbench.worker")
NEED_KEYS = ("gpus", "memory_gb", "cpus")
FORGET_AFTER = timedelta(days=7)


class NeedsError(ValueError):
    """A job's ``needs`` cannot be read."""


@dataclass(frozen=True)
class Needs:
    gpus: int = 0
    memory_gb: float = 0.0
    cpus: int = 0

    def describe(self) -> str:
        parts = []
        if self.gpus:
            parts.append(f"{self.gpus} GPU" + ("s" if self.gpus > 1 else ""))
        if self.memory_gb:
            parts.append(f"{self.memory_gb:g} GB of memory")
        if self.cpus:
            parts.append(f"{self.cpus} CPU cores")
        return ", ".join(parts) or "nothing in particular"


@dataclass(frozen=True)
class Resources:
    cpus: int
    memory_gb: float
    gpus: int
    gpu_names: list[str] = field(default_factory=list)
    onnx_providers: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> Resources:
        d = d or {}
        return cls(cpus=int(d.get("cpus") or 0), memory_gb=float(d.get("memory_gb") or 0.0),
                   gpus=int(d.get("gpus") or 0), gpu_names=list(d.get("gpu_names") or []),
                   onnx_providers=list(d.get("onnx_providers") or []))

    def describe(self) -> str:
        gpu = f"{self.gpus} GPU" + ("s" if self.gpus != 1 else "") if self.gpus else "no GPU"
        return f"{self.cpus} CPU cores, {self.memory_gb:.0f} GB of memory, {gpu}"


def _whole(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise NeedsError(f"needs: {key!r} must be a whole number of 0 or more, got {value!r}")
    return value


def parse_needs(payload: dict[str, Any] | None) -> Needs:
    """The ``needs`` of a job payload (none: Needs()); a clear NeedsError for anything else."""
    raw = (payload or {}).get("needs")
    if raw is None:
        return Needs()
    if not isinstance(raw, dict):
        raise NeedsError(f"needs must be a mapping such as {{\"gpus\": 1, \"memory_gb\": 8}}, got {raw!r}")
    unknown = sorted(set(raw) - set(NEED_KEYS))
    if unknown:
        raise NeedsError(f"needs: unknown key(s) {', '.join(map(repr, unknown))}; known: {', '.join(NEED_KEYS)}")
    mem = raw.get("memory_gb", 0)
    if isinstance(mem, bool) or not isinstance(mem, int | float) or not mem >= 0:
        raise NeedsError(f"needs: 'memory_gb' must be a number of 0 or more, got {mem!r}")
    return Needs(gpus=_whole("gpus", raw.get("gpus", 0)), memory_gb=float(mem), cpus=_whole("cpus", raw.get("cpus", 0)))


def training_needs(config: dict[str, Any]) -> dict[str, int]:
    """A train job's needs: a GPU per process for a data-parallel run on GPUs (device cuda)."""
    processes = int(config.get("processes") or 1)
    return {"gpus": processes} if processes > 1 and str(config.get("device") or "").startswith("cuda") else {}


def shortfall(needs: Needs, has: Resources) -> list[str]:
    """What ``has`` lacks for ``needs``, in words (empty: it fits)."""
    out = []
    if needs.gpus > has.gpus:
        out.append(f"{needs.gpus} GPU(s) needed, {has.gpus} found")
    if needs.memory_gb > has.memory_gb:
        out.append(f"{needs.memory_gb:g} GB of memory needed, {has.memory_gb:.0f} GB found")
    if needs.cpus > has.cpus:
        out.append(f"{needs.cpus} CPU cores needed, {has.cpus} found")
    return out


def can_run(payload: dict[str, Any] | None, has: Resources) -> bool:
    """Whether a worker with ``has`` may claim a job with this payload. Unreadable needs: yes,
    so the job fails with the reason instead of waiting forever."""
    try:
        return not shortfall(parse_needs(payload), has)
    except NeedsError:
        return True


def detect_resources() -> Resources:
    """What this process can use: CPU cores (its affinity), memory, CUDA GPUs, ORT providers."""
    import psutil

    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    gpus, names = 0, []
    try:
        import torch

        if torch.cuda.is_available():
            gpus = torch.cuda.device_count()
            names = [torch.cuda.get_device_name(i) for i in range(gpus)]
    except Exception:  # noqa: BLE001 - a broken CUDA install means no GPU, not a dead worker
        log.warning("could not query CUDA devices", exc_info=True)
    try:
        import onnxruntime as ort

        providers = list(ort.get_available_providers())
    except Exception:  # noqa: BLE001
        providers = []
    return Resources(cpus=cpus, memory_gb=round(psutil.virtual_memory().total / 2**30, 1), gpus=gpus,
                     gpu_names=names, onnx_providers=providers)


def new_worker_id(host_id: str, lane: str) -> str:
    return f"{host_id}/{lane}/{os.getpid()}-{secrets.token_hex(3)}"


def register(sf: sessionmaker[Session], worker_id: str, host_id: str, lane: str, resources: Resources,
             lease_s: float) -> None:
    now = utcnow()
    with sf.begin() as s:
        # One row per worker start: forget those silent for a week (nothing refers to them).
        s.execute(delete(Worker).where(Worker.lease_until < now - FORGET_AFTER))
        s.add(Worker(id=worker_id, host_id=host_id, lane=lane, pid=os.getpid(), started_at=now, heartbeat_at=now,
                     lease_until=now + timedelta(seconds=lease_s), resources=resources.to_dict()))


def unregister(sf: sessionmaker[Session], worker_id: str) -> None:
    with sf.begin() as s:
        s.execute(update(Worker).where(Worker.id == worker_id).values(stopped_at=utcnow()))


def beat(sf: sessionmaker[Session], worker_id: str, job_id: int | None, lease_s: float) -> bool:
    """Renew this worker's lease and its job's; False when the job is no longer ours (taken over)."""
    now = utcnow()
    until = now + timedelta(seconds=lease_s)
    with sf.begin() as s:
        s.execute(update(Worker).where(Worker.id == worker_id).values(heartbeat_at=now, lease_until=until))
        if job_id is None:
            return True
        kept = s.execute(update(Job).where(Job.id == job_id, Job.worker_id == worker_id,
                                           Job.status == JobStatus.RUNNING)
                         .values(heartbeat_at=now, lease_until=until)).rowcount  # type: ignore[attr-defined]
    return bool(kept)


@dataclass(frozen=True)
class WorkerInfo:
    id: str
    host_id: str
    lane: str
    pid: int
    heartbeat_at: Any
    resources: Resources


def live_workers(sf: sessionmaker[Session], lane: str | None = None) -> list[WorkerInfo]:
    """Workers (every host) whose lease has not run out and that did not stop."""
    q = select(Worker).where(Worker.stopped_at.is_(None), Worker.lease_until >= utcnow()).order_by(Worker.id)
    if lane is not None:
        q = q.where(Worker.lane == lane)
    with sf() as s:
        return [WorkerInfo(w.id, w.host_id, w.lane, w.pid, w.heartbeat_at, Resources.from_dict(w.resources))
                for w in s.scalars(q)]


def waiting_message(needs: Needs, live: list[WorkerInfo]) -> str | None:
    """A plain sentence when no live worker can run a job with ``needs``; None when one can."""
    if any(not shortfall(needs, w.resources) for w in live):
        return None
    seen = "; ".join(f"{w.host_id}: {w.resources.describe()}" for w in live) or "none is running"
    return (f"Waiting: this job needs {needs.describe()}, and no running worker has that "
            f"(workers: {seen}). Start a worker on a machine that has it.")


def flag_unrunnable(sf: sessionmaker[Session], kinds: list[str], lane: str, *,
                    or_not_in: list[str] | None = None) -> int:
    """Write the waiting message on queued jobs of ``kinds`` (or of no kind in ``or_not_in``, as
    the claim takes them) that no live ``lane`` worker can run; returns how many it wrote."""
    cond: Any = Job.kind.in_(kinds)
    if or_not_in is not None:
        cond = or_(cond, Job.kind.not_in(or_not_in))
    with sf() as s:
        queued = s.execute(select(Job.id, Job.payload, Job.progress)
                           .where(Job.status == JobStatus.QUEUED, cond)).all()
    wanting = [(jid, parse_needs_or_none(payload), progress) for jid, payload, progress in queued]
    wanting = [(jid, n, p) for jid, n, p in wanting if n is not None and n != Needs()]
    if not wanting:
        return 0
    live = live_workers(sf, lane)
    flagged = 0
    for job_id, needs, progress in wanting:
        assert needs is not None
        msg = waiting_message(needs, live)
        if msg is None or (progress or {}).get("message") == msg:
            continue
        with sf.begin() as s:
            s.execute(update(Job).where(Job.id == job_id, Job.status == JobStatus.QUEUED)
                      .values(progress={"phase": "waiting", "message": msg}))
        flagged += 1
    return flagged


def parse_needs_or_none(payload: dict[str, Any] | None) -> Needs | None:
    try:
        return parse_needs(payload)
    except NeedsError:
        return None


@dataclass(frozen=True)
class LostWorker:
    """A job whose worker on another host stopped renewing its lease (reconcile found it)."""

    job_id: int
    run_id: int | None
    pid: int | None
    host_id: str  # the host whose worker died
    settings: Settings  # of the process that noticed (its auto_resumes limit applies)


class Heartbeat(threading.Thread):
    """Renews the worker's and its current job's lease every ``lease_s / 3`` s; sets ``lost``
    when the job was taken over (the worker then stops the job at its next check)."""

    def __init__(self, sf: sessionmaker[Session], worker_id: str, lease_s: float):
        super().__init__(name="workbench-heartbeat", daemon=True)
        self.sf, self.worker_id, self.lease_s = sf, worker_id, lease_s
        self.job_id: int | None = None
        self.lost = threading.Event()
        self._stop_event = threading.Event()

    def set_job(self, job_id: int | None) -> None:
        self.job_id = job_id
        self.lost.clear()

    def run(self) -> None:
        while not self._stop_event.wait(self.lease_s / 3):
            job_id = self.job_id
            try:
                if not beat(self.sf, self.worker_id, job_id, self.lease_s) and job_id == self.job_id:
                    log.warning("job %s was taken over by another worker (our lease ran out); stopping it", job_id)
                    self.lost.set()
            except Exception:  # noqa: BLE001 - the database may be back at the next beat
                log.warning("heartbeat failed", exc_info=True)

    def stop(self) -> None:
        self._stop_event.set()
