"""Small query helpers taking a Session (SQLAlchemy 2.0 style).

Callers own the transaction (``with Session.begin() as s: ...``); these functions
never commit. Other modules add their own helpers in their own files.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from core.names import is_id
from storage.models import Artifact, Dataset, DatasetVersion, Image

# --- datasets -----------------------------------------------------------------------

def get_dataset_by_name(session: Session, name: str) -> Dataset | None:
    return session.scalar(select(Dataset).where(Dataset.name == name))


def get_dataset(session: Session, dataset_id: int) -> Dataset | None:
    return session.get(Dataset, dataset_id)


def get_dataset_by_name_or_id(session: Session, name_or_id: str | int) -> Dataset | None:
    """An int or a string of ASCII digits is an id (dataset names may not be all digits), else a name
    ("²" or "١٧" too: not found by name, rather than a crash in ``int``).

    So a lookup by id is never shadowed by a dataset whose name is that number.
    """
    if isinstance(name_or_id, int) or is_id(name_or_id):
        return session.get(Dataset, int(name_or_id))
    return get_dataset_by_name(session, name_or_id)


def list_datasets(session: Session) -> Sequence[Dataset]:
    return session.scalars(select(Dataset).order_by(Dataset.created_at, Dataset.id)).all()


def add_dataset(
    session: Session,
    *,
    name: str,
    source: str,
    classes: list[str],
    health: dict[str, Any],
    split_config: dict[str, Any],
    skipped: list[dict[str, str]],
    num_images: int,
) -> Dataset:
    ds = Dataset(
        name=name,
        source=source,
        classes=classes,
        num_classes=len(classes),
        num_images=num_images,
        health=health,
        split_config=split_config,
        skipped=skipped,
    )
    session.add(ds)
    session.flush()  # assign ds.id for the image rows
    return ds


def add_images(session: Session, dataset_id: int, rows: Iterable[dict[str, Any]]) -> int:
    """Bulk insert image rows (dicts with Image column names); returns the count."""
    payload = [dict(r, dataset_id=dataset_id) for r in rows]
    if payload:
        session.execute(Image.__table__.insert(), payload)  # type: ignore[attr-defined]
    return len(payload)


def delete_dataset(session: Session, dataset_id: int) -> None:
    # Core DELETE so SQLite's ON DELETE CASCADE does the child rows in one statement.
    session.execute(delete(Dataset).where(Dataset.id == dataset_id))


# --- images -------------------------------------------------------------------------

def images_for_dataset(
    session: Session, dataset_id: int, split: str | None = None
) -> Sequence[Image]:
    stmt = select(Image).where(Image.dataset_id == dataset_id)
    if split is not None:
        stmt = stmt.where(Image.split == split)
    return session.scalars(stmt.order_by(Image.id)).all()


def split_counts(session: Session, dataset_id: int) -> dict[str, dict[str, int]]:
    """{split: {label: count}}."""
    rows = session.execute(
        select(Image.split, Image.label, func.count())
        .where(Image.dataset_id == dataset_id)
        .group_by(Image.split, Image.label)
    ).all()
    out: dict[str, dict[str, int]] = {}
    for split, label, n in rows:
        out.setdefault(split, {})[label] = n
    return out


def store_paths_used_elsewhere(
    session: Session, store_paths: Iterable[str], exclude_dataset_id: int | None = None
) -> set[str]:
    """Which of these store paths are referenced by images of (other) datasets."""
    paths = list(set(store_paths))
    used: set[str] = set()
    # Chunked: SQLite limits the number of bound parameters per statement.
    for i in range(0, len(paths), 500):
        stmt = select(Image.store_path).where(Image.store_path.in_(paths[i:i + 500]))
        if exclude_dataset_id is not None:
            stmt = stmt.where(Image.dataset_id != exclude_dataset_id)
        used.update(session.scalars(stmt.distinct()).all())
    return used


def all_store_paths(session: Session) -> set[str]:
    """Every store path some image row references (what the garbage collector must keep)."""
    return set(session.scalars(select(Image.store_path).distinct()).all())


# --- artifacts ----------------------------------------------------------------------

def add_artifact(
    session: Session,
    *,
    kind: str,
    path: str,
    sha256: str,
    bytes: int,
    run_id: int | None = None,
    dataset_id: int | None = None,
    meta: dict[str, Any] | None = None,
) -> Artifact:
    art = Artifact(
        kind=kind, path=path, sha256=sha256, bytes=bytes,
        run_id=run_id, dataset_id=dataset_id, meta=meta,
    )
    session.add(art)
    session.flush()
    return art


def artifacts_for_run(session: Session, run_id: int, kind: str | None = None) -> Sequence[Artifact]:
    stmt = select(Artifact).where(Artifact.run_id == run_id)
    if kind is not None:
        stmt = stmt.where(Artifact.kind == kind)
    return session.scalars(stmt.order_by(Artifact.id)).all()


def artifacts_for_dataset(session: Session, dataset_id: int) -> Sequence[Artifact]:
    return session.scalars(
        select(Artifact).where(Artifact.dataset_id == dataset_id).order_by(Artifact.id)
    ).all()


# --- dataset versions ----------------------------------------------------------------

def get_dataset_version(session: Session, dataset_id: int) -> DatasetVersion | None:
    """How ``dataset_id`` was derived (None: an ingested dataset, version 1 of itself)."""
    return session.get(DatasetVersion, dataset_id)


def dataset_versions_of_root(session: Session, root_id: int) -> Sequence[DatasetVersion]:
    """Every derived version in the family of the dataset first ingested as ``root_id``."""
    return session.scalars(select(DatasetVersion).where(DatasetVersion.root_id == root_id)
                           .order_by(DatasetVersion.version)).all()


def image_names_and_labels(session: Session, dataset_id: int) -> list[tuple[str, str]]:
    """(original name, label) of every image of a dataset, without loading whole rows."""
    rows = session.execute(select(Image.original_name, Image.label).where(Image.dataset_id == dataset_id)
                           .order_by(Image.id)).all()
    return [(name, label) for name, label in rows]
