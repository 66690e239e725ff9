"""Fine-tuning engine: staged transfer learning for EfficientNet, fast on a small CPU.

Reads like torchvision's classification reference: a typed ``TrainConfig``, ``train_one_epoch``,
``evaluate``, and a checkpoint every epoch holding model, optimizer, scheduler, epoch and config.

What makes it fast on 2 CPU cores (measured numbers in bench/results_train.md):

* Frozen layers are a pure function of the input (eval-mode BatchNorm, no dropout), so their
  output is computed ONCE per image and augmented view (``cache_views``) and kept in memory.
  The head warm-up trains a linear layer on cached pooled embeddings (seconds), and the
  partial fine-tune trains the top stages on cached activations entering the first trainable
  stage, so an epoch costs only the top of the network, forward and backward.
* The frozen prefix runs once per image and view through ONNX Runtime (the prefix exported
  in memory, BatchNorm folded: 3-4x faster than eager PyTorch on 2 cores), and one pass
  yields both the activations the fine-tune starts from and the pooled embeddings the head
  warm-up trains on. View 0 is the clean eval-time image, the others augmented.
* Images are decoded and resized once (``core.data.load_images``; large training JPEGs are
  decoded at a reduced DCT scale first).

Phases (``strategy``):
* ``staged`` (default): ``head`` (classifier only, on embeddings) then ``finetune`` (top
  ``unfreeze_stages`` stages + conv head + classifier, layer-wise decayed learning rates).
* ``full``: head warm-up, then every layer trains on freshly augmented images each epoch.
* ``head``: classifier only.

``core`` never imports storage or UI code: progress leaves through a ``Callback``.
"""
from __future__ import annotations

import gc
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Sequence, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from core.augment import PRESETS, Augmenter, view_seed
from core.data import (
    DataError,
    Sample,
    as_samples,
    batches,
    check_class_counts,
    epoch_order,
    find_missing,
    load_images,
)
from core.efficientnet import EfficientNet, get_variant
from core.preprocessing import Preprocessing, normalize
from core.weights import create_model

