"""``workbench recommend``, ``workbench calibrate`` and ``workbench devices``."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from core.devices import CALIBRATION_SET, ProfileError, save_profile_json
from core.latency import LatencyError
from core.recommend import Budget, BudgetError, format_table


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("recommend", help="Which EfficientNet fits a hardware budget (before training).",
                              description="Rank EfficientNet variants x resolutions against a hardware budget.")
    p.add_argument("--device", default="this-machine", help="device profile name (see `workbench devices`)")
    p.add_argument("--latency-ms", type=float, help="p50 latency limit per image at batch 1 (ms)")
    p.add_argument("--latency-p95-ms", type=float, help="p95 latency limit per image at batch 1 (ms)")
    p.add_argument("--memory-mb", type=float, help="peak inference memory limit (MB)")
    p.add_argument("--size-mb", type=float, help="model file size limit at --precision (MB)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "int8"])
    p.add_argument("--max-params-m", type=float, help="parameter limit (millions)")
    p.add_argument("--max-gmacs", type=float, help="multiply-add limit (GMACs per image)")
    p.add_argument("--min-resolution", type=int, help="smallest acceptable input size (px)")
    p.add_argument("--train-images", type=int, help="number of training images (small data favours small models)")
    p.add_argument("--num-classes", type=int, default=1000, help="classes in the head (default 1000)")
    p.add_argument("--measure", action="store_true",
                   help="this-machine only: measure ONNX Runtime latency now (seconds per model; cached)")
    p.add_argument("--profile-file", help="a profile JSON from `workbench calibrate` (or one-profile TOML)")
    p.add_argument("--devices-file", help="extra TOML/JSON profiles merged over the built-ins")
    p.add_argument("--offline", action="store_true", help="do not contact the model hub when checking weights")
    p.add_argument("--top", type=int, default=10, help="rows shown per table (default 10)")
    p.add_argument("--json", action="store_true", help="print the full answer as JSON")
    p.set_defaults(func=cmd_recommend)

    c = subparsers.add_parser("calibrate", help="Measure this machine and write a device profile JSON.",
                              description="Measure ONNX Runtime latency for a fixed set of models here and fit "
                                          "the throughput model (about a minute).")
    c.add_argument("-o", "--output", required=True, help="profile JSON to write")
    c.add_argument("--name", default=None, help="profile name (default: the output file's stem)")
    c.add_argument("--points", default=",".join(CALIBRATION_SET),
                   help=f"models to measure, comma-separated (default {','.join(CALIBRATION_SET)})")
    c.add_argument("--repeats", type=int, default=3, help="interleaved rounds; the lowest p50 is kept")
    c.add_argument("--no-db", action="store_true", help="do not cache the measurements in the database")
    c.add_argument("--json", action="store_true", help="print the profile as JSON")
    c.set_defaults(func=cmd_calibrate)

    d = subparsers.add_parser("devices", help="List device profiles.")
    d.add_argument("--devices-file", help="extra TOML/JSON profiles merged over the built-ins")
    d.add_argument("--json", action="store_true")
    d.set_defaults(func=cmd_devices)


def _err(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


def cmd_recommend(args: argparse.Namespace) -> int:
    from workbench.recommend import recommend_obj

    try:
        budget = Budget(device=args.device, latency_ms=args.latency_ms, latency_p95_ms=args.latency_p95_ms,
                        memory_mb=args.memory_mb, size_mb=args.size_mb, precision=args.precision,
                        max_params_m=args.max_params_m, max_gmacs=args.max_gmacs,
                        min_resolution=args.min_resolution, train_images=args.train_images,
                        num_classes=args.num_classes)
        progress = (lambda m: print(f"  {m}", file=sys.stderr)) if args.measure else None
        rec = recommend_obj(budget, measure=args.measure, profile_file=args.profile_file,
                            devices_file=args.devices_file, check_hub=not args.offline, progress=progress)
    except (BudgetError, ProfileError, ValueError, LatencyError) as exc:  # LatencyError: busy machine
        return _err(str(exc))
    if args.json:
        print(json.dumps(rec.to_dict(), indent=2))
    else:
        print(format_table(rec, top=args.top))
    return 0 if rec.feasible else 1


def cmd_calibrate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from workbench.recommend import calibrate_here

    points = tuple(p.strip() for p in args.points.split(",") if p.strip())
    name = args.name or Path(args.output).stem
    try:
        profile = calibrate_here(name, points=points, repeats=args.repeats, use_db=not args.no_db,
                                 progress=lambda m: print(f"  {m}", file=sys.stderr))
    except (ValueError, LatencyError) as exc:  # LatencyError: the machine was too busy to time
        return _err(str(exc))
    path = save_profile_json(profile, args.output)
    if args.json:
        print(json.dumps({"path": str(path), "profile": profile.to_dict()}, indent=2))
        return 0
    tp = profile.throughput
    print(f"Wrote profile '{profile.name}' to {path}: overhead {tp.overhead_ms:.2f} ms, "
          f"{tp.gmacs_per_s:.1f} GMAC/s, activation bandwidth "
          f"{f'{tp.bandwidth_gb_s:.1f} GB/s' if tp.bandwidth_gb_s else 'none'}.")
    for c in profile.calibration:
        print(f"  {c['key']:<12} measured {c['p50_ms']:.1f} ms, model {c['predicted_ms']:.1f} ms")
    print(f"Use it with: workbench recommend --profile-file {path} --latency-ms ...")
    return 0


def cmd_devices(args: argparse.Namespace) -> int:
    from workbench.recommend import list_devices

    try:
        devices = list_devices(args.devices_file)
    except ProfileError as exc:
        return _err(str(exc))
    if args.json:
        print(json.dumps(devices, indent=2))
        return 0
    print(f"{'name':<18} {'kind':<4} {'memory MB':>9} {'GMAC/s':>8} {'overhead ms':>11}  description")
    for d in devices:
        tp = d["throughput"]
        print(f"{d['name']:<18} {d['kind']:<4} {d['memory_mb']:>9.0f} {tp['gmacs_per_s']:>8.1f} "
              f"{tp['overhead_ms']:>11.2f}  {d['description']}")
    return 0
