"""The frozen-prefix feature cache: activations of the frozen layers, computed once per image and view.

Frozen layers are a pure function of the input (eval-mode BatchNorm, no dropout), so their
output is computed ONCE per image and augmented view (``cache_views``) and kept in memory.
The frozen prefix runs through ONNX Runtime (exported in memory, BatchNorm folded: 3-4x
faster than eager PyTorch on 2 cores), and one pass yields every entry point the remaining
phases start from (e.g. the input of the top stage and the pooled embedding).
"""
from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from core.augment import view_seed
from core.preprocessing import normalize
from core.staged import StagedModel
from core.train import distributed
from core.train.callbacks import Progress, TrainingCancelled, TrainingError
from core.train.config import TrainConfig
from core.train.context import TrainContext
from core.train.phases import PhaseSpec
from core.train.robustness import retry_on_oom
from core.train.runner import EtaSmoother, Runner

PrefixFn = Callable[[np.ndarray], list[torch.Tensor]]
Cache = dict[str, tuple[torch.Tensor, torch.Tensor]]  # entry -> (train views, val)


def activation_mb(model: StagedModel, entry: str, resolution: int) -> float:
    """fp32 MB per cached view of one image at ``entry``."""
    with torch.inference_mode():
        was = model.training
        model.eval()
        x = torch.zeros(1, 3, resolution, resolution, device=next(model.parameters()).device)
        shape = model.forward_between(x, "image", entry).shape
        model.train(was)
    return float(np.prod(shape)) * 4 / 2**20


class FrozenPrefix(nn.Module):
    """Frozen part of ``model``: image -> activations at each of ``entries`` (an exportable module)."""

    def __init__(self, model: StagedModel, entries: Sequence[str]):
        super().__init__()
        self.model, self.entries = model, list(entries)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.model.forward_intermediates(x, self.entries))


def _onnx_prefix(prefix: FrozenPrefix, resolution: int, threads: int) -> PrefixFn:
    """The prefix exported to ONNX in memory and run by ONNX Runtime (BatchNorm folded)."""
    import io
    import warnings

    import onnxruntime as ort

    outputs = [f"y{i}" for i in range(len(prefix.entries))]
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(prefix, (torch.zeros(1, 3, resolution, resolution),),
                          buf, input_names=["x"],  # type: ignore[arg-type]  # file objects work too
                          output_names=outputs, dynamic_axes={"x": {0: "n"}, **{y: {0: "n"} for y in outputs}},
                          opset_version=17, do_constant_folding=True, dynamo=False)
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(buf.getvalue(), so, providers=["CPUExecutionProvider"])

    def run_ort(x: np.ndarray) -> list[torch.Tensor]:
        return [torch.from_numpy(y) for y in sess.run(None, {"x": x})]
    return run_ort


def _torch_prefix(prefix: FrozenPrefix, device: torch.device, log: Callable[[str], None]) -> PrefixFn:
    def run_torch(x_np: np.ndarray) -> list[torch.Tensor]:
        x = torch.from_numpy(x_np)

        def run(micro: int) -> list[torch.Tensor]:
            with torch.inference_mode():
                parts = [prefix(x[s:s + micro].to(device)) for s in range(0, len(x), micro)]
            return [torch.cat([p[j].float().cpu() for p in parts]) for j in range(len(prefix.entries))]
        out, _ = retry_on_oom(run, len(x), log)
        return out
    return run_torch


def prefix_runner(model: StagedModel, entries: Sequence[str], resolution: int, cfg: TrainConfig,
                  device: torch.device, threads: int, run: Runner) -> tuple[PrefixFn, str]:
    """A function (N, 3, R, R) float32 array -> activations at ``entries``, and its backend name.

    ONNX Runtime on CPU: several times faster than eager PyTorch there. Falls back to PyTorch.
    """
    prefix = FrozenPrefix(model, entries).eval()
    if cfg.cache_backend != "torch" and device.type == "cpu":
        try:
            return _onnx_prefix(prefix, resolution, threads), "onnxruntime"
        except Exception as exc:  # noqa: BLE001 - no ORT / export failed: PyTorch does the same job
            if cfg.cache_backend == "onnx":
                raise TrainingError(f"cache_backend='onnx' failed: {exc}") from exc
            run.log(f"ONNX Runtime unavailable for the frozen prefix ({str(exc)[:200]}); using PyTorch.", "warning")
    return _torch_prefix(prefix, device, run.log), "torch"


