"""The garbage collector (workbench.gc, `workbench gc`) and the worker's timed reconcile."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO_ROOT, png_bytes, wait_for
from sqlalchemy import select

from core.ingest import store_lock
from storage import repositories as repo
from storage.db import get_sessionmaker
from storage.models import Job
from workbench import datasets as svc
from workbench import gc, worker
from workbench.cli import main
from workbench.settings import get_settings
from workbench.status import JobKind, JobStatus

HOUR = 3600.0


def _store_files(data_dir: Path) -> set[str]:
    return {p.relative_to(data_dir).as_posix() for p in (data_dir / "store").rglob("*") if p.is_file()}


def _referenced() -> set[str]:
    with get_sessionmaker(get_settings().database_url)() as s:
        return repo.all_store_paths(s)


def _age(path: Path, hours: float) -> Path:
    """Make ``path`` (and what is inside it) look ``hours`` old."""
    t = time.time() - hours * HOUR
    for p in [*path.rglob("*"), path] if path.is_dir() else [path]:
        os.utime(p, (t, t))
    return path


def _write(path: Path, data: bytes = b"x" * 100) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _job(kind: JobKind, status: JobStatus, payload: dict[str, object]) -> int:
    with get_sessionmaker(get_settings().database_url).begin() as s:
        job = Job(kind=str(kind), status=str(status), payload=payload, worker_pid=None)
        s.add(job)
        s.flush()
        return job.id


def test_gc_after_kill_9_of_cli_ingest_leaves_only_referenced_files(
    data_dir: Path, shared_datasets: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    beans = shared_datasets / "beans"
    kept = svc.add_dataset(beans / "test", "beans-test")  # referenced files the GC must keep
    baseline = len(_store_files(data_dir))
    # DATABASE_URL as data_dir set it: unset (SQLite in data_dir) or this test's PG database.
    env = dict(os.environ, WORKBENCH_DATA_DIR=str(data_dir), PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; from workbench.cli import main; sys.exit(main())",
         "data", "add", str(beans), "--name", "beans-all", "--quiet"],
        cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:  # kill -9 mid-way: once it has stored some new files, long before it could finish
        wait_for(lambda: len(_store_files(data_dir)) >= baseline + 25 or proc.poll() is not None,
                 timeout=180, poll=0.05, what="the CLI ingest to store files")
        assert proc.poll() is None, "the ingest finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    leftovers = _store_files(data_dir) - _referenced()
    assert len(leftovers) >= 25  # what the killed ingest left behind
    _write(data_dir / "tmp" / "ingest-killed.part")  # as a kill during a copy leaves it
    stale_upload = _write(data_dir / "tmp" / "uploads" / "abc123" / "photos.zip")
    queued_upload = _write(data_dir / "tmp" / "uploads" / "def456" / "photos.zip")
    _job(JobKind.INGEST, JobStatus.QUEUED, {"upload": "tmp/uploads/def456/photos.zip", "name": "x"})

    assert main(["gc", "--grace-hours", "0"]) == 0
    out = capsys.readouterr().out
    assert f"removed {len(leftovers)} unreferenced store file(s)" in out
    assert _store_files(data_dir) == _referenced() == {i.path.relative_to(data_dir).as_posix()
                                                       for i in svc.dataset_images(kept.id)}
    assert not list((data_dir / "tmp").glob("*.part"))
    assert not stale_upload.exists() and queued_upload.exists()  # a queued job's upload stays
    assert [d.name for d in svc.list_datasets()] == ["beans-test"]


@pytest.mark.parametrize("kind", ["store", "part", "upload", "predict"])
def test_gc_grace_period_and_dry_run(data_dir: Path, kind: str) -> None:
    target = {
        "store": data_dir / "store" / "ab" / ("ab" + "0" * 62 + ".png"),
        "part": data_dir / "tmp" / "ingest-x1.part",
        "upload": data_dir / "tmp" / "uploads" / "u1" / "a.zip",
        "predict": data_dir / "tmp" / "predict" / "p1" / "in0.png",
    }[kind]
    _write(target, png_bytes(pattern=1))
    other = data_dir / "tmp" / "worker-light" / "scratch.bin"  # not the GC's to touch
    _age(_write(other), 100)

    young = gc.collect_garbage(grace_hours=6)
    assert young.total.files == 0 and target.exists()

    _age(target.parent if kind in ("upload", "predict") else target, 7)
    dry = gc.collect_garbage(grace_hours=6, dry_run=True)
    assert dry.total.files == 1 and dry.total.bytes == target.stat().st_size and target.exists()
    assert any(line.startswith("would remove") for line in gc.describe(dry))

    done = gc.collect_garbage(grace_hours=6)
    assert done.total == dry.total and not target.exists() and other.exists()
    assert {"store": done.store, "part": done.partial}.get(kind, done.staged).files == 1
    if kind in ("upload", "predict"):
        assert done.staged_entries == 1 and not target.parent.exists()


@pytest.mark.parametrize("status, kept", [
    (JobStatus.QUEUED, True), (JobStatus.RUNNING, True),
    (JobStatus.SUCCEEDED, False), (JobStatus.FAILED, False),
])
@pytest.mark.parametrize("area", ["uploads", "predict"])
def test_gc_keeps_staged_files_of_live_jobs(data_dir: Path, status: JobStatus, kept: bool, area: str) -> None:
    f = _age(_write(data_dir / "tmp" / area / "job1" / "in0.png"), 30)
    _age(f.parent, 30)
    rel = f.relative_to(data_dir).as_posix()
    if area == "uploads":
        _job(JobKind.INGEST, status, {"upload": rel, "name": "n"})
    else:
        _job(JobKind.PREDICT, status, {"files": [{"name": "x.png", "path": rel}], "out_dir": f"tmp/{area}/job1"})
    gc.collect_garbage(grace_hours=1)
    assert f.exists() is kept


def test_gc_leaves_the_store_alone_while_an_ingest_holds_it(data_dir: Path) -> None:
    orphan = _age(_write(data_dir / "store" / "cd" / ("cd" + "1" * 62 + ".png")), 10)
    upload = _age(_write(data_dir / "tmp" / "uploads" / "u9" / "a.zip"), 10)
    _age(upload.parent, 10)
    with store_lock(data_dir, exclusive=False):  # as an ingest between "stored" and "committed"
        report = gc.collect_garbage(grace_hours=0, lock_wait_s=0.05)
    assert report.store_busy and orphan.exists() and not upload.exists()
    assert any("in use by a running ingest" in line for line in gc.describe(report))
    assert gc.collect_garbage(grace_hours=0).store.files == 1 and not orphan.exists()


def test_gc_refuses_a_negative_grace_period(data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["gc", "--grace-hours", "-1"]) == 2
    assert "--grace-hours must be 0 or more" in capsys.readouterr().err


def test_worker_start_collects_garbage(data_dir: Path) -> None:
    orphan = _age(_write(data_dir / "store" / "ef" / ("ef" + "2" * 62 + ".png")), 7)
    fresh = _write(data_dir / "store" / "ef" / ("ef" + "3" * 62 + ".png"))  # inside the grace period
    previous = signal.getsignal(signal.SIGTERM)
    try:
        assert worker.run_worker(once=True) == 0
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert not orphan.exists() and fresh.exists()


def test_worker_loop_reconciles_on_a_timer(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A light-lane job left "running" by a dead worker is failed by the train-lane worker's
    loop, without a restart."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    with get_sessionmaker(get_settings().database_url).begin() as s:
        job = Job(kind=str(JobKind.INGEST), status=str(JobStatus.RUNNING), payload={}, worker_pid=dead.pid)
        s.add(job)
        s.flush()
        job_id = job.id
    monkeypatch.setattr(worker, "RECONCILE_EVERY_S", 0.1, raising=False)
    sf = get_sessionmaker(get_settings().database_url)
    worker._drain(sf, get_settings(), os.getpid(), "train", False, 0.6, 0.05)
    with sf() as s:
        status, error = s.execute(select(Job.status, Job.error).where(Job.id == job_id)).one()
    assert status == JobStatus.FAILED and "worker died" in error
