"""What the pages (and the CLI) read: typed read models, no Streamlit.

Queries shaped for one screen, returned as frozen dataclasses, built on a service where one
already computes the thing. What pages ask Workbench to do is ``workbench.actions``; caching is
``workbench.ui``'s business.
"""
from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import ColumnElement, func, nulls_last, select
from sqlalchemy.orm import Session, sessionmaker

from storage.db import get_sessionmaker
from storage.models import Artifact, Dataset, Image, Job, Run
from workbench import runs
from workbench.compute import latency_on
from workbench.datasets import DatasetInfo
from workbench.paths import importable_folders
from workbench.runs import RunInfo
from workbench.settings import get_settings
from workbench.status import ACTIVE_JOB, ACTIVE_RUN, JobKind, RunStatus

log = logging.getLogger("workbench.views")

INGEST_SHOWN_FOR = timedelta(minutes=30)  # a finished ingest stays on the Datasets page this long


def _db() -> sessionmaker[Session]:
    return get_sessionmaker(get_settings().database_url)


# --- jobs ------------------------------------------------------------------------------
@dataclass(frozen=True)
class JobView:  # one row of the job queue, as every page shows it
    id: int
    kind: str
    status: str
    run_id: int | None
    payload: dict[str, Any]  # the handler merges its result in here
    progress: dict[str, Any]
    error: str | None
    created_at: datetime
    finished_at: datetime | None
    name: str | None  # ingest: the dataset's name
    filename: str | None  # ingest: the uploaded file, as the user named it

    @classmethod
    def from_row(cls, job: Job) -> JobView:
        payload = dict(job.payload or {})
        return cls(job.id, job.kind, job.status, job.run_id, payload, dict(job.progress or {}), job.error,
                   job.created_at, job.finished_at, payload.get("name"), payload.get("filename"))

    @property
    def active(self) -> bool:
        return self.status in ACTIVE_JOB

    @property
    def fraction(self) -> float:
        return min(max(float(self.progress.get("fraction") or 0.0), 0.0), 1.0)


def recent_jobs(kinds: Sequence[str], limit: int = 5, run_id: int | None = None) -> list[JobView]:
    """The newest jobs of some kinds (newest first), after failing those whose worker died."""
    reconcile_runs()
    stmt = select(Job).where(Job.kind.in_([str(k) for k in kinds]))
    if run_id is not None:
        stmt = stmt.where(Job.run_id == run_id)
    with _db()() as s:
        return [JobView.from_row(j) for j in s.scalars(stmt.order_by(Job.id.desc()).limit(limit))]


def job(job_id: int) -> JobView | None:
    reconcile_runs()
    with _db()() as s:
        row = s.get(Job, job_id)
        return None if row is None else JobView.from_row(row)


def ingest_jobs_to_show(dismissed: Collection[int] = (), limit: int = 5, now: datetime | None = None) -> list[JobView]:
    """Ingests still running, and those that ended recently unless the user dismissed them."""
    since = (now or datetime.now(UTC)) - INGEST_SHOWN_FOR
    return [j for j in recent_jobs([JobKind.INGEST], limit)
            if j.active or (j.id not in dismissed and j.finished_at is not None and j.finished_at > since)]


_last_reconcile = [0.0]


def reconcile_runs(every_s: float = 15.0) -> None:
    """Fail jobs (and runs) whose lane's worker died; at most every ``every_s`` seconds."""
    if time.monotonic() - _last_reconcile[0] < every_s:
        return
    _last_reconcile[0] = time.monotonic()
    try:
        from workbench import worker  # imports every handler (and torch): only once it is needed
        worker.reconcile()
    except Exception:  # noqa: BLE001 - the page still shows what the database says
        log.warning("reconcile failed", exc_info=True)


# --- home, settings, datasets ----------------------------------------------------------
@dataclass(frozen=True)
class OverviewCounts:
    datasets: int
    runs: int
    active: int


def overview_counts() -> OverviewCounts:
    """Three COUNT queries: fast at any size."""
    with _db()() as s:
        count = lambda table, *where: s.scalar(select(func.count()).select_from(table).where(*where)) or 0  # noqa: E731
        return OverviewCounts(count(Dataset), count(Run), count(Run, Run.status.in_(list(ACTIVE_RUN))))


