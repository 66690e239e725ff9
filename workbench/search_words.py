"""A search in plain words: the trials table and the one-line progress the pages, CLI and API show."""
from __future__ import annotations

from typing import Any

from workbench.searches import SearchInfo, minutes
from workbench.status import RunStatus

STATE_WORDS: dict[str, str] = {
    **{s: str(s) for s in RunStatus}, RunStatus.SUCCEEDED: "done", RunStatus.PRUNED: "stopped early",
    RunStatus.RUNNING: "training", RunStatus.CANCELLED: "stopped (time)", RunStatus.QUEUED: "waiting"}


def trial_rows(info: SearchInfo) -> list[dict[str, Any]]:
    """The trials as a table in plain words (pages, CLI --json readers use ``info.trials``)."""
    rows = []
    for t in info.trials:
        role = "winner" if t.winner else ("finalist" if t.finalist else ("best for its speed" if t.pareto else ""))
        rows.append({"Trial": t.number, "Run": t.run_id, "Model": t.model,
                     "State": STATE_WORDS.get(t.status, t.status), "Validation score": t.value,
                     "Speed on the device (ms per image)": t.latency_ms, "Training time (s)": t.seconds,
                     "Test accuracy": t.test_accuracy, "Role": role})
    return rows


def progress_line(info: SearchInfo) -> str:
    """'4 min of 10 min used · 5 trials: 2 done, 2 stopped early, 1 training · best so far 0.931'."""
    counts: dict[str, int] = {}
    for t in info.trials:
        word = STATE_WORDS.get(t.status, t.status)
        counts[word] = counts.get(word, 0) + 1
    best = next((t for t in info.trials if t.run_id == info.best_run_id), None)
    parts = [f"{minutes(info.spent_s)} of {minutes(info.time_budget_s)} used",
             f"{len(info.trials)} trial(s)" + (": " + ", ".join(f"{n} {w}" for w, n in counts.items())
                                               if counts else "")]
    if best is not None and best.value is not None:
        parts.append(f"best so far {best.value:.3f} ({best.model})")
    return " · ".join(parts)
