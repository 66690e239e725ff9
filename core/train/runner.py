"""The record of one training run: history, best epoch, summary, timing and step progress.

Kept in one object so every checkpoint captures all of it, and so helpers deep in the run
(the feature cache, the epoch loop) can log and report progress without more arguments.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.status import TrainEnd
from core.train.callbacks import Callback, Progress
from core.train.config import TrainConfig


@dataclass
class TrainResult:
    status: TrainEnd
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
        self.eta = EtaSmoother()  # one for the whole run: epochs' paces blend instead of jumping

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


class EtaSmoother:
    """A whole-job ETA from an exponential moving average of the seconds per unit of work.

    ``update(now, done, total)`` takes a clock reading and the work done / planned so far (any
    unit: steps, images); it is pure arithmetic on its inputs, so tests feed it synthetic times.
    The ETA never grows by more than the work that was added (``total`` going up, times the
    smoothed pace): after a slow step it keeps counting down with the work done instead of
    jumping, so a user never sees "1 min" turn into "9 min" while the plan stays the same. A
    faster pace lowers it at once.
    """

    def __init__(self, alpha: float = 0.2) -> None:
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {alpha!r}")
        self.alpha = alpha
        self.seconds_per_unit: float | None = None
        self.eta_s: float | None = None
        self._last: tuple[float, float, float] | None = None  # (now, done, total) of the previous update

    def seed(self, now: float, done: float, total: float, seconds_per_unit: float) -> float:
        """Start from an estimated pace (e.g. before any work is measured); measured steps then blend in."""
        self._last, self.seconds_per_unit = (now, done, total), max(0.0, seconds_per_unit)
        self.eta_s = max(0.0, total - done) * self.seconds_per_unit
        return self.eta_s

    @property
    def started(self) -> bool:
        return self._last is not None

    def update(self, now: float, done: float, total: float) -> float | None:
        """The new ETA in seconds (None until a pace is known)."""
        if self._last is None:
            self._last = (now, done, total)
            return None
        t_prev, done_prev, total_prev = self._last
        dt, dw = now - t_prev, done - done_prev
        pace_before = self.seconds_per_unit
        if dw > 0 and dt >= 0:
            sample = dt / dw
            self.seconds_per_unit = sample if self.seconds_per_unit is None else (
                self.alpha * sample + (1 - self.alpha) * self.seconds_per_unit)
            self._last = (now, done, total)
        elif total != total_prev:
            self._last = (t_prev, done_prev, total)
        if self.seconds_per_unit is None:
            return None
        raw = max(0.0, total - done) * self.seconds_per_unit
        if self.eta_s is not None and pace_before is not None:
            # The cap counts down with the work done (at the pace the last ETA assumed) and goes up
            # only with work added: a slowdown holds the ETA to a countdown, never a jump.
            added = max(0.0, total - total_prev)
            cap = max(0.0, self.eta_s - max(dw, 0.0) * pace_before) + added * self.seconds_per_unit
            raw = min(raw, cap)
        self.eta_s = raw
        return raw


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
        now = time.perf_counter()
        seconds_per_step = (now - self.t0) / step
        if not run.eta.started:  # the pace of the very first step counts from the epoch's start
            run.eta.update(self.t0, run.steps_done - 1, run.total_steps_plan)
        eta = run.eta.update(now, run.steps_done, run.total_steps_plan)
        run.cb.on_step(Progress(self.phase, self.epoch, step, total, loss, lr,
                                eta_s=eta if eta is not None else seconds_per_step * max(
                                    0, run.total_steps_plan - run.steps_done),
                                images_per_s=self.batch_size / max(seconds_per_step, 1e-9),
                                done_fraction=min(1.0, run.steps_done / max(1, run.total_steps_plan))))
