"""Job handlers for the UI's own long work: ``ingest`` and ``predict`` (light lane), ``measure`` (train lane).

The Streamlit pages never do slow work in the server process: they stage what the user
uploaded into the data dir and submit a job (workbench.submit). The light-lane worker runs
these handlers, so refreshing the tab, closing the browser or restarting the server loses
nothing, and a long training (train lane) never delays them. ``export`` and ``evaluate`` live
in workbench.handlers.postrun.

Payloads hold paths relative to the data dir:

* ``ingest``: upload (``tmp/uploads/<id>/<file>``), csv (optional, same folder), name,
  filename (as the user named it), group_regex, seed. The upload folder is removed when the
  job ends, whatever the outcome.
* ``predict``: files ([{name, path}] under ``tmp/predict/<id>/``), top_k, gradcam, out_dir;
  the result (``results``, ``classes``, ``calibration``) is merged into the job's payload for the
  page. Probabilities are calibrated with the run's latest evaluation (temperature, threshold).
* ``measure``: budget (a recommender budget dict, device ``this-machine``). Measures ONNX
  Runtime latency on this machine (the calibration set, then the candidates that decide the
  answer), caching every figure in the benchmarks table; the result is ``measured`` (keys).
  It runs on the train lane, so it never times models while a training holds the cores.
"""
from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from storage.artifacts import resolve_in_data_dir
from storage.models import Run
from workbench import datasets, evaluations, recommend
from workbench.jobs import JobContext, JobOutcome, friendly
from workbench.paths import PREDICT, UPLOADS, in_import_dir, in_staging, staging_dir
from workbench.status import JobStatus

if TYPE_CHECKING:
    from core.bundle import Calibration

log = logging.getLogger("workbench.handlers.tasks")


def _throttled(ctx: JobContext, every: float = 0.5) -> Callable[[int, int], None]:
    """A (done, total) ingest progress callback writing the job's progress at most every ``every`` s."""
    last = [0.0]

    def cb(done: int, total: int) -> None:
        now = time.monotonic()
        if done >= total or now - last[0] >= every:
            last[0] = now
            ctx.progress({"phase": "ingesting", "done": int(done), "total": int(total),
                          "fraction": (done / total) if total else 0.0})

    return cb


def _ingest_source(ctx: JobContext) -> tuple[Path, Path | None, Path | None]:
    """(source, manifest, staged folder to remove afterwards) of an ingest job: an upload staged
    under ``tmp/uploads/``, or an entry of the import dir (read in place, never removed)."""
    p = ctx.payload
    if p.get("import"):
        return in_import_dir(ctx.settings, str(p["import"])), None, None
    src = in_staging(ctx.settings, str(p.get("upload") or ""), UPLOADS)
    folder = src.parent if src.parent != staging_dir(ctx.settings, UPLOADS).resolve() else None
    return src, (in_staging(ctx.settings, p["csv"], UPLOADS) if p.get("csv") else None), folder


def handle_ingest(ctx: JobContext) -> JobOutcome:
    p = ctx.payload
    folder = None
    try:
        src, csv, folder = _ingest_source(ctx)
        ctx.progress({"phase": "reading the upload", "done": 0, "total": 0, "fraction": 0.0})
        info = datasets.add_dataset(src, p["name"], csv=csv, group_regex=p.get("group_regex") or None,
                                    seed=int(p.get("seed") or 0), progress=_throttled(ctx), settings=ctx.settings)
        ctx.progress({"phase": "done", "done": info.num_images, "total": info.num_images, "fraction": 1.0})
        ctx.save_result({"dataset_id": info.id})
        return JobOutcome(JobStatus.SUCCEEDED)
    except Exception as exc:  # noqa: BLE001 - a bad upload is the user's problem to read, not a crash
        log.warning("ingest job %s failed", ctx.job_id, exc_info=True)
        return JobOutcome(JobStatus.FAILED, friendly(exc))
    finally:
        try:
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)
            elif p.get("upload"):
                in_staging(ctx.settings, p["upload"], UPLOADS).unlink(missing_ok=True)
        except (OSError, ValueError):
            pass


