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
ACTIVE_STATUSES = {"queued", "running", "pending", "starting", "cancelling"}


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
    """One readable line for an exception (no traceback); workbench.jobs.friendly, shared with the worker."""
    from workbench.jobs import friendly as _friendly

    return _friendly(exc)


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


# --- long work in the job runner -----------------------------------------------------
# Anything slow runs in a worker process of the job runner (workbench.jobs), never in this
# server: training on the "train" lane; ingest, export bundles, re-evaluation and predictions
# on the "light" lane, so they never wait for a long training. The page saves what the user
# uploaded into the data dir, enqueues a job and makes sure the lane's worker runs; a
# st.fragment then polls the job's row (queued -> running -> succeeded | failed). Refreshing
# the tab, closing the browser or restarting the server loses nothing.

INGEST_KIND = "ingest"
PREDICT_KIND = "predict"
MEASURE_KIND = "measure"


def enqueue_job(kind: str, payload: dict[str, Any], *, run_id: Optional[int] = None) -> int:
    """Queue a job, start its lane's worker if needed (``jobs.lane_of``); returns the job id."""
    from workbench import jobs

    with db().begin() as s:
        job_id = jobs.enqueue(s, kind, run_id, payload).id
    jobs.ensure_worker(settings(), lane=jobs.lane_of(kind))
    return job_id


def _save_upload(upload: Any, dest: Path) -> None:
    import shutil

    upload.seek(0)
    with open(dest, "wb") as f:
        shutil.copyfileobj(upload, f, 1 << 20)


def _safe_name(filename: str, default: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9._-]+", "_", Path(filename).name).strip("._") or default


def recent_jobs(kinds: Sequence[str], limit: int = 5, run_id: Optional[int] = None) -> list[dict[str, Any]]:
    """Most recent jobs of some kinds (newest first) as plain dicts."""
    from sqlalchemy import select

    from storage.models import Job

    reconcile_runs()
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
    """Save an uploaded zip/CSV under the data dir and queue its ingest as dataset ``name``; returns the job id."""
    import shutil
    import uuid

    from storage import repositories as repo
    from workbench import tasks

    name = (name or "").strip()
    if not name:
        raise ValueError("Give the dataset a name.")
    with db()() as s:
        if repo.get_dataset_by_name(s, name) is not None:
            raise ValueError(f"A dataset named {name!r} already exists: choose another name or delete it.")
    data_dir = settings().data_dir
    folder = settings().tmp_dir / tasks.UPLOADS / uuid.uuid4().hex
    folder.mkdir(parents=True)
    try:
        src = folder / _safe_name(filename, "upload.zip")
        _save_upload(upload, src)
        csv_path = None
        if csv_upload is not None:
            csv_path = folder / ("manifest.csv" if src.name != "manifest.csv" else "manifest-1.csv")
            _save_upload(csv_upload, csv_path)
        payload = {"name": name, "filename": filename, "upload": src.relative_to(data_dir).as_posix(),
                   "csv": csv_path.relative_to(data_dir).as_posix() if csv_path else None,
                   "group_regex": group_regex or None, "seed": int(seed)}
        return enqueue_job(INGEST_KIND, payload)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


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


def pick_finished_run_or_stop(label: str, key: str, empty: str = "No finished runs yet: train one first.") -> int:
    """The run picker of the pages that need a trained model; without one, says so and stops the page."""
    choices = run_choices(statuses=["succeeded", "completed", "done"])
    if not choices:
        empty_state(empty, "train.py", "Train a model")
        st.stop()
    return pick_run(label, choices, key=key)


def datasets_or_stop(datasets: Any, empty: str, page: str | None = None, label: str | None = None) -> list[Any]:
    """Every dataset, for pages that need one; an error or an empty list is shown and stops the page."""
    try:
        items = datasets.list_datasets()
    except Exception as exc:  # noqa: BLE001
        show_error("Could not list datasets", exc)
        st.stop()
    if not items:
        empty_state(empty, page, label)
        st.stop()
    return items


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
    """Queue a run's bundle build (workbench.postrun.handle_export, light lane); returns the job id."""
    return enqueue_job("export", {"fp16": fp16, "int8": int8, "uint8_graph": uint8_graph}, run_id=run_id)


