"""The typed views pages read, built from records as the product stores them (a health report from
``core.health``, metrics from ``core.metrics``, run summaries in the database), and from older rows
that lack the newer keys: those get the defaults, not a KeyError on the page."""
from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from core.health import build_health
from core.metrics import calibration, classification_metrics, softmax
from workbench import views
from workbench.status import JobKind, JobStatus, RunStatus
from workbench.summary import RunSummary


@dataclass
class Picture:  # what core.health reads of an image (its ImageLike protocol)
    sha256: str
    phash: str
    label: str
    split: str
    width: int = 320
    height: int = 240
    mode: str = "RGB"
    original_name: str = "x.jpg"


def stored(value: dict[str, Any]) -> dict[str, Any]:
    """As a JSON column gives it back."""
    return json.loads(json.dumps(value))


def pictures() -> list[Picture]:
    """Two classes of 12; one file sits in both train and test (an exact duplicate that leaks)."""
    bits = random.Random(0)
    out = [Picture(f"{label}{i:02d}", f"{bits.getrandbits(64):016x}", label,
                   "test" if i < 2 else "val" if i < 4 else "train", original_name=f"{label}/{i}.jpg")
           for label in ("cats", "dogs") for i in range(12)]
    out.append(Picture("cats05", out[5].phash, "cats", "test", original_name="copies/cat5.jpg"))
    return out


def test_a_stored_health_report_reads_as_typed_fields(data_dir: Path) -> None:
    from storage import repositories as repo
    from storage.db import get_sessionmaker
    from workbench import datasets
    from workbench.settings import get_settings

    report = build_health(pictures())
    with get_sessionmaker(get_settings().database_url).begin() as s:
        repo.add_dataset(s, name="pets", source="pets.zip", classes=["cats", "dogs"], health=report, split_config={},
                         skipped=[], num_images=25)
    h = views.health_view(datasets.get_dataset("pets"))
    assert h.class_counts == {"cats": 13, "dogs": 12}
    assert h.split_totals == {"train": 16, "val": 4, "test": 5} and h.train_images == 16
    assert h.split_counts["test"] == {"cats": 3, "dogs": 2}
    assert h.imbalance_ratio == pytest.approx(13 / 12, abs=0.01)
    dups = h.duplicates
    assert (dups.exact_groups, dups.leaking_groups, dups.total_groups) == (1, 1, 1)
    group = dups.groups[0]
    assert (group.kind, group.size, group.cross_split, group.label_conflict) == ("exact", 2, True, False)
    assert sorted(f.caption for f in group.files) == ["cats · test · cat5.jpg", "cats · train · 5.jpg"]
    assert [c.label for c in h.shortcuts.per_class] == ["cats", "dogs"]
    assert h.shortcuts.per_class[0].median_width == 320 and h.shortcuts.per_class[0].formats == {"JPEG": 13}
    assert h.shortcuts.per_class[0].median_brightness is None  # no pixels were read for this report
    assert h.image_kind.kind == report["image_kind"]["kind"] != "" and h.image_kind.reason
    assert h.sizes.input_size == report["sizes"]["input_size"] and set(h.sizes.spreads) == {
        "width (px)", "height (px)", "width / height"}
    assert h.modes == {"RGB": 25}
    assert h.warnings == tuple(report["warnings"]) and any("leakage" in w for w in h.warnings)
    assert h.max_resolution == report["suggestion"]["max_resolution"]


