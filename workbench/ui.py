"""Shared helpers for the Streamlit pages (pages/*.py).

Pages stay thin: they lay out widgets and call ``workbench.*`` services. Everything a
page needs repeatedly lives here: the cached DB session factory, readable error display,
"service not available yet" handling, thumbnails, pagination and small formatters.

State that must survive a refresh lives in SQLite; ``st.session_state`` only holds
transient UI choices (which run is selected, the current page of a table).
"""
from __future__ import annotations

import importlib
import io
import logging
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any, Optional

import streamlit as st

from workbench.settings import Settings, get_settings

log = logging.getLogger("workbench.ui")

ROOT = Path(__file__).resolve().parent.parent
PAGES_DIR = ROOT / "pages"

TERMINAL_STATUSES = {"succeeded", "completed", "done", "finished", "failed", "cancelled", "canceled", "error"}
ACTIVE_STATUSES = {"queued", "running", "pending", "starting", "cancelling", "working"}


# --- settings and database ------------------------------------------------------------

def settings() -> Settings:
    s = get_settings()
    _ensure_dirs(str(s.data_dir))
    return s


@st.cache_resource(show_spinner=False)
def _ensure_dirs(data_dir: str) -> bool:
    get_settings().ensure_dirs()
    return True


@st.cache_resource(show_spinner="Opening the database…")
def _sessionmaker(database_url: str):  # noqa: ANN202
    from storage.db import get_sessionmaker

    return get_sessionmaker(database_url)


def db():  # noqa: ANN201
    """The process-wide SQLAlchemy sessionmaker for the configured database (migrated)."""
    return _sessionmaker(settings().database_url)


