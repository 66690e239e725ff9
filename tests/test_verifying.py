"""A truthful finish: a run is ``verifying`` from the end of training until its export,
verification and evaluation are done, then ``succeeded`` with metrics; the ETA is smoothed.

The smoother is pure arithmetic fed synthetic clock readings (no sleeps). The run is a real
tiny training (generated colour images, lite0 at 64 px, real SQLite) run by the train handler
in this process, with a JobContext that also notes the run's status at every progress report.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from builders import create_dataset_rows

from core.train.runner import EtaSmoother

TINY = dict(head_epochs=2, finetune_epochs=1, unfreeze_stages=1, cache_views=1, batch_size=8, head_batch_size=16,
            num_threads=1, patience=10)


# --- the smoother ------------------------------------------------------------------------------
def _feed(smoother: EtaSmoother, step_seconds: list[float], total: float) -> list[float | None]:
    now, out = 0.0, [smoother.update(0.0, 0, total)]
    for i, dt in enumerate(step_seconds, start=1):
        now += dt
        out.append(smoother.update(now, i, total))
    return out


def test_a_slow_step_does_not_make_the_eta_jump() -> None:
    etas = _feed(EtaSmoother(alpha=0.2), [1.0] * 5 + [9.0] + [1.0] * 4, total=100)
    assert etas[0] is None and etas[1] == pytest.approx(99.0)  # the first pace: 1 s per step
    later = [e for e in etas[1:] if e is not None]
    assert len(later) == 10 and all(b < a for a, b in zip(later, later[1:]))  # same plan: counts down
    # A raw per-step estimate would jump to 9 s x 94 steps = 846 s; the smoothed one keeps counting down.
    assert etas[6] == pytest.approx(etas[5] - 1.0)


def test_faster_pace_lowers_the_eta_at_once_and_follows_a_lasting_change() -> None:
    s = EtaSmoother(alpha=0.5)
    etas = _feed(s, [2.0] * 4 + [1.0] * 6, total=50)
    assert etas[5] is not None and etas[4] is not None and etas[5] < etas[4]
    assert s.seconds_per_unit == pytest.approx(1.0, abs=0.05)  # converged on the new pace
    assert etas[-1] == pytest.approx(40 * s.seconds_per_unit)


def test_eta_grows_only_by_the_work_that_was_added() -> None:
    s = EtaSmoother(alpha=0.2)
    _feed(s, [1.0] * 10, total=20)
    before = s.eta_s
    assert before == pytest.approx(10.0)
    # Ten more steps planned (e.g. a phase added): at most 10 x the pace more, and no more.
    grown = s.update(10.5, 10, 30)
    assert grown is not None and grown <= before + 10 * s.seconds_per_unit + 1e-9
    assert grown == pytest.approx(20.0)
    # A stalled report (no work done) with the same plan never raises it.
    assert s.update(30.0, 10, 30) == pytest.approx(grown)


def test_a_seeded_estimate_counts_down_with_the_work_even_when_too_low() -> None:
    s = EtaSmoother(alpha=0.2)
    assert s.seed(0.0, 0.0, 1.0, 10.0) == pytest.approx(10.0)  # estimated: 10 s for the whole job
    etas = [s.update(t, f, 1.0) for t, f in ((10.0, 0.1), (20.0, 0.2), (30.0, 0.3))]  # really 100 s
    assert etas[0] == pytest.approx(9.0) and all(e is not None and e > 0 for e in etas)
    assert all(b < a for a, b in zip(etas, etas[1:]))


def test_smoother_refuses_a_nonsense_weight() -> None:
    with pytest.raises(ValueError, match=r"alpha must be in \(0, 1\]"):
        EtaSmoother(alpha=0.0)


def test_verification_estimate_grows_with_the_test_split() -> None:
    from workbench.handlers.postrun import verify_estimate_s

    small, big = verify_estimate_s(10, 10, 224), verify_estimate_s(1000, 10, 224)
    assert 10.0 < small < big and verify_estimate_s(1000, 10, 112) < big


# --- a real run ------------------------------------------------------------------------------
@dataclass
class _Observed:
    reports: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # (run status, progress)


def _context(sf, settings, job_id: int, run_id: int, payload: dict[str, Any], seen: _Observed):
    from storage.models import Run
    from workbench.jobs import JobContext

    class Observing(JobContext):
        def progress(self, snapshot: dict[str, Any]) -> None:
            with sf() as s:
                seen.reports.append((str(s.get(Run, run_id).status), dict(snapshot)))
            super().progress(snapshot)

    return Observing(job_id, "train", run_id, payload, sf, settings)


def _queued_job(sf, run_id: int):
    from sqlalchemy import select

    from storage.models import Job

    with sf() as s:
        job = s.scalars(select(Job).where(Job.run_id == run_id).order_by(Job.id.desc())).first()
        return job.id, dict(job.payload)


def test_a_real_run_is_verifying_before_it_succeeds(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sqlalchemy import update

    from storage.db import get_sessionmaker
    from storage.models import Image, Run, RunMetric
    from workbench import jobs, runs
    from workbench.handlers.train import DbCallback, handle_train, on_orphan

    # Every progress report, not one a second: a fast machine finishes this tiny run within the throttle.
    monkeypatch.setattr(DbCallback, "PROGRESS_EVERY_S", 0.0)
    from workbench.settings import get_settings
    from workbench.status import ACTIVE_RUN, JobStatus, RunStatus

    settings = get_settings()
    sf = get_sessionmaker(settings.database_url)
    ds = create_dataset_rows(data_dir, sf, "colours", [9, 9], val_per_class=3)
    with sf.begin() as s:  # three images per class become the test split
        s.execute(update(Image).where(Image.dataset_id == ds, Image.original_name.like("%/8.png")
                                      | Image.original_name.like("%/7.png") | Image.original_name.like("%/6.png"))
                  .values(split="test"))
    (run_id,) = runs.queue_training("colours", ["lite0"], resolution=64, recipe="quick", overrides=TINY,
                                    start_worker=False)
    job_id, payload = _queued_job(sf, run_id)
    seen = _Observed()
    outcome = handle_train(_context(sf, settings, job_id, run_id, payload, seen))
    jobs.finish_job(sf, job_id, outcome.status)
    assert outcome.status == JobStatus.SUCCEEDED

    statuses = [st for st, _ in seen.reports]
    verifying = [p for st, p in seen.reports if p.get("phase") == "verifying"]
    assert "running" in statuses and verifying
    assert statuses.index("verifying") > statuses.index("running")  # training first, then verifying
    assert {st for st, p in seen.reports if p.get("phase") == "verifying"} == {"verifying"}  # never succeeded early
    messages = " | ".join(p["message"] for p in verifying)
    assert "step 1 of 2" in messages and "step 2 of 2" in messages
    etas = [p["eta_s"] for p in verifying]
    assert all(b <= a + 1e-6 for a, b in zip(etas, etas[1:])), etas  # smoothed: never grows
    training_etas = [p["eta_s"] for st, p in seen.reports if p.get("eta_s") is not None and st == "running"]
    assert training_etas  # the training ETA includes the verification still to come
    info = runs.get_run(run_id)
    assert info.status == RunStatus.SUCCEEDED and info.finished_at is not None
    assert info.summary.get("test_accuracy") is not None and info.summary.get("export_verified") is True

    # The rules while verifying: not cancellable, not deletable, not resumable; active.
    with sf.begin() as s:
        s.get(Run, run_id).status = RunStatus.VERIFYING
    assert RunStatus.VERIFYING in ACTIVE_RUN
    with pytest.raises(runs.RunError, match="has finished training and is checking its exported model"):
        runs.cancel_run(run_id)
    with pytest.raises(runs.RunError, match="cancel it before deleting it"):
        runs.delete_run(run_id)
    with pytest.raises(runs.RunError, match="only failed or cancelled runs can be resumed"):
        runs.resume_run(run_id, start_worker=False)

    # The worker dies while verifying: failed (never "verifying" forever), resume re-verifies only.
    with sf.begin() as s:
        on_orphan(s, run_id, 4242)
    info = runs.get_run(run_id)
    assert info.status == RunStatus.FAILED and "while checking the trained model" in info.error and info.resumable
    with sf() as s:
        n_metrics = s.query(RunMetric).filter_by(run_id=run_id).count()
    runs.resume_run(run_id, start_worker=False)
    job_id, payload = _queued_job(sf, run_id)
    assert payload["verify_only"] is True
    seen = _Observed()
    outcome = handle_train(_context(sf, settings, job_id, run_id, payload, seen))
    jobs.finish_job(sf, job_id, outcome.status)
    assert outcome.status == JobStatus.SUCCEEDED
    assert {st for st, _ in seen.reports} == {"verifying"}  # no training this time
    with sf() as s:
        assert s.query(RunMetric).filter_by(run_id=run_id).count() == n_metrics
    assert runs.get_run(run_id).status == RunStatus.SUCCEEDED
