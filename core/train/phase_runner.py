"""Running the phases: per phase its inputs and optimiser, per epoch train, validate, checkpoint, report."""
from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from core.data import epoch_order
from core.train import distributed
from core.train.checkpoint import ResumeState, checkpoint_common, cpu_state, save_atomic
from core.train.context import TrainContext
from core.train.data import epoch_batches, steps_per_epoch
from core.train.feature_cache import Cache, CachePlan, phase_inputs
from core.train.loop import PhaseOptim, StepContext, evaluate, is_better, train_one_epoch
from core.train.phases import PhaseSpec, Tail, set_train_mode


def planned_steps(ctx: TrainContext, remaining: Sequence[PhaseSpec], start_phase_epoch: int) -> int:
    """Optimiser steps still to run (for the whole-run ETA)."""
    total = sum(p.epochs * steps_per_epoch(ctx.num_train, p.batch_size) for p in remaining)
    done = start_phase_epoch * steps_per_epoch(ctx.num_train, remaining[0].batch_size) if remaining else 0
    return total - done


def run_phases(ctx: TrainContext, plan: CachePlan, caches: Cache, resume: ResumeState) -> int:
    """Run the phases not finished yet; returns the number of epochs run in all (resumed ones included)."""
    global_epoch = resume.global_epoch
    for phase_index in range(plan.start_phase, len(plan.phases)):
        global_epoch = run_phase(ctx, plan, phase_index, caches, resume, global_epoch)
    return global_epoch


def run_phase(ctx: TrainContext, plan: CachePlan, phase_index: int, caches: Cache, resume: ResumeState,
              global_epoch: int) -> int:
    """Train one phase to its end or early stop; returns the global epoch reached."""
    cfg, run, model, phase = ctx.cfg, ctx.run, ctx.model, plan.phases[phase_index]
    model.set_trainable(phase.groups)
    tail = Tail(model, phase.entry)
    x_train, x_val = phase_inputs(ctx, phase, caches, plan.cache_entry)
    spe = steps_per_epoch(ctx.num_train, phase.batch_size)
    optim = PhaseOptim.create(model, phase, cfg, spe, ctx.amp_dtype)
    first_epoch, bad_epochs = 0, 0
    if resume.resumes_inside(phase_index):
        assert resume.checkpoint is not None
        optim.load_checkpoint(resume.checkpoint)
        first_epoch, bad_epochs = resume.start_phase_epoch, resume.bad_epochs
    run.cb.on_phase_start(phase.name, phase.epochs, spe)
    run.log(f"Phase {phase.name}: training {', '.join(phase.groups)} from {phase.entry} "
            f"for up to {phase.epochs} epoch(s).")
    step_ctx = StepContext(device=ctx.device, callback=run.cb, phase=phase.name, epoch=0,
                           micro_batch=phase.batch_size, scaler=optim.scaler, amp_dtype=ctx.amp_dtype,
                           ema=optim.ema, model=model, log=run.log, channels_last=ctx.channels_last)
    for phase_epoch in range(first_epoch, phase.epochs):
        global_epoch += 1
        step_ctx.epoch = global_epoch
        record, improved = run_epoch(ctx, phase, phase_index, phase_epoch, tail, optim, step_ctx, x_train, x_val)
        bad_epochs = 0 if improved else bad_epochs + 1
        stop_early = bad_epochs >= cfg.patience and phase_epoch + 1 < phase.epochs
        phase_state = {"phase_index": phase_index, "phase_epoch": phase_epoch + 1,
                       "phase_done": phase_epoch + 1 >= phase.epochs or stop_early, "bad_epochs": bad_epochs}
        save_epoch_checkpoints(ctx, optim, global_epoch, phase.name, improved, phase_state)
        run.cb.on_epoch_end(phase.name, global_epoch, {**record, "improved": improved,
                                                       "best_epoch": run.best["epoch"] if run.best else None})
        if stop_early:
            run.log(f"Early stop in {phase.name}: no {cfg.select_metric} gain for {cfg.patience} epochs.")
            run.summary.setdefault("early_stopped", []).append(phase.name)
            break
    return global_epoch


