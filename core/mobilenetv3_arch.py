"""MobileNetV3 architecture as data: the Large and Small stage tables, the named variants,
width scaling, the scaled per-block shapes and the analytic cost (parameters, MACs, activations).

``LARGE_STAGES`` and ``SMALL_STAGES`` are the bottleneck rows of Howard et al. 2019 (tables 1
and 2), grouped into stages the way timm groups them (so module names match timm's
``mobilenetv3_*``). ``VARIANTS`` holds each named model's (size, width, resolution, dropout).
Every scaled channel count is derived with ``make_divisible``, never typed in. No torch needed.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from core.efficientnet_arch import (
    BlockSpec,
    CostTally,
    ModelCost,
    UnknownVariantError,
    count_stem_and_blocks,
    make_divisible,
)

Size = Literal["large", "small"]
Activation = Literal["RE", "HS"]  # the paper's ReLU and hard-swish


# --------------------------------------------------------------------------------------------
# Architecture as data
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Bneck:
    """One row of the paper's table at width 1.0: a bottleneck (inverted-residual) block."""

    kernel: int
    exp_size: int  # channels of the expanded (depthwise) layer
    out_channels: int
    se: bool  # squeeze-excitation
    act: Activation
    stride: int


B = Bneck
# Table 1. timm's stage grouping; the stem (3x3 conv, 16, HS, s2) comes before.
LARGE_STAGES: tuple[tuple[Bneck, ...], ...] = (
    (B(3, 16, 16, False, "RE", 1),),
    (B(3, 64, 24, False, "RE", 2), B(3, 72, 24, False, "RE", 1)),
    (B(5, 72, 40, True, "RE", 2), B(5, 120, 40, True, "RE", 1), B(5, 120, 40, True, "RE", 1)),
    (B(3, 240, 80, False, "HS", 2), B(3, 200, 80, False, "HS", 1), B(3, 184, 80, False, "HS", 1),
     B(3, 184, 80, False, "HS", 1)),
    (B(3, 480, 112, True, "HS", 1), B(3, 672, 112, True, "HS", 1)),
    (B(5, 672, 160, True, "HS", 2), B(5, 960, 160, True, "HS", 1), B(5, 960, 160, True, "HS", 1)),
)
# Table 2. (The paper also puts SE on the last 1x1 conv; timm's weights have none there.)
SMALL_STAGES: tuple[tuple[Bneck, ...], ...] = (
    (B(3, 16, 16, True, "RE", 2),),
    (B(3, 72, 24, False, "RE", 2), B(3, 88, 24, False, "RE", 1)),
    (B(5, 96, 40, True, "HS", 2), B(5, 240, 40, True, "HS", 1), B(5, 240, 40, True, "HS", 1)),
    (B(5, 120, 48, True, "HS", 1), B(5, 144, 48, True, "HS", 1)),
    (B(5, 288, 96, True, "HS", 2), B(5, 576, 96, True, "HS", 1), B(5, 576, 96, True, "HS", 1)),
)
del B
SE_RATIO = 0.25  # squeeze width = expanded channels / 4, rounded to a multiple of 8


@dataclass(frozen=True)
class NetworkTable:
    """One size of the family at width 1.0."""

    stages: tuple[tuple[Bneck, ...], ...]
    stem_channels: int  # 3x3 stride-2 conv, hard-swish
    last_channels: int  # the 1x1 conv on the last feature map (scaled with the width)
    head_hidden: int  # the 1x1 conv after pooling, no BN (not scaled, as in timm)


TABLES: dict[Size, NetworkTable] = {
    "large": NetworkTable(LARGE_STAGES, 16, 960, 1280),
    "small": NetworkTable(SMALL_STAGES, 16, 576, 1024),
}


@dataclass(frozen=True)
class VariantSpec:
    """A named member of the family."""

    name: str
    size: Size
    width: float
    resolution: int
    dropout: float

    @property
    def family(self) -> str:
        """The line within the family along which accuracy is interpolated (Large or Small)."""
        return f"mobilenetv3-{self.size}"

    def at_resolution(self, resolution: int) -> VariantSpec:
        """The same network fed a different input size (weights are resolution-independent)."""
        name = self.name if resolution == self.resolution else f"{self.name}@{resolution}"
        return replace(self, name=name, resolution=int(resolution))


_TABLE: dict[str, tuple[Size, float, int, float]] = {  # (size, width, resolution, dropout)
    "mobilenetv3-large-100": ("large", 1.0, 224, 0.2),
    "mobilenetv3-large-075": ("large", 0.75, 224, 0.2),
    "mobilenetv3-small-100": ("small", 1.0, 224, 0.2),
    "mobilenetv3-small-075": ("small", 0.75, 224, 0.2),
}
VARIANTS: dict[str, VariantSpec] = {n: VariantSpec(n, *v) for n, v in _TABLE.items()}


