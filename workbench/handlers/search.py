"""The ``search`` job handler: one worker's share of an Auto search, then (once) its finish.

Every trial is an ordinary run (``Run.search_id``, ``Run.trial_number``) trained by
``core.search`` with the train handler's ``DbCallback``, so it has metrics, events, checkpoints
and can be resumed or deleted like any run. Several search jobs (on one or several workers)
share one Optuna study in the database; the first to run out of time claims the finish
(``finalizing``): the finalists are exported, verified, timed and tested (the test split is
touched for them alone), and the winner's bundle is built.
"""
from __future__ import annotations

import os
import time
import traceback
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from core.recommend import Budget
from core.search import (
    Objective,
    SearchCallback,
    SearchData,
    SearchLoop,
    SearchRules,
    TrialOutcome,
    TrialPlan,
    TrialPoint,
    choose_finalists,
    fail_stale_trials,
    finalize_reserve_seconds,
    open_study,
    pareto_front,
    trial_epochs,
    validation_noise,
)
from core.status import TrialState
from core.train import Callback, FeatureStore
from storage import repositories as repo
from storage.models import Job, Run, Search, utcnow
from workbench import exports, searches
from workbench.handlers.postrun import after_training
from workbench.handlers.train import DbCallback, record_success, samples_of
from workbench.handlers.train import on_orphan as train_on_orphan
from workbench.jobs import JobContext, JobOutcome
from workbench.paths import RunPaths
from workbench.search_clock import close_sitting, open_sitting
from workbench.search_plan import SearchPlan, SearchRequestError, plan_search, stored_plan
from workbench.status import ACTIVE_SEARCH, JobStatus, RunStatus, SearchStatus
from workbench.summary import (
    FinalistTest,
    VersusStart,
    WinnerLatency,
    merge_search_summary,
    merge_summary,
    read_search_summary,
)

OTHERS_WAIT_S = 120.0  # how long the finishing worker waits for the others' last trials


@dataclass(frozen=True, kw_only=True)
class SearchSetup:
    """What one worker's share of a sitting runs with."""

    search_id: int
    dataset_id: int
    study_name: str
    plan: SearchPlan  # the one stored when the search was queued
    rules: SearchRules
    data: SearchData


