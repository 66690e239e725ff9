"""Export: build a verified deploy bundle (ONNX + labels + preprocessing + predict.py) and download it."""
from __future__ import annotations

import pandas as pd
import streamlit as st

from workbench import actions, artifacts, ui, views
from workbench.status import JobKind

ui.header("Export", "A zip you can deploy anywhere ONNX Runtime runs, verified against PyTorch on the test split.")

run_id = ui.pick_finished_run_or_stop(  # nothing chosen: the best run (by validation) of the newest dataset
    "Run", key="export_run", default=views.default_predict_run(views.newest_dataset_id()))

with st.form("export_form"):
    st.markdown("**Extra, smaller copies of the model** — the full-precision model (fp32) is always included "
                "and is the reference; each copy's accuracy is measured on the test images and shown.")
    c = st.columns(3)
    fp16 = c[0].checkbox("Half precision (fp16)", key="exp_fp16",
                         help="Half the file size; accuracy change is measured and shown.")
    int8 = c[1].checkbox("Compressed (int8)", key="exp_int8",
                         help="Quantised, calibrated on training images; smallest and often fastest on CPU.")
    uint8 = c[2].checkbox("Takes raw pictures (uint8 input)", key="exp_uint8",
                          help="Resizing and scaling inside the model: feed it the image's RGB bytes.")
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
        ver = views.verification_view(a.meta)
        if a.status == "ok":
            st.success(f"Verified: the exported model gives the same answers as the trained one on all "
                       f"{ver.images or '?'} test images ({ver.top1_agreement:.0%} "
                       "identical top answers).", icon=":material/verified:")
            with st.expander("Verification details"):
                st.caption(f"Largest difference in raw scores {ver.max_abs_logit_diff:.1e} "
                           f"(allowed {ver.tolerance:.0e}); ONNX Runtime against PyTorch.")
        else:
            st.error(f"The fp32 ONNX model is not offered: {a.status}")
    bundles = [a for a in arts if a.kind == "bundle"]
    st.subheader("Bundles")
    if not bundles:
        st.caption("No bundle yet: choose precisions above and build one.")
    numbered = list(enumerate(bundles, start=1))  # numbered per run: "your first bundle"
    for n, b in reversed(numbered[-5:]):
        bundle = views.bundle_view(b.meta)
        with st.container(border=True):
            models = ", ".join(bundle.files)
            st.markdown(f"**Your {ui.ordinal(n)} bundle** for this model · {ui.fmt_bytes(b.bytes)} · "
                        f"built {b.created_at:%Y-%m-%d %H:%M} UTC" + (f" · files: {models}" if models else ""))
            if bundle.rows:  # nested records (the measuring conditions) go to the technical details
                st.dataframe(pd.DataFrame(ui.plain_rows(list(bundle.rows))), hide_index=True, width="stretch")
                with st.expander("What these columns mean"):
                    helps = ("latency_p50", "latency_p95", "throughput")
                    st.markdown("\n".join(f"- {ui.METRIC_HELP[k]}" for k in helps)
                                + "\n- Accuracy change: test accuracy of this copy minus that of the full-precision "
                                  "model (0 = no loss).")
            with st.expander("Technical details"):
                st.caption(f"Artifact id {b.id}")
                for name, cond in bundle.conditions.items():
                    st.caption(f"{name} timed with " + ", ".join(f"{ui.field_label(k).lower()} {ui.plain_cell(v)}"
                                                                 for k, v in cond.items()))
            ui.download_button(b.id, "Download bundle", f"workbench-run{run_id}-bundle{n}.zip", key=f"dl{b.id}")
