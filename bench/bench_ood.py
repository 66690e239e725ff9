"""How well the out-of-distribution check separates beans from foreign images (energy vs max-logit).

Trains lite0 on beans with the `quick` recipe (core.train, 150 train images held out as validation),
fits the threshold on validation with core.evaluate.fit_ood_threshold (95 % kept) and reports the
share of images flagged: beans validation and test, mednist_3k and hymenoptera (60 random each).

    .venv/bin/python bench/bench_ood.py [RESOLUTION] > bench/results_ood.md
"""
from __future__ import annotations

import random
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared" / "datasets"
CLASSES = ["angular_leaf_spot", "bean_rust", "healthy"]


def _files(root: Path, n: int, seed: int = 0) -> list[Path]:
    fs = sorted(f for f in root.rglob("*") if f.suffix.lower() in (".jpg", ".jpeg", ".png")
                and "_quarantine" not in f.parts)
    random.Random(seed).shuffle(fs)
    return fs[:n]


def main() -> None:
    from core.bundle import energy_score
    from core.evaluate import fit_ood_threshold
    from core.export import export_fp32, load_trained, ort_logits
    from core.train import train
    from core.train.config import make_config

    res = int(sys.argv[1]) if len(sys.argv) > 1 else 128
    beans = SHARED / "beans"
    samples = [(str(f), i) for i, c in enumerate(CLASSES) for f in sorted((beans / "train" / c).iterdir())]
    random.Random(0).shuffle(samples)
    val, tr = samples[:150], samples[150:]
    with tempfile.TemporaryDirectory() as tmp:
        result = train(tr, CLASSES, "lite0", tmp, make_config("quick"), resolution=res, val_samples=val)
        tm = load_trained(result.best_path)
        onnx = export_fp32(tm.model, Path(tmp) / "m.onnx", tm.preprocessing, tm.classes, tm.variant, 0)
        test = [f for c in CLASSES for f in sorted((beans / "test" / c).iterdir())]
        sets = {"beans validation": [Path(f) for f, _ in val], "beans test": test,
                "mednist_3k": _files(SHARED / "mednist_3k", 60), "hymenoptera": _files(SHARED / "hymenoptera", 60)}
        logits = {k: ort_logits(onnx, fs, tm.preprocessing) for k, fs in sets.items()}
    y = np.array([CLASSES.index(f.parent.name) for f in test])
    print(f"# Out-of-distribution check: lite0 quick @ {res} px on beans\n")
    print(f"Test accuracy {float((logits['beans test'].argmax(1) == y).mean()):.3f}; threshold fitted on "
          f"{len(val)} validation images to keep 95 %.\n")
    print("| score | " + " | ".join(f"{k} flagged" for k in sets) + " |")
    print("|---|" + "---|" * len(sets))
    for name, fn in (("energy (used)", energy_score), ("max-logit", lambda z: -z.max(1))):
        if name.startswith("energy"):
            thr = fit_ood_threshold(logits["beans validation"])["threshold"]
        else:  # the same rule on -max logit (higher = less familiar)
            v = np.sort(fn(logits["beans validation"]))
            thr = float(v[int(np.ceil(0.95 * len(v))) - 1])
        shares = [f"{float((fn(z) > thr).mean()):.0%} of {len(z)}" for z in logits.values()]
        print(f"| {name} | " + " | ".join(shares) + " |")


if __name__ == "__main__":
    main()
