"""The handler table: for each job kind, the function a worker runs and what to do with an orphan.

An orphan is a job left "running" by a worker that died; ``worker.reconcile`` fails the job
and calls its kind's ``on_orphan`` hook (inside the same transaction) so the kind's own rows
tell the truth too (a training run becomes failed and resumable). A job another host's worker
left (its lease ran out) goes to the kind's ``on_lease_lost`` hook instead when it has one: a
training run is resumed automatically (workbench.handlers.recovery). Which lane runs a kind is
``workbench.lanes.LANE_OF_KIND``. A test checks that both tables cover every ``JobKind``.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy.orm import Session

from workbench.handlers import postrun, recovery, search, tasks, train
from workbench.jobs import Handler
from workbench.status import JobKind
from workbench.workers import LostWorker

OrphanHook = Callable[[Session, "int | None", "int | None"], None]  # (session, run_id, dead worker pid)
LeaseLostHook = Callable[[Session, LostWorker], None]


@dataclass(frozen=True)
class HandlerSpec:
    handle: Handler
    on_orphan: OrphanHook | None = None
    on_lease_lost: LeaseLostHook | None = None


HANDLERS: dict[JobKind, HandlerSpec] = {
    JobKind.TRAIN: HandlerSpec(train.handle_train, on_orphan=train.on_orphan,
                                  on_lease_lost=recovery.on_lease_lost),
    JobKind.MEASURE: HandlerSpec(tasks.handle_measure),
    JobKind.INGEST: HandlerSpec(tasks.handle_ingest),
    JobKind.EXPORT: HandlerSpec(postrun.handle_export),
    JobKind.EVALUATE: HandlerSpec(postrun.handle_evaluate),
    JobKind.PREDICT: HandlerSpec(tasks.handle_predict),
    JobKind.SEARCH: HandlerSpec(search.handle_search, on_orphan=search.on_orphan),
}


def get_handler(kind: str) -> HandlerSpec | None:
    return HANDLERS.get(kind)  # type: ignore[call-overload]
