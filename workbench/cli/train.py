"""``workbench train | runs [delete RUN] | resume | cancel | worker``."""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from workbench import lanes, runs, worker
from workbench.cli.exits import guard, id_arg
from workbench.cli.output import add_json_flag, human, print_json
from workbench.follow import follow_run
from workbench.status import RunStatus
from workbench.summary import describe_worker_loss


def register(subparsers: argparse._SubParsersAction) -> None:
    from core.augment import PRESETS
    from core.image_kind import IMAGE_KINDS, KIND_LABELS
    from core.train import RECIPES

    p = subparsers.add_parser("train", help="fine-tune one or more variants on a dataset (in the worker)")
    p.add_argument("dataset", help="dataset name or id")
    p.add_argument("--variant", action="append", dest="variants", metavar="NAME",
                   help="EfficientNet variant (repeat to compare several); default lite0")
    p.add_argument("--resolution", type=int, default=None, help="input size in px (default: the variant's)")
    p.add_argument("--preset", choices=list(PRESETS), default=None,
                   help="augmentation preset (default: from the kind of image, see --image-kind)")
    p.add_argument("--image-kind", choices=list(IMAGE_KINDS), default=None,
                   help="what the images are, overriding the guess of the health report: "
                        + "; ".join(f"{k} = {v}" for k, v in KIND_LABELS.items())
                        + " (chooses the augmentation preset unless --preset is given)")
    p.add_argument("--recipe", choices=list(RECIPES), default="default")
    p.add_argument("--epochs", type=int, default=None, help="fine-tune epochs (overrides the recipe)")
    p.add_argument("--batch-label", default=None, help="label grouping these runs for comparison")
    p.add_argument("--detach", action="store_true", help="queue and return at once")
    p.add_argument("--device", default=None, metavar="DEVICE",
                   help="where the worker trains: auto (a GPU if it has one), cpu, cuda or cuda:N "
                        "(default: WORKBENCH_DEVICE, else auto)")
    p.add_argument("--processes", type=int, default=None, metavar="N",
                   help="train one run with N processes working together: one per GPU (needs N GPUs with "
                        "--device cuda), or N CPU processes; each takes a share of every batch (default 1)")
    add_json_flag(p)
    p.add_argument("--track", action="append", choices=["mlflow", "tensorboard"], default=[],
                   help="also log the run to MLflow (MLFLOW_TRACKING_URI, else <data dir>/mlruns) or to "
                        "TensorBoard event files (<run folder>/tensorboard); repeat for both")
    p.set_defaults(func=cmd_train)

    p = subparsers.add_parser("runs", help="list training runs with state and best metrics; `runs delete RUN`")
    p.add_argument("--dataset", default=None)
    add_json_flag(p)
    p.set_defaults(func=cmd_runs)
    runs_sub = p.add_subparsers(dest="runs_command", metavar="ACTION")
    d = runs_sub.add_parser("delete", help="delete a run: its folder, checkpoints, evaluations, exports and rows")
    d.add_argument("run", type=id_arg("RUN"), metavar="RUN")
    d.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    add_json_flag(d)
    d.set_defaults(func=cmd_runs_delete)

    p = subparsers.add_parser("resume", help="resume a failed or cancelled run from its last checkpoint")
    p.add_argument("run", type=id_arg("RUN"), metavar="RUN")
    p.add_argument("--processes", type=int, default=None, metavar="N",
                   help="continue with N processes working together (default: as the run had)")
    p.add_argument("--detach", action="store_true")
    add_json_flag(p)
    p.set_defaults(func=cmd_resume)

    p = subparsers.add_parser("cancel", help="cancel a queued or running run")
    p.add_argument("run", type=id_arg("RUN"), metavar="RUN")
    add_json_flag(p)
    p.set_defaults(func=cmd_cancel)

    p = subparsers.add_parser("worker", help="run the job worker in the foreground")
    p.add_argument("--once", action="store_true", help="run at most one job")
    p.add_argument("--idle-exit", type=float, default=None, help="exit after N idle seconds")
    p.add_argument("--lane", choices=lanes.LANES, default=lanes.DEFAULT_LANE,
                   help="which jobs: train (default) or light (ingest, export, evaluate, predict)")
    p.add_argument("--host-id", default=None,
                   help="name of this host's workers when several hosts share the data dir "
                        "(default: WORKBENCH_HOST_ID, else hostname + a short id); see docs/SCALING.md")
    p.set_defaults(func=cmd_worker)