def masked_url(url: str) -> str:
    """A database URL with any password hidden."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - display only
        return url


# --- errors and optional services -----------------------------------------------------

def friendly(exc: BaseException) -> str:
    """One readable line for an exception (no traceback)."""
    msg = str(exc).strip()
    if not msg:
        msg = exc.__class__.__name__
    if len(msg) > 600:
        msg = msg[:600] + "…"
    return msg


def show_error(what: str, exc: BaseException) -> None:
    log.exception("%s", what, exc_info=exc)
    st.error(f"**{what}.** {friendly(exc)}", icon="⚠️")


@contextmanager
def errors(what: str) -> Iterator[None]:
    """Turn any exception inside the block into an ``st.error`` message (logged with traceback).

    Streamlit's own control-flow exceptions (st.stop, st.rerun) derive from BaseException
    and pass through untouched.
    """
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - shown to the user, logged for the operator
        show_error(what, exc)


def service(name: str, *, quiet: bool = False) -> Optional[ModuleType]:
    """Import ``workbench.<name>``; if it is not there yet, say so and return None."""
    try:
        return importlib.import_module(f"workbench.{name}")
    except ModuleNotFoundError as exc:
        if exc.name not in (f"workbench.{name}",):
            if not quiet:
                show_error(f"workbench.{name} could not be loaded", exc)
            return None
        if not quiet:
            st.info(f"This part of Workbench is not available yet (`workbench/{name}.py` is missing).", icon="🚧")
        return None
    except Exception as exc:  # noqa: BLE001
        if not quiet:
            show_error(f"workbench.{name} could not be loaded", exc)
        return None


def has(module: Optional[ModuleType], *names: str) -> bool:
    return module is not None and all(hasattr(module, n) for n in names)


def require(module: Optional[ModuleType], *names: str) -> bool:
    """True if the service exposes every function; otherwise show a "not available" note."""
    if module is None:
        return False
    missing = [n for n in names if not hasattr(module, n)]
    if missing:
        st.info(
            f"Not available yet: `{module.__name__}` has no {', '.join(f'`{m}`' for m in missing)}.", icon="🚧"
        )
        return False
    return True


# --- generic record access ------------------------------------------------------------

def field(obj: Any, name: str, default: Any = None) -> Any:
    """Attribute or key access, so pages work with ORM rows, dataclasses or dicts."""
    if obj is None:
        return default
    if isinstance(obj, dict):
        return obj.get(name, default)
    return getattr(obj, name, default)


# --- formatting -----------------------------------------------------------------------

def fmt_num(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def fmt_seconds(s: Optional[float]) -> str:
    if s is None:
        return "—"
    s = float(s)
    if s < 60:
        return f"{s:.0f} s"
    if s < 3600:
        return f"{s // 60:.0f} min {s % 60:02.0f} s"
    return f"{s // 3600:.0f} h {(s % 3600) // 60:02.0f} min"


def fmt_bytes(n: Optional[float]) -> str:
    if n is None:
        return "—"
    n = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


STATUS_ICON = {
    "queued": ":material/schedule:", "pending": ":material/schedule:", "running": ":material/directions_run:",
    "working": ":material/directions_run:", "succeeded": ":material/check_circle:",
    "completed": ":material/check_circle:", "done": ":material/check_circle:", "finished": ":material/check_circle:",
    "failed": ":material/error:", "error": ":material/error:", "cancelled": ":material/block:",
    "canceled": ":material/block:", "cancelling": ":material/block:",
}


def status_label(status: Optional[str]) -> str:
    """Status with a Material icon, for st.markdown (dataframes show the plain word)."""
    status = status or "unknown"
    return f"{STATUS_ICON.get(status, ':material/circle:')} {status}"


# --- thumbnails and images ------------------------------------------------------------

@st.cache_data(show_spinner=False, max_entries=4000)
def thumbnail(path: str, size: int = 128) -> Optional[bytes]:
    """JPEG bytes of a small thumbnail of an image (or DICOM) file; None if unreadable."""
    try:
        from core.images import load_rgb

        img = load_rgb(path)
        img.thumbnail((size, size))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=85)
        return buf.getvalue()
    except Exception:  # noqa: BLE001 - a broken file shows as a placeholder
        log.warning("cannot make a thumbnail of %s", path, exc_info=True)
        return None


def store_file(rel_path: str) -> Path:
    """Absolute path of a file stored relative to the data dir."""
    from storage.artifacts import resolve_in_data_dir

    return resolve_in_data_dir(rel_path, settings().data_dir)


def thumbnail_grid(items: Sequence[tuple[str | Path, str]], columns: int = 6, size: int = 128) -> None:
    """Show (absolute path, caption) pairs as a grid of thumbnails."""
    if not items:
        return
    cols = st.columns(columns)
    for i, (path, caption) in enumerate(items):
        data = thumbnail(str(path), size)
        with cols[i % columns]:
            if data is None:
                st.caption(f"⚠️ unreadable\n\n{caption}")
            else:
                st.image(data, caption=caption, width=size)


# --- pagination -----------------------------------------------------------------------

def paginate(total: int, page_size: int, key: str) -> tuple[int, int]:
    """A page picker under a table; returns (offset, limit). Hidden when everything fits on one page."""
    pages = max(1, math.ceil(total / page_size))
    if pages == 1:
        return 0, page_size
    page = st.pagination(pages, key=key, max_visible_pages=7)
    return (int(page) - 1) * page_size, page_size


# --- small layout helpers -------------------------------------------------------------

def header(title: str, caption: str | None = None) -> None:
    st.title(title)
    if caption:
        st.caption(caption)


def empty_state(message: str, page: str | None = None, label: str | None = None) -> None:
    st.info(message, icon="ℹ️")
    if page:
        st.page_link(str(PAGES_DIR / page), label=label or "Go there", icon="➡️")


# --- overview, versions, weights (home and settings pages) ----------------------------

def overview_counts() -> dict[str, int]:
    """Counts for the home page: three COUNT queries, fast at any size."""
    from sqlalchemy import func, select

    from storage.models import Dataset, Run

    with db()() as s:
        return {
            "datasets": s.scalar(select(func.count()).select_from(Dataset)) or 0,
            "runs": s.scalar(select(func.count()).select_from(Run)) or 0,
            "active": s.scalar(
                select(func.count()).select_from(Run).where(Run.status.in_(sorted(ACTIVE_STATUSES)))
            ) or 0,
        }


def disk_free(path: Path) -> int:
    import shutil

    return shutil.disk_usage(path).free


def password_enabled() -> bool:
    from workbench import auth

    return auth.configured_hash() is not None


def versions() -> list[dict[str, str]]:
    """Installed versions, read from package metadata (nothing heavy is imported)."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    rows = [{"component": "python", "version": platform.python_version()}]
    for pkg in ("workbench", "streamlit", "torch", "torchvision", "timm", "onnx", "onnxruntime",
                "sqlalchemy", "alembic", "numpy", "pillow", "altair", "pandas"):
        try:
            v = version(pkg)
        except PackageNotFoundError:
            v = "not installed"
        rows.append({"component": pkg, "version": v})
    return rows


@st.cache_data(ttl=60, show_spinner="Checking weights…")
def weights_table() -> list[dict[str, Any]]:
    from core.weights import weights_availability

    rows = []
    for name, status in weights_availability(check_hub=False).items():
        rows.append({
            "variant": name,
            "available": bool(status.available),
            "source": getattr(status.source, "kind", None) or "—",
            "where": status.location,
        })
    return rows


# --- datasets: samples, duplicate thumbnails ------------------------------------------

