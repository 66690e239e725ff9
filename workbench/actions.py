"""What the pages ask Workbench to do: stage what the user uploaded inside the data dir and
submit a job to its lane's worker (the slow work never runs in the UI server). Returns job ids;
the pages follow them with ``views.job``.
"""
from __future__ import annotations

import re
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

from storage import repositories as repo
from storage.db import get_sessionmaker
from workbench import lanes
from workbench.datasets import check_name
from workbench.paths import PREDICT, UPLOADS, in_import_dir, staging_dir
from workbench.settings import get_settings
from workbench.status import JobKind

MAX_PREDICT_IMAGES = 24
KEEP_PREDICTIONS = 20  # the staged inputs and overlays of this many recent predictions are kept


def _db() -> Any:
    return get_sessionmaker(get_settings().database_url)


def _stage(upload: BinaryIO, dest: Path) -> Path:
    upload.seek(0)
    with open(dest, "wb") as f:
        shutil.copyfileobj(upload, f, 1 << 20)
    return dest


def start_ingest(upload: BinaryIO, filename: str, name: str, *, csv_upload: BinaryIO | None = None,
                 group_regex: str | None = None, seed: int = 0) -> int:
    """Stage an uploaded zip/CSV under ``tmp/uploads/<id>/`` and queue its ingest; returns the job id."""
    name = (name or "").strip()
    if not name:
        raise ValueError("Give the dataset a name.")
    name = check_name(name)  # refuse a bad name before copying a large upload
    with _db()() as s:
        if repo.get_dataset_by_name(s, name) is not None:
            raise ValueError(f"A dataset named {name!r} already exists: choose another name or delete it.")
    settings = get_settings()
    folder = staging_dir(settings, UPLOADS) / uuid.uuid4().hex
    folder.mkdir(parents=True)
    rel = lambda p: p.relative_to(settings.data_dir).as_posix()  # noqa: E731 - payloads hold relative paths
    try:
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(filename).name).strip("._") or "upload.zip"
        src = _stage(upload, folder / safe)
        csv = None if csv_upload is None else _stage(
            csv_upload, folder / ("manifest.csv" if safe != "manifest.csv" else "manifest-1.csv"))
        payload = {"name": name, "filename": filename, "upload": rel(src), "csv": rel(csv) if csv else None,
                   "group_regex": group_regex or None, "seed": int(seed)}
        return lanes.submit(JobKind.INGEST, payload, settings=settings)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)  # no job will ever read it
        raise


def start_import(entry: str, name: str, *, group_regex: str | None = None, seed: int = 0) -> int:
    """Queue the ingest of a folder (or zip, CSV) in the server's import dir; nothing is copied
    through the browser, so its size is not limited by the upload cap. Returns the job id."""
    settings = get_settings()
    src = in_import_dir(settings, entry)
    name = check_name((name or "").strip() or src.stem)
    with _db()() as s:
        if repo.get_dataset_by_name(s, name) is not None:
            raise ValueError(f"A dataset named {name!r} already exists: choose another name or delete it.")
    payload = {"name": name, "filename": src.name, "import": src.name, "group_regex": group_regex or None,
               "seed": int(seed)}
    return lanes.submit(JobKind.INGEST, payload, settings=settings)


def start_predict(run_id: int, uploads: Sequence[Any], *, top_k: int = 3, gradcam: bool = True) -> int:
    """Stage images (objects with ``.name`` and ``.getvalue()``) and queue a prediction; returns the job id."""
    if not uploads:
        raise ValueError("Drop one or more images first.")
    if len(uploads) > MAX_PREDICT_IMAGES:
        raise ValueError(f"At most {MAX_PREDICT_IMAGES} images at a time, please.")
    settings = get_settings()
    root = staging_dir(settings, PREDICT)
    old = sorted((p for p in root.glob("*") if p.is_dir()), key=lambda p: p.stat().st_mtime) if root.is_dir() else []
    for stale in old[:-KEEP_PREDICTIONS]:
        shutil.rmtree(stale, ignore_errors=True)
    out_dir = root / uuid.uuid4().hex
    out_dir.mkdir(parents=True)
    rel = lambda p: p.relative_to(settings.data_dir).as_posix()  # noqa: E731
    files = []
    for i, upload in enumerate(uploads):
        src = out_dir / f"in{i}{Path(upload.name).suffix.lower()[:8]}"
        src.write_bytes(upload.getvalue())
        files.append({"name": upload.name, "path": rel(src)})
    payload = {"run_id": run_id, "images": len(files), "files": files, "top_k": top_k, "gradcam": gradcam,
               "out_dir": rel(out_dir)}
    return lanes.submit(JobKind.PREDICT, payload, run_id=run_id, settings=settings)


def start_export(run_id: int, *, fp16: bool, int8: bool, uint8_graph: bool) -> int:
    """Queue a run's bundle build (light lane); returns the job id."""
    return lanes.submit(JobKind.EXPORT, {"fp16": fp16, "int8": int8, "uint8_graph": uint8_graph}, run_id=run_id)


def start_evaluate(run_id: int, *, tta: bool = False) -> int:
    """Queue a (re-)evaluation on the test split (light lane); returns the job id."""
    return lanes.submit(JobKind.EVALUATE, {"tta": tta}, run_id=run_id)


def start_measure(budget: dict[str, Any]) -> int:
    """Queue "measure on this machine" for a recommender budget (train lane); returns the job id."""
    from workbench.recommend import THIS_MACHINE  # torch-heavy: only the Recommend page measures

    if budget.get("device") != THIS_MACHINE:
        raise ValueError(f"Only '{THIS_MACHINE}' can be measured from here; for another device run "
                         f"`workbench calibrate -o my-device.json` on it and import the file.")
    return lanes.submit(JobKind.MEASURE, {"budget": dict(budget)})
