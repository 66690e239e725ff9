"""`make run` and the Procfile really serve the app (HTTP 200 on /), and `workbench ui`
refuses to serve an open app beyond localhost."""
from __future__ import annotations

import os
import shlex
import socket
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from builders import free_port, stop, wait_for_200

ROOT = Path(__file__).resolve().parents[1]


def non_loopback_address() -> str | None:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))  # no packet is sent: UDP connect only picks a route
            addr = s.getsockname()[0]
    except OSError:
        return None
    return None if addr.startswith("127.") else addr


def test_make_run_serves_on_localhost_only(tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "WORKBENCH_DATA_DIR": str(tmp_path / "data"), "PORT": str(port)}
    proc = subprocess.Popen(["make", "-s", "run", f"PORT={port}"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        assert wait_for_200(f"http://127.0.0.1:{port}/", proc) == 200
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=5) as r:
            assert r.read() == b"ok"
        addr = non_loopback_address()
        if addr:  # bound to 127.0.0.1: another interface of this machine refuses the connection
            with pytest.raises(OSError):
                socket.create_connection((addr, port), timeout=2).close()
    finally:
        stop(proc)


def procfile_cmd(port: int) -> list[str]:
    line = next(ln for ln in (ROOT / "Procfile").read_text().splitlines() if ln.startswith("web:"))
    cmd = shlex.split(line.removeprefix("web:").replace("$PORT", str(port)))
    cmd[0] = str(ROOT / ".venv" / "bin" / cmd[0]) if (ROOT / ".venv" / "bin" / cmd[0]).exists() else cmd[0]
    return cmd


def serve_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "WORKBENCH_DATA_DIR": str(tmp_path / "data"), **extra}
    for name in ("WORKBENCH_PASSWORD_HASH", "WORKBENCH_ALLOW_OPEN", "DATABASE_URL"):
        if name not in extra:
            env.pop(name, None)
    return env


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_procfile_web_line_serves(tmp_path: Path) -> None:
    from workbench.auth import hash_password
    from workbench.cli.ui import streamlit_config

    port = free_port()
    cmd = procfile_cmd(port)
    assert cmd[1:] == ["ui", "--host", "0.0.0.0", "--port", str(port)]
    assert streamlit_config("0.0.0.0", port)["server.headless"] is True  # what `workbench ui` hands Streamlit
    env = serve_env(tmp_path, WORKBENCH_PASSWORD_HASH=hash_password("pw", iterations=1000))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        assert wait_for_200(f"http://127.0.0.1:{port}/", proc) == 200
        assert http_status(f"http://127.0.0.1:{port}/_stcore/health") == 200
        # Internal routes no browser needs are hidden by `workbench ui`.
        assert http_status(f"http://127.0.0.1:{port}/_stcore/metrics") == 404
        assert http_status(f"http://127.0.0.1:{port}/_stcore/agent/openapi.json") == 404
        assert http_status(f"http://127.0.0.1:{port}/_stcore/script-health-check") == 404
    finally:
        stop(proc)


def test_procfile_web_line_refuses_an_open_app(tmp_path: Path) -> None:
    port = free_port()
    proc = subprocess.run(procfile_cmd(port), cwd=ROOT, env=serve_env(tmp_path), capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2
    assert "Refusing to serve Workbench on 0.0.0.0 without a password" in proc.stderr
    assert "WORKBENCH_PASSWORD_HASH" in proc.stderr and "WORKBENCH_ALLOW_OPEN=1" in proc.stderr
    with pytest.raises(OSError):  # nothing was ever listening
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


def test_procfile_web_line_serves_open_when_allowed(tmp_path: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(procfile_cmd(port), cwd=ROOT, env=serve_env(tmp_path, WORKBENCH_ALLOW_OPEN="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        assert wait_for_200(f"http://127.0.0.1:{port}/", proc) == 200
    finally:
        stop(proc)
