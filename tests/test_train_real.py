"""Real data end to end: rice_leaf_ph (RGBA PNGs, exact duplicates) ingested, then trained by the worker.

Quick recipe at 160 px so it fits the CI budget (< 2 min on 2 cores when the machine is not shared).
"""
from __future__ import annotations

from pathlib import Path

import pytest

from workbench import runs, worker
from workbench.settings import get_settings


@pytest.mark.slow
def test_rice_leaf_quick_recipe_through_the_worker(data_dir: Path, shared_datasets: Path) -> None:
    from workbench.datasets import add_dataset

    src = shared_datasets / "rice_leaf_ph"
    info = add_dataset(src, "rice")
    assert info.num_classes == 3
    (run_id,) = runs.queue_training("rice", ["lite0"], resolution=160, recipe="quick", postrun=False,
                                    start_worker=False)
    assert worker.run_worker(once=True) == 0
    run = runs.get_run(run_id)
    assert run.status == "succeeded", run.error
    assert run.preset == "field"
    metrics = runs.run_metrics(run_id)
    assert metrics and metrics[-1].epoch == len(metrics)
    # 3 classes: chance macro-F1 is ~0.33; a fine-tuned ImageNet model must be well above it.
    assert run.best_metrics["macro_f1"] > 0.6, run.best_metrics
    from core.train import load_trained_model
    tm = load_trained_model(get_settings().data_dir / run.checkpoint_path)
    assert tm.classes == sorted(tm.classes) and tm.resolution == 160
    print(f"rice_leaf_ph quick@160: val acc {run.best_metrics['accuracy']:.3f}, "
          f"macro-F1 {run.best_metrics['macro_f1']:.3f}, {run.train_seconds:.0f} s")
