"""Data-parallel training through ``torch.distributed``: one process per GPU, or CPU processes (gloo).

A run with ``processes > 1`` is started by ``torchrun`` (the worker does it), which sets RANK,
WORLD_SIZE and LOCAL_RANK. ``joined`` opens the process group for the length of a run; every
helper here is a no-op outside one, so a one-process ``train()`` is unchanged.

Gradients are averaged with one explicit ``all_reduce`` per optimiser step rather than
DistributedDataParallel: the trainable tail shares its parameters with the whole model and
changes every phase, each step accumulates micro-batches (and may halve them after an
out-of-memory), and the tails trained here are small, so DDP's overlap of communication with
the backward pass buys little while its wrapper would complicate all of that.
"""
from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from core.train.callbacks import TrainingError
from core.train.config import CPU_BATCHNORM_REFUSAL
from core.train.robustness import DeviceError, check_device_name, resolve_device


@dataclass(frozen=True)
class Launch:
    """What torchrun told this process: its rank among ``world`` processes and its local GPU number."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0


def launch_from_env(env: dict[str, str] | None = None) -> Launch:
    """RANK / WORLD_SIZE / LOCAL_RANK as torchrun sets them (none set: one process)."""
    env = dict(os.environ) if env is None else env
    return Launch(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))


def plan_device(device: str, processes: int, gpu_count: int) -> str:
    """The device kind for a run of ``processes`` processes on a machine with ``gpu_count`` GPUs:
    "cpu" (gloo) or "cuda" (nccl, process k on GPU k). ``auto``: GPUs when there is one for every
    process, else CPU processes; ``cuda`` with too few GPUs is a clear DeviceError."""
    name = check_device_name(device)
    if processes <= 1:
        raise ValueError("plan_device is for runs of 2 processes or more")
    if name.startswith("cuda:"):
        raise DeviceError(f"Device {device!r} names one GPU, but {processes} processes each take their own GPU "
                          "(process 0 uses GPU 0, process 1 GPU 1, ...). Use --device cuda or auto.")
    if name == "cpu" or (name == "auto" and gpu_count < processes):
        return "cpu"
    if gpu_count < processes:
        raise DeviceError(f"{processes} processes on GPUs need {processes} GPUs, but this machine has {gpu_count}. "
                          f"Use --processes {max(1, gpu_count)}, or --device cpu to train with CPU processes.")
    return "cuda"


def _check_launch(launch: Launch, processes: int) -> None:
    if processes > 1 and launch.world == 1:
        raise TrainingError(f"This run asks for {processes} processes but was started as one process. "
                            f"Queue it with `workbench train --processes {processes}` (the worker starts the "
                            f"processes), or start it with torchrun --nproc_per_node {processes}.")
    if launch.world != processes:
        raise TrainingError(f"This run asks for {processes} process(es) but {launch.world} were started; "
                            "start as many processes as the run's setting says.")


@contextmanager
def joined(processes: int, device: str, trains_batchnorm: bool = False) -> Iterator[torch.device | None]:
    """The process group for one run (yields this process's device), or nothing for one process.

    Yields None for a one-process run: the caller resolves its device as usual.
    ``trains_batchnorm``: BatchNorm layers train (statistics from the batch), which CPU
    processes cannot synchronise: refused there with CPU_BATCHNORM_REFUSAL."""
    launch = launch_from_env()
    if processes <= 1 and launch.world == 1:
        yield None
        return
    _check_launch(launch, processes)
    kind = plan_device(device, processes, torch.cuda.device_count() if torch.cuda.is_available() else 0)
    if kind == "cpu" and trains_batchnorm:
        raise TrainingError(CPU_BATCHNORM_REFUSAL)
    dev = torch.device("cpu") if kind == "cpu" else resolve_device(f"cuda:{launch.local_rank}")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    # torchrun's --standalone rendezvous sets MASTER_ADDR / MASTER_PORT for the env:// method.
    dist.init_process_group("gloo" if kind == "cpu" else "nccl", rank=launch.rank, world_size=launch.world,
                            device_id=dev if dev.type == "cuda" else None)
    try:
        yield dev
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# Who am I, and the collectives the training loop needs (no-ops for one process)
# ---------------------------------------------------------------------------------------------
def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def world() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    return rank() == 0


def backend() -> str:
    return str(dist.get_backend()) if active() else "none"


def _comm_device() -> torch.device:
    """Where collectives' tensors must live: the process's GPU under nccl, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if backend() == "nccl" else torch.device("cpu")


def barrier() -> None:
    if active():
        dist.barrier()


def agree(flag: bool) -> bool:
    """Rank 0's ``flag`` on every rank (e.g. a cancel only rank 0's callback sees)."""
    if not active():
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=_comm_device())
    dist.broadcast(t, src=0)
    return bool(t.item())


