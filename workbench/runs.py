"""Training runs as a service: queue, list, follow, cancel, resume, delete.

The UI and the CLI call these functions; the training itself happens in the worker process,
whose ``train`` handler lives in workbench.handlers.train.
"""
from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from core.images import GRAYSCALE_MODES
from core.registry import get_variant, num_stages  # torch-free: the pages import this service
from storage import repositories as repo
from storage.artifacts import ArtifactError, resolve_in_data_dir
from storage.models import Artifact, Image, Job, Run, RunEvent, RunMetric, utcnow
from workbench import jobs, lanes, workers
from workbench.paths import RunPaths
from workbench.settings import Settings, service_context
from workbench.status import ACTIVE_RUN, RESUMABLE_RUN, TERMINAL_JOB, CancelOutcome, JobKind, JobStatus, RunStatus
from workbench.summary import BestMetrics, RunSummary, read_best, read_summary

# A verifying run's training is over: cancelling would only throw away its export and metrics.
CANCELLABLE_RUN = frozenset({RunStatus.QUEUED, RunStatus.RUNNING})


class RunError(ValueError):
    """A request about runs cannot be honoured; the message says why."""


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
    started_at: datetime | None
    finished_at: datetime | None
    error: str | None
    checkpoint_path: str | None
    best_metrics: BestMetrics | None
    summary: RunSummary
    batch_label: str | None
    train_seconds: float | None
    cancel_requested: bool
    config: dict[str, Any]
    progress: dict[str, Any] | None  # latest snapshot of the run's newest job
    job_status: str | None
    resumable: bool

    @property
    def active(self) -> bool:
        """Still to follow: queued, training or verifying, and its job has not ended (a job that
        ended while the run row still says running was cut short: following it longer waits forever)."""
        return self.status in ACTIVE_RUN and self.job_status not in TERMINAL_JOB

    @property
    def queued(self) -> bool:
        return self.status == RunStatus.QUEUED



def progress_text(info: RunInfo) -> str:
    """'running | Epoch 3/10 | loss 0.412 | about 40 s left': the line a followed run shows."""
    p = info.progress or {}
    eta = p.get("eta_s")
    loss = f" | loss {p['loss']:.3f}" if p.get("loss") is not None else ""
    return f"{info.status} | {p.get('message', '')}{loss}" + (f" | about {eta:.0f} s left" if eta is not None else "")

def _info(s: Session, run: Run, settings: Settings) -> RunInfo:
    job = s.scalar(select(Job).where(Job.run_id == run.id, Job.kind == JobKind.TRAIN).order_by(Job.id.desc())
                   .limit(1))
    resumable = run.status in RESUMABLE_RUN
    return RunInfo(
        id=run.id, dataset_id=run.dataset_id, dataset=run.dataset.name, variant=run.variant,
        resolution=run.resolution, preset=run.preset, recipe=str((run.config or {}).get("recipe", "")),
        status=run.status, created_at=run.created_at, started_at=run.started_at, finished_at=run.finished_at,
        error=run.error, checkpoint_path=run.checkpoint_path,
        best_metrics=read_best(run) if run.best_metrics else None, summary=read_summary(run),
        batch_label=run.batch_label, train_seconds=run.train_seconds, cancel_requested=bool(run.cancel_requested),
        config=dict(run.config or {}), progress=job.progress if job else None,
        job_status=job.status if job else None, resumable=resumable)


# ---------------------------------------------------------------------------------------------
# Service API
# ---------------------------------------------------------------------------------------------
def default_preset(s: Session, dataset_id: int) -> str:
    """The preset for the kind of image the health report guessed (core.image_kind: scans ->
    medical, stained slides and skin -> microscopy, photos -> field); for a dataset checked
    before kinds were guessed: 'medical' when most images are grayscale or DICOM, else 'field'."""
    from core.image_kind import PRESET_FOR_KIND

    ds = repo.get_dataset_by_name_or_id(s, dataset_id)
    kind = (((ds.health if ds else None) or {}).get("image_kind") or {}).get("kind")
    if kind in PRESET_FOR_KIND:
        return PRESET_FOR_KIND[kind]
    modes = s.scalars(select(Image.mode).where(Image.dataset_id == dataset_id)).all()
    gray = sum(m in GRAYSCALE_MODES or m == "DICOM" for m in modes)
    return "medical" if modes and gray / len(modes) > 0.5 else "field"


