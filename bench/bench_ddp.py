"""Data-parallel training vs one process: how close the results are, and what it costs on CPU.

Trains lite0 on beans (PER_CLASS images per class, 3 per class to validate) once in one process
and once with two gloo processes under torchrun (same config), and prints the largest weight
difference of the final checkpoints, the validation metrics per epoch and the wall times. With
``--control`` it also runs two processes whose gradients are NOT averaged (each trains on its
half of every batch): the difference a broken all_reduce would make.

    python bench/bench_ddp.py [--per-class 8] [--resolution 96] [--control]

Results: bench/results_ddp.md.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BEANS = REPO.parent / "shared" / "datasets" / "beans" / "train"
CONFIG = dict(head_epochs=1, finetune_epochs=2, unfreeze_stages=1, cache_views=2, batch_size=8, head_batch_size=8,
              patience=10, num_threads=1)


def beans(per_class: int) -> dict[str, Any]:
    classes = sorted(p.name for p in BEANS.iterdir() if p.is_dir())
    train_s, val_s = [], []
    for label, c in enumerate(classes):
        files = sorted((BEANS / c).iterdir())
        train_s += [(str(f), label) for f in files[:per_class]]
        val_s += [(str(f), label) for f in files[per_class:per_class + 3]]
    return {"classes": classes, "samples": train_s, "val": val_s}


def rank_main(spec_path: str) -> None:
    """One torchrun process: train with the spec's config (``control``: gradients not averaged)."""
    spec = json.loads(Path(spec_path).read_text())
    import core.train.distributed as dist_helpers
    from core.train import make_config, train

    if spec.get("control"):
        dist_helpers.average_gradients = lambda params, local_count: None
    train([tuple(s) for s in spec["samples"]], spec["classes"], "lite0", spec["run_dir"],
          make_config("quick", **spec["config"]), resolution=spec["resolution"],
          val_samples=[tuple(s) for s in spec["val"]])


def two_processes(data: dict[str, Any], run_dir: Path, resolution: int, control: bool) -> float:
    spec = {**data, "config": {**CONFIG, "processes": 2}, "run_dir": str(run_dir), "resolution": resolution,
            "control": control}
    spec_path = run_dir.parent / f"{run_dir.name}.json"
    spec_path.write_text(json.dumps(spec))
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    __file__, "--rank-entry", str(spec_path)], check=True, cwd=REPO,
                   env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def compare(name: str, a: dict[str, Any], b: dict[str, Any], seconds: float) -> None:
    diff = max((a["model"][k].float() - b["model"][k].float()).abs().max().item() for k in a["model"])
    print(f"| {name} | {diff:.1e} | " + " / ".join(f"{r['val_accuracy']:.3f}" for r in b["history"])
          + f" | {max(abs(r['val_loss'] - q['val_loss']) for r, q in zip(a['history'], b['history'])):.1e}"
          + f" | {seconds:.1f} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--per-class", type=int, default=8)
    ap.add_argument("--resolution", type=int, default=96)
    ap.add_argument("--control", action="store_true")
    ap.add_argument("--rank-entry", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rank_entry:
        return rank_main(args.rank_entry)
    sys.path.insert(0, str(REPO))
    import torch

    from core.train import load_checkpoint, make_config, train

    data = beans(args.per_class)
    tmp = Path(tempfile.mkdtemp(prefix="bench_ddp_"))
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    train(data["samples"], data["classes"], "lite0", tmp / "one", make_config("quick", **CONFIG),
          resolution=args.resolution, val_samples=data["val"])
    one_s = time.perf_counter() - t0
    one = load_checkpoint(tmp / "one" / "last.pt")
    print(f"{len(data['samples'])} train / {len(data['val'])} val images, {args.resolution} px, {CONFIG}")
    print("| run | max abs weight diff vs 1 process | val accuracy per epoch | max val loss diff | wall s |")
    print("|---|---|---|---|---|")
    print("| 1 process | 0 | " + " / ".join(f"{r['val_accuracy']:.3f}" for r in one["history"])
          + f" | 0 | {one_s:.1f} |")
    seconds = two_processes(data, tmp / "two", args.resolution, control=False)
    compare("2 processes (gloo)", one, load_checkpoint(tmp / "two" / "last.pt"), seconds)
    if args.control:
        seconds = two_processes(data, tmp / "nosync", args.resolution, control=True)
        compare("2 processes, gradients not averaged (control)", one, load_checkpoint(tmp / "nosync" / "last.pt"),
                seconds)


if __name__ == "__main__":
    main()
