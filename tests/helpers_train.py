"""Fixtures' building blocks for the training and job-runner tests: real image files, real SQLite.

Images are generated (not mocked): each class has a distinct colour and texture so a network
fine-tuned for a few epochs can separate them, with per-image noise so no two are identical.
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

# Per class: (base RGB, stripe period). Differences a frozen ImageNet backbone picks up at 64 px.
_CLASS_LOOK = [((200, 60, 50), 4), ((60, 170, 70), 8), ((60, 80, 200), 16), ((190, 180, 60), 6)]


def make_image(label: int, index: int, size: int = 48) -> Image.Image:
    rng = np.random.default_rng([label, index])
    base, period = _CLASS_LOOK[label % len(_CLASS_LOOK)]
    yy, xx = np.mgrid[0:size, 0:size]
    stripes = ((xx + yy + index) // period % 2).astype(np.float32)[..., None]
    img = np.asarray(base, np.float32) * (0.6 + 0.4 * stripes)
    img += rng.normal(0, 18, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def write_images(root: Path, counts: Sequence[int], size: int = 48, fmt: str = "png") -> list[tuple[str, int]]:
    """Write counts[c] images of class c under root/<c>/; returns (path, label) samples."""
    out = []
    for label, n in enumerate(counts):
        d = root / f"class{label}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            p = d / f"img{i:03d}.{fmt}"
            make_image(label, i, size).save(p)
            out.append((str(p), label))
    return out


def create_dataset_rows(data_dir: Path, session_factory, name: str, counts: Sequence[int],
                        val_per_class: int = 3, size: int = 48) -> int:
    """A dataset + image rows in the real DB, image files in the real store; returns the dataset id."""
    from storage.models import Dataset
    from storage.models import Image as ImageRow

    classes = [f"class{c}" for c in range(len(counts))]
    rows = []
    for label, n in enumerate(counts):
        for i in range(n):
            im = make_image(label, i, size)
            raw = im.tobytes()
            sha = hashlib.sha256(raw + name.encode()).hexdigest()
            rel = f"store/{sha[:2]}/{sha}.png"
            (data_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            im.save(data_dir / rel)
            split = "val" if i < val_per_class else "train"
            rows.append(dict(store_path=rel, sha256=sha, phash="0" * 16, width=size, height=size, mode="RGB",
                             label=classes[label], split=split, original_name=f"{classes[label]}/{i}.png"))
    with session_factory.begin() as s:
        ds = Dataset(name=name, source="generated", classes=classes, num_classes=len(classes),
                     num_images=len(rows), health={}, split_config={}, skipped=[])
        s.add(ds)
        s.flush()
        for r in rows:
            s.add(ImageRow(dataset_id=ds.id, **r))
        return ds.id
