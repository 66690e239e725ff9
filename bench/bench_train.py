"""Training benchmark through the product path: what `workbench train DATASET --recipe R` gives a user.

    .venv/bin/python bench/bench_train.py [--dataset beans] [--recipes quick default] [--seeds 5] \
        [--out bench/results_train.md] [--max-load 4]

For each measured run, exactly what a user's run goes through:

* the dataset is ingested into a throw-away data dir with the CLI (`workbench data add`, split
  seed 0: the split every user gets), once for the whole benchmark;
* each run is queued with the service the CLI's `workbench train` calls (``runs.queue_training``,
  the recipe's own settings, only the training seed changed) and trained by the worker process;
* the after-training step (fp32 export, verification, latency, test evaluation) runs as for any
  run, and the test accuracy / macro-F1 are the ones the leaderboard shows (with 95 % ranges).

Per recipe: mean, standard deviation and min-max over the seeds of test accuracy, test macro-F1,
training time (the run's ``train_seconds``) and end-to-end time (queued -> evaluated). The load
average is recorded before and after every run; runs started above ``--max-load`` wait (up to
10 minutes) for the machine to calm down, and a run that started loaded is marked.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "datasets"
RUN_TIMEOUT_S = 3600.0


def cli(*args: str, env: dict[str, str]) -> str:
    """Run the `workbench` CLI (same interpreter, this checkout) and return its stdout."""
    out = subprocess.run([sys.executable, "-m", "workbench.cli", *args], cwd=REPO, env=env, capture_output=True,
                         text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"`workbench {' '.join(args)}` failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    return out.stdout


def wait_for_calm(max_load: float, limit_s: float = 600.0) -> float:
    """Wait (bounded) until the 1-minute load average is below ``max_load``; return it."""
    deadline = time.monotonic() + limit_s
    while (load := os.getloadavg()[0]) >= max_load and time.monotonic() < deadline:
        print(f"  load {load:.1f} >= {max_load}: waiting", flush=True)
        time.sleep(15)
    return load


def one_run(dataset: str, recipe: str, seed: int, variant: str) -> dict:
    """Queue, train and evaluate one run through the worker; the figures the app shows for it."""
    from workbench import lanes, runs
    from workbench.status import TERMINAL, RunStatus

    t0 = time.perf_counter()
    (rid,) = runs.queue_training(dataset, [variant], recipe=recipe, batch_label=f"bench {recipe}",
                                 overrides={"seed": seed})
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while True:
        info = runs.get_run(rid)
        sm = info.summary or {}
        finished = info.status in TERMINAL and (info.status != RunStatus.SUCCEEDED or "test_accuracy" in sm
                                                or "evaluation_error" in sm or "postrun_error" in sm)
        if finished or time.monotonic() > deadline:
            break
        if lanes.worker_pid() is None and info.status not in TERMINAL:
            lanes.ensure_worker()
        time.sleep(2)
    wall = time.perf_counter() - t0
    return {"run": rid, "recipe": recipe, "seed": seed, "status": str(info.status), "error": info.error,
            "test_accuracy": sm.get("test_accuracy"), "test_accuracy_lo": sm.get("test_accuracy_lo"),
            "test_accuracy_hi": sm.get("test_accuracy_hi"), "test_macro_f1": sm.get("test_macro_f1"),
            "test_n": sm.get("test_n"), "val_accuracy": (info.best_metrics or {}).get("accuracy"),
            "train_s": info.train_seconds, "end_to_end_s": wall, "resolution": info.resolution,
            "latency_ms_p50": sm.get("latency_ms_p50"), "latency_note": sm.get("latency_note"),
            "evaluation_error": sm.get("evaluation_error") or sm.get("postrun_error")}


def spread(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
    """"mean ± sd (min-max)" of the measured values ("n/a" when none)."""
    v = [x * scale for x in values if x is not None]
    if not v:
        return "n/a"
    sd = statistics.stdev(v) if len(v) > 1 else 0.0
    return f"{statistics.mean(v):.{digits}f} ± {sd:.{digits}f} ({min(v):.{digits}f}-{max(v):.{digits}f})"


def report(rows: list[dict], args: argparse.Namespace, started: str, machine: str, counts: str) -> str:
    import torch

    lines = [f"# Training benchmark through the product path: {args.dataset}, {args.variant}", "",
             f"Date: {started}. Machine: `{machine}`, torch {torch.__version__}, python {platform.python_version()}.",
             "", f"Command: `.venv/bin/python bench/bench_train.py {' '.join(sys.argv[1:])}`", "",
             f"Path: `workbench data add` (split seed 0: {counts}), then per seed the service behind "
             "`workbench train --recipe R` (training seed changed only), the worker, and the automatic "
             "after-training export and test evaluation. Figures are what the leaderboard shows.", "",
             "| recipe | seeds | test accuracy % | test macro-F1 | training s | queued -> evaluated s |",
             "|---|---|---|---|---|---|"]
    for recipe in args.recipes:
        rs = [r for r in rows if r["recipe"] == recipe and r["test_accuracy"] is not None]
        lines.append(f"| {recipe} | {len(rs)} | {spread([r['test_accuracy'] for r in rs], 100)} | "
                     f"{spread([r['test_macro_f1'] for r in rs], 1, 3)} | {spread([r['train_s'] for r in rs], 1, 0)} | "
                     f"{spread([r['end_to_end_s'] for r in rs], 1, 0)} |")
    lines += ["", "Mean ± standard deviation (min-max) over the seeds. One test image is "
              f"{100 / max(1, rows[0].get('test_n') or 1):.1f} points of accuracy; each run's own 95 % range is "
              "in the details.", "", "Per run (load average before / after):", "",
              "| run | recipe | seed | status | test accuracy (95 % range) | macro-F1 | train s | e2e s | load |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        acc = ("n/a" if r["test_accuracy"] is None else f"{100 * r['test_accuracy']:.1f} % "
               f"({100 * (r['test_accuracy_lo'] or 0):.0f}-{100 * (r['test_accuracy_hi'] or 0):.0f} %)")
        f1 = "n/a" if r["test_macro_f1"] is None else f"{r['test_macro_f1']:.3f}"
        loaded = " (started loaded)" if r["load_before"] >= args.max_load else ""
        lines.append(f"| {r['run']} | {r['recipe']} | {r['seed']} | {r['status']} | {acc} | {f1} | "
                     f"{r['train_s'] or 0:.0f} | {r['end_to_end_s']:.0f} | {r['load_before']:.1f} / "
                     f"{r['load_after']:.1f}{loaded} |")
    lines += ["", "Details:", "", "```", *[json.dumps(r, default=str) for r in rows], "```", ""]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description="Training benchmark through the product path (workbench train).")
    ap.add_argument("--dataset", default="beans", help=f"a folder under {SHARED}")
    ap.add_argument("--recipes", nargs="+", default=["quick", "default"])
    ap.add_argument("--seeds", type=int, default=5, help="training seeds per recipe (0..N-1)")
    ap.add_argument("--variant", default="lite0")
    ap.add_argument("--max-load", type=float, default=4.0, help="wait before a run while the load is above this")
    ap.add_argument("--out", default=str(REPO / "bench" / "results_train.md"))
    args = ap.parse_args()

    data_dir = Path(tempfile.mkdtemp(prefix="wb-bench-train-"))
    os.environ["WORKBENCH_DATA_DIR"] = str(data_dir)  # before any workbench import reads the settings
    os.environ.pop("DATABASE_URL", None)
    os.environ["WORKBENCH_IMPORT_DIR"] = str(SHARED)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    sys.path.insert(0, str(REPO))
    from core.latency import machine_id
    from workbench import lanes

    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(f"data dir {data_dir}", flush=True)
    counts = cli("data", "add", str(SHARED / args.dataset), "--name", args.dataset, "--quiet", env=env).strip()
    print(counts, flush=True)
    rows = []
    try:
        for seed in range(args.seeds):  # seeds outer, recipes inner: a load change hits every recipe alike
            for recipe in args.recipes:
                before = wait_for_calm(args.max_load)
                print(f"== {recipe}, seed {seed} (load {before:.1f})", flush=True)
                row = one_run(args.dataset, recipe, seed, args.variant)
                row.update(load_before=before, load_after=os.getloadavg()[0])
                print(json.dumps(row, default=str), flush=True)
                rows.append(row)
    finally:
        for lane in lanes.LANES:  # the workers this benchmark started (its own data dir only)
            pid = lanes.worker_pid(lane=lane)
            if pid:
                os.kill(pid, 15)
    text = report(rows, args, started, machine_id(), counts.split(":", 1)[-1].strip())
    Path(args.out).write_text(text)
    print(text)
    return 0 if all(r["test_accuracy"] is not None for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