@dataclass(frozen=True)
class ImageSample:
    path: Path  # absolute path of the stored file
    caption: str


def dataset_sample(dataset_id: int, classes: Sequence[str], per_class: int = 6) -> list[ImageSample]:
    """A stable sample of images per class (one LIMIT query per class: fast on 10k+ images)."""
    data_dir = get_settings().data_dir
    out: list[ImageSample] = []
    with _db()() as s:
        for label in classes:
            rows = s.execute(select(Image.store_path, Image.split)
                             .where(Image.dataset_id == dataset_id, Image.label == label)
                             .order_by(Image.sha256).limit(per_class)).all()  # content hash: stable, unbiased
            out.extend(ImageSample(data_dir / p, f"{label} · {split}") for p, split in rows)
    return out


def store_paths_for(dataset_id: int, shas: Sequence[str], limit: int = 500) -> dict[str, Path]:
    """Absolute stored file per sha256 for one dataset (a bounded IN query)."""
    shas = list(dict.fromkeys(shas))[:limit]
    if not shas:
        return {}
    data_dir = get_settings().data_dir
    with _db()() as s:
        rows = s.execute(select(Image.sha256, Image.store_path)
                         .where(Image.dataset_id == dataset_id, Image.sha256.in_(shas))).all()
    return {sha: data_dir / p for sha, p in rows}


@dataclass(frozen=True)
class ImportChoices:  # what the Datasets page can import from the server without a browser upload
    folder: Path  # the import dir (WORKBENCH_IMPORT_DIR)
    entries: tuple[str, ...]  # folders, zips and CSVs directly inside it


def import_choices() -> ImportChoices:
    settings = get_settings()
    return ImportChoices(settings.import_dir, tuple(p.name for p in importable_folders(settings)))


# --- training --------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainChoices:  # what the Train page offers, from core's registries (pages do not import core)
    variants: tuple[str, ...]
    recipes: tuple[str, ...]
    presets: tuple[str, ...]
    resolutions: tuple[int, ...] = (96, 128, 160, 192, 224, 240, 260, 280, 300)
    default_variant: str = "lite0"
    default_recipe: str = "quick"
    default_resolution: int = 224


def train_choices() -> TrainChoices:
    from core.augment import PRESETS
    from core.registry import all_variants
    from core.train import RECIPES
    return TrainChoices(tuple(all_variants()), tuple(RECIPES), tuple(PRESETS))


def default_preset(dataset_id: int) -> str | None:
    """The training service's suggestion (from the kind of image the report guessed); None if unknown."""
    try:
        with _db()() as s:
            return runs.default_preset(s, dataset_id)
    except Exception:  # noqa: BLE001 - a suggestion only
        return None


@dataclass(frozen=True)
class LiveRun:  # a run as the Train page follows it: the service's RunInfo and its newest events
    run: RunInfo
    events: tuple[str, ...] = ()  # the newest event messages, newest first

    @property
    def active(self) -> bool:
        return self.run.status in ACTIVE_RUN or self.run.job_status in ACTIVE_JOB


def live_runs(limit: int = 10, events: int = 5) -> list[LiveRun]:
    """Active runs first, then the most recent finished ones (``limit`` in all)."""
    active_now = Run.status.in_(list(ACTIVE_RUN))
    with _db()() as s:
        ids = list(s.scalars(select(Run.id).where(active_now).order_by(Run.id.desc()).limit(limit)))
        if len(ids) < limit:
            ids += s.scalars(select(Run.id).where(~active_now).order_by(Run.id.desc()).limit(limit - len(ids)))
    out: list[LiveRun] = []
    for run_id in ids:
        try:
            info = runs.get_run(run_id)
        except runs.RunError:
            continue  # deleted since the ids were read
        newest = runs.run_events(run_id, newest=events)[::-1]
        out.append(LiveRun(info, tuple(e.message for e in newest)))
    return out


# --- runs: leaderboard, scatter, curves ------------------------------------------------
def summary_value(key: str) -> ColumnElement[Any]:
    """One numeric ``Run.summary`` key as an SQL expression, portable: SQLAlchemy's JSON indexing
    renders json_extract on SQLite and ->> on PostgreSQL."""
    return Run.summary[key].as_float()


