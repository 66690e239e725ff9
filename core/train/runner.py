"""The record of one training run: history, best epoch, summary, timing and step progress.

Kept in one object so every checkpoint captures all of it, and so helpers deep in the run
(the feature cache, the epoch loop) can log and report progress without more arguments.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from core.train.callbacks import Callback, Progress
from core.train.config import TrainConfig


@dataclass
class TrainResult:
    status: Literal["succeeded", "cancelled"]
    best: dict[str, Any]  # {"epoch", "phase", "metrics"}
    history: list[dict[str, Any]]
    best_path: Path
    last_path: Path
    train_seconds: float
    summary: dict[str, Any]


class Runner:
    """State of one training run (checkpoints store its history, best, summary and seconds)."""

    def __init__(self, cfg: TrainConfig, classes: list[str], callback: Callback, run_dir: Path):
        self.cfg, self.classes, self.cb, self.run_dir = cfg, classes, callback, run_dir
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] | None = None
        self.summary: dict[str, Any] = {}
        self.t_start = time.perf_counter()
        self.prior_seconds = 0.0  # training time before a resume
        self.total_steps_plan = 1
        self.steps_done = 0

    @property
    def last_path(self) -> Path:
        return self.run_dir / "last.pt"

    @property
    def best_path(self) -> Path:
        return self.run_dir / "best.pt"

    def log(self, message: str, level: str = "info", **data: Any) -> None:
        self.cb.on_log(level, message, data or None)

    def seconds(self) -> float:
        return self.prior_seconds + time.perf_counter() - self.t_start

    def epoch_progress(self, phase: str, epoch: int, batch_size: int) -> EpochProgress:
        """The per-step reporter for one epoch starting now."""
        return EpochProgress(self, phase, epoch, batch_size, time.perf_counter())


@dataclass
class EpochProgress:
    """Reports each training step of one epoch, with a whole-run ETA from this epoch's pace."""

    run: Runner
    phase: str
    epoch: int
    batch_size: int
    t0: float

    def __call__(self, step: int, total: int, loss: float, lr: float) -> None:
        run = self.run
        run.steps_done += 1
        seconds_per_step = (time.perf_counter() - self.t0) / step
        steps_left = max(0, run.total_steps_plan - run.steps_done)
        run.cb.on_step(Progress(self.phase, self.epoch, step, total, loss, lr,
                                eta_s=seconds_per_step * steps_left,
                                images_per_s=self.batch_size / max(seconds_per_step, 1e-9),
                                done_fraction=min(1.0, run.steps_done / max(1, run.total_steps_plan))))
