"""`workbench data fix ...` and `workbench data versions`: fixes from the health report.

Each fix creates a new version of the dataset (the old one stays as it is) and prints what
changed. Exit codes: 0 ok, 2 bad input or nothing to fix (message on stderr, nothing changed).
"""
from __future__ import annotations

import argparse
import getpass
from typing import Any

from core.ingest import display_name
from workbench import dataset_fixes as fixes
from workbench.cli.exits import EXIT_OK, Command, guard
from workbench.cli.exits import fail as _fail

MAX_LISTED = 20  # changed files printed per fix (all of them: `workbench data versions NAME --details`)


def _guard(fn: Command) -> Command:
    """User errors (bad file, label, pattern; nothing to fix) -> exit code 2 with the message."""
    return guard(fn, errors=(ValueError,))


def _by() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (some containers)
        user = "unknown user"
    return f"{user} (command line)"


def _print_changes(change: dict[str, Any], limit: int | None = MAX_LISTED) -> None:
    lines: list[str] = []
    for k in change.get("kept", []):
        lines.append(f"kept {k['name']} ({k['split']}), removed " + ", ".join(k["dropped"]))
    if not change.get("kept"):
        for d in change.get("dropped", []):
            lines.append(f"removed {d['name']} ({d['label']}, {d['split']})")
    for m in change.get("moved", []):
        lines.append(f"moved {m['name']} from {m['split']} to {m['to']}")
    for r in change.get("relabelled", []):
        lines.append(f"relabelled {r['name']} from {r['label']} to {r['to']}")
    for g in change.get("left_alone", []):
        lines.append("left alone (different labels): " + ", ".join(g))
    shown = lines if limit is None else lines[:limit]
    for line in shown:
        print(f"  {display_name(line)}")
    if len(shown) < len(lines):
        print(f"  ... and {len(lines) - len(shown)} more (`workbench data versions NAME --details`)")


def _print_result(res: fixes.FixResult) -> int:
    info = res.dataset
    counts = info.split_config.get("counts", {})
    print(f"created '{display_name(info.name)}' (id {info.id}), version {res.version} from "
          f"'{display_name(res.parent_name)}': {display_name(res.summary)}")
    print(f"  {info.num_images} images, {info.num_classes} classes, split train/val/test = "
          f"{counts.get('train', 0)}/{counts.get('val', 0)}/{counts.get('test', 0)}")
    _print_changes(res.change)
    for w in info.health.get("warnings", []):
        print(f"  warning: {display_name(w)}")
    return EXIT_OK


@_guard
def cmd_duplicates(args: argparse.Namespace) -> int:
    return _print_result(fixes.drop_exact_duplicates(args.dataset, by=_by(), new_name=args.name))


@_guard
def cmd_leakage(args: argparse.Namespace) -> int:
    return _print_result(fixes.resolve_leakage(args.dataset, args.keep, by=_by(), new_name=args.name))


@_guard
def cmd_exclude(args: argparse.Namespace) -> int:
    return _print_result(fixes.exclude_files(args.dataset, args.files, by=_by(), new_name=args.name))


@_guard
def cmd_relabel(args: argparse.Namespace) -> int:
    return _print_result(fixes.relabel_file(args.dataset, args.file, args.label, by=_by(), new_name=args.name))


@_guard
def cmd_regroup(args: argparse.Namespace) -> int:
    if args.pattern is None:
        suggestions = fixes.group_pattern_suggestions(args.dataset)
        if not suggestions:
            return _fail("no pattern in the file names splits this dataset into groups; give your own with "
                         "--pattern, e.g. --pattern '^(patient\\d+)_'")
        print("suggested group patterns (use one with --pattern):")
        for s in suggestions:
            print(f"  {s.pattern!r:<28} {s.description}: {s.groups} groups in {s.matched} file names "
                  f"(e.g. {', '.join(display_name(e) for e in s.examples)})")
        return EXIT_OK
    return _print_result(fixes.resplit_by_group(args.dataset, args.pattern, seed=args.seed, by=_by(),
                                                new_name=args.name))


@_guard
def cmd_versions(args: argparse.Namespace) -> int:
    for v in fixes.version_history(args.dataset):
        by = f" by {v.created_by}" if v.created_by else ""
        print(f"{display_name(v.sentence)}: '{display_name(v.name)}' (id {v.dataset_id}), "
              f"{v.created_at:%Y-%m-%d %H:%M}{display_name(by)}")
        if args.details and v.change:
            _print_changes(v.change, limit=None)
    return EXIT_OK


def register(data_sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `fix` and `versions` under `workbench data`."""
    fix = data_sub.add_parser("fix", help="fix a finding of the health report (creates a new version)")
    sub = fix.add_subparsers(dest="fix_command", metavar="{duplicates,leakage,exclude,relabel,regroup}")
    sub.required = True

    def add(name: str, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_)
        p.add_argument("dataset", help="dataset name or id")
        p.add_argument("--name", default=None, help="name of the new version (default: '<first name> vN')")
        return p

    p = add("duplicates", "remove exact duplicate images, keeping one of each group")
    p.set_defaults(func=cmd_duplicates)
    p = add("leakage", "stop duplicates and near-duplicates from spanning train, val and test")
    p.add_argument("--keep", choices=sorted(fixes.LEAKAGE_MODES), default="train",
                   help="train: move each leaking group to train (default); cluster: keep each group whole "
                        "in the split that holds most of it")
    p.set_defaults(func=cmd_leakage)
    p = add("exclude", "leave images out of the new version")
    p.add_argument("files", nargs="+", metavar="FILE", help="file as shown in the report (path or file name)")
    p.set_defaults(func=cmd_exclude)
    p = add("relabel", "give one image another class")
    p.add_argument("file", metavar="FILE")
    p.add_argument("label", metavar="LABEL", help="one of the dataset's classes")
    p.set_defaults(func=cmd_relabel)
    p = add("regroup", "split again so a patient's or field's images stay in one split")
    p.add_argument("--pattern", default=None,
                   help="regular expression on file names whose first ( ) group is the patient or field id; "
                        "without it, suggested patterns are listed")
    p.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
    p.set_defaults(func=cmd_regroup)

    p = data_sub.add_parser("versions", help="a dataset's versions and what each fix changed")
    p.add_argument("dataset", help="dataset name or id")
    p.add_argument("--details", action="store_true", help="list every changed file")
    p.set_defaults(func=cmd_versions)
