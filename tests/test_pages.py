"""Every page of the web UI through streamlit.testing.v1.AppTest, on a real SQLite data dir.

The app is started from its real entry point (workbench/app.py: password gate, then
st.navigation) and each test switches to a page the way a user following a URL would.
Data comes from the real services (ingest of real bean-leaf images, real training where
needed), never from mocks.
"""
from __future__ import annotations

import io
import os
import re
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from builders import APP, assert_clean, open_page, page_path
from conftest import fresh_database, use_database
from streamlit.testing.v1 import AppTest

PAGES = ["home", "datasets", "recommend", "auto", "train", "runs", "evaluate", "export", "predict", "settings"]
TITLES = {p: p.capitalize() for p in PAGES} | {"home": "Workbench"}


def titles(at: AppTest) -> list[str]:
    return [t.value for t in at.title]


def bean_zip(shared_datasets: Path, per_class: int = 12, classes=("healthy", "bean_rust"),
             duplicate_across: bool = False) -> bytes:
    """A zip of real bean-leaf images in class folders (optionally one image filed under two classes)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for cls in classes:
            files = sorted((shared_datasets / "beans" / "train" / cls).iterdir())[:per_class]
            for f in files:
                zf.write(f, f"{cls}/{f.name}")
        if duplicate_across:
            f = sorted((shared_datasets / "beans" / "train" / classes[0]).iterdir())[0]
            zf.write(f, f"{classes[1]}/copy_of_{f.name}")
    return buf.getvalue()


# --- shell: navigation, home, settings -------------------------------------------------

def test_home_page(data_dir: Path) -> None:
    at = open_page("home")
    assert_clean(at)
    assert titles(at) == ["Workbench"]
    text = " ".join(m.value for m in at.markdown)
    assert str(data_dir) in text
    server = os.environ.get("DATABASE_URL")  # set by data_dir on the PostgreSQL pass
    if server is None:
        assert "workbench.db" in text
    else:  # the server's URL is shown, its password never
        from sqlalchemy import make_url

        url = make_url(server)
        assert url.render_as_string(hide_password=True) in text and f":{url.password}@" not in text
    assert [m.label for m in at.metric] == ["Datasets", "Runs", "Running now"]
    assert [m.value for m in at.metric] == ["0", "0", "0"]


def test_settings_page(data_dir: Path) -> None:
    at = open_page("settings")
    assert_clean(at)
    assert titles(at) == ["Settings"]
    text = " ".join(m.value for m in at.markdown)
    assert str(data_dir) in text
    versions, weights = at.dataframe[0].value, at.dataframe[1].value
    assert "streamlit" in set(versions["component"])
    assert "efficientnet_lite0" in set(weights["variant"]) or len(weights) > 0
    assert any("No password is set" in w.value for w in at.warning)


@pytest.mark.parametrize("name", PAGES)
def test_every_page_renders_without_error(data_dir: Path, name: str) -> None:
    at = open_page(name)
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    assert titles(at)[0] == TITLES[name]


# --- password gate ---------------------------------------------------------------------

@pytest.fixture
def password(monkeypatch: pytest.MonkeyPatch) -> str:
    from workbench.auth import hash_password

    monkeypatch.setenv("WORKBENCH_PASSWORD_HASH", hash_password("open sesame", iterations=1000))
    return "open sesame"


@pytest.mark.parametrize("name", PAGES)
def test_password_gate_blocks_every_page(data_dir: Path, password: str, name: str) -> None:
    at = AppTest.from_file(str(APP), default_timeout=30)
    at.run()
    at.switch_page(page_path(name)).run()  # as if the user typed /<page> in the address bar
    assert titles(at) == ["Workbench"]
    assert [t.label for t in at.text_input] == ["Password"]
    assert not at.metric and not at.dataframe and not at.file_uploader
    assert "protected by a password" in at.caption[0].value
    # A wrong password keeps the page closed.
    at.text_input[0].set_value("nope")
    at.button[0].click().run()
    assert [e.value for e in at.error] == ["Wrong password."]
    assert titles(at) == ["Workbench"] and [t.label for t in at.text_input] == ["Password"]


def test_train_page_shows_the_workers_a_run_lost(data_dir: Path) -> None:
    """A run resumed after its worker died says so under the run, with the hosts' names as they are."""
    from builders import create_dataset_rows

    from storage.db import get_sessionmaker
    from storage.models import Run
    from workbench import runs
    from workbench.settings import get_settings

    sf = get_sessionmaker(get_settings().database_url)
    create_dataset_rows(data_dir, sf, "colours", [4, 4], val_per_class=1, size=16)
    (run_id,) = runs.queue_training("colours", ["lite0"], resolution=64, recipe="quick", start_worker=False)
    with sf.begin() as s:
        s.get(Run, run_id).summary = {"worker_losses": [
            {"host": "GPU-Box", "pid": 7, "epoch": 13, "auto_resume": 1, "limit": 2, "resumed_on": "lab-2"}]}
    at = open_page("train")
    assert_clean(at)
    assert ("Worker on host GPU-Box (pid 7) stopped at epoch 13; resumed on host lab-2 (automatic resume 1 of 2)"
            in " ".join(c.value for c in at.caption))


