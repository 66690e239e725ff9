"""Training runs as a service: queue, follow, cancel, resume; and the ``train`` job handler.

The UI and the CLI call these functions; the training itself happens in the worker process
(workbench.jobs), which calls ``handle_train`` for each ``train`` job.
"""
from __future__ import annotations

import time
import traceback
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Optional, Sequence

from sqlalchemy import delete, select
from sqlalchemy.orm import Session, sessionmaker

from core.efficientnet import get_variant
from core.images import GRAYSCALE_MODES
from storage import repositories as repo
from storage.artifacts import register_artifact, relative_to_data_dir, resolve_in_data_dir
from storage.db import get_sessionmaker
from storage.models import Dataset, Job, Run, RunEvent, RunMetric, utcnow
from workbench import jobs
from workbench.settings import Settings, get_settings

ACTIVE = ("queued", "running")


class RunError(ValueError):
    """A request about runs cannot be honoured; the message says why."""


def _ctx(settings: Optional[Settings]) -> tuple[Settings, sessionmaker[Session]]:
    s = settings or get_settings()
    s.ensure_dirs()
    return s, get_sessionmaker(s.database_url)


def run_dir(settings: Settings, run_id: int) -> Path:
    return settings.runs_dir / f"run_{run_id:05d}"


@dataclass(frozen=True)
class RunInfo:
    id: int
    dataset_id: int
    dataset: str
    variant: str
    resolution: int
    preset: str
    recipe: str
    status: str
    created_at: datetime
    started_at: Optional[datetime]
    finished_at: Optional[datetime]
    error: Optional[str]
    checkpoint_path: Optional[str]
    best_metrics: Optional[dict[str, Any]]
    summary: Optional[dict[str, Any]]
    batch_label: Optional[str]
    train_seconds: Optional[float]
    cancel_requested: bool
    config: dict[str, Any]
    progress: Optional[dict[str, Any]]  # latest snapshot of the run's newest job
    job_status: Optional[str]
    resumable: bool


def _info(s: Session, run: Run, settings: Settings) -> RunInfo:
    job = s.scalar(select(Job).where(Job.run_id == run.id, Job.kind == "train").order_by(Job.id.desc()).limit(1))
    resumable = run.status in ("failed", "cancelled")
    return RunInfo(
        id=run.id, dataset_id=run.dataset_id, dataset=run.dataset.name, variant=run.variant,
        resolution=run.resolution, preset=run.preset, recipe=str((run.config or {}).get("recipe", "")),
        status=run.status, created_at=run.created_at, started_at=run.started_at, finished_at=run.finished_at,
        error=run.error, checkpoint_path=run.checkpoint_path, best_metrics=run.best_metrics, summary=run.summary,
        batch_label=run.batch_label, train_seconds=run.train_seconds, cancel_requested=bool(run.cancel_requested),
        config=dict(run.config or {}), progress=job.progress if job else None,
        job_status=job.status if job else None, resumable=resumable)


# ---------------------------------------------------------------------------------------------
# Service API
# ---------------------------------------------------------------------------------------------
def default_preset(s: Session, dataset_id: int) -> str:
    """'medical' when most images are grayscale or DICOM (scans), else 'field' (photos)."""
    from storage.models import Image

    modes = s.scalars(select(Image.mode).where(Image.dataset_id == dataset_id)).all()
    gray = sum(m in GRAYSCALE_MODES or m == "DICOM" for m in modes)
    return "medical" if modes and gray / len(modes) > 0.5 else "field"