class _Trials(SearchCallback):
    """Trials as runs in the database; the search's progress on its job; stop on cancel."""

    POLL_S = 1.0

    def __init__(self, ctx: JobContext, search_id: int, dataset_id: int):
        self.ctx, self.search_id, self.dataset_id = ctx, search_id, dataset_id
        self.sf = ctx.session_factory
        self.run_ids: dict[int, int] = {}  # trial number -> run id
        self._last_poll, self._stop, self._running = 0.0, False, True

    def on_trial_start(self, plan: TrialPlan) -> tuple[Path, Callback]:
        choice = plan.choice
        with self.sf.begin() as s:
            run = Run(dataset_id=self.dataset_id, variant=choice.variant, resolution=choice.resolution,
                      preset=plan.config.augment, status=RunStatus.RUNNING, config=asdict(plan.config),
                      search_id=self.search_id, trial_number=plan.number, batch_label=f"Auto search {self.search_id}",
                      created_at=utcnow(), started_at=utcnow(), worker_pid=os.getpid(),
                      summary={"search_params": plan.params, "target_latency_ms": choice.latency_p50_ms,
                               "target_latency_source": choice.latency_source,
                               "starting_point": plan.starting_point})
            s.add(run)
            s.flush()
            # The job points at the trial it trains, so reconcile's orphan hook finds it if we die.
            job = s.get(Job, self.ctx.job_id)
            if job is not None:
                job.run_id = run.id
            self.run_ids[plan.number] = run.id
        trial_ctx = replace(self.ctx, run_id=self.run_ids[plan.number])
        trial_ctx.event(f"Trial {plan.number} of Auto search {self.search_id}: {choice.key}, "
                        f"{plan.config.augment} augmentation, {plan.config.unfreeze_stages} stage(s) unfrozen.",
                        data={"params": plan.params})
        return RunPaths(self.ctx.settings, self.run_ids[plan.number]).root, DbCallback(trial_ctx, trial_ctx.run_id or 0)

    def on_trial_end(self, plan: TrialPlan, outcome: TrialOutcome) -> None:
        run_id = self.run_ids[plan.number]
        trial_ctx = replace(self.ctx, run_id=run_id)
        if outcome.state == TrialState.COMPLETE and outcome.result is not None:
            record_success(trial_ctx, run_id, outcome.result)
            trial_ctx.event(f"Trial {plan.number} finished: validation {outcome.value:.3f} in {outcome.seconds:.0f} s.")
        status, message = {
            TrialState.COMPLETE: (RunStatus.SUCCEEDED, None),
            TrialState.PRUNED: (RunStatus.PRUNED, "Stopped early: this trial was unlikely to beat the best ones "
                                                  "so far (resume trains it to the end)."),
            TrialState.STOPPED: (RunStatus.CANCELLED, "Stopped when the search's time ran out or the search was "
                                                      "stopped; resume continues from the last checkpoint."),
            TrialState.FAILED: (RunStatus.FAILED, f"Trial failed: {outcome.error}"),
        }[outcome.state]
        with self.sf.begin() as s:
            run = s.get(Run, run_id)
            assert run is not None
            run.status, run.finished_at = status, utcnow()
            run.error = message if status == RunStatus.FAILED else None
            run.train_seconds = run.train_seconds or round(outcome.seconds, 2)
            fields: dict[str, Any] = {"objective_value": outcome.value} if outcome.value is not None else {}
            if outcome.result is not None:
                fields["cache_reused"] = bool(outcome.result.summary.get("cache_reused", False))
            merge_summary(run, fields)  # type: ignore[arg-type]
        if message and status != RunStatus.FAILED:
            trial_ctx.event(message)
        self.ctx.progress({"phase": "search", "message": f"trial {plan.number} {outcome.state}",
                           "trial": plan.number})

    def on_log(self, message: str, level: str = "info") -> None:
        searches_event(self.sf, self.search_id, message, level)

    def _poll(self) -> None:
        now = time.monotonic()
        if now - self._last_poll >= self.POLL_S:
            self._last_poll = now
            with self.sf() as s:
                row = s.get(Search, self.search_id)
                self._stop = row is None or bool(row.cancel_requested) or row.status not in ACTIVE_SEARCH
                self._running = row is not None and row.status == SearchStatus.RUNNING

    def should_stop(self) -> bool:
        if self._stop or self.ctx.stop_requested():
            return True
        self._poll()
        return self._stop

    def may_start_trial(self) -> bool:
        """No new trial once another worker has begun the finish (its current one runs to its end)."""
        self._last_poll = 0.0
        self._poll()
        return self._running


def searches_event(sf: Any, search_id: int, message: str, level: str = "info") -> None:
    """A line in the search's log (kept in its summary: a search has no run of its own)."""
    with sf.begin() as s:
        row = s.get(Search, search_id)
        if row is not None:
            log = read_search_summary(row).get("log", [])[-199:]
            merge_search_summary(row, {"log": [*log, {"at": utcnow().isoformat(timespec="seconds"), "level": level,
                                                      "message": message}]})


