"""Loopback load test of `workbench serve`: a normal request's latency beside a maximal one, and
requests/s with several clients. Every phase is bounded in time; only 127.0.0.1 is used.

    python bench/bench_serve.py BUNDLE.zip|lite0 [--seconds 20] [--clients 4 8] [--out-dir bench] [SERVE OPTIONS]

Run it on an idle machine. It records the load average before the server starts, starts
`workbench serve BUNDLE` (any unknown option, e.g. ``--workers 1``, is passed to it) on a free
loopback port, then measures, ``--seconds`` each:

- ``alone``: one client sending normal requests (one real beans test JPEG each), one after another;
- ``beside a maximal request``: the same client while another sends, back to back, the largest
  request the server's limits allow in pixels (``--heavy-images`` JPEGs of ``--heavy-side`` pixels
  square, upscaled from a beans image: 4 x 5000 x 5000 = the default 100 megapixels);
- ``N clients``: N clients sending normal requests at once, for each N of ``--clients``.

Every phase appends one JSON line to OUT_DIR/results_serve.jsonl (the raw figures); the table in
OUT_DIR/results_serve.md is then rewritten from every line of that file (nothing typed by hand).
Last, with the server stopped, ``ONNX Runtime alone, batch 32``: the images/s of the bundle's
model run directly at 32 images a call (decoding excluded), the most that micro-batching of
concurrent requests could reach; compare it with the N-clients rows (one image per request).
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT.parent / "shared" / "datasets" / "beans" / "test"
REQUEST_TIMEOUT_S = 120.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.5)
    raise SystemExit(f"no answer from {url} within {timeout} s")


def heavy_images(source: Path, n: int, side: int) -> list[tuple[str, bytes]]:
    """``n`` JPEGs of ``side`` x ``side`` pixels, a real photo upscaled (decoding them is full work)."""
    with Image.open(source) as im:
        big = im.convert("RGB").resize((side, side), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    big.save(buf, "JPEG", quality=90)
    return [(f"heavy{i}.jpg", buf.getvalue()) for i in range(n)]


class Tally:
    """Latencies of successful requests and counts of 503 busy and other failures, thread-safe."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self.busy = self.errors = 0
        self._lock = threading.Lock()

    def post(self, client: httpx.Client, images: list[tuple[str, bytes]]) -> None:
        t0 = time.perf_counter()
        try:
            status = client.post("/predict", files=[("images", (n, d, "image/jpeg")) for n, d in images]).status_code
        except httpx.HTTPError:
            status = -1
        dt = time.perf_counter() - t0
        with self._lock:
            if status == 200:
                self.seconds.append(dt)
            elif status == 503:
                self.busy += 1
            else:
                self.errors += 1

    def figures(self, elapsed: float) -> dict[str, Any]:
        ms = np.array(self.seconds) * 1000
        pct = (lambda q: round(float(np.percentile(ms, q)), 1)) if len(ms) else (lambda q: None)
        return {"ok": len(ms), "busy_503": self.busy, "errors": self.errors, "elapsed_s": round(elapsed, 2),
                "requests_per_s": round(len(ms) / elapsed, 2), "p50_ms": pct(50), "p95_ms": pct(95),
                "max_ms": round(float(ms.max()), 1) if len(ms) else None}


def run_clients(base: str, seconds: float, loops: list[Callable[[httpx.Client, float], None]]) -> float:
    """Each loop in its own thread with its own connection until ``seconds`` have passed; the time taken."""
    stop_at = time.perf_counter() + seconds

    def one(loop: Callable[[httpx.Client, float], None]) -> None:
        with httpx.Client(base_url=base, timeout=REQUEST_TIMEOUT_S) as c:
            loop(c, stop_at)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=one, args=(loop,)) for loop in loops]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0


def sender(tally: Tally, payloads: list[list[tuple[str, bytes]]], offset: int) -> Callable[[httpx.Client, float], None]:
    def loop(client: httpx.Client, stop_at: float) -> None:
        i = offset
        while time.perf_counter() < stop_at:
            tally.post(client, payloads[i % len(payloads)])
            i += 1
    return loop


