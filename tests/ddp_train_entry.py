"""``train()`` under torchrun for tests/test_train_ddp.py: reads a JSON spec, each rank writes its outcome.

Run as ``torchrun --standalone --nproc_per_node 2 tests/ddp_train_entry.py SPEC.json`` with the
repository root on PYTHONPATH. Spec: samples, val, classes, config, run_dir, out_dir, and
optionally ``stop_after_epoch`` (rank 0's callback asks to cancel after that epoch).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from core.train import Callback, TrainingCancelled, TrainingError, make_config, train


class StopAfterEpoch(Callback):
    def __init__(self, epoch: int | None):
        self.epoch, self.done = epoch, 0

    def on_epoch_end(self, phase: str, epoch: int, metrics: dict[str, Any]) -> None:
        self.done = epoch

    def should_stop(self) -> bool:
        return self.epoch is not None and self.done >= self.epoch


def main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    out: dict[str, Any]
    try:
        res = train([tuple(s) for s in spec["samples"]], spec["classes"], "lite0", spec["run_dir"],
                    make_config("quick", **spec["config"]), resolution=96,
                    val_samples=[tuple(s) for s in spec["val"]],
                    callback=StopAfterEpoch(spec.get("stop_after_epoch")), resume=bool(spec.get("resume")))
        out = {"status": res.status, "summary": res.summary, "history": res.history}
    except TrainingCancelled as exc:
        out = {"status": "cancelled", "message": str(exc)}
    except TrainingError as exc:
        out = {"status": "failed", "message": str(exc)}
    Path(spec["out_dir"], f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(out, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
