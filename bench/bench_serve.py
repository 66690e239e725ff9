"""Loopback load test of `workbench serve`: requests/s and p50/p95 latency, bounded in time.

    python bench/bench_serve.py BUNDLE.zip [--seconds 20] [--clients 4] [--images 1] [--out bench/results_serve.md]

Starts `workbench serve BUNDLE` on a free 127.0.0.1 port (never another interface), sends POST
/predict with real images (multipart, ``--images`` per request) from ``--clients`` threads for
``--seconds``, and appends a table row with the machine's load average before and after (the
figures mean little on a shared machine: say so next to them).
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT.parent / "shared" / "datasets" / "beans" / "test"


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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--images", type=int, default=1, help="images per request")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results_serve.md"))
    args = ap.parse_args()
    if not 0 < args.seconds <= 120 or not 0 < args.clients <= 16:
        raise SystemExit("keep it bounded: --seconds in (0, 120], --clients in (0, 16]")
    files = sorted(IMAGES.rglob("*.jpg"))[:16]
    payloads = [f.read_bytes() for f in files]
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "workbench.cli", "serve", args.bundle, "--host", "127.0.0.1",
                             "--port", str(port)], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(f"{base}/health", proc)
        load_before = os.getloadavg()
        latencies: list[float] = []
        errors = 0
        lock = threading.Lock()
        stop_at = time.perf_counter() + args.seconds

        def client(k: int) -> None:
            nonlocal errors
            with httpx.Client(base_url=base, timeout=30) as c:
                i = k
                while time.perf_counter() < stop_at:
                    batch = [("images", (f"{j}.jpg", payloads[(i + j) % len(payloads)], "image/jpeg"))
                             for j in range(args.images)]
                    t0 = time.perf_counter()
                    r = c.post("/predict", files=batch)
                    dt = time.perf_counter() - t0
                    with lock:
                        if r.status_code == 200:
                            latencies.append(dt)
                        else:
                            errors += 1
                    i += 1

        t0 = time.perf_counter()
        threads = [threading.Thread(target=client, args=(k,)) for k in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - t0
        load_after = os.getloadavg()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    ms = np.array(latencies) * 1000
    rps = len(latencies) / elapsed
    row = (f"| {datetime.now(UTC):%Y-%m-%d %H:%M} | {os.cpu_count()} | {load_before[0]:.1f} / {load_after[0]:.1f} "
           f"| {args.clients} | {args.images} | {args.seconds:g} | {len(latencies)} | {errors} | {rps:.1f} "
           f"| {rps * args.images:.1f} | {np.percentile(ms, 50):.0f} | {np.percentile(ms, 95):.0f} |")
    print(row)
    out = Path(args.out)
    if not out.exists():
        out.write_text("# `workbench serve` loopback load test\n\n"
                       "`python bench/bench_serve.py BUNDLE.zip` (bench/bench_serve.py): real beans test images "
                       "(JPEG, 320x320), multipart POST /predict on 127.0.0.1.\n\n"
                       "| when (UTC) | CPUs | load avg before / after | clients | images/request | seconds "
                       "| requests ok | errors | requests/s | images/s | p50 ms | p95 ms |\n"
                       "|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    with open(out, "a") as f:
        f.write(row + "\n")
    return 0 if latencies and not errors else 1


if __name__ == "__main__":
    sys.exit(main())