def ort_ceiling(bundle: str, image: Path, seconds: float, batch: int = 32) -> dict[str, Any]:
    """Images/s of ONNX Runtime alone on the bundle's model at ``batch`` images a call (the same
    session options as the server, decoding excluded): what micro-batching could at most reach."""
    from core.bundle import open_bundle
    from core.images import load_rgb
    from core.onnx_files import model_session
    from core.preprocessing import preprocess

    b = open_bundle(bundle, allow_unsigned=True)
    sess = model_session(b.model)
    x = np.stack([preprocess(load_rgb(image), b.preprocessing)] * batch)
    name = sess.get_inputs()[0].name
    sess.run(None, {name: x})  # warm-up
    times: list[float] = []
    stop_at = time.perf_counter() + seconds
    while time.perf_counter() < stop_at:
        t0 = time.perf_counter()
        sess.run(None, {name: x})
        times.append(time.perf_counter() - t0)
    ms = np.array(times) * 1000
    return {"phase": f"ONNX Runtime alone, batch {batch} (the ceiling; images/s)", "clients": 0, "ok": len(times),
            "busy_503": 0, "errors": 0, "elapsed_s": round(float(sum(times)), 2),
            "requests_per_s": round(batch * len(times) / sum(times), 1), "p50_ms": round(float(np.median(ms)), 1),
            "p95_ms": round(float(np.percentile(ms, 95)), 1), "max_ms": round(float(ms.max()), 1)}


def imagenet_bundle(out_dir: Path, variant: str = "lite0") -> Path:
    """A bundle of ``variant`` at its default size with its ImageNet backbone and a 3-class head,
    built by the product's own exporter: what a user's trained bundle costs to serve (the head's
    weights change no timing)."""
    from core.export import build_bundle, export_fp32
    from core.registry import create_model

    lm = create_model(variant, 3, weights="auto")
    onnx = export_fp32(lm.model.eval(), out_dir / f"{variant}.onnx", lm.preprocessing, ["a", "b", "c"], variant)
    info = {"classes": ["a", "b", "c"], "variant": variant, "run_id": None, "preprocessing": lm.preprocessing}
    return build_bundle(out_dir / f"{variant}-imagenet-bundle.zip", {"model.onnx": onnx}, info)


