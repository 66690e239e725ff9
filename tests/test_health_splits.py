"""Duplicate detection, health report and leakage-safe splitting (pure core, no I/O)."""
from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from core.health import (
    MIN_IMAGES_TO_TRAIN,
    NEAR_DUP_MAX_COLOUR_DIFF,
    NEAR_DUP_THRESHOLD,
    build_health,
    check_trainable,
    duplicate_clusters,
    near_duplicate_pairs,
    untrainable_classes,
)
from core.splits import SplitItem, assign_splits, validate_fractions


@dataclass
class Rec:
    sha256: str
    phash: str
    label: str
    split: str = "train"
    width: int = 300
    height: int = 200
    mode: str = "RGB"
    original_name: str = "x"


def _hex(v: int) -> str:
    return f"{v:016x}"


def test_near_duplicate_pairs_match_brute_force() -> None:
    rng = random.Random(0)
    base = [rng.getrandbits(64) for _ in range(150)]
    # Plant near copies: flip 1..6 bits.
    vals = base + [b ^ sum(1 << rng.randrange(64) for _ in range(rng.randint(1, 6))) for b in base[:60]]
    hashes = [_hex(v) for v in vals]
    for t in (0, 2, 4, 6):
        brute = sorted((i, j) for i in range(len(vals)) for j in range(i + 1, len(vals))
                       if (vals[i] ^ vals[j]).bit_count() <= t)
        assert near_duplicate_pairs(hashes, t) == brute


def test_near_duplicates_fast_on_20k() -> None:
    rng = random.Random(1)
    hashes = [_hex(rng.getrandbits(64)) for _ in range(20_000)]
    t0 = time.perf_counter()
    near_duplicate_pairs(hashes, 4)
    assert time.perf_counter() - t0 < 5.0


def test_health_flags_cross_split_and_label_conflicts_first() -> None:
    recs = [
        # A harmless duplicate, a leak across splits, a label conflict:
        Rec("s1", _hex(0x0123456789ABCDEF), "a", "train"), Rec("s1", _hex(0x0123456789ABCDEF), "a", "train"),
        Rec("s2", _hex(0xFEDCBA9876543210), "a", "train"), Rec("s2", _hex(0xFEDCBA9876543210), "a", "test"),
        Rec("s3", _hex(0x5555AAAA5555AAAA), "a", "val"), Rec("s3", _hex(0x5555AAAA5555AAAA), "b", "val"),
        Rec("s4", _hex(0xF0F0F0F0F0F0F0F0), "b", "test"), Rec("s5", _hex(0xF0F0F0F0F0F0F0F1), "b", "train"),
    ] + [Rec(f"u{i}", _hex(random.Random(i).getrandbits(64)), "b", "train", width=100, height=100,
             mode="L") for i in range(3)]
    h = build_health(recs)
    d = h["duplicates"]
    assert d["exact_groups"] == 3 and d["exact_redundant_files"] == 3
    assert [g["key"] for g in d["exact"]] == ["s3", "s2", "s1"]
    assert d["exact"][0]["label_conflict"] and d["exact"][1]["cross_split"]
    assert d["near_groups"] == 1 and d["near"][0]["cross_split"]
    assert h["class_counts"] == {"a": 5, "b": 6} and h["imbalance_ratio"] == 1.2
    assert h["color"]["grayscale"] == 3
    assert h["sizes"]["smaller_than_input"] == 11 and h["sizes"]["width"]["p50"] == 300
    text = " ".join(h["warnings"])
    assert "carry different labels" in text and "leakage" in text
    assert h["warnings"][0].startswith("0 exact and") or "different labels" in h["warnings"][0]


def test_trainability_helpers() -> None:
    assert MIN_IMAGES_TO_TRAIN == 2
    assert untrainable_classes({"a": 1, "b": 2, "c": 0}) == ["a", "c"]
    with pytest.raises(ValueError, match=r"fewer than 2 images: 'a' \(1\)"):
        check_trainable({"a": 1, "b": 5})
    check_trainable({"a": 2, "b": 5})


def _items(n_per_class: dict[str, int], group_size: int = 1) -> list[SplitItem]:
    items = []
    for label, n in n_per_class.items():
        for i in range(n):
            items.append(SplitItem(label=label, group=f"{label}-{i // group_size}" if group_size > 1 else None))
    return items


