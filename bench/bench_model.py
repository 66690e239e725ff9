"""Our EfficientNet vs timm's with the same weights, in one process, on this CPU.

Forward at batch 1 and 32, and a training step at batch 16, for B0 and Lite0. The two
models are timed alternately, round after round, so load from other processes hits both
alike; the figure is the ratio of medians (ours / timm). Target: <= 1.05.

    .venv/bin/python bench/bench_model.py [--rounds 7] [--out bench/results_model.md]
"""
from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from core.latency import machine_id  # noqa: E402
from core.registry import build_network  # noqa: E402

RES = 224


def pair(variant: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    import timm

    lite = variant.startswith("lite")
    ref = timm.create_model(("tf_efficientnet_" if lite else "efficientnet_") + variant)
    ours = build_network(variant, 1000, "same" if lite else "symmetric", 1e-3 if lite else 1e-5)
    ours.load_state_dict(ref.state_dict())
    return ours, ref


def time_forward(model: torch.nn.Module, batch: int, reps: int) -> float:
    model.eval()
    x = torch.randn(batch, 3, RES, RES)
    with torch.inference_mode():
        model(x)
        t0 = time.perf_counter()
        for _ in range(reps):
            model(x)
    return (time.perf_counter() - t0) / reps


def time_train_step(model: torch.nn.Module, batch: int, reps: int) -> float:
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    x = torch.randn(batch, 3, RES, RES)
    y = torch.randint(0, 1000, (batch,))
    loss_fn = torch.nn.CrossEntropyLoss()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()

    step()
    t0 = time.perf_counter()
    for _ in range(reps):
        step()
    return (time.perf_counter() - t0) / reps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--out", default=str(Path(__file__).with_name("results_model.md")))
    args = ap.parse_args()
    torch.manual_seed(0)
    cases = [("forward b=1", lambda m: time_forward(m, 1, 10)),
             ("forward b=32", lambda m: time_forward(m, 32, 1)),
             ("train step b=16", lambda m: time_train_step(m, 16, 1))]
    rows = []
    for variant in ("b0", "lite0"):
        ours, ref = pair(variant)
        for name, fn in cases:
            t_ours, t_ref = [], []
            for r in range(args.rounds):
                first, second = (ours, ref) if r % 2 == 0 else (ref, ours)
                a, b = fn(first), fn(second)
                (t_ours if first is ours else t_ref).append(a)
                (t_ref if first is ours else t_ours).append(b)
            mo, mr = statistics.median(t_ours), statistics.median(t_ref)
            rows.append((variant, name, mo * 1000, mr * 1000, mo / mr))
            print(f"{variant:6s} {name:16s} ours {mo*1000:8.1f} ms  timm {mr*1000:8.1f} ms  ratio {mo/mr:.3f}",
                  flush=True)
    lines = [
        "## Model speed: ours vs timm (same weights, same process)",
        "",
        f"Machine: {machine_id()}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{dt.date.today()}. Command: `.venv/bin/python bench/bench_model.py --rounds {args.rounds}`. "
        "Median of alternating rounds at 224 px; target ratio <= 1.05.",
        "",
        "| variant | case | ours ms | timm ms | ratio |",
        "|---|---|---:|---:|---:|",
        *[f"| {v} | {c} | {a:.1f} | {b:.1f} | {r:.3f} |" for v, c, a, b, r in rows],
        "",
    ]
    Path(args.out).write_text("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
