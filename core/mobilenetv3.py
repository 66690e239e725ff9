"""Our MobileNetV3 (Large and Small, width 1.0 and 0.75) built from its stage table.

Architecture is data (``core.mobilenetv3_arch``). Module names follow timm's ``mobilenetv3_*``
(``conv_stem``, ``blocks.i.j.conv_pw``, ``conv_head`` ...) so a timm state dict loads without
renaming; the classes are ours, the block bodies EfficientNet's (``core.efficientnet``) with
timm's MobileNetV3 squeeze-excitation (ReLU, then a hard-sigmoid gate).

Entry points, input to output: "image", "stage0".. (the input of each bottleneck stage),
"head" (the input of the last 1x1 conv), "features" (the last feature map, what Grad-CAM looks
at), "embedding" (pooled, then timm's ``conv_head`` + hard-swish: MobileNetV3 pools *before*
its head conv), "logits". Parameter groups: "stem", "stage0"..,
"head" (the last 1x1 conv and ``conv_head``), "classifier".

Weights: a timm checkpoint per named variant (``core.mobilenetv3_arch.TIMM_CHECKPOINTS``, on the
Hugging Face hub), or a local .pth / .safetensors file, found and loaded by ``core.weights`` like
every family's.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import nn

from core.efficientnet import BatchNormAct2d, DepthwiseSeparable, MBConv, Padding, SqueezeExcite, conv2d
from core.mobilenetv3_arch import Activation, MobileBlockSpec, VariantSpec, get_variant, scaled_arch
from core.staged import StagedModel

ACTIVATIONS: dict[Activation, type[nn.Module]] = {"RE": nn.ReLU, "HS": nn.Hardswish}


# --------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------
class HardSqueezeExcite(SqueezeExcite):
    """timm's MobileNetV3 squeeze-excitation: always ReLU inside, a hard-sigmoid gate."""

    def __init__(self, channels: int, squeeze_channels: int):
        super().__init__(channels, squeeze_channels, nn.ReLU)
        self.gate = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.conv_expand(self.act1(self.conv_reduce(x.mean((2, 3), keepdim=True))))
        return x * self.gate(s)


def _with_hard_se(block: MBConv | DepthwiseSeparable, spec: MobileBlockSpec) -> None:
    if spec.se_channels:
        block.se = HardSqueezeExcite(spec.mid_channels, spec.se_channels)


class InvertedResidual(MBConv):
    """1x1 expand, depthwise, optional squeeze-excitation, 1x1 project, residual."""

    def __init__(self, spec: MobileBlockSpec, bn_eps: float, padding: Padding, drop_path_rate: float):
        # EfficientNet's block body, built without its SiLU/sigmoid SE; then timm's MobileNetV3 SE.
        super().__init__(replace(spec, se_channels=0), ACTIVATIONS[spec.act], bn_eps, padding, drop_path_rate)
        _with_hard_se(self, spec)


class DepthwiseSeparableBlock(DepthwiseSeparable):
    """The first block (expansion 1): depthwise, optional squeeze-excitation, 1x1 project."""

    def __init__(self, spec: MobileBlockSpec, bn_eps: float, padding: Padding, drop_path_rate: float):
        super().__init__(replace(spec, se_channels=0), ACTIVATIONS[spec.act], bn_eps, padding, drop_path_rate)
        _with_hard_se(self, spec)


