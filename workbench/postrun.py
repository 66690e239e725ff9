"""What happens automatically after a training job succeeds.

``after_training`` (called by workbench.jobs) exports fp32 ONNX, verifies it with ONNX Runtime
over the WHOLE test split, measures ORT latency (p50/p95 at batch 1, throughput at batch 32)
and evaluates on the test split, so every run in the comparison table has measured latency,
size and honest test metrics (runs.summary: latency_ms_p50, onnx_mb, test_accuracy, ...).
"""
from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, Optional

from sqlalchemy.orm import Session, sessionmaker

from workbench import evaluation as ev
from workbench.settings import Settings


def _adapt(progress_cb: Optional[Callable[..., Any]]) -> Optional[Callable[[str, float], None]]:
    """Accept progress callbacks taking (message, fraction) or just (message)."""
    if progress_cb is None:
        return None
    try:
        n = len(inspect.signature(progress_cb).parameters)
    except (TypeError, ValueError):
        n = 2
    return (lambda m, f: progress_cb(m, f)) if n >= 2 else (lambda m, f: progress_cb(m))


def after_training(session_factory: sessionmaker[Session], settings: Settings, run_id: int,
                   progress_cb: Optional[Callable[..., Any]] = None, *, latency_runs: int = 20,
                   latency_seconds: float = 10.0) -> dict[str, Any]:
    """fp32 export + verification + latency + test evaluation for a freshly trained run.

    Returns {"export": {...}, "evaluation_id": int, "summary": {...}}. A failed verification is
    recorded (summary.export_verified = False) rather than raised: the run itself succeeded.
    """
    progress = _adapt(progress_cb)
    loaded = ev._load(run_id, settings, session_factory)
    exp = ev.ensure_fp32(run_id, settings=settings, session_factory=session_factory, force=True, _loaded=loaded,
                         latency_runs=latency_runs, latency_seconds=latency_seconds,
                         progress=(lambda m, f: progress(m, 0.6 * f)) if progress else None)
    # The verification already ran PyTorch over the test split: reuse those logits.
    evaluation_id = None
    try:
        res = ev.evaluate_run(run_id, settings=settings, session_factory=session_factory, _trained=loaded[1],
                              _test_logits=exp["torch_logits"],
                              progress=(lambda m, f: progress(m, 0.6 + 0.4 * f)) if progress else None)
        evaluation_id = res["evaluation_id"]
    except ev.EvaluationError as e:  # e.g. no test split: the training run still succeeded
        ev._update_summary(session_factory, run_id, {"evaluation_error": str(e)})
    with session_factory() as session:
        from storage.models import Run

        run = session.get(Run, run_id)
        summary = dict(run.summary or {}) if run else {}
    return {"export": {k: v for k, v in exp.items() if k != "torch_logits"},
            "evaluation_id": evaluation_id, "summary": summary}


# ------------------------------------------------------------------------------------------
# Background jobs: the UI enqueues "evaluate" / "export" (jobs.enqueue(s, kind, run_id, payload))
# so the slow parts run in the worker, not in a Streamlit callback.
# ------------------------------------------------------------------------------------------
def _job_progress(ctx: Any) -> Callable[[str, float], None]:
    return lambda m, f: ctx.progress({"phase": ctx.kind, "message": m, "fraction": f})


def handle_evaluate(ctx: Any) -> Any:
    """payload: tta (bool), sensitivity (float), positive_class (str | None)."""
    from workbench.jobs import JobOutcome

    p = ctx.payload
    try:
        out = ev.evaluate_run(ctx.run_id, tta=bool(p.get("tta", False)), sensitivity=float(p.get("sensitivity", 0.95)),
                              positive_class=p.get("positive_class"), settings=ctx.settings,
                              session_factory=ctx.session_factory, progress=_job_progress(ctx))
    except (ev.EvaluationError, ValueError) as e:
        return JobOutcome("failed", str(e))
    ctx.event(f"Evaluation #{out['evaluation_id']} on the test split: accuracy {out['metrics']['accuracy']:.4f}.")
    return JobOutcome("succeeded")


def handle_export(ctx: Any) -> Any:
    """payload: fp16, int8, uint8_graph (bools)."""
    from storage.artifacts import ArtifactError
    from workbench.jobs import JobOutcome

    p = ctx.payload
    try:
        out = ev.export_run(ctx.run_id, fp16=bool(p.get("fp16")), int8=bool(p.get("int8")),
                            uint8_graph=bool(p.get("uint8_graph")), settings=ctx.settings,
                            session_factory=ctx.session_factory, progress=_job_progress(ctx))
    except (ev.EvaluationError, ArtifactError, ValueError) as e:
        return JobOutcome("failed", str(e))
    ctx.event(f"Deploy bundle ready (artifact #{out['bundle_artifact_id']}).", data={
        k: {kk: v[kk] for kk in ("onnx_mb", "latency_ms_p50", "accuracy", "accuracy_delta")}
        for k, v in out["variants"].items()})
    return JobOutcome("succeeded")


def _register_handlers() -> None:
    try:
        from workbench import jobs
    except ImportError:  # job runner not installed: the functions above still work directly
        return
    jobs.register_handler("evaluate", handle_evaluate)
    jobs.register_handler("export", handle_export)


_register_handlers()
