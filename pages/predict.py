"""Predict: drop images, get the top-k classes with confidence and a Grad-CAM overlay."""
from __future__ import annotations

import streamlit as st

from workbench import actions, ui, views, wording
from workbench.status import JobStatus

OUTSIDE_TRAINING_DATA = "This image looks unlike the images the model was trained on; its answer is not reliable."

ui.header("Predict", "Try a trained model on new images. Grad-CAM shows where the model looked.")
dataset_names = {d.id: d.name for d in ui.datasets_or_stop("No datasets yet: add one first.", "datasets.py")}
ids = list(dataset_names)
newest = views.newest_dataset_id()
dataset_id = st.selectbox("Dataset", ids, index=ids.index(newest) if newest in dataset_names else len(ids) - 1,
                          format_func=lambda i: dataset_names[i], key="predict_dataset")
run_id = ui.pick_finished_run_or_stop(  # opens on the exported model, else the best one, of that dataset
    "Model", key=f"predict_run_{dataset_id}", empty="No trained models for this dataset yet: train one first.",
    dataset_id=dataset_id, default=views.default_predict_run(dataset_id))

with st.form("predict_form", clear_on_submit=True):
    files = st.file_uploader("Images", type=["jpg", "jpeg", "png", "bmp", "tif", "tiff", "webp", "heic", "heif", "dcm"],
                             accept_multiple_files=True, key="predict_files")
    c1, c2 = st.columns(2)
    top_k = c1.slider("Answers to show", 1, 5, 3, key="predict_topk",
                      help="The model's most likely classes, best first.")
    cam = c2.toggle("Show where the model looked (Grad-CAM)", value=True, key="predict_cam")
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
        st.progress(j.fraction, text=f"Predicting: {j.phase or '…'}")
        return
    if j.status == JobStatus.FAILED:
        st.error(f"Prediction failed: {j.error}")
        return
    pv = views.prediction_view(j)
    if pv.confidence:
        st.caption(pv.confidence)
    if pv.temperature:
        with st.expander("How the confidences were adjusted (expert detail)"):
            st.caption(f"Temperature {pv.temperature:.2f} ({pv.calibration_note}).")
    if decision := wording.decision_sentence(pv.calibration):
        st.caption(decision)
    for r in pv.answers:
        with st.container(border=True):
            left, right = st.columns([1, 2])
            if r.error:
                st.error(f"{r.name}: {r.error}")
                continue
            with left:
                if r.overlay and r.top:
                    st.image(r.overlay, caption=f"Grad-CAM for {r.top[0].label}", width=224)
            with right:
                if r.outside_training_data or not r.top:  # no silent class: the answer is kept one click away
                    st.warning(f"**{r.name}**: {OUTSIDE_TRAINING_DATA}")
                    detail = st.expander("The model's answer anyway (expert detail)")
                else:
                    best = r.top[0]
                    st.markdown(f"**{r.name}** → **{best.label}** ({wording.percent(best.p, 1)})")
                    detail = st.container()
                with detail:
                    if r.decision is not None and r.p_positive is not None and pv.threshold is not None:
                        st.markdown(f"Decision: **{r.decision}** ({pv.positive_class} "
                                    f"{wording.percent(r.p_positive, 1)}, threshold "
                                    f"{wording.percent(pv.threshold, 1)})")
                    for t in r.top:
                        st.progress(t.p, text=f"{t.label}: {wording.percent(t.p, 1)}")
                    if familiar := wording.familiarity_sentence(r.ood_score, pv.ood_threshold):
                        st.caption(familiar)

results()
