"""Calibrated, decided predictions everywhere.

The bundle carries its evaluation's temperature (and, for two classes, its decision threshold)
in ``calibration.json``, listed in the manifest like every file; the bundle's predict.py,
``BundlePredictor`` (bundle and run) and the Predict page all report softmax(logits / T). The
bundles here come from the shared workspace of tests/builders.py: no new training.
"""
from __future__ import annotations

import csv
import hashlib
import json
import subprocess
import sys
import uuid
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from builders import exported_run

from core.metrics import calibration, softmax

TOL = 1e-6


@pytest.fixture(scope="module")
def exported(ws) -> tuple[int, Path, dict[str, Any]]:
    """A three-class run's bundle (fp32 only) and the evaluation it was built from."""
    e = exported_run(ws)
    return e.run_id, e.bundle, e.metrics


def _members(bundle: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(bundle) as zf:
        return {n: zf.read(n) for n in zf.namelist()}


def _unpack(members: dict[str, bytes], dst: Path) -> Path:
    dst.mkdir()
    for name, data in members.items():
        (dst / name).write_bytes(data)
    return dst


def _split(ws, split: str, classes: list[str]) -> tuple[list[Path], np.ndarray]:
    """The workspace's images of ``split`` for ``classes`` and their labels (index into ``classes``)."""
    items = [(f, i) for i, c in enumerate(classes) for f in sorted((ws.source / split / c).iterdir())]
    return [f for f, _ in items], np.array([i for _, i in items])


def _run_predict_py(folder: Path, images: list[str], csv_path: Path, top_k: int) -> list[dict[str, str]]:
    """The bundle's own predict.py in a clean subprocess, as a user would run it."""
    r = subprocess.run([sys.executable, str(folder / "predict.py"), *images, "--csv", str(csv_path),
                        "--top-k", str(top_k)], cwd=csv_path.parent, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    with open(csv_path, newline="") as f:
        return list(csv.DictReader(f))


def _probs_from_rows(rows: list[dict[str, str]], classes: list[str]) -> np.ndarray:
    """Full probability rows from the CSV's top_k column (top-k = every class)."""
    out = np.zeros((len(rows), len(classes)))
    for i, row in enumerate(rows):
        for pair in row["top_k"].split(";"):
            label, p = pair.rsplit(":", 1)
            out[i, classes.index(label)] = float(p)
    return out


# --- (a) the bundle's outputs have the evaluation's calibrated ECE ----------------------------
def test_bundle_outputs_reach_the_evaluations_calibrated_ece(ws, exported, tmp_path: Path) -> None:
    from core.bundle import BundlePredictor, confidence_sentence, open_bundle

    rid, bundle, m = exported
    cal_eval = m["calibration"]
    temp = cal_eval["temperature"]
    assert temp is not None and abs(temp - 1.0) > 1e-3  # a real temperature, or the test proves nothing
    members = _members(bundle)
    record = json.loads(members["calibration.json"])
    manifest = json.loads(members["manifest.json"])
    assert manifest["files"]["calibration.json"] == hashlib.sha256(members["calibration.json"]).hexdigest()
    assert record["calibrated"] is True and record["temperature"] == temp and record["n_val"] == cal_eval["n_val"]
    assert record["test"] == {"n": m["n"], "ece_before": cal_eval["before"]["ece"],
                              "ece_after": cal_eval["after"]["ece"]}
    assert record["decision"] is None  # three classes: no threshold
    card = members["README.md"].decode()
    assert confidence_sentence(record) in card and f"temperature of {temp:.3f}" in card
    assert "divide by T" not in card and "UNSCALED" not in card

    classes = json.loads(members["labels.json"])
    paths, y = _split(ws, "test", classes)
    folder = _unpack(members, tmp_path / "bundle")
    rows = _run_predict_py(folder, [str(ws.source / "test")], tmp_path / "pred.csv", len(classes))
    assert list(rows[0])[:4] == ["path", "predicted_label", "confidence", "top_k"] and "decision" not in rows[0]
    y_csv = np.array([classes.index(Path(r["path"]).parent.name) for r in rows])
    ece_script = calibration(_probs_from_rows(rows, classes), y_csv)["ece"]

    predictor = BundlePredictor.from_bundle(open_bundle(bundle))
    preds = predictor.predict(paths, top_k=len(classes))
    probs = np.array([[dict(p.top_k)[c] for c in classes] for p in preds])
    ece_bundle = calibration(probs, y)["ece"]

    after, before = cal_eval["after"]["ece"], cal_eval["before"]["ece"]
    assert abs(ece_bundle - after) <= TOL and abs(ece_script - after) <= TOL, (ece_bundle, ece_script, after)
    assert abs(after - before) > 10 * TOL  # the temperature changed the figure
    assert abs(calibration(softmax(np.log(probs) * temp), y)["ece"] - before) <= TOL  # undoing T gives 'before'

    # A run predicts like its bundle: the temperature comes from its latest evaluation.
    from workbench.exports import ensure_fp32

    fp32 = ensure_fp32(rid, settings=ws.settings, session_factory=ws.Session)
    run_preds = BundlePredictor.from_onnx(fp32.path, m).predict(paths, top_k=len(classes))
    assert np.allclose([[dict(p.top_k)[c] for c in classes] for p in run_preds], probs, atol=1e-9)
    plain = BundlePredictor.from_onnx(fp32.path).predict(paths, top_k=len(classes))  # no evaluation: T = 1
    assert plain[0].confidence != pytest.approx(preds[0].confidence, abs=TOL)


def test_model_card_says_what_the_confidences_mean() -> None:
    """Plain words, honest about a temperature that did not help and about a missing one."""
    from core.bundle import Calibration, calibrated_threshold, calibration_record
    from core.export import calibration_section

    def metrics(temp: float | None, after: float | None, **extra: Any) -> dict[str, Any]:
        cal: dict[str, Any] = {"before": {"ece": 0.38}, "temperature": temp}
        if temp is not None:
            cal.update(n_val=40, after={"ece": after})
        return {"n": 250, "calibration": cal, **extra}

    good = "\n".join(calibration_section(calibration_record(metrics(1.8, 0.005), "abc"), {}))
    assert "Confidences are calibrated: of the images given 90 %, about 90 % are right, measured on the test " \
           "split (250 test images: confidence and accuracy differed by 0.5 percentage points" in good
    assert "temperature of 1.800, fitted on 40 validation images" in good and "apply it for you" in good
    poor = "\n".join(calibration_section(calibration_record(metrics(19.99, 0.2), "abc"), {}))
    assert "still unreliable" in poor and "90 % are right" not in poor
    none = calibration_record(metrics(None, None), "abc")
    assert none["temperature"] == 1.0 and none["note"] == "not calibrated: no validation images"
    assert "Confidences are NOT calibrated (no validation images)" in "\n".join(calibration_section(none, {}))

    op = {"threshold": 0.7, "positive_class": "b", "chosen_on": "val", "target_sensitivity": 0.95,
          "sensitivity": 0.9, "specificity": 0.8, "val_sensitivity": 0.96, "val_specificity": 0.82}
    two = calibration_record(metrics(2.0, 0.01, operating_point=op), ["a", "b"])
    cal = Calibration.from_record(two, ["a", "b"])
    # Two classes: p(b) = sigmoid(margin); calibrated p(b) = sigmoid(margin / T), the same decisions.
    margin = np.log(0.7 / 0.3)
    assert cal.threshold == pytest.approx(1 / (1 + np.exp(-margin / 2.0)))
    assert calibrated_threshold(0.0, 2.0) == 0.0 and calibrated_threshold(1.0, 2.0) == 1.0
    text = "\n".join(calibration_section(two, {}))
    assert f"answers `b` when the probability of `b` is at least {cal.threshold:.4f}, otherwise `a`" in text
    assert "sensitivity 96.0%, specificity 82.0% there; on the test split 90.0% and 80.0%" in text
    for z in (-3.0, -0.2, 0.0, 0.5, 4.0):  # decisions agree on both sides of the threshold
        p = softmax(np.array([[0.0, z]]))[0, 1]
        assert cal.decide(softmax(np.array([[0.0, z]]), 2.0)[0], ["a", "b"])[0] == ("b" if p >= 0.7 else "a")


# --- (b) calibration.json is covered by the manifest ------------------------------------------
def _rehash(m: dict[str, bytes], name: str) -> None:
    manifest = json.loads(m["manifest.json"])
    manifest["files"][name] = hashlib.sha256(m[name]).hexdigest()
    m["manifest.json"] = json.dumps(manifest).encode()


def _tampered(m: dict[str, bytes]) -> None:
    rec = json.loads(m["calibration.json"])
    rec["temperature"] = 1.0  # "undo" the calibration: every confidence changes
    m["calibration.json"] = json.dumps(rec).encode()


def _unlisted(m: dict[str, bytes]) -> None:
    manifest = json.loads(m["manifest.json"])
    del manifest["files"]["calibration.json"]
    m["manifest.json"] = json.dumps(manifest).encode()


def _nonsense(m: dict[str, bytes]) -> None:
    rec = json.loads(m["calibration.json"])
    rec["temperature"] = -2.0
    m["calibration.json"] = json.dumps(rec).encode()
    _rehash(m, "calibration.json")  # consistent manifest: the content check must catch it


@pytest.mark.parametrize("damage,message", [
    (_tampered, "calibration.json: sha256 does not match the manifest (bundle altered?)"),
    (_unlisted, "calibration.json: not listed in the manifest"),
    (_nonsense, "calibration.json: temperature must be a positive number"),
], ids=["tampered", "unlisted", "rehashed nonsense"])
def test_damaged_calibration_is_refused(exported, damage, message: str, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from core.bundle import BundleError, open_bundle
    from workbench.cli import main

    m = _members(exported[1])
    damage(m)
    folder = _unpack(m, tmp_path / "bundle")
    with pytest.raises(BundleError, match=message.split(" (")[0]):
        open_bundle(folder)
    monkeypatch.setenv("WORKBENCH_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.delenv("WORKBENCH_BUNDLE_KEY", raising=False)
    img = folder / "labels.json"  # any file: the bundle is refused before images are read
    assert main(["predict", str(folder), str(img), "--csv", str(tmp_path / "out.csv")]) == 2  # refused: bad input
    assert message.split(" (")[0] in capsys.readouterr().err
    # The bundle's own predict.py refuses it too (its message for an unlisted file differs).
    r = subprocess.run([sys.executable, str(folder / "predict.py"), str(img), "--csv",
                        str(tmp_path / "out2.csv")], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "calibration.json" in r.stderr and not (tmp_path / "out2.csv").exists()


# --- (c) a two-class bundle decides with its threshold ----------------------------------------
def test_two_class_bundle_carries_and_applies_the_threshold(ws, tmp_path: Path) -> None:
    import torch

    from core.bundle import BundlePredictor, calibrated_threshold, open_bundle
    from core.evaluate import EvalItem, evaluate_model
    from core.export import build_bundle, export_fp32, load_trained, ort_logits

    tm = load_trained(ws.checkpoint)

    class TwoClass(torch.nn.Module):  # the real model's rust/healthy logits only (as tests/test_evaluate.py)
        def __init__(self, m: torch.nn.Module) -> None:
            super().__init__()
            self.m = m

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.m(x)[:, 1:]

    classes = ["bean_rust", "healthy"]
    two = TwoClass(tm.model).eval()
    paths, y = _split(ws, "test", classes)
    vpaths, vy = _split(ws, "val", classes)
    res = evaluate_model(two, tm.preprocessing, classes, [EvalItem(p, int(i)) for p, i in zip(paths, y)],
                         [EvalItem(p, int(i)) for p, i in zip(vpaths, vy)], sensitivity=0.75, positive_class="healthy")
    m = res.metrics
    op, temp = m["operating_point"], m["calibration"]["temperature"]
    assert op["chosen_on"] == "val" and temp is not None
    onnx_path = export_fp32(two, tmp_path / "two.onnx", tm.preprocessing, classes, "lite0")
    info = {"classes": classes, "variant": "lite0", "preprocessing": tm.preprocessing, "run_id": 7, "metrics": m}
    bundle = build_bundle(tmp_path / "two.zip", {"model.onnx": onnx_path}, info)

    members = _members(bundle)
    dec = json.loads(members["calibration.json"])["decision"]
    thr = calibrated_threshold(op["threshold"], temp)
    assert dec["positive_class"] == "healthy" and dec["negative_class"] == "bean_rust"
    assert dec["threshold"] == pytest.approx(thr, abs=1e-12)
    assert dec["val"] == {"sensitivity": op["val_sensitivity"], "specificity": op["val_specificity"]}
    assert dec["test"] == {"sensitivity": op["sensitivity"], "specificity": op["specificity"]}
    card = members["README.md"].decode()
    assert f"at least {thr:.4f}" in card and "validation split" in card

    # In-process: p(healthy) = softmax(logits / T), decision = healthy iff p >= threshold.
    logits = ort_logits(onnx_path, paths, tm.preprocessing)
    preds = BundlePredictor.from_bundle(open_bundle(bundle)).predict(paths, top_k=1)
    p_pos = softmax(logits, temp)[:, 1]
    assert np.allclose([p.p_positive for p in preds], p_pos, atol=1e-9)
    assert [p.decision for p in preds] == ["healthy" if q >= dec["threshold"] else "bean_rust" for q in p_pos]
    # The same decisions the evaluation's (uncalibrated) threshold makes: calibration moves no decision.
    assert [p.decision for p in preds] == ["healthy" if q >= op["threshold"] else "bean_rust"
                                           for q in softmax(logits)[:, 1]]
    assert {p.decision for p in preds} == {"healthy", "bean_rust"}  # both outcomes exercised

    # The bundle's predict.py: a decision column, the same decisions.
    folder = _unpack(members, tmp_path / "bundle")
    rows = _run_predict_py(folder, [str(p) for p in paths], tmp_path / "two.csv", 2)
    assert list(rows[0])[:5] == ["path", "predicted_label", "confidence", "top_k", "decision"]
    assert [r["decision"] for r in rows] == [p.decision for p in preds]


# --- (d) the Predict page shows softmax(logits / T) -------------------------------------------
def test_predict_page_shows_calibrated_confidences(ws, exported, monkeypatch: pytest.MonkeyPatch) -> None:
    """The predict job runs in-process (the handler the light-lane worker runs); the page shows it."""
    import torch
    from builders import open_page

    from core.export import load_trained
    from core.images import load_rgb
    from core.preprocessing import preprocess
    from storage.db import reset_sessionmakers
    from storage.models import Job
    from workbench import jobs
    from workbench.handlers.tasks import handle_predict
    from workbench.paths import PREDICT, staging_dir
    from workbench.status import JobStatus

    rid, _, m = exported
    temp = m["calibration"]["temperature"]
    img = sorted((ws.source / "test" / "bean_rust").iterdir())[0]
    out_dir = staging_dir(ws.settings, PREDICT) / uuid.uuid4().hex
    out_dir.mkdir(parents=True)
    (out_dir / "in0.jpg").write_bytes(img.read_bytes())
    rel = lambda p: p.relative_to(ws.settings.data_dir).as_posix()  # noqa: E731
    payload = {"run_id": rid, "files": [{"name": img.name, "path": rel(out_dir / "in0.jpg")}], "top_k": 3,
               "gradcam": False, "out_dir": rel(out_dir)}
    with ws.Session.begin() as s:
        job_id = jobs.enqueue(s, "predict", rid, payload).id
    outcome = handle_predict(jobs.JobContext(job_id, "predict", rid, payload, ws.Session, ws.settings))
    assert outcome.status == JobStatus.SUCCEEDED, outcome.error
    jobs.finish_job(ws.Session, job_id, outcome.status)

    tm = load_trained(ws.checkpoint)
    with torch.inference_mode():
        logits = tm.model(torch.from_numpy(preprocess(load_rgb(img), tm.preprocessing)[None])).float().numpy()
    want = softmax(logits, temp)[0]
    with ws.Session() as s:
        result = s.get(Job, job_id).payload
    top = result["results"][0]["top"]
    assert [t["p"] for t in top] == pytest.approx(sorted(want, reverse=True), abs=1e-6)
    assert result["calibration"]["temperature"] == temp and result["calibration"]["calibrated"]

    monkeypatch.setenv("WORKBENCH_DATA_DIR", str(ws.settings.data_dir))
    monkeypatch.delenv("DATABASE_URL", raising=False)
    reset_sessionmakers()
    try:
        at = open_page("predict")
        at.session_state["predict_job"] = job_id
        at.run()
        assert not at.exception, [e.value for e in at.exception]
        shown = " ".join(md.value for md in at.markdown)
        best = tm.classes[int(want.argmax())]
        assert f"**{img.name}** → **{best}** ({want.max() * 100:.1f} %)" in shown
        sentence = result["calibration"]["confidence"]
        assert sentence.startswith("Confidences") and f"{m['calibration']['after']['ece']:.3f}" in sentence
        assert any(sentence in c.value for c in at.caption)
        assert any(f"Temperature {temp:.2f}" in c.value for c in at.caption)  # the expert detail, in an expander
        raw = f"({softmax(logits)[0].max() * 100:.1f} %)"  # the uncalibrated confidence
        assert raw == f"({want.max() * 100:.1f} %)" or raw not in shown
    finally:
        reset_sessionmakers()
