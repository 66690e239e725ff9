"""``workbench auto DATASET ... | auto --resume SEARCH | auto --follow SEARCH | searches [delete]``."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from workbench import searches
from workbench.cli.exits import id_arg
from workbench.follow import follow_search
from workbench.search_clock import DEFAULT_TIME_BUDGET_MIN
from workbench.searches import SearchInfo, SearchRequestError, minutes
from workbench.status import RunStatus, SearchStatus

# 8 wide; a state not named here is shown as its own word.
STATE_WORDS: dict[str, str] = {**{s: str(s) for s in RunStatus}, RunStatus.SUCCEEDED: "done",
                               RunStatus.CANCELLED: "stopped", RunStatus.QUEUED: "waiting"}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "auto", help="search for the best model for a device budget by training on the data (in the worker)",
        description="Try models and recipes on DATASET within a time budget; the best on validation is tested, "
                    "exported and bundled. Ctrl-C stops following; the search goes on in the worker.")
    p.add_argument("dataset", nargs="?", help="dataset name or id")
    p.add_argument("--device", default="this-machine", help="device profile (see `workbench devices`)")
    p.add_argument("--latency-ms", type=float, default=None, help="latency limit per image on the device (median)")
    p.add_argument("--latency-p95-ms", type=float, default=None, help="latency limit for the slowest 5 %% of images")
    p.add_argument("--memory-mb", type=float, default=None, help="memory limit for the model on the device")
    p.add_argument("--size-mb", type=float, default=None, help="model file size limit")
    p.add_argument("--precision", choices=["fp32", "fp16", "int8"], default="fp32")
    p.add_argument("--time", default=None, help="wall-clock budget, e.g. 15m, 90s, 1h (default "
                                                f"{DEFAULT_TIME_BUDGET_MIN}m; with --resume: time to add)")
    p.add_argument("--objective", default="macro-f1", help="macro-f1 (default) or, for two classes, "
                                                           "sensitivity@spec0.95")
    p.add_argument("--trials", type=int, default=None, help="stop after this many trials (default: only time)")
    p.add_argument("--workers", type=int, default=1, help="search jobs sharing this search (one per worker)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", type=id_arg("SEARCH"), metavar="SEARCH", default=None,
                   help="resume a stopped or failed search (with --time: add that much time)")
    p.add_argument("--follow", type=id_arg("SEARCH"), metavar="SEARCH", default=None,
                   help="follow a search already running")
    p.add_argument("--cancel", type=id_arg("SEARCH"), metavar="SEARCH", default=None, help="stop a search (resumable)")
    p.add_argument("--detach", action="store_true", help="queue and return at once")
    p.add_argument("--json", action="store_true", help="print the search's final state as JSON")
    p.set_defaults(func=cmd_auto)

    p = subparsers.add_parser("searches", help="list Auto searches; `searches delete SEARCH`")
    p.add_argument("--dataset", default=None)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_searches)
    sub = p.add_subparsers(dest="searches_command", metavar="ACTION")
    d = sub.add_parser("delete", help="delete a search and all its trial runs")
    d.add_argument("search", type=id_arg("SEARCH"), metavar="SEARCH")
    d.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    d.set_defaults(func=cmd_searches_delete)


def _num(x: float | None, fmt: str = "{:.3f}") -> str:
    return "-" if x is None else fmt.format(x)


def trials_table(info: SearchInfo) -> str:
    lines = [f"{'trial':>5}  {'run':>5}  {'model':<11} {'state':<8} {'valid.':>6} {'latency':>9} {'time':>6}  "
             f"{'test acc':>8}"]
    for t in info.trials:
        mark = " <- winner" if t.winner else (" (finalist)" if t.finalist else "")
        lines.append(f"{t.number:>5}  {t.run_id:>5}  {t.model:<11} {STATE_WORDS.get(t.status, t.status):<8} "
                     f"{_num(t.value):>6} {_num(t.latency_ms, '{:.1f} ms'):>9} {_num(t.seconds, '{:.0f} s'):>6}  "
                     f"{_num(t.test_accuracy, '{:.1%}'):>8}{mark}")
    return "\n".join(lines)


def describe(info: SearchInfo) -> str:
    out = [f"Search {info.id} on {info.dataset}: {info.status}; {minutes(info.spent_s)} of "
           f"{minutes(info.time_budget_s)} used; objective: {info.objective_label}."]
    if info.trials:
        out.append(trials_table(info))
    s = info.summary
    if info.status == SearchStatus.SUCCEEDED and info.winner_run_id:
        w = next((t for t in info.trials if t.run_id == info.winner_run_id), None)
        lat = s.get("winner_latency", {})
        if w is not None:
            rng = (f" (95 % range {w.test_accuracy_range[0]:.0%}-{w.test_accuracy_range[1]:.0%})"
                   if w.test_accuracy_range else "")
            out.append(f"Winner: run {w.run_id}, {w.model}: validation {_num(w.value)}, test accuracy "
                       f"{_num(w.test_accuracy, '{:.1%}')}{rng}, test macro-F1 {_num(w.test_macro_f1)}; latency "
                       f"{_num(lat.get('p50_ms'), '{:.1f} ms')} ({lat.get('source', '')}).")
        if info.versus_start is not None:
            out.append(info.versus_start.sentence())
        out.append(f"Pareto front (best validation for its latency): runs {', '.join(map(str, s.get('pareto', [])))}. "
                   "Only the finalists were scored on the test images.")
        out.append(f"Verified bundle: {_bundle_path(info)}; details with `workbench evaluate "
                   f"{info.winner_run_id}`.")
    cache = s.get("cache")
    if cache:
        out.append(f"Feature cache: {cache.get('cache_hits', 0)} trial(s) reused cached activations, "
                   f"{cache.get('cache_misses', 0)} computed them ({cache.get('seconds_caching', 0):.0f} s caching, "
                   f"{cache.get('seconds_decoding', 0):.0f} s decoding images).")
    if info.error:
        out.append(info.error)
    return "\n".join(out)


def _bundle_path(info: SearchInfo) -> str:
    from storage.artifacts import ArtifactError
    from workbench.artifacts import artifact_for_download

    if info.bundle_artifact_id is None:
        return "not built"
    try:
        return str(artifact_for_download(info.bundle_artifact_id))
    except ArtifactError as exc:
        return f"unavailable ({exc})"


def follow(search_id: int, poll_s: float = 1.0) -> SearchInfo:
    """A progress bar on the time budget and the trials table, until the search ends."""
    from tqdm import tqdm

    info = searches.get_search(search_id)
    bar = tqdm(total=int(info.time_budget_s), unit="s", desc=f"search {search_id}",
               bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} s {postfix}")
    shown = [""]

    def show(info: SearchInfo) -> None:
        bar.n = int(min(info.spent_s, info.time_budget_s))
        p = info.progress or {}
        bar.set_postfix_str(f"{info.status} | {len(info.trials)} trial(s) | {p.get('message', '')}"[:80],
                            refresh=True)
        table = trials_table(info) if info.trials else ""
        if table != shown[0]:
            bar.clear()
            print(table, flush=True)
            shown[0] = table

    try:
        return follow_search(search_id, on_update=show, poll_s=poll_s)
    finally:
        bar.close()


def _result(info: SearchInfo, as_json: bool) -> int:
    if as_json:
        print(json.dumps(_as_dict(info), indent=2, default=str))
    else:
        print(describe(info))
    return 0 if info.status == SearchStatus.SUCCEEDED else (0 if info.active else 1)


def _as_dict(info: SearchInfo) -> dict[str, Any]:
    from dataclasses import asdict

    d = asdict(info)
    d["time_left_s"] = info.time_left_s
    return d


def cmd_auto(args: argparse.Namespace) -> int:
    try:
        if args.cancel is not None:
            print(f"Search {args.cancel}: {searches.cancel_search(args.cancel)}.")
            return 0
        if args.resume is not None:
            info = searches.resume_search(args.resume, extra_time=args.time)
        elif args.follow is not None:
            info = searches.get_search(args.follow)
        elif args.dataset:
            info = searches.start_search(args.dataset, device=args.device, latency_ms=args.latency_ms,
                                         latency_p95_ms=args.latency_p95_ms, memory_mb=args.memory_mb,
                                         size_mb=args.size_mb, precision=args.precision,
                                         time_budget=args.time or DEFAULT_TIME_BUDGET_MIN, objective=args.objective,
                                         seed=args.seed, max_trials=args.trials, workers=args.workers)
        else:
            print("error: give a DATASET, or --resume / --follow / --cancel SEARCH", file=sys.stderr)
            return 2
    except (SearchRequestError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.follow is None:
        print(f"Search {info.id} queued: {len(info.plan.space.choices) if info.plan else 0} model(s) fit "
              f"{info.device}; {minutes(info.time_left_s)} to spend.")
    if args.detach:
        return _result(info, args.json) if args.json else 0
    try:
        info = follow(info.id)
    except KeyboardInterrupt:
        print(f"\nStopped following. The search goes on in the background worker: follow it with "
              f"`workbench auto --follow {info.id}`, stop it with `workbench auto --cancel {info.id}`.")
        return 130
    return _result(info, args.json)


def cmd_searches(args: argparse.Namespace) -> int:
    try:
        items = searches.list_searches(args.dataset)
    except SearchRequestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([_as_dict(i) for i in items], indent=2, default=str))
        return 0
    if not items:
        print("No searches yet. Start one with `workbench auto DATASET --time 10m`.")
    for i in items:
        print(f"{i.id:>4}  {i.dataset:<20} {i.status:<10} {i.device:<14} {minutes(i.spent_s):>7} of "
              f"{minutes(i.time_budget_s):<7} winner: {i.winner_run_id or '-'}")
    return 0


def cmd_searches_delete(args: argparse.Namespace) -> int:
    if not args.yes and input(f"Delete search {args.search} and all its trial runs? [y/N] ").strip().lower() != "y":
        print("Nothing deleted.")
        return 1
    try:
        removed = searches.delete_search(args.search)
    except SearchRequestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"Deleted search {args.search} and its {len(removed)} trial run(s).")
    return 0
