"""Training data: which samples train and validate, the imbalance policy, each epoch's batches."""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from core.augment import Augmenter, view_seed
from core.data import DataError, Sample, as_samples, batches, check_class_counts, find_missing
from core.preprocessing import Preprocessing, normalize
from core.train import distributed
from core.train.config import TrainConfig
from core.train.runner import Runner

SampleList = Sequence[tuple[str | Path, int]] | Sequence[Sample]


def stratified_val(samples: list[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Deterministic stratified hold-out; every class keeps >= 1 image in train and gives >= 1 to val."""
    rng = np.random.default_rng([seed, 7])
    by_class: dict[int, list[Sample]] = {}
    for s in samples:
        by_class.setdefault(s.label, []).append(s)
    train, val = [], []
    for label in sorted(by_class):
        items = by_class[label]
        idx = rng.permutation(len(items))
        k = min(len(items) - 1, max(1, round(len(items) * fraction)))
        val += [items[i] for i in idx[:k]]
        train += [items[i] for i in idx[k:]]
    return train, val


def _drop_missing(samples: list[Sample], vals: list[Sample], run: Runner) -> tuple[list[Sample], list[Sample]]:
    """Image files deleted from the store after ingest: fail, or skip them (``on_missing``)."""
    missing = find_missing(samples + vals)
    if not missing:
        return samples, vals
    msg = (f"{len(missing)} image file(s) listed for training are missing from disk "
           f"(first: {missing[0].path}); they were removed from the store after ingest.")
    if run.cfg.on_missing == "fail":
        raise DataError(msg + " Re-import the dataset, or set on_missing='skip' to train without them.")
    run.log(msg + " Skipping them (on_missing='skip').", "warning", missing=len(missing), first=missing[0].path)
    gone = {s.path for s in missing}
    return [s for s in samples if s.path not in gone], [s for s in vals if s.path not in gone]


def check_samples(train_samples: SampleList, val_samples: SampleList | None,
                  run: Runner) -> tuple[list[Sample], list[Sample]]:
    """Training and validation samples, checked; holds out a stratified share when no validation is given."""
    samples, vals = _drop_missing(as_samples(train_samples), as_samples(val_samples) if val_samples else [], run)
    # A class needs >= 2 images in all: one to learn from, one to check it on.
    check_class_counts(samples if not vals else samples + vals, run.classes, 2)
    if not vals:
        samples, vals = stratified_val(samples, run.cfg.val_fraction, run.cfg.seed)
        run.log(f"No validation images given: held out {len(vals)} training images (stratified).")
    return samples, vals


def imbalance_policy(samples: list[Sample], vals: list[Sample], run: Runner) -> str:
    """'loss' (class-weighted), 'sampler' (balanced batches) or 'none'; ``auto`` weighs the loss
    when the largest class outnumbers the smallest by more than ``imbalance_ratio``."""
    cfg = run.cfg
    counts = check_class_counts(samples, run.classes, 1)
    ratio = max(counts.values()) / max(1, min(counts.values()))
    balance = cfg.balance
    if balance == "auto":
        balance = "loss" if ratio > cfg.imbalance_ratio else "none"
    run.summary.update(balance=balance, imbalance_ratio=round(ratio, 3), class_counts=counts,
                       num_train=len(samples), num_val=len(vals))
    if balance != "none":
        how = "class-weighted loss" if balance == "loss" else "balanced sampler"
        run.log(f"Class imbalance {ratio:.1f}:1 -> using {how}.")
    return balance


def class_weights(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Inverse-frequency weights (n / (k * count)): every class weighs the same in the loss."""
    return len(labels) / (num_classes * np.maximum(np.bincount(labels, minlength=num_classes), 1))


def steps_per_epoch(num_samples: int, batch_size: int) -> int:
    return max(1, len(list(batches(np.arange(num_samples), batch_size))))


def epoch_batches(order: np.ndarray, batch_size: int, labels: np.ndarray, x_views: torch.Tensor | None,
                  imgs: np.ndarray, pre: Preprocessing, augmenter: Augmenter, cfg: TrainConfig,
                  phase_index: int, phase_epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches for one epoch, a pure function of (seed, phase, epoch): resume replays it exactly.

    ``x_views``: cached activations, view v of image i at row v*N+i; None trains on images
    augmented on the fly. In a data-parallel run each process gets its share of every batch.
    """
    n = len(labels)
    if x_views is not None:
        num_views = len(x_views) // n
        # Which cached view each image shows this epoch.
        rng = np.random.default_rng([cfg.seed, phase_index, phase_epoch, 1])
        view = rng.integers(0, num_views, size=n)
    for whole in batches(order, batch_size):
        idx = whole[distributed.part(len(whole))]
        y = torch.from_numpy(labels[idx])
        if x_views is not None:
            yield x_views[torch.from_numpy(view[idx] * n + idx)], y
        else:  # on-the-fly augmentation (full fine-tune): fresh view per (image, epoch)
            u8 = [augmenter(imgs[i], view_seed(cfg.seed, int(i), 10_000 + phase_index * 1000 + phase_epoch))
                  for i in idx]
            yield torch.from_numpy(np.stack([normalize(im, pre) for im in u8])), y
