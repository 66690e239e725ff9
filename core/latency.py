"""ONNX Runtime latency measurement: the one place latency is measured.

Used by the recommender (calibration, "this machine" profile), by every run's automatic
export, the export's precisions table and the benchmarks, so all latency figures in Workbench
mean the same thing. How a figure is taken, and why:

* **Idle cores.** Before timing, wait (bounded, ``idle_wait_s``) until the other processes on
  the machine use less than ``IDLE_OTHER_CORES`` of the cores (system CPU use minus this
  process's own). If they never do, refuse with ``MachineBusy`` and a plain message: a figure
  taken under load is never recorded silently. Load is sampled again after timing; if it rose,
  the sitting is re-measured.
* **Side by side.** ``measure_side_by_side`` times several models (precisions, batch sizes)
  in one sitting: warm-up, then rounds, round-robin across the models, so a change in the
  machine's state hits every model alike.
* **Spread checked.** p50 and p95 over all timed calls; the run-to-run spread is
  (max - min) / median of the per-round p50s. When p95/p50 or that spread is too wide, the
  sitting is repeated (``max_retries``); if it stays wide the figure carries a ``warning``.
* **Conditions recorded.** Threads, load before/after, provider, onnxruntime version,
  machine, time and a sitting id go with every figure (``Latency.conditions``).
"""
from __future__ import annotations

import math
import os
import platform
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

# Other processes may use at most this many cores (plus a tenth of the machine's cores) while
# timing: enough for the OS and a polling page, not for a second training run or a compile.
IDLE_OTHER_CORES = 0.5
MAX_P95_OVER_P50 = 1.5   # beyond this the calls are not steady: something interfered
MAX_ROUND_SPREAD = 0.10  # (max - min) / median of the per-round p50s
LOAD_SAMPLE_S = 0.5


class LatencyError(RuntimeError):
    """Latency could not be measured (user-facing message)."""


class MachineBusy(LatencyError):
    """The cores did not become idle within the wait: nothing was recorded."""

    def __init__(self, message: str, load: float):
        super().__init__(message)
        self.load = load


@dataclass(frozen=True)
class Latency:
    batch: int
    p50_ms: float
    p95_ms: float
    mean_ms: float
    images_per_s: float
    runs: int
    threads: int
    # Added for honest figures; defaults keep stored summaries readable.
    rounds: int = 1
    p95_over_p50: float = 0.0
    round_spread: float = 0.0  # (max - min) / median of the per-round p50s
    attempts: int = 1
    warning: str = ""  # plain words when the spread stayed wide after the retries
    conditions: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Latency:
        names = cls.__dataclass_fields__
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass(frozen=True)
class Spec:
    """One thing to time: a model file at a batch size."""

    key: str
    onnx_path: str | Path
    resolution: int
    batch: int = 1
    input_dtype: str = "float32"