def test_an_old_health_report_gets_the_defaults() -> None:
    old = stored({"class_counts": {"a": 5, "b": 9}, "split_counts": {"train": {"a": 4, "b": 7}, "val": {"a": 1}},
                  "duplicates": {"exact_groups": 2, "near_groups": 1,
                                 "exact": [{"size": 2, "cross_split": False, "label_conflict": True,
                                            "splits": ["train"], "files": [{"name": "a/1.png", "label": "a",
                                                                            "split": "train", "sha256": "s1"}]}]},
                  "warnings": ["2 groups of exact duplicates."]})  # before shortcuts, kinds, sizes, pixel checks
    h = views.health_view(old)
    assert h.train_images == 11 and h.split_totals == {"train": 11, "val": 1}
    assert h.imbalance_ratio == 1.0 and h.max_resolution is None and h.modes == {}
    assert h.duplicates.pixel_checked is False and h.duplicates.near_min_correlation == 0.95
    assert h.duplicates.leaking_groups == 0 and h.duplicates.total_groups == 3
    assert [g.label_conflict for g in h.duplicates.groups] == [True]
    assert h.shortcuts == views.Shortcuts() and h.shortcuts.folds == 5
    assert h.image_kind == views.ImageKind("", "", "")
    assert h.sizes == views.Sizes({}, None, 0)
    assert views.health_view(None) == views.health_view({}) != h
    assert views.health_view({}).warnings == () and views.health_view({}).train_images == 0


def full_summary() -> RunSummary:
    return RunSummary(test_accuracy=0.9, test_accuracy_lo=0.8, test_accuracy_hi=0.96, test_macro_f1=0.88, test_n=50,
                      latency_ms_p50=12.5, latency_provider="CPUExecutionProvider", onnx_mb=16.0,
                      worker_losses=[{"at": "2026-01-01T00:00:00", "host": "a", "pid": 7, "epoch": 3,
                                      "auto_resume": 1, "limit": 2}])


def test_stored_run_summaries_read_as_typed_fields_and_old_rows_get_nones(data_dir: Path) -> None:
    from storage import repositories as repo
    from storage.db import get_sessionmaker
    from storage.models import Run
    from workbench import runs
    from workbench.settings import get_settings

    summaries: list[dict[str, Any]] = [dict(full_summary()), {"test_accuracy": 0.75, "test_macro_f1": 0.7}, {}]
    with get_sessionmaker(get_settings().database_url).begin() as s:
        ds = repo.add_dataset(s, name="pets", source="pets.zip", classes=["a", "b"], health={}, split_config={},
                              skipped=[], num_images=0)
        rows = [Run(dataset_id=ds.id, variant="lite0", resolution=224, preset="field", status=RunStatus.SUCCEEDED,
                    config={}, summary=sm, best_metrics=best or None)
                for sm, best in zip(summaries, [{"accuracy": 0.92, "macro_f1": 0.9}, {"accuracy": 0.8}, {}],
                                    strict=True)]
        s.add_all(rows)
        s.flush()
        ids = [r.id for r in rows]
    full, old, empty = (views.summary_view(runs.get_run(i).summary) for i in ids)
    assert (full.test_accuracy, full.test_accuracy_range, full.test_images) == (0.9, (0.8, 0.96), 50)
    assert full.test_accuracy_text == "90.0 % (95 % range 80–96 %)"
    assert (full.latency_ms, full.latency_on, full.size_mb, full.test_macro_f1) == (12.5, "CPU", 16.0, 0.88)
    assert [loss["host"] for loss in full.worker_losses] == ["a"]
    assert old.test_accuracy_range is None and old.test_accuracy_text == "75.0 %" and old.test_images is None
    assert old.latency_ms is None and old.latency_on == "" and old.worker_losses == ()
    assert empty.test_accuracy_text == "" and empty.test_macro_f1 is None
    # The leaderboard and the chart read through the same view: the old row has no range, no point.
    table = {r.run: r for r in views.runs_table(sort="run")}
    assert table[ids[0]].accuracy_range == "80–96 %" and table[ids[1]].accuracy_range == ""
    assert table[ids[1]].test_accuracy == 0.75 and table[ids[2]].test_accuracy is None
    assert [p.run for p in views.run_points()] == [ids[0]]
    assert views.default_predict_run() == ids[0]  # the best validation macro-F1; no best metrics ranks last
    assert (table[ids[0]].val_macro_f1, table[ids[1]].val_macro_f1, table[ids[2]].val_accuracy) == (0.9, None, None)