def queue_training(
    dataset: str | int,
    variants: Sequence[str],
    resolution: Optional[int] = None,
    preset: Optional[str] = None,
    recipe: str = "default",
    epochs: Optional[int] = None,
    batch_label: Optional[str] = None,
    *,
    overrides: Optional[dict[str, Any]] = None,
    settings: Optional[Settings] = None,
    start_worker: bool = True,
    postrun: bool = True,
) -> list[int]:
    """Queue one training run per variant (for comparison); returns the run ids.

    ``epochs`` overrides the recipe's fine-tune epochs. ``preset``: augmentation preset
    (default: medical for grayscale/DICOM datasets, field otherwise). ``overrides``: any other
    TrainConfig field. Raises RunError / WeightsError before queueing anything.
    """
    from core.train import make_config
    from core.weights import WeightsError, find_weights

    settings, sf = _ctx(settings)
    if not variants:
        raise RunError("Choose at least one variant to train.")
    specs = []
    for v in variants:
        spec = get_variant(v)  # UnknownVariantError names the known variants
        status = find_weights(spec.name.split("@")[0])
        if not status.available:
            raise WeightsError(status.location)
        specs.append(spec)
    with sf.begin() as s:
        ds = repo.get_dataset_by_name_or_id(s, dataset)
        if ds is None:
            raise RunError(f"No dataset named {dataset!r}.")
        counts = repo.split_counts(s, ds.id).get("train", {})
        if len(ds.classes) < 2:
            raise RunError(f"Dataset {ds.name!r} has {len(ds.classes)} class(es); training needs at least 2.")
        few = [c for c in ds.classes if counts.get(c, 0) < 1]
        if few:
            raise RunError(f"Dataset {ds.name!r}: class '{few[0]}' has no training images.")
        preset = preset or default_preset(s, ds.id)
        label = batch_label or (f"{ds.name} {utcnow():%Y-%m-%d %H:%M:%S}" if len(specs) > 1 else None)
        ids = []
        for spec in specs:
            cfg = make_config(recipe, **{**(overrides or {}), "augment": preset,
                                          **({"finetune_epochs": epochs} if epochs else {})})
            res = int(resolution or spec.resolution)
            run = Run(dataset_id=ds.id, variant=spec.name.split("@")[0], resolution=res, preset=preset,
                      status="queued", config=asdict(cfg), batch_label=label, created_at=utcnow())
            s.add(run)
            s.flush()
            jobs.enqueue(s, "train", run.id, {"resume": False, "postrun": postrun})
            ids.append(run.id)
    if start_worker:
        jobs.ensure_worker(settings)
    return ids


def list_runs(dataset: str | int | None = None, *, settings: Optional[Settings] = None) -> list[RunInfo]:
    settings, sf = _ctx(settings)
    with sf() as s:
        stmt = select(Run).order_by(Run.id)
        if dataset is not None:
            ds = repo.get_dataset_by_name_or_id(s, dataset)
            if ds is None:
                raise RunError(f"No dataset named {dataset!r}.")
            stmt = stmt.where(Run.dataset_id == ds.id)
        return [_info(s, r, settings) for r in s.scalars(stmt).all()]


def get_run(run_id: int, *, settings: Optional[Settings] = None) -> RunInfo:
    settings, sf = _ctx(settings)
    with sf() as s:
        run = s.get(Run, run_id)
        if run is None:
            raise RunError(f"No run with id {run_id}.")
        return _info(s, run, settings)


def cancel_run(run_id: int, *, settings: Optional[Settings] = None) -> str:
    """Queued: cancelled at once. Running: the worker stops it within one batch. Returns the new state."""
    settings, sf = _ctx(settings)
    with sf.begin() as s:
        run = s.get(Run, run_id)
        if run is None:
            raise RunError(f"No run with id {run_id}.")
        if run.status == "queued":
            run.status, run.finished_at = "cancelled", utcnow()
            for job in s.scalars(select(Job).where(Job.run_id == run_id, Job.status == "queued")):
                job.status, job.finished_at = "cancelled", utcnow()
            s.add(RunEvent(run_id=run_id, message="Cancelled before it started.", level="info", created_at=utcnow()))
            return "cancelled"
        if run.status == "running":
            run.cancel_requested = True
            s.add(RunEvent(run_id=run_id, message="Cancel requested.", level="info", created_at=utcnow()))
            return "cancelling"
        raise RunError(f"Run {run_id} is {run.status}; only queued or running runs can be cancelled.")


