"""Dataset health report: class balance, sizes, colour modes, exact and near duplicates.

Works on any records with the attributes of ``ImageLike`` (ingest's ImageRecord and the
``images`` DB rows both qualify), returns plain JSON-able dicts.

Near duplicates are found in two steps: a 64-bit perceptual hash proposes candidate pairs
cheaply, then (when the caller can read pixels, ``signatures=``) a pixel-level check confirms
them: grayscale correlation of 32x32 thumbnails and the mean colour difference of 8x8 colour
thumbnails. The hash alone calls small, uniform images (64 px scans, cell crops) "the same"
when they visibly differ; the check keeps resized and re-encoded copies and drops those.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from core.images import ALPHA_MODES, GRAYSCALE_MODES, SIXTEEN_BIT_MODES, ImageDecodeError, decode

# Training refuses classes with fewer images than this (nothing to learn / validate on).
MIN_IMAGES_TO_TRAIN = 2
# Below this a class is trainable but the report warns: metrics on it are noise.
WARN_IMAGES_PER_CLASS = 10
# Max Hamming distance between 64-bit perceptual hashes to call two images near-duplicates.
# 4 catches re-encodes/resizes; on MedNIST (3k near-identical scans) it yields clusters of
# at most ~55 images, while 6 would already chain 200+ distinct scans together.
NEAR_DUP_THRESHOLD = 4
# Pixel confirmation of a hash match, calibrated on the shared datasets (tests/test_health_splits.py):
# resized / re-encoded copies score >= 0.98 and differ by < 3 grey levels in colour; hash
# matches between different MedNIST scans go down to 0.28, a red vs a purple cell crop to 0.38.
NEAR_DUP_MIN_CORRELATION = 0.95
NEAR_DUP_MAX_COLOUR_DIFF = 12.0  # mean absolute difference of 8x8 RGB thumbnails, 0-255 scale
GRAY_THUMB = 32
COLOUR_THUMB = 8
DEFAULT_INPUT_SIZE = 224
PERCENTILES = (0, 5, 25, 50, 75, 95, 100)
MAX_LISTED_GROUPS = 200  # keep the JSON report bounded on huge, messy datasets


class ImageLike(Protocol):
    sha256: str
    phash: str
    width: int
    height: int
    mode: str
    label: str
    split: str
    original_name: str


# --- pixel signatures ----------------------------------------------------------------

@dataclass(frozen=True)
class PixelSignature:
    """Small thumbnails of one image: enough to tell two hash-alike images apart, and the
    brightness/colour statistics the shortcut check uses."""

    gray: np.ndarray  # GRAY_THUMB x GRAY_THUMB float32, 0-255
    colour: np.ndarray  # COLOUR_THUMB x COLOUR_THUMB x 3 float32, 0-255
    file_format: str = ""

    @property
    def brightness(self) -> float:
        return float(self.gray.mean())

    @property
    def contrast(self) -> float:
        return float(self.gray.std())

    @property
    def mean_rgb(self) -> tuple[float, float, float]:
        m = self.colour.reshape(-1, 3).mean(axis=0)
        return float(m[0]), float(m[1]), float(m[2])

    @property
    def saturation(self) -> float:
        """Mean spread between the strongest and weakest channel (0 for grayscale)."""
        c = self.colour.reshape(-1, 3)
        return float((c.max(axis=1) - c.min(axis=1)).mean())


def pixel_signature(image: Image.Image, file_format: str = "") -> PixelSignature:
    rgb = image.convert("RGB")
    gray = np.asarray(rgb.convert("L").resize((GRAY_THUMB, GRAY_THUMB), Image.Resampling.BILINEAR),
                      dtype=np.float32)
    colour = np.asarray(rgb.resize((COLOUR_THUMB, COLOUR_THUMB), Image.Resampling.BOX), dtype=np.float32)
    return PixelSignature(gray, colour, file_format)


def pixel_similarity(a: PixelSignature, b: PixelSignature) -> tuple[float, float]:
    """(grayscale correlation in [-1, 1], mean colour difference in grey levels)."""
    x = a.gray.ravel() - a.gray.mean()
    y = b.gray.ravel() - b.gray.mean()
    den = float(np.sqrt((x * x).sum() * (y * y).sum()))
    if den < 1e-3:  # flat images: same only if the flat values agree
        corr = 1.0 if abs(float(a.gray.mean()) - float(b.gray.mean())) < 4 else 0.0
    else:
        corr = float((x * y).sum()) / den
    return corr, float(np.abs(a.colour - b.colour).mean())


def same_picture(a: PixelSignature, b: PixelSignature, *, min_correlation: float = NEAR_DUP_MIN_CORRELATION,
                 max_colour_diff: float = NEAR_DUP_MAX_COLOUR_DIFF) -> bool:
    """Do two images show the same picture (allowing resizing, re-encoding, small edits)?"""
    corr, diff = pixel_similarity(a, b)
    return corr >= min_correlation and diff <= max_colour_diff


SignatureOf = Callable[[Any], "PixelSignature | None"]


class StoreSignatures:
    """Pixel signatures of records with a ``store_path`` under ``data_dir``, read once each.

    Unreadable or missing files give None (the hash match then stands unconfirmed).
    JPEGs are decoded at reduced scale: the thumbnails need 32 px.
    """

    def __init__(self, data_dir: str | Path) -> None:
        self.data_dir = Path(data_dir)
        self._cache: dict[str, PixelSignature | None] = {}

    def __call__(self, record: Any) -> PixelSignature | None:
        rel = getattr(record, "store_path", None)
        if not rel:
            return None
        key = str(rel)
        if key not in self._cache:
            try:
                img = decode(self.data_dir / key, reduce_to=GRAY_THUMB)
                self._cache[key] = pixel_signature(img.image, img.format)
            except (ImageDecodeError, OSError):
                self._cache[key] = None
        return self._cache[key]


def store_signatures(data_dir: str | Path) -> StoreSignatures:
    """The signature reader ingest and dataset fixes pass to ``build_health`` / ``duplicate_clusters``."""
    return StoreSignatures(data_dir)


# --- duplicate detection ------------------------------------------------------------

class _UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, a: int) -> int:
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def near_duplicate_pairs(hashes: Sequence[str], threshold: int = NEAR_DUP_THRESHOLD) -> list[tuple[int, int]]:
    """Index pairs (i < j) of distinct hex hashes within ``threshold`` bits.

    Pigeonhole bucketing: split the 64 bits into threshold+1 chunks; two hashes within
    ``threshold`` bits must agree exactly on at least one chunk, so only hashes sharing
    a chunk value are compared. Near-linear for real data (20k images in well under a second).
    """
    if threshold < 0 or not hashes:
        return []
    values = [int(h, 16) for h in hashes]
    nbits = max(64, max(v.bit_length() for v in values))
    k = threshold + 1
    bounds = [round(i * nbits / k) for i in range(k + 1)]
    pairs: set[tuple[int, int]] = set()
    for c in range(k):
        lo, width = bounds[c], bounds[c + 1] - bounds[c]
        mask = (1 << width) - 1
        buckets: dict[int, list[int]] = defaultdict(list)
        for i, v in enumerate(values):
            buckets[(v >> lo) & mask].append(i)
        for members in buckets.values():
            if len(members) < 2:
                continue
            for x in range(len(members)):
                i = members[x]
                vi = values[i]
                for y in range(x + 1, len(members)):
                    j = members[y]
                    if (vi ^ values[j]).bit_count() <= threshold:
                        pairs.add((i, j) if i < j else (j, i))
    return sorted(pairs)


def duplicate_clusters(
    records: Sequence[ImageLike], *, near_threshold: int | None = NEAR_DUP_THRESHOLD,
    signatures: SignatureOf | None = None,
) -> list[int]:
    """Cluster id per record: exact duplicates (same sha256) and, unless
    ``near_threshold`` is None, near duplicates (phash) share a cluster (transitively).

    With ``signatures`` (record -> PixelSignature or None), a hash match joins two images
    only if their pixels agree too (``same_picture``); without it the hash alone decides.
    """
    n = len(records)
    uf = _UnionFind(n)
    first_by_sha: dict[str, int] = {}
    for i, r in enumerate(records):
        j = first_by_sha.setdefault(r.sha256, i)
        if j != i:
            uf.union(i, j)
    if near_threshold is None:
        return [uf.find(i) for i in range(n)]
    if signatures is None:
        # Compare each distinct phash once; identical phashes are distance 0 anyway.
        first_by_phash: dict[str, int] = {}
        for i, r in enumerate(records):
            j = first_by_phash.setdefault(r.phash, i)
            if j != i:
                uf.union(i, j)
        reps = list(first_by_phash.values())
        for a, b in near_duplicate_pairs([records[i].phash for i in reps], near_threshold):
            uf.union(reps[a], reps[b])
        return [uf.find(i) for i in range(n)]

    sig_cache: dict[int, PixelSignature | None] = {}

    def sig(i: int) -> PixelSignature | None:
        if i not in sig_cache:
            sig_cache[i] = signatures(records[i])
        return sig_cache[i]

    def confirmed(i: int, j: int) -> bool:
        a, b = sig(i), sig(j)
        return a is None or b is None or same_picture(a, b)

    # Within one phash: leader clustering (each file joins the first leader it matches, else
    # leads a new sub-group): linear for thousands of alike blank images, never quadratic.
    leaders_by_phash: dict[str, list[int]] = {}
    for i in first_by_sha.values():
        leaders = leaders_by_phash.setdefault(records[i].phash, [])
        for lead in leaders:
            if confirmed(lead, i):
                uf.union(lead, i)
                break
        else:
            leaders.append(i)
    phashes = list(leaders_by_phash)
    for a, b in near_duplicate_pairs(phashes, near_threshold):
        for i in leaders_by_phash[phashes[a]]:
            for j in leaders_by_phash[phashes[b]]:
                if confirmed(i, j):
                    uf.union(i, j)
    return [uf.find(i) for i in range(n)]


def _group_entry(members: list[ImageLike], key: str) -> dict[str, Any]:
    splits = sorted({m.split for m in members})
    labels = sorted({m.label for m in members})
    return {
        "key": key,
        "size": len(members),
        "cross_split": len(splits) > 1,
        "label_conflict": len(labels) > 1,
        "splits": splits,
        "labels": labels,
        "files": [
            {"name": m.original_name, "label": m.label, "split": m.split, "sha256": m.sha256}
            for m in members
        ],
    }


def _sorted_groups(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # Leakage (cross split) and label conflicts first: those are the ones to act on.
    return sorted(groups, key=lambda g: (not g["label_conflict"], not g["cross_split"], -g["size"], g["key"]))


def find_duplicates(
    records: Sequence[ImageLike], *, near_threshold: int = NEAR_DUP_THRESHOLD,
    signatures: SignatureOf | None = None,
) -> dict[str, Any]:
    by_sha: dict[str, list[ImageLike]] = defaultdict(list)
    for r in records:
        by_sha[r.sha256].append(r)
    exact = [_group_entry(m, sha) for sha, m in by_sha.items() if len(m) > 1]

    clusters = duplicate_clusters(records, near_threshold=near_threshold, signatures=signatures)
    by_cluster: dict[int, list[ImageLike]] = defaultdict(list)
    for cid, r in zip(clusters, records):
        by_cluster[cid].append(r)
    # Near-duplicate groups: clusters holding at least two *different* files.
    near = [
        _group_entry(m, m[0].phash)
        for m in by_cluster.values()
        if len({x.sha256 for x in m}) > 1
    ]
    exact, near = _sorted_groups(exact), _sorted_groups(near)
    return {
        "exact_groups": len(exact),
        "exact_redundant_files": sum(g["size"] - 1 for g in exact),
        "exact_cross_split_groups": sum(g["cross_split"] for g in exact),
        "exact_label_conflict_groups": sum(g["label_conflict"] for g in exact),
        "near_threshold": near_threshold,
        "pixel_checked": signatures is not None,
        "near_min_correlation": NEAR_DUP_MIN_CORRELATION,
        "near_groups": len(near),
        "near_cross_split_groups": sum(g["cross_split"] for g in near),
        "near_label_conflict_groups": sum(g["label_conflict"] for g in near),
        "exact": exact[:MAX_LISTED_GROUPS],
        "near": near[:MAX_LISTED_GROUPS],
    }


# --- class balance -------------------------------------------------------------------

def untrainable_classes(class_counts: dict[str, int], min_images: int = MIN_IMAGES_TO_TRAIN) -> list[str]:
    """Classes training must refuse (fewer than ``min_images`` images)."""
    return sorted(c for c, n in class_counts.items() if n < min_images)


def check_trainable(class_counts: dict[str, int], min_images: int = MIN_IMAGES_TO_TRAIN) -> None:
    """Raise ValueError naming every class with fewer than ``min_images`` training images."""
    bad = untrainable_classes(class_counts, min_images)
    if bad:
        detail = ", ".join(f"{c!r} ({class_counts[c]})" for c in bad)
        raise ValueError(
            f"cannot train: {len(bad)} class(es) have fewer than {min_images} images: {detail}. "
            "Add images or remove these classes."
        )


def _percentiles(values: Iterable[float]) -> dict[str, float]:
    arr = np.asarray(list(values), dtype=np.float64)
    if arr.size == 0:
        return {}
    return {f"p{p}": round(float(np.percentile(arr, p)), 3) for p in PERCENTILES}


# --- the report ----------------------------------------------------------------------

def build_health(
    records: Sequence[ImageLike],
    *,
    skipped: Sequence[dict[str, str]] = (),
    empty_class_folders: Sequence[str] = (),
    missing_from_csv: Sequence[str] = (),
    input_size: int = DEFAULT_INPUT_SIZE,
    near_threshold: int = NEAR_DUP_THRESHOLD,
    extra_warnings: Sequence[str] = (),
    signatures: SignatureOf | None = None,
) -> dict[str, Any]:
    """JSON-able health report with human-readable ``warnings``.

    ``signatures`` (e.g. ``store_signatures(data_dir)``) lets the report read pixels: hash
    matches are then confirmed before being called near duplicates, and the shortcut check
    also looks at brightness and colour.
    """
    from core.image_kind import infer_image_kind, suggest_training
    from core.shortcuts import find_shortcuts  # sklearn: loaded only when a report is built

    warnings: list[str] = []
    class_counts = dict(sorted(Counter(r.label for r in records).items()))
    per_split: dict[str, dict[str, int]] = {}
    for r in records:
        per_split.setdefault(r.split, {}).setdefault(r.label, 0)
        per_split[r.split][r.label] += 1
    per_split = {s: dict(sorted(per_split[s].items())) for s in ("train", "val", "test") if s in per_split}

    counts = list(class_counts.values())
    imbalance = round(max(counts) / min(counts), 3) if counts else None
    small = sorted(c for c, n in class_counts.items() if n < WARN_IMAGES_PER_CLASS)
    untrainable = untrainable_classes(class_counts)

    widths = [r.width for r in records]
    heights = [r.height for r in records]
    aspects = [r.width / r.height for r in records if r.height]
    smaller = sum(1 for r in records if min(r.width, r.height) < input_size)

    modes = dict(sorted(Counter(r.mode for r in records).items()))
    grayscale = sum(n for m, n in modes.items() if m in GRAYSCALE_MODES)
    alpha = sum(n for m, n in modes.items() if m in ALPHA_MODES)
    cmyk = modes.get("CMYK", 0)
    sixteen = sum(n for m, n in modes.items() if m in SIXTEEN_BIT_MODES)
    palette = modes.get("P", 0) + modes.get("PA", 0)

    dups = find_duplicates(records, near_threshold=near_threshold, signatures=signatures)
    shortcuts = find_shortcuts(records, signatures)
    step = max(1, len(records) // 500)  # the kind of image shows in a few hundred
    sigs = [signatures(r) for r in records[::step]] if signatures is not None else []
    colour = [(*s.mean_rgb, s.saturation) for s in sigs if s is not None]
    kind = infer_image_kind([r.mode for r in records], colour)
    short_sides = [min(r.width, r.height) for r in records]
    train_images = sum(per_split["train"].values()) if "train" in per_split else None
    suggestion = suggest_training(kind.kind, short_sides, train_images)

    # Human sentences, most actionable first.
    if untrainable:
        warnings.append(
            f"{len(untrainable)} class(es) have fewer than {MIN_IMAGES_TO_TRAIN} images and cannot be "
            f"trained: {', '.join(untrainable)}."
        )
    if dups["exact_label_conflict_groups"] or dups["near_label_conflict_groups"]:
        warnings.append(
            f"{dups['exact_label_conflict_groups']} exact and {dups['near_label_conflict_groups']} "
            "near-duplicate groups carry different labels: check these images for labelling errors."
        )
    if dups["exact_cross_split_groups"] or dups["near_cross_split_groups"]:
        warnings.append(
            f"{dups['exact_cross_split_groups']} exact and {dups['near_cross_split_groups']} "
            "near-duplicate groups span more than one split: test scores will be optimistic (leakage)."
        )
    warnings.extend(shortcuts["warnings"])
    if dups["exact_groups"]:
        warnings.append(
            f"{dups['exact_groups']} groups of exact duplicates ({dups['exact_redundant_files']} "
            "redundant files)."
        )
    if dups["near_groups"]:
        warnings.append(f"{dups['near_groups']} groups of near-duplicate images (perceptual hash).")
    small_trainable = [c for c in small if c not in untrainable]
    if small_trainable:
        warnings.append(
            f"{len(small_trainable)} class(es) have fewer than {WARN_IMAGES_PER_CLASS} images; "
            f"their metrics will be unreliable: {', '.join(small_trainable)}."
        )
    if imbalance is not None and imbalance >= 3:
        warnings.append(
            f"Classes are imbalanced: the largest has {imbalance:g}x the images of the smallest."
        )
    for split in ("train", "val", "test"):
        missing = [c for c in class_counts if per_split.get(split, {}).get(c, 0) == 0]
        if records and missing:
            warnings.append(f"No {split} images for class(es): {', '.join(missing)}.")
    if records and smaller:
        warnings.append(
            f"{smaller} of {len(records)} images ({smaller / len(records):.0%}) are smaller than "
            f"{input_size}px on their short side and will be upscaled."
        )
    if grayscale:
        warnings.append(f"{grayscale} grayscale images (converted to 3 identical channels).")
    if alpha:
        warnings.append(f"{alpha} images with transparency (composited on white).")
    if cmyk:
        warnings.append(f"{cmyk} CMYK images (converted to RGB).")
    if sixteen:
        warnings.append(f"{sixteen} 16-bit images (scaled to 8 bits).")
    if empty_class_folders:
        warnings.append(
            f"{len(empty_class_folders)} folder(s) held no usable images: {', '.join(empty_class_folders)}."
        )
    if missing_from_csv:
        warnings.append(f"{len(missing_from_csv)} file(s) named in the CSV were not found.")
    if skipped:
        warnings.append(f"{len(skipped)} file(s) were skipped (see 'skipped' for reasons).")
    warnings.extend(extra_warnings)

    return {
        "num_images": len(records),
        "num_classes": len(class_counts),
        "class_counts": class_counts,
        "split_counts": per_split,
        "imbalance_ratio": imbalance,
        "min_images_to_train": MIN_IMAGES_TO_TRAIN,
        "classes_below_warn": small,
        "warn_images_per_class": WARN_IMAGES_PER_CLASS,
        "untrainable_classes": untrainable,
        "sizes": {
            "width": _percentiles(widths),
            "height": _percentiles(heights),
            "aspect_ratio": _percentiles(aspects),
            "input_size": input_size,
            "smaller_than_input": smaller,
            "share_smaller_than_input": round(smaller / len(records), 4) if records else 0.0,
        },
        "modes": modes,
        "color": {
            "grayscale": grayscale,
            "alpha": alpha,
            "cmyk": cmyk,
            "sixteen_bit": sixteen,
            "palette": palette,
        },
        "duplicates": dups,
        "shortcuts": shortcuts,
        "image_kind": kind.to_dict(),
        "suggestion": suggestion.to_dict(),
        "empty_class_folders": list(empty_class_folders),
        "missing_from_csv": list(missing_from_csv),
        "num_skipped": len(skipped),
        "warnings": warnings,
    }
