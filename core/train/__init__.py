"""Fine-tuning engine: staged transfer learning for any registered model family, fast on a small CPU.

``train()`` reads as its steps: check the samples, pick the imbalance policy, create the
model, restore a resumed run, decode the images, plan and fill the frozen-prefix feature
cache, run the phases, report the result. The modules:

* ``config``: ``TrainConfig``, named ``RECIPES``, ``make_config``;
* ``data``: sample checks, stratified hold-out, imbalance policy, each epoch's batches;
* ``phases``: what each phase trains and where its input enters (``plan_phases``, ``Tail``);
* ``feature_cache``: the frozen prefix run once per image and view (ONNX Runtime on CPU);
* ``loop``: ``train_one_epoch``, ``evaluate``, the optimiser, LR schedule and weight EMA;
* ``phase_runner``: per phase and epoch: train, validate, checkpoint, report;
* ``checkpoint``: atomic save, resume state, ``load_trained_model``;
* ``callbacks`` / ``runner``: errors, progress events, the run's record;
* ``distributed``: data-parallel runs over several processes (torchrun, gloo or nccl).

Why it is fast on 2 CPU cores (measured numbers in bench/results_train.md): frozen layers are
a pure function of the input, so their output is computed once per image and augmented view
and kept in memory; the head warm-up trains on cached pooled embeddings (seconds) and the
partial fine-tune on cached activations entering the first trainable stage. Images are
decoded and resized once (``core.data.load_images``).

``core`` never imports storage or UI code: progress leaves through a ``Callback``.
"""
from __future__ import annotations

import random
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from core.augment import Augmenter
from core.data import DataError, Sample, load_images
from core.metrics import validation_metrics
from core.preprocessing import Preprocessing
from core.registry import create_model
from core.staged import StagedModel
from core.status import TrainEnd
from core.train import distributed
from core.train.callbacks import Callback, Progress, TrainingCancelled, TrainingError
from core.train.checkpoint import (
    ResumeState,
    TrainedModel,
    load_checkpoint,
    load_trained_model,
    restore_run,
    set_rng_state,
)
from core.train.config import RECIPES, TrainConfig, make_config
from core.train.context import TrainContext
from core.train.data import SampleList, check_samples, class_weights, imbalance_policy, stratified_val
from core.train.feature_cache import FeatureStore, fill_cache, plan_cache, prefix_runner
from core.train.loop import evaluate, train_one_epoch
from core.train.phase_runner import planned_steps, run_phases
from core.train.phases import Tail, plan_phases
from core.train.robustness import is_oom_error, resolve_device, retry_on_oom
from core.train.runner import Runner, TrainResult


def train(
    train_samples: SampleList,
    classes: Sequence[str],
    variant: str,
    run_dir: str | Path,
    config: TrainConfig | None = None,
    *,
    resolution: int | None = None,
    val_samples: SampleList | None = None,
    callback: Callback | None = None,
    resume: bool = False,
    feature_store: FeatureStore | None = None,
) -> TrainResult:
    """Fine-tune ``variant`` (ImageNet weights) on ``train_samples``; checkpoints in ``run_dir``.

    ``val_samples``: model selection and early stopping; if None, a stratified
    ``config.val_fraction`` of the training samples is held out. ``resume``: continue from
    ``run_dir/last.pt`` if it exists (same config and seed give the same result).
    ``feature_store``: decoded images and frozen-prefix activations shared with other runs of
    this process (a search's trials); results are the same with or without it.
    ``config.processes`` > 1: this is one of the processes torchrun started for a data-parallel
    run (core.train.distributed); only rank 0 reports through ``callback`` and writes checkpoints.
    Raises DataError / TrainingError with user-facing messages, TrainingCancelled on cancel.
    """
    cfg = config or TrainConfig()
    cfg.validate()
    with distributed.joined(cfg.processes, cfg.device, cfg.trains_batchnorm) as rank_device:
        # Only rank 0 reports (and writes checkpoints: phase_runner).
        cb = (callback or Callback()) if distributed.is_main() else Callback()
        return _train(train_samples, classes, variant, Path(run_dir), cfg, resolution, val_samples, cb, resume,
                      feature_store, rank_device)


