"""Fixes from the health report, each creating a new version of a dataset.

A fix never edits a dataset in place: it reads the dataset's image rows, works out the new
set (images dropped, moved to another split, relabelled), and writes a NEW dataset whose
image rows point at the same content-addressed store files (nothing is copied), with its
health report recomputed and a ``dataset_versions`` row saying which fix, its parameters,
which images changed, by whom and when. Runs keep pointing at the version they trained on.

A fix that finds nothing to do (no duplicates, an unknown file...) raises ``FixError`` with
a plain message and writes nothing.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import PurePosixPath
from typing import Any

from sqlalchemy.orm import Session

from core.health import build_health, duplicate_clusters
from core.ingest import ImageRecord, display_name, store_lock
from core.splits import (
    DEFAULT_FRACTIONS,
    SPLITS,
    PatternSuggestion,
    SplitItem,
    assign_splits,
    groups_from_pattern,
    resolve_cross_split,
    suggest_group_patterns,
)
from storage import repositories as repo
from storage.models import Dataset, DatasetVersion, utcnow
from workbench.datasets import DatasetError, DatasetInfo, _get_row, check_name
from workbench.settings import Settings, service_context

LEAKAGE_MODES = {"train": "keep each group in train only", "cluster": "keep each group whole in one split"}


class FixError(DatasetError):
    """A fix that cannot be applied (nothing to fix, unknown file or label...); nothing was changed."""


@dataclass(frozen=True)
class FixResult:
    dataset: DatasetInfo  # the new version
    version: int
    parent_name: str
    summary: str  # "3 duplicate images removed"
    change: dict[str, Any]

    @property
    def sentence(self) -> str:
        return f"Created {self.dataset.name}: {self.summary}."


@dataclass(frozen=True)
class VersionInfo:
    dataset_id: int
    name: str
    version: int
    root_name: str
    summary: str
    parent_version: int | None  # None: the first version, or its parent was deleted
    created_by: str
    created_at: datetime
    change: dict[str, Any] = field(default_factory=dict)

    @property
    def sentence(self) -> str:
        """'Version 2 of beans: 3 duplicate images removed, from version 1'."""
        text = f"Version {self.version} of {self.root_name}: {self.summary}"
        if self.version > 1:
            text += f", from version {self.parent_version}" if self.parent_version else \
                ", from a version since deleted"
        return text


@dataclass
class _Plan:
    records: list[ImageRecord]
    summary: str
    details: dict[str, Any]
    split_config: dict[str, Any] | None = None  # None: the parent's, with new counts
    warnings: list[str] = field(default_factory=list)


def _entry(r: ImageRecord, **extra: Any) -> dict[str, Any]:
    return {"name": r.original_name, "label": r.label, "split": r.split, **extra}


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


# --- the fixes: pure functions from the dataset's images to the new version's ------------

def _drop_exact_duplicates(ds: Dataset, records: list[ImageRecord]) -> _Plan:
    by_sha: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        by_sha[r.sha256].append(i)
    groups = [idx for idx in by_sha.values() if len(idx) > 1]
    if not groups:
        raise FixError(f"{ds.name} has no exact duplicate images: nothing to remove")
    conflicting = [g for g in groups if len({records[i].label for i in g}) > 1]
    fixable = [g for g in groups if g not in conflicting]
    if not fixable:
        raise FixError(f"all {len(groups)} groups of exact duplicates in {ds.name} carry different labels; "
                       "decide which label is right and relabel or exclude those files instead")
    drop: set[int] = set()
    kept = []
    for g in fixable:
        # Keep the copy in train (dropping the held-out copies also ends their leakage), then the first.
        keep = min(g, key=lambda i: (SPLITS.index(records[i].split), i))
        drop.update(i for i in g if i != keep)
        kept.append(_entry(records[keep], dropped=[records[i].original_name for i in g if i != keep]))
    details: dict[str, Any] = {"dropped": [_entry(records[i]) for i in sorted(drop)], "kept": kept}
    warnings = []
    if conflicting:
        details["left_alone"] = [[records[i].original_name for i in g] for g in conflicting]
        warnings.append(f"{_plural(len(conflicting), 'group')} of exact duplicates with different labels were "
                        "left alone: relabel or exclude those files.")
    return _Plan([r for i, r in enumerate(records) if i not in drop],
                 f"{_plural(len(drop), 'duplicate image')} removed", details, warnings=warnings)


def _leaking_clusters(ds: Dataset, records: Sequence[ImageRecord]) -> list[int | None]:
    """Cluster id per image: exact duplicates, and the near-duplicate groups the health report
    lists (confirmed there), joined by content hash. None: not in any group."""
    shas = sorted({r.sha256 for r in records})
    index = {s: i for i, s in enumerate(shas)}
    parent = list(range(len(shas)))

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    grouped = Counter(r.sha256 for r in records)
    in_group = {s for s, n in grouped.items() if n > 1}
    for g in (ds.health or {}).get("duplicates", {}).get("near", []):
        members = [f["sha256"] for f in g.get("files", []) if f.get("sha256") in index]
        in_group.update(members)
        for s in members[1:]:
            a, b = find(index[members[0]]), find(index[s])
            parent[max(a, b)] = min(a, b)
    return [find(index[r.sha256]) if r.sha256 in in_group else None for r in records]


def _resolve_leakage(ds: Dataset, records: list[ImageRecord], mode: str) -> _Plan:
    if mode not in LEAKAGE_MODES:
        raise FixError(f"unknown way to resolve leakage {mode!r}; use 'train' (keep each group in train only) "
                       "or 'cluster' (keep each group whole in one split)")
    clusters = _leaking_clusters(ds, records)
    splits = resolve_cross_split([r.split for r in records], clusters, mode)
    moved = [i for i, r in enumerate(records) if splits[i] != r.split]
    if not moved:
        raise FixError(f"no duplicate or near-duplicate images of {ds.name} span two splits: no leakage to resolve")
    n_groups = len({clusters[i] for i in moved})
    details = {"moved": [_entry(records[i], to=splits[i]) for i in moved]}
    out = [replace(r, split=s) for r, s in zip(records, splits)]
    where = "to train" if mode == "train" else "so each group sits in one split"
    return _Plan(out, f"{_plural(n_groups, 'leaking group')} resolved, {_plural(len(moved), 'image')} "
                 f"moved {where}", details)


def _find(records: Sequence[ImageRecord], name: str, ds: Dataset) -> int:
    """Index of the image called ``name`` (its path in the upload, or its file name if unique)."""
    exact = [i for i, r in enumerate(records) if r.original_name == name]
    if exact:
        return exact[0]
    base = [i for i, r in enumerate(records) if PurePosixPath(r.original_name).name == name]
    if len(base) == 1:
        return base[0]
    if base:
        raise FixError(f"{len(base)} images of {ds.name} are called {name!r} (e.g. "
                       f"{records[base[0]].original_name!r}); give the path as shown in the report")
    raise FixError(f"{ds.name} has no image called {name!r}")


def _exclude(ds: Dataset, records: list[ImageRecord], names: Sequence[str]) -> _Plan:
    names = [n.strip() for n in names if n and n.strip()]
    if not names:
        raise FixError("no file names given: name the images to exclude")
    unknown = [n for n in names if not _known(records, n)]
    if unknown:
        shown = ", ".join(repr(n) for n in unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise FixError(f"{ds.name} has no image called {shown}; nothing was excluded")
    drop = sorted({_find(records, n, ds) for n in names})
    gone = set(drop)
    return _Plan([r for i, r in enumerate(records) if i not in gone],
                 f"{_plural(len(drop), 'image')} excluded", {"dropped": [_entry(records[i]) for i in drop]})


def _known(records: Sequence[ImageRecord], name: str) -> bool:
    return any(r.original_name == name or PurePosixPath(r.original_name).name == name for r in records)


def _relabel(ds: Dataset, records: list[ImageRecord], name: str, label: str) -> _Plan:
    if label not in ds.classes:
        raise FixError(f"{label!r} is not a class of {ds.name} (its classes: {', '.join(ds.classes)})")
    i = _find(records, name, ds)
    r = records[i]
    if r.label == label:
        raise FixError(f"{r.original_name!r} is already labelled {label!r}: nothing to change")
    out = list(records)
    out[i] = replace(r, label=label)
    return _Plan(out, f"{PurePosixPath(r.original_name).name} relabelled from {r.label} to {label}",
                 {"relabelled": [_entry(r, to=label)]})


def _resplit_by_group(ds: Dataset, records: list[ImageRecord], pattern: str, seed: int,
                      fractions: tuple[float, float, float]) -> _Plan:
    try:
        groups = groups_from_pattern([r.original_name for r in records], pattern)
    except ValueError as e:
        raise FixError(str(e)) from None
    distinct = {g for g in groups if g is not None}
    if len(distinct) < 2:
        raise FixError(f"the group pattern {pattern!r} finds only one group ({next(iter(distinct))!r}) in the file "
                       f"names of {ds.name}: everything would land in one split")
    clusters = duplicate_clusters(records)  # duplicates stay together too
    items = [SplitItem(label=r.label, group=g, cluster=c) for r, g, c in zip(records, groups, clusters)]
    split = assign_splits(items, fractions=fractions, seed=seed)
    unmatched = sum(g is None for g in groups)
    out = [replace(r, split=s, group=g)
           for r, s, g in zip(records, split.splits, groups)]
    moved = [i for i, r in enumerate(records) if split.splits[i] != r.split]
    config = dict(split.config)
    config["grouping"] = {"csv_groups": False, "group_regex": pattern, "num_groups": len(distinct),
                          "regex_unmatched": unmatched, "duplicates_kept_together": "exact+near"}
    warnings = list(split.warnings)
    if unmatched:
        warnings.append(f"the group pattern found no group in {_plural(unmatched, 'file name')}; each of those "
                        "images is its own group")
    return _Plan(out, f"re-split by {_plural(len(distinct), 'group')} from the file names, "
                 f"{_plural(len(moved), 'image')} changed split",
                 {"moved": [_entry(records[i], to=split.splits[i]) for i in moved]}, config, warnings)


# --- creating the version ----------------------------------------------------------------

def _record(im: Any) -> ImageRecord:
    return ImageRecord(sha256=im.sha256, store_path=im.store_path, phash=im.phash, width=im.width,
                       height=im.height, mode=im.mode, label=im.label, split=im.split, group=im.group,
                       original_name=im.original_name)


def _derive(name_or_id: str | int, fix: str, params: dict[str, Any],
            plan_fn: Callable[[Dataset, list[ImageRecord]], _Plan], *, by: str, new_name: str | None,
            settings: Settings | None) -> FixResult:
    s, Session_ = service_context(settings)
    # The shared store lock: a delete of the parent cannot unlink files these rows will use.
    with store_lock(s.data_dir, exclusive=False), Session_.begin() as session:
        ds = _get_row(session, name_or_id)
        plan = plan_fn(ds, [_record(im) for im in repo.images_for_dataset(session, ds.id)])
        classes = sorted({r.label for r in plan.records})
        if len(classes) < 2:
            raise FixError(f"after this change {ds.name} would have {len(classes)} class(es) left; "
                           "a dataset needs at least 2")
        pv = repo.get_dataset_version(session, ds.id)
        root_id, root_name = (pv.root_id, pv.root_name) if pv else (ds.id, ds.name)
        version = max([v.version for v in repo.dataset_versions_of_root(session, root_id)] + [1]) + 1
        name = check_name(new_name or f"{root_name} v{version}")
        if repo.get_dataset_by_name(session, name) is not None:
            raise FixError(f"a dataset named {name!r} already exists; choose another name for the new version")
        config = dict(plan.split_config if plan.split_config is not None else ds.split_config)
        counts = Counter(r.split for r in plan.records)
        config["counts"] = {k: counts.get(k, 0) for k in SPLITS}
        health = build_health(plan.records, skipped=ds.skipped, extra_warnings=plan.warnings)
        health["warnings"] = [display_name(w) for w in health.get("warnings", [])]
        new = repo.add_dataset(session, name=name, source=ds.source, classes=classes, health=health,
                               split_config=config, skipped=list(ds.skipped), num_images=len(plan.records))
        repo.add_images(session, new.id, (r.as_row() for r in plan.records))
        change = {"fix": fix, "params": params, "summary": plan.summary, "parent_id": ds.id,
                  "parent_name": ds.name, "by": by, "at": utcnow().isoformat(), **plan.details}
        session.add(DatasetVersion(dataset_id=new.id, parent_id=ds.id, root_id=root_id, root_name=root_name,
                                   version=version, change=change, created_by=by[:200]))
        session.flush()
        return FixResult(DatasetInfo.from_row(new), version, ds.name, plan.summary, change)


def drop_exact_duplicates(name_or_id: str | int, *, by: str, new_name: str | None = None,
                          settings: Settings | None = None) -> FixResult:
    """New version keeping one image of each group of identical files (the one in train first)."""
    return _derive(name_or_id, "drop_exact_duplicates", {}, _drop_exact_duplicates,
                   by=by, new_name=new_name, settings=settings)


def resolve_leakage(name_or_id: str | int, mode: str = "train", *, by: str, new_name: str | None = None,
                    settings: Settings | None = None) -> FixResult:
    """New version where no exact or (reported) near-duplicate group spans two splits."""
    return _derive(name_or_id, "resolve_leakage", {"mode": mode},
                   lambda ds, rs: _resolve_leakage(ds, rs, mode), by=by, new_name=new_name, settings=settings)


def exclude_files(name_or_id: str | int, names: Sequence[str], *, by: str, new_name: str | None = None,
                  settings: Settings | None = None) -> FixResult:
    """New version without the named images."""
    return _derive(name_or_id, "exclude_files", {"files": list(names)},
                   lambda ds, rs: _exclude(ds, rs, names), by=by, new_name=new_name, settings=settings)


def relabel_file(name_or_id: str | int, name: str, label: str, *, by: str, new_name: str | None = None,
                 settings: Settings | None = None) -> FixResult:
    """New version where the named image carries ``label`` (one of the dataset's classes)."""
    return _derive(name_or_id, "relabel_file", {"file": name, "label": label},
                   lambda ds, rs: _relabel(ds, rs, name, label), by=by, new_name=new_name, settings=settings)


def resplit_by_group(name_or_id: str | int, pattern: str, *, seed: int = 0,
                     fractions: tuple[float, float, float] = DEFAULT_FRACTIONS, by: str,
                     new_name: str | None = None, settings: Settings | None = None) -> FixResult:
    """New version split again so that images whose names share the pattern's group (a patient,
    a field) stay in one split; duplicates stay together too."""
    return _derive(name_or_id, "resplit_by_group", {"pattern": pattern, "seed": seed, "fractions": list(fractions)},
                   lambda ds, rs: _resplit_by_group(ds, rs, pattern, seed, fractions),
                   by=by, new_name=new_name, settings=settings)


def group_pattern_suggestions(name_or_id: str | int, *, settings: Settings | None = None) -> list[PatternSuggestion]:
    """Group patterns that fit this dataset's file names, with how many groups each gives."""
    _, Session_ = service_context(settings)
    with Session_() as session:
        ds = _get_row(session, name_or_id)
        rows = repo.image_names_and_labels(session, ds.id)
        return suggest_group_patterns([name for name, _ in rows], [label for _, label in rows])


# --- history and leakage, for pages, the CLI and the evaluation ----------------------------

def version_history(name_or_id: str | int, *, settings: Settings | None = None) -> list[VersionInfo]:
    """Every version in this dataset's family (first ingest and the fixes made from it), oldest first."""
    _, Session_ = service_context(settings)
    with Session_() as session:
        ds = _get_row(session, name_or_id)
        pv = repo.get_dataset_version(session, ds.id)
        root_id, root_name = (pv.root_id, pv.root_name) if pv else (ds.id, ds.name)
        rows = repo.dataset_versions_of_root(session, root_id)
        number = {v.dataset_id: v.version for v in rows}
        out = []
        root = repo.get_dataset(session, root_id)
        if root is not None:
            number[root.id] = 1
            out.append(VersionInfo(root.id, root.name, 1, root_name, f"{_plural(root.num_images, 'image')} uploaded",
                                   None, "", root.created_at))
        for v in rows:
            ds_v = repo.get_dataset(session, v.dataset_id)
            out.append(VersionInfo(v.dataset_id, ds_v.name if ds_v else "", v.version, v.root_name,
                                   str(v.change.get("summary", v.change.get("fix", ""))),
                                   number.get(v.parent_id) if v.parent_id is not None else None,
                                   v.created_by, v.created_at, dict(v.change)))
        return out


def leaked_test_flags(session: Session, dataset_id: int) -> list[bool]:
    """Per test image (in id order, as the evaluation reads them): does an identical file, or a
    near-duplicate the health report lists, sit in train or val?"""
    ds = repo.get_dataset(session, dataset_id)
    if ds is None:
        return []
    records = [_record(im) for im in repo.images_for_dataset(session, dataset_id)]
    clusters = _leaking_clusters(ds, records)
    seen_outside = {c for r, c in zip(records, clusters) if c is not None and r.split != "test"}
    return [c is not None and c in seen_outside for r, c in zip(records, clusters) if r.split == "test"]


def leakage_free_sentence(metrics: dict[str, Any]) -> str | None:
    """One plain sentence on the score without the leaked test images (None: no leakage)."""
    lf = metrics.get("leakage_free")
    if not lf:
        return None
    n, excluded = int(lf.get("n", 0)), int(lf.get("excluded", 0))
    total = n + excluded
    if not n:
        return (f"All {total} test images have a copy or near-copy among the training or validation images, so "
                "this score says nothing about new images: fix the leakage on the Datasets page.")
    return (f"{excluded} of {total} test images have a copy or near-copy among the training or validation "
            f"images; on the other {n} the accuracy is {lf['accuracy']:.0%} (with them: "
            f"{metrics.get('accuracy', 0):.0%}).")