T = TypeVar("T")


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    """Everything that decides a training run; stored in every checkpoint (``asdict``)."""

    recipe: str = "default"
    strategy: Literal["staged", "full", "head"] = "staged"
    augment: str = "field"  # core.augment preset: medical | field | none
    vertical_flip: bool = False  # medical preset only
    # Phase lengths (epochs). Early stopping may end a phase sooner.
    head_epochs: int = 10
    finetune_epochs: int = 6
    unfreeze_stages: int = 2  # top MBConv stages trained in ``finetune`` (0..7); conv head always
    lr_head: float = 3e-3
    lr: float = 1e-3  # finetune lr of the classifier; lower groups get lr * layer_decay**depth
    layer_decay: float = 0.5
    weight_decay: float = 1e-2
    warmup_frac: float = 0.1  # of each phase's steps
    batch_size: int = 32
    head_batch_size: int = 64
    label_smoothing: float = 0.1
    # CPU speed: cached activations of the frozen prefix, for this many augmented views.
    cache_views: int = 3
    cache_activations: bool = True
    cache_max_mb: int = 3072  # above this the finetune phase runs on images instead
    # View 0 of every image is the un-augmented eval-time image, views 1.. are augmented: the
    # network also trains on the exact test-time input (with cache_views=1, only on it).
    clean_view: bool = True
    # Frozen-prefix forward for the cache: ONNX Runtime (BN folded, 3-4x faster than eager
    # PyTorch on CPU), else PyTorch. "auto": ONNX Runtime on CPU when importable.
    cache_backend: Literal["auto", "onnx", "torch"] = "auto"
    train_bn: bool = True  # BatchNorm of trainable groups in train mode (False: ImageNet statistics kept)
    # Class imbalance: auto picks a class-weighted loss above ``imbalance_ratio`` (max/min count).
    balance: Literal["auto", "loss", "sampler", "none"] = "auto"
    imbalance_ratio: float = 3.0
    # Model selection / early stopping on validation macro-F1.
    select_metric: Literal["macro_f1", "accuracy", "loss"] = "macro_f1"
    patience: int = 4
    ema: bool = False
    ema_decay: float = 0.99
    seed: int = 0
    num_threads: int | None = None  # None: all cores torch sees (resume compares need the same value)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: bool = True  # CUDA only: bf16 autocast if supported, else fp16 + GradScaler
    val_fraction: float = 0.15  # used only when no validation samples are given
    on_missing: Literal["fail", "skip"] = "fail"  # image files deleted from the store after ingest
    weights: str = "auto"  # core.weights.create_model(weights=...)

    def validate(self) -> None:
        if self.strategy not in ("staged", "full", "head"):
            raise ValueError(f"strategy must be staged, full or head, got {self.strategy!r}")
        if self.augment not in PRESETS:
            raise ValueError(f"augment preset must be one of {list(PRESETS)}, got {self.augment!r}")
        if not 0 <= self.unfreeze_stages <= 7:
            raise ValueError(f"unfreeze_stages must be 0..7, got {self.unfreeze_stages}")
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be >= 2 (BatchNorm needs 2 samples), got {self.batch_size}")
        if self.cache_views < 1:
            raise ValueError(f"cache_views must be >= 1, got {self.cache_views}")
        if self.balance not in ("auto", "loss", "sampler", "none"):
            raise ValueError(f"balance must be auto, loss, sampler or none, got {self.balance!r}")
        if self.cache_backend not in ("auto", "onnx", "torch"):
            raise ValueError(f"cache_backend must be auto, onnx or torch, got {self.cache_backend!r}")
        if self.on_missing not in ("fail", "skip"):
            raise ValueError(f"on_missing must be fail or skip, got {self.on_missing!r}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


# Named recipes: epochs per phase, learning rates, how deep to unfreeze, how many cached views.
# Sized for 2 CPU cores (bench/bench_train.py, bench/results_train.md): the head warm-up runs to
# convergence on cached embeddings (cheap: early stopping ends it); the fine-tune trains the top
# stage + conv head on cached stage-6 inputs, a few seconds per epoch at 224 px.
RECIPES: dict[str, dict[str, Any]] = {
    # Under a minute at 192 px on 2 cores: the clean view only, a short fine-tune of the top stage.
    "quick": dict(head_epochs=20, lr_head=5e-3, finetune_epochs=3, unfreeze_stages=1, cache_views=1, patience=4,
                  train_bn=False),
    # About a third of a plain full fine-tune's time: clean + 2 augmented views, the top stage.
    "default": dict(head_epochs=30, lr_head=5e-3, finetune_epochs=8, unfreeze_stages=1, cache_views=3, patience=4,
                    train_bn=False),
    # Longer: more views, three stages, EMA of weights.
    "thorough": dict(head_epochs=30, lr_head=5e-3, finetune_epochs=14, unfreeze_stages=3, cache_views=6,
                     patience=6, ema=True),
}


def make_config(recipe: str = "default", **overrides: Any) -> TrainConfig:
    """A TrainConfig from a named recipe plus explicit overrides (``None`` values ignored)."""
    if recipe not in RECIPES:
        raise ValueError(f"Unknown recipe {recipe!r}; choose one of {list(RECIPES)}.")
    values = dict(RECIPES[recipe], recipe=recipe)
    values.update({k: v for k, v in overrides.items() if v is not None})
    cfg = TrainConfig.from_dict(values)
    cfg.validate()
    return cfg


# ---------------------------------------------------------------------------------------------
# Errors, callbacks, results
# ---------------------------------------------------------------------------------------------
class TrainingError(RuntimeError):
    """Training cannot go on; the message is meant for the user."""


class TrainingCancelled(Exception):
    """``Callback.should_stop`` asked to stop; the last checkpoint is intact."""


@dataclass
class Progress:
    phase: str
    epoch: int  # global epoch, 1-based (0 while caching)
    step: int  # step within this phase-epoch (or cache chunk)
    total_steps: int
    loss: float | None = None
    lr: float | None = None
    eta_s: float | None = None  # whole run, best effort
    images_per_s: float | None = None
    done_fraction: float = 0.0  # whole run


class Callback:
    """Progress hooks (like Ludwig's callbacks); subclass and override what you need."""

    def on_phase_start(self, phase: str, epochs: int, steps_per_epoch: int) -> None: ...

    def on_step(self, progress: Progress) -> None: ...

    def on_epoch_end(self, phase: str, epoch: int, metrics: dict[str, Any]) -> None:
        """After each epoch's checkpoint. A resumed run first replays every checkpointed epoch
        (``metrics["replayed"] = True``), so an epoch is never lost to a kill between the
        checkpoint and this call: treat reports as upserts keyed by (phase, epoch)."""

    def on_log(self, level: str, message: str, data: dict[str, Any] | None = None) -> None: ...

    def should_stop(self) -> bool:
        return False


@dataclass
class TrainResult:
    status: Literal["succeeded", "cancelled"]
    best: dict[str, Any]  # {"epoch", "phase", "metrics"}
    history: list[dict[str, Any]]
    best_path: Path
    last_path: Path
    train_seconds: float
    summary: dict[str, Any]


@dataclass
class TrainedModel:
    model: EfficientNet  # eval mode, on CPU
    preprocessing: Preprocessing
    classes: list[str]
    variant: str
    resolution: int
    meta: dict[str, Any] = field(default_factory=dict)  # the rest of the checkpoint (config, best, history)


# ---------------------------------------------------------------------------------------------
# Model slicing: the frozen prefix (cached) and the trainable tail
# ---------------------------------------------------------------------------------------------
# Entry points, input to output: "image", "stage0".."stage6", "head" (input of conv_head), "embedding".
def entry_index(entry: str) -> int:
    if entry == "image":
        return -1
    if entry == "head":
        return 7
    if entry == "embedding":
        return 8
    if entry.startswith("stage") and entry[5:].isdigit() and 0 <= int(entry[5:]) <= 6:
        return int(entry[5:])
    raise ValueError(f"Unknown entry point {entry!r}")


def forward_prefix(model: EfficientNet, x: torch.Tensor, entry: str) -> torch.Tensor:
    """Image batch -> activations entering ``entry`` (run in eval mode: a pure function)."""
    k = entry_index(entry)
    if k < 0:
        return x
    x = model.bn1(model.conv_stem(x))
    for i in range(min(k, 7)):
        x = model.blocks[i](x)
    if k >= 8:
        x = model.pool(model.bn2(model.conv_head(x)))
    return x


class Tail(nn.Module):
    """The part of ``model`` from ``entry`` to the logits (shares the model's parameters)."""

    def __init__(self, model: EfficientNet, entry: str):
        super().__init__()
        self.model, self.entry, self.k = model, entry, entry_index(entry)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        if self.k < 0:
            return m(x)
        if self.k < 8:
            for i in range(self.k, 7):
                x = m.blocks[i](x)
            x = m.pool(m.bn2(m.conv_head(x)))
        return m.forward_head(x)


GROUP_ORDER = ["stem", *[f"stage{i}" for i in range(7)], "head", "classifier"]


def finetune_groups(unfreeze_stages: int) -> list[str]:
    stages = [f"stage{i}" for i in range(7 - unfreeze_stages, 7)]
    return [*stages, "head", "classifier"]


def first_entry(groups: Sequence[str]) -> str:
    """Where the trainable part starts: the input of the lowest trainable group."""
    lowest = min(GROUP_ORDER.index(g) for g in groups)
    name = GROUP_ORDER[lowest]
    return {"stem": "image", "classifier": "embedding"}.get(name, name)


def set_train_mode(model: EfficientNet, trainable: Sequence[str], train_bn: bool = True) -> None:
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


@dataclass(frozen=True)
class PhaseSpec:
    name: str
    epochs: int
    groups: tuple[str, ...]
    entry: str  # where the cached / fed input enters
    lr: float
    batch_size: int


def plan_phases(cfg: TrainConfig) -> list[PhaseSpec]:
    head = PhaseSpec("head", cfg.head_epochs, ("classifier",), "embedding", cfg.lr_head, cfg.head_batch_size)
    if cfg.strategy == "head":
        return [head]
    if cfg.strategy == "full":
        full = PhaseSpec("full", cfg.finetune_epochs, tuple(GROUP_ORDER), "image", cfg.lr, cfg.batch_size)
        return [p for p in (head, full) if p.epochs > 0]
    groups = tuple(finetune_groups(cfg.unfreeze_stages))
    entry = first_entry(groups) if cfg.cache_activations else "image"
    ft = PhaseSpec("finetune", cfg.finetune_epochs, groups, entry, cfg.lr, cfg.batch_size)
    return [p for p in (head, ft) if p.epochs > 0]


def param_groups(model: EfficientNet, groups: Sequence[str], lr: float, layer_decay: float,
                 weight_decay: float) -> list[dict[str, Any]]:
    """Layer-wise learning-rate decay: the classifier gets ``lr``, each group below it ``* decay``.

    No weight decay on BatchNorm parameters and biases (1-d tensors), as in the reference scripts.
    """
    named = model.parameter_groups()
    ordered = [g for g in reversed(GROUP_ORDER) if g in groups]
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

    def __init__(self, model: EfficientNet, groups: Sequence[str], decay: float):
        self.decay = decay
        prefixes = _state_prefixes(model, groups)
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()
                       if k.startswith(prefixes) and v.dtype.is_floating_point}

    @torch.no_grad()
    def update(self, model: EfficientNet) -> None:
        sd = model.state_dict()
        for k, v in self.shadow.items():
            v.mul_(self.decay).add_(sd[k].detach(), alpha=1 - self.decay)

    def swap(self, model: EfficientNet) -> None:
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


