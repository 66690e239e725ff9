"""Hardware-budget recommender (issue 4): profiles, budgets, ranking, calibration, CLI."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.devices import (
    DictCache,
    ProfileError,
    calibrate,
    load_profile_file,
    load_profiles,
    run_features,
    save_profile_json,
)
from core.recommend import Budget, BudgetError, Candidate, default_candidates, recommend

BUILTIN = load_profiles(use_env=False)
DEVICES = sorted(BUILTIN)
CONSTRAINTS = {"latency_p50_ms", "latency_p95_ms", "memory_mb", "device_memory_mb", "size_mb", "params_m",
               "gmacs", "min_resolution"}
# Deterministic weights so tests never depend on the network or the local hub cache.
ALL_WEIGHTS = {n: True for n in ("b0", "b1", "b2", "b3", "b4", "b5", "b6", "b7",
                                 "lite0", "lite1", "lite2", "lite3", "lite4")}
TINY = "lite0@96"  # the real model used for fast, real ONNX Runtime calibrations


def test_required_builtin_profiles_exist() -> None:
    assert {"this-machine", "desktop-x86", "rpi4", "rpi5", "jetson-orin-nano", "phone-cpu",
            "datacenter-gpu"} <= set(BUILTIN)
    for p in BUILTIN.values():
        assert p.sources, f"{p.name} names no source"


@pytest.mark.parametrize("device", DEVICES)
def test_recommend_answers_for_every_builtin_profile(device: str) -> None:
    rec = recommend(Budget(device=device, latency_ms=50, memory_mb=1024), BUILTIN[device], weights=ALL_WEIGHTS)
    d = json.loads(json.dumps(rec.to_dict()))  # JSON-able end to end
    assert d["device"] == device
    assert len(rec.ranked) + len(rec.excluded) == len(default_candidates())
    if rec.recommended:
        assert rec.recommended is rec.ranked[0] and rec.reason.startswith(rec.recommended.key)
        assert rec.reason.count(".") >= 1 and "\n" not in rec.reason
    else:
        assert "Closest:" in rec.message
    for c in rec.ranked:
        assert c.feasible and all(ch.margin >= 0 for ch in c.checks)
        assert {ch.name for ch in c.checks} >= {"latency_p50_ms", "memory_mb", "device_memory_mb"}


@pytest.mark.parametrize("device", DEVICES)
def test_every_exclusion_names_its_constraints(device: str) -> None:
    budget = Budget(device=device, latency_ms=8, latency_p95_ms=9, memory_mb=120, size_mb=18, precision="fp16",
                    max_params_m=9, max_gmacs=1.0, min_resolution=200)
    rec = recommend(budget, BUILTIN[device], weights=ALL_WEIGHTS)
    assert rec.excluded
    for c in rec.excluded:
        assert c.broken, c.key
        for ch in c.broken:
            assert ch.name in CONSTRAINTS and not ch.ok and ch.margin < 0
        d = c.to_dict()
        assert d["broken"] == [ch.name for ch in c.broken] and d["feasible"] is False
    # Each limit excludes exactly the candidates it should, and says so by name.
    by_key = {c.key: c for c in rec.excluded}
    assert "min_resolution" in {ch.name for ch in by_key["b0@192"].broken}
    assert "params_m" in {ch.name for ch in by_key["b3@300"].broken}
    assert "gmacs" in {ch.name for ch in by_key["b4@380"].broken}


def test_constraint_values_match_the_cost_model() -> None:
    rec = recommend(Budget(device="rpi4", size_mb=1.0, precision="int8", num_classes=5), "rpi4",
                    weights=ALL_WEIGHTS)
    c = next(c for c in rec.excluded if c.key == "lite0@224")
    size = next(ch for ch in c.checks if ch.name == "size_mb")
    assert size.value == pytest.approx(c.params / 2**20)  # int8: one byte per parameter
    fp32 = recommend(Budget(device="rpi4", precision="fp32"), "rpi4", weights=ALL_WEIGHTS)
    int8 = recommend(Budget(device="rpi4", precision="int8"), "rpi4", weights=ALL_WEIGHTS)
    lat = {c.key: c.latency_p50_ms for c in fp32.ranked}
    for c in int8.ranked:
        assert c.latency_p50_ms < lat[c.key]  # rpi4 profile: int8 speed-up 1.8x (published ncnn int8/fp32 ratios)


def test_impossible_budget_names_closest_candidate_and_what_it_needs() -> None:
    rec = recommend(Budget(device="rpi4", latency_ms=5, memory_mb=30), "rpi4", weights=ALL_WEIGHTS)
    assert rec.recommended is None and not rec.ranked
    closest = rec.message.split("Closest: ")[1].split(" ")[0]
    assert closest in {c.key for c in rec.excluded}
    assert "latency_p50_ms <=" in rec.message and "memory_mb <=" in rec.message and "budget 5" in rec.message
    assert rec.to_dict()["recommended"] is None


def test_missing_weights_rank_down_but_are_never_hidden() -> None:
    budget = Budget(device="desktop-x86", latency_ms=1000)
    with_w = recommend(budget, "desktop-x86", weights=ALL_WEIGHTS)
    no_b7 = recommend(budget, "desktop-x86", weights={**ALL_WEIGHTS, "b7": False})
    assert with_w.recommended is not None and with_w.recommended.base == "b7"
    assert no_b7.recommended is not None and no_b7.recommended.base != "b7"
    b7 = next(c for c in no_b7.ranked if c.key == "b7@600")
    assert not b7.weights_available and b7.score < with_w.ranked[0].score
    # In-between compound models never have weights: present, marked, ranked down.
    phi = [c for c in no_b7.ranked + no_b7.excluded if "-phi" in c.key]
    assert phi and all(not c.weights_available for c in phi)


def test_small_data_favours_smaller_models() -> None:
    budget = dict(device="desktop-x86", latency_ms=1000)
    small = recommend(Budget(**budget, train_images=200), "desktop-x86", weights=ALL_WEIGHTS).recommended
    large = recommend(Budget(**budget, train_images=200_000), "desktop-x86", weights=ALL_WEIGHTS).recommended
    assert small is not None and large is not None
    assert small.params < large.params
    assert small.data_penalty > large.data_penalty


# ---- properties over many budgets ---------------------------------------------------------
limit = st.one_of(st.none(), st.floats(min_value=0.5, max_value=5000, allow_nan=False))


@st.composite
def budget_pairs(draw: st.DrawFn) -> tuple[Budget, Budget]:
    device = draw(st.sampled_from(DEVICES))
    precision = draw(st.sampled_from(["fp32", "fp16", "int8"]))
    train = draw(st.one_of(st.none(), st.integers(50, 100_000)))
    tight: dict = {}
    loose: dict = {}
    for f, lo, hi in (("latency_ms", 0.5, 800), ("latency_p95_ms", 0.5, 900), ("memory_mb", 20, 800),
                      ("size_mb", 1, 300), ("max_params_m", 1, 70), ("max_gmacs", 0.1, 40)):
        t = draw(st.one_of(st.none(), st.floats(lo, hi)))
        grow = draw(st.one_of(st.none(), st.floats(1.0, 10.0)))  # None: the looser budget drops the limit
        tight[f] = t
        loose[f] = None if t is None or grow is None else t * grow
    minres = draw(st.one_of(st.none(), st.integers(96, 600)))
    common = dict(device=device, precision=precision, train_images=train, min_resolution=minres)
    return Budget(**common, **tight), Budget(**common, **loose)


def _dominates_or_equal(a: Candidate, b: Candidate) -> bool:
    """a costs no more than b on every resource a budget can limit."""
    return (a.params <= b.params and a.gmacs <= b.gmacs and a.latency_p50_ms <= b.latency_p50_ms
            and a.latency_p95_ms <= b.latency_p95_ms and a.memory_mb <= b.memory_mb and a.file_mb <= b.file_mb)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(budget_pairs())
def test_looser_budget_never_recommends_a_smaller_model(pair: tuple[Budget, Budget]) -> None:
    """Guaranteed by construction (argmax of a fixed total order over a growing feasible set).

    "Smaller" cannot mean fewer MACs alone: loosening rpi5's latency can move the answer from
    lite0@224 (0.39 GMACs) to b0@192 (0.29 GMACs, slower per MAC, higher expected accuracy), a
    better model that costs more latency. So: never lower-scored, and never one that costs no more
    of every resource than the tighter answer.
    """
    tight_b, loose_b = pair
    tight = recommend(tight_b, BUILTIN[tight_b.device], weights=ALL_WEIGHTS)
    loose = recommend(loose_b, BUILTIN[loose_b.device], weights=ALL_WEIGHTS)
    assert {c.key for c in tight.ranked} <= {c.key for c in loose.ranked}  # feasible set only grows
    if tight.recommended is None:
        return
    assert loose.recommended is not None
    t, lo = tight.recommended, loose.recommended
    assert lo.score >= t.score  # never a candidate it expects to do worse
    # Never a smaller model the tighter budget could also afford: "smaller" = no more of any resource.
    assert lo.key == t.key or not _dominates_or_equal(lo, t)


@settings(max_examples=60, deadline=None)
@given(device=st.sampled_from(DEVICES), latency=st.floats(1, 500), n1=st.integers(20, 50_000),
       factor=st.floats(1.0, 100.0))
def test_more_training_images_never_recommends_fewer_parameters(device: str, latency: float, n1: int,
                                                                 factor: float) -> None:
    a = recommend(Budget(device=device, latency_ms=latency, train_images=n1), BUILTIN[device], weights=ALL_WEIGHTS)
    b = recommend(Budget(device=device, latency_ms=latency, train_images=int(n1 * factor)), BUILTIN[device],
                  weights=ALL_WEIGHTS)
    if a.recommended is not None:
        assert b.recommended is not None and b.recommended.params >= a.recommended.params


def test_budget_from_dict_accepts_form_values() -> None:
    b = Budget.from_dict({"device": "rpi4", "latency_ms": 150, "min_resolution": 224.0, "train_images": "900",
                          "memory_mb": None})
    assert b.min_resolution == 224 and b.train_images == 900 and b.memory_mb is None
    with pytest.raises(BudgetError, match="min_resolution"):
        Budget.from_dict({"min_resolution": 100.05})


@pytest.mark.parametrize("bad, field", [
    (dict(latency_ms=-1), "latency_ms"), (dict(memory_mb=0), "memory_mb"), (dict(precision="bf16"), "precision"),
    (dict(min_resolution=12.5), "min_resolution"), (dict(train_images=0), "train_images"),
    (dict(size_mb=float("inf")), "size_mb"),
])
def test_budget_validation_names_the_field(bad: dict, field: str) -> None:
    with pytest.raises(BudgetError, match=field):
        Budget(**bad)
    with pytest.raises(BudgetError, match="Unknown budget field"):
        Budget.from_dict({"latency": 3})


# ---- profile files ------------------------------------------------------------------------
GOOD = """
[profiles.my-board]
description = "test board"
kind = "cpu"
memory_mb = 512
runtime_overhead_mb = 30
[profiles.my-board.throughput]
overhead_ms = 1.0
gmacs_per_s = 10.0
speedup = { fp32 = 1.0, fp16 = 1.0, int8 = 2.0 }
"""


def test_user_profiles_merge_over_builtins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "extra.toml"
    f.write_text(GOOD + "\n[profiles.rpi4]\nmemory_mb = 300\n")
    monkeypatch.setenv("WORKBENCH_DEVICES", str(f))
    profiles = load_profiles()
    assert profiles["my-board"].throughput.gmacs_per_s == 10.0
    assert profiles["rpi4"].memory_mb == 300  # overridden field
    assert profiles["rpi4"].throughput == BUILTIN["rpi4"].throughput  # the rest kept
    rec = recommend(Budget(device="my-board", latency_ms=100), profiles["my-board"], weights=ALL_WEIGHTS)
    assert rec.device == "my-board"


@pytest.mark.parametrize("name, text, expected", [
    ("bad_syntax.toml", "[profiles.x\n", ["not valid TOML"]),
    ("missing.toml", GOOD.replace('kind = "cpu"\n', ""), ["'my-board'", "missing required field 'kind'"]),
    ("type.toml", GOOD.replace("memory_mb = 512", 'memory_mb = "lots"'), ["'my-board'", "'memory_mb'", "a number",
                                                                          "'lots'"]),
    ("negative.toml", GOOD.replace("gmacs_per_s = 10.0", "gmacs_per_s = -3"),
     ["'throughput.gmacs_per_s'", "positive"]),
    ("precision.toml", GOOD.replace(", int8 = 2.0", ""), ["'throughput.speedup.int8'"]),
    ("extra_precision.toml", GOOD.replace("int8 = 2.0", "int8 = 2.0, int4 = 3.0"), ["int4"]),
    ("unknown.toml", GOOD.replace("kind = \"cpu\"", "kind = \"cpu\"\nmemroy_mb = 3"), ["unknown field", "memroy_mb"]),
    ("notable.toml", "[profiles]\nx = 3\n", ["'x' must be a table"]),
    ("bandwidth.toml", GOOD.replace("gmacs_per_s = 10.0", "gmacs_per_s = 10.0\nbandwidth_gb_s = 0"),
     ["'throughput.bandwidth_gb_s'"]),
    ("broken.json", '{"name": "x", ', ["not valid JSON", "line 1"]),
    ("noname.json", '{"kind": "cpu"}', ["missing field 'name'"]),
    ("list.json", "[1, 2]", ["expected a JSON object"]),
    ("fields.json", '{"name": "j", "kind": "cpu", "description": "d", "memory_mb": 1, "runtime_overhead_mb": 1, '
                    '"throughput": {"overhead_ms": 0, "gmacs_per_s": 1, "speedup": {"fp32": 1, "fp16": 1}}}',
     ["'j'", "'throughput.speedup.int8'"]),
])
def test_malformed_profile_files_get_clear_errors(tmp_path: Path, name: str, text: str, expected: list[str]) -> None:
    f = tmp_path / name
    f.write_text(text)
    with pytest.raises(ProfileError) as info:
        load_profiles(f, use_env=False)
    msg = str(info.value)
    assert str(f) in msg, msg  # the file
    for part in expected:
        assert part in msg, msg


def test_missing_profile_file_and_unknown_profile(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="not found"):
        load_profiles(tmp_path / "nope.toml", use_env=False)
    with pytest.raises(ProfileError, match="Known profiles: .*rpi4"):
        recommend(Budget(device="toaster"))


# ---- calibration (real ONNX Runtime, one tiny model) --------------------------------------
def test_calibration_json_round_trips_and_is_used(tmp_path: Path) -> None:
    cache = DictCache()
    prof = calibrate("tiny-here", points=(TINY,), repeats=1, cache=cache)
    assert prof.measured and prof.calibration[0]["key"] == TINY
    measured = prof.calibration[0]["p50_ms"]
    assert measured > 0 and cache.get(f"{TINY}/fp32/b1")["p50_ms"] == pytest.approx(measured, rel=1e-3)
    # One point: MACs-only fit, which reproduces that point.
    assert prof.throughput.predict_ms(run_features(TINY)) == pytest.approx(measured, rel=1e-3)
    path = save_profile_json(prof, tmp_path / "tiny.json")
    back = load_profile_file(path)
    a, b = prof.to_dict(), back.to_dict()
    a.pop("origin"), b.pop("origin")
    assert a == b
    rec = recommend(Budget(device="tiny-here", latency_ms=measured * 3), back, weights=ALL_WEIGHTS)
    assert rec.device == "tiny-here" and math.isfinite(rec.ranked[0].latency_p50_ms if rec.ranked else 0)
    # A second calibration is served from the cache (no re-measurement): same number.
    again = calibrate("tiny-here", points=(TINY,), repeats=1, cache=cache)
    assert again.calibration[0]["p50_ms"] == measured


def test_measured_latency_overrides_the_model() -> None:
    rec = recommend(Budget(device="rpi4", latency_ms=1e4), "rpi4", weights=ALL_WEIGHTS,
                    measured={"lite0@224": {"p50_ms": 1234.0, "p95_ms": 1300.0}})
    c = next(c for c in rec.ranked if c.key == "lite0@224")
    assert c.latency_p50_ms == 1234.0 and c.latency_source.startswith("measured")


# ---- CLI end to end -----------------------------------------------------------------------
def test_cli_recommend_devices_and_calibrate(data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from workbench.cli import main
    from workbench.recommend import DBLatencyCache, resolve_profile

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("WORKBENCH_DEVICES", raising=False)
    assert main(["devices"]) == 0
    out = capsys.readouterr().out
    assert all(d in out for d in DEVICES)

    assert main(["recommend", "--device", "rpi4", "--latency-ms", "150", "--memory-mb", "256", "--offline"]) == 0
    out = capsys.readouterr().out
    assert "Recommended:" in out and "Excluded" in out and "latency_p50_ms" in out

    assert main(["recommend", "--device", "rpi4", "--latency-ms", "150", "--memory-mb", "256", "--precision",
                 "int8", "--train-images", "800", "--json", "--offline"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["recommended"]["key"] == d["ranked"][0]["key"] and d["budget"]["precision"] == "int8"

    assert main(["recommend", "--device", "rpi4", "--latency-ms", "1", "--offline"]) == 1  # impossible
    assert "Closest:" in capsys.readouterr().out

    assert main(["recommend", "--device", "nope", "--offline"]) == 2
    assert "Unknown device profile 'nope'" in capsys.readouterr().err

    out_json = tmp_path / "my-device.json"
    points = [TINY, "lite0@128", "b0@96"]  # tiny real models: the fit needs 3 points for all its terms
    assert main(["calibrate", "-o", str(out_json), "--points", ",".join(points), "--repeats", "1"]) == 0
    capsys.readouterr()
    prof = json.loads(out_json.read_text())
    assert prof["name"] == "my-device" and [c["key"] for c in prof["calibration"]] == points
    # The measurement was cached in the benchmarks table for this machine.
    hit = DBLatencyCache().get(f"{TINY}/fp32/b1")
    assert hit is not None and hit["p50_ms"] == pytest.approx(prof["calibration"][0]["p50_ms"], rel=1e-3)

    assert main(["recommend", "--profile-file", str(out_json), "--latency-ms", "500", "--offline", "--json"]) in (0, 1)
    d = json.loads(capsys.readouterr().out)
    assert d["device"] == "my-device"

    # this-machine is refitted from the measurements cached in the DB by the calibration above.
    prof_here, cached = resolve_profile("this-machine")
    assert set(cached) == set(points)
    assert [c["key"] for c in prof_here.calibration] == [c["key"] for c in prof["calibration"]]
    assert prof_here.throughput != BUILTIN["this-machine"].throughput
    assert main(["recommend", "--device", "this-machine", "--latency-ms", "100", "--offline"]) in (0, 1)
    assert "this-machine" in capsys.readouterr().out

    bad = tmp_path / "bad.json"
    bad.write_text('{"name": "b"}')
    assert main(["recommend", "--profile-file", str(bad), "--offline"]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "missing required field" in err
