"""Data-parallel training (core.train.distributed) on CPU: two gloo processes started by torchrun.

Real beans images (8 per class to train, 3 to validate), lite0 at 96 px, one head epoch and two
fine-tune epochs. The two-process run equals the one-process run up to float reduction order:
measured max-abs weight difference 5e-7 (tolerance 1e-4; without the gradient all_reduce it
is 2e-2), identical validation accuracy and macro-F1, losses within 1e-5.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from core.data import DataError
from core.registry import create_model
from core.train import Callback, TrainingError, load_checkpoint, make_config, train
from core.train.distributed import plan_device, synced_batchnorm
from core.train.robustness import DeviceError

REPO = Path(__file__).resolve().parents[1]
CONFIG = dict(head_epochs=1, finetune_epochs=2, unfreeze_stages=1, cache_views=2, batch_size=8, head_batch_size=8,
              patience=10, num_threads=1)  # torchrun gives each process one thread: the same here
WEIGHT_TOLERANCE = 1e-4
LOSS_TOLERANCE = 1e-5


class CopyAfterEpoch(Callback):
    """Copies the run's checkpoints as they are after epoch ``epoch`` (on_epoch_end follows the save)."""

    def __init__(self, epoch: int, to: Path):
        self.epoch, self.to = epoch, to

    def on_epoch_end(self, phase: str, epoch: int, metrics: dict[str, Any]) -> None:
        if epoch == self.epoch:
            self.to.mkdir(parents=True)
            for name in ("last.pt", "best.pt"):
                shutil.copy(self.to.parent / "one" / name, self.to / name)


