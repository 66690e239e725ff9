"""The one fixtures module: builders the test modules share (no test module imports another).

Everything here is real: generated or real bean-leaf image files, a really trained (few SGD
steps) Lite0 checkpoint, real SQLite, the real app and server started as a user would.

* generated images and dataset rows for the training and job-runner tests;
* the beans workspace (a data dir with an ingested beans subset and one trained checkpoint),
  built once per session, and succeeded runs made from it;
* the Streamlit app opened on a page; the prediction server's port and start/stop;
* a worker process of another host; a DICOM file.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
from conftest import REPO_ROOT, SHARED_DATASETS
from PIL import Image

from workbench.paths import RunPaths
from workbench.status import RunStatus

if TYPE_CHECKING:  # streamlit is imported by the page tests only
    from streamlit.testing.v1 import AppTest

# --- generated images (the training and job-runner tests) ---------------------------------------
# Per class: (base RGB, stripe period). Differences a frozen ImageNet backbone picks up at 64 px.
_CLASS_LOOK = [((200, 60, 50), 4), ((60, 170, 70), 8), ((60, 80, 200), 16), ((190, 180, 60), 6)]


def make_image(label: int, index: int, size: int = 48) -> Image.Image:
    rng = np.random.default_rng([label, index])
    base, period = _CLASS_LOOK[label % len(_CLASS_LOOK)]
    yy, xx = np.mgrid[0:size, 0:size]
    stripes = ((xx + yy + index) // period % 2).astype(np.float32)[..., None]
    img = np.asarray(base, np.float32) * (0.6 + 0.4 * stripes)
    img += rng.normal(0, 18, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def write_images(root: Path, counts: Sequence[int], size: int = 48, fmt: str = "png") -> list[tuple[str, int]]:
    """Write counts[c] images of class c under root/<c>/; returns (path, label) samples."""
    out = []
    for label, n in enumerate(counts):
        d = root / f"class{label}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            p = d / f"img{i:03d}.{fmt}"
            make_image(label, i, size).save(p)
            out.append((str(p), label))
    return out


def create_dataset_rows(data_dir: Path, session_factory, name: str, counts: Sequence[int],
                        val_per_class: int = 3, size: int = 48) -> int:
    """A dataset + image rows in the real DB, image files in the real store; returns the dataset id."""
    from storage.models import Dataset
    from storage.models import Image as ImageRow

    classes = [f"class{c}" for c in range(len(counts))]
    rows = []
    for label, n in enumerate(counts):
        for i in range(n):
            im = make_image(label, i, size)
            raw = im.tobytes()
            sha = hashlib.sha256(raw + name.encode()).hexdigest()
            rel = f"store/{sha[:2]}/{sha}.png"
            (data_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            im.save(data_dir / rel)
            split = "val" if i < val_per_class else "train"
            rows.append(dict(store_path=rel, sha256=sha, phash="0" * 16, width=size, height=size, mode="RGB",
                             label=classes[label], split=split, original_name=f"{classes[label]}/{i}.png"))
    with session_factory.begin() as s:
        ds = Dataset(name=name, source="generated", classes=classes, num_classes=len(classes),
                     num_images=len(rows), health={}, split_config={}, skipped=[])
        s.add(ds)
        s.flush()
        for r in rows:
            s.add(ImageRow(dataset_id=ds.id, **r))
        return ds.id


# --- the beans workspace ------------------------------------------------------------------------
BEANS = SHARED_DATASETS / "beans"


RES = 64


CLASSES = ["angular_leaf_spot", "bean_rust", "healthy"]


def make_source_folder(dst: Path, n_train: int = 6, n_val: int = 3, n_test: int = 4) -> Path:
    """train/val/test/<class>/ folder of real beans images (a user-provided split)."""
    if not BEANS.is_dir():
        pytest.skip(f"beans dataset not found at {BEANS}")
    for c in CLASSES:
        train_files = sorted((BEANS / "train" / c).iterdir())
        test_files = sorted((BEANS / "test" / c).iterdir())
        for split, files in (("train", train_files[:n_train]), ("val", train_files[n_train:n_train + n_val]),
                             ("test", test_files[:n_test])):
            (dst / split / c).mkdir(parents=True, exist_ok=True)
            for f in files:
                shutil.copy(f, dst / split / c / f.name)
    return dst


def train_checkpoint(path: Path, train_dir: Path, steps: int = 30, seed: int = 0) -> dict[str, Any]:
    """A real (tiny) training: Lite0 ImageNet weights, frozen backbone, a new linear head fitted
    with SGD on real embeddings; saved in the training engine's best.pt format."""
    import torch

    from core.images import load_rgb
    from core.preprocessing import preprocess
    from core.weights import create_model

    torch.manual_seed(seed)
    lm = create_model("lite0", len(CLASSES), weights="auto", resolution=RES)
    pre = lm.preprocessing
    xs, ys = [], []
    for i, c in enumerate(CLASSES):
        for f in sorted((train_dir / c).iterdir()):
            xs.append(preprocess(load_rgb(f), pre))
            ys.append(i)
    model = lm.model.eval()
    with torch.no_grad():  # frozen backbone: embeddings once (keeps the test fast on 2 cores)
        emb = model.forward_embedding(torch.from_numpy(np.stack(xs)))
    y = torch.tensor(ys)
    opt = torch.optim.SGD(model.classifier.parameters(), lr=0.01, momentum=0.9)
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model.classifier(emb), y)
        loss.backward()
        opt.step()
    ck = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": None, "epoch": steps,
          "config": {"seed": seed, "steps": steps, "lr": 0.01, "train": "head only"}, "variant": "lite0",
          "resolution": RES, "num_classes": len(CLASSES), "classes": CLASSES, "preprocessing": pre.to_dict(),
          "padding": model.padding, "bn_eps": model.bn_eps, "rng": None, "history": [],
          "best": {"train_loss": loss.item()}}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ck, path)
    return ck


