"""Plain words for what the Runs, Evaluate and Predict pages show to a doctor, agronomist or
lab technician: labels instead of field names, counts next to rates ("11 of 12 bean_rust found,
1 called healthy"), sensitivity and specificity for two-class tasks, rounded numbers, "9 min".

Pure functions over the read models and the stored evaluation metrics (no database, no
Streamlit), so the pages stay thin and the wording is tested on its own.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from workbench.views import LeaderboardRow

MISSING = "—"

# One line for each measure where a page first shows it (help= of st.metric, captions);
# accuracy, macro-F1, ECE and latency are in ``workbench.ui.METRIC_HELP``.
HELP: dict[str, str] = {
    "balanced_accuracy": "Balanced accuracy: the share found of each class, averaged, so a rare class counts "
                         "as much as a common one.",
    "macro_roc_auc": "ROC-AUC: how well the model's scores put images of a class above the others "
                     "(1 = always, 0.5 = no better than guessing), averaged over classes.",
    "roc_auc": "ROC-AUC: how well the model's scores put images of this class above the others "
               "(1 = always, 0.5 = no better than guessing).",
    "recall": "Found (recall): of the test images of a class, the share the model called that class.",
    "precision": "Precision: of the images the model called a class, the share that really are that class.",
    "f1": "F1: precision and recall in one number (1 = perfect).",
    "average_precision": "Average precision: the area under the precision-recall curve (1 = perfect).",
    "sensitivity": "Sensitivity: the share of the chosen class's images the model finds.",
    "specificity": "Specificity: the share of the other images the model correctly does not call that class.",
    "val_accuracy": "Validation accuracy: measured on the validation images used to pick the best round "
                    "of training; runs are ranked by their validation score.",
    "val_macro_f1": "Validation macro-F1: each class found, averaged so every class counts the same, on the "
                    "validation images; runs are ranked by it.",
}

# Why a page ranks by validation and only reports test (issue 25: validation chooses, test reports).
CHOOSE_BY_VALIDATION = ("Models are ranked by their validation score; the test score is the held-out report, "
                        "checked once, so choosing by it would make it optimistic.")

CURVE_LABELS: dict[str, str] = {
    "train_loss": "Training loss", "train_accuracy": "Training accuracy", "val_loss": "Validation loss",
    "val_accuracy": "Validation accuracy", "val_macro_f1": "Validation macro-F1",
    "val_balanced_accuracy": "Validation balanced accuracy", "macro_f1": "Validation macro-F1",
    "accuracy": "Validation accuracy", "loss": "Validation loss",
    "val_sensitivity_at_specificity": "Validation sensitivity at high specificity", "lr": "Learning rate",
    "epoch_seconds": "Seconds per round", "images_per_s": "Images per second", "best_epoch": "Best round so far",
    "phase_epoch": "Round within the phase",
}


def duration(seconds: float | None) -> str:
    """A duration as people say it: "45 s", "9 min", "2 h 05 min" (rounded, never "8 min 60 s")."""
    if seconds is None or (isinstance(seconds, float) and math.isnan(seconds)):
        return MISSING
    s = float(seconds)
    if s < 59.5:
        return f"{s:.0f} s"
    minutes = round(s / 60)
    if minutes < 60:
        return f"{minutes} min"
    return f"{minutes // 60} h {minutes % 60:02d} min"


def percent(x: float | None, digits: int = 0) -> str:
    """0.9487 -> "95 %"; a share that is not all or nothing never reads "100 %" or "0 %"
    (0.9991 -> "99.9 %", 0.999999 -> "over 99.99 %"); a dash when missing."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return MISSING
    while digits < 2 and 0 < x < 1 and round(x * 100, digits) in (0, 100):
        digits += 1
    if 0 < x < 1 and round(x * 100, digits) in (0, 100):
        return "over 99.99 %" if x > 0.5 else "under 0.01 %"
    return f"{x * 100:.{digits}f} %"


