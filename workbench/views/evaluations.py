"""What the Evaluate and Export pages read: an evaluation's metrics and an export's records as typed
fields, built from the stored JSON in one place (older records get the defaults)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from workbench.views.common import count, number, record, value_with_range, with_range


@dataclass(frozen=True)
class Interval:  # a 95 % range of one figure on the test split
    value: float | None
    lo: float | None
    hi: float | None
    method: str  # "Wilson score", "bootstrap", ...

    @property
    def text(self) -> str:
        """ "94.5 % (95 % range 89–97 %)"."""
        bounds = (self.lo, self.hi) if self.lo is not None and self.hi is not None else None
        return value_with_range(self.value, bounds)


def _interval(d: Any) -> Interval:
    d = record(d)
    return Interval(number(d.get("value")), number(d.get("lo")), number(d.get("hi")), str(d.get("method") or ""))


def per_class_ranges(metrics: dict[str, Any]) -> list[str]:
    """Each class's recall with its 95 % range, in the order of the metrics' per-class rows."""
    ranges = record(metrics.get("intervals")).get("per_class_recall") or []
    rows = metrics.get("per_class") or []
    return [with_range(ranges[i] if i < len(ranges) else None, number(record(row).get("recall")))
            or "no test images" for i, row in enumerate(rows)]


@dataclass(frozen=True)
class MetricsView:  # an evaluation's metrics (``Evaluation.metrics``) as the Evaluate page reads them
    raw: dict[str, Any]  # the whole record, for the wording helpers that turn it into sentences
    accuracy: float | None
    balanced_accuracy: float | None
    macro_f1: float | None
    macro_roc_auc: float | None
    test_images: int | None
    ece: float | None  # calibration error before adjustment
    ece_change: float | None  # after temperature scaling minus before (None: not adjusted)
    calibration: dict[str, Any]
    accuracy_interval: Interval | None  # None: an older evaluation without 95 % ranges
    macro_f1_interval: Interval | None
    interval_images: int | None
    per_class_ranges: tuple[str, ...]  # each class's recall with its range ("" entries without ranges)
    tta_effect: dict[str, Any] | None
    top_k: dict[str, float] | None
    operating_point: dict[str, Any] | None
    classes: tuple[str, ...]
    confusion: tuple[tuple[int, ...], ...]
    confusion_normalized: tuple[tuple[float, ...], ...]
    misclassified: tuple[dict[str, Any], ...]


def metrics_view(metrics: dict[str, Any] | None) -> MetricsView:
    """The one reader of stored evaluation metrics."""
    m = record(metrics)
    cal = record(m.get("calibration"))
    before, after = number(record(cal.get("before")).get("ece")), number(record(cal.get("after")).get("ece"))
    iv = record(m.get("intervals"))
    return MetricsView(
        raw=m, accuracy=number(m.get("accuracy")), balanced_accuracy=number(m.get("balanced_accuracy")),
        macro_f1=number(m.get("macro_f1")), macro_roc_auc=number(m.get("macro_roc_auc")),
        test_images=count(m.get("n")) or None, ece=before,
        ece_change=after - before if after is not None and before is not None else None, calibration=cal,
        accuracy_interval=_interval(iv.get("accuracy")) if iv else None,
        macro_f1_interval=_interval(iv.get("macro_f1")) if iv else None,
        interval_images=count(iv.get("n")) or None,
        per_class_ranges=tuple(per_class_ranges(m)) if iv else (),
        tta_effect=record(m.get("tta_effect")) or None, top_k=record(m.get("top_k")) or None,
        operating_point=record(m.get("operating_point")) or None,
        classes=tuple(str(c) for c in m.get("classes") or ()),
        confusion=tuple(tuple(row) for row in m.get("confusion_matrix") or ()),
        confusion_normalized=tuple(tuple(row) for row in m.get("confusion_matrix_normalized") or ()),
        misclassified=tuple(w for w in m.get("misclassified") or () if isinstance(w, dict)))


# --- exports ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Verification:  # the fp32 ONNX model checked against PyTorch on the test split (nan: not recorded)
    images: int | None
    top1_agreement: float
    max_abs_logit_diff: float
    tolerance: float


def verification_view(meta: dict[str, Any] | None) -> Verification:
    v = record(record(meta).get("verification"))
    figures = [number(v.get(key)) for key in ("top1_agreement", "max_abs_logit_diff", "tolerance")]
    agreement, diff, tolerance = (math.nan if x is None else x for x in figures)
    return Verification(count(v.get("n_images")) or None, agreement, diff, tolerance)


@dataclass(frozen=True)
class BundleView:  # a deploy bundle's record (``Artifact.meta`` of kind "bundle")
    files: tuple[str, ...]
    rows: tuple[dict[str, Any], ...]  # one per precision: its flat figures (nested records left out)
    conditions: dict[str, dict[str, Any]] = field(default_factory=dict)  # precision -> how it was timed


def bundle_view(meta: dict[str, Any] | None) -> BundleView:
    m = record(meta)
    variants = {str(name): record(vals) for name, vals in record(m.get("variants")).items()}
    rows = tuple({"precision": name, **{k: v for k, v in vals.items()
                                        if k != "file" and not isinstance(v, (dict, list))}}
                 for name, vals in variants.items())
    return BundleView(tuple(str(f) for f in m.get("files") or ()), rows,
                      {name: record(vals.get("conditions")) for name, vals in variants.items()
                       if isinstance(vals.get("conditions"), dict)})
