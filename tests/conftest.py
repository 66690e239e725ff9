"""Shared fixtures. Keep this general: area-specific fixtures live in their own test files."""
from __future__ import annotations

import contextlib
import io
import os
import secrets
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATASETS = REPO_ROOT.parent / "shared" / "datasets"


# A PostgreSQL server URL without a database (postgresql+psycopg://user:pw@127.0.0.1:5432):
# when set, every test that asks for a database gets a fresh one on that server, else SQLite.
TEST_SERVER_ENV = "WORKBENCH_TEST_DATABASE_URL"


def test_server_url() -> str | None:
    return os.environ.get(TEST_SERVER_ENV) or None


def on_postgresql() -> bool:
    return test_server_url() is not None


sqlite_only = pytest.mark.skipif(on_postgresql(), reason=f"SQLite-specific ({TEST_SERVER_ENV} is set)")


@contextlib.contextmanager
def fresh_database() -> Iterator[str | None]:
    """A new empty database on the test server (its URL), dropped afterwards; None when SQLite."""
    server = test_server_url()
    if server is None:
        yield None
        return
    from sqlalchemy import create_engine, make_url

    name = f"wb_test_{secrets.token_hex(6)}"
    # CREATE/DROP DATABASE cannot run inside a transaction block.
    admin = create_engine(make_url(server).set(database="postgres"), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
        try:
            yield make_url(server).set(database=name).render_as_string(hide_password=False)
        finally:
            # FORCE: a worker this test started may still hold a connection (PostgreSQL >= 13).
            with admin.connect() as conn:
                conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        admin.dispose()


def use_database(monkeypatch: pytest.MonkeyPatch, url: str | None) -> None:
    """Point DATABASE_URL at ``url``; None: unset it (SQLite inside WORKBENCH_DATA_DIR)."""
    if url is None:
        monkeypatch.delenv("DATABASE_URL", raising=False)
    else:
        monkeypatch.setenv("DATABASE_URL", url)


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh WORKBENCH_DATA_DIR for one test, with a fresh database: SQLite inside the data
    dir, or a new PostgreSQL database when WORKBENCH_TEST_DATABASE_URL is set."""
    from storage.db import reset_sessionmakers

    d = tmp_path / "workbench-data"
    d.mkdir()
    monkeypatch.setenv("WORKBENCH_DATA_DIR", str(d))
    with fresh_database() as url:
        use_database(monkeypatch, url)
        reset_sessionmakers()
        try:
            yield d
        finally:
            stop_workers(d)  # the job-runner workers (every lane) this test started, detached by design
            reset_sessionmakers()  # release the SQLite file (or PG connections) before it is removed


def wait_for(pred, timeout: float = 180, poll: float = 0.3, what: str = "condition"):
    """Poll ``pred`` until it returns something truthy (returned); fail after ``timeout`` seconds."""
    import time

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = pred()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out waiting for {what}")


def worker_processes(data_dir: Path) -> list:
    """Live ``workbench.worker`` processes (any lane) serving ``data_dir``."""
    import psutil

    want = str(Path(data_dir).resolve())
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            cmd = proc.info["cmdline"] or []
            if "workbench.worker" not in cmd or proc.status() == psutil.STATUS_ZOMBIE:
                continue
            env_dir = proc.environ().get("WORKBENCH_DATA_DIR")
            if env_dir and str(Path(env_dir).resolve()) == want:
                found.append(proc)
        except (psutil.Error, OSError):
            continue
    return found


def stop_workers(data_dir: Path, timeout: float = 60) -> None:
    """SIGTERM the workers serving ``data_dir`` (they finish their batch/job), SIGKILL after ``timeout``."""
    import psutil

    procs = worker_processes(data_dir)
    for proc in procs:
        try:
            proc.terminate()
        except psutil.Error:
            pass
    _gone, alive = psutil.wait_procs(procs, timeout=timeout)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=10)


@pytest.fixture(scope="session")
def shared_datasets() -> Path:
    """Read-only real datasets in ../shared/datasets (never copy them into the repo)."""
    if not SHARED_DATASETS.is_dir():
        pytest.skip(f"shared datasets not found at {SHARED_DATASETS} (needed for real-data tests)")
    return SHARED_DATASETS


def png_bytes(color: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (32, 32),
              mode: str = "RGB", pattern: int = 0) -> bytes:
    """A small, valid PNG; ``pattern`` makes images perceptually different."""
    import numpy as np
    from PIL import Image

    if pattern:
        # Seeded random 8x8 blocks, upscaled: perceptually distinct images per pattern.
        grid = np.random.default_rng(pattern).integers(0, 256, (8, 8, 3), dtype=np.uint8)
        im = Image.fromarray(grid, "RGB").resize(size, Image.NEAREST).convert(mode)
    else:
        im = Image.new(mode, size, color if mode != "L" else color[0])
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def make_zip(tmp_path: Path) -> Callable[..., Path]:
    """make_zip({"cats/a.png": b"...", ...}, name="x.zip") -> path of a new zip in tmp_path."""
    counter = {"n": 0}

    def _make(files: dict[str, bytes], name: str | None = None) -> Path:
        counter["n"] += 1
        path = tmp_path / (name or f"upload{counter['n']}.zip")
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
            for entry, data in files.items():
                if entry.endswith("/"):
                    zf.writestr(zipfile.ZipInfo(entry), b"")
                else:
                    zf.writestr(entry, data)
        return path

    return _make


def zip_folder(src: Path, dest: Path, *, prefix: str = "", limit_per_dir: int | None = None,
               include: Callable[[Path], bool] | None = None) -> Path:
    """Zip (a subset of) a real dataset folder into ``dest`` (a tmp path)."""
    per_dir: dict[Path, int] = {}
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_STORED) as zf:
        for p in sorted(src.rglob("*")):
            if not p.is_file() or (include is not None and not include(p)):
                continue
            if limit_per_dir is not None:
                per_dir[p.parent] = per_dir.get(p.parent, 0) + 1
                if per_dir[p.parent] > limit_per_dir:
                    continue
            zf.write(p, prefix + p.relative_to(src).as_posix())
    return dest


@pytest.fixture(scope="session")
def ws(tmp_path_factory: pytest.TempPathFactory):
    """The beans workspace (tests/builders.py): ingested and trained once for the whole session."""
    from builders import shared_workspace

    return shared_workspace(tmp_path_factory)


@pytest.fixture(scope="session")
def random_bundle(tmp_path_factory: pytest.TempPathFactory):
    """A lite0 bundle with random weights and its CPU speed record (tests/builders.py), made once."""
    from builders import random_weight_bundle

    return random_weight_bundle(tmp_path_factory.mktemp("random-bundle"))
