"""Workers on several hosts sharing one database and data dir (simulated on one machine with
different host ids): leases instead of pid checks, a dead host's run resumed by another host
after its lease with no one asking (up to WORKBENCH_AUTO_RESUMES times), no job run twice; jobs
stating needs wait for a worker that has them. Real worker processes, real SIGKILL, real SQLite
or PostgreSQL (see conftest)."""
from __future__ import annotations

import os
import signal
from datetime import timedelta
from pathlib import Path

import pytest
from builders import WORKER_LEASE_S, create_dataset_rows, spawn_host
from conftest import wait_for
from sqlalchemy import select

from storage.models import Job
from workbench import jobs, runs, worker, workers
from workbench.settings import SettingsError, check_host_id, get_settings

# Short, so the take-over happens within seconds; long enough that a heartbeat thread starved by a
# busy machine (one beat every LEASE_S / 3) does not lose a live worker's job.
LEASE_S = WORKER_LEASE_S
TINY = dict(head_epochs=1, finetune_epochs=4, unfreeze_stages=1, cache_views=1, batch_size=8, head_batch_size=16,
            num_threads=1, patience=20)


@pytest.fixture
def sf(data_dir: Path):
    from storage.db import get_sessionmaker

    return get_sessionmaker(get_settings().database_url)


def _jobs(sf) -> list[Job]:
    with sf() as s:
        return list(s.scalars(select(Job).order_by(Job.id)))


def test_other_host_resumes_a_killed_workers_run_by_itself(data_dir: Path, sf) -> None:
    create_dataset_rows(data_dir, sf, "colours", [6, 6], size=16)
    (run_id,) = runs.queue_training("colours", ["lite0"], resolution=64, recipe="quick", overrides=TINY,
                                    postrun=False, start_worker=False)
    # Two train workers on one data dir: one lane lock per host, so both run and race for the job.
    procs = {h: spawn_host(h) for h in ("host-a", "host-b")}
    try:
        first = wait_for(lambda: _jobs(sf)[0].host_id, timeout=240, what="a claim")
        other = next(h for h in procs if h != first)
        wait_for(lambda: runs.run_metrics(run_id), timeout=300, poll=0.1, what="the first epoch")
        os.kill(procs[first].pid, signal.SIGKILL)
        procs[first].wait()
        assert runs.get_run(run_id).status == "running"  # nobody knows yet: the lease still holds

        # No one types `workbench resume`: the other host finds the lease run out and resumes the run.
        # (A resumed run goes from running to queued, never through failed.)
        wait_for(lambda: runs.get_run(run_id).status in ("succeeded", "failed"), timeout=400, what="the resumed run")
        assert runs.get_run(run_id).status == "succeeded", runs.get_run(run_id).error
        assert procs[other].poll() is None  # it took the resume and is still serving
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.terminate()
        for p in procs.values():
            p.wait(60)
    dead, resumed = _jobs(sf)
    assert dead.status == "failed" and dead.worker_id.startswith(f"{first}/train/")
    assert f"the worker on host {first}" in dead.error and "lease" in dead.error
    assert resumed.status == "succeeded" and resumed.host_id == other and resumed.worker_id.startswith(other)
    assert resumed.payload["auto_resume"] == 1 and resumed.payload["postrun"] is False  # as it was queued
    messages = [e.message for e in runs.run_events(run_id)]
    # No job ran twice: one start (the first host), one resume (the other), nothing else.
    assert sum(m.startswith("Starting training") for m in messages) == 1, messages
    assert sum(m.startswith("Resuming training") for m in messages) == 1, messages
    assert sum(m.startswith("Training finished") for m in messages) == 1, messages
    assert any(m.startswith(f"Resumed on host {other}: the worker on host {first}") for m in messages), messages
    assert [m.epoch for m in runs.run_metrics(run_id)] == list(range(1, 6))  # every epoch, once
    info = runs.get_run(run_id)
    assert info.summary["resumed_from_epoch"] >= 1
    from workbench.summary import describe_worker_loss

    (loss,) = info.summary["worker_losses"]
    assert (loss["host"], loss["resumed_on"], loss["auto_resume"]) == (first, other, 1)
    assert describe_worker_loss(loss).endswith(f"; resumed on host {other} (automatic resume 1 of 2)")
    assert workers.live_workers(sf) == []  # one killed (lease ran out), one stopped cleanly


def test_job_waits_for_a_worker_that_has_what_it_needs(data_dir: Path, sf) -> None:
    have = workers.detect_resources()
    with sf.begin() as s:
        # Unknown kinds: the train lane takes them and fails them readably (no handler), instantly.
        big = jobs.enqueue(s, "probe", payload={"needs": {"gpus": have.gpus + 1}}).id
        small = jobs.enqueue(s, "probe", payload={"needs": {"cpus": 1, "memory_gb": 0.5}}).id
    assert worker.run_worker(once=True) == 0  # skips the oldest (it cannot run it), takes the next
    assert worker.run_worker(once=True) == 0  # nothing it can run: claims nothing, says why
    rows = {j.id: j for j in _jobs(sf)}
    assert rows[small].status == "failed" and "no handler registered" in rows[small].error
    assert rows[big].status == "queued" and rows[big].worker_id is None
    msg = rows[big].progress["message"]
    assert f"needs {have.gpus + 1} GPU" in msg and "no running worker has that" in msg
    assert get_settings().host_id in msg  # names the workers it looked at