def queue_training(
    dataset: str | int,
    variants: Sequence[str],
    resolution: int | None = None,
    preset: str | None = None,
    recipe: str = "default",
    epochs: int | None = None,
    batch_label: str | None = None,
    *,
    overrides: dict[str, Any] | None = None,
    settings: Settings | None = None,
    start_worker: bool = True,
    postrun: bool = True,
    track: Sequence[str] = (),
) -> list[int]:
    """Queue one training run per variant (for comparison); returns the run ids.

    ``epochs`` overrides the recipe's fine-tune epochs. ``preset``: augmentation preset
    (default: medical for grayscale/DICOM datasets, field otherwise). ``overrides``: any other
    TrainConfig field. ``track``: experiment trackers (core.trackers: mlflow, tensorboard).
    Raises RunError / WeightsError / TrackerError before queueing anything.
    """
    from core.trackers import check_trackers
    from core.train import make_config
    from core.weights import WeightsError, find_weights

    settings, sf = service_context(settings)
    track = check_trackers(track)
    if not variants:
        raise RunError("Choose at least one variant to train.")
    specs = []
    unfreeze = make_config(recipe, **(overrides or {})).unfreeze_stages  # the same for every variant
    for v in variants:
        spec = get_variant(v)  # UnknownVariantError names the known variants
        if unfreeze > num_stages(spec):
            raise RunError(f"unfreeze_stages must be 0..{num_stages(spec)} for {spec.name}, got {unfreeze}.")
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
                      status=RunStatus.QUEUED, config=asdict(cfg), batch_label=label, created_at=utcnow())
            s.add(run)
            s.flush()
            needs = workers.training_needs(run.config)  # one GPU per process on GPUs
            jobs.enqueue(s, JobKind.TRAIN, run.id, {"resume": False, "postrun": postrun,
                                                     **({"track": list(track)} if track else {}),
                                                     **({"needs": needs} if needs else {})})
            ids.append(run.id)
    if start_worker:
        lanes.ensure_worker(settings, lane=lanes.lane_of(JobKind.TRAIN))
    return ids


def list_runs(dataset: str | int | None = None, *, settings: Settings | None = None) -> list[RunInfo]:
    settings, sf = service_context(settings)
    with sf() as s:
        stmt = select(Run).order_by(Run.id)
        if dataset is not None:
            ds = repo.get_dataset_by_name_or_id(s, dataset)
            if ds is None:
                raise RunError(f"No dataset named {dataset!r}.")
            stmt = stmt.where(Run.dataset_id == ds.id)
        return [_info(s, r, settings) for r in s.scalars(stmt).all()]


def get_run(run_id: int, *, settings: Settings | None = None) -> RunInfo:
    settings, sf = service_context(settings)
    with sf() as s:
        run = s.get(Run, run_id)
        if run is None:
            raise RunError(f"No run with id {run_id}.")
        return _info(s, run, settings)


def cancel_run(run_id: int, *, settings: Settings | None = None) -> CancelOutcome:
    """Queued: cancelled at once. Running: the worker stops it within one batch. Returns the new state."""
    settings, sf = service_context(settings)
    with sf.begin() as s:
        run = s.get(Run, run_id)
        if run is None:
            raise RunError(f"No run with id {run_id}.")
        if run.status == RunStatus.QUEUED:
            run.status, run.finished_at = RunStatus.CANCELLED, utcnow()
            for job in s.scalars(select(Job).where(Job.run_id == run_id, Job.status == JobStatus.QUEUED)):
                job.status, job.finished_at = JobStatus.CANCELLED, utcnow()
            s.add(RunEvent(run_id=run_id, message="Cancelled before it started.", level="info", created_at=utcnow()))
            return CancelOutcome.CANCELLED
        if run.status == RunStatus.RUNNING:
            run.cancel_requested = True
            s.add(RunEvent(run_id=run_id, message="Cancel requested.", level="info", created_at=utcnow()))
            return CancelOutcome.CANCELLING
        if run.status == RunStatus.VERIFYING:
            raise RunError(f"Run {run_id} has finished training and is checking its exported model; this "
                           "cannot be cancelled and takes a few minutes. Delete the run afterwards if you do "
                           "not want it.")
        raise RunError(f"Run {run_id} is {run.status}; only queued or running runs can be cancelled.")


def resume_run(run_id: int, *, settings: Settings | None = None, start_worker: bool = True,
               processes: int | None = None) -> int:
    """Queue a failed/cancelled run again; it continues from its last checkpoint. Returns the job id.

    ``processes``: continue with this many data-parallel processes (checkpoints do not depend on it).

    A run still marked running whose worker died is failed by ``worker.reconcile`` (the CLI and
    the pages call it before offering resume).
    """
    settings, sf = service_context(settings)
    with sf.begin() as s:
        run = s.get(Run, run_id)
        if run is None:
            raise RunError(f"No run with id {run_id}.")
        if run.status not in RESUMABLE_RUN:
            raise RunError(f"Run {run_id} is {run.status}; only failed or cancelled runs can be resumed.")
        if processes is not None:
            if processes < 1:
                raise RunError(f"The number of processes must be 1 or more, got {processes}.")
            run.config = {**(run.config or {}), "processes": processes}
        job_id = queue_resume(s, run, settings).id
    if start_worker:
        lanes.ensure_worker(settings, lane=lanes.lane_of(JobKind.TRAIN))
    return job_id


