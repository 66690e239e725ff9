"""Training data: (path, label) samples, decoded once into memory, batched reproducibly.

Decoding and resizing a JPEG costs about as much CPU as a forward pass of the frozen part
of a small EfficientNet, so each image is decoded exactly once per run (``load_images``)
and kept as a uint8 square at the training resolution. Every later epoch or cached view
starts from those pixels.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from core.augment import Augmenter, view_seed
from core.images import load_rgb
from core.preprocessing import Preprocessing, normalize, resize_and_crop


class DataError(ValueError):
    """The samples cannot be trained on; the message says which and why."""


@dataclass(frozen=True)
class Sample:
    path: str
    label: int


def as_samples(items: Sequence[tuple[str | Path, int]] | Sequence[Sample]) -> list[Sample]:
    return [s if isinstance(s, Sample) else Sample(str(s[0]), int(s[1])) for s in items]


def check_class_counts(samples: Sequence[Sample], classes: Sequence[str], min_per_class: int = 2) -> dict[str, int]:
    """Training images per class; refuse classes below ``min_per_class`` by name."""
    counts = {c: 0 for c in classes}
    for s in samples:
        if not 0 <= s.label < len(classes):
            raise DataError(f"Sample {s.path} has label {s.label}, outside 0..{len(classes) - 1} "
                            f"for classes {list(classes)}.")
        counts[classes[s.label]] += 1
    too_few = [(c, n) for c, n in counts.items() if n < min_per_class]
    if too_few:
        listing = ", ".join(f"'{c}' has {n}" for c, n in too_few)
        raise DataError(f"Every class needs at least {min_per_class} image(s) to train on (one to learn from, "
                        f"one to validate on): {listing}. Add images to that class or remove it from the dataset.")
    return counts


def find_missing(samples: Sequence[Sample]) -> list[Sample]:
    return [s for s in samples if not Path(s.path).is_file()]


def load_images(
    paths: Sequence[str],
    pre: Preprocessing,
    *,
    num_threads: int = 2,
    should_stop: Callable[[], bool] | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    reduced_decode: bool = False,
) -> np.ndarray:
    """Decode + resize every image once: (N, R, R, 3) uint8, identical to eval-time pixels.

    Threads help: PIL releases the GIL while decoding and resizing. ``reduced_decode``: large
    JPEGs are decoded at a reduced scale first (``load_rgb(reduce_to=...)``), still at least twice the
    final resize size, then resized like eval; use it for training images, never for validation.
    """
    r = pre.resolution
    out = np.empty((len(paths), r, r, 3), dtype=np.uint8)

    def one(i: int) -> None:
        img = load_rgb(paths[i], reduce_to=2 * pre.resize_to if reduced_decode else None)
        out[i] = np.asarray(resize_and_crop(img, pre), dtype=np.uint8)

    chunk = 64
    with ThreadPoolExecutor(max_workers=max(1, num_threads)) as pool:
        for start in range(0, len(paths), chunk):
            if should_stop is not None and should_stop():
                raise InterruptedError("stopped while loading images")
            list(pool.map(one, range(start, min(start + chunk, len(paths)))))
            if on_progress is not None:
                on_progress(min(start + chunk, len(paths)), len(paths))
    return out


def to_tensor_batch(images: np.ndarray, pre: Preprocessing) -> torch.Tensor:
    """uint8 (N, R, R, 3) -> normalised float32 (N, 3, R, R), via the one ``normalize``."""
    return torch.from_numpy(np.stack([normalize(im, pre) for im in images]))


class AugmentedImages(Dataset[tuple[torch.Tensor, int]]):
    """Augmented, normalised views of in-memory images; view (i, epoch) is reproducible."""

    def __init__(self, images: np.ndarray, labels: Sequence[int], pre: Preprocessing,
                 augmenter: Augmenter | None, seed: int):
        self.images, self.labels, self.pre = images, list(labels), pre
        self.augmenter, self.seed = augmenter, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def view(self, index: int, key: int) -> np.ndarray:
        img = self.images[index]
        if self.augmenter is None:
            return img
        return self.augmenter(img, view_seed(self.seed, index, key))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return torch.from_numpy(normalize(self.view(index, 1_000 + self.epoch), self.pre)), self.labels[index]


def epoch_order(n: int, labels: np.ndarray, seed: int, phase: int, epoch: int, *, balanced: bool) -> np.ndarray:
    """Sample order for one epoch, a pure function of (seed, phase, epoch).

    ``balanced``: draw n indices with replacement, each class equally likely (balanced sampler).
    """
    rng = np.random.default_rng([seed, phase, epoch])
    if not balanced:
        return rng.permutation(n)
    counts = np.bincount(labels)
    p = 1.0 / counts[labels]
    return rng.choice(n, size=n, replace=True, p=p / p.sum())


def batches(order: np.ndarray, batch_size: int, *, drop_last_single: bool = True) -> Iterator[np.ndarray]:
    """Index batches; a trailing batch of one is merged into the previous one (BatchNorm needs > 1)."""
    n = len(order)
    starts = list(range(0, n, batch_size))
    if drop_last_single and len(starts) > 1 and n - starts[-1] == 1:
        starts.pop()
    for j, s in enumerate(starts):
        end = starts[j + 1] if j + 1 < len(starts) else n
        yield order[s:end]


__all__ = ["Sample", "DataError", "as_samples", "check_class_counts", "find_missing", "load_images",
           "to_tensor_batch", "AugmentedImages", "epoch_order", "batches"]