def rounded(x: float | None, digits: int = 3) -> float | str:
    """A score rounded to what a few hundred test images support; a dash when missing."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return MISSING
    return round(float(x), digits)


def curve_label(metric: str) -> str:
    return CURVE_LABELS.get(metric) or metric.replace("_", " ").strip().capitalize()


# --- Runs page ---------------------------------------------------------------------------

def leaderboard_table(rows: Sequence[LeaderboardRow]) -> list[dict[str, Any]]:
    """The leaderboard as the Runs page shows it: plain column labels, rounded numbers, training
    time as "9 min", a dash for what is not measured. The labels match ``views.LEADERBOARD_SORTS``."""
    def num(x: float | None, digits: int) -> float | None:
        return None if x is None else round(float(x), digits)  # None: an empty number cell

    return [{
        "run": r.run, "dataset": r.dataset, "model": r.variant, "resolution (px)": r.resolution,
        "augmentation": r.preset, "status": r.status,
        "validation macro-F1": num(r.val_macro_f1, 3), "validation accuracy": num(r.val_accuracy, 3),
        "test macro-F1": num(r.test_macro_f1, 3), "test accuracy": num(r.test_accuracy, 3),
        "test accuracy 95 % range": r.accuracy_range or MISSING, "test images": r.test_images,
        "latency ms": num(r.latency_ms, 2),
        "latency measured on": r.latency_on or MISSING, "size MB": num(r.size_mb, 1),
        "parameters (millions)": num(r.params_m, 2),
        "training time": duration(r.train_seconds), "batch": r.batch or MISSING, "created": r.created,
    } for r in rows]


# --- Evaluate page -----------------------------------------------------------------------

def found_sentences(metrics: dict[str, Any], most: int = 3) -> list[str]:
    """Per class, how many test images were found and what the others were called:
    "68 of 69 platelets found, 1 called WBC" (from the confusion matrix)."""
    classes, cm = metrics.get("classes") or [], metrics.get("confusion_matrix") or []
    out = []
    for i, cls in enumerate(classes):
        row = cm[i] if i < len(cm) else []
        n = int(sum(row))
        if n == 0:
            out.append(f"No test images of {cls}.")
            continue
        misses = sorted(((int(v), classes[j]) for j, v in enumerate(row) if j != i and v), key=lambda m: -m[0])
        text = f"{int(row[i])} of {n} {cls} found"
        if misses:
            text += ", " + ", ".join(f"{v} called {other}" for v, other in misses[:most])
            if len(misses) > most:
                text += f" and {sum(v for v, _ in misses[most:])} called another class"
        out.append(text + ".")
    return out


def positive_class(metrics: dict[str, Any]) -> str | None:
    """The class a two-class task looks for (the operating point's, else the second class)."""
    classes = metrics.get("classes") or []
    if len(classes) != 2:
        return None
    chosen = (metrics.get("operating_point") or {}).get("positive_class")
    return chosen if chosen in classes else classes[1]


def sensitivity_specificity(metrics: dict[str, Any]) -> str:
    """For a two-class task: sensitivity and specificity of the model's plain answer, with counts
    ("" for more classes or no test images)."""
    pos = positive_class(metrics)
    cm = metrics.get("confusion_matrix") or []
    if pos is None or len(cm) != 2:
        return ""
    classes = metrics["classes"]
    p = classes.index(pos)
    q = 1 - p
    tp, fn, tn, fp = int(cm[p][p]), int(cm[p][q]), int(cm[q][q]), int(cm[q][p])
    if tp + fn == 0 or tn + fp == 0:
        return ""
    return (f"**Sensitivity {percent(tp / (tp + fn))}**: {tp} of {tp + fn} {pos} images found. "
            f"**Specificity {percent(tn / (tn + fp))}**: {tn} of {tn + fp} {classes[q]} images correctly "
            f"not called {pos}.")


def operating_point_sentence(op: dict[str, Any] | None) -> str:
    """The threshold chosen for a sensitivity target, in words ("" when there is none)."""
    if not op or "error" in op or op.get("threshold") is None:
        return ""
    pos = op.get("positive_class", "the chosen class")
    where = "the validation images" if op.get("chosen_on") == "val" else "the test images"
    return (f"To find at least {percent(op.get('target_sensitivity'))} of {pos} images, call an image {pos} when "
            f"its probability is at least {percent(op['threshold'], 1)} (chosen on {where}). On the test images "
            f"this finds {percent(op.get('sensitivity'))} of them (sensitivity) and correctly clears "
            f"{percent(op.get('specificity'))} of the others (specificity).")


def top_k_sentence(top_k: dict[str, float] | None) -> str:
    """{"top1": 0.9, "top3": 0.99} -> "The right class is the model's first answer for 90 % of the
    test images, among its first 3 for 99 %." ("" when none)."""
    if not top_k:
        return ""
    parts = []
    for key, value in sorted(top_k.items(), key=lambda kv: int(kv[0].removeprefix("top") or 1)):
        k = int(key.removeprefix("top") or 1)
        which = "the model's first answer" if k == 1 else f"among its first {k}"
        parts.append(f"{which} for {percent(value, 1)}")
    return "The right class is " + ", ".join(parts) + " of the test images."


def calibration_sentence(cal: dict[str, Any]) -> str:
    """How the confidences were adjusted (temperature scaling), or why not."""
    before, after = (cal.get("before") or {}).get("ece"), (cal.get("after") or {}).get("ece")
    if cal.get("temperature") and before is not None and after is not None:
        return (f"Confidences adjusted on {cal.get('n_val', 'the')} validation images (temperature "
                f"{cal['temperature']:.2f}): calibration error {before:.3f} → {after:.3f}.")
    return str(cal.get("note") or "")


def per_class_table(metrics: dict[str, Any], recall_ranges: Sequence[str] = ()) -> list[dict[str, Any]]:
    """The per-class scores with plain labels; a dash where a score is undefined (a class with no
    test images is not counted in the averages)."""
    out = []
    for i, row in enumerate(metrics.get("per_class") or []):
        found = recall_ranges[i] if i < len(recall_ranges) else percent(row.get("recall"), 1)
        out.append({"class": row.get("class"), "test images": row.get("support"), "found (recall)": found,
                    "precision": rounded(row.get("precision")), "F1": rounded(row.get("f1")),
                    "ROC-AUC": rounded(row.get("roc_auc")), "average precision": rounded(row.get("average_precision")),
                    "in the averages": "yes" if row.get("counted", True) else "no (no test images)"})
    return out


def misclassified_table(wrong: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The highest-loss mistakes: image, true class, the model's answer and its confidence."""
    return [{"image": w.get("name") or MISSING, "true class": w.get("true"), "the model said": w.get("predicted"),
             "with confidence": percent(w.get("confidence"), 1)} for w in wrong]


def tta_sentence(effect: dict[str, Any]) -> str:
    n = int(effect.get("changed_predictions") or 0)
    return (f"Test-time augmentation changed {n} prediction{'s' if n != 1 else ''}; accuracy "
            f"{percent(effect['without']['accuracy'], 1)} → {percent(effect['with']['accuracy'], 1)}.")


# --- Predict page ------------------------------------------------------------------------

def decision_sentence(cal: dict[str, Any]) -> str:
    """The two-class decision rule a bundle applies ("" when it has none)."""
    if cal.get("threshold") is None:
        return ""
    where = {"val": "validation images", "test": "test images"}.get(str(cal.get("chosen_on")), "")
    return (f"Decision: **{cal['positive_class']}** when its probability is at least {percent(cal['threshold'], 1)}, "
            f"otherwise **{cal['negative_class']}**" + (f" (threshold chosen on the {where})." if where else "."))


def familiarity_sentence(score: float | None, threshold: float | None) -> str:
    """The out-of-distribution check of one image, for the expert detail ("" when not measured)."""
    if score is None or threshold is None:
        return ""
    verdict = "unlike" if score > threshold else "like"
    return (f"Looks {verdict} the training images: unfamiliarity score {score:.2f} (energy of the model's raw "
            f"scores; images above {threshold:.2f} are flagged).")
