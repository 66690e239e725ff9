"""The model registry: a family registered as one record works everywhere, with no other change.

The toy family here is a real (tiny) network built from a stage table, with two stages where
EfficientNet has seven: naming, building, the cost model, the device latency estimate, the
recommender and the training phases must all work for it through ``core.registry`` alone.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import pytest
import torch
from torch import nn

from core import registry
from core.devices import load_profiles
from core.preprocessing import IMAGENET_MEAN, IMAGENET_STD
from core.recommend import Budget, recommend
from core.registry import (
    Conventions,
    ModelCost,
    ModelFamily,
    UnknownVariantError,
    WeightCatalogue,
    WeightsError,
    all_variants,
    count_cost,
    create_model,
    get_variant,
    register_family,
)
from core.staged import StagedModel
from core.train import make_config
from core.train.phases import plan_phases

# (output channels, stride) per stage, before the width multiplier.
TOY_STAGES: tuple[tuple[int, int], ...] = ((8, 2), (16, 2))
STEM, HEAD = 4, 32


@dataclass(frozen=True)
class ToySpec:
    name: str
    family: str
    width: int
    resolution: int
    dropout: float = 0.0

    def at_resolution(self, resolution: int) -> ToySpec:
        name = self.name if resolution == self.resolution else f"{self.name}@{resolution}"
        return replace(self, name=name, resolution=int(resolution))


TOY_VARIANTS = {"toy1": ToySpec("toy1", "toy", 1, 64), "toy2": ToySpec("toy2", "toy", 2, 96)}


def conv_bn(cin: int, cout: int, kernel: int, stride: int, eps: float) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False),
                         nn.BatchNorm2d(cout, eps=eps), nn.ReLU())


class ToyNet(StagedModel):
    def __init__(self, spec: ToySpec, num_classes: int, padding: str, bn_eps: float, drop_path_rate: float):
        super().__init__()
        self.variant, self.padding, self.bn_eps, self.drop_rate = spec, padding, bn_eps, spec.dropout
        self.stage_names = tuple(f"stage{i}" for i in range(len(TOY_STAGES)))
        self.entry_points = ("image", *self.stage_names, "head", "features", "embedding", "logits")
        self.parameter_group_names = ("stem", *self.stage_names, "head", "classifier")
        self.stem = conv_bn(3, STEM, 3, 2, bn_eps)
        stages: list[nn.Module] = []
        c = STEM
        for out, stride in TOY_STAGES:
            stages.append(conv_bn(c, out * spec.width, 3, stride, bn_eps))
            c = out * spec.width
        self.stages = nn.Sequential(*stages)
        self.head = conv_bn(c, HEAD, 1, 1, bn_eps)
        self.num_features, self.num_classes = HEAD, num_classes
        self.classifier = nn.Linear(HEAD, num_classes)

    def _run_segment(self, entry: str, x: torch.Tensor) -> torch.Tensor:
        if entry == "image":
            return self.stem(x)
        if entry in self.stage_names:
            return self.stages[self.stage_names.index(entry)](x)
        if entry == "head":
            return self.head(x)
        return self.pool(x) if entry == "features" else self.forward_head(x)

    def group_modules(self) -> dict[str, list[nn.Module]]:
        return {"stem": [self.stem], **{n: [s] for n, s in zip(self.stage_names, self.stages)},
                "head": [self.head], "classifier": [self.classifier]}


def toy_layers(spec: ToySpec, resolution: int) -> Iterator[tuple[int, int, int, int]]:
    """(in channels, out channels, kernel, output side) of every conv, from the stage table."""
    side = math.ceil(resolution / 2)
    yield 3, STEM, 3, side
    c = STEM
    for out, stride in TOY_STAGES:
        side = math.ceil(side / stride)
        yield c, out * spec.width, 3, side
        c = out * spec.width
    yield c, HEAD, 1, side


def toy_cost(spec: ToySpec, resolution: int, num_classes: int) -> ModelCost:
    params = macs = peak = 0
    for cin, cout, k, side in toy_layers(spec, resolution):
        params += cin * cout * k * k + 2 * cout  # conv + BatchNorm affine
        macs += cin * cout * k * k * side * side
        peak = max(peak, cout * side * side)
    params += HEAD * num_classes + num_classes
    return ModelCost(params, macs + HEAD * num_classes, peak)


def toy_traffic(spec: ToySpec, resolution: int) -> int:
    return 3 * resolution * resolution + sum(cout * side * side for _, cout, _, side in toy_layers(spec, resolution))


def parse_toy(name: str) -> ToySpec | None:
    base, _, res = name.strip().lower().partition("@")
    if base not in TOY_VARIANTS:
        return None
    if res and not res.isdigit():
        raise UnknownVariantError(f"Bad resolution in {name!r}: expected e.g. 'toy1@96'.")
    return TOY_VARIANTS[base].at_resolution(int(res)) if res else TOY_VARIANTS[base]


TOY = ModelFamily(
    name="toy", title="ToyNet", spec_type=ToySpec, variants=TOY_VARIANTS, parse=parse_toy,
    name_help="at another input size 'toy1@96'", build=ToyNet, num_stages=lambda spec: len(TOY_STAGES),
    conventions=lambda spec: Conventions("symmetric", 1e-5, IMAGENET_MEAN, IMAGENET_STD),
    weights=WeightCatalogue(), count_cost=toy_cost, traffic_elements=toy_traffic,
    imagenet_top1={"toy1": (40.0, "made up for the test"), "toy2": (50.0, "made up for the test")},
)


@pytest.fixture
def toy() -> Iterator[ModelFamily]:
    register_family(TOY)
    yield TOY
    registry.unregister_family(TOY.name)


def test_a_registered_family_is_named_built_and_costed(toy: ModelFamily) -> None:
    assert {"toy1", "toy2", "b0", "lite0"} <= set(all_variants())
    spec = get_variant("toy2@128")
    assert spec == TOY_VARIANTS["toy2"].at_resolution(128) and registry.family_of(spec) is toy
    loaded = create_model("toy2", 3, weights="none", resolution=128)
    model = loaded.model
    assert isinstance(model, ToyNet) and loaded.weights == "random" and loaded.preprocessing.resolution == 128
    assert loaded.preprocessing.mean == IMAGENET_MEAN
    logits = model.eval()(torch.zeros(2, 3, 128, 128))
    assert logits.shape == (2, 3)
    # The cost model counts what the network has.
    assert count_cost("toy2", 128, 3).params == sum(p.numel() for p in model.parameters())
    assert count_cost("toy2", 128).macs > count_cost("toy1", 128).macs
    # A checkpoint-style rebuild goes through the family too.
    again = registry.build_network("toy2@128", 3, "symmetric", 1e-5)
    again.load_state_dict(model.state_dict())
    assert torch.equal(again.eval()(torch.ones(1, 3, 128, 128)), model(torch.ones(1, 3, 128, 128)))


def test_a_registered_family_gets_latency_estimates_and_recommendations(toy: ModelFamily) -> None:
    profile = load_profiles()["desktop-x86"]
    small, big = profile.predict_ms("toy1", 64), profile.predict_ms("toy2", 96)
    assert 0 < small < big  # more MACs and more activation traffic: slower
    rec = recommend(Budget(device="desktop-x86", num_classes=3), profile, candidates=["toy1", "toy2", "lite0"],
                    weights={"toy1": True, "toy2": True, "lite0": True})
    keys = [c.key for c in rec.ranked]
    assert {"toy1@64", "toy2@96"} <= set(keys)
    top1 = {c.key: c.prior_top1 for c in rec.ranked}
    assert top1["toy2@96"] == 50.0 and top1["toy1@64"] == 40.0  # the family's own accuracy figures


def test_training_phases_follow_the_models_own_stages(toy: ModelFamily) -> None:
    model = create_model("toy1", 2, weights="none").model
    phases = plan_phases(make_config("quick", unfreeze_stages=2), model)
    finetune = next(p for p in phases if p.name == "finetune")
    assert finetune.groups == ("stage0", "stage1", "head", "classifier") and finetune.entry == "stage0"
    x = torch.zeros(1, 3, 64, 64)
    inside = model.eval().forward_between(x, "image", "stage1")
    assert torch.equal(model.forward_from("stage1", inside), model(x))
    with pytest.raises(ValueError, match=r"unfreeze_stages must be 0\.\.2 for toy1, got 3"):
        plan_phases(make_config("quick", unfreeze_stages=3), model)
    assert registry.num_stages("toy1") == 2 and registry.num_stages("b0") == 7


def test_unknown_names_list_every_familys_variants(toy: ModelFamily) -> None:
    with pytest.raises(UnknownVariantError) as err:
        get_variant("resnet50")
    message = str(err.value)
    assert "Unknown model variant 'resnet50'" in message
    assert "EfficientNet: b0, " in message and "lite4" in message and "ToyNet: toy1, toy2" in message
    with pytest.raises(UnknownVariantError, match="expected e.g. 'toy1@96'"):
        get_variant("toy1@big")
    with pytest.raises(WeightsError, match="No ImageNet weights reachable for toy1"):
        create_model("toy1", 2, weights="auto")


def test_families_cannot_share_variant_names(toy: ModelFamily) -> None:
    clash = replace(TOY, name="toy-again", variants={"b0": TOY_VARIANTS["toy1"]})
    with pytest.raises(ValueError, match=r"names variants \['b0'\] that family 'efficientnet' already has"):
        register_family(clash)
    assert "toy-again" not in {f.name for f in registry.families()}


def test_the_efficientnet_family_answers_as_before() -> None:
    spec = get_variant("lite-phi1.5@256")
    assert (spec.name, spec.resolution, registry.family_of(spec).name) == ("lite-phi1.5@256", 256, "efficientnet")
    assert get_variant("efficientnet_b0") is all_variants()["b0"]
    assert registry.family_of("b3").named_base(get_variant("b3@256")) == "b3"
    assert registry.family_of("b3").named_base(get_variant("b-phi0.5")) is None
    with pytest.raises(UnknownVariantError, match="at least 32 px"):
        get_variant("b0@16")
    loaded: Any = create_model("lite0", 2, weights="none")
    assert (loaded.model.padding, loaded.model.bn_eps, loaded.preprocessing.mean) == ("same", 1e-3, (0.5, 0.5, 0.5))