def download_button(evaluation: Any, artifact_id: int, label: str, file_name: str, key: str) -> None:
    """A download button whose file is verified (present, sha256 unchanged) when it is clicked."""
    try:
        evaluation.artifact_for_download(artifact_id)  # verified now, to offer it or say why not
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


def start_measure(budget: dict[str, Any]) -> int:
    """Queue "measure on this machine" for this budget (workbench.tasks, train lane); returns the job id."""
    from workbench.recommend_service import THIS_MACHINE

    if budget.get("device") != THIS_MACHINE:
        raise ValueError(f"Only '{THIS_MACHINE}' can be measured from here; for another device run "
                         f"`workbench calibrate -o my-device.json` on it and import the file.")
    return enqueue_job(MEASURE_KIND, {"budget": dict(budget)})  # train lane: see jobs.LANE_OF_KIND


# --- predict (a background job: model loading + Grad-CAM take seconds) ----------------

MAX_PREDICT_IMAGES = 24


def start_predict(run_id: int, uploads: Sequence[Any], *, top_k: int = 3, gradcam: bool = True) -> int:
    """Save the images under the data dir and queue a prediction (workbench.tasks, light lane); returns the job id."""
    if not uploads:
        raise ValueError("Drop one or more images first.")
    if len(uploads) > MAX_PREDICT_IMAGES:
        raise ValueError(f"At most {MAX_PREDICT_IMAGES} images at a time, please.")
    import shutil
    import uuid

    from workbench import tasks

    data_dir = settings().data_dir
    root = settings().tmp_dir / tasks.PREDICT
    old = sorted((p for p in root.glob("*") if p.is_dir()), key=lambda p: p.stat().st_mtime) if root.is_dir() else []
    for stale in old[:-20]:  # keep the inputs and overlays of the 20 most recent predictions
        shutil.rmtree(stale, ignore_errors=True)
    out_dir = root / uuid.uuid4().hex
    out_dir.mkdir(parents=True)
    files = []
    for i, u in enumerate(uploads):
        src = out_dir / f"in{i}{Path(u.name).suffix.lower()[:8]}"
        src.write_bytes(u.getvalue())
        files.append({"name": u.name, "path": src.relative_to(data_dir).as_posix()})
    payload = {"run_id": run_id, "images": len(files), "files": files, "top_k": top_k, "gradcam": gradcam,
               "out_dir": out_dir.relative_to(data_dir).as_posix()}
    return enqueue_job(PREDICT_KIND, payload, run_id=run_id)


def job(job_id: int) -> Optional[dict[str, Any]]:
    from storage.models import Job

    reconcile_runs()
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
    """Let the job runner fail jobs (and runs) whose lane's worker died (cheap; at most every ``every_s``)."""
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
    """Queue a (re-)evaluation on the test split (workbench.postrun.handle_evaluate, light lane); returns the job id."""
    return enqueue_job("evaluate", {"tta": tta}, run_id=run_id)


def job_progress_panel(kinds: Sequence[str], run_id: int, label: str, state_key: str) -> None:
    """Progress bars of a run's running background jobs (call inside an st.fragment).

    Reruns the whole page once when a job it saw running has finished, so the results appear.
    """
    jobs = recent_jobs(kinds, limit=3, run_id=run_id)
    running = [j for j in jobs if j["status"] in ACTIVE_STATUSES]
    for j in running:
        p = j["progress"]
        st.progress(min(max(float(p.get("fraction") or 0), 0.0), 1.0),
                    text=f"{label} #{j['id']}: {p.get('message') or p.get('phase') or j['status']}")
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
