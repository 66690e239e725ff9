"""Experiment trackers (MLflow file store, TensorBoard event files) on a real tiny training run,
and the model card's Hugging Face front matter checked against a real evaluation."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from builders import write_images

from core.trackers import (
    CallbackFanout,
    TrackerError,
    check_trackers,
    default_tracking_uri,
    open_trackers,
    run_artifacts,
)
from core.train import Callback, make_config, train

pytest.importorskip("mlflow")
pytest.importorskip("tensorboard")
ROOT = Path(__file__).resolve().parents[1]
LOGGED = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_macro_f1")


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory: pytest.TempPathFactory, monkeypatch_module: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("tracked")
    samples = write_images(root / "imgs", [8, 8])
    monkeypatch_module.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = {"variant": "lite0", "resolution": 64, "classes": ["a", "b"]}
    trackers = open_trackers(["mlflow", "tensorboard"], run_dir=root / "run", data_dir=root / "data",
                             run_name="test run", params=params, tags={"workbench.run_id": "7"})
    cfg = make_config("quick", head_epochs=1, finetune_epochs=1, unfreeze_stages=1, cache_views=1, batch_size=8,
                      head_batch_size=8, num_threads=2, patience=10)
    result = train(samples, ["a", "b"], "lite0", root / "run", cfg, resolution=64,
                   callback=CallbackFanout(Callback(), *trackers))
    for t in trackers:
        t.finish(run_artifacts(root / "run", result.best_path))
    return root, trackers, result


@pytest.fixture(scope="module")
def monkeypatch_module():  # type: ignore[no-untyped-def]
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_mlflow_file_store_has_params_metrics_and_artifacts(tracked_run) -> None:  # type: ignore[no-untyped-def]
    from mlflow.tracking import MlflowClient

    root, trackers, result = tracked_run
    mlflow_tracker = trackers[0]
    assert mlflow_tracker.tracking_uri == (root / "data" / "mlruns").resolve().as_uri()
    assert (root / "data" / "mlruns").is_dir()
    client = MlflowClient(mlflow_tracker.tracking_uri)  # read back from the files, a fresh client
    run = client.get_run(mlflow_tracker.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "test run"
    assert run.data.params["variant"] == "lite0" and run.data.params["classes"] == '["a", "b"]'
    assert run.data.tags["workbench.run_id"] == "7"
    assert len(result.history) == 2
    for key in LOGGED:
        logged = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        assert logged == [(rec["epoch"], pytest.approx(rec[key])) for rec in result.history], key
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert result.best_path.name in names


def test_tensorboard_event_files_hold_the_epochs(tracked_run) -> None:  # type: ignore[no-untyped-def]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root, _, result = tracked_run
    logdir = root / "run" / "tensorboard"
    assert list(logdir.glob("events.out.tfevents.*"))
    acc = EventAccumulator(str(logdir))
    acc.Reload()
    for key in LOGGED:
        got = [(e.step, e.value) for e in acc.Scalars(key)]
        assert got == [(rec["epoch"], pytest.approx(rec[key], rel=1e-6)) for rec in result.history], key


def test_tracking_uri_honours_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///elsewhere.db")
    assert default_tracking_uri(tmp_path) == "sqlite:///elsewhere.db"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert default_tracking_uri(tmp_path) == (tmp_path / "mlruns").resolve().as_uri()


def test_unknown_tracker_is_named() -> None:
    with pytest.raises(TrackerError, match=r"Unknown tracker 'wandb': choose mlflow or tensorboard\."):
        check_trackers(["wandb"])
    assert check_trackers(["MLflow", " tensorboard", "mlflow", ""]) == ("mlflow", "tensorboard")


def test_missing_tracker_package_says_what_to_install() -> None:
    code = ("import sys; sys.modules['mlflow'] = None\nfrom core.trackers import check_trackers, TrackerError\n"
            "try:\n    check_trackers(['mlflow'])\nexcept TrackerError as e:\n    print(e)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == ("Logging to MLflow needs the mlflow-skinny package, which is not installed. "
                                  "Install it with: pip install 'mlflow-skinny' (or: pip install "
                                  "'workbench[trackers]')."), out.stderr


def test_queue_training_refuses_an_unknown_tracker_before_queueing(data_dir: Path) -> None:
    from workbench import runs

    with pytest.raises(TrackerError, match="Unknown tracker 'wandb'"):
        runs.queue_training("no such dataset", ["lite0"], track=["wandb"], start_worker=False)


# --- the model card's front matter ------------------------------------------------------------
def test_model_card_front_matter_matches_the_evaluation(tmp_path: Path) -> None:
    from core.evaluate import EvalItem, evaluate_model
    from core.export import model_card
    from core.weights import create_model

    samples = write_images(tmp_path / "imgs", [6, 6])
    loaded = create_model("lite0", 2, resolution=64)
    items = [EvalItem(Path(p), y) for p, y in samples]
    metrics = evaluate_model(loaded.model.eval(), loaded.preprocessing, ["cat: ok", "dog"], items).metrics
    info = {"variant": "lite0", "classes": ["cat: ok", "dog"], "preprocessing": loaded.preprocessing,
            "dataset": {"name": "pets: a/b", "num_images": 12}, "metrics": metrics, "run_id": 5}
    card = model_card(info, {"model.onnx": "ab" * 32})
    assert card.startswith("---\n")
    head, sep, body = card[4:].partition("\n---\n")
    assert sep and body.lstrip().startswith("# Model card")
    meta = yaml.safe_load(head)
    assert meta["library_name"] == "onnx" and "image-classification" in meta["tags"]
    assert meta["datasets"] == ["pets: a/b"] and meta["base_model"] == "timm/tf_efficientnet_lite0.in1k"
    (entry,) = meta["model-index"]
    assert entry["name"] == "workbench-lite0-run5"
    (res,) = entry["results"]
    assert res["task"]["type"] == "image-classification" and res["dataset"]["split"] == "test"
    values = {m["type"]: m["value"] for m in res["metrics"]}
    assert values["accuracy"] == metrics["accuracy"] and values["f1"] == metrics["macro_f1"]
    assert values["balanced_accuracy"] == metrics["balanced_accuracy"]
    assert values.get("roc_auc") == metrics.get("macro_roc_auc")
    assert set(meta["metrics"]) == set(values)


def test_train_job_with_track_logs_to_both(data_dir: Path) -> None:
    """The worker's train handler wires the trackers the job asks for (``workbench train --track``)."""
    from builders import create_dataset_rows
    from mlflow.tracking import MlflowClient

    from storage.db import get_sessionmaker
    from workbench import runs, worker
    from workbench.paths import RunPaths
    from workbench.settings import get_settings

    settings = get_settings()
    create_dataset_rows(data_dir, get_sessionmaker(settings.database_url), "colours", [6, 6])
    (run_id,) = runs.queue_training("colours", ["lite0"], resolution=64, recipe="quick", epochs=1,
                                    overrides=dict(head_epochs=1, cache_views=1, batch_size=8, head_batch_size=8,
                                                   num_threads=1), postrun=False, start_worker=False,
                                    track=["mlflow", "tensorboard"])
    worker.run_worker(settings, once=True)
    info = runs.get_run(run_id)
    assert info.status == "succeeded", info.error
    assert list((RunPaths(settings, run_id).root / "tensorboard").glob("events.out.tfevents.*"))
    client = MlflowClient((data_dir / "mlruns").resolve().as_uri())
    (exp,) = [e for e in client.search_experiments() if e.name == "workbench"]
    (run,) = client.search_runs([exp.experiment_id], f"tags.`workbench.run_id` = '{run_id}'")
    assert run.info.status == "FINISHED" and run.data.params["variant"] == "lite0"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_accuracy")] == [1, 2]
