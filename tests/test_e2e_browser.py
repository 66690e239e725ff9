"""End to end in a real browser: headless Chromium (Playwright) against `streamlit run workbench/app.py`.

The whole journey a user makes, through the page, on real data: upload a zip of real
bean-leaf photos, watch the ingest, launch a quick lite0 training, watch it finish (live
progress from the worker process), build the export bundle, download it and check its
contents. With WORKBENCH_SCREENSHOTS=1 it also saves a screenshot of every page into
docs/screenshots/ (that is what docs/take_screenshots.py does).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO_ROOT, SHARED_DATASETS

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCREENSHOTS = os.environ.get("WORKBENCH_SCREENSHOTS") == "1"
SHOTS_DIR = REPO_ROOT / "docs" / "screenshots"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is missing (`make` installs Debian chromium)"),
    pytest.mark.skipif(not (SHARED_DATASETS / "beans" / "train").is_dir(),
                       reason=f"real images not found at {SHARED_DATASETS / 'beans'}"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bean_zip(dest: Path, per_class: int = 12) -> Path:
    """Real photos, plus one healthy leaf also filed under bean_rust (a labelling error to find)."""
    with zipfile.ZipFile(dest, "w") as zf:
        for cls in ("healthy", "bean_rust"):
            for f in sorted((SHARED_DATASETS / "beans" / "train" / cls).iterdir())[:per_class]:
                zf.write(f, f"{cls}/{f.name}")
        dup = sorted((SHARED_DATASETS / "beans" / "train" / "healthy").iterdir())[0]
        zf.write(dup, f"bean_rust/copy_of_{dup.name}")
    return dest


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """`streamlit run workbench/app.py` on a free localhost port with a fresh data dir."""
    data_dir = tmp_path_factory.mktemp("e2e") / "workbench-data"
    port = _free_port()
    env = dict(os.environ, WORKBENCH_DATA_DIR=str(data_dir), PYTHONUNBUFFERED="1")
    env.pop("DATABASE_URL", None)
    env.pop("WORKBENCH_PASSWORD_HASH", None)
    log = open(data_dir.parent / "streamlit.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "workbench/app.py", "--server.port", str(port),
         "--server.address", "127.0.0.1", "--server.headless", "true"],
        cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                log.close()
                raise RuntimeError("streamlit did not start:\n"
                                   + (data_dir.parent / "streamlit.log").read_text(errors="replace")[-3000:]) from None
            time.sleep(0.3)
    try:
        yield url, data_dir
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
        _stop_worker(data_dir)


def _stop_worker(data_dir: Path) -> None:
    """Stop the job-runner workers (train and light lanes) this test's server started (detached by design)."""
    from conftest import stop_workers

    stop_workers(data_dir)


@pytest.fixture(scope="module")
def page(server: tuple[str, Path]):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
        pg = context.new_page()
        pg.set_default_timeout(60_000)
        yield pg
        context.close()
        browser.close()


def _goto(page, url: str) -> None:
    page.goto(url)
    page.locator('[data-testid="stApp"]').wait_for()
    page.locator('[data-testid="stMainBlockContainer"] h1').first.wait_for()


def _shot(page, name: str) -> None:
    """Screenshot the whole page: Streamlit scrolls inside its main section, so grow the viewport to fit."""
    if not SCREENSHOTS:
        return
    SHOTS_DIR.mkdir(parents=True, exist_ok=True)
    page.wait_for_timeout(1500)  # let charts and images finish drawing
    size = page.viewport_size
    height = page.evaluate("""() => {
        const main = document.querySelector('[data-testid="stMain"]');
        if (main) main.scrollTo(0, 0);
        const block = document.querySelector('[data-testid="stMainBlockContainer"]');
        return Math.ceil(block ? block.getBoundingClientRect().height + 40 : document.body.scrollHeight);
    }""")
    page.set_viewport_size({"width": size["width"], "height": max(size["height"], min(int(height), 4000))})
    page.wait_for_timeout(800)
    page.screenshot(path=str(SHOTS_DIR / f"{name}.png"))
    page.set_viewport_size(size)


def _no_exception_box(page) -> None:
    assert page.locator('[data-testid="stException"]').count() == 0


