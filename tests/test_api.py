"""The Python API: docs/quickstart.ipynb executed for real (nbclient, a real kernel, real beans
images, a real training in the worker, a real bundle), and ``Predictor`` on in-memory images.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import SHARED_DATASETS

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "docs" / "quickstart.ipynb"
CLASSES = ["angular_leaf_spot", "bean_rust", "healthy"]
PER_CLASS = 8


def _beans_folder(dst: Path) -> Path:
    beans = SHARED_DATASETS / "beans" / "train"
    if not beans.is_dir():
        pytest.skip(f"beans dataset not found at {beans}")
    for c in CLASSES:
        (dst / c).mkdir(parents=True)
        for f in sorted((beans / c).iterdir())[:PER_CLASS]:
            shutil.copy(f, dst / c / f.name)
    return dst


def test_quickstart_notebook_runs_from_a_folder_to_predictions(data_dir: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import nbformat
    from nbclient import NotebookClient

    from workbench import Workbench

    images = _beans_folder(tmp_path / "beans")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    params = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    params.source += f"\nIMAGES = {str(images)!r}\n"
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # the kernel and its worker import this checkout
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()

    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors, errors
    assert f"{PER_CLASS * len(CLASSES)} images, {CLASSES}" in text
    assert "confidences calibrated with temperature" in text or "confidences not calibrated" in text
    rows = [line.split() for line in nb.cells[-1].outputs[0]["text"].splitlines()]
    assert len(rows) == 3 and all(r[1] in CLASSES and 0.0 < float(r[2]) <= 1.0 for r in rows)

    wb = Workbench()  # the notebook wrote into WORKBENCH_DATA_DIR: the same installation
    (run,) = wb.runs()
    assert run.status == "succeeded" and run.resolution == 96 and run.recipe == "quick"
    predictor = wb.predictor(run)
    assert predictor.labels == CLASSES


@pytest.fixture(scope="module")
def bundle(ws) -> Path:
    from builders import exported_run

    return exported_run(ws).bundle


def test_predictor_takes_paths_pil_images_numpy_arrays_and_bytes_alike(bundle: Path) -> None:
    from PIL import Image

    from workbench import Predictor
    from workbench.predictor import as_dict

    p = Predictor.load(bundle)
    files = sorted((SHARED_DATASETS / "beans" / "test").rglob("*.jpg"))[:2]
    by_path = p.predict(files)
    pil = [Image.open(f).convert("RGB") for f in files]
    arrays, raw = [np.asarray(im) for im in pil], [f.read_bytes() for f in files]
    for other in (p.predict(pil), p.predict(arrays), p.predict(raw)):
        assert [r.label for r in other] == [r.label for r in by_path]
        for a, b in zip(other, by_path):
            assert dict(a.top_k) == pytest.approx(dict(b.top_k), abs=1e-6)
    one = as_dict(p.predict(pil[0])[0])
    assert one["image"] == "image 0" and set(one["probabilities"]) == set(CLASSES)
    assert one["label"] == max(one["probabilities"], key=one["probabilities"].get)


@pytest.mark.parametrize("image, words", [
    (np.zeros((8, 8, 3), np.float32), "dtype uint8"),
    (np.zeros((8, 8, 2), np.uint8), "got shape (8, 8, 2)"),
    ("no/such/file.jpg", "no/such/file.jpg: no such file"),
    (b"not an image", "image 0: not an image"),
    (42, "expected a file path, a PIL image, a numpy array or bytes, got int"),
])
def test_predictor_names_the_bad_image(bundle: Path, image: object, words: str) -> None:
    from workbench import PredictionError, Predictor

    with pytest.raises(PredictionError) as err:
        Predictor.load(bundle).predict([image])  # type: ignore[list-item]
    assert words in str(err.value)


def test_workbench_reports_recommends_and_refuses_unknown_things(data_dir: Path, tmp_path: Path) -> None:
    from workbench import Workbench
    from workbench.datasets import DatasetError
    from workbench.runs import RunError

    wb = Workbench(data_dir=tmp_path / "elsewhere")
    assert wb.settings.data_dir == (tmp_path / "elsewhere").resolve() and wb.datasets() == []
    with pytest.raises(DatasetError, match="no dataset named 'nope'"):
        wb.report("nope")
    with pytest.raises(RunError):
        wb.run(12345)
    rec = wb.recommend(device="this-machine", latency_ms=50, check_hub=False)
    assert rec.feasible and rec.recommended is not None and rec.recommended.key
    with pytest.raises(TypeError, match="a run is a run id"):
        wb.evaluate("3")  # type: ignore[arg-type]


def test_train_without_waiting_returns_a_handle_at_once(data_dir: Path, tmp_path: Path) -> None:
    import fcntl

    from builders import write_images

    from workbench import RunFailed, Workbench
    from workbench.lanes import lock_path

    wb = Workbench()
    write_images(tmp_path / "src", [6, 6])
    wb.add_dataset(tmp_path / "src", name="tiny", progress=False)
    # Hold the train lane's lock, as a live worker would: no worker starts, so the run stays queued.
    lock_file = lock_path(wb.settings)
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        run = wb.train("tiny", variant="lite0", recipe="quick", wait=False)
        assert run.status == "queued" and run.info().recipe == "quick"
        assert run.cancel() == "cancelled"
        with pytest.raises(RunFailed, match=f"run {run.id} cancelled") as failed:
            run.wait(progress=False)
    assert failed.value.info.status == "cancelled"
