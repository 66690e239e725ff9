"""The prediction server's app: ``create_app(predictor)``, served by ``workbench serve`` (uvicorn).

``POST /predict``: one or many images, as multipart files (field ``images`` or any file field)
or as JSON ``{"images": [{"name": "...", "data": "<base64>"}, ...]}`` (a bare base64 string per
image also works). Answers ``{"predictions": [...]}``, one object per image in order, with every
field of ``core.bundle.Prediction`` plus ``probabilities`` (see ``workbench.predictor.as_dict``);
the predictions come from the same ``BundlePredictor`` as ``workbench predict`` and predict.py.
``GET /health``, ``GET /metadata`` (labels, preprocessing, calibration, version, sha256, where the
model runs: ``runs_on`` "CPU" / "GPU (CUDA)" and the ONNX Runtime ``provider``), and
FastAPI's OpenAPI docs at ``/docs``.

Limits (``ServeLimits``): bytes per image, bytes per request, images per request; pixels per image
and per request, read from each image's header before any pixel is decoded; JSON nesting depth,
scanned before the JSON is parsed. The request body is counted while it is read, so an oversized
upload is refused without being buffered whole.
Work: at most ``workers`` requests decode and classify at once, in worker threads (the event loop
only reads, checks and answers); up to ``queue_size`` more wait, each at most ``queue_timeout_s``
(``WorkQueue``). So one request costs at most ``max_request_pixels`` of decoding, and no request
waits longer than ``queue_timeout_s`` for a worker: past that, or with the queue full, it gets 503.
Errors are ``{"detail": "<plain sentence>"}``: 400 bad image or bad JSON, 413 too large, too many
or too many pixels, 415 wrong content type, 503 busy (with a Retry-After header).
"""
from __future__ import annotations

import base64
import binascii
import json
import re
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

import anyio.to_thread
import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from core.images import ImageDecodeError, header_size
from workbench import version
from workbench.predictor import PredictionError, Predictor, as_dict

MB = 2**20
MEGAPIXEL = 1_000_000
RETRY_AFTER_S = 2  # a normal request takes well under a second on an idle core: the queue moves fast
T = TypeVar("T")


@dataclass(frozen=True)
class ServeLimits:
    max_image_bytes: int = 10 * MB
    max_request_bytes: int = 50 * MB
    max_images: int = 32
    # Decoding work, judged from the headers. 40 MP passes phone and most camera photos; a decoded
    # 40 MP image is ~120 MB of RGB (a few copies while converting) per worker. 100 MP per request
    # is about 1.5 s of decoding on one core (the 46 s of issue 26 were 3,200 MP: ~14 ms per MP).
    max_image_pixels: int = 40 * MEGAPIXEL
    max_request_pixels: int = 100 * MEGAPIXEL
    max_json_depth: int = 32  # a request needs 3: {"images": [{"name": ..., "data": ...}]}
    workers: int = 2  # requests decoded and classified at once: one per core of a 2-core box
    queue_size: int = 8  # requests that may wait for a worker...
    queue_timeout_s: float = 10.0  # ...each at most this long, else 503


class RequestRefused(Exception):
    """A request the server answers with a 4xx (or 503) and a plain message."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


def _mb(n: int) -> str:
    return f"{round(n / MB, 2):g} MB"


def _mp(n: int) -> str:
    return f"{round(n / MEGAPIXEL, 2):g} megapixels"


def _busy(why: str) -> RequestRefused:
    return RequestRefused(503, f"The server is busy: {why}. Try again in a few seconds.",
                          {"Retry-After": str(RETRY_AFTER_S)})


class WorkQueue:
    """At most ``workers`` requests decode and classify at once, each in a worker thread, so the
    event loop stays free; up to ``queue_size`` more wait for a worker, each at most
    ``queue_timeout_s``; any other request is answered 503 at once. ``slots`` (the workers, a
    semaphore), ``admitted`` (running or waiting) and ``waiting`` are public: tests and probes
    can see, and hold, them."""

    def __init__(self, limits: ServeLimits) -> None:
        if limits.workers < 1 or limits.queue_size < 0 or limits.queue_timeout_s <= 0:
            raise ValueError(f"need workers >= 1, queue_size >= 0 and queue_timeout_s > 0, got {limits}")
        self.limits = limits
        self.slots = threading.BoundedSemaphore(limits.workers)
        self.admitted = 0  # changed on the event loop only, so the admission check cannot race
        self.waiting = 0
        self._lock = threading.Lock()
        # Threads of its own: a busy shared thread pool cannot hold an admitted request back.
        self._threads = anyio.CapacityLimiter(limits.workers + limits.queue_size)

    async def run(self, fn: Callable[[], T]) -> T:
        capacity = self.limits.workers + self.limits.queue_size
        if self.admitted >= capacity:
            raise _busy(f"every worker is classifying and the queue is full ({self.limits.queue_size} waiting)")
        self.admitted += 1
        try:  # not abandoned on cancel: a worker is released only once its thread is done
            return await anyio.to_thread.run_sync(self._in_a_slot, fn, limiter=self._threads)
        finally:
            self.admitted -= 1

    def _in_a_slot(self, fn: Callable[[], T]) -> T:
        with self._lock:
            self.waiting += 1
        try:
            got = self.slots.acquire(timeout=self.limits.queue_timeout_s)
        finally:
            with self._lock:
                self.waiting -= 1
        if not got:
            raise _busy(f"this request waited {self.limits.queue_timeout_s:g} s for a free worker")
        try:
            return fn()
        finally:
            self.slots.release()


async def _read_body(request: Request, limits: ServeLimits) -> bytes:
    """The body, refused with 413 as soon as it (or its declared length) passes the request limit."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limits.max_request_bytes:
        raise RequestRefused(413, f"The request is {_mb(int(declared))}; the limit is "
                                  f"{_mb(limits.max_request_bytes)} per request. Send fewer or smaller images.")
    parts, n = [], 0
    async for chunk in request.stream():
        n += len(chunk)
        if n > limits.max_request_bytes:
            raise RequestRefused(413, f"The request is larger than {_mb(limits.max_request_bytes)}; the limit is "
                                      f"{_mb(limits.max_request_bytes)} per request. Send fewer or smaller images.")
        parts.append(chunk)
    return b"".join(parts)