def _train(train_samples: SampleList, classes: Sequence[str], variant: str, run_dir: Path, cfg: TrainConfig,
           resolution: int | None, val_samples: SampleList | None, callback: Callback, resume: bool,
           feature_store: FeatureStore | None, rank_device: torch.device | None) -> TrainResult:
    run = _start_run(cfg, classes, callback, run_dir)
    device, threads = _set_up_device(run, rank_device)
    samples, vals = check_samples(train_samples, val_samples, run)
    balance = imbalance_policy(samples, vals, run)
    base_variant = variant.split("@")[0].lower()  # checkpoints name the variant without "@resolution"
    model, pre = _create_seeded_model(variant, base_variant, resolution, run)
    resume_state = restore_run(run, model, pre, base_variant) if resume else ResumeState()
    distributed.broadcast_state(model)  # every rank starts from rank 0's weights
    # After restore_run (a resumed run's summary is the checkpoint's): this attempt's process count.
    run.summary.update(world_size=distributed.world(), backend=distributed.backend())
    phases = plan_phases(cfg, model)
    if resume_state.start_phase >= len(phases):
        run.log("All phases already finished; nothing to train.")
    images_key = (repr(pre), tuple(s.path for s in samples), tuple(s.path for s in vals))
    ctx = _prepare_context(run, model, pre, base_variant, device, threads, samples, vals, balance,
                           feature_store, images_key)
    if distributed.active() and distributed.agree(run.cb.should_stop()):
        raise TrainingCancelled("cancelled while loading the images")
    plan = plan_cache(ctx, phases, resume_state.start_phase)
    caches = fill_cache(ctx, plan, feature_store, images_key)
    run.total_steps_plan = planned_steps(ctx, plan.remaining, resume_state.start_phase_epoch)
    if resume_state.checkpoint is not None:
        # Restore the RNG streams only now: decoding and caching above must not shift them
        # (resumed dropout masks must equal the uninterrupted run's).
        set_rng_state(resume_state.checkpoint["rng"])
    # Every rank on one RNG stream, and (GPU processes, trainable BatchNorm) on the global batch's
    # BatchNorm statistics: as one process.
    with (distributed.global_batch_dropout(model),
          distributed.synced_batchnorm(model, distributed.backend() == "nccl" and cfg.trains_batchnorm)):
        epochs_run = run_phases(ctx, plan, caches, resume_state)
    return _result(run, epochs_run)


# ---------------------------------------------------------------------------------------------
# The steps of train()
# ---------------------------------------------------------------------------------------------
def _start_run(cfg: TrainConfig, classes: Sequence[str], callback: Callback, run_dir: Path) -> Runner:
    run_dir.mkdir(parents=True, exist_ok=True)
    return Runner(cfg, list(classes), callback, run_dir)


def _set_up_device(run: Runner, rank_device: torch.device | None) -> tuple[torch.device, int]:
    """Intra-op threads = cores (resume compares need the same count); the device to train on
    (``rank_device``: this process's device in a data-parallel run)."""
    threads = run.cfg.num_threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    device = rank_device or resolve_device(run.cfg.device)
    run.summary.update(device=str(device), threads=threads)
    return device, threads


def _create_seeded_model(variant: str, base_variant: str, resolution: int | None,
                         run: Runner) -> tuple[StagedModel, Preprocessing]:
    """Seed every RNG, then create the model with ImageNet weights and a zero-initialised head."""
    cfg = run.cfg
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    loaded = create_model(variant, len(run.classes), weights=cfg.weights, resolution=resolution)
    model = loaded.model
    # Zero-init head: create_model's ImageNet-style init (uniform +-1/sqrt(num_classes)) gives
    # logits in the tens on 1280-d embeddings and a first epoch spent undoing it.
    assert isinstance(model.classifier, nn.Linear)
    nn.init.zeros_(model.classifier.weight)
    nn.init.zeros_(model.classifier.bias)
    run.summary.update(weights=loaded.weights, variant=base_variant, resolution=loaded.preprocessing.resolution)
    return model, loaded.preprocessing


