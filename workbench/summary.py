"""The typed schemas of ``Run.summary``, ``Run.best_metrics`` and ``Search.summary`` (JSON columns),
and their one writer each.

Every service that records something about a run writes it through ``update_summary`` with
keys of ``RunSummary``; every reader gets a ``RunSummary``. A key not listed here is a bug.
A search's summary is written through ``merge_search_summary`` alone, which refuses a key
``SearchSummary`` does not list. (A search's clock is not in its summary: it has columns,
``workbench.search_clock``.)
"""
from __future__ import annotations

from typing import Any, TypedDict

from sqlalchemy.orm import Session, sessionmaker

from storage.models import Run, Search


class WorkerLoss(TypedDict, total=False):
    """One worker that died under the run (its lease ran out), and what became of the run."""

    at: str  # ISO time the loss was noticed
    host: str  # the host whose worker stopped
    pid: int | None
    epoch: int | None  # the last checkpoint's epoch (None: none yet)
    after_training: bool  # it died after training, while checking the exported model
    auto_resume: int  # which automatic resume this queued (1, 2, ...); 0: none (gave up)
    limit: int  # WORKBENCH_AUTO_RESUMES at the time
    resumed_on: str  # the host whose worker took the resume


def worker_loss_head(loss: WorkerLoss) -> str:
    """'worker on host A (pid 7) stopped at epoch 13'."""
    where = ("after training, while checking the model" if loss.get("after_training") else
             f"at epoch {loss['epoch']}" if loss.get("epoch") is not None else "before its first checkpoint")
    pid = f" (pid {loss['pid']})" if loss.get("pid") is not None else ""
    return f"worker on host {loss.get('host') or '?'}{pid} stopped {where}"


def describe_worker_loss(loss: WorkerLoss) -> str:
    """One line of the run's history: '... stopped at epoch 13; resumed on host B (automatic resume 1 of 2)'."""
    n, limit = loss.get("auto_resume", 0), loss.get("limit", 0)
    if not n:
        return f"{worker_loss_head(loss)}; not resumed automatically (limit {limit} reached): resume it by hand"
    if loss.get("resumed_on"):
        return f"{worker_loss_head(loss)}; resumed on host {loss['resumed_on']} (automatic resume {n} of {limit})"
    return f"{worker_loss_head(loss)}; automatic resume {n} of {limit} queued"


class RunSummary(TypedDict, total=False):
    # Written by training (core.train's TrainResult.summary, merged as it is).
    device: str
    threads: int
    world_size: int  # data-parallel processes of the last training attempt (1: one process)
    backend: str  # their torch.distributed backend: gloo, nccl, or "none" for one process
    balance: str
    imbalance_ratio: float
    class_counts: dict[str, int]
    num_train: int
    num_val: int
    weights: str
    variant: str
    resolution: int
    resumed_from_epoch: int
    load_seconds: float
    cache_entry: str
    cache_seconds: float
    cache_mb: float
    cache_backend: str
    micro_batch: int
    early_stopped: list[str]
    best_epoch: int
    best_phase: str
    epochs_run: int
    val_confusion: list[list[int]]
    # Written by the fp32 export and its verification (workbench.exports.ensure_fp32).
    onnx_mb: float
    latency_ms_p50: float | None  # None: not measured (the machine was busy; see latency_note)
    latency_ms_p95: float | None
    throughput_images_per_s: float | None
    latency_machine: dict[str, Any]
    latency_conditions: dict[str, Any]  # threads, load before/after, provider, onnxruntime, time, sitting
    latency_note: str  # plain words when latency was not measured (busy machine) or stayed uneven
    latency_provider: str  # the ONNX Runtime provider the figures ran on ("CPUExecutionProvider"; "" not measured)
    export_verified: bool
    export_max_abs_logit_diff: float
    export_top1_agreement: float
    # Written by the test-split evaluation (workbench.evaluations.evaluate_run).
    test_accuracy: float
    test_balanced_accuracy: float
    test_macro_f1: float
    test_accuracy_tta: float
    test_n: int  # test images the figures (and their 95 % ranges below) were measured on
    test_accuracy_lo: float
    test_accuracy_hi: float
    test_macro_f1_lo: float
    test_macro_f1_hi: float
    ece: float
    ece_after_temperature: float
    temperature: float
    # Why a step after training did not happen (the trained model is fine).
    evaluation_error: str
    postrun_error: str
    # A trial of an Auto search: what it tried, its validation objective, its latency on the target.
    search_params: dict[str, Any]
    objective_value: float
    target_latency_ms: float
    target_latency_source: str
    cache_reused: bool
    # Workers that died under the run, oldest first (workbench.handlers.recovery).
    worker_losses: list[WorkerLoss]


