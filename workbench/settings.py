"""Where Workbench keeps its files and database.

One place decides this for the app, the job runner, the CLI and the tests:
``WORKBENCH_DATA_DIR`` (default ``./workbench-data``) holds every file Workbench writes;
``DATABASE_URL`` (default SQLite at ``<data dir>/workbench.db``) holds the records.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Settings:
    data_dir: Path
    database_url: str

    @property
    def store_dir(self) -> Path:
        """Content-addressed image store (files named by sha256)."""
        return self.data_dir / "store"

    @property
    def runs_dir(self) -> Path:
        """One folder per training run: checkpoints, exports, plots."""
        return self.data_dir / "runs"

    @property
    def tmp_dir(self) -> Path:
        """Staging area inside the data dir, so moves into place are atomic renames."""
        return self.data_dir / "tmp"

    def ensure_dirs(self) -> None:
        for d in (self.data_dir, self.store_dir, self.runs_dir, self.tmp_dir):
            d.mkdir(parents=True, exist_ok=True)


def get_settings() -> Settings:
    data_dir = Path(os.environ.get("WORKBENCH_DATA_DIR", "workbench-data")).expanduser().resolve()
    url = os.environ.get("DATABASE_URL") or f"sqlite:///{data_dir / 'workbench.db'}"
    return Settings(data_dir=data_dir, database_url=url)
