"""The MobileNetV3 family's registry record: names, network, weights, conventions and cost model.

The architecture is data in ``core.mobilenetv3_arch`` (Howard et al. 2019, tables 1 and 2); the
network is ``core.mobilenetv3`` (imported only when a network is built, so this record stays
torch-free). Weights come from timm's hub checkpoints (cached, or reachable) or a local file,
never random without being asked, like the non-Lite EfficientNets.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Any

from core.mobilenetv3_arch import TIMM_CHECKPOINTS, VARIANTS, VariantSpec, count_cost, get_variant, scaled_arch
from core.preprocessing import IMAGENET_MEAN, IMAGENET_STD, TF_MEAN, TF_STD
from core.registry import Conventions, ModelFamily, Padding, UnknownVariantError, WeightCatalogue, register_family

# ImageNet top-1 of the published models (Howard et al. 2019, "Searching for MobileNetV3", table 3).
IMAGENET_TOP1: dict[str, tuple[float, str]] = {
    "mobilenetv3-large-100": (75.2, "Howard et al. 2019, table 3"),
    "mobilenetv3-large-075": (73.3, "Howard et al. 2019, table 3"),
    "mobilenetv3-small-100": (67.4, "Howard et al. 2019, table 3"),
    "mobilenetv3-small-075": (65.4, "Howard et al. 2019, table 3"),
}


def _parse(name: str) -> VariantSpec | None:
    """The spec of a MobileNetV3 name ('mobilenetv3-small-075', '...@160'); None for other names."""
    if str(name).strip().lower().partition("@")[0].replace("_", "-") not in VARIANTS:
        return None
    try:
        return get_variant(name)
    except ValueError as e:  # ours but malformed ('mobilenetv3-large-100@abc')
        raise UnknownVariantError(str(e)) from None


def _build(spec: VariantSpec, num_classes: int, padding: Padding, bn_eps: float, drop_path_rate: float) -> Any:
    from core.mobilenetv3 import MobileNetV3

    return MobileNetV3(spec, num_classes, padding, bn_eps, drop_path_rate=drop_path_rate)


def _conventions(spec: VariantSpec) -> Conventions:
    # A TensorFlow port (timm's tf_*) was trained with TF "same" padding, TF's BN eps and inputs in [-1, 1].
    if TIMM_CHECKPOINTS[spec.name.split("@")[0]].startswith("tf_"):
        return Conventions("same", 1e-3, TF_MEAN, TF_STD)
    return Conventions("symmetric", 1e-5, IMAGENET_MEAN, IMAGENET_STD)


@lru_cache(maxsize=256)
def traffic_elements(variant: VariantSpec, resolution: int) -> int:
    """Activation elements an ONNX Runtime forward pass writes outside fused convolutions.

    BatchNorm folds into the conv and ReLU fuses with it; hard-swish is HardSigmoid + Mul (two
    more tensors), and squeeze-excitation reads the tensor for the pool and writes the gated copy.
    """
    arch = scaled_arch(variant)

    def act(kind: str) -> int:
        return 2 if kind == "hs" else 0

    h = math.ceil(resolution / 2)
    total = 3 * resolution * resolution + arch.stem_channels * h * h * (1 + 2)
    for b in arch.blocks:
        hin, h = h, math.ceil(h / b.stride)
        if b.block == "ir":
            total += b.mid_channels * hin * hin * (1 + act(b.act))
        total += b.mid_channels * h * h * (1 + act(b.act))
        if b.se_channels:
            total += 2 * b.mid_channels * h * h  # pool read + gated copy
        total += b.out_channels * h * h * (2 if b.has_skip else 1)  # projection (+ residual add)
    return total + arch.last_channels * h * h * 3 + arch.head_hidden * 3


MOBILENETV3 = register_family(ModelFamily(
    name="mobilenetv3",
    title="MobileNetV3",
    spec_type=VariantSpec,
    variants=VARIANTS,
    parse=_parse,
    name_help="'mobilenetv3-large-100@192' (another input size)",
    build=_build,
    num_stages=lambda spec: scaled_arch(spec).num_stages,
    conventions=_conventions,
    weights=WeightCatalogue(TIMM_CHECKPOINTS),
    count_cost=count_cost,
    traffic_elements=traffic_elements,
    imagenet_top1=IMAGENET_TOP1,
))
