"""`workbench data ...` commands: add, report, list, delete (and fix, versions from cli/fix.py); and `workbench gc`.

``workbench.cli`` calls ``register(subparsers)`` and dispatches to ``args.func(args)``.
Every handler returns an exit code: 0 ok, 2 bad input (message on stderr, no traceback).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from core.ingest import display_name
from workbench import datasets as svc
from workbench import gc
from workbench.cli import fix
from workbench.cli.exits import EXIT_OK
from workbench.cli.exits import fail as _fail
from workbench.cli.exits import guard as _guard
from workbench.cli.output import add_json_flag, print_json

GC_LOCK_WAIT_S = 10.0  # `workbench gc` waits this long for running ingests to release the store



@_guard
def cmd_add(args: argparse.Namespace) -> int:
    bar: tqdm | None = None

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, unit="img", desc=f"ingest {args.name}", file=sys.stderr,
                       disable=args.quiet)
        bar.update(done - bar.n)

    try:
        info = svc.add_dataset(
            Path(args.source), args.name, csv=args.csv, group_regex=args.group_regex,
            seed=args.seed, progress=progress,
        )
    finally:
        if bar is not None:
            bar.close()
    if args.json:
        print_json(info)
        return EXIT_OK
    counts = info.split_config.get("counts", {})
    print(
        f"dataset '{display_name(info.name)}' (id {info.id}): {info.num_images} images, "
        f"{info.num_classes} classes, split train/val/test = "
        f"{counts.get('train', 0)}/{counts.get('val', 0)}/{counts.get('test', 0)}, "
        f"{len(info.skipped)} skipped"
    )
    for w in info.health.get("warnings", []):
        print(f"  warning: {display_name(w)}")
    return EXIT_OK


def _print_report(r: dict[str, Any]) -> None:
    h = r["health"]
    # Names are shown escaped: a control or bidi character must not rewrite the terminal line.
    print(f"{display_name(r['name'])} (id {r['id']}) from {display_name(r['source'])}")
    print(f"  {r['num_images']} images, {r['num_classes']} classes, created {r['created_at']}")
    sc = r["split_config"]
    print(f"  split mode: {sc.get('mode')}, seed {sc.get('seed')}, counts {sc.get('counts')}")
    splits = [s for s in ("train", "val", "test") if s in h["split_counts"]]
    shown = {c: display_name(c) for c in r["classes"]}
    width = max([len(c) for c in shown.values()] + [5])
    print("  " + "class".ljust(width) + "".join(s.rjust(8) for s in splits) + "total".rjust(8))
    for c in r["classes"]:
        row = [h["split_counts"][s].get(c, 0) for s in splits]
        print("  " + shown[c].ljust(width) + "".join(str(n).rjust(8) for n in row)
              + str(h["class_counts"].get(c, 0)).rjust(8))
    print(f"  imbalance ratio: {h['imbalance_ratio']}")
    sz = h["sizes"]
    if sz.get("width"):
        print(f"  median size: {sz['width']['p50']:g}x{sz['height']['p50']:g}; "
              f"{sz['share_smaller_than_input']:.0%} smaller than {sz['input_size']}px")
    d = h["duplicates"]
    checked = " (confirmed pixel by pixel)" if d.get("pixel_checked") else ""
    print(f"  exact duplicate groups: {d['exact_groups']} ({d['exact_cross_split_groups']} cross-split), "
          f"near-duplicate groups{checked}: {d['near_groups']} ({d['near_cross_split_groups']} cross-split)")
    kind = h.get("image_kind") or {}
    if kind:
        print(f"  these look like: {kind.get('label')} ({kind.get('reason')}); "
              "override with `workbench train --image-kind KIND`")
    per_class = (h.get("shortcuts") or {}).get("per_class") or {}
    if per_class:
        print("  per class: " + "; ".join(
            f"{display_name(c)} {p['median_width']}x{p['median_height']} px"
            + (f", brightness {p['median_brightness']:.0f}" if "median_brightness" in p else "")
            + ", " + "/".join(p["formats"]) for c, p in per_class.items()))
    for w in h["warnings"]:
        print(f"  warning: {display_name(w)}")
    if r["skipped"]:
        print(f"  skipped files ({len(r['skipped'])}):")
        for s in r["skipped"][:20]:
            print(f"    {display_name(s['path'])}: {display_name(s['reason'])}")
        if len(r["skipped"]) > 20:
            print(f"    ... and {len(r['skipped']) - 20} more (use --json)")


@_guard
def cmd_report(args: argparse.Namespace) -> int:
    report = svc.dataset_report(args.name)
    if args.json:
        print(json.dumps(report, indent=2, ensure_ascii=False))
    else:
        _print_report(report)
    return EXIT_OK


@_guard
def cmd_list(args: argparse.Namespace) -> int:
    rows = svc.list_datasets()
    if args.json:
        print_json(rows)
        return EXIT_OK
    if not rows:
        print("no datasets yet: add one with `workbench data add PATH_OR_ZIP --name NAME`")
        return EXIT_OK
    print(f"{'id':>4}  {'name':<30} {'images':>7} {'classes':>7}  created")
    for d in rows:
        print(f"{d.id:>4}  {display_name(d.name):<30} {d.num_images:>7} {d.num_classes:>7}  "
              f"{d.created_at:%Y-%m-%d %H:%M}")
    return EXIT_OK


@_guard
def cmd_delete(args: argparse.Namespace) -> int:
    res = svc.delete_dataset(args.name)
    if args.json:
        print_json(res)
        return EXIT_OK
    print(f"deleted dataset '{display_name(res.name)}': {res.images} images, {res.files_removed} store files removed")
    if res.files_left:
        print(f"  {res.files_left} store files were left in place because an ingest was running; "
              "`workbench gc` removes those no dataset uses")
    return EXIT_OK


@_guard
def cmd_gc(args: argparse.Namespace) -> int:
    if args.grace_hours < 0:
        return _fail("--grace-hours must be 0 or more")
    report = gc.collect_garbage(grace_hours=args.grace_hours, dry_run=args.dry_run,
                                lock_wait_s=GC_LOCK_WAIT_S)
    if args.json:
        print_json(report)
        return EXIT_OK
    for line in gc.describe(report):
        print(line)
    return EXIT_OK


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Add the `data` command group to the top-level CLI."""
    data = subparsers.add_parser("data", help="add, inspect and delete datasets")
    sub = data.add_subparsers(dest="data_command", metavar="{add,report,list,delete,fix,versions}")
    sub.required = True

    p = sub.add_parser("add", help="ingest a zip, folder or CSV manifest as a dataset")
    p.add_argument("source", metavar="PATH_OR_ZIP")
    p.add_argument("--name", required=True, help="unique dataset name")
    p.add_argument("--csv", type=Path, default=None,
                   help="manifest with columns path,label[,split][,group] (paths relative to the source)")
    p.add_argument("--group-regex", default=None,
                   help="regex on file names whose first capture group is the group id "
                        "(e.g. patient), so a group never spans two splits")
    p.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_json_flag(p)
    p.set_defaults(func=cmd_add)

    p = sub.add_parser("report", help="show a dataset's health report")
    p.add_argument("name")
    add_json_flag(p)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("list", help="list datasets")
    add_json_flag(p)
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("delete", help="delete a dataset and its unshared store files")
    p.add_argument("name")
    add_json_flag(p)
    p.set_defaults(func=cmd_delete)

    fix.register(sub)  # `data fix ...` and `data versions`: fixes from the report, as new versions

    # Top level (`workbench gc`), registered here because it cleans up after ingests.
    p = subparsers.add_parser("gc", help="remove unreferenced store files and stale temporary files")
    p.add_argument("--grace-hours", type=float, default=gc.DEFAULT_GRACE_HOURS,
                   help=f"keep anything younger than this (default {gc.DEFAULT_GRACE_HOURS:g}); "
                        "0 removes every unreferenced file now")
    p.add_argument("--dry-run", action="store_true", help="only say what would be removed")
    add_json_flag(p)
    p.set_defaults(func=cmd_gc)
    return data