def _state_prefixes(model: EfficientNet, groups: Sequence[str]) -> tuple[str, ...]:
    table = {"stem": ("conv_stem.", "bn1."), "head": ("conv_head.", "bn2."), "classifier": ("classifier.",)}
    out: list[str] = []
    for g in groups:
        out.extend(table.get(g, (f"blocks.{g[5:]}.",)))
    return tuple(out)


# ---------------------------------------------------------------------------------------------
# Robustness helpers
# ---------------------------------------------------------------------------------------------
def is_oom_error(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    msg = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in msg or "can't allocate memory" in msg
                                              or "cannot allocate memory" in msg)


def retry_on_oom(step: Callable[[int], T], batch_size: int, log: Callable[[str], None]) -> tuple[T, int]:
    """Run ``step(batch_size)``; if it runs out of memory, free caches and retry ONCE at half.

    Returns (result, batch size that worked). A second OOM becomes a TrainingError saying what
    to do. ``step`` must be restartable (it zeroes gradients itself).
    """
    try:
        return step(batch_size), batch_size
    except RuntimeError as exc:
        if not is_oom_error(exc) or batch_size < 2:
            raise
        half = batch_size // 2
        log(f"Out of memory at batch size {batch_size}; retrying at {half}. ({str(exc).splitlines()[0][:200]})")
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:
        return step(half), half
    except RuntimeError as exc:
        if is_oom_error(exc):
            raise TrainingError(f"Out of memory even at batch size {half} (after halving {batch_size}). "
                                "Use a smaller resolution, a smaller variant, or free memory.") from exc
        raise