def test_password_gate_opens_with_the_right_password(data_dir: Path, password: str) -> None:
    at = AppTest.from_file(str(APP), default_timeout=60)
    at.run()
    at.text_input[0].set_value(password)
    at.button[0].click().run()
    assert_clean(at)
    assert [m.label for m in at.metric] == ["Datasets", "Runs", "Running now"]  # the home page ran
    at.switch_page(page_path("settings")).run()
    assert titles(at) == ["Settings"]
    assert any("A password is required" in s.value for s in at.success)
    # Sign out closes it again.
    at.sidebar.button[0].click().run()
    assert [t.label for t in at.text_input] == ["Password"]


def test_malformed_password_hash_locks_the_app(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORKBENCH_PASSWORD_HASH", "plaintext-oops")
    at = AppTest.from_file(str(APP), default_timeout=30)
    at.run()
    assert not at.exception
    assert "locked" in at.error[0].value
    assert not at.text_input and not at.metric


def test_auth_helpers_roundtrip() -> None:
    from workbench.auth import PasswordHashError, hash_password, main, verify_password

    h = hash_password("pw", iterations=1000)
    assert h.startswith("pbkdf2_sha256$1000$")
    assert verify_password("pw", h) and not verify_password("pW", h) and not verify_password("", h)
    assert hash_password("pw", iterations=1000) != h  # random salt
    with pytest.raises(PasswordHashError):
        verify_password("pw", "pbkdf2_sha256$10$salt$abcd")
    assert main(["x"]) == 0


# --- datasets ----------------------------------------------------------------------------

def wait_for(at: AppTest, predicate, timeout: float = 90, what="condition", pause: float = 0.5) -> AppTest:
    """Rerun the app until ``predicate(at)``; ``what`` (text or a callable giving text) explains a timeout.
    A longer ``pause`` while the worker times models: each rerun costs the test process CPU, and the
    worker's latency timing waits for idle cores."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        at.run()
        if predicate(at):
            return at
        time.sleep(pause)
    what = what() if callable(what) else what
    raise AssertionError(f"timed out waiting for {what}; errors={[e.value for e in at.error]}")


def upload_dataset(at: AppTest, payload: bytes, name: str, filename: str = "beans.zip") -> AppTest:
    at.file_uploader(key="upload_file").set_value((filename, payload, "application/zip"))
    at.text_input(key="upload_name").set_value(name)
    next(b for b in at.button if b.label == "Upload and check").click().run()
    assert not at.exception, [e.value for e in at.exception]
    return wait_for(at, lambda a: any(name in s.value and "ingested" in s.value for s in a.success)
                    or any(name in e.value for e in a.error), what=f"ingest of {name}")


def test_datasets_upload_zip_health_and_delete(data_dir: Path, shared_datasets: Path) -> None:
    at = open_page("datasets")
    assert_clean(at)
    assert at.file_uploader(key="upload_file").allowed_type == [".zip", ".csv", ".tsv"]
    upload_dataset(at, bean_zip(shared_datasets, per_class=12, duplicate_across=True), "beans-small")
    assert_clean(at)
    assert any("beans-small" in s.value and "ingested 25 images" in s.value for s in at.success)
    listing = at.dataframe[0].value
    assert list(listing["name"]) == ["beans-small"] and list(listing["images"]) == [25]
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Images"] == "25" and metrics["Classes"] == "2" and metrics["Duplicate groups"] == "1"
    warnings = " ".join(w.value for w in at.warning)
    assert "different labels" in warnings  # the same leaf filed under two classes
    # Duplicate group and class samples are shown as real thumbnails.
    text = " ".join(m.value for m in at.markdown)
    assert "Identical files · 2 files" in text and "conflicting labels" in text
    assert len(at.get("image")) >= 2 + 2 * 6
    # The stored files exist and survive a fresh session (state lives in SQLite).
    at2 = open_page("datasets")
    assert list(at2.dataframe[0].value["name"]) == ["beans-small"]

    # Uploading the same name again is refused with a readable message.
    at2.file_uploader(key="upload_file").set_value(("again.zip", bean_zip(shared_datasets, 3), "application/zip"))
    at2.text_input(key="upload_name").set_value("beans-small")
    next(b for b in at2.button if b.label == "Upload and check").click().run()
    assert not at2.exception
    assert any("already exists" in e.value for e in at2.error)

    # Delete.
    at2.checkbox(key=f"sure{1}").check().run()
    next(b for b in at2.button if b.label == "Delete dataset").click().run()
    assert not at2.exception
    assert any("No datasets yet" in i.value for i in at2.info)
    assert not list((data_dir / "store").rglob("*.jpg"))


def test_datasets_bad_upload_shows_readable_error(data_dir: Path) -> None:
    at = open_page("datasets")
    at.file_uploader(key="upload_file").set_value(("broken.zip", b"this is not a zip", "application/zip"))
    at.text_input(key="upload_name").set_value("broken")
    next(b for b in at.button if b.label == "Upload and check").click().run()
    wait_for(at, lambda a: bool(a.error), what="the ingest error")
    assert not at.exception
    assert "broken" in at.error[0].value
    assert "Traceback" not in at.error[0].value


def test_datasets_imports_a_folder_on_the_server_in_place(data_dir: Path, shared_datasets: Path) -> None:
    """Bigger than the upload cap: a folder in the import dir is ingested where it is, page and service."""
    import shutil

    from workbench import actions

    at = open_page("datasets")
    assert any("import folder is empty" in i.value for i in at.info)
    assert any("MB through the browser" in c.value and "workbench data add" in c.value for c in at.caption)
    folder = data_dir / "import" / "field-photos"
    for cls in ("healthy", "bean_rust"):
        (folder / cls).mkdir(parents=True)
        for f in sorted((shared_datasets / "beans" / "train" / cls).iterdir())[:6]:
            shutil.copy(f, folder / cls / f.name)
    at = open_page("datasets")
    assert at.selectbox(key="import_entry").options == ["field-photos"]
    next(b for b in at.button if b.label == "Add and check").click().run()
    wait_for(at, lambda a: any("field-photos" in s.value and "ingested 12 images" in s.value for s in a.success)
             or bool(a.error), what="the import")
    assert_clean(at)
    assert list(at.dataframe[0].value["name"]) == ["field-photos"]
    assert len(list(folder.rglob("*.jpg"))) == 12  # read in place, never moved or removed
    # Only entries directly inside the import dir can be named: no way out of it.
    for bad in ("../store", "field-photos/healthy", "/etc", "missing"):
        with pytest.raises(ValueError, match="is not a folder or file in the import folder"):
            actions.start_import(bad, "x")


def test_home_counts_and_datasets_survive_a_new_session(data_dir: Path, shared_datasets: Path) -> None:
    at = open_page("datasets")
    upload_dataset(at, bean_zip(shared_datasets, per_class=6), "beans-tiny")
    home = open_page("home")
    assert {m.label: m.value for m in home.metric}["Datasets"] == "1"


# --- recommend ---------------------------------------------------------------------------

def test_recommend_budget_form_table_and_chart(data_dir: Path) -> None:
    at = open_page("recommend")
    assert_clean(at)
    assert any(m.value.startswith("### Recommended:") for m in at.markdown)
    ranked, excluded = at.dataframe[0].value, at.dataframe[1].value
    room = "room left: typical time per image (ms) (%)"
    assert len(ranked) >= 1 and room in ranked.columns
    assert (ranked[room] >= 0).all()
    assert "why excluded" in excluded.columns and excluded["why excluded"].str.len().gt(0).all()
    assert len(at.get("vega_lite_chart")) == 1
    # An impossible budget on a Raspberry Pi: no recommendation, a readable explanation instead.
    at.selectbox(key="rec_device").select("rpi4")
    at.number_input(key="rec_latency").set_value(0.5)
    next(b for b in at.button if b.label == "Recommend").click().run()
    assert not at.exception
    assert any("Nothing fits this budget" in e.value for e in at.error)
    assert not any(m.value.startswith("### Recommended:") for m in at.markdown)


def test_recommend_budget_reads_the_dataset_split_counts() -> None:
    from datetime import UTC, datetime

    from workbench import views
    from workbench.datasets import DatasetInfo

    ds = DatasetInfo(id=1, name="beans", created_at=datetime.now(UTC), source="beans.zip", num_images=30,
                     num_classes=3, classes=["a", "b", "c"], skipped=[], split_config={},
                     health={"split_counts": {"train": {"a": 8, "b": 7, "c": 6}, "val": {"a": 3}}})
    assert views.recommend_budget(device="rpi4", latency_ms=20, dataset=ds) == {
        "device": "rpi4", "latency_ms": 20, "latency_p95_ms": None, "memory_mb": None, "size_mb": None,
        "precision": "fp32", "max_params_m": None, "min_resolution": None, "train_images": 21, "num_classes": 3,
        "max_resolution": None}
    without = views.recommend_budget(device="this-machine")  # 0 means no limit; ranked as for ImageNet
    assert without["latency_ms"] is None and without["train_images"] is None and without["num_classes"] == 1000


@pytest.mark.slow
def test_recommend_measure_on_this_machine_from_the_page(data_dir: Path) -> None:
    """The page's "Measure on this machine" runs real ONNX Runtime timings in the train-lane worker."""
    from sqlalchemy import func, select

    from storage.db import get_sessionmaker
    from storage.models import Benchmark
    from workbench.settings import get_settings

    at = open_page("recommend")
    at.selectbox(key="rec_device").select("this-machine")
    at.number_input(key="rec_latency").set_value(60.0)
    next(b for b in at.button if b.label == "Recommend").click().run()
    assert_clean(at)
    sources = lambda a: set(a.dataframe[0].value["times from"]) | set(a.dataframe[1].value["times from"])  # noqa: E731
    assert not any(str(x).startswith("measured") for x in sources(at))  # nothing measured yet
    next(b for b in at.button if b.key == "rec_measure").click().run()
    assert_clean(at)
    wait_for(at, lambda a: any("Measured on this machine" in m.value for m in a.success)
             or any("measurement failed" in e.value for e in a.error), timeout=420, what="the measurement",
             pause=3.0)
    assert_clean(at)
    assert any(str(x).startswith("measured") for x in sources(at))  # the table now uses the figures
    with get_sessionmaker(get_settings().database_url)() as s:
        assert s.scalar(select(func.count()).select_from(Benchmark)) >= 5  # the calibration set at least
    # The worker's scratch files (the ONNX models it timed) live inside the data dir.
    assert any((data_dir / "tmp" / "worker-train").glob("wb-latency-*/*.onnx"))
    # Another device cannot be measured from here: no button, and the service says why.
    at.selectbox(key="rec_device").select("rpi4")
    next(b for b in at.button if b.label == "Recommend").click().run()
    assert not any(b.key == "rec_measure" for b in at.button)
    from workbench import actions

    with pytest.raises(ValueError, match="workbench calibrate"):
        actions.start_measure({"device": "rpi4"})


# --- runs: 100+ runs, sorted and paginated in SQL -----------------------------------------

def _insert_runs(n: int) -> None:
    """Real rows in the real (migrated) SQLite database, as the training service writes them."""
    from storage import repositories as repo
    from storage.db import get_sessionmaker
    from storage.models import Run, RunMetric
    from workbench.settings import get_settings

    sm = get_sessionmaker(get_settings().database_url)
    with sm.begin() as s:
        ds = repo.add_dataset(s, name="many", source="many.zip", classes=["a", "b"], health={}, split_config={},
                              skipped=[], num_images=0)
        for i in range(n):
            run = Run(dataset_id=ds.id, variant=["lite0", "lite1", "b0"][i % 3], resolution=224, preset="field",
                      status="succeeded", train_seconds=30.0 + i, config={"recipe": "quick"},
                      summary={"test_accuracy": 0.5 + (i % 50) / 100, "test_macro_f1": 0.4 + (i % 50) / 100,
                               "latency_ms_p50": 5.0 + (i * 7) % 40, "onnx_mb": 13.0 + i % 3},
                      # validation ranks the runs the other way round from test
                      best_metrics={"accuracy": 0.99 - (i % 50) / 100, "macro_f1": 0.95 - (i % 50) / 100})
            s.add(run)
            s.flush()
            for e in range(1, 4):
                s.add(RunMetric(run_id=run.id, epoch=e, phase="head",
                                metrics={"val_accuracy": 0.5 + e / 10, "train_loss": 1.0 / e}))


def test_runs_leaderboard_paginates_sorts_and_marks_the_front(data_dir: Path) -> None:
    from workbench import wording

    _insert_runs(130)
    t0 = time.monotonic()
    at = open_page("runs")
    assert_clean(at)
    first = at.dataframe[0].value
    assert len(first) == 25
    # Validation chooses, test reports: the default order is validation macro-F1, not the test figure.
    assert at.selectbox(key="runs_sort").value == "validation macro-F1"
    assert list(first["validation macro-F1"]) == sorted(first["validation macro-F1"], reverse=True)
    assert list(first["test macro-F1"]) == sorted(first["test macro-F1"])  # the two rankings disagree here
    assert {"validation macro-F1", "validation accuracy", "test macro-F1", "test accuracy", "latency ms", "size MB",
            "parameters (millions)", "training time"} <= set(first.columns)
    assert first["parameters (millions)"].between(3, 6).all()  # lite0/lite1/b0 with a 2-class head
    assert all(re.fullmatch(r"\d+ (s|min)", t) for t in first["training time"])  # "2 min", not 129.0
    assert set(first["latency measured on"]) == {"CPU"}  # figures stored before providers were recorded
    assert "Runs 1–25 of 130" in " ".join(c.value for c in at.caption)
    assert "Pareto front" in " ".join(c.value for c in at.caption)
    assert len(at.get("vega_lite_chart")) == 1

    print(f"\nruns page with 130 runs: {time.monotonic() - t0:.2f} s (first AppTest run, incl. app start and imports)")
    t1 = time.monotonic()
    at.run()
    print(f"runs page with 130 runs, rerun: {time.monotonic() - t1:.2f} s")
    assert time.monotonic() - t1 < 5
    assert wording.CHOOSE_BY_VALIDATION in " ".join(c.value for c in at.caption) and not at.warning
    at.selectbox(key="runs_sort").select("test macro-F1").run()  # still possible, with the reason shown
    by_test = at.dataframe[0].value["test macro-F1"]
    assert list(by_test) == sorted(by_test, reverse=True)
    assert [w.value for w in at.warning] == [wording.CHOOSE_BY_VALIDATION]
    at.selectbox(key="runs_sort").select("latency ms").run()
    lat = at.dataframe[0].value["latency ms"]
    assert list(lat) == sorted(lat) and lat.iloc[0] == 5.0  # ascending by default for latency
    at.get("pagination")[0].set_value(6).run()
    assert_clean(at)
    assert len(at.dataframe[0].value) == 5  # 130 = 5 pages of 25 + 5
    assert "Runs 126–130 of 130" in " ".join(c.value for c in at.caption)
    assert time.monotonic() - t0 < 30


def _run_with_files(data_dir: Path, status: str) -> tuple[int, Path]:
    """A run row as training leaves it: a checkpoint and a registered export in its folder."""
    from storage import repositories as repo
    from storage.artifacts import register_artifact
    from storage.db import get_sessionmaker
    from storage.models import Run
    from workbench.paths import RunPaths
    from workbench.settings import get_settings

    settings = get_settings()
    with get_sessionmaker(settings.database_url).begin() as s:
        ds = repo.get_dataset_by_name(s, "kept") or repo.add_dataset(
            s, name="kept", source="kept.zip", classes=["a", "b"], health={}, split_config={}, skipped=[],
            num_images=0)
        run = Run(dataset_id=ds.id, variant="lite0", resolution=64, preset="field", status=status,
                  config={"recipe": "quick"}, summary={"test_accuracy": 0.9, "latency_ms_p50": 3.0})
        s.add(run)
        s.flush()
        paths = RunPaths(settings, run.id)
        paths.export_dir.mkdir(parents=True)
        paths.last_checkpoint.write_bytes(b"checkpoint")
        paths.fp32_onnx.write_bytes(b"onnx")
        run.checkpoint_path = paths.last_checkpoint.relative_to(data_dir).as_posix()
        register_artifact(s, paths.fp32_onnx, data_dir, kind="onnx_fp32", run_id=run.id, meta={"verified": True})
        return run.id, paths.root


def test_runs_page_deletes_a_run_after_confirmation(data_dir: Path) -> None:
    from storage.db import get_sessionmaker
    from storage.models import Artifact
    from workbench import runs
    from workbench.settings import get_settings

    kept_id, kept_dir = _run_with_files(data_dir, "succeeded")
    run_id, run_dir = _run_with_files(data_dir, "succeeded")
    active_id, _ = _run_with_files(data_dir, "queued")
    at = open_page("runs")
    assert_clean(at)
    assert set(at.dataframe[0].value["run"]) == {kept_id, run_id, active_id}
    at.selectbox(key="delete_run_choice").select(run_id).run()
    delete = lambda a: next(b for b in a.button if b.label == "Delete run")  # noqa: E731
    assert delete(at).disabled  # nothing is deleted without the confirmation
    sure = at.checkbox(key=f"sure_run{run_id}")
    assert sure.label == f"Yes, delete run #{run_id}"
    sure.check().run()
    assert not delete(at).disabled
    delete(at).click().run()
    assert_clean(at)
    with pytest.raises(runs.RunError):
        runs.get_run(run_id)
    assert not run_dir.exists()
    with get_sessionmaker(get_settings().database_url)() as s:
        assert s.query(Artifact).filter(Artifact.run_id == run_id).count() == 0
    assert set(at.dataframe[0].value["run"]) == {kept_id, active_id}
    assert kept_dir.is_dir() and runs.get_run(kept_id).status == "succeeded"  # only that run went

    # A queued run is refused with the service's reason, and stays.
    at.selectbox(key="delete_run_choice").select(active_id).run()
    at.checkbox(key=f"sure_run{active_id}").check().run()
    delete(at).click().run()
    assert not at.exception
    assert [e.value for e in at.error] == [f"**Could not delete the run.** Run {active_id} is queued: "
                                           "cancel it before deleting it."]
    assert runs.get_run(active_id).status == "queued"


# --- pages that need a trained model: one real training run, shared by the tests below -------

def _stop_worker(data_dir: Path) -> None:
    from conftest import stop_workers

    stop_workers(data_dir)  # train and light lanes


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory: pytest.TempPathFactory,
                shared_datasets: Path) -> Iterator[tuple[Path, int, str | None]]:
    """A data dir with the bean dataset and one finished lite0@96 run (trained by the real worker),
    and its database URL (None: SQLite in the data dir)."""
    from storage.db import reset_sessionmakers

    d = tmp_path_factory.mktemp("trained") / "workbench-data"
    with pytest.MonkeyPatch.context() as mp, fresh_database() as url:
        mp.setenv("WORKBENCH_DATA_DIR", str(d))
        use_database(mp, url)
        reset_sessionmakers()
        from workbench import datasets, runs

        z = tmp_path_factory.mktemp("zips") / "beans.zip"
        z.write_bytes(bean_zip(shared_datasets, per_class=12))
        info = datasets.add_dataset(z, "beans")
        (run_id,) = runs.queue_training(info.id, ["lite0"], 96, "field", "quick", 1, None)
        deadline = time.monotonic() + 300
        while True:
            r = runs.get_run(run_id)
            if r.status in ("succeeded", "failed", "cancelled") and r.job_status not in ("queued", "running"):
                break
            assert time.monotonic() < deadline, "training did not finish in 5 minutes"
            time.sleep(1)
        assert r.status == "succeeded", r.error
        yield d, run_id, url
        _stop_worker(d)
        reset_sessionmakers()


