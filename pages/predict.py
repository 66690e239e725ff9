"""Predict: drop images, get the top-k classes with confidence and a Grad-CAM overlay."""
from __future__ import annotations

import streamlit as st

from workbench import actions, ui, views
from workbench.status import JobStatus

OUTSIDE_TRAINING_DATA = "This image looks unlike the images the model was trained on; its answer is not reliable."

ui.header("Predict", "Try a trained model on new images. Grad-CAM shows where the model looked.")
run_id = ui.pick_finished_run_or_stop("Model", key="predict_run", empty="No trained models yet: train one first.")

with st.form("predict_form", clear_on_submit=True):
    files = st.file_uploader("Images", type=["jpg", "jpeg", "png", "bmp", "tif", "tiff", "webp", "heic", "heif", "dcm"],
                             accept_multiple_files=True, key="predict_files")
    c1, c2 = st.columns(2)
    top_k = c1.slider("Top-k", 1, 5, 3, key="predict_topk")
    cam = c2.toggle("Grad-CAM overlay", value=True, key="predict_cam")
    go = st.form_submit_button("Predict", type="primary", icon=":material/image_search:")
if go:
    with ui.errors("Could not start the prediction"):
        st.session_state["predict_job"] = actions.start_predict(run_id, files or [], top_k=top_k, gradcam=cam)


@ui.live_fragment(1, "Could not show the predictions")
def results() -> None:
    job_id = st.session_state.get("predict_job")
    if job_id is None:
        st.caption("Drop images above and press Predict.")
        return
    j = views.job(job_id)
    if j is None:
        return
    if j.active:
        st.progress(j.fraction, text=f"Predicting: {j.progress.get('phase', '…')}")
        return
    if j.status == JobStatus.FAILED:
        st.error(f"Prediction failed: {j.error}")
        return
    cal = j.payload.get("calibration") or {}
    if cal:
        how = f" Temperature {cal['temperature']:.3f} ({cal.get('note', '')})." if cal.get("calibrated") else ""
        st.caption(f"{cal.get('confidence', '')}{how}")
    if cal.get("threshold") is not None:
        st.caption(f"Decision: **{cal['positive_class']}** when its probability is at least {cal['threshold']:.1%}, "
                   f"otherwise **{cal['negative_class']}** (threshold chosen on the {cal.get('chosen_on') or 'n/a'}).")
    for r in j.payload.get("results", []):
        with st.container(border=True):
            left, right = st.columns([1, 2])
            if r.get("error"):
                st.error(f"{r['name']}: {r['error']}")
                continue
            with left:
                if r.get("overlay"):
                    st.image(r["overlay"], caption=f"Grad-CAM for {r['top'][0]['class']}", width=224)
            with right:
                if r.get("outside_training_data"):  # no silent class: the answer is kept one click away
                    st.warning(f"**{r['name']}**: {OUTSIDE_TRAINING_DATA}")
                    detail = st.expander("The model's answer anyway (expert detail)")
                else:
                    st.markdown(f"**{r['name']}** → **{r['top'][0]['class']}** ({r['top'][0]['p']:.1%})")
                    detail = st.container()
                with detail:
                    if r.get("decision") is not None:
                        st.markdown(f"Decision: **{r['decision']}** ({cal.get('positive_class')} "
                                    f"{r['p_positive']:.1%}, threshold {cal['threshold']:.1%})")
                    for t in r["top"]:
                        st.progress(t["p"], text=f"{t['class']}: {t['p']:.1%}")
                    if r.get("ood_score") is not None:
                        st.caption(f"Unfamiliarity (energy) score {r['ood_score']:.2f}; images above "
                                   f"{cal['ood_threshold']:.2f} are flagged.")


results()
