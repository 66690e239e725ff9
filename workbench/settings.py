"""Where Workbench keeps its files and database.

One place decides this for the app, the job runner, the CLI and the tests:
``WORKBENCH_DATA_DIR`` (default ``./workbench-data``) holds every file Workbench writes;
``DATABASE_URL`` (default SQLite at ``<data dir>/workbench.db``) holds the records.
``WORKBENCH_BUNDLE_KEY`` (optional) signs the deploy bundles this installation exports and is
the key ``workbench predict`` checks bundle signatures with.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from storage.db import get_sessionmaker


@dataclass(frozen=True)
class Settings:
    data_dir: Path
    database_url: str
    # HMAC key for bundle manifests; None: bundles are not signed. Kept out of repr (logs).
    bundle_key: bytes | None = field(default=None, repr=False)
    # Folders the web UI may import from (datasets too big to upload through the browser);
    # ``WORKBENCH_IMPORT_DIR``, default ``<data dir>/import``. Nothing outside it is offered.
    import_dir_override: Path | None = None

    @property
    def import_dir(self) -> Path:
        return self.import_dir_override or self.data_dir / "import"

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
    imports = os.environ.get("WORKBENCH_IMPORT_DIR")
    key = os.environ.get("WORKBENCH_BUNDLE_KEY") or None
    return Settings(data_dir=data_dir, database_url=url,
                    import_dir_override=Path(imports).expanduser().resolve() if imports else None,
                    bundle_key=key.encode("utf-8") if key else None)


def service_context(settings: Settings | None = None, session_factory: sessionmaker[Session] | None = None
                    ) -> tuple[Settings, sessionmaker[Session]]:
    """The settings (data dirs created) and session factory a service call works with."""
    s = settings or get_settings()
    s.ensure_dirs()
    return s, session_factory or get_sessionmaker(s.database_url)
