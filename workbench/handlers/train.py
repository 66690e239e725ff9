"""The ``train`` job handler (runs in the train-lane worker) and what to do with an orphaned one.

``DbCallback`` is core.train's callback: it writes progress, per-epoch metrics and events to
the database in short transactions, throttled for the UI, and polls for a cancel.
"""
from __future__ import annotations

import os
import time
import traceback
from dataclasses import asdict
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session, sessionmaker

from core.data import DataError
from core.trackers import CallbackFanout, TrackerError, open_trackers, run_artifacts
from core.train import Callback, TrainConfig, TrainingCancelled, TrainingError, train
from core.train.runner import EtaSmoother
from core.weights import WeightsError
from storage import repositories as repo
from storage.artifacts import register_artifact, relative_to_data_dir, resolve_in_data_dir
from storage.models import Dataset, Run, RunEvent, RunMetric, utcnow
from workbench.handlers.ddp_launch import train_in_processes
from workbench.handlers.postrun import VERIFY_STEPS, after_training, verify_estimate_s
from workbench.handlers.recovery import note_resumed
from workbench.jobs import JobContext, JobOutcome
from workbench.paths import RunPaths
from workbench.runs import last_checkpoint_epoch
from workbench.settings import Settings
from workbench.status import JobStatus, RunStatus
from workbench.summary import BestMetrics, merge_summary


class DbCallback(Callback):
    """core.train Callback writing to the database in short transactions, throttled for the UI."""

    PROGRESS_EVERY_S = 1.0
    CANCEL_POLL_S = 0.25  # a batch takes longer than this on CPU, so cancel lands within a batch

    def __init__(self, ctx: JobContext, run_id: int, verify_s: float = 0.0):
        self.ctx, self.run_id = ctx, run_id
        self.verify_s = verify_s  # estimated post-training seconds, part of the overall ETA
        self.sf = ctx.session_factory
        self._last_progress = 0.0
        self._last_poll = 0.0
        self.cancelled_by_user = False

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
                        "loss": p.loss, "lr": p.lr, "images_per_s": p.images_per_s,
                        "eta_s": None if p.eta_s is None else p.eta_s + self.verify_s,
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

    def on_log(self, level: str, message: str, data: dict[str, Any] | None = None) -> None:
        self.ctx.event(message, level, data)

    def should_stop(self) -> bool:
        if self.cancelled_by_user or self.ctx.stop_requested():
            return True
        now = time.monotonic()
        if now - self._last_poll >= self.CANCEL_POLL_S:
            self._last_poll = now
            with self.sf() as s:
                self.cancelled_by_user = bool(s.scalar(select(Run.cancel_requested).where(Run.id == self.run_id)))
        return self.cancelled_by_user


def samples_of(s: Session, ds: Dataset, settings: Settings, split: str) -> list[tuple[str, int]]:
    """(image file, class index) of one split, as core.train takes them."""
    index = {c: i for i, c in enumerate(ds.classes)}
    return [(str(resolve_in_data_dir(im.store_path, settings.data_dir)), index[im.label])
            for im in repo.images_for_dataset(s, ds.id, split) if im.label in index]


def _set_run(sf: sessionmaker[Session], run_id: int, **values: Any) -> None:
    with sf.begin() as s:
        run = s.get(Run, run_id)
        for k, v in values.items():
            setattr(run, k, v)


def _fail(ctx: JobContext, run_id: int, msg: str, level: str = "error", data: dict[str, Any] | None = None
          ) -> JobOutcome:
    _set_run(ctx.session_factory, run_id, status=RunStatus.FAILED, finished_at=utcnow(), error=msg)
    ctx.event(msg, level, data)
    return JobOutcome(JobStatus.FAILED, msg)


def record_success(ctx: JobContext, run_id: int, result: Any, verifying: bool = False) -> dict[str, Any]:
    """The trained run's best checkpoint, validation metrics and summary, and its status: verifying
    (export, verification and evaluation follow) or succeeded; returns its best metrics."""
    best = dict(result.best["metrics"])
    best_metrics: BestMetrics = {"epoch": result.best["epoch"], "phase": result.best["phase"],
                                 "accuracy": best["accuracy"], "macro_f1": best["macro_f1"],
                                 "balanced_accuracy": best["balanced_accuracy"], "loss": best["loss"],
                                 "per_class_f1": best["per_class_f1"]}
    with ctx.session_factory.begin() as s:
        run = s.get(Run, run_id)
        assert run is not None
        # Succeeded only once exported, verified and evaluated (``_after_training``).
        run.status = RunStatus.VERIFYING if verifying else RunStatus.SUCCEEDED
        run.finished_at = None if verifying else utcnow()
        run.checkpoint_path = relative_to_data_dir(result.best_path, ctx.settings.data_dir)
        run.best_metrics = dict(best_metrics)
        merge_summary(run, {**result.summary, "val_confusion": best["confusion"]})
        run.train_seconds = result.train_seconds
        register_artifact(s, result.best_path, ctx.settings.data_dir, kind="checkpoint", run_id=run_id,
                          meta={"epoch": result.best["epoch"], "val_macro_f1": best["macro_f1"]})
    return best