# Sort choice, as the page names it -> the summary key or Run column it sorts by.
LEADERBOARD_SORTS: dict[str, tuple[str, str]] = {
    "macro-F1": ("summary", "test_macro_f1"), "accuracy": ("summary", "test_accuracy"),
    "latency ms": ("summary", "latency_ms_p50"), "size MB": ("summary", "onnx_mb"),
    "training time": ("column", "train_seconds"), "created": ("column", "created_at"), "run": ("column", "id"),
}
ASCENDING_BY_DEFAULT = frozenset({"latency ms", "size MB", "training time"})  # smaller is better


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
    val_accuracy: float | None
    latency_ms: float | None
    size_mb: float | None
    params_m: float | None
    train_seconds: float | None
    batch: str | None
    created: datetime
    accuracy_range: str = ""  # "89–97 %": the 95 % range of test accuracy ("" when not evaluated)
    test_images: int | None = None
    latency_on: str = ""  # "CPU" / "GPU (CUDA)": where the latency was measured ("" when it was not)


@functools.lru_cache(maxsize=512)
def model_params(variant: str, resolution: int, num_classes: int) -> int | None:
    """Parameter count of a variant with a ``num_classes`` head; None for an unknown variant."""
    from core.registry import count_cost

    try:
        return count_cost(variant, resolution, num_classes).params
    except Exception:  # noqa: BLE001 - an unknown custom variant shows a dash
        return None


def _leaderboard_row(run: Run, dataset_name: str, num_classes: int) -> LeaderboardRow:
    sm, best = run.summary or {}, run.best_metrics or {}
    params = model_params(run.variant, run.resolution, num_classes)
    return LeaderboardRow(
        run=run.id, dataset=dataset_name, variant=run.variant, resolution=run.resolution, preset=run.preset,
        status=run.status, test_macro_f1=sm.get("test_macro_f1"), test_accuracy=sm.get("test_accuracy"),
        val_accuracy=best.get("accuracy"), latency_ms=sm.get("latency_ms_p50"), size_mb=sm.get("onnx_mb"),
        params_m=params / 1e6 if params else None, train_seconds=run.train_seconds, batch=run.batch_label,
        created=run.created_at, accuracy_range=percent_range(sm.get("test_accuracy_lo"), sm.get("test_accuracy_hi")),
        test_images=sm.get("test_n"), latency_on=latency_on(sm))


def percent_range(lo: float | None, hi: float | None) -> str:
    """A 95 % range in plain words: "89–97 %" ("" when there is none)."""
    return "" if lo is None or hi is None else f"{lo * 100:.0f}–{hi * 100:.0f} %"


def with_range(interval: dict[str, Any] | None, value: float | None = None) -> str:
    """ "94.5 % (95 % range 89–97 %)"; just the value when there is no range; "" when neither."""
    v = value if value is not None else (interval or {}).get("value")
    if v is None:
        return ""
    if not interval:
        return f"{v * 100:.1f} %"
    return f"{v * 100:.1f} % (95 % range {percent_range(interval['lo'], interval['hi'])})"


def per_class_ranges(metrics: dict[str, Any]) -> list[str]:
    """Each class's recall with its 95 % range, in the order of ``metrics["per_class"]``."""
    ranges = (metrics.get("intervals") or {}).get("per_class_recall") or []
    rows = metrics.get("per_class") or []
    return [with_range(ranges[i] if i < len(ranges) else None, row.get("recall")) or "no test images"
            for i, row in enumerate(rows)]


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


def runs_table(*, offset: int = 0, limit: int = 25, sort: str = "macro-F1", descending: bool = True,
               dataset_id: int | None = None, statuses: Sequence[str] | None = None) -> list[LeaderboardRow]:
    """One page of the leaderboard, sorted in SQL (LIMIT/OFFSET) so thousands of runs stay fast."""
    source, key = LEADERBOARD_SORTS.get(sort, ("column", "id"))
    col = summary_value(key) if source == "summary" else getattr(Run, key)
    order = nulls_last(col.desc() if descending else col.asc())
    with _db()() as s:
        rows = s.execute(select(Run, Dataset.name, Dataset.num_classes).join(Dataset, Run.dataset_id == Dataset.id)
                         .where(*_run_filter(dataset_id, statuses)).order_by(order, Run.id.desc())
                         .offset(offset).limit(limit)).all()
        return [_leaderboard_row(run, name, k) for run, name, k in rows]


