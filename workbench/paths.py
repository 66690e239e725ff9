"""Where each run's files and each job's staged inputs live inside the data dir: one place.

A run owns exactly one folder, ``runs/run_00042/``: training checkpoints at its top,
evaluations under ``eval/``, exports and bundles under ``export/``. Deleting the run removes
that folder. Versions before this module wrote evaluations and exports to ``runs/42/``;
``RunPaths.legacy_root`` names it so deleting such a run removes it too.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from workbench.settings import Settings

UPLOADS = "uploads"  # staged dataset uploads: <data dir>/tmp/uploads/<id>/
PREDICT = "predict"  # staged images and Grad-CAM overlays: <data dir>/tmp/predict/<id>/


def stamp() -> str:
    """A sortable UTC time stamp for file and folder names."""
    return datetime.now(UTC).strftime("%Y%m%d-%H%M%S-%f")


@dataclass(frozen=True)
class RunPaths:
    settings: Settings
    run_id: int

    @property
    def root(self) -> Path:
        return self.settings.runs_dir / f"run_{self.run_id:05d}"

    @property
    def legacy_root(self) -> Path:
        return self.settings.runs_dir / str(self.run_id)

    @property
    def last_checkpoint(self) -> Path:
        return self.root / "last.pt"

    @property
    def export_dir(self) -> Path:
        return self.root / "export"

    @property
    def fp32_onnx(self) -> Path:
        return self.export_dir / "model.onnx"

    def new_evaluation_dir(self, tta: bool) -> Path:
        return self.root / "eval" / (stamp() + ("-tta" if tta else ""))

    def new_bundle(self) -> Path:
        return self.export_dir / f"bundle-{stamp()}.zip"


def staging_dir(settings: Settings, area: str) -> Path:
    """``<data dir>/tmp/<area>``: where the UI stages what a job will read."""
    return settings.tmp_dir / area


def importable_folders(settings: Settings) -> list[Path]:
    """The dataset folders (and zips, CSVs) directly inside the import dir, for the web UI to offer."""
    root = settings.import_dir
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if not p.name.startswith(".")
                  and (p.is_dir() or p.suffix.lower() in (".zip", ".csv", ".tsv")))


def in_import_dir(settings: Settings, name: str) -> Path:
    """A folder or file directly inside the import dir, refusing anything else (``..``, links out)."""
    root = settings.import_dir.resolve()
    p = (root / name).resolve()
    if p.parent != root or not p.exists():
        raise ValueError(f"{name!r} is not a folder or file in the import folder {root}")
    return p


def in_staging(settings: Settings, rel: str, area: str) -> Path:
    """Absolute path of a job payload's relative path, refusing anything outside ``tmp/<area>/``."""
    root = staging_dir(settings, area).resolve()
    p = (settings.data_dir / rel).resolve()
    if root not in p.parents:
        raise ValueError(f"{rel!r} is not a file under {root}")
    return p
