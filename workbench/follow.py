"""One way to follow a job, for every front-end: read its row until it ends, keeping its lane's
worker alive meanwhile.

``workbench train`` and ``workbench auto`` (CLI) and ``Workbench.train`` / ``Workbench.auto``
(Python API) all follow through ``follow``; each brings only its own display (``on_update``).
A job row can outlive its worker (killed, machine restarted): the loop then reconciles (the job
is failed, so it can resume) and starts a worker for a job that is still queued.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol, TypeVar

from workbench import lanes, runs, searches
from workbench.runs import RunInfo
from workbench.searches import SearchInfo
from workbench.settings import Settings, get_settings
from workbench.status import JobKind

POLL_S = 0.5  # how often the row is read: progress snapshots are written about once a second


class Followed(Protocol):
    @property
    def active(self) -> bool: ...

    @property
    def queued(self) -> bool: ...


Info = TypeVar("Info", bound=Followed)


def follow(read: Callable[[], Info], lane: str, *, settings: Settings | None = None,
           on_update: Callable[[Info], None] | None = None, poll_s: float = POLL_S) -> Info:
    """Call ``on_update`` with each fresh row until it is no longer active; return the last one."""
    settings = settings or get_settings()
    while True:
        info = read()
        if on_update is not None:
            on_update(info)
        if not info.active:
            return info
        keep_worker(settings, lane, read)
        time.sleep(poll_s)


def keep_worker(settings: Settings, lane: str, read: Callable[[], Followed]) -> None:
    """With no live worker on ``lane``: fail the jobs it left running, and start a worker when the
    followed job is (still, or again) queued."""
    from workbench import worker  # its handlers import torch: only when a worker is missing

    if lanes.worker_pid(settings, lane) is not None:
        return
    worker.reconcile(settings=settings)
    if read().queued:
        lanes.ensure_worker(settings, lane=lane)


def follow_run(run_id: int, *, settings: Settings | None = None,
               on_update: Callable[[RunInfo], None] | None = None, poll_s: float = POLL_S) -> RunInfo:
    return follow(lambda: runs.get_run(run_id, settings=settings), lanes.lane_of(JobKind.TRAIN),
                  settings=settings, on_update=on_update, poll_s=poll_s)


def follow_search(search_id: int, *, settings: Settings | None = None,
                  on_update: Callable[[SearchInfo], None] | None = None, poll_s: float = POLL_S) -> SearchInfo:
    return follow(lambda: searches.get_search(search_id, settings=settings), lanes.lane_of(JobKind.SEARCH),
                  settings=settings, on_update=on_update, poll_s=poll_s)


__all__ = ["POLL_S", "follow", "follow_run", "follow_search", "keep_worker"]