def follow(run_ids: Sequence[int], poll_s: float = 0.5, as_json: bool = False) -> int:
    """tqdm bars following the DB progress of each run in turn; 0 if all succeeded.
    ``as_json``: the final state of every run as JSON on stdout, the summary lines on stderr."""
    worst = 0
    finished = []
    for rid in run_ids:
        info = _follow_one(rid, poll_s)
        print(_describe(info), file=sys.stderr if as_json else sys.stdout)
        finished.append(info)
        worst = max(worst, 0 if info.status == RunStatus.SUCCEEDED else 1)
    if as_json:
        print_json(finished)
    return worst


def _follow_one(run_id: int, poll_s: float) -> runs.RunInfo:
    from tqdm import tqdm

    bar = tqdm(total=1000, desc=f"run {run_id} {runs.get_run(run_id).variant}", unit="‰", leave=True,
               bar_format="{desc}: {percentage:3.0f}%|{bar}| {postfix}")

    def show(info: runs.RunInfo) -> None:
        bar.n = int(1000 * min(1.0, (info.progress or {}).get("fraction") or 0.0))
        bar.set_postfix_str(runs.progress_text(info), refresh=True)

    try:
        return follow_run(run_id, on_update=show, poll_s=poll_s)
    finally:
        bar.close()


def _describe(info: runs.RunInfo) -> str:
    if info.status == RunStatus.SUCCEEDED and info.best_metrics:
        b = info.best_metrics
        sm = info.summary or {}
        test = ""
        if sm.get("test_accuracy") is not None:
            test = f"; test accuracy {sm['test_accuracy'] * 100:.1f} %"
            if sm.get("test_accuracy_lo") is not None and sm.get("test_accuracy_hi") is not None:
                test += (f" (95 % range {sm['test_accuracy_lo'] * 100:.0f}-{sm['test_accuracy_hi'] * 100:.0f} % "
                         f"on {sm.get('test_n', '?')} test images)")
        return (f"run {info.id} succeeded: val accuracy {b['accuracy']:.3f}, macro-F1 {b['macro_f1']:.3f} "
                f"(epoch {b['epoch']}), {info.train_seconds or 0:.0f} s{test}")
    return f"run {info.id} {info.status}" + (f": {info.error}" if info.error else "")


def cmd_train(args: argparse.Namespace) -> int:
    from core.image_kind import PRESET_FOR_KIND
    from core.trackers import TrackerError
    from core.train.robustness import DeviceError, check_device_name
    from core.weights import WeightsError
    from workbench.settings import get_settings

    preset = args.preset or (PRESET_FOR_KIND[args.image_kind] if args.image_kind else None)
    try:
        # Checked here for its spelling only: whether the GPU exists is the worker's machine's business.
        device = check_device_name(args.device or get_settings().device)
        overrides = {**({"device": device} if device != "auto" else {}),
                     **({"processes": args.processes} if args.processes is not None else {})}
        ids = runs.queue_training(args.dataset, args.variants or ["lite0"], resolution=args.resolution,
                                  preset=preset, recipe=args.recipe, epochs=args.epochs,
                                  batch_label=args.batch_label, track=args.track,
                                  overrides=overrides or None)
    except (runs.RunError, WeightsError, DeviceError, TrackerError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"Queued run(s) {', '.join(map(str, ids))}; worker pid {lanes.worker_pid() or 'starting'}.", file=human(args))
    if args.detach:
        if args.json:
            print_json([runs.get_run(i) for i in ids])
        return 0
    return _follow_or_leave(ids, args.json)