def _replay(body: bytes) -> Any:
    """An ASGI receive callable that hands ``body`` over once (to parse a buffered multipart body)."""
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


async def _from_multipart(request: Request, body: bytes, limits: ServeLimits) -> list[tuple[str, bytes]]:
    replayed = Request(request.scope, _replay(body))
    try:
        form = await replayed.form(max_files=limits.max_images + 1, max_fields=limits.max_images + 16)
    except Exception as e:  # starlette's MultiPartException and parser errors
        if "maximum size" in str(e):
            raise RequestRefused(413, "A form field that is not a file is larger than 1 MB; send each image "
                                      "as a file field.") from None
        if "Too many files" in str(e):
            raise RequestRefused(413, f"Too many images: at most {limits.max_images} per request.") from None
        raise RequestRefused(400, f"The multipart form could not be read: {e}") from None
    files = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
    images = []
    for i, f in enumerate(files[:limits.max_images + 1]):
        images.append((f.filename or f"image {i}", await f.read()))
    await form.close()
    return images


_ESCAPED = re.compile(rb"\\.", re.DOTALL)
_STRING = re.compile(rb'"[^"]*"')
_NOT_A_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")


def json_depth(body: bytes, chunk: int = MB) -> int:
    """How deeply ``[`` and ``{`` nest outside strings, found without parsing: escapes, then
    strings, then every other byte are dropped; the running depth is summed a chunk at a time."""
    brackets = _STRING.sub(b"", _ESCAPED.sub(b"", body)).translate(None, _NOT_A_BRACKET)
    deepest = depth = 0
    for i in range(0, len(brackets), chunk):
        a = np.frombuffer(brackets[i:i + chunk], dtype=np.uint8)
        running = depth + np.cumsum(np.where((a == ord("[")) | (a == ord("{")), 1, -1), dtype=np.int64)
        deepest, depth = max(deepest, int(running.max())), int(running[-1])
    return deepest


def _from_json(body: bytes, limits: ServeLimits) -> list[tuple[str, bytes]]:
    depth = json_depth(body)  # Python's parser recurses per level: a deep document must not reach it
    if depth > limits.max_json_depth:
        raise RequestRefused(400, f"The JSON is nested {depth} levels deep; the limit is {limits.max_json_depth} "
                                  '(a request needs 3: {"images": [{"name": ..., "data": ...}]}).')
    try:
        doc = json.loads(body)
    except RecursionError:
        raise RequestRefused(400, f"The JSON is nested too deeply; the limit is {limits.max_json_depth} "
                                  "levels.") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RequestRefused(400, f"The request body is not valid JSON ({e}).") from None
    items = doc.get("images") if isinstance(doc, dict) else None
    if not isinstance(items, list):
        raise RequestRefused(400, 'JSON requests must look like {"images": [{"name": "leaf.jpg", "data": '
                                  '"<base64>"}, ...]}.')
    images = []
    for i, item in enumerate(items):
        name, data = f"image {i}", item if isinstance(item, str) else None
        if isinstance(item, dict):
            name, data = str(item.get("name") or name), item.get("data")
        if not isinstance(data, str):
            raise RequestRefused(400, f"{name}: expected its bytes as a base64 string in \"data\".")
        try:
            images.append((name, base64.b64decode(data, validate=True)))
        except (binascii.Error, ValueError):
            raise RequestRefused(400, f"{name}: \"data\" is not valid base64.") from None
    return images


