"""Device profiles: where a model will run and how fast it runs there.

A profile is data (``core/data/devices.toml``, extended by user TOML/JSON files) with a small
throughput model, calibrated from published figures or measured on the machine itself:

    latency_ms = overhead_ms + (GMACs / gmacs_per_s * 1e3 + traffic_GB / bandwidth_gb_s * 1e3) / speedup[precision]

``traffic_GB`` is the activation memory a forward pass writes and reads (computed here from the
architecture): it is what makes an SE/SiLU B-model slower than a Lite model of the same MACs.
``workbench calibrate`` measures ONNX Runtime latency for a few models on the target machine
and fits (overhead, 1/compute, 1/bandwidth) by non-negative least squares on relative error.

This module never imports storage or the UI: measurements are cached through any object with
``get(key) -> dict | None`` and ``put(key, dict)`` (``LatencyCache``).
"""
from __future__ import annotations

import json
import os
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from core.registry import ModelVariant, count_cost, create_model, get_variant, traffic_elements

PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "int8")
BYTES_PER: dict[str, int] = {"fp32": 4, "fp16": 2, "int8": 1}
BUILTIN_DEVICES_FILE = "devices.toml"
DEVICES_ENV = "WORKBENCH_DEVICES"

# Fixed calibration set: both families (B has SE + SiLU, Lite neither) and sizes from 0.2 to
# 2.1 GMACs, so the fit can separate the per-inference overhead, the MAC term and the
# activation-traffic term, and interpolates rather than extrapolates over B0-B3 / Lite0-Lite3.
CALIBRATION_SET: tuple[str, ...] = ("lite0@160", "lite0@224", "b0@224", "b1@240", "b3@320")


class ProfileError(ValueError):
    """A device profile file or entry is malformed; the message names file, profile and field."""


# ------------------------------------------------------------------------------------------
# What a candidate costs to run (architecture only)
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunFeatures:
    gmacs: float
    traffic_gb: float  # activation bytes written + read per fp32 inference at batch 1, in GB

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def run_features(variant: str | ModelVariant, resolution: int | None = None) -> RunFeatures:
    v = get_variant(variant)
    res = int(resolution or v.resolution)
    return _run_features(v.at_resolution(res), res)


@lru_cache(maxsize=1024)
def _run_features(v: ModelVariant, res: int) -> RunFeatures:
    gmacs = count_cost(v, res).gmacs
    # x2: every written element is read at least once by the next op; x4 bytes at fp32 (the
    # family's cost model counts the activation elements a forward pass writes).
    traffic = traffic_elements(v, res) * 2 * 4 / 1e9
    return RunFeatures(gmacs=gmacs, traffic_gb=traffic)


# ------------------------------------------------------------------------------------------
# Throughput model and profiles
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ThroughputModel:
    overhead_ms: float
    gmacs_per_s: float
    bandwidth_gb_s: float | None  # None: no separate memory term (folded into gmacs_per_s)
    speedup: Mapping[str, float]  # per precision, relative to fp32
    p95_ratio: float = 1.15  # p95 / p50 when not measured

    def predict_ms(self, feats: RunFeatures, precision: str = "fp32") -> float:
        work = feats.gmacs / self.gmacs_per_s * 1e3
        if self.bandwidth_gb_s:
            work += feats.traffic_gb / self.bandwidth_gb_s * 1e3
        return self.overhead_ms + work / self.speedup[precision]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["speedup"] = dict(self.speedup)
        return d


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    description: str
    kind: str  # cpu | gpu | npu (informational)
    memory_mb: float  # memory one model process may use on the device
    runtime_overhead_mb: float  # inference runtime + input buffers, added to every estimate
    throughput: ThroughputModel
    sources: tuple[str, ...] = ()
    measured: bool = False  # True: back predictions with ONNX Runtime measurements here
    calibration: tuple[dict[str, Any], ...] = ()  # the points a calibrated profile was fitted to
    origin: str = "built-in"

    def predict_ms(self, variant: str | ModelVariant, resolution: int | None = None,
                   precision: str = "fp32") -> float:
        return self.throughput.predict_ms(run_features(variant, resolution), precision)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "description": self.description, "kind": self.kind,
            "memory_mb": self.memory_mb, "runtime_overhead_mb": self.runtime_overhead_mb,
            "throughput": self.throughput.to_dict(), "sources": list(self.sources),
            "measured": self.measured, "calibration": [dict(c) for c in self.calibration],
            "origin": self.origin,
        }