def check_finite(loss: torch.Tensor, phase: str, epoch: int, step: int, lr: float) -> None:
    if not torch.isfinite(loss).all():
        raise TrainingError(
            f"Loss became {loss.item()} in the {phase} phase at epoch {epoch}, step {step} (lr {lr:.3g}). "
            "Training stopped: the learning rate is probably too high for this data; lower it and retry.")


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> dict[str, Any]:
    """Accuracy, macro-F1, balanced accuracy, per-class F1 (classes with no support count as 0 recall)."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (y_true, y_pred), 1)
    tp = np.diag(cm).astype(float)
    support, predicted = cm.sum(1), cm.sum(0)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(tp), where=(precision + recall) > 0)
    present = support > 0
    return {
        "accuracy": float(tp.sum() / max(1, cm.sum())),
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "balanced_accuracy": float(recall[present].mean()) if present.any() else 0.0,
        "per_class_f1": [float(x) for x in f1],
        "confusion": cm.tolist(),
    }


def _better(new: dict[str, Any], old: dict[str, Any] | None, metric: str) -> bool:
    if old is None:
        return True
    if metric == "loss":
        return new["loss"] < old["loss"]
    key = (new[metric], new["accuracy"], -new["loss"])
    return key > (old[metric], old["accuracy"], -old["loss"])


# ---------------------------------------------------------------------------------------------
# Device helpers
# ---------------------------------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TrainingError(f"Device {name!r} requested but CUDA is not available on this machine.")
    return dev


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
    model: EfficientNet | None = None
    progress: Callable[[int, int, float, float], None] | None = None  # (step, total, loss, lr)
    log: Callable[[str], None] = print
    channels_last: bool = False


def _to_device(x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
    if ctx.device.type == "cuda":
        x = x.pin_memory().to(ctx.device, non_blocking=True)
        if ctx.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
    return x


# ---------------------------------------------------------------------------------------------
# One epoch / evaluation
# ---------------------------------------------------------------------------------------------
def train_one_epoch(
    tail: Tail,
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
        if ctx.callback.should_stop():
            raise TrainingCancelled(f"cancelled in the {ctx.phase} phase, epoch {ctx.epoch}, step {step}")
        x, y = _to_device(x, ctx), _to_device(y, ctx)

        def run_step(micro: int) -> tuple[float, int]:
            # Gradient accumulation over micro-batches: the same update as one batch, less memory.
            optimizer.zero_grad(set_to_none=True)
            loss_sum, correct = 0.0, 0
            for s in range(0, len(x), micro):
                xb, yb = x[s:s + micro], y[s:s + micro]
                with torch.autocast(ctx.device.type, dtype=ctx.amp_dtype or torch.bfloat16,
                                    enabled=ctx.amp_dtype is not None):
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
            if ctx.scaler is not None:
                ctx.scaler.step(optimizer)
                ctx.scaler.update()
            else:
                optimizer.step()
            return loss_sum, correct

        tried = min(ctx.micro_batch, len(x))
        (loss_sum, correct), used = retry_on_oom(run_step, tried, ctx.log)
        if used < tried:  # halved after an OOM: keep the smaller micro-batch for the rest of the run
            ctx.micro_batch = used
        scheduler.step()
        if ctx.ema is not None and ctx.model is not None:
            ctx.ema.update(ctx.model)
        total_loss += loss_sum
        total_correct += correct
        seen += len(x)
        if ctx.progress is not None:
            ctx.progress(step, num_steps, loss_sum / len(x), optimizer.param_groups[0]["lr"])
    dt = time.perf_counter() - t0
    return {"loss": total_loss / max(1, seen), "accuracy": total_correct / max(1, seen),
            "images_per_s": seen / max(dt, 1e-9), "seconds": dt}


@torch.inference_mode()
def evaluate(tail: Tail, criterion: nn.Module, inputs: torch.Tensor, labels: torch.Tensor,
             num_classes: int, device: torch.device, batch_size: int = 64) -> dict[str, Any]:
    """Validation loss and metrics; the whole model in eval mode (eval BatchNorm, no dropout)."""
    was_training = {m: m.training for m in tail.modules()}
    tail.eval()
    try:
        logits = torch.cat([tail(inputs[i:i + batch_size].to(device)).float().cpu()
                            for i in range(0, len(inputs), batch_size)])
    finally:
        for m, t in was_training.items():
            m.training = t
    loss = float(criterion(logits, labels).item())
    out = classification_metrics(labels.numpy(), logits.argmax(1).numpy(), num_classes)
    out["loss"] = loss
    return out


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {"python": random.getstate(),
            # numpy's key array as a list keeps the checkpoint loadable with weights_only=True
            "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), *n[2:]))
    torch.set_rng_state(state["torch"])


def save_atomic(obj: dict[str, Any], path: Path) -> None:
    """torch.save to a temp file then rename: a kill mid-write never leaves a torn checkpoint."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint {path} does not exist.")
    # weights_only: a checkpoint is data, never code (RNG states are stored as plain lists).
    return torch.load(path, map_location="cpu", weights_only=True)