def dataset_sample(dataset_id: int, classes: Sequence[str], per_class: int = 6) -> list[tuple[Path, str]]:
    """A stable sample of images per class (one LIMIT query per class; fast on 10k+ images)."""
    from sqlalchemy import select

    from storage.models import Image

    data_dir = settings().data_dir
    out: list[tuple[Path, str]] = []
    with db()() as s:
        for label in classes:
            rows = s.execute(
                select(Image.store_path, Image.split, Image.original_name)
                .where(Image.dataset_id == dataset_id, Image.label == label)
                .order_by(Image.sha256)  # content hash: a pseudo-random but stable order
                .limit(per_class)
            ).all()
            out.extend((data_dir / p, f"{label} · {split}") for p, split, _name in rows)
    return out


def store_paths_for(dataset_id: int, shas: Sequence[str]) -> dict[str, Path]:
    """Absolute stored file per sha256 for one dataset (bounded IN query)."""
    from sqlalchemy import select

    from storage.models import Image

    shas = list(dict.fromkeys(shas))[:500]
    if not shas:
        return {}
    data_dir = settings().data_dir
    with db()() as s:
        rows = s.execute(
            select(Image.sha256, Image.store_path).where(Image.dataset_id == dataset_id, Image.sha256.in_(shas))
        ).all()
    return {sha: data_dir / p for sha, p in rows}


# --- long work off the script thread -------------------------------------------------
# Training goes through the job runner (workbench.jobs: a separate worker process). The job
# runner only runs kinds registered by the modules its worker imports (workbench.runs,
# workbench.postrun), so the UI's own long tasks — ingesting an uploaded zip, building an
# export bundle, predicting with Grad-CAM — run on a background thread of this server
# process instead. That thread never calls st.*: it records progress and outcome in a
# `jobs` row which the pages poll from an st.fragment. Those rows use the status "working"
# (not "queued"/"running"), so the worker never claims them and jobs.reconcile never fails
# them for having no worker. If the server stops mid-way, the row is marked failed on the
# next start (reconcile_thread_jobs), so the page says so instead of spinning forever.

INGEST_KIND = "ingest"
THREAD_KINDS = (INGEST_KIND, "ui-export", "ui-evaluate", "ui-predict")
THREAD_RUNNING = "working"
_threads: dict[int, Any] = {}


def _job_update(job_id: int, **values: Any) -> None:
    from storage.models import Job

    with db().begin() as s:
        job = s.get(Job, job_id)
        if job is not None:
            for k, v in values.items():
                setattr(job, k, v)


def _progress_writer(job_id: int, every: float = 0.5):  # noqa: ANN202
    """A (done, total) / (message, fraction) progress callback that writes at most every ``every`` s."""
    import time

    last = [0.0]

    def cb(a: Any, b: Any) -> None:
        now = time.monotonic()
        if isinstance(a, str):  # (message, fraction in 0..1)
            prog = {"phase": a, "fraction": float(b)}
            final = float(b) >= 1.0
        else:  # (done, total)
            prog = {"phase": "ingesting", "done": int(a), "total": int(b),
                    "fraction": (int(a) / int(b)) if b else 0.0}
            final = int(a) >= int(b)
        if final or now - last[0] >= every:
            last[0] = now
            _job_update(job_id, progress=prog)

    return cb


def _thread_body(job_id: int, work: Any) -> None:
    """Run ``work(progress) -> result dict`` and record the outcome. No st.* calls here."""
    from storage.models import utcnow

    try:
        result = work(_progress_writer(job_id)) or {}
        _job_update(job_id, status="succeeded", finished_at=utcnow(),
                    progress={"phase": "done", "fraction": 1.0, **result.pop("progress", {})},
                    payload={**result.pop("payload_base", {}), **_json_safe(result)})
    except BaseException as exc:  # noqa: BLE001 - recorded for the page to show
        log.warning("background job %s failed", job_id, exc_info=True)
        try:
            _job_update(job_id, status="failed", finished_at=utcnow(), error=friendly(exc))
        except Exception:  # noqa: BLE001
            log.exception("could not record the failure of job %s", job_id)
    finally:
        _threads.pop(job_id, None)


def _json_safe(d: dict[str, Any]) -> dict[str, Any]:
    import json

    return json.loads(json.dumps(d, default=str))


def start_thread_job(kind: str, payload: dict[str, Any], work: Any, *, run_id: Optional[int] = None) -> int:
    """Record a running job row and start ``work(progress)`` on a daemon thread; returns the job id."""
    import os
    import threading

    from storage.models import Job, utcnow

    with db().begin() as s:
        job = Job(kind=kind, status=THREAD_RUNNING, started_at=utcnow(), worker_pid=os.getpid(), run_id=run_id,
                  payload=payload, progress={"phase": "starting", "fraction": 0.0})
        s.add(job)
        s.flush()
        job_id = job.id

    def work_with_payload(progress: Any) -> dict[str, Any]:
        return {"payload_base": payload, **(work(progress) or {})}

    t = threading.Thread(target=_thread_body, args=(job_id, work_with_payload), name=f"{kind}-{job_id}",
                         daemon=True)
    _threads[job_id] = t
    t.start()
    return job_id


