"""Shortcut warnings on real images: a class photographed differently must be named, a
dataset photographed one way must not be."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import SHARED_DATASETS

from core.health import build_health, store_signatures
from core.shortcuts import find_shortcuts, per_class_stats, shortcut_sentence

BEANS = SHARED_DATASETS / "beans" / "train"
PER_CLASS = 14


@dataclass
class Rec:
    sha256: str
    phash: str
    width: int
    height: int
    mode: str
    label: str
    split: str
    original_name: str
    store_path: str


def _rec(path: Path, label: str, split: str = "train") -> Rec:
    from core.images import decode

    d = decode(path)
    return Rec(hashlib.sha256(path.read_bytes()).hexdigest(), f"{hash(path.name) & (2**64 - 1):016x}",
               d.width, d.height, d.mode, label, split, path.name, str(path))


def _beans(classes: tuple[str, ...], out: Path | None = None, shrink: str | None = None,
           png: str | None = None) -> list[Rec]:
    from PIL import Image

    if not BEANS.is_dir():
        pytest.skip("shared beans dataset not present")
    recs = []
    for cls in classes:
        for i, f in enumerate(sorted((BEANS / cls).iterdir())[:PER_CLASS]):
            if out is not None and cls in (shrink, png):
                with Image.open(f) as im:
                    im = im.convert("RGB")
                    if cls == shrink:
                        im = im.resize((120, 120))
                    target = out / f"{cls}_{i}.{'png' if cls == png else 'jpg'}"
                    im.save(target)
                f = target
            recs.append(_rec(f, cls, "train" if i % 3 else "test"))
    return recs


def test_one_class_resized_small_is_named(tmp_path: Path) -> None:
    recs = _beans(("healthy", "bean_rust"), tmp_path, shrink="bean_rust")
    found = find_shortcuts(recs, store_signatures("/"))
    size = next(f for f in found["factors"] if f["factor"] == "size")
    assert size["warn"] and size["accuracy"] >= 0.9
    text = " ".join(found["warnings"])
    assert "The classes differ in image size: a model could tell them apart by size alone" in text
    assert "against 50 % by always guessing" in text
    stats = found["per_class"]
    assert stats["bean_rust"]["median_width"] == 120 and stats["healthy"]["median_width"] >= 300
    # And it reaches the report's warnings, in plain words.
    report = build_health(recs, signatures=store_signatures("/"))
    assert any(w.startswith("The classes differ in image size") for w in report["warnings"])


def test_one_class_saved_as_png_is_named(tmp_path: Path) -> None:
    recs = _beans(("healthy", "angular_leaf_spot"), tmp_path, png="healthy")
    found = find_shortcuts(recs)  # no pixels: size, shape, format and mode only
    assert [f["factor"] for f in found["factors"] if f["warn"]] == ["format"]
    assert "by file format alone" in found["warnings"][0]


def test_beans_as_photographed_do_not_warn() -> None:
    recs = _beans(("healthy", "angular_leaf_spot", "bean_rust"))
    found = find_shortcuts(recs, store_signatures("/"))
    assert found["checked"] and found["warnings"] == [], found["factors"]
    assert all(f["accuracy"] < 0.8 for f in found["factors"] if f["factor"] in ("size", "aspect", "format"))


def test_too_few_images_are_not_checked_and_say_why() -> None:
    recs = _beans(("healthy", "bean_rust"))[:PER_CLASS + 1]  # bean_rust has a single image
    found = find_shortcuts(recs)
    assert not found["checked"] and found["reason"] == "needs at least 2 classes with 2 images each"
    assert per_class_stats(recs)["bean_rust"]["images"] == 1


def test_sentence_rounds_to_whole_percent() -> None:
    s = shortcut_sentence("size", 0.8612, 0.3333)
    assert "(86 % correct from size only, against 33 % by always guessing the largest class)" in s