def load_trained_model(path: str | Path, device: str = "cpu") -> TrainedModel:
    """Rebuild the trained network from ``best.pt`` / ``last.pt``: eval mode, weights loaded."""
    ckpt = load_checkpoint(path)
    v = get_variant(ckpt["variant"]).at_resolution(int(ckpt["resolution"]))
    model = EfficientNet(v, int(ckpt["num_classes"]), ckpt["padding"], float(ckpt["bn_eps"]))
    model.load_state_dict(ckpt["model"])
    model.to(device).eval()
    meta = {k: v for k, v in ckpt.items() if k not in ("model", "optimizer", "scheduler", "rng", "ema")}
    return TrainedModel(model, Preprocessing.from_dict(ckpt["preprocessing"]), list(ckpt["classes"]),
                        ckpt["variant"], int(ckpt["resolution"]), meta)


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------
def _stratified_val(samples: list[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
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


class _Runner:
    """State of one training run (kept in one object so checkpoints capture all of it)."""

    def __init__(self, cfg: TrainConfig, classes: list[str], callback: Callback, run_dir: Path):
        self.cfg, self.classes, self.cb, self.run_dir = cfg, classes, callback, run_dir
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] | None = None
        self.summary: dict[str, Any] = {}
        self.t_start = time.perf_counter()
        self.prior_seconds = 0.0
        self.total_steps_plan = 1
        self.steps_done = 0

    def log(self, message: str, level: str = "info", **data: Any) -> None:
        self.cb.on_log(level, message, data or None)

    def seconds(self) -> float:
        return self.prior_seconds + time.perf_counter() - self.t_start


def train(
    train_samples: Sequence[tuple[str | Path, int]] | Sequence[Sample],
    classes: Sequence[str],
    variant: str,
    run_dir: str | Path,
    config: TrainConfig | None = None,
    *,
    resolution: int | None = None,
    val_samples: Sequence[tuple[str | Path, int]] | Sequence[Sample] | None = None,
    callback: Callback | None = None,
    resume: bool = False,
) -> TrainResult:
    """Fine-tune ``variant`` (ImageNet weights) on ``train_samples``; checkpoints in ``run_dir``.

    ``val_samples``: model selection and early stopping; if None, a stratified
    ``config.val_fraction`` of the training samples is held out. ``resume``: continue from
    ``run_dir/last.pt`` if it exists (same config and seed give the same result).
    Raises DataError / TrainingError with user-facing messages, TrainingCancelled on cancel.
    """
    cfg = config or TrainConfig()
    cfg.validate()
    cb = callback or Callback()
    classes = list(classes)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    last_path, best_path = run_dir / "last.pt", run_dir / "best.pt"
    R = _Runner(cfg, classes, cb, run_dir)

    # Threads: intra-op threads = cores; one inter-op thread (the graph is a chain).
    threads = cfg.num_threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    device = resolve_device(cfg.device)
    R.summary.update(device=str(device), threads=threads)

    # ---- samples ------------------------------------------------------------------------
    samples = as_samples(train_samples)
    vals = as_samples(val_samples) if val_samples else []
    missing = find_missing(samples + vals)
    if missing:
        msg = (f"{len(missing)} image file(s) listed for training are missing from disk "
               f"(first: {missing[0].path}); they were removed from the store after ingest.")
        if cfg.on_missing == "fail":
            raise DataError(msg + " Re-import the dataset, or set on_missing='skip' to train without them.")
        R.log(msg + " Skipping them (on_missing='skip').", "warning", missing=len(missing), first=missing[0].path)
        gone = {s.path for s in missing}
        samples = [s for s in samples if s.path not in gone]
        vals = [s for s in vals if s.path not in gone]
    # A class needs >= 2 images in all: one to learn from, one to check it on.
    check_class_counts(samples if not vals else samples + vals, classes, 2)
    if not vals:
        samples, vals = _stratified_val(samples, cfg.val_fraction, cfg.seed)
        R.log(f"No validation images given: held out {len(vals)} training images (stratified).")
    counts = check_class_counts(samples, classes, 1)

    # ---- imbalance ----------------------------------------------------------------------
    ratio = max(counts.values()) / max(1, min(counts.values()))
    balance = cfg.balance
    if balance == "auto":
        balance = "loss" if ratio > cfg.imbalance_ratio else "none"
    R.summary.update(balance=balance, imbalance_ratio=round(ratio, 3), class_counts=counts,
                     num_train=len(samples), num_val=len(vals))
    if balance != "none":
        R.log(f"Class imbalance {ratio:.1f}:1 -> using {'class-weighted loss' if balance == 'loss' else 'balanced sampler'}.")

    # ---- seeds, model, resume state ---------------------------------------------------------
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    loaded = create_model(variant, len(classes), weights=cfg.weights, resolution=resolution)
    model = loaded.model
    pre = loaded.preprocessing
    # Zero-init head: create_model's ImageNet-style init (uniform +-1/sqrt(num_classes)) gives
    # logits in the tens on 1280-d embeddings and a first epoch spent undoing it.
    nn.init.zeros_(model.classifier.weight)
    nn.init.zeros_(model.classifier.bias)
    base_variant = variant.split("@")[0].lower()
    R.summary.update(weights=loaded.weights, variant=base_variant, resolution=pre.resolution)

    phases = plan_phases(cfg)
    ckpt: dict[str, Any] | None = None
    if resume and last_path.is_file():
        ckpt = load_checkpoint(last_path)
        if ckpt["classes"] != classes or ckpt["variant"] != base_variant or int(ckpt["resolution"]) != pre.resolution:
            raise TrainingError(f"{last_path} belongs to another run (classes/variant/resolution differ); "
                                "cannot resume from it.")
        model.load_state_dict(ckpt["model"])
        R.history, R.best = list(ckpt["history"]), ckpt["best"]
        R.prior_seconds = float(ckpt.get("train_seconds", 0.0))
        R.summary.update(ckpt.get("summary", {}))
        R.summary["resumed_from_epoch"] = int(ckpt["epoch"])
        R.log(f"Resuming from {last_path.name}: epoch {ckpt['epoch']} ({ckpt['phase']} phase) done.")
        # A kill between writing a checkpoint and the callback's own bookkeeping would lose that
        # epoch's report: replay every checkpointed epoch (callbacks must treat them as upserts).
        for record in R.history:
            cb.on_epoch_end(record["phase"], int(record["epoch"]), {**record, "replayed": True})
    elif resume:
        R.log("No checkpoint to resume from: starting from the beginning.")

    model.to(device)
    channels_last = device.type == "cuda"
    if channels_last:
        model.to(memory_format=torch.channels_last)
    amp_dtype: torch.dtype | None = None
    if device.type == "cuda" and cfg.amp:
        amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16

    # Where each phase starts (skip finished ones on resume).
    start_phase, start_phase_epoch, bad_epochs = 0, 0, 0
    if ckpt is not None:
        start_phase = int(ckpt["phase_index"])
        start_phase_epoch = int(ckpt["phase_epoch"])
        bad_epochs = int(ckpt.get("bad_epochs", 0))
        if ckpt.get("phase_done"):
            start_phase, start_phase_epoch, bad_epochs = start_phase + 1, 0, 0
    global_epoch = int(ckpt["epoch"]) if ckpt else 0

    # ---- data: decode once, cache frozen activations once -----------------------------------
    labels_tr = np.array([s.label for s in samples], dtype=np.int64)
    labels_va = torch.tensor([s.label for s in vals], dtype=torch.int64)
    remaining = phases[start_phase:]
    if not remaining:
        R.log("All phases already finished; nothing to train.")
    cb.on_phase_start("load", 1, len(samples) + len(vals))
    t_load = time.perf_counter()
    try:
        imgs_tr = load_images([s.path for s in samples], pre, num_threads=threads, should_stop=cb.should_stop,
                              on_progress=lambda i, n: cb.on_step(Progress("load", 0, i, n)), reduced_decode=True)
        imgs_va = load_images([s.path for s in vals], pre, num_threads=threads, should_stop=cb.should_stop)
    except InterruptedError as exc:
        raise TrainingCancelled(str(exc)) from exc
    R.summary["load_seconds"] = round(time.perf_counter() - t_load, 2)

    augmenter = Augmenter(cfg.augment, pre.resolution, vertical_flip=cfg.vertical_flip)
    K = cfg.cache_views
    # Lowest cached entry needed by the remaining phases (others derive from it cheaply).
    cached_entries = [p.entry for p in remaining if p.entry != "image"]
    if any(p.entry == "image" for p in remaining) or not cached_entries:
        cache_entry = "embedding"  # only the head phase can use a cache then
    else:
        cache_entry = min(cached_entries, key=entry_index)
    est_mb = _activation_mb(model, cache_entry, pre.resolution) * len(samples) * K
    if est_mb > cfg.cache_max_mb and cache_entry != "embedding":
        R.log(f"Cached activations at {cache_entry} would need {est_mb:.0f} MB (> cache_max_mb "
              f"{cfg.cache_max_mb}); the finetune phase will run on images instead.", "warning")
        phases = [replace(p, entry="image") if p.entry == cache_entry else p for p in phases]
        remaining = phases[start_phase:]
        cache_entry = "embedding"
    R.summary["cache_entry"] = cache_entry

    need_cache = any(p.entry != "image" for p in remaining)
    caches: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    if need_cache:
        t_cache = time.perf_counter()
        # One frozen pass gives the cached entry and, when a remaining phase trains on pooled
        # embeddings, those too (the frozen top is still at its ImageNet weights then).
        entries = sorted({cache_entry, *(p.entry for p in remaining if p.entry != "image")}, key=entry_index)
        caches = _build_cache(model, imgs_tr, imgs_va, pre, augmenter, cfg, entries, device, threads, R)
        R.summary["cache_seconds"] = round(time.perf_counter() - t_cache, 2)
        R.summary["cache_mb"] = round(sum(a.numel() + b.numel() for a, b in caches.values()) * 4 / 2**20, 1)
        R.log(f"Cached {', '.join(entries)} activations for {len(samples)} images x {K} view(s) in "
              f"{R.summary['cache_seconds']} s ({R.summary['cache_mb']} MB, {R.summary['cache_backend']}).")

    # Plan total steps for progress/ETA.
    def steps_per_epoch(p: PhaseSpec) -> int:
        return max(1, len(list(batches(np.arange(len(samples)), p.batch_size))))
    R.total_steps_plan = sum(p.epochs * steps_per_epoch(p) for p in remaining) - start_phase_epoch * (
        steps_per_epoch(remaining[0]) if remaining else 0)
    class_weight = None
    if balance == "loss":
        w = len(samples) / (len(classes) * np.maximum(np.bincount(labels_tr, minlength=len(classes)), 1))
        class_weight = torch.tensor(w, dtype=torch.float32, device=device)
    criterion = nn.CrossEntropyLoss(weight=class_weight, label_smoothing=cfg.label_smoothing)
    eval_criterion = nn.CrossEntropyLoss()  # plain loss for comparable validation numbers

    # Restore the RNG streams only now: decoding and caching above must not shift them
    # (resumed dropout masks must equal the uninterrupted run's).
    if ckpt is not None:
        set_rng_state(ckpt["rng"])

    # ---- phases -----------------------------------------------------------------------------
    for phase_index in range(start_phase, len(phases)):
        p = phases[phase_index]
        model.set_trainable(p.groups)
        tail = Tail(model, p.entry)
        # Inputs for this phase: derive from the cache (frozen layers between cache and entry).
        if p.entry == "image":
            x_tr_views = None
            x_va = torch.from_numpy(np.stack([normalize(im, pre) for im in imgs_va]))
        elif p.entry in caches:
            x_tr_views, x_va = caches[p.entry]
        else:
            x_tr_views = _derive(model, caches[cache_entry][0], cache_entry, p.entry, device)
            x_va = _derive(model, caches[cache_entry][1], cache_entry, p.entry, device)
        optimizer = torch.optim.AdamW(param_groups(model, p.groups, p.lr, cfg.layer_decay, cfg.weight_decay),
                                      lr=p.lr)
        spe = steps_per_epoch(p)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, WarmupCosine(p.epochs * spe, int(cfg.warmup_frac * p.epochs * spe)))
        ema = ModelEma(model, p.groups, cfg.ema_decay) if cfg.ema else None
        scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
        first_epoch = 0
        if ckpt is not None and phase_index == int(ckpt["phase_index"]) and not ckpt.get("phase_done"):
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            if ema is not None and ckpt.get("ema"):
                ema.load_state_dict(ckpt["ema"])
            if scaler is not None and ckpt.get("scaler"):
                scaler.load_state_dict(ckpt["scaler"])
            first_epoch = start_phase_epoch
        else:
            bad_epochs = 0
        cb.on_phase_start(p.name, p.epochs, spe)
        R.log(f"Phase {p.name}: training {', '.join(p.groups)} from {p.entry} for up to {p.epochs} epoch(s).")
        ctx = StepContext(device=device, callback=cb, phase=p.name, epoch=0, micro_batch=p.batch_size,
                          scaler=scaler, amp_dtype=amp_dtype, ema=ema, model=model, log=R.log,
                          channels_last=channels_last)

        for phase_epoch in range(first_epoch, p.epochs):
            global_epoch += 1
            ctx.epoch = global_epoch
            set_train_mode(model, p.groups, cfg.train_bn)
            order = epoch_order(len(samples), labels_tr, cfg.seed, phase_index, phase_epoch,
                                balanced=balance == "sampler")
            data = _epoch_batches(order, p, labels_tr, x_tr_views, imgs_tr, pre, augmenter, cfg, phase_index,
                                  phase_epoch, len(samples))
            t_epoch = time.perf_counter()

            def on_progress(step: int, total: int, loss: float, lr: float, _t0: float = t_epoch) -> None:
                R.steps_done += 1
                rate = (time.perf_counter() - _t0) / step
                left = max(0, R.total_steps_plan - R.steps_done)
                cb.on_step(Progress(p.name, global_epoch, step, total, loss, lr, eta_s=rate * left,
                                    images_per_s=p.batch_size / max(rate, 1e-9),
                                    done_fraction=min(1.0, R.steps_done / max(1, R.total_steps_plan))))
            ctx.progress = on_progress
            train_stats = train_one_epoch(tail, criterion, optimizer, scheduler, data, spe, ctx)
            if ctx.micro_batch < p.batch_size:
                R.summary["micro_batch"] = ctx.micro_batch
            if ema is not None:
                ema.swap(model)
            val = evaluate(tail, eval_criterion, x_va, labels_va, len(classes), device)
            improved = _better(val, R.best["metrics"] if R.best else None, cfg.select_metric)
            record = {"epoch": global_epoch, "phase": p.name, "phase_epoch": phase_epoch + 1,
                      "train_loss": train_stats["loss"], "train_accuracy": train_stats["accuracy"],
                      "val_loss": val["loss"], "val_accuracy": val["accuracy"], "val_macro_f1": val["macro_f1"],
                      "val_balanced_accuracy": val["balanced_accuracy"],
                      "lr": optimizer.param_groups[0]["lr"], "epoch_seconds": round(time.perf_counter() - t_epoch, 3),
                      "images_per_s": round(train_stats["images_per_s"], 1)}
            R.history.append(record)
            if improved:
                R.best = {"epoch": global_epoch, "phase": p.name, "metrics": val}
                bad_epochs = 0
            else:
                bad_epochs += 1
            stop_early = bad_epochs >= cfg.patience and phase_epoch + 1 < p.epochs
            phase_done = phase_epoch + 1 >= p.epochs or stop_early
            common = _checkpoint_common(model, cfg, R, base_variant, pre, classes, global_epoch, p.name)
            if improved:  # best.pt holds the weights just evaluated (EMA weights when EMA is on)
                save_atomic({**common, "model": _cpu_state(model), "optimizer": optimizer.state_dict(),
                             "scheduler": scheduler.state_dict()}, best_path)
            if ema is not None:
                ema.swap(model)
            save_atomic({**common, "model": _cpu_state(model), "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict(), "phase_index": phase_index,
                         "phase_epoch": phase_epoch + 1, "phase_done": phase_done, "bad_epochs": bad_epochs,
                         "ema": ema.state_dict() if ema is not None else None,
                         "scaler": scaler.state_dict() if scaler is not None else None}, last_path)
            cb.on_epoch_end(p.name, global_epoch, {**record, "improved": improved, "best_epoch": R.best["epoch"]})
            if stop_early:
                R.log(f"Early stop in {p.name}: no {cfg.select_metric} gain for {cfg.patience} epochs.")
                R.summary.setdefault("early_stopped", []).append(p.name)
                break

    if R.best is None:
        raise TrainingError("No epoch was trained (all phase lengths are 0).")
    R.summary.update(best_epoch=R.best["epoch"], best_phase=R.best["phase"], epochs_run=global_epoch)
    # Keep the summary in last.pt in sync (resume reads it back).
    return TrainResult("succeeded", R.best, R.history, best_path, last_path, round(R.seconds(), 2), R.summary)


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _checkpoint_common(model: EfficientNet, cfg: TrainConfig, R: _Runner, variant: str, pre: Preprocessing,
                       classes: list[str], epoch: int, phase: str) -> dict[str, Any]:
    return {"epoch": epoch, "phase": phase, "config": asdict(cfg), "variant": variant,
            "resolution": pre.resolution, "num_classes": len(classes), "classes": list(classes),
            "preprocessing": pre.to_dict(), "padding": model.padding, "bn_eps": model.bn_eps,
            "rng": rng_state(), "history": list(R.history), "best": R.best,
            "train_seconds": R.seconds(), "summary": dict(R.summary)}


