"""Evaluation metrics (vs sklearn and hand-computed cases) and evaluation on real images."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from sklearn import metrics as skm

from core.evaluate import (
    EvalItem,
    calibration,
    classification_metrics,
    evaluate_model,
    fit_temperature,
    nll,
    softmax,
    threshold_for_sensitivity,
)


def _random_case(seed: int, n: int = 200, k: int = 4) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    logits = rng.standard_normal((n, k)) + 1.5 * np.eye(k)[y]  # informative but imperfect
    return y, softmax(logits)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_classification_metrics_match_sklearn(seed: int) -> None:
    y, p = _random_case(seed)
    classes = ["a", "b", "c", "d"]
    m = classification_metrics(y, p, classes)
    pred = p.argmax(1)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert m["macro_f1"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
    prec, rec, f1, sup = skm.precision_recall_fscore_support(y, pred, labels=range(4), zero_division=0)
    for i, c in enumerate(m["per_class"]):
        assert (c["precision"], c["recall"], c["f1"], c["support"]) == pytest.approx((prec[i], rec[i], f1[i], sup[i]))
        assert c["roc_auc"] == pytest.approx(skm.roc_auc_score(y == i, p[:, i]))
        assert c["average_precision"] == pytest.approx(skm.average_precision_score(y == i, p[:, i]))
    assert np.array_equal(m["confusion_matrix"], skm.confusion_matrix(y, pred, labels=range(4)))
    assert np.allclose(m["confusion_matrix_normalized"],
                       skm.confusion_matrix(y, pred, labels=range(4), normalize="true"))
    assert m["macro_roc_auc"] == pytest.approx(skm.roc_auc_score(y, p, multi_class="ovr", average="macro"))
    assert m["top_k"]["top3"] == pytest.approx(skm.top_k_accuracy_score(y, p, k=3, labels=range(4)))
    json.dumps(m)  # JSON-ready


def test_hand_computed_small_case() -> None:
    # 3 classes, 5 samples. preds: 0,1,1,2,0 ; truth: 0,1,2,2,1
    y = np.array([0, 1, 2, 2, 1])
    p = np.array([[.8, .1, .1], [.2, .7, .1], [.1, .5, .4], [.1, .2, .7], [.6, .3, .1]])
    m = classification_metrics(y, p, ["x", "y", "z"], top_k=(1, 2))
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["confusion_matrix"] == [[1, 0, 0], [1, 1, 0], [0, 1, 1]]
    # recalls: x 1/1, y 1/2, z 1/2 -> balanced 2/3 ; precisions: x 1/2, y 1/2, z 1/1
    assert m["balanced_accuracy"] == pytest.approx(2 / 3)
    f1 = [2 * .5 * 1 / 1.5, .5, 2 * 1 * .5 / 1.5]
    assert m["macro_f1"] == pytest.approx(np.mean(f1))
    # top-2: sample 2 (true z, probs .1 .5 .4) and sample 4 (true y, .6 .3 .1) are in their top 2
    assert m["top_k"]["top2"] == pytest.approx(1.0)
    assert m["top_k"]["top1"] == pytest.approx(0.6)


def test_absent_class_does_not_crash() -> None:
    y = np.array([0, 0, 1, 1])
    p = softmax(np.array([[2, 0, 0], [0, 2, 0], [0, 2, 0], [0, 0, 2.0]]))
    m = classification_metrics(y, p, ["a", "b", "c"])
    assert m["per_class"][2]["support"] == 0 and m["per_class"][2]["roc_auc"] is None
    assert m["balanced_accuracy"] == pytest.approx((0.5 + 0.5) / 2)  # over classes present
    # Class "c" is absent but predicted once: counted in the macro-F1 with F1 0 (sklearn's label set).
    assert m["per_class"][2]["f1"] == 0.0 and m["per_class"][2]["recall"] is None
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0.5 + 0.0) / 3)
    # Never predicted and absent: not counted, and its row says so instead of a misleading 0.
    perfect = classification_metrics(y, softmax(np.array([[2, 0, 0], [2, 0, 0], [0, 2, 0], [0, 2, 0.0]])),
                                     ["a", "b", "c"])
    assert perfect["macro_f1"] == 1.0
    assert (perfect["per_class"][2]["f1"], perfect["per_class"][2]["counted"]) == (None, False)
    with pytest.raises(ValueError, match="shape"):
        classification_metrics(y, p[:, :2], ["a", "b", "c"])


def test_ece_hand_computed_and_temperature() -> None:
    # Two bins used: conf 0.9 (2 samples, 1 correct) and conf 0.6 (2 samples, 2 correct).
    p = np.array([[.9, .1], [.9, .1], [.6, .4], [.4, .6]])
    y = np.array([0, 1, 0, 1])
    c = calibration(p, y, n_bins=10)
    assert c["ece"] == pytest.approx(0.5 * abs(0.5 - 0.9) + 0.5 * abs(1.0 - 0.6))
    assert sum(b["count"] for b in c["bins"]) == 4

    # Overconfident logits (true logits scaled x4): fitted T recovers ~4 and lowers NLL and ECE.
    rng = np.random.default_rng(0)
    n, k = 4000, 3
    true = rng.standard_normal((n, k))
    yy = np.array([rng.choice(k, p=row) for row in softmax(true)])
    over = 4.0 * true
    t = fit_temperature(over, yy)
    assert t == pytest.approx(4.0, rel=0.1)
    assert nll(over, yy, t) < nll(over, yy)
    assert calibration(softmax(over, t), yy)["ece"] < calibration(softmax(over), yy)["ece"]


def test_threshold_for_sensitivity() -> None:
    y = np.array([1] * 10 + [0] * 10)
    pos = np.linspace(0.5, 0.95, 10)  # positives' scores
    neg = np.linspace(0.0, 0.6, 10)
    r = threshold_for_sensitivity(y, np.concatenate([pos, neg]), 0.9)
    # 9 of 10 positives needed -> threshold = 9th largest positive score = pos[1]
    assert r["threshold"] == pytest.approx(pos[1]) and r["sensitivity"] == pytest.approx(0.9)
    assert r["specificity"] == pytest.approx(float((neg < pos[1]).mean()))
    assert threshold_for_sensitivity(y, np.concatenate([pos, neg]), 1.0)["sensitivity"] == 1.0
    with pytest.raises(ValueError, match="both positive and negative"):
        threshold_for_sensitivity(np.ones(3), np.ones(3))


# ------------------------------------------------------------------------------------------
# On real images with a really trained model
# ------------------------------------------------------------------------------------------
def _items(folder: Path, classes: list[str]) -> list[EvalItem]:
    return [EvalItem(p, classes.index(p.parent.name)) for p in sorted(folder.rglob("*.jpg"))]


def test_evaluate_model_real_images_plots_gradcam(ws, tmp_path: Path) -> None:
    from PIL import Image

    from core.export import load_trained
    from core.gradcam import grad_cam

    tm = load_trained(ws.checkpoint)
    test, val = _items(ws.source / "test", tm.classes), _items(ws.source / "val", tm.classes)
    res = evaluate_model(tm.model, tm.preprocessing, tm.classes, test, val, out_dir=tmp_path, tta=True,
                         gallery_size=4)
    m = res.metrics
    assert m["n"] == 12 and m["tta"] is True
    eff = m["tta_effect"]
    assert eff["accuracy_delta"] == pytest.approx(eff["with"]["accuracy"] - eff["without"]["accuracy"])
    cal = m["calibration"]
    assert cal["fitted_on"] == "val" and cal["n_val"] == 9 and cal["temperature"] > 0
    assert math.isfinite(cal["nll_after"]) and 0.0 <= cal["after"]["ece"] <= 1.0  # fitted on val, reported on test
    assert "operating_point" not in m  # 3 classes: no binary threshold
    wrong = int(np.asarray(m["confusion_matrix"]).trace())
    assert len(m["misclassified"]) == min(4, 12 - wrong)
    losses = [e["loss"] for e in m["misclassified"]]
    assert losses == sorted(losses, reverse=True)
    for name in ("confusion_matrix", "roc", "pr", "reliability"):
        with Image.open(res.plots[name]) as im:
            assert im.format == "PNG" and im.width > 100
    if m["misclassified"]:
        assert Image.open(res.plots["misclassified"]).format == "PNG"
    assert json.loads(res.plots["metrics_json"].read_text())["accuracy"] == m["accuracy"]

    from core.evaluate import load_batch

    cam = grad_cam(tm.model, load_batch([test[0].path], tm.preprocessing), 1)
    assert cam.shape == (64, 64) and cam.min() >= 0 and math.isclose(float(cam.max()), 1.0, rel_tol=1e-5)


def test_binary_operating_point(ws) -> None:
    """A two-class task: the threshold reaching the sensitivity, on a chosen positive class."""
    from core.export import load_trained

    tm = load_trained(ws.checkpoint)
    # bean_rust vs healthy: the real model restricted to those two classes' logits.
    classes = tm.classes
    test = [it for it in _items(ws.source / "test", classes) if it.label in (1, 2)]
    import torch

    class TwoClass(torch.nn.Module):  # the real model's rust/healthy logits only
        def __init__(self, m):
            super().__init__()
            self.m, self.num_classes = m, 2

        def forward(self, x):
            return self.m(x)[:, 1:]

    items = [EvalItem(it.path, it.label - 1) for it in test]
    val = [EvalItem(it.path, it.label - 1) for it in _items(ws.source / "val", classes) if it.label in (1, 2)]
    two = TwoClass(tm.model)
    res = evaluate_model(two, tm.preprocessing, ["bean_rust", "healthy"], items, val,
                         sensitivity=0.75, positive_class="healthy")
    op = res.metrics["operating_point"]
    # Threshold chosen on val (reaches the target there), then reported honestly on test.
    assert op["positive_class"] == "healthy" and op["chosen_on"] == "val" and op["val_sensitivity"] >= 0.75
    assert 0 <= op["sensitivity"] <= 1 and 0 <= op["specificity"] <= 1
    assert op["test_chosen"]["sensitivity"] >= 0.75
    # Without a validation split: chosen on test (flagged as such), no temperature scaling.
    res2 = evaluate_model(two, tm.preprocessing, ["bean_rust", "healthy"], items, sensitivity=0.75,
                          positive_class="healthy", test_logits=res.test_logits)
    assert res2.metrics["operating_point"]["chosen_on"] == "test"
    assert res2.metrics["calibration"]["temperature"] is None
    with pytest.raises(ValueError, match="positive class"):
        evaluate_model(TwoClass(tm.model), tm.preprocessing, ["bean_rust", "healthy"], items,
                       positive_class="nope", test_logits=res.test_logits)


def test_evaluate_run_stores_tta_evaluation(ws) -> None:
    from builders import make_run

    from storage import repositories as repo
    from storage.models import Evaluation, Run
    from workbench.evaluations import evaluate_run

    rid = make_run(ws)
    out = evaluate_run(rid, tta=True, settings=ws.settings, session_factory=ws.Session)
    with ws.Session() as s:
        ev = s.get(Evaluation, out.evaluation_id)
        assert ev.tta is True and ev.split == "test" and "curves" not in ev.metrics
        assert ev.metrics["tta_effect"]["without"]["accuracy"] is not None
        kinds = [a.kind for a in repo.artifacts_for_run(s, rid)]
        assert kinds.count("plot") >= 4 and "eval_json" in kinds
        assert s.get(Run, rid).summary["test_accuracy_tta"] == ev.metrics["accuracy"]


def test_evaluation_records_ranges_and_compares_runs_on_the_same_images(ws) -> None:
    """The plain evaluation stores 95 % ranges (summary + metrics) and per-image outcomes; two runs
    are compared image by image: equal outcomes are within each other's margin, far apart ones not."""
    from builders import make_run

    from core.export import load_trained, model_card
    from storage.models import Evaluation, Run
    from workbench import views
    from workbench.evaluations import compare_runs, evaluate_run
    from workbench.summary import update_summary

    a, b = make_run(ws), make_run(ws)
    out_a = evaluate_run(a, settings=ws.settings, session_factory=ws.Session)
    m = out_a.metrics
    iv, oc = m["intervals"], m["outcomes"]
    assert len(oc["correct"]) == oc["n"] == m["n"] == 12 and oc["correct"].count("1") == round(m["accuracy"] * 12)
    with ws.Session() as s:
        sm = s.get(Run, a).summary
        assert sm["test_n"] == 12 and sm["test_accuracy_lo"] <= sm["test_accuracy"] <= sm["test_accuracy_hi"]
        assert sm["test_macro_f1_lo"] <= sm["test_macro_f1"] <= sm["test_macro_f1_hi"]
        assert s.get(Evaluation, out_a.evaluation_id).metrics["intervals"] == iv

    def record(run: int, correct: str) -> None:  # an evaluation of ``run`` on the same 12 test images
        with ws.Session.begin() as s:
            s.add(Evaluation(run_id=run, split="test", tta=False,
                             metrics={**m, "outcomes": {**oc, "correct": correct}}))

    assert compare_runs(a, b, settings=ws.settings, session_factory=ws.Session) is None  # b not evaluated
    record(b, oc["correct"])  # b: the same checkpoint, so the same outcomes
    same = compare_runs(a, b, settings=ws.settings, session_factory=ws.Session)
    assert same is not None and not same.distinguishable and same.n == 12
    update_summary(ws.Session, b, {k: v for k, v in sm.items() if k.startswith("test_")})  # as evaluate_run would
    with ws.Session() as s:  # the leaderboard's read model says it in plain words
        rows = [views._leaderboard_row(s.get(Run, r), "beans", 3) for r in (a, b)]
    assert rows[0].accuracy_range == views.percent_range(iv["accuracy"]["lo"], iv["accuracy"]["hi"]) != ""
    assert views.leaderboard_margin(rows, ws.Session) == same.sentence[0].upper() + same.sentence[1:] + "."
    assert same.sentence.startswith(f"runs {a} and {b} are within each other's margin on these 12 test images")
    record(a, "0" * 12)
    record(b, "1" * 12)
    far = compare_runs(a, b, settings=ws.settings, session_factory=ws.Session)
    assert far is not None and far.distinguishable and far.detail["mcnemar_p"] < 0.001
    assert far.sentence == f"run {a} and run {b} really differ on these 12 test images (not chance)"
    with ws.Session.begin() as s:  # b evaluated on other images: only the ranges can be compared (they overlap)
        s.add(Evaluation(run_id=b, split="test", tta=False,
                         metrics={**m, "outcomes": {"test_set": "other", "n": 11, "correct": "1" * 11}}))
    assert compare_runs(a, b, settings=ws.settings, session_factory=ws.Session).detail == {}
    assert compare_runs(a, 10**6, settings=ws.settings, session_factory=ws.Session) is None
    # The model card states the ranges.
    tm = load_trained(ws.checkpoint)
    card = model_card({"classes": tm.classes, "preprocessing": tm.preprocessing, "variant": tm.variant,
                       "metrics": m}, {})
    lo, hi = iv["accuracy"]["lo"], iv["accuracy"]["hi"]
    assert f"| accuracy | {m['accuracy']:.2%} | {lo * 100:.1f}–{hi:.1%} |" in card
    assert "recall 95 % range" in card and "Wilson score interval" in card
