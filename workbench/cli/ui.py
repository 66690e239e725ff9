"""``workbench ui``: serve the web UI, refusing to expose it without a password.

Rule: a non-loopback ``--host`` needs ``WORKBENCH_PASSWORD_HASH`` (or an explicit
``WORKBENCH_ALLOW_OPEN=1``), else exit code 2 with one message. Then Streamlit serves
workbench/app.py — headless, no usage statistics, as ``make run`` always did — through
Streamlit's public ``st.App`` so a small ASGI middleware can answer 404 on internal
routes that no browser needs and that leak server details (see docs/UI.md,
"Access and exposure").
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
APP = ROOT / "workbench" / "app.py"
# Installed from a wheel, .streamlit/config.toml ships as workbench/streamlit_config/config.toml.
SHIPPED_CONFIG = ROOT / "workbench" / "streamlit_config" / "config.toml"

# Paths (after any server.baseUrlPath) answered with 404 in front of Streamlit.
HIDDEN_SUFFIXES = (
    "/_stcore/metrics",  # session counts, cache names and sizes; no config option turns it off
    "/_stcore/script-health-check",  # runs the app script; off in config.toml, hidden as well
)
HIDDEN_PARTS = ("/_stcore/agent/",)  # experimental agent API; off in config.toml, hidden as well


class HideInternalRoutes:
    """Pure ASGI middleware: 404 for HIDDEN_* paths, everything else passes through untouched."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope.get("type") == "http" and is_hidden(scope.get("path", "")):
            from starlette.responses import PlainTextResponse

            await PlainTextResponse("Not found", status_code=404)(scope, receive, send)
            return
        await self.app(scope, receive, send)


def is_hidden(path: str) -> bool:
    path = "/" + path.strip("/")
    return path.endswith(HIDDEN_SUFFIXES) or any(part in path + "/" for part in HIDDEN_PARTS)


def streamlit_config(host: str, port: int) -> dict[str, Any]:
    """The flags `make run` passed to `streamlit run` before this command existed."""
    return {"server.address": host, "server.port": port, "server.headless": True,
            "browser.gatherUsageStats": False}


def shipped_config(path: Path = SHIPPED_CONFIG) -> dict[str, Any]:
    """The options of a Streamlit config.toml as flat ``section.option`` flags."""
    import tomllib

    with open(path, "rb") as f:
        doc = tomllib.load(f)
    return {f"{section}.{key}": value for section, table in doc.items() for key, value in table.items()}


def cmd_ui(args: argparse.Namespace) -> int:
    from workbench import auth, client_address

    problem = auth.open_exposure_problem(args.host)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    try:
        if auth.configured_hash():
            auth.parse_hash(auth.configured_hash() or "")
        auth.ThrottlePolicy.from_env()
        # uvicorn's own default believes X-Forwarded-For from 127.0.0.1: only the listed proxies.
        os.environ["FORWARDED_ALLOW_IPS"] = client_address.forwarded_allow_ips(client_address.trusted_proxies())
    except (auth.PasswordHashError, auth.AuthConfigError) as exc:
        print(f"Not starting: {exc}", file=sys.stderr)
        return 2

    import streamlit as st
    from starlette.middleware import Middleware

    config = streamlit_config(args.host, args.port)
    if (ROOT / ".streamlit" / "config.toml").is_file():
        # A checkout: the same config files as `streamlit run workbench/app.py` from the
        # repository root (./.streamlit/config.toml is read from the working directory).
        os.chdir(ROOT)
    else:
        # Installed: stay in the user's directory (the default data dir, ./workbench-data, is
        # there) and pass the shipped config.toml's options as flags.
        config = {**shipped_config(), **config}
    sys.argv = [str(APP)]  # App.run() anchors the script-level config on argv[0]
    app = st.App(str(APP), middleware=[Middleware(HideInternalRoutes)])
    app.run(config=config)
    return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("ui", help="serve the web UI (Streamlit)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1; any other needs a password, see docs/UI.md)")
    p.add_argument("--port", type=int, default=8501, help="port to listen on (default 8501)")
    p.set_defaults(func=cmd_ui)
