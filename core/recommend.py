"""Hardware-budget recommender: which model (of the registered families) to fine-tune, before any training.

``recommend(budget, profile)`` costs every candidate (named variant x resolution, plus
compound-scaled in-between models) on the target device, checks each against every limit in
the budget, ranks the ones that fit and says why the first one is recommended.

Ranking score (ImageNet top-1 points, higher is better)::

    score = prior_top1(variant, resolution)                         # core/data/accuracy_prior.toml
          - 0.2 x (parameters per training image / 1000)            # small-data rule, below
          - 10   if no pretrained weights are reachable now         # ranked down, never hidden

Small-data rule: fine-tuning a model with many parameters per training image overfits more and
gains less from its extra capacity, so each 1000 parameters per training image costs 0.2 points
(B0, 5.3 M parameters: 0.1 points at 10k images, 1.1 at 1000, 5.3 at 200). It is a stated
heuristic, not a fit. Because it is linear in 1/images, more images never makes the recommender
prefer fewer parameters when the same candidates fit.

Monotonicity: the feasible set only grows when limits are loosened and the choice is the maximum
of a fixed total order (score, then fewer GMACs, then name), so a looser budget never recommends
a lower-scored candidate, nor one that a tighter budget could afford and ranked lower.
"""
from __future__ import annotations

import math
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from functools import lru_cache
from importlib import resources
from typing import Any

from core.devices import PRECISIONS, DeviceProfile, get_profile, load_profiles, run_features
from core.registry import ModelCost, ModelVariant, all_variants, count_cost, families, family_of, get_variant

DATA_PENALTY_PER_KPARAM_PER_IMAGE = 0.2  # top-1 points per 1000 parameters per training image
NO_WEIGHTS_PENALTY = 10.0  # top-1 points; training from scratch on a small dataset is far worse
RESOLUTION_FACTORS = (1.0, 0.857, 0.75)  # candidate resolutions relative to each default
MIN_CANDIDATE_RESOLUTION = 96


class BudgetError(ValueError):
    """A budget value is missing, of the wrong type or out of range."""


# ------------------------------------------------------------------------------------------
# Budget
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Budget:
    """What the model may cost where it will run. ``None`` means "no limit"."""

    device: str = "this-machine"
    latency_ms: float | None = None  # p50 per image, batch 1
    latency_p95_ms: float | None = None
    memory_mb: float | None = None  # peak process memory for inference (weights + activations + runtime)
    size_mb: float | None = None  # model file size at `precision`
    precision: str = "fp32"  # fp32 | fp16 | int8: file size, memory and latency are costed at it
    max_params_m: float | None = None
    max_gmacs: float | None = None
    min_resolution: int | None = None
    train_images: int | None = None  # size of the training set (small data favours small models)
    # The images' useful size (core.image_kind.useful_resolution): no candidate is proposed
    # above it, since a bigger input only upscales the pictures (slower, no new detail).
    max_resolution: int | None = None
    num_classes: int = 1000  # classifier head size, counted in parameters and file size

    def __post_init__(self) -> None:
        if not isinstance(self.device, str) or not self.device:
            raise BudgetError(f"Budget.device must be a profile name, got {self.device!r}.")
        if self.precision not in PRECISIONS:
            raise BudgetError(f"Budget.precision must be one of {list(PRECISIONS)}, got {self.precision!r}.")
        for f in ("latency_ms", "latency_p95_ms", "memory_mb", "size_mb", "max_params_m", "max_gmacs"):
            v = getattr(self, f)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0
                                  or math.isinf(v)):
                raise BudgetError(f"Budget.{f} must be a positive number or None (no limit), got {v!r}.")
        for f in ("min_resolution", "train_images", "num_classes", "max_resolution"):
            v = getattr(self, f)
            if v is None and f != "num_classes":
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise BudgetError(f"Budget.{f} must be a positive integer{' or None' if f != 'num_classes' else ''}, "
                                  f"got {v!r}.")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Budget:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise BudgetError(f"Unknown budget field(s) {sorted(unknown)}; known: {sorted(known)}.")
        clean = {k: v for k, v in data.items() if v is not None or k in ("device",)}
        for k in ("min_resolution", "train_images", "num_classes", "max_resolution"):  # JSON/forms: 224.0, "224"
            v = clean.get(k)
            if isinstance(v, float) and v.is_integer():
                clean[k] = int(v)
            elif isinstance(v, str) and v.strip().isdigit():
                clean[k] = int(v)
        return cls(**clean)


# ------------------------------------------------------------------------------------------
# Candidates
# ------------------------------------------------------------------------------------------
def round32(x: float) -> int:
    return max(32, int(round(x / 32)) * 32)


