"""How a training run talks to its caller: user-facing errors, progress events, the ``Callback``.

``core`` never imports storage or UI code: progress leaves through a ``Callback``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class TrainingError(RuntimeError):
    """Training cannot go on; the message is meant for the user."""


class TrainingCancelled(Exception):
    """``Callback.should_stop`` asked to stop; the last checkpoint is intact."""


@dataclass
class Progress:
    phase: str
    epoch: int  # global epoch, 1-based (0 while caching)
    step: int  # step within this phase-epoch (or cache chunk)
    total_steps: int
    loss: float | None = None
    lr: float | None = None
    eta_s: float | None = None  # whole run, best effort
    images_per_s: float | None = None
    done_fraction: float = 0.0  # whole run


class Callback:
    """Progress hooks (like Ludwig's callbacks); subclass and override what you need."""

    def on_phase_start(self, phase: str, epochs: int, steps_per_epoch: int) -> None: ...

    def on_step(self, progress: Progress) -> None: ...

    def on_epoch_end(self, phase: str, epoch: int, metrics: dict[str, Any]) -> None:
        """After each epoch's checkpoint. A resumed run first replays every checkpointed epoch
        (``metrics["replayed"] = True``), so an epoch is never lost to a kill between the
        checkpoint and this call: treat reports as upserts keyed by (phase, epoch)."""

    def on_log(self, level: str, message: str, data: dict[str, Any] | None = None) -> None: ...

    def should_stop(self) -> bool:
        return False