def write_table(jsonl: Path, md: Path) -> None:
    rows = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
    lines = [
        "# `workbench serve` loopback load test", "",
        "Generated by `bench/bench_serve.py` from every line of `results_serve.jsonl` (do not edit by hand). "
        "Normal requests: one real beans test JPEG each, multipart POST /predict on 127.0.0.1. "
        "The maximal request: the most pixels the server's limits allow in one request. "
        "Load average (1 min) before the server started, on that many CPUs: figures from a busy machine "
        "(load near or above the CPU count) say little.", "",
        "| when (UTC) | CPUs | load before | bundle | server options | phase | clients | ok | 503 busy "
        "| errors | requests/s | p50 ms | p95 ms | max ms | maximal requests done meanwhile |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        heavy = r.get("heavy")
        heavy_cell = f"{heavy['ok']} x ({r['maximal_request']}), p50 {heavy['p50_ms']} ms" if heavy else ""
        lines.append(f"| {r['when']} | {r['cpus']} | {r['load_before'][0]:.2f} | {r['bundle']} "
                     f"| {' '.join(r['serve_options']) or 'defaults'} | {r['phase']} | {r['clients']} | {r['ok']} "
                     f"| {r['busy_503']} | {r['errors']} | {r['requests_per_s']} | {r['p50_ms']} | {r['p95_ms']} "
                     f"| {r['max_ms']} | {heavy_cell} |")
    md.write_text("\n".join(lines) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("bundle", help="a bundle zip, or 'lite0' to build lite0 at 224 px with its ImageNet backbone")
    ap.add_argument("--seconds", type=float, default=20.0, help="length of each phase")
    ap.add_argument("--clients", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--heavy-images", type=int, default=4)
    ap.add_argument("--heavy-side", type=int, default=5000)
    ap.add_argument("--images-dir", default=str(IMAGES))
    ap.add_argument("--out-dir", default=str(ROOT / "bench"))
    args, serve_options = ap.parse_known_args()
    if not 0 < args.seconds <= 120 or not all(0 < c <= 16 for c in args.clients):
        raise SystemExit("keep it bounded: --seconds in (0, 120], each of --clients in (0, 16]")
    if "--host" in serve_options:
        raise SystemExit("the benchmark serves on 127.0.0.1 only")
    files = sorted(Path(args.images_dir).rglob("*.jpg"))[:16]
    if not files:
        raise SystemExit(f"no JPEG under {args.images_dir}")
    normal = [[(f.name, f.read_bytes())] for f in files]
    heavy = heavy_images(files[0], args.heavy_images, args.heavy_side)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not args.bundle.endswith(".zip") and not Path(args.bundle).exists():
        import tempfile

        args.bundle = str(imagenet_bundle(Path(tempfile.mkdtemp(prefix="bench-serve-")), args.bundle))
    jsonl, md = out_dir / "results_serve.jsonl", out_dir / "results_serve.md"

    load_before = os.getloadavg()  # before the server starts: is this machine idle?
    if load_before[0] > 0.5 * (os.cpu_count() or 1):
        print(f"warning: load average {load_before[0]:.1f} on {os.cpu_count()} CPUs: the figures will be noisy",
              file=sys.stderr)
    common = {"when": f"{datetime.now(UTC):%Y-%m-%d %H:%M}", "cpus": os.cpu_count(),
              "load_before": [round(x, 2) for x in load_before], "bundle": Path(args.bundle).name,
              "bundle_sha256": hashlib.sha256(Path(args.bundle).read_bytes()).hexdigest()
              if Path(args.bundle).is_file() else None, "serve_options": serve_options,
              "phase_seconds": args.seconds,
              "maximal_request": f"{args.heavy_images} JPEGs of {args.heavy_side}x{args.heavy_side}"}
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "workbench.cli", "serve", args.bundle, "--host", "127.0.0.1",
                             "--port", str(port), *serve_options], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    results: list[dict[str, Any]] = []
    try:
        wait_ready(f"{base}/health", proc)
        limits = httpx.get(f"{base}/metadata", timeout=30).json()["limits"]
        pixels = args.heavy_images * args.heavy_side ** 2
        if pixels > limits["max_request_pixels"] or args.heavy_side ** 2 > limits["max_image_pixels"]:
            raise SystemExit(f"the maximal request ({pixels:,} pixels) is over the server's limits {limits}")
        common["server_limits"] = limits

        alone = Tally()
        results.append({"phase": "alone", "clients": 1,
                        **alone.figures(run_clients(base, args.seconds, [sender(alone, normal, 0)]))})
        beside, big = Tally(), Tally()
        elapsed = run_clients(base, args.seconds, [sender(beside, normal, 0), sender(big, [heavy], 0)])
        results.append({"phase": "beside a maximal request", "clients": 1, **beside.figures(elapsed),
                        "heavy": big.figures(elapsed)})
        for n in args.clients:
            many = Tally()
            elapsed = run_clients(base, args.seconds, [sender(many, normal, k) for k in range(n)])
            results.append({"phase": f"{n} clients", "clients": n, **many.figures(elapsed)})
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    if results:  # the server is gone: ONNX Runtime alone on the same model, for comparison
        results.append(ort_ceiling(args.bundle, files[0], args.seconds))
    load_after = os.getloadavg()
    with open(jsonl, "a") as f:
        for r in results:
            f.write(json.dumps({**common, **r, "load_after": [round(x, 2) for x in load_after]}) + "\n")
    write_table(jsonl, md)
    print(md.read_text())
    return 0 if results and all(r["ok"] and not r["errors"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
