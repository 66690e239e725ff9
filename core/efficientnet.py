"""Our EfficientNet: B0-B7, Lite0-Lite4 and compound-scaled in-between models from one stage table.

Architecture is data (``core.efficientnet_arch``, re-exported here): ``B0_STAGES`` is the
baseline network and ``VARIANTS`` each named model's (width, depth, resolution, dropout).

Module names follow timm's EfficientNet (``conv_stem``, ``blocks.i.j.conv_pw`` ...) so timm
state dicts load without renaming; the classes here are our own. Named entry points
(``ENTRY_POINTS``) let callers run part of the network: ``forward_from``,
``forward_intermediates`` (timm's idiom), ``forward_between``.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from core.efficientnet_arch import (
    ALPHA,
    B0_STAGES,
    BETA,
    GAMMA,
    HEAD_CHANNELS,
    STEM_CHANNELS,
    VARIANTS,
    BlockSpec,
    Family,
    ModelCost,
    ScaledArch,
    StageSpec,
    UnknownVariantError,
    VariantSpec,
    compound_variant,
    count_cost,
    get_variant,
    make_divisible,
    scaled_arch,
)
from core.staged import StagedModel

Padding = Literal["symmetric", "same"]

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
class EfficientNet(StagedModel):
    """EfficientNet with the transfer-learning API of ``core.staged.StagedModel``.

    ``padding='same'`` and ``bn_eps=1e-3`` reproduce TF-ported weights (tf_* and Lite);
    ``padding='symmetric'`` and ``bn_eps=1e-5`` timm's PyTorch-trained ``efficientnet_b*``.
    """

    stage_names = STAGE_NAMES
    entry_points = ENTRY_POINTS
    parameter_group_names = PARAMETER_GROUPS

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
        self.init_weights()  # timm's (core.staged.StagedModel)

    # -- the parts (core.staged.StagedModel runs, freezes and caches through them) -----------
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

    def group_modules(self) -> dict[str, list[nn.Module]]:
        """Modules per parameter group: 'stem', 'stage0'..'stage6', 'head' (conv_head+bn2), 'classifier'."""
        mods: dict[str, list[nn.Module]] = {"stem": [self.conv_stem, self.bn1]}
        for name, stage in zip(STAGE_NAMES, self.blocks):
            mods[name] = [stage]
        mods["head"] = [self.conv_head, self.bn2]
        mods["classifier"] = [self.classifier]
        return mods


__all__ = [
    # architecture as data (core.efficientnet_arch)
    "ALPHA", "BETA", "GAMMA", "B0_STAGES", "STEM_CHANNELS", "HEAD_CHANNELS", "VARIANTS", "BlockSpec", "Family",
    "ModelCost", "ScaledArch", "StageSpec", "UnknownVariantError", "VariantSpec", "compound_variant", "count_cost",
    "get_variant", "make_divisible", "scaled_arch",
    # entry points and the model
    "NUM_STAGES", "STAGE_NAMES", "ENTRY_POINTS", "PARAMETER_GROUPS", "entry_position", "group_entry", "Padding",
    "Conv2dSame", "conv2d", "BatchNormAct2d", "SqueezeExcite", "drop_path", "MBConv", "DepthwiseSeparable",
    "EfficientNet",
]
