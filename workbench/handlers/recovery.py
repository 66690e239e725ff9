"""A training run whose worker died on another host (its lease ran out) resumes by itself.

``worker.reconcile`` (run by every live worker, on every host) finds the job, fails it and
calls :func:`on_lease_lost` in the same transaction, so only one host acts on it: the run is
queued again from its last checkpoint, the way ``workbench resume`` does it
(``runs.queue_resume``), and any live worker that fits the job takes it. At most
``WORKBENCH_AUTO_RESUMES`` times in a row (default 2): after that the run fails as it did
before, for a person to resume, since a run that keeps killing its worker would loop. Each loss
is kept on the run (``RunSummary.worker_losses``) and the worker that takes the resume adds its
host (:func:`note_resumed`); ``workbench runs`` and the Train page show that history.
"""
from __future__ import annotations

from sqlalchemy.orm import Session

from storage.models import Job, Run, RunEvent, utcnow
from workbench.runs import last_checkpoint_epoch, queue_resume
from workbench.status import RunStatus
from workbench.summary import WorkerLoss, merge_summary, read_summary, worker_loss_head
from workbench.workers import LostWorker

# A run is also left queued when its worker died between the claim and the run's start.
_LOSABLE = (RunStatus.QUEUED, RunStatus.RUNNING, RunStatus.VERIFYING)


def _resumed_in_a_row(losses: list[WorkerLoss]) -> int:
    """Automatic resumes since the run last gave up (a person's resume starts the count again)."""
    n = 0
    for loss in reversed(losses):
        if not loss.get("auto_resume"):
            break
        n += 1
    return n


def on_lease_lost(s: Session, lost: LostWorker) -> None:
    """Inside reconcile's transaction: queue the run's resume, or fail it once the limit is reached."""
    run = s.get(Run, lost.run_id) if lost.run_id is not None else None
    if run is None or run.status not in _LOSABLE:
        return
    verifying = run.status == RunStatus.VERIFYING
    epoch = None if verifying else last_checkpoint_epoch(s, run)
    limit = lost.settings.auto_resumes
    losses = list(read_summary(run).get("worker_losses", []))
    n = _resumed_in_a_row(losses) + 1
    loss = WorkerLoss(at=utcnow().isoformat(timespec="seconds"), host=lost.host_id, pid=lost.pid, epoch=epoch,
                      after_training=verifying, auto_resume=n if n <= limit else 0, limit=limit)
    merge_summary(run, {"worker_losses": [*losses, loss]})
    head = "W" + worker_loss_head(loss)[1:] + " (its lease ran out)"  # not capitalize(): host names keep case
    if n <= limit:
        dead = s.get(Job, lost.job_id)
        # What the person asked for when queueing it (post-run steps, trackers) still holds.
        kept = {k: v for k, v in (dead.payload or {}).items() if k in ("postrun", "track")} if dead else {}
        queue_resume(s, run, lost.settings, note=f"{head}: resuming automatically ({n} of {limit}). ",
                     payload={**kept, "auto_resume": n})
        return
    why = (f"it was already resumed automatically {limit} time{'s' if limit != 1 else ''} in a row"
           if limit else "automatic resume is off") + f" (WORKBENCH_AUTO_RESUMES={limit})"
    run.status, run.finished_at = RunStatus.FAILED, utcnow()
    run.error = (f"Worker died: {head}, and {why}. "
                 + ("Resume re-runs only the export, verification and evaluation." if verifying
                    else f"Resume from the checkpoint after epoch {epoch}." if epoch is not None
                    else "No checkpoint was written yet: resume restarts it."))
    s.add(RunEvent(run_id=run.id, level="error", message=run.error, created_at=utcnow(),
                   data={"resumable": True, "checkpoint_epoch": epoch, "verify_only": verifying}))


def note_resumed(s: Session, run: Run, host_id: str) -> None:
    """Inside the resumed job's start: the host that took the automatic resume, on the run's history."""
    losses = list(read_summary(run).get("worker_losses", []))
    if not losses or losses[-1].get("resumed_on"):
        return
    losses[-1] = WorkerLoss(**{**losses[-1], "resumed_on": host_id})
    merge_summary(run, {"worker_losses": losses})
    s.add(RunEvent(run_id=run.id, level="info", created_at=utcnow(),
                   message=f"Resumed on host {host_id}: the {worker_loss_head(losses[-1])}."))