# ---------------------------------------------------------------------------------------------
# Start: mark running, read what the trials need
# ---------------------------------------------------------------------------------------------
def begin_sitting(ctx: JobContext, search_id: int) -> SearchSetup | JobOutcome:
    """Mark the search running, start (or join) its sitting's clock, read its stored plan."""
    with ctx.session_factory.begin() as s:
        row = s.get(Search, search_id)
        if row is None:
            return JobOutcome(JobStatus.FAILED, f"search {search_id} no longer exists")
        if row.cancel_requested or row.status in (SearchStatus.CANCELLED, SearchStatus.SUCCEEDED):
            return JobOutcome(JobStatus.CANCELLED)
        if row.status == SearchStatus.FINALIZING:  # another worker is finishing it: nothing left to do
            return JobOutcome(JobStatus.SUCCEEDED)
        ds = row.dataset
        try:
            plan = stored_plan(row) or _plan_now(s, row)
        except SearchRequestError as exc:
            row.status, row.error, row.finished_at = SearchStatus.FAILED, str(exc), utcnow()
            return JobOutcome(JobStatus.FAILED, str(exc))
        row.status, row.started_at, row.error = SearchStatus.RUNNING, row.started_at or utcnow(), None
        clock = open_sitting(row, lambda left: finalize_reserve_seconds(left, plan.num_test, plan.fastest_ms))
        rules = SearchRules(space=plan.space, objective=Objective.parse(row.objective), seed=row.seed,
                            deadline=clock.trial_deadline(), max_trials=row.max_trials,
                            epochs=trial_epochs(clock.budget_s))
        data = SearchData(samples=samples_of(s, ds, ctx.settings, "train"),
                          val=samples_of(s, ds, ctx.settings, "val"), classes=list(ds.classes),
                          imbalance_ratio=plan.imbalance_ratio)
        return SearchSetup(search_id=search_id, dataset_id=ds.id, study_name=row.study_name, plan=plan, rules=rules,
                           data=data)


def _plan_now(s: Session, row: Search) -> SearchPlan:
    """A search queued before plans were stored (0006_search_state): its plan, stored now, once."""
    _, plan = plan_search(s, row.dataset, Budget.from_dict(row.budget))
    row.plan = plan.to_dict()
    return plan


def _trial_is_live(sf: Any, search_id: int, trial: Any, my_job: int) -> bool:
    """A trial is live while its run trains, or (no run yet) while the job that asked for it runs."""
    with sf() as s:
        status = s.scalar(select(Run.status).where(Run.search_id == search_id, Run.trial_number == trial.number))
        if status is not None:
            return status == RunStatus.RUNNING
        owner = str(trial.user_attrs.get("owner", ""))
        job = s.get(Job, int(owner)) if owner.isdigit() else None
        return job is not None and job.id != my_job and job.status == JobStatus.RUNNING


def handle_search(ctx: JobContext) -> JobOutcome:
    search_id = int(ctx.payload["search_id"])
    setup = begin_sitting(ctx, search_id)
    if isinstance(setup, JobOutcome):
        return setup
    sf = ctx.session_factory
    study = open_study(ctx.settings.database_url, setup.study_name, setup.rules.seed)
    stale = fail_stale_trials(study, lambda t: _trial_is_live(sf, search_id, t, ctx.job_id))
    if stale:
        searches_event(sf, search_id, f"Trial(s) {', '.join(map(str, stale))} were cut off when a worker stopped: "
                                      "marked failed; their settings are tried again first.", "warning")
    trials = _Trials(ctx, search_id, setup.dataset_id)
    store = FeatureStore()
    loop = SearchLoop(study=study, rules=setup.rules, data=setup.data, owner=str(ctx.job_id), store=store)
    try:
        loop.run(trials)
    except Exception as exc:  # noqa: BLE001 - record, the search stays resumable
        _end_sitting(sf, search_id, SearchStatus.FAILED, f"The search crashed: {type(exc).__name__}: {exc}",
                     {"traceback": traceback.format_exc()[-4000:]})
        return JobOutcome(JobStatus.FAILED, str(exc))
    _add_store_stats(sf, search_id, store)
    with sf() as s:
        row = s.get(Search, search_id)
        cancelled = row is None or bool(row.cancel_requested)
    if cancelled:
        _end_sitting(sf, search_id, SearchStatus.CANCELLED, None)
        return JobOutcome(JobStatus.CANCELLED)
    if ctx.stop_requested():
        _leave(sf, search_id, ctx.job_id)
        return JobOutcome(JobStatus.FAILED, "worker stopped")
    if not _claim_finish(sf, search_id):
        return JobOutcome(JobStatus.SUCCEEDED)  # another worker finishes this search
    _wait_for_others(sf, search_id, ctx.job_id)
    return finalize(ctx, search_id)


def _add_store_stats(sf: Any, search_id: int, store: FeatureStore) -> None:
    with sf.begin() as s:
        row = s.get(Search, search_id)
        if row is not None:
            old = read_search_summary(row).get("cache", {})
            new = store.stats.to_dict()
            merge_search_summary(row, {"cache": {k: round(old.get(k, 0) + v, 2) for k, v in new.items()}})


