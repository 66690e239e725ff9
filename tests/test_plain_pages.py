"""The pages a lab technician reads speak plain language: no raw field names, no "None",
metrics explained where they first appear. Real data dir, real ingest of bean-leaf images."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from builders import assert_clean, open_page
from plain_language import assert_plain_language, plain_language_problems


class _Fake:  # the shape AppTest elements have, to prove the checker itself can fail
    def __init__(self, value: str) -> None:
        self.value = value


class _Page:
    def __init__(self, texts: list[str]) -> None:
        self.markdown = [_Fake(t) for t in texts]
        for kind in ("title", "header", "subheader", "caption", "info", "warning", "success", "error", "metric",
                     "dataframe"):
            setattr(self, kind, [])


def test_checker_catches_field_names_and_none_but_not_paths_or_code() -> None:
    bad = _Page(["latency_p50_ms (+15 %)", "onnx_mb 4.2", "Best: None", "score nan"])
    assert len(plain_language_problems(bad)) == 4
    ok = _Page(["Data dir: `/tmp/work_dir`", "file bean_rust_0022.jpg", "class bean_rust", "Nonetheless fine"])
    assert plain_language_problems(ok, allow={"bean_rust"}) == []


@pytest.fixture(scope="module")
def beans_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One ingested dataset (2 classes x 10 real bean images) in its own data dir, shared by the tests."""
    from conftest import SHARED_DATASETS, on_postgresql

    from storage.db import reset_sessionmakers

    if on_postgresql():
        pytest.skip("SQLite data dir only (the PostgreSQL pass runs test_pages)")
    if not SHARED_DATASETS.is_dir():
        pytest.skip("shared datasets not present")
    root = tmp_path_factory.mktemp("plain")
    src = root / "src"
    for cls in ("healthy", "bean_rust"):
        (src / cls).mkdir(parents=True)
        for f in sorted((SHARED_DATASETS / "beans" / "train" / cls).iterdir())[:10]:
            (src / cls / f.name).write_bytes(f.read_bytes())
    data = root / "data"
    data.mkdir()
    mp = pytest.MonkeyPatch()
    mp.setenv("WORKBENCH_DATA_DIR", str(data))
    mp.delenv("DATABASE_URL", raising=False)
    reset_sessionmakers()
    from workbench import datasets

    try:
        datasets.add_dataset(src, "beans-plain")
    finally:
        mp.undo()
        reset_sessionmakers()
    return data


