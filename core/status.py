"""How the engine's own units of work end: the only place core spells these words.

``workbench/status.py`` holds the states the database stores (runs, jobs, searches); the engine
never reads the database, so the two states it reports itself live here.
"""
from __future__ import annotations

from enum import StrEnum


class TrainEnd(StrEnum):
    """How ``core.train.train_model`` ended (a cancelled training raises instead)."""

    SUCCEEDED = "succeeded"


class TrialState(StrEnum):
    """How one Auto search trial ended."""

    COMPLETE = "complete"  # trained to the end; its validation score counts
    PRUNED = "pruned"  # stopped early: unlikely to beat the best so far (resumable)
    STOPPED = "stopped"  # the search's time ran out or it was stopped (resumable)
    FAILED = "failed"


__all__ = ["TrainEnd", "TrialState"]