def torchrun(args: list[str], env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node 2 ARGS``; on a timeout its whole process group is killed."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out)


@pytest.fixture(scope="module")
def beans(shared_datasets: Path) -> dict[str, Any]:
    root = shared_datasets / "beans" / "train"
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    train_s, val_s = [], []
    for label, c in enumerate(classes):
        files = sorted((root / c).iterdir())
        train_s += [(str(f), label) for f in files[:8]]
        val_s += [(str(f), label) for f in files[8:11]]
    return {"classes": classes, "samples": train_s, "val": val_s}


def _train_here(beans: dict[str, Any], run_dir: Path, callback: Callback | None = None, resume: bool = False):
    threads = torch.get_num_threads()
    try:
        return train(beans["samples"], beans["classes"], "lite0", run_dir, make_config("quick", **CONFIG),
                     resolution=96, val_samples=beans["val"], callback=callback, resume=resume)
    finally:
        torch.set_num_threads(threads)  # train() sets it for the process: leave other tests theirs


@pytest.fixture(scope="module")
def runs(beans: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One process throughout (the reference); and the reference's epoch-1 checkpoint resumed by 2
    processes to epoch 2 (cancelled there by rank 0's callback), then by 1 process to the end:
    resumes across process counts both ways."""
    tmp = tmp_path_factory.mktemp("ddp")
    mixed = tmp / "mixed"
    _train_here(beans, tmp / "one", CopyAfterEpoch(1, mixed))
    spec = {**beans, "config": {**CONFIG, "processes": 2}, "run_dir": str(mixed), "out_dir": str(tmp),
            "resume": True, "stop_after_epoch": 2}
    (tmp / "spec.json").write_text(json.dumps(spec))
    proc = torchrun(["tests/ddp_train_entry.py", str(tmp / "spec.json")])
    assert proc.returncode == 0, proc.stdout[-3000:]
    ranks = [json.loads((tmp / f"rank{r}.json").read_text()) for r in (0, 1)]
    two = load_checkpoint(mixed / "last.pt")
    final = _train_here(beans, mixed, resume=True)
    return {"one": load_checkpoint(tmp / "one" / "last.pt"), "two": two, "ranks": ranks,
            "mixed": load_checkpoint(mixed / "last.pt"), "final": final}


def _max_weight_difference(a: dict[str, Any], b: dict[str, Any]) -> float:
    return max((a["model"][k].float() - b["model"][k].float()).abs().max().item() for k in a["model"])


def _assert_same_epochs(records: list[dict[str, Any]], reference: list[dict[str, Any]]) -> None:
    for rec, ref in zip(records, reference, strict=True):
        assert (rec["epoch"], rec["val_accuracy"], rec["val_macro_f1"]) == (
            ref["epoch"], ref["val_accuracy"], ref["val_macro_f1"])
        assert abs(rec["val_loss"] - ref["val_loss"]) < LOSS_TOLERANCE
        assert abs(rec["train_loss"] - ref["train_loss"]) < LOSS_TOLERANCE


def test_two_processes_train_like_one(runs: dict[str, Any]) -> None:
    two, one = runs["two"], runs["one"]
    assert two["epoch"] == 2 and two["summary"]["world_size"] == 2 and two["summary"]["backend"] == "gloo"
    # Epochs 1 (one process) and 2 (two processes) as the one-process run had them.
    _assert_same_epochs(two["history"], one["history"][:2])
    # A cancel seen by rank 0's callback stopped both processes at the same step.
    assert [r["status"] for r in runs["ranks"]] == ["cancelled", "cancelled"]


def test_two_process_checkpoint_resumes_in_one_process(runs: dict[str, Any]) -> None:
    mixed, one, final = runs["mixed"], runs["one"], runs["final"]
    assert final.status == "succeeded" and final.summary["world_size"] == 1
    assert mixed["epoch"] == one["epoch"] == 3
    _assert_same_epochs(mixed["history"], one["history"])
    assert _max_weight_difference(mixed, one) < WEIGHT_TOLERANCE
    assert mixed["best"]["epoch"] == one["best"]["epoch"]


def test_processes_must_be_one_or_more() -> None:
    with pytest.raises(ValueError, match="processes must be a whole number of 1 or more"):
        make_config("quick", processes=0)


def test_more_processes_than_one_need_the_launcher(beans: dict[str, Any], tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match="started as one process.*--processes 2"):
        train(beans["samples"], beans["classes"], "lite0", tmp_path, make_config("quick", processes=2),
              resolution=96, val_samples=beans["val"])


def test_cpu_processes_refuse_trainable_batchnorm_when_queued() -> None:
    # torch's SyncBatchNorm raises "expected input tensor to be on GPU" on CPU (checked, torch 2.14).
    with pytest.raises(ValueError, match="CPU processes cannot keep trainable BatchNorm statistics in step"):
        make_config("thorough", processes=2, device="cpu")
    # Fixed BatchNorm statistics (quick, default) or no BatchNorm trained (head only): allowed.
    for cfg in (make_config("quick", processes=2, device="cpu"),
                make_config("thorough", processes=2, device="cpu", strategy="head")):
        assert not cfg.trains_batchnorm


def test_auto_device_on_cpu_refuses_trainable_batchnorm_at_start(beans: dict[str, Any], tmp_path: Path) -> None:
    """--device auto settles on CPU processes only when the run starts: both processes refuse there."""
    spec = {**beans, "config": {**CONFIG, "processes": 2, "train_bn": True}, "run_dir": str(tmp_path / "run"),
            "out_dir": str(tmp_path)}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    proc = torchrun(["tests/ddp_train_entry.py", str(tmp_path / "spec.json")],
                    env={"CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stdout[-3000:]
    for r in (0, 1):
        out = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert out["status"] == "failed" and "synchronises them across processes on GPUs only" in out["message"]


def test_synced_batchnorm_stands_in_for_the_model_layers_and_gives_them_back() -> None:
    """The GPU path's layer swap (the synchronisation itself needs 2 GPUs): outside a process group a
    SyncBatchNorm computes as BatchNorm, so the swapped model must compute, and update its running
    statistics, exactly as the plain one; afterwards the model has its own layers and keys again."""
    plain = create_model("lite0", 3, weights="none", resolution=64).model.train()
    swapped = copy.deepcopy(plain)
    layers = {n: type(m) for n, m in swapped.named_modules()}
    keys = list(swapped.state_dict())
    x = torch.randn(4, 3, 64, 64)
    with synced_batchnorm(swapped, enabled=True):
        norms = [m for m in swapped.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        assert norms and all(isinstance(m, torch.nn.SyncBatchNorm) for m in norms)
        assert list(swapped.state_dict()) == keys
        torch.manual_seed(1)  # the same dropout and stochastic-depth draws for both
        out = swapped(x)
    torch.manual_seed(1)
    assert torch.allclose(out, plain(x), atol=1e-5)  # activations kept, same normalisation
    assert {n: type(m) for n, m in swapped.named_modules()} == layers and list(swapped.state_dict()) == keys
    for k, v in plain.state_dict().items():  # the stand-ins updated the model's own running statistics
        assert torch.allclose(swapped.state_dict()[k].float(), v.float(), atol=1e-6), k
    assert swapped.state_dict()["bn1.num_batches_tracked"].item() == 1


@pytest.mark.parametrize(("device", "gpus", "expected"), [
    ("cpu", 4, "cpu"), ("auto", 0, "cpu"), ("auto", 1, "cpu"), ("auto", 2, "cuda"), ("cuda", 2, "cuda")])
def test_device_plan_for_two_processes(device: str, gpus: int, expected: str) -> None:
    assert plan_device(device, 2, gpus) == expected


@pytest.mark.parametrize(("device", "gpus", "message"), [
    ("cuda", 1, "2 processes on GPUs need 2 GPUs, but this machine has 1"),
    ("cuda", 0, "need 2 GPUs, but this machine has 0"),
    ("cuda:1", 4, "names one GPU, but 2 processes each take their own GPU")])
def test_device_plan_refuses_what_does_not_fit(device: str, gpus: int, message: str) -> None:
    with pytest.raises(DeviceError, match=message):
        plan_device(device, 2, gpus)


def test_worker_trains_a_two_process_job_with_torchrun(data_dir: Path) -> None:
    from builders import create_dataset_rows
    from sqlalchemy import select

    from storage.db import get_sessionmaker
    from storage.models import Job
    from workbench import runs as run_service
    from workbench import worker
    from workbench.settings import get_settings

    sf = get_sessionmaker(get_settings().database_url)
    create_dataset_rows(data_dir, sf, "gen", [6, 6], val_per_class=2)
    (run_id,) = run_service.queue_training("gen", ["lite0"], resolution=96, recipe="quick", postrun=False,
                                           start_worker=False, overrides={**CONFIG, "processes": 2, "cache_views": 1,
                                                                          "finetune_epochs": 1})
    assert worker.run_worker(once=True) == 0
    run = run_service.get_run(run_id)
    assert run.status == "succeeded", run.error
    assert run.summary["world_size"] == 2 and run.summary["backend"] == "gloo"
    metrics = run_service.run_metrics(run_id)
    assert [m.epoch for m in metrics] == [1, 2]  # rank 0 reported each epoch once
    with sf() as s:
        payload = s.scalars(select(Job.payload).where(Job.run_id == run_id)).one()
    assert "needs" not in payload  # CPU processes: any worker may take it
    assert (data_dir / "runs" / f"run_{run_id:05d}" / "processes.log").is_file()


@pytest.mark.parametrize(("errors", "raised", "message"), [
    ([{"rank": 1, "kind": "TrainingError", "message": "Loss became nan"},
      {"rank": 0, "kind": "TrainingCancelled", "message": "cancelled"}], TrainingError, "Loss became nan"),
    ([{"rank": 0, "kind": "DataError", "message": "3 image file(s) are missing"}], DataError, "3 image file"),
    ([{"rank": 1, "kind": "RuntimeError", "message": "gloo: connection reset"}], TrainingError,
     "Training process 1 of 2 crashed: RuntimeError: gloo: connection reset"),
    ([], TrainingError, r"(?s)stopped unexpectedly \(exit code -9\).*Killed by the system"),
])
def test_a_failed_process_becomes_a_clear_error(tmp_path: Path, errors: list[dict[str, Any]],
                                                raised: type[Exception], message: str) -> None:
    from workbench.handlers.ddp_launch import read_outcome

    for e in errors:
        (tmp_path / f"error.rank{e['rank']}.json").write_text(json.dumps(e))
    log = tmp_path / "processes.log"
    log.write_text("...\nKilled by the system\n")
    with pytest.raises(raised, match=message):
        read_outcome(tmp_path, -9 if not errors else 1, 2, log)


def test_a_gpu_job_of_two_processes_waits_for_two_gpus_and_resumes_on_one_process(
        data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from builders import create_dataset_rows
    from sqlalchemy import select

    from storage.db import get_sessionmaker
    from storage.models import Job, Run
    from workbench import runs as run_service
    from workbench.cli import main
    from workbench.settings import get_settings
    from workbench.status import RunStatus

    sf = get_sessionmaker(get_settings().database_url)
    create_dataset_rows(data_dir, sf, "gen", [3, 3], val_per_class=1)
    (run_id,) = run_service.queue_training("gen", ["lite0"], recipe="quick", postrun=False, start_worker=False,
                                           overrides={"device": "cuda", "processes": 2})
    with sf.begin() as s:
        assert s.scalars(select(Job.payload).where(Job.run_id == run_id)).one()["needs"] == {"gpus": 2}
        run = s.get(Run, run_id)
        assert run is not None
        run.status = RunStatus.FAILED  # as if its worker had died
    with pytest.raises(run_service.RunError, match="number of processes must be 1 or more, got 0"):
        run_service.resume_run(run_id, processes=0, start_worker=False)
    run_service.resume_run(run_id, processes=1, start_worker=False)
    with sf() as s:
        payloads = s.scalars(select(Job.payload).where(Job.run_id == run_id).order_by(Job.id)).all()
        assert "needs" not in payloads[-1] and s.scalars(select(Run.config).where(Run.id == run_id)).one()[
            "processes"] == 1
    # The command line says the same in words, before anything is queued.
    assert main(["train", "gen", "--processes", "0", "--detach"]) == 2
    assert "processes must be a whole number of 1 or more" in capsys.readouterr().err