@dataclass(frozen=True)
class RunPoint:  # an evaluated and measured run on the accuracy-vs-latency chart
    run: int
    model: str
    accuracy: float
    macro_f1: float | None
    latency_ms: float
    size_mb: float | None


def run_points(dataset_id: int | None = None, limit: int = 5000) -> list[RunPoint]:
    stmt = select(Run.id, Run.variant, Run.resolution, Run.summary).where(*_run_filter(dataset_id, None),
                                                                          Run.summary.is_not(None))
    with _db()() as s:
        rows = s.execute(stmt.order_by(Run.id.desc()).limit(limit)).all()
    return [RunPoint(rid, f"{variant}@{res}", sm["test_accuracy"], sm.get("test_macro_f1"), sm["latency_ms_p50"],
                     sm.get("onnx_mb"))
            for rid, variant, res, sm in rows
            if sm.get("test_accuracy") is not None and sm.get("latency_ms_p50") is not None]


def pareto_front(points: Sequence[RunPoint]) -> set[int]:
    """Run ids no other run beats on both lower latency and higher accuracy."""
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


# --- recommend -------------------------------------------------------------------------
def recommend_budget(*, device: str, latency_ms: float = 0, latency_p95_ms: float = 0, memory_mb: float = 0,
                     size_mb: float = 0, precision: str = "fp32", max_params_m: float = 0, min_resolution: int = 0,
                     dataset: DatasetInfo | None = None) -> dict[str, Any]:
    """The recommender's budget from the form (0: no limit); a dataset adds its classes and training
    images (small data favours small models), without one candidates are ranked as for ImageNet."""
    train = ((dataset.health.get("split_counts") or {}).get("train") or {}) if dataset else {}
    return {
        "device": device, "latency_ms": latency_ms or None, "latency_p95_ms": latency_p95_ms or None,
        "memory_mb": memory_mb or None, "size_mb": size_mb or None, "precision": precision,
        "max_params_m": max_params_m or None, "min_resolution": int(min_resolution) or None,
        "train_images": sum(train.values()) or None,
        # The images' own size caps the resolution (no 260 px proposals for 100 px crops).
        "max_resolution": ((dataset.health.get("suggestion") or {}).get("max_resolution") if dataset else None),
        "num_classes": dataset.num_classes if dataset and dataset.num_classes else 1000,
    }


# --- sensible defaults -----------------------------------------------------------------
def newest_dataset_id() -> int | None:
    """The dataset the Runs page opens on: the newest one that has runs, else the newest."""
    with _db()() as s:
        with_runs = s.scalar(select(Run.dataset_id).order_by(Run.created_at.desc(), Run.id.desc()).limit(1))
        return with_runs if with_runs is not None else s.scalar(select(func.max(Dataset.id)))


def default_predict_run(dataset: int | None = None) -> int | None:
    """The model Predict opens on: among the succeeded runs of ``dataset`` (all when None),
    an exported one (a bundle was built) before one that was not, then the best test macro-F1,
    then the newest."""
    where = [Run.status == RunStatus.SUCCEEDED] + ([Run.dataset_id == dataset] if dataset is not None else [])
    with _db()() as s:
        rows = s.execute(select(Run.id, Run.summary).where(*where).order_by(Run.id.desc()).limit(2000)).all()
        exported = set(s.scalars(select(Artifact.run_id).where(Artifact.kind == "bundle",
                                                               Artifact.run_id.in_([r for r, _ in rows]))).all())
    if not rows:
        return None

    def rank(row: tuple[int, Any]) -> tuple[bool, float, int]:
        f1 = (row[1] or {}).get("test_macro_f1")
        return (row[0] in exported, float(f1) if isinstance(f1, (int, float)) else -1.0, row[0])

    return max(rows, key=rank)[0]