class Workspace:
    def __init__(self, settings: Any, session_factory: Any, dataset_id: int, checkpoint: Path, source: Path):
        self.settings, self.Session, self.dataset_id = settings, session_factory, dataset_id
        self.checkpoint, self.source = checkpoint, source


def make_workspace(root: Path) -> Workspace:
    """Data dir + SQLite DB with a real ingested beans subset and one trained checkpoint file."""
    from storage.db import get_sessionmaker
    from workbench.datasets import add_dataset
    from workbench.settings import Settings

    settings = Settings(data_dir=root / "data", database_url=f"sqlite:///{root / 'data' / 'workbench.db'}")
    settings.ensure_dirs()
    src = make_source_folder(root / "src")
    info = add_dataset(src, "beans-mini", settings=settings)
    ck = root / "template_best.pt"
    train_checkpoint(ck, src / "train")
    return Workspace(settings, get_sessionmaker(settings.database_url), info.id, ck, src)


def make_run(ws: Workspace, dataset_id: int | None = None) -> int:
    """A succeeded run row (of the workspace's dataset, or ``dataset_id``) whose best.pt is a copy
    of the workspace checkpoint."""
    from storage.models import Run

    with ws.Session.begin() as s:
        run = Run(dataset_id=dataset_id or ws.dataset_id, variant="lite0", resolution=RES, preset="test",
                  status=RunStatus.SUCCEEDED, config={"seed": 0, "steps": 4})
        s.add(run)
        s.flush()
        rid = run.id
        dst = RunPaths(ws.settings, rid).root / "best.pt"
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ws.checkpoint, dst)
        run.checkpoint_path = dst.relative_to(ws.settings.data_dir).as_posix()
    return rid


_SHARED: dict[str, Any] = {}