def predict_images(model_path: Path, files: list[tuple[str, Path]], top_k: int, gradcam: bool, out_dir: Path,
                   progress: Callable[[str, float], None], calibration: Calibration | None = None,
                   device: str = "cpu") -> dict[str, Any]:
    """Top-k probabilities (+ Grad-CAM overlay PNGs in ``out_dir``) for image files, with core.

    Probabilities are softmax(logits / T) with ``calibration``'s temperature (the run's latest
    evaluation; none: not calibrated), and two-class models get the threshold's decision. The
    model and its Grad-CAM run on ``device`` (auto, cpu, cuda, cuda:N: the worker's settings)."""
    import numpy as np
    import torch
    from PIL import Image as PILImage

    from core import gradcam as gc
    from core.bundle import Calibration, confidence_sentence
    from core.export import load_trained
    from core.images import load_rgb
    from core.preprocessing import preprocess, resize_and_crop
    from core.train.robustness import resolve_device
    from workbench.compute import torch_device_words

    where = resolve_device(device)  # a DeviceError (plain words) before the model is read
    progress("loading the model", 0.05)
    tm = load_trained(model_path)
    tm.model.to(where)
    cal = calibration or Calibration(note="not calibrated: the model has not been evaluated")
    if cal.positive_class is not None and cal.positive_class not in tm.classes:
        raise ValueError(f"the evaluation's positive class {cal.positive_class!r} is not one of the model's classes")
    out_dir.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    for i, (name, src) in enumerate(files):
        progress(f"image {i + 1} of {len(files)}", 0.1 + 0.9 * i / len(files))
        try:
            img = load_rgb(src)
        except Exception as exc:  # noqa: BLE001 - one bad file does not sink the batch
            results.append({"name": name, "error": friendly(exc)})
            continue
        x = preprocess(img, tm.preprocessing)[None].astype(np.float32)
        with torch.inference_mode():
            logits = tm.model(torch.from_numpy(x).to(where)).float().cpu().numpy()
        probs = cal.probabilities(logits)[0]
        order = np.argsort(-probs)[:top_k]
        entry: dict[str, Any] = {"name": name, "top": [{"class": tm.classes[j], "p": float(probs[j])} for j in order]}
        decided = cal.decide(probs, tm.classes)
        if decided is not None:
            entry["decision"], entry["p_positive"] = decided
        if (ood := cal.outside(logits)) is not None:
            entry["ood_score"], entry["outside_training_data"] = float(ood[0][0]), bool(ood[1][0])
        if gradcam:
            cam = gc.grad_cam(tm.model, x, int(order[0]))
            base = np.asarray(resize_and_crop(img, tm.preprocessing), dtype=np.uint8)
            over = out_dir / f"cam{i}.png"
            PILImage.fromarray(gc.overlay(base, cam)).save(over)
            entry["overlay"] = str(over)
        results.append(entry)
    record = cal.record or {"note": cal.note}
    return {"results": results, "classes": list(tm.classes), "runs_on": torch_device_words(where),
            "calibration": {"temperature": cal.temperature, "calibrated": cal.calibrated, "note": cal.note,
                            "confidence": confidence_sentence(record),
                            "positive_class": cal.positive_class, "negative_class": cal.negative_class,
                            "threshold": cal.threshold, "chosen_on": (record.get("decision") or {}).get("chosen_on"),
                            "description": cal.describe(), "ood_threshold": cal.ood_threshold}}


def _run_calibration(ctx: JobContext, run_id: int | None) -> Calibration:
    """Temperature and two-class threshold of the run's latest evaluation, as its bundle has them."""
    from core.bundle import Calibration

    ev = None if run_id is None else evaluations.latest_evaluation(run_id, settings=ctx.settings,
                                                                   session_factory=ctx.session_factory)
    metrics = ev.metrics if ev else None
    return Calibration.from_metrics(metrics, list((metrics or {}).get("classes") or []))


def handle_predict(ctx: JobContext) -> JobOutcome:
    p = ctx.payload
    run_id = ctx.run_id if ctx.run_id is not None else p.get("run_id")
    with ctx.session_factory() as s:
        run = s.get(Run, run_id) if run_id is not None else None
        if run is None or not run.checkpoint_path:
            return JobOutcome(JobStatus.FAILED, f"Run #{run_id} has no trained model.")
        ckpt = resolve_in_data_dir(run.checkpoint_path, ctx.settings.data_dir)
    try:
        files = [(f["name"], in_staging(ctx.settings, f["path"], PREDICT)) for f in p.get("files", [])]
        out_dir = in_staging(ctx.settings, p["out_dir"], PREDICT) if p.get("out_dir") else files[0][1].parent
        res = predict_images(ckpt, files, int(p.get("top_k") or 3), bool(p.get("gradcam", True)), out_dir,
                             lambda m, f: ctx.progress({"phase": m, "fraction": f}), _run_calibration(ctx, run_id),
                             device=ctx.settings.device)
    except Exception as exc:  # noqa: BLE001 - shown on the page
        log.warning("predict job %s failed", ctx.job_id, exc_info=True)
        return JobOutcome(JobStatus.FAILED, friendly(exc))
    ctx.save_result(res)
    ctx.progress({"phase": "done", "fraction": 1.0})
    return JobOutcome(JobStatus.SUCCEEDED)


def handle_measure(ctx: JobContext) -> JobOutcome:
    """The recommender's "measure on this machine" (``workbench recommend --measure``) as a job."""
    steps = [0]

    def progress(message: str) -> None:
        # Two measuring passes of about four messages each: a rough fraction is enough here.
        steps[0] += 1
        ctx.progress({"phase": message, "fraction": min(0.95, steps[0] / 8)})

    try:
        ctx.progress({"phase": "exporting the models to measure", "fraction": 0.0})
        rec = recommend.recommend_for(dict(ctx.payload.get("budget") or {}), measure=True,
                                              check_hub=False, progress=progress)
    except Exception as exc:  # noqa: BLE001 - shown on the page
        log.warning("measure job %s failed", ctx.job_id, exc_info=True)
        return JobOutcome(JobStatus.FAILED, friendly(exc))
    measured = sorted(c["key"] for c in [*rec["ranked"], *rec["excluded"]]
                      if str(c.get("latency_source", "")).startswith("measured"))
    ctx.progress({"phase": "done", "fraction": 1.0})
    ctx.save_result({"measured": measured})
    return JobOutcome(JobStatus.SUCCEEDED)
