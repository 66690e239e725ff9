"""Settings: where data lives, versions, weights availability, access control."""
from __future__ import annotations

import streamlit as st

from workbench import ui

ui.header("Settings", "Read-only: Workbench is configured through environment variables.")
s = ui.settings()

st.subheader("Storage")
st.markdown(
    f"- **Data dir** (`WORKBENCH_DATA_DIR`): `{s.data_dir}`\n"
    f"- **Database** (`DATABASE_URL`): `{ui.masked_url(s.database_url)}`\n"
    f"- **Image store**: `{s.store_dir}`\n"
    f"- **Runs**: `{s.runs_dir}`"
)
with ui.errors("Could not check free disk space"):
    st.caption(f"Free space on the data dir's disk: {ui.fmt_bytes(ui.disk_free(s.data_dir))}")

st.subheader("Access")
if ui.password_enabled():
    st.success("A password is required (`WORKBENCH_PASSWORD_HASH` is set).", icon=":material/lock:")
else:
    st.warning("No password is set: anyone who can reach this address can use Workbench. Keep it on "
               "127.0.0.1 or set `WORKBENCH_PASSWORD_HASH` (make one with `python -m workbench.auth`).",
               icon=":material/lock_open:")

st.subheader("Versions")
st.dataframe(ui.versions(), hide_index=True, width="content")

st.subheader("Pretrained weights")
with ui.errors("Could not check weights"):
    st.dataframe(ui.weights_table(), hide_index=True, width="stretch")
    st.caption("Only local files and the local hub cache are checked (no network access from this page).")