def shared_workspace(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    """One workspace per test session (test_evaluate/test_bundle reuse it): ingest + training
    once keeps the suite fast on a shared 2-core machine. Tests only add their own runs."""
    if "ws" not in _SHARED:
        _SHARED["ws"] = make_workspace(tmp_path_factory.mktemp("workspace"))
    return _SHARED["ws"]


FAST = {"latency_runs": 3, "latency_seconds": 1.0}


@dataclass(frozen=True)
class Exported:
    """A succeeded run of the workspace, exported once (fp32 bundle, unsigned), and the
    evaluation its calibration came from. Tests read it; one that changes it makes its own."""

    run_id: int
    bundle: Path
    metrics: dict[str, Any]


def exported_run(ws: Workspace) -> Exported:
    """The session's one plain export (verification, latency, evaluation, bundle: the slow part)."""
    if "exported" not in _SHARED:
        from workbench.evaluations import latest_evaluation
        from workbench.exports import export_run

        rid = make_run(ws)
        out = export_run(rid, settings=ws.settings, session_factory=ws.Session, **FAST)
        ev = latest_evaluation(rid, settings=ws.settings, session_factory=ws.Session)
        assert ev is not None
        _SHARED["exported"] = Exported(rid, Path(out.bundle_path), ev.metrics)
    return _SHARED["exported"]


# --- a bundle without training ----------------------------------------------------------------
def random_weight_bundle(d: Path) -> dict[str, Any]:
    """In ``d``: a lite0 bundle at 64 px (three classes, random weights), its speed record timed
    on the CPU provider, and two images."""
    import torch
    from PIL import Image

    import core.latency
    from core.efficientnet import EfficientNet
    from core.export import build_bundle, export_fp32, measure_variants
    from core.preprocessing import Preprocessing

    torch.manual_seed(0)
    pre = Preprocessing(resolution=64)
    onnx = export_fp32(EfficientNet("lite0", 3).eval(), d / "model.onnx", pre, ["a", "b", "c"], "lite0", 1)
    with pytest.MonkeyPatch.context() as mp:
        # What is tested is the record, not the idle-cores wait: time even on a loaded dev box.
        mp.setattr(core.latency, "IDLE_OTHER_CORES", 1e6)
        record = measure_variants({"fp32": onnx}, 64, runs=3, max_seconds=0.5, throughput_batch=2,
                                  throughput_runs=1, idle_wait_s=0, device="cpu")["fp32"]
    info = {"classes": ["a", "b", "c"], "variant": "lite0", "run_id": 1, "preprocessing": pre,
            "variants": {"fp32": {**record, "file": "model.onnx", "accuracy": None}}}
    bundle = build_bundle(d / "bundle.zip", {"model.onnx": onnx}, info)
    rng = np.random.default_rng(0)
    images = []
    for i in range(2):
        images.append(d / f"img{i}.png")
        Image.fromarray(rng.integers(0, 255, (80, 90, 3), dtype=np.uint8)).save(images[-1])
    return {"bundle": bundle, "record": record, "img0": images[0], "img1": images[1]}


# --- the web UI ---------------------------------------------------------------------------------
APP = REPO_ROOT / "workbench" / "app.py"


def page_path(name: str) -> str:
    return f"../pages/{name}.py"


def open_page(name: str, timeout: float = 60) -> AppTest:
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(APP), default_timeout=timeout)
    at.run()
    if name != "home":
        at.switch_page(page_path(name)).run()
    return at


def assert_clean(at: AppTest) -> None:
    """No uncaught exception (traceback box) and no error message on the page."""
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


# --- the prediction server ----------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_200(url: str, proc: subprocess.Popen, timeout: float = 90) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
            pytest.fail(f"server exited with {proc.returncode}:\n{out[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                return r.status
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"no answer from {url} within {timeout} s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:  # already gone (a failed start): keep its own error visible
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(proc.pid, signal.SIGKILL)


# --- another host's worker ----------------------------------------------------------------------
WORKER_LEASE_S = 6  # seconds: a dead host's job is taken over this soon after its last heartbeat


def spawn_host(host: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), WORKBENCH_LEASE_S=str(WORKER_LEASE_S))
    return subprocess.Popen([sys.executable, "-m", "workbench.worker", "--lane", "train", "--host-id", host],
                            cwd=REPO_ROOT, env=env, start_new_session=True)


# --- DICOM --------------------------------------------------------------------------------------
def write_dicom(path: Path, arr: np.ndarray, *, photometric: str = "MONOCHROME2",
                 window: tuple[float, float] | None = None) -> Path:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelRepresentation = 0
    if window:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = arr.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path