def default_candidates() -> list[ModelVariant]:
    """Every named variant of every family at its default resolution and at ~0.857x / 0.75x of it
    (multiples of 32 px), plus each family's in-between models (EfficientNet: compound-scaled,
    phi 0.5, 1.5, 2.5 for B; 0.5, 1.5 for Lite)."""
    out: dict[str, ModelVariant] = {}
    for v in all_variants().values():
        for f in RESOLUTION_FACTORS:
            r = v.resolution if f == 1.0 else round32(v.resolution * f)
            if r >= MIN_CANDIDATE_RESOLUTION:
                spec = v.at_resolution(r)
                out[candidate_key(spec)] = spec
    for fam in families():
        for spec in fam.extra_candidates:
            out[candidate_key(spec)] = spec
    return list(out.values())


@lru_cache(maxsize=2048)
def _cost(spec: ModelVariant, resolution: int, num_classes: int) -> ModelCost:
    """count_cost is pure Python over every block: cache it (specs are frozen and hashable)."""
    return count_cost(spec, resolution, num_classes=num_classes)


def cap_resolution(specs: Sequence[ModelVariant], max_resolution: int) -> list[ModelVariant]:
    """Each candidate at no more than ``max_resolution`` px (one per architecture and size)."""
    out: dict[str, ModelVariant] = {}
    for spec in specs:
        if spec.resolution > max_resolution:
            spec = spec.at_resolution(max(MIN_CANDIDATE_RESOLUTION, max_resolution))
        out.setdefault(candidate_key(spec), spec)
    return list(out.values())


def candidate_key(spec: ModelVariant) -> str:
    """'lite0@224', 'b3@256', 'b-phi0.5@248': one name per (architecture, resolution)."""
    return f"{spec.name.split('@')[0]}@{spec.resolution}"


def named_base(spec: ModelVariant) -> str | None:
    """The named variant ``spec`` is (at any resolution): it has pretrained weights."""
    return family_of(spec).named_base(spec)


# ------------------------------------------------------------------------------------------
# Accuracy prior
# ------------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _prior_table() -> dict[str, Any]:
    return tomllib.loads((resources.files("core") / "data" / "accuracy_prior.toml").read_text(encoding="utf-8"))


def _resolution_delta(ratio: float) -> float:
    pts = _prior_table()["resolution"]["points"]
    xs = [math.log(p[0]) for p in pts]
    ys = [float(p[1]) for p in pts]
    x = math.log(ratio)
    if x >= xs[-1]:
        return ys[-1]
    if x <= xs[0]:  # extrapolate below with the first segment's slope
        return ys[0] + (x - xs[0]) * (ys[1] - ys[0]) / (xs[1] - xs[0])
    for i in range(len(xs) - 1):
        if xs[i] <= x <= xs[i + 1]:
            t = (x - xs[i]) / (xs[i + 1] - xs[i])
            return ys[i] + t * (ys[i + 1] - ys[i])
    return 0.0  # unreachable: the loop covers [xs[0], xs[-1]]


def _top1(name: str) -> tuple[float, str]:
    """(ImageNet top-1 %, source) of a named variant: its family's figure, else the prior table's."""
    own = family_of(name).imagenet_top1.get(name)
    if own is not None:
        return own
    row = _prior_table()["variants"][name]
    return float(row["top1"]), str(row["source"])


def accuracy_prior(spec: ModelVariant) -> tuple[float, str]:
    """(approximate ImageNet top-1 %, how it was obtained) for a candidate."""
    family = family_of(spec)
    base = family.named_base(spec)
    if base is not None:
        default_res = family.variants[base].resolution
        top1, source = _top1(base)
        note = f"{source} ({top1:.1f} % at {default_res} px)"
    else:
        # In-between model: interpolate its line's named points over log(GMACs) at default size,
        # the size its family scaled it for (EfficientNet: what compound scaling gives).
        default_res = family.resolution_of(spec)
        pts = sorted((math.log(_cost(v, v.resolution, 1000).macs), _top1(n)[0])
                     for n, v in family.variants.items() if v.family == spec.family)
        x = math.log(_cost(spec, default_res, 1000).macs)
        top1 = _interp(pts, x)
        note = "interpolated over log(GMACs) between named models (approximate)"
    if spec.resolution != default_res:
        delta = _resolution_delta(spec.resolution / default_res)
        top1 += delta
        note += f", {delta:+.1f} for {spec.resolution} px (approximate resolution rule)"
    return round(top1, 2), note


