"""``Predictor``: a verified bundle (or a run's newest verified bundle) as a Python object.

A thin wrapper over ``core.bundle.open_bundle`` + ``BundlePredictor``, the one ONNX prediction
path of Workbench (the CLI's ``workbench predict``, the Predict page and ``workbench serve`` use
it too). Images given in memory (PIL images, numpy arrays, bytes) are written losslessly to a
temporary file and read back with ``core.images.load_rgb``, so they go through exactly the
decoding and preprocessing a file on disk does, and the bundle's ``predict.py`` does.

Each answer is the bundle's own ``core.bundle.Prediction`` (top-k = every class, so ``top_k``
holds all calibrated probabilities), with ``path`` replaced by the image's name; whatever
fields ``Prediction`` gains (a flag, a decision) come through unchanged, also in ``as_dict``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import tempfile
from collections.abc import Sequence
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from core.bundle import BundleError, BundlePredictor, Prediction, VerifiedBundle, canonical_json, open_bundle
from workbench.artifacts import list_artifacts
from workbench.compute import chosen_device, provider_words
from workbench.settings import Settings, get_settings

ImageInput = str | Path | Image.Image | np.ndarray | bytes


class PredictionError(ValueError):
    """An image cannot be classified; the message names it and says why."""


def newest_bundle(run_id: int, *, settings: Settings | None = None) -> Path:
    """The newest intact bundle zip of a run (the artifact service checks its sha256)."""
    bundles = [a for a in list_artifacts(run_id, settings=settings) if a.kind == "bundle" and a.status == "ok"]
    if not bundles:
        raise BundleError(f"run {run_id} has no verified bundle yet; make one with `workbench export {run_id}`")
    newest = max(bundles, key=lambda a: (a.created_at, a.id))
    return (settings or get_settings()).data_dir / newest.path


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, np.generic):
        return value.item()
    return value


def as_dict(prediction: Prediction) -> dict[str, Any]:
    """Every field of the Prediction (JSON-ready), plus ``probabilities``: {class: calibrated p}."""
    out = {f.name: _jsonable(getattr(prediction, f.name)) for f in dataclasses.fields(prediction)}
    out["image"] = out.pop("path")
    out["probabilities"] = {label: p for label, p in prediction.top_k}
    return out


def _to_png(image: Image.Image | np.ndarray, name: str) -> bytes:
    """A lossless PNG of an in-memory image (arrays: HxW gray or HxWx3/4 uint8)."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise PredictionError(f"{name}: a numpy image must have dtype uint8 (0-255), got {image.dtype}")
        if image.ndim == 3 and image.shape[2] == 1:
            image = image[:, :, 0]
        if not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (3, 4))):
            raise PredictionError(f"{name}: a numpy image must be HxW (gray) or HxWx3 (RGB) / HxWx4 (RGBA), "
                                  f"got shape {image.shape}")
        image = Image.fromarray(image)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


