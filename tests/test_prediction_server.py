"""`workbench serve` as a real subprocess on a free loopback port, called over HTTP.

The bundle comes from the shared workspace of tests/builders.py (real beans images, a really
trained Lite0 head, real ONNX Runtime); the server is started with the RUN ID, so it also shows
that a run resolves to its newest verified bundle. Its answers are compared with the bundle's own
predict.py on real images, and every bad input gets its own 4xx with a plain message.
"""
from __future__ import annotations

import base64
import csv
import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import httpx
import pytest
from builders import free_port, stop, wait_for_200

ROOT = Path(__file__).resolve().parents[1]
LIMITS = ["--max-images", "4", "--max-image-mb", "0.2", "--max-request-mb", "0.5"]


@pytest.fixture(scope="module")
def served(ws):
    from builders import exported_run

    rid, bundle = exported_run(ws).run_id, exported_run(ws).bundle
    port = free_port()
    env = {**os.environ, "WORKBENCH_DATA_DIR": str(ws.settings.data_dir), "DATABASE_URL": ws.settings.database_url,
           "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "workbench.cli", "serve", str(rid), "--port", str(port), *LIMITS],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_200(f"{base}/health", proc)
        with httpx.Client(base_url=base, timeout=60) as client:
            yield ws, bundle, client
    finally:
        stop(proc)


def _images(ws: Any, n: int = 3) -> list[Path]:
    return sorted(p for p in (ws.source / "test").rglob("*.jpg"))[:n]


def _predict_py(bundle: Path, images: list[Path], tmp_path: Path) -> list[dict[str, str]]:
    folder = tmp_path / "bundle"
    with zipfile.ZipFile(bundle) as zf:
        zf.extractall(folder)
    out = tmp_path / "pred.csv"
    r = subprocess.run([sys.executable, str(folder / "predict.py"), *map(str, images), "--csv", str(out),
                        "--top-k", "3"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    with open(out, newline="") as f:
        return list(csv.DictReader(f))


def test_health_metadata_and_docs(served) -> None:
    _, bundle, client = served
    assert client.get("/health").json()["status"] == "ok"
    meta = client.get("/metadata").json()
    assert meta["labels"] == ["angular_leaf_spot", "bean_rust", "healthy"]
    assert meta["bundle"]["sha256"] == hashlib.sha256(bundle.read_bytes()).hexdigest()  # the run's newest bundle
    assert meta["preprocessing"]["resolution"] == 64 and meta["calibration"]["calibrated"] is True
    assert meta["workbench_version"] and meta["limits"]["max_images"] == 4
    assert client.get("/docs").status_code == 200
    assert "/predict" in client.get("/openapi.json").json()["paths"]


def test_predictions_match_the_bundles_predict_py(served, tmp_path: Path) -> None:
    ws, bundle, client = served
    images = _images(ws)
    expected = _predict_py(bundle, images, tmp_path)
    multipart = client.post("/predict", files=[("images", (p.name, p.read_bytes(), "image/jpeg")) for p in images])
    assert multipart.status_code == 200, multipart.text
    as_json = client.post("/predict", json={"images": [{"name": p.name, "data": base64.b64encode(p.read_bytes())
                                                        .decode()} for p in images]})
    assert as_json.status_code == 200, as_json.text
    for got in (multipart.json()["predictions"], as_json.json()["predictions"]):
        assert [g["image"] for g in got] == [p.name for p in images]
        for g, row in zip(got, expected):
            assert g["label"] == row["predicted_label"]
            assert abs(g["confidence"] - float(row["confidence"])) < 1e-6
            for pair in row["top_k"].split(";"):
                label, p = pair.rsplit(":", 1)
                assert abs(g["probabilities"][label] - float(p)) < 1e-6
            assert abs(sum(g["probabilities"].values()) - 1.0) < 1e-5
            assert g["decision"] is None  # three classes: no threshold


def _jpeg(ws: Any) -> bytes:
    return _images(ws, 1)[0].read_bytes()


BAD_INPUTS = {
    # case: (request kwargs from the workspace, status, words the message must contain)
    "not an image": (lambda ws: {"files": [("images", ("notes.jpg", b"hello, not a picture", "image/jpeg"))]},
                     400, "notes.jpg: not an image"),
    "empty image": (lambda ws: {"files": [("images", ("empty.png", b"", "image/png"))]}, 400, "empty"),
    "no image": (lambda ws: {"json": {"images": []}}, 400, "no image"),
    "too many": (lambda ws: {"files": [("images", (f"{i}.jpg", _jpeg(ws), "image/jpeg")) for i in range(5)]},
                 413, "at most 4"),
    "image too large": (lambda ws: {"files": [("images", ("big.png", b"\x89PNG" + b"0" * 250_000, "image/png"))]},
                        413, "big.png: the image is larger than the limit of 0.2 MB"),
    "request too large": (lambda ws: {"content": b"0" * 600_000, "headers": {"content-type": "application/json"}},
                          413, "the limit is 0.5 MB per request"),
    "wrong content type": (lambda ws: {"content": _jpeg(ws), "headers": {"content-type": "image/jpeg"}},
                           415, "'image/jpeg' is not accepted"),
    "bad json": (lambda ws: {"content": b"{images:", "headers": {"content-type": "application/json"}},
                 400, "not valid JSON"),
    "json without images": (lambda ws: {"json": {"pictures": []}}, 400, 'must look like {"images"'),
    "bad base64": (lambda ws: {"json": {"images": [{"name": "a.jpg", "data": "***"}]}}, 400, "a.jpg: \"data\" is not "
                   "valid base64"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_requests_get_a_plain_4xx(served, case: str) -> None:
    ws, _, client = served
    make, status, words = BAD_INPUTS[case]
    r = client.post("/predict", **make(ws))
    assert r.status_code == status, r.text
    assert words in r.json()["detail"]
    assert client.get("/health").status_code == 200  # and the server is still up


def test_serve_refuses_a_non_loopback_host_without_the_flag(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "WORKBENCH_ALLOW_OPEN"}
    r = subprocess.run([sys.executable, "-m", "workbench.cli", "serve", "1", "--host", "0.0.0.0"], cwd=ROOT,
                       env={**env, "WORKBENCH_DATA_DIR": str(tmp_path)}, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--allow-remote" in r.stderr and "no password" in r.stderr


def test_serve_says_when_a_run_has_no_bundle(data_dir: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "workbench.cli", "serve", "999"], cwd=ROOT, env=dict(os.environ),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "run 999 has no verified bundle yet" in r.stderr, r.stderr


def test_metadata_is_json_serialisable_for_a_folder_bundle(served, tmp_path: Path) -> None:
    from workbench.predictor import Predictor

    _, bundle, _ = served
    folder = tmp_path / "unpacked"
    with zipfile.ZipFile(bundle) as zf:
        zf.extractall(folder)
    meta = Predictor.load(folder).metadata()
    assert meta["bundle"]["sha256_of"] == "manifest" and json.dumps(meta)
