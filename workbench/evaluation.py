"""Evaluation and export service: runs, files and SQLite records together.

The UI and the CLI call these; ``core`` does the computing. Every file written here is
registered as an artifact (kind, sha256, bytes, run) and checked with ``verify_artifact``
before it is served, so a missing or altered file is reported, never handed out.

Artifact kinds written here: onnx_fp32, onnx_fp16, onnx_int8, onnx_uint8, bundle, plot, eval_json.
"""
from __future__ import annotations

import random
import shutil
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import numpy as np
from sqlalchemy import delete, select
from sqlalchemy.orm import Session, sessionmaker

from core import export as cx
from core.evaluate import EvalItem, evaluate_model
from storage import repositories as repo
from storage.artifacts import ArtifactError, register_artifact, resolve_in_data_dir, verify_artifact
from storage.db import get_sessionmaker
from storage.models import Artifact, Dataset, Evaluation, Run
from workbench.settings import Settings, get_settings

ProgressCb = Callable[[str, float], None]
ONNX_KINDS = ("onnx_fp32", "onnx_fp16", "onnx_int8", "onnx_uint8")


class EvaluationError(RuntimeError):
    """A run cannot be evaluated or exported (user-facing message)."""


# ------------------------------------------------------------------------------------------
# Context helpers
# ------------------------------------------------------------------------------------------
def _ctx(settings: Optional[Settings], session_factory: Optional[sessionmaker[Session]]
         ) -> tuple[Settings, sessionmaker[Session]]:
    s = settings or get_settings()
    s.ensure_dirs()
    return s, session_factory or get_sessionmaker(s.database_url)


def _say(progress: Optional[ProgressCb], msg: str, frac: float) -> None:
    if progress is not None:
        progress(msg, frac)


def _stamp() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-%f")


class _RunData:
    """Everything needed to evaluate/export one run, read once from the DB."""

    def __init__(self, session: Session, run_id: int, data_dir: Path):
        run = session.get(Run, run_id)
        if run is None:
            raise EvaluationError(f"no run with id {run_id}")
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


def _load(run_id: int, s: Settings, Session_: sessionmaker[Session]) -> tuple[_RunData, Any]:
    with Session_() as session:
        rd = _RunData(session, run_id, s.data_dir)
    return rd, cx.load_trained(rd.checkpoint)


def _register(Session_: sessionmaker[Session], s: Settings, path: Path, kind: str, run_id: int,
              meta: dict[str, Any] | None = None) -> int:
    with Session_.begin() as session:
        return register_artifact(session, path, s.data_dir, kind=kind, run_id=run_id, meta=meta).id


def _update_summary(Session_: sessionmaker[Session], run_id: int, fields: dict[str, Any]) -> None:
    with Session_.begin() as session:
        run = session.get(Run, run_id)
        if run is not None:
            # Reassign (not mutate) so SQLAlchemy sees the JSON column change.
            run.summary = {**(run.summary or {}), **fields}


def _json_safe(metrics: dict[str, Any]) -> dict[str, Any]:
    """DB copy of the metrics without the per-point ROC/PR curves (kept in metrics.json)."""
    return {k: v for k, v in metrics.items() if k != "curves"}