class Predictor:
    """Classify images with a verified Workbench bundle.

    >>> p = Predictor.load("bundle.zip")
    >>> p.predict(["leaf.jpg"])[0].label
    """

    def __init__(self, bundle: VerifiedBundle, *, device: str | None = None) -> None:
        self.bundle = bundle
        # ONNX Runtime on ``device`` (auto, cpu, cuda, cuda:N; default WORKBENCH_DEVICE): a GPU asked
        # for but absent raises core.train.robustness.DeviceError with a plain message.
        self._model = BundlePredictor.from_bundle(bundle, device=chosen_device(device))
        # A zip is identified by its own sha256; an unpacked folder by its manifest's, which lists
        # the sha256 of every file.
        source = Path(bundle.source)
        self.sha256_of = "bundle zip" if source.is_file() else "manifest"
        self.sha256 = hashlib.sha256(source.read_bytes() if source.is_file()
                                     else canonical_json(bundle.manifest)).hexdigest()

    @classmethod
    def load(cls, bundle: str | Path, *, allow_unsigned: bool = False, key: bytes | None = None,
             device: str | None = None) -> Predictor:
        """Open a bundle (zip or unpacked folder); every file is checked against its manifest.

        ``key``: the signing key (default: this installation's WORKBENCH_BUNDLE_KEY). ``device``:
        where ONNX Runtime runs (auto, cpu, cuda, cuda:N; default WORKBENCH_DEVICE).
        Raises ``core.bundle.BundleError`` naming the file on anything wrong, ``DeviceError`` for a
        device this machine does not have."""
        settings = get_settings()
        key = key if key is not None else settings.bundle_key
        return cls(open_bundle(bundle, key=key, allow_unsigned=allow_unsigned),
                   device=chosen_device(device, settings))

    @classmethod
    def from_run(cls, run_id: int, *, settings: Settings | None = None, allow_unsigned: bool = False,
                 device: str | None = None) -> Predictor:
        """The newest verified bundle of a run."""
        settings = settings or get_settings()
        return cls(open_bundle(newest_bundle(run_id, settings=settings), key=settings.bundle_key,
                               allow_unsigned=allow_unsigned), device=chosen_device(device, settings))

    @property
    def provider(self) -> str:
        """The ONNX Runtime execution provider the model runs on ("CPUExecutionProvider", ...)."""
        return self._model.provider

    @property
    def runs_on(self) -> str:
        """Where the model runs, in plain words: "CPU", "GPU (CUDA)"."""
        return provider_words(self._model.provider)

    @property
    def labels(self) -> list[str]:
        return list(self._model.labels)

    def describe(self) -> str:
        """One line: what the confidences mean and how a two-class decision is made."""
        return self._model.calibration.describe()

    def metadata(self) -> dict[str, Any]:
        """Labels, preprocessing, calibration, signature, manifest facts and the bundle's sha256."""
        manifest = self.bundle.manifest
        return {
            "labels": self.labels,
            "preprocessing": self.bundle.preprocessing.to_dict(),
            "calibration": self.bundle.calibration.record
            or {"calibrated": False, "note": self.bundle.calibration.note},
            "confidences": self.describe(),
            "bundle": {"sha256": self.sha256, "sha256_of": self.sha256_of, "format": manifest.get("format"),
                       "format_version": manifest.get("format_version"), "created": manifest.get("created"),
                       "run_id": manifest.get("run_id"), "signature": self.bundle.signature.value,
                       "files": dict(manifest.get("files", {}))},
            "runs_on": self.runs_on, "provider": self.provider,
        }

    def predict(self, images: ImageInput | Sequence[ImageInput], *, names: Sequence[str] | None = None
                ) -> list[Prediction]:
        """One Prediction per image, in order: ``label``, ``confidence``, ``top_k`` (every class with its
        calibrated probability), ``decision`` for a two-class bundle with a threshold, and any other
        field the bundle's Prediction defines. Raises PredictionError naming the first unreadable image."""
        items = [images] if isinstance(images, str | Path | Image.Image | np.ndarray | bytes) else list(images)
        if names is not None and len(names) != len(items):
            raise ValueError(f"{len(names)} names for {len(items)} images")
        shown = list(names) if names is not None else [
            str(x) if isinstance(x, str | Path) else f"image {i}" for i, x in enumerate(items)]
        with tempfile.TemporaryDirectory(prefix="wb-predict-") as tmp:
            paths = [self._as_file(x, name, Path(tmp) / f"{i:06d}") for i, (x, name) in enumerate(zip(items, shown))]
            failures: list[tuple[Path, str]] = []
            rows = self._model.predict(paths, len(self.labels), on_skip=lambda p, why: failures.append((p, why)))
        if failures:
            p, why = failures[0]
            raise PredictionError(f"{shown[paths.index(p)]}: {why}")
        return [dataclasses.replace(r, path=Path(name)) for r, name in zip(rows, shown)]

    @staticmethod
    def _as_file(image: ImageInput, name: str, stem: Path) -> Path:
        if isinstance(image, str | Path):
            if not Path(image).is_file():
                raise PredictionError(f"{name}: " + ("a folder, not an image file" if Path(image).is_dir()
                                                     else "no such file"))
            return Path(image)
        if isinstance(image, bytes):
            data = image
        elif isinstance(image, Image.Image | np.ndarray):
            data = _to_png(image, name)
        else:
            raise PredictionError(f"{name}: expected a file path, a PIL image, a numpy array or bytes, "
                                  f"got {type(image).__name__}")
        stem.write_bytes(data)
        return stem


__all__ = ["ImageInput", "Prediction", "PredictionError", "Predictor", "as_dict", "newest_bundle"]