def _interp(pts: Sequence[tuple[float, float]], x: float) -> float:
    if x <= pts[0][0]:
        return pts[0][1]
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x <= x1:
            return y0 + (x - x0) / (x1 - x0) * (y1 - y0) if x1 > x0 else y1
    return pts[-1][1]


# ------------------------------------------------------------------------------------------
# Costs and constraints
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Check:
    """One budget limit applied to one candidate. margin > 0: inside the limit."""

    name: str
    value: float
    limit: float
    unit: str
    kind: str  # "max" (value must be <= limit) or "min" (value must be >= limit)

    @property
    def ok(self) -> bool:
        return self.value <= self.limit if self.kind == "max" else self.value >= self.limit

    @property
    def margin(self) -> float:
        return self.limit - self.value if self.kind == "max" else self.value - self.limit

    @property
    def margin_pct(self) -> float:
        return 100.0 * self.margin / self.limit

    def describe(self) -> str:
        op = "<=" if self.kind == "max" else ">="
        return (f"{self.name} {_fmt(self.value)} {self.unit} (limit {op} {_fmt(self.limit)} {self.unit}, "
                f"margin {self.margin_pct:+.0f} %)")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "value": round(self.value, 4), "limit": self.limit, "unit": self.unit,
                "kind": self.kind, "ok": self.ok, "margin": round(self.margin, 4),
                "margin_pct": round(self.margin_pct, 2)}


def _fmt(x: float) -> str:
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.3g}"


@dataclass(frozen=True)
class Candidate:
    key: str
    base: str | None  # named variant whose pretrained weights apply; None for in-between models
    family: str
    resolution: int
    width: float
    depth: float
    params: int
    gmacs: float
    file_mb: float
    activation_mb: float
    memory_mb: float
    latency_p50_ms: float
    latency_p95_ms: float
    latency_source: str
    prior_top1: float
    prior_note: str
    weights_available: bool
    weights_note: str
    data_penalty: float
    score: float
    checks: tuple[Check, ...] = ()

    @property
    def feasible(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def broken(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]

    def order_key(self) -> tuple[float, float, str]:
        """Total order used for ranking: higher score, then fewer GMACs, then name."""
        return (-self.score, self.gmacs, self.key)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "checks"}
        for k in ("gmacs", "file_mb", "activation_mb", "memory_mb", "latency_p50_ms", "latency_p95_ms",
                  "data_penalty", "score"):
            d[k] = round(d[k], 4)
        d["feasible"] = self.feasible
        d["checks"] = [c.to_dict() for c in self.checks]
        d["broken"] = [c.name for c in self.broken]
        return d


def _weights_lookup(weights: Mapping[str, Any] | None) -> Mapping[str, tuple[bool, str]]:
    if weights is None:
        from core.weights import weights_availability

        weights = weights_availability(check_hub=False)  # local check only: fast and offline
    out: dict[str, tuple[bool, str]] = {}
    for name, st in weights.items():
        if isinstance(st, bool):
            out[name] = (st, "pretrained weights reachable" if st else "no pretrained weights reachable")
        else:  # WeightsStatus
            out[name] = (bool(st.available), st.location)
    return out