def machine_id() -> str:
    """A short description of this machine, stored beside each measurement."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu} x{os.cpu_count()} ({platform.system()})"


def ort_providers(device: str = "cpu") -> list[Any]:
    """ONNX Runtime providers for ``device`` (auto, cpu, cuda, cuda:N).

    auto: CUDA first when the CUDA provider is installed and a GPU is present, else the CPU
    alone. cuda / cuda:N: that GPU, or a ``DeviceError`` saying what is missing (no GPU, no such
    GPU, or an onnxruntime without the CUDA provider): an explicit request never falls back to
    the CPU silently. ``providers[0]`` of the session is what a latency figure was measured on.
    """
    import onnxruntime as ort

    name = (device or "").strip().lower()
    has_cuda_ep = "CUDAExecutionProvider" in ort.get_available_providers()
    if name == "cpu" or (name == "auto" and not has_cuda_ep):  # the common cases, without importing torch
        return ["CPUExecutionProvider"]
    from core.train.robustness import DeviceError, check_device_name, resolve_device

    name = check_device_name(device)
    if name == "auto":
        gpu = resolve_device("auto").type == "cuda"
        return ["CUDAExecutionProvider", "CPUExecutionProvider"] if gpu else ["CPUExecutionProvider"]
    dev = resolve_device(name)  # a DeviceError when this machine has no such GPU
    if not has_cuda_ep:
        raise DeviceError(f"Device {device!r} was requested, but ONNX Runtime {ort.__version__} here has no CUDA "
                          "execution provider (install onnxruntime-gpu in place of onnxruntime), so it can only "
                          "run on the CPU. Use --device cpu, or install onnxruntime-gpu.")
    return [("CUDAExecutionProvider", {"device_id": dev.index or 0}), "CPUExecutionProvider"]


def ort_session(onnx_path: str | Path | bytes, threads: int | None = None, device: str = "cpu"):
    """An ONNX Runtime session on ``device`` (``ort_providers``); ``session_provider`` says
    which provider it got."""
    import onnxruntime as ort

    from core.onnx_files import model_session

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    return model_session(onnx_path, opts, ort_providers(device))


def session_provider(session: Any) -> str:
    """The execution provider a session runs on first (e.g. "CPUExecutionProvider")."""
    return str(session.get_providers()[0])


_PROVIDER_WORDS = {"CPUExecutionProvider": "CPU", "CUDAExecutionProvider": "GPU (CUDA)",
                   "TensorrtExecutionProvider": "GPU (TensorRT)", "ROCMExecutionProvider": "GPU (ROCm)",
                   "CoreMLExecutionProvider": "Apple Neural Engine / GPU (Core ML)",
                   "DmlExecutionProvider": "GPU (DirectML)", "OpenVINOExecutionProvider": "OpenVINO"}


def provider_words(provider: str) -> str:
    """An execution provider in plain words: "CPU", "GPU (CUDA)"; "" for none (not measured)."""
    if not provider:
        return ""
    return _PROVIDER_WORDS.get(provider, provider.removesuffix("ExecutionProvider"))


# ------------------------------------------------------------------------------------------
# Machine load
# ------------------------------------------------------------------------------------------
def other_load(sample_s: float = LOAD_SAMPLE_S) -> float:
    """Cores' worth of CPU used by every other process over ``sample_s`` (this one excluded;
    its children, if any, count)."""
    import psutil

    me = psutil.Process()
    me.cpu_percent(None)
    psutil.cpu_percent(None)
    time.sleep(sample_s)
    system = psutil.cpu_percent(None) / 100 * (os.cpu_count() or 1)
    own = me.cpu_percent(None) / 100
    return max(0.0, system - own)


def idle_limit(cores: int | None = None) -> float:
    return IDLE_OTHER_CORES + 0.1 * (cores or os.cpu_count() or 1)


def busy_message(load: float) -> str:
    cores = os.cpu_count() or 1
    return (f"the computer is busy (load {load:.1f} on {cores} core{'s' if cores != 1 else ''}); "
            "latency not measured — measure again later")


def wait_until_idle(max_wait_s: float = 60.0, *, limit: float | None = None,
                    say: Callable[[str], None] | None = None) -> float:
    """Return the other processes' load once it is under ``limit``; raise MachineBusy after ``max_wait_s``."""
    limit = idle_limit() if limit is None else limit
    deadline = time.monotonic() + max(0.0, max_wait_s)
    told = False
    while True:
        load = other_load()
        if load <= limit:
            return load
        if time.monotonic() >= deadline:
            raise MachineBusy(busy_message(load), load)
        if say is not None and not told:
            say(f"waiting for the computer to be idle before timing (load {load:.1f})")
            told = True
        time.sleep(1.0)


# ------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------
def _ort_version() -> str:
    import onnxruntime as ort

    return str(ort.__version__)


def _one_sitting(specs: Sequence[Spec], sessions: list[Any], inputs: list[dict[str, np.ndarray]], *,
                 rounds: int, runs: int, max_seconds: float) -> list[tuple[np.ndarray, list[float]]]:
    """All timed calls and per-round p50 of each spec, rounds round-robin across specs."""
    per_round = max(1, math.ceil(runs / rounds))
    round_budget = max_seconds / rounds
    times: list[list[float]] = [[] for _ in specs]
    round_p50: list[list[float]] = [[] for _ in specs]
    for _ in range(rounds):
        for i, (sess, feed) in enumerate(zip(sessions, inputs)):
            got: list[float] = []
            start = time.perf_counter()
            while len(got) < per_round and (time.perf_counter() - start) < round_budget or not got:
                t0 = time.perf_counter()
                sess.run(None, feed)
                got.append((time.perf_counter() - t0) * 1000)
            times[i] += got
            round_p50[i].append(float(np.median(got)))
    return [(np.asarray(t), r) for t, r in zip(times, round_p50)]