_REQUIRED: dict[str, type | tuple[type, ...]] = {
    "description": str, "kind": str, "memory_mb": (int, float), "runtime_overhead_mb": (int, float),
    "throughput": dict,
}
_THROUGHPUT_REQUIRED: dict[str, type | tuple[type, ...]] = {"overhead_ms": (int, float), "gmacs_per_s": (int, float),
                                                            "speedup": dict}
_KNOWN = set(_REQUIRED) | {"sources", "measured", "calibration", "name", "origin"}
_THROUGHPUT_KNOWN = set(_THROUGHPUT_REQUIRED) | {"bandwidth_gb_s", "p95_ratio"}


def _type_name(t: type | tuple[type, ...]) -> str:
    if isinstance(t, tuple):
        return "a number" if float in t else " or ".join(x.__name__ for x in t)
    return {str: "a string", dict: "a table", list: "a list", bool: "true/false"}.get(t, t.__name__)


def _check(cond: bool, where: str, field_: str, expected: str, got: Any) -> None:
    if not cond:
        raise ProfileError(f"{where}: field '{field_}' must be {expected}, got {got!r}.")


def profile_from_dict(name: str, data: Mapping[str, Any], origin: str = "built-in") -> DeviceProfile:
    """Validate one profile entry; every error names the file, the profile and the field."""
    where = f"{origin}: profile '{name}'"
    if not isinstance(data, Mapping):
        raise ProfileError(f"{where}: expected a table of fields, got {type(data).__name__}.")
    unknown = set(data) - _KNOWN
    if unknown:
        raise ProfileError(f"{where}: unknown field(s) {sorted(unknown)}; known fields: {sorted(_KNOWN)}.")
    for key, typ in _REQUIRED.items():
        if key not in data:
            raise ProfileError(f"{where}: missing required field '{key}' ({_type_name(typ)}).")
        ok = isinstance(data[key], typ) and not isinstance(data[key], bool)
        _check(ok, where, key, _type_name(typ), data[key])
    _check(data["memory_mb"] > 0, where, "memory_mb", "a positive number of MB", data["memory_mb"])
    _check(data["runtime_overhead_mb"] >= 0, where, "runtime_overhead_mb", "a number >= 0",
           data["runtime_overhead_mb"])
    tp = data["throughput"]
    unknown = set(tp) - _THROUGHPUT_KNOWN
    if unknown:
        raise ProfileError(f"{where}: unknown field(s) {sorted('throughput.' + u for u in unknown)}; "
                           f"known: {sorted('throughput.' + k for k in _THROUGHPUT_KNOWN)}.")
    for key, typ in _THROUGHPUT_REQUIRED.items():
        if key not in tp:
            raise ProfileError(f"{where}: missing required field 'throughput.{key}' ({_type_name(typ)}).")
        _check(isinstance(tp[key], typ) and not isinstance(tp[key], bool), where, f"throughput.{key}",
               _type_name(typ), tp[key])
    _check(tp["overhead_ms"] >= 0, where, "throughput.overhead_ms", "a number >= 0", tp["overhead_ms"])
    _check(tp["gmacs_per_s"] > 0, where, "throughput.gmacs_per_s", "a positive number (GMAC/s)",
           tp["gmacs_per_s"])
    bw = tp.get("bandwidth_gb_s")
    _check(bw is None or (isinstance(bw, (int, float)) and not isinstance(bw, bool) and bw > 0), where,
           "throughput.bandwidth_gb_s", "a positive number (GB/s) or absent", bw)
    p95 = tp.get("p95_ratio", 1.15)
    _check(isinstance(p95, (int, float)) and not isinstance(p95, bool) and p95 >= 1, where, "throughput.p95_ratio",
           "a number >= 1", p95)
    speed = tp["speedup"]
    for p in PRECISIONS:
        if p not in speed:
            raise ProfileError(f"{where}: missing 'throughput.speedup.{p}' (a positive number: speed-up of "
                               f"{p} over fp32; use 1.0 if unknown). Needed precisions: {list(PRECISIONS)}.")
        v = speed[p]
        _check(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0, where,
               f"throughput.speedup.{p}", "a positive number", v)
    extra = set(speed) - set(PRECISIONS)
    if extra:
        raise ProfileError(f"{where}: unknown precision(s) {sorted(extra)} in 'throughput.speedup'; "
                           f"expected {list(PRECISIONS)}.")
    sources = data.get("sources", [])
    _check(isinstance(sources, list) and all(isinstance(s, str) for s in sources), where, "sources",
           "a list of strings", sources)
    measured = data.get("measured", False)
    _check(isinstance(measured, bool), where, "measured", "true or false", measured)
    calibration = data.get("calibration", [])
    _check(isinstance(calibration, list) and all(isinstance(c, dict) for c in calibration), where,
           "calibration", "a list of tables", calibration)
    model = ThroughputModel(float(tp["overhead_ms"]), float(tp["gmacs_per_s"]),
                            float(bw) if bw is not None else None,
                            {p: float(speed[p]) for p in PRECISIONS}, float(p95))
    return DeviceProfile(name, data["description"], data["kind"], float(data["memory_mb"]),
                         float(data["runtime_overhead_mb"]), model, tuple(sources), measured,
                         tuple(calibration), origin)


