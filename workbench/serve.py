"""The prediction server's app: ``create_app(predictor)``, served by ``workbench serve`` (uvicorn).

``POST /predict``: one or many images, as multipart files (field ``images`` or any file field)
or as JSON ``{"images": [{"name": "...", "data": "<base64>"}, ...]}`` (a bare base64 string per
image also works). Answers ``{"predictions": [...]}``, one object per image in order, with every
field of ``core.bundle.Prediction`` plus ``probabilities`` (see ``workbench.predictor.as_dict``);
the predictions come from the same ``BundlePredictor`` as ``workbench predict`` and predict.py.
``GET /health``, ``GET /metadata`` (labels, preprocessing, calibration, version, sha256, where the
model runs: ``runs_on`` "CPU" / "GPU (CUDA)" and the ONNX Runtime ``provider``), and
FastAPI's OpenAPI docs at ``/docs``.

Limits (``ServeLimits``): bytes per image, bytes per request, images per request. The request
body is counted while it is read, so an oversized upload is refused without being buffered whole.
Errors are 4xx with ``{"detail": "<plain sentence>"}``: 400 bad image or bad JSON, 413 too large
or too many, 415 wrong content type.
"""
from __future__ import annotations

import base64
import binascii
import json
import threading
from dataclasses import asdict, dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.datastructures import UploadFile

from workbench import version
from workbench.predictor import PredictionError, Predictor, as_dict

MB = 2**20


@dataclass(frozen=True)
class ServeLimits:
    max_image_bytes: int = 10 * MB
    max_request_bytes: int = 50 * MB
    max_images: int = 32


class RequestRefused(Exception):
    """A request the server answers with a 4xx and a plain message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def _mb(n: int) -> str:
    return f"{round(n / MB, 2):g} MB"


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


def _from_json(body: bytes) -> list[tuple[str, bytes]]:
    try:
        doc = json.loads(body)
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
    lock = threading.Lock()  # one ONNX Runtime session: one batch at a time, in a worker thread

    @app.exception_handler(RequestRefused)
    async def refused(_: Request, exc: RequestRefused) -> JSONResponse:
        return JSONResponse({"detail": exc.message}, status_code=exc.status)

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
        from starlette.concurrency import run_in_threadpool

        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype not in ("multipart/form-data", "application/json"):
            raise RequestRefused(415, f"Content type {ctype or '(none)'!r} is not accepted: send the images as "
                                      "multipart/form-data files or as application/json with base64 data.")
        body = await _read_body(request, limits)
        images = await _from_multipart(request, body, limits) if ctype == "multipart/form-data" else _from_json(body)
        _check_images(images, limits)

        def run() -> list[dict[str, Any]]:
            with lock:
                rows = predictor.predict([data for _, data in images], names=[name for name, _ in images])
            return [as_dict(r) for r in rows]

        try:
            return {"predictions": await run_in_threadpool(run)}
        except PredictionError as e:
            raise RequestRefused(400, f"{e}. Send JPEG, PNG, BMP, TIFF, WebP or DICOM images.") from None

    return app