def share(obj: Any) -> Any:
    """Rank 0's ``obj`` (picklable, small) on every rank."""
    if not active():
        return obj
    box = [obj if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sum_floats(values: Sequence[float]) -> list[float]:
    """Element-wise sum over ranks (float64), e.g. an epoch's loss sums and sample counts."""
    if not active():
        return list(values)
    t = torch.tensor(list(values), dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return t.cpu().tolist()


def part(n: int, of_rank: int | None = None) -> slice:
    """This rank's contiguous share of ``n`` items (the first ``n % world`` ranks take one more)."""
    r, w = rank() if of_rank is None else of_rank, world()
    base, extra = divmod(n, w)
    start = r * base + min(r, extra)
    return slice(start, start + base + (1 if r < extra else 0))


@dataclass
class _BatchWindow:
    """Where this rank's share sits in the current global batch (set once per optimiser step)."""

    total: int = 0
    start: int = 0


_window = _BatchWindow()


def begin_step(local_count: int) -> None:
    """Record the global batch size and this rank's offset in it (one tiny all_reduce)."""
    if active():
        _window.total = int(sum_floats([local_count])[0])
        _window.start = part(_window.total).start


@contextmanager
def global_batch_dropout(model: nn.Module) -> Iterator[None]:
    """Dropout before the classifier drawn for the whole global batch on every rank.

    All ranks keep the same torch RNG stream as one process would (same seed, same draws); each
    draws the mask for the global batch and applies its own rows, so masks, and with them each
    step, equal the single-process run's (with the usual one forward per step; after an
    out-of-memory halving the masks are still valid dropout, no longer the same)."""
    rate = float(getattr(model, "drop_rate", 0.0))
    if not active() or rate <= 0:
        yield
        return

    def apply(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...] | None:
        x = args[0]
        if not model.training or len(x) == 0:
            return None
        ones = torch.ones(max(_window.total, len(x)), *x.shape[1:], dtype=x.dtype, device=x.device)
        mask = nn.functional.dropout(ones, rate, True)
        return (x * mask[_window.start:_window.start + len(x)],)

    classifier = model.get_submodule("classifier")
    model.drop_rate = 0.0  # type: ignore[assignment]  # the hook drops instead
    handle = classifier.register_forward_pre_hook(apply)
    try:
        yield
    finally:
        handle.remove()
        model.drop_rate = rate  # type: ignore[assignment]


def average_gradients(params: Sequence[nn.Parameter], local_count: float) -> None:
    """Gradients of the mean loss over the whole global batch, on every rank.

    Each rank's gradients are of its own shard's mean loss; weighting them by the shard's size
    (with class weights: its summed sample weights) and dividing by the total (sent in the same
    buffer: one all_reduce) gives the single-process gradient for uneven shards too. A rank with
    an empty shard sends zeros."""
    if not active():
        return
    dev = _comm_device()
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.detach().reshape(-1).to(dev, torch.float32) * local_count for g in grads]
                     + [torch.tensor([float(local_count)], device=dev)])
    dist.all_reduce(flat)
    flat = flat[:-1] / flat[-1].clamp(min=1.0)
    offset = 0
    for p, g in zip(params, grads, strict=True):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(g).to(g.device, g.dtype)
        offset += n


def gather_rows(local: torch.Tensor, total: int) -> torch.Tensor:
    """The rows of every rank's ``part(total)`` share, concatenated in rank order (== one process's tensor)."""
    if not active():
        return local
    sizes = [part(total, r).stop - part(total, r).start for r in range(world())]
    dev = _comm_device()
    padded = torch.zeros((max(sizes), *local.shape[1:]), dtype=local.dtype, device=dev)
    padded[:len(local)] = local.to(dev)
    slots = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(slots, padded)
    return torch.cat([s[:n].cpu() for s, n in zip(slots, sizes, strict=True)])


def broadcast_state(module: nn.Module) -> None:
    """Rank 0's parameters and buffers on every rank (all ranks start from the same weights)."""
    if not active():
        return
    dev = _comm_device()
    with torch.no_grad():
        for t in module.state_dict().values():
            buf = t.to(dev)
            dist.broadcast(buf, src=0)
            t.copy_(buf.to(t.device))


class _SyncBatchNormAct(nn.SyncBatchNorm):
    """SyncBatchNorm followed by the activation of the BatchNorm-plus-activation layer it stands for."""

    act: nn.Module

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.act(super().forward(input))


def _synced(bn: nn.BatchNorm2d) -> nn.SyncBatchNorm:
    """A SyncBatchNorm sharing ``bn``'s parameters and buffers (updates reach ``bn``); its activation kept."""
    act = getattr(bn, "act", None)
    sync: nn.SyncBatchNorm = (_SyncBatchNormAct if act is not None else nn.SyncBatchNorm)(
        bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
    if act is not None:
        sync.act = act
    # Attribute assignment of the same tensors: state-dict keys and storage stay the model's own.
    sync.weight, sync.bias = bn.weight, bn.bias
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        setattr(sync, name, getattr(bn, name))
    sync.train(bn.training)
    return sync


@contextmanager
def synced_batchnorm(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Every BatchNorm2d of ``model`` as a SyncBatchNorm for the block (``enabled``), then the originals back.

    In train mode a SyncBatchNorm normalises with, and tracks, the statistics of the whole global
    batch (all processes), as one process would. torch's ``convert_sync_batchnorm`` is not used:
    it would drop the activation of a BatchNorm-plus-activation layer and leave the model converted.
    The stand-ins share the originals' parameters and buffers, so the optimiser, weight EMA and
    every checkpoint (same state-dict keys) see the normal model; afterwards its layer types are
    the normal ones again, for export and ONNX."""
    if not enabled:
        yield
        return
    originals = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    for name, bn in originals:
        model.set_submodule(name, _synced(bn))
    try:
        yield
    finally:
        for name, bn in originals:
            bn.train(model.get_submodule(name).training)
            model.set_submodule(name, bn)