def _place_model(model: StagedModel, device: torch.device, amp: bool) -> tuple[torch.dtype | None, bool]:
    """Move the model to ``device``; on CUDA channels-last memory and (``amp``) bf16/fp16 autocast."""
    model.to(device)
    channels_last = device.type == "cuda"
    if channels_last:
        model.to(memory_format=torch.channels_last)
    amp_dtype: torch.dtype | None = None
    if device.type == "cuda" and amp:
        amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return amp_dtype, channels_last


def _decode_images(run: Runner, pre: Preprocessing, samples: list[Sample], vals: list[Sample],
                   threads: int) -> tuple[np.ndarray, np.ndarray]:
    """Decode and resize every image once (large training JPEGs at a reduced DCT scale)."""
    cb = run.cb
    cb.on_phase_start("load", 1, len(samples) + len(vals))
    t_load = time.perf_counter()
    try:
        imgs_tr = load_images([s.path for s in samples], pre, num_threads=threads, should_stop=cb.should_stop,
                              on_progress=lambda i, n: cb.on_step(Progress("load", 0, i, n)), reduced_decode=True)
        imgs_va = load_images([s.path for s in vals], pre, num_threads=threads, should_stop=cb.should_stop)
    except InterruptedError as exc:
        raise TrainingCancelled(str(exc)) from exc
    run.summary["load_seconds"] = round(time.perf_counter() - t_load, 2)
    return imgs_tr, imgs_va


def _prepare_context(run: Runner, model: StagedModel, pre: Preprocessing, variant: str, device: torch.device,
                     threads: int, samples: list[Sample], vals: list[Sample], balance: str,
                     store: FeatureStore | None = None, images_key: tuple = ()) -> TrainContext:
    """Model on its device, images decoded (or shared), losses built: everything the phases share."""
    cfg = run.cfg
    amp_dtype, channels_last = _place_model(model, device, cfg.amp)
    if store is None:
        imgs_tr, imgs_va = _decode_images(run, pre, samples, vals, threads)
    else:
        imgs_tr, imgs_va = store.images(images_key, lambda: _decode_images(run, pre, samples, vals, threads))
    labels_tr = np.array([s.label for s in samples], dtype=np.int64)
    weight = None
    if balance == "loss":
        weight = torch.tensor(class_weights(labels_tr, len(run.classes)), dtype=torch.float32, device=device)
    return TrainContext(
        run=run, model=model, pre=pre, variant=variant, device=device, threads=threads, amp_dtype=amp_dtype,
        channels_last=channels_last, images_train=imgs_tr, images_val=imgs_va, labels_train=labels_tr,
        labels_val=torch.tensor([s.label for s in vals], dtype=torch.int64),
        augmenter=Augmenter(cfg.augment, pre.resolution, vertical_flip=cfg.vertical_flip,
                            strength=cfg.augment_strength), balance=balance,
        criterion=nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing),
        eval_criterion=nn.CrossEntropyLoss())  # plain loss: validation numbers comparable across runs


def _result(run: Runner, epochs_run: int) -> TrainResult:
    if run.best is None:
        raise TrainingError("No epoch was trained (all phase lengths are 0).")
    run.summary.update(best_epoch=run.best["epoch"], best_phase=run.best["phase"], epochs_run=epochs_run)
    return TrainResult(TrainEnd.SUCCEEDED, run.best, run.history, run.best_path, run.last_path,
                       round(run.seconds(), 2), run.summary)


__all__ = [
    "TrainConfig", "RECIPES", "make_config", "Callback", "Progress", "TrainResult", "TrainedModel",
    "TrainingError", "TrainingCancelled", "DataError", "train", "train_one_epoch", "evaluate",
    "load_trained_model", "load_checkpoint", "retry_on_oom", "is_oom_error", "validation_metrics",
    "plan_phases", "Tail", "stratified_val", "prefix_runner", "Runner", "FeatureStore",
]
