"""Every classification metric, one definition for validation (model selection) and test.

Training's per-epoch validation (``validation_metrics``) and the held-out test report
(``classification_metrics``, used by the leaderboard and model card) both build on
``label_metrics``, so a macro-F1 means the same thing everywhere.

Macro averages run over sklearn's default label set: the classes that occur in the split's
true labels OR in the predictions. A class absent from the split that is never predicted is
not counted (perfect predictions score 1.0); predicting an absent class still costs (its F1
is 0 and it is counted). Per-class rows of an uncounted class say so: precision, recall and
F1 are None rather than a misleading 0. Recall (and so balanced accuracy) is undefined for a
class with no true samples and is averaged over the classes present, as sklearn does.

Uncertainty (``metric_intervals``, ``compare_paired``): 95 % Wilson ranges for accuracy and
per-class recall, a fixed-seed vectorised bootstrap for macro-F1, and McNemar's test (plus a
paired bootstrap) for whether two runs differ on the same test images.

Also here: softmax / NLL, expected calibration error, temperature fitting and a sensitivity
threshold (numpy in, JSON-ready dicts out).
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

# sklearn.metrics is imported inside the functions: it takes seconds, and importing core.train
# (for its recipes, say) must stay quick.


# ------------------------------------------------------------------------------------------
# Label metrics: shared by validation and test
# ------------------------------------------------------------------------------------------
def counted_classes(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """The classes a macro average runs over: those in the true labels or the predictions."""
    return np.union1d(np.unique(y_true), np.unique(y_pred))


def label_metrics(y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray,
                  num_classes: int) -> dict[str, Any]:
    """Accuracy, balanced accuracy, macro-F1, per-class precision/recall/F1/support, confusion."""
    from sklearn.metrics import balanced_accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

    y = np.asarray(y_true, dtype=np.int64)
    pred = np.asarray(y_pred, dtype=np.int64)
    if len(y) == 0:
        raise ValueError("cannot compute metrics on an empty split")
    labels = list(range(num_classes))
    precision, recall, f1, support = precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    predicted = np.bincount(pred, minlength=num_classes)
    counted = np.isin(labels, counted_classes(y, pred))
    with warnings.catch_warnings():  # "y_pred contains classes not in y_true": expected, handled
        warnings.simplefilter("ignore")
        balanced = balanced_accuracy_score(y, pred)
    per_class = [{"precision": float(precision[i]) if counted[i] else None,
                  # No true samples: recall is undefined (and not part of balanced accuracy).
                  "recall": float(recall[i]) if support[i] else None,
                  "f1": float(f1[i]) if counted[i] else None,
                  "support": int(support[i]), "predicted": int(predicted[i]), "counted": bool(counted[i])}
                 for i in labels]
    return {
        "n": int(len(y)),
        "accuracy": float((pred == y).mean()),
        "balanced_accuracy": float(balanced),
        "macro_f1": float(f1_score(y, pred, average="macro", zero_division=0)),
        "per_class": per_class,
        "confusion_matrix": confusion_matrix(y, pred, labels=labels),
    }


def validation_metrics(y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray,
                       num_classes: int) -> dict[str, Any]:
    """What training records per epoch and selects the best epoch on (checkpoint-safe plain types)."""
    m = label_metrics(y_true, y_pred, num_classes)
    return {
        "accuracy": m["accuracy"],
        "macro_f1": m["macro_f1"],
        "balanced_accuracy": m["balanced_accuracy"],
        "per_class_f1": [c["f1"] for c in m["per_class"]],  # None: class absent from split and predictions
        "confusion": m["confusion_matrix"].tolist(),
    }


# ------------------------------------------------------------------------------------------
# Test report: label metrics plus the probability-based ones
# ------------------------------------------------------------------------------------------
def _binary_curve(y_bin: np.ndarray, score: np.ndarray) -> dict[str, Any]:
    """ROC and PR points for one positive class (sklearn does the sweeping)."""
    from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

    if y_bin.min() == y_bin.max():  # class absent (or only class) in this split: undefined
        return {"auc": None, "ap": None, "fpr": [], "tpr": [], "precision": [], "recall": []}
    fpr, tpr, _ = roc_curve(y_bin, score)
    prec, rec, _ = precision_recall_curve(y_bin, score)
    return {"auc": float(roc_auc_score(y_bin, score)), "ap": float(average_precision_score(y_bin, score)),
            "fpr": fpr.tolist(), "tpr": tpr.tolist(), "precision": prec.tolist(), "recall": rec.tolist()}


def top_k_accuracy(y: np.ndarray, probs: np.ndarray, k: int) -> float:
    """Share of samples whose true class is among the k highest scores (ties: lower index first)."""
    order = np.argsort(-probs, axis=1, kind="stable")
    return float((order[:, :k] == y[:, None]).any(1).mean())


def classification_metrics(y_true: Sequence[int] | np.ndarray, probs: np.ndarray, classes: Sequence[str],
                           top_k: Sequence[int] = (1, 3, 5)) -> dict[str, Any]:
    """Accuracy, balanced accuracy, macro-F1, per-class P/R/F1/support, confusion matrix
    (counts and row-normalised), one-vs-rest ROC-AUC and PR curves, top-k accuracy."""
    y = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(probs, dtype=np.float64)
    k = len(classes)
    if p.ndim != 2 or p.shape != (len(y), k):
        raise ValueError(f"probs must have shape ({len(y)}, {k}), got {p.shape}")
    m = label_metrics(y, p.argmax(1), k)
    cm = m["confusion_matrix"]
    support = cm.sum(1)
    cm_norm = np.divide(cm, support[:, None], out=np.zeros((k, k)), where=support[:, None] > 0)
    curves = {name: _binary_curve((y == i).astype(int), p[:, i]) for i, name in enumerate(classes)}
    per_class = [{"class": name, **{key: row[key] for key in ("precision", "recall", "f1", "support", "counted")},
                  "roc_auc": curves[name]["auc"], "average_precision": curves[name]["ap"]}
                 for name, row in zip(classes, m["per_class"])]
    aucs = [c["auc"] for c in curves.values() if c["auc"] is not None]
    return {
        "n": m["n"],
        "classes": list(classes),
        "accuracy": m["accuracy"],
        "balanced_accuracy": m["balanced_accuracy"],
        "macro_f1": m["macro_f1"],
        "macro_roc_auc": float(np.mean(aucs)) if aucs else None,
        "top_k": {f"top{kk}": top_k_accuracy(y, p, kk) for kk in top_k if kk <= k},
        "per_class": per_class,
        "confusion_matrix": cm.tolist(),
        "confusion_matrix_normalized": cm_norm.tolist(),
        "curves": curves,
        "intervals": metric_intervals(y, p.argmax(1), k),
    }


# ------------------------------------------------------------------------------------------
# Uncertainty: how far a figure measured on n test images can be trusted
# ------------------------------------------------------------------------------------------
Z95 = 1.959963984540054  # two-sided 95 % normal quantile
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """95 % Wilson score interval for a proportion (sound at 0 %, 100 % and small n)."""
    if n <= 0:
        raise ValueError("a proportion needs at least one sample")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be between 0 and n={n}, got {successes}")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def _resample_chunks(n: int, resamples: int, seed: int, max_cells: int = 2_000_000):
    """Bootstrap index rows (resamples x n) in chunks, so a large test split stays small in memory."""
    rng = np.random.default_rng(seed)
    step = max(1, max_cells // max(n, 1))
    for start in range(0, resamples, step):
        yield rng.integers(0, n, size=(min(step, resamples - start), n))


def _macro_f1_rows(y: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Macro-F1 of each row of (resamples, n) label arrays, as ``label_metrics`` defines it
    (classes absent from both the row's labels and predictions are not counted), vectorised."""
    rows = y.shape[0]
    k = num_classes
    flat = (np.arange(rows)[:, None] * k * k + y * k + pred).ravel()
    cm = np.bincount(flat, minlength=rows * k * k).reshape(rows, k, k)
    tp = np.diagonal(cm, axis1=1, axis2=2).astype(np.float64)
    fn = cm.sum(2) - tp
    fp = cm.sum(1) - tp
    denom = 2 * tp + fp + fn
    counted = denom > 0
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=counted)
    return f1.sum(1) / np.maximum(counted.sum(1), 1)