def _read_profile_file(path: Path) -> dict[str, dict[str, Any]]:
    """Raw profile tables from a TOML file ([name] tables) or a calibration JSON (one profile)."""
    if not path.is_file():
        raise ProfileError(f"{path}: device profile file not found.")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ProfileError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}).") from exc
        if not isinstance(data, dict):
            raise ProfileError(f"{path}: expected a JSON object describing one profile, got {type(data).__name__}.")
        if "profiles" in data:  # several profiles in one JSON file
            profiles = data["profiles"]
            if not isinstance(profiles, dict):
                raise ProfileError(f"{path}: 'profiles' must be an object of name -> profile.")
            return profiles
        name = data.get("name")
        if not isinstance(name, str) or not name:
            raise ProfileError(f"{path}: missing field 'name' (a string naming the profile).")
        return {name: {k: v for k, v in data.items()}}
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"{path}: not valid TOML ({exc}).") from exc
    profiles = data.get("profiles", data)
    for name, entry in profiles.items():
        if not isinstance(entry, dict):
            raise ProfileError(f"{path}: '{name}' must be a table ([profiles.{name}]), got {type(entry).__name__}.")
    return profiles


def _merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out


def load_profiles(*paths: str | Path | None, use_env: bool = True) -> dict[str, DeviceProfile]:
    """Built-in profiles, then files in ``WORKBENCH_DEVICES`` (os.pathsep-separated), then ``paths``.

    A later entry with an existing name is merged field by field over the earlier one (so a user
    file may override only ``memory_mb``); a new name must be complete.
    """
    raw: dict[str, dict[str, Any]] = {}
    origins: dict[str, str] = {}
    builtin = resources.files("core") / "data" / BUILTIN_DEVICES_FILE
    files: list[Path] = [Path(str(builtin))]
    if use_env and os.environ.get(DEVICES_ENV):
        files += [Path(p).expanduser() for p in os.environ[DEVICES_ENV].split(os.pathsep) if p]
    files += [Path(p).expanduser() for p in paths if p]
    for f in files:
        for name, entry in _read_profile_file(f).items():
            entry = {k: v for k, v in entry.items() if k not in ("name", "origin")}
            raw[name] = _merge(raw[name], entry) if name in raw else dict(entry)
            origins[name] = str(f)
    return {name: profile_from_dict(name, entry, origins[name]) for name, entry in raw.items()}


def get_profile(name: str, profiles: Mapping[str, DeviceProfile] | None = None) -> DeviceProfile:
    profiles = profiles if profiles is not None else load_profiles()
    if name not in profiles:
        raise ProfileError(f"Unknown device profile {name!r}. Known profiles: {', '.join(sorted(profiles))}.")
    return profiles[name]


def load_profile_file(path: str | Path) -> DeviceProfile:
    """The single profile in a calibration JSON (or the only one in a TOML file)."""
    path = Path(path)
    entries = _read_profile_file(path)
    if len(entries) != 1:
        raise ProfileError(f"{path}: expected exactly one profile, found {len(entries)}: {sorted(entries)}.")
    (name, entry), = entries.items()
    return profile_from_dict(name, {k: v for k, v in entry.items() if k not in ("name", "origin")}, str(path))


