"""What the Train page (and the run pickers) read: choices, live runs, and a run's summary as typed
fields (``SummaryView``), built from the stored ``Run.summary`` in one place."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import func, select

from storage.models import Artifact, Dataset, Run
from workbench import runs
from workbench.compute import latency_on
from workbench.runs import RunInfo
from workbench.status import ACTIVE_JOB, ACTIVE_RUN, RunStatus
from workbench.summary import RunSummary, WorkerLoss
from workbench.views.common import _db, count, number, record, value_with_range


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


@dataclass(frozen=True)
class SummaryView:  # ``Run.summary`` as pages read it; a run not yet evaluated or exported has Nones
    test_accuracy: float | None
    test_accuracy_range: tuple[float, float] | None  # its 95 % range (the test split is small)
    test_macro_f1: float | None
    test_images: int | None
    latency_ms: float | None  # typical (p50) time per image of the fp32 ONNX model
    latency_on: str  # "CPU" / "GPU (CUDA)" ("" when not measured)
    size_mb: float | None  # the fp32 ONNX file
    worker_losses: tuple[WorkerLoss, ...]  # workers that died under the run, oldest first

    @property
    def test_accuracy_text(self) -> str:
        """ "94.5 % (95 % range 89–97 %)" ("" when not evaluated)."""
        return value_with_range(self.test_accuracy, self.test_accuracy_range)


def summary_view(summary: RunSummary | dict[str, Any] | None) -> SummaryView:
    """The one reader of a stored run summary."""
    sm: dict[str, Any] = record(summary)
    lo, hi = number(sm.get("test_accuracy_lo")), number(sm.get("test_accuracy_hi"))
    n = count(sm.get("test_n"))
    losses = tuple(cast(WorkerLoss, loss) for loss in sm.get("worker_losses") or () if isinstance(loss, dict))
    return SummaryView(number(sm.get("test_accuracy")), (lo, hi) if lo is not None and hi is not None else None,
                       number(sm.get("test_macro_f1")), n or None, number(sm.get("latency_ms_p50")),
                       latency_on(sm), number(sm.get("onnx_mb")),
                       losses)


@dataclass(frozen=True)
class LiveRun:  # a run as the Train page follows it: the service's RunInfo and its newest events
    run: RunInfo
    events: tuple[str, ...] = ()  # the newest event messages, newest first

    @property
    def active(self) -> bool:
        return self.run.status in ACTIVE_RUN or self.run.job_status in ACTIVE_JOB

    @property
    def summary(self) -> SummaryView:
        return summary_view(self.run.summary)

    @property
    def fraction(self) -> float:
        return min(max(number((self.run.progress or {}).get("fraction")) or 0.0, 0.0), 1.0)

    @property
    def eta_s(self) -> float | None:
        """Seconds the worker expects the run still needs (None: no estimate yet)."""
        return number((self.run.progress or {}).get("eta_s"))


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


# --- sensible defaults -----------------------------------------------------------------
def newest_dataset_id() -> int | None:
    """The dataset the Runs page opens on: the newest one that has runs, else the newest."""
    with _db()() as s:
        with_runs = s.scalar(select(Run.dataset_id).order_by(Run.created_at.desc(), Run.id.desc()).limit(1))
        return with_runs if with_runs is not None else s.scalar(select(func.max(Dataset.id)))


def default_predict_run(dataset: int | None = None) -> int | None:
    """The model Predict opens on: among the succeeded runs of ``dataset`` (all when None),
    an exported one (a bundle was built) before one that was not, then the best validation macro-F1
    (never the test one: the test split is the held-out report), then the newest."""
    where = [Run.status == RunStatus.SUCCEEDED] + ([Run.dataset_id == dataset] if dataset is not None else [])
    with _db()() as s:
        rows = s.execute(select(Run.id, Run.best_metrics).where(*where).order_by(Run.id.desc()).limit(2000)).all()
        exported = set(s.scalars(select(Artifact.run_id).where(Artifact.kind == "bundle",
                                                               Artifact.run_id.in_([r for r, _ in rows]))).all())
    if not rows:
        return None

    def rank(row: tuple[int, Any]) -> tuple[bool, float, int]:
        f1 = number((row[1] or {}).get("macro_f1"))
        return (row[0] in exported, f1 if f1 is not None else -1.0, row[0])

    return max(rows, key=rank)[0]
