"""What the Runs page reads: the leaderboard (sorted and paged in SQL), the accuracy-vs-latency
points, run pickers and training curves."""
from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, func, nulls_last, select
from sqlalchemy.orm import Session, sessionmaker

from storage.models import Dataset, Run
from workbench import runs
from workbench.views.common import _db, percent_range
from workbench.views.runs import summary_view


def summary_value(key: str, column: str = "summary") -> ColumnElement[Any]:
    """One numeric key of a JSON column (``Run.summary`` or ``Run.best_metrics``) as an SQL expression,
    portable: SQLAlchemy's JSON indexing renders json_extract on SQLite and ->> on PostgreSQL."""
    return getattr(Run, column)[key].as_float()


# Sort choice, as the page names it -> the JSON column key or Run column it sorts by. The first is the
# default: validation chooses, the test figures are the held-out report (sortable, never the default).
LEADERBOARD_SORTS: dict[str, tuple[str, str]] = {
    "validation macro-F1": ("best_metrics", "macro_f1"), "validation accuracy": ("best_metrics", "accuracy"),
    "test macro-F1": ("summary", "test_macro_f1"), "test accuracy": ("summary", "test_accuracy"),
    "latency ms": ("summary", "latency_ms_p50"), "size MB": ("summary", "onnx_mb"),
    "training time": ("column", "train_seconds"), "created": ("column", "created_at"), "run": ("column", "id"),
}
DEFAULT_SORT = next(iter(LEADERBOARD_SORTS))
ASCENDING_BY_DEFAULT = frozenset({"latency ms", "size MB", "training time"})  # smaller is better
TEST_SORTS = frozenset(k for k, (_, key) in LEADERBOARD_SORTS.items() if key.startswith("test_"))


@dataclass(frozen=True)
class LeaderboardRow:
    run: int
    dataset: str
    variant: str
    resolution: int
    preset: str
    status: str
    test_macro_f1: float | None
    test_accuracy: float | None
    val_accuracy: float | None  # of the checkpoint training kept (``Run.best_metrics``): what ranks runs
    latency_ms: float | None
    size_mb: float | None
    params_m: float | None
    train_seconds: float | None
    batch: str | None
    created: datetime
    accuracy_range: str = ""  # "89–97 %": the 95 % range of test accuracy ("" when not evaluated)
    test_images: int | None = None
    latency_on: str = ""  # "CPU" / "GPU (CUDA)": where the latency was measured ("" when it was not)
    val_macro_f1: float | None = None


@functools.lru_cache(maxsize=512)
def model_params(variant: str, resolution: int, num_classes: int) -> int | None:
    """Parameter count of a variant with a ``num_classes`` head; None for an unknown variant."""
    from core.registry import count_cost

    try:
        return count_cost(variant, resolution, num_classes).params
    except Exception:  # noqa: BLE001 - an unknown custom variant shows a dash
        return None


def _leaderboard_row(run: Run, dataset_name: str, num_classes: int) -> LeaderboardRow:
    sm, best = summary_view(run.summary), run.best_metrics or {}
    params = model_params(run.variant, run.resolution, num_classes)
    return LeaderboardRow(
        run=run.id, dataset=dataset_name, variant=run.variant, resolution=run.resolution, preset=run.preset,
        status=run.status, test_macro_f1=sm.test_macro_f1, test_accuracy=sm.test_accuracy,
        val_accuracy=best.get("accuracy"), latency_ms=sm.latency_ms, size_mb=sm.size_mb,
        params_m=params / 1e6 if params else None, train_seconds=run.train_seconds, batch=run.batch_label,
        created=run.created_at, accuracy_range=percent_range(*sm.test_accuracy_range or (None, None)),
        test_images=sm.test_images, latency_on=sm.latency_on, val_macro_f1=best.get("macro_f1"))


def leaderboard_margin(rows: Sequence[LeaderboardRow], session_factory: sessionmaker[Session] | None = None) -> str:
    """Whether the two best-ranked evaluated runs of one dataset differ by more than chance ("" when
    there are not two to compare)."""
    from workbench.evaluations import compare_runs

    done = [r for r in rows if r.test_accuracy is not None]
    if len(done) < 2 or done[0].dataset != done[1].dataset:
        return ""
    cmp = compare_runs(done[0].run, done[1].run, session_factory=session_factory or _db())
    return "" if cmp is None else cmp.sentence[0].upper() + cmp.sentence[1:] + "."


