"""Bounded work per request in `workbench serve` (issue 26, items 2 and 5).

The real FastAPI app on a real (random-weight) lite0 bundle with real ONNX Runtime, called with
Starlette's TestClient: images too large are refused from their header before any pixel is decoded
(quickly, with little memory), a request over the pixel budget is refused, deep or oversized JSON
gets a 4xx (never a 500), a full server answers 503 busy with Retry-After, and a normal request is
answered while a heavy legal one is still being decoded.
"""
from __future__ import annotations

import io
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from workbench.serve import ServeLimits, create_app


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png(width: int, height: int, rows: int | None = None, seed: int = 0) -> bytes:
    """A real RGB PNG, streamed row by row so that making it costs no memory: every row is the same
    random row (zlib finds the repeat, so the file is small but decoding it is full work).
    ``rows=0``: the header only, claiming ``width`` x ``height`` with no pixel data at all."""
    head = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    if rows == 0:
        return head + _chunk(b"IEND", b"")
    row = b"\x00" + np.random.default_rng(seed).integers(0, 255, 3 * width, dtype=np.uint8).tobytes()
    z = zlib.compressobj(6)
    data = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    return head + _chunk(b"IDAT", data) + _chunk(b"IEND", b"")


def small_png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (80, 90, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def files(*images: tuple[str, bytes]) -> dict[str, Any]:
    return {"files": [("images", (name, data, "image/png")) for name, data in images]}


@pytest.fixture(scope="module")
def predictor(random_bundle: dict) -> Any:  # noqa: F811 - the imported fixture
    from workbench.predictor import Predictor

    return Predictor.load(random_bundle["bundle"], device="cpu")


@pytest.fixture
def serve(predictor: Any) -> Iterator[Callable[..., tuple[TestClient, Any]]]:
    """A started app (lifespan and event loop running, so concurrent requests really overlap)."""
    clients: list[TestClient] = []

    def start(**limits: Any) -> tuple[TestClient, Any]:
        app = create_app(predictor, ServeLimits(**limits))
        client = TestClient(app, raise_server_exceptions=False).__enter__()
        clients.append(client)
        return client, app

    yield start
    for c in clients:
        c.__exit__(None, None, None)


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def peak_rss_during(fn: Callable[[], Any]) -> tuple[Any, float]:
    """``fn()``'s result and how far this process's resident memory rose above its start meanwhile."""
    start, peak, done = rss_mb(), [0.0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_mb() - start)
            time.sleep(0.002)

    t = threading.Thread(target=sample)
    t.start()
    try:
        return fn(), peak[0]
    finally:
        done.set()
        t.join()


@pytest.mark.parametrize("case", ["header claims 20000x20000", "real 9000x9000 PNG"])
def test_a_huge_image_is_refused_from_its_header(serve: Any, case: str) -> None:
    client, _ = serve()
    if case == "header claims 20000x20000":
        data, size, mp = png(20000, 20000, rows=0), "20000x20000", "400"
    else:  # 81 megapixels: under Pillow's and load_rgb's caps, so today it would be decoded (~250 MB)
        data, size, mp = png(9000, 9000), "9000x9000", "81"
    assert len(data) < 2 * 2**20  # under every byte limit
    t0 = time.perf_counter()
    r, rise = peak_rss_during(lambda: client.post("/predict", **files(("big.png", data))))
    assert r.status_code == 413, r.text
    assert r.json()["detail"] == (f"big.png: the image is {size} pixels ({mp} megapixels); the limit is 40 "
                                  "megapixels per image. Send a smaller image.")
    assert time.perf_counter() - t0 < 5 and rise < 60, (time.perf_counter() - t0, rise)


def test_a_request_over_the_pixel_budget_is_refused(serve: Any) -> None:
    client, _ = serve(max_image_pixels=1_000_000, max_request_pixels=1_500_000)
    one = png(1000, 1000)
    assert client.post("/predict", **files(("a.png", one))).status_code == 200  # each image is legal
    r = client.post("/predict", **files(("a.png", one), ("b.png", one)))
    assert r.status_code == 413
    assert r.json()["detail"] == ("The 2 images of this request hold 2 megapixels in all; the limit is 1.5 "
                                  "megapixels per request. Send fewer or smaller images.")
    r = client.post("/predict", **files(("c.png", png(1001, 1000, rows=0))))
    assert r.status_code == 413 and r.json()["detail"].startswith("c.png: the image is 1001x1000 pixels (1 megapix")


def _nested(depth: int) -> bytes:
    return b'{"images": ' + b"[" * depth + b"]" * depth + b"}"


JSON_CASES = {
    # case: (body or a body iterator, status, the message's start)
    "[ x 200,000": (b"[" * 200_000, 400, "The JSON is nested 200000 levels deep; the limit is 32 "),
    "nested 40 inside images": (_nested(40), 400, "The JSON is nested 41 levels deep; the limit is 32"),
    "brackets inside strings do not count": (b'{"images": [{"name": "' + b"[" * 1000 + b'", "data": "!"}]}', 400,
                                             '[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[['),
    "oversized": (b'{"images": ["' + b"A" * 1_100_000 + b'"]}', 413, "The request is 1.05 MB; the limit is 1 MB"),
    "oversized, no Content-Length": (iter([b'{"images": ["', b"A" * 1_100_000, b'"]}']), 413,
                                     "The request is larger than 1 MB; the limit is 1 MB per request"),
}


@pytest.mark.parametrize("case", list(JSON_CASES))
def test_deep_or_oversized_json_gets_a_4xx(serve: Any, case: str) -> None:
    client, _ = serve(max_request_bytes=2**20)
    body, status, start = JSON_CASES[case]
    t0 = time.perf_counter()
    r = client.post("/predict", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    assert r.json()["detail"].startswith(start), r.json()["detail"]
    assert time.perf_counter() - t0 < 5
    assert client.get("/health").status_code == 200


def test_a_full_server_answers_503_busy(serve: Any) -> None:
    client, app = serve(workers=1, queue_size=1, queue_timeout_s=3.0)
    work, image = app.state.work, small_png()
    answers: dict[str, Any] = {}

    def post(name: str) -> None:
        t0 = time.perf_counter()
        answers[name] = (client.post("/predict", **files((name, image))), time.perf_counter() - t0)

    work.slots.acquire()  # the only worker is taken (as by a long request)
    try:
        waiting = [threading.Thread(target=post, args=(n,)) for n in ("a", "b")]
        for t in waiting:
            t.start()
        deadline = time.time() + 30
        while work.admitted < 2 and time.time() < deadline:
            time.sleep(0.01)
        assert work.admitted == 2  # one request per worker plus queue_size: both admitted, both waiting
        post("c")  # the queue is full: refused at once
        r, seconds = answers["c"]
        assert r.status_code == 503 and r.headers["retry-after"] == "2" and seconds < 3.0
        assert r.json()["detail"] == ("The server is busy: every worker is classifying and the queue is full (1 "
                                      "waiting). Try again in a few seconds.")
        for t in waiting:
            t.join(timeout=30)
        for name in ("a", "b"):  # waited the queue timeout, then were told so
            r, seconds = answers[name]
            assert r.status_code == 503 and r.headers["retry-after"] == "2" and 2.9 < seconds < 30
            assert r.json()["detail"] == ("The server is busy: this request waited 3 s for a free worker. "
                                          "Try again in a few seconds.")
    finally:
        work.slots.release()
    assert client.post("/predict", **files(("d", image))).status_code == 200
    assert work.admitted == 0 and work.waiting == 0


def test_a_normal_request_is_answered_while_a_heavy_one_runs(serve: Any) -> None:
    client, app = serve()  # the defaults: 2 workers, 40 MP per image, 100 MP per request
    heavy = [(f"h{i}.png", png(5000, 5000, seed=i)) for i in range(4)]  # 100 MP: the most one request may hold
    done: dict[str, float] = {}

    def post_heavy() -> None:
        r = client.post("/predict", **files(*heavy))
        done["heavy"] = time.perf_counter()
        assert r.status_code == 200, r.text

    t = threading.Thread(target=post_heavy)
    t.start()
    try:
        deadline = time.time() + 60
        while app.state.work.admitted < 1 and time.time() < deadline:
            time.sleep(0.005)
        assert app.state.work.admitted == 1 and "heavy" not in done
        t0 = time.perf_counter()
        r = client.post("/predict", **files(("leaf.png", small_png())))
        done["normal"] = time.perf_counter()
        assert r.status_code == 200 and r.json()["predictions"][0]["image"] == "leaf.png"
        assert "heavy" not in done, "the normal request waited for the heavy one"
        assert done["normal"] - t0 < 10  # queue_timeout_s: the stated bound on waiting
    finally:
        t.join(timeout=300)
    assert "heavy" in done


def test_serve_cli_checks_the_new_limits(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from workbench.cli import main

    for option, value, words in (("--workers", "0", "--workers must be at least 1"),
                                 ("--queue", "-1", "--queue must be at least 0"),
                                 ("--queue-timeout", "0", "--queue-timeout must be more than 0"),
                                 ("--max-request-megapixels", "0", "--max-request-megapixels must be more than 0")):
        assert main(["serve", str(tmp_path / "missing.zip"), option, value]) == 2
        assert words in capsys.readouterr().err
