"""ONNX export, verification, fp16/int8 variants, artifacts and the post-training step.

Real beans images, a really trained (few SGD steps) Lite0 at 64 px, real ONNX Runtime, real
SQLite. ``make_workspace`` / ``make_run`` are shared with test_bundle.py.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from builders import CLASSES, FAST, RES, Workspace, make_run

from workbench.paths import RunPaths

REPO_ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------
def test_fp32_export_metadata_and_verification(ws: Workspace, tmp_path: Path) -> None:
    from core.export import export_fp32, load_trained, read_metadata, verify_onnx

    tm = load_trained(ws.checkpoint)
    path = export_fp32(tm.model, tmp_path / "m.onnx", tm.preprocessing, tm.classes, tm.variant, run_id=7)
    md = read_metadata(path)
    import json

    assert json.loads(md["classes"]) == CLASSES
    assert json.loads(md["input_size"]) == [3, RES, RES]
    assert json.loads(md["mean"]) == list(tm.preprocessing.mean)
    assert md["interpolation"] == tm.preprocessing.interpolation and md["variant"] == "lite0" and md["run_id"] == "7"

    import onnx

    proto = onnx.load(str(path))
    assert proto.opset_import[0].version >= 17
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"  # dynamic batch

    test = sorted((ws.source / "test").rglob("*.jpg"))
    ver = verify_onnx(tm.model, path, test, tm.preprocessing, batch_size=5)  # batches of 5 and 2: dynamic batch
    assert ver.n_images == len(test) == 12
    assert ver.passed and ver.max_abs_logit_diff <= 1e-3 and ver.top1_agreement == 1.0
    # Beyond the tolerance, or any top-1 disagreement, fails with the reason.
    from core.export import judge_verification

    t = ver.torch_logits
    off = t.copy()
    off[0, 0] += 2e-3
    bad = judge_verification(t, off)
    assert not bad.passed and "exceeds 1e-03" in bad.reason
    swapped = t.copy()
    swapped[0] = np.roll(t[0], 1)  # moves the top-1 to another class for one image
    flip = judge_verification(t, swapped, tolerance=np.inf)
    assert not flip.passed and "agreement" in flip.reason and flip.top1_agreement == pytest.approx(11 / 12)


@pytest.fixture(scope="module")
def post_run(ws: Workspace) -> tuple[int, Any, list[str]]:
    """A run that went through the automatic post-training step (shared: it is the slow part)."""
    from workbench.handlers.postrun import after_training

    rid = make_run(ws)
    messages: list[str] = []
    out = after_training(ws.Session, ws.settings, rid, lambda m, f: messages.append(m), **FAST)
    return rid, out, messages


def test_after_training_records_latency_and_metrics(ws: Workspace, post_run: tuple[int, Any, list[str]]) -> None:
    from storage import repositories as repo
    from storage.models import Evaluation, Run

    rid, out, messages = post_run
    assert out.export["passed"]
    with ws.Session() as s:
        run = s.get(Run, rid)
        summ = run.summary
        arts = repo.artifacts_for_run(s, rid)
        evs = s.query(Evaluation).filter_by(run_id=rid).all()
    assert summ["latency_ms_p50"] > 0 and summ["latency_ms_p95"] >= summ["latency_ms_p50"]
    assert summ["throughput_images_per_s"] > 0 and summ["export_verified"] is True
    assert summ["onnx_mb"] == pytest.approx((RunPaths(ws.settings, rid).fp32_onnx).stat().st_size / 1e6)
    assert 0.0 <= summ["test_accuracy"] <= 1.0 and "ece" in summ
    kinds = {a.kind for a in arts}
    assert {"onnx_fp32", "plot", "eval_json"} <= kinds
    assert all(len(a.sha256) == 64 and a.bytes > 0 for a in arts)
    assert len(evs) == 1 and evs[0].split == "test" and evs[0].metrics["n"] == 12
    # The export's ORT test accuracy is the evaluation's (PyTorch) accuracy: 100 % agreement.
    fp32 = [a for a in arts if a.kind == "onnx_fp32"][0]
    assert fp32.meta["measurements"]["accuracy"] == pytest.approx(summ["test_accuracy"])
    assert messages


def test_fp16_int8_variants_measured_and_reported(ws: Workspace, post_run: tuple[int, Any, list[str]],
                                                  tmp_path: Path) -> None:
    from core.latency import ort_session
    from workbench.exports import export_run

    rid = post_run[0]  # reuses its verified fp32 export and its evaluation
    out = export_run(rid, fp16=True, int8=True, uint8_graph=True, settings=ws.settings, session_factory=ws.Session,
                     out_path=tmp_path / "bundle.zip", calibration_images=6, **FAST)
    v = out.variants
    assert set(v) == {"fp32", "fp16", "int8"}
    for name in ("fp16", "int8"):
        m = v[name]
        assert m["onnx_mb"] < v["fp32"]["onnx_mb"]  # smaller files
        assert m["latency_ms_p50"] > 0 and m["throughput_images_per_s"] > 0
        assert m["accuracy_delta"] == pytest.approx(m["accuracy"] - v["fp32"]["accuracy"])
    assert v["fp16"]["onnx_mb"] < 0.6 * v["fp32"]["onnx_mb"]
    # int8 graph is QDQ: QuantizeLinear/DequantizeLinear nodes present, and ORT CPU runs it.
    import onnx

    q = onnx.load(str(RunPaths(ws.settings, rid).export_dir / "model_int8.onnx"))
    ops = {n.op_type for n in q.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    sess = ort_session(RunPaths(ws.settings, rid).export_dir / "model_fp16.onnx")
    y = sess.run(None, {"image": np.zeros((2, 3, RES, RES), np.float32)})[0]
    assert y.shape == (2, 3) and y.dtype == np.float32  # fp32 I/O kept
    # uint8 graph: measured agreement with the PIL path is recorded (not gated).
    u8 = out.uint8_graph
    assert u8["n_images"] == 12 and 0.0 <= u8["top1_agreement"] <= 1.0 and np.isfinite(u8["max_abs_logit_diff"])
    assert (tmp_path / "bundle.zip").is_file()


def test_uint8_graph_matches_pil_when_no_downscaling(ws: Workspace, tmp_path: Path) -> None:
    """Images already at the model resolution: no resize needed, so both paths see the same
    pixels and the logits agree to float precision."""
    from PIL import Image

    from core.export import build_uint8_graph, export_fp32, load_trained, ort_logits
    from core.latency import ort_session

    tm = load_trained(ws.checkpoint)
    fp32 = export_fp32(tm.model, tmp_path / "m.onnx", tm.preprocessing, tm.classes, tm.variant)
    p8 = build_uint8_graph(fp32, tmp_path / "m8.onnx", tm.preprocessing)
    imgs = []
    for i, f in enumerate(sorted((ws.source / "test").rglob("*.jpg"))[:4]):
        p = tmp_path / f"{i}.png"
        Image.open(f).convert("RGB").resize((RES, RES)).save(p)
        imgs.append(p)
    ref = ort_logits(fp32, imgs, tm.preprocessing)
    s8 = ort_session(p8)
    got = np.concatenate([s8.run(None, {"image_uint8": np.asarray(Image.open(p))[None]})[0] for p in imgs])
    assert np.abs(ref - got).max() < 1e-3
    # Any input size works (non-square, larger): same output shape.
    big = np.zeros((1, 100, 150, 3), np.uint8)
    assert s8.run(None, {"image_uint8": big})[0].shape == (1, 3)


def test_failed_fp32_export_is_not_served(ws: Workspace) -> None:
    from storage.artifacts import ArtifactError
    from storage.models import Artifact
    from workbench.artifacts import artifact_for_download
    from workbench.evaluations import EvaluationError
    from workbench.exports import ensure_fp32, export_run

    rid = make_run(ws)
    out = ensure_fp32(rid, settings=ws.settings, session_factory=ws.Session, **FAST)
    # Mark it failed as a >1e-3 mismatch would: download and bundle are refused.
    with ws.Session.begin() as s:
        a = s.get(Artifact, out.artifact_id)
        a.meta = {**a.meta, "verified": False, "verification": {**a.meta["verification"], "passed": False,
                                                               "reason": "max |logit difference| 2e-02 exceeds 1e-03"}}
    with pytest.raises(ArtifactError, match="failed verification"):
        artifact_for_download(out.artifact_id, settings=ws.settings, session_factory=ws.Session)
    with pytest.raises(EvaluationError, match="failed verification"):
        export_run(rid, settings=ws.settings, session_factory=ws.Session, **FAST)


def test_altered_or_missing_artifact_reported_and_delete_run(ws: Workspace) -> None:
    from storage import repositories as repo
    from storage.artifacts import ArtifactError
    from storage.models import Run
    from workbench.artifacts import artifact_for_download, list_artifacts
    from workbench.exports import ensure_fp32
    from workbench.runs import delete_run

    rid = make_run(ws)
    out = ensure_fp32(rid, settings=ws.settings, session_factory=ws.Session, **FAST)
    path = Path(out.path)
    assert artifact_for_download(out.artifact_id, settings=ws.settings, session_factory=ws.Session) == path.resolve()
    with open(path, "r+b") as f:  # flip one byte, same size: only the sha256 catches it
        f.seek(100)
        b = f.read(1)
        f.seek(100)
        f.write(bytes([b[0] ^ 0xFF]))
    with pytest.raises(ArtifactError, match="altered"):
        artifact_for_download(out.artifact_id, settings=ws.settings, session_factory=ws.Session)
    status = {a.kind: a.status for a in list_artifacts(rid, settings=ws.settings, session_factory=ws.Session)}
    assert "altered" in status["onnx_fp32"]
    # A new ensure_fp32 does not reuse the altered file: it re-exports.
    again = ensure_fp32(rid, settings=ws.settings, session_factory=ws.Session, **FAST)
    assert again.artifact_id != out.artifact_id and again.passed
    path.unlink()
    with pytest.raises(ArtifactError, match="missing"):
        artifact_for_download(again.artifact_id, settings=ws.settings, session_factory=ws.Session)

    run_dir = RunPaths(ws.settings, rid).root
    assert run_dir.is_dir() and (run_dir / "best.pt").is_file() and (run_dir / "export").is_dir()
    res = delete_run(rid, settings=ws.settings)
    assert res.files_removed >= 1 and res.run_dir_removed and not run_dir.exists()
    assert not RunPaths(ws.settings, rid).legacy_root.exists()
    with ws.Session() as s:
        assert s.get(Run, rid) is None and not repo.artifacts_for_run(s, rid)
    assert ws.checkpoint.is_file()  # files outside the run are untouched


def test_after_training_without_test_split_records_latency_but_never_serves(ws: Workspace, tmp_path: Path) -> None:
    from storage.models import Run
    from workbench.datasets import add_dataset
    from workbench.evaluations import EvaluationError
    from workbench.exports import export_run
    from workbench.handlers.postrun import after_training

    src = tmp_path / "notest"
    for split in ("train", "val"):
        shutil.copytree(ws.source / split, src / split)
    info = add_dataset(src, "beans-no-test", settings=ws.settings)
    from sqlalchemy import update

    from storage.models import Image

    with ws.Session.begin() as s:  # ingest may carve a test split out of train: remove it
        s.execute(update(Image).where(Image.dataset_id == info.id, Image.split == "test").values(split="train"))
    rid = make_run(Workspace(ws.settings, ws.Session, info.id, ws.checkpoint, src))
    out = after_training(ws.Session, ws.settings, rid, None, **FAST)
    assert out.evaluation_id is None and not out.export["passed"]
    with ws.Session() as s:
        summ = s.get(Run, rid).summary
    assert summ["latency_ms_p50"] > 0 and summ["export_verified"] is False
    assert "no test images" in summ["evaluation_error"]
    with pytest.raises(EvaluationError, match="failed verification.*test split is empty"):
        export_run(rid, settings=ws.settings, session_factory=ws.Session, **FAST)
