"""The pages a lab technician reads speak plain language: no raw field names, no "None",
metrics explained where they first appear. Real data dir, real ingest of bean-leaf images."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from plain_language import assert_plain_language, plain_language_problems
from test_pages import assert_clean, open_page


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


@pytest.mark.parametrize("name", ["home", "datasets", "recommend", "train", "export", "settings"])
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
        for key, ds, f1, status in [("best", old, 0.9, "succeeded"), ("exported", old, 0.8, "succeeded"),
                                    ("failed", old, 0.99, "failed"), ("other", new, 0.95, "succeeded")]:
            run = Run(dataset_id=ds.id, variant="lite0", resolution=224, preset="field", status=status,
                      config={}, summary={"test_macro_f1": f1})
            s.add(run)
            s.flush()
            ids[key] = run.id
        old_id, new_id = old.id, new.id
    assert views.default_predict_run(old_id) == ids["best"]  # nothing exported yet: the best score
    with sm.begin() as s:
        s.add(Artifact(run_id=ids["exported"], kind="bundle", path="x.zip", sha256="0" * 64, bytes=1))
    assert views.default_predict_run(old_id) == ids["exported"]  # an exported model beats a better unexported one
    assert views.default_predict_run(new_id) == ids["other"]
    assert views.newest_dataset_id() == new_id  # the dataset of the newest run
    assert suggestions.curve_metric_choices(["best_epoch", "train_loss", "val_accuracy", "val_macro_f1"]) == [
        "val_macro_f1", "val_accuracy", "train_loss"]
