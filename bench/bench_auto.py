"""Auto search benchmark: what `workbench auto` delivers vs the recommender's pick vs a plain timm
fine-tune, per shared dataset and seed, through the product's own code path.

    .venv/bin/python bench/bench_auto.py [--datasets beans rice_leaf_ph mednist_3k hymenoptera] \
        [--seeds 0 1 2] [--time 10m] [--only auto recommended timm] [--redo]

The whole grid takes about 3.5 hours on a 2-core CPU, so each finished cell (dataset, seed,
contender) is appended to bench/results_auto.jsonl and skipped on the next run: the grid can be
filled in pieces, on an idle machine each time, and bench/results_auto.md is rewritten from all
recorded cells.

For each dataset and seed, in a throw-away data dir: the dataset is ingested with the service the
CLI uses (same split rules, split seed = the run seed), then
  (a) `auto`: searches.start_search(..., device="this-machine", time_budget) run by the train-lane
      worker exactly as `workbench auto DATASET --time 10m` does; the winner's test macro-F1;
  (b) the recommender's first pick for this machine, trained with the default recipe through
      runs.queue_training + the same worker (as `workbench train --variant PICK`);
  (c) a plain timm fine-tune of tf_efficientnet_lite0 with the same offline ImageNet weights on the
      same train split: one frozen epoch then three unfrozen at 224 px, AdamW, one-cycle, label
      smoothing 0.1, batch 32, RandomResizedCrop + flip; evaluated on the same test split.
Reported: test macro-F1 and accuracy (mean, sd over seeds), wall time, and for (a) how much of the
search went to decoding and caching vs training, and the trials run / pruned. The machine load
before each contender is recorded (time only on an otherwise idle machine).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared" / "datasets"
KINDS = ["auto", "recommended", "timm"]


def _use_data_dir(d: Path) -> None:
    from storage.db import reset_sessionmakers

    os.environ["WORKBENCH_DATA_DIR"] = str(d)
    os.environ.pop("DATABASE_URL", None)
    reset_sessionmakers()


def _wait(pred: Any, timeout: float, poll: float = 2.0) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(poll)
    raise TimeoutError("gave up waiting")


def _test_metrics(run_id: int) -> dict[str, float]:
    from workbench import runs

    sm = runs.get_run(run_id).summary
    return {"macro_f1": float(sm.get("test_macro_f1", float("nan"))),
            "accuracy": float(sm.get("test_accuracy", float("nan")))}


def run_auto(name: str, seed: int, budget: str) -> dict[str, Any]:
    from workbench import searches

    t0 = time.perf_counter()
    info = searches.start_search(name, time_budget=budget, seed=seed)
    info = _wait(lambda: (lambda i: i if not i.active else None)(searches.get_search(info.id)),
                 timeout=searches.parse_duration(budget) + 1800)
    wall = time.perf_counter() - t0
    if info.winner_run_id is None:
        return {"error": info.error or info.status, "wall_s": wall}
    cache = info.summary.get("cache", {})
    trial_s = sum(t.seconds or 0 for t in info.trials)
    return {**_test_metrics(info.winner_run_id), "wall_s": wall, "spent_s": info.spent_s,
            "winner": next(t.model for t in info.trials if t.winner), "trials": len(info.trials),
            # Validation is what the search chose on: the winner's and the starting point's (trial 0).
            "val_winner": next(t.value for t in info.trials if t.winner),
            "val_start": next((t.value for t in info.trials if t.number == 0), None),
            "pruned": sum(t.status == "pruned" for t in info.trials),
            "decode_s": cache.get("seconds_decoding", 0.0), "cache_s": cache.get("seconds_caching", 0.0),
            "train_s": max(0.0, trial_s - cache.get("seconds_decoding", 0.0) - cache.get("seconds_caching", 0.0)),
            "finalize_s": info.summary.get("finalize_seconds")}


def run_recommended(name: str, seed: int) -> dict[str, Any]:
    from workbench import recommend, runs
    from workbench.status import TERMINAL_RUN

    rec = recommend.recommend_for({"device": "this-machine"}, check_hub=False)
    pick = rec["recommended"]["key"]
    variant, _, res = pick.partition("@")
    t0 = time.perf_counter()
    [rid] = runs.queue_training(name, [variant], resolution=int(res) if res else None, recipe="default",
                                overrides={"seed": seed})
    _wait(lambda: runs.get_run(rid).status in TERMINAL_RUN and runs.get_run(rid).summary.get("test_accuracy")
          is not None, timeout=7200)
    val = runs.get_run(rid).best_metrics or {}
    return {**_test_metrics(rid), "wall_s": time.perf_counter() - t0, "pick": pick,
            "val_macro_f1": val.get("macro_f1")}


def run_timm(name: str, seed: int) -> dict[str, Any]:
    import numpy as np
    import timm
    import torch
    import torchvision.transforms as T
    from sklearn.metrics import f1_score
    from torch.utils.data import DataLoader, Dataset

    from core.images import load_rgb
    from core.preprocessing import preprocess
    from core.weights import create_model
    from storage import repositories as repo
    from storage.artifacts import resolve_in_data_dir
    from storage.db import get_sessionmaker
    from workbench.settings import get_settings

    st = get_settings()
    with get_sessionmaker(st.database_url)() as s:
        ds = repo.get_dataset_by_name_or_id(s, name)
        index = {c: i for i, c in enumerate(ds.classes)}
        split = {sp: [(str(resolve_in_data_dir(im.store_path, st.data_dir)), index[im.label])
                      for im in repo.images_for_dataset(s, ds.id, sp)] for sp in ("train", "test")}
        classes = list(ds.classes)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    loaded = create_model("lite0", len(classes), resolution=224)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=len(classes))
    # Same key names as timm's (checked): the ImageNet weights load whole, never a silent partial load.
    keys = model.load_state_dict(loaded.model.state_dict(), strict=False)
    if keys.missing_keys or keys.unexpected_keys:
        raise RuntimeError(f"ImageNet weights did not load into timm's model: {keys}")
    pre = loaded.preprocessing
    tf = T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(pre.mean, pre.std)])
    tr = split["train"]

    class Folder(Dataset):
        def __len__(self) -> int:
            return len(tr)

        def __getitem__(self, i: int) -> Any:
            return tf(load_rgb(tr[i][0])), tr[i][1]

    loader = DataLoader(Folder(), batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(seed))
    crit = torch.nn.CrossEntropyLoss(label_smoothing=0.1)

    def epochs(n: int, params: Any) -> None:
        opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-2)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=n * len(loader))
        model.train()
        for _ in range(n):
            for x, y in loader:
                opt.zero_grad()
                crit(model(x), y).backward()
                opt.step()
                sched.step()

    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.get_classifier().parameters():
        p.requires_grad_(True)
    epochs(1, model.get_classifier().parameters())
    for p in model.parameters():
        p.requires_grad_(True)
    epochs(3, model.parameters())
    wall = time.perf_counter() - t0
    model.eval()
    preds = []
    with torch.inference_mode():
        for i in range(0, len(split["test"]), 32):
            x = torch.from_numpy(np.stack([preprocess(load_rgb(p), pre) for p, _ in split["test"][i:i + 32]]))
            preds += model(x).argmax(1).tolist()
    y = [lab for _, lab in split["test"]]
    return {"macro_f1": float(f1_score(y, preds, average="macro")),
            "accuracy": float(np.mean(np.array(preds) == np.array(y))), "wall_s": wall}


def _fmt(vals: list[float], pct: bool = True) -> str:
    vals = [v for v in vals if v == v]
    if not vals:
        return "-"
    k = 100 if pct else 1
    sd = statistics.stdev(vals) * k if len(vals) > 1 else 0.0
    return f"{statistics.mean(vals) * k:.1f} ± {sd:.1f}"


def _cells(path: Path) -> list[dict[str, Any]]:
    """Every result recorded so far (one JSON object per line), so the benchmark can be run in pieces."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _run_cell(name: str, seed: int, kind: str, budget: str, split_counts: dict[str, int]) -> dict[str, Any]:
    load = os.getloadavg()
    out = (run_auto(name, seed, budget) if kind == "auto" else
           run_recommended(name, seed) if kind == "recommended" else run_timm(name, seed))
    # The split sizes let bench/selection_check.py judge validation differences against their noise.
    return {"dataset": name, "seed": seed, "kind": kind, "budget": budget, **out, "split_counts": split_counts,
            "load_before": [round(x, 2) for x in load], "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def _val_note(res: list[dict[str, Any]], key: str, label: str) -> str:
    vals = [r[key] for r in res if r.get(key) is not None]
    return f"; {label} {_fmt(vals)} ({len(vals)} seeds)" if vals else ""


def _table(cells: list[dict[str, Any]], command: str) -> list[str]:
    from core.latency import machine_id

    lines = [f"# Auto search benchmark (updated {time.strftime('%Y-%m-%d')})", "",
             f"Machine: {machine_id()}. Command (each run adds its missing cells to "
             f"`bench/results_auto.jsonl`, then rewrites this table from all of them): `{command}`", "",
             "| dataset | contender | seeds | test macro-F1 % | test accuracy % | wall time s | notes |",
             "|---|---|---|---|---|---|---|"]
    rows: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for c in cells:
        rows.setdefault((c["dataset"], c["kind"]), []).append(c)
    for (name, kind), res in sorted(rows.items(), key=lambda kv: (kv[0][0], KINDS.index(kv[0][1]))):
        note = ""
        if kind == "auto":
            note = (f"budget {res[0].get('budget')}; trials {statistics.mean(r.get('trials', 0) for r in res):.1f}, "
                    f"pruned {statistics.mean(r.get('pruned', 0) for r in res):.1f}; decoding "
                    f"{statistics.mean(r.get('decode_s', 0) for r in res):.0f} s, caching "
                    f"{statistics.mean(r.get('cache_s', 0) for r in res):.0f} s, training "
                    f"{statistics.mean(r.get('train_s', 0) for r in res):.0f} s; winners "
                    + ", ".join(str(r.get("winner")) for r in res)
                    + _val_note(res, "val_winner", "winner's validation macro-F1"))
        elif kind == "recommended":
            note = "pick " + ", ".join(str(r.get("pick")) for r in res) + _val_note(res, "val_macro_f1",
                                                                                      "validation macro-F1")
        errors = [str(r["error"]) for r in res if "error" in r]
        if errors:
            note += "; failed: " + "; ".join(errors)
        lines.append(f"| {name} | {kind} | {', '.join(str(r['seed']) for r in res)} | "
                     f"{_fmt([r.get('macro_f1', float('nan')) for r in res])} | "
                     f"{_fmt([r.get('accuracy', float('nan')) for r in res])} | "
                     f"{_fmt([r['wall_s'] for r in res], pct=False)} | {note} |")
    lines += ["", "Mean ± sample standard deviation over the seeds listed. Load average (1, 5, 15 min) "
              "before each cell:", ""]
    lines += [f"- {c['dataset']} {c['kind']} seed {c['seed']} ({c.get('when', '?')}): {c['load_before']}"
              for c in cells]
    return lines


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--datasets", nargs="+", default=["beans", "rice_leaf_ph", "mednist_3k", "hymenoptera"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--time", default="10m")
    ap.add_argument("--only", nargs="+", default=list(KINDS), choices=KINDS)
    ap.add_argument("--redo", action="store_true", help="run cells again even if recorded")
    ap.add_argument("--cells", default=str(REPO / "bench" / "results_auto.jsonl"))
    ap.add_argument("--out", default=str(REPO / "bench" / "results_auto.md"))
    args = ap.parse_args()
    from tests.conftest import stop_workers
    from workbench import datasets

    store = Path(args.cells)
    for name in args.datasets:
        for seed in args.seeds:
            done = {(c["dataset"], c["seed"], c["kind"]) for c in _cells(store)}
            todo = [k for k in args.only if args.redo or (name, seed, k) not in done]
            if not todo:
                continue
            with tempfile.TemporaryDirectory(prefix="wb-bench-auto-") as tmp:
                d = Path(tmp) / "data"
                d.mkdir()
                _use_data_dir(d)
                info = datasets.add_dataset(SHARED / name, name, seed=seed)
                try:
                    for kind in todo:
                        cell = _run_cell(name, seed, kind, args.time, dict(info.split_config["counts"]))
                        print(json.dumps(cell), flush=True)
                        with store.open("a") as f:
                            f.write(json.dumps(cell) + "\n")
                finally:
                    stop_workers(d)
    command = "python bench/bench_auto.py --datasets ... --seeds ... --time " + args.time
    lines = _table(_cells(store), command)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
