"""Our EfficientNet against timm's reference implementation, and its analytic costs."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from core.efficientnet import (
    B0_STAGES,
    ENTRY_POINTS,
    VARIANTS,
    EfficientNet,
    UnknownVariantError,
    compound_variant,
    count_cost,
    get_variant,
    group_entry,
    make_divisible,
    scaled_arch,
)

timm = pytest.importorskip("timm")

# Published EfficientNet shapes (stem, stage output channels, stage repeats, head), typed in
# from the reference so that a change to the scaling rules shows up here.
GOLDEN_SHAPES = {
    "b0": (32, (16, 24, 40, 80, 112, 192, 320), (1, 2, 2, 3, 3, 4, 1), 1280),
    "b1": (32, (16, 24, 40, 80, 112, 192, 320), (2, 3, 3, 4, 4, 5, 2), 1280),
    "b2": (32, (16, 24, 48, 88, 120, 208, 352), (2, 3, 3, 4, 4, 5, 2), 1408),
    "b3": (40, (24, 32, 48, 96, 136, 232, 384), (2, 3, 3, 5, 5, 6, 2), 1536),
    "b4": (48, (24, 32, 56, 112, 160, 272, 448), (2, 4, 4, 6, 6, 8, 2), 1792),
    "b5": (48, (24, 40, 64, 128, 176, 304, 512), (3, 5, 5, 7, 7, 9, 3), 2048),
    "b6": (56, (32, 40, 72, 144, 200, 344, 576), (3, 6, 6, 8, 8, 11, 3), 2304),
    "b7": (64, (32, 48, 80, 160, 224, 384, 640), (4, 7, 7, 10, 10, 13, 4), 2560),
    "lite0": (32, (16, 24, 40, 80, 112, 192, 320), (1, 2, 2, 3, 3, 4, 1), 1280),
    "lite1": (32, (16, 24, 40, 80, 112, 192, 320), (1, 3, 3, 4, 4, 5, 1), 1280),
    "lite2": (32, (16, 24, 48, 88, 120, 208, 352), (1, 3, 3, 4, 4, 5, 1), 1280),
    "lite3": (32, (24, 32, 48, 96, 136, 232, 384), (1, 3, 3, 5, 5, 6, 1), 1280),
    "lite4": (32, (24, 32, 56, 112, 160, 272, 448), (1, 4, 4, 6, 6, 8, 1), 1280),
}


def timm_name(variant: str, tf: bool) -> str:
    return ("tf_efficientnet_" if tf or variant.startswith("lite") else "efficientnet_") + variant


def randomize_bn(model: torch.nn.Module, seed: int) -> None:
    """Non-trivial running statistics, so the parity check exercises BatchNorm too."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_scaled_shapes_match_goldens(variant: str) -> None:
    arch = scaled_arch(variant)
    stem, chans, repeats, head = GOLDEN_SHAPES[variant]
    assert arch.stem_channels == stem
    assert tuple(arch.stage_channels()) == chans
    assert tuple(arch.stage_repeats()) == repeats
    assert arch.head_channels == head


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_parity_with_timm(variant: str) -> None:
    """Same state dict, same input: logits agree to 1e-4 and parameter counts are equal."""
    torch.manual_seed(0)
    v = VARIANTS[variant]
    tf = v.is_lite
    ref = timm.create_model(timm_name(variant, tf), pretrained=False).eval()
    randomize_bn(ref, 1)
    ours = EfficientNet(variant, 1000, padding="same" if tf else "symmetric", bn_eps=1e-3 if tf else 1e-5).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    # An odd size exercises TF "same" padding's asymmetric case at every stride-2 layer.
    x = torch.randn(2, 3, 77, 77)
    with torch.no_grad():
        diff = (ref(x) - ours(x)).abs().max().item()
    assert diff <= 1e-4
    n_ref = sum(p.numel() for p in ref.parameters())
    assert sum(p.numel() for p in ours.parameters()) == n_ref
    assert count_cost(variant).params == n_ref


@pytest.mark.parametrize("variant", ["b0", "b3"])
def test_parity_tf_same_padding_for_b_variants(variant: str) -> None:
    ref = timm.create_model(timm_name(variant, True), pretrained=False).eval()
    randomize_bn(ref, 2)
    ours = EfficientNet(variant, 1000, padding="same", bn_eps=1e-3).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(1, 3, 90, 90)
    with torch.no_grad():
        assert (ref(x) - ours(x)).abs().max().item() <= 1e-4


