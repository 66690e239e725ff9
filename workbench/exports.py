"""Export service: verified fp32 ONNX (also the automatic post-training step), optional
fp16 / int8 / uint8-input models, and the deploy bundle; each file registered as an artifact.
"""
from __future__ import annotations

import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy.orm import Session, sessionmaker

from core import export as cx
from storage import repositories as repo
from storage.artifacts import ArtifactError, register_artifact, resolve_in_data_dir, verify_artifact
from storage.models import Artifact
from workbench.artifacts import artifact_for_download
from workbench.evaluations import (
    EvaluationError,
    LoadedRun,
    ProgressCb,
    evaluate_run,
    latest_evaluation,
    load_run,
    say,
    scaled,
)
from workbench.paths import RunPaths
from workbench.settings import Settings, service_context
from workbench.summary import update_summary

BUNDLE_VARIANT_KEYS = ("onnx_mb", "latency_ms_p50", "latency_ms_p95", "throughput_images_per_s", "latency_on",
                       "accuracy", "accuracy_delta", "latency_note", "latency_conditions")


@dataclass(frozen=True)
class Fp32Export:
    artifact_id: int
    path: Path
    verification: dict[str, Any] | None
    measurements: dict[str, Any] | None
    passed: bool
    torch_logits: np.ndarray | None = None  # only when freshly verified


@dataclass(frozen=True)
class ExportResult:
    bundle_artifact_id: int
    bundle_path: Path
    variants: dict[str, dict[str, Any]]  # precision -> measurements
    verification: dict[str, Any] | None
    uint8_graph: dict[str, Any] | None
    out_path: Path | None


def _register(sf: sessionmaker[Session], s: Settings, path: Path, kind: str, run_id: int,
              meta: dict[str, Any] | None = None) -> int:
    with sf.begin() as session:
        return register_artifact(session, path, s.data_dir, kind=kind, run_id=run_id, meta=meta).id


def _valid_artifact(sf: sessionmaker[Session], s: Settings, run_id: int, kind: str) -> Artifact | None:
    """Newest artifact of ``kind`` whose file is intact, else None."""
    with sf() as session:
        for art in reversed(repo.artifacts_for_run(session, run_id, kind)):
            try:
                verify_artifact(art, s.data_dir)
                return art
            except ArtifactError:
                continue
    return None


def _reuse(art: Artifact, s: Settings) -> Fp32Export:
    meta = art.meta or {}
    return Fp32Export(art.id, resolve_in_data_dir(art.path, s.data_dir), meta.get("verification"),
                      meta.get("measurements"), bool(meta.get("verified")))


def ensure_fp32(run_id: int, *, settings: Settings | None = None,
                session_factory: sessionmaker[Session] | None = None, progress: ProgressCb | None = None,
                latency_runs: int = 20, latency_seconds: float = 10.0, loaded: LoadedRun | None = None,
                force: bool = False) -> Fp32Export:
    """Export fp32 ONNX, verify it on the whole test split, measure ORT latency, register it.

    Reuses an intact earlier export unless ``force``.
    """
    s, sf = service_context(settings, session_factory)
    if not force and (art := _valid_artifact(sf, s, run_id, "onnx_fp32")) is not None:
        return _reuse(art, s)
    rd, tm = loaded or load_run(run_id, s, sf)
    test = rd.items("test", list(tm.classes))
    path = RunPaths(s, run_id).fp32_onnx
    say(progress, "exporting fp32 ONNX", 0.0)
    cx.export_fp32(tm.model, path, tm.preprocessing, tm.classes, tm.variant, run_id)
    say(progress, f"verifying ONNX Runtime vs PyTorch on {len(test)} test images", 0.1)
    if test:
        ver = cx.verify_onnx(tm.model, path, [it.path for it in test], tm.preprocessing,
                             progress=scaled(progress, 0.1, 0.6))
    else:  # still export and time it (the comparison table needs latency), but never offer it
        ver = cx.Verification(0, float("nan"), float("nan"), cx.FP32_TOLERANCE, False,
                              "the test split is empty: the export could not be verified",
                              np.zeros((0, len(tm.classes)), np.float32), np.zeros((0, len(tm.classes)), np.float32))
    say(progress, "measuring ONNX Runtime latency", 0.7)
    meas = cx.measure_variants({"fp32": path}, tm.preprocessing.resolution, runs=latency_runs,
                               max_seconds=latency_seconds, throughput_runs=min(5, latency_runs),
                               say=lambda msg: say(progress, msg, 0.7), device=s.device)["fp32"]
    y = np.array([it.label for it in test])
    ort = ver.ort_logits
    meas["accuracy"] = float((ort.argmax(1) == y).mean()) if len(y) and ort is not None else None
    meta = {"verified": ver.passed, "verification": ver.to_dict(), "measurements": meas, "precision": "fp32",
            "file": "model.onnx"}
    art_id = _register(sf, s, path, "onnx_fp32", run_id, meta)
    # A busy machine leaves the speeds None with a note ("not measured: the computer is busy ..."):
    # the run still succeeds, and no earlier figure stays in the summary as if it were this one.
    update_summary(sf, run_id, {
        "onnx_mb": meas["onnx_mb"], "latency_ms_p50": meas["latency_ms_p50"], "latency_ms_p95": meas["latency_ms_p95"],
        "throughput_images_per_s": meas["throughput_images_per_s"], "latency_machine": meas["machine"],
        "latency_conditions": meas["latency_conditions"], "latency_note": meas["latency_note"],
        "latency_provider": meas["latency_provider"],
        "export_verified": ver.passed, "export_max_abs_logit_diff": ver.max_abs_logit_diff,
        "export_top1_agreement": ver.top1_agreement})
    say(progress, "fp32 export " + ("verified" if ver.passed else f"FAILED verification: {ver.reason}"), 1.0)
    return Fp32Export(art_id, path, ver.to_dict(), meas, ver.passed, ver.torch_logits)


