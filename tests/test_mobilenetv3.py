"""Our MobileNetV3 against timm's reference implementation, its analytic cost and its weights."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from core.efficientnet import Padding
from core.mobilenetv3 import HardSqueezeExcite, MobileNetV3
from core.mobilenetv3_arch import (
    LARGE_STAGES,
    SMALL_STAGES,
    TIMM_CHECKPOINTS,
    VARIANTS,
    UnknownVariantError,
    count_cost,
    get_variant,
    scaled_arch,
)
from core.weights import (
    WeightsError,
    finetune_preprocessing,
    load_weights_into,
    read_weight_file,
    weight_sources,
)

timm = pytest.importorskip("timm")

TF_PORT = ("mobilenetv3-large-075", "tf_mobilenetv3_large_075", "same", 1e-3)
# (our variant, timm architecture, padding, BN eps): each named variant as timm's PyTorch model,
# and the TensorFlow port that TIMM_CHECKPOINTS picks for Large 0.75.
PARITY_CASES = [(v, v, "symmetric", 1e-5) for v in VARIANTS] + [TF_PORT]


def timm_create(arch: str) -> nn.Module:
    """timm's own module, random init; timm spells our 'mobilenetv3-small-075' with underscores."""
    return timm.create_model(arch.replace("-", "_"), pretrained=False)


def timm_model(arch: str, seed: int) -> nn.Module:
    """timm's model (in eval mode) with every tensor random (biases, BN statistics and scales too,
    which timm's init leaves at zero and one), so that the parity check exercises all of them."""
    torch.manual_seed(seed)
    model = timm_create(arch).eval()
    state = model.state_dict()  # its tensors share the model's storage: filled in place below
    g = torch.Generator().manual_seed(seed)
    for key, t in state.items():
        if not t.is_floating_point():
            continue
        if key.endswith("running_var"):
            t.copy_(torch.rand(t.shape, generator=g) + 0.5)
        elif key.endswith(("bn1.weight", "bn2.weight", "bn3.weight")):
            t.copy_(torch.rand(t.shape, generator=g) + 0.5)
        elif t.ndim == 1:  # biases and running means
            t.copy_(torch.randn(t.shape, generator=g) * 0.1)
    return model


def timm_weights(arch: str, seed: int) -> dict[str, torch.Tensor]:
    return timm_model(arch, seed).state_dict()