@pytest.fixture
def trained(trained_dir: tuple[Path, int, str | None], monkeypatch: pytest.MonkeyPatch) -> tuple[Path, int]:
    monkeypatch.setenv("WORKBENCH_DATA_DIR", str(trained_dir[0]))
    use_database(monkeypatch, trained_dir[2])
    return trained_dir[0], trained_dir[1]


@pytest.mark.slow
def test_evaluate_page_shows_metrics_confusion_plots(trained: tuple[Path, int]) -> None:
    _, run_id = trained
    at = open_page("evaluate")
    assert_clean(at)
    metrics = {m.label: m.value for m in at.metric}
    assert set(metrics) >= {"Accuracy", "Balanced accuracy", "Macro-F1", "Macro ROC-AUC", "Calibration error"}
    assert 0.0 <= float(metrics["Accuracy"]) <= 1.0
    assert all(m.help for m in at.metric)  # each measure explained where it first appears
    per_class = at.dataframe[0].value
    assert set(per_class["class"]) == {"healthy", "bean_rust"}
    text = " ".join(m.value for m in at.markdown)
    assert re.search(r"\d of 2 healthy found", text) and re.search(r"\d of 2 bean_rust found", text)
    assert "**Sensitivity" in text and "**Specificity" in text  # two classes: the medical pair, with counts
    from plain_language import assert_plain_language

    assert_plain_language(at, allow={"bean_rust"})
    assert len(at.get("vega_lite_chart")) == 1  # the confusion-matrix heatmap
    # ROC, PR and reliability diagrams are the evaluation's verified PNG artifacts.
    assert len(at.get("image")) >= 3
    assert "4 test images" in " ".join(c.value for c in at.caption)
    # Re-evaluating with test-time augmentation runs as a background job; the page picks up the result.
    next(b for b in at.button if b.label == "With test-time augmentation").click().run()
    assert not at.exception
    wait_for(at, lambda a: "with test-time augmentation" in " ".join(c.value for c in a.caption), timeout=120,
             what="the TTA evaluation")
    assert_clean(at)
    assert "Test-time augmentation changed" in " ".join(c.value for c in at.caption)


