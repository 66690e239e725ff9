"""Robustness: out-of-memory retry, a clear message for a diverging loss, device resolution."""
from __future__ import annotations

import gc
import re
from collections.abc import Callable
from typing import TypeVar

import torch

from core.train.callbacks import TrainingError

T = TypeVar("T")


def is_oom_error(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    msg = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in msg or "can't allocate memory" in msg
                                              or "cannot allocate memory" in msg)


def retry_on_oom(step: Callable[[int], T], batch_size: int, log: Callable[[str], None]) -> tuple[T, int]:
    """Run ``step(batch_size)``; if it runs out of memory, free caches and retry ONCE at half.

    Returns (result, batch size that worked). A second OOM becomes a TrainingError saying what
    to do. ``step`` must be restartable (it zeroes gradients itself).
    """
    try:
        return step(batch_size), batch_size
    except RuntimeError as exc:
        if not is_oom_error(exc) or batch_size < 2:
            raise
        half = batch_size // 2
        log(f"Out of memory at batch size {batch_size}; retrying at {half}. ({str(exc).splitlines()[0][:200]})")
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:
        return step(half), half
    except RuntimeError as exc:
        if is_oom_error(exc):
            raise TrainingError(f"Out of memory even at batch size {half} (after halving {batch_size}). "
                                "Use a smaller resolution, a smaller variant, or free memory.") from exc
        raise


def check_finite(loss: torch.Tensor, phase: str, epoch: int, step: int, lr: float) -> None:
    if not torch.isfinite(loss).all():
        raise TrainingError(
            f"Loss became {loss.item()} in the {phase} phase at epoch {epoch}, step {step} (lr {lr:.3g}). "
            "Training stopped: the learning rate is probably too high for this data; lower it and retry.")


class DeviceError(TrainingError, ValueError):
    """A device name Workbench cannot use (misspelt, or not present on this machine)."""


_DEVICE_RE = re.compile(r"^(auto|cpu|cuda|cuda:\d{1,3})$")


def check_device_name(name: str) -> str:
    """``name`` if it is spelt as Workbench accepts it (auto, cpu, cuda, cuda:N), else a DeviceError."""
    cleaned = (name or "").strip().lower()
    if not _DEVICE_RE.match(cleaned):
        raise DeviceError(f"Unknown device {name!r}: use auto (a GPU if there is one, else the CPU), cpu, "
                          "cuda (the first GPU) or cuda:N (GPU number N, counting from 0).")
    return cleaned


def resolve_device(name: str) -> torch.device:
    """The torch device for ``name`` (auto, cpu, cuda, cuda:N) on this machine; a DeviceError that
    says what is there when the requested GPU is not."""
    name = check_device_name(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type != "cuda":
        return dev
    if not torch.cuda.is_available():
        raise DeviceError(f"Device {name!r} was requested, but this machine has no usable GPU (CUDA is not "
                          f"available to PyTorch {torch.__version__}). Use --device cpu, or run this on a machine "
                          "with a GPU.")
    count = torch.cuda.device_count()
    if dev.index is not None and dev.index >= count:
        raise DeviceError(f"Device {name!r} was requested, but this machine has {count} GPU"
                          f"{'s' if count != 1 else ''} (cuda:0 to cuda:{count - 1}).")
    return dev
