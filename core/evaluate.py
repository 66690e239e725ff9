"""Honest evaluation on the held-out test split.

Two layers, so the arithmetic is easy to test against sklearn and hand-computed cases:

* pure metric functions live in ``core.metrics`` (one definition shared with training's
  validation) and are re-exported here: ``classification_metrics``, ``calibration``,
  ``fit_temperature``, ``threshold_for_sensitivity``, ``softmax``, ``nll``;
* the model-running part: ``predict_logits`` (optional horizontal-flip TTA),
  ``evaluate_model`` (metrics + plots + misclassified gallery with Grad-CAM).

The test split is never used for model selection: temperature scaling is fitted on the
validation split only and then applied to the test logits.
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from core.bundle import OOD_KEEP, OOD_SCORE, energy_score
from core.metrics import (
    calibration,
    classification_metrics,
    fit_temperature,
    nll,
    per_sample_loss,
    softmax,
    threshold_for_sensitivity,
)
from core.preprocessing import Preprocessing, preprocess

ProgressCb = Callable[[str, float], None]


# ------------------------------------------------------------------------------------------
# Model-running part
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EvalItem:
    """One labelled image to evaluate (path on disk + class index)."""

    path: Path
    label: int
    name: str = ""  # shown in the gallery (e.g. the original file name)


def load_batch(paths: Sequence[Path], pre: Preprocessing) -> np.ndarray:
    from core.images import load_rgb

    return np.stack([preprocess(load_rgb(p), pre) for p in paths]).astype(np.float32)


def iter_batches(paths: Sequence[Path], pre: Preprocessing, batch_size: int = 32):
    """Yield preprocessed float32 (B,3,R,R) arrays, in order (one decode per image)."""
    for i in range(0, len(paths), batch_size):
        yield load_batch(paths[i:i + batch_size], pre)


def predict_logits(model: Any, paths: Sequence[Path], pre: Preprocessing, *, tta: bool = False,
                   batch_size: int = 32, progress: ProgressCb | None = None) -> dict[str, np.ndarray]:
    """PyTorch logits for every image; with ``tta`` also the flip-averaged logits.

    Returns {"plain": (N,K)} and, with TTA, {"tta": (N,K)} (mean of plain and h-flipped logits).
    """
    import torch

    model.eval()
    plain, flipped = [], []
    done = 0
    device = next(model.parameters()).device  # where the caller put the model (--device)
    with torch.inference_mode():
        for x in iter_batches(paths, pre, batch_size):
            t = torch.from_numpy(x).to(device)
            plain.append(model(t).float().cpu().numpy())
            if tta:
                flipped.append(model(torch.flip(t, dims=[3])).float().cpu().numpy())
            done += len(x)
            if progress:
                progress(f"predicted {done}/{len(paths)} images", done / max(1, len(paths)))
    k = getattr(model, "num_classes", 0)
    out = {"plain": np.concatenate(plain) if plain else np.zeros((0, k), np.float32)}
    if tta:
        out["tta"] = (out["plain"] + np.concatenate(flipped)) / 2.0 if flipped else out["plain"]
    return out


@dataclass
class EvaluationResult:
    metrics: dict[str, Any]
    plots: dict[str, Path] = field(default_factory=dict)  # name -> PNG path
    test_logits: np.ndarray | None = None


def _summary(m: dict[str, Any]) -> dict[str, Any]:
    return {k: m[k] for k in ("accuracy", "balanced_accuracy", "macro_f1", "macro_roc_auc")}


def images_fingerprint(paths: Sequence[Path | str]) -> str:
    """A short fingerprint of the test images, so two runs are only compared image by image
    when they were evaluated on the same images in the same order."""
    import hashlib

    return hashlib.sha1("\n".join(str(p) for p in paths).encode()).hexdigest()[:16]


def outcome_record(y: np.ndarray, pred: np.ndarray, paths: Sequence[Path | str]) -> dict[str, Any]:
    """Which test images the model got right ("1") or wrong ("0"), in test order: what a paired
    comparison of two runs (``core.metrics.compare_paired``) needs, without storing predictions."""
    return {"test_set": images_fingerprint(paths), "n": int(len(y)),
            "correct": "".join("1" if ok else "0" for ok in (np.asarray(pred) == np.asarray(y)))}


def evaluate_model(model: Any, pre: Preprocessing, classes: Sequence[str], test: Sequence[EvalItem],
                   val: Sequence[EvalItem] = (), *, out_dir: str | Path | None = None, tta: bool = False,
                   sensitivity: float = 0.95, positive_class: str | None = None, gallery_size: int = 12,
                   n_bins: int = 15, batch_size: int = 32, test_logits: np.ndarray | None = None,
                   progress: ProgressCb | None = None) -> EvaluationResult:
    """Evaluate on ``test`` (never used for selection); temperature fitted on ``val``.

    ``test_logits`` may pass already-computed plain PyTorch logits (post-run verification
    computes them anyway) to avoid a second pass. Plots are written to ``out_dir`` if given.
    """
    if not test:
        raise ValueError("the test split is empty: nothing to evaluate (re-split the dataset with a test share)")
    k = len(classes)
    y = np.array([it.label for it in test], dtype=np.int64)
    paths = [it.path for it in test]
    if test_logits is None or tta:
        out = predict_logits(model, paths, pre, tta=tta, batch_size=batch_size, progress=progress)
        plain = out["plain"] if test_logits is None else test_logits
    else:
        out, plain = {}, test_logits
    logits = out["tta"] if tta else plain
    probs = softmax(logits)
    m = classification_metrics(y, probs, classes)
    m["split"] = "test"
    m["tta"] = bool(tta)
    m["outcomes"] = outcome_record(y, probs.argmax(1), paths)
    if tta:
        base = classification_metrics(y, softmax(plain), classes)
        m["tta_effect"] = {"without": _summary(base), "with": _summary(m),
                           "accuracy_delta": m["accuracy"] - base["accuracy"],
                           "changed_predictions": int((plain.argmax(1) != logits.argmax(1)).sum())}

    # Calibration: ECE before, temperature fitted on validation only, ECE after (on test).
    m["calibration"] = {"before": calibration(probs, y, n_bins)}
    yv = np.array([it.label for it in val], dtype=np.int64)
    val_logits = None
    if val:
        vl = predict_logits(model, [it.path for it in val], pre, tta=tta, batch_size=batch_size)
        val_logits = vl["tta"] if tta else vl["plain"]
        temp = fit_temperature(val_logits, yv)
        m["calibration"].update(temperature=temp, fitted_on="val", n_val=int(len(yv)),
                                after=calibration(softmax(logits, temp), y, n_bins),
                                nll_before=nll(logits, y), nll_after=nll(logits, y, temp))
        if temp < 0.051 or temp > 19.9:
            m["calibration"]["warning"] = (f"temperature {temp:.3g} hit the search bound: the validation split is "
                                           "too small or the model too wrong for reliable calibration")
    else:
        m["calibration"].update(temperature=None, fitted_on=None,
                                note="no validation images: temperature scaling skipped")
    # The bundle runs no TTA, so the out-of-distribution threshold is fitted on plain logits.
    m["ood"] = fit_ood_threshold(vl["plain"] if val else None, plain)

    if k == 2:
        pos_name = positive_class if positive_class is not None else classes[1]
        if pos_name not in classes:
            raise ValueError(f"positive class {pos_name!r} is not one of {list(classes)}")
        pi = list(classes).index(pos_name)
        try:
            # Chosen on the validation split when there is one (choosing on test is optimistic),
            # then reported on test; the test-chosen threshold is kept for reference.
            th = threshold_for_sensitivity((y == pi).astype(int), probs[:, pi], sensitivity)
            th.update(positive_class=pos_name, chosen_on="test")
            if val_logits is not None and len(set(yv == pi)) == 2:
                tv = threshold_for_sensitivity((yv == pi).astype(int), softmax(val_logits)[:, pi], sensitivity)
                pos_t, neg_t = probs[y == pi, pi], probs[y != pi, pi]
                th = {**tv, "positive_class": pos_name, "chosen_on": "val",
                      "val_sensitivity": tv["sensitivity"], "val_specificity": tv["specificity"],
                      "sensitivity": float((pos_t >= tv["threshold"]).mean()),
                      "specificity": float((neg_t < tv["threshold"]).mean()), "test_chosen": th}
        except ValueError as e:
            th = {"positive_class": pos_name, "error": str(e)}
        m["operating_point"] = th
    elif positive_class is not None:
        m["operating_point"] = {"error": "a sensitivity threshold is only defined for two-class tasks"}

    # Misclassified gallery: the highest-loss test images.
    loss = per_sample_loss(logits, y)
    wrong = np.flatnonzero(probs.argmax(1) != y)
    worst = wrong[np.argsort(-loss[wrong], kind="stable")][:gallery_size]
    m["misclassified"] = [{"index": int(i), "path": str(test[i].path), "name": test[i].name or Path(test[i].path).name,
                           "true": classes[y[i]], "predicted": classes[int(probs[i].argmax())],
                           "confidence": float(probs[i].max()), "loss": float(loss[i])} for i in worst]

    res = EvaluationResult(metrics=m, test_logits=plain)
    if out_dir is not None:
        from core import gradcam

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        res.plots["confusion_matrix"] = plot_confusion(m, out_dir / "confusion_matrix.png")
        res.plots["roc"] = plot_curves(m, "roc", out_dir / "roc.png")
        res.plots["pr"] = plot_curves(m, "pr", out_dir / "pr.png")
        res.plots["reliability"] = plot_reliability(m["calibration"], out_dir / "reliability.png")
        if len(worst):
            cams = [gradcam.grad_cam(model, load_batch([test[i].path], pre), int(probs[i].argmax())) for i in worst]
            res.plots["misclassified"] = plot_gallery(m["misclassified"], [test[i].path for i in worst], cams, pre,
                                                      out_dir / "misclassified.png")
        metrics_path = out_dir / "metrics.json"
        metrics_path.write_text(json.dumps(m, indent=1))
        res.plots["metrics_json"] = metrics_path
    return res


OOD_MARGIN = 1e-3  # energy units


def fit_ood_threshold(val_logits: np.ndarray | None, test_logits: np.ndarray | None = None,
                      keep: float = OOD_KEEP) -> dict[str, Any]:
    """The energy threshold (``core.bundle.energy_score``) that keeps ``keep`` of the validation images.

    The ceil(keep * n)-th lowest validation energy: at least ``keep`` of them are kept, so with
    few validation images the check errs towards flagging fewer in-distribution images. Also
    reports the share of test images it flags (in-distribution images wrongly flagged)."""
    if val_logits is None or len(val_logits) == 0:
        return {"score": OOD_SCORE, "threshold": None, "keep": keep,
                "note": "no validation images: no out-of-distribution check"}
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must be a share between 0 and 1, got {keep!r}")
    val = np.sort(energy_score(val_logits))
    n = len(val)
    # A hair above the validation score it keeps: the exported model's logits differ from
    # PyTorch's by ~1e-5, and that image must stay kept when the bundle scores it.
    threshold = float(val[max(1, math.ceil(keep * n - 1e-9)) - 1]) + OOD_MARGIN
    out: dict[str, Any] = {"score": OOD_SCORE, "threshold": threshold, "keep": keep, "fitted_on": "val",
                           "n_val": int(n), "val_kept": float((val <= threshold).mean()), "test_flagged": None}
    if test_logits is not None and len(test_logits):
        out["test_flagged"] = float((energy_score(test_logits) > threshold).mean())
    return out


# ------------------------------------------------------------------------------------------
# Plots (matplotlib, Agg: no display needed on a server)
# ------------------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    _plt().close(fig)
    return path


def plot_confusion(m: dict[str, Any], path: Path) -> Path:
    plt = _plt()
    cm = np.asarray(m["confusion_matrix"])
    cmn = np.asarray(m["confusion_matrix_normalized"])
    classes = m["classes"]
    size = max(4.0, 0.6 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(cmn, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, label="fraction of true class")
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, f"{cm[i, j]}\n{cmn[i, j]:.0%}", ha="center", va="center", fontsize=8,
                    color="white" if cmn[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"Confusion matrix (test, n={m['n']})")
    return _save(fig, path)


def plot_curves(m: dict[str, Any], kind: str, path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for name, c in m["curves"].items():
        if c["auc"] is None:
            continue
        if kind == "roc":
            ax.plot(c["fpr"], c["tpr"], label=f"{name} (AUC {c['auc']:.3f})")
        else:
            ax.plot(c["recall"], c["precision"], label=f"{name} (AP {c['ap']:.3f})")
    if kind == "roc":
        ax.plot([0, 1], [0, 1], "k--", lw=0.8)
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate (sensitivity)")
        ax.set_title("ROC, one-vs-rest (test)")
    else:
        ax.set_xlabel("recall")
        ax.set_ylabel("precision")
        ax.set_title("Precision-recall, one-vs-rest (test)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7, loc="lower right" if kind == "roc" else "lower left")
    return _save(fig, path)


def plot_reliability(cal: dict[str, Any], path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="perfect calibration")
    for key, style in (("before", "o-"), ("after", "s-")):
        c = cal.get(key)
        if not c:
            continue
        pts = [(b["confidence"], b["accuracy"]) for b in c["bins"] if b["count"]]
        label = f"{key} (ECE {c['ece']:.3f})" if key == "before" else f"T={cal['temperature']:.2f} (ECE {c['ece']:.3f})"
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=label)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title("Reliability diagram (test)")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_gallery(entries: list[dict[str, Any]], paths: Sequence[Path], cams: Sequence[np.ndarray],
                 pre: Preprocessing, path: Path) -> Path:
    """Misclassified images: the model's input crop with the Grad-CAM of the predicted class."""
    from core.gradcam import overlay
    from core.images import load_rgb
    from core.preprocessing import resize_and_crop

    plt = _plt()
    n = len(entries)
    cols = min(4, n)
    rows = int(math.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.5 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, e, p, cam in zip(axes.flat, entries, paths, cams):
        crop = np.asarray(resize_and_crop(load_rgb(p), pre))
        ax.imshow(overlay(crop, cam))
        ax.set_title(f"true: {e['true']}\npred: {e['predicted']} ({e['confidence']:.0%})", fontsize=8)
    fig.suptitle("Highest-loss test errors (Grad-CAM of the predicted class)", fontsize=10)
    return _save(fig, path)


__all__ = [
    "EvalItem", "EvaluationResult", "evaluate_model", "fit_ood_threshold", "predict_logits", "load_batch",
    "iter_batches",
    "classification_metrics", "calibration", "fit_temperature", "nll", "per_sample_loss", "softmax",
    "threshold_for_sensitivity", "plot_confusion", "plot_curves", "plot_reliability", "plot_gallery",
]


# ------------------------------------------------------------------------------------------
# The leakage-free part of the test split
# ------------------------------------------------------------------------------------------
def leakage_free_metrics(y_true: Sequence[int] | np.ndarray, logits: np.ndarray, leaked: Sequence[bool],
                         num_classes: int) -> dict[str, Any] | None:
    """Accuracy, balanced accuracy and macro-F1 on the test images that have no copy in
    train/val (``leaked[i]`` False). None when nothing leaked (the normal score is the one)."""
    from core.metrics import label_metrics

    mask = np.asarray(leaked, dtype=bool)
    y = np.asarray(y_true, dtype=np.int64)
    if mask.shape != y.shape or len(logits) != len(y):
        raise ValueError(f"leaked flags ({mask.shape[0]}), labels ({len(y)}) and logits ({len(logits)}) "
                         "must describe the same test images")
    if not mask.any():
        return None
    keep = ~mask
    out: dict[str, Any] = {"n": int(keep.sum()), "excluded": int(mask.sum())}
    if keep.any():
        m = label_metrics(y[keep], np.asarray(logits)[keep].argmax(1), num_classes)
        out.update(accuracy=m["accuracy"], balanced_accuracy=m["balanced_accuracy"], macro_f1=m["macro_f1"])
    return out
