"""Light-lane jobs (workbench.tasks): real worker processes, real SQLite, real bean-leaf images.

An upload must not wait for a long training: ingest runs on the "light" lane's worker while
the "train" lane's worker is busy training.
"""
from __future__ import annotations

import time
import uuid
import zipfile
from pathlib import Path

from builders import create_dataset_rows
from conftest import stop_workers, wait_for, worker_processes

from workbench import jobs, lanes, runs, worker
from workbench.settings import get_settings
from workbench.status import TERMINAL

LONG = dict(head_epochs=50, finetune_epochs=50, unfreeze_stages=1, cache_views=1, batch_size=8, head_batch_size=16,
            num_threads=1, patience=100)



def save_upload(data_dir: Path, data: bytes, filename: str) -> str:
    """What actions.start_ingest does with an upload: a file under <data dir>/tmp/uploads/<id>/.

    Returns its path relative to the data dir."""
    folder = data_dir / "tmp" / "uploads" / uuid.uuid4().hex
    folder.mkdir(parents=True)
    (folder / filename).write_bytes(data)
    return (folder / filename).relative_to(data_dir).as_posix()


def bean_zip(shared_datasets: Path, dest: Path, per_class: int = 4) -> bytes:
    with zipfile.ZipFile(dest, "w") as zf:
        for cls in ("healthy", "bean_rust", "angular_leaf_spot"):
            for f in sorted((shared_datasets / "beans" / "train" / cls).iterdir())[:per_class]:
                zf.write(f, f"{cls}/{f.name}")
    return dest.read_bytes()


def enqueue(kind: str, payload: dict, run_id: int | None = None) -> int:
    from storage.db import get_sessionmaker

    with get_sessionmaker(get_settings().database_url).begin() as s:
        return jobs.enqueue(s, kind, run_id, payload).id


def job_row(job_id: int):
    from storage.db import get_sessionmaker
    from storage.models import Job

    with get_sessionmaker(get_settings().database_url)() as s:
        j = s.get(Job, job_id)
        s.expunge(j)
        return j


def test_lanes_route_kinds() -> None:
    assert lanes.lane_of("train") == lanes.lane_of("measure") == "train"  # CPU-heavy work never overlaps
    assert {lanes.lane_of(k) for k in ("ingest", "export", "evaluate", "predict")} == {"light"}
    assert lanes.lane_of("something-new") == "train"  # the default lane
    s = get_settings()
    assert lanes.lock_path(s).name == "worker.lock" and lanes.lock_path(s, "light").name == "worker-light.lock"


def test_every_job_kind_has_a_lane_and_a_handler() -> None:
    """The two tables a new job kind must be added to (docs/ARCHITECTURE.md) stay complete."""
    from workbench.handlers import HANDLERS
    from workbench.status import JobKind

    assert set(lanes.LANE_OF_KIND) == set(JobKind) == set(HANDLERS)
    assert {lanes.lane_of(k) for k in JobKind} == set(lanes.LANES)  # no lane left without work


def test_ingest_on_light_lane_completes_while_training_runs(data_dir: Path, shared_datasets: Path) -> None:
    from storage.db import get_sessionmaker
    from workbench import datasets

    sf = get_sessionmaker(get_settings().database_url)
    create_dataset_rows(data_dir, sf, "colours", [8, 8, 8])
    try:
        # A long training on the train lane (its worker started by queue_training).
        (run_id,) = runs.queue_training("colours", ["lite0"], resolution=64, recipe="quick", overrides=LONG,
                                        postrun=False)
        wait_for(lambda: runs.get_run(run_id).status == "running" and runs.run_metrics(run_id), timeout=240,
                 what="training to be underway")
        train_pid = lanes.worker_pid()
        assert train_pid and train_pid > 0

        # An upload meanwhile: queued on the light lane, run by its own worker.
        upload = save_upload(data_dir, bean_zip(shared_datasets, data_dir.parent / "beans.zip"), "beans.zip")
        ok = enqueue("ingest", {"name": "beans-few", "filename": "beans.zip", "upload": upload, "seed": 0})
        bad = enqueue("ingest", {"name": "broken", "filename": "broken.zip",
                                 "upload": save_upload(data_dir, b"this is not a zip", "broken.zip")})
        light_pid = lanes.ensure_worker(lane="light")
        assert light_pid != train_pid
        t0 = time.monotonic()
        wait_for(lambda: job_row(bad).status in TERMINAL, timeout=180, what="the ingest jobs")
        ingest_s = time.monotonic() - t0

        # Both ingests finished while the training is still running (it was not waited for).
        assert runs.get_run(run_id).status == "running"
        assert runs.get_run(run_id).job_status not in TERMINAL
        j = job_row(ok)
        assert j.status == "succeeded", j.error
        assert j.worker_pid not in (None, train_pid) and j.worker_pid == lanes.worker_pid(lane="light")
        assert j.progress["done"] == j.progress["total"] == 12 and j.progress["fraction"] == 1.0
        info = datasets.get_dataset("beans-few")
        assert info.num_images == 12 and info.num_classes == 3 and j.payload["dataset_id"] == info.id
        failed = job_row(bad)
        assert failed.status == "failed" and "Traceback" not in failed.error and failed.error
        # The uploaded files (and their folders) are gone, success or failure.
        assert not (data_dir / upload).exists()
        assert not any((data_dir / "tmp" / "uploads").iterdir())
        print(f"\n2 ingests on the light lane during training: {ingest_s:.1f} s")
        assert runs.cancel_run(run_id) == "cancelling"
        wait_for(lambda: runs.get_run(run_id).status == "cancelled", timeout=120, what="the cancellation")
    finally:
        stop_workers(data_dir)
    assert worker_processes(data_dir) == []
    assert lanes.worker_pid() is None and lanes.worker_pid(lane="light") is None


def test_reconcile_fails_light_job_whose_worker_died(data_dir: Path) -> None:
    import subprocess
    import sys

    from storage.db import get_sessionmaker
    from storage.models import Job

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    sf = get_sessionmaker(get_settings().database_url)
    with sf.begin() as s:
        s.add(Job(kind="ingest", status="running", worker_pid=dead.pid, payload={"name": "x"}))
        s.add(Job(kind="ui-export", status="working", worker_pid=dead.pid, payload={}))  # an old in-server row
    assert sorted(worker.reconcile()) == [1, 2]
    j = job_row(1)
    assert j.status == "failed" and "light-lane worker" in j.error and "ingest" in j.error
    assert job_row(2).status == "failed"
    # A light worker takes only light jobs: a queued training stays queued for the train lane.
    train_job = enqueue("train", {})
    assert worker.run_worker(once=True, lane="light") == 0
    assert job_row(train_job).status == "queued"
