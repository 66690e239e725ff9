"""Fine-tuning benchmark on beans: our recipes vs a plain timm fine-tune, same weights, same split.

    .venv/bin/python bench/bench_train.py [--recipes quick@192 default@224] [--no-baseline] \
        [--out bench/results_train.md]

Data: ../shared/datasets/beans, train/ split 85/15 (stratified, seed 0) into train/val for
both contenders; test/ (128 images) is held out and only used for the reported accuracy.
Wall time = image files on disk -> trained model: weights loading, decoding, caching,
training, per-epoch validation and checkpoints. Not counted: Python/torch imports and the
final test evaluation (the same eval-time ``preprocess`` for every contender).
Baseline: timm ``tf_efficientnet_lite0`` with the same offline ImageNet weights (our state
dict, same key names), 1 frozen epoch + 3 unfrozen epochs at 224, AdamW, one-cycle,
label smoothing 0.1, batch 32, RandomResizedCrop + flips, as tutorials do.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from core.data import as_samples  # noqa: E402
from core.images import load_rgb  # noqa: E402
from core.latency import machine_id  # noqa: E402
from core.preprocessing import preprocess  # noqa: E402
from core.train import Callback, load_trained_model, make_config, stratified_val, train  # noqa: E402
from core.weights import create_model  # noqa: E402

BEANS = REPO.parent / "shared" / "datasets" / "beans"


def listing(split: str) -> tuple[list[tuple[str, int]], list[str]]:
    classes = sorted(d.name for d in (BEANS / split).iterdir() if d.is_dir())
    items = [(str(p), i) for i, c in enumerate(classes) for p in sorted((BEANS / split / c).iterdir())]
    return items, classes


@torch.inference_mode()
def test_accuracy(model: torch.nn.Module, pre, test: list[tuple[str, int]]) -> float:
    model.eval()
    correct = 0
    for s in range(0, len(test), 32):
        chunk = test[s:s + 32]
        x = torch.from_numpy(np.stack([preprocess(load_rgb(p), pre) for p, _ in chunk]))
        correct += int((model(x).argmax(1).numpy() == np.array([y for _, y in chunk])).sum())
    return correct / len(test)


class Printer(Callback):
    def on_epoch_end(self, phase, epoch, m):
        print(f"  epoch {epoch} {phase}: val acc {m['val_accuracy']:.3f} F1 {m['val_macro_f1']:.3f} "
              f"({m['epoch_seconds']:.1f} s, {m['images_per_s']:.0f} img/s)", flush=True)

    def on_log(self, level, message, data=None):
        print(f"  [{level}] {message}", flush=True)


def run_ours(recipe: str, resolution: int, tr, va, classes, test, out_dir: Path) -> dict:
    t0 = time.perf_counter()
    cfg = make_config(recipe, augment="field", num_threads=torch.get_num_threads())
    res = train(tr, classes, "lite0", out_dir / f"{recipe}@{resolution}", cfg, resolution=resolution,
                val_samples=va, callback=Printer())
    wall = time.perf_counter() - t0  # trained model on disk (best.pt); test evaluation not counted
    tm = load_trained_model(res.best_path)
    acc = test_accuracy(tm.model, tm.preprocessing, test)
    phase_s: dict[str, float] = {}
    for h in res.history:
        phase_s[h["phase"]] = round(phase_s.get(h["phase"], 0.0) + h["epoch_seconds"], 1)
    return {"name": f"ours:{recipe}", "resolution": resolution, "test_acc": acc, "wall_s": wall,
            "val_acc": res.best["metrics"]["accuracy"],
            "detail": {**{k: res.summary.get(k) for k in ("cache_entry", "cache_backend", "cache_seconds",
                                                          "load_seconds", "epochs_run", "best_epoch", "best_phase")},
                       "phase_seconds": phase_s}}


def run_baseline(tr, classes, test) -> dict:
    import timm
    import torchvision.transforms as T
    from torch.utils.data import DataLoader, Dataset

    t0 = time.perf_counter()
    loaded = create_model("lite0", len(classes), resolution=224)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=len(classes))
    missing, unexpected = model.load_state_dict(loaded.model.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("classifier") for k in missing), (missing, unexpected)
    pre = loaded.preprocessing
    tf = T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor(),
                    T.Normalize(pre.mean, pre.std)])

    class Folder(Dataset):
        def __len__(self) -> int:
            return len(tr)

        def __getitem__(self, i: int):
            return tf(load_rgb(tr[i][0])), tr[i][1]

    loader = DataLoader(Folder(), batch_size=32, shuffle=True, num_workers=0,
                        generator=torch.Generator().manual_seed(0))
    crit = torch.nn.CrossEntropyLoss(label_smoothing=0.1)

    def epochs(n: int, params, lr: float) -> None:
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=n * len(loader))
        model.train()
        for _ in range(n):
            te = time.perf_counter()
            for x, y in loader:
                opt.zero_grad()
                crit(model(x), y).backward()
                opt.step()
                sched.step()
            print(f"  baseline epoch done in {time.perf_counter() - te:.0f} s", flush=True)

    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.get_classifier().parameters():
        p.requires_grad_(True)
    epochs(1, model.get_classifier().parameters(), 1e-3)
    for p in model.parameters():
        p.requires_grad_(True)
    epochs(3, model.parameters(), 1e-3)
    wall = time.perf_counter() - t0  # test evaluation not counted (as for ours)
    acc = test_accuracy(model, pre, test)
    return {"name": "timm baseline (1 frozen + 3 full epochs)", "resolution": 224, "test_acc": acc, "wall_s": wall}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipes", nargs="*", default=["quick@192", "default@224"],
                    help="recipe@resolution (resolution defaults to 224)")
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--baseline-s", type=float, default=521.0, help="baseline wall s if not run (earlier figure)")
    ap.add_argument("--baseline-acc", type=float, default=0.938)
    ap.add_argument("--out", default=str(REPO / "bench" / "results_train.md"))
    args = ap.parse_args()
    load_start = os.getloadavg()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    torch.manual_seed(0)
    train_all, classes = listing("train")
    test, test_classes = listing("test")
    assert classes == test_classes
    tr, va = stratified_val(as_samples(train_all), 0.15, 0)
    print(f"beans: {len(tr)} train / {len(va)} val / {len(test)} test, {torch.get_num_threads()} threads", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.recipes:
            r, _, res = spec.partition("@")
            print(f"== ours: {r} @ {res or 224}", flush=True)
            rows.append(run_ours(r, int(res or 224), tr, va, classes, test, Path(tmp)))
            print(json.dumps(rows[-1]), flush=True)
    if args.no_baseline:
        base = {"name": "timm baseline (earlier measurement, not re-run)", "resolution": 224,
                "test_acc": args.baseline_acc, "wall_s": args.baseline_s}
    else:
        print("== baseline", flush=True)
        base = run_baseline([(s.path, s.label) for s in tr], classes, test)
        print(json.dumps(base), flush=True)
    rows.append(base)
    load = os.getloadavg()
    lines = ["# Fine-tuning benchmark: beans, EfficientNet-Lite0, offline ImageNet weights", "",
             f"Date: {started}. Machine: `{machine_id()}`, torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads ({platform.python_version()}).",
             f"Load average at the start {load_start[0]:.2f}/{load_start[1]:.2f}/{load_start[2]:.2f}, at the end "
             f"{load[0]:.2f}/{load[1]:.2f}/{load[2]:.2f}.",
             "", f"Command: `.venv/bin/python bench/bench_train.py {' '.join(sys.argv[1:])}`", "",
             f"Split: beans train/ -> {len(tr)} train + {len(va)} val (stratified, seed 0); test/ = {len(test)} "
             "held-out images (1 image = 0.8 points).", "",
             "| recipe | resolution | test acc | wall s | wall / baseline |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['resolution']} | {100 * r['test_acc']:.1f} % | {r['wall_s']:.0f} | "
                     f"{r['wall_s'] / base['wall_s']:.2f} |")
    lines += ["", "Details:", "", "```", *[json.dumps(r) for r in rows], "```", ""]
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