@pytest.mark.slow
def test_export_page_builds_bundle_as_a_job_and_offers_download(trained: tuple[Path, int]) -> None:
    _, run_id = trained
    at = open_page("export")
    assert_clean(at)
    assert any("Verified: the exported model gives the same answers" in s.value for s in at.success)
    before = len(at.get("download_button"))
    at.checkbox(key="exp_fp16").check()
    next(b for b in at.button if b.label == "Build bundle").click().run()
    assert not at.exception
    wait_for(at, lambda a: len(a.get("download_button")) > before or bool(a.error), timeout=180,
             what="the bundle", pause=2.0)  # the bundle's fp16 and fp32 are timed
    assert_clean(at)
    text = " ".join(m.value for m in at.markdown)
    assert "model.onnx, model_fp16.onnx" in text and "Your first bundle" in text
    from plain_language import assert_plain_language

    assert_plain_language(at, allow={"bean_rust"})  # the precision table: labels, not onnx_mb


@pytest.mark.slow
def test_export_page_refuses_an_altered_bundle(trained: tuple[Path, int]) -> None:
    from storage.db import get_sessionmaker
    from storage.models import Artifact
    from workbench.exports import export_run
    from workbench.settings import get_settings

    data_dir, run_id = trained
    res = export_run(run_id)
    with get_sessionmaker(get_settings().database_url)() as s:
        path = data_dir / s.get(Artifact, res.bundle_artifact_id).path
    path.write_bytes(path.read_bytes() + b"tampered")
    at = open_page("export")
    assert not at.exception
    assert any("not offered for download" in e.value and "altered" in e.value for e in at.error)


