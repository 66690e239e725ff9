"""The kind of image, guessed from real images, and the training choices that follow."""
from __future__ import annotations

import pytest
from conftest import SHARED_DATASETS

from core.augment import PRESETS, Augmenter
from core.image_kind import (
    IMAGE_KINDS,
    PRESET_FOR_KIND,
    UnknownImageKindError,
    infer_image_kind,
    suggest_training,
    useful_resolution,
)


def _colour(folder: str, n: int = 12) -> tuple[list[str], list[tuple[float, float, float, float]]]:
    from core.health import pixel_signature
    from core.images import decode

    root = SHARED_DATASETS / folder
    if not root.is_dir():
        pytest.skip(f"shared dataset {folder} not present")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png")
                   and "_quarantine" not in p.parts)[::7][:n]
    modes, colour = [], []
    for f in files:
        d = decode(f, reduce_to=32)
        s = pixel_signature(d.image)
        modes.append(d.mode)
        colour.append((*s.mean_rgb, s.saturation))
    return modes, colour


@pytest.mark.parametrize("folder, kind", [("mednist_3k", "scan"), ("beans/train", "field"),
                                          ("rice_leaf_ph", "field")])
def test_shared_datasets_are_recognised(folder: str, kind: str) -> None:
    guess = infer_image_kind(*_colour(folder))
    assert guess.kind == kind, guess
    assert guess.reason and guess.label


def test_stained_cells_are_microscopy_and_get_no_colour_jitter() -> None:
    import numpy as np
    from PIL import Image, ImageDraw

    from core.health import pixel_signature

    img = Image.new("RGB", (100, 100), (236, 200, 226))  # pink smear background
    ImageDraw.Draw(img).ellipse((20, 20, 80, 80), fill=(150, 80, 170))  # a purple-stained cell
    s = pixel_signature(img)
    guess = infer_image_kind(["RGB"] * 5, [(*s.mean_rgb, s.saturation)] * 5)
    assert guess.kind == "microscopy"
    assert PRESET_FOR_KIND["microscopy"] == "microscopy" and "microscopy" in PRESETS
    # The microscopy preset never changes hue: a red cell stays red in every view.
    base = np.asarray(img.resize((96, 96)), dtype=np.uint8)
    aug = Augmenter("microscopy", 96)
    for seed in range(6):
        out = aug(base, seed).reshape(-1, 3).astype(float)
        cell = out[(out[:, 0] < 200)]  # the cell's pixels
        assert (cell[:, 2] > cell[:, 1]).mean() > 0.9  # still purple (blue above green), never brown


def test_dicom_and_gray_modes_are_scans() -> None:
    assert infer_image_kind(["DICOM"] * 3, dicom_modalities=["CT"]).reason == "the images are DICOM files (CT)"
    assert infer_image_kind(["L", "L", "RGB"]).kind == "scan"
    assert infer_image_kind(["RGB"] * 3, [(120, 120, 121, 2)] * 3).kind == "scan"  # gray saved as colour
    assert infer_image_kind([]).kind == "other"


def test_resolution_follows_the_image_sizes() -> None:
    assert useful_resolution([64] * 10) == 96  # never below the smallest candidate
    assert useful_resolution([100, 101, 105]) == 128  # not 260 px for 100 px crops
    assert useful_resolution([500] * 3) == 512
    assert useful_resolution([4000]) == 600
    sug = suggest_training("microscopy", [100], train_images=120)
    assert (sug.preset, sug.max_resolution, sug.recipe) == ("microscopy", 128, "quick")
    assert any("upscale" in r for r in sug.reasons)
    assert suggest_training("field", [500], 2000).recipe == "default"
    with pytest.raises(UnknownImageKindError, match="choose one of scan, microscopy"):
        suggest_training("xray", [100])
    assert set(PRESET_FOR_KIND) == set(IMAGE_KINDS)


def test_recommender_never_proposes_more_than_the_images_hold() -> None:
    from core.recommend import Budget, BudgetError, recommend

    rec = recommend(Budget(device="this-machine", max_resolution=128), weights={})
    assert rec.ranked and all(c.resolution <= 128 for c in rec.ranked + rec.excluded)
    assert Budget.from_dict({"max_resolution": "128"}).max_resolution == 128
    with pytest.raises(BudgetError, match="max_resolution must be a positive integer"):
        Budget(max_resolution=0)
