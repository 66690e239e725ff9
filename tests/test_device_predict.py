"""Where predictions and latency run: ``--device`` on predict and serve, the provider recorded
beside every latency figure, "on CPU" / "on GPU (CUDA)" in plain words. Real ONNX Runtime on a
real (random-weight) lite0 bundle, real CLI. CI has no GPU: a GPU asked for is refused with the
train/evaluate message; on a GPU machine the refused one is one past the last GPU."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
ABSENT = f"cuda:{GPUS}"  # one past the last GPU (cuda:0 here: there is none)
REFUSED = [ABSENT] + ([] if GPUS else ["cuda"])




def test_latency_record_says_which_provider_ran(random_bundle: dict) -> None:
    from workbench.compute import latency_on, measured_on

    rec = random_bundle["record"]
    assert rec["latency_ms_p50"] > 0
    assert rec["latency_provider"] == "CPUExecutionProvider" == rec["latency_conditions"]["provider"]
    assert rec["latency_on"] == "CPU" and latency_on(rec) == "CPU" and measured_on([rec]) == " on CPU"
    # The model card states it too.
    import zipfile

    with zipfile.ZipFile(random_bundle["bundle"]) as zf:
        assert "## Files and speed (ONNX Runtime on CPU, measured on " in zf.read("README.md").decode()


def test_stored_figures_in_plain_words() -> None:
    from workbench.compute import latency_on, measured_on, torch_device_words

    gpu = {"latency_ms_p50": 1.0, "latency_provider": "CUDAExecutionProvider"}
    old = {"latency_ms_p50": 5.0, "latency_conditions": {"threads": 2}}  # before providers were recorded: CPU
    busy = {"latency_ms_p50": None, "latency_note": "not measured: machine busy"}
    assert latency_on(gpu) == "GPU (CUDA)" and latency_on(old) == "CPU" and latency_on(busy) == "" == latency_on(None)
    assert measured_on([gpu, busy]) == " on GPU (CUDA)" and measured_on([busy]) == ""
    assert measured_on([gpu, old]) == " on CPU or GPU (CUDA) (see each row)"
    assert [torch_device_words(d) for d in ("cpu", "cuda", "cuda:0", "cuda:1")] == [
        "CPU", "GPU (CUDA)", "GPU (CUDA)", "GPU 1 (CUDA)"]


def test_predict_says_where_it_ran(random_bundle: dict, data_dir: Path, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    from workbench.cli import main

    imgs = [str(random_bundle["img0"]), str(random_bundle["img1"])]
    csv_path = str(tmp_path / "p.csv")
    assert main(["predict", str(random_bundle["bundle"]), *imgs, "--device", "cpu", "--csv", csv_path]) == 0
    assert "running on CPU (ONNX Runtime CPUExecutionProvider)" in capsys.readouterr().out
    assert (tmp_path / "p.csv").is_file()
    assert main(["predict", str(random_bundle["bundle"]), *imgs, "--device", "cpu", "--json",
                 "--csv", str(tmp_path / "q.csv")]) == 0
    out = capsys.readouterr()
    rows = json.loads(out.out)
    assert len(rows) == 2 and all(r["runs_on"] == "CPU" and r["provider"] == "CPUExecutionProvider" for r in rows)
    assert "running on CPU" in out.err  # --json keeps stdout for the JSON


@pytest.mark.parametrize("device", REFUSED)
@pytest.mark.parametrize("target", ["bundle", "run"])
def test_predict_on_an_absent_gpu_refuses_before_touching_files(random_bundle: dict, data_dir: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str], device: str,
                                                                target: str) -> None:
    from workbench.cli import main

    csv_path = tmp_path / "p.csv"
    # run 1 does not exist: the device is checked first
    what = str(random_bundle["bundle"]) if target == "bundle" else "1"
    assert main(["predict", what, str(random_bundle["img0"]), "--device", device, "--csv", str(csv_path)]) == 2
    err = capsys.readouterr().err
    assert f"Device '{device}' was requested" in err and ("--device cpu" in err if not GPUS else "GPU" in err)
    assert not csv_path.exists() and list(data_dir.iterdir()) == []  # no CSV, no database, no export


@pytest.mark.parametrize("command", ["predict", "serve"])
def test_unknown_device_names_are_refused(random_bundle: dict, data_dir: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str], command: str) -> None:
    from workbench.cli import main

    extra = [str(random_bundle["img0"]), "--csv", str(tmp_path / "p.csv")] if command == "predict" else []
    assert main([command, str(random_bundle["bundle"]), *extra, "--device", "gpu0"]) == 2
    err = capsys.readouterr().err
    assert "Unknown device 'gpu0': use auto" in err and "cuda:N" in err
    assert not (tmp_path / "p.csv").exists()


def test_serve_reports_where_the_model_runs(random_bundle: dict, data_dir: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    from fastapi.testclient import TestClient

    from workbench.cli import main
    from workbench.predictor import Predictor
    from workbench.serve import create_app

    assert main(["serve", str(random_bundle["bundle"]), "--device", ABSENT]) == 2
    assert f"Device '{ABSENT}' was requested" in capsys.readouterr().err
    p = Predictor.load(random_bundle["bundle"], device="cpu")
    assert p.runs_on == "CPU" and p.provider == "CPUExecutionProvider"
    client = TestClient(create_app(p))
    assert client.get("/health").json()["runs_on"] == "CPU"
    meta = client.get("/metadata").json()
    assert meta["runs_on"] == "CPU" and meta["provider"] == "CPUExecutionProvider"


def test_predict_page_job_refuses_an_absent_gpu_before_reading_the_model(tmp_path: Path) -> None:
    from core.train.robustness import DeviceError
    from workbench.handlers.tasks import predict_images

    with pytest.raises(DeviceError, match=f"Device '{ABSENT}' was requested"):
        predict_images(tmp_path / "missing.pt", [], 1, True, tmp_path / "out", lambda m, f: None, device=ABSENT)
    assert not (tmp_path / "out").exists()