@st.cache_resource(show_spinner=False)
def _reconciled(database_url: str) -> bool:
    reconcile_thread_jobs()
    return True


def reconcile_thread_jobs() -> int:
    """Mark "working" thread jobs that no live thread of this process owns as failed."""
    import os

    from sqlalchemy import select

    from storage.models import Job, utcnow

    n = 0
    with db().begin() as s:
        for job in s.scalars(select(Job).where(Job.kind.in_(THREAD_KINDS), Job.status == THREAD_RUNNING)):
            if job.worker_pid == os.getpid() and job.id in _threads:
                continue
            job.status = "failed"
            job.finished_at = utcnow()
            job.error = "Interrupted: the Workbench server stopped while this was running. Please start it again."
            n += 1
    return n


def recent_jobs(kinds: Sequence[str], limit: int = 5, run_id: Optional[int] = None) -> list[dict[str, Any]]:
    """Most recent jobs of some kinds (newest first) as plain dicts."""
    from sqlalchemy import select

    from storage.models import Job

    _reconciled(settings().database_url)
    stmt = select(Job).where(Job.kind.in_(list(kinds)))
    if run_id is not None:
        stmt = stmt.where(Job.run_id == run_id)
    with db()() as s:
        rows = s.scalars(stmt.order_by(Job.id.desc()).limit(limit)).all()
        return [
            {"id": j.id, "kind": j.kind, "status": j.status, "run_id": j.run_id, "payload": j.payload or {},
             "name": (j.payload or {}).get("name"), "filename": (j.payload or {}).get("filename"),
             "progress": j.progress or {}, "error": j.error, "created_at": j.created_at,
             "finished_at": j.finished_at}
            for j in rows
        ]


def start_ingest(upload: Any, filename: str, name: str, *, csv_upload: Any = None,
                 group_regex: Optional[str] = None, seed: int = 0) -> int:
    """Save an uploaded zip/CSV and ingest it as dataset ``name`` on a background thread."""
    import shutil

    from storage import repositories as repo
    from workbench import datasets

    name = (name or "").strip()
    if not name:
        raise ValueError("Give the dataset a name.")
    with db()() as s:
        if repo.get_dataset_by_name(s, name) is not None:
            raise ValueError(f"A dataset named {name!r} already exists: choose another name or delete it.")

    def work(progress: Any) -> dict[str, Any]:
        tmp = settings().tmp_dir / f"upload-{name.encode().hex()[:40]}-{id(upload):x}"
        try:
            tmp.mkdir(parents=True, exist_ok=True)
            progress("saving the upload", 0.0)
            import re

            safe = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(filename).name).strip("._") or "upload.zip"
            src = tmp / safe
            upload.seek(0)
            with open(src, "wb") as f:
                shutil.copyfileobj(upload, f, 1 << 20)
            csv_path = None
            if csv_upload is not None:
                csv_path = tmp / "manifest.csv"
                csv_upload.seek(0)
                with open(csv_path, "wb") as f:
                    shutil.copyfileobj(csv_upload, f, 1 << 20)
            info = datasets.add_dataset(src, name, csv=csv_path, group_regex=group_regex or None, seed=seed,
                                        progress=progress)
            return {"dataset_id": info.id, "progress": {"done": info.num_images, "total": info.num_images}}
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    return start_thread_job(INGEST_KIND, {"name": name, "filename": filename}, work)


def ingest_jobs(limit: int = 5) -> list[dict[str, Any]]:
    return recent_jobs([INGEST_KIND], limit)


# --- runs: leaderboard queries (LIMIT/OFFSET, sorted in SQL) --------------------------

# Leaderboard columns: label -> (SQL source, where it lives in the row dict).
LEADERBOARD_SORTS: dict[str, tuple[str, str]] = {
    "macro-F1": ("summary", "test_macro_f1"),
    "accuracy": ("summary", "test_accuracy"),
    "latency ms": ("summary", "latency_ms_p50"),
    "size MB": ("summary", "onnx_mb"),
    "training time": ("column", "train_seconds"),
    "created": ("column", "created_at"),
    "run": ("column", "id"),
}


@st.cache_data(show_spinner=False, max_entries=512)
def model_params(variant: str, resolution: int, num_classes: int) -> Optional[int]:
    try:
        from core.efficientnet import count_cost

        return count_cost(variant, resolution, num_classes).params
    except Exception:  # noqa: BLE001 - unknown custom variant: show a dash
        return None