class _Variants:
    """The bundle's models and their measurements, fp32 first (the reference)."""

    def __init__(self, fp32: Fp32Export, test_paths: list[Path], y: np.ndarray, pre: Any,
                 latency_runs: int, latency_seconds: float, device: str = "cpu"):
        assert fp32.measurements is not None
        self.fp32_path = Path(fp32.path)
        self.base_acc = fp32.measurements["accuracy"]
        self.variants: dict[str, dict[str, Any]] = {
            "fp32": {**fp32.measurements, "file": "model.onnx", "accuracy_delta": 0.0}}
        self.models: dict[str, Path] = {"model.onnx": self.fp32_path}
        self.test_paths, self.y, self.pre = test_paths, y, pre
        self.latency_runs, self.latency_seconds = latency_runs, latency_seconds
        self.device = device  # where ONNX Runtime times them (settings.device)
        self._fp32_logits: np.ndarray | None = None

    def measure(self, precision: str, path: Path) -> dict[str, Any]:
        """Size and test accuracy of one variant; its speed is timed later with all the others
        (``time_side_by_side``)."""
        if self._fp32_logits is None:
            self._fp32_logits = cx.ort_logits(self.fp32_path, self.test_paths, self.pre)
        fp32_logits: np.ndarray = self._fp32_logits
        meas: dict[str, Any] = {"onnx_mb": path.stat().st_size / 1e6, "bytes": path.stat().st_size}
        logits = cx.ort_logits(path, self.test_paths, self.pre)
        meas["accuracy"] = float((logits.argmax(1) == self.y).mean())
        meas["accuracy_delta"] = meas["accuracy"] - self.base_acc  # reported, never hidden
        meas["top1_agreement_vs_fp32"] = float((logits.argmax(1) == fp32_logits.argmax(1)).mean())
        meas["file"] = path.name
        self.variants[precision] = meas
        self.models[path.name] = path
        return meas

    def time_side_by_side(self, progress: ProgressCb | None) -> None:
        """Time every precision of this export (fp32 included, never an earlier export's figure)
        in one sitting, round-robin, so the table compares them under the same conditions."""
        say(progress, f"measuring the speed of {', '.join(self.variants)} side by side", 0.8)
        paths = {p: self.fp32_path if p == "fp32" else self.models[v["file"]] for p, v in self.variants.items()}
        speeds = cx.measure_variants(paths, self.pre.resolution, runs=self.latency_runs,
                                     max_seconds=self.latency_seconds, throughput_runs=min(5, self.latency_runs),
                                     say=lambda msg: say(progress, msg, 0.8), device=self.device)
        for precision, speed in speeds.items():
            self.variants[precision].update(speed)