def run_epoch(ctx: TrainContext, phase: PhaseSpec, phase_index: int, phase_epoch: int, tail: Tail,
              optim: PhaseOptim, step_ctx: StepContext, x_train: torch.Tensor | None,
              x_val: torch.Tensor) -> tuple[dict[str, Any], bool]:
    """Train one epoch, validate, record it; returns (history record, improved on the best so far).

    With EMA on, the model leaves here holding the EMA weights (what was validated, and what
    best.pt must store); ``save_epoch_checkpoints`` swaps the trained weights back.
    """
    cfg, run = ctx.cfg, ctx.run
    set_train_mode(ctx.model, phase.groups, cfg.train_bn)
    order = epoch_order(ctx.num_train, ctx.labels_train, cfg.seed, phase_index, phase_epoch,
                        balanced=ctx.balance == "sampler")
    data = epoch_batches(order, phase.batch_size, ctx.labels_train, x_train, ctx.images_train, ctx.pre,
                         ctx.augmenter, cfg, phase_index, phase_epoch)
    t_epoch = time.perf_counter()
    step_ctx.progress = run.epoch_progress(phase.name, step_ctx.epoch, phase.batch_size)
    spe = steps_per_epoch(ctx.num_train, phase.batch_size)
    train_stats = train_one_epoch(tail, ctx.criterion, optim.optimizer, optim.scheduler, data, spe, step_ctx)
    if step_ctx.micro_batch < phase.batch_size:
        run.summary["micro_batch"] = step_ctx.micro_batch
    if optim.ema is not None:
        optim.ema.swap(ctx.model)
    # Rank 0 validates (it holds the weights checkpoints store); every process takes its numbers,
    # so best epoch and early stopping are decided alike everywhere.
    val = distributed.share(evaluate(tail, ctx.eval_criterion, x_val, ctx.labels_val, ctx.num_classes, ctx.device,
                                     target_specificity=cfg.target_specificity, positive_index=cfg.positive_index)
                            if distributed.is_main() else None)
    improved = is_better(val, run.best["metrics"] if run.best else None, cfg.select_metric)
    record = {"epoch": step_ctx.epoch, "phase": phase.name, "phase_epoch": phase_epoch + 1,
              "train_loss": train_stats["loss"], "train_accuracy": train_stats["accuracy"],
              "val_loss": val["loss"], "val_accuracy": val["accuracy"], "val_macro_f1": val["macro_f1"],
              "val_balanced_accuracy": val["balanced_accuracy"], "lr": optim.lr,
              "epoch_seconds": round(time.perf_counter() - t_epoch, 3),
              "images_per_s": round(train_stats["images_per_s"], 1)}
    if "sensitivity_at_specificity" in val:
        record["val_sensitivity_at_specificity"] = val["sensitivity_at_specificity"]
    run.history.append(record)
    if improved:
        run.best = {"epoch": step_ctx.epoch, "phase": phase.name, "metrics": val}
    return record, improved


def save_epoch_checkpoints(ctx: TrainContext, optim: PhaseOptim, epoch: int, phase: str, improved: bool,
                           phase_state: dict[str, Any]) -> None:
    """best.pt when validation improved (the weights just validated: EMA weights when EMA is on),
    then last.pt with everything a resume needs (the trained weights, EMA shadow, RNG...).
    Only rank 0 writes them in a data-parallel run (its RNG state: other ranks' streams differ)."""
    model = ctx.model
    if not distributed.is_main():
        if optim.ema is not None:
            optim.ema.swap(model)
        return
    common = checkpoint_common(model, ctx.run, ctx.variant, ctx.pre, epoch, phase)
    optimizer_state = {"optimizer": optim.optimizer.state_dict(), "scheduler": optim.scheduler.state_dict()}
    if improved:
        save_atomic({**common, "model": cpu_state(model), **optimizer_state}, ctx.run.best_path)
    if optim.ema is not None:
        optim.ema.swap(model)
    save_atomic({**common, "model": cpu_state(model), **optimizer_state, **phase_state,
                 "ema": optim.ema.state_dict() if optim.ema is not None else None,
                 "scaler": optim.scaler.state_dict() if optim.scaler is not None else None}, ctx.run.last_path)