def _follow_or_leave(ids: Sequence[int], as_json: bool = False) -> int:
    try:
        return follow(ids, as_json=as_json)
    except KeyboardInterrupt:
        print(f"\nStopped following. Training continues in the background worker; "
              f"check with `workbench runs`, stop with `workbench cancel {ids[0]}`.")
        return 130


@guard  # --dataset naming no dataset: exit code 2, not a traceback
def cmd_runs(args: argparse.Namespace) -> int:
    worker.reconcile()
    rows = runs.list_runs(args.dataset)
    if args.json:
        print_json(rows)
        return 0
    if not rows:
        print("No runs yet.")
        return 0
    print(f"{'id':>4}  {'dataset':16} {'variant':8} {'res':>4} {'recipe':8} {'status':10} "
          f"{'val acc':>7} {'val F1':>7} {'train s':>8}  batch")
    for r in rows:
        b = r.best_metrics or {}
        acc = f"{b['accuracy']:.3f}" if "accuracy" in b else "-"
        f1 = f"{b['macro_f1']:.3f}" if "macro_f1" in b else "-"
        secs = f"{r.train_seconds:.0f}" if r.train_seconds else "-"
        status = r.status + ("*" if r.cancel_requested and r.status == RunStatus.RUNNING else "")
        print(f"{r.id:>4}  {r.dataset[:16]:16} {r.variant:8} {r.resolution:>4} {r.recipe[:8]:8} {status:10} "
              f"{acc:>7} {f1:>7} {secs:>8}  {r.batch_label or ''}")
        if r.status == RunStatus.FAILED and r.error:
            print(f"      error: {r.error}")
        for loss in r.summary.get("worker_losses", []):
            print(f"      {describe_worker_loss(loss)}")
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    worker.reconcile()  # a run whose worker died is still marked running: fail it, so it can resume
    try:
        runs.resume_run(args.run, processes=args.processes)
    except runs.RunError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"Run {args.run} queued to resume.", file=human(args))
    if args.detach:
        if args.json:
            print_json([runs.get_run(args.run)])
        return 0
    return _follow_or_leave([args.run], args.json)


def cmd_cancel(args: argparse.Namespace) -> int:
    try:
        state = runs.cancel_run(args.run)
    except runs.RunError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print_json({"run": args.run, "state": state})
        return 0
    print(f"Run {args.run}: {state}.")
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    import logging

    from workbench.settings import SettingsError, check_host_id

    logging.basicConfig(level=logging.INFO, format="%(asctime)s worker %(process)d %(levelname)s %(message)s")
    if args.host_id:
        try:
            os.environ["WORKBENCH_HOST_ID"] = check_host_id(args.host_id)
        except SettingsError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    rc = worker.run_worker(once=args.once, idle_exit_s=args.idle_exit, lane=args.lane)
    if rc == 3:
        print(f"Another {args.lane}-lane worker is already running (pid {lanes.worker_pid(lane=args.lane)}).",
              file=sys.stderr)
    return rc


def cmd_runs_delete(args: argparse.Namespace) -> int:
    try:
        info = runs.get_run(args.run)
        if not args.yes:
            if not sys.stdin.isatty():
                print(f"error: deleting run {args.run} needs --yes when not asked at a terminal", file=sys.stderr)
                return 2
            answer = input(f"Delete run {info.id} ({info.dataset}, {info.variant}@{info.resolution}, {info.status}) "
                           "with its checkpoints, evaluations and exports? [y/N] ")
            if answer.strip().lower() not in ("y", "yes"):
                print("Nothing deleted.")
                return 1
        res = runs.delete_run(args.run)
    except runs.RunError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print_json(res)
        return 0
    print(f"Deleted run {res.run_id}: {res.files_removed} registered files"
          + (" and its folder." if res.run_dir_removed else " (it had no folder)."))
    return 0