def _run_row(run: Any, dataset_name: str, num_classes: int) -> dict[str, Any]:
    sm = run.summary or {}
    best = run.best_metrics or {}
    return {
        "run": run.id,
        "dataset": dataset_name,
        "variant": run.variant,
        "res": run.resolution,
        "preset": run.preset,
        "status": run.status,
        "macro-F1": sm.get("test_macro_f1"),
        "accuracy": sm.get("test_accuracy"),
        "val accuracy": best.get("val_accuracy", best.get("accuracy")),
        "latency ms": sm.get("latency_ms_p50"),
        "size MB": sm.get("onnx_mb"),
        "params M": (p / 1e6) if (p := model_params(run.variant, run.resolution, num_classes)) else None,
        "training s": run.train_seconds,
        "batch": run.batch_label,
        "created": run.created_at,
        "error": run.error,
    }


def count_runs(*, dataset_id: Optional[int] = None, statuses: Optional[Sequence[str]] = None) -> int:
    from sqlalchemy import func, select

    from storage.models import Run

    where = []
    if dataset_id is not None:
        where.append(Run.dataset_id == dataset_id)
    if statuses:
        where.append(Run.status.in_(list(statuses)))
    with db()() as s:
        return s.scalar(select(func.count()).select_from(Run).where(*where)) or 0


def runs_table(*, offset: int = 0, limit: int = 25, sort: str = "macro-F1", descending: bool = True,
               dataset_id: Optional[int] = None, statuses: Optional[Sequence[str]] = None
               ) -> tuple[int, list[dict[str, Any]]]:
    """(total, one page of leaderboard rows), sorted in SQL so 1000s of runs stay fast."""
    from sqlalchemy import func, nulls_last, select

    from storage.models import Dataset, Run

    where = []
    if dataset_id is not None:
        where.append(Run.dataset_id == dataset_id)
    if statuses:
        where.append(Run.status.in_(list(statuses)))
    src, key = LEADERBOARD_SORTS.get(sort, ("column", "id"))
    col = func.json_extract(Run.summary, f"$.{key}") if src == "summary" else getattr(Run, key)
    order = nulls_last(col.desc() if descending else col.asc())
    with db()() as s:
        total = s.scalar(select(func.count()).select_from(Run).where(*where)) or 0
        rows = s.execute(
            select(Run, Dataset.name, Dataset.num_classes).join(Dataset, Run.dataset_id == Dataset.id)
            .where(*where).order_by(order, Run.id.desc()).offset(offset).limit(limit)
        ).all()
        return total, [_run_row(r, name, k) for r, name, k in rows]


def run_points(dataset_id: Optional[int] = None, limit: int = 5000) -> list[dict[str, Any]]:
    """Light rows (id, variant, accuracy, latency…) of finished runs for the scatter plot."""
    from sqlalchemy import select

    from storage.models import Run

    stmt = select(Run.id, Run.variant, Run.resolution, Run.summary, Run.dataset_id).where(
        Run.summary.is_not(None))
    if dataset_id is not None:
        stmt = stmt.where(Run.dataset_id == dataset_id)
    with db()() as s:
        rows = s.execute(stmt.order_by(Run.id.desc()).limit(limit)).all()
    out = []
    for rid, variant, res, sm, _ds in rows:
        sm = sm or {}
        if sm.get("test_accuracy") is None or sm.get("latency_ms_p50") is None:
            continue
        out.append({"run": rid, "model": f"{variant}@{res}", "accuracy": sm["test_accuracy"],
                    "macro-F1": sm.get("test_macro_f1"), "latency ms": sm["latency_ms_p50"],
                    "size MB": sm.get("onnx_mb")})
    return out


def pareto_front(points: Sequence[dict[str, Any]], x: str = "latency ms", y: str = "accuracy") -> set[int]:
    """Run ids no other run beats on both lower ``x`` and higher ``y``."""
    best_y = -math.inf
    front: set[int] = set()
    for p in sorted(points, key=lambda p: (p[x], -p[y])):
        if p[y] > best_y:
            front.add(p["run"])
            best_y = p[y]
    return front


def run_choices(*, statuses: Optional[Sequence[str]] = None, limit: int = 500) -> dict[int, str]:
    """{run id: label} of the most recent runs, for select boxes."""
    from sqlalchemy import select

    from storage.models import Dataset, Run

    stmt = select(Run.id, Run.variant, Run.resolution, Run.status, Dataset.name).join(
        Dataset, Run.dataset_id == Dataset.id)
    if statuses:
        stmt = stmt.where(Run.status.in_(list(statuses)))
    with db()() as s:
        rows = s.execute(stmt.order_by(Run.id.desc()).limit(limit)).all()
    return {rid: f"#{rid} · {name} · {variant}@{res} · {status}" for rid, variant, res, status, name in rows}


