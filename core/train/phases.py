"""Training phases: what each phase trains, where its input enters the network, and at what rates.

``strategy``:
* ``staged`` (default): ``head`` (classifier only, on cached pooled embeddings) then
  ``finetune`` (top ``unfreeze_stages`` stages + conv head + classifier, layer-wise decayed
  learning rates, on cached activations entering the first trainable stage).
* ``full``: head warm-up, then every layer trains on freshly augmented images each epoch.
* ``head``: classifier only.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from core.staged import StagedModel
from core.train.config import TrainConfig


@dataclass(frozen=True)
class PhaseSpec:
    name: str
    epochs: int
    groups: tuple[str, ...]  # trainable parameter groups
    entry: str  # where the cached / fed input enters the network
    lr: float
    batch_size: int


def finetune_groups(model: StagedModel, unfreeze_stages: int) -> list[str]:
    """The top ``unfreeze_stages`` stages and every group above them (EfficientNet: conv head, classifier)."""
    return model.top_groups(unfreeze_stages)


def first_entry(model: StagedModel, groups: Sequence[str]) -> str:
    """Where the trainable part starts: the input of the lowest trainable group."""
    return min((model.group_entry(g) for g in groups), key=model.entry_position)


def plan_phases(cfg: TrainConfig, model: StagedModel) -> list[PhaseSpec]:
    """The phases ``cfg`` asks for, in the parts ``model`` is made of."""
    head = PhaseSpec("head", cfg.head_epochs, ("classifier",), "embedding", cfg.lr_head, cfg.head_batch_size)
    if cfg.strategy == "head":
        return [head]
    if cfg.strategy == "full":
        full = PhaseSpec("full", cfg.finetune_epochs, model.parameter_group_names, "image", cfg.lr, cfg.batch_size)
        return [p for p in (head, full) if p.epochs > 0]
    groups = tuple(finetune_groups(model, cfg.unfreeze_stages))
    entry = first_entry(model, groups) if cfg.cache_activations else "image"
    ft = PhaseSpec("finetune", cfg.finetune_epochs, groups, entry, cfg.lr, cfg.batch_size)
    return [p for p in (head, ft) if p.epochs > 0]


class Tail(nn.Module):
    """The part of ``model`` from ``entry`` to the logits (shares the model's parameters)."""

    def __init__(self, model: StagedModel, entry: str):
        super().__init__()
        model.entry_position(entry)  # fail early on an unknown name
        self.model, self.entry = model, entry

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_from(self.entry, x)


def set_train_mode(model: StagedModel, trainable: Sequence[str], train_bn: bool = True) -> None:
    """Train mode for trainable groups only: frozen BatchNorms keep their ImageNet statistics.

    ``train_bn=False``: trainable groups' BatchNorms stay in eval mode too (affine still learns).
    """
    model.eval()
    mods = model.group_modules()
    for g in trainable:
        for m in mods[g]:
            m.train()
            if not train_bn:
                for sub in m.modules():
                    if isinstance(sub, nn.BatchNorm2d):
                        sub.eval()
    # Dropout before the classifier lives in forward_head and follows model.training.
    model.training = "classifier" in trainable


def param_groups(model: StagedModel, groups: Sequence[str], lr: float, layer_decay: float,
                 weight_decay: float) -> list[dict[str, Any]]:
    """Layer-wise learning-rate decay: the classifier gets ``lr``, each group below it ``* decay``.

    No weight decay on BatchNorm parameters and biases (1-d tensors), as in the reference scripts.
    """
    named = model.parameter_groups()
    ordered = [g for g in reversed(model.parameter_group_names) if g in groups]
    out: list[dict[str, Any]] = []
    for depth, g in enumerate(ordered):
        g_lr = lr * (layer_decay ** depth)
        decay = [p for p in named[g] if p.ndim > 1]
        no_decay = [p for p in named[g] if p.ndim <= 1]
        if decay:
            out.append({"params": decay, "lr": g_lr, "weight_decay": weight_decay, "name": g})
        if no_decay:
            out.append({"params": no_decay, "lr": g_lr, "weight_decay": 0.0, "name": f"{g}.no_decay"})
    return out
