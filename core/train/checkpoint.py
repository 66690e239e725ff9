"""Checkpoints: atomic save, safe load, RNG state, resume state, and reloading a trained model.

Every epoch writes ``last.pt`` (model, optimizer, scheduler, EMA, RNG, history: enough to
resume bit-identically) and, when validation improved, ``best.pt``.
"""
from __future__ import annotations

import os
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from core.preprocessing import Preprocessing
from core.registry import build_network, get_variant
from core.staged import StagedModel
from core.train.callbacks import TrainingError
from core.train.runner import Runner


@dataclass
class TrainedModel:
    model: StagedModel  # eval mode, on CPU
    preprocessing: Preprocessing
    classes: list[str]
    variant: str
    resolution: int
    meta: dict[str, Any] = field(default_factory=dict)  # the rest of the checkpoint (config, best, history)


def rng_state() -> dict[str, Any]:
    np_state: Any = np.random.get_state()
    return {"python": random.getstate(),
            # numpy's key array as a list keeps the checkpoint loadable with weights_only=True
            "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), *n[2:]))
    torch.set_rng_state(state["torch"])


def save_atomic(obj: dict[str, Any], path: Path) -> None:
    """torch.save to a temp file then rename: a kill mid-write never leaves a torn checkpoint."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint {path} does not exist.")
    # weights_only: a checkpoint is data, never code (RNG states are stored as plain lists).
    return torch.load(path, map_location="cpu", weights_only=True)


def load_trained_model(path: str | Path, device: str = "cpu") -> TrainedModel:
    """Rebuild the trained network from ``best.pt`` / ``last.pt``: eval mode, weights loaded."""
    ckpt = load_checkpoint(path)
    v = get_variant(ckpt["variant"]).at_resolution(int(ckpt["resolution"]))
    model = build_network(v, int(ckpt["num_classes"]), ckpt["padding"], float(ckpt["bn_eps"]))
    model.load_state_dict(ckpt["model"])
    model.to(device).eval()
    meta = {k: v for k, v in ckpt.items() if k not in ("model", "optimizer", "scheduler", "rng", "ema")}
    return TrainedModel(model, Preprocessing.from_dict(ckpt["preprocessing"]), list(ckpt["classes"]),
                        ckpt["variant"], int(ckpt["resolution"]), meta)


def cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def checkpoint_common(model: StagedModel, run: Runner, variant: str, pre: Preprocessing,
                      epoch: int, phase: str) -> dict[str, Any]:
    """What best.pt and last.pt share: the run's identity, record and RNG state at this moment."""
    return {"epoch": epoch, "phase": phase, "config": asdict(run.cfg), "variant": variant,
            "resolution": pre.resolution, "num_classes": len(run.classes), "classes": list(run.classes),
            "preprocessing": pre.to_dict(), "padding": model.padding, "bn_eps": model.bn_eps,
            "rng": rng_state(), "history": list(run.history), "best": run.best,
            "train_seconds": run.seconds(), "summary": dict(run.summary)}


@dataclass
class ResumeState:
    """Where training (re)starts: nothing done, or just after the epoch ``last.pt`` holds."""

    checkpoint: dict[str, Any] | None = None
    start_phase: int = 0
    start_phase_epoch: int = 0
    bad_epochs: int = 0  # epochs without improvement so far in the phase being resumed
    global_epoch: int = 0

    @classmethod
    def from_checkpoint(cls, ckpt: dict[str, Any]) -> ResumeState:
        phase, phase_epoch, bad = int(ckpt["phase_index"]), int(ckpt["phase_epoch"]), int(ckpt.get("bad_epochs", 0))
        if ckpt.get("phase_done"):
            phase, phase_epoch, bad = phase + 1, 0, 0
        return cls(ckpt, phase, phase_epoch, bad, int(ckpt["epoch"]))

    def resumes_inside(self, phase_index: int) -> bool:
        """Whether ``phase_index`` is the phase the checkpoint stopped in the middle of."""
        ckpt = self.checkpoint
        return ckpt is not None and phase_index == int(ckpt["phase_index"]) and not ckpt.get("phase_done")


def restore_run(run: Runner, model: StagedModel, pre: Preprocessing, variant: str) -> ResumeState:
    """Load ``last.pt`` into the model and the run record; replay its epochs to the callback."""
    path = run.last_path
    if not path.is_file():
        run.log("No checkpoint to resume from: starting from the beginning.")
        return ResumeState()
    ckpt = load_checkpoint(path)
    if ckpt["classes"] != run.classes or ckpt["variant"] != variant or int(ckpt["resolution"]) != pre.resolution:
        raise TrainingError(f"{path} belongs to another run (classes/variant/resolution differ); "
                            "cannot resume from it.")
    model.load_state_dict(ckpt["model"])
    run.history, run.best = list(ckpt["history"]), ckpt["best"]
    run.prior_seconds = float(ckpt.get("train_seconds", 0.0))
    run.summary.update(ckpt.get("summary", {}))
    run.summary["resumed_from_epoch"] = int(ckpt["epoch"])
    run.log(f"Resuming from {path.name}: epoch {ckpt['epoch']} ({ckpt['phase']} phase) done.")
    # A kill between writing a checkpoint and the callback's own bookkeeping would lose that
    # epoch's report: replay every checkpointed epoch (callbacks must treat them as upserts).
    for record in run.history:
        run.cb.on_epoch_end(record["phase"], int(record["epoch"]), {**record, "replayed": True})
    return ResumeState.from_checkpoint(ckpt)
