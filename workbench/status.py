"""The states and kinds of runs and jobs: the only place they are spelled.

Stored as plain text in the database (``StrEnum`` members compare equal to their values), so
rows written before these enums existed read back unchanged.
"""
from __future__ import annotations

from enum import StrEnum


class RunStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    # Training is done; the worker is exporting, verifying and evaluating it (postrun). Active, not
    # cancellable; a worker dying here leaves the run failed, and resume re-runs only this part.
    VERIFYING = "verifying"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    # An Auto search trial stopped early because it was unlikely to beat the others (resumable).
    PRUNED = "pruned"


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    # Written by versions before the worker lanes (a job run by a thread of the UI server):
    # nothing runs such a row any more, so reconcile fails it. Never written now.
    LEGACY_WORKING = "working"


class JobKind(StrEnum):
    TRAIN = "train"
    MEASURE = "measure"
    INGEST = "ingest"
    EXPORT = "export"
    EVALUATE = "evaluate"
    PREDICT = "predict"
    SEARCH = "search"


class SearchStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"  # trials are training
    FINALIZING = "finalizing"  # the finalists are exported, verified and tested; the bundle is built
    SUCCEEDED = "succeeded"
    FAILED = "failed"  # resumable: the time not spent is still there
    CANCELLED = "cancelled"  # resumable too


class CancelOutcome(StrEnum):
    """What asking to cancel a run or a search did."""

    CANCELLED = "cancelled"  # it had not started: cancelled at once
    CANCELLING = "cancelling"  # it is running: the worker stops it within one batch


class Lane(StrEnum):
    """One worker process per lane, so light jobs never queue behind a long training."""

    TRAIN = "train"
    LIGHT = "light"


ACTIVE_RUN = frozenset({RunStatus.QUEUED, RunStatus.RUNNING, RunStatus.VERIFYING})
TERMINAL_RUN = frozenset({RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.CANCELLED, RunStatus.PRUNED})
RESUMABLE_RUN = frozenset({RunStatus.FAILED, RunStatus.CANCELLED, RunStatus.PRUNED})
ACTIVE_SEARCH = frozenset({SearchStatus.QUEUED, SearchStatus.RUNNING, SearchStatus.FINALIZING})
RESUMABLE_SEARCH = frozenset({SearchStatus.FAILED, SearchStatus.CANCELLED})
ACTIVE_JOB = frozenset({JobStatus.QUEUED, JobStatus.RUNNING})
TERMINAL_JOB = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})
# Every terminal state of either (runs and jobs share these words).
TERMINAL = frozenset(str(s) for s in TERMINAL_JOB | TERMINAL_RUN)