def run_curves(run_ids: Sequence[int], limit_per_run: int = 2000) -> list[dict[str, Any]]:
    """Long-format per-epoch metrics of some runs: {run, epoch, phase, metric, value}."""
    from sqlalchemy import select

    from storage.models import RunMetric

    out: list[dict[str, Any]] = []
    with db()() as s:
        for rid in list(run_ids)[:20]:
            rows = s.execute(
                select(RunMetric.epoch, RunMetric.phase, RunMetric.metrics).where(RunMetric.run_id == rid)
                .order_by(RunMetric.epoch).limit(limit_per_run)
            ).all()
            for epoch, phase, metrics in rows:
                for k, v in (metrics or {}).items():
                    if isinstance(v, (int, float)) and not isinstance(v, bool):
                        out.append({"run": f"#{rid}", "epoch": epoch, "phase": phase, "metric": k, "value": v})
    return out


def query_run_id() -> Optional[int]:
    """The ``?run=<id>`` of the address, so pages can link to each other."""
    v = st.query_params.get("run")
    try:
        return int(v) if v is not None else None
    except ValueError:
        return None


def pick_run(label: str, choices: dict[int, str], key: str) -> Optional[int]:
    """A run select box that starts on ``?run=`` and writes the choice back to the address."""
    if not choices:
        return None
    ids = list(choices)
    want = query_run_id()
    index = ids.index(want) if want in choices else 0
    rid = st.selectbox(label, ids, index=index, format_func=lambda i: choices[i], key=key)
    if rid is not None and st.query_params.get("run") != str(rid):
        st.query_params["run"] = str(rid)
    return rid


# --- evaluation and export artifacts --------------------------------------------------

def evaluation_plots(evaluation: Any, run_id: int, evaluation_id: int) -> dict[str, Any]:
    """{plot name: verified path, or the error explaining why it cannot be shown} for one evaluation.

    Only that evaluation's plot rows are read and verified (sha256 of small PNGs), not every
    artifact of the run.
    """
    from sqlalchemy import select

    from storage.models import Artifact

    with db()() as s:
        rows = s.execute(select(Artifact.id, Artifact.kind, Artifact.meta)
                         .where(Artifact.run_id == run_id, Artifact.kind.in_(["plot", "eval_json"]))
                         .order_by(Artifact.id)).all()
    out: dict[str, Any] = {}
    for art_id, kind, meta in rows:
        meta = meta or {}
        if meta.get("evaluation_id") != evaluation_id:
            continue
        try:
            out[meta.get("name", kind)] = evaluation.artifact_for_download(art_id)
        except Exception as exc:  # noqa: BLE001 - shown next to the missing plot
            out[meta.get("name", kind)] = exc
    return out


def show_plot(plots: dict[str, Any], name: str, caption: str | None = None, width: Any = "stretch") -> None:
    item = plots.get(name)
    if item is None:
        st.caption(f"No {name.replace('_', ' ')} plot for this evaluation.")
    elif isinstance(item, BaseException):
        st.error(f"The {name.replace('_', ' ')} plot cannot be shown: {friendly(item)}")
    else:
        st.image(str(item), caption=caption, width=width)


def start_export(run_id: int, *, fp16: bool, int8: bool, uint8_graph: bool) -> int:
    """Build a run's bundle (workbench.evaluation.export_run) as a background job; returns the job id."""
    from workbench import evaluation

    options = {"fp16": fp16, "int8": int8, "uint8_graph": uint8_graph}

    def work(progress: Any) -> dict[str, Any]:
        res = evaluation.export_run(run_id, progress=progress, **options)
        return {"bundle_artifact_id": res["bundle_artifact_id"], "variants": res["variants"],
                "verification": res["verification"]}

    return start_thread_job("ui-export", {"run_id": run_id, **options}, work, run_id=run_id)


def export_jobs(run_id: int, limit: int = 5) -> list[dict[str, Any]]:
    return recent_jobs(["ui-export", "export"], limit, run_id=run_id)


def download_button(evaluation: Any, artifact_id: int, label: str, file_name: str, key: str) -> None:
    """A download button whose file is verified (present, sha256 unchanged) when it is clicked."""
    try:
        path = evaluation.artifact_for_download(artifact_id)
    except Exception as exc:  # noqa: BLE001
        st.error(f"{label}: not offered for download. {friendly(exc)}")
        return
    # Verified again when clicked: the file may have changed since the page was drawn.
    st.download_button(label, data=lambda: Path(evaluation.artifact_for_download(artifact_id)).read_bytes(),
                       file_name=file_name,
                       mime="application/zip", key=key, on_click="ignore", icon=":material/download:",
                       type="primary")


# --- recommender (cached: the same budget gives the same answer) ----------------------

@st.cache_data(ttl=300, show_spinner=False)
def cached_devices() -> list[dict[str, Any]]:
    from workbench import recommend_service

    return recommend_service.list_devices()


@st.cache_data(ttl=60, show_spinner="Ranking the candidates…", max_entries=64)
def cached_recommendation(budget: dict[str, Any]) -> dict[str, Any]:
    from workbench import recommend_service

    return recommend_service.recommend_for(budget, check_hub=False)


