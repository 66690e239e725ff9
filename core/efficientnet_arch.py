"""EfficientNet architecture as data: the B0 stage table, the named variants, compound
scaling, the scaled per-block shapes and the analytic cost (parameters, MACs, activations).

``B0_STAGES`` is the baseline network (Tan & Le, 2019, table 1) and ``VARIANTS`` holds each
named model's (width, depth, resolution, dropout). Every scaled channel count and repeat count
is derived with ``make_divisible`` and ``ceil``, never typed in. No torch needed here.
"""
from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

from core.registry import ModelCost, UnknownVariantError

Family = Literal["b", "lite"]


# --------------------------------------------------------------------------------------------
# Architecture as data
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StageSpec:
    """One stage of the baseline network: `repeats` blocks of the same shape."""

    block: Literal["ds", "ir"]  # depthwise-separable (expand 1) or inverted residual (MBConv)
    expand_ratio: int
    kernel: int
    stride: int
    out_channels: int
    repeats: int
    se_ratio: float  # squeeze width = block input channels x se_ratio


B0_STAGES: tuple[StageSpec, ...] = (
    StageSpec("ds", 1, 3, 1, 16, 1, 0.25),
    StageSpec("ir", 6, 3, 2, 24, 2, 0.25),
    StageSpec("ir", 6, 5, 2, 40, 2, 0.25),
    StageSpec("ir", 6, 3, 2, 80, 3, 0.25),
    StageSpec("ir", 6, 5, 1, 112, 3, 0.25),
    StageSpec("ir", 6, 5, 2, 192, 4, 0.25),
    StageSpec("ir", 6, 3, 1, 320, 1, 0.25),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280


@dataclass(frozen=True)
class VariantSpec:
    """A named (or compound-scaled) member of the family."""

    name: str
    family: Family
    width: float
    depth: float
    resolution: int
    dropout: float

    @property
    def is_lite(self) -> bool:
        # Lite: no squeeze-excitation, ReLU6, stem and head not scaled, first and last
        # stage repeats not scaled (friendlier to int8 and mobile accelerators).
        return self.family == "lite"

    def at_resolution(self, resolution: int) -> VariantSpec:
        """The same network fed a different input size (weights are resolution-independent)."""
        name = self.name if resolution == self.resolution else f"{self.name}@{resolution}"
        return replace(self, name=name, resolution=int(resolution))


_B_TABLE = {  # (width, depth, resolution, dropout)
    "b0": (1.0, 1.0, 224, 0.2),
    "b1": (1.0, 1.1, 240, 0.2),
    "b2": (1.1, 1.2, 260, 0.3),
    "b3": (1.2, 1.4, 300, 0.3),
    "b4": (1.4, 1.8, 380, 0.4),
    "b5": (1.6, 2.2, 456, 0.4),
    "b6": (1.8, 2.6, 528, 0.5),
    "b7": (2.0, 3.1, 600, 0.5),
}
_LITE_TABLE = {  # (width, depth, resolution, dropout)
    "lite0": (1.0, 1.0, 224, 0.2),
    "lite1": (1.0, 1.1, 240, 0.2),
    "lite2": (1.1, 1.2, 260, 0.3),
    "lite3": (1.2, 1.4, 280, 0.3),
    "lite4": (1.4, 1.8, 300, 0.3),
}
VARIANTS: dict[str, VariantSpec] = {
    **{n: VariantSpec(n, "b", *v) for n, v in _B_TABLE.items()},
    **{n: VariantSpec(n, "lite", *v) for n, v in _LITE_TABLE.items()},
}


_PREFIXES = ("tf_efficientnet_", "efficientnet_", "efficientnet-")
_COMPOUND = re.compile(r"(b|lite)-phi(\d+(?:\.\d+)?)")
NAME_HELP = "at another input size 'b0@192', compound-scaled 'b-phi0.5', 'lite-phi1.5@256'"


def parse_variant(name: str) -> VariantSpec | None:
    """``get_variant`` for the registry: None when ``name`` is not an EfficientNet name at all."""
    key = name.strip().lower().partition("@")[0]
    for prefix in _PREFIXES:
        key = key.removeprefix(prefix)
    return get_variant(name) if key in VARIANTS or _COMPOUND.fullmatch(key) else None


def get_variant(name: str | VariantSpec) -> VariantSpec:
    """Look up a named variant: 'b0'..'b7', 'lite0'..'lite4' ('efficientnet_b0' also works),
    optionally at another input size: 'b0@192'; or a compound-scaled one by its coefficient,
    as the recommender names them: 'b-phi0.5', 'lite-phi1.5@256'."""
    if isinstance(name, VariantSpec):
        return name
    key, _, res = str(name).strip().lower().partition("@")
    if res and (not res.isdigit() or int(res) < 32):
        raise UnknownVariantError(f"Bad resolution in {name!r}: expected e.g. 'b0@192' (at least 32 px).")
    compound = _COMPOUND.fullmatch(key)
    if compound:
        return compound_variant(float(compound[2]), int(res) if res else None,
                                family="lite" if compound[1] == "lite" else "b")
    if res:
        return get_variant(key).at_resolution(int(res))
    for prefix in _PREFIXES:
        if key.startswith(prefix):
            key = key[len(prefix):]
    if key not in VARIANTS:
        raise UnknownVariantError(
            f"Unknown EfficientNet variant {name!r}. Known variants: {', '.join(VARIANTS)} "
            f"(or compound-scaled: 'b-phi0.5', 'lite-phi1.5')."
        )
    return VARIANTS[key]


# Compound scaling (paper, eq. 3): depth = alpha^phi, width = beta^phi, resolution = gamma^phi,
# with alpha * beta^2 * gamma^2 ~= 2 so FLOPs grow ~2^phi. The named B1-B7 are hand-rounded
# points, not exact powers: solving each coefficient for phi gives depth/width/resolution phis of
# B1 (0.5, 0.0, 0.5), B2 (1.0, 1.0, 1.1), B3 (1.9, 1.9, 2.1), B4 (3.2, 3.5, 3.8),
# B5 (4.3, 4.9, 5.1), B6 (5.2, 6.2, 6.1), B7 (6.2, 7.3, 7.1): the authors rounded width and depth
# to one decimal and picked hardware-friendly resolutions. So compound_variant(1.0) =
# (1.1, 1.2, 256) sits next to B2 (1.1, 1.2, 260), and phi = 0.5 gives a model between B1 and B2.
# Lite1-4 reuse the B widths/depths with smaller resolutions (280 and 300 for Lite3/4).
ALPHA, BETA, GAMMA = 1.2, 1.1, 1.15


def compound_variant(
    phi: float, resolution: int | None = None, family: Family = "b", dropout: float | None = None
) -> VariantSpec:
    """An in-between model from the compound coefficient phi (phi=0 is B0 / Lite0).

    ``resolution`` overrides gamma^phi x 224 (rounded to a multiple of 8 px).
    """
    if phi < 0:
        raise ValueError(f"phi must be >= 0, got {phi}")
    depth = ALPHA**phi
    width = BETA**phi
    res = resolution if resolution is not None else int(round(224 * GAMMA**phi / 8) * 8)
    drop = dropout if dropout is not None else min(0.5, 0.2 + 0.05 * phi)
    base = "lite" if family == "lite" else "b"
    return VariantSpec(f"{base}-phi{phi:g}@{res}", family, round(width, 4), round(depth, 4), int(res), drop)


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None, round_limit: float = 0.9) -> int:
    """Round channels to a multiple of `divisor`, never dropping more than 10 % (round_limit)."""
    min_value = min_value or divisor
    new_value = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if new_value < round_limit * value:
        new_value += divisor
    return new_value


