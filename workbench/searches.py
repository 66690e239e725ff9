"""Auto searches as a service: start, follow, cancel, resume, delete; what a page or the CLI shows.

A search is a row of ``searches`` plus one ``search`` job per worker sharing it; its trials are
ordinary runs (``Run.search_id``), resumable and deletable like any other. The searching itself
(``core.search``) runs in the train-lane worker: ``workbench.handlers.search``.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.recommend import Budget, BudgetError
from core.search import Objective, SearchError, estimate_trial_seconds, starting_point
from storage import repositories as repo
from storage.models import Job, Run, Search, utcnow
from workbench import jobs, lanes, runs
from workbench.search_clock import DEFAULT_TIME_BUDGET_MIN, SearchClock, close_sitting, time_left_s
from workbench.search_plan import SearchPlan, SearchRequestError, plan_search, stored_plan
from workbench.settings import Settings, service_context
from workbench.status import (
    ACTIVE_JOB,
    ACTIVE_SEARCH,
    RESUMABLE_SEARCH,
    CancelOutcome,
    JobKind,
    JobStatus,
    RunStatus,
    SearchStatus,
)
from workbench.summary import SearchSummary, read_search_summary


@dataclass(frozen=True)
class TrialInfo:
    run_id: int
    number: int
    model: str  # "lite0@160"
    status: str  # a RunStatus
    value: float | None  # the search's objective on validation
    val_accuracy: float | None
    latency_ms: float | None  # on the target device
    latency_source: str
    seconds: float | None
    params: dict[str, Any]
    test_accuracy: float | None  # finalists only: the test split is touched for them alone
    test_macro_f1: float | None
    test_accuracy_range: tuple[float, float] | None  # its 95 % range (the test split is small)
    finalist: bool
    winner: bool
    pareto: bool


@dataclass(frozen=True)
class StartComparison:
    """The winner against the first trial (the recommended model, default settings: plain training) on validation."""

    start_run_id: int
    winner_run_id: int
    start_value: float
    winner_value: float
    images: int  # the validation images the objective is measured on
    noise: float | None  # one standard error of the first trial's score on that many images

    @classmethod
    def from_summary(cls, summary: SearchSummary) -> StartComparison | None:
        v, winner = summary.get("versus_start"), summary.get("winner_run_id")
        return None if not v or winner is None else cls(
            int(v["run_id"]), int(winner), float(v["value"]), float(v["winner_value"]), int(v["images"]),
            None if (noise := v.get("noise")) is None else float(noise))

    @property
    def lead_points(self) -> float:
        return 100.0 * (self.winner_value - self.start_value)

    @property
    def within_noise(self) -> bool:
        """The winner leads, but by no more than chance alone moves a score on this many images."""
        return self.noise is not None and 0 < self.lead_points <= 100.0 * self.noise

    def sentence(self) -> str:
        plain = f"plain training of the recommended model (the first trial, run {self.start_run_id})"
        if self.start_run_id == self.winner_run_id:
            return ("The winner is the first trial: the recommended model trained with the default settings, as the "
                    f"Train page would train it. No other trial scored higher on the {self.images} validation images.")
        if self.lead_points <= 0:
            return f"The winner scores the same as {plain} on the validation images, and is faster."
        by = f"{self.lead_points:.1f} points" if self.lead_points >= 0.05 else "less than 0.1 point"
        lead = f"The winner scores {by} above {plain} on the {self.images} validation images"
        if self.noise is None:
            return lead + "."
        noise = f"±{100.0 * self.noise:.1f} points"
        if self.within_noise:
            return (f"{lead}. Chance alone moves a score on {self.images} images by about {noise}, so the winner may "
                    f"be no better: run {self.start_run_id} is kept if you prefer the plainer model.")
        return f"{lead}: more than the {noise} by which chance alone moves a score on {self.images} images."


@dataclass(frozen=True)
class SearchInfo:
    id: int
    dataset_id: int
    dataset: str
    status: str  # a SearchStatus
    objective: str
    objective_label: str
    device: str
    budget: dict[str, Any]
    time_budget_s: float
    spent_s: float  # earlier sittings plus the running one
    started_at: datetime | None
    finished_at: datetime | None
    error: str | None
    winner_run_id: int | None
    bundle_artifact_id: int | None
    best_run_id: int | None  # best validation objective so far
    summary: SearchSummary
    plan: SearchPlan | None  # what the search is over (None: queued before plans were stored, not yet started)
    progress: dict[str, Any] | None  # the newest search job's progress snapshot
    trials: list[TrialInfo] = field(default_factory=list)

    @property
    def versus_start(self) -> StartComparison | None:
        return StartComparison.from_summary(self.summary)

    @property
    def time_left_s(self) -> float:
        return time_left_s(self.time_budget_s, self.spent_s)

    @property
    def resumable(self) -> bool:
        return self.status in RESUMABLE_SEARCH

    @property
    def active(self) -> bool:
        return self.status in ACTIVE_SEARCH

    @property
    def queued(self) -> bool:
        return self.status == SearchStatus.QUEUED


def parse_duration(text: str | float | int) -> float:
    """Seconds from '15m', '90s', '1h', '1h30m' or a bare number of minutes."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text) * 60
    else:
        t = str(text).strip().lower().replace(" ", "")
        if re.fullmatch(r"\d+(\.\d+)?", t):
            seconds = float(t) * 60
        else:
            parts = re.findall(r"(\d+(?:\.\d+)?)(h|min|m|s)", t)
            if not parts or "".join(n + u for n, u in parts) != t:
                raise SearchRequestError(f"Cannot read the time {text!r}: write it like 10m, 90s or 1h30m.")
            seconds = sum(float(n) * {"h": 3600, "min": 60, "m": 60, "s": 1}[u] for n, u in parts)
    if not math.isfinite(seconds) or seconds <= 0:
        raise SearchRequestError(f"The time budget must be more than zero, got {text!r}.")
    return seconds


def minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


# ---------------------------------------------------------------------------------------------
# Checks before anything is queued
# ---------------------------------------------------------------------------------------------
def _here_ms(space_keys: list[str]) -> float:
    """Predicted batch-1 latency of the cheapest candidate on this machine (for time estimates)."""
    from core.recommend import recommend

    rec = recommend(Budget(device="this-machine"), candidates=space_keys)
    return min(c.latency_p50_ms for c in (*rec.ranked, *rec.excluded))


def start_search(dataset: str | int, *, device: str = "this-machine", latency_ms: float | None = None,
                 latency_p95_ms: float | None = None, memory_mb: float | None = None, size_mb: float | None = None,
                 precision: str = "fp32", time_budget: str | float = DEFAULT_TIME_BUDGET_MIN,
                 objective: str = "macro-f1", seed: int = 0, max_trials: int | None = None, workers: int = 1,
                 settings: Settings | None = None, start_worker: bool = True) -> SearchInfo:
    """Check everything, then queue a search (one job per worker); SearchRequestError says why not."""
    settings, sf = service_context(settings)
    seconds = parse_duration(time_budget)
    if workers < 1 or (max_trials is not None and max_trials < 1):
        raise SearchRequestError("workers and the number of trials must be at least 1.")
    try:
        budget = Budget(device=device, latency_ms=latency_ms, latency_p95_ms=latency_p95_ms, memory_mb=memory_mb,
                        size_mb=size_mb, precision=precision)
        goal = Objective.parse(objective)
    except (BudgetError, SearchError) as exc:
        raise SearchRequestError(str(exc)) from exc
    with sf.begin() as s:
        ds = repo.get_dataset_by_name_or_id(s, dataset)
        if ds is None:
            raise SearchRequestError(f"No dataset named {dataset!r}.")
        try:
            goal.check_classes(ds.classes)
        except SearchError as exc:
            raise SearchRequestError(str(exc)) from exc
        budget, plan = plan_search(s, ds, budget)
        least = estimate_trial_seconds(plan.num_train, _here_ms([c.key for c in plan.space.choices]))
        if seconds < 2 * least:
            raise SearchRequestError(f"{minutes(seconds)} is too short: one trial on {ds.name!r} takes about "
                                     f"{minutes(least)} here, and a search needs time for at least one trial "
                                     f"and the final checks. Give at least {minutes(2 * least)}.")
        first = starting_point(plan.space, plan.preset, plan.imbalance_ratio)
        row = Search(dataset_id=ds.id, status=SearchStatus.QUEUED, study_name=f"pending-{utcnow().timestamp()}",
                     objective=goal.text, device=device, budget=budget.to_dict(), time_budget_s=seconds, spent_s=0.0,
                     seed=seed, max_trials=max_trials, workers=workers, summary={}, plan=plan.to_dict(),
                     created_at=utcnow())
        s.add(row)
        s.flush()
        row.study_name = f"workbench-search-{row.id:05d}"
        for _ in range(workers):
            jobs.enqueue(s, JobKind.SEARCH, None, {"search_id": row.id})
        search_id, study_name = row.id, row.study_name
    # The study (and Optuna's tables) exist before any worker opens them: workers sharing the
    # search never race to create them.
    from core.search import open_study

    open_study(settings.database_url, study_name, seed).enqueue_trial(first, user_attrs={"starting_point": True})
    if start_worker:
        lanes.ensure_worker(settings, lane=lanes.lane_of(JobKind.SEARCH))
    return get_search(search_id, settings=settings)


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------
def search_jobs(s: Session, search_id: int, statuses: Any = ACTIVE_JOB) -> list[Job]:
    """The search's jobs in ``statuses`` (payloads are filtered here: JSON queries are not portable)."""
    rows = s.scalars(select(Job).where(Job.kind == JobKind.SEARCH, Job.status.in_(list(statuses)))
                     .order_by(Job.id)).all()
    return [j for j in rows if (j.payload or {}).get("search_id") == search_id]


