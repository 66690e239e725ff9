"""The recommender as the UI and the CLI call it: profiles + DB-cached measurements + core.recommend.

``this-machine`` predictions are backed by real ONNX Runtime measurements kept in the
``benchmarks`` table (kind='latency', key like 'lite0@224/fp32/b1', machine=machine_id()):
cached measurements are used directly for those candidates and, once at least three distinct
models are cached, the throughput model is refitted to them for all the others. Measuring new
models happens only on request (``measure=True``): it takes seconds per model.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from sqlalchemy import select

from core.devices import (
    CALIBRATION_SET,
    CPU_SPEEDUP_ASSUMED,
    DeviceProfile,
    LatencyPoint,
    calibrate,
    fit_throughput,
    get_profile,
    load_profile_file,
    load_profiles,
    measure_points,
    replace_throughput,
    run_features,
)
from core.latency import machine_id
from core.recommend import Budget, Recommendation, recommend
from storage.db import get_sessionmaker
from storage.models import Benchmark
from workbench.settings import get_settings

THIS_MACHINE = "this-machine"
MEASURE_TOP = 3  # on --measure: also measure this many top-ranked candidates (plus near misses)
NEAR_MISS = 1.5


class DBLatencyCache:
    """core.devices.LatencyCache backed by the benchmarks table, scoped to this machine."""

    def __init__(self, database_url: str | None = None, machine: str | None = None) -> None:
        self.sessionmaker = get_sessionmaker(database_url or get_settings().database_url)
        self.machine = machine or machine_id()

    def get(self, key: str) -> dict[str, Any] | None:
        with self.sessionmaker() as s:
            row = s.scalars(select(Benchmark).where(Benchmark.kind == "latency", Benchmark.key == key,
                                                    Benchmark.machine == self.machine)
                            .order_by(Benchmark.created_at.desc(), Benchmark.id.desc()).limit(1)).first()
            return dict(row.result) if row else None

    def put(self, key: str, value: dict[str, Any]) -> None:
        with self.sessionmaker.begin() as s:
            s.add(Benchmark(kind="latency", key=key, machine=self.machine, result=dict(value)))

    def all_fp32_b1(self) -> dict[str, dict[str, Any]]:
        """Latest fp32 batch-1 measurement per model key ('lite0@224') on this machine."""
        out: dict[str, dict[str, Any]] = {}
        with self.sessionmaker() as s:
            rows = s.scalars(select(Benchmark).where(Benchmark.kind == "latency", Benchmark.machine == self.machine,
                                                     Benchmark.key.like("%/fp32/b1"))
                             .order_by(Benchmark.created_at, Benchmark.id)).all()
            for r in rows:  # later rows overwrite earlier ones
                if "p50_ms" in (r.result or {}):
                    out[r.key.rsplit("/", 2)[0]] = dict(r.result)
        return out


def _fit_this_machine(profile: DeviceProfile, cached: Mapping[str, Mapping[str, Any]]) -> DeviceProfile:
    points = [LatencyPoint(k, float(v["p50_ms"]), float(v.get("p95_ms", v["p50_ms"]))) for k, v in cached.items()]
    if len(points) < 3:
        return profile
    model = fit_throughput(points, CPU_SPEEDUP_ASSUMED)
    calib = [{"key": p.key, "p50_ms": p.p50_ms, "p95_ms": p.p95_ms,
              "predicted_ms": round(model.predict_ms(run_features(p.key)), 4)} for p in points]
    return replace_throughput(profile, model, calib,
                              f"Fitted to {len(points)} ONNX Runtime measurements cached for {machine_id()}.")


def resolve_profile(device: str, profile_file: str | Path | None = None,
                    devices_file: str | Path | None = None,
                    cache: DBLatencyCache | None = None) -> tuple[DeviceProfile, dict[str, dict[str, Any]]]:
    """The profile to use and the real measurements backing it (this-machine only)."""
    if profile_file:
        return load_profile_file(profile_file), {}
    profile = get_profile(device, load_profiles(devices_file))
    if device != THIS_MACHINE:
        return profile, {}
    cache = cache or DBLatencyCache()
    cached = cache.all_fp32_b1()
    return _fit_this_machine(profile, cached), cached


def recommend_for(budget: Mapping[str, Any] | Budget, *, measure: bool = False,
                  profile_file: str | Path | None = None, devices_file: str | Path | None = None,
                  check_hub: bool = True, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """What the UI calls: a budget dict in, ``Recommendation.to_dict()`` out."""
    return recommend_obj(budget, measure=measure, profile_file=profile_file, devices_file=devices_file,
                         check_hub=check_hub, progress=progress).to_dict()


def recommend_obj(budget: Mapping[str, Any] | Budget, *, measure: bool = False,
                  profile_file: str | Path | None = None, devices_file: str | Path | None = None,
                  check_hub: bool = True, progress: Callable[[str], None] | None = None,
                  database_url: str | None = None) -> Recommendation:
    """``database_url``: where measured latencies are cached (default: this installation's database)."""
    from core.weights import weights_availability

    b = budget if isinstance(budget, Budget) else Budget.from_dict(budget)
    if profile_file:
        profile = load_profile_file(profile_file)
        b = Budget.from_dict({**b.to_dict(), "device": profile.name})
    weights = weights_availability(check_hub=check_hub)
    cache = DBLatencyCache(database_url) if b.device == THIS_MACHINE and not profile_file else None
    profile, cached = resolve_profile(b.device, profile_file, devices_file, cache)
    if measure and cache is None:
        raise ValueError(f"--measure measures ONNX Runtime on this machine; it only applies to device "
                         f"'{THIS_MACHINE}', not '{profile.name}'.")
    if measure and cache is not None:
        # 1. Calibration set (cached after the first time), then refit.
        measure_points(CALIBRATION_SET, cache=cache, progress=progress)
        profile, cached = resolve_profile(b.device, None, devices_file, cache)
        # 2. The candidates that decide the answer: the top-ranked and the near misses on latency.
        first = recommend(b, profile, weights=weights, measured=cached)
        # Near misses: broken only on latency and by at most NEAR_MISS x the limit (measuring a
        # model predicted at 20x the limit cannot change the answer and costs the most time).
        near = sorted((c for c in first.excluded
                       if {ch.name for ch in c.broken} <= {"latency_p50_ms", "latency_p95_ms"}
                       and all(ch.value <= NEAR_MISS * ch.limit for ch in c.broken)),
                      key=lambda c: max(ch.value / ch.limit for ch in c.broken))
        keys = [c.key for c in first.ranked[:MEASURE_TOP]] + [c.key for c in near[:MEASURE_TOP]]
        measure_points(keys, cache=cache, progress=progress)
        profile, cached = resolve_profile(b.device, None, devices_file, cache)
    return recommend(b, profile, weights=weights, measured=cached)


def list_devices(devices_file: str | Path | None = None) -> list[dict[str, Any]]:
    """Every profile (built-in, WORKBENCH_DEVICES, devices_file) as a dict, for the UI's device picker."""
    return [p.to_dict() for p in load_profiles(devices_file).values()]


def calibrate_here(name: str = THIS_MACHINE, *, points: tuple[str, ...] = CALIBRATION_SET, repeats: int = 3,
                   use_db: bool = True, progress: Callable[[str], None] | None = None) -> DeviceProfile:
    """Run the calibration on this machine; measurements are cached in the DB unless use_db=False."""
    cache = DBLatencyCache() if use_db else None
    return calibrate(name, points=points, repeats=repeats, cache=cache, progress=progress)


__all__ = ["DBLatencyCache", "calibrate_here", "list_devices", "recommend_for", "recommend_obj", "resolve_profile"]
