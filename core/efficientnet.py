"""Our EfficientNet: B0-B7, Lite0-Lite4 and compound-scaled in-between models from one stage table.

Architecture is data: ``B0_STAGES`` is the baseline network (Tan & Le, 2019, table 1) and
``VARIANTS`` holds each named model's (width, depth, resolution, dropout). Every scaled channel
count and repeat count is derived with ``make_divisible`` and ``ceil``, never typed in.

Module names follow timm's EfficientNet (``conv_stem``, ``blocks.i.j.conv_pw`` ...) so timm
state dicts load without renaming; the classes here are our own.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

Padding = Literal["symmetric", "same"]
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
NUM_STAGES = len(B0_STAGES)
STAGE_NAMES: tuple[str, ...] = tuple(f"stage{i}" for i in range(NUM_STAGES))

# Named points along the network, input to output. Each names the tensor ENTERING that part:
# "stageN" is the input of stage N, "head" the input of conv_head (the output of the last
# stage), "features" the last feature map (conv_head + BN, what Grad-CAM looks at),
# "embedding" the pooled features, "logits" the classifier output.
ENTRY_POINTS: tuple[str, ...] = ("image", *STAGE_NAMES, "head", "features", "embedding", "logits")
# Parameter groups, input to output; a group's input is the entry point of the same name
# ("stem" starts at "image", "classifier" at "embedding").
PARAMETER_GROUPS: tuple[str, ...] = ("stem", *STAGE_NAMES, "head", "classifier")


def entry_position(entry: str) -> int:
    """Position of a named entry point along the network (to order and compare them)."""
    try:
        return ENTRY_POINTS.index(entry)
    except ValueError:
        raise ValueError(f"Unknown entry point {entry!r}; known: {', '.join(ENTRY_POINTS)}") from None


def group_entry(group: str) -> str:
    """The entry point where a parameter group's input arrives."""
    if group not in PARAMETER_GROUPS:
        raise ValueError(f"Unknown parameter group {group!r}; known: {', '.join(PARAMETER_GROUPS)}")
    return {"stem": "image", "classifier": "embedding"}.get(group, group)


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

    def at_resolution(self, resolution: int) -> "VariantSpec":
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


class UnknownVariantError(ValueError):
    pass


def get_variant(name: str | VariantSpec) -> VariantSpec:
    """Look up a named variant: 'b0'..'b7', 'lite0'..'lite4' ('efficientnet_b0' also works),
    optionally at another input size: 'b0@192'; or a compound-scaled one by its coefficient,
    as the recommender names them: 'b-phi0.5', 'lite-phi1.5@256'."""
    if isinstance(name, VariantSpec):
        return name
    key, _, res = str(name).strip().lower().partition("@")
    if res and (not res.isdigit() or int(res) < 32):
        raise UnknownVariantError(f"Bad resolution in {name!r}: expected e.g. 'b0@192' (at least 32 px).")
    compound = re.fullmatch(r"(b|lite)-phi(\d+(?:\.\d+)?)", key)
    if compound:
        return compound_variant(float(compound[2]), int(res) if res else None,
                                family="lite" if compound[1] == "lite" else "b")
    if res:
        return get_variant(key).at_resolution(int(res))
    for prefix in ("tf_efficientnet_", "efficientnet_", "efficientnet-"):
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
# Layers
# --------------------------------------------------------------------------------------------
def _same_pad_amount(size: int, kernel: int, stride: int) -> int:
    return max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)


