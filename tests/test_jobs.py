"""Job runner: real worker processes, real SQLite (WAL) or PostgreSQL (see conftest), real SIGKILL."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from builders import create_dataset_rows
from conftest import on_postgresql, wait_for

from workbench import jobs, lanes, runs, worker
from workbench.settings import get_settings
from workbench.status import TERMINAL

REPO = Path(__file__).resolve().parents[1]
TINY = dict(head_epochs=2, finetune_epochs=3, unfreeze_stages=1, cache_views=1, batch_size=8, head_batch_size=16,
            num_threads=1, patience=10)


@pytest.fixture
def sf(data_dir: Path):
    from storage.db import get_sessionmaker

    return get_sessionmaker(get_settings().database_url)


def spawn_worker(*args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-m", "workbench.worker", *args], cwd=REPO, env=env,
                            start_new_session=True)



def test_two_queued_jobs_run_back_to_back_without_lock_errors(data_dir: Path, sf) -> None:
    create_dataset_rows(data_dir, sf, "colours", [8, 8, 8])
    ids = runs.queue_training("colours", ["lite0", "lite0"], resolution=64, recipe="quick", epochs=1,
                              overrides=dict(TINY, head_epochs=1), postrun=False)
    assert len(ids) == 2 and runs.get_run(ids[0]).batch_label == runs.get_run(ids[1]).batch_label
    pid = wait_for(lanes.worker_pid, timeout=120)  # ensure_worker started one; it holds the lock
    assert lanes.ensure_worker() == pid  # alive: no second worker
    # Meanwhile this process reads and writes the same DB all the time (as the UI does).
    seen_running = set()

    def done() -> bool:
        for r in runs.list_runs():
            if r.status == "running":
                seen_running.add(r.id)
        runs.run_events(ids[0])
        jobs.add_event(sf, ids[1], "UI ping")  # a concurrent writer
        return all(runs.get_run(i).status in TERMINAL for i in ids)

    wait_for(done, timeout=240)
    infos = [runs.get_run(i) for i in ids]
    assert [i.status for i in infos] == ["succeeded", "succeeded"], [i.error for i in infos]
    assert infos[1].started_at >= infos[0].finished_at  # one after the other
    assert all(i.checkpoint_path and (data_dir / i.checkpoint_path).is_file() for i in infos)
    assert [m.epoch for m in runs.run_metrics(ids[0])] == [1, 2]
    assert infos[0].best_metrics["macro_f1"] > 0
    events = [e.message for e in runs.run_events(ids[0])]
    assert any("Training finished" in m for m in events)
    assert not any("locked" in (i.error or "") for i in infos)
    from storage.models import Job
    with sf() as s:
        assert {j.status for j in s.query(Job).all()} == {"succeeded"}
    os.kill(pid, signal.SIGTERM)  # the worker ensure_worker started for this test
    wait_for(lambda: lanes.worker_pid() is None, timeout=30)


def test_kill_worker_then_resume_matches_uninterrupted_run(data_dir: Path, sf) -> None:
    create_dataset_rows(data_dir, sf, "colours", [8, 8, 8])
    # Ten epochs, killed after the third: seven epochs (seconds) of margin, so even a fast machine
    # cannot finish the run between the poll that sees epoch 3 and the kill.
    cfg = dict(TINY, finetune_epochs=8)
    ref_id, run_id = runs.queue_training("colours", ["lite0", "lite0"], resolution=64, recipe="quick",
                                         overrides=cfg, postrun=False, start_worker=False)
    # Uninterrupted reference (the worker code path, in this process).
    assert worker.run_worker(once=True) == 0
    assert runs.get_run(ref_id).status == "succeeded"

    proc = spawn_worker("--once")
    # Kill it (SIGKILL: no cleanup at all) once the second finetune epoch is underway.
    wait_for(lambda: len(runs.run_metrics(run_id)) >= 3, timeout=240, poll=0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert runs.get_run(run_id).status == "running"  # the DB does not know yet
    assert worker.reconcile() != []
    info = runs.get_run(run_id)
    assert info.status == "failed" and "Worker died" in info.error and info.resumable

    runs.resume_run(run_id, start_worker=False)
    assert worker.run_worker(once=True) == 0
    ref, res = runs.get_run(ref_id), runs.get_run(run_id)
    assert res.status == "succeeded", res.error
    assert res.summary["resumed_from_epoch"] >= 3
    a, b = runs.run_metrics(ref_id), runs.run_metrics(run_id)
    assert [m.epoch for m in a] == [m.epoch for m in b] == list(range(1, 11))
    for x, y in zip(a, b):
        assert x.values["val_loss"] == pytest.approx(y.values["val_loss"], abs=1e-6), \
            [(m.epoch, m.values["val_loss"], n.values["val_loss"]) for m, n in zip(a, b)]
        assert x.values["val_accuracy"] == y.values["val_accuracy"]
    assert ref.best_metrics["epoch"] == res.best_metrics["epoch"]
    assert ref.best_metrics["loss"] == pytest.approx(res.best_metrics["loss"], abs=1e-6)


def test_cancel_running_and_queued_runs(data_dir: Path, sf) -> None:
    create_dataset_rows(data_dir, sf, "colours", [8, 8, 8])
    long_cfg = dict(TINY, finetune_epochs=50, head_epochs=50, patience=100)
    running_id, queued_id = runs.queue_training("colours", ["lite0", "lite0"], resolution=64, recipe="quick",
                                                overrides=long_cfg, postrun=False, start_worker=False)
    proc = spawn_worker("--idle-exit", "1")
    try:
        wait_for(lambda: runs.get_run(running_id).status == "running" and runs.run_metrics(running_id), timeout=240)
        assert runs.cancel_run(queued_id) == "cancelled"  # never starts
        assert runs.cancel_run(running_id) == "cancelling"
        t0 = time.monotonic()
        wait_for(lambda: runs.get_run(running_id).status == "cancelled", timeout=60)
        assert time.monotonic() - t0 < 30
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert runs.get_run(queued_id).status == "cancelled"
    assert runs.get_run(queued_id).started_at is None
    assert runs.get_run(running_id).resumable
    with pytest.raises(runs.RunError, match="only queued or running"):
        runs.cancel_run(running_id)


def test_reconcile_and_queue_validation(data_dir: Path, sf) -> None:
    from core.registry import UnknownVariantError
    from core.weights import WeightsError
    from storage.models import Job, Run

    create_dataset_rows(data_dir, sf, "colours", [3, 3])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    with sf.begin() as s:
        run = Run(dataset_id=1, variant="lite0", resolution=64, preset="field", status="running", config={})
        s.add(run)
        s.flush()
        s.add(Job(kind="train", status="running", run_id=run.id, worker_pid=dead.pid, payload={}))
        s.add(Job(kind="nonsense", status="queued", payload={}))
    assert len(worker.reconcile()) == 1
    info = runs.get_run(1)
    assert info.status == "failed" and "No checkpoint was written yet" in info.error
    # A job kind nobody handles fails with a clear error instead of crashing the worker.
    assert worker.run_worker(once=True) == 0
    with sf() as s:
        job = s.query(Job).filter_by(kind="nonsense").one()
        assert job.status == "failed" and "no handler registered for job kind 'nonsense'" in job.error

    with pytest.raises(UnknownVariantError, match="Known variants"):
        runs.queue_training("colours", ["b99"], start_worker=False)
    # More stages to unfreeze than the model has: refused when queued, not when it trains.
    with pytest.raises(runs.RunError, match=r"unfreeze_stages must be 0\.\.7 for lite0, got 8"):
        runs.queue_training("colours", ["lite0"], overrides={"unfreeze_stages": 8}, start_worker=False)
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        from core.weights import hub_reachable
        hub_reachable.cache_clear()
        with pytest.raises(WeightsError, match="No ImageNet weights reachable for b3"):
            runs.queue_training("colours", ["b3"], start_worker=False)
    finally:
        del os.environ["HF_HUB_OFFLINE"]
        hub_reachable.cache_clear()
    with pytest.raises(runs.RunError, match="No dataset named 'nope'"):
        runs.queue_training("nope", ["lite0"], start_worker=False)


def test_cli_train_detach_runs_and_cancel(data_dir: Path, sf, capsys: pytest.CaptureFixture[str]) -> None:
    from workbench.cli import main

    create_dataset_rows(data_dir, sf, "colours", [6, 6])
    # A worker is alive (holds the lock) but busy with nothing: train --detach must only queue.
    assert main(["train", "colours", "--variant", "lite0", "--resolution", "64", "--recipe", "quick", "--detach",
                 "--preset", "medical"]) == 0
    out = capsys.readouterr().out
    assert "Queued run(s) 1" in out
    pid = lanes.worker_pid()
    if pid and pid > 0:
        assert main(["cancel", "1"]) == 0  # queued or running: both accepted
    assert main(["runs"]) == 0
    out = capsys.readouterr().out
    assert "colours" in out and "lite0" in out
    wait_for(lambda: runs.get_run(1).status in TERMINAL, timeout=120)
    assert main(["cancel", "1"]) == 2
    assert "only queued or running" in capsys.readouterr().err
    pid = lanes.worker_pid()
    if pid and pid > 0:  # the worker this test started: stop it rather than wait for its idle exit
        os.kill(pid, signal.SIGTERM)
        wait_for(lambda: lanes.worker_pid() is None, timeout=30)

    # `workbench runs delete RUN`: asks first (refuses without a terminal), then removes rows and folder.
    from workbench.paths import RunPaths

    folder = RunPaths(get_settings(), 1).root
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "last.pt").write_bytes(b"checkpoint")
    assert main(["runs", "delete", "1"]) == 2
    assert "needs --yes" in capsys.readouterr().err and folder.is_dir()
    assert main(["runs", "delete", "1", "--yes"]) == 0
    assert "Deleted run 1" in capsys.readouterr().out
    assert not folder.exists() and runs.list_runs() == []
    assert main(["runs", "delete", "1", "--yes"]) == 2
    assert "No run with id 1" in capsys.readouterr().err
    (queued,) = runs.queue_training("colours", ["lite0"], resolution=64, recipe="quick", start_worker=False)
    assert main(["runs", "delete", str(queued), "--yes"]) == 2
    assert "cancel it before deleting it" in capsys.readouterr().err


def test_concurrent_claims_take_every_job_exactly_once(data_dir: Path, sf) -> None:
    """Eight claimers racing on one queue (own connections, as separate workers have): no job
    is taken twice, none is left behind."""
    from concurrent.futures import ThreadPoolExecutor

    from workbench.status import JobKind

    with sf.begin() as s:
        queued = [jobs.enqueue(s, JobKind.MEASURE).id for _ in range(40)]

    def drain(pid: int) -> list[int]:
        taken = []
        while (job := jobs.claim_next_job(sf, pid, [JobKind.MEASURE])) is not None:
            taken.append(job.id)
        return taken

    with ThreadPoolExecutor(8) as pool:
        per_claimer = list(pool.map(drain, range(1000, 1008)))
    claimed = [j for taken in per_claimer for j in taken]
    assert sorted(claimed) == queued  # each once, all of them
    assert all(taken == sorted(taken) for taken in per_claimer)  # oldest first


@pytest.mark.skipif(not on_postgresql(),
                    reason="row locks are PostgreSQL's (SQLite locks the whole file: one writer at a time)")
def test_claim_skips_a_job_another_worker_has_locked(data_dir: Path, sf) -> None:
    """While another transaction holds the oldest queued job's row (a claim in flight), a claim
    takes the next job at once: it neither waits for that lock nor comes back empty."""
    from concurrent.futures import ThreadPoolExecutor

    from sqlalchemy import select

    from storage.models import Job
    from workbench.status import JobKind

    with sf.begin() as s:
        first, second = (jobs.enqueue(s, JobKind.MEASURE).id for _ in range(2))
    # The pool closes last: if the claim did block, the holder's commit frees it first.
    with ThreadPoolExecutor(1) as pool, sf.begin() as holder:
        holder.execute(select(Job.id).where(Job.id == first).with_for_update())
        claim = pool.submit(jobs.claim_next_job, sf, 4242, [JobKind.MEASURE])
        job = claim.result(timeout=20)  # blocking on the lock would time out here
        assert job is not None and job.id == second