def test_b0_cost_matches_paper() -> None:
    cost = count_cost("b0", 224, 1000)
    assert cost.params == 5_288_548
    assert 0.38e9 <= cost.macs <= 0.40e9  # paper: 0.39 B FLOPs (multiply-adds)


@pytest.mark.parametrize("variant,resolution", [("b0", 224), ("b0", 192), ("lite0", 160), ("b2", 260)])
def test_macs_match_a_hook_count(variant: str, resolution: int) -> None:
    """The analytic MAC count equals one taken from the real modules' output shapes."""
    model = EfficientNet(variant, 10).eval()
    macs = 0

    def conv_hook(m: torch.nn.Conv2d, _inp, out) -> None:
        nonlocal macs
        k = m.kernel_size[0] * m.kernel_size[1]
        macs += out.shape[2] * out.shape[3] * m.out_channels * (m.in_channels // m.groups) * k

    def lin_hook(m: torch.nn.Linear, _inp, _out) -> None:
        nonlocal macs
        macs += m.in_features * m.out_features

    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_hook(conv_hook)
        elif isinstance(m, torch.nn.Linear):
            m.register_forward_hook(lin_hook)
    with torch.no_grad():
        model(torch.zeros(1, 3, resolution, resolution))
    analytic = count_cost(variant, resolution, 10).macs
    # The analytic count also includes the SE gating multiplies (one per channel and pixel),
    # which are not convolutions: exactly those make up the difference.
    arch = scaled_arch(variant)
    size, gating = resolution, 0
    size = math.ceil(size / 2)
    for b in arch.blocks:
        size = math.ceil(size / b.stride)
        gating += b.mid_channels * size * size if b.se_channels else 0
    assert analytic - macs == gating


def test_make_divisible_never_drops_more_than_10_percent() -> None:
    for c in range(1, 3000):
        for w in (1.0, 1.1, 1.2, 1.4, 1.6, 1.8, 2.0, 0.5, 0.75):
            v = make_divisible(c * w)
            assert v % 8 == 0 and v >= 0.9 * c * w


def test_stage_table_is_frozen() -> None:
    with pytest.raises(AttributeError):
        B0_STAGES[0].kernel = 7  # type: ignore[misc]


def test_compound_scaling() -> None:
    b0 = compound_variant(0.0)
    assert (b0.width, b0.depth, b0.resolution) == (1.0, 1.0, 224)
    half = compound_variant(0.5)
    assert 1.0 < half.width < 1.1 and 1.0 < half.depth < 1.2 and 224 < half.resolution < 260
    # phi = 1 lands next to the hand-rounded B2.
    one = compound_variant(1.0)
    assert (round(one.width, 2), round(one.depth, 2)) == (1.1, 1.2) and abs(one.resolution - 260) <= 8
    # Cost grows roughly 2^phi (alpha * beta^2 * gamma^2 ~= 1.92).
    ratio = count_cost(compound_variant(2.0)).macs / count_cost(b0).macs
    assert 3.0 < ratio < 5.0
    model = EfficientNet(half, 4)
    assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 4)
    assert get_variant("b0@192").resolution == 192
    with pytest.raises(ValueError):
        compound_variant(-1)


@pytest.mark.parametrize("name, family, width, resolution", [
    ("b-phi0.5", "b", round(1.1**0.5, 4), 240), ("b-phi1.5@256", "b", round(1.1**1.5, 4), 256),
    ("lite-phi1.5", "lite", round(1.1**1.5, 4), 280), ("LITE-PHI0.5@192", "lite", round(1.1**0.5, 4), 192),
])
def test_compound_variants_by_name(name: str, family: str, width: float, resolution: int) -> None:
    v = get_variant(name)
    assert (v.family, v.width, v.resolution) == (family, width, resolution)
    assert v == compound_variant(float(name.lower().split("phi")[1].split("@")[0]), resolution, family=family)


