"""What happens automatically after a training job succeeds, and the ``evaluate`` / ``export`` handlers.

``after_training`` exports fp32 ONNX, verifies it with ONNX Runtime over the WHOLE test split,
measures ORT latency (p50/p95 at batch 1, throughput at batch 32) and evaluates on the test
split, so every run in the comparison table has measured latency, size and honest test metrics.
While it runs the run is ``verifying`` (see workbench/handlers/train.py); its progress messages
say which step, "step k of n", and ``verify_estimate_s`` sizes the work for the overall ETA.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from storage.artifacts import ArtifactError
from storage.models import Run
from workbench import evaluations, exports
from workbench.evaluations import EvaluationError
from workbench.jobs import JobContext, JobOutcome
from workbench.settings import Settings
from workbench.status import JobStatus
from workbench.summary import RunSummary, read_summary, update_summary

VERIFY_STEPS = ("exporting and checking the ONNX model", "evaluating on the test split")
# Rough cost of one image through decode + lite0 at 224 px on 2 CPU cores, for the ETA shown
# before the verification has a pace of its own (it then follows the measured pace).
SECONDS_PER_IMAGE_224 = 0.04
FIXED_VERIFY_SECONDS = 15.0  # export, ONNX Runtime sessions, plots and the evaluation's files


def verify_estimate_s(n_test: int, n_val: int, resolution: int, latency_seconds: float = 10.0) -> float:
    """Seconds the post-training step should take: PyTorch and ONNX Runtime over the test split
    (verification), one pass over validation (temperature, out-of-distribution threshold), the
    latency measurement and about a dozen Grad-CAM images."""
    per_image = SECONDS_PER_IMAGE_224 * (max(resolution, 32) / 224) ** 2
    return FIXED_VERIFY_SECONDS + latency_seconds + per_image * (2 * n_test + n_val + 12)


def _step(progress: Callable[[str, float], None] | None, k: int, lo: float, width: float
          ) -> Callable[[str, float], None] | None:
    """Progress of step k (1-based) of VERIFY_STEPS, as a share [lo, lo + width] of the whole."""
    if progress is None:
        return None
    head = f"step {k} of {len(VERIFY_STEPS)}, {VERIFY_STEPS[k - 1]}"
    return lambda m, f: progress(f"{head}: {m}", lo + width * min(max(f, 0.0), 1.0))


@dataclass(frozen=True)
class AfterTraining:
    export: dict[str, Any]  # the fp32 export (exports.Fp32Export without the logits)
    evaluation_id: int | None
    summary: RunSummary


def after_training(session_factory: sessionmaker[Session], settings: Settings, run_id: int,
                   progress: Callable[[str, float], None] | None = None, *, latency_runs: int = 20,
                   latency_seconds: float = 10.0) -> AfterTraining:
    """fp32 export + verification + latency + test evaluation for a freshly trained run.

    A failed verification is recorded (summary.export_verified = False) rather than raised: the
    run itself succeeded.
    """
    loaded = evaluations.load_run(run_id, settings, session_factory)
    exp = exports.ensure_fp32(run_id, settings=settings, session_factory=session_factory, force=True, loaded=loaded,
                              latency_runs=latency_runs, latency_seconds=latency_seconds,
                              progress=_step(progress, 1, 0.0, 0.6))
    evaluation_id = None
    try:  # the verification already ran PyTorch over the test split: reuse those logits
        evaluation_id = evaluations.evaluate_run(run_id, settings=settings, session_factory=session_factory,
                                                 trained=loaded[1], test_logits=exp.torch_logits,
                                                 progress=_step(progress, 2, 0.6, 0.4)).evaluation_id
    except EvaluationError as e:  # e.g. no test split: the training run still succeeded
        update_summary(session_factory, run_id, {"evaluation_error": str(e)})
    with session_factory() as session:
        run = session.get(Run, run_id)
        summary = read_summary(run) if run else RunSummary()
    export = {k: v for k, v in asdict(exp).items() if k != "torch_logits"}
    return AfterTraining(export, evaluation_id, summary)


def _job_progress(ctx: JobContext) -> Callable[[str, float], None]:
    return lambda m, f: ctx.progress({"phase": ctx.kind, "message": m, "fraction": f})


def handle_evaluate(ctx: JobContext) -> JobOutcome:
    """payload: tta (bool), sensitivity (float), positive_class (str | None)."""
    p = ctx.payload
    assert ctx.run_id is not None, "evaluate jobs carry a run id"
    try:
        out = evaluations.evaluate_run(ctx.run_id, tta=bool(p.get("tta", False)),
                                       sensitivity=float(p.get("sensitivity", 0.95)),
                                       positive_class=p.get("positive_class"), settings=ctx.settings,
                                       session_factory=ctx.session_factory, progress=_job_progress(ctx))
    except (EvaluationError, ValueError) as e:
        return JobOutcome(JobStatus.FAILED, str(e))
    ctx.event(f"Evaluation #{out.evaluation_id} on the test split: accuracy {out.metrics['accuracy']:.4f}.")
    return JobOutcome(JobStatus.SUCCEEDED)


def handle_export(ctx: JobContext) -> JobOutcome:
    """payload: fp16, int8, uint8_graph (bools)."""
    p = ctx.payload
    assert ctx.run_id is not None, "export jobs carry a run id"
    try:
        out = exports.export_run(ctx.run_id, fp16=bool(p.get("fp16")), int8=bool(p.get("int8")),
                                 uint8_graph=bool(p.get("uint8_graph")), settings=ctx.settings,
                                 session_factory=ctx.session_factory, progress=_job_progress(ctx))
    except (EvaluationError, ArtifactError, ValueError) as e:
        return JobOutcome(JobStatus.FAILED, str(e))
    ctx.event(f"Deploy bundle ready (artifact #{out.bundle_artifact_id}).", data={
        k: {kk: v[kk] for kk in ("onnx_mb", "latency_ms_p50", "accuracy", "accuracy_delta")}
        for k, v in out.variants.items()})
    return JobOutcome(JobStatus.SUCCEEDED)
