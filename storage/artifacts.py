"""Register files as artifacts and verify them before serving.

An artifact row records a path relative to the data dir plus its sha256 and size,
so a download can refuse a file that went missing or was altered on disk.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from core.hashing import file_digest
from storage import repositories as repo
from storage.models import Artifact


class ArtifactError(RuntimeError):
    """An artifact is missing, altered, or outside the data dir."""


def relative_to_data_dir(path: Path, data_dir: Path) -> str:
    """POSIX path relative to the data dir; refuses files outside it."""
    p = Path(path).resolve()
    root = Path(data_dir).resolve()
    try:
        rel = p.relative_to(root)
    except ValueError:
        raise ArtifactError(f"{p} is not inside the data dir {root}") from None
    return rel.as_posix()


def resolve_in_data_dir(rel_path: str, data_dir: Path) -> Path:
    """Absolute path for a stored relative path; refuses anything escaping the data dir."""
    root = Path(data_dir).resolve()
    p = (root / rel_path).resolve()
    if p != root and root not in p.parents:
        raise ArtifactError(f"artifact path {rel_path!r} escapes the data dir {root}")
    return p


def register_artifact(
    session: Session,
    path: Path,
    data_dir: Path,
    *,
    kind: str,
    run_id: int | None = None,
    dataset_id: int | None = None,
    meta: dict[str, Any] | None = None,
) -> Artifact:
    """Hash an existing file under the data dir and add an Artifact row (no commit)."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"cannot register artifact {kind!r}: {path} does not exist")
    rel = relative_to_data_dir(path, data_dir)
    d = file_digest(path)
    return repo.add_artifact(
        session, kind=kind, path=rel, sha256=d.sha256, bytes=d.bytes,
        run_id=run_id, dataset_id=dataset_id, meta=meta,
    )


def verify_artifact(artifact: Artifact, data_dir: Path) -> Path:
    """Return the absolute path if the file is present and unaltered, else raise ArtifactError."""
    p = resolve_in_data_dir(artifact.path, data_dir)
    if not p.is_file():
        raise ArtifactError(f"artifact #{artifact.id} ({artifact.kind}) is missing: {artifact.path}")
    # Cheap size check first; hashing a large ONNX file is only needed when sizes match.
    size = p.stat().st_size
    if size != artifact.bytes:
        raise ArtifactError(
            f"artifact #{artifact.id} ({artifact.kind}) was altered: {artifact.path} is "
            f"{size} bytes, expected {artifact.bytes}"
        )
    if file_digest(p).sha256 != artifact.sha256:
        raise ArtifactError(
            f"artifact #{artifact.id} ({artifact.kind}) was altered: sha256 of {artifact.path} "
            f"does not match the recorded {artifact.sha256[:12]}…"
        )
    return p