# --- predict (a background job: model loading + Grad-CAM take seconds) ----------------

PREDICT_KIND = "ui-predict"
MAX_PREDICT_IMAGES = 24


def _predict_work(run_id: int, files: list[tuple[str, bytes]], top_k: int, gradcam: bool, out_dir: Path):
    """The job body: top-k probabilities (+ Grad-CAM overlay PNGs) for uploaded images, with core."""

    def work(progress: Any) -> dict[str, Any]:
        import numpy as np
        from PIL import Image as PILImage

        from core import gradcam as gc
        from core.evaluate import softmax
        from core.export import load_trained
        from core.images import load_rgb
        from core.preprocessing import preprocess, resize_and_crop
        from storage.artifacts import resolve_in_data_dir
        from storage.models import Run

        with db()() as s:
            run = s.get(Run, run_id)
            if run is None or not run.checkpoint_path:
                raise ValueError(f"Run #{run_id} has no trained model.")
            ckpt = resolve_in_data_dir(run.checkpoint_path, settings().data_dir)
        progress("loading the model", 0.05)
        tm = load_trained(ckpt)
        out_dir.mkdir(parents=True, exist_ok=True)
        results = []
        import torch

        for i, (name, data) in enumerate(files):
            progress(f"image {i + 1} of {len(files)}", 0.1 + 0.9 * i / len(files))
            src = out_dir / f"in{i}{Path(name).suffix.lower()[:8]}"
            src.write_bytes(data)
            try:
                img = load_rgb(src)
            except Exception as exc:  # noqa: BLE001 - one bad file does not sink the batch
                results.append({"name": name, "error": friendly(exc)})
                continue
            x = preprocess(img, tm.preprocessing)[None].astype(np.float32)
            with torch.inference_mode():
                logits = tm.model(torch.from_numpy(x)).float().numpy()
            probs = softmax(logits)[0]
            order = np.argsort(-probs)[:top_k]
            entry: dict[str, Any] = {"name": name,
                                     "top": [{"class": tm.classes[j], "p": float(probs[j])} for j in order]}
            if gradcam:
                cam = gc.grad_cam(tm.model, x, int(order[0]))
                base = np.asarray(resize_and_crop(img, tm.preprocessing), dtype=np.uint8)
                over = out_dir / f"cam{i}.png"
                PILImage.fromarray(gc.overlay(base, cam)).save(over)
                entry["overlay"] = str(over)
            results.append(entry)
        return {"results": results, "classes": list(tm.classes)}

    return work


def start_predict(run_id: int, uploads: Sequence[Any], *, top_k: int = 3, gradcam: bool = True) -> int:
    if not uploads:
        raise ValueError("Drop one or more images first.")
    if len(uploads) > MAX_PREDICT_IMAGES:
        raise ValueError(f"At most {MAX_PREDICT_IMAGES} images at a time, please.")
    files = [(u.name, u.getvalue()) for u in uploads]
    import shutil
    import uuid

    root = settings().tmp_dir / "predict"
    old = sorted((p for p in root.glob("*") if p.is_dir()), key=lambda p: p.stat().st_mtime) if root.is_dir() else []
    for stale in old[:-20]:  # keep the overlays of the 20 most recent predictions
        shutil.rmtree(stale, ignore_errors=True)
    out_dir = root / uuid.uuid4().hex
    return start_thread_job(PREDICT_KIND, {"run_id": run_id, "images": len(files), "top_k": top_k},
                            _predict_work(run_id, files, top_k, gradcam, out_dir), run_id=run_id)


def job(job_id: int) -> Optional[dict[str, Any]]:
    from storage.models import Job

    _reconciled(settings().database_url)
    with db()() as s:
        j = s.get(Job, job_id)
        if j is None:
            return None
        return {"id": j.id, "kind": j.kind, "status": j.status, "run_id": j.run_id, "payload": j.payload or {},
                "progress": j.progress or {}, "error": j.error, "created_at": j.created_at,
                "finished_at": j.finished_at}


# --- training: live state of runs (read straight from SQLite) -------------------------