# ------------------------------------------------------------------------------------------
# Evaluation
# ------------------------------------------------------------------------------------------
def evaluate_run(run_id: int, *, tta: bool = False, sensitivity: float = 0.95, positive_class: str | None = None,
                 settings: Optional[Settings] = None, session_factory: Optional[sessionmaker[Session]] = None,
                 progress: Optional[ProgressCb] = None, _trained: Any = None,
                 _test_logits: np.ndarray | None = None) -> dict[str, Any]:
    """Evaluate a run's best checkpoint on its dataset's test split; store an Evaluation row,
    plots and metrics.json as artifacts. Returns {evaluation_id, metrics, plots: {name: artifact_id}}."""
    s, Session_ = _ctx(settings, session_factory)
    with Session_() as session:
        rd = _RunData(session, run_id, s.data_dir)
    tm = _trained or cx.load_trained(rd.checkpoint)
    classes = list(tm.classes)
    test = rd.items("test", classes)
    if not test:
        raise EvaluationError(f"run {run_id}: the dataset has no test images, so there is nothing honest to evaluate on")
    val = rd.items("val", classes)
    out_dir = s.runs_dir / str(run_id) / "eval" / (_stamp() + ("-tta" if tta else ""))
    _say(progress, f"evaluating on {len(test)} test images", 0.0)
    res = evaluate_model(tm.model, tm.preprocessing, classes, test, val, out_dir=out_dir, tta=tta,
                         sensitivity=sensitivity, positive_class=positive_class, test_logits=_test_logits,
                         progress=(lambda m, f: _say(progress, m, 0.9 * f)) if progress else None)
    with Session_.begin() as session:
        ev = Evaluation(run_id=run_id, split="test", metrics=_json_safe(res.metrics), tta=tta)
        session.add(ev)
        session.flush()
        ev_id = ev.id
        plots = {}
        for name, path in res.plots.items():
            kind = "eval_json" if name == "metrics_json" else "plot"
            plots[name] = register_artifact(session, path, s.data_dir, kind=kind, run_id=run_id,
                                            meta={"name": name, "evaluation_id": ev_id, "tta": tta}).id
    m = res.metrics
    fields = {"test_accuracy": m["accuracy"], "test_balanced_accuracy": m["balanced_accuracy"],
              "test_macro_f1": m["macro_f1"], "ece": m["calibration"]["before"]["ece"]}
    if m["calibration"].get("after"):
        fields["ece_after_temperature"] = m["calibration"]["after"]["ece"]
        fields["temperature"] = m["calibration"]["temperature"]
    if tta:
        fields = {"test_accuracy_tta": m["accuracy"]}
    _update_summary(Session_, run_id, fields)
    _say(progress, "evaluation done", 1.0)
    return {"evaluation_id": ev_id, "metrics": m, "plots": plots}


def latest_evaluation(run_id: int, *, tta: bool | None = False, settings: Optional[Settings] = None,
                      session_factory: Optional[sessionmaker[Session]] = None) -> dict[str, Any] | None:
    _, Session_ = _ctx(settings, session_factory)
    with Session_() as session:
        stmt = select(Evaluation).where(Evaluation.run_id == run_id, Evaluation.split == "test")
        if tta is not None:
            stmt = stmt.where(Evaluation.tta == tta)
        ev = session.scalars(stmt.order_by(Evaluation.id.desc()).limit(1)).first()
        return None if ev is None else {"id": ev.id, "created_at": ev.created_at, "tta": ev.tta, "metrics": ev.metrics}


# ------------------------------------------------------------------------------------------
# fp32 export (also the automatic post-training step)
# ------------------------------------------------------------------------------------------
def _valid_artifact(Session_: sessionmaker[Session], s: Settings, run_id: int, kind: str) -> Artifact | None:
    """Newest artifact of ``kind`` whose file is intact, else None."""
    with Session_() as session:
        for art in reversed(repo.artifacts_for_run(session, run_id, kind)):
            try:
                verify_artifact(art, s.data_dir)
                return art
            except ArtifactError:
                continue
    return None


