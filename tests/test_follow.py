"""Following a job: one worker per lane, however often a front-end checks on it.

A front-end polling a queued job used to start a new worker at every poll while the first was
still importing (seconds on a busy machine): 42 processes for one notebook run, each slowing
the others. Real worker processes, real SQLite.
"""
from __future__ import annotations

import time
from pathlib import Path

import psutil
from conftest import stop_workers, worker_processes

from workbench import lanes
from workbench.settings import get_settings


def test_a_starting_worker_counts_as_the_lanes_worker(data_dir: Path) -> None:
    settings = get_settings()
    try:
        first = lanes.ensure_worker(settings, lane="train", idle_exit_s=20)
        assert lanes.worker_pid(settings, "train") == first  # before it has taken the lock
        for _ in range(6):  # a front-end polling every half second
            assert lanes.ensure_worker(settings, lane="train", idle_exit_s=20) == first
            time.sleep(0.5)
        assert [p.pid for p in worker_processes(data_dir)] == [first]
    finally:
        stop_workers(data_dir)


def test_a_dead_starting_worker_is_not_counted(data_dir: Path) -> None:
    settings = get_settings()
    lanes.host_dir(settings).mkdir(parents=True, exist_ok=True)
    gone = psutil.Popen(["true"])
    gone.wait()
    lanes.pid_path(settings, "train").write_text(str(gone.pid))
    assert lanes.worker_pid(settings, "train") is None