def save_profile_json(profile: DeviceProfile, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    d = profile.to_dict()
    d.pop("origin", None)
    path.write_text(json.dumps(d, indent=2) + "\n", encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------
# Fitting the throughput model to measurements
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LatencyPoint:
    key: str  # 'lite0@224'
    p50_ms: float
    p95_ms: float


def _nnls_relative(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Non-negative least squares of x @ c ~ y on relative error (rows weighted by 1/y)."""
    from scipy.optimize import nnls

    w = 1.0 / y
    coef, _ = nnls(x * w[:, None], y * w)
    return coef


def fit_throughput(points: Sequence[LatencyPoint], speedup: Mapping[str, float] | None = None) -> ThroughputModel:
    """Fit overhead, MAC and traffic terms to fp32 batch-1 measurements (>= 1 point).

    With fewer than 3 distinct points the model drops terms (2 points: overhead + MACs;
    1 point: MACs only) rather than fitting an underdetermined system.
    """
    if not points:
        raise ValueError("fit_throughput needs at least one measured point.")
    feats = [run_features(p.key) for p in points]
    y = np.array([p.p50_ms for p in points], dtype=float)
    cols = [np.ones(len(points)), np.array([f.gmacs for f in feats]), np.array([f.traffic_gb for f in feats])]
    n_terms = min(3, len({p.key for p in points}))
    use = [1] if n_terms == 1 else [0, 1] if n_terms == 2 else [0, 1, 2]
    coef_used = _nnls_relative(np.stack([cols[i] for i in use], 1), y)
    coef = np.zeros(3)
    coef[use] = coef_used
    overhead, ms_per_gmac, ms_per_gb = (float(c) for c in coef)
    if ms_per_gmac <= 0:  # everything explained by traffic: keep a (slow) compute term defined
        ms_per_gmac = 1e-6
    p95 = float(np.median([p.p95_ms / p.p50_ms for p in points]))
    return ThroughputModel(
        overhead_ms=round(float(overhead), 4),
        gmacs_per_s=float(1e3 / ms_per_gmac),
        bandwidth_gb_s=float(1e3 / ms_per_gb) if ms_per_gb > 0 else None,
        speedup=dict(speedup or {"fp32": 1.0, "fp16": 1.0, "int8": 1.0}),
        p95_ratio=max(1.0, p95),
    )


# ------------------------------------------------------------------------------------------
# Measuring with ONNX Runtime (the one latency timer is core.latency.measure_latency)
# ------------------------------------------------------------------------------------------
class LatencyCache(Protocol):
    def get(self, key: str) -> dict[str, Any] | None: ...
    def put(self, key: str, value: dict[str, Any]) -> None: ...


class DictCache:
    """In-memory LatencyCache (tests, one-off calibrations)."""

    def __init__(self) -> None:
        self.data: dict[str, dict[str, Any]] = {}

    def get(self, key: str) -> dict[str, Any] | None:
        return self.data.get(key)

    def put(self, key: str, value: dict[str, Any]) -> None:
        self.data[key] = dict(value)


def cache_key(candidate_key: str, precision: str = "fp32", batch: int = 1) -> str:
    return f"{candidate_key}/{precision}/b{batch}"


def measure_points(keys: Iterable[str], *, repeats: int = 3, runs: int = 15, max_seconds: float = 4.0,
                   cache: LatencyCache | None = None, refresh: bool = False, idle_wait_s: float = 60.0,
                   progress: Callable[[str], None] | None = None) -> list[LatencyPoint]:
    """ONNX Runtime fp32 batch-1 latency of each model (random weights: latency does not depend on them).

    All the models are timed in one sitting on idle cores (``core.latency.measure_side_by_side``:
    warm-up, ``repeats`` x ``max(1, runs // repeats)`` rounds round-robin across the models, spread
    checked), so their figures compare with each other. The cache only answers when it holds every
    model: figures from different sittings are never mixed in one fit. Raises
    ``core.latency.MachineBusy`` (plain message) when the cores do not become idle.
    """
    from core.latency import Spec, measure_side_by_side

    keys = list(dict.fromkeys(keys))
    hits: dict[str, dict[str, Any]] = {}
    for k in keys:
        hit = cache.get(cache_key(k)) if cache is not None and not refresh else None
        if hit and "p50_ms" in hit:
            hits[k] = dict(hit)
    if len(hits) == len(keys):
        return [LatencyPoint(k, float(h["p50_ms"]), float(h.get("p95_ms", h["p50_ms"]))) for k, h in hits.items()]
    paths = {k: _exported(k) for k in keys}
    if progress:
        progress(f"exported {', '.join(keys)}; timing them side by side")
    lat = measure_side_by_side([Spec(k, paths[k], get_variant(k).resolution) for k in keys],
                               rounds=max(3, repeats * 2), runs=max(runs, repeats * 2),
                               max_seconds=max_seconds * repeats, idle_wait_s=idle_wait_s, say=progress)
    out: list[LatencyPoint] = []
    for k in keys:
        p50, p95 = lat[k].p50_ms, max(lat[k].p50_ms, lat[k].p95_ms)
        out.append(LatencyPoint(k, p50, p95))
        if cache is not None:
            cache.put(cache_key(k), {"p50_ms": p50, "p95_ms": p95, "repeats": repeats, "runs": lat[k].runs,
                                     "measured_at": datetime.now(UTC).isoformat(), "warning": lat[k].warning,
                                     "conditions": lat[k].conditions})
    if progress:
        progress(f"measured {len(keys)} models in one sitting")
        for w in dict.fromkeys(lat[k].warning for k in keys if lat[k].warning):
            progress(w)
    return out


_EXPORT_DIR: Path | None = None


def _exported(key: str) -> Path:
    """ONNX file of a random-weight model, exported once per process (export costs seconds)."""
    global _EXPORT_DIR
    import atexit
    import shutil

    import torch

    from core.onnx_export import export_onnx

    if _EXPORT_DIR is None:
        _EXPORT_DIR = Path(tempfile.mkdtemp(prefix="wb-latency-"))
        atexit.register(shutil.rmtree, _EXPORT_DIR, True)
    v = get_variant(key)
    path = _EXPORT_DIR / f"{key.replace('@', '_')}.onnx"
    if not path.is_file():
        torch.manual_seed(0)
        model = create_model(v, 1000, weights="none").model  # the family's own padding convention
        export_onnx(model, path, v.resolution)
    return path


# ORT CPU has no fp16 kernels for most ops on x86 (casts back to fp32) and int8 gains depend on
# VNNI: neither is measured by calibration, so these are stated assumptions, not fits.
CPU_SPEEDUP_ASSUMED = {"fp32": 1.0, "fp16": 1.0, "int8": 1.5}


def calibrate(name: str = "this-machine", *, points: Sequence[str] = CALIBRATION_SET, repeats: int = 3,
              cache: LatencyCache | None = None, memory_mb: float | None = None,
              progress: Callable[[str], None] | None = None) -> DeviceProfile:
    """Measure ``points`` with ONNX Runtime here and fit a profile named ``name``."""
    from core.latency import machine_id

    t0 = time.perf_counter()
    measured = measure_points(points, repeats=repeats, cache=cache, progress=progress)
    model = fit_throughput(measured, CPU_SPEEDUP_ASSUMED)
    if memory_mb is None:
        memory_mb = _available_memory_mb()
    calib = [{"key": p.key, "p50_ms": round(p.p50_ms, 4), "p95_ms": round(p.p95_ms, 4),
              "predicted_ms": round(model.predict_ms(run_features(p.key)), 4)} for p in measured]
    return DeviceProfile(
        name=name,
        description=f"Calibrated with ONNX Runtime (CPU, fp32, batch 1) on {machine_id()}",
        kind="cpu",
        memory_mb=float(memory_mb),
        runtime_overhead_mb=60.0,
        throughput=model,
        sources=(f"workbench calibrate, {datetime.now(UTC).date().isoformat()}, "
                 f"{len(measured)} models, {time.perf_counter() - t0:.0f} s; fp16/int8 speed-ups assumed "
                 f"{CPU_SPEEDUP_ASSUMED['fp16']}x/{CPU_SPEEDUP_ASSUMED['int8']}x (not measured)",),
        measured=True,
        calibration=tuple(calib),
        origin="calibration",
    )


def _available_memory_mb() -> float:
    try:
        import psutil

        return round(psutil.virtual_memory().available / 2**20 / 2, 0)  # half of what is free now
    except Exception:  # noqa: BLE001 - psutil missing or unsupported platform
        return 2048.0


def replace_throughput(profile: DeviceProfile, model: ThroughputModel,
                       calibration: Sequence[dict[str, Any]] = (), note: str = "") -> DeviceProfile:
    """The same profile with a (re)fitted throughput model."""
    from dataclasses import replace

    return replace(profile, throughput=model, calibration=tuple(calibration),
                   sources=profile.sources + ((note,) if note else ()))


__all__ = [
    "CALIBRATION_SET", "PRECISIONS", "DeviceProfile", "DictCache", "LatencyCache", "LatencyPoint",
    "ProfileError", "RunFeatures", "ThroughputModel", "cache_key", "calibrate", "fit_throughput",
    "get_profile", "load_profile_file", "load_profiles", "measure_points", "profile_from_dict",
    "replace_throughput", "run_features", "save_profile_json",
]