def ensure_fp32(run_id: int, *, settings: Optional[Settings] = None,
                session_factory: Optional[sessionmaker[Session]] = None, progress: Optional[ProgressCb] = None,
                latency_runs: int = 20, latency_seconds: float = 10.0, _loaded: tuple[_RunData, Any] | None = None,
                force: bool = False) -> dict[str, Any]:
    """Export fp32 ONNX, verify it on the whole test split, measure ORT latency, register it.

    Reuses an intact earlier export unless ``force``. Returns {artifact_id, path, verification,
    measurements, passed, torch_logits (only when freshly verified)}.
    """
    s, Session_ = _ctx(settings, session_factory)
    if not force:
        art = _valid_artifact(Session_, s, run_id, "onnx_fp32")
        if art is not None:
            meta = art.meta or {}
            return {"artifact_id": art.id, "path": resolve_in_data_dir(art.path, s.data_dir),
                    "verification": meta.get("verification"), "measurements": meta.get("measurements"),
                    "passed": bool(meta.get("verified")), "torch_logits": None}
    rd, tm = _loaded or _load(run_id, s, Session_)
    test = rd.items("test", list(tm.classes))
    path = s.runs_dir / str(run_id) / "export" / "model.onnx"
    _say(progress, "exporting fp32 ONNX", 0.0)
    cx.export_fp32(tm.model, path, tm.preprocessing, tm.classes, tm.variant, run_id)
    _say(progress, f"verifying ONNX Runtime vs PyTorch on {len(test)} test images", 0.1)
    if test:
        ver = cx.verify_onnx(tm.model, path, [it.path for it in test], tm.preprocessing,
                             progress=(lambda m, f: _say(progress, m, 0.1 + 0.6 * f)) if progress else None)
    else:  # still export and time it (the comparison table needs latency), but never offer it
        ver = cx.Verification(0, float("nan"), float("nan"), cx.FP32_TOLERANCE, False,
                              "the test split is empty: the export could not be verified",
                              np.zeros((0, len(tm.classes)), np.float32), np.zeros((0, len(tm.classes)), np.float32))
    _say(progress, "measuring ONNX Runtime latency", 0.7)
    meas = cx.measure_variant(path, tm.preprocessing.resolution, runs=latency_runs, max_seconds=latency_seconds,
                             throughput_runs=min(5, latency_runs))
    y = np.array([it.label for it in test])
    meas["accuracy"] = float((ver.ort_logits.argmax(1) == y).mean()) if len(y) else None
    meta = {"verified": ver.passed, "verification": ver.to_dict(), "measurements": meas, "precision": "fp32",
            "file": "model.onnx"}
    art_id = _register(Session_, s, path, "onnx_fp32", run_id, meta)
    _update_summary(Session_, run_id, {
        "onnx_mb": meas["onnx_mb"], "latency_ms_p50": meas["latency_ms_p50"], "latency_ms_p95": meas["latency_ms_p95"],
        "throughput_images_per_s": meas["throughput_images_per_s"], "latency_machine": meas["machine"],
        "export_verified": ver.passed, "export_max_abs_logit_diff": ver.max_abs_logit_diff,
        "export_top1_agreement": ver.top1_agreement})
    _say(progress, "fp32 export " + ("verified" if ver.passed else f"FAILED verification: {ver.reason}"), 1.0)
    return {"artifact_id": art_id, "path": path, "verification": ver.to_dict(), "measurements": meas,
            "passed": ver.passed, "torch_logits": ver.torch_logits}


