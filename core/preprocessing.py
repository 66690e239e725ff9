"""Preprocessing as data: it travels with the weights, the checkpoint and every export.

The one implementation of eval-time preprocessing is ``preprocess`` below (PIL + numpy only),
so training, evaluation, ONNX verification and the bundle's ``predict.py`` compute the same
input tensor. ``predict.py`` carries a copy of this function; a test checks they agree.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

import numpy as np
from PIL import Image

Interpolation = Literal["bilinear", "bicubic", "nearest"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TF_MEAN = (0.5, 0.5, 0.5)  # TF-ported Lite weights were trained on inputs scaled to [-1, 1]
TF_STD = (0.5, 0.5, 0.5)

_PIL_INTERP = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
               "nearest": Image.Resampling.NEAREST}


@dataclass(frozen=True)
class Preprocessing:
    """Resize the shorter side to resolution / crop_pct, centre-crop a square, normalise."""

    resolution: int = 224
    crop_pct: float = 1.0
    interpolation: Interpolation = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if self.resolution < 16:
            raise ValueError(f"resolution must be >= 16 px, got {self.resolution}")
        if not 0.1 <= self.crop_pct <= 1.0:
            raise ValueError(f"crop_pct must be in [0.1, 1.0], got {self.crop_pct}")
        if self.interpolation not in _PIL_INTERP:
            raise ValueError(f"interpolation must be one of {list(_PIL_INTERP)}, got {self.interpolation!r}")

    @property
    def resize_to(self) -> int:
        return int(round(self.resolution / self.crop_pct))

    def with_resolution(self, resolution: int) -> Preprocessing:
        return replace(self, resolution=int(resolution))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        d["resize_shorter_to"] = self.resize_to
        d["channel_order"] = "RGB"
        d["layout"] = "NCHW"
        d["scale"] = "pixel / 255, then (x - mean) / std"
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessing:
        return cls(
            resolution=int(d["resolution"]),
            crop_pct=float(d.get("crop_pct", 1.0)),
            interpolation=d.get("interpolation", "bicubic"),
            mean=tuple(float(x) for x in d["mean"]),  # type: ignore[arg-type]
            std=tuple(float(x) for x in d["std"]),  # type: ignore[arg-type]
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def resize_and_crop(img: Image.Image, pre: Preprocessing) -> Image.Image:
    """Shorter side to ``pre.resize_to`` keeping aspect, then a centred square crop."""
    img = img.convert("RGB")
    w, h = img.size
    scale = pre.resize_to / min(w, h)
    nw, nh = max(pre.resolution, round(w * scale)), max(pre.resolution, round(h * scale))
    img = img.resize((nw, nh), _PIL_INTERP[pre.interpolation])
    left, top = (nw - pre.resolution) // 2, (nh - pre.resolution) // 2
    return img.crop((left, top, left + pre.resolution, top + pre.resolution))


def normalize(rgb_uint8_hwc: np.ndarray, pre: Preprocessing) -> np.ndarray:
    """uint8 HWC RGB -> float32 CHW normalised."""
    x: np.ndarray = rgb_uint8_hwc.astype(np.float32) / 255.0
    x = (x - np.asarray(pre.mean, np.float32)) / np.asarray(pre.std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def preprocess(img: Image.Image, pre: Preprocessing) -> np.ndarray:
    """PIL image -> float32 (3, R, R) array ready for the model."""
    return normalize(np.asarray(resize_and_crop(img, pre), dtype=np.uint8), pre)
