"""What the Home and Datasets pages read: counts, samples, the import folder, and the health report
as typed fields (``HealthView``), built from the stored JSON in one place."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from storage.models import Dataset, Image, Run
from workbench.datasets import DatasetInfo
from workbench.paths import importable_folders
from workbench.settings import get_settings
from workbench.status import ACTIVE_RUN
from workbench.views.common import _db, count, number, record

SPLITS = ("train", "val", "test")
SIZE_LABELS = {"width": "width (px)", "height": "height (px)", "aspect_ratio": "width / height"}


@dataclass(frozen=True)
class OverviewCounts:
    datasets: int
    runs: int
    active: int


def overview_counts() -> OverviewCounts:
    """Three COUNT queries: fast at any size."""
    with _db()() as s:
        rows = lambda table, *where: s.scalar(select(func.count()).select_from(table).where(*where)) or 0  # noqa: E731
        return OverviewCounts(rows(Dataset), rows(Run), rows(Run, Run.status.in_(list(ACTIVE_RUN))))


@dataclass(frozen=True)
class ImageSample:
    path: Path  # absolute path of the stored file
    caption: str


def dataset_sample(dataset_id: int, classes: Sequence[str], per_class: int = 6) -> list[ImageSample]:
    """A stable sample of images per class (one LIMIT query per class: fast on 10k+ images)."""
    data_dir = get_settings().data_dir
    out: list[ImageSample] = []
    with _db()() as s:
        for label in classes:
            rows = s.execute(select(Image.store_path, Image.split)
                             .where(Image.dataset_id == dataset_id, Image.label == label)
                             .order_by(Image.sha256).limit(per_class)).all()  # content hash: stable, unbiased
            out.extend(ImageSample(data_dir / p, f"{label} · {split}") for p, split in rows)
    return out


def store_paths_for(dataset_id: int, shas: Sequence[str], limit: int = 500) -> dict[str, Path]:
    """Absolute stored file per sha256 for one dataset (a bounded IN query)."""
    shas = list(dict.fromkeys(shas))[:limit]
    if not shas:
        return {}
    data_dir = get_settings().data_dir
    with _db()() as s:
        rows = s.execute(select(Image.sha256, Image.store_path)
                         .where(Image.dataset_id == dataset_id, Image.sha256.in_(shas))).all()
    return {sha: data_dir / p for sha, p in rows}


@dataclass(frozen=True)
class ImportChoices:  # what the Datasets page can import from the server without a browser upload
    folder: Path  # the import dir (WORKBENCH_IMPORT_DIR)
    entries: tuple[str, ...]  # folders, zips and CSVs directly inside it


def import_choices() -> ImportChoices:
    settings = get_settings()
    return ImportChoices(settings.import_dir, tuple(p.name for p in importable_folders(settings)))


# --- the health report -----------------------------------------------------------------
@dataclass(frozen=True)
class DuplicateFile:
    name: str  # as uploaded ("cats/img1.jpg")
    label: str
    split: str
    sha256: str

    @property
    def caption(self) -> str:
        return f"{self.label} · {self.split} · {self.name.rsplit('/', 1)[-1]}"


@dataclass(frozen=True)
class DuplicateGroup:
    kind: str  # "exact" (identical files) or "near" (resized or re-saved copies)
    size: int
    cross_split: bool  # leakage: its files sit in more than one split
    label_conflict: bool
    splits: tuple[str, ...]
    files: tuple[DuplicateFile, ...]  # the first few (the report lists a bounded number)


@dataclass(frozen=True)
class Duplicates:
    exact_groups: int = 0
    near_groups: int = 0
    exact_cross_split_groups: int = 0
    near_cross_split_groups: int = 0
    pixel_checked: bool = False  # near copies confirmed pixel by pixel (older reports: fingerprint only)
    near_min_correlation: float = 0.95
    groups: tuple[DuplicateGroup, ...] = ()  # the listed groups, exact ones first

    @property
    def total_groups(self) -> int:
        return self.exact_groups + self.near_groups

    @property
    def leaking_groups(self) -> int:
        return self.exact_cross_split_groups + self.near_cross_split_groups


@dataclass(frozen=True)
class ClassLook:  # what one class's images look like (the shortcut check's per-class table)
    label: str
    images: int
    median_width: float | None
    median_height: float | None
    median_aspect: float | None
    median_brightness: float | None  # None: pixels were not read (older reports, or not sampled)
    median_saturation: float | None
    formats: dict[str, int]


@dataclass(frozen=True)
class ShortcutFactor:
    label: str  # "image size", "file format", ...
    accuracy: float  # cross-validated accuracy from this detail alone
    warn: bool


@dataclass(frozen=True)
class Shortcuts:
    per_class: tuple[ClassLook, ...] = ()
    factors: tuple[ShortcutFactor, ...] = ()
    baseline: float = 0.0  # always guessing the largest class
    folds: int = 5
    reason: str = ""  # why it was not checked ("" when it was)


@dataclass(frozen=True)
class ImageKind:
    kind: str  # "photo", "xray", ... ("" when the report made no guess)
    label: str
    reason: str


@dataclass(frozen=True)
class Sizes:
    spreads: dict[str, dict[str, float]]  # "width (px)" -> {"p0": .., "p50": .., "p100": ..}
    input_size: int | None
    smaller_than_input: int = 0


@dataclass(frozen=True)
class HealthView:  # ``Dataset.health`` as the pages read it; older reports get the defaults
    class_counts: dict[str, int]
    split_counts: dict[str, dict[str, int]]  # split -> class -> images
    imbalance_ratio: float  # largest class / smallest (1: balanced)
    duplicates: Duplicates
    shortcuts: Shortcuts
    image_kind: ImageKind
    sizes: Sizes
    modes: dict[str, int]  # colour mode -> images
    warnings: tuple[str, ...]
    max_resolution: int | None  # the images' own size caps a useful resolution (None: no cap known)

    @property
    def split_totals(self) -> dict[str, int]:
        return {split: sum(counts.values()) for split, counts in self.split_counts.items()}

    @property
    def train_images(self) -> int:
        return self.split_totals.get("train", 0)


def _duplicates(d: dict[str, Any]) -> Duplicates:
    groups = tuple(
        DuplicateGroup(kind, count(g.get("size")), bool(g.get("cross_split")), bool(g.get("label_conflict")),
                       tuple(g.get("splits") or ()),
                       tuple(DuplicateFile(str(f.get("name", "")), str(f.get("label", "")), str(f.get("split", "")),
                                           str(f.get("sha256", ""))) for f in g.get("files") or ()))
        for kind in ("exact", "near") for g in d.get(kind) or ())
    return Duplicates(count(d.get("exact_groups")), count(d.get("near_groups")),
                      count(d.get("exact_cross_split_groups")), count(d.get("near_cross_split_groups")),
                      bool(d.get("pixel_checked")), number(d.get("near_min_correlation")) or 0.95, groups)


def _shortcuts(d: dict[str, Any]) -> Shortcuts:
    per_class = tuple(ClassLook(str(label), count(r.get("images")), number(r.get("median_width")),
                                number(r.get("median_height")), number(r.get("median_aspect")),
                                number(r.get("median_brightness")), number(r.get("median_saturation")),
                                record(r.get("formats")))
                      for label, r in record(d.get("per_class")).items())
    factors = tuple(ShortcutFactor(str(f.get("label", "")), number(f.get("accuracy")) or 0.0, bool(f.get("warn")))
                    for f in d.get("factors") or ())
    return Shortcuts(per_class, factors, number(d.get("baseline")) or 0.0, count(d.get("folds")) or 5,
                     str(d.get("reason") or ""))


def health_view(health: dict[str, Any] | DatasetInfo | None) -> HealthView:
    """The one reader of the stored health report (``core.health``'s dict, or a dataset's)."""
    h = record(health.health if isinstance(health, DatasetInfo) else health)
    kind, sizes = record(h.get("image_kind")), record(h.get("sizes"))
    max_res = number(record(h.get("suggestion")).get("max_resolution"))
    return HealthView(
        class_counts={str(k): count(v) for k, v in record(h.get("class_counts")).items()},
        split_counts={str(s): {str(c): count(n) for c, n in record(v).items()}
                      for s, v in record(h.get("split_counts")).items()},
        imbalance_ratio=number(h.get("imbalance_ratio")) or 1.0,
        duplicates=_duplicates(record(h.get("duplicates"))), shortcuts=_shortcuts(record(h.get("shortcuts"))),
        image_kind=ImageKind(str(kind.get("kind") or ""), str(kind.get("label") or ""), str(kind.get("reason") or "")),
        sizes=Sizes({label: record(sizes.get(key)) for key, label in SIZE_LABELS.items() if sizes.get(key)},
                    count(sizes.get("input_size")) or None, count(sizes.get("smaller_than_input"))),
        modes={str(k): count(v) for k, v in record(h.get("modes")).items()},
        warnings=tuple(str(w) for w in h.get("warnings") or ()),
        max_resolution=int(max_res) if max_res is not None else None,
    )
