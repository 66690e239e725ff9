"""How many perceptual-hash matches the pixel check keeps, per shared dataset.

    python bench/bench_near_duplicates.py [DATASET ...]   (default: all four shared datasets)

For every pair of distinct files whose 64-bit phash differs by <= NEAR_DUP_THRESHOLD bits it
prints how many the pixel check (core.health.same_picture) confirms, how many carry different
labels before and after, and the correlation percentiles: the figures the thresholds in
core/health.py were calibrated on. Results: bench/results_near_duplicates.txt.
"""
from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import imagehash
import numpy as np

from core.health import NEAR_DUP_THRESHOLD, near_duplicate_pairs, pixel_signature, pixel_similarity, same_picture
from core.images import decode

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"


def main(names: list[str]) -> None:
    for name in names or ["mednist_3k", "beans", "rice_leaf_ph", "hymenoptera"]:
        root = SHARED / name
        files = [p for p in sorted(root.rglob("*")) if p.suffix.lower() in (".jpg", ".jpeg", ".png")
                 and "_quarantine" not in p.parts]
        by_sha: dict[str, Path] = {}
        for f in files:
            by_sha.setdefault(hashlib.sha256(f.read_bytes()).hexdigest(), f)
        uniq = list(by_sha.values())
        imgs = [decode(f).image for f in uniq]
        hashes = [str(imagehash.phash(im)) for im in imgs]
        sigs = [pixel_signature(im) for im in imgs]
        pairs = near_duplicate_pairs(hashes, NEAR_DUP_THRESHOLD)
        label = [f.parent.name for f in uniq]
        kept = [(i, j) for i, j in pairs if same_picture(sigs[i], sigs[j])]
        corr = [pixel_similarity(sigs[i], sigs[j])[0] for i, j in pairs]
        print(f"{name}: {len(files)} files, {len(uniq)} distinct; hash pairs {len(pairs)} "
              f"({sum(label[i] != label[j] for i, j in pairs)} with different labels); "
              f"confirmed by pixels {len(kept)} ({sum(label[i] != label[j] for i, j in kept)} with different labels)")
        if corr:
            pct = np.percentile(corr, [0, 5, 25, 50, 75, 95, 100]).round(3).tolist()
            print(f"  correlation of hash pairs, percentiles 0/5/25/50/75/95/100: {pct}")


if __name__ == "__main__":
    main(sys.argv[1:])