def live_runs(limit: int = 10, run_ids: Optional[Sequence[int]] = None) -> list[dict[str, Any]]:
    """Active runs plus the most recent finished ones, with their job's latest progress and events."""
    from sqlalchemy import or_, select

    from storage.models import Dataset, Job, Run, RunEvent

    with db()() as s:
        stmt = select(Run, Dataset.name).join(Dataset, Run.dataset_id == Dataset.id)
        if run_ids:
            stmt = stmt.where(Run.id.in_(list(run_ids)))
        active = s.execute(stmt.where(Run.status.in_(sorted(ACTIVE_STATUSES))).order_by(Run.id.desc())
                           .limit(limit)).all()
        recent = s.execute(stmt.where(~Run.status.in_(sorted(ACTIVE_STATUSES))).order_by(Run.id.desc())
                           .limit(max(0, limit - len(active)))).all() if len(active) < limit else []
        out = []
        for run, ds_name in [*active, *recent]:
            job = s.scalars(select(Job).where(Job.run_id == run.id, or_(Job.kind == "train", Job.kind == "training"))
                            .order_by(Job.id.desc()).limit(1)).first()
            events = s.execute(select(RunEvent.created_at, RunEvent.level, RunEvent.message)
                               .where(RunEvent.run_id == run.id).order_by(RunEvent.id.desc()).limit(5)).all()
            out.append({
                "id": run.id, "dataset": ds_name, "variant": run.variant, "resolution": run.resolution,
                "preset": run.preset, "status": run.status, "error": run.error, "summary": run.summary or {},
                "best": run.best_metrics or {}, "created_at": run.created_at, "started_at": run.started_at,
                "finished_at": run.finished_at, "cancel_requested": run.cancel_requested,
                "train_seconds": run.train_seconds, "progress": (job.progress if job else None) or {},
                "job_status": job.status if job else None,
                "events": [{"at": a, "level": lv, "message": m} for a, lv, m in events],
            })
        return out


@st.cache_data(show_spinner="Augmenting a few images…", max_entries=64)
def augment_grid(paths: tuple[str, ...], preset: str, resolution: int, n: int = 8, seed: int = 0) -> list[Any]:
    """Augmented views (uint8 arrays) exactly as training sees them, for the preset preview."""
    from core.augment import augment_preview

    return augment_preview(list(paths), preset, n=n, resolution=resolution, seed=seed)


def launch_training(runs: Any, dataset: Any, variants: Sequence[str], resolution: int, preset: str, recipe: str,
                    epochs: Optional[int], batch_label: Optional[str]) -> list[int]:
    """Queue one run per variant through the job runner (which starts its worker process)."""
    return runs.queue_training(dataset.id, list(variants), resolution, preset, recipe, epochs, batch_label)


def ensure_worker(runs: Any = None) -> None:
    from workbench import jobs

    jobs.ensure_worker()


_last_reconcile = [0.0]


def reconcile_runs(every_s: float = 15.0) -> None:
    """Let the job runner fail runs whose worker died (cheap; at most every ``every_s``)."""
    import time

    if time.monotonic() - _last_reconcile[0] < every_s:
        return
    _last_reconcile[0] = time.monotonic()
    try:
        from workbench import jobs

        jobs.reconcile()
    except Exception:  # noqa: BLE001 - informational only
        log.warning("reconcile failed", exc_info=True)


def default_preset(dataset_id: int) -> Optional[str]:
    """The training service's suggestion (medical for grayscale/DICOM data, else field)."""
    try:
        from workbench import runs

        with db()() as s:
            return runs.default_preset(s, dataset_id)
    except Exception:  # noqa: BLE001 - a suggestion only
        return None


def start_evaluate(run_id: int, *, tta: bool = False) -> int:
    """(Re-)evaluate a run on its test split as a background job; returns the job id."""
    from workbench import evaluation

    def work(progress: Any) -> dict[str, Any]:
        res = evaluation.evaluate_run(run_id, tta=tta, progress=progress)
        return {"evaluation_id": res["evaluation_id"]}

    return start_thread_job("ui-evaluate", {"run_id": run_id, "tta": tta}, work, run_id=run_id)


def job_progress_panel(kinds: Sequence[str], run_id: int, label: str, state_key: str) -> None:
    """Progress bars of a run's running background jobs (call inside an st.fragment).

    Reruns the whole page once when a job it saw running has finished, so the results appear.
    """
    jobs = recent_jobs(kinds, limit=3, run_id=run_id)
    running = [j for j in jobs if j["status"] in ACTIVE_STATUSES]
    for j in running:
        p = j["progress"]
        st.progress(min(max(float(p.get("fraction") or 0), 0.0), 1.0),
                    text=f"{label} #{j['id']}: {p.get('phase', 'working')}")
    if jobs and jobs[0]["status"] == "failed":
        st.error(f"The last {label.lower()} failed: {jobs[0]['error']}")
    if running:
        st.session_state[state_key] = True
    elif st.session_state.pop(state_key, False):
        st.rerun()


def live_fragment(run_every: float, what: str):  # noqa: ANN201
    """``st.fragment(run_every=...)`` whose body shows errors as ``st.error`` (never an exception box).

    Streamlit renders an exception raised inside a fragment itself, so the error handling has
    to live inside the fragment, not around the call.
    """
    import functools

    def deco(fn):  # noqa: ANN001, ANN202
        @functools.wraps(fn)
        def body(*args: Any, **kwargs: Any) -> Any:
            with errors(what):
                return fn(*args, **kwargs)

        return st.fragment(body, run_every=run_every)

    return deco