def resume_run(run_id: int, *, settings: Optional[Settings] = None, start_worker: bool = True) -> int:
    """Queue a failed/cancelled run again; it continues from its last checkpoint. Returns the job id."""
    settings, sf = _ctx(settings)
    jobs.reconcile(sf, settings)  # a 'running' run whose worker died becomes failed (resumable)
    with sf.begin() as s:
        run = s.get(Run, run_id)
        if run is None:
            raise RunError(f"No run with id {run_id}.")
        if run.status not in ("failed", "cancelled"):
            raise RunError(f"Run {run_id} is {run.status}; only failed or cancelled runs can be resumed.")
        last = run_dir(settings, run_id) / "last.pt"
        run.status, run.error, run.cancel_requested, run.finished_at = "queued", None, False, None
        s.add(RunEvent(run_id=run_id, created_at=utcnow(), level="info",
                       message="Resume queued" + (" from the last checkpoint." if last.is_file()
                                                  else " (no checkpoint yet: starts over).")))
        job = jobs.enqueue(s, "train", run_id, {"resume": True, "postrun": True})
        job_id = job.id
    if start_worker:
        jobs.ensure_worker(settings)
    return job_id


def run_metrics(run_id: int, *, settings: Optional[Settings] = None) -> list[dict[str, Any]]:
    settings, sf = _ctx(settings)
    with sf() as s:
        rows = s.scalars(select(RunMetric).where(RunMetric.run_id == run_id).order_by(RunMetric.epoch)).all()
        return [{"epoch": r.epoch, "phase": r.phase, **r.metrics} for r in rows]


def run_events(run_id: int, since_id: int = 0, *, settings: Optional[Settings] = None) -> list[dict[str, Any]]:
    """Events newer than ``since_id`` (poll with the last id you saw)."""
    settings, sf = _ctx(settings)
    with sf() as s:
        rows = s.scalars(select(RunEvent).where(RunEvent.run_id == run_id, RunEvent.id > since_id)
                         .order_by(RunEvent.id)).all()
        return [{"id": e.id, "created_at": e.created_at, "level": e.level, "message": e.message, "data": e.data}
                for e in rows]


def last_checkpoint_epoch(s: Session, run: Run) -> Optional[int]:
    """Epoch of the last checkpoint (metrics are written right after it), None if none yet."""
    from sqlalchemy import func

    return s.scalar(select(func.max(RunMetric.epoch)).where(RunMetric.run_id == run.id))


