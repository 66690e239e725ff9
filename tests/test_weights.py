"""Pretrained weights: the offline Lite packages, file loading, and clear errors."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from core.efficientnet import EfficientNet
from core.preprocessing import Preprocessing, preprocess
from core.weights import (
    WeightsError,
    create_model,
    find_weights,
    load_weights_into,
    lukemelas_to_ours,
    read_weight_file,
    weights_availability,
)


def chelsea() -> Image.Image:
    skimage_data = pytest.importorskip("skimage.data")
    return Image.fromarray(skimage_data.chelsea())


@pytest.mark.parametrize("variant", ["lite0", "lite1", "lite2"])
def test_offline_lite_weights_see_a_cat(variant: str) -> None:
    loaded = create_model(variant, 1000, weights="auto")
    assert loaded.weights.startswith("package:")
    pre = Preprocessing(loaded.preprocessing.resolution, 0.875, "bicubic", loaded.preprocessing.mean,
                        loaded.preprocessing.std)
    assert pre.mean == (0.5, 0.5, 0.5) and pre.std == (0.5, 0.5, 0.5)
    x = torch.from_numpy(preprocess(chelsea(), pre))[None]
    with torch.no_grad():
        top1 = int(loaded.model.eval()(x).argmax())
    assert 281 <= top1 <= 285  # ImageNet's cat classes (tabby .. Egyptian cat)


def test_random_weights_are_not_cats() -> None:
    """The cat test can fail: a random model does not land in the five cat classes by design."""
    hits = 0
    for seed in range(5):
        torch.manual_seed(seed)
        m = create_model("lite0", 1000, weights=None).model.eval()
        x = torch.from_numpy(preprocess(chelsea(), Preprocessing(224, 0.875, mean=(0.5,) * 3, std=(0.5,) * 3)))[None]
        with torch.no_grad():
            hits += 281 <= int(m(x).argmax()) <= 285
    assert hits <= 1


def test_fine_tuning_head_keeps_backbone() -> None:
    full = create_model("lite0", 1000).model
    three = create_model("lite0", 3).model
    assert three.classifier.out_features == 3
    assert torch.equal(full.conv_stem.weight, three.conv_stem.weight)
    assert torch.equal(full.blocks[6][0].conv_pwl.weight, three.blocks[6][0].conv_pwl.weight)


def test_availability_reports_every_variant() -> None:
    avail = weights_availability(check_hub=False)
    assert set(avail) >= {"b0", "b7", "lite0", "lite4"}
    for name in ("lite0", "lite1", "lite2"):
        assert avail[name].available
    for status in avail.values():
        if not status.available:
            assert "No ImageNet weights reachable" in status.location and status.source is None


def test_unreachable_weights_raise_not_random(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from core import weights

    weights.hub_reachable.cache_clear()
    if find_weights("b3").available:
        pytest.skip("b3 weights are cached on this machine")
    with pytest.raises(WeightsError, match="No ImageNet weights reachable for b3"):
        create_model("b3", 5, weights="auto")
    with pytest.raises(WeightsError, match="hub unreachable|Model hub unreachable"):
        create_model("b0", 5, weights="efficientnet_b0.ra_in1k")
    weights.hub_reachable.cache_clear()


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_load_from_local_file_timm_layout(tmp_path: Path, suffix: str) -> None:
    timm = pytest.importorskip("timm")
    ref = timm.create_model("efficientnet_b0", pretrained=False).eval()
    path = tmp_path / f"b0{suffix}"
    if suffix == ".pth":
        torch.save(ref.state_dict(), path)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    loaded = create_model("b0", 1000, weights=path)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert (loaded.model.eval()(x) - ref(x)).abs().max() <= 1e-4


def test_lukemelas_layout_round_trip() -> None:
    sd = read_weight_file(find_weights("lite0").location)
    mapped = lukemelas_to_ours(sd, "lite0")
    model = EfficientNet("lite0", 1000, padding="same", bn_eps=1e-3)
    model.load_state_dict(mapped, strict=True)


def test_weights_of_another_architecture_name_the_tensor(tmp_path: Path) -> None:
    b0 = EfficientNet("b0", 1000)
    path = tmp_path / "b0.pth"
    torch.save(b0.state_dict(), path)
    with pytest.raises(WeightsError, match=r"first mismatching tensor 'conv_stem.weight' has shape \(32, 3, 3, 3\) "
                                           r"in the file but \(40, 3, 3, 3\)"):
        create_model("b3", 1000, weights=path)
    lite_file = find_weights("lite0").location
    with pytest.raises(WeightsError, match="another architecture"):
        load_weights_into(EfficientNet("b0", 1000), read_weight_file(lite_file))


def test_missing_and_corrupt_files(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="does not exist"):
        create_model("lite0", 3, weights=tmp_path / "nope.pth")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="Could not read weight file"):
        create_model("lite0", 3, weights=bad)


def test_unknown_variant() -> None:
    with pytest.raises(ValueError, match="Unknown EfficientNet variant 'b8'"):
        create_model("b8", 3)


def test_preprocessing_round_trip() -> None:
    pre = create_model("lite1", 2).preprocessing
    assert Preprocessing.from_dict(pre.to_dict()) == pre
    arr = preprocess(Image.new("RGB", (300, 200), (255, 0, 0)), pre)
    assert arr.shape == (3, 240, 240) and arr.dtype == np.float32
    assert np.allclose(arr[0], 1.0) and np.allclose(arr[1], -1.0)
