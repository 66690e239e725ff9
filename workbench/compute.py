"""Where work runs, in plain words: the device a user chose and what actually ran.

The choice is ``--device`` or ``WORKBENCH_DEVICE`` (auto, cpu, cuda, cuda:N; settings.device);
``core.train.robustness`` checks it for PyTorch and ``core.latency.ort_providers`` for ONNX
Runtime, both with the same messages. What ran is an ONNX Runtime execution provider
("CPUExecutionProvider") or a torch device; pages and the CLI show it as "CPU" / "GPU (CUDA)".
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from core.latency import ort_providers, provider_words


def chosen_device(device: str | None, settings: Any = None) -> str:
    """``device`` if given, else this installation's WORKBENCH_DEVICE (default auto)."""
    if device:
        return device
    if settings is None:
        from workbench.settings import get_settings

        settings = get_settings()
    return str(settings.device)


def check_ort_device(device: str | None, settings: Any = None) -> str:
    """The chosen device (``chosen_device``) once ONNX Runtime can run on it here; else
    ``core.train.robustness.DeviceError``, the message train and evaluate give (misspelt name,
    no such GPU), or that onnxruntime here has no CUDA provider. Reads no model: call it first."""
    chosen = chosen_device(device, settings)
    ort_providers(chosen)
    return chosen


def torch_device_words(device: Any) -> str:
    """A torch device (or its name) in plain words: "CPU", "GPU (CUDA)", "GPU 1 (CUDA)"."""
    name = str(device)
    if name.startswith("cuda"):
        index = name.partition(":")[2]
        return f"GPU {index} (CUDA)" if index and index != "0" else "GPU (CUDA)"
    return "CPU" if name == "cpu" else name


def latency_provider(record: Mapping[str, Any] | None) -> str:
    """The ONNX Runtime provider a stored latency figure was measured on ("" when not measured).

    Reads ``latency_provider`` (written since figures record it), else the provider in the
    figure's conditions; figures older than both were all measured on the CPU provider."""
    if not record or record.get("latency_ms_p50") is None:
        return ""
    cond = record.get("latency_conditions") or {}
    return str(record.get("latency_provider") or cond.get("provider") or "CPUExecutionProvider")


def latency_on(record: Mapping[str, Any] | None) -> str:
    """Where a stored latency figure (a run's summary, an export's record) was measured: "CPU",
    "GPU (CUDA)"; "" when it was not measured."""
    return provider_words(latency_provider(record))


def measured_on(records: Iterable[Mapping[str, Any] | None]) -> str:
    """" on CPU" / " on GPU (CUDA)" for figures that all ran on one kind of device; " on CPU or GPU
    (see each row)" when they differ; "" when none was measured. For a sentence's end."""
    places = sorted({p for r in records if (p := latency_on(r))})
    if not places:
        return ""
    return f" on {places[0]}" if len(places) == 1 else f" on {' or '.join(places)} (see each row)"


__all__ = ["check_ort_device", "chosen_device", "latency_on", "latency_provider", "measured_on", "provider_words",
           "torch_device_words"]
