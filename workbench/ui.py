"""Streamlit helpers shared by the pages (pages/*.py): widgets, caches, fragments, formatting.

Pages lay out widgets; what they read or ask for comes from ``workbench.views`` and the
services. This module adds only what needs Streamlit: cached wrappers around views, readable
error display, thumbnails, pagination, run pickers, download buttons and live job panels.

State that must survive a refresh lives in the database; ``st.session_state`` only holds
transient UI choices (which run is selected, the current page of a table).
"""
from __future__ import annotations

import functools
import io
import logging
import math
import re
import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import streamlit as st

from workbench import artifacts, datasets, views, wording
from workbench.datasets import DatasetInfo
from workbench.jobs import friendly
from workbench.settings import Settings, get_settings
from workbench.status import JobStatus, RunStatus, SearchStatus
from workbench.views import ImageSample

log = logging.getLogger("workbench.ui")

ROOT = Path(__file__).resolve().parent.parent
PAGES_DIR = ROOT / "pages"

T = TypeVar("T")


# --- settings --------------------------------------------------------------------------

def settings() -> Settings:
    s = get_settings()
    _ensure_dirs(str(s.data_dir))
    return s


@st.cache_resource(show_spinner=False)
def _ensure_dirs(data_dir: str) -> bool:  # once per data dir and server process
    get_settings().ensure_dirs()
    return True


def masked_url(url: str) -> str:
    """A database URL with any password hidden (``user:***@host``)."""
    return re.sub(r"^([\w+.-]+://[^/:@]*):.*@", r"\1:***@", url)


def disk_free(path: Path) -> int:
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
            rows.append({"component": pkg, "version": version(pkg)})
        except PackageNotFoundError:
            rows.append({"component": pkg, "version": "not installed"})
    return rows


@st.cache_data(ttl=60, show_spinner="Checking weights…")
def weights_table() -> list[dict[str, Any]]:
    """Which variants have ImageNet weights here (local files and the hub cache; no network)."""
    from core.weights import weights_availability

    return [{"variant": name, "available": bool(w.available), "source": getattr(w.source, "kind", None) or "—",
             "where": w.location} for name, w in weights_availability(check_hub=False).items()]


# --- errors ----------------------------------------------------------------------------

def show_error(what: str, exc: BaseException) -> None:
    log.exception("%s", what, exc_info=exc)
    st.error(f"**{what}.** {friendly(exc)}", icon="⚠️")


@contextmanager
def errors(what: str) -> Iterator[None]:
    """Turn any exception inside the block into an ``st.error`` message (logged with its traceback).

    Streamlit's own control-flow exceptions (st.stop, st.rerun) derive from BaseException
    and pass through untouched.
    """
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - shown to the user, logged for the operator
        show_error(what, exc)


def live_fragment(run_every: float, what: str) -> Callable[[Callable[..., T]], Callable[..., T | None]]:
    """``st.fragment(run_every=...)`` whose body shows errors as ``st.error`` (never an exception box).

    Streamlit renders an exception raised inside a fragment itself, so the error handling has
    to live inside the fragment, not around the call.
    """
    def deco(fn: Callable[..., T]) -> Callable[..., T | None]:
        @functools.wraps(fn)
        def body(*args: Any, **kwargs: Any) -> T | None:
            with errors(what):
                return fn(*args, **kwargs)
            return None

        return st.fragment(body, run_every=run_every)

    return deco


# --- formatting ------------------------------------------------------------------------

