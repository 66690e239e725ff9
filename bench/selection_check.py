"""Would a stricter winner rule have served users better? A replay on the recorded Auto cells.

The search delivers the trial with the best validation objective. On a small validation split, a
challenger can lead the starting point (trial 0: the recommender's pick with the default recipe,
trained exactly as `workbench train` trains it) by chance and then do worse on test: the winner's
curse. A common guard keeps the starting point unless a challenger's lead is more than k standard
errors of the starting point's validation score: SE = core.search.validation_noise, the figure the
Auto page and `workbench auto` show beside the winner (a binomial approximation on n_val images).

For several k, this script replays that guard on every (dataset, seed) recorded by
bench/bench_auto.py and reports the test macro-F1 a user would have got, and the issue's targets
against (b) `recommended` and (c) `timm`. The search does not test trial 0 unless it is a
finalist, so trial 0's test score is taken from the (b) cell of the same seed: the same model,
recipe and split, and training is deterministic. Where (b) recorded its validation score, the
script checks it equals trial 0's. Ties on validation (lead 0) keep the recorded result.

This checks one proposed rule on a dozen cells. It is not a way to choose k: choosing k by these
test figures would itself be selection on test.

    .venv/bin/python bench/selection_check.py [--cells bench/results_auto.jsonl] \
        [--out bench/results_selection.md]
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from core.search import validation_noise  # noqa: E402

GUARDS = (0.0, 0.5, 1.0, 2.0)  # k: 0 is the rule as shipped


@dataclass(frozen=True)
class Cell:
    dataset: str
    seed: int
    n_val: int
    val_start: float
    val_winner: float
    test_shipped: float  # what auto delivered
    test_start: float  # (b)'s test score: trial 0's model
    start_check: str  # (b)'s validation score against trial 0's
    test_timm: float

    @property
    def lead(self) -> float:
        return self.val_winner - self.val_start

    @property
    def se(self) -> float:
        return validation_noise(self.val_start, self.n_val) or 0.0

    def delivered(self, k: float) -> float:
        if k == 0 or self.lead <= 0 or self.lead > k * self.se:
            return self.test_shipped
        return self.test_start


def load_cells(path: Path) -> list[Cell]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    by: dict[tuple[str, int, str], dict[str, Any]] = {(r["dataset"], r["seed"], r["kind"]): r for r in rows}
    cells = []
    for (name, seed, kind), a in sorted(by.items()):
        b, c = by.get((name, seed, "recommended")), by.get((name, seed, "timm"))
        if kind != "auto" or b is None or c is None or a.get("val_start") is None or "split_counts" not in a:
            continue
        check = ("not recorded" if b.get("val_macro_f1") is None
                 else "equal" if math.isclose(b["val_macro_f1"], a["val_start"], abs_tol=1e-9) else "DIFFERENT")
        cells.append(Cell(name, seed, int(a["split_counts"]["val"]), a["val_start"], a["val_winner"],
                          a["macro_f1"], b["macro_f1"], check, c["macro_f1"]))
    return cells


def _pct(vals: list[float]) -> str:
    sd = statistics.stdev(vals) * 100 if len(vals) > 1 else 0.0
    return f"{statistics.mean(vals) * 100:.1f} ± {sd:.1f}"


def report(cells: list[Cell]) -> list[str]:
    lines = ["# Winner rule check: replaying a validation-noise guard on the recorded Auto cells", "",
             "Made by `python bench/selection_check.py` from `bench/results_auto.jsonl`; see its docstring.", "",
             "| dataset | seed | val images | trial 0 val % | winner val % | lead (pts) | SE (pts) "
             "| (b) val check | test: shipped % | test: trial 0 % |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for c in cells:
        lines.append(f"| {c.dataset} | {c.seed} | {c.n_val} | {c.val_start * 100:.1f} | {c.val_winner * 100:.1f} "
                     f"| {c.lead * 100:.2f} | {c.se * 100:.2f} | {c.start_check} | {c.test_shipped * 100:.1f} "
                     f"| {c.test_start * 100:.1f} |")
    names = sorted({c.dataset for c in cells})
    lines += ["", "Test macro-F1 % delivered (mean ± sd over seeds) when a challenger must lead trial 0 by more "
              "than k SE; k = 0 is the rule as shipped:", "",
              "| dataset | seeds | " + " | ".join(f"k = {k:g}" for k in GUARDS) + " | (b) recommended | (c) timm |",
              "|---|---|" + "---|" * (len(GUARDS) + 2)]
    beats = {k: 0 for k in GUARDS}
    short: dict[float, list[str]] = {k: [] for k in GUARDS}
    for name in names:
        cs = [c for c in cells if c.dataset == name]
        b = statistics.mean(c.test_start for c in cs)
        t = statistics.mean(c.test_timm for c in cs)
        row = [f"| {name} | {len(cs)}"]
        for k in GUARDS:
            m = statistics.mean(c.delivered(k) for c in cs)
            # Compared at 0.05-point resolution, the table's: equal means are a tie, not a loss.
            beats[k] += round(m * 1000) > round(max(b, t) * 1000)
            if round(m * 1000) < round(max(b, t) * 1000):
                short[k].append(f"{name} ({(m - max(b, t)) * 100:+.1f})")
            row.append(_pct([c.delivered(k) for c in cs]))
        row += [_pct([c.test_start for c in cs]), _pct([c.test_timm for c in cs])]
        lines.append(" | ".join(row) + " |")
    overall = {k: statistics.mean(c.delivered(k) for c in cells) for k in GUARDS}
    lines += ["", "Targets (issue 11): at least the better of (b) and (c) on every dataset; strictly better on at "
              "least two.", ""]
    for k in GUARDS:
        lines.append(f"- k = {k:g}: beats both on {beats[k]} dataset(s); below the better of them on "
                     f"{', '.join(short[k]) or 'none'}; mean over all {len(cells)} cells {overall[k] * 100:.1f} %.")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cells", default=str(REPO / "bench" / "results_auto.jsonl"))
    ap.add_argument("--out", default=str(REPO / "bench" / "results_selection.md"))
    args = ap.parse_args()
    cells = load_cells(Path(args.cells))
    if not cells:
        print("No auto cell with its (b) and (c) cells, validation figures and split sizes recorded.")
        return 1
    lines = report(cells)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
