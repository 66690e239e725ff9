"""Evaluation service: a run's best checkpoint on its dataset's held-out test split.

``core.evaluate`` does the computing; this module reads the run and its images once
(``RunData``), stores an Evaluation row, registers its plots and metrics.json as artifacts,
and records the headline figures in the run's summary.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from core import export as cx
from core.evaluate import EvalItem, evaluate_model
from storage import repositories as repo
from storage.artifacts import register_artifact, resolve_in_data_dir
from storage.models import Dataset, Evaluation, Run
from workbench.paths import RunPaths
from workbench.settings import Settings, service_context
from workbench.summary import RunSummary, update_summary

ProgressCb = Callable[[str, float], None]


class EvaluationError(RuntimeError):
    """A run cannot be evaluated or exported (user-facing message)."""


class UnknownRunError(EvaluationError):
    """No run has that id: bad input (exit code 2 from the CLI), not a failure of the run."""


@dataclass(frozen=True)
class EvaluationResult:
    evaluation_id: int
    metrics: dict[str, Any]
    plots: dict[str, int]  # plot name -> artifact id


@dataclass(frozen=True)
class EvaluationRecord:
    id: int
    created_at: datetime
    tta: bool
    metrics: dict[str, Any]


def say(progress: ProgressCb | None, msg: str, frac: float) -> None:
    if progress is not None:
        progress(msg, frac)


def scaled(progress: ProgressCb | None, start: float, span: float) -> ProgressCb | None:
    """A progress callback mapping 0..1 onto ``start .. start + span`` of ``progress``."""
    return None if progress is None else (lambda m, f: progress(m, start + span * f))


class RunData:
    """Everything needed to evaluate or export one run, read once from the DB."""

    def __init__(self, session: Session, run_id: int, data_dir: Path):
        run = session.get(Run, run_id)
        if run is None:
            raise UnknownRunError(f"no run with id {run_id}")
        if not run.checkpoint_path:
            raise EvaluationError(f"run {run_id} has no checkpoint (status {run.status!r}): train it first")
        self.run_id = run_id
        self.checkpoint = resolve_in_data_dir(run.checkpoint_path, data_dir)
        if not self.checkpoint.is_file():
            raise EvaluationError(f"run {run_id}: checkpoint file is missing ({run.checkpoint_path})")
        ds: Dataset = run.dataset
        self.dataset_id = ds.id
        self.config = dict(run.config or {})
        self.dataset = {"name": ds.name, "num_images": ds.num_images,
                        "split_counts": repo.split_counts(session, ds.id),
                        "health_warnings": list((ds.health or {}).get("warnings", []))}
        self.images = {split: [(resolve_in_data_dir(im.store_path, data_dir), im.label, im.original_name)
                               for im in repo.images_for_dataset(session, ds.id, split)]
                       for split in ("train", "val", "test")}

    def items(self, split: str, classes: list[str]) -> list[EvalItem]:
        unknown = sorted({lab for _, lab, _ in self.images[split] if lab not in classes})
        if unknown:
            raise EvaluationError(f"{split} images have labels {unknown} the model was not trained on ({classes})")
        return [EvalItem(p, classes.index(lab), Path(name).name) for p, lab, name in self.images[split]]


LoadedRun = tuple[RunData, Any]  # (the run's data, core.export.load_trained of its checkpoint)


def load_run(run_id: int, settings: Settings, session_factory: sessionmaker[Session]) -> LoadedRun:
    with session_factory() as session:
        rd = RunData(session, run_id, settings.data_dir)
    return rd, cx.load_trained(rd.checkpoint)


def _json_safe(metrics: dict[str, Any]) -> dict[str, Any]:
    """DB copy of the metrics without the per-point ROC/PR curves (kept in metrics.json)."""
    return {k: v for k, v in metrics.items() if k != "curves"}


def _summary_fields(m: dict[str, Any], tta: bool) -> RunSummary:
    if tta:
        return {"test_accuracy_tta": m["accuracy"]}
    fields: RunSummary = {"test_accuracy": m["accuracy"], "test_balanced_accuracy": m["balanced_accuracy"],
                          "test_macro_f1": m["macro_f1"], "ece": m["calibration"]["before"]["ece"]}
    if iv := m.get("intervals"):  # 95 % ranges, so the leaderboard can show them without the Evaluation row
        fields["test_n"] = iv["n"]
        fields["test_accuracy_lo"], fields["test_accuracy_hi"] = iv["accuracy"]["lo"], iv["accuracy"]["hi"]
        fields["test_macro_f1_lo"], fields["test_macro_f1_hi"] = iv["macro_f1"]["lo"], iv["macro_f1"]["hi"]
    if m["calibration"].get("after"):
        fields["ece_after_temperature"] = m["calibration"]["after"]["ece"]
        fields["temperature"] = m["calibration"]["temperature"]
    return fields


def evaluate_run(run_id: int, *, tta: bool = False, sensitivity: float = 0.95, positive_class: str | None = None,
                 settings: Settings | None = None, session_factory: sessionmaker[Session] | None = None,
                 progress: ProgressCb | None = None, trained: Any = None,
                 test_logits: np.ndarray | None = None, device: str | None = None) -> EvaluationResult:
    """Evaluate a run's best checkpoint on its dataset's test split; store an Evaluation row,
    plots and metrics.json as artifacts.

    ``trained`` (an already loaded checkpoint) and ``test_logits`` (PyTorch logits of the test
    split, e.g. from the export's verification) save recomputing them. A checkpoint loaded here runs
    (Grad-CAM included) on ``device`` (auto, cpu, cuda, cuda:N; default WORKBENCH_DEVICE); a given
    ``trained`` stays where its caller put it.
    """
    s, sf = service_context(settings, session_factory)
    with sf() as session:
        rd = RunData(session, run_id, s.data_dir)
    tm = trained
    if tm is None:
        from core.train.robustness import resolve_device

        where = resolve_device(device or s.device)  # a DeviceError before the checkpoint is read
        tm = cx.load_trained(rd.checkpoint)
        tm.model.to(where)
    classes = list(tm.classes)
    test = rd.items("test", classes)
    if not test:
        raise EvaluationError(f"run {run_id}: the dataset has no test images, so there is nothing honest to "
                              "evaluate on")
    val = rd.items("val", classes)
    out_dir = RunPaths(s, run_id).new_evaluation_dir(tta)
    say(progress, f"evaluating on {len(test)} test images", 0.0)
    res = evaluate_model(tm.model, tm.preprocessing, classes, test, val, out_dir=out_dir, tta=tta,
                         sensitivity=sensitivity, positive_class=positive_class, test_logits=test_logits,
                         progress=scaled(progress, 0.0, 0.9))
    _add_leakage_free(sf, rd.dataset_id, test, res, len(classes), tta)
    with sf.begin() as session:
        ev = Evaluation(run_id=run_id, split="test", metrics=_json_safe(res.metrics), tta=tta)
        session.add(ev)
        session.flush()
        ev_id = ev.id
        plots = {}
        for name, path in res.plots.items():
            kind = "eval_json" if name == "metrics_json" else "plot"
            plots[name] = register_artifact(session, path, s.data_dir, kind=kind, run_id=run_id,
                                            meta={"name": name, "evaluation_id": ev_id, "tta": tta}).id
    update_summary(sf, run_id, _summary_fields(res.metrics, tta))
    say(progress, "evaluation done", 1.0)
    return EvaluationResult(ev_id, res.metrics, plots)


def _add_leakage_free(sf: sessionmaker[Session], dataset_id: int, test: list[EvalItem], res: Any,
                      num_classes: int, tta: bool) -> None:
    """With known leakage (test images copied in train/val), also the score without them."""
    from core.evaluate import leakage_free_metrics
    from workbench.dataset_fixes import leaked_test_flags

    if tta or res.test_logits is None:  # the plain score is the one compared
        return
    with sf() as session:
        leaked = leaked_test_flags(session, dataset_id)
    clean = leakage_free_metrics([it.label for it in test], res.test_logits, leaked, num_classes)
    if clean is not None:
        res.metrics["leakage_free"] = clean


def latest_evaluation(run_id: int, *, tta: bool | None = False, settings: Settings | None = None,
                      session_factory: sessionmaker[Session] | None = None) -> EvaluationRecord | None:
    _, sf = service_context(settings, session_factory)
    with sf() as session:
        stmt = select(Evaluation).where(Evaluation.run_id == run_id, Evaluation.split == "test")
        if tta is not None:
            stmt = stmt.where(Evaluation.tta == tta)
        ev = session.scalars(stmt.order_by(Evaluation.id.desc()).limit(1)).first()
        return None if ev is None else EvaluationRecord(ev.id, ev.created_at, bool(ev.tta), ev.metrics)


@dataclass(frozen=True)
class RunComparison:
    """Whether two runs' test results differ by more than chance (same test images)."""

    run_a: int
    run_b: int
    n: int
    distinguishable: bool
    sentence: str  # plain words for the leaderboard
    detail: dict[str, Any]  # core.metrics.compare_paired's figures ({} when only the ranges were compared)


def compare_runs(run_a: int, run_b: int, *, settings: Settings | None = None,
                 session_factory: sessionmaker[Session] | None = None) -> RunComparison | None:
    """Paired comparison of two evaluated runs (McNemar on the images exactly one gets right).

    Falls back to whether their accuracy ranges overlap when the per-image outcomes are missing
    (evaluations older than this record) or the runs were tested on different images. None when
    either run has no evaluation."""
    from core.metrics import compare_paired, overlapping

    evs = [latest_evaluation(r, settings=settings, session_factory=session_factory) for r in (run_a, run_b)]
    if evs[0] is None or evs[1] is None:
        return None
    ma, mb = evs[0].metrics, evs[1].metrics
    oa, ob = ma.get("outcomes") or {}, mb.get("outcomes") or {}
    if oa.get("correct") and oa.get("test_set") == ob.get("test_set"):
        a = np.array([c == "1" for c in oa["correct"]], dtype=np.int64)
        b = np.array([c == "1" for c in ob["correct"]], dtype=np.int64)
        detail = compare_paired(np.ones_like(a), a, b)
        n, same = detail["n"], not detail["distinguishable"]
    elif ma.get("intervals") and mb.get("intervals"):
        detail = {}
        n = int(ma["intervals"]["n"])
        same = overlapping(ma["intervals"]["accuracy"], mb["intervals"]["accuracy"])
    else:
        return None
    if same:
        sentence = (f"runs {run_a} and {run_b} are within each other's margin on these {n} test images: "
                    "the difference between them may be chance")
    else:
        sentence = f"run {run_a} and run {run_b} really differ on these {n} test images (not chance)"
    return RunComparison(run_a, run_b, n, not same, sentence, detail)