def cost_candidate(spec: ModelVariant, budget: Budget, profile: DeviceProfile,
                   weights: Mapping[str, tuple[bool, str]],
                   measured: Mapping[str, Mapping[str, float]] | None = None) -> Candidate:
    key = candidate_key(spec)
    cost = _cost(spec, spec.resolution, budget.num_classes)
    prec = budget.precision
    file_mb = cost.file_bytes(prec) / 2**20
    act_mb = cost.activation_bytes(prec) / 2**20
    memory_mb = file_mb + act_mb + profile.runtime_overhead_mb
    tp = profile.throughput
    m = (measured or {}).get(key)
    if m is not None:
        # Measured fp32 here; other precisions scale the non-overhead part by the profile's speed-up.
        s = tp.speedup[prec]
        p50 = tp.overhead_ms + max(0.0, m["p50_ms"] - tp.overhead_ms) / s
        p95 = tp.overhead_ms + max(0.0, m.get("p95_ms", m["p50_ms"] * tp.p95_ratio) - tp.overhead_ms) / s
        source = "measured (ONNX Runtime)" if prec == "fp32" else f"measured fp32, scaled by assumed {prec} speed-up"
    else:
        p50 = tp.predict_ms(run_features(spec, spec.resolution), prec)
        p95 = p50 * tp.p95_ratio
        source = f"predicted ({profile.name} throughput model)"
    top1, note = accuracy_prior(spec)
    base = named_base(spec)
    if base is None:
        w_ok, w_note = False, "in-between compound-scaled model: no pretrained weights exist (trains from scratch)"
    else:
        w_ok, w_note = weights.get(base, (False, f"weights for {base} not checked"))
    penalty = 0.0
    if budget.train_images:
        penalty = DATA_PENALTY_PER_KPARAM_PER_IMAGE * cost.params / budget.train_images / 1000
    score = top1 - penalty - (0.0 if w_ok else NO_WEIGHTS_PENALTY)

    checks: list[Check] = []
    b = budget
    if b.latency_ms is not None:
        checks.append(Check("latency_p50_ms", p50, b.latency_ms, "ms", "max"))
    if b.latency_p95_ms is not None:
        checks.append(Check("latency_p95_ms", p95, b.latency_p95_ms, "ms", "max"))
    if b.memory_mb is not None:
        checks.append(Check("memory_mb", memory_mb, b.memory_mb, "MB", "max"))
    checks.append(Check("device_memory_mb", memory_mb, profile.memory_mb, "MB", "max"))
    if b.size_mb is not None:
        checks.append(Check("size_mb", file_mb, b.size_mb, "MB", "max"))
    if b.max_params_m is not None:
        checks.append(Check("params_m", cost.params / 1e6, b.max_params_m, "M", "max"))
    if b.max_gmacs is not None:
        checks.append(Check("gmacs", cost.gmacs, b.max_gmacs, "GMACs", "max"))
    if b.min_resolution is not None:
        checks.append(Check("min_resolution", spec.resolution, b.min_resolution, "px", "min"))
    # width/depth: scaling coefficients over the family's base network (1.0 for a family without them).
    width, depth = float(getattr(spec, "width", 1.0)), float(getattr(spec, "depth", 1.0))
    return Candidate(key, base, spec.family, spec.resolution, width, depth, cost.params, cost.gmacs,
                     file_mb, act_mb, memory_mb, p50, p95, source, top1, note, w_ok, w_note, penalty, score,
                     tuple(checks))


# ------------------------------------------------------------------------------------------
# The answer
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Recommendation:
    budget: Budget
    device: str
    device_description: str
    ranked: tuple[Candidate, ...]  # feasible, best first
    excluded: tuple[Candidate, ...]  # infeasible, each with .broken naming its constraint(s)
    recommended: Candidate | None
    reason: str  # one sentence
    message: str  # for an impossible budget: closest candidate and what it would need
    notes: tuple[str, ...] = field(default=())

    @property
    def feasible(self) -> bool:
        return self.recommended is not None

    def to_dict(self) -> dict[str, Any]:
        return {
            "budget": self.budget.to_dict(),
            "device": self.device,
            "device_description": self.device_description,
            "recommended": self.recommended.to_dict() if self.recommended else None,
            "reason": self.reason,
            "message": self.message,
            "ranked": [c.to_dict() for c in self.ranked],
            "excluded": [c.to_dict() for c in self.excluded],
            "notes": list(self.notes),
        }


def _closest(excluded: Iterable[Candidate]) -> Candidate | None:
    """The infeasible candidate that needs the smallest relaxation (sum of log overshoots)."""
    def overshoot(c: Candidate) -> tuple[float, float, str]:
        total = sum(abs(math.log(max(ch.value, 1e-9) / ch.limit)) for ch in c.broken)
        return (total, -c.score, c.key)

    ex = list(excluded)
    return min(ex, key=overshoot) if ex else None