def fmt_num(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def fmt_seconds(s: float | None) -> str:
    """A duration as people say it: "45 s", "9 min", "2 h 05 min" (rounded, never "8 min 60 s")."""
    return wording.duration(s)


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "—"
    n = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


# One line for each measure where a page first shows it (help= of st.metric, captions).
METRIC_HELP: dict[str, str] = {
    "accuracy": "Share of test images the model labels correctly.",
    "macro_f1": "Macro-F1: how well each class is found, averaged so every class counts the same, "
                "however rare (1 = perfect).",
    "ece": "Calibration error (ECE): how far the model's confidence is from how often it is right "
           "(0 = a 90 % confident answer is right 90 % of the time).",
    "latency_p50": "Typical time per image (p50): half of the images take less than this.",
    "latency_p95": "Slow-case time per image (p95): 95 of 100 images take less than this.",
    "gmacs": "GMACs: billions of multiply-adds per image, a measure of how much computing the model needs.",
    "top1_prior": "How accurate this model size is on the ImageNet benchmark: a guide to its capacity, "
                  "not a prediction of your score.",
    "params": "Parameters: the number of learned weights (millions); more needs more memory and data.",
    "throughput": "How many images per second it handles when given many at once.",
}
# Column labels for field names that reach a table (export variants, recommender candidates).
FIELD_LABELS: dict[str, str] = {
    "onnx_mb": "Model file (MB)", "file_mb": "Model file (MB)", "size_mb": "Model file (MB)",
    "latency_ms_p50": "Typical time per image (ms)", "latency_p50_ms": "Typical time per image (ms)",
    "latency_ms_p95": "Slow-case time per image (ms)", "latency_p95_ms": "Slow-case time per image (ms)",
    "throughput_images_per_s": "Images per second (in batches)", "accuracy": "Test accuracy",
    "accuracy_delta": "Accuracy change vs full precision", "top1_agreement_vs_fp32": "Same answer as full precision",
    "memory_mb": "Memory (MB)", "device_memory_mb": "Device memory (MB)", "params_m": "Parameters (millions)",
    "gmacs": "GMACs (computing per image)", "min_resolution": "Minimum resolution (px)", "file": "File",
    "latency_machine": "Measured on", "test_macro_f1": "Test macro-F1", "macro_f1": "Macro-F1",
    "latency_on": "Timed on",
}


def field_label(name: str) -> str:
    """A plain label for a field name (``onnx_mb`` -> "Model file (MB)"), never the raw name."""
    return FIELD_LABELS.get(name) or name.replace("_", " ").strip().capitalize()


_FIELD = re.compile(r"\b[a-z][a-z0-9]*(?:_[a-z0-9]+)+\b")


def plain_sentence(text: str) -> str:
    """A service's sentence with any field name it quotes replaced by its label, lower case."""
    return _FIELD.sub(lambda m: field_label(m.group(0)).lower() if m.group(0) in FIELD_LABELS else m.group(0), text)


def plain_cell(x: Any, digits: int = 3) -> Any:
    """A table cell as shown: None/NaN as a dash, floats rounded to what they support."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    if isinstance(x, float):
        return float(f"{x:.{digits}g}") if abs(x) < 10 ** digits else round(x)
    return x


def plain_rows(rows: Sequence[dict[str, Any]], digits: int = 3) -> list[dict[str, Any]]:
    """Rows with plain column labels and cells (for st.dataframe)."""
    return [{field_label(k): plain_cell(v, digits) for k, v in row.items()} for row in rows]


ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth")


def ordinal(n: int) -> str:
    """1 -> "first", 12 -> "12th": how people number their bundles and runs."""
    if 1 <= n <= len(ORDINALS):
        return ORDINALS[n - 1]
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


_STEP = re.compile(r"^(?P<phase>\w+) epoch (?P<epoch>\d+) step (?P<step>\d+)/(?P<total>\d+)$")
PHASE_WORDS = {"cache": "Preparing images", "head": "Training the new last layer",
               "finetune": "Fine-tuning the whole model", "postrun": "Checking the trained model"}


def progress_text(progress: dict[str, Any]) -> str:
    """A training job's progress in plain words: "Preparing images (1 of 124)",
    "Fine-tuning the whole model: round 3, 40 of 124"."""
    message = str(progress.get("message") or "")
    m = _STEP.match(message)
    if m is None:
        phase = str(progress.get("phase") or "")
        if message.endswith(": starting"):
            return f"{PHASE_WORDS.get(phase, phase.capitalize())}: starting"
        return message or PHASE_WORDS.get(phase, phase) or "Waiting for the worker"
    words = PHASE_WORDS.get(m["phase"], m["phase"].capitalize())
    if m["phase"] == "cache":
        return f"{words} ({int(m['step'])} of {m['total']})"
    return f"{words}: round {int(m['epoch']) + 1}, {int(m['step'])} of {m['total']}"


STATUS_ICON: dict[str, str] = {
    RunStatus.QUEUED: ":material/schedule:", RunStatus.RUNNING: ":material/directions_run:",
    RunStatus.VERIFYING: ":material/fact_check:",
    JobStatus.LEGACY_WORKING: ":material/directions_run:", RunStatus.SUCCEEDED: ":material/check_circle:",
    RunStatus.FAILED: ":material/error:", RunStatus.CANCELLED: ":material/block:",
    RunStatus.PRUNED: ":material/content_cut:", SearchStatus.FINALIZING: ":material/fact_check:",
}


def status_label(status: str | None) -> str:
    """Status with a Material icon, for st.markdown (dataframes show the plain word)."""
    status = status or "unknown"
    return f"{STATUS_ICON.get(status, ':material/circle:')} {status}"


# --- layout ----------------------------------------------------------------------------

def header(title: str, caption: str | None = None) -> None:
    st.title(title)
    if caption:
        st.caption(caption)


def empty_state(message: str, page: str | None = None, label: str | None = None) -> None:
    st.info(message, icon="ℹ️")
    if page:
        st.page_link(str(PAGES_DIR / page), label=label or "Go there", icon="➡️")


def paginate(total: int, page_size: int, key: str) -> tuple[int, int]:
    """A page picker under a table; returns (offset, limit). Hidden when everything fits on one page."""
    pages = max(1, math.ceil(total / page_size))
    if pages == 1:
        return 0, page_size
    page = st.pagination(pages, key=key, max_visible_pages=7)
    return (int(page) - 1) * page_size, page_size


# --- images ----------------------------------------------------------------------------

@st.cache_data(show_spinner=False, max_entries=4000)
def thumbnail(path: str, size: int = 128) -> bytes | None:
    """JPEG bytes of a small thumbnail of an image (or DICOM) file; None if unreadable."""
    from core.images import load_rgb

    try:
        img = load_rgb(path)
        img.thumbnail((size, size))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=85)
        return buf.getvalue()
    except Exception:  # noqa: BLE001 - a broken file shows as a placeholder
        log.warning("cannot make a thumbnail of %s", path, exc_info=True)
        return None


def thumbnail_grid(samples: Sequence[ImageSample], columns: int = 6, size: int = 128) -> None:
    if not samples:
        return
    cols = st.columns(columns)
    for i, sample in enumerate(samples):
        data = thumbnail(str(sample.path), size)
        with cols[i % columns]:
            if data is None:
                st.caption(f"⚠️ unreadable\n\n{sample.caption}")
            else:
                st.image(data, caption=sample.caption, width=size)


@st.cache_data(show_spinner="Augmenting a few images…", max_entries=64)
def augment_grid(paths: tuple[str, ...], preset: str, resolution: int, n: int = 8, seed: int = 0) -> list[Any]:
    """Augmented views (uint8 arrays) exactly as training sees them, for the preset preview."""
    from core.augment import augment_preview

    return augment_preview(list(paths), preset, n=n, resolution=resolution, seed=seed)


def show_plot(plots: dict[str, Any], name: str, caption: str | None = None, width: Any = "stretch") -> None:
    """One plot of ``artifacts.evaluation_plots``: the image, or why it cannot be shown."""
    item = plots.get(name)
    if item is None:
        st.caption(f"No {name.replace('_', ' ')} plot for this evaluation.")
    elif isinstance(item, BaseException):
        st.error(f"The {name.replace('_', ' ')} plot cannot be shown: {friendly(item)}")
    else:
        st.image(str(item), caption=caption, width=width)


def download_button(artifact_id: int, label: str, file_name: str, key: str) -> None:
    """A download button whose file is verified (present, sha256 unchanged) when it is clicked."""
    try:
        artifacts.artifact_for_download(artifact_id)  # verified now, to offer it or say why not
    except Exception as exc:  # noqa: BLE001
        st.error(f"{label}: not offered for download. {friendly(exc)}")
        return
    # Verified again when clicked: the file may have changed since the page was drawn.
    st.download_button(label, data=lambda: artifacts.artifact_for_download(artifact_id).read_bytes(),
                       file_name=file_name, mime="application/zip", key=key, on_click="ignore",
                       icon=":material/download:", type="primary")


# --- pickers ---------------------------------------------------------------------------

def query_run_id() -> int | None:
    """The ``?run=<id>`` of the address, so pages can link to each other."""
    v = st.query_params.get("run")
    try:
        return int(v) if v is not None else None
    except ValueError:
        return None


def pick_run(label: str, choices: dict[int, str], key: str, default: int | None = None) -> int | None:
    """A run select box that starts on ``?run=`` (else on ``default``, else the newest) and writes
    the choice back to the address."""
    if not choices:
        return None
    ids = list(choices)
    want = query_run_id()
    want = want if want in choices else default
    index = ids.index(want) if want in choices else 0
    rid = st.selectbox(label, ids, index=index, format_func=lambda i: choices[i], key=key)
    if rid is not None and st.query_params.get("run") != str(rid):
        st.query_params["run"] = str(rid)
    return rid


def pick_finished_run_or_stop(label: str, key: str, empty: str = "No finished runs yet: train one first.",
                              dataset_id: int | None = None, default: int | None = None) -> int:
    """The run picker of the pages that need a trained model (the runs of ``dataset_id`` when given,
    opening on ``?run=``, else ``default``); without one, says so and stops the page."""
    choices = views.run_choices(statuses=[RunStatus.SUCCEEDED], dataset_id=dataset_id)
    run_id = pick_run(label, choices, key=key, default=default)
    if run_id is None:
        empty_state(empty, "train.py", "Train a model")
        st.stop()
    return run_id


def datasets_or_stop(empty: str, page: str | None = None, label: str | None = None) -> list[DatasetInfo]:
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


# --- recommender (cached: the same budget gives the same answer) -----------------------

@st.cache_data(ttl=300, show_spinner=False)
def cached_devices() -> list[dict[str, Any]]:
    from workbench import recommend  # torch-heavy: loaded when the Recommend page first asks

    return recommend.list_devices()


@st.cache_data(ttl=60, show_spinner="Ranking the candidates…", max_entries=64)
def cached_recommendation(budget: dict[str, Any]) -> dict[str, Any]:
    from workbench import recommend  # torch-heavy: loaded when the Recommend page first asks

    return recommend.recommend_for(budget, check_hub=False)


# --- background jobs -------------------------------------------------------------------
# Anything slow runs in a worker process (workbench.actions.start_*); a fragment polls the
# job's row (queued -> running -> succeeded | failed). Refreshing the tab loses nothing.

def job_progress_panel(kinds: Sequence[str], run_id: int, label: str, state_key: str) -> None:
    """Progress bars of a run's running background jobs (call inside an st.fragment).

    Reruns the whole page once when a job it saw running has finished, so the results appear.
    """
    jobs = views.recent_jobs(kinds, limit=3, run_id=run_id)
    running = [j for j in jobs if j.active]
    for j in running:
        what = j.progress.get("message") or j.progress.get("phase") or j.status
        st.progress(j.fraction, text=f"{label} #{j.id}: {what}")
    if jobs and jobs[0].status == JobStatus.FAILED:
        st.error(f"The last {label.lower()} failed: {jobs[0].error}")
    if running:
        st.session_state[state_key] = True
    elif st.session_state.pop(state_key, False):
        st.rerun()