# ---------------------------------------------------------------------------------------------
# Planning and filling the cache
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CachePlan:
    phases: list[PhaseSpec]  # all phases; a phase whose cache would not fit trains on images
    start_phase: int
    cache_entry: str  # the lowest cached entry; later entries derive from it cheaply
    entries: list[str]  # what one frozen pass computes (input to output); empty: no cache

    @property
    def remaining(self) -> list[PhaseSpec]:
        return self.phases[self.start_phase:]


def _lowest_cached_entry(model: StagedModel, remaining: Sequence[PhaseSpec]) -> str:
    cached = [p.entry for p in remaining if p.entry != "image"]
    if any(p.entry == "image" for p in remaining) or not cached:
        return "embedding"  # only the head phase can use a cache then
    return min(cached, key=model.entry_position)


def plan_cache(ctx: TrainContext, phases: list[PhaseSpec], start_phase: int) -> CachePlan:
    """Which entry points to cache for the phases still to run, within ``cache_max_mb``."""
    cfg, run = ctx.cfg, ctx.run
    entry = _lowest_cached_entry(ctx.model, phases[start_phase:])
    est_mb = activation_mb(ctx.model, entry, ctx.pre.resolution) * ctx.num_train * cfg.cache_views
    if est_mb > cfg.cache_max_mb and entry != "embedding":
        run.log(f"Cached activations at {entry} would need {est_mb:.0f} MB (> cache_max_mb "
                f"{cfg.cache_max_mb}); the finetune phase will run on images instead.", "warning")
        phases = [replace(p, entry="image") if p.entry == entry else p for p in phases]
        entry = "embedding"
    run.summary["cache_entry"] = entry
    wanted = [p.entry for p in phases[start_phase:] if p.entry != "image"]
    # One frozen pass gives the cached entry and, when a remaining phase trains on pooled
    # embeddings, those too (the frozen top is still at its ImageNet weights then).
    entries = sorted({entry, *wanted}, key=ctx.model.entry_position) if wanted else []
    return CachePlan(phases, start_phase, entry, entries)


def _train_view(ctx: TrainContext, i: int, v: int) -> np.ndarray:
    """View ``v`` of training image ``i``: view 0 is the clean eval-time image when ``clean_view``."""
    if v == 0 and ctx.cfg.clean_view:
        return ctx.images_train[i]
    return ctx.augmenter(ctx.images_train[i], view_seed(ctx.cfg.seed, i, v))


def build_cache(ctx: TrainContext, entries: Sequence[str], chunk: int = 32) -> Cache:
    """Frozen-prefix activations per entry: train (K*N, ...) with view v of image i at v*N+i; val (N_val, ...).

    Views are seeded by (seed, image, view), so the cache is identical after a resume. In a
    data-parallel run each process computes its share of the rows and the shares are gathered:
    every process ends with the whole cache, as one process would have it.
    """
    cfg, run = ctx.cfg, ctx.run
    ctx.model.eval()
    jobs = [(i, v) for v in range(cfg.cache_views) for i in range(ctx.num_train)]
    mine = jobs[distributed.part(len(jobs))]
    imgs_va = ctx.images_val[distributed.part(len(ctx.images_val))]
    # Every process runs as many chunks as rank 0 (the largest share): each checks a cancel all agree on.
    share = distributed.part(len(jobs), 0)
    chunks = max(1, math.ceil((share.stop - share.start) / chunk))
    total = len(mine) + len(imgs_va)
    run.cb.on_phase_start("cache", 1, chunks)
    forward, backend = prefix_runner(ctx.model, entries, ctx.pre.resolution, cfg, ctx.device, ctx.threads, run)
    run.summary["cache_backend"] = backend
    outs_tr: list[list[torch.Tensor]] = []
    t0 = time.perf_counter()
    eta = EtaSmoother()  # smoothed: one slow chunk must not make the ETA jump
    eta.update(t0, 0, total)
    for c in range(chunks):
        if distributed.agree(run.cb.should_stop()):
            raise TrainingCancelled("cancelled while caching activations")
        part = mine[c * chunk:(c + 1) * chunk]
        if not part:
            continue
        x = np.stack([normalize(_train_view(ctx, i, v), ctx.pre) for i, v in part])
        outs_tr.append(forward(x))
        done = c * chunk + len(x)
        now = time.perf_counter()
        seconds_per_image = (now - t0) / done
        eta_s = eta.update(now, done, total)
        run.cb.on_step(Progress("cache", 0, c + 1, chunks, eta_s=eta_s if eta_s is not None else
                                seconds_per_image * (total - done),
                                images_per_s=1 / max(seconds_per_image, 1e-9), done_fraction=0.0))
    outs_va = [forward(np.stack([normalize(im, ctx.pre) for im in imgs_va[s:s + chunk]]))
               for s in range(0, len(imgs_va), chunk)]
    empty = [y[:0] for y in forward(normalize(ctx.images_val[0], ctx.pre)[None])] if not (outs_tr and outs_va) else []
    return {e: (distributed.gather_rows(_rows(outs_tr, j, empty), len(jobs)),
                distributed.gather_rows(_rows(outs_va, j, empty), len(ctx.images_val)))
            for j, e in enumerate(entries)}