def test_every_recommender_candidate_name_resolves() -> None:
    """The recommender names candidates ('b-phi0.5@248', every family's); measuring one builds it
    from that name, through the registry."""
    from core import registry
    from core.recommend import candidate_key, default_candidates

    def shape(v: object) -> tuple:
        return tuple(getattr(v, f, None) for f in ("family", "width", "depth", "resolution"))

    for spec in default_candidates():
        assert shape(registry.get_variant(candidate_key(spec))) == shape(spec), candidate_key(spec)


def test_unknown_variant_message() -> None:
    with pytest.raises(UnknownVariantError, match="Known variants: b0"):
        get_variant("b9")
    with pytest.raises(UnknownVariantError, match="resolution"):
        get_variant("b0@xx")
    with pytest.raises(UnknownVariantError, match="compound-scaled: 'b-phi0.5'"):
        get_variant("b-phix")


def test_transfer_learning_api() -> None:
    model = EfficientNet("lite0", 7).eval()
    x = torch.randn(2, 3, 96, 96)
    feats = model.forward_features(x)
    assert feats.shape == (2, 1280, 3, 3)
    emb = model.forward_embedding(x)
    assert emb.shape == (2, 1280)
    assert torch.allclose(model.forward_head(emb), model(x), atol=1e-6)
    groups = model.parameter_groups()
    assert list(groups) == ["stem"] + [f"stage{i}" for i in range(7)] + ["head", "classifier"]
    assert sum(sum(p.numel() for p in ps) for ps in groups.values()) == sum(p.numel() for p in model.parameters())
    model.set_trainable(["stage6", "head", "classifier"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.startswith(("blocks.6.", "conv_head", "bn2", "classifier")) for n in trainable)
    with pytest.raises(ValueError, match="Unknown parameter groups"):
        model.set_trainable(["stage9"])
    model.reset_classifier(3)
    assert model(x).shape == (2, 3)


@pytest.mark.parametrize("entry", ["image", "stage0", "stage3", "stage6", "head", "features", "embedding"])
def test_forward_from_any_entry_point_matches_forward(entry: str) -> None:
    # The trainable tail of a partly frozen model starts at a named entry point: running the
    # frozen prefix to it, then forward_from it, is the same computation as forward(x).
    model = EfficientNet("lite0", 5).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        arriving, = model.forward_intermediates(x, [entry])
        assert torch.equal(model.forward_from(entry, arriving), model(x))
        assert torch.equal(model.forward_between(x, "image", entry), arriving)


def test_forward_intermediates_named_points() -> None:
    model = EfficientNet("b0", 4).eval()
    x = torch.randn(1, 3, 64, 64)
    channels = model.arch.stage_channels()
    with torch.no_grad():
        outs = model.forward_intermediates(x, ["embedding", "stage1", "stage6", "head", "features", "logits"])
        emb, s1, s6, head, feats, logits = outs
        assert s1.shape[1] == channels[0] and s6.shape[1] == channels[5] and head.shape[1] == channels[6]
        assert feats.shape == (1, model.num_features, 2, 2) and torch.equal(feats, model.forward_features(x))
        assert torch.equal(emb, model.forward_embedding(x)) and torch.equal(logits, model(x))
        # From a later entry point: derive the embedding from activations entering stage 5.
        s5, = model.forward_intermediates(x, ["stage5"])
        assert torch.equal(model.forward_intermediates(s5, ["embedding"], entry="stage5")[0], emb)
    assert ENTRY_POINTS.index("stage0") < ENTRY_POINTS.index("head") < ENTRY_POINTS.index("embedding")
    assert [group_entry(g) for g in ("stem", "stage4", "head", "classifier")] == ["image", "stage4", "head",
                                                                                  "embedding"]
    with pytest.raises(ValueError, match="Unknown entry point 'stage7'"):
        model.forward_from("stage7", x)
    with pytest.raises(ValueError, match="backwards"):
        model.forward_between(emb, "embedding", "stage3")


def test_stochastic_depth_rises_linearly() -> None:
    model = EfficientNet("b0", 10, drop_path_rate=0.2)
    rates = [blk.drop_path_rate for stage in model.blocks for blk in stage]
    assert rates[0] == 0.0 and rates == sorted(rates) and max(rates) < 0.2
    assert np.allclose(np.diff(rates), 0.2 / len(rates))
    model.train()
    out = model(torch.randn(4, 3, 64, 64))
    assert torch.isfinite(out).all()