class Conv2dSame(nn.Conv2d):
    """Conv with TensorFlow "SAME" padding, computed from the actual input size at run time.

    Needed for TF-ported weights (tf_* and the Lite packages): TF pads asymmetrically
    (more on the bottom/right) when the stride is 2, which symmetric padding cannot express.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.shape[-2:]
        kh, kw = self.kernel_size
        sh, sw = self.stride
        ph, pw = _same_pad_amount(ih, kh, sh), _same_pad_amount(iw, kw, sw)
        if ph or pw:
            x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def conv2d(in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1,
           bias: bool = False, padding: Padding = "symmetric") -> nn.Conv2d:
    # A stride-1 odd kernel pads the same on both sides either way: keep the plain (faster) conv.
    if padding == "same" and stride > 1:
        return Conv2dSame(in_ch, out_ch, kernel, stride, 0, groups=groups, bias=bias)
    return nn.Conv2d(in_ch, out_ch, kernel, stride, (kernel - 1) // 2, groups=groups, bias=bias)


class BatchNormAct2d(nn.BatchNorm2d):
    """BatchNorm followed by an activation; a BatchNorm2d subclass so state-dict keys match."""

    def __init__(self, channels: int, act: type[nn.Module] | None, eps: float):
        super().__init__(channels, eps=eps)
        self.act = act(inplace=True) if act is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(super().forward(x))


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, squeeze_channels: int, act: type[nn.Module]):
        super().__init__()
        self.conv_reduce = nn.Conv2d(channels, squeeze_channels, 1, bias=True)
        self.act1 = act(inplace=True)
        self.conv_expand = nn.Conv2d(squeeze_channels, channels, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3), keepdim=True)
        s = self.conv_expand(self.act1(self.conv_reduce(s)))
        return x * s.sigmoid()


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: drop the whole residual branch per sample."""
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask / keep


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand, depthwise, squeeze-excitation, 1x1 project, residual."""

    def __init__(self, spec: BlockSpec, act: type[nn.Module], bn_eps: float, padding: Padding,
                 drop_path_rate: float):
        super().__init__()
        self.has_skip = spec.has_skip
        self.drop_path_rate = drop_path_rate
        mid = spec.mid_channels
        self.conv_pw = conv2d(spec.in_channels, mid, 1, padding=padding)
        self.bn1 = BatchNormAct2d(mid, act, bn_eps)
        self.conv_dw = conv2d(mid, mid, spec.kernel, spec.stride, groups=mid, padding=padding)
        self.bn2 = BatchNormAct2d(mid, act, bn_eps)
        self.se = SqueezeExcite(mid, spec.se_channels, act) if spec.se_channels else nn.Identity()
        self.conv_pwl = conv2d(mid, spec.out_channels, 1, padding=padding)
        self.bn3 = BatchNormAct2d(spec.out_channels, None, bn_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv_pwl(self.se(self.bn2(self.conv_dw(self.bn1(self.conv_pw(x)))))))
        if self.has_skip:
            out = drop_path(out, self.drop_path_rate, self.training) + x
        return out


class DepthwiseSeparable(nn.Module):
    """The expand-ratio-1 block of stage 0: depthwise, squeeze-excitation, 1x1 project."""

    def __init__(self, spec: BlockSpec, act: type[nn.Module], bn_eps: float, padding: Padding,
                 drop_path_rate: float):
        super().__init__()
        self.has_skip = spec.has_skip
        self.drop_path_rate = drop_path_rate
        self.conv_dw = conv2d(spec.in_channels, spec.in_channels, spec.kernel, spec.stride,
                              groups=spec.in_channels, padding=padding)
        self.bn1 = BatchNormAct2d(spec.in_channels, act, bn_eps)
        self.se = (SqueezeExcite(spec.in_channels, spec.se_channels, act)
                   if spec.se_channels else nn.Identity())
        self.conv_pw = conv2d(spec.in_channels, spec.out_channels, 1, padding=padding)
        self.bn2 = BatchNormAct2d(spec.out_channels, None, bn_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv_pw(self.se(self.bn1(self.conv_dw(x)))))
        if self.has_skip:
            out = drop_path(out, self.drop_path_rate, self.training) + x
        return out


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------
class EfficientNet(nn.Module):
    """EfficientNet with a transfer-learning API.

    ``padding='same'`` and ``bn_eps=1e-3`` reproduce TF-ported weights (tf_* and Lite);
    ``padding='symmetric'`` and ``bn_eps=1e-5`` timm's PyTorch-trained ``efficientnet_b*``.
    """

    def __init__(
        self,
        variant: str | VariantSpec = "b0",
        num_classes: int = 1000,
        padding: Padding = "symmetric",
        bn_eps: float = 1e-5,
        drop_rate: float | None = None,
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        self.variant = get_variant(variant)
        self.arch = scaled_arch(self.variant)
        self.padding = padding
        self.bn_eps = bn_eps
        act: type[nn.Module] = nn.ReLU6 if self.variant.is_lite else nn.SiLU
        self.drop_rate = self.variant.dropout if drop_rate is None else drop_rate

        self.conv_stem = conv2d(3, self.arch.stem_channels, 3, 2, padding=padding)
        self.bn1 = BatchNormAct2d(self.arch.stem_channels, act, bn_eps)
        n_blocks = len(self.arch.blocks)
        stages: list[list[nn.Module]] = [[] for _ in B0_STAGES]
        for idx, spec in enumerate(self.arch.blocks):
            # Stochastic depth rises linearly with the block index.
            dpr = drop_path_rate * idx / n_blocks
            cls = DepthwiseSeparable if spec.block == "ds" else MBConv
            stages[spec.stage].append(cls(spec, act, bn_eps, padding, dpr))
        self.blocks = nn.Sequential(*(nn.Sequential(*s) for s in stages))
        self.conv_head = conv2d(self.arch.blocks[-1].out_channels, self.arch.head_channels, 1, padding=padding)
        self.bn2 = BatchNormAct2d(self.arch.head_channels, act, bn_eps)
        self.num_features = self.arch.head_channels
        self.classifier: nn.Module = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()
        self.num_classes = num_classes
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
                nn.init.normal_(m.weight, 0, math.sqrt(2.0 / fan_out))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                r = 1.0 / math.sqrt(m.weight.shape[0])
                nn.init.uniform_(m.weight, -r, r)
                nn.init.zeros_(m.bias)

    # -- transfer-learning API --------------------------------------------------------------
    def _run_segment(self, entry: str, x: torch.Tensor) -> torch.Tensor:
        """The part from ``entry`` to the next entry point."""
        if entry == "image":
            return self.bn1(self.conv_stem(x))
        if entry in STAGE_NAMES:
            return self.blocks[STAGE_NAMES.index(entry)](x)
        if entry == "head":
            return self.bn2(self.conv_head(x))
        if entry == "features":
            return self.pool(x)
        if entry == "embedding":
            return self.forward_head(x)
        raise ValueError(f"Nothing runs after {entry!r}")

    def forward_between(self, x: torch.Tensor, entry: str, stop: str) -> torch.Tensor:
        """Run from entry point ``entry`` (``x`` is the tensor arriving there) up to ``stop``."""
        start, end = entry_position(entry), entry_position(stop)
        if end < start:
            raise ValueError(f"Cannot run backwards from {entry!r} to the earlier point {stop!r}.")
        for name in ENTRY_POINTS[start:end]:
            x = self._run_segment(name, x)
        return x

    def forward_from(self, entry: str, x: torch.Tensor) -> torch.Tensor:
        """Logits from the tensor arriving at ``entry`` (timm's idiom): what a partly frozen,
        partly cached network trains through. ``forward_from("image", x)`` is ``forward(x)``."""
        return self.forward_between(x, entry, "logits")

    def forward_intermediates(self, x: torch.Tensor, points: Sequence[str],
                              entry: str = "image") -> list[torch.Tensor]:
        """The tensors at the named ``points`` (in the order asked), from ``x`` arriving at
        ``entry``; stops at the last point asked for (nothing above it runs)."""
        wanted = {entry_position(p) for p in points}
        start = entry_position(entry)
        if min(wanted) < start:
            raise ValueError(f"Points {list(points)} include one before the entry {entry!r}.")
        found: dict[int, torch.Tensor] = {start: x}
        for pos in range(start, max(wanted)):
            x = self._run_segment(ENTRY_POINTS[pos], x)
            found[pos + 1] = x
        return [found[entry_position(p)] for p in points]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Last feature map (N, num_features, H/32, W/32): what Grad-CAM looks at."""
        return self.forward_between(x, "image", "features")

    def pool(self, features: torch.Tensor) -> torch.Tensor:
        return features.mean((2, 3))

    def forward_embedding(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled embedding (N, num_features): what a frozen-backbone head trains on."""
        return self.forward_between(x, "image", "embedding")

    def forward_head(self, embedding: torch.Tensor) -> torch.Tensor:
        if self.drop_rate > 0 and self.training:
            embedding = F.dropout(embedding, self.drop_rate, True)
        return self.classifier(embedding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_between(x, "image", "logits")

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head with a fresh linear layer for `num_classes` classes."""
        self.num_classes = num_classes
        self.classifier = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Named groups, input to output: 'stem', 'stage0'..'stage6', 'head' (conv_head+bn2), 'classifier'."""
        groups: dict[str, list[nn.Parameter]] = {
            "stem": [*self.conv_stem.parameters(), *self.bn1.parameters()]
        }
        for name, stage in zip(STAGE_NAMES, self.blocks):
            groups[name] = list(stage.parameters())
        groups["head"] = [*self.conv_head.parameters(), *self.bn2.parameters()]
        groups["classifier"] = list(self.classifier.parameters())
        return groups

    def group_modules(self) -> dict[str, list[nn.Module]]:
        """Modules per parameter group (to put frozen BatchNorms in eval mode)."""
        mods: dict[str, list[nn.Module]] = {"stem": [self.conv_stem, self.bn1]}
        for name, stage in zip(STAGE_NAMES, self.blocks):
            mods[name] = [stage]
        mods["head"] = [self.conv_head, self.bn2]
        mods["classifier"] = [self.classifier]
        return mods

    def group_state_prefixes(self, groups: Sequence[str]) -> tuple[str, ...]:
        """State-dict key prefixes of the named groups (weights and BatchNorm buffers)."""
        table = {"stem": ("conv_stem.", "bn1."), "head": ("conv_head.", "bn2."), "classifier": ("classifier.",),
                 **{name: (f"blocks.{i}.",) for i, name in enumerate(STAGE_NAMES)}}
        return tuple(prefix for g in groups for prefix in table[g])

    def set_trainable(self, groups: Sequence[str]) -> None:
        """Train only the named groups; everything else is frozen."""
        wanted = set(groups)
        unknown = wanted - set(self.parameter_groups())
        if unknown:
            raise ValueError(f"Unknown parameter groups {sorted(unknown)}; known: {list(self.parameter_groups())}")
        for name, params in self.parameter_groups().items():
            for p in params:
                p.requires_grad_(name in wanted)


# --------------------------------------------------------------------------------------------
# Analytic cost
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelCost:
    params: int
    macs: int  # multiply-adds at batch 1
    peak_activation_elements: int  # largest (input + output) pair of live tensors at batch 1

    @property
    def gmacs(self) -> float:
        return self.macs / 1e9

    def file_bytes(self, precision: str = "fp32") -> int:
        bytes_per = {"fp32": 4, "fp16": 2, "int8": 1}[precision]
        return self.params * bytes_per

    def activation_bytes(self, precision: str = "fp32") -> int:
        return self.peak_activation_elements * {"fp32": 4, "fp16": 2, "int8": 1}[precision]


def count_cost(variant: str | VariantSpec, resolution: int | None = None, num_classes: int = 1000) -> ModelCost:
    """Parameters, multiply-adds and peak activation size, computed from the architecture alone."""
    v = get_variant(variant)
    arch = scaled_arch(v)
    res = int(resolution or v.resolution)
    params = macs = 0
    peak = 0

    def conv(cin: int, cout: int, k: int, hw_out: int, groups: int = 1, bias: bool = False) -> None:
        nonlocal params, macs
        w = cout * (cin // groups) * k * k
        params += w + (cout if bias else 0)
        macs += w * hw_out

    def bn(c: int) -> None:
        nonlocal params
        params += 2 * c

    def out_size(size: int, stride: int) -> int:
        return math.ceil(size / stride)  # same as symmetric padding for odd kernels

    h = out_size(res, 2)
    conv(3, arch.stem_channels, 3, h * h)
    bn(arch.stem_channels)
    peak = 3 * res * res + arch.stem_channels * h * h
    for b in arch.blocks:
        hin = h
        h = out_size(h, b.stride)
        if b.block == "ir":
            conv(b.in_channels, b.mid_channels, 1, hin * hin)
            bn(b.mid_channels)
            peak = max(peak, (b.in_channels + b.mid_channels) * hin * hin)
        c = b.mid_channels
        conv(c, c, b.kernel, h * h, groups=c)
        bn(c)
        peak = max(peak, c * hin * hin + c * h * h)
        if b.se_channels:
            conv(c, b.se_channels, 1, 1, bias=True)
            conv(b.se_channels, c, 1, 1, bias=True)
            macs += c * h * h  # the gating multiply
        conv(c, b.out_channels, 1, h * h)
        bn(b.out_channels)
        peak = max(peak, (c + b.out_channels) * h * h)
    conv(arch.blocks[-1].out_channels, arch.head_channels, 1, h * h)
    bn(arch.head_channels)
    if num_classes:
        params += arch.head_channels * num_classes + num_classes
        macs += arch.head_channels * num_classes
    return ModelCost(params=params, macs=macs, peak_activation_elements=peak)