@pytest.mark.slow
def test_predict_page_top_k_and_gradcam(trained: tuple[Path, int], shared_datasets: Path) -> None:
    at = open_page("predict")
    assert_clean(at)
    files = sorted((shared_datasets / "beans" / "test" / "healthy").iterdir())[:2]
    at.file_uploader(key="predict_files").set_value([(f.name, f.read_bytes(), "image/jpeg") for f in files]
                                                    + [("notes.png", b"not an image", "image/png")])
    next(b for b in at.button if b.label == "Predict").click().run()
    wait_for(at, lambda a: len(a.get("image")) >= 2 or any("failed" in e.value for e in a.error), timeout=120,
             what="predictions")
    assert not at.exception
    results = [m.value for m in at.markdown if "→" in m.value]
    assert len(results) == 2 and all(f.name in " ".join(results) for f in files)
    assert all(im.captions[0].startswith("Grad-CAM for ") for im in at.get("image"))
    assert any("notes.png" in e.value for e in at.error)  # the broken file is reported, not fatal
    from plain_language import assert_plain_language

    assert_plain_language(at, allow={"bean_rust"})


@pytest.mark.slow
def test_runs_page_with_a_finished_run_reads_plainly(trained: tuple[Path, int]) -> None:
    from plain_language import assert_plain_language

    _, run_id = trained
    at = open_page("runs")
    assert_clean(at)
    assert at.selectbox(key="runs_dataset").value is not None  # one dataset, not all of them together
    row = at.dataframe[0].value.iloc[0]
    assert row["run"] == run_id and row["batch"] == "—" and re.fullmatch(r"\d+ (s|min)", row["training time"])
    assert_plain_language(at, allow={"bean_rust"})
    at.session_state["runs_table"] = {"selection": {"rows": [0], "columns": [], "cells": []}}  # a row picked
    at.run()
    assert_clean(at)
    metric = next(b for b in at.selectbox if b.label == "Metric")
    assert metric.value == "val_macro_f1" and metric.options[0] == "Validation macro-F1"  # not best_epoch
    assert "Best round so far" not in metric.options
    assert_plain_language(at, allow={"bean_rust"})