def _claim_finish(sf: Any, search_id: int) -> bool:
    """One worker only moves the search from running to finalizing."""
    with sf.begin() as s:
        done = s.execute(update(Search).where(Search.id == search_id, Search.status == SearchStatus.RUNNING)
                         .values(status=SearchStatus.FINALIZING))
        return bool(done.rowcount)


def _wait_for_others(sf: Any, search_id: int, job_id: int) -> None:
    deadline = time.monotonic() + OTHERS_WAIT_S
    while time.monotonic() < deadline:
        with sf() as s:
            others = [j for j in searches.search_jobs(s, search_id) if j.id != job_id]
        if not others:
            return
        time.sleep(1.0)


def _leave(sf: Any, search_id: int, job_id: int) -> None:
    """This worker was stopped. The last worker of the search ends its sitting (failed, resumable);
    while others still run trials, or one of them is finishing, the search goes on without it."""
    with sf.begin() as s:
        row = s.get(Search, search_id)
        others = [j for j in searches.search_jobs(s, search_id, {JobStatus.RUNNING}) if j.id != job_id]
        if row is not None and row.status == SearchStatus.RUNNING and not others:
            close_sitting(row, SearchStatus.FAILED, "The worker was stopped; resume continues with the time left.")
            return
    searches_event(sf, search_id, "A worker was stopped; the search goes on with the others.", "warning")


def _end_sitting(sf: Any, search_id: int, status: SearchStatus, error: str | None,
                 data: dict[str, Any] | None = None, **fields: Any) -> None:
    """Close the search's sitting: count its wall time, set the state."""
    with sf.begin() as s:
        row = s.get(Search, search_id)
        if row is None:
            return
        close_sitting(row, status, error)
        if data:
            merge_search_summary(row, {"error_detail": data})
        for k, v in fields.items():
            setattr(row, k, v)


# ---------------------------------------------------------------------------------------------
# Finish: finalists tested, the winner's latency on the target, its bundle
# ---------------------------------------------------------------------------------------------
def _points(s: Session, search_id: int) -> list[TrialPoint]:
    rows = s.scalars(select(Run).where(Run.search_id == search_id, Run.status == RunStatus.SUCCEEDED)).all()
    return [TrialPoint(r.id, float(r.summary["objective_value"]), float(r.summary["target_latency_ms"]))
            for r in rows if r.summary and r.summary.get("objective_value") is not None]


def _versus_start(s: Session, row: Search, winner: TrialPoint) -> VersusStart | None:
    """The winner against the first trial (what plain training gives) on validation, with how far
    chance alone moves a score on that many images: a small validation split can crown a
    challenger that is no better (bench/results_selection.md)."""
    done = s.scalars(select(Run).where(Run.search_id == row.id, Run.status == RunStatus.SUCCEEDED)).all()
    starts = [(float(r.summary["objective_value"]), r) for r in done
              if r.summary and r.summary.get("starting_point") and r.summary.get("objective_value") is not None]
    if not starts:
        return None
    value, start = max(starts, key=lambda vr: vr[0])
    labels = [im.label for im in repo.images_for_dataset(s, row.dataset_id, "val")]
    if Objective.parse(row.objective).metric != "macro_f1":  # sensitivity is measured on the positives alone
        positive = row.dataset.classes[int((start.config or {}).get("positive_index", 1))]
        labels = [lb for lb in labels if lb == positive]
    return VersusStart(run_id=start.id, value=value, winner_value=winner.value, images=len(labels),
                       noise=validation_noise(value, len(labels)))


