"""Export benchmark: ONNX Runtime vs PyTorch eager, and fp16 / int8 vs fp32 on beans.

    .venv/bin/python bench/bench_export.py [--train-per-class 120] [--runs 30] [--out bench/results_export.md]

1. Batch-1 latency, ORT fp32 vs PyTorch eager, same process, for exported Lite0 and B0 at
   their native resolution (target: ORT <= 0.5x eager). B0 has no offline ImageNet weights
   here, so it runs with random weights: latency does not depend on weight values.
2. On ../shared/datasets/beans: Lite0 (offline ImageNet weights) with a frozen backbone and a
   linear head fitted on train-split embeddings; then fp32 / fp16 / int8 (calibrated on 64
   training images) through ``core.export``: size, ORT p50/p95 at batch 1, images/s at batch
   32, and accuracy on the whole beans test split.
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core import export as cx  # noqa: E402
from core.evaluate import iter_batches  # noqa: E402
from core.latency import machine_id, measure_latency, ort_session  # noqa: E402
from core.weights import create_model  # noqa: E402

BEANS = ROOT.parent / "shared" / "datasets" / "beans"


def paired_latency(model: torch.nn.Module, onnx_path: Path, resolution: int, runs: int, threads: int,
                   warmup: int = 3) -> tuple[float, float]:
    """Median batch-1 ms of PyTorch eager and ONNX Runtime, calls ALTERNATED in one loop so both see
    the same machine load (this box is shared: a block-by-block comparison was off by 10x).

    ORT is timed the way ``core.latency.measure_latency`` does it (same session options, a
    perf_counter around ``sess.run``); the pairing needs the two loops merged, so its loop is
    inlined here.
    """
    torch.set_num_threads(threads)
    sess = ort_session(onnx_path, threads)
    x = np.random.default_rng(0).standard_normal((1, 3, resolution, resolution)).astype(np.float32)
    xt = torch.from_numpy(x)
    name = sess.get_inputs()[0].name
    model.eval()
    eager, ort = [], []
    with torch.inference_mode():
        for i in range(warmup + runs):
            t0 = time.perf_counter()
            model(xt)
            t1 = time.perf_counter()
            sess.run(None, {name: x})
            t2 = time.perf_counter()
            if i >= warmup:
                eager.append((t1 - t0) * 1000)
                ort.append((t2 - t1) * 1000)
    return float(np.median(eager)), float(np.median(ort))


def ort_vs_eager(variant: str, weights: str | None, runs: int, tmp: Path) -> list[dict]:
    lm = create_model(variant, 1000, weights=weights)
    res = lm.preprocessing.resolution
    path = cx.export_fp32(lm.model, tmp / f"{variant}.onnx", lm.preprocessing, [str(i) for i in range(1000)], variant)
    out = []
    for threads in (2, 1):
        e, o = paired_latency(lm.model, path, res, runs, threads)
        out.append({"variant": variant, "resolution": res, "weights": lm.weights, "threads": threads,
                    "eager_ms": e, "ort_ms": o, "ratio": o / e,
                    "ort_measure_latency_p50": measure_latency(path, res, 1, runs=runs, threads=threads).p50_ms})
    torch.set_num_threads(os.cpu_count() or 1)
    return out


def beans_variants(train_per_class: int, runs: int, tmp: Path) -> dict:
    classes = sorted(p.name for p in (BEANS / "train").iterdir() if p.is_dir())
    rng = random.Random(0)
    train, test = [], []
    for i, c in enumerate(classes):
        files = sorted((BEANS / "train" / c).iterdir())
        train += [(f, i) for f in rng.sample(files, min(train_per_class, len(files)))]
        test += [(f, i) for f in sorted((BEANS / "test" / c).iterdir())]
    torch.manual_seed(0)
    lm = create_model("lite0", len(classes), weights="auto")
    pre, model = lm.preprocessing, lm.model.eval()
    t0 = time.perf_counter()
    with torch.inference_mode():
        batches = iter_batches([f for f, _ in train], pre)
        emb = torch.cat([model.forward_embedding(torch.from_numpy(x)) for x in batches])
    y = torch.tensor([lab for _, lab in train])
    # Linear head on frozen features: full-batch Adam with a little weight decay.
    mu, sd = emb.mean(0), emb.std(0) + 1e-6
    head = torch.nn.Linear(emb.shape[1], len(classes))
    opt = torch.optim.Adam(head.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(300):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(head((emb - mu) / sd), y).backward()
        opt.step()
    with torch.no_grad():  # fold the feature standardisation into the classifier
        model.classifier.weight.copy_(head.weight / sd)
        model.classifier.bias.copy_(head.bias - (head.weight * (mu / sd)).sum(1))
    train_s = time.perf_counter() - t0

    test_paths, yt = [f for f, _ in test], np.array([lab for _, lab in test])
    fp32 = cx.export_fp32(model, tmp / "beans.onnx", pre, classes, "lite0", "bench")
    ver = cx.verify_onnx(model, fp32, test_paths, pre)
    out = {"classes": classes, "n_train": len(train), "n_test": len(test), "resolution": pre.resolution,
           "head_train_s": train_s, "verification": ver.to_dict(),
           "torch_accuracy": float((ver.torch_logits.argmax(1) == yt).mean()), "variants": {}}
    calib = [f for f, _ in rng.sample(train, 64)]
    paths = {"fp32": fp32, "fp16": cx.convert_fp16(fp32, tmp / "beans_fp16.onnx"),
             "int8": cx.quantize_int8(fp32, tmp / "beans_int8.onnx", calib, pre)}
    ref = ver.ort_logits
    for name, p in paths.items():
        m = cx.measure_variant(p, pre.resolution, runs=runs, max_seconds=30, throughput_runs=5)
        logits = ref if name == "fp32" else cx.ort_logits(p, test_paths, pre)
        m["accuracy"] = float((logits.argmax(1) == yt).mean())
        m["top1_agreement_vs_fp32"] = float((logits.argmax(1) == ref.argmax(1)).mean())
        m["max_abs_logit_diff_vs_fp32"] = float(np.abs(logits - ref).max())
        out["variants"][name] = m
    u8 = cx.build_uint8_graph(fp32, tmp / "beans_uint8.onnx", pre)
    out["uint8_graph"] = cx.uint8_agreement(u8, fp32, test_paths, pre)
    return out


def write_markdown(path: Path, speed: list[dict], beans: dict | None, cmd: str) -> None:
    L = ["# Export benchmark", "",
         f"- Date: {datetime.now(UTC):%Y-%m-%d %H:%M UTC}",
         f"- Machine: {machine_id()} (shared with other engineers: timings are noisy)",
         f"- torch {torch.__version__}, onnxruntime {__import__('onnxruntime').__version__}, "
         f"threads {torch.get_num_threads()}",
         f"- Command: `{cmd}`", "",
         "## ONNX Runtime fp32 vs PyTorch eager, batch 1 (same process, calls alternated, median)", "",
         "| variant | input | weights | threads | PyTorch eager ms | ORT ms | ORT / eager | target <= 0.5 | "
         "ORT p50 via measure_latency |", "|---|---|---|---|---|---|---|---|---|"]
    for r in speed:
        L.append(f"| {r['variant']} | {r['resolution']} | {r['weights']} | {r['threads']} | {r['eager_ms']:.1f} | "
                 f"{r['ort_ms']:.1f} | {r['ratio']:.2f} | {'met' if r['ratio'] <= 0.5 else 'NOT met'} | "
                 f"{r['ort_measure_latency_p50']:.1f} |")
    L += ["", "The 2-thread eager figures swing by 10x between runs: PyTorch's OpenMP threads spin-wait badly "
          "when the shared 2-core machine is oversubscribed by other jobs. The 1-thread rows, where neither runtime "
          "competes for a second core, are the meaningful comparison."]
    L += ["", "B0 runs with random weights (no offline ImageNet weights for B0 here): latency does not depend "
          "on weight values, but B0's int8 accuracy could not be measured."]
    if beans:
        v = beans["verification"]
        L += ["", f"## beans: fp32 vs fp16 vs int8 (Lite0 @ {beans['resolution']}, frozen backbone + linear head)", "",
              f"- Head fitted on {beans['n_train']} training images; accuracy on the whole beans test split "
              f"({beans['n_test']} images). PyTorch accuracy {beans['torch_accuracy']:.2%}.",
              f"- fp32 verification: max |logit diff| {v['max_abs_logit_diff']:.2e}, top-1 agreement "
              f"{v['top1_agreement']:.2%} -> {'passed' if v['passed'] else 'FAILED'}", "",
              "| precision | MB | p50 ms (b1) | p95 ms (b1) | images/s (b32) | speed vs fp32 (p50) | test accuracy | "
              "vs fp32 | top-1 agreement vs fp32 |", "|---|---|---|---|---|---|---|---|---|"]
        base = beans["variants"]["fp32"]
        for name, m in beans["variants"].items():
            L.append(f"| {name} | {m['onnx_mb']:.2f} | {m['latency_ms_p50']:.1f} | {m['latency_ms_p95']:.1f} | "
                     f"{m['throughput_images_per_s']:.1f} | {base['latency_ms_p50'] / m['latency_ms_p50']:.2f}x | "
                     f"{m['accuracy']:.2%} | {m['accuracy'] - base['accuracy']:+.2%} | "
                     f"{m['top1_agreement_vs_fp32']:.2%} |")
        u = beans["uint8_graph"]
        L += ["", f"uint8 NHWC graph (resize inside, no antialias) vs PIL path on the beans test images "
              f"(320 px -> 224 px): top-1 agreement {u['top1_agreement']:.2%}, max |logit diff| "
              f"{u['max_abs_logit_diff']:.3g}.", "", "Notes:",
              "- fp16 = fp16 weights and compute with fp32 I/O; ORT's CPU fp16 kernels are not faster on x86 "
              "without native fp16 arithmetic: the gain is file size.",
              "- int8 = static QDQ, per-channel weights, MinMax calibration on 64 training images. In these runs int8 "
              "was slower than fp32 despite the CPU reporting AVX512-VNNI (cause not investigated: the machine was "
              "shared and p95 shows heavy interference); its reliable gain here is file size."]
    path.write_text("\n".join(L) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--train-per-class", type=int, default=120)
    ap.add_argument("--skip-beans", action="store_true")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results_export.md")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        speed = [*ort_vs_eager("lite0", "auto", args.runs, tmp), *ort_vs_eager("b0", None, args.runs, tmp)]
        for r in speed:
            print(f"{r['variant']} x{r['threads']}: eager {r['eager_ms']:.1f} ms, ORT {r['ort_ms']:.1f} ms, "
                  f"ratio {r['ratio']:.2f}")
        beans = None if args.skip_beans or not BEANS.is_dir() else beans_variants(args.train_per_class, args.runs, tmp)
        if beans:
            for n, m in beans["variants"].items():
                print(f"{n}: {m['onnx_mb']:.2f} MB p50 {m['latency_ms_p50']:.1f} ms  "
                      f"{m['throughput_images_per_s']:.1f} img/s  acc {m['accuracy']:.4f}")
    write_markdown(args.out, speed, beans, "python bench/bench_export.py " + " ".join(argv or sys.argv[1:]))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