@dataclass(frozen=True)
class BlockSpec:
    """One concrete block after scaling."""

    stage: int
    block: Literal["ds", "ir"]
    in_channels: int
    out_channels: int
    mid_channels: int
    kernel: int
    stride: int
    se_channels: int  # 0 = no squeeze-excitation

    @property
    def has_skip(self) -> bool:
        return self.stride == 1 and self.in_channels == self.out_channels


@dataclass(frozen=True)
class ScaledArch:
    stem_channels: int
    head_channels: int
    blocks: tuple[BlockSpec, ...]

    def stage_repeats(self) -> list[int]:
        return [sum(1 for b in self.blocks if b.stage == s) for s in range(len(B0_STAGES))]

    def stage_channels(self) -> list[int]:
        return [next(b.out_channels for b in self.blocks if b.stage == s) for s in range(len(B0_STAGES))]


def scaled_arch(variant: str | VariantSpec) -> ScaledArch:
    """Apply width and depth scaling to the B0 stage table."""
    v = get_variant(variant)
    width = lambda c: make_divisible(c * v.width)  # noqa: E731
    stem = STEM_CHANNELS if v.is_lite else width(STEM_CHANNELS)
    head = HEAD_CHANNELS if v.is_lite else width(HEAD_CHANNELS)
    blocks: list[BlockSpec] = []
    in_ch = stem
    last = len(B0_STAGES) - 1
    for s, st in enumerate(B0_STAGES):
        fixed = v.is_lite and s in (0, last)
        repeats = st.repeats if fixed else int(math.ceil(st.repeats * v.depth))
        out_ch = width(st.out_channels)
        for i in range(repeats):
            mid = in_ch * st.expand_ratio
            se = 0 if v.is_lite or not st.se_ratio else max(1, int(round(in_ch * st.se_ratio)))
            blocks.append(
                BlockSpec(s, st.block, in_ch, out_ch, mid, st.kernel, st.stride if i == 0 else 1, se)
            )
            in_ch = out_ch
    return ScaledArch(stem, head, tuple(blocks))