def finalize(ctx: JobContext, search_id: int) -> JobOutcome:
    sf = ctx.session_factory
    t0 = time.perf_counter()
    with sf() as s:
        row = s.get(Search, search_id)
        assert row is not None
        points, device, precision = _points(s, search_id), row.device, Budget.from_dict(row.budget).precision
        longest = s.scalar(select(Run.train_seconds).where(Run.search_id == search_id)
                           .order_by(Run.train_seconds.desc()).limit(1))
    winner, finalists = choose_finalists(points)
    if winner is None:
        msg = ("No trial finished within the time budget" + (f" (the longest ran {longest:.0f} s)" if longest else "")
               + ". Resume the search with more time, e.g. `workbench auto --resume "
               f"{search_id} --time 10m`.")
        _end_sitting(sf, search_id, SearchStatus.FAILED, msg)
        return JobOutcome(JobStatus.FAILED, msg)
    try:
        return _finish(ctx, search_id, winner, finalists, points, device, precision, t0)
    except Exception as exc:  # noqa: BLE001 - the trials are kept; the finish can be retried by resuming
        msg = f"Testing the finalists or building the bundle failed: {type(exc).__name__}: {exc}"
        _end_sitting(sf, search_id, SearchStatus.FAILED, msg, {"traceback": traceback.format_exc()[-4000:]})
        return JobOutcome(JobStatus.FAILED, msg)


def _finish(ctx: JobContext, search_id: int, winner: TrialPoint, finalists: list[TrialPoint],
            points: list[TrialPoint], device: str, precision: str, t0: float) -> JobOutcome:
    sf, settings = ctx.session_factory, ctx.settings
    tested: dict[int, FinalistTest] = {}
    for i, f in enumerate(finalists):
        ctx.progress({"phase": "finalize", "message": f"testing finalist {i + 1} of {len(finalists)} (run {f.key})",
                      "fraction": i / (len(finalists) + 1)})
        out = after_training(sf, settings, int(f.key))
        tested[int(f.key)] = FinalistTest(test_accuracy=out.summary.get("test_accuracy"),
                                          test_macro_f1=out.summary.get("test_macro_f1"),
                                          latency_here_ms=out.summary.get("latency_ms_p50"))
    ctx.progress({"phase": "finalize", "message": "building the winner's bundle", "fraction": 0.9})
    bundle = exports.export_run(int(winner.key), fp16=precision == "fp16", int8=precision == "int8",
                                settings=settings, session_factory=sf)
    here = tested[int(winner.key)]["latency_here_ms"]
    if device == "this-machine" and here is not None:
        winner_latency = WinnerLatency(p50_ms=here, source="measured on this machine after training")
    else:
        winner_latency = WinnerLatency(p50_ms=winner.latency_ms, source=f"predicted for {device}")
    with sf.begin() as s:
        for rid, fields in tested.items():
            run = s.get(Run, rid)
            measured = fields["latency_here_ms"]
            if run is not None and device == "this-machine" and measured is not None:
                merge_summary(run, {"target_latency_ms": measured,
                                    "target_latency_source": "measured on this machine"})
        row = s.get(Search, search_id)
        assert row is not None
        merge_search_summary(row, {
            "winner_run_id": int(winner.key), "finalists": [int(f.key) for f in finalists],
            "pareto": [int(p.key) for p in pareto_front(points)], "tested": {str(k): v for k, v in tested.items()},
            "versus_start": _versus_start(s, row, winner), "winner_latency": winner_latency,
            "finalize_seconds": round(time.perf_counter() - t0, 1)})
    _end_sitting(sf, search_id, SearchStatus.SUCCEEDED, None, winner_run_id=int(winner.key),
                 bundle_artifact_id=bundle.bundle_artifact_id)
    return JobOutcome(JobStatus.SUCCEEDED)


def on_orphan(s: Session, run_id: int | None, pid: int | None) -> None:
    """Inside reconcile's transaction: the worker died mid-search. Its trial's run becomes failed
    and resumable (as a training run's would); the search becomes failed and resumable, unless
    another worker still runs it."""
    run = s.get(Run, run_id) if run_id is not None else None
    if run is not None:
        train_on_orphan(s, run_id, pid)
    search = s.get(Search, run.search_id) if run is not None and run.search_id else None
    if search is None:
        return
    if not [j for j in searches.search_jobs(s, search.id) if j.status == JobStatus.RUNNING and j.run_id != run_id]:
        close_sitting(search, SearchStatus.FAILED, f"The worker (pid {pid}) died during the search; resume continues "
                                                   "with the time left.")
