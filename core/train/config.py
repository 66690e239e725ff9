"""Training configuration: ``TrainConfig`` (stored in every checkpoint), named recipes, ``make_config``."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Literal

from core.augment import PRESETS

# Why a CPU run with trainable BatchNorm is refused (TrainConfig.validate for --device cpu, and
# ``joined`` when "auto" settles on CPU processes): torch's SyncBatchNorm runs on GPUs only.
CPU_BATCHNORM_REFUSAL = (
    "Data-parallel training on CPU processes cannot keep trainable BatchNorm statistics in step: PyTorch "
    "synchronises them across processes on GPUs only, so each process would normalise with, and learn, "
    "the statistics of its own share of the batch. Use --processes 1, train on GPUs (--device cuda), or "
    "keep BatchNorm statistics fixed (the quick or default recipe, or train_bn=False).")


@dataclass
class TrainConfig:
    """Everything that decides a training run; stored in every checkpoint (``asdict``)."""

    recipe: str = "default"
    strategy: Literal["staged", "full", "head"] = "staged"
    augment: str = "field"  # core.augment preset: medical | field | none
    vertical_flip: bool = False  # medical preset only
    augment_strength: float = 1.0  # scales the preset's ranges (core.augment.build_augment)
    # Phase lengths (epochs). Early stopping may end a phase sooner.
    head_epochs: int = 10
    finetune_epochs: int = 6
    unfreeze_stages: int = 2  # top backbone stages trained in ``finetune`` (0..the model's stages); conv head always
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
    select_metric: Literal["macro_f1", "accuracy", "loss", "sensitivity_at_specificity"] = "macro_f1"
    # Two classes only: "sensitivity_at_specificity" selects on the sensitivity (recall of class
    # ``positive_index``) reachable at this specificity on validation.
    target_specificity: float = 0.95
    positive_index: int = 1
    patience: int = 4
    ema: bool = False
    ema_decay: float = 0.99
    seed: int = 0
    num_threads: int | None = None  # None: all cores torch sees (resume compares need the same value)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # Data-parallel processes: one per GPU, or CPU processes with the gloo backend (started by
    # torchrun; core.train.distributed). Each global batch is split across them.
    processes: int = 1
    amp: bool = True  # CUDA only: bf16 autocast if supported, else fp16 + GradScaler
    val_fraction: float = 0.15  # used only when no validation samples are given
    on_missing: Literal["fail", "skip"] = "fail"  # image files deleted from the store after ingest
    weights: str = "auto"  # core.weights.create_model(weights=...)

    def validate(self) -> None:
        if self.strategy not in ("staged", "full", "head"):
            raise ValueError(f"strategy must be staged, full or head, got {self.strategy!r}")
        if self.augment not in PRESETS:
            raise ValueError(f"augment preset must be one of {list(PRESETS)}, got {self.augment!r}")
        # The upper bound is the model's number of stages, checked when the phases are planned.
        if self.unfreeze_stages < 0:
            raise ValueError(f"unfreeze_stages must be 0 or more, got {self.unfreeze_stages}")
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be >= 2 (BatchNorm needs 2 samples), got {self.batch_size}")
        if self.cache_views < 1:
            raise ValueError(f"cache_views must be >= 1, got {self.cache_views}")
        if self.balance not in ("auto", "loss", "sampler", "none"):
            raise ValueError(f"balance must be auto, loss, sampler or none, got {self.balance!r}")
        if self.cache_backend not in ("auto", "onnx", "torch"):
            raise ValueError(f"cache_backend must be auto, onnx or torch, got {self.cache_backend!r}")
        if self.select_metric not in ("macro_f1", "accuracy", "loss", "sensitivity_at_specificity"):
            raise ValueError(f"select_metric must be macro_f1, accuracy, loss or sensitivity_at_specificity, "
                             f"got {self.select_metric!r}")
        if not 0.0 < self.target_specificity <= 1.0:
            raise ValueError(f"target_specificity must be in (0, 1], got {self.target_specificity}")
        if not isinstance(self.processes, int) or self.processes < 1:
            raise ValueError(f"processes must be a whole number of 1 or more (1: no data-parallel training), "
                             f"got {self.processes!r}")
        if self.processes > 1 and self.device == "cpu" and self.trains_batchnorm:
            raise ValueError(CPU_BATCHNORM_REFUSAL)
        if self.on_missing not in ("fail", "skip"):
            raise ValueError(f"on_missing must be fail or skip, got {self.on_missing!r}")

    @property
    def trains_batchnorm(self) -> bool:
        """BatchNorm statistics come from the training batches in some phase (the head phase has none)."""
        return self.train_bn and self.strategy != "head"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
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
