"""Dataset service: ingest into the store, record in the DB, report, delete.

Files first, rows second: ``core.ingest`` stores images, then one short transaction
writes the dataset and its image rows, still under the store's shared lock (see
``core.ingest.store_lock``). If that transaction fails the files this ingest added are
removed again (unless another dataset references them meanwhile). A delete removes the
rows, then unlinks the files nobody references under the exclusive lock, so it can never
unlink a file an ingest has found but not yet recorded.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from core.ingest import (
    IngestLimits,
    IngestResult,
    ProgressFn,
    has_bidi_chars,
    ingest,
    store_lock,
    unsafe_name_chars,
)
from core.names import lookalike_problem
from core.splits import DEFAULT_FRACTIONS
from storage import repositories as repo
from storage.models import Dataset
from workbench.settings import Settings, service_context

MAX_NAME_LEN = 200
# How long a delete waits for running ingests to release the store before leaving the
# unreferenced files to the garbage collector (``workbench gc``, worker start).
DELETE_LOCK_WAIT_S = 5.0


class DatasetError(ValueError):
    """Bad request about datasets (unknown name, duplicate name...). User-facing message."""


@dataclass(frozen=True)
class DatasetInfo:
    id: int
    name: str
    created_at: datetime
    source: str
    num_images: int
    num_classes: int
    classes: list[str]
    health: dict[str, Any]
    split_config: dict[str, Any]
    skipped: list[dict[str, str]]

    @classmethod
    def from_row(cls, ds: Dataset) -> DatasetInfo:
        return cls(
            id=ds.id, name=ds.name, created_at=ds.created_at, source=ds.source,
            num_images=ds.num_images, num_classes=ds.num_classes, classes=list(ds.classes),
            health=dict(ds.health), split_config=dict(ds.split_config), skipped=list(ds.skipped),
        )


@dataclass(frozen=True)
class ImageInfo:
    id: int
    path: Path  # absolute path of the stored file
    label: str
    class_index: int
    split: str
    group: str | None
    original_name: str
    sha256: str
    width: int
    height: int
    mode: str


@dataclass(frozen=True)
class DeleteResult:
    name: str
    images: int
    files_removed: int
    files_left: int = 0  # unreferenced files left to the garbage collector (an ingest held the store)


def check_name(name: str) -> str:
    """The one check of a new dataset name (CLI, web UI, API, fixes' new versions): the name
    stripped, or DatasetError saying which character is wrong and why."""
    name = (name or "").strip()
    if not name:
        raise DatasetError("dataset name must not be empty")
    if len(name) > MAX_NAME_LEN:
        raise DatasetError(f"dataset name is longer than {MAX_NAME_LEN} characters")
    bad = unsafe_name_chars(name)
    if bad and has_bidi_chars(name):
        raise DatasetError(f"dataset name contains text-direction (bidi) control characters ({', '.join(bad)}), "
                           "which make a name look different from what it is; remove them")
    if bad:
        raise DatasetError(f"dataset name contains control characters ({', '.join(bad)}), such as a "
                           "line break or tab; use letters, digits, spaces and punctuation")
    if problem := lookalike_problem(name):
        raise DatasetError(f"dataset name {problem}")
    # Any digits ("17", "１７", "²"), not only ASCII ones: a name that reads as a number reads as an id.
    if name.isdigit():
        raise DatasetError(f"dataset name {name!r} is all digits, which would read as a dataset id; "
                           f"add a letter (e.g. 'set-{name}')")
    return name


def _referenced(Session_: sessionmaker[Session]) -> Callable[[Iterable[str]], set[str]]:
    """Which store paths a committed image row references (read fresh on each call)."""
    def check(paths: Iterable[str]) -> set[str]:
        with Session_() as session:
            return repo.store_paths_used_elsewhere(session, paths)
    return check


def _remove_unreferenced(Session_: sessionmaker[Session], files: list[Path], data_dir: Path) -> int:
    """Unlink store files no image row references. Call with the store lock held exclusively."""
    if not files:
        return 0
    rel = {f.resolve().relative_to(data_dir.resolve()).as_posix(): f for f in files}
    used = _referenced(Session_)(rel.keys())
    removed = 0
    for r, f in rel.items():
        if r in used:
            continue
        try:
            f.unlink()
            removed += 1
        except FileNotFoundError:
            pass
        try:
            f.parent.rmdir()
        except OSError:
            pass
    return removed


def add_dataset(
    source: Path | str,
    name: str,
    *,
    csv: Path | str | None = None,
    group_regex: str | None = None,
    seed: int = 0,
    split_fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
    limits: IngestLimits = IngestLimits(),
    progress: ProgressFn | None = None,
    settings: Settings | None = None,
) -> DatasetInfo:
    """Ingest ``source`` (zip, folder or CSV manifest) as dataset ``name``.

    Raises DatasetError / core.ingest.IngestError (both ValueError) on bad input.
    """
    name = check_name(name)
    s, Session_ = service_context(settings)
    with Session_() as session:  # fail fast, before the (slow) ingest
        if repo.get_dataset_by_name(session, name) is not None:
            raise DatasetError(f"a dataset named {name!r} already exists; choose another name or delete it")

    infos: list[DatasetInfo] = []

    def commit(result: IngestResult) -> None:
        # Runs inside core.ingest while the store lock is held: no delete can unlink a file
        # these rows point at between "found in the store" and "committed".
        with Session_.begin() as session:
            ds = repo.add_dataset(
                session, name=name, source=str(source), classes=result.classes,
                health=result.health, split_config=result.split_config,
                skipped=[x.as_dict() for x in result.skipped], num_images=len(result.images),
            )
            repo.add_images(session, ds.id, (r.as_row() for r in result.images))
            infos.append(DatasetInfo.from_row(ds))

    try:
        ingest(
            Path(source), s.data_dir, csv=Path(csv) if csv else None, group_regex=group_regex,
            seed=seed, split_fractions=split_fractions, limits=limits, progress=progress,
            commit=commit, referenced=_referenced(Session_),
        )
    except IntegrityError as e:  # core.ingest already removed the files only this ingest used
        if "datasets.name" in str(e.orig):
            raise DatasetError(f"a dataset named {name!r} already exists") from None
        raise
    return infos[0]


def _get_row(session: Session, name_or_id: str | int) -> Dataset:
    ds = repo.get_dataset_by_name_or_id(session, name_or_id)
    if ds is None:
        raise DatasetError(f"no dataset named {name_or_id!r}")
    return ds


def list_datasets(*, settings: Settings | None = None) -> list[DatasetInfo]:
    _, Session_ = service_context(settings)
    with Session_() as session:
        return [DatasetInfo.from_row(d) for d in repo.list_datasets(session)]


def get_dataset(name_or_id: str | int, *, settings: Settings | None = None) -> DatasetInfo:
    _, Session_ = service_context(settings)
    with Session_() as session:
        return DatasetInfo.from_row(_get_row(session, name_or_id))


def dataset_images(
    name_or_id: str | int, split: str | None = None, *, settings: Settings | None = None
) -> list[ImageInfo]:
    """Images of a dataset (optionally one split) with absolute paths and class indices."""
    s, Session_ = service_context(settings)
    with Session_() as session:
        ds = _get_row(session, name_or_id)
        index = {c: i for i, c in enumerate(ds.classes)}
        return [
            ImageInfo(
                id=im.id, path=s.data_dir / im.store_path, label=im.label,
                class_index=index[im.label], split=im.split, group=im.group,
                original_name=im.original_name, sha256=im.sha256, width=im.width,
                height=im.height, mode=im.mode,
            )
            for im in repo.images_for_dataset(session, ds.id, split)
        ]


def dataset_report(name_or_id: str | int, *, settings: Settings | None = None) -> dict[str, Any]:
    """JSON-able report: dataset summary, health, split config, skipped files."""
    info = get_dataset(name_or_id, settings=settings)
    return {
        "id": info.id,
        "name": info.name,
        "created_at": info.created_at.isoformat(),
        "source": info.source,
        "num_images": info.num_images,
        "num_classes": info.num_classes,
        "classes": info.classes,
        "split_config": info.split_config,
        "health": info.health,
        "skipped": info.skipped,
    }


def delete_dataset(name_or_id: str | int, *, settings: Settings | None = None) -> DeleteResult:
    """Delete a dataset's rows (cascading) and the store files no other dataset uses.

    Files are unlinked under the exclusive store lock, after re-reading the references: an
    ingest of the same images holds the lock shared until its rows are committed. If ingests
    keep the store busy for ``DELETE_LOCK_WAIT_S`` the files stay for the garbage collector.
    """
    s, Session_ = service_context(settings)
    with Session_.begin() as session:
        ds = _get_row(session, name_or_id)
        name, ds_id = ds.name, ds.id
        paths = {im.store_path for im in repo.images_for_dataset(session, ds_id)}
        n_images = ds.num_images
        repo.delete_dataset(session, ds_id)
    removed = left = 0
    with store_lock(s.data_dir, exclusive=True, wait_s=DELETE_LOCK_WAIT_S) as got:
        if got:
            removed = _remove_unreferenced(Session_, [s.data_dir / p for p in sorted(paths)], s.data_dir)
        else:
            left = len(paths)
    return DeleteResult(name=name, images=n_images, files_removed=removed, files_left=left)
