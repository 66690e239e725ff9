"""The step and epoch loop: ``train_one_epoch``, ``evaluate``, the LR schedule, weight EMA, OOM retry.

Reads like torchvision's classification reference. Every step checks for cancellation, and a
step that runs out of memory is retried once at half the micro-batch (gradient accumulation
keeps the update the same).
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from core.metrics import sensitivity_at_specificity, validation_metrics
from core.staged import StagedModel
from core.train import distributed
from core.train.callbacks import Callback, TrainingCancelled
from core.train.config import TrainConfig
from core.train.phases import PhaseSpec, param_groups
from core.train.robustness import check_finite, retry_on_oom


class WarmupCosine:
    """LR factor: linear warm-up then cosine to 1 % (a picklable LambdaLR function)."""

    def __init__(self, total_steps: int, warmup_steps: int):
        self.total, self.warmup = max(1, total_steps), warmup_steps

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        t = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * t))


class ModelEma:
    """Exponential moving average of the trainable groups' weights (and BN buffers)."""

    def __init__(self, model: StagedModel, groups: Sequence[str], decay: float):
        self.decay = decay
        prefixes = model.group_state_prefixes(groups)
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()
                       if k.startswith(prefixes) and v.dtype.is_floating_point}

    @torch.no_grad()
    def update(self, model: StagedModel) -> None:
        sd = model.state_dict()
        for k, v in self.shadow.items():
            v.mul_(self.decay).add_(sd[k].detach(), alpha=1 - self.decay)

    def swap(self, model: StagedModel) -> None:
        """Exchange model weights and EMA weights (call twice to restore)."""
        sd = model.state_dict()
        with torch.no_grad():
            for k, v in self.shadow.items():
                tmp = sd[k].clone()
                sd[k].copy_(v)
                v.copy_(tmp)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        for k, v in sd.items():
            self.shadow[k].copy_(v)


def is_better(new: dict[str, Any], old: dict[str, Any] | None, metric: str) -> bool:
    """Model selection: a higher ``metric`` (lower loss), ties broken by accuracy then loss."""
    if old is None:
        return True
    if metric == "loss":
        return new["loss"] < old["loss"]
    key = (new[metric], new["accuracy"], -new["loss"])
    return key > (old[metric], old["accuracy"], -old["loss"])


@dataclass
class StepContext:
    """What train_one_epoch needs besides model, loss, optimizer and data."""

    device: torch.device
    callback: Callback
    phase: str
    epoch: int
    micro_batch: int  # may be halved once by retry_on_oom
    scaler: torch.amp.GradScaler | None = None
    amp_dtype: torch.dtype | None = None
    ema: ModelEma | None = None
    model: StagedModel | None = None
    progress: Callable[[int, int, float, float], None] | None = None  # (step, total, loss, lr)
    log: Callable[[str], None] = print
    channels_last: bool = False