def measure_side_by_side(specs: Sequence[Spec], *, warmup: int = 3, rounds: int = 5, runs: int = 20,
                         max_seconds: float = 10.0, threads: int | None = None, idle_wait_s: float = 60.0,
                         max_retries: int = 2, say: Callable[[str], None] | None = None,
                         device: str = "cpu") -> dict[str, Latency]:
    """Time every spec in one sitting (interleaved rounds); figures keyed by ``Spec.key``.

    ``device`` (cpu, auto, cuda, cuda:N; ``ort_providers``): where ONNX Runtime runs; the
    provider the sessions got is recorded in every figure's ``conditions["provider"]``. On a GPU
    each timed call includes copying the input to it and the logits back, as a prediction does.

    ``runs`` timed calls per spec (at least one per round), ``max_seconds`` per spec at most.
    Raises MachineBusy when the cores are not idle before, or stay loaded after, the timing.
    """
    if not specs:
        return {}
    if len({s.key for s in specs}) != len(specs):
        raise ValueError("every spec measured side by side needs its own key")
    rounds = max(1, min(rounds, runs))
    sessions = [ort_session(s.onnx_path, threads, device) for s in specs]
    inputs = []
    for s, sess in zip(specs, sessions):
        x = np.random.default_rng(0).standard_normal((s.batch, 3, s.resolution, s.resolution))
        inputs.append({sess.get_inputs()[0].name: x.astype(s.input_dtype)})
    n_threads = threads or (os.cpu_count() or 1)
    static = {"threads": n_threads, "provider": session_provider(sessions[0]), "onnxruntime": _ort_version(),
              "machine": machine_id()}
    best: tuple[float, list[tuple[np.ndarray, list[float]]], dict[str, Any]] | None = None
    attempts = 0
    for attempts in range(1, max_retries + 2):
        load_before = wait_until_idle(idle_wait_s, say=say)
        for sess, feed in zip(sessions, inputs):
            for _ in range(warmup):
                sess.run(None, feed)
        started = datetime.now(UTC).isoformat(timespec="seconds")
        result = _one_sitting(specs, sessions, inputs, rounds=rounds, runs=runs, max_seconds=max_seconds)
        load_after = other_load()
        if load_after > idle_limit():
            if attempts > max_retries:
                raise MachineBusy(busy_message(load_after), load_after)
            if say is not None:
                say(f"the computer became busy while timing (load {load_after:.1f}); measuring again")
            continue
        worst = max(_badness(t, r) for t, r in result)
        cond = {**static, "load_before": round(load_before, 2), "load_after": round(load_after, 2),
                "measured_at": started, "sitting": uuid.uuid4().hex[:12]}
        if best is None or worst < best[0]:
            best = (worst, result, cond)
        if worst <= 1.0:
            break
        if say is not None and attempts <= max_retries:
            say("latency spread too wide; measuring again")
    assert best is not None  # the loop either measured once or raised
    _, result, cond = best
    out: dict[str, Latency] = {}
    for s, (t, r) in zip(specs, result):
        p50, p95 = float(np.percentile(t, 50)), float(np.percentile(t, 95))
        ratio = p95 / p50 if p50 > 0 else 0.0
        spread = _spread(r)
        warning = ""
        if ratio > MAX_P95_OVER_P50 or spread > MAX_ROUND_SPREAD:
            warning = (f"timings stayed uneven after {attempts} tries (slowest calls {ratio:.1f}x the typical one, "
                       f"rounds differ by {spread:.0%}): treat this figure as approximate")
        out[s.key] = Latency(s.batch, p50, p95, float(t.mean()), float(s.batch * 1000 / p50) if p50 > 0 else 0.0,
                             len(t), n_threads, rounds=len(r), p95_over_p50=ratio, round_spread=spread,
                             attempts=attempts, warning=warning, conditions=dict(cond))
    return out


def _spread(round_p50: list[float]) -> float:
    med = float(np.median(round_p50))
    return float((max(round_p50) - min(round_p50)) / med) if med > 0 and len(round_p50) > 1 else 0.0


def _badness(times: np.ndarray, round_p50: list[float]) -> float:
    """How far a spec is past the limits (<= 1: within both)."""
    p50 = float(np.percentile(times, 50))
    ratio = float(np.percentile(times, 95)) / p50 if p50 > 0 else math.inf
    return max((ratio - 1) / (MAX_P95_OVER_P50 - 1), _spread(round_p50) / MAX_ROUND_SPREAD)


def measure_latency(onnx_path: str | Path, resolution: int, batch: int = 1, *, warmup: int = 3,
                    runs: int = 20, max_seconds: float = 10.0, threads: int | None = None,
                    input_dtype: str = "float32", rounds: int = 5, idle_wait_s: float = 60.0,
                    max_retries: int = 2, device: str = "cpu") -> Latency:
    """p50 / p95 of one ONNX Runtime call at ``batch`` for one model (see ``measure_side_by_side``)."""
    spec = Spec("model", onnx_path, resolution, batch, input_dtype)
    return measure_side_by_side([spec], warmup=warmup, rounds=rounds, runs=runs, max_seconds=max_seconds,
                                threads=threads, idle_wait_s=idle_wait_s, max_retries=max_retries,
                                device=device)["model"]


__all__ = ["IDLE_OTHER_CORES", "Latency", "LatencyError", "MachineBusy", "Spec", "busy_message", "idle_limit",
           "machine_id", "measure_latency", "measure_side_by_side", "ort_providers", "ort_session", "other_load",
           "provider_words", "session_provider",
           "wait_until_idle"]