def test_upload_train_export_download(server: tuple[str, Path], page, tmp_path: Path) -> None:
    url, data_dir = server
    started = time.monotonic()

    # Home.
    _goto(page, url)
    page.get_by_text("Where your work is kept").wait_for()
    page.get_by_text(str(data_dir)).first.wait_for()
    _no_exception_box(page)
    _shot(page, "home")

    # Datasets: upload a real zip through the browser's file input.
    _goto(page, f"{url}/datasets")
    page.get_by_text("No datasets yet").wait_for()
    page.get_by_text("Upload a dataset").click()
    zip_path = _bean_zip(tmp_path / "beans-e2e.zip")
    page.locator('[data-testid="stFileUploader"] input[type="file"]').first.set_input_files(str(zip_path))
    page.get_by_text("beans-e2e.zip").first.wait_for()
    page.get_by_label("Dataset name").fill("beans-e2e")
    page.get_by_role("button", name="Upload and check").click()
    page.get_by_text("ingested 25 images").wait_for(timeout=90_000)
    page.get_by_text("Your datasets").wait_for()
    page.get_by_text("carry different labels").wait_for()  # the health report found the copied leaf
    _no_exception_box(page)
    page.get_by_role("tab", name="Samples").click()
    page.locator('[data-testid="stImage"]:visible').first.wait_for()
    _shot(page, "datasets")
    page.get_by_role("tab", name="Duplicates & leakage").click()
    page.get_by_text("conflicting labels").first.wait_for()
    _shot(page, "datasets-duplicates")

    # Recommend.
    _goto(page, f"{url}/recommend")
    page.get_by_text("Recommended:").wait_for()
    _no_exception_box(page)
    _shot(page, "recommend")

    # Train: lite0 at 96 px, quick recipe, 1 fine-tune epoch (the address pre-fills variant and size).
    _goto(page, f"{url}/train?variant=lite0&resolution=96")
    page.get_by_text("Preview: what the network will see").wait_for()
    page.locator('[data-testid="stImage"]:visible').first.wait_for()
    epochs = page.get_by_label("Fine-tune epochs (0 = recipe default)")
    epochs.fill("1")
    epochs.press("Enter")
    page.wait_for_timeout(800)
    page.get_by_role("button", name="Launch training").click()
    page.get_by_text("Run #1").first.wait_for(timeout=30_000)
    # Live progress, polled by the fragment from SQLite while the worker process trains.
    page.locator('[data-testid="stProgress"]').first.wait_for(timeout=60_000)
    if SCREENSHOTS:  # catch it mid-training, with the validation curves drawn
        page.locator('[data-testid="stVegaLiteChart"]').first.wait_for(timeout=180_000)
    _shot(page, "train")
    # Finished, exported and evaluated (the caption shows the measured test metrics and latency).
    page.get_by_text("test accuracy").first.wait_for(timeout=240_000)
    assert page.get_by_text("succeeded").count() >= 1
    _no_exception_box(page)

    # Refreshing loses nothing: the run is still there after a reload.
    page.reload()
    page.get_by_text("Run #1").first.wait_for()

    # Runs leaderboard.
    _goto(page, f"{url}/runs")
    page.get_by_text("Accuracy vs latency").wait_for()
    page.locator('[data-testid="stDataFrame"]').first.wait_for()
    _no_exception_box(page)
    _shot(page, "runs")

    # Evaluate.
    _goto(page, f"{url}/evaluate?run=1")
    page.get_by_text("Macro-F1").first.wait_for()
    _no_exception_box(page)
    _shot(page, "evaluate")
    if SCREENSHOTS:
        for tab, name in (("Confusion matrix", "evaluate-confusion"), ("ROC & PR", "evaluate-roc-pr"),
                          ("Misclassified & Grad-CAM", "evaluate-gradcam")):
            page.get_by_role("tab", name=tab).click()
            page.wait_for_timeout(500)
            _shot(page, name)

    # Export: build the bundle as a job, then download it through the browser.
    _goto(page, f"{url}/export?run=1")
    page.get_by_text("Verified: the exported model gives the same answers").wait_for()
    page.get_by_role("button", name="Build bundle").click()
    download_button = page.get_by_role("button", name="Download bundle")
    download_button.first.wait_for(timeout=120_000)
    _no_exception_box(page)
    _shot(page, "export")
    with page.expect_download(timeout=60_000) as dl_info:
        download_button.first.click()
    target = tmp_path / "bundle.zip"
    dl_info.value.save_as(str(target))
    with zipfile.ZipFile(target) as zf:
        names = set(zf.namelist())
        assert {"model.onnx", "labels.json", "preprocessing.json", "README.md", "predict.py"} <= names, names
        labels = json.dumps(json.loads(zf.read("labels.json")))
        assert "healthy" in labels and "bean_rust" in labels, labels
        model_bytes = zf.read("model.onnx")
    # The downloaded model runs in ONNX Runtime and predicts one of the two classes.
    import numpy as np
    import onnxruntime as ort

    sess = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    out = sess.run(None, {inp.name: np.zeros((1, 3, 96, 96), np.float32)})[0]
    assert out.shape == (1, 2)

    if SCREENSHOTS:
        # Predict and Settings, for the docs.
        _goto(page, f"{url}/predict?run=1")
        page.locator('[data-testid="stFileUploader"] input[type="file"]').first.set_input_files(
            [str(p) for p in sorted((SHARED_DATASETS / "beans" / "test" / "bean_rust").iterdir())[:2]])
        page.wait_for_timeout(1000)
        page.get_by_role("button", name="Predict").click()
        page.get_by_text("Grad-CAM for").first.wait_for(timeout=120_000)
        _shot(page, "predict")
        _goto(page, f"{url}/settings")
        page.get_by_text("Pretrained weights").wait_for()
        page.locator('[data-testid="stDataFrame"]').nth(1).wait_for()
        _shot(page, "settings")

    elapsed = time.monotonic() - started
    print(f"\nbrowser journey took {elapsed:.0f} s")
