"""What every page reads: the job queue as rows, and figures in plain words (no Streamlit)."""
from __future__ import annotations

import logging
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from storage.db import get_sessionmaker
from storage.models import Job
from workbench.settings import get_settings
from workbench.status import ACTIVE_JOB, JobKind

log = logging.getLogger("workbench.views")

INGEST_SHOWN_FOR = timedelta(minutes=30)  # a finished ingest stays on the Datasets page this long


def _db() -> sessionmaker[Session]:
    return get_sessionmaker(get_settings().database_url)


def number(value: Any) -> float | None:
    """A stored JSON number as a float; None for a missing key, null, or anything not a number."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def count(value: Any) -> int:
    """A stored JSON count as an int; 0 when missing."""
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0


def record(value: Any) -> dict[str, Any]:
    """A stored JSON object; {} when missing or not an object (older rows)."""
    return dict(value) if isinstance(value, dict) else {}


# --- jobs ------------------------------------------------------------------------------
@dataclass(frozen=True)
class JobView:  # one row of the job queue, as every page shows it
    id: int
    kind: str
    status: str
    run_id: int | None
    payload: dict[str, Any]  # the handler merges its result in here
    progress: dict[str, Any]
    error: str | None
    created_at: datetime
    finished_at: datetime | None
    name: str | None  # ingest: the dataset's name
    filename: str | None  # ingest: the uploaded file, as the user named it

    @classmethod
    def from_row(cls, job: Job) -> JobView:
        payload = dict(job.payload or {})
        return cls(job.id, job.kind, job.status, job.run_id, payload, dict(job.progress or {}), job.error,
                   job.created_at, job.finished_at, payload.get("name"), payload.get("filename"))

    @property
    def active(self) -> bool:
        return self.status in ACTIVE_JOB

    @property
    def fraction(self) -> float:
        return min(max(number(self.progress.get("fraction")) or 0.0, 0.0), 1.0)

    @property
    def phase(self) -> str:
        """What the job is doing now, in the handler's words ("" before it says)."""
        return str(self.progress.get("phase") or "")

    @property
    def done(self) -> int:
        return count(self.progress.get("done"))

    @property
    def total(self) -> int:
        return count(self.progress.get("total"))

    @property
    def measured(self) -> tuple[str, ...]:
        """A measuring job's result: the models it timed."""
        return tuple(str(m) for m in self.payload.get("measured") or ())


def recent_jobs(kinds: Sequence[str], limit: int = 5, run_id: int | None = None) -> list[JobView]:
    """The newest jobs of some kinds (newest first), after failing those whose worker died."""
    reconcile_runs()
    stmt = select(Job).where(Job.kind.in_([str(k) for k in kinds]))
    if run_id is not None:
        stmt = stmt.where(Job.run_id == run_id)
    with _db()() as s:
        return [JobView.from_row(j) for j in s.scalars(stmt.order_by(Job.id.desc()).limit(limit))]


def job(job_id: int) -> JobView | None:
    reconcile_runs()
    with _db()() as s:
        row = s.get(Job, job_id)
        return None if row is None else JobView.from_row(row)


def ingest_jobs_to_show(dismissed: Collection[int] = (), limit: int = 5, now: datetime | None = None) -> list[JobView]:
    """Ingests still running, and those that ended recently unless the user dismissed them."""
    since = (now or datetime.now(UTC)) - INGEST_SHOWN_FOR
    return [j for j in recent_jobs([JobKind.INGEST], limit)
            if j.active or (j.id not in dismissed and j.finished_at is not None and j.finished_at > since)]


_last_reconcile = [0.0]


def reconcile_runs(every_s: float = 15.0) -> None:
    """Fail jobs (and runs) whose lane's worker died; at most every ``every_s`` seconds."""
    if time.monotonic() - _last_reconcile[0] < every_s:
        return
    _last_reconcile[0] = time.monotonic()
    try:
        from workbench import worker  # imports every handler (and torch): only once it is needed
        worker.reconcile()
    except Exception:  # noqa: BLE001 - the page still shows what the database says
        log.warning("reconcile failed", exc_info=True)


# --- figures in words ------------------------------------------------------------------
def percent_range(lo: float | None, hi: float | None) -> str:
    """A 95 % range in plain words: "89–97 %" ("" when there is none)."""
    return "" if lo is None or hi is None else f"{lo * 100:.0f}–{hi * 100:.0f} %"


def value_with_range(value: float | None, bounds: tuple[float, float] | None = None) -> str:
    """ "94.5 % (95 % range 89–97 %)"; just the value when there is no range; "" without a value."""
    if value is None:
        return ""
    return f"{value * 100:.1f} %" + (f" (95 % range {percent_range(*bounds)})" if bounds else "")


def with_range(interval: dict[str, Any] | None, value: float | None = None) -> str:
    """``value_with_range`` for a stored interval record ({"value", "lo", "hi"})."""
    iv = record(interval)
    lo, hi = number(iv.get("lo")), number(iv.get("hi"))
    return value_with_range(value if value is not None else number(iv.get("value")),
                            (lo, hi) if lo is not None and hi is not None else None)
