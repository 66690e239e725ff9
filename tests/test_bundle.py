"""The deploy bundle: predict.py reproduces Workbench exactly, and the CLI round trip."""
from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.images import load_rgb
from core.preprocessing import IMAGENET_MEAN, IMAGENET_STD, Preprocessing, preprocess

TEMPLATE = Path(__file__).resolve().parents[1] / "core" / "bundle_template" / "predict.py"
BEANS = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "beans"


def _template():
    spec = importlib.util.spec_from_file_location("bundle_predict_template", TEMPLATE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


@pytest.mark.parametrize("pre", [
    Preprocessing(64, 1.0, "bicubic", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    Preprocessing(96, 0.875, "bilinear", IMAGENET_MEAN, IMAGENET_STD),
    Preprocessing(80, 0.9, "nearest", IMAGENET_MEAN, IMAGENET_STD),
])
def test_predict_py_preprocessing_identical(pre: Preprocessing, tmp_path: Path) -> None:
    if not BEANS.is_dir():
        pytest.skip("beans dataset not available")
    mod = _template()
    pre_json = json.loads(pre.to_json())  # exactly what the bundle's preprocessing.json holds
    files = sorted((BEANS / "test" / "healthy").iterdir())[:3]
    # Non-square and odd sizes exercise rounding of the resize and the crop offsets.
    wide = tmp_path / "wide.jpg"
    Image.open(files[0]).resize((301, 177)).save(wide)
    for f in [*files, wide]:
        a = preprocess(load_rgb(f), pre)
        b = mod.preprocess(mod.load_rgb(f), pre_json)
        assert a.dtype == b.dtype == np.float32 and np.array_equal(a, b)


def test_predict_py_decoding_matches_load_rgb(tmp_path: Path) -> None:
    mod = _template()
    rng = np.random.default_rng(0)
    rgba = Image.fromarray(rng.integers(0, 256, (20, 30, 4), dtype=np.uint8), "RGBA")
    cases = {"rgba.png": rgba, "palette.png": rgba.convert("RGB").convert("P"),
             "gray16.png": Image.fromarray(rng.integers(0, 65535, (20, 30), dtype=np.uint16)),
             "gray.jpg": Image.fromarray(rng.integers(0, 256, (20, 30), dtype=np.uint8), "L")}
    for name, im in cases.items():
        im.save(tmp_path / name)
        assert np.array_equal(np.asarray(load_rgb(tmp_path / name)), np.asarray(mod.load_rgb(tmp_path / name))), name


def test_predict_py_reads_dicom_like_workbench(tmp_path: Path) -> None:
    """Windowed, MONOCHROME1 and a real scanner file: predict.py's pixels equal core.images'."""
    from builders import write_dicom
    from pydicom.data import get_testdata_file

    mod = _template()
    arr = np.array([[0, 1000, 1500], [2000, 3000, 4000]], dtype=np.uint16)
    files = [write_dicom(tmp_path / "plain.dcm", arr),
             write_dicom(tmp_path / "window.dcm", arr, window=(1000, 200)),
             write_dicom(tmp_path / "mono1.dcm", arr, photometric="MONOCHROME1"),
             Path(get_testdata_file("CT_small.dcm")), Path(get_testdata_file("MR_small.dcm"))]
    no_suffix = tmp_path / "scan_without_extension"
    no_suffix.write_bytes(files[1].read_bytes())  # found by its DICM marker, like Workbench does
    for f in [*files, no_suffix]:
        ours, theirs = np.asarray(load_rgb(f)), np.asarray(mod.load_rgb(f))
        assert ours.shape == theirs.shape and np.array_equal(ours, theirs), f.name
    assert set(mod.find_images([str(tmp_path)])) >= {f for f in files if f.parent == tmp_path}


def test_predict_py_without_pydicom_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from builders import write_dicom

    mod = _template()
    f = write_dicom(tmp_path / "scan.dcm", np.array([[0, 9], [3, 4]], dtype=np.uint16))
    monkeypatch.setitem(sys.modules, "pydicom", None)  # as on a machine without pydicom: import fails
    with pytest.raises(RuntimeError, match="pip install pydicom"):
        mod.load_rgb(f)


@pytest.fixture(scope="module")
def exported(ws):
    from builders import FAST, make_run

    from workbench.exports import export_run

    rid = make_run(ws)
    return rid, export_run(rid, int8=True, calibration_images=6, settings=ws.settings, session_factory=ws.Session,
                           **FAST)


def test_bundle_predict_subprocess_reproduces_test_accuracy(ws, exported, tmp_path: Path) -> None:
    from workbench.evaluations import latest_evaluation

    rid, out = exported
    bundle = Path(out.bundle_path)
    dest = tmp_path / "bundle"
    with zipfile.ZipFile(bundle) as zf:
        names = set(zf.namelist())
        zf.extractall(dest)
    assert {"model.onnx", "model_int8.onnx", "labels.json", "preprocessing.json", "README.md", "predict.py",
            "manifest.json"} <= names

    # The model card lists the sha256 of every other file (for people), and they match.
    card = (dest / "README.md").read_text()
    for n in names - {"README.md", "manifest.json"}:
        assert hashlib.sha256((dest / n).read_bytes()).hexdigest() in card, n
    # The manifest lists every file but itself (for machines), README.md included; unsigned here.
    manifest = json.loads((dest / "manifest.json").read_text())
    assert set(manifest["files"]) == names - {"manifest.json"} and manifest["run_id"] == str(rid)
    assert manifest["format_version"] == 1 and "signature" not in manifest
    for n, sha in manifest["files"].items():
        assert hashlib.sha256((dest / n).read_bytes()).hexdigest() == sha, n
    assert "seed" in card.lower() and "Health warnings" in card and "Intended use" in card and "int8" in card

    # A clean subprocess with only the bundle: classify the test images, compare with Workbench.
    test_dir = ws.source / "test"
    csv_path = tmp_path / "pred.csv"
    r = subprocess.run([sys.executable, str(dest / "predict.py"), str(test_dir), "--csv", str(csv_path),
                        "--top-k", "2"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(open(csv_path)))
    assert len(rows) == 12
    acc = np.mean([Path(row["path"]).parent.name == row["predicted_label"] for row in rows])
    ev = latest_evaluation(rid, settings=ws.settings, session_factory=ws.Session)
    assert ev is not None and acc == ev.metrics["accuracy"]  # exactly the workbench's test accuracy
    assert all(len(row["top_k"].split(";")) == 2 and 0 < float(row["confidence"]) <= 1 for row in rows)


def test_cli_evaluate_export_predict(ws, exported, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    from storage.db import reset_sessionmakers
    from workbench.cli import main

    monkeypatch.setenv("WORKBENCH_DATA_DIR", str(ws.settings.data_dir))
    monkeypatch.delenv("DATABASE_URL", raising=False)
    rid = exported[0]  # export reuses its verified fp32 file
    assert main(["evaluate", str(rid), "--sensitivity", "0.9"]) == 0
    assert "balanced accuracy" in capsys.readouterr().out
    zip_path = tmp_path / "b.zip"
    assert main(["export", str(rid), "-o", str(zip_path)]) == 0
    assert "verified on 12 test images" in capsys.readouterr().out and zip_path.is_file()
    imgs = sorted((ws.source / "test" / "bean_rust").iterdir())[:2]
    labels = []
    for i, target in enumerate((str(zip_path), str(rid))):  # the checked bundle, then the run's ONNX
        out_csv = tmp_path / f"p{i}.csv"
        assert main(["predict", target, *map(str, imgs), "--csv", str(out_csv), "--top-k", "1"]) == 0
        rows = list(csv.DictReader(open(out_csv)))
        assert [r["path"] for r in rows] == list(map(str, imgs))
        labels.append([(r["predicted_label"], round(float(r["confidence"]), 4)) for r in rows])
    assert labels[0] == labels[1]
    assert main(["predict", "not-a-bundle", str(imgs[0])]) == 2
    assert "neither a bundle" in capsys.readouterr().err
    assert main(["evaluate", "9999"]) == 2  # an unknown run is bad input (README: exit codes)
    assert "no run with id 9999" in capsys.readouterr().err
    reset_sessionmakers()


def test_export_job_handler_runs_in_worker_context(ws, exported) -> None:
    """The UI enqueues an 'export' job; the worker's handler builds a new bundle."""
    from storage import repositories as repo
    from workbench import jobs
    from workbench.handlers import HANDLERS
    from workbench.handlers.postrun import handle_export
    from workbench.status import JobKind, JobStatus

    rid = exported[0]
    with ws.Session.begin() as s:
        before = len(repo.artifacts_for_run(s, rid, "bundle"))
        job_id = jobs.enqueue(s, "export", rid, {"fp16": False}).id
    assert HANDLERS[JobKind.EXPORT].handle is handle_export
    ctx = jobs.JobContext(job_id, "export", rid, {"fp16": False}, ws.Session, ws.settings)
    assert handle_export(ctx).status == JobStatus.SUCCEEDED
    with ws.Session() as s:
        assert len(repo.artifacts_for_run(s, rid, "bundle")) == before + 1
    bad = jobs.JobContext(job_id, "export", 99999, {}, ws.Session, ws.settings)
    out = handle_export(bad)
    assert out.status == JobStatus.FAILED and "no run with id 99999" in (out.error or "")


def test_export_signs_with_the_installation_key_and_predict_checks_it(ws, exported, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """`workbench export` signs with WORKBENCH_BUNDLE_KEY; `predict` accepts it under that key only."""
    import json

    from storage.db import reset_sessionmakers
    from workbench.cli import main

    monkeypatch.setenv("WORKBENCH_DATA_DIR", str(ws.settings.data_dir))
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.setenv("WORKBENCH_BUNDLE_KEY", "lab-key-1")
    zip_path = tmp_path / "signed.zip"
    assert main(["export", str(exported[0]), "-o", str(zip_path)]) == 0
    with zipfile.ZipFile(zip_path) as zf:
        manifest = json.loads(zf.read("manifest.json"))
    assert manifest["signature"]["algorithm"] == "HMAC-SHA256"
    img = sorted((ws.source / "test" / "healthy").iterdir())[0]
    capsys.readouterr()
    assert main(["predict", str(zip_path), str(img), "--csv", str(tmp_path / "p.csv")]) == 0
    assert "signed by this installation's key" in capsys.readouterr().out
    monkeypatch.setenv("WORKBENCH_BUNDLE_KEY", "another-lab")
    assert main(["predict", str(zip_path), str(img), "--csv", str(tmp_path / "q.csv")]) == 2  # bad input
    assert "refusing bundle" in capsys.readouterr().err and not (tmp_path / "q.csv").exists()
    reset_sessionmakers()
