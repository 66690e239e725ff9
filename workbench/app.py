"""Workbench web UI entry point: ``streamlit run workbench/app.py``.

Order matters: page config, then the optional password gate, and only then
``st.navigation`` — so when a password is configured no page script (and no page URL)
runs before the user has signed in.
"""
from __future__ import annotations

import sys
from pathlib import Path

# `streamlit run workbench/app.py` puts workbench/ (not the repo root) on sys.path.
_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import streamlit as st  # noqa: E402

from workbench import auth  # noqa: E402

PAGES_DIR = _ROOT / "pages"

# (file, title, icon, url path); grouped into sidebar sections.
SECTIONS: dict[str, list[tuple[str, str, str, str]]] = {
    "": [("home.py", "Home", ":material/home:", "home")],
    "Data": [
        ("datasets.py", "Datasets", ":material/folder_zip:", "datasets"),
        ("recommend.py", "Recommend", ":material/recommend:", "recommend"),
    ],
    "Models": [
        ("train.py", "Train", ":material/model_training:", "train"),
        ("runs.py", "Runs", ":material/leaderboard:", "runs"),
        ("evaluate.py", "Evaluate", ":material/analytics:", "evaluate"),
        ("export.py", "Export", ":material/package_2:", "export"),
        ("predict.py", "Predict", ":material/image_search:", "predict"),
    ],
    "System": [("settings.py", "Settings", ":material/settings:", "settings")],
}


def _password_gate() -> None:
    """Stop the script here unless the password is off or this session has signed in."""
    encoded = auth.configured_hash()
    if encoded is None or st.session_state.get("_wb_authenticated") == encoded:
        return
    try:
        auth.parse_hash(encoded)
    except auth.PasswordHashError as exc:
        st.error(f"Workbench is locked: the password setting is invalid. {exc}")
        st.stop()
    st.title("Workbench")
    st.caption("This Workbench is protected by a password.")
    with st.form("wb_login"):
        password = st.text_input("Password", type="password", key="wb_password")
        submitted = st.form_submit_button("Sign in", type="primary")
    if submitted:
        if auth.verify_password(password, encoded):
            # Remember which hash was accepted: changing the env var logs everyone out.
            st.session_state["_wb_authenticated"] = encoded
            st.rerun()
        st.error("Wrong password.")
    st.stop()


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
    if auth.configured_hash() is not None:
        with st.sidebar:
            if st.button("Sign out", icon=":material/logout:"):
                st.session_state.pop("_wb_authenticated", None)
                st.rerun()
    nav.run()


main()
