"""core.metrics: one macro-F1 for validation (model selection) and test (leaderboard, model card).

The training side is exercised through ``core.train.evaluate`` itself (an identity "tail" fed
logits), the test side through ``core.evaluate.classification_metrics``, so both real code
paths are held to the same numbers.
"""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from sklearn import metrics as skm
from torch import nn

from core.evaluate import classification_metrics
from core.metrics import label_metrics, validation_metrics
from core.train import evaluate as train_evaluate


def _one_hot_probs(pred: np.ndarray, k: int) -> np.ndarray:
    """Probabilities whose argmax is ``pred`` (softened so no row is all-or-nothing)."""
    return np.eye(k)[pred] * 0.9 + 0.1 / k


def _validation_path(y: np.ndarray, pred: np.ndarray, k: int) -> dict:
    """Training's per-epoch validation: core.train.evaluate on logits through an identity tail."""
    logits = torch.from_numpy(np.eye(k, dtype=np.float32)[pred] * 5.0)
    return train_evaluate(nn.Identity(), nn.CrossEntropyLoss(), logits, torch.from_numpy(y), k, torch.device("cpu"))


def _test_path(y: np.ndarray, pred: np.ndarray, k: int) -> dict:
    return classification_metrics(y, _one_hot_probs(pred, k), [f"c{i}" for i in range(k)])


PATHS = {"validation": _validation_path, "test": _test_path}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(("k", "absent"), [(3, 2), (3, 0), (4, 1), (5, (1, 3))])
def test_absent_class_with_perfect_predictions_scores_one(path: str, k: int, absent: int | tuple[int, ...]) -> None:
    gone = {absent} if isinstance(absent, int) else set(absent)
    y = np.array([c for c in range(k) if c not in gone for _ in range(3)], dtype=np.int64)
    m = PATHS[path](y, y.copy(), k)
    assert m["macro_f1"] == 1.0
    assert m["balanced_accuracy"] == 1.0 and m["accuracy"] == 1.0
    if path == "test":
        for c in gone:
            row = m["per_class"][c]
            assert row["support"] == 0 and row["f1"] is None and row["precision"] is None
            assert row["recall"] is None and row["counted"] is False
        assert all(r["f1"] == 1.0 for i, r in enumerate(m["per_class"]) if i not in gone)
    else:
        assert [f is None for f in m["per_class_f1"]] == [c in gone for c in range(k)]
    json.dumps({key: v for key, v in m.items() if key != "curves"})  # JSON-ready, None included


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("wrong", [1, 3])
def test_predicting_an_absent_class_costs(path: str, wrong: int) -> None:
    k = 3
    y = np.array([0] * 5 + [1] * 5, dtype=np.int64)  # class 2 absent from the split
    pred = y.copy()
    pred[:wrong] = 2  # some class-0 images predicted as the absent class
    m = PATHS[path](y, pred, k)
    assert m["macro_f1"] < 1.0
    assert m["macro_f1"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
    # The absent class is counted with F1 0: three classes in the average, not two.
    f1_0 = 2 * (5 - wrong) / (2 * 5 - wrong)
    f1_1 = 1.0  # every class-1 image right, nothing else predicted as class 1
    assert m["macro_f1"] == pytest.approx((f1_0 + f1_1 + 0.0) / 3)
    if path == "test":
        row = m["per_class"][2]
        assert (row["support"], row["f1"], row["precision"], row["recall"], row["counted"]) == (0, 0.0, 0.0, None, True)
    else:
        assert m["per_class_f1"][2] == 0.0


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("k", [2, 4, 7])
def test_agrees_with_sklearn_on_random_labels(seed: int, k: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 60))
    # Draw from a random subset of classes so some are often absent from truth or predictions.
    y = rng.choice(rng.choice(k, size=max(1, k - 1 - seed % 2), replace=False), size=n)
    pred = np.where(rng.random(n) < 0.6, y, rng.integers(0, k, n))
    m = label_metrics(y, pred, k)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    with warnings.catch_warnings():  # sklearn warns when predictions hold classes absent from the truth
        warnings.simplefilter("ignore")
        assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert m["macro_f1"] == pytest.approx(skm.f1_score(y, pred, average="macro", zero_division=0))
    assert np.array_equal(m["confusion_matrix"], skm.confusion_matrix(y, pred, labels=range(k)))
    prec, rec, f1, sup = skm.precision_recall_fscore_support(y, pred, labels=range(k), zero_division=0)
    counted = set(np.union1d(y, pred).tolist())
    for i, row in enumerate(m["per_class"]):
        assert row["support"] == sup[i] and row["counted"] == (i in counted)
        if i in counted:
            assert (row["precision"], row["f1"]) == pytest.approx((prec[i], f1[i]))
        else:
            assert row["precision"] is None and row["f1"] is None
        assert row["recall"] == (pytest.approx(rec[i]) if sup[i] else None)
    # The macro average is exactly the mean over the counted rows.
    assert m["macro_f1"] == pytest.approx(np.mean([r["f1"] for r in m["per_class"] if r["counted"]]))