def _check_images(images: list[tuple[str, bytes]], limits: ServeLimits) -> None:
    if not images:
        raise RequestRefused(400, "The request holds no image. Send at least one.")
    if len(images) > limits.max_images:
        raise RequestRefused(413, f"Too many images: at most {limits.max_images} per request.")
    for name, data in images:
        if len(data) > limits.max_image_bytes:
            raise RequestRefused(413, f"{name}: the image is larger than the limit of "
                                      f"{_mb(limits.max_image_bytes)} per image.")
        if not data:
            raise RequestRefused(400, f"{name}: the image is empty (0 bytes).")


def _not_an_image(reason: str) -> RequestRefused:
    return RequestRefused(400, f"{reason}. Send JPEG, PNG, BMP, TIFF, WebP or DICOM images.")


def _check_pixels(images: list[tuple[str, bytes]], limits: ServeLimits) -> None:
    """Every image's size from its header (no pixel decoded) against the per-image and per-request
    pixel limits, so a decompression bomb or a pile of huge images costs nothing."""
    total = 0
    for name, data in images:
        try:
            size = header_size(data)
        except ImageDecodeError as e:
            raise _not_an_image(f"{name}: {e}") from None
        frames = f" x {size.frames} frames" if size.frames > 1 else ""
        if size.pixels > limits.max_image_pixels:
            raise RequestRefused(413, f"{name}: the image is {size.width}x{size.height} pixels{frames} "
                                      f"({_mp(size.pixels)}); the limit is {_mp(limits.max_image_pixels)} per "
                                      "image. Send a smaller image.")
        total += size.pixels
    if total > limits.max_request_pixels:
        raise RequestRefused(413, f"The {len(images)} images of this request hold {_mp(total)} in all; the limit "
                                  f"is {_mp(limits.max_request_pixels)} per request. Send fewer or smaller "
                                  "images.")


_PREDICT_DOC: dict[str, Any] = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "properties": {
        "images": {"type": "array", "items": {"type": "string", "format": "binary"}}}}},
    "application/json": {"schema": {"type": "object", "required": ["images"], "properties": {
        "images": {"type": "array", "items": {"type": "object", "required": ["data"], "properties": {
            "name": {"type": "string"}, "data": {"type": "string", "format": "byte"}}}}}}},
}}}


def create_app(predictor: Predictor, limits: ServeLimits = ServeLimits()) -> FastAPI:
    """The FastAPI app serving one predictor."""
    meta = predictor.metadata()
    app = FastAPI(title="Workbench prediction server", version=version(),
                  description=f"Classifies images with the bundle {meta['bundle']['sha256'][:12]}… "
                              f"({len(predictor.labels)} classes). {predictor.describe()}")
    work = app.state.work = WorkQueue(limits)  # ONNX Runtime sessions run concurrently: no lock

    @app.exception_handler(RequestRefused)
    async def refused(_: Request, exc: RequestRefused) -> JSONResponse:
        return JSONResponse({"detail": exc.message}, status_code=exc.status, headers=exc.headers)

    @app.get("/health", summary="Is the server up and its model loaded?")
    def health() -> dict[str, Any]:
        return {"status": "ok", "labels": len(predictor.labels), "bundle_sha256": meta["bundle"]["sha256"],
                "runs_on": predictor.runs_on}

    @app.get("/metadata", summary="Labels, preprocessing, calibration, version and the bundle's sha256")
    def metadata() -> dict[str, Any]:
        return {**meta, "workbench_version": version(), "limits": asdict(limits)}

    @app.post("/predict", summary="Classify one or many images (multipart files or JSON with base64)",
              openapi_extra=_PREDICT_DOC)
    async def predict(request: Request) -> dict[str, Any]:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype not in ("multipart/form-data", "application/json"):
            raise RequestRefused(415, f"Content type {ctype or '(none)'!r} is not accepted: send the images as "
                                      "multipart/form-data files or as application/json with base64 data.")
        body = await _read_body(request, limits)
        if ctype == "multipart/form-data":
            images = await _from_multipart(request, body, limits)
        else:  # off the event loop: a 50 MB JSON takes a moment to parse
            images = await run_in_threadpool(_from_json, body, limits)
        _check_images(images, limits)
        await run_in_threadpool(_check_pixels, images, limits)

        def run() -> list[dict[str, Any]]:
            rows = predictor.predict([data for _, data in images], names=[name for name, _ in images])
            return [as_dict(r) for r in rows]

        try:
            return {"predictions": await work.run(run)}
        except PredictionError as e:
            raise _not_an_image(str(e)) from None

    return app