def _run_filter(dataset_id: int | None, statuses: Sequence[str] | None) -> list[ColumnElement[bool]]:
    where = []
    if dataset_id is not None:
        where.append(Run.dataset_id == dataset_id)
    if statuses:
        where.append(Run.status.in_([str(s) for s in statuses]))
    return where


def count_runs(*, dataset_id: int | None = None, statuses: Sequence[str] | None = None) -> int:
    with _db()() as s:
        return s.scalar(select(func.count()).select_from(Run).where(*_run_filter(dataset_id, statuses))) or 0


def runs_table(*, offset: int = 0, limit: int = 25, sort: str = DEFAULT_SORT, descending: bool = True,
               dataset_id: int | None = None, statuses: Sequence[str] | None = None) -> list[LeaderboardRow]:
    """One page of the leaderboard, sorted in SQL (LIMIT/OFFSET) so thousands of runs stay fast."""
    source, key = LEADERBOARD_SORTS.get(sort, ("column", "id"))
    col = getattr(Run, key) if source == "column" else summary_value(key, source)
    order = nulls_last(col.desc() if descending else col.asc())
    with _db()() as s:
        rows = s.execute(select(Run, Dataset.name, Dataset.num_classes).join(Dataset, Run.dataset_id == Dataset.id)
                         .where(*_run_filter(dataset_id, statuses)).order_by(order, Run.id.desc())
                         .offset(offset).limit(limit)).all()
        return [_leaderboard_row(run, name, k) for run, name, k in rows]


@dataclass(frozen=True)
class RunPoint:  # a trained and measured run on the accuracy-vs-latency chart
    run: int
    model: str
    accuracy: float  # validation accuracy: what the front is drawn on
    macro_f1: float | None  # validation macro-F1
    latency_ms: float
    size_mb: float | None
    test_accuracy: float | None = None  # the held-out report, shown beside, never chosen by
    test_macro_f1: float | None = None


def run_points(dataset_id: int | None = None, limit: int = 5000) -> list[RunPoint]:
    stmt = select(Run.id, Run.variant, Run.resolution, Run.summary, Run.best_metrics).where(
        *_run_filter(dataset_id, None), Run.summary.is_not(None), Run.best_metrics.is_not(None))
    with _db()() as s:
        rows = s.execute(stmt.order_by(Run.id.desc()).limit(limit)).all()
    points = [(rid, f"{variant}@{res}", summary_view(sm), best or {}) for rid, variant, res, sm, best in rows]
    return [RunPoint(rid, model, best["accuracy"], best.get("macro_f1"), v.latency_ms, v.size_mb,
                     v.test_accuracy, v.test_macro_f1)
            for rid, model, v, best in points if best.get("accuracy") is not None and v.latency_ms is not None]


def pareto_front(points: Sequence[RunPoint]) -> set[int]:
    """Run ids no other run beats on both lower latency and higher validation accuracy."""
    best = -math.inf
    front: set[int] = set()
    for p in sorted(points, key=lambda p: (p.latency_ms, -p.accuracy)):
        if p.accuracy > best:
            front.add(p.run)
            best = p.accuracy
    return front


def run_choices(*, statuses: Sequence[str] | None = None, limit: int = 500,
                dataset_id: int | None = None) -> dict[int, str]:
    """{run id: label} of the most recent runs (of one dataset when given), for select boxes."""
    stmt = select(Run.id, Run.variant, Run.resolution, Run.status, Dataset.name).join(
        Dataset, Run.dataset_id == Dataset.id).where(*_run_filter(dataset_id, statuses))
    with _db()() as s:
        rows = s.execute(stmt.order_by(Run.id.desc()).limit(limit)).all()
    return {rid: f"#{rid} · {name} · {variant}@{res} · {status}" for rid, variant, res, status, name in rows}


@dataclass(frozen=True)
class CurvePoint:
    run: str  # "#12": a label, so charts colour runs as categories
    epoch: int
    phase: str
    metric: str
    value: float


def run_curves(run_ids: Sequence[int], max_runs: int = 20) -> list[CurvePoint]:
    """Per-epoch metrics of some runs in long format: one point per run, epoch, phase and metric."""
    out: list[CurvePoint] = []
    for rid in list(run_ids)[:max_runs]:
        for row in runs.run_metrics(rid):
            out.extend(CurvePoint(f"#{rid}", row.epoch, row.phase, k, v) for k, v in row.values.items()
                       if k not in ("epoch", "phase") and isinstance(v, (int, float)) and not isinstance(v, bool))
    return out