@pytest.mark.parametrize(("variant", "arch", "padding", "eps"), PARITY_CASES, ids=[c[1] for c in PARITY_CASES])
def test_logits_equal_timm_through_a_weight_file(tmp_path: Path, variant: str, arch: str, padding: Padding,
                                                 eps: float) -> None:
    reference = timm_model(arch, seed=1)
    state = reference.state_dict()
    torch.save(state, tmp_path / "weights.pth")
    ours = MobileNetV3(variant, padding=padding, bn_eps=eps).eval()
    assert set(ours.state_dict()) == set(state)  # timm's names, nothing renamed
    load_weights_into(ours, read_weight_file(tmp_path / "weights.pth"))
    torch.manual_seed(2)
    for size in (224, 160):
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            want, got = reference(x), ours(x)
        assert want.abs().max() > 0.1  # a real signal, not a collapsed network
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
        features = ours.forward_features(x)
        assert features.shape[1:] == (ours.feature_channels, -(-size // 32), -(-size // 32))
        assert ours.forward_embedding(x).shape == (2, ours.num_features)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_parameter_count_and_macs_equal_the_analytic_cost(variant: str) -> None:
    for classes in (1000, 7):
        model = MobileNetV3(variant, num_classes=classes)
        assert sum(p.numel() for p in model.parameters()) == count_cost(variant, num_classes=classes).params
    macs = count_macs(model, 160)
    assert macs == count_cost(variant, resolution=160, num_classes=7).macs


def count_macs(model: nn.Module, size: int) -> int:
    """Multiply-adds of one image, counted from the layers' real output shapes."""
    total = 0

    def hook(module: nn.Module, _inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d | nn.Linear):
            total += module.weight.numel() * (out[0].numel() // module.weight.shape[0])
        else:  # the squeeze-excitation's gating multiply
            total += out[0].numel()

    for m in model.modules():
        if isinstance(m, nn.Conv2d | nn.Linear | HardSqueezeExcite):
            m.register_forward_hook(hook)
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, size, size))
    return total


def test_the_cost_is_the_published_one() -> None:
    # Howard et al. 2019, table 3: MAdds (millions) and parameters (millions), width 1.0 and 0.75.
    published = {"mobilenetv3-large-100": (219, 5.4), "mobilenetv3-large-075": (155, 4.0),
                 "mobilenetv3-small-100": (56, 2.5), "mobilenetv3-small-075": (44, 2.0)}
    for variant, (madds, params) in published.items():
        cost = count_cost(variant)
        assert abs(cost.macs / 1e6 - madds) < 3 and abs(cost.params / 1e6 - params) < 0.1, variant


def test_widths_are_derived_from_the_paper_tables() -> None:
    # At width 1.0 every expanded size is the paper's; at 0.75 each is rounded to a multiple of 8.
    for variant, table in (("mobilenetv3-large-100", LARGE_STAGES), ("mobilenetv3-small-100", SMALL_STAGES)):
        arch = scaled_arch(variant)
        assert [b.mid_channels for b in arch.blocks] == [row.exp_size for stage in table for row in stage]
        assert [b.out_channels for b in arch.blocks] == [row.out_channels for stage in table for row in stage]
    small = scaled_arch("mobilenetv3-small-075")
    assert small.stage_channels() == [16, 24, 32, 40, 72] and small.last_channels == 432
    assert all(b.mid_channels % 8 == 0 and b.se_channels % 8 == 0 for b in small.blocks)


def first_misfit(ours: dict[str, torch.Tensor], given: dict[str, torch.Tensor]) -> str:
    return next(k for k, t in ours.items() if k not in given or given[k].shape != t.shape)


@pytest.mark.parametrize(("file_variant", "model_variant"), [
    ("mobilenetv3-large-100", "mobilenetv3-large-075"),
    ("mobilenetv3-small-075", "mobilenetv3-small-100"),
    ("mobilenetv3-small-100", "mobilenetv3-large-100"),
])
def test_a_state_dict_of_another_variant_is_refused_naming_the_first_misfit(
        tmp_path: Path, file_variant: str, model_variant: str) -> None:
    torch.save(timm_create(file_variant).state_dict(), tmp_path / "other.pth")
    given = read_weight_file(tmp_path / "other.pth")
    model = MobileNetV3(model_variant)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    misfit = first_misfit(model.state_dict(), given)
    with pytest.raises(WeightsError, match=model_variant) as err:
        load_weights_into(model, given)
    assert repr(misfit) in str(err.value)
    assert "first mismatching tensor" in str(err.value) or "has no tensor" in str(err.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing half-loaded


def test_missing_extra_and_non_tensor_entries_are_named() -> None:
    model = MobileNetV3("mobilenetv3-small-075")
    state = dict(model.state_dict())
    del state["blocks.0.0.se.conv_reduce.bias"]
    with pytest.raises(WeightsError, match=r"no tensor 'blocks\.0\.0\.se\.conv_reduce\.bias' \(shape \(8,\)\)"):
        load_weights_into(model, state)
    state = {**model.state_dict(), "conv_head.bias": [0.0] * 1024}
    with pytest.raises(WeightsError, match=r"'conv_head\.bias' has a value that is not a tensor in the file"):
        load_weights_into(model, state)
    state = {**model.state_dict(), "blocks.9.0.conv.weight": torch.zeros(1)}
    with pytest.raises(WeightsError, match=r"tensor 'blocks\.9\.0\.conv\.weight' that mobilenetv3-small-075 does not"):
        load_weights_into(model, state)


def test_a_model_for_other_classes_takes_the_backbone_and_keeps_its_head() -> None:
    state = timm_weights("mobilenetv3-small-075", seed=3)
    model = MobileNetV3("mobilenetv3-small-075", num_classes=3)
    head = model.classifier.state_dict()["weight"].clone()
    load_weights_into(model, {"state_dict": {f"module.{k}": v for k, v in state.items()}})
    assert torch.equal(model.conv_head.weight, state["conv_head.weight"])
    assert torch.equal(model.classifier.state_dict()["weight"], head)


@pytest.mark.parametrize("variant", ["mobilenetv3-large-075", "mobilenetv3-small-100"])
def test_every_entry_point_continues_to_the_same_logits(variant: str) -> None:
    model = MobileNetV3(variant, num_classes=5).eval()
    load_weights_into(model, timm_weights(variant, seed=4))  # backbone only: the head has 5 classes
    x = torch.randn(2, 3, 96, 96)
    entries = [e for e in model.entry_points if e != "logits"]
    with torch.no_grad():
        logits = model(x)
        arriving = model.forward_intermediates(x, entries)
        for entry, tensor in zip(entries, arriving):
            torch.testing.assert_close(model.forward_from(entry, tensor.clone()), logits, rtol=0, atol=1e-5)
    stages = scaled_arch(variant).num_stages
    assert model.entry_points == ("image", *(f"stage{i}" for i in range(stages)), "head", "features", "embedding",
                                  "logits")
    assert arriving[entries.index("features")].shape[1] == model.feature_channels


def test_parameter_groups_and_state_prefixes_cover_the_model_once() -> None:
    model = MobileNetV3("mobilenetv3-small-100", num_classes=4)
    groups = model.parameter_groups()
    assert tuple(groups) == model.parameter_group_names == ("stem", "stage0", "stage1", "stage2", "stage3", "stage4",
                                                           "head", "classifier")
    ids = [id(p) for params in groups.values() for p in params]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())
    keys = list(model.state_dict())
    for group in groups:
        prefixes = model.group_state_prefixes([group])
        owned = [k for k in keys if k.startswith(prefixes)]
        assert len(owned) >= len(groups[group]) > 0
    assert all(sum(k.startswith(model.group_state_prefixes([g])) for g in groups) == 1 for k in keys)
    model.set_trainable(["stage4", "head", "classifier"])
    assert [g for g, ps in groups.items() if all(p.requires_grad for p in ps)] == ["stage4", "head", "classifier"]
    assert model.group_entry("head") == "head" and model.group_entry("classifier") == "embedding"


def test_bad_names_are_refused_in_plain_words() -> None:
    model = MobileNetV3("mobilenetv3-small-075")
    with pytest.raises(ValueError, match=r"Unknown entry point 'stage5'; known: image, stage0"):
        model.forward_from("stage5", torch.zeros(1))
    with pytest.raises(ValueError, match=r"Unknown parameter groups \['stage9'\]"):
        model.set_trainable(["stage9"])
    with pytest.raises(ValueError, match="Cannot run backwards from 'features' to the earlier point 'head'"):
        model.forward_between(torch.zeros(1), "features", "head")
    with pytest.raises(UnknownVariantError, match=r"Unknown MobileNetV3 variant 'mobilenetv3_large_050'.*"
                                                  r"mobilenetv3-small-075"):
        get_variant("mobilenetv3_large_050")
    with pytest.raises(UnknownVariantError, match="Bad resolution in 'mobilenetv3-small-100@16'"):
        get_variant("mobilenetv3-small-100@16")
    assert get_variant("MobileNetV3_Small_100@160").resolution == 160


def test_weight_sources_come_from_timms_own_configs() -> None:
    assert set(TIMM_CHECKPOINTS) == set(VARIANTS)
    for variant, checkpoint in TIMM_CHECKPOINTS.items():
        (source,) = weight_sources(variant)
        cfg = timm.models.get_pretrained_cfg(checkpoint)
        assert source.kind == "hub" and source.name == checkpoint == cfg.hf_hub_id.removeprefix("timm/")
        assert (source.preprocessing.mean, source.preprocessing.std) == (tuple(cfg.mean), tuple(cfg.std))
        assert source.preprocessing.interpolation == cfg.interpolation
    large_075 = weight_sources("mobilenetv3-large-075")[0]
    assert (large_075.padding, large_075.bn_eps, large_075.preprocessing.mean) == ("same", 1e-3, (0.5, 0.5, 0.5))
    assert weight_sources("mobilenetv3-small-100")[0].padding == "symmetric"
    pre = finetune_preprocessing(weight_sources("mobilenetv3-small-100")[0], 160)
    assert (pre.resolution, pre.crop_pct, pre.interpolation) == (160, 1.0, "bicubic")


# --- through the registry: training, export, verification and the recommender, unchanged --------
def test_mobilenetv3_trains_exports_and_verifies_through_the_registry(tmp_path: Path) -> None:
    """A few training steps from a weights file the test makes (timm's own module, saved), then
    the ONNX export verified against PyTorch on images: the same code paths as lite0."""
    from builders import write_images

    from core import registry
    from core.export import export_fp32, load_trained, verify_onnx
    from core.train import make_config, train

    name = "mobilenetv3-small-075"
    weights = tmp_path / "imagenet.pth"
    torch.manual_seed(0)
    torch.save(timm_create(name).state_dict(), weights)
    assert registry.family_of(registry.get_variant(name)).name == "mobilenetv3"
    samples = write_images(tmp_path / "data", [8, 8], size=48)
    cfg = make_config("quick", weights=str(weights), head_epochs=1, finetune_epochs=1, unfreeze_stages=2,
                      batch_size=8, head_batch_size=16, num_threads=1, val_fraction=0.25)
    result = train(samples, ["class0", "class1"], name, tmp_path / "run", cfg, resolution=64)
    assert [h["epoch"] for h in result.history] == [1, 2] and result.best_path.is_file()
    trained = load_trained(result.best_path)
    assert type(trained.model).__name__ == "MobileNetV3" and trained.model.variant.name.startswith(name)
    onnx_path = export_fp32(trained.model, tmp_path / "model.onnx", trained.preprocessing, ["class0", "class1"],
                            name)
    check = verify_onnx(trained.model, onnx_path, [Path(p) for p, _ in samples[:6]], trained.preprocessing)
    assert check.passed and check.n_images == 6 and check.top1_agreement == 1.0, check.reason
    # The deploy bundle, opened and run as `workbench predict` does.
    import zipfile

    from core.bundle import BundlePredictor, open_bundle
    from core.export import build_bundle

    info = {"classes": ["class0", "class1"], "variant": name, "run_id": 1, "preprocessing": trained.preprocessing}
    bundle = build_bundle(tmp_path / "bundle.zip", {"model.onnx": onnx_path}, info)
    with zipfile.ZipFile(bundle) as zf:
        assert "MobileNetV3" in zf.read("README.md").decode()  # the model card names the family
    rows = BundlePredictor.from_bundle(open_bundle(bundle)).predict([Path(p) for p, _ in samples[:2]])
    assert [r.path.name for r in rows] == [Path(p).name for p, _ in samples[:2]]
    assert all(r.label in ("class0", "class1") and 0.5 <= r.confidence <= 1.0 for r in rows)


def test_the_recommender_and_device_profiles_rank_mobilenetv3_unchanged() -> None:
    from core import registry
    from core.devices import get_profile
    from core.recommend import Budget, recommend

    small, large = registry.get_variant("mobilenetv3-small-100"), registry.get_variant("mobilenetv3-large-100")
    device = get_profile("rpi4")
    assert device.predict_ms(small) < device.predict_ms(large)
    assert registry.count_cost(small).params < registry.count_cost(large).params
    ranked = recommend(Budget(device="rpi4")).ranked
    assert {c.base for c in ranked} >= {"mobilenetv3-small-100", "mobilenetv3-large-100"}


def test_the_auto_search_space_takes_mobilenetv3_when_its_weights_are_there() -> None:
    """The search's space is every registered variant with reachable weights that fits the budget."""
    from core.recommend import Budget
    from core.search import architecture_space

    space = architecture_space(Budget(device="this-machine"), [(500, 375)] * 20,
                               weights={"mobilenetv3-small-100": True, "mobilenetv3-large-100": True, "lite0": True})
    models = {c.variant.split("@")[0] for c in space.choices}
    assert models == {"mobilenetv3-small-100", "mobilenetv3-large-100", "lite0"}, models
    without = architecture_space(Budget(device="this-machine"), [(500, 375)] * 20, weights={"lite0": True})
    assert {c.variant.split("@")[0] for c in without.choices} == {"lite0"}
