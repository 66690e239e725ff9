"""Shortcut check: can one acquisition detail alone (image size, shape, file format, colour
mode, brightness, colour) nearly predict the class?

If it can, a network may learn that detail instead of the disease or species (cell crops
cut at a different size per class, one class scanned as PNG, the other photographed as JPEG).
For each factor a shallow decision tree is cross-validated (stratified folds) on that factor's
statistics only and compared with always guessing the largest class. Pure: records in,
JSON-able dicts out; pixel statistics come from ``core.health.PixelSignature`` when given.
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import PurePosixPath
from typing import Any

import numpy as np

from core.images import GRAYSCALE_MODES

# Warn when a factor alone is right this often in cross-validation...
SHORTCUT_MIN_ACCURACY = 0.8
# ...and closes this share of the gap between guessing the largest class and perfect.
SHORTCUT_MIN_GAIN = 0.6
MAX_SAMPLES = 4000  # a random stratified subset above this: the answer does not need more
TREE_DEPTH = 3

FACTORS: dict[str, str] = {
    "size": "image size",
    "aspect": "image shape (width / height)",
    "format": "file format",
    "mode": "colour mode (grayscale or colour)",
    "brightness": "brightness and contrast",
    "colour": "colour",
}
ADVICE: dict[str, str] = {
    "size": "Check that all classes were photographed or cropped the same way.",
    "aspect": "Check that all classes were photographed or cropped the same way.",
    "format": "Check that all classes come from the same camera or export (convert them to one format).",
    "mode": "Check that all classes were scanned or exported the same way (all colour or all grayscale).",
    "brightness": "If the classes really look this different that is fine; otherwise check that lighting, "
                  "exposure or scanner settings were the same for every class.",
    "colour": "If the classes really differ in colour that is fine; otherwise check that staining, "
              "white balance and camera were the same for every class.",
}


def _format_of(record: Any, sig: Any) -> str:
    fmt = getattr(sig, "file_format", "") if sig is not None else ""
    if fmt:
        return str(fmt).upper()
    name = getattr(record, "store_path", None) or getattr(record, "original_name", "") or ""
    suffix = PurePosixPath(str(name)).suffix.lower().lstrip(".")
    return {"jpg": "JPEG", "jpeg": "JPEG", "tif": "TIFF", "dcm": "DICOM"}.get(suffix, suffix.upper() or "unknown")


def _features(records: Sequence[Any], sigs: Sequence[Any]) -> dict[str, np.ndarray]:
    w = np.array([max(1, r.width) for r in records], dtype=np.float64)
    h = np.array([max(1, r.height) for r in records], dtype=np.float64)
    feats: dict[str, np.ndarray] = {
        "size": np.column_stack([np.log(w), np.log(h)]),
        "aspect": np.log(w / h)[:, None],
    }
    formats = [_format_of(r, s) for r, s in zip(records, sigs)]
    kinds = sorted(set(formats))
    feats["format"] = np.array([[f == k for k in kinds] for f in formats], dtype=np.float64)
    gray = np.array([[r.mode in GRAYSCALE_MODES] for r in records], dtype=np.float64)
    feats["mode"] = gray
    if sigs and all(s is not None for s in sigs):
        feats["brightness"] = np.array([[s.brightness, s.contrast] for s in sigs])
        feats["colour"] = np.array([[*s.mean_rgb, s.saturation] for s in sigs])
    return feats


def _subsample(labels: np.ndarray, limit: int, seed: int = 0) -> np.ndarray:
    idx = np.arange(len(labels))
    if len(idx) <= limit:
        return idx
    rng = np.random.default_rng(seed)
    keep = []
    for lab in np.unique(labels):
        members = idx[labels == lab]
        k = max(2, int(round(limit * len(members) / len(idx))))
        keep.append(rng.choice(members, size=min(k, len(members)), replace=False))
    return np.sort(np.concatenate(keep))


def _cv_accuracy(x: np.ndarray, y: np.ndarray, folds: int) -> float:
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.tree import DecisionTreeClassifier

    if np.ptp(x, axis=0).max(initial=0.0) == 0:  # constant factor: predicts nothing
        return float(Counter(y.tolist()).most_common(1)[0][1] / len(y))
    tree = DecisionTreeClassifier(max_depth=TREE_DEPTH, min_samples_leaf=2, random_state=0)
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=0)
    return float(np.mean(cross_val_score(tree, x, y, cv=cv, scoring="accuracy")))


def _median(values: Sequence[float]) -> float:
    return float(np.median(np.asarray(values, dtype=np.float64))) if values else math.nan


def per_class_stats(records: Sequence[Any], sigs: Sequence[Any] | None = None) -> dict[str, dict[str, Any]]:
    """Per class: median width, height, width/height, brightness and colour, and file formats."""
    sigs = list(sigs) if sigs is not None else [None] * len(records)
    by: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        by.setdefault(r.label, []).append(i)
    out: dict[str, dict[str, Any]] = {}
    for label in sorted(by):
        idx = by[label]
        row: dict[str, Any] = {
            "images": len(idx),
            "median_width": round(_median([records[i].width for i in idx])),
            "median_height": round(_median([records[i].height for i in idx])),
            "median_aspect": round(_median([records[i].width / max(1, records[i].height) for i in idx]), 2),
            "formats": dict(Counter(_format_of(records[i], sigs[i]) for i in idx).most_common()),
            "grayscale_share": round(sum(records[i].mode in GRAYSCALE_MODES for i in idx) / len(idx), 3),
        }
        have = [sigs[i] for i in idx if sigs[i] is not None]
        if have:
            row["median_brightness"] = round(_median([s.brightness for s in have]), 1)
            row["median_saturation"] = round(_median([s.saturation for s in have]), 1)
        out[label] = row
    return out


def find_shortcuts(records: Sequence[Any], signatures: Callable[[Any], Any] | None = None) -> dict[str, Any]:
    """Cross-validated accuracy of each factor alone vs the majority baseline, and plain warnings."""
    labels = np.array([r.label for r in records])
    counts = Counter(labels.tolist())
    # Pixels are read for a stratified subset only: thousands of images answer the question.
    keep = _subsample(labels, MAX_SAMPLES)
    kept = set(keep.tolist())
    sigs = [signatures(r) if signatures is not None and i in kept else None for i, r in enumerate(records)]
    result: dict[str, Any] = {"checked": False, "factors": [], "warnings": [],
                              "per_class": per_class_stats(records, sigs)}
    if len(counts) < 2 or min(counts.values()) < 2:
        result["reason"] = "needs at least 2 classes with 2 images each"
        return result
    y = labels[keep]
    sub_counts = Counter(y.tolist())
    folds = min(5, min(sub_counts.values()))
    baseline = max(sub_counts.values()) / len(y)
    feats = _features([records[i] for i in keep], [sigs[i] for i in keep])
    result.update(checked=True, baseline=round(baseline, 3), folds=folds, images_checked=len(y))
    for key, x in feats.items():
        acc = _cv_accuracy(x, y, folds)
        gain = (acc - baseline) / (1 - baseline) if baseline < 1 else 0.0
        warn = acc >= SHORTCUT_MIN_ACCURACY and gain >= SHORTCUT_MIN_GAIN
        result["factors"].append({"factor": key, "label": FACTORS[key], "accuracy": round(acc, 3),
                                  "warn": bool(warn)})
        if warn:
            result["warnings"].append(shortcut_sentence(key, acc, baseline))
    return result


def shortcut_sentence(factor: str, accuracy: float, baseline: float) -> str:
    what = FACTORS[factor]
    short = {"size": "size", "aspect": "shape", "format": "file format", "mode": "colour mode",
             "brightness": "brightness", "colour": "colour"}[factor]
    return (f"The classes differ in {what}: a model could tell them apart by {short} alone "
            f"({accuracy * 100:.0f} % correct from {short} only, against {baseline * 100:.0f} % by always guessing the "
            f"largest class). {ADVICE[factor]}")


__all__ = ["FACTORS", "SHORTCUT_MIN_ACCURACY", "SHORTCUT_MIN_GAIN", "find_shortcuts", "per_class_stats",
           "shortcut_sentence"]
