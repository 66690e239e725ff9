"""Device choice (auto, cpu, cuda:N) for training, Grad-CAM and ONNX Runtime: real torch, real
onnxruntime. CI has no GPU: the CPU path and the "GPU asked for but absent" messages are tested;
on a GPU machine the absent-GPU cases ask for one past the last."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from core.train.robustness import DeviceError, check_device_name, resolve_device

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
ABSENT = f"cuda:{GPUS}"  # one past the last GPU (cuda:0 here: there is none)


@pytest.mark.parametrize("name", ["gpu", "cuda:x", "CUDA 0", "", "tpu:0"])
def test_misspelt_device_names_are_refused(name: str) -> None:
    with pytest.raises(DeviceError, match="Unknown device .*use auto .* cpu, cuda .* or cuda:N"):
        check_device_name(name)


def test_cpu_and_auto_resolve_here() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if GPUS else "cpu")


def test_absent_gpu_says_what_this_machine_has() -> None:
    with pytest.raises(DeviceError) as err:
        resolve_device(ABSENT)
    msg = str(err.value)
    assert repr(ABSENT) in msg
    assert ("has no usable GPU" in msg and "--device cpu" in msg) if not GPUS else f"has {GPUS} GPU" in msg


def test_training_on_an_absent_gpu_fails_before_any_work(tmp_path: Path) -> None:
    from core.train import TrainConfig, TrainingError, train

    with pytest.raises(TrainingError, match=f"Device '{ABSENT}' was requested"):
        train([("x.png", 0)], ["a", "b"], "lite0", tmp_path / "run", TrainConfig(device=ABSENT), resolution=64)
    assert not (tmp_path / "run" / "last.pt").exists()


def test_grad_cam_on_the_chosen_device() -> None:
    from core.efficientnet import EfficientNet
    from core.gradcam import grad_cam

    torch.manual_seed(0)
    model = EfficientNet("lite0", 3).eval()
    x = np.random.default_rng(0).standard_normal((1, 3, 64, 64)).astype(np.float32)
    here = grad_cam(model, x, 1)
    on_cpu = grad_cam(model, x, 1, device="cpu")
    assert on_cpu.shape == (64, 64) and np.allclose(here, on_cpu, atol=1e-6)
    with pytest.raises(DeviceError, match="was requested"):
        grad_cam(model, x, 1, device=ABSENT)
    assert next(model.parameters()).device.type == "cpu"  # left where it was


def test_onnx_runtime_provider_choice() -> None:
    import onnxruntime as ort

    from core.latency import ort_providers

    assert ort_providers("cpu") == ["CPUExecutionProvider"]
    cuda_ep = "CUDAExecutionProvider" in ort.get_available_providers() and GPUS > 0
    assert ort_providers("auto")[0] == ("CUDAExecutionProvider" if cuda_ep else "CPUExecutionProvider")


def test_cli_train_refuses_a_misspelt_device(data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from workbench.cli import main

    assert main(["train", "anything", "--device", "gpu0", "--detach"]) == 2
    assert "Unknown device 'gpu0'" in capsys.readouterr().err


def test_cli_evaluate_on_an_absent_gpu_says_so_before_loading(data_dir: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    from workbench.cli import main

    assert main(["evaluate", "1", "--device", ABSENT]) == 2  # run 1 does not exist: the device is checked first
    assert f"Device '{ABSENT}' was requested" in capsys.readouterr().err