@pytest.mark.slow
def test_train_page_preview_launch_cancel_resume(trained: tuple[Path, int]) -> None:
    """Launch, cancel (queued and running) and resume from the page, with no timing races.

    A long run queued through the API first holds the train lane, so the run launched from the
    page is certainly still queued when its Cancel is clicked (cancelled at once), and the long
    run is certainly mid-training when its own Cancel is clicked (it stops within a batch).
    """
    from workbench import runs

    _, trained_id = trained
    (blocker,) = runs.queue_training("beans", ["lite0"], 96, "field", "quick", postrun=False,
                                     overrides=dict(head_epochs=200, finetune_epochs=200, patience=1000))
    state = lambda i: f"run {i}: {runs.get_run(i).status}"  # noqa: E731 - for failure messages
    at = open_page("train")
    assert_clean(at)
    assert len(at.get("image")) == 8  # augmentation preview grid
    assert at.radio(key="train_preset_1_field").value == "field"  # suggested for leaf photos (the guessed kind)
    assert f"Run #{trained_id}" in " ".join(m.value for m in at.markdown)
    next(b for b in at.button if b.label == "Launch training").click().run()
    assert_clean(at)
    new_id = max(r.id for r in runs.list_runs())
    assert new_id > blocker
    wait_for(at, lambda a: runs.get_run(blocker).status == "running", timeout=120,
             what=lambda: f"the long run to start ({state(blocker)})")
    assert runs.get_run(new_id).status == "queued", state(new_id)  # behind the long run on the train lane

    # Cancel while queued: cancelled at once, never started.
    next(b for b in at.button if b.key == f"cancel{new_id}").click().run()
    assert_clean(at)
    assert runs.get_run(new_id).status == "cancelled" and runs.get_run(new_id).started_at is None
    # Resume from the page: queued again (still behind the long run).
    wait_for(at, lambda a: any(b.key == f"resume{new_id}" for b in a.button), timeout=30,
             what=lambda: f"the resume button ({state(new_id)})")
    next(b for b in at.button if b.key == f"resume{new_id}").click().run()
    assert_clean(at)
    assert runs.get_run(new_id).status == "queued", state(new_id)

    # Cancel while running: the worker stops the long run within a batch; its metrics so far stay.
    wait_for(at, lambda a: any(b.key == f"cancel{blocker}" for b in a.button), timeout=30,
             what=lambda: f"the long run's cancel button ({state(blocker)})")
    next(b for b in at.button if b.key == f"cancel{blocker}").click().run()
    assert_clean(at)
    wait_for(at, lambda a: runs.get_run(blocker).status == "cancelled", timeout=120,
             what=lambda: f"the cancellation ({state(blocker)})")
    assert runs.get_run(blocker).resumable
    wait_for(at, lambda a: any(b.key == f"resume{blocker}" for b in a.button), timeout=30,
             what=lambda: f"the long run's resume button ({state(blocker)})")
    # The resumed short run now trains to the end on the freed lane.
    wait_for(at, lambda a: runs.get_run(new_id).status in ("succeeded", "failed"), timeout=300,
             what=lambda: f"the resumed run to finish ({state(new_id)})")
    assert runs.get_run(new_id).status == "succeeded", runs.get_run(new_id).error
    wait_for(at, lambda a: runs.get_run(new_id).job_status not in ("queued", "running"), timeout=120,
             what=lambda: f"the resumed run's post-training export ({state(new_id)})")


