"""Where Workbench keeps its files and database.

One place decides this for the app, the job runner, the CLI and the tests:
``WORKBENCH_DATA_DIR`` (default ``./workbench-data``) holds every file Workbench writes;
``DATABASE_URL`` (default SQLite at ``<data dir>/workbench.db``) holds the records.
``WORKBENCH_BUNDLE_KEY`` (optional) signs the deploy bundles this installation exports and is
the key ``workbench predict`` checks bundle signatures with.

Several hosts (docs/SCALING.md): ``WORKBENCH_HOST_ID`` names this host's workers (default: the
hostname plus a short id stable for this machine and data dir); ``WORKBENCH_LEASE_S`` (default
60) is how long a worker's claim on a job lasts without a heartbeat before another host may
take the job over; ``WORKBENCH_DEVICE`` (auto, cpu, cuda, cuda:N) is where PyTorch work runs;
``WORKBENCH_AUTO_RESUMES`` (default 2, 0: never) is how many times in a row a training run whose
worker died is resumed automatically on another worker before it is failed for a person to resume.
"""
from __future__ import annotations

import hashlib
import os
import re
import socket
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
    host_id_override: str | None = None
    lease_s: float = 60.0
    device: str = "auto"
    auto_resumes: int = 2

    @property
    def host_id(self) -> str:
        """Which host this process speaks for: lane locks are per host, job leases name it."""
        return self.host_id_override or default_host_id(self.data_dir)

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


HOST_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
DEFAULT_LEASE_S = 60.0
MIN_LEASE_S = 1.0


class SettingsError(ValueError):
    """An environment variable Workbench reads holds a value it cannot use."""


def _machine_secret() -> str:
    for f in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        try:
            text = Path(f).read_text().strip()
        except OSError:
            continue
        if text:
            return text
    return socket.gethostname()


def default_host_id(data_dir: Path) -> str:
    """hostname + 6 hex digits stable for this machine and data dir (two machines cloned with
    the same hostname still differ by their machine id)."""
    name = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname().split(".")[0])[:60].strip("-.") or "host"
    digest = hashlib.sha256(f"{_machine_secret()}|{data_dir}".encode()).hexdigest()[:6]
    return f"{name}-{digest}"


def check_host_id(value: str) -> str:
    if not HOST_ID_RE.match(value):
        raise SettingsError(f"host id {value!r} is not usable: use 1-100 letters, digits, '.', '_' or '-', "
                            "starting with a letter or digit (it names a folder in the data dir)")
    return value


def _lease_s(raw: str | None) -> float:
    if not raw:
        return DEFAULT_LEASE_S
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"WORKBENCH_LEASE_S must be a number of seconds, got {raw!r}") from None
    if not value >= MIN_LEASE_S:  # also refuses NaN
        raise SettingsError(f"WORKBENCH_LEASE_S must be at least {MIN_LEASE_S:g} seconds, got {raw!r}")
    return value


DEFAULT_AUTO_RESUMES = 2


def _auto_resumes(raw: str | None) -> int:
    if raw is None or not raw.strip():
        return DEFAULT_AUTO_RESUMES
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise SettingsError(f"WORKBENCH_AUTO_RESUMES must be a whole number of 0 or more (how many times a run "
                            f"whose worker died is resumed automatically; 0: never), got {raw!r}")
    return value


def get_settings() -> Settings:
    data_dir = Path(os.environ.get("WORKBENCH_DATA_DIR", "workbench-data")).expanduser().resolve()
    url = os.environ.get("DATABASE_URL") or f"sqlite:///{data_dir / 'workbench.db'}"
    imports = os.environ.get("WORKBENCH_IMPORT_DIR")
    key = os.environ.get("WORKBENCH_BUNDLE_KEY") or None
    host = os.environ.get("WORKBENCH_HOST_ID") or None
    return Settings(data_dir=data_dir, database_url=url,
                    import_dir_override=Path(imports).expanduser().resolve() if imports else None,
                    bundle_key=key.encode("utf-8") if key else None,
                    host_id_override=check_host_id(host) if host else None,
                    lease_s=_lease_s(os.environ.get("WORKBENCH_LEASE_S")),
                    device=(os.environ.get("WORKBENCH_DEVICE") or "auto").strip(),
                    auto_resumes=_auto_resumes(os.environ.get("WORKBENCH_AUTO_RESUMES")))


def service_context(settings: Settings | None = None, session_factory: sessionmaker[Session] | None = None
                    ) -> tuple[Settings, sessionmaker[Session]]:
    """The settings (data dirs created) and session factory a service call works with."""
    s = settings or get_settings()
    s.ensure_dirs()
    return s, session_factory or get_sessionmaker(s.database_url)