def test_validation_chooses_and_test_reports_in_every_default(data_dir: Path) -> None:
    """Stored runs whose validation and test rankings disagree: the leaderboard's default order, the
    Pareto front and the model pages open on follow validation; sorting by test stays possible."""
    from storage import repositories as repo
    from storage.db import get_sessionmaker
    from storage.models import Run
    from workbench.settings import get_settings

    # name: (validation macro-F1, validation accuracy, test macro-F1, test accuracy, latency ms)
    figures = {"val_best": (0.90, 0.91, 0.70, 0.72, 10.0), "test_2nd": (0.80, 0.82, 0.95, 0.96, 10.0),
               "test_best": (0.70, 0.75, 0.99, 0.99, 20.0)}
    with get_sessionmaker(get_settings().database_url).begin() as s:
        ds = repo.add_dataset(s, name="pets", source="pets.zip", classes=["a", "b"], health={}, split_config={},
                              skipped=[], num_images=0)
        rows = {name: Run(dataset_id=ds.id, variant="lite0", resolution=224, preset="field",
                          status=RunStatus.SUCCEEDED, config={}, best_metrics={"macro_f1": vf, "accuracy": va},
                          summary={"test_macro_f1": tf, "test_accuracy": ta, "latency_ms_p50": ms})
                for name, (vf, va, tf, ta, ms) in figures.items()}
        s.add_all(rows.values())
        s.flush()
        ids = {name: r.id for name, r in rows.items()}
        ds_id = ds.id
    by_val, by_test = [ids["val_best"], ids["test_2nd"], ids["test_best"]], [ids["test_best"], ids["test_2nd"],
                                                                            ids["val_best"]]
    assert views.DEFAULT_SORT not in views.TEST_SORTS == {"test macro-F1", "test accuracy"}
    assert [r.run for r in views.runs_table()] == by_val  # the default sort
    assert [r.run for r in views.runs_table(sort=views.DEFAULT_SORT, dataset_id=ds_id)] == by_val
    assert [r.run for r in views.runs_table(sort="validation accuracy")] == by_val
    assert [r.run for r in views.runs_table(sort="test macro-F1")] == by_test  # still there, when asked for
    assert [r.run for r in views.runs_table(sort="test accuracy")] == by_test
    points = views.run_points(ds_id)
    assert {p.run: (p.accuracy, p.test_accuracy) for p in points} == {
        ids[n]: (f[1], f[3]) for n, f in figures.items()}
    # On validation the best run is also among the fastest: it alone is the front (on test it would be two others).
    assert views.pareto_front(points) == {ids["val_best"]}
    assert views.default_predict_run(ds_id) == views.default_predict_run() == ids["val_best"]


def real_metrics(with_validation: bool) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], 20)
    logits = rng.normal(size=(60, 3)) + 2.5 * np.eye(3)[y]
    m = classification_metrics(y, softmax(logits), ["a", "b", "c"])
    m["calibration"] = {"before": calibration(softmax(logits), y)}
    if with_validation:
        m["calibration"].update(temperature=1.5, after=calibration(softmax(logits, 1.5), y))
    return stored(m)


def test_real_evaluation_metrics_read_as_typed_fields() -> None:
    m = real_metrics(with_validation=True)
    mv = views.metrics_view(m)
    assert mv.accuracy == m["accuracy"] and mv.test_images == 60 and mv.classes == ("a", "b", "c")
    assert mv.accuracy_interval is not None and mv.accuracy_interval.method == "Wilson score"
    assert mv.accuracy_interval.text.startswith(f"{m['accuracy'] * 100:.1f} % (95 % range ")
    assert mv.macro_f1_interval is not None and mv.macro_f1_interval.method.startswith("bootstrap")
    assert mv.interval_images == 60 and len(mv.per_class_ranges) == 3 and "range" in mv.per_class_ranges[0]
    assert mv.ece_change == pytest.approx(m["calibration"]["after"]["ece"] - m["calibration"]["before"]["ece"])
    assert mv.confusion == tuple(tuple(r) for r in m["confusion_matrix"]) and mv.top_k == m["top_k"]
    assert mv.misclassified == () and mv.tta_effect is None and mv.raw is not m and mv.raw == m