def queue_resume(s: Session, run: Run, settings: Settings, *, note: str = "",
                 payload: dict[str, Any] | None = None) -> Job:
    """Inside the caller's transaction: mark the run queued and queue the job that continues it
    from its last checkpoint (what ``workbench resume`` does; the automatic resume too).

    ``note`` goes before the event's usual sentence; ``payload`` is added to the job's.
    """
    last = RunPaths(settings, run.id).last_checkpoint
    # A run whose worker died while verifying has its trained model (only a finished training
    # records checkpoint_path): resume re-runs the export, verification and evaluation only.
    verify_only = run.checkpoint_path is not None and run.best_metrics is not None
    run.status, run.error, run.cancel_requested, run.finished_at = RunStatus.QUEUED, None, False, None
    message = ("Resume queued: training had finished, so only the export, verification and evaluation run "
               "again." if verify_only else "Resume queued" + (" from the last checkpoint." if last.is_file()
                                                               else " (no checkpoint yet: starts over)."))
    s.add(RunEvent(run_id=run.id, created_at=utcnow(), level="info", message=note + message))
    needs = workers.training_needs(run.config or {})
    return jobs.enqueue(s, JobKind.TRAIN, run.id, {"resume": True, "postrun": True, "verify_only": verify_only,
                                                   **({"needs": needs} if needs else {}), **(payload or {})})


@dataclass(frozen=True)
class EpochMetrics:
    epoch: int
    phase: str
    values: dict[str, Any]  # val_accuracy, val_macro_f1, val_loss, train_loss, lr, seconds...


@dataclass(frozen=True)
class RunEventInfo:
    id: int
    created_at: datetime
    level: str
    message: str
    data: dict[str, Any] | None


def run_metrics(run_id: int, *, settings: Settings | None = None) -> list[EpochMetrics]:
    """The run's per-epoch validation metrics, in epoch order."""
    settings, sf = service_context(settings)
    with sf() as s:
        rows = s.scalars(select(RunMetric).where(RunMetric.run_id == run_id).order_by(RunMetric.epoch)).all()
        return [EpochMetrics(r.epoch, r.phase, dict(r.metrics or {})) for r in rows]


def run_events(run_id: int, since_id: int = 0, *, newest: int | None = None,
               settings: Settings | None = None) -> list[RunEventInfo]:
    """Events newer than ``since_id`` (poll with the last id you saw), oldest first; ``newest``:
    only the last so many."""
    settings, sf = service_context(settings)
    stmt = select(RunEvent).where(RunEvent.run_id == run_id, RunEvent.id > since_id).order_by(RunEvent.id.desc())
    with sf() as s:
        rows = s.scalars(stmt.limit(newest) if newest is not None else stmt).all()
        return [RunEventInfo(e.id, e.created_at, e.level, e.message, e.data) for e in reversed(rows)]


def last_checkpoint_epoch(s: Session, run: Run) -> int | None:
    """Epoch of the last checkpoint (metrics are written right after it), None if none yet."""
    return s.scalar(select(func.max(RunMetric.epoch)).where(RunMetric.run_id == run.id))




@dataclass(frozen=True)
class DeletedRun:
    run_id: int
    files_removed: int
    run_dir_removed: bool


def _remove_tree(settings: Settings, folder: Any) -> bool:
    folder = folder.resolve()
    if folder.is_dir() and settings.data_dir.resolve() in folder.parents:  # never outside the data dir
        shutil.rmtree(folder)
        return True
    return False


def delete_run(run_id: int, *, settings: Settings | None = None) -> DeletedRun:
    """Delete a run: its folder (checkpoints, evaluations, exports), every artifact file it
    registered, and its rows (evaluations, artifacts, metrics, events, jobs cascade)."""
    settings, sf = service_context(settings)
    removed = 0
    with sf.begin() as s:
        run = s.get(Run, run_id)
        if run is None:
            raise RunError(f"No run with id {run_id}.")
        if run.status in ACTIVE_RUN:
            raise RunError(f"Run {run_id} is {run.status}: cancel it before deleting it.")
        paths = [a.path for a in repo.artifacts_for_run(s, run_id)]
        if run.checkpoint_path:
            paths.append(run.checkpoint_path)
        for rel in paths:
            try:
                p = resolve_in_data_dir(rel, settings.data_dir)
            except ArtifactError:
                continue  # never delete outside the data dir
            if p.is_file():
                p.unlink()
                removed += 1
        s.execute(delete(Artifact).where(Artifact.run_id == run_id))
        s.execute(delete(Run).where(Run.id == run_id))
    paths_ = RunPaths(settings, run_id)
    gone = [_remove_tree(settings, d) for d in (paths_.root, paths_.legacy_root)]
    return DeletedRun(run_id, removed, any(gone))
