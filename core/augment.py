"""Training-time augmentation presets (albumentations), applied after the eval resize.

Every pipeline works on the uint8 RGB square that ``core.preprocessing.resize_and_crop`` makes
(the same pixels evaluation sees), and returns a uint8 square of the same size; normalisation
happens afterwards with ``core.preprocessing.normalize``. So a model never sees a train-time
input whose geometry or scale differs from what the export bundle feeds it.

Presets:
- ``medical``: geometry only, gently. Small rotations, mild zoom, horizontal flip; no hue or
  colour jitter (stain/contrast carry diagnostic meaning) and no vertical flip by default
  (anatomy has an up and a down).
- ``field``: agricultural photos of leaves, fruit, plots: any orientation (both flips, 90°
  rotations), stronger zoom, brightness/contrast and colour jitter for sun, shade and cameras.
- ``microscopy``: stained slides, blood smears, skin close-ups: no up or down, so any
  orientation (both flips, 90° rotations) and mild zoom; only gentle brightness/contrast and
  never hue or saturation jitter (a red cell must not turn brown: stain colour is the signal).
- ``none``: identity.

``core.image_kind`` picks the preset from what the images are.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import albumentations as A
import cv2
import numpy as np

from core.images import load_rgb
from core.preprocessing import Preprocessing, resize_and_crop

PRESETS: tuple[str, ...] = ("medical", "microscopy", "field", "none")


class UnknownPresetError(ValueError):
    pass


def build_augment(preset: str, resolution: int, *, vertical_flip: bool = False, strength: float = 1.0) -> A.Compose:
    """The albumentations pipeline for a named preset at a square ``resolution``.

    ``vertical_flip`` only matters for ``medical`` (``field`` always flips both ways).
    ``strength`` scales the preset's ranges (zoom, rotation, brightness, colour): 1 is the
    preset as described above, 0.5 half as strong (the Auto search tunes it).
    """
    if not 0.0 <= strength <= 2.0:
        raise ValueError(f"augmentation strength must be between 0 and 2, got {strength}")
    k = float(strength)
    size = (int(resolution), int(resolution))
    if preset == "none":
        transforms: list[A.BasicTransform] = []
    elif preset == "medical":
        transforms = [
            A.RandomResizedCrop(size=size, scale=(max(0.1, 1 - 0.15 * k), 1.0), ratio=(0.9, 1.11), p=1.0),
            A.HorizontalFlip(p=0.5),
            # Reflect, not black corners: a black wedge would be a new artefact to learn.
            A.Affine(rotate=(-10 * k, 10 * k), border_mode=cv2.BORDER_REFLECT_101, p=0.5),
            A.RandomBrightnessContrast(brightness_limit=0.1 * k, contrast_limit=0.1 * k, p=0.5),
        ]
        if vertical_flip:
            transforms.insert(2, A.VerticalFlip(p=0.5))
    elif preset == "microscopy":
        transforms = [
            A.RandomResizedCrop(size=size, scale=(0.75, 1.0), ratio=(0.9, 1.11), p=1.0),
            A.HorizontalFlip(p=0.5),
            A.VerticalFlip(p=0.5),
            A.RandomRotate90(p=0.5),
            A.RandomBrightnessContrast(brightness_limit=0.1, contrast_limit=0.1, p=0.5),
        ]
    elif preset == "field":
        transforms = [
            A.RandomResizedCrop(size=size, scale=(max(0.1, 1 - 0.4 * k), 1.0), ratio=(0.8, 1.25), p=1.0),
            A.HorizontalFlip(p=0.5),
            A.VerticalFlip(p=0.5),
            A.RandomRotate90(p=0.5),
            A.RandomBrightnessContrast(brightness_limit=0.2 * k, contrast_limit=0.2 * k, p=0.7),
            A.ColorJitter(brightness=0.0, contrast=0.0, saturation=0.2 * k, hue=0.03 * k, p=0.5),
        ]
    else:
        raise UnknownPresetError(f"Unknown augmentation preset {preset!r}; choose one of {list(PRESETS)}.")
    return A.Compose(transforms)


class Augmenter:
    """A preset pipeline applied reproducibly: the same (seed, key) always gives the same view.

    Seeding per call (rather than one stream) is what makes cached views and resumed epochs
    independent of how many images were augmented before.
    """

    def __init__(self, preset: str, resolution: int, *, vertical_flip: bool = False, strength: float = 1.0):
        self.preset = preset
        self.resolution = int(resolution)
        self.pipeline = build_augment(preset, resolution, vertical_flip=vertical_flip, strength=strength)

    def __call__(self, image: np.ndarray, seed: int) -> np.ndarray:
        if self.preset == "none":
            return image
        self.pipeline.set_random_seed(int(seed) % (2**32))
        out = self.pipeline(image=image)["image"]
        return np.ascontiguousarray(out, dtype=np.uint8)


def view_seed(seed: int, *keys: int) -> int:
    """A well-mixed 32-bit seed from a base seed and integer keys (sample, view, epoch...)."""
    return int(np.random.SeedSequence([int(seed) % (2**32), *[int(k) % (2**32) for k in keys]]).generate_state(1)[0])


def augment_preview(
    image_paths: Sequence[str | Path],
    preset: str,
    n: int = 8,
    resolution: int = 224,
    seed: int = 0,
    *,
    preprocessing: Preprocessing | None = None,
) -> list[np.ndarray]:
    """``n`` augmented views (uint8 HWC RGB, ``resolution`` square) cycling over ``image_paths``.

    Exactly what training feeds the network before normalisation, for the UI to show.
    """
    if not image_paths:
        raise ValueError("augment_preview needs at least one image path.")
    pre = preprocessing.with_resolution(resolution) if preprocessing else Preprocessing(resolution)
    aug = Augmenter(preset, resolution)
    bases = [np.asarray(resize_and_crop(load_rgb(p), pre), dtype=np.uint8) for p in image_paths[:n]]
    return [aug(bases[i % len(bases)], view_seed(seed, i)) for i in range(n)]


__all__ = ["PRESETS", "Augmenter", "build_augment", "augment_preview", "view_seed", "UnknownPresetError"]