@pytest.mark.parametrize("seed", range(5))
def test_validation_and_test_paths_give_the_same_numbers(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    k = 5
    y = rng.integers(0, k - seed % 3, size=40)  # seed 1, 2, 4: top class(es) absent from the split
    pred = np.where(rng.random(40) < 0.7, y, rng.integers(0, k, 40))
    val, test = _validation_path(y, pred, k), _test_path(y, pred, k)
    for key in ("accuracy", "balanced_accuracy", "macro_f1"):
        assert val[key] == test[key], key
    assert val["per_class_f1"] == [row["f1"] for row in test["per_class"]]
    assert val["confusion"] == test["confusion_matrix"]
    assert validation_metrics(y, pred, k) == {key: v for key, v in val.items() if key != "loss"}


def test_empty_split_is_refused() -> None:
    with pytest.raises(ValueError, match="empty split"):
        label_metrics(np.array([], dtype=np.int64), np.array([], dtype=np.int64), 3)



# ------------------------------------------------------------------------------------------
# Uncertainty: Wilson ranges, bootstrap macro-F1, paired comparison
# ------------------------------------------------------------------------------------------
def test_wilson_interval_hand_computed() -> None:
    from core.metrics import wilson_interval

    # 0/10 and 10/10: the bound is (z^2/n) / (1 + z^2/n) = 0.384146 / 1.384146; never past 0 or 1.
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.277533), abs=1e-6)
    assert wilson_interval(10, 10) == pytest.approx((0.722467, 1.0), abs=1e-6)
    lo, hi = wilson_interval(121, 128)  # 94.5 % on beans' 128 test images
    assert lo == pytest.approx(0.891415, abs=1e-6) and hi == pytest.approx(0.973260, abs=1e-6)
    with pytest.raises(ValueError, match="at least one sample"):
        wilson_interval(0, 0)
    with pytest.raises(ValueError, match="between 0 and n=5"):
        wilson_interval(6, 5)


def test_wilson_interval_covers_95_percent() -> None:
    """Coverage over 4000 simulated test sets of 128 images at 93 % accuracy."""
    from core.metrics import wilson_interval

    hits = np.random.default_rng(3).binomial(128, 0.93, size=4000)
    covered = np.mean([lo <= 0.93 <= hi for lo, hi in (wilson_interval(int(h), 128) for h in hits)])
    assert 0.93 <= covered <= 0.97


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bootstrap_macro_f1_rows_match_sklearn(seed: int) -> None:
    from core.metrics import _macro_f1_rows, bootstrap_macro_f1

    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, size=(20, 40))
    pred = np.where(rng.random((20, 40)) < 0.7, y, rng.integers(0, 5, size=(20, 40)))  # class 4 never true
    got = _macro_f1_rows(y, pred, 5)
    want = [skm.f1_score(y[i], pred[i], average="macro", zero_division=0) for i in range(20)]
    assert got == pytest.approx(want, abs=1e-12)
    lo, hi = bootstrap_macro_f1(y[0], pred[0], 5)
    point = skm.f1_score(y[0], pred[0], average="macro", zero_division=0)
    assert lo <= point <= hi and hi - lo > 0.05
    assert bootstrap_macro_f1(y[0], pred[0], 5) == (lo, hi)  # fixed seed: reproducible


def test_intervals_in_the_test_report_narrow_with_more_images() -> None:
    rng = np.random.default_rng(0)
    widths = []
    for n in (100, 1600):
        y = rng.integers(0, 3, n)
        pred = np.where(rng.random(n) < 0.9, y, (y + 1) % 3)
        m = classification_metrics(y, np.eye(3)[pred], ["a", "b", "c"])
        iv = m["intervals"]
        assert iv["n"] == n and iv["accuracy"]["value"] == m["accuracy"]
        assert iv["accuracy"]["lo"] <= m["accuracy"] <= iv["accuracy"]["hi"]
        assert iv["macro_f1"]["value"] == pytest.approx(m["macro_f1"])
        assert iv["macro_f1"]["lo"] <= m["macro_f1"] <= iv["macro_f1"]["hi"]
        for c, r in zip(m["per_class"], iv["per_class_recall"]):
            assert r["value"] == pytest.approx(c["recall"]) and r["lo"] <= c["recall"] <= r["hi"]
        json.dumps(iv)
        widths.append(iv["accuracy"]["hi"] - iv["accuracy"]["lo"])
    assert widths[1] < widths[0] / 3  # 16x the images: about a quarter of the width


def test_absent_class_has_no_recall_range() -> None:
    m = classification_metrics(np.array([0, 0, 1, 1]), np.eye(3)[[0, 0, 1, 0]], ["a", "b", "c"])
    assert m["intervals"]["per_class_recall"][2] is None
    assert m["intervals"]["per_class_recall"][1]["value"] == 0.5


def test_paired_comparison() -> None:
    from core.metrics import compare_paired

    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 128)
    a = np.where(rng.random(128) < 0.93, y, (y + 1) % 3)
    same = compare_paired(y, a, a)
    assert same["mcnemar_p"] == 1.0 and not same["distinguishable"] and same["difference"] == 0.0
    # Three images apart (one-sided discordance 3:0): p = 2 * 0.5**3 = 0.25, within the margin.
    b = a.copy()
    b[np.flatnonzero(a == y)[:3]] = (y[np.flatnonzero(a == y)[:3]] + 1) % 3
    close = compare_paired(y, a, b)
    assert close["only_a_right"] == 3 and close["only_b_right"] == 0
    assert close["mcnemar_p"] == pytest.approx(0.25) and not close["distinguishable"]
    assert close["difference"] == pytest.approx(3 / 128) and close["difference_lo"] <= 3 / 128 <= close["difference_hi"]
    # A model right on 20 more images than the other: really different.
    c = a.copy()
    c[np.flatnonzero(a == y)[:20]] = (y[np.flatnonzero(a == y)[:20]] + 1) % 3
    far = compare_paired(y, a, c)
    assert far["distinguishable"] and far["mcnemar_p"] < 1e-4 and far["difference_lo"] > 0
    with pytest.raises(ValueError, match="same images: 128 labels, 128 and 127"):
        compare_paired(y, a, a[:-1])