def _activation_mb(model: EfficientNet, entry: str, resolution: int) -> float:
    """fp32 MB per cached view of one image at ``entry``."""
    with torch.inference_mode():
        was = model.training
        model.eval()
        shape = forward_prefix(model, torch.zeros(1, 3, resolution, resolution,
                                                  device=next(model.parameters()).device), entry).shape
        model.train(was)
    return float(np.prod(shape)) * 4 / 2**20


class _Prefix(nn.Module):
    """Frozen part of ``model``: image -> activations at each of ``entries`` (input to output order)."""

    def __init__(self, model: EfficientNet, entries: Sequence[str]):
        super().__init__()
        self.model, self.ks = model, [entry_index(e) for e in entries]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        m, want, last = self.model, set(self.ks), max(self.ks)
        outs: dict[int, torch.Tensor] = {}
        x = m.bn1(m.conv_stem(x))
        for k in range(7):
            if k in want:
                outs[k] = x
            if k == last:
                break
            x = m.blocks[k](x)
        else:
            outs[7] = x
            if 8 in want:
                outs[8] = m.pool(m.bn2(m.conv_head(x)))
        return tuple(outs[k] for k in self.ks)


def _prefix_runner(model: EfficientNet, entries: Sequence[str], resolution: int, cfg: TrainConfig,
                   device: torch.device, threads: int,
                   R: _Runner) -> tuple[Callable[[np.ndarray], list[torch.Tensor]], str]:
    """A function (N, 3, R, R) float32 array -> activations at ``entries``, and its backend name.

    ONNX Runtime on CPU (the frozen prefix exported in memory, BatchNorm folded into the
    convolutions): several times faster than eager PyTorch there. Falls back to PyTorch.
    """
    prefix = _Prefix(model, entries).eval()
    if cfg.cache_backend != "torch" and device.type == "cpu":
        try:
            import io
            import warnings

            import onnxruntime as ort

            buf = io.BytesIO()
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                torch.onnx.export(prefix, (torch.zeros(1, 3, resolution, resolution),), buf, input_names=["x"],
                                  output_names=[f"y{i}" for i in range(len(entries))],
                                  dynamic_axes={"x": {0: "n"}, **{f"y{i}": {0: "n"} for i in range(len(entries))}},
                                  opset_version=17, do_constant_folding=True, dynamo=False)
            so = ort.SessionOptions()
            so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
            so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            sess = ort.InferenceSession(buf.getvalue(), so, providers=["CPUExecutionProvider"])

            def run_ort(x: np.ndarray) -> list[torch.Tensor]:
                return [torch.from_numpy(y) for y in sess.run(None, {"x": x})]
            return run_ort, "onnxruntime"
        except Exception as exc:  # noqa: BLE001 - no ORT / export failed: PyTorch does the same job
            if cfg.cache_backend == "onnx":
                raise TrainingError(f"cache_backend='onnx' failed: {exc}") from exc
            R.log(f"ONNX Runtime unavailable for the frozen prefix ({str(exc)[:200]}); using PyTorch.", "warning")

    def run_torch(x_np: np.ndarray) -> list[torch.Tensor]:
        x = torch.from_numpy(x_np)

        def run(micro: int) -> list[torch.Tensor]:
            with torch.inference_mode():
                parts = [prefix(x[s:s + micro].to(device)) for s in range(0, len(x), micro)]
            return [torch.cat([p[j].float().cpu() for p in parts]) for j in range(len(entries))]
        out, _ = retry_on_oom(run, len(x), R.log)
        return out
    return run_torch, "torch"