def export_run(run_id: int, *, fp16: bool = False, int8: bool = False, uint8_graph: bool = False,
               out_path: str | Path | None = None, calibration_images: int = 64, seed: int = 0,
               latency_runs: int = 20, latency_seconds: float = 10.0, settings: Settings | None = None,
               session_factory: sessionmaker[Session] | None = None,
               progress: ProgressCb | None = None) -> ExportResult:
    """Build the deploy bundle (zip) for a run, with optional fp16 / int8 / uint8-input models.

    Refuses (EvaluationError) when the fp32 export failed verification. Each variant is
    measured (size, latency, throughput, test accuracy and change vs fp32) and registered.
    """
    s, sf = service_context(settings, session_factory)
    rd, tm = loaded = load_run(run_id, s, sf)
    classes = list(tm.classes)
    test = rd.items("test", classes)
    pre = tm.preprocessing
    fp32 = ensure_fp32(run_id, settings=s, session_factory=sf, progress=progress, latency_runs=latency_runs,
                       latency_seconds=latency_seconds, loaded=loaded)
    if not fp32.passed:
        raise EvaluationError(f"run {run_id}: the fp32 ONNX export failed verification "
                              f"({(fp32.verification or {}).get('reason', 'unknown reason')}); it is not offered "
                              "for download")
    paths = RunPaths(s, run_id)
    out = _Variants(fp32, [it.path for it in test], np.array([it.label for it in test]), pre, latency_runs,
                    latency_seconds, s.device)

    def add(precision: str, path: Path) -> None:
        say(progress, f"measuring {precision}", 0.5)
        _register(sf, s, path, f"onnx_{precision}", run_id, {"precision": precision,
                                                               "measurements": out.measure(precision, path)})

    if fp16:
        say(progress, "converting to fp16", 0.3)
        add("fp16", cx.convert_fp16(out.fp32_path, paths.export_dir / "model_fp16.onnx"))
    if int8:
        train = [p for p, _, _ in rd.images["train"]]
        if not train:
            raise EvaluationError(f"run {run_id}: int8 calibration needs training images and the train split is empty")
        calib = random.Random(seed).sample(train, min(calibration_images, len(train)))
        say(progress, f"quantising to int8 (calibrating on {len(calib)} training images)", 0.4)
        add("int8", cx.quantize_int8(out.fp32_path, paths.export_dir / "model_int8.onnx", calib, pre))
    uint8_info = None
    if uint8_graph:
        p8 = cx.build_uint8_graph(out.fp32_path, paths.export_dir / "model_uint8.onnx", pre)
        uint8_info = cx.uint8_agreement(p8, out.fp32_path, out.test_paths, pre)
        _register(sf, s, p8, "onnx_uint8", run_id, {"agreement": uint8_info})
        out.models[p8.name] = p8
    out.time_side_by_side(progress)

    ev = latest_evaluation(run_id, settings=s, session_factory=sf)
    if ev is None:
        say(progress, "no evaluation yet: evaluating on the test split", 0.7)
        evaluate_run(run_id, settings=s, session_factory=sf, trained=tm)
        ev = latest_evaluation(run_id, settings=s, session_factory=sf)
    info = {"title": f"{rd.dataset['name']} / {tm.variant} (run {run_id})", "run_id": run_id, "classes": classes,
            "variant": tm.variant, "preprocessing": pre, "dataset": rd.dataset, "config": rd.config,
            "seed": rd.config.get("seed", "n/a"), "metrics": ev.metrics if ev else None,
            "verification": fp32.verification, "variants": out.variants, "uint8_graph": uint8_info}
    bundle = cx.build_bundle(paths.new_bundle(), out.models, info, key=s.bundle_key)
    bundle_id = _register(sf, s, bundle, "bundle", run_id, {
        "files": sorted(out.models),
        "variants": {k: {kk: v.get(kk) for kk in BUNDLE_VARIANT_KEYS} for k, v in out.variants.items()}})
    copied = None
    if out_path is not None:
        copied = Path(out_path)
        copied.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(artifact_for_download(bundle_id, settings=s, session_factory=sf), copied)
    say(progress, "bundle ready", 1.0)
    return ExportResult(bundle_id, bundle, out.variants, fp32.verification, uint8_info, copied)