def settle(s: Session, row: Search) -> None:
    """A search marked active whose jobs are all gone (its worker died): failed, resumable."""
    if row.status in ACTIVE_SEARCH and not search_jobs(s, row.id):
        close_sitting(row, SearchStatus.FAILED, "The worker stopped during the search; resume continues with the "
                                                "time left.")


def _trial(run: Run, summary: SearchSummary, pareto: set[int]) -> TrialInfo:
    rs = dict(run.summary or {})
    best = dict(run.best_metrics or {})
    finalists = set(summary.get("finalists", []))
    return TrialInfo(
        run_id=run.id, number=int(run.trial_number or 0), model=f"{run.variant}@{run.resolution}", status=run.status,
        value=rs.get("objective_value"), val_accuracy=best.get("accuracy"), latency_ms=rs.get("target_latency_ms"),
        latency_source=str(rs.get("target_latency_source", "")), seconds=run.train_seconds,
        params=dict(rs.get("search_params", {})),
        test_accuracy=rs.get("test_accuracy") if run.id in finalists else None,
        test_macro_f1=rs.get("test_macro_f1") if run.id in finalists else None,
        test_accuracy_range=((rs["test_accuracy_lo"], rs["test_accuracy_hi"]) if run.id in finalists
                             and rs.get("test_accuracy_lo") is not None and rs.get("test_accuracy_hi") is not None
                             else None),
        finalist=run.id in finalists, winner=run.id == summary.get("winner_run_id"), pareto=run.id in pareto)


def _info(s: Session, row: Search, with_trials: bool = True) -> SearchInfo:
    summary = read_search_summary(row)
    trial_runs = s.scalars(select(Run).where(Run.search_id == row.id).order_by(Run.trial_number, Run.id)).all()
    trials = [_trial(r, summary, set(summary.get("pareto", []))) for r in trial_runs] if with_trials else []
    scored = [t for t in trials if t.value is not None and t.status == RunStatus.SUCCEEDED]
    best = max(scored, key=lambda t: (t.value or 0.0, -(t.latency_ms or 0.0))) if scored else None
    every = search_jobs(s, row.id, list(JobStatus))
    job = every[-1] if every else None
    return SearchInfo(
        id=row.id, dataset_id=row.dataset_id, dataset=row.dataset.name, status=row.status, objective=row.objective,
        objective_label=Objective.parse(row.objective).label, device=row.device, budget=dict(row.budget or {}),
        time_budget_s=float(row.time_budget_s), spent_s=SearchClock.of(row).spent_s(), started_at=row.started_at,
        finished_at=row.finished_at, error=row.error, winner_run_id=row.winner_run_id,
        bundle_artifact_id=row.bundle_artifact_id, best_run_id=best.run_id if best else None, summary=summary,
        plan=stored_plan(row), progress=job.progress if job else None, trials=trials)


def _row(s: Session, search_id: int) -> Search:
    row = s.get(Search, search_id)
    if row is None:
        raise SearchRequestError(f"No search with id {search_id}.")
    return row


