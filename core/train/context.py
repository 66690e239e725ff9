"""``TrainContext``: what stays fixed for the whole run once samples, model and images are ready."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from core.augment import Augmenter
from core.preprocessing import Preprocessing
from core.staged import StagedModel
from core.train.config import TrainConfig
from core.train.runner import Runner


@dataclass
class TrainContext:
    run: Runner
    model: StagedModel
    pre: Preprocessing
    variant: str  # base variant name, as checkpoints store it ("lite0", not "lite0@160")
    device: torch.device
    threads: int
    amp_dtype: torch.dtype | None  # CUDA autocast dtype; None: full precision
    channels_last: bool
    images_train: np.ndarray  # decoded and resized once (uint8, N x R x R x 3)
    images_val: np.ndarray
    labels_train: np.ndarray
    labels_val: torch.Tensor
    augmenter: Augmenter
    balance: str  # "loss" | "sampler" | "none"
    criterion: nn.Module  # training loss: label smoothing, class weights
    eval_criterion: nn.Module  # plain cross-entropy: validation losses comparable across runs

    @property
    def cfg(self) -> TrainConfig:
        return self.run.cfg

    @property
    def num_classes(self) -> int:
        return len(self.run.classes)

    @property
    def num_train(self) -> int:
        return len(self.labels_train)