# --------------------------------------------------------------------------------------------
# Analytic cost
# --------------------------------------------------------------------------------------------
@dataclass
class CostTally:
    """Parameters, multiply-adds (batch 1) and the largest pair of live tensors, layer by layer."""

    params: int = 0
    macs: int = 0
    peak: int = 0

    def conv(self, cin: int, cout: int, k: int, hw_out: int, groups: int = 1, bias: bool = False) -> None:
        w = cout * (cin // groups) * k * k
        self.params += w + (cout if bias else 0)
        self.macs += w * hw_out

    def conv_bn(self, cin: int, cout: int, k: int, hw_out: int, groups: int = 1) -> None:
        self.conv(cin, cout, k, hw_out, groups)
        self.params += 2 * cout  # BN scale and shift (folded into the conv on export)

    def live(self, elements: int) -> None:
        self.peak = max(self.peak, elements)

    def classifier(self, features: int, num_classes: int) -> None:
        if num_classes:
            self.params += features * num_classes + num_classes
            self.macs += features * num_classes

    def cost(self) -> ModelCost:
        return ModelCost(params=self.params, macs=self.macs, peak_activation_elements=self.peak)


def count_stem_and_blocks(t: CostTally, stem_channels: int, blocks: Sequence[BlockSpec], res: int) -> int:
    """The 3x3 stride-2 stem and the MBConv / depthwise-separable blocks (EfficientNet's and
    MobileNetV3's alike) into ``t``; returns the side of the last feature map."""
    h = math.ceil(res / 2)  # symmetric padding of an odd kernel: ceil(size / stride)
    t.conv_bn(3, stem_channels, 3, h * h)
    t.live(3 * res * res + stem_channels * h * h)
    for b in blocks:
        hin, h = h, math.ceil(h / b.stride)
        c = b.mid_channels
        if b.block == "ir":
            t.conv_bn(b.in_channels, c, 1, hin * hin)
            t.live((b.in_channels + c) * hin * hin)
        t.conv_bn(c, c, b.kernel, h * h, groups=c)
        t.live(c * hin * hin + c * h * h)
        if b.se_channels:
            t.conv(c, b.se_channels, 1, 1, bias=True)
            t.conv(b.se_channels, c, 1, 1, bias=True)
            t.macs += c * h * h  # the gating multiply
        t.conv_bn(c, b.out_channels, 1, h * h)
        t.live((c + b.out_channels) * h * h)
    return h


def count_cost(variant: str | VariantSpec, resolution: int | None = None, num_classes: int = 1000) -> ModelCost:
    """Parameters, multiply-adds and peak activation size, computed from the architecture alone."""
    v = get_variant(variant)
    arch = scaled_arch(v)
    t = CostTally()
    h = count_stem_and_blocks(t, arch.stem_channels, arch.blocks, int(resolution or v.resolution))
    t.conv_bn(arch.blocks[-1].out_channels, arch.head_channels, 1, h * h)
    t.classifier(arch.head_channels, num_classes)
    return t.cost()
