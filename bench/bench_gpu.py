"""GPU checks of issue 15 (item 4), through the product's own code paths, in one command:

    python bench/bench_gpu.py [--out bench/results_gpu.md] [--variants b0 lite0] [--images 1024]
                              [--epochs 3] [--batch-size 64]

1. **Training throughput** (images/s) of each variant through ``core.train.train`` on the GPU
   (``device="cuda"``), with and without mixed precision (``TrainConfig.amp``: bf16 autocast where
   the GPU supports it, else fp16 + GradScaler); channels_last as core.train sets it on CUDA.
   Strategy ``full`` (every layer trained on images, no frozen-prefix cache: the GPU case), random
   initial weights (no download; speed does not depend on the weights), synthetic 256 px JPEGs in a
   temporary folder (speed does not depend on the content). The figure is the training loop's own
   ``images_per_s`` (validation excluded), median over the epochs after the first (the first pays
   for cuDNN's autotuning and the CUDA context).
2. **ONNX Runtime latency**, CUDA execution provider against the CPU one, for the same exported
   model (``core.onnx_export.export_onnx``, random weights) at batch 1 and 32: p50 / p95 per call
   through ``core.latency.measure_side_by_side`` (idle-cores check, rounds, spread check), the
   provider each figure ran on recorded by the sessions themselves. Without a CUDA provider
   (``onnxruntime`` rather than ``onnxruntime-gpu``), the table says so and holds the CPU figures.

On a machine without CUDA it prints that it needs a GPU and exits 0, measuring and writing nothing.
It prints the markdown it writes; total well under 8 minutes on an H200 with the defaults.
``--smoke-cpu`` runs the same steps on the CPU at toy sizes (lite0, 64 px, a few images) to check
the script itself; it writes nothing.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CLASSES = ["a", "b", "c", "d"]


def synthetic_images(folder: Path, n: int, size: int = 256, seed: int = 0) -> list[tuple[Path, int]]:
    """``n`` JPEGs (``size`` px), a smooth colour field per class plus noise, balanced over CLASSES."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = []
    for i in range(n):
        label = i % len(CLASSES)
        base = np.stack([np.sin(3 * xx + label), np.cos(2 * yy - label), xx * yy], -1)
        img = np.clip((base * 0.5 + 0.5) * 255 + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
        path = folder / f"{i:05d}_{CLASSES[label]}.jpg"
        Image.fromarray(img).save(path, quality=90)
        out.append((path, label))
    return out


def train_throughput(variant: str, amp: bool, train: list[tuple[Path, int]], val: list[tuple[Path, int]],
                     work: Path, *, device: str, epochs: int, batch_size: int,
                     resolution: int | None) -> dict[str, Any]:
    """One ``core.train.train`` run; the training loop's images/s per epoch."""
    import torch

    from core.train import Callback, TrainConfig
    from core.train import train as core_train

    per_epoch: list[float] = []

    class Record(Callback):
        def on_epoch_end(self, phase: str, epoch: int, metrics: dict[str, Any]) -> None:
            if phase == "full" and not metrics.get("replayed"):
                per_epoch.append(float(metrics["images_per_s"]))

    cfg = TrainConfig(strategy="full", head_epochs=0, finetune_epochs=epochs, batch_size=batch_size,
                      device=device, amp=amp, weights="none", patience=epochs + 1, seed=0)
    t0 = time.perf_counter()
    core_train(train, CLASSES, variant, work / f"{variant}_{'amp' if amp else 'fp32'}", cfg,
               resolution=resolution, val_samples=val, callback=Record())
    wall = time.perf_counter() - t0
    steady = per_epoch[1:] or per_epoch
    precision = "fp32"
    if amp and device.startswith("cuda"):
        precision = "bf16 autocast" if torch.cuda.is_bf16_supported() else "fp16 autocast + GradScaler"
    return {"variant": variant, "amp": amp, "precision": precision, "images_per_s": statistics.median(steady),
            "epochs": per_epoch, "wall_s": wall}


def ort_latency(variant: str, resolution: int | None, work: Path, *, runs: int, idle_wait_s: float,
                batches: tuple[int, ...]) -> list[dict[str, Any]]:
    """p50/p95 of one call at each batch size, CPU provider then CUDA provider, same ONNX file."""
    import torch

    from core.latency import LatencyError, Spec, measure_side_by_side, ort_providers, provider_words
    from core.onnx_export import export_onnx
    from core.registry import create_model, get_variant
    from core.train.robustness import DeviceError

    v = get_variant(variant)
    if resolution:
        v = v.at_resolution(resolution)
    path = work / f"{variant}_{v.resolution}.onnx"
    torch.manual_seed(0)
    export_onnx(create_model(v, len(CLASSES), weights="none").model.eval(), path, v.resolution)
    rows: list[dict[str, Any]] = []
    for device in ("cpu", "cuda"):
        try:
            ort_providers(device)
        except DeviceError as e:
            rows.append({"variant": variant, "resolution": v.resolution, "device": device, "error": str(e)})
            continue
        specs = [Spec(f"b{b}", path, v.resolution, b) for b in batches]
        try:
            lat = measure_side_by_side(specs, runs=runs, rounds=5, max_seconds=15.0, idle_wait_s=idle_wait_s,
                                       device=device)
        except LatencyError as e:
            rows.append({"variant": variant, "resolution": v.resolution, "device": device, "error": str(e)})
            continue
        for b in batches:
            m = lat[f"b{b}"]
            provider = str(m.conditions.get("provider", ""))
            rows.append({"variant": variant, "resolution": v.resolution, "device": device, "batch": b,
                         "provider": provider, "on": provider_words(provider), "p50_ms": m.p50_ms, "p95_ms": m.p95_ms,
                         "images_per_s": m.images_per_s, "warning": m.warning})
    return rows


def report(train_rows: list[dict[str, Any]], ort_rows: list[dict[str, Any]], header: dict[str, str]) -> str:
    lines = ["# GPU checks (issue 15, item 4): training throughput and ONNX Runtime CUDA vs CPU", "",
             *(f"- {k}: {v}" for k, v in header.items()), "",
             "## Training throughput through core.train (strategy full, channels_last on CUDA)", "",
             "| variant | mixed precision | precision used | images/s (median, epochs 2..n) | per epoch | wall s |",
             "|---|---|---|---|---|---|"]
    by_variant: dict[str, dict[bool, float]] = {}
    for r in train_rows:
        by_variant.setdefault(r["variant"], {})[r["amp"]] = r["images_per_s"]
        lines.append(f"| {r['variant']} | {'on' if r['amp'] else 'off'} | {r['precision']} | {r['images_per_s']:.0f} "
                     f"| {', '.join(f'{x:.0f}' for x in r['epochs'])} | {r['wall_s']:.1f} |")
    for variant, d in by_variant.items():
        if True in d and False in d and d[False] > 0:
            lines.append(f"\n{variant}: mixed precision trains {d[True] / d[False]:.2f}x as many images per second.")
    lines += ["", "## ONNX Runtime latency per call, same model file (core.latency.measure_side_by_side)", "",
              "| variant | res | asked | ran on (provider) | batch | p50 ms | p95 ms | images/s | note |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in ort_rows:
        if "error" in r:
            lines.append(f"| {r['variant']} | {r['resolution']} | {r['device']} | not measured | | | | | "
                         f"{r['error']} |")
        else:
            lines.append(f"| {r['variant']} | {r['resolution']} | {r['device']} | {r['on']} ({r['provider']}) | "
                         f"{r['batch']} | {r['p50_ms']:.2f} | {r['p95_ms']:.2f} | {r['images_per_s']:.0f} | "
                         f"{r['warning']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results_gpu.md")
    ap.add_argument("--variants", nargs="+", default=["b0", "lite0"])
    ap.add_argument("--images", type=int, default=1024, help="training images (plus a quarter as many for validation)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--latency-runs", type=int, default=50)
    ap.add_argument("--smoke-cpu", action="store_true", help="check the script on the CPU at toy sizes; writes nothing")
    args = ap.parse_args(argv)

    import onnxruntime as ort
    import torch

    from core.latency import machine_id

    if not torch.cuda.is_available() and not args.smoke_cpu:
        print(f"bench_gpu.py needs a CUDA GPU: PyTorch {torch.__version__} sees none on this machine "
              f"({machine_id()}). Nothing was measured and nothing was written; run it on a machine with a GPU.")
        return 0
    smoke = args.smoke_cpu
    device = "cpu" if smoke else "cuda"
    variants = ["lite0"] if smoke else args.variants
    resolution = 64 if smoke else None
    n_train = 16 if smoke else args.images
    epochs = 2 if smoke else max(2, args.epochs)
    batch_size = 8 if smoke else args.batch_size
    size = 96 if smoke else 256
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (smoke run on the CPU)"
    header = {"date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "GPU": gpu, "CPU": machine_id(),
              "versions": f"torch {torch.__version__}, onnxruntime {ort.__version__} (providers: "
                          f"{', '.join(ort.get_available_providers())}), python {platform.python_version()}",
              "command": "python bench/bench_gpu.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "training": f"{n_train} synthetic {size} px JPEGs ({len(CLASSES)} classes) + {max(4, n_train // 4)} "
                          f"for validation, {epochs} epochs, batch {batch_size}, random initial weights"}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="wb-bench-gpu-") as tmp:
        work = Path(tmp)
        (work / "img").mkdir()
        images = synthetic_images(work / "img", n_train + max(4, n_train // 4), size=size)
        train, val = images[:n_train], images[n_train:]
        train_rows = []
        for variant in variants:
            for amp in (False, True):
                r = train_throughput(variant, amp, train, val, work, device=device, epochs=epochs,
                                     batch_size=batch_size, resolution=resolution)
                print(f"trained {variant} amp={'on' if amp else 'off'}: {r['images_per_s']:.0f} images/s "
                      f"({time.perf_counter() - t0:.0f} s so far)", flush=True)
                train_rows.append(r)
        ort_rows = []
        for variant in variants:
            ort_rows += ort_latency(variant, resolution, work, runs=5 if smoke else args.latency_runs,
                                    idle_wait_s=5 if smoke else 60, batches=(1, 4) if smoke else (1, 32))
            print(f"timed {variant} with ONNX Runtime ({time.perf_counter() - t0:.0f} s so far)", flush=True)
    header["total"] = f"{time.perf_counter() - t0:.0f} s"
    text = report(train_rows, ort_rows, header)
    print(text)
    if smoke:
        print("(smoke run on the CPU: nothing written)")
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
