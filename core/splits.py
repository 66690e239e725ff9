"""Leakage-safe train/val/test splits.

Unit of assignment: a connected component of images linked by the same *group*
(patient, plant, field... from a CSV column or a filename regex) or by duplicate
clusters (exact sha256 or near phash). A unit never spans two splits.

Units are stratified by their majority label, shuffled with a seeded RNG, and assigned
largest-first to the split whose target count is furthest from being met.

Tiny classes: a class with 1 or 2 images goes entirely to train (there is nothing to
hold out; the health report flags it, and training refuses classes under
MIN_IMAGES_TO_TRAIN). A class with >= 3 images is guaranteed at least one train image.
"""
from __future__ import annotations

import random
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

SPLITS = ("train", "val", "test")
DEFAULT_FRACTIONS = (0.7, 0.15, 0.15)


@dataclass
class SplitItem:
    label: str
    group: str | None = None  # images with the same group stay in one split
    cluster: int | None = None  # duplicate cluster id (same meaning as group)
    user_split: str | None = None  # train|val|test if the user provided it


@dataclass
class SplitResult:
    splits: list[str]
    config: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def validate_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    if len(fractions) != 3:
        raise ValueError(f"split fractions must be 3 numbers (train, val, test), got {list(fractions)}")
    t, v, s = (float(x) for x in fractions)
    if min(t, v, s) < 0 or t <= 0 or abs(t + v + s - 1.0) > 1e-6:
        raise ValueError(
            f"split fractions must be >= 0, train > 0, and sum to 1; got {t:g}/{v:g}/{s:g}"
        )
    return t, v, s


def _units(items: Sequence[SplitItem], indices: Sequence[int]) -> list[list[int]]:
    """Connected components over shared group / cluster, restricted to ``indices``."""
    parent = {i: i for i in indices}

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    first: dict[tuple[str, Any], int] = {}
    for i in indices:
        for key in (("g", items[i].group), ("c", items[i].cluster)):
            if key[1] is None:
                continue
            j = first.setdefault(key, i)
            if j != i:
                ra, rb = find(i), find(j)
                if ra != rb:
                    parent[max(ra, rb)] = min(ra, rb)
    comps: dict[int, list[int]] = defaultdict(list)
    for i in indices:
        comps[find(i)].append(i)
    return list(comps.values())


def _assign(
    items: Sequence[SplitItem],
    indices: Sequence[int],
    fractions: dict[str, float],
    rng: random.Random,
) -> dict[int, str]:
    """Stratified, unit-preserving assignment of ``indices`` to the splits in ``fractions``."""
    names = [s for s in SPLITS if s in fractions and fractions[s] > 0]
    out: dict[int, str] = {}
    strata: dict[str, list[list[int]]] = defaultdict(list)
    for unit in _units(items, indices):
        labels = Counter(items[i].label for i in unit)
        # Majority label; ties broken by name so results are reproducible.
        major = sorted(labels.items(), key=lambda kv: (-kv[1], kv[0]))[0][0]
        strata[major].append(sorted(unit))
    for label in sorted(strata):
        units = sorted(strata[label])  # canonical order before the seeded shuffle
        rng.shuffle(units)
        units.sort(key=len, reverse=True)  # stable: keeps the shuffle among equal sizes
        total = sum(len(u) for u in units)
        target = {s: fractions[s] * total for s in names}
        count = {s: 0 for s in names}
        for unit in units:
            # Split with the largest remaining deficit; ties go to the earlier split (train).
            best = max(names, key=lambda s: (target[s] - count[s], -names.index(s)))
            for i in unit:
                out[i] = best
            count[best] += len(unit)
    return out


def _ensure_train_per_class(
    items: Sequence[SplitItem], assigned: dict[int, str], movable: set[int]
) -> list[str]:
    """Move the smallest movable unit into train for any class (>= 3 images) without train images."""
    moved: list[str] = []
    by_label: dict[str, list[int]] = defaultdict(list)
    for i in movable:
        by_label[items[i].label].append(i)
    for label in sorted(by_label):
        idx = by_label[label]
        if len(idx) < 3 or any(assigned[i] == "train" for i in idx):
            continue
        units = [u for u in _units(items, sorted(movable)) if any(items[i].label == label for i in u)]
        if not units:
            continue
        unit = min(units, key=lambda u: (len(u), u))
        for i in unit:
            assigned[i] = "train"
        moved.append(label)
    return moved


def assign_splits(
    items: Sequence[SplitItem],
    *,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    seed: int = 0,
) -> SplitResult:
    """Assign train/val/test to every item. Deterministic for a given seed and input order."""
    t, v, s = validate_fractions(fractions)
    rng = random.Random(seed)
    n = len(items)
    provided = {it.user_split for it in items if it.user_split is not None}
    bad = provided - set(SPLITS)
    if bad:
        raise ValueError(f"unknown split name(s) {sorted(bad)}; use train, val or test")
    warnings: list[str] = []
    config: dict[str, Any] = {
        "seed": seed,
        "fractions": {"train": t, "val": v, "test": s},
        "unit": "group + duplicate cluster",
    }

    if not provided:
        assigned = _assign(items, range(n), {"train": t, "val": v, "test": s}, rng)
        moved = _ensure_train_per_class(items, assigned, set(range(n)))
        config["mode"] = "stratified"
    else:
        unlabelled = [i for i, it in enumerate(items) if it.user_split is None]
        if unlabelled:
            raise ValueError(
                f"{len(unlabelled)} image(s) have no split while others do; give every image a "
                "split or none"
            )
        if "train" not in provided:
            raise ValueError(
                f"user-provided splits {sorted(provided)} have no 'train' split; "
                "provide a train folder/column value"
            )
        assigned = {i: str(it.user_split) for i, it in enumerate(items)}
        missing = [x for x in ("val", "test") if x not in provided]
        train_idx = [i for i in range(n) if assigned[i] == "train"]
        moved = []
        if missing:
            # Carve the missing split(s) out of train, keeping the requested proportions.
            want = {"train": t, "val": v if "val" in missing else 0.0, "test": s if "test" in missing else 0.0}
            denom = sum(want.values())
            carve = {k: w / denom for k, w in want.items() if w > 0}
            if len(carve) > 1:
                assigned.update(_assign(items, train_idx, carve, rng))
                moved = _ensure_train_per_class(items, assigned, set(train_idx))
            else:
                warnings.append(f"split fractions give 0 images to {', '.join(missing)}; left empty")
        config["mode"] = "user" if not missing else "user+carved"
        config["user_splits"] = sorted(provided)
        config["carved_from_train"] = missing
    if moved:
        config["moved_to_train"] = moved
    counts = Counter(assigned[i] for i in range(n))
    config["counts"] = {k: counts.get(k, 0) for k in SPLITS}
    for k in SPLITS:
        if n and counts.get(k, 0) == 0:
            warnings.append(f"the {k} split is empty")
    return SplitResult(splits=[assigned[i] for i in range(n)], config=config, warnings=warnings)