def test_an_old_evaluation_without_ranges_or_temperature_gets_the_defaults() -> None:
    m = real_metrics(with_validation=False)
    del m["intervals"], m["top_k"]  # evaluations stored before the 95 % ranges and top-k
    mv = views.metrics_view(m)
    assert mv.accuracy_interval is None and mv.macro_f1_interval is None and mv.interval_images is None
    assert mv.per_class_ranges == () and mv.ece_change is None and mv.ece == m["calibration"]["before"]["ece"]
    assert mv.top_k is None
    empty = views.metrics_view({})
    assert (empty.accuracy, empty.test_images, empty.classes, empty.confusion, empty.ece) == (None, None, (), (), None)


def test_search_export_and_prediction_records_read_with_defaults() -> None:
    found = views.search_summary(stored({"winner_latency": {"p50_ms": 4.5, "source": "predicted for rpi4"}}))
    assert found == views.SearchSummaryView(4.5, "predicted for rpi4")
    assert views.search_summary({"space": {}}) == views.SearchSummaryView(None, "")  # a search still running

    ver = views.verification_view({"verification": {"n_images": 30, "top1_agreement": 1.0,
                                                    "max_abs_logit_diff": 2e-5, "tolerance": 1e-3}})
    assert (ver.images, ver.top1_agreement, ver.tolerance) == (30, 1.0, 1e-3)
    old = views.verification_view({})
    assert old.images is None and math.isnan(old.top1_agreement) and math.isnan(old.max_abs_logit_diff)
    bundle = views.bundle_view({"files": ["model_fp32.onnx"], "variants": {
        "fp32": {"file": "model_fp32.onnx", "latency_p50": 3.2, "conditions": {"threads": 4}},
        "int8": {"file": "model_int8.onnx", "latency_p50": 1.9, "accuracy_change": -0.01}}})
    assert bundle.rows == ({"precision": "fp32", "latency_p50": 3.2},
                           {"precision": "int8", "latency_p50": 1.9, "accuracy_change": -0.01})
    assert bundle.conditions == {"fp32": {"threads": 4}} and bundle.files == ("model_fp32.onnx",)
    assert views.bundle_view({}) == views.BundleView((), (), {})

    job = views.JobView(1, JobKind.PREDICT, JobStatus.SUCCEEDED, 1, stored({
        "results": [{"name": "x.png", "top": [{"class": "a", "p": 0.8}, {"class": "b", "p": 0.2}],
                     "decision": "a", "p_positive": 0.8, "ood_score": -3.0, "outside_training_data": False},
                    {"name": "bad.txt", "error": "not an image"}],
        "calibration": {"calibrated": True, "temperature": 1.3, "threshold": 0.4, "positive_class": "a",
                        "confidence": "Confidences are calibrated."}}), {}, None, datetime.now(UTC), None, None, None)
    pv = views.prediction_view(job)
    first, bad = pv.answers
    assert [(g.label, g.p) for g in first.top] == [("a", 0.8), ("b", 0.2)] and first.decision == "a"
    assert first.overlay == "" and first.error == "" and bad.error == "not an image" and bad.top == ()
    assert (pv.temperature, pv.threshold, pv.positive_class) == (1.3, 0.4, "a")
    assert pv.calibration_note == "fitted on the validation images"  # older jobs wrote no note
    assert views.prediction_view(views.JobView(2, JobKind.PREDICT, JobStatus.SUCCEEDED, None, {}, {}, None,
                                               datetime.now(UTC), None, None, None)).answers == ()
