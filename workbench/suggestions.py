"""Suggestions the pages and the CLI show as defaults: what kind of images a dataset holds, the
augmentation preset, resolution and recipe that follow, and which training curve to open on.

Pure read models over ``DatasetInfo`` and ``core.image_kind`` (no database, no Streamlit).
"""
from __future__ import annotations

from collections.abc import Collection
from typing import Any

from workbench.datasets import DatasetInfo


def training_suggestion(dataset: DatasetInfo, image_kind: str | None = None) -> Any:
    """Preset, resolution cap and recipe for a dataset (``core.image_kind.TrainingSuggestion``),
    from the kind its report guessed, or from ``image_kind`` when the user chose one."""
    from core.image_kind import infer_image_kind, suggest_training

    h = dataset.health or {}
    kind = image_kind or (h.get("image_kind") or {}).get("kind")
    if kind is None:  # a dataset checked before kinds were guessed: modes only
        kind = infer_image_kind(list((h.get("modes") or {"RGB": 1}).keys())).kind
    width = (h.get("sizes") or {}).get("width") or {}
    height = (h.get("sizes") or {}).get("height") or {}
    short = [min(width["p50"], height["p50"])] if "p50" in width and "p50" in height else []
    train = sum(((h.get("split_counts") or {}).get("train") or {}).values()) or None
    return suggest_training(kind, short, train)


def image_kind_labels() -> dict[str, str]:
    """{kind: plain label} for the image-kind select box."""
    from core.image_kind import KIND_LABELS

    return dict(KIND_LABELS)


def guessed_image_kind(dataset: DatasetInfo) -> str | None:
    return ((dataset.health or {}).get("image_kind") or {}).get("kind")


CURVE_FIRST = ("macro_f1", "val_macro_f1", "accuracy", "val_accuracy", "loss", "val_loss")
CURVE_HIDDEN = {"best_epoch", "epoch", "lr", "seconds", "phase_epoch"}


def curve_metric_choices(metrics: Collection[str]) -> list[str]:
    """Metrics for the training-curve picker, validation macro-F1 first (bookkeeping keys dropped)."""
    shown = [m for m in metrics if m not in CURVE_HIDDEN] or list(metrics)
    return sorted(shown, key=lambda m: (CURVE_FIRST.index(m) if m in CURVE_FIRST else len(CURVE_FIRST), m))