class BestMetrics(TypedDict, total=False):
    """The validation metrics of the checkpoint training selected (``Run.best_metrics``)."""

    epoch: int
    phase: str
    accuracy: float
    macro_f1: float
    balanced_accuracy: float
    loss: float
    per_class_f1: list[float | None]


def read_summary(run: Run) -> RunSummary:
    return RunSummary(**(run.summary or {}))  # type: ignore[typeddict-item]


def read_best(run: Run) -> BestMetrics:
    return BestMetrics(**(run.best_metrics or {}))  # type: ignore[typeddict-item]


def merge_summary(run: Run, fields: RunSummary) -> None:
    """Inside the caller's transaction: reassign (not mutate) so SQLAlchemy sees the JSON change."""
    run.summary = {**(run.summary or {}), **fields}


def update_summary(session_factory: sessionmaker[Session], run_id: int, fields: RunSummary) -> None:
    with session_factory.begin() as session:
        run = session.get(Run, run_id)
        if run is not None:
            merge_summary(run, fields)


class SearchLogLine(TypedDict):
    at: str  # ISO time, seconds
    level: str  # info | warning | error
    message: str


class FinalistTest(TypedDict):
    """A finalist's figures on the test split, and its latency measured here."""

    test_accuracy: float | None
    test_macro_f1: float | None
    latency_here_ms: float | None


class VersusStart(TypedDict):
    """The winner against the first trial (plain training) on validation (workbench.searches.StartComparison)."""

    run_id: int
    value: float
    winner_value: float
    images: int
    noise: float | None


class WinnerLatency(TypedDict):
    p50_ms: float | None
    source: str


class SearchSummary(TypedDict, total=False):
    log: list[SearchLogLine]  # the search's own log (it has no run of its own), the newest 200 lines
    cache: dict[str, float]  # the shared feature cache's counters (core.train.FeatureStore), all workers
    error_detail: dict[str, Any]  # the traceback of a crash
    # Written by the finish (workbench.handlers.search.finalize).
    winner_run_id: int
    finalists: list[int]
    pareto: list[int]
    tested: dict[str, FinalistTest]  # by run id (JSON keys are text)
    versus_start: VersusStart | None
    winner_latency: WinnerLatency
    finalize_seconds: float


SEARCH_SUMMARY_KEYS = frozenset(SearchSummary.__optional_keys__ | SearchSummary.__required_keys__)


def read_search_summary(row: Search) -> SearchSummary:
    return SearchSummary(**(row.summary or {}))  # type: ignore[typeddict-item]


def merge_search_summary(row: Search, fields: SearchSummary) -> None:
    """Inside the caller's transaction; ValueError for a key the schema does not list."""
    unknown = sorted(set(fields) - SEARCH_SUMMARY_KEYS)
    if unknown:
        raise ValueError(f"{', '.join(map(repr, unknown))} is not a field of a search's summary: add it to "
                         "workbench.summary.SearchSummary, or keep it in a column if it coordinates workers.")
    row.summary = {**(row.summary or {}), **fields}
