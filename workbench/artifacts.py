"""Artifact service: a run's files (exports, bundles, plots) listed and served only when intact.

Every file a service writes is registered (kind, sha256, bytes, run) and checked with
``storage.artifacts.verify_artifact`` before it is served, so a missing or altered file is
reported, never handed out.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from storage import repositories as repo
from storage.artifacts import ArtifactError, verify_artifact
from storage.models import Artifact
from workbench.settings import Settings, service_context

ONNX_KINDS = ("onnx_fp32", "onnx_fp16", "onnx_int8", "onnx_uint8")


@dataclass(frozen=True)
class ArtifactInfo:
    id: int
    kind: str
    path: str
    bytes: int
    sha256: str
    created_at: datetime
    meta: dict[str, Any]
    status: str  # "ok", or why it cannot be served


def _refusal(a: Artifact) -> str | None:
    """Why an intact file is still not served (an fp32 export that failed verification)."""
    meta = a.meta or {}
    if a.kind == "onnx_fp32" and not meta.get("verified", False):
        return (f"artifact #{a.id}: this fp32 export failed verification and is not offered for download "
                f"({meta.get('verification', {}).get('reason', '')})")
    return None


def list_artifacts(run_id: int, *, settings: Settings | None = None,
                   session_factory: sessionmaker[Session] | None = None) -> list[ArtifactInfo]:
    """Every artifact of a run with its integrity status."""
    s, sf = service_context(settings, session_factory)
    out = []
    with sf() as session:
        for a in repo.artifacts_for_run(session, run_id):
            try:
                verify_artifact(a, s.data_dir)
                status = "ok" if _refusal(a) is None else "failed verification"
            except ArtifactError as e:
                status = str(e)
            out.append(ArtifactInfo(a.id, a.kind, a.path, a.bytes, a.sha256, a.created_at, dict(a.meta or {}),
                                    status))
    return out


def artifact_for_download(artifact_id: int, *, settings: Settings | None = None,
                          session_factory: sessionmaker[Session] | None = None) -> Path:
    """Absolute path of an intact, servable artifact; raises ArtifactError otherwise."""
    s, sf = service_context(settings, session_factory)
    with sf() as session:
        a = session.get(Artifact, artifact_id)
        if a is None:
            raise ArtifactError(f"no artifact with id {artifact_id}")
        path = verify_artifact(a, s.data_dir)  # missing or altered -> ArtifactError
        refusal = _refusal(a)
        if refusal:
            raise ArtifactError(refusal)
        return path


def evaluation_plots(run_id: int, evaluation_id: int, *, settings: Settings | None = None
                     ) -> dict[str, Path | ArtifactError]:
    """{plot name: verified path, or the error saying why it cannot be shown} for one evaluation."""
    s, sf = service_context(settings)
    with sf() as session:
        rows = [(a.id, a.kind, dict(a.meta or {})) for a in repo.artifacts_for_run(session, run_id)
                if a.kind in ("plot", "eval_json")]
    out: dict[str, Path | ArtifactError] = {}
    for art_id, kind, meta in rows:
        if meta.get("evaluation_id") != evaluation_id:
            continue
        try:
            out[meta.get("name", kind)] = artifact_for_download(art_id, settings=s, session_factory=sf)
        except ArtifactError as exc:
            out[meta.get("name", kind)] = exc
    return out
