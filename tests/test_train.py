"""core.train / core.augment / core.data on generated images with the real Lite0 ImageNet weights.

Small and fast: 48 px images, resolution 64, a few epochs. No mocks: real files, real
weights, real torch errors.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from builders import write_images

from core.augment import augment_preview, build_augment
from core.data import DataError
from core.images import load_rgb
from core.preprocessing import preprocess
from core.train import (
    Callback,
    TrainingCancelled,
    TrainingError,
    is_oom_error,
    load_checkpoint,
    load_trained_model,
    make_config,
    retry_on_oom,
    train,
)

CLASSES = ["red", "green", "blue"]
CKPT_KEYS = {"model", "optimizer", "scheduler", "epoch", "phase", "config", "variant", "resolution", "num_classes",
             "classes", "preprocessing", "padding", "bn_eps", "rng", "history", "best"}


def small_config(**kw):
    base = dict(head_epochs=2, finetune_epochs=2, unfreeze_stages=1, cache_views=2, batch_size=8,
                head_batch_size=16, num_threads=2, patience=10)
    base.update(kw)
    return make_config("quick", **base)


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[str, int]]:
    return write_images(tmp_path_factory.mktemp("imgs"), [10, 10, 10])


class Recorder(Callback):
    def __init__(self, stop_after_steps: int | None = None, stop_phase: str = "finetune",
                 stop_after_epoch: int | None = None):
        self.steps: list[tuple[str, int, int]] = []
        self.epochs: list[dict] = []
        self.logs: list[tuple[str, str]] = []
        self.phases: list[str] = []
        self.stop_after_steps, self.stop_phase, self.stop_after_epoch = stop_after_steps, stop_phase, stop_after_epoch

    def on_phase_start(self, phase, epochs, steps_per_epoch):
        self.phases.append(phase)

    def on_step(self, p):
        self.steps.append((p.phase, p.epoch, p.step))

    def on_epoch_end(self, phase, epoch, metrics):
        self.epochs.append(metrics)

    def on_log(self, level, message, data=None):
        self.logs.append((level, message))

    def should_stop(self) -> bool:
        if self.stop_after_epoch is not None and self.epochs and self.epochs[-1]["epoch"] >= self.stop_after_epoch:
            return True
        if self.stop_after_steps is None:
            return False
        return sum(1 for s in self.steps if s[0] == self.stop_phase) >= self.stop_after_steps


def test_staged_training_checkpoints_and_reload(samples, tmp_path: Path) -> None:
    rec = Recorder()
    res = train(samples, CLASSES, "lite0", tmp_path / "run", small_config(), resolution=64, callback=rec)
    assert res.status == "succeeded"
    assert rec.phases == ["load", "cache", "head", "finetune"]
    assert [h["phase"] for h in res.history] == ["head", "head", "finetune", "finetune"]
    for name in ("last.pt", "best.pt"):
        ckpt = load_checkpoint(tmp_path / "run" / name)
        assert CKPT_KEYS <= set(ckpt)
        assert ckpt["classes"] == CLASSES and ckpt["variant"] == "lite0" and ckpt["resolution"] == 64
    assert load_checkpoint(tmp_path / "run" / "last.pt")["epoch"] == 4
    # Frozen groups keep their ImageNet weights; trainable ones moved.
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    from core.weights import create_model
    ref = create_model("lite0", 3, resolution=64).model.state_dict()
    assert torch.equal(ckpt["model"]["blocks.0.0.conv_dw.weight"], ref["blocks.0.0.conv_dw.weight"])
    assert torch.equal(ckpt["model"]["blocks.5.0.bn1.running_mean"], ref["blocks.5.0.bn1.running_mean"])
    assert not torch.equal(ckpt["model"]["blocks.6.0.conv_pw.weight"], ref["blocks.6.0.conv_pw.weight"])

    # The reloaded model, fed through the one eval-time `preprocess`, reproduces the recorded
    # validation accuracy: training's cached validation inputs are exactly the export's inputs.
    tm = load_trained_model(res.best_path)
    assert tm.classes == CLASSES and tm.resolution == 64 and not tm.model.training
    val_paths = {m for m in _val_set(samples, res)}
    x = torch.from_numpy(np.stack([preprocess(load_rgb(p), tm.preprocessing) for p, _ in val_paths]))
    with torch.inference_mode():
        pred = tm.model(x).argmax(1).numpy()
    acc = float((pred == np.array([y for _, y in val_paths])).mean())
    assert acc == pytest.approx(res.best["metrics"]["accuracy"])
    assert acc > 1 / 3  # better than chance on separable classes


def _val_set(samples, res):
    from core.data import as_samples
    from core.train import stratified_val
    _, val = stratified_val(as_samples(samples), 0.15, 0)
    return sorted((s.path, s.label) for s in val)


def test_resume_after_interrupt_matches_uninterrupted(samples, tmp_path: Path) -> None:
    cfg = small_config(num_threads=1)
    full = train(samples, CLASSES, "lite0", tmp_path / "a", cfg, resolution=64)
    # Stop right after epoch 3 (first finetune epoch), then resume from last.pt.
    with pytest.raises(TrainingCancelled):
        train(samples, CLASSES, "lite0", tmp_path / "b", cfg, resolution=64, callback=Recorder(stop_after_epoch=3))
    assert load_checkpoint(tmp_path / "b" / "last.pt")["epoch"] == 3
    rec = Recorder()
    resumed = train(samples, CLASSES, "lite0", tmp_path / "b", cfg, resolution=64, resume=True, callback=rec)
    assert resumed.summary["resumed_from_epoch"] == 3
    # Checkpointed epochs are replayed first, so a kill between checkpoint and report loses none.
    assert [m["epoch"] for m in rec.epochs] == [h["epoch"] for h in full.history]
    assert [bool(m.get("replayed")) for m in rec.epochs[:4]] == [True, True, True, False]
    for a, b in zip(full.history, resumed.history, strict=True):
        assert a["val_loss"] == pytest.approx(b["val_loss"], abs=1e-6)
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-6)
        assert a["val_accuracy"] == b["val_accuracy"]


def test_cancel_stops_within_one_batch(samples, tmp_path: Path) -> None:
    rec = Recorder(stop_after_steps=2, stop_phase="finetune")
    with pytest.raises(TrainingCancelled):
        train(samples, CLASSES, "lite0", tmp_path / "run", small_config(), resolution=64, callback=rec)
    # should_stop turned true after the 2nd finetune batch: no 3rd batch ran.
    assert sum(1 for s in rec.steps if s[0] == "finetune") == 2
    assert load_checkpoint(tmp_path / "run" / "last.pt")["phase"] == "head"  # last complete epoch kept


def test_class_with_one_image_is_refused(tmp_path: Path) -> None:
    s = write_images(tmp_path, [5, 1, 5])
    with pytest.raises(DataError, match="'green' has 1"):
        train(s, CLASSES, "lite0", tmp_path / "run", small_config(), resolution=64)


def test_missing_images_fail_by_default_or_skip(samples, tmp_path: Path) -> None:
    s = write_images(tmp_path / "imgs", [6, 6, 6])
    Path(s[0][0]).unlink()
    Path(s[7][0]).unlink()
    with pytest.raises(DataError, match=r"2 image file\(s\).*first: .*img000\.png"):
        train(s, CLASSES, "lite0", tmp_path / "run", small_config(), resolution=64)
    rec = Recorder()
    res = train(s, CLASSES, "lite0", tmp_path / "run2", small_config(on_missing="skip", finetune_epochs=0,
                                                                     head_epochs=1), resolution=64, callback=rec)
    assert res.summary["num_train"] + res.summary["num_val"] == 16
    assert any(level == "warning" and "Skipping" in msg for level, msg in rec.logs)


def test_oom_retry_with_a_real_allocation_failure() -> None:
    # A step whose memory need exceeds what any machine has above 16 samples: 2**46 float32 is
    # 256 TiB, beyond the 47-bit address space, so the allocator genuinely fails (not simulated).
    seen, logs = [], []

    def step(bs: int) -> int:
        seen.append(bs)
        if bs > 16:
            torch.empty(2**46)
        return bs * 2

    result, used = retry_on_oom(step, 32, logs.append)
    assert (result, used, seen) == (32, 16, [32, 16])
    assert "Out of memory at batch size 32; retrying at 16" in logs[0]

    with pytest.raises(TrainingError, match="Out of memory even at batch size 32"):
        retry_on_oom(lambda bs: torch.empty(2**46), 64, logs.append)
    with pytest.raises(ValueError):  # other errors are not swallowed
        retry_on_oom(lambda bs: (_ for _ in ()).throw(ValueError("boom")), 8, logs.append)
    try:
        torch.empty(2**46)
    except RuntimeError as exc:
        assert is_oom_error(exc)


def test_nan_loss_stops_with_clear_message(samples, tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match=r"Loss became (nan|inf).*learning rate is probably too high"):
        train(samples, CLASSES, "lite0", tmp_path / "run", small_config(lr_head=1e30, finetune_epochs=0, head_epochs=3,
                                                                        label_smoothing=0.0), resolution=64)


def test_imbalance_picks_weighted_loss_and_sampler_option(tmp_path: Path) -> None:
    s = write_images(tmp_path / "imgs", [16, 4])
    cfg = small_config(finetune_epochs=0, head_epochs=1)
    res = train(s, CLASSES[:2], "lite0", tmp_path / "a", cfg, resolution=64)
    assert res.summary["balance"] == "loss" and res.summary["imbalance_ratio"] > 3
    res = train(s, CLASSES[:2], "lite0", tmp_path / "b", small_config(finetune_epochs=0, head_epochs=1,
                                                                      balance="sampler"), resolution=64)
    assert res.summary["balance"] == "sampler"
    bal = write_images(tmp_path / "bal", [6, 5])
    assert train(bal, CLASSES[:2], "lite0", tmp_path / "c", cfg, resolution=64).summary["balance"] == "none"


def test_full_strategy_with_ema_trains_every_layer(samples, tmp_path: Path) -> None:
    cfg = small_config(strategy="full", head_epochs=1, finetune_epochs=1, ema=True, batch_size=10)
    res = train(samples, CLASSES, "lite0", tmp_path / "run", cfg, resolution=64)
    assert [h["phase"] for h in res.history] == ["head", "full"]
    ckpt = load_checkpoint(res.last_path)
    from core.weights import create_model
    ref = create_model("lite0", 3, resolution=64).model.state_dict()
    assert not torch.equal(ckpt["model"]["conv_stem.weight"], ref["conv_stem.weight"])
    assert ckpt["ema"] is not None


def test_augment_presets_and_preview(samples) -> None:
    paths = [p for p, _ in samples[:3]]
    for preset in ("medical", "field", "none"):
        views = augment_preview(paths, preset, n=5, resolution=40, seed=1)
        assert len(views) == 5 and all(v.shape == (40, 40, 3) and v.dtype == np.uint8 for v in views)
        again = augment_preview(paths, preset, n=5, resolution=40, seed=1)
        assert all(np.array_equal(a, b) for a, b in zip(views, again))
    assert not any(np.array_equal(a, b) for a, b in zip(augment_preview(paths, "field", 3, 40, 1),
                                                         augment_preview(paths, "field", 3, 40, 2)))
    names = [type(t).__name__ for t in build_augment("medical", 64).transforms]
    assert "VerticalFlip" not in names and "ColorJitter" not in names and "HorizontalFlip" in names
    assert "VerticalFlip" in [type(t).__name__ for t in build_augment("field", 64).transforms]
    with pytest.raises(ValueError, match="Unknown augmentation preset 'sepia'"):
        build_augment("sepia", 64)


def test_frozen_prefix_onnx_matches_torch() -> None:
    # The cache's fast path (ONNX Runtime, BN folded) computes the same activations as PyTorch.
    from core.train import Runner, TrainConfig, prefix_runner
    from core.weights import create_model
    model = create_model("lite0", 3, resolution=64).model.eval()
    x = np.random.default_rng(0).normal(size=(5, 3, 64, 64)).astype(np.float32)
    R = Runner(TrainConfig(), CLASSES, Callback(), Path("."))
    outs = {}
    for backend in ("onnx", "torch"):
        run, name = prefix_runner(model, ["stage5", "embedding"], 64, TrainConfig(cache_backend=backend),
                                   torch.device("cpu"), 1, R)
        assert name == {"onnx": "onnxruntime", "torch": "torch"}[backend]
        outs[backend] = run(x)
    assert [o.shape for o in outs["onnx"]] == [(5, 112, 4, 4), (5, 1280)]
    for a, b in zip(outs["onnx"], outs["torch"], strict=True):
        assert torch.allclose(a, b, atol=1e-3, rtol=1e-3)


def test_reduced_jpeg_decode_is_close_and_small_files_exact(tmp_path: Path) -> None:
    from PIL import Image

    from core.data import load_images
    from core.preprocessing import Preprocessing
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:600, 0:800]
    big = np.stack([np.sin(xx / 17.0) * 90 + 128, np.cos(yy / 23.0) * 90 + 128, (xx + yy) % 256], -1)
    big = np.clip(big + rng.normal(0, 8, big.shape), 0, 255).astype(np.uint8)
    Image.fromarray(big).save(tmp_path / "big.jpg", quality=92)  # reducible 2x for a 64 px target
    paths = [str(tmp_path / "big.jpg"), *[p for p, _ in write_images(tmp_path / "small", [2], fmt="jpg")]]
    pre = Preprocessing(64)
    exact = load_images(paths, pre, num_threads=1)
    fast = load_images(paths, pre, num_threads=1, reduced_decode=True)
    assert np.abs(exact[0].astype(int) - fast[0].astype(int)).mean() < 1.5
    assert np.array_equal(exact[1:], fast[1:])  # too small to reduce: the very same pixels