def bootstrap_macro_f1(y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray, num_classes: int,
                       *, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """95 % percentile-bootstrap interval of macro-F1 (images resampled with replacement; fixed seed)."""
    y = np.asarray(y_true, dtype=np.int64)
    pred = np.asarray(y_pred, dtype=np.int64)
    if len(y) == 0:
        raise ValueError("cannot bootstrap an empty split")
    scores = np.concatenate([_macro_f1_rows(y[idx], pred[idx], num_classes)
                             for idx in _resample_chunks(len(y), resamples, seed)])
    lo, hi = np.percentile(scores, [2.5, 97.5])
    return float(lo), float(hi)


def metric_intervals(y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray,
                     num_classes: int, *, resamples: int = BOOTSTRAP_RESAMPLES,
                     seed: int = BOOTSTRAP_SEED) -> dict[str, Any]:
    """95 % ranges: Wilson for accuracy and each class's recall, bootstrap for macro-F1.

    ``per_class_recall[i]`` is None for a class with no test images (recall undefined)."""
    y = np.asarray(y_true, dtype=np.int64)
    pred = np.asarray(y_pred, dtype=np.int64)
    n = len(y)
    if n == 0:
        raise ValueError("cannot compute intervals on an empty split")
    correct = int((y == pred).sum())
    acc_lo, acc_hi = wilson_interval(correct, n)
    f1_lo, f1_hi = bootstrap_macro_f1(y, pred, num_classes, resamples=resamples, seed=seed)
    recall: list[dict[str, float] | None] = []
    for c in range(num_classes):
        support = int((y == c).sum())
        if support == 0:
            recall.append(None)
            continue
        hit = int(((y == c) & (pred == c)).sum())
        lo, hi = wilson_interval(hit, support)
        recall.append({"value": hit / support, "lo": lo, "hi": hi})
    return {"n": n, "level": 0.95,
            "accuracy": {"value": correct / n, "lo": acc_lo, "hi": acc_hi, "method": "Wilson score"},
            "macro_f1": {"value": float(_macro_f1_rows(y[None], pred[None], num_classes)[0]), "lo": f1_lo,
                         "hi": f1_hi, "method": f"bootstrap, {resamples} resamples, seed {seed}"},
            "per_class_recall": recall}


def compare_paired(y_true: Sequence[int] | np.ndarray, pred_a: Sequence[int] | np.ndarray,
                   pred_b: Sequence[int] | np.ndarray, *, resamples: int = BOOTSTRAP_RESAMPLES,
                   seed: int = BOOTSTRAP_SEED, alpha: float = 0.05) -> dict[str, Any]:
    """Are two models distinguishable on the same test images?

    McNemar's exact test on the images exactly one of them gets right (the others say nothing
    about which is better), plus a paired-bootstrap 95 % range of the accuracy difference (a - b).
    ``distinguishable`` when McNemar's p < ``alpha``."""
    from scipy.stats import binomtest

    y = np.asarray(y_true, dtype=np.int64)
    pa, pb = np.asarray(pred_a, dtype=np.int64), np.asarray(pred_b, dtype=np.int64)
    if not len(y) == len(pa) == len(pb):
        raise ValueError(f"paired comparison needs predictions for the same images: {len(y)} labels, "
                         f"{len(pa)} and {len(pb)} predictions")
    a, b = pa == y, pb == y
    if len(y) == 0:
        raise ValueError("cannot compare on an empty split")
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    discordant = only_a + only_b
    p = 1.0 if discordant == 0 else float(binomtest(only_a, discordant, 0.5).pvalue)
    diff = a.astype(np.float64) - b.astype(np.float64)
    boot = np.concatenate([diff[idx].mean(1) for idx in _resample_chunks(len(y), resamples, seed)])
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return {"n": int(len(y)), "accuracy_a": float(a.mean()), "accuracy_b": float(b.mean()),
            "difference": float(diff.mean()), "difference_lo": float(lo), "difference_hi": float(hi),
            "only_a_right": only_a, "only_b_right": only_b, "mcnemar_p": p, "distinguishable": bool(p < alpha)}


def overlapping(a: dict[str, float], b: dict[str, float]) -> bool:
    """Whether two stored intervals ({"lo", "hi"}) overlap: a quick 'within each other's margin'."""
    return a["lo"] <= b["hi"] and b["lo"] <= a["hi"]


# ------------------------------------------------------------------------------------------
# Probabilities and calibration
# ------------------------------------------------------------------------------------------
def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    z = z - z.max(axis=1, keepdims=True)  # numerically stable
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def per_sample_loss(logits: np.ndarray, y: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Negative log-likelihood of the true class, per sample."""
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    z = z - z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return -logp[np.arange(len(y)), y]


def nll(logits: np.ndarray, y: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the true class."""
    return float(per_sample_loss(logits, y, temperature).mean())


def calibration(probs: np.ndarray, y_true: Sequence[int] | np.ndarray, n_bins: int = 15) -> dict[str, Any]:
    """Expected calibration error (top-1 confidence, equal-width bins) plus the bins for a
    reliability diagram. ECE = sum_b |B|/n * |acc(B) - conf(B)|."""
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(y_true, dtype=np.int64)
    conf = p.max(1)
    correct = (p.argmax(1) == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # Bin b holds conf in (edges[b], edges[b+1]]; conf==0 is impossible for a softmax max.
    idx = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    bins = []
    ece = 0.0
    for b in range(n_bins):
        m = idx == b
        cnt = int(m.sum())
        if cnt:
            acc_b: float | None = float(correct[m].mean())
            conf_b: float | None = float(conf[m].mean())
            ece += cnt / len(y) * abs(float(correct[m].mean()) - float(conf[m].mean()))
        else:
            acc_b = conf_b = None
        bins.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "count": cnt,
                     "accuracy": acc_b, "confidence": conf_b})
    return {"ece": float(ece), "n_bins": n_bins, "bins": bins,
            "mean_confidence": float(conf.mean()), "accuracy": float(correct.mean())}


def fit_temperature(logits: np.ndarray, y_true: Sequence[int] | np.ndarray,
                    bounds: tuple[float, float] = (0.05, 20.0)) -> float:
    """Temperature T minimising validation NLL of softmax(logits / T).

    NLL is unimodal in log T for a fixed set of logits, so a bounded 1-D search suffices.
    """
    from scipy.optimize import minimize_scalar

    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(y_true, dtype=np.int64)
    if len(y) == 0:
        raise ValueError("cannot fit a temperature on an empty validation split")
    res = minimize_scalar(lambda lt: nll(z, y, math.exp(lt)), bounds=(math.log(bounds[0]), math.log(bounds[1])),
                          method="bounded", options={"xatol": 1e-4})
    return float(math.exp(res.x))


def threshold_for_sensitivity(y_true_binary: Sequence[int] | np.ndarray, scores: np.ndarray,
                              target_sensitivity: float = 0.95) -> dict[str, Any]:
    """Highest threshold t such that 'score >= t => positive' reaches the target sensitivity
    (recall of the positive class); reports the specificity it gives on the same data."""
    y = np.asarray(y_true_binary, dtype=np.int64)
    s = np.asarray(scores, dtype=np.float64)
    if not 0.0 < target_sensitivity <= 1.0:
        raise ValueError(f"target sensitivity must be in (0, 1], got {target_sensitivity}")
    pos, neg = s[y == 1], s[y == 0]
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError("threshold needs both positive and negative examples in the split")
    # Keep at least ceil(target * P) positives at or above t: t = the k-th largest positive score.
    need = int(math.ceil(target_sensitivity * len(pos) - 1e-9))
    t = float(np.sort(pos)[::-1][need - 1])
    sens = float((pos >= t).mean())
    spec = float((neg < t).mean())
    return {"target_sensitivity": float(target_sensitivity), "threshold": t, "sensitivity": sens,
            "specificity": spec, "positives": int(len(pos)), "negatives": int(len(neg))}


def sensitivity_at_specificity(y_true_binary: Sequence[int] | np.ndarray, scores: np.ndarray,
                               target_specificity: float = 0.95) -> float:
    """The highest sensitivity (recall of the positive class) reachable by a threshold on
    ``scores`` that keeps specificity >= ``target_specificity`` (the ROC curve, scikit-learn)."""
    from sklearn.metrics import roc_curve

    y = np.asarray(y_true_binary, dtype=np.int64)
    if not 0.0 < target_specificity <= 1.0:
        raise ValueError(f"target specificity must be in (0, 1], got {target_specificity}")
    if y.min(initial=1) == y.max(initial=0):  # one class only: the curve is undefined
        return float("nan")
    fpr, tpr, _ = roc_curve(y, np.asarray(scores, dtype=np.float64))
    ok = fpr <= 1.0 - target_specificity + 1e-12
    return float(tpr[ok].max()) if ok.any() else 0.0