# --- scale: a 10,000-image dataset stays quick (sampled thumbnails, LIMIT queries) ----------

def test_datasets_and_train_pages_stay_quick_with_10000_images(data_dir: Path, shared_datasets: Path) -> None:
    import hashlib

    from storage import repositories as repo
    from storage.db import get_sessionmaker
    from storage.models import Dataset, Image
    from workbench import datasets
    from workbench.settings import get_settings

    z = data_dir.parent / "seed.zip"
    z.write_bytes(bean_zip(shared_datasets, per_class=10))
    seed = datasets.add_dataset(z, "seed")
    sm = get_sessionmaker(get_settings().database_url)
    with sm.begin() as s:
        real = s.query(Image).filter(Image.dataset_id == seed.id).all()
        big = repo.add_dataset(s, name="big", source="big.zip", classes=seed.classes, health=dict(seed.health),
                               split_config=dict(seed.split_config), skipped=[], num_images=10_000)
        rows = []
        for i in range(10_000):
            im = real[i % len(real)]
            rows.append({"store_path": im.store_path, "sha256": hashlib.sha256(f"{i}".encode()).hexdigest(),
                         "phash": im.phash, "width": im.width, "height": im.height, "mode": im.mode,
                         "label": im.label, "split": ("train", "val", "test")[i % 3],
                         "group": None, "original_name": f"{im.label}/img{i:05d}.jpg"})
        repo.add_images(s, big.id, rows)
    with sm() as s:
        assert s.query(Image).filter(Image.dataset_id == big.id).count() == 10_000
        assert s.get(Dataset, big.id).num_images == 10_000

    open_page("datasets")  # warm imports and caches once
    for page in ("datasets", "train"):
        t0 = time.monotonic()
        at = open_page(page)
        elapsed = time.monotonic() - t0
        assert_clean(at)
        print(f"\n{page} page with a 10,000-image dataset: {elapsed:.2f} s (AppTest run, incl. app start)")
        assert elapsed < 15, f"{page} took {elapsed:.1f} s with a 10,000-image dataset"
    at = open_page("datasets")
    assert {m.label: m.value for m in at.metric}["Images"] == "10000"
    # Only a sample is decoded for thumbnails: 6 per class, not 10,000.
    assert len(at.get("image")) == 12