def get_search(search_id: int, *, settings: Settings | None = None) -> SearchInfo:
    settings, sf = service_context(settings)
    with sf.begin() as s:
        row = _row(s, search_id)
        settle(s, row)
        return _info(s, row)


def list_searches(dataset: str | int | None = None, *, settings: Settings | None = None) -> list[SearchInfo]:
    settings, sf = service_context(settings)
    with sf.begin() as s:
        stmt = select(Search).order_by(Search.id.desc())
        if dataset is not None:
            ds = repo.get_dataset_by_name_or_id(s, dataset)
            if ds is None:
                raise SearchRequestError(f"No dataset named {dataset!r}.")
            stmt = stmt.where(Search.dataset_id == ds.id)
        rows = s.scalars(stmt).all()
        for row in rows:
            settle(s, row)
        return [_info(s, r, with_trials=False) for r in rows]


# ---------------------------------------------------------------------------------------------
# Changing
# ---------------------------------------------------------------------------------------------
def cancel_search(search_id: int, *, settings: Settings | None = None) -> CancelOutcome:
    """Stop a search: its running trial stops within a batch (resumable); the search can resume."""
    settings, sf = service_context(settings)
    with sf.begin() as s:
        row = _row(s, search_id)
        if row.status not in ACTIVE_SEARCH:
            raise SearchRequestError(f"Search {search_id} is {row.status}; only a queued or running search can be "
                                     "stopped.")
        active = search_jobs(s, search_id)
        for j in active:
            if j.status == JobStatus.QUEUED:
                j.status, j.finished_at = JobStatus.CANCELLED, utcnow()
        if not any(j.status == JobStatus.RUNNING for j in active):
            row.status, row.finished_at = SearchStatus.CANCELLED, utcnow()
            return CancelOutcome.CANCELLED
        row.cancel_requested = True
        return CancelOutcome.CANCELLING


def resume_search(search_id: int, *, extra_time: str | float | None = None, workers: int | None = None,
                  settings: Settings | None = None, start_worker: bool = True) -> SearchInfo:
    """Queue a stopped or failed search again, with the time it had left (plus ``extra_time``).
    Trials killed with their worker are marked failed and re-run first (core.search.fail_stale_trials)."""
    settings, sf = service_context(settings)
    with sf.begin() as s:
        row = _row(s, search_id)
        settle(s, row)
        if row.status not in RESUMABLE_SEARCH and not (row.status == SearchStatus.SUCCEEDED and extra_time):
            raise SearchRequestError(f"Search {search_id} is {row.status}; only a stopped or failed search can be "
                                     "resumed (or a finished one given more time with --time).")
        if extra_time:
            row.time_budget_s = float(row.spent_s or 0.0) + parse_duration(extra_time)
        elif SearchClock.of(row).left_s() <= 0:
            raise SearchRequestError(f"Search {search_id} has used all of its {minutes(row.time_budget_s)}; "
                                     "give it more time (e.g. --time 5m).")
        row.status, row.error, row.cancel_requested, row.finished_at = SearchStatus.QUEUED, None, False, None
        for _ in range(workers or row.workers or 1):
            jobs.enqueue(s, JobKind.SEARCH, None, {"search_id": row.id, "resume": True})
    if start_worker:
        lanes.ensure_worker(settings, lane=lanes.lane_of(JobKind.SEARCH))
    return get_search(search_id, settings=settings)


def delete_search(search_id: int, *, settings: Settings | None = None) -> list[int]:
    """Delete a finished search: its trial runs (folders, artifacts, rows), its study and its row."""
    from core.search import delete_study

    settings, sf = service_context(settings)
    with sf.begin() as s:
        row = _row(s, search_id)
        settle(s, row)
        if row.status in ACTIVE_SEARCH:
            raise SearchRequestError(f"Search {search_id} is {row.status}: stop it before deleting it.")
        run_ids = list(s.scalars(select(Run.id).where(Run.search_id == search_id)))
        study = row.study_name
    for rid in run_ids:
        runs.delete_run(rid, settings=settings)
    delete_study(settings.database_url, study)
    with sf.begin() as s:
        gone = s.get(Search, search_id)
        if gone is not None:
            s.delete(gone)
    return run_ids
