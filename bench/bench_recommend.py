"""Predicted vs measured ONNX Runtime latency on this machine (issue 4 benchmark).

1. Measure the fixed calibration set (core.devices.CALIBRATION_SET) and the benchmark set
   (B0-B3, Lite0-Lite2, each at its default resolution and at 0.857x of it rounded to a multiple
   of 32) in the same interleaved rounds, so load from other processes hits both alike.
2. Fit the this-machine throughput model on the calibration measurements only (the same fit as
   ``workbench calibrate``) and predict the benchmark set from it.
3. Report the median absolute percentage error, over all points and over the points that are
   not in the calibration set (the out-of-sample figure is the headline).

Run: ``.venv/bin/python bench/bench_recommend.py [--repeats 5] [--out bench/results_recommend.md]``
Target: median APE <= 20 %.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.devices import CALIBRATION_SET, CPU_SPEEDUP_ASSUMED, fit_throughput, measure_points, run_features  # noqa: E402
from core.latency import machine_id  # noqa: E402
from core.registry import get_variant  # noqa: E402

BENCH_VARIANTS = ("b0", "b1", "b2", "b3", "lite0", "lite1", "lite2")
TARGET_MDAPE = 20.0


def round32(x: float) -> int:
    return max(32, int(round(x / 32)) * 32)


def norm(key: str) -> str:
    """'b0' and 'b0@224' name the same point."""
    return f"{key.split('@')[0]}@{get_variant(key).resolution}"


def bench_keys() -> list[str]:
    keys = []
    for name in BENCH_VARIANTS:
        d = get_variant(name).resolution
        for r in (d, round32(d * 0.857)):
            keys.append(f"{name}@{r}")
    return keys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7, help="interleaved measurement rounds (min p50 kept)")
    ap.add_argument("--runs", type=int, default=10, help="timed runs per model per round")
    ap.add_argument("--out", default=str(Path(__file__).with_name("results_recommend.md")))
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    keys = bench_keys()
    all_keys = list(dict.fromkeys([*CALIBRATION_SET, *keys]))
    points = {p.key: p for p in measure_points(all_keys, repeats=args.repeats, runs=args.runs, max_seconds=3.0,
                                               progress=lambda m: print("  ", m, flush=True))}
    # Out-of-sample: the fit sees only the calibration points.
    tp = fit_throughput([points[k] for k in CALIBRATION_SET], CPU_SPEEDUP_ASSUMED)
    print(f"fit: overhead {tp.overhead_ms:.2f} ms, {tp.gmacs_per_s:.1f} GMAC/s, "
          f"bandwidth {tp.bandwidth_gb_s and round(tp.bandwidth_gb_s, 1)} GB/s")
    predicted = {k: tp.predict_ms(run_features(k)) for k in keys}
    measured = {k: points[k].p50_ms for k in keys}
    calib_norm = {norm(k) for k in CALIBRATION_SET}
    rows = []
    for k in keys:
        ape = abs(predicted[k] - measured[k]) / measured[k] * 100
        rows.append((k, run_features(k).gmacs, predicted[k], measured[k], ape, norm(k) in calib_norm))
    all_mdape = statistics.median(r[4] for r in rows)
    oos = [r[4] for r in rows if not r[5]]
    oos_mdape = statistics.median(oos)
    date = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")

    lines = [
        "# Recommender: predicted vs measured latency (this machine)",
        "",
        f"- Machine: `{machine_id()}`; date: {date}",
        "- Runtime: ONNX Runtime CPU, fp32, batch 1, default threads; random-weight models exported "
        "with `core.onnx_export.export_onnx`, timed with `core.latency.measure_latency`.",
        f"- Noise control: {args.repeats} interleaved rounds x {args.runs} runs per model (calibration and "
        "benchmark models in the same rounds), lowest p50 kept: other processes only add time. "
        f"Load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs.",
        f"- Calibration set (fit): {', '.join(CALIBRATION_SET)} -> overhead {tp.overhead_ms:.2f} ms, "
        f"{tp.gmacs_per_s:.1f} GMAC/s, activation bandwidth "
        f"{(str(round(tp.bandwidth_gb_s, 1)) + ' GB/s') if tp.bandwidth_gb_s else 'none'}.",
        f"- Benchmark set (predicted from the fit, then measured): {', '.join(keys)}.",
        f"- Overlap: {', '.join(sorted(r[0] for r in rows if r[5])) or 'none'} are also calibration points "
        "(in-sample); the headline figure excludes them.",
        "",
        "| model | GMACs | predicted ms | measured p50 ms | abs % error | in calibration set |",
        "|---|---:|---:|---:|---:|:---:|",
    ]
    for k, g, p, m, ape, inc in rows:
        lines.append(f"| {k} | {g:.3f} | {p:.1f} | {m:.1f} | {ape:.1f} | {'yes' if inc else ''} |")
    verdict = "meets" if oos_mdape <= TARGET_MDAPE else "MISSES"
    lines += [
        "",
        f"**Median absolute percentage error, out-of-sample ({len(oos)} points): {oos_mdape:.1f} %** "
        f"({verdict} the <= {TARGET_MDAPE:.0f} % target); all {len(rows)} points: {all_mdape:.1f} %; "
        f"max: {max(r[4] for r in rows):.1f} %.",
        "",
        f"Command: `.venv/bin/python bench/bench_recommend.py --repeats {args.repeats} --runs {args.runs}` "
        f"({time.perf_counter() - t0:.0f} s).",
        "",
    ]
    Path(args.out).write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
