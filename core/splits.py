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

import json
import random
import re
import subprocess
import sys
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import PurePosixPath
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


# --- fixes: leaking clusters, group patterns -------------------------------------------

def resolve_cross_split(splits: Sequence[str], clusters: Sequence[int | None], mode: str) -> list[str]:
    """New split per image so no cluster (duplicate / near-duplicate id) spans two splits.

    ``mode`` "train": every image of a cluster that spans splits goes to train (nothing of it
    is held out). "cluster": the whole cluster goes to the one split already holding most of
    its images (fewest moves; ties go to train, then val). Images without a cluster stay.
    """
    if mode not in ("train", "cluster"):
        raise ValueError(f"unknown way to resolve leakage {mode!r}; use 'train' or 'cluster'")
    members: dict[int, list[int]] = defaultdict(list)
    for i, c in enumerate(clusters):
        if c is not None:
            members[c].append(i)
    out = list(splits)
    for idx in members.values():
        held = Counter(splits[i] for i in idx)
        if len(held) < 2:
            continue
        target = "train" if mode == "train" else max(
            SPLITS, key=lambda s: (held.get(s, 0), -SPLITS.index(s)))
        for i in idx:
            out[i] = target
    return out


MAX_PATTERN_LEN = 200  # a group pattern longer than this is refused (nobody types more)
MAX_NAME_LEN = 255  # only this much of a file name is matched (bounds the work per name)
PATTERN_TIMEOUT_S = 5.0


class GroupPatternError(ValueError):
    """A group pattern that cannot be used; ``str(err)`` is a user-facing message."""


@dataclass(frozen=True)
class PatternSuggestion:
    pattern: str
    description: str
    groups: int  # distinct groups it finds
    matched: int  # file names it finds a group in
    examples: list[str]


def check_group_pattern(pattern: str) -> re.Pattern[str]:
    """Compile a user's group pattern or raise GroupPatternError saying what is wrong."""
    if not pattern or not pattern.strip():
        raise GroupPatternError("the group pattern is empty; e.g. '^([^_]+)_' takes the text before the first _")
    if len(pattern) > MAX_PATTERN_LEN:
        raise GroupPatternError(f"the group pattern is {len(pattern)} characters long; the limit is "
                                f"{MAX_PATTERN_LEN}")
    try:
        compiled = re.compile(pattern)
    except re.error as e:
        raise GroupPatternError(f"the group pattern {pattern!r} is not a valid regular expression: {e}") from None
    if compiled.groups < 1:
        raise GroupPatternError(f"the group pattern {pattern!r} has no group in brackets: put the part of the "
                                "name that identifies the patient or field in ( ), e.g. '^([^_]+)_'")
    return compiled


def _base_name(name: str) -> str:
    return PurePosixPath(name).name[:MAX_NAME_LEN]


# Run in a separate interpreter (-I: no site, no user code): a pattern that backtracks
# catastrophically is stopped by killing the process; Python's re has no timeout.
_MATCHER = (
    "import json, re, sys\n"
    "job = json.load(sys.stdin)\n"
    "rx = re.compile(job['pattern'])\n"
    "out = []\n"
    "for n in job['names']:\n"
    "    m = rx.search(n)\n"
    "    out.append(m.group(1) if m and m.group(1) else None)\n"
    "json.dump(out, sys.stdout)\n"
)


def groups_from_pattern(names: Sequence[str], pattern: str, *,
                        timeout_s: float = PATTERN_TIMEOUT_S) -> list[str | None]:
    """The first captured group of ``pattern`` in each file's base name (None: no match).

    The pattern runs in a separate Python process stopped after ``timeout_s`` seconds, so a
    pattern that would take forever is refused with a message instead of hanging the app.
    """
    check_group_pattern(pattern)
    job = json.dumps({"pattern": pattern, "names": [_base_name(n) for n in names]})
    try:
        done = subprocess.run([sys.executable, "-I", "-c", _MATCHER], input=job, capture_output=True,
                              text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        raise GroupPatternError(
            f"the group pattern {pattern!r} took longer than {timeout_s:g} s on {len(names)} file names and was "
            "stopped; simplify it (avoid repeats inside repeats such as '(a+)+')") from None
    if done.returncode != 0:
        raise GroupPatternError(f"the group pattern {pattern!r} could not be applied: "
                                f"{done.stderr.strip().splitlines()[-1] if done.stderr.strip() else 'unknown error'}")
    found: list[str | None] = json.loads(done.stdout)
    if not any(found):
        example = _base_name(names[0]) if names else ""
        raise GroupPatternError(f"the group pattern {pattern!r} finds no group in any file name "
                                f"(e.g. {example!r}); try one of the suggested patterns")
    return found


# Built-in patterns (linear, safe to run in-process), tried on the file names for suggestions.
_SUGGESTED: tuple[tuple[str, str], ...] = (
    (r"^([^_]+)_", "the text before the first _"),
    (r"^([^-]+)-", "the text before the first -"),
    (r"^([^_\-. ]+)[_\-. ]", "the text before the first _, -, . or space"),
    (r"^(\d+)", "the number at the start"),
    (r"^([A-Za-z]+\d+)", "the letters and number at the start"),
    (r"^(.+)_[^_]*$", "everything before the last _"),
    (r"^(.+)-[^-]*$", "everything before the last -"),
)


def suggest_group_patterns(names: Sequence[str], labels: Sequence[str] = (), *,
                           max_examples: int = 3) -> list[PatternSuggestion]:
    """Patterns that split these file names into groups: each finds a group in most names
    (at least half), more groups than there are classes (fewer would be the class itself,
    as in 'healthy_0001.jpg') and fewer groups than files. Best first: most names matched,
    then fewest groups."""
    base = [_base_name(n) for n in names]
    out: list[PatternSuggestion] = []
    seen: set[tuple[str | None, ...]] = set()
    for pattern, description in _SUGGESTED:
        rx = re.compile(pattern)
        found = []
        for n in base:
            m = rx.search(n)
            found.append(m.group(1) if m and m.group(1) else None)
        matched = sum(g is not None for g in found)
        groups = Counter(g for g in found if g is not None)
        if matched * 2 < len(base) or not max(1, len(set(labels))) < len(groups) < matched:
            continue
        key = tuple(found)
        if key in seen:  # another pattern already gives exactly these groups
            continue
        seen.add(key)
        out.append(PatternSuggestion(pattern, description, len(groups), matched,
                                     [g for g, _ in groups.most_common(max_examples)]))
    return sorted(out, key=lambda s: (-s.matched, s.groups))