# The timm checkpoint each named variant starts from. timm trained no PyTorch Large 0.75
# (its mobilenetv3-large-075 is "untrained"), so that one is the TensorFlow port.
TIMM_CHECKPOINTS: dict[str, str] = {
    "mobilenetv3-large-100": "mobilenetv3_large_100.ra_in1k",
    "mobilenetv3-large-075": "tf_mobilenetv3_large_075.in1k",
    "mobilenetv3-small-100": "mobilenetv3_small_100.lamb_in1k",
    "mobilenetv3-small-075": "mobilenetv3_small_075.lamb_in1k",
}

def get_variant(name: str | VariantSpec) -> VariantSpec:
    """Look up a named variant ('mobilenetv3-large-100' ...), optionally at another input size:
    'mobilenetv3-small-075@160'."""
    if isinstance(name, VariantSpec):
        return name
    key, _, res = str(name).strip().lower().partition("@")
    key = key.replace("_", "-")  # timm's spelling (mobilenetv3_large_100) names the same network
    if res and (not res.isdigit() or int(res) < 32):
        raise UnknownVariantError(
            f"Bad resolution in {name!r}: expected e.g. 'mobilenetv3-large-100@192' (at least 32 px).")
    if key not in VARIANTS:
        raise UnknownVariantError(f"Unknown MobileNetV3 variant {name!r}. Known variants: {', '.join(VARIANTS)}.")
    return VARIANTS[key].at_resolution(int(res)) if res else VARIANTS[key]


@dataclass(frozen=True)
class MobileBlockSpec(BlockSpec):
    """One concrete bottleneck block after scaling, with its activation."""

    act: Activation


@dataclass(frozen=True)
class ScaledArch:
    stem_channels: int
    blocks: tuple[MobileBlockSpec, ...]
    last_channels: int
    head_hidden: int

    @property
    def num_stages(self) -> int:
        """Bottleneck stages; the last 1x1 conv follows them (timm's ``blocks[num_stages]``)."""
        return self.blocks[-1].stage + 1

    def stage_repeats(self) -> list[int]:
        return [sum(1 for b in self.blocks if b.stage == s) for s in range(self.num_stages)]

    def stage_channels(self) -> list[int]:
        return [next(b.out_channels for b in self.blocks if b.stage == s) for s in range(self.num_stages)]


def scaled_arch(variant: str | VariantSpec) -> ScaledArch:
    """Apply the width multiplier to the stage table, with timm's rounding."""
    v = get_variant(variant)
    table = TABLES[v.size]
    width = lambda c: make_divisible(c * v.width)  # noqa: E731
    # timm keeps the stem at 16 below width 0.75 ("fix_stem"); at 0.75, 12 rounds up to 16 anyway.
    stem = width(table.stem_channels) if v.width >= 0.75 else table.stem_channels
    blocks: list[MobileBlockSpec] = []
    in_ch, base_in = stem, table.stem_channels
    for s, rows in enumerate(table.stages):
        for row in rows:
            # The expansion is a ratio of the block's input (timm's e4, e3 ...): the paper's
            # expanded size over the width-1.0 input, applied to the scaled input.
            ratio = row.exp_size / base_in
            kind: Literal["ds", "ir"] = "ds" if ratio == 1 and s == 0 else "ir"
            mid = in_ch if kind == "ds" else make_divisible(in_ch * ratio)
            se = make_divisible(mid * SE_RATIO) if row.se else 0
            out_ch = width(row.out_channels)
            blocks.append(MobileBlockSpec(s, kind, in_ch, out_ch, mid, row.kernel, row.stride, se, row.act))
            in_ch, base_in = out_ch, row.out_channels
    return ScaledArch(stem, tuple(blocks), width(table.last_channels), table.head_hidden)


# --------------------------------------------------------------------------------------------
# Analytic cost
# --------------------------------------------------------------------------------------------
def count_cost(variant: str | VariantSpec, resolution: int | None = None, num_classes: int = 1000) -> ModelCost:
    """Parameters, multiply-adds and peak activation size, computed from the architecture alone."""
    v = get_variant(variant)
    arch = scaled_arch(v)
    t = CostTally()
    h = count_stem_and_blocks(t, arch.stem_channels, arch.blocks, int(resolution or v.resolution))
    t.conv_bn(arch.blocks[-1].out_channels, arch.last_channels, 1, h * h)
    t.live((arch.blocks[-1].out_channels + arch.last_channels) * h * h)
    # MobileNetV3's "efficient head": pool first, then a 1x1 conv with bias and no BN.
    t.conv(arch.last_channels, arch.head_hidden, 1, 1, bias=True)
    t.classifier(arch.head_hidden, num_classes)
    return t.cost()


__all__ = [
    "Activation", "Bneck", "LARGE_STAGES", "SMALL_STAGES", "SE_RATIO", "NetworkTable", "TABLES", "Size",
    "VariantSpec", "VARIANTS", "get_variant", "MobileBlockSpec", "ScaledArch", "scaled_arch", "count_cost",
    "ModelCost", "UnknownVariantError", "make_divisible",
]
