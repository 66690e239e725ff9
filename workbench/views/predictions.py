"""What the Predict page reads from a finished prediction job (its payload), as typed fields
built in one place: the page never looks up the handler's keys."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from workbench.views.common import JobView, number, record


@dataclass(frozen=True)
class Guess:
    label: str  # the class
    p: float  # its calibrated probability


@dataclass(frozen=True)
class ImageAnswer:  # one uploaded image
    name: str
    error: str  # "" when it was read ("not an image" otherwise)
    top: tuple[Guess, ...]  # best first
    overlay: str  # the Grad-CAM picture's path ("" when not asked for)
    outside_training_data: bool
    ood_score: float | None
    decision: str | None  # two-class bundles: the class the threshold picks
    p_positive: float | None


@dataclass(frozen=True)
class PredictionView:
    answers: tuple[ImageAnswer, ...]
    calibration: dict[str, Any]  # the bundle's calibration, for the wording helpers
    confidence: str  # one plain sentence on how far the confidences can be trusted
    temperature: float | None  # set when the confidences were adjusted
    calibration_note: str  # how the temperature was fitted
    positive_class: str
    threshold: float | None
    ood_threshold: float | None


def _answer(r: dict[str, Any]) -> ImageAnswer:
    top = tuple(Guess(str(t.get("class", "")), number(t.get("p")) or 0.0) for t in map(record, r.get("top") or ()))
    decision = r.get("decision")
    return ImageAnswer(str(r.get("name", "")), str(r.get("error") or ""), top, str(r.get("overlay") or ""),
                       bool(r.get("outside_training_data")), number(r.get("ood_score")),
                       None if decision is None else str(decision), number(r.get("p_positive")))


def prediction_view(job: JobView) -> PredictionView:
    """The one reader of a prediction job's result."""
    cal = record(job.payload.get("calibration"))
    return PredictionView(
        tuple(_answer(record(r)) for r in job.payload.get("results") or ()), cal, str(cal.get("confidence") or ""),
        number(cal.get("temperature")) if cal.get("calibrated") else None,
        str(cal.get("note") or "fitted on the validation images"),
        str(cal.get("positive_class") or ""), number(cal.get("threshold")), number(cal.get("ood_threshold")))