# ---------------------------------------------------------------------------------------------
# The train job handler (runs in the worker process)
# ---------------------------------------------------------------------------------------------
class DbCallback:
    """core.train Callback writing to SQLite in short transactions, throttled for the UI."""

    PROGRESS_EVERY_S = 1.0
    CANCEL_POLL_S = 0.25  # a batch takes longer than this on CPU, so cancel lands within a batch

    def __init__(self, ctx: jobs.JobContext, run_id: int):
        self.ctx, self.run_id = ctx, run_id
        self.sf = ctx.session_factory
        self._last_progress = 0.0
        self._last_poll = 0.0
        self._cancel = False
        self.total_epochs = 0

    def _progress(self, snapshot: dict[str, Any], force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last_progress >= self.PROGRESS_EVERY_S:
            self._last_progress = now
            self.ctx.progress(snapshot)

    def on_phase_start(self, phase: str, epochs: int, steps_per_epoch: int) -> None:
        self._progress({"phase": phase, "epoch": None, "step": 0, "total_steps": steps_per_epoch,
                        "message": f"{phase}: starting"}, force=True)

    def on_step(self, p: Any) -> None:
        self._progress({"phase": p.phase, "epoch": p.epoch, "step": p.step, "total_steps": p.total_steps,
                        "loss": p.loss, "lr": p.lr, "eta_s": p.eta_s, "images_per_s": p.images_per_s,
                        "fraction": p.done_fraction,
                        "message": f"{p.phase} epoch {p.epoch} step {p.step}/{p.total_steps}"})

    def on_epoch_end(self, phase: str, epoch: int, metrics: dict[str, Any]) -> None:
        with self.sf.begin() as s:
            # Upsert: a resumed run may redo an epoch whose metrics were written before the kill.
            s.execute(delete(RunMetric).where(RunMetric.run_id == self.run_id, RunMetric.epoch == epoch,
                                              RunMetric.phase == phase))
            s.add(RunMetric(run_id=self.run_id, epoch=epoch, phase=phase, metrics=metrics, created_at=utcnow()))
        if metrics.get("replayed"):  # a resumed run re-reporting a checkpointed epoch: no new log line
            return
        self.ctx.event(f"Epoch {epoch} ({phase}): val acc {metrics['val_accuracy']:.3f}, "
                       f"macro-F1 {metrics['val_macro_f1']:.3f}", "info",
                       {k: metrics[k] for k in ("epoch", "val_accuracy", "val_macro_f1", "val_loss", "train_loss")})

    def on_log(self, level: str, message: str, data: Optional[dict[str, Any]] = None) -> None:
        self.ctx.event(message, level, data)

    def should_stop(self) -> bool:
        if self._cancel or self.ctx.stop_requested():
            return True
        now = time.monotonic()
        if now - self._last_poll >= self.CANCEL_POLL_S:
            self._last_poll = now
            with self.sf() as s:
                self._cancel = bool(s.scalar(select(Run.cancel_requested).where(Run.id == self.run_id)))
        return self._cancel


def _samples(s: Session, ds: Dataset, settings: Settings, split: str) -> list[tuple[str, int]]:
    index = {c: i for i, c in enumerate(ds.classes)}
    return [(str(resolve_in_data_dir(im.store_path, settings.data_dir)), index[im.label])
            for im in repo.images_for_dataset(s, ds.id, split) if im.label in index]


def _set_run(sf: sessionmaker[Session], run_id: int, **values: Any) -> None:
    with sf.begin() as s:
        run = s.get(Run, run_id)
        for k, v in values.items():
            setattr(run, k, v)


def handle_train(ctx: jobs.JobContext) -> jobs.JobOutcome:
    import os

    from core.data import DataError
    from core.train import TrainConfig, TrainingCancelled, TrainingError, train
    from core.weights import WeightsError

    sf, settings, run_id = ctx.session_factory, ctx.settings, ctx.run_id
    assert run_id is not None, "train jobs carry a run id"
    with sf.begin() as s:
        run = s.get(Run, run_id)
        if run is None:
            return jobs.JobOutcome("failed", f"run {run_id} no longer exists")
        if run.cancel_requested or run.status == "cancelled":
            run.status, run.finished_at = "cancelled", utcnow()
            return jobs.JobOutcome("cancelled")
        ds = run.dataset
        classes = list(ds.classes)
        train_s, val_s = _samples(s, ds, settings, "train"), _samples(s, ds, settings, "val")
        cfg = TrainConfig.from_dict(run.config or {})
        variant, resolution = run.variant, run.resolution
        run.status, run.worker_pid, run.error = "running", os.getpid(), None
        run.started_at = run.started_at or utcnow()
    rdir = run_dir(settings, run_id)
    resume = bool(ctx.payload.get("resume"))
    ctx.event(("Resuming" if resume else "Starting") + f" training: {variant} at {resolution}px, recipe "
              f"{cfg.recipe}, preset {cfg.augment}, {len(train_s)} train / {len(val_s)} val images.")
    cb = DbCallback(ctx, run_id)
    try:
        result = train(train_s, classes, variant, rdir, cfg, resolution=resolution, val_samples=val_s or None,
                       callback=cb, resume=resume)
    except TrainingCancelled as exc:
        if ctx.stop_requested() and not cb._cancel:  # worker shut down, not a user cancel
            msg = "The worker was stopped during training; resume continues from the last checkpoint."
            _set_run(sf, run_id, status="failed", finished_at=utcnow(), error=msg)
            ctx.event(msg, "warning", {"resumable": True})
            return jobs.JobOutcome("failed", msg)
        _set_run(sf, run_id, status="cancelled", finished_at=utcnow(), error=None, cancel_requested=False)
        ctx.event(f"Cancelled ({exc}); resume continues from the last checkpoint.", "info")
        return jobs.JobOutcome("cancelled")
    except (DataError, TrainingError, WeightsError) as exc:
        _set_run(sf, run_id, status="failed", finished_at=utcnow(), error=str(exc))
        ctx.event(str(exc), "error")
        return jobs.JobOutcome("failed", str(exc))
    except Exception as exc:  # noqa: BLE001 - record, then let the job fail
        msg = f"Training crashed: {type(exc).__name__}: {exc}"
        _set_run(sf, run_id, status="failed", finished_at=utcnow(), error=msg)
        ctx.event(msg, "error", {"traceback": traceback.format_exc()[-4000:]})
        return jobs.JobOutcome("failed", msg)

    best = dict(result.best["metrics"])
    best_metrics = {"epoch": result.best["epoch"], "phase": result.best["phase"],
                    **{k: best[k] for k in ("accuracy", "macro_f1", "balanced_accuracy", "loss")},
                    "per_class_f1": best["per_class_f1"]}
    with sf.begin() as s:
        run = s.get(Run, run_id)
        run.status, run.finished_at = "succeeded", utcnow()
        run.checkpoint_path = relative_to_data_dir(result.best_path, settings.data_dir)
        run.best_metrics = best_metrics
        run.summary = {**(run.summary or {}), **result.summary, "val_confusion": best["confusion"]}
        run.train_seconds = result.train_seconds
        register_artifact(s, result.best_path, settings.data_dir, kind="checkpoint", run_id=run_id,
                          meta={"epoch": result.best["epoch"], "val_macro_f1": best["macro_f1"]})
    ctx.event(f"Training finished in {result.train_seconds:.0f} s: best val accuracy {best['accuracy']:.3f}, "
              f"macro-F1 {best['macro_f1']:.3f} (epoch {result.best['epoch']}).")
    if ctx.payload.get("postrun", True):
        _after_training(ctx, run_id)
    return jobs.JobOutcome("succeeded")


def _after_training(ctx: jobs.JobContext, run_id: int) -> None:
    """Export/evaluate hook of workbench.postrun, if present; its failure never fails the run."""
    try:
        from workbench import postrun
    except ImportError:
        return
    fn = getattr(postrun, "after_training", None)
    if fn is None:
        return
    ctx.progress({"phase": "postrun", "message": "exporting and evaluating", "fraction": 1.0})
    try:
        fn(ctx.session_factory, ctx.settings, run_id,
           lambda message, fraction=None: ctx.progress({"phase": "postrun", "message": message,
                                                         "fraction": fraction}))
        ctx.event("Post-training export and evaluation done.")
    except Exception as exc:  # noqa: BLE001
        ctx.event(f"Post-training export/evaluation failed (the trained model is fine): "
                  f"{type(exc).__name__}: {exc}", "warning", {"traceback": traceback.format_exc()[-4000:]})
        with ctx.session_factory.begin() as s:
            run = s.get(Run, run_id)
            run.summary = {**(run.summary or {}), "postrun_error": f"{type(exc).__name__}: {exc}"}


jobs.register_handler("train", handle_train)

__all__ = ["RunInfo", "RunError", "queue_training", "list_runs", "get_run", "cancel_run", "resume_run",
           "run_metrics", "run_events", "handle_train", "run_dir", "default_preset"]
