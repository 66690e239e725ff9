"""Export: build a verified deploy bundle (ONNX + labels + preprocessing + predict.py) and download it."""
from __future__ import annotations

import pandas as pd
import streamlit as st

from workbench import actions, artifacts, ui
from workbench.status import JobKind

ui.header("Export", "A zip you can deploy anywhere ONNX Runtime runs, verified against PyTorch on the test split.")

run_id = ui.pick_finished_run_or_stop("Run", key="export_run")

with st.form("export_form"):
    st.markdown("**Precisions** — fp32 is always included and is the reference.")
    c = st.columns(3)
    fp16 = c[0].checkbox("fp16", key="exp_fp16", help="Half the file size; accuracy change is measured and shown.")
    int8 = c[1].checkbox("int8", key="exp_int8",
                         help="Quantised, calibrated on training images; smallest and often fastest on CPU.")
    uint8 = c[2].checkbox("uint8-input graph", key="exp_uint8",
                          help="Preprocessing inside the model: feed raw RGB bytes.")
    go = st.form_submit_button("Build bundle", type="primary", icon=":material/package_2:")
if go:
    with ui.errors("Could not start the export"):
        actions.start_export(run_id, fp16=fp16, int8=int8, uint8_graph=uint8)
        st.toast("Building the bundle… you can leave this page; the work continues.")


@ui.live_fragment(1, "Could not read the export jobs")
def export_progress() -> None:
    ui.job_progress_panel([JobKind.EXPORT], run_id, "Export", "_export_was_running")


export_progress()

with ui.errors("Could not list the run's files"):
    arts = artifacts.list_artifacts(run_id)
    fp32 = [a for a in arts if a.kind == "onnx_fp32"]
    st.subheader("Verification")
    if not fp32:
        st.caption("No ONNX export yet: it is made automatically after training, or by building a bundle.")
    else:
        a = fp32[-1]
        ver = a.meta.get("verification") or {}
        if a.status == "ok":
            st.success(f"Verified: ONNX Runtime matches PyTorch on all {ver.get('n_images', '?')} test images — "
                       f"max logit difference {ver.get('max_abs_logit_diff', float('nan')):.2e} "
                       f"(tolerance {ver.get('tolerance', float('nan')):.0e}), "
                       f"top-1 agreement {ver.get('top1_agreement', float('nan')):.1%}.", icon=":material/verified:")
        else:
            st.error(f"The fp32 ONNX model is not offered: {a.status}")
    bundles = [a for a in arts if a.kind == "bundle"]
    st.subheader("Bundles")
    if not bundles:
        st.caption("No bundle yet: choose precisions above and build one.")
    for b in reversed(bundles[-5:]):
        meta = b.meta
        with st.container(border=True):
            st.markdown(f"**Bundle #{b.id}** · {ui.fmt_bytes(b.bytes)} · {b.created_at:%Y-%m-%d %H:%M} UTC"
                        f" · models: {', '.join(meta.get('files', []))}")
            variants = meta.get("variants") or {}
            if variants:
                st.dataframe(pd.DataFrame(variants).T, width="stretch",
                             column_config={"accuracy_delta": st.column_config.NumberColumn(format="%+.4f")})
            ui.download_button(b.id, "Download bundle", f"workbench-run{run_id}-bundle{b.id}.zip", key=f"dl{b.id}")