class ConvBnAct(nn.Module):
    """The 1x1 conv + BN + hard-swish on the last feature map (timm's ``cn`` block)."""

    def __init__(self, in_channels: int, out_channels: int, bn_eps: float, padding: Padding):
        super().__init__()
        self.conv = conv2d(in_channels, out_channels, 1, padding=padding)
        self.bn1 = BatchNormAct2d(out_channels, nn.Hardswish, bn_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn1(self.conv(x))


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------
class MobileNetV3(StagedModel):
    """MobileNetV3 with the transfer-learning API of ``core.staged``.

    ``padding='same'`` and ``bn_eps=1e-3`` reproduce TF-ported weights (timm's tf_*);
    ``padding='symmetric'`` and ``bn_eps=1e-5`` timm's PyTorch-trained ``mobilenetv3_*``.
    """

    def __init__(
        self,
        variant: str | VariantSpec = "mobilenetv3-large-100",
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
        self.drop_rate = self.variant.dropout if drop_rate is None else drop_rate
        self.stage_names = tuple(f"stage{i}" for i in range(self.arch.num_stages))
        self.entry_points = ("image", *self.stage_names, "head", "features", "embedding", "logits")
        self.parameter_group_names = ("stem", *self.stage_names, "head", "classifier")

        self.conv_stem = conv2d(3, self.arch.stem_channels, 3, 2, padding=padding)
        self.bn1 = BatchNormAct2d(self.arch.stem_channels, nn.Hardswish, bn_eps)
        n_blocks = len(self.arch.blocks) + 1  # timm counts the last 1x1 conv as a block
        stages: list[list[nn.Module]] = [[] for _ in self.stage_names]
        for idx, spec in enumerate(self.arch.blocks):
            dpr = drop_path_rate * idx / n_blocks  # stochastic depth rises with the block index
            cls = DepthwiseSeparableBlock if spec.block == "ds" else InvertedResidual
            stages[spec.stage].append(cls(spec, bn_eps, padding, dpr))
        stages.append([ConvBnAct(self.arch.blocks[-1].out_channels, self.arch.last_channels, bn_eps, padding)])
        self.blocks = nn.Sequential(*(nn.Sequential(*s) for s in stages))
        self.conv_head = nn.Conv2d(self.arch.last_channels, self.arch.head_hidden, 1, bias=True)
        self.act2 = nn.Hardswish(inplace=True)
        self.feature_channels = self.arch.last_channels  # channels of the "features" map
        self.num_features = self.arch.head_hidden  # timm's head_hidden_size: the classifier's input
        self.num_classes = num_classes
        self.classifier: nn.Module = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()
        self.init_weights()

    def _run_segment(self, entry: str, x: torch.Tensor) -> torch.Tensor:
        if entry == "image":
            return self.bn1(self.conv_stem(x))
        if entry in self.stage_names:
            return self.blocks[self.stage_names.index(entry)](x)
        if entry == "head":
            return self.blocks[len(self.stage_names)](x)
        if entry == "features":
            return self.pool(x)
        if entry == "embedding":
            return self.forward_head(x)
        raise ValueError(f"Nothing runs after {entry!r}")

    def pool(self, features: torch.Tensor) -> torch.Tensor:
        """The embedding of a feature map: global average, then conv_head and hard-swish."""
        return self.act2(self.conv_head(features.mean((2, 3), keepdim=True))).flatten(1)

    def group_modules(self) -> dict[str, list[nn.Module]]:
        mods: dict[str, list[nn.Module]] = {"stem": [self.conv_stem, self.bn1]}
        for i, name in enumerate(self.stage_names):
            mods[name] = [self.blocks[i]]
        mods["head"] = [self.blocks[len(self.stage_names)], self.conv_head]
        mods["classifier"] = [self.classifier]
        return mods

    def group_state_prefixes(self, groups: Sequence[str]) -> tuple[str, ...]:
        n = len(self.stage_names)
        table = {"stem": ("conv_stem.", "bn1."), "head": (f"blocks.{n}.", "conv_head."),
                 "classifier": ("classifier.",), **{name: (f"blocks.{i}.",) for i, name in enumerate(self.stage_names)}}
        return tuple(prefix for g in groups for prefix in table[g])


__all__ = [
    "ACTIVATIONS", "HardSqueezeExcite", "InvertedResidual", "DepthwiseSeparableBlock", "ConvBnAct", "MobileNetV3",
]