@pytest.fixture
def with_beans(beans_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    from storage.db import reset_sessionmakers

    monkeypatch.setenv("WORKBENCH_DATA_DIR", str(beans_dir))
    monkeypatch.delenv("DATABASE_URL", raising=False)
    reset_sessionmakers()
    yield beans_dir
    reset_sessionmakers()


ALLOW = {"bean_rust", "beans-plain"}


# Every page, with a dataset and no run yet; Runs, Evaluate, Export and Predict with a finished run are
# checked in test_pages.py, which shares one real training run between its tests.
@pytest.mark.parametrize("name", ["home", "datasets", "recommend", "auto", "train", "runs", "evaluate", "export",
                                  "predict", "settings"])
def test_page_reads_as_plain_language(with_beans: Path, name: str) -> None:
    at = open_page(name)
    assert_clean(at)
    assert_plain_language(at, allow=ALLOW)


def test_datasets_page_explains_its_report(with_beans: Path) -> None:
    at = open_page("datasets")
    helps = {m.label: m.help for m in at.metric}
    assert "largest class" in helps["Imbalance"] and "same picture" in helps["Duplicate groups"]
    text = " ".join(c.value for c in at.caption)
    assert "These look like: **Field or leaf photo**" in text
    per_class = next(d.value for d in at.dataframe if "typical width (px)" in d.value.columns)
    assert set(per_class["class"]) == {"healthy", "bean_rust"}


def test_train_page_offers_the_image_kind_and_caps_the_resolution(with_beans: Path) -> None:
    at = open_page("train")
    assert_clean(at)
    kind = next(b for b in at.selectbox if b.label == "What are these images?")
    assert kind.value == "field"
    preset_radio = next(r for r in at.radio if r.label == "Augmentation preset")
    assert preset_radio.value == "field"
    kind.select("microscopy").run()
    preset_radio = next(r for r in at.radio if r.label == "Augmentation preset")
    assert preset_radio.value == "microscopy"
    # Bean photos are 500 px: no cap below the usual 224 px.
    assert at.select_slider(key="train_resolution").value == 224


def test_progress_and_time_formatting() -> None:
    from workbench import ui

    assert ui.progress_text({"phase": "cache", "message": "cache epoch 0 step 1/124"}) == "Preparing images (1 of 124)"
    assert ui.progress_text({"phase": "finetune", "message": "finetune epoch 2 step 40/124"}) == \
        "Fine-tuning the whole model: round 3, 40 of 124"
    assert ui.fmt_seconds(539.9) == "9 min" and ui.fmt_seconds(42) == "42 s" and ui.fmt_seconds(7260) == "2 h 01 min"
    assert ui.fmt_seconds(None) == "—"
    assert ui.ordinal(1) == "first" and ui.ordinal(12) == "12th" and ui.ordinal(22) == "22nd"
    assert ui.plain_rows([{"onnx_mb": 4.2345, "latency_ms_p50": None}]) == [
        {"Model file (MB)": 4.23, "Typical time per image (ms)": "—"}]


def test_sensible_defaults(data_dir: Path) -> None:
    """Predict opens the best exported model of the dataset; Runs opens on one dataset;
    curves open on validation macro-F1."""
    from storage import repositories as repo
    from storage.db import get_sessionmaker
    from storage.models import Artifact, Run
    from workbench import suggestions, views
    from workbench.settings import get_settings

    assert views.default_predict_run(None) is None and views.newest_dataset_id() is None
    sm = get_sessionmaker(get_settings().database_url)
    with sm.begin() as s:
        old = repo.add_dataset(s, name="old", source="a.zip", classes=["a", "b"], health={}, split_config={},
                               skipped=[], num_images=0)
        new = repo.add_dataset(s, name="new", source="b.zip", classes=["a", "b"], health={}, split_config={},
                               skipped=[], num_images=0)
        ids = {}
        # (validation macro-F1, test macro-F1): the runs with the best test score are never the default
        for key, ds, (f1, test), status in [
                ("best", old, (0.9, 0.7), "succeeded"), ("exported", old, (0.8, 0.6), "succeeded"),
                ("test_best", old, (0.85, 0.99), "succeeded"), ("failed", old, (0.99, 0.99), "failed"),
                ("other", new, (0.95, 0.5), "succeeded"), ("other_test_best", new, (0.6, 0.97), "succeeded")]:
            run = Run(dataset_id=ds.id, variant="lite0", resolution=224, preset="field", status=status,
                      config={}, summary={"test_macro_f1": test}, best_metrics={"macro_f1": f1})
            s.add(run)
            s.flush()
            ids[key] = run.id
        old_id, new_id = old.id, new.id
    assert views.default_predict_run(old_id) == ids["best"]  # nothing exported yet: the best validation score
    with sm.begin() as s:
        s.add(Artifact(run_id=ids["exported"], kind="bundle", path="x.zip", sha256="0" * 64, bytes=1))
    assert views.default_predict_run(old_id) == ids["exported"]  # an exported model beats a better unexported one
    assert views.default_predict_run(new_id) == ids["other"]
    assert views.newest_dataset_id() == new_id  # the dataset of the newest run

    # The pages open on those defaults (the model is only loaded when Predict is pressed).
    at = open_page("predict")
    assert_clean(at)
    assert at.selectbox(key="predict_dataset").value == new_id
    assert at.selectbox(key=f"predict_run_{new_id}").value == ids["other"]
    at.selectbox(key="predict_dataset").select(old_id).run()
    assert at.selectbox(key=f"predict_run_{old_id}").value == ids["exported"]
    at = open_page("runs")
    assert at.selectbox(key="runs_dataset").value == new_id
    table = at.dataframe[0].value  # one dataset's runs, not all on one front; validation first
    assert list(table["run"]) == [ids["other"], ids["other_test_best"]]
    at = open_page("evaluate")
    assert at.selectbox(key="eval_run").value == ids["other"]  # the best run (by validation) of the newest dataset
    at = open_page("export")
    assert at.selectbox(key="export_run").value == ids["other"]  # not the newest, not the best test score
    at = open_page("datasets")
    assert at.selectbox(key="dataset_choice").value == "new"
    with sm.begin() as s:  # a second upload: the page follows it
        repo.add_dataset(s, name="newer", source="c.zip", classes=["a", "b"], health={}, split_config={},
                         skipped=[], num_images=0)
    at.run()
    assert at.selectbox(key="dataset_choice").value == "newer"
    assert suggestions.curve_metric_choices(["best_epoch", "train_loss", "val_accuracy", "val_macro_f1"]) == [
        "val_macro_f1", "val_accuracy", "train_loss"]


# --- the wording of the Runs, Evaluate and Predict pages (workbench/wording.py) ----------------

THREE = {"classes": ["platelet", "RBC", "WBC"], "confusion_matrix": [[68, 0, 1], [2, 40, 3], [0, 0, 0]]}


def test_found_sentences_count_what_each_class_was_called() -> None:
    from workbench import wording

    assert wording.found_sentences(THREE) == ["68 of 69 platelet found, 1 called WBC.",
                                              "40 of 45 RBC found, 3 called WBC, 2 called platelet.",
                                              "No test images of WBC."]
    assert wording.found_sentences(THREE, most=1)[1] == "40 of 45 RBC found, 3 called WBC and 2 called another class."
    assert wording.sensitivity_specificity(THREE) == ""  # three classes: no sensitivity/specificity pair


def test_two_class_sensitivity_specificity_and_operating_point() -> None:
    from workbench import wording

    m = {"classes": ["normal", "pneumonia"], "confusion_matrix": [[45, 5], [2, 48]],
         "operating_point": {"target_sensitivity": 0.95, "threshold": 0.3123, "sensitivity": 0.98,
                             "specificity": 0.86, "positive_class": "pneumonia", "chosen_on": "val"}}
    assert wording.sensitivity_specificity(m) == (
        "**Sensitivity 96 %**: 48 of 50 pneumonia images found. **Specificity 90 %**: 45 of 50 normal images "
        "correctly not called pneumonia.")
    op = wording.operating_point_sentence(m["operating_point"])
    assert "at least 95 % of pneumonia images" in op and "31.2 %" in op and "validation images" in op
    assert "98 %" in op and "86 %" in op
    assert wording.operating_point_sentence({"error": "only for two classes"}) == ""
    m["operating_point"]["positive_class"] = "normal"  # the user's chosen class is the one looked for
    assert wording.sensitivity_specificity(m).startswith("**Sensitivity 90 %**: 45 of 50 normal")


def test_scores_tables_and_times_in_plain_words() -> None:
    from datetime import datetime

    from workbench import wording
    from workbench.views import LeaderboardRow

    assert wording.top_k_sentence({"top3": 0.991, "top1": 0.9}) == \
        "The right class is the model's first answer for 90.0 %, among its first 3 for 99.1 % of the test images."
    assert wording.calibration_sentence({"temperature": 1.4567, "n_val": 80, "before": {"ece": 0.08123},
                                         "after": {"ece": 0.0312}}) == \
        "Confidences adjusted on 80 validation images (temperature 1.46): calibration error 0.081 → 0.031."
    rows = wording.per_class_table({"per_class": [
        {"class": "a", "precision": 0.91234, "recall": 0.5, "f1": 0.6, "support": 10, "counted": True,
         "roc_auc": None, "average_precision": float("nan")},
        {"class": "b", "precision": None, "recall": None, "f1": None, "support": 0, "counted": False}]})
    assert rows[0]["precision"] == 0.912 and rows[0]["found (recall)"] == "50.0 %"
    assert rows[0]["ROC-AUC"] == "—" and rows[0]["average precision"] == "—"
    assert rows[1]["found (recall)"] == "—" and rows[1]["in the averages"] == "no (no test images)"
    assert wording.misclassified_table([{"index": 3, "path": "/x/y.jpg", "name": "y.jpg", "true": "a",
                                         "predicted": "b", "confidence": 0.8771, "loss": 2.1}]) == [
        {"image": "y.jpg", "true class": "a", "the model said": "b", "with confidence": "87.7 %"}]
    row = LeaderboardRow(run=7, dataset="beans", variant="lite0", resolution=96, preset="field", status="succeeded",
                         test_macro_f1=0.91234, test_accuracy=None, val_accuracy=None, latency_ms=1.50492,
                         size_mb=13.4863, params_m=3.37357, train_seconds=539.9, batch=None,
                         created=datetime(2026, 1, 1))
    (table,) = wording.leaderboard_table([row])
    assert table["training time"] == "9 min" and table["batch"] == "—"
    assert (table["test macro-F1"], table["latency ms"], table["size MB"]) == (0.912, 1.5, 13.5)
    assert table["validation macro-F1"] is None and table["test accuracy 95 % range"] == "—"
    assert wording.duration(3599.0) == "1 h 00 min" and wording.duration(None) == "—"
    assert [wording.percent(x) for x in (0.9487, 1.0, 0.0, 0.9991, 0.999999, 1e-7, None)] == [
        "95 %", "100 %", "0 %", "99.9 %", "over 99.99 %", "under 0.01 %", "—"]
    assert wording.curve_label("val_macro_f1") == "Validation macro-F1"
    assert wording.curve_label("val_sensitivity_at_specificity") == "Validation sensitivity at high specificity"
    assert wording.decision_sentence({"threshold": 0.25, "positive_class": "sick", "negative_class": "well",
                                      "chosen_on": "val"}) == (
        "Decision: **sick** when its probability is at least 25.0 %, otherwise **well** (threshold chosen on the "
        "validation images).")