def _rows(outs: list[list[torch.Tensor]], j: int, empty: list[torch.Tensor]) -> torch.Tensor:
    """Entry ``j`` of every chunk's outputs, concatenated (an empty share: no rows, the right shape)."""
    return torch.cat([o[j] for o in outs]) if outs else empty[j]


def activation_key(ctx: TrainContext, images_key: tuple[Any, ...]) -> tuple[Any, ...]:
    """What decides the frozen-prefix outputs besides the entry point and the number of views."""
    cfg = ctx.cfg
    return (images_key, ctx.variant, cfg.weights, cfg.augment, cfg.augment_strength, cfg.vertical_flip,
            cfg.clean_view, cfg.seed)


def fill_cache(ctx: TrainContext, plan: CachePlan, store: FeatureStore | None = None,
               images_key: tuple[Any, ...] = ()) -> Cache:
    """Build the planned cache (if any), or take it from ``store``; its cost in the run summary."""
    if not plan.entries:
        return {}
    run = ctx.run
    t_cache = time.perf_counter()
    key = activation_key(ctx, images_key)
    if store is not None:
        def derive(x: torch.Tensor, source: str, entry: str) -> torch.Tensor:
            return derive_activations(ctx.model, x, source, entry, ctx.device)
        shared = store.lookup(key, plan.entries, ctx.cfg.cache_views, ctx.num_train, derive,
                              ctx.model.entry_position)
        if shared is not None:
            run.summary.update(cache_seconds=round(time.perf_counter() - t_cache, 2), cache_reused=True,
                               cache_backend="shared")
            run.log(f"Reused cached {', '.join(plan.entries)} activations from an earlier run of this search "
                    f"({run.summary['cache_seconds']} s).")
            return shared
    caches = build_cache(ctx, plan.entries)
    if store is not None:
        store.put(key, ctx.cfg.cache_views, caches, time.perf_counter() - t_cache)
    run.summary["cache_seconds"] = round(time.perf_counter() - t_cache, 2)
    run.summary["cache_mb"] = round(sum(a.numel() + b.numel() for a, b in caches.values()) * 4 / 2**20, 1)
    run.log(f"Cached {', '.join(plan.entries)} activations for {ctx.num_train} images x {ctx.cfg.cache_views} "
            f"view(s) in {run.summary['cache_seconds']} s ({run.summary['cache_mb']} MB, "
            f"{run.summary['cache_backend']}).")
    return caches


def derive_activations(model: StagedModel, cached: torch.Tensor, cached_entry: str, entry: str,
                       device: torch.device, batch_size: int = 256) -> torch.Tensor:
    """Activations at ``entry`` from activations cached at an earlier ``cached_entry`` (frozen layers)."""
    if cached_entry == entry:
        return cached
    was = model.training
    model.eval()
    with torch.inference_mode():
        out = [model.forward_between(cached[s:s + batch_size].to(device), cached_entry, entry).float().cpu()
               for s in range(0, len(cached), batch_size)]
    model.train(was)
    return torch.cat(out)


