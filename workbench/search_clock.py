"""A search's clock: its time budget, what earlier sittings spent, the running sitting.

A search runs in sittings (queued, run by one or more workers, stopped or failed, resumed).
The first worker of a sitting starts its clock (``Search.sitting_started_at``) and sets the time
kept back for the finish (``Search.reserve_s``); the others join that sitting and share its
deadline. Closing a sitting adds its wall time to ``Search.spent_s``. Time left is defined here
once, for the worker, the services, the CLI and the pages.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from storage.models import Search, utcnow
from workbench.status import SearchStatus

DEFAULT_TIME_BUDGET_MIN = 10  # `workbench auto`, Workbench.auto and the Auto page, when no time is given


def time_left_s(budget_s: float, spent_s: float) -> float:
    return max(0.0, budget_s - spent_s)


@dataclass(frozen=True)
class SearchClock:
    budget_s: float
    earlier_s: float  # wall time of earlier sittings
    sitting_started: datetime | None  # None: no sitting runs
    reserve_s: float = 0.0  # kept back from this sitting's trials for the finish

    @classmethod
    def of(cls, row: Search) -> SearchClock:
        return cls(float(row.time_budget_s), float(row.spent_s or 0.0), row.sitting_started_at,
                   float(row.reserve_s or 0.0))

    def spent_s(self, now: datetime | None = None) -> float:
        """Earlier sittings plus the running one."""
        if self.sitting_started is None:
            return self.earlier_s
        return self.earlier_s + max(0.0, ((now or utcnow()) - self.sitting_started).total_seconds())

    def left_s(self, now: datetime | None = None) -> float:
        return time_left_s(self.budget_s, self.spent_s(now))

    def trial_deadline(self) -> float:
        """``time.time()`` by which the sitting's trials end: what was left when it started, less the reserve."""
        if self.sitting_started is None:
            raise ValueError("The search has no running sitting, so its trials have no deadline.")
        return self.sitting_started.timestamp() + time_left_s(self.budget_s, self.earlier_s) - self.reserve_s


def open_sitting(row: Search, reserve_for: Callable[[float], float]) -> SearchClock:
    """Inside the caller's transaction: the first worker starts the sitting's clock and keeps
    ``reserve_for(time left)`` back for the finish; a worker joining a running sitting shares them."""
    if row.sitting_started_at is None:
        row.sitting_started_at = utcnow()
        row.reserve_s = round(reserve_for(time_left_s(float(row.time_budget_s), float(row.spent_s or 0.0))), 1)
    return SearchClock.of(row)


def close_sitting(row: Search, status: SearchStatus, error: str | None) -> None:
    """End the search's current sitting: add its wall time to ``spent_s``, set the state."""
    row.spent_s = SearchClock.of(row).spent_s()
    row.sitting_started_at, row.reserve_s = None, None
    row.status, row.error, row.finished_at, row.cancel_requested = status, error, utcnow(), False