# ------------------------------------------------------------------------------------------
# Optimised variants + bundle
# ------------------------------------------------------------------------------------------
def export_run(run_id: int, *, fp16: bool = False, int8: bool = False, uint8_graph: bool = False,
               out_path: str | Path | None = None, calibration_images: int = 64, seed: int = 0,
               latency_runs: int = 20, latency_seconds: float = 10.0, settings: Optional[Settings] = None,
               session_factory: Optional[sessionmaker[Session]] = None,
               progress: Optional[ProgressCb] = None) -> dict[str, Any]:
    """Build the deploy bundle (zip) for a run, with optional fp16 / int8 / uint8-input models.

    Refuses (EvaluationError) when the fp32 export failed verification. Each variant is
    measured (size, latency, throughput, test accuracy and change vs fp32) and registered.
    Returns {bundle_artifact_id, bundle_path, variants: {precision: measurements}, verification}.
    """
    s, Session_ = _ctx(settings, session_factory)
    loaded = _load(run_id, s, Session_)
    rd, tm = loaded
    classes = list(tm.classes)
    test = rd.items("test", classes)
    test_paths = [it.path for it in test]
    y = np.array([it.label for it in test])
    pre = tm.preprocessing

    fp32 = ensure_fp32(run_id, settings=s, session_factory=Session_, progress=progress, latency_runs=latency_runs,
                       latency_seconds=latency_seconds, _loaded=loaded)
    if not fp32["passed"]:
        raise EvaluationError(f"run {run_id}: the fp32 ONNX export failed verification "
                              f"({(fp32['verification'] or {}).get('reason', 'unknown reason')}); it is not offered "
                              "for download")
    fp32_path = Path(fp32["path"])
    base_acc = fp32["measurements"]["accuracy"]
    variants: dict[str, dict[str, Any]] = {"fp32": {**fp32["measurements"], "file": "model.onnx", "accuracy_delta": 0.0}}
    models: dict[str, Path] = {"model.onnx": fp32_path}
    export_dir = s.runs_dir / str(run_id) / "export"

    def add_variant(precision: str, path: Path) -> None:
        _say(progress, f"measuring {precision}", 0.5)
        meas = cx.measure_variant(path, pre.resolution, runs=latency_runs, max_seconds=latency_seconds,
                                 throughput_runs=min(5, latency_runs))
        logits = cx.ort_logits(path, test_paths, pre)
        meas["accuracy"] = float((logits.argmax(1) == y).mean())
        meas["accuracy_delta"] = meas["accuracy"] - base_acc  # reported, never hidden
        meas["top1_agreement_vs_fp32"] = float((logits.argmax(1) == fp32_logits.argmax(1)).mean())
        meas["file"] = path.name
        _register(Session_, s, path, f"onnx_{precision}", run_id, {"precision": precision, "measurements": meas})
        variants[precision] = meas
        models[path.name] = path

    if fp16 or int8:
        fp32_logits = cx.ort_logits(fp32_path, test_paths, pre)
    if fp16:
        _say(progress, "converting to fp16", 0.3)
        add_variant("fp16", cx.convert_fp16(fp32_path, export_dir / "model_fp16.onnx"))
    if int8:
        train = [p for p, _, _ in rd.images["train"]]
        if not train:
            raise EvaluationError(f"run {run_id}: int8 calibration needs training images and the train split is empty")
        calib = random.Random(seed).sample(train, min(calibration_images, len(train)))
        _say(progress, f"quantising to int8 (calibrating on {len(calib)} training images)", 0.4)
        add_variant("int8", cx.quantize_int8(fp32_path, export_dir / "model_int8.onnx", calib, pre))
    uint8_info = None
    if uint8_graph:
        p8 = cx.build_uint8_graph(fp32_path, export_dir / "model_uint8.onnx", pre)
        uint8_info = cx.uint8_agreement(p8, fp32_path, test_paths, pre)
        _register(Session_, s, p8, "onnx_uint8", run_id, {"agreement": uint8_info})
        models[p8.name] = p8

    ev = latest_evaluation(run_id, settings=s, session_factory=Session_)
    if ev is None:
        _say(progress, "no evaluation yet: evaluating on the test split", 0.7)
        evaluate_run(run_id, settings=s, session_factory=Session_, _trained=tm)
        ev = latest_evaluation(run_id, settings=s, session_factory=Session_)
    info = {"title": f"{rd.dataset['name']} / {tm.variant} (run {run_id})", "run_id": run_id, "classes": classes,
            "variant": tm.variant, "preprocessing": pre, "dataset": rd.dataset, "config": rd.config,
            "seed": rd.config.get("seed", "n/a"), "metrics": ev["metrics"] if ev else None,
            "verification": fp32["verification"], "variants": variants, "uint8_graph": uint8_info}
    bundle = cx.build_bundle(export_dir / f"bundle-{_stamp()}.zip", models, info)
    bundle_id = _register(Session_, s, bundle, "bundle", run_id,
                          {"files": sorted(models), "variants": {k: {kk: v[kk] for kk in
                           ("onnx_mb", "latency_ms_p50", "latency_ms_p95", "throughput_images_per_s",
                            "accuracy", "accuracy_delta")} for k, v in variants.items()}})
    if out_path is not None:
        out_path = Path(out_path)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(artifact_for_download(bundle_id, settings=s, session_factory=Session_), out_path)
    _say(progress, "bundle ready", 1.0)
    return {"bundle_artifact_id": bundle_id, "bundle_path": bundle, "variants": variants,
            "verification": fp32["verification"], "uint8_graph": uint8_info, "out_path": out_path}