def phase_inputs(ctx: TrainContext, phase: PhaseSpec, caches: Cache,
                 cache_entry: str) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(train views or None to train on images, validation inputs) where ``phase`` enters the network."""
    if phase.entry == "image":
        return None, torch.from_numpy(np.stack([normalize(im, ctx.pre) for im in ctx.images_val]))
    if phase.entry in caches:
        return caches[phase.entry]
    train_views, val = caches[cache_entry]
    return (derive_activations(ctx.model, train_views, cache_entry, phase.entry, ctx.device),
            derive_activations(ctx.model, val, cache_entry, phase.entry, ctx.device))



# ---------------------------------------------------------------------------------------------
# Sharing decoded images and cached activations between runs (a search's trials)
# ---------------------------------------------------------------------------------------------
def _tensor_mb(*tensors: torch.Tensor | np.ndarray) -> float:
    return sum(t.nbytes if isinstance(t, np.ndarray) else t.numel() * t.element_size() for t in tensors) / 2**20


@dataclass
class StoreStats:
    image_hits: int = 0
    image_misses: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    seconds_decoding: float = 0.0  # time spent filling the store, by kind
    seconds_caching: float = 0.0

    def to_dict(self) -> dict[str, float]:
        return {k: round(v, 2) if isinstance(v, float) else v for k, v in self.__dict__.items()}


class FeatureStore:
    """Decoded images and frozen-prefix activations kept in memory across runs of one process.

    Runs that share the variant, its weights, the resolution and preprocessing, the images, the
    augmentation and the seed compute identical frozen-prefix outputs (views are seeded by
    (seed, image, view)), so a search's trials that differ only in what they train reuse them.
    A stored cache of K views serves any k <= K (view v of image i is row v*N+i), and a cache
    at an earlier entry point serves a later one (derived through the still-frozen layers).
    Least recently used entries go first when ``max_mb`` is exceeded.
    """

    def __init__(self, max_mb: float = 4096.0):
        self.max_mb = float(max_mb)
        self.stats = StoreStats()
        self._images: OrderedDict[tuple[Any, ...], tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._caches: OrderedDict[tuple[Any, ...], tuple[int, Cache]] = OrderedDict()

    @property
    def size_mb(self) -> float:
        return (sum(_tensor_mb(a, b) for a, b in self._images.values())
                + sum(_tensor_mb(a, b) for _, c in self._caches.values() for a, b in c.values()))

    def _evict(self) -> None:
        while self.size_mb > self.max_mb and (self._images or self._caches):
            # Activations are the larger and cheaper-to-rebuild half: evict them first.
            (self._caches if self._caches else self._images).popitem(last=False)

    def images(self, key: tuple[Any, ...], decode: Callable[[], tuple[np.ndarray, np.ndarray]]
               ) -> tuple[np.ndarray, np.ndarray]:
        if key in self._images:
            self.stats.image_hits += 1
            self._images.move_to_end(key)
            return self._images[key]
        self.stats.image_misses += 1
        t0 = time.perf_counter()
        value = decode()
        self.stats.seconds_decoding += time.perf_counter() - t0
        self._images[key] = value
        self._evict()
        return value

    def lookup(self, key: tuple[Any, ...], entries: Sequence[str], views: int, num_train: int,
               derive: Callable[[torch.Tensor, str, str], torch.Tensor],
               position: Callable[[str], int]) -> Cache | None:
        """The activations at ``entries`` for ``views`` views, from a stored cache, or None
        (``position``: an entry point's place along the network, the model's ``entry_position``)."""
        stored = self._caches.get(key)
        if stored is None or stored[0] < views:
            return None
        have = stored[1]
        out: Cache = {}
        for e in entries:
            earlier = [s for s in have if position(s) <= position(e)]
            if not earlier:
                return None
            source = max(earlier, key=position)
            tr, va = have[source]
            tr = tr[: views * num_train]
            out[e] = (derive(tr, source, e), derive(va, source, e))
        self._caches.move_to_end(key)
        self.stats.cache_hits += 1
        return out

    def put(self, key: tuple[Any, ...], views: int, cache: Cache, seconds: float) -> None:
        self.stats.cache_misses += 1
        self.stats.seconds_caching += seconds
        old = self._caches.get(key)
        if old is not None and old[0] == views:  # keep every entry point either cache has
            cache = {**old[1], **cache}
        self._caches[key] = (views, cache)
        self._caches.move_to_end(key)
        self._evict()