def to_device(x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
    if ctx.device.type == "cuda":
        x = x.pin_memory().to(ctx.device, non_blocking=True)
        if ctx.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
    return x


def accumulated_step(tail: nn.Module, criterion: nn.Module, optimizer: torch.optim.Optimizer,
                     x: torch.Tensor, y: torch.Tensor, micro: int, step: int, ctx: StepContext) -> tuple[float, int]:
    """One optimiser update on batch (x, y) in micro-batches of ``micro`` (gradient accumulation:
    the same update as one batch, less memory). Restartable: it zeroes gradients first.
    In a data-parallel run (x, y) is this process's share of the batch and the gradients are
    averaged over all processes before the update. Returns (summed loss, correct predictions)."""
    optimizer.zero_grad(set_to_none=True)
    distributed.begin_step(len(x))
    loss_sum, correct = 0.0, 0
    for s in range(0, len(x), micro):
        xb, yb = x[s:s + micro], y[s:s + micro]
        with torch.autocast(ctx.device.type, dtype=ctx.amp_dtype or torch.bfloat16, enabled=ctx.amp_dtype is not None):
            logits = tail(xb)
            loss = criterion(logits.float(), yb)
        check_finite(loss, ctx.phase, ctx.epoch, step, optimizer.param_groups[0]["lr"])
        scaled = loss * (len(xb) / len(x))
        if ctx.scaler is not None:
            ctx.scaler.scale(scaled).backward()
        else:
            scaled.backward()
        loss_sum += loss.item() * len(xb)
        correct += int((logits.argmax(1) == yb).sum())
    distributed.average_gradients([p for g in optimizer.param_groups for p in g["params"]], _share_weight(criterion, y))
    if ctx.scaler is not None:
        ctx.scaler.step(optimizer)
        ctx.scaler.update()
    else:
        optimizer.step()
    return loss_sum, correct


def _share_weight(criterion: nn.Module, y: torch.Tensor) -> float:
    """What this process's share counts for in the batch's mean loss: its size, or with class
    weights the sum of its samples' weights (the denominator of a weighted mean)."""
    weight = getattr(criterion, "weight", None)
    return float(weight[y].sum()) if weight is not None and len(y) else float(len(y))


def train_one_epoch(
    tail: nn.Module,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    data: Iterator[tuple[torch.Tensor, torch.Tensor]],
    num_steps: int,
    ctx: StepContext,
) -> dict[str, float]:
    """One pass over ``data``; scheduler steps per batch; cancellation checked every batch."""
    total_loss, total_correct, seen = 0.0, 0, 0
    t0 = time.perf_counter()
    for step, (x, y) in enumerate(data, start=1):
        if distributed.agree(ctx.callback.should_stop()):  # rank 0's cancel stops every process
            raise TrainingCancelled(f"cancelled in the {ctx.phase} phase, epoch {ctx.epoch}, step {step}")
        x, y = to_device(x, ctx), to_device(y, ctx)
        tried = max(1, min(ctx.micro_batch, len(x)))  # 1: an empty share of a tiny last batch
        (loss_sum, correct), used = retry_on_oom(
            # Called at once (not stored), so the loop variables are bound as they are now.
            lambda micro: accumulated_step(tail, criterion, optimizer, x, y, micro, step, ctx),  # noqa: B023
            tried, ctx.log)
        if used < tried:  # halved after an OOM: keep the smaller micro-batch for the rest of the run
            ctx.micro_batch = used
        scheduler.step()
        if ctx.ema is not None and ctx.model is not None:
            ctx.ema.update(ctx.model)
        total_loss += loss_sum
        total_correct += correct
        seen += len(x)
        if ctx.progress is not None:
            ctx.progress(step, num_steps, loss_sum / max(1, len(x)), optimizer.param_groups[0]["lr"])
    dt = time.perf_counter() - t0
    loss_all, correct_all, seen_all = distributed.sum_floats([total_loss, total_correct, seen])  # every process's share
    return {"loss": loss_all / max(1, seen_all), "accuracy": correct_all / max(1, seen_all),
            "images_per_s": seen_all / max(dt, 1e-9), "seconds": dt}


@torch.inference_mode()
def evaluate(tail: nn.Module, criterion: nn.Module, inputs: torch.Tensor, labels: torch.Tensor,
             num_classes: int, device: torch.device, batch_size: int = 64, *,
             target_specificity: float = 0.95, positive_index: int = 1) -> dict[str, Any]:
    """Validation loss and metrics; the whole model in eval mode (eval BatchNorm, no dropout).

    Two classes: also the sensitivity reachable at ``target_specificity`` (positive class
    ``positive_index``), which a search may select on."""
    was_training = {m: m.training for m in tail.modules()}
    tail.eval()
    try:
        logits = torch.cat([tail(inputs[i:i + batch_size].to(device)).float().cpu()
                            for i in range(0, len(inputs), batch_size)])
    finally:
        for m, t in was_training.items():
            m.training = t
    loss = float(criterion(logits, labels).item())
    out = validation_metrics(labels.numpy(), logits.argmax(1).numpy(), num_classes)
    out["loss"] = loss
    if num_classes == 2:
        positive = (labels.numpy() == positive_index).astype(np.int64)
        score = torch.softmax(logits, 1)[:, positive_index].numpy()
        out["sensitivity_at_specificity"] = sensitivity_at_specificity(positive, score, target_specificity)
    return out


@dataclass
class PhaseOptim:
    """The optimiser state of one phase: AdamW with layer-wise rates, warm-up + cosine schedule,
    optional weight EMA and (fp16 autocast only) a gradient scaler."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    ema: ModelEma | None
    scaler: torch.amp.GradScaler | None

    @classmethod
    def create(cls, model: StagedModel, phase: PhaseSpec, cfg: TrainConfig, steps_per_epoch: int,
               amp_dtype: torch.dtype | None) -> PhaseOptim:
        groups = param_groups(model, phase.groups, phase.lr, cfg.layer_decay, cfg.weight_decay)
        optimizer = torch.optim.AdamW(groups, lr=phase.lr)
        total = phase.epochs * steps_per_epoch
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(total, int(cfg.warmup_frac * total)))
        ema = ModelEma(model, phase.groups, cfg.ema_decay) if cfg.ema else None
        scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
        return cls(optimizer, scheduler, ema, scaler)

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def load_checkpoint(self, ckpt: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if self.ema is not None and ckpt.get("ema"):
            self.ema.load_state_dict(ckpt["ema"])
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