def recommend(budget: Budget | Mapping[str, Any], profile: DeviceProfile | str | None = None,
              candidates: Sequence[ModelVariant | str] | None = None,
              weights: Mapping[str, Any] | None = None,
              measured: Mapping[str, Mapping[str, float]] | None = None) -> Recommendation:
    """Rank every candidate for ``budget`` on ``profile`` (default: the profile named by budget.device).

    ``weights``: {variant: WeightsStatus or bool}; default: what is reachable locally now.
    ``measured``: {candidate key: {"p50_ms", "p95_ms"}} real fp32 measurements on this device,
    used instead of the throughput model for those candidates.
    """
    if not isinstance(budget, Budget):
        budget = Budget.from_dict(budget)
    if profile is None or isinstance(profile, str):
        profile = get_profile(profile or budget.device, load_profiles())
    specs = [get_variant(c) if isinstance(c, str) else c for c in (candidates or default_candidates())]
    if budget.max_resolution is not None:
        specs = cap_resolution(specs, budget.max_resolution)
    wl = _weights_lookup(weights)
    costed = [cost_candidate(s, budget, profile, wl, measured) for s in specs]
    ranked = sorted((c for c in costed if c.feasible), key=Candidate.order_key)
    excluded = sorted((c for c in costed if not c.feasible), key=Candidate.order_key)
    notes = []
    if budget.latency_ms is None and budget.latency_p95_ms is None:
        notes.append("No latency limit given: only memory, size and compute limits apply.")
    if not any(c.weights_available for c in costed):
        notes.append("No pretrained weights are reachable for any candidate: every model would train from scratch.")
    if profile.measured and not profile.calibration and not measured:
        notes.append(f"{profile.name} has no measurements yet: latencies come from an uncalibrated default model "
                     "(run with --measure, or `workbench calibrate`).")

    if ranked:
        best = ranked[0]
        tight = min(best.checks, key=lambda ch: ch.margin_pct) if best.checks else None
        why = [f"expected ImageNet top-1 {best.prior_top1:.1f} %"]
        if best.data_penalty >= 0.05:
            why.append(f"{best.data_penalty:.1f} points small-data penalty for {budget.train_images} training images")
        if not best.weights_available:
            why.append("no pretrained weights reachable, so it trains from scratch")
        reason = (f"{best.key} ranks first of the {len(ranked)} candidates that fit {profile.name} "
                  f"({'; '.join(why)})" + (f", with the least room on {tight.name} ({tight.margin_pct:+.0f} %)."
                                           if tight else "."))
        message = ""
    else:
        best = None
        reason = ""
        close = _closest(excluded)
        if close is None:
            message = "No candidates to rank."
        else:
            needs = ", ".join(
                f"{ch.name} {'<=' if ch.kind == 'max' else '>='} {_fmt(ch.value)} {ch.unit} (budget {_fmt(ch.limit)})"
                for ch in close.broken)
            message = (f"No candidate fits this budget on {profile.name}. Closest: {close.key} "
                       f"(expected top-1 {close.prior_top1:.1f} %), which would need {needs}.")
    return Recommendation(budget, profile.name, profile.description, tuple(ranked), tuple(excluded), best, reason,
                          message, tuple(notes))


def format_table(rec: Recommendation, top: int = 10) -> str:
    """Plain-text report for the CLI."""
    lines = [f"Device: {rec.device} - {rec.device_description}"]
    b = rec.budget
    limits = [f"{k}={v}" for k, v in b.to_dict().items() if v is not None and k != "device"]
    lines.append("Budget: " + ", ".join(limits))
    lines.append("")
    if rec.recommended:
        lines.append(f"Recommended: {rec.recommended.key}")
        lines.append(f"  {rec.reason}")
    else:
        lines.append(rec.message)
    lines.append("")
    hdr = (f"{'#':>3} {'candidate':<16} {'top1%':>6} {'score':>6} {'params':>7} {'GMACs':>6} {'p50 ms':>8} "
           f"{'mem MB':>7} {'file MB':>7} {'weights':>7}  tightest margin")
    if rec.ranked:
        lines.append(f"Feasible ({len(rec.ranked)}), best first:")
        lines.append(hdr)
        for i, c in enumerate(rec.ranked[:top], 1):
            tight = min(c.checks, key=lambda ch: ch.margin_pct)
            measured = "m" if c.latency_source.startswith("measured") else " "
            lines.append(f"{i:>3} {c.key:<16} {c.prior_top1:>6.1f} {c.score:>6.1f} {c.params / 1e6:>6.1f}M "
                         f"{c.gmacs:>6.2f} {c.latency_p50_ms:>7.1f}{measured} {c.memory_mb:>7.0f} {c.file_mb:>7.1f} "
                         f"{'yes' if c.weights_available else 'NO':>7}  {tight.name} {tight.margin_pct:+.0f} %")
        if len(rec.ranked) > top:
            lines.append(f"    ... {len(rec.ranked) - top} more (use --top or --json)")
    lines.append("")
    lines.append(f"Excluded ({len(rec.excluded)}):")
    for c in rec.excluded[:top]:
        lines.append(f"    {c.key:<16} breaks " + "; ".join(ch.describe() for ch in c.broken))
    if len(rec.excluded) > top:
        lines.append(f"    ... {len(rec.excluded) - top} more (use --top or --json)")
    if any(c.latency_source.startswith("measured") for c in rec.ranked[:top]):
        lines.append("p50 ms marked m: measured with ONNX Runtime on this machine; others predicted.")
    for n in rec.notes:
        lines.append(f"Note: {n}")
    return "\n".join(lines)


__all__ = ["Budget", "BudgetError", "Candidate", "Check", "Recommendation", "accuracy_prior", "candidate_key",
           "cap_resolution",
           "cost_candidate", "default_candidates", "format_table", "recommend"]
