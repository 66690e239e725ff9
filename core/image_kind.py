"""What kind of images a dataset holds, guessed from simple cues, and the training choices
that follow from it (augmentation preset, resolution, recipe).

Cues: the colour mode (grayscale, DICOM), how colourful the pixels are, which hue dominates
(green leaves; the pink and purple of stained slides; skin tones), and the image sizes. It is
a guess shown to the user, who can override it (Train page, ``workbench train --image-kind``).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from core.images import GRAYSCALE_MODES

IMAGE_KINDS: tuple[str, ...] = ("scan", "microscopy", "dermoscopy", "field", "other")
KIND_LABELS: dict[str, str] = {
    "scan": "X-ray, CT or MR scan",
    "microscopy": "Microscopy or stained slide",
    "dermoscopy": "Dermoscopy (skin close-up)",
    "field": "Field or leaf photo",
    "other": "Other photos",
}
# Augmentation preset (core.augment.PRESETS) per kind: colour carries meaning in scans,
# stains and skin, so only field and other photos get colour jitter.
PRESET_FOR_KIND: dict[str, str] = {
    "scan": "medical",
    "microscopy": "microscopy",
    "dermoscopy": "microscopy",
    "field": "field",
    "other": "field",
}
MIN_RESOLUTION = 96  # the smallest input the recommender proposes
MAX_RESOLUTION = 600
GRAY_SATURATION = 8.0  # mean max-min channel spread below this: a grayscale picture saved as colour


class UnknownImageKindError(ValueError):
    pass


def check_kind(kind: str) -> str:
    if kind not in IMAGE_KINDS:
        raise UnknownImageKindError(
            f"Unknown image kind {kind!r}; choose one of {', '.join(IMAGE_KINDS)}.")
    return kind


@dataclass(frozen=True)
class ImageKindGuess:
    kind: str
    label: str
    reason: str  # plain words: why this guess

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _guess(kind: str, reason: str) -> ImageKindGuess:
    return ImageKindGuess(kind, KIND_LABELS[kind], reason)


def infer_image_kind(modes: Sequence[str], colour: Sequence[tuple[float, float, float, float]] = (),
                     dicom_modalities: Sequence[str] = ()) -> ImageKindGuess:
    """Guess the kind from colour modes and, when known, per-image (mean R, G, B, saturation).

    Saturation is the mean spread between the strongest and weakest channel (0-255).
    """
    n = len(modes)
    if n == 0:
        return _guess("other", "no images to look at")
    dicom = sum(m == "DICOM" for m in modes)
    if dicom_modalities or dicom / n > 0.5:
        mods = sorted({m for m in dicom_modalities if m})
        return _guess("scan", "the images are DICOM files" + (f" ({', '.join(mods)})" if mods else ""))
    gray = sum(m in GRAYSCALE_MODES for m in modes)
    if gray / n > 0.5:
        return _guess("scan", f"{gray / n:.0%} of the images are grayscale")
    if not colour:
        return _guess("other", "colour photos (the colours were not analysed)")
    arr = np.asarray(colour, dtype=np.float64)
    r, g, b, sat = (float(np.median(arr[:, k])) for k in range(4))
    if sat < GRAY_SATURATION:
        return _guess("scan", "the pictures are grayscale (saved as colour files)")
    if g >= r and g > b:
        return _guess("field", "green dominates, as in leaf and field photos")
    if b > g and r > g and r + b > 2 * g + 20:
        return _guess("microscopy", "pink and purple tones, as in stained slides and blood smears")
    if r > g + 15 and g > b and r - b > 40:
        return _guess("dermoscopy", "skin tones dominate")
    return _guess("other", "colour photos of no particular kind")


def useful_resolution(short_sides: Sequence[float]) -> int:
    """The largest input size worth training at: the images' median short side, rounded up to
    a multiple of 32 (bigger only upscales: slower, no new detail), within 96-600 px."""
    if not short_sides:
        return 224
    med = float(np.median(np.asarray(short_sides, dtype=np.float64)))
    return int(min(MAX_RESOLUTION, max(MIN_RESOLUTION, 32 * math.ceil(med / 32))))


@dataclass(frozen=True)
class TrainingSuggestion:
    kind: str
    kind_label: str
    preset: str
    max_resolution: int  # never propose more than this
    recipe: str
    reasons: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["reasons"] = list(self.reasons)
        return d


def suggest_training(kind: str, short_sides: Sequence[float], train_images: int | None = None) -> TrainingSuggestion:
    """Preset, resolution cap and recipe for a kind of image and its sizes."""
    check_kind(kind)
    preset = PRESET_FOR_KIND[kind]
    res = useful_resolution(short_sides)
    reasons = [f"{KIND_LABELS[kind]}: the '{preset}' augmentation"
               + (" (no colour changes: colour carries meaning here)" if preset != "field" else
                  " (colour and lighting vary outdoors)")]
    if short_sides:
        reasons.append(f"images are about {float(np.median(short_sides)):.0f} px on their short side: "
                       f"training above {res} px would only upscale them")
    # Few images: the quick recipe overfits less and finishes sooner; many: the default.
    recipe = "quick" if train_images is not None and train_images < 300 else "default"
    if train_images is not None:
        reasons.append(f"{train_images} training images: the '{recipe}' recipe")
    return TrainingSuggestion(kind, KIND_LABELS[kind], preset, res, recipe, tuple(reasons))


__all__ = ["IMAGE_KINDS", "KIND_LABELS", "PRESET_FOR_KIND", "ImageKindGuess", "TrainingSuggestion",
           "UnknownImageKindError", "check_kind", "infer_image_kind", "suggest_training", "useful_resolution"]