def _build_cache(model: EfficientNet, imgs_tr: np.ndarray, imgs_va: np.ndarray, pre: Preprocessing,
                 augmenter: Augmenter, cfg: TrainConfig, entries: Sequence[str], device: torch.device,
                 threads: int, R: _Runner) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Frozen-prefix activations per entry: train (K*N, ...) with view v of image i at v*N+i; val (N_val, ...).

    Views are seeded by (seed, image, view), so the cache is identical after a resume. View 0 is
    the un-augmented image when ``clean_view`` is on.
    """
    model.eval()
    n, K = len(imgs_tr), cfg.cache_views
    jobs: list[tuple[int, int]] = [(i, v) for v in range(K) for i in range(n)]
    total = len(jobs) + len(imgs_va)
    chunk = 32
    R.cb.on_phase_start("cache", 1, math.ceil(total / chunk))
    forward, backend = _prefix_runner(model, entries, pre.resolution, cfg, device, threads, R)
    R.summary["cache_backend"] = backend

    def view(i: int, v: int) -> np.ndarray:
        if v == 0 and cfg.clean_view:
            return imgs_tr[i]
        return augmenter(imgs_tr[i], view_seed(cfg.seed, i, v))

    outs_tr: list[list[torch.Tensor]] = []
    t0 = time.perf_counter()
    for c, s in enumerate(range(0, len(jobs), chunk)):
        if R.cb.should_stop():
            raise TrainingCancelled("cancelled while caching activations")
        x = np.stack([normalize(view(i, v), pre) for i, v in jobs[s:s + chunk]])
        outs_tr.append(forward(x))
        done = s + len(x)
        rate = (time.perf_counter() - t0) / done
        R.cb.on_step(Progress("cache", 0, c + 1, math.ceil(total / chunk), eta_s=rate * (total - done),
                              images_per_s=1 / max(rate, 1e-9), done_fraction=0.0))
    outs_va = [forward(np.stack([normalize(im, pre) for im in imgs_va[s:s + chunk]]))
               for s in range(0, len(imgs_va), chunk)]
    return {e: (torch.cat([o[j] for o in outs_tr]), torch.cat([o[j] for o in outs_va]))
            for j, e in enumerate(entries)}


def _derive(model: EfficientNet, cached: torch.Tensor, cached_entry: str, entry: str,
            device: torch.device) -> torch.Tensor:
    """Activations at ``entry`` from activations cached at an earlier ``cached_entry`` (frozen layers)."""
    a, b = entry_index(cached_entry), entry_index(entry)
    if a == b:
        return cached
    if b < a:
        raise ValueError(f"Cannot derive {entry} from a cache at the later point {cached_entry}.")
    was = model.training
    model.eval()
    out = []
    with torch.inference_mode():
        for s in range(0, len(cached), 256):
            x = cached[s:s + 256].to(device)
            for i in range(a, min(b, 7)):
                x = model.blocks[i](x)
            if b >= 8:
                x = model.pool(model.bn2(model.conv_head(x)))
            out.append(x.float().cpu())
    model.train(was)
    return torch.cat(out)


def _epoch_batches(order: np.ndarray, p: PhaseSpec, labels: np.ndarray, x_views: torch.Tensor | None,
                   imgs: np.ndarray, pre: Preprocessing, augmenter: Augmenter, cfg: TrainConfig,
                   phase_index: int, phase_epoch: int, n: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches for one epoch, a pure function of (seed, phase, epoch): resume replays it exactly."""
    if x_views is not None:
        K = len(x_views) // n
        # Which cached view each image shows this epoch.
        rng = np.random.default_rng([cfg.seed, phase_index, phase_epoch, 1])
        view = rng.integers(0, K, size=n)
    for idx in batches(order, p.batch_size):
        y = torch.from_numpy(labels[idx])
        if x_views is not None:
            yield x_views[torch.from_numpy(view[idx] * n + idx)], y
        else:  # on-the-fly augmentation (full fine-tune): fresh view per (image, epoch)
            u8 = [augmenter(imgs[i], view_seed(cfg.seed, int(i), 10_000 + phase_index * 1000 + phase_epoch))
                  for i in idx]
            yield torch.from_numpy(np.stack([normalize(im, pre) for im in u8])), y


__all__ = [
    "TrainConfig", "RECIPES", "make_config", "Callback", "Progress", "TrainResult", "TrainedModel",
    "TrainingError", "TrainingCancelled", "DataError", "train", "train_one_epoch", "evaluate",
    "load_trained_model", "load_checkpoint", "retry_on_oom", "is_oom_error", "classification_metrics",
    "plan_phases", "forward_prefix", "Tail",
]
