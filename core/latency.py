"""ONNX Runtime latency measurement: the one place latency is measured.

Used by the recommender (calibration, "this machine" profile), by every run's automatic
export and by the benchmarks, so all latency figures in Workbench mean the same thing.
"""
from __future__ import annotations

import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Latency:
    batch: int
    p50_ms: float
    p95_ms: float
    mean_ms: float
    images_per_s: float
    runs: int
    threads: int

    def to_dict(self) -> dict:
        return asdict(self)


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


def ort_providers(device: str = "cpu") -> list[str]:
    """ONNX Runtime providers for ``device``: CUDA first when asked for (auto, cuda, cuda:N), the
    CUDA provider is installed and a GPU is present; else the CPU alone (what ``providers[0]`` of
    a session says is what a latency figure was measured on)."""
    import onnxruntime as ort

    if device != "cpu" and "CUDAExecutionProvider" in ort.get_available_providers():
        try:
            import torch

            gpu = torch.cuda.is_available()
        except ImportError:
            gpu = False
        if gpu:
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def ort_session(onnx_path: str | Path, threads: int | None = None, device: str = "cpu"):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(onnx_path), opts, providers=ort_providers(device))


def measure_latency(onnx_path: str | Path, resolution: int, batch: int = 1, *, warmup: int = 3,
                    runs: int = 20, max_seconds: float = 10.0, threads: int | None = None,
                    input_dtype: str = "float32") -> Latency:
    """Median and p95 wall time of one ONNX Runtime call at ``batch`` (stops early after max_seconds)."""
    sess = ort_session(onnx_path, threads)
    name = sess.get_inputs()[0].name
    x = np.random.default_rng(0).standard_normal((batch, 3, resolution, resolution)).astype(input_dtype)
    for _ in range(warmup):
        sess.run(None, {name: x})
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < runs and (time.perf_counter() - start) < max_seconds or len(times) < 3:
        t0 = time.perf_counter()
        sess.run(None, {name: x})
        times.append((time.perf_counter() - t0) * 1000)
    arr = np.asarray(times)
    return Latency(batch, float(np.percentile(arr, 50)), float(np.percentile(arr, 95)), float(arr.mean()),
                   float(batch * 1000 / np.median(arr)), len(times), threads or (os.cpu_count() or 1))
