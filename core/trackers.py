"""Optional experiment trackers for a training run: MLflow and TensorBoard, as ``Callback``s.

``workbench train --track mlflow`` (or ``tensorboard``, or both) adds them to the training
callback. Both packages are optional (the ``trackers`` extra): ``check_trackers`` says in plain
words what to install before a run is queued.

* MLflow: params at the start, per-epoch metrics (step = global epoch), the best checkpoint and
  the run's history as artifacts at the end. Tracking URI: ``MLFLOW_TRACKING_URI`` if set, else
  a file store under the data dir (``<data dir>/mlruns``).
* TensorBoard: event files under the run's folder (``<run>/tensorboard``), one scalar per metric.
"""
from __future__ import annotations

import importlib.util
import json
import os
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from core.train.callbacks import Callback, Progress

TRACKERS = ("mlflow", "tensorboard")
# The import each tracker needs, and the package that provides it.
_NEEDS = {"mlflow": ("mlflow", "mlflow-skinny"), "tensorboard": ("tensorboard", "tensorboard")}


class TrackerError(RuntimeError):
    """A tracker cannot be used; the message says what to do."""


def check_trackers(names: Iterable[str]) -> tuple[str, ...]:
    """Validate tracker names and that their packages are installed; returns them in order, once each."""
    out: list[str] = []
    for raw in names:
        name = raw.strip().lower()
        if not name:
            continue
        if name not in TRACKERS:
            raise TrackerError(f"Unknown tracker {raw!r}: choose {' or '.join(TRACKERS)}.")
        module, package = _NEEDS[name]
        if importlib.util.find_spec(module) is None:
            raise TrackerError(f"Logging to {'MLflow' if name == 'mlflow' else 'TensorBoard'} needs the {package} "
                               f"package, which is not installed. Install it with: pip install '{package}' "
                               "(or: pip install 'workbench[trackers]').")
        if name not in out:
            out.append(name)
    return tuple(out)


def _numeric(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and v == v}  # v == v: not NaN


def _flat_params(params: dict[str, Any]) -> dict[str, str]:
    # MLflow params are strings of at most 6000 characters.
    return {k: (v if isinstance(v, str) else json.dumps(v, default=str))[:6000] for k, v in params.items()}


def default_tracking_uri(data_dir: Path) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else a file store under the data dir."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if uri:
        return uri
    # MLflow 3 keeps the file store in maintenance mode and refuses it unless asked: we ask for
    # it only for our own default (a database URI in MLFLOW_TRACKING_URI is used as it is).
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return (Path(data_dir) / "mlruns").resolve().as_uri()


class MLflowTracker(Callback):
    """Logs one training run to MLflow through ``MlflowClient`` (no global active-run state)."""

    def __init__(self, tracking_uri: str, *, experiment: str, run_name: str, params: dict[str, Any],
                 tags: dict[str, str] | None = None):
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri)
        self.tracking_uri = tracking_uri
        found = self.client.get_experiment_by_name(experiment)
        exp_id = found.experiment_id if found is not None else self.client.create_experiment(experiment)
        self.run_id: str = self.client.create_run(exp_id, run_name=run_name, tags=tags or {}).info.run_id
        for key, value in _flat_params(params).items():
            self.client.log_param(self.run_id, key, value)

    def on_epoch_end(self, phase: str, epoch: int, metrics: dict[str, Any]) -> None:
        if metrics.get("replayed"):  # a resumed run replays epochs MLflow already has
            return
        now = int(time.time() * 1000)
        for key, value in _numeric(metrics).items():
            if key not in ("epoch", "best_epoch"):
                self.client.log_metric(self.run_id, key, value, timestamp=now, step=epoch)

    def finish(self, artifacts: Sequence[Path], status: str = "FINISHED") -> None:
        for path in artifacts:
            if Path(path).is_file():
                self.client.log_artifact(self.run_id, str(path))
        self.client.set_terminated(self.run_id, status=status)


class TensorBoardTracker(Callback):
    """Writes TensorBoard event files (scalars per epoch, the params as text) under ``log_dir``."""

    def __init__(self, log_dir: Path, params: dict[str, Any]):
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(log_dir)
        self.writer = SummaryWriter(log_dir=str(self.log_dir))
        table = "\n".join(f"| {k} | {v} |" for k, v in _flat_params(params).items())
        self.writer.add_text("params", "| parameter | value |\n|---|---|\n" + table, 0)

    def on_step(self, progress: Progress) -> None:
        pass  # per-epoch scalars only: per-step writes would cost more than the tiny runs they describe

    def on_epoch_end(self, phase: str, epoch: int, metrics: dict[str, Any]) -> None:
        if metrics.get("replayed"):
            return
        for key, value in _numeric(metrics).items():
            if key not in ("epoch", "best_epoch"):
                self.writer.add_scalar(key, value, epoch)
        self.writer.flush()

    def finish(self, artifacts: Sequence[Path], status: str = "FINISHED") -> None:
        self.writer.close()


class CallbackFanout(Callback):
    """One callback that forwards every hook to several (the database callback first)."""

    def __init__(self, *callbacks: Callback):
        self.callbacks = list(callbacks)

    def on_phase_start(self, phase: str, epochs: int, steps_per_epoch: int) -> None:
        for cb in self.callbacks:
            cb.on_phase_start(phase, epochs, steps_per_epoch)

    def on_step(self, progress: Progress) -> None:
        for cb in self.callbacks:
            cb.on_step(progress)

    def on_epoch_end(self, phase: str, epoch: int, metrics: dict[str, Any]) -> None:
        for cb in self.callbacks:
            cb.on_epoch_end(phase, epoch, metrics)

    def on_log(self, level: str, message: str, data: dict[str, Any] | None = None) -> None:
        for cb in self.callbacks:
            cb.on_log(level, message, data)

    def should_stop(self) -> bool:
        return any(cb.should_stop() for cb in self.callbacks)


Tracker = MLflowTracker | TensorBoardTracker


def open_trackers(names: Iterable[str], *, run_dir: Path, data_dir: Path, run_name: str,
                  params: dict[str, Any], tags: dict[str, str] | None = None) -> list[Tracker]:
    """Start the named trackers for one run (``check_trackers`` first)."""
    out: list[Tracker] = []
    for name in check_trackers(names):
        if name == "mlflow":
            out.append(MLflowTracker(default_tracking_uri(data_dir), experiment="workbench", run_name=run_name,
                                     params=params, tags=tags))
        else:
            out.append(TensorBoardTracker(Path(run_dir) / "tensorboard", params))
    return out


def run_artifacts(run_dir: Path, best_path: Path | None) -> list[Path]:
    """What a finished run hands to a tracker: the best checkpoint and the small JSON/CSV records."""
    run_dir = Path(run_dir)
    files = sorted(p for p in run_dir.glob("*") if p.is_file() and p.suffix in (".json", ".csv"))
    if best_path is not None and Path(best_path).is_file():
        files.append(Path(best_path))
    return files


__all__ = ["TRACKERS", "TrackerError", "check_trackers", "default_tracking_uri", "MLflowTracker",
           "TensorBoardTracker", "CallbackFanout", "open_trackers", "run_artifacts"]