def _start(ctx: JobContext, run_id: int) -> tuple[dict[str, Any], JobOutcome | None]:
    """Mark the run running and read what training needs; or the outcome if it must not start."""
    with ctx.session_factory.begin() as s:
        run = s.get(Run, run_id)
        if run is None:
            return {}, JobOutcome(JobStatus.FAILED, f"run {run_id} no longer exists")
        if run.cancel_requested or run.status == RunStatus.CANCELLED:
            run.status, run.finished_at = RunStatus.CANCELLED, utcnow()
            return {}, JobOutcome(JobStatus.CANCELLED)
        ds = run.dataset
        todo = {"classes": list(ds.classes), "train": samples_of(s, ds, ctx.settings, "train"),
                "val": samples_of(s, ds, ctx.settings, "val"), "cfg": TrainConfig.from_dict(run.config or {}),
                "variant": run.variant, "resolution": run.resolution,
                "n_test": len(repo.images_for_dataset(s, ds.id, "test"))}
        verify_only = todo["verify_only"] = bool(ctx.payload.get("verify_only")) and run.checkpoint_path is not None
        run.status = RunStatus.VERIFYING if verify_only else RunStatus.RUNNING
        if ctx.payload.get("auto_resume"):
            note_resumed(s, run, ctx.settings.host_id)
        run.worker_pid, run.error, run.finished_at = os.getpid(), None, None
        run.started_at = run.started_at or utcnow()
    return todo, None


def _open_trackers(ctx: JobContext, run_id: int, todo: dict[str, Any]) -> list[Any]:
    """The trackers the job asks for (``workbench train --track``), else WORKBENCH_TRACK's."""
    names = ctx.payload.get("track") or os.environ.get("WORKBENCH_TRACK", "").split(",")
    if not any(str(n).strip() for n in names):
        return []
    params = {"variant": todo["variant"], "resolution": todo["resolution"], "classes": todo["classes"],
              "train_images": len(todo["train"]), "val_images": len(todo["val"]), **asdict(todo["cfg"])}
    return open_trackers(names, run_dir=RunPaths(ctx.settings, run_id).root, data_dir=ctx.settings.data_dir,
                         run_name=f"run {run_id} {todo['variant']}", params=params,
                         tags={"workbench.run_id": str(run_id)})


def handle_train(ctx: JobContext) -> JobOutcome:
    run_id = ctx.run_id
    assert run_id is not None, "train jobs carry a run id"
    todo, early = _start(ctx, run_id)
    if early is not None:
        return early
    postrun = bool(ctx.payload.get("postrun", True))
    if todo["verify_only"]:  # resumed after the worker died while verifying
        ctx.event("Training had finished: re-running the export, verification and evaluation.")
        _after_training(ctx, run_id, verify_estimate_s(todo["n_test"], len(todo["val"]), todo["resolution"]))
        return JobOutcome(JobStatus.SUCCEEDED)
    cfg, resume = todo["cfg"], bool(ctx.payload.get("resume"))
    ctx.event(("Resuming" if resume else "Starting") + f" training: {todo['variant']} at {todo['resolution']}px, "
              f"recipe {cfg.recipe}, preset {cfg.augment}, {len(todo['train'])} train / {len(todo['val'])} val images.")
    verify_s = verify_estimate_s(todo["n_test"], len(todo["val"]), todo["resolution"]) if postrun else 0.0
    cb = DbCallback(ctx, run_id, verify_s)
    try:
        trackers = _open_trackers(ctx, run_id, todo)
    except TrackerError as exc:
        return _fail(ctx, run_id, str(exc))
    try:
        try:
            if cfg.processes > 1:  # data-parallel: torchrun's processes report to the database themselves
                if trackers:
                    ctx.event("With several processes the experiment trackers get the final files, not the "
                              "numbers of each epoch.", "warning")
                result = train_in_processes(ctx, todo, resume, verify_s, cb.should_stop)
            else:
                result = train(todo["train"], todo["classes"], todo["variant"], RunPaths(ctx.settings, run_id).root,
                               cfg, resolution=todo["resolution"], val_samples=todo["val"] or None,
                               callback=CallbackFanout(cb, *trackers) if trackers else cb, resume=resume)
        except BaseException as exc:  # close the tracker runs too, then handle as before
            for tracker in trackers:
                tracker.finish([], status="KILLED" if isinstance(exc, TrainingCancelled) else "FAILED")
            raise
        for tracker in trackers:
            tracker.finish(run_artifacts(RunPaths(ctx.settings, run_id).root, result.best_path))
    except TrainingCancelled as exc:
        if ctx.stop_requested() and not cb.cancelled_by_user:  # the worker shut down, not a user cancel
            return _fail(ctx, run_id, "The worker was stopped during training; resume continues from the last "
                         "checkpoint.", "warning", {"resumable": True})
        _set_run(ctx.session_factory, run_id, status=RunStatus.CANCELLED, finished_at=utcnow(), error=None,
                 cancel_requested=False)
        ctx.event(f"Cancelled ({exc}); resume continues from the last checkpoint.", "info")
        return JobOutcome(JobStatus.CANCELLED)
    except (DataError, TrainingError, WeightsError) as exc:
        return _fail(ctx, run_id, str(exc))
    except Exception as exc:  # noqa: BLE001 - record, then let the job fail
        return _fail(ctx, run_id, f"Training crashed: {type(exc).__name__}: {exc}", "error",
                     {"traceback": traceback.format_exc()[-4000:]})
    best = record_success(ctx, run_id, result, verifying=postrun)
    ctx.event(f"Training finished in {result.train_seconds:.0f} s: best val accuracy {best['accuracy']:.3f}, "
              f"macro-F1 {best['macro_f1']:.3f} (epoch {result.best['epoch']})."
              + (" Verifying the exported model before it is marked succeeded." if postrun else ""))
    if postrun:
        _after_training(ctx, run_id, verify_s)
    return JobOutcome(JobStatus.SUCCEEDED)


