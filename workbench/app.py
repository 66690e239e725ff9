"""Workbench web UI entry point: ``streamlit run workbench/app.py``.

Order matters: page config, then the optional password gate, and only then
``st.navigation`` — so when a password is configured no page script (and no page URL)
runs before the user has signed in.
"""
from __future__ import annotations

import secrets
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

# `streamlit run workbench/app.py` puts workbench/ (not the repo root) on sys.path.
_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import streamlit as st  # noqa: E402

from workbench import auth, client_address  # noqa: E402

# A checkout keeps the pages at its top (pages/); an installed wheel ships them inside the
# package (workbench/pages/, see [tool.setuptools] in pyproject.toml).
_SHIPPED_PAGES = Path(__file__).resolve().parent / "pages"
PAGES_DIR = _SHIPPED_PAGES if _SHIPPED_PAGES.is_dir() else _ROOT / "pages"

# (file, title, icon, url path); grouped into sidebar sections.
SECTIONS: dict[str, list[tuple[str, str, str, str]]] = {
    "": [("home.py", "Home", ":material/home:", "home")],
    "Data": [
        ("datasets.py", "Datasets", ":material/folder_zip:", "datasets"),
        ("recommend.py", "Recommend", ":material/recommend:", "recommend"),
    ],
    "Models": [
        ("auto.py", "Auto", ":material/travel_explore:", "auto"),
        ("train.py", "Train", ":material/model_training:", "train"),
        ("runs.py", "Runs", ":material/leaderboard:", "runs"),
        ("evaluate.py", "Evaluate", ":material/analytics:", "evaluate"),
        ("export.py", "Export", ":material/package_2:", "export"),
        ("predict.py", "Predict", ":material/image_search:", "predict"),
    ],
    "System": [("settings.py", "Settings", ":material/settings:", "settings")],
}


_AUTH_KEY = "_wb_authenticated"
_NEXT_KEY = "_wb_next"  # (url path, query params) the browser asked for before signing in


def _client(trusted: tuple[client_address.Network, ...]) -> str:
    """Who failed sign-ins are counted against: the peer address (see client_address.client_key), else the session."""
    ip = st.context.ip_address
    session_key = st.session_state.setdefault("_wb_client", secrets.token_hex(8))
    # AppTest fills ip_address with a mock: only a real string is an address.
    return client_address.client_key(ip if isinstance(ip, str) else None, st.context.headers, session_key, trusted)


def _remember_deep_link() -> None:
    """Keep the page and query the user opened (e.g. /evaluate?run=3) to go there after sign-in."""
    if _NEXT_KEY in st.session_state:
        return  # the first request is the one the user typed; later reruns come from the form
    url = st.context.url or ""
    slug = urlparse(url).path.rstrip("/").rsplit("/", 1)[-1]
    params = {key: st.query_params.get_all(key) for key in st.query_params}
    st.session_state[_NEXT_KEY] = (slug, params)


def _follow_deep_link(pages: dict[str, list[Any]]) -> None:
    """Right after sign-in, switch to the page remembered by _remember_deep_link (if it is one of ours)."""
    slug, params = st.session_state.pop(_NEXT_KEY, ("", {}))
    target = next((p for entries in pages.values() for p in entries if p.url_path == slug and slug), None)
    if target is not None:
        st.switch_page(target, query_params=params)


def _password_gate() -> None:
    """Stop the script here unless the password is off or this session has signed in."""
    encoded = auth.configured_hash()
    if encoded is None or st.session_state.get(_AUTH_KEY) == encoded:
        return
    try:
        auth.parse_hash(encoded)
        gate = auth.default_gate()
        trusted = client_address.trusted_proxies()
    except auth.PasswordHashError as exc:
        st.error(f"Workbench is locked: the password setting is invalid. {exc}")
        st.stop()
    except auth.AuthConfigError as exc:
        st.error(f"Workbench is locked: a sign-in setting is invalid. {exc}")
        st.stop()
    _remember_deep_link()
    client = _client(trusted)
    st.title("Workbench")
    st.caption("This Workbench is protected by a password.")
    with st.form("wb_login", clear_on_submit=True):
        password = st.text_input("Password", type="password", key="wb_password")
        submitted = st.form_submit_button("Sign in", type="primary")
    if submitted:
        # While the client is throttled the gate does not even look at the password.
        result = gate.attempt(client, password, encoded)
        if result.ok:
            # Remember which hash was accepted: changing the env var logs everyone out.
            st.session_state[_AUTH_KEY] = encoded
            st.session_state["_wb_just_signed_in"] = True
            st.rerun()
        if result.checked:
            st.error("Wrong password.")
    state = gate.throttle.check(client)
    if not state.allowed:
        st.warning(auth.wait_message(state), icon=":material/hourglass_top:")
    st.stop()


def _open_access_warning() -> None:
    """Say on every page when there is no password and the server listens beyond this machine."""
    if auth.configured_hash() is not None:
        return
    address = st.get_option("server.address")
    # No address: Streamlit listens on every interface. Without request headers there is no
    # HTTP server in front of this script at all (AppTest), so nothing is exposed.
    exposed = bool(st.context.headers) if not address else not auth.is_loopback(str(address))
    if exposed:
        st.sidebar.warning("No password is set and this server accepts connections from other machines: "
                           "anyone who can reach it can use Workbench. Set WORKBENCH_PASSWORD_HASH "
                           "(see docs/UI.md, \"Access and exposure\").", icon=":material/lock_open:")


@st.cache_resource(show_spinner=False)
def _warm_imports() -> bool:
    """Import the heavy libraries (torch, albumentations…) once per server on a background thread.

    The first page that needs them would otherwise pay several seconds in its script thread.
    The thread only imports modules: it never calls st.*.
    """
    import importlib
    import threading

    def work() -> None:
        for name in ("core.train", "core.augment", "core.weights", "core.export", "workbench.runs",
                     "workbench.evaluations", "workbench.exports", "workbench.recommend",
                     "workbench.worker"):
            try:
                importlib.import_module(name)
            except Exception:  # noqa: BLE001 - the page that needs it will show the error
                pass

    threading.Thread(target=work, name="workbench-warm-imports", daemon=True).start()
    return True


def main() -> None:
    st.set_page_config(page_title="Workbench", page_icon=":material/biotech:", layout="wide")
    _password_gate()
    _warm_imports()
    pages = {
        section: [
            st.Page(str(PAGES_DIR / file), title=title, icon=icon, url_path=url, default=(file == "home.py"))
            for file, title, icon, url in entries
        ]
        for section, entries in SECTIONS.items()
    }
    nav = st.navigation(pages)
    if st.session_state.pop("_wb_just_signed_in", False):
        _follow_deep_link(pages)
    _open_access_warning()
    if auth.configured_hash() is not None:
        with st.sidebar:
            if st.button("Sign out", icon=":material/logout:"):
                st.session_state.pop(_AUTH_KEY, None)
                st.rerun()
    nav.run()


main()