@pytest.mark.parametrize(("needs", "message"), [
    ("lots", "needs must be a mapping"),
    ({"gpus": "two"}, "'gpus' must be a whole number of 0 or more, got 'two'"),
    ({"gpus": -1}, "'gpus' must be a whole number"),
    ({"memory_gb": "8G"}, "'memory_gb' must be a number of 0 or more, got '8G'"),
    ({"tpus": 1}, "unknown key(s) 'tpus'; known: gpus, memory_gb, cpus"),
])
def test_unreadable_needs_are_refused_when_queued(data_dir: Path, sf, needs, message: str) -> None:
    with pytest.raises(workers.NeedsError) as err, sf.begin() as s:
        jobs.enqueue(s, "probe", payload={"needs": needs})
    assert message in str(err.value)


def test_host_id_and_lease_settings_are_checked(data_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    from workbench.cli import main

    default = get_settings().host_id
    assert check_host_id(default) == default and default == get_settings().host_id  # stable
    with pytest.raises(SettingsError, match="host id '../etc' is not usable"):
        check_host_id("../etc")
    monkeypatch.setenv("WORKBENCH_LEASE_S", "soon")
    with pytest.raises(SettingsError, match="WORKBENCH_LEASE_S must be a number of seconds, got 'soon'"):
        get_settings()
    monkeypatch.setenv("WORKBENCH_LEASE_S", "0.1")
    with pytest.raises(SettingsError, match="at least 1 seconds"):
        get_settings()
    monkeypatch.delenv("WORKBENCH_LEASE_S")
    monkeypatch.setenv("WORKBENCH_AUTO_RESUMES", "two")
    with pytest.raises(SettingsError, match="WORKBENCH_AUTO_RESUMES must be a whole number of 0 or more"):
        get_settings()
    monkeypatch.setenv("WORKBENCH_AUTO_RESUMES", "-1")
    with pytest.raises(SettingsError, match="got '-1'"):
        get_settings()
    monkeypatch.setenv("WORKBENCH_AUTO_RESUMES", "0")
    assert get_settings().auto_resumes == 0
    monkeypatch.delenv("WORKBENCH_AUTO_RESUMES")
    assert main(["worker", "--once", "--host-id", "two words"]) == 2
    assert "host id 'two words' is not usable" in capsys.readouterr().err


def _worker_dies(sf, job_id: int, host: str) -> None:
    """A worker of ``host`` claimed the job, started the run, wrote epoch 1, then died: its lease is over."""
    from storage.models import Run, RunMetric, utcnow

    past = utcnow() - timedelta(seconds=5)
    with sf.begin() as s:
        job = s.get(Job, job_id)
        job.status, job.host_id, job.worker_id, job.worker_pid = "running", host, f"{host}/train/4242-abc", 4242
        job.started_at, job.lease_until = past, past
        run = s.get(Run, job.run_id)
        run.status = "running"
        if not run.metrics:
            s.add(RunMetric(run_id=run.id, epoch=1, phase="head", metrics={"val_loss": 1.0}))


def test_auto_resume_stops_at_the_limit_then_fails_for_a_person(data_dir: Path, sf, capsys: pytest.CaptureFixture[str],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from workbench.cli import main

    create_dataset_rows(data_dir, sf, "colours", [4, 4], val_per_class=1, size=16)
    (run_id,) = runs.queue_training("colours", ["lite0"], resolution=64, recipe="quick", start_worker=False)
    job_id = _jobs(sf)[0].id
    for n, host in enumerate(("host-a", "host-b"), 1):
        _worker_dies(sf, job_id, host)
        assert worker.reconcile() == [job_id]  # this host notices the lease ran out
        resumed = _jobs(sf)[-1]
        assert resumed.id != job_id and resumed.status == "queued"
        assert resumed.payload["resume"] is True and resumed.payload["auto_resume"] == n
        assert runs.get_run(run_id).status == "queued"
        job_id = resumed.id
    _worker_dies(sf, job_id, "host-c")
    assert worker.reconcile() == [job_id]
    assert len(_jobs(sf)) == 3  # no third resume
    info = runs.get_run(run_id)
    assert info.status == "failed" and info.resumable
    assert info.error == ("Worker died: Worker on host host-c (pid 4242) stopped at epoch 1 (its lease ran out), "
                          "and it was already resumed automatically 2 times in a row (WORKBENCH_AUTO_RESUMES=2). "
                          "Resume from the checkpoint after epoch 1.")
    assert [loss["host"] for loss in info.summary["worker_losses"]] == ["host-a", "host-b", "host-c"]
    assert main(["runs"]) == 0
    out = capsys.readouterr().out
    assert "worker on host host-a (pid 4242) stopped at epoch 1; automatic resume 1 of 2 queued" in out
    assert "worker on host host-c (pid 4242) stopped at epoch 1; not resumed automatically (limit 2 reached)" in out

    # A person's resume starts the count again; WORKBENCH_AUTO_RESUMES=0 turns it off.
    job_id = runs.resume_run(run_id, start_worker=False)
    monkeypatch.setenv("WORKBENCH_AUTO_RESUMES", "0")
    _worker_dies(sf, job_id, "host-d")
    assert worker.reconcile() == [job_id]
    assert "automatic resume is off (WORKBENCH_AUTO_RESUMES=0)" in runs.get_run(run_id).error