def _after_training(ctx: JobContext, run_id: int, estimate_s: float) -> None:
    """Export, verify and evaluate while the run is ``verifying``, then mark it succeeded; a
    failure here never fails the trained run (it is recorded in the summary)."""
    eta = EtaSmoother()
    eta.seed(time.monotonic(), 0.0, 1.0, estimate_s)  # the estimate the training ETA included

    def report(message: str, fraction: float) -> None:
        ctx.progress({"phase": RunStatus.VERIFYING, "message": f"Verifying ({message})", "fraction": fraction,
                      "eta_s": eta.update(time.monotonic(), fraction, 1.0)})

    report(f"step 1 of {len(VERIFY_STEPS)}, {VERIFY_STEPS[0]}", 0.0)
    try:
        after_training(ctx.session_factory, ctx.settings, run_id, report)
        ctx.event("Post-training export and evaluation done.")
    except Exception as exc:  # noqa: BLE001
        ctx.event(f"Post-training export/evaluation failed (the trained model is fine): "
                  f"{type(exc).__name__}: {exc}", "warning", {"traceback": traceback.format_exc()[-4000:]})
        with ctx.session_factory.begin() as s:
            run = s.get(Run, run_id)
            if run is not None:
                merge_summary(run, {"postrun_error": f"{type(exc).__name__}: {exc}"})
    with ctx.session_factory.begin() as s:  # only now: a succeeded run has its metrics
        run = s.get(Run, run_id)
        if run is not None and run.status == RunStatus.VERIFYING:
            run.status, run.finished_at = RunStatus.SUCCEEDED, utcnow()


def on_orphan(s: Session, run_id: int | None, pid: int | None) -> None:
    """Inside reconcile's transaction: the train worker died mid-run; fail the run, offer resume.

    Died while verifying: the trained model is safe (its checkpoint is recorded), so the run is
    failed with a message saying resume re-runs only the export, verification and evaluation
    (``runs.resume_run`` queues a ``verify_only`` job); it never stays "verifying". It is not
    re-queued automatically: a verification that kills its worker would otherwise loop.
    """
    run = s.get(Run, run_id) if run_id is not None else None
    if run is None or run.status not in (RunStatus.RUNNING, RunStatus.VERIFYING):
        return
    if run.status == RunStatus.VERIFYING:
        run.status, run.finished_at = RunStatus.FAILED, utcnow()
        run.error = (f"Worker died (pid {pid}) while checking the trained model; training itself finished. "
                     "Resume re-runs only the export, verification and evaluation.")
        s.add(RunEvent(run_id=run.id, level="error", message=run.error, created_at=utcnow(),
                       data={"resumable": True, "verify_only": True}))
        return
    epoch = last_checkpoint_epoch(s, run)
    run.status, run.finished_at = RunStatus.FAILED, utcnow()
    run.error = (f"Worker died (pid {pid}) during training. "
                 + (f"Resume from the checkpoint after epoch {epoch}." if epoch is not None
                    else "No checkpoint was written yet: resume restarts it."))
    s.add(RunEvent(run_id=run.id, level="error", message=run.error, created_at=utcnow(),
                   data={"resumable": True, "checkpoint_epoch": epoch}))