# ------------------------------------------------------------------------------------------
# Artifacts: listing, download, deletion
# ------------------------------------------------------------------------------------------
def list_artifacts(run_id: int, *, settings: Optional[Settings] = None,
                   session_factory: Optional[sessionmaker[Session]] = None) -> list[dict[str, Any]]:
    """Every artifact of a run with its integrity status ('ok', or why it cannot be served)."""
    s, Session_ = _ctx(settings, session_factory)
    out = []
    with Session_() as session:
        for a in repo.artifacts_for_run(session, run_id):
            try:
                verify_artifact(a, s.data_dir)
                status = "ok"
                if a.kind == "onnx_fp32" and not (a.meta or {}).get("verified", False):
                    status = "failed verification"
            except ArtifactError as e:
                status = str(e)
            out.append({"id": a.id, "kind": a.kind, "path": a.path, "bytes": a.bytes, "sha256": a.sha256,
                        "created_at": a.created_at, "meta": a.meta, "status": status})
    return out


def artifact_for_download(artifact_id: int, *, settings: Optional[Settings] = None,
                          session_factory: Optional[sessionmaker[Session]] = None) -> Path:
    """Absolute path of an intact, servable artifact; raises ArtifactError otherwise."""
    s, Session_ = _ctx(settings, session_factory)
    with Session_() as session:
        a = session.get(Artifact, artifact_id)
        if a is None:
            raise ArtifactError(f"no artifact with id {artifact_id}")
        path = verify_artifact(a, s.data_dir)  # missing or altered -> ArtifactError
        if a.kind == "onnx_fp32" and not (a.meta or {}).get("verified", False):
            raise ArtifactError(f"artifact #{a.id}: this fp32 export failed verification and is not offered "
                                f"for download ({(a.meta or {}).get('verification', {}).get('reason', '')})")
        return path


def delete_run(run_id: int, *, settings: Optional[Settings] = None,
               session_factory: Optional[sessionmaker[Session]] = None) -> dict[str, Any]:
    """Delete a run: its artifact files, its run folder, and its rows (evaluations, artifacts,
    metrics, events cascade). Returns {files_removed, run_dir_removed}."""
    s, Session_ = _ctx(settings, session_factory)
    removed = 0
    with Session_.begin() as session:
        run = session.get(Run, run_id)
        if run is None:
            raise EvaluationError(f"no run with id {run_id}")
        if run.status in ("running", "queued") and run.worker_pid:
            raise EvaluationError(f"run {run_id} is {run.status}: cancel it before deleting")
        paths = [a.path for a in repo.artifacts_for_run(session, run_id)]
        if run.checkpoint_path:
            paths.append(run.checkpoint_path)
        for rel in paths:
            try:
                p = resolve_in_data_dir(rel, s.data_dir)
            except ArtifactError:
                continue  # never delete outside the data dir
            if p.is_file():
                p.unlink()
                removed += 1
        session.execute(delete(Artifact).where(Artifact.run_id == run_id))
        session.execute(delete(Run).where(Run.id == run_id))
    run_dir = (s.runs_dir / str(run_id)).resolve()
    existed = run_dir.is_dir()
    if existed and s.data_dir.resolve() in run_dir.parents:
        shutil.rmtree(run_dir)
    return {"files_removed": removed, "run_dir_removed": existed}


__all__ = ["EvaluationError", "evaluate_run", "latest_evaluation", "ensure_fp32", "export_run", "list_artifacts",
           "artifact_for_download", "delete_run", "ArtifactError"]