def test_stratified_fractions_and_seed() -> None:
    items = _items({"a": 200, "b": 100})
    r = assign_splits(items, seed=0)
    assert r.config["counts"] == {"train": 210, "val": 45, "test": 45}
    by = {(it.label, s) for it, s in zip(items, r.splits)}
    assert len(by) == 6
    assert assign_splits(items, seed=0).splits == r.splits
    assert assign_splits(items, seed=1).splits != r.splits


def test_groups_and_clusters_never_span_splits() -> None:
    items = _items({"a": 120, "b": 90}, group_size=5)
    for i, it in enumerate(items):
        it.cluster = (i // 10) if i % 10 in (4, 5) else None  # a duplicate pair bridging two groups
    r = assign_splits(items, seed=3)
    comp: dict[str, set[str]] = {}
    for it, s in zip(items, r.splits):
        comp.setdefault(str(it.group), set()).add(s)
        if it.cluster is not None:
            comp.setdefault(f"c{it.cluster}", set()).add(s)
    assert all(len(v) == 1 for v in comp.values())
    assert set(r.splits) == {"train", "val", "test"}


@pytest.mark.parametrize("n, expect_train_at_least", [(1, 1), (2, 2), (3, 1), (4, 1), (5, 1)])
def test_tiny_classes(n: int, expect_train_at_least: int) -> None:
    items = _items({"big": 50, "tiny": n})
    for seed in range(5):
        r = assign_splits(items, seed=seed)
        tiny = [s for it, s in zip(items, r.splits) if it.label == "tiny"]
        assert tiny.count("train") >= expect_train_at_least


def test_tiny_class_in_one_big_group_still_gets_train() -> None:
    # Class c's images all share groups with majority-b units that land in val/test.
    items = [SplitItem("b", group=f"g{i % 2}") for i in range(4)] + [SplitItem("c", group="g1") for _ in range(3)]
    items += [SplitItem("a") for _ in range(40)]
    for seed in range(5):
        r = assign_splits(items, seed=seed)
        assert any(s == "train" for it, s in zip(items, r.splits) if it.label == "c")


def test_user_splits_respected_and_val_carved_from_train() -> None:
    items = [SplitItem("a" if i % 2 else "b", user_split="train") for i in range(100)]
    items += [SplitItem("a" if i % 2 else "b", user_split="test") for i in range(20)]
    r = assign_splits(items, seed=0)
    assert r.config["mode"] == "user+carved" and r.config["carved_from_train"] == ["val"]
    assert r.splits[100:] == ["test"] * 20
    assert r.splits[:100].count("val") == pytest.approx(100 * 0.15 / 0.85, abs=2)
    full = [SplitItem("a", user_split=s) for s in ("train", "val", "test")] * 3
    assert assign_splits(full).splits == [it.user_split for it in full]


def test_bad_split_inputs() -> None:
    with pytest.raises(ValueError, match="no 'train' split"):
        assign_splits([SplitItem("a", user_split="test"), SplitItem("b", user_split="val")])
    with pytest.raises(ValueError, match="have no split while others do"):
        assign_splits([SplitItem("a", user_split="train"), SplitItem("b")])
    with pytest.raises(ValueError, match="sum to 1"):
        validate_fractions((0.5, 0.5, 0.5))


def test_duplicate_clusters_exact_and_near() -> None:
    recs = [Rec("x", _hex(0), "a"), Rec("x", _hex(0), "a"), Rec("y", _hex(0b111), "a"), Rec("z", _hex(2**63 - 1), "a")]
    assert duplicate_clusters(recs) == [0, 0, 0, 3]
    assert duplicate_clusters(recs, near_threshold=None) == [0, 0, 2, 3]
    assert duplicate_clusters(recs, near_threshold=2) == [0, 0, 2, 3]


def test_optional_fields_type() -> None:
    it = SplitItem("a")
    assert it.group is None and it.cluster is None and it.user_split is None
    x: str | None = it.user_split
    assert x is None


# --- near duplicates confirmed by pixels, on the shared datasets -------------------------
# What the report must and must not call a near duplicate. "different" pairs are real
# perceptual-hash matches (distance <= NEAR_DUP_THRESHOLD) between visibly different images:
# the hash alone groups them (the old false alarm), the pixel check must not. "copies" are
# made here from one file of each dataset (resized + re-encoded, saved as PNG, slightly
# brightened) and must be grouped with their original.
HASH_ALIKE_BUT_DIFFERENT = {
    "mednist_3k": [("HeadCT/002494.jpeg", "HeadCT/007426.jpeg"),  # correlation 0.28
                   ("AbdomenCT/001001.jpeg", "HeadCT/005329.jpeg"),  # different labels: no "conflict"
                   ("HeadCT/001483.jpeg", "HeadCT/003944.jpeg")],
    "beans": [], "rice_leaf_ph": [], "hymenoptera": [],  # no hash matches between different images
}
COPY_SOURCE = {"mednist_3k": "Hand/000748.jpeg", "beans": "train/healthy", "rice_leaf_ph": "blast",
               "hymenoptera": "train/bees"}


@dataclass
class StoredRec(Rec):
    store_path: str = ""


def _stored(path: Path, label: str) -> StoredRec:
    import hashlib

    import imagehash

    from core.images import decode

    d = decode(path)
    return StoredRec(hashlib.sha256(path.read_bytes()).hexdigest(), str(imagehash.phash(d.image)), label,
                     width=d.width, height=d.height, mode=d.mode, original_name=path.name, store_path=str(path))


def _copies(src: Path, out: Path) -> list[Path]:
    from PIL import Image, ImageEnhance

    from core.images import load_rgb

    img = load_rgb(src)
    small = img.resize((max(16, img.width // 2), max(16, img.height // 2)))
    paths = [out / "half.jpg", out / "same.png", out / "brighter.jpg"]
    small.save(paths[0], quality=70)
    img.save(paths[1])
    ImageEnhance.Brightness(img).enhance(1.05).save(paths[2], quality=90)
    assert isinstance(img, Image.Image)
    return paths


@pytest.mark.parametrize("name", sorted(HASH_ALIKE_BUT_DIFFERENT))
def test_near_duplicates_on_shared_datasets(name: str, tmp_path: Path) -> None:
    from conftest import SHARED_DATASETS

    from core.health import find_duplicates, store_signatures

    root = SHARED_DATASETS / name
    if not root.is_dir():
        pytest.skip(f"shared dataset {name} not present")
    src = root / COPY_SOURCE[name]
    if src.is_dir():
        src = sorted(p for p in src.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[0]
    copies = _copies(src, tmp_path)
    recs = [_stored(src, "orig")] + [_stored(p, "orig") for p in copies]
    for a, b in HASH_ALIKE_BUT_DIFFERENT[name]:
        ra, rb = _stored(root / a, a.split("/")[0]), _stored(root / b, b.split("/")[0])
        assert (int(ra.phash, 16) ^ int(rb.phash, 16)).bit_count() <= NEAR_DUP_THRESHOLD  # a real hash match
        recs += [ra, rb]
    sigs = store_signatures("/")
    clusters = duplicate_clusters(recs, signatures=sigs)
    assert len(set(clusters[:4])) == 1, "resized / re-encoded / brightened copies must be grouped"
    assert len(set(clusters[4:])) == len(recs) - 4, "visibly different images must stay apart"
    assert not set(clusters[:4]) & set(clusters[4:])
    dups = find_duplicates(recs, signatures=sigs)
    assert dups["near_groups"] == 1 and dups["near_label_conflict_groups"] == 0 and dups["pixel_checked"]
    if HASH_ALIKE_BUT_DIFFERENT[name]:  # the hash alone would have raised the false alarm
        assert find_duplicates(recs)["near_groups"] > 1


def test_cell_crops_of_different_colour_are_not_duplicates(tmp_path: Path) -> None:
    """A pale red cell and a purple cell of the same shape: the hash matches, the colours do not."""
    from PIL import Image, ImageDraw

    from core.health import pixel_signature, pixel_similarity, same_picture

    def cell(fill: tuple[int, int, int]) -> Image.Image:
        img = Image.new("RGB", (100, 100), (236, 214, 220))
        ImageDraw.Draw(img).ellipse((22, 20, 80, 78), fill=fill)
        return img

    import imagehash

    red, purple = cell((222, 120, 130)), cell((120, 60, 160))
    assert imagehash.phash(red) - imagehash.phash(purple) <= NEAR_DUP_THRESHOLD  # the hash calls them alike
    corr, diff = pixel_similarity(pixel_signature(red), pixel_signature(purple))
    assert diff > NEAR_DUP_MAX_COLOUR_DIFF and not same_picture(pixel_signature(red), pixel_signature(purple))
    assert same_picture(pixel_signature(red), pixel_signature(red.resize((60, 60)).resize((100, 100))))
