"""Evaluate: honest test-split metrics, confusion matrix, ROC/PR, calibration, errors with Grad-CAM."""
from __future__ import annotations

import altair as alt
import pandas as pd
import streamlit as st

from workbench import actions, artifacts, dataset_fixes, evaluations, ui, views, wording
from workbench.status import JobKind

ui.header("Evaluate", "Metrics on the held-out test split (never used for training or model selection).")

run_id = ui.pick_finished_run_or_stop(  # nothing chosen: the best run of the newest dataset
    "Run", key="eval_run", default=views.default_predict_run(views.newest_dataset_id()))

c1, c2, _ = st.columns([1, 1, 2])
if c1.button("Evaluate again", icon=":material/refresh:", help="Re-run the test-split evaluation."):
    with ui.errors("Could not start the evaluation"):
        actions.start_evaluate(run_id)
if c2.button("With test-time augmentation", icon=":material/flip:",
             help="Average the predictions on each image and its mirror; shows the effect on accuracy."):
    with ui.errors("Could not start the evaluation"):
        actions.start_evaluate(run_id, tta=True)


@ui.live_fragment(1, "Could not read the evaluation jobs")
def evaluation_jobs() -> None:
    ui.job_progress_panel([JobKind.EVALUATE], run_id, "Evaluation", "_eval_was_running")


evaluation_jobs()

with ui.errors("Could not load the evaluation"):
    ev = evaluations.latest_evaluation(run_id, tta=None)
    if ev is None:
        st.info("This run has no evaluation yet. Runs are evaluated automatically when training finishes; "
                "if it just finished, wait a few seconds, or press “Evaluate again”.", icon=":material/hourglass_top:")
        st.stop()
    mv = views.metrics_view(ev.metrics)
    m = mv.raw  # the wording helpers turn the whole record into sentences
    c = st.columns(5)
    c[0].metric("Accuracy", ui.fmt_num(mv.accuracy), help=ui.METRIC_HELP["accuracy"])
    c[1].metric("Balanced accuracy", ui.fmt_num(mv.balanced_accuracy), help=wording.HELP["balanced_accuracy"])
    c[2].metric("Macro-F1", ui.fmt_num(mv.macro_f1), help=ui.METRIC_HELP["macro_f1"])
    c[3].metric("Macro ROC-AUC", ui.fmt_num(mv.macro_roc_auc), help=wording.HELP["macro_roc_auc"])
    c[4].metric("Calibration error", ui.fmt_num(mv.ece), help=ui.METRIC_HELP["ece"],
                delta=None if mv.ece_change is None else f"{mv.ece_change:+.3f} after adjustment",
                delta_color="inverse")
    found = wording.found_sentences(m)  # many classes: one click away, not a wall of text
    with st.expander("How many of each class were found") if len(found) > 8 else st.container():
        st.markdown("\n".join(f"- {line}" for line in found))
    if two_class := wording.sensitivity_specificity(m):
        st.markdown(two_class, help=f"{wording.HELP['sensitivity']} {wording.HELP['specificity']}")
    acc_iv, f1_iv = mv.accuracy_interval, mv.macro_f1_interval
    if acc_iv and f1_iv:
        st.markdown(f"**Accuracy {acc_iv.text}** · macro-F1 {f1_iv.text} "
                    f"— measured on {mv.interval_images} test images; on more images like these it would most likely "
                    "fall inside the range.")
    st.caption(f"{mv.test_images or 'No'} test images · evaluated {ev.created_at:%Y-%m-%d %H:%M} UTC"
               + (" · with test-time augmentation" if ev.tta else ""))
    leakage = dataset_fixes.leakage_free_sentence(m)
    if leakage:
        st.warning(leakage, icon=":material/content_copy:")
    if mv.tta_effect:
        st.caption(wording.tta_sentence(mv.tta_effect))

    tab_metrics, tab_cm, tab_curves, tab_cal, tab_errors = st.tabs(
        ["Metrics", "Confusion matrix", "ROC & PR", "Calibration", "Misclassified & Grad-CAM"])
    plots = artifacts.evaluation_plots(run_id, ev.id)
    with tab_metrics:
        per_class = pd.DataFrame(wording.per_class_table(m, mv.per_class_ranges))
        st.dataframe(per_class, hide_index=True, width="stretch", column_config={
            k: st.column_config.Column(help=wording.HELP[h]) for k, h in (
                ("found (recall)", "recall"), ("precision", "precision"), ("F1", "f1"), ("ROC-AUC", "roc_auc"),
                ("average precision", "average_precision"))})
        with st.expander("What these scores mean"):
            st.markdown("\n".join(f"- {wording.HELP[k]}" for k in ("recall", "precision", "f1", "average_precision")))
        if top_k := wording.top_k_sentence(mv.top_k):
            st.caption(top_k)
        if op_sentence := wording.operating_point_sentence(mv.operating_point):
            st.caption(op_sentence)
        if acc_iv and f1_iv:
            with st.expander("How the 95 % ranges are computed"):
                st.markdown(f"- Accuracy and per-class recall: {acc_iv.method} interval.\n"
                            f"- Macro-F1: {f1_iv.method} of the {mv.interval_images} test images.\n"
                            "- A range says how much the figure could move on another set of images like these; "
                            "two runs whose ranges overlap may not really differ.")
    with tab_cm:
        classes = list(mv.classes)
        normalized = st.toggle("Normalise by true class", value=True, key="cm_norm")
        cm = mv.confusion_normalized if normalized else mv.confusion
        if cm and len(classes) <= 60:
            cells = pd.DataFrame([{"true": classes[i], "predicted": classes[j], "value": v}
                                  for i, row in enumerate(cm) for j, v in enumerate(row)])
            side = min(60 * len(classes) + 40, 900)
            heat = alt.Chart(cells).mark_rect().encode(
                x=alt.X("predicted:N", sort=classes, axis=alt.Axis(labelAngle=-30 if len(classes) > 6 else 0)),
                y=alt.Y("true:N", sort=classes),
                color=alt.Color("value:Q", scale=alt.Scale(scheme="blues")), tooltip=["true", "predicted", "value"])
            text = alt.Chart(cells).mark_text(fontSize=12).encode(
                x=alt.X("predicted:N", sort=classes), y=alt.Y("true:N", sort=classes),
                text=alt.Text("value:Q", format=".2f" if normalized else "d"),
                color=alt.condition(alt.datum.value > (0.5 if normalized else max(map(max, cm)) / 2),
                                    alt.value("white"), alt.value("black")))
            st.altair_chart((heat + text).properties(height=side), width="stretch")
        else:
            ui.show_plot(plots, "confusion_matrix")
    with tab_curves:
        left, right = st.columns(2)
        with left:
            ui.show_plot(plots, "roc", "ROC, one class vs rest")
        with right:
            ui.show_plot(plots, "pr", "Precision-recall, one class vs rest")
    with tab_cal:
        ui.show_plot(plots, "reliability", "Reliability diagram", width="content")
        st.caption(ui.METRIC_HELP["ece"])
        if cal_sentence := wording.calibration_sentence(mv.calibration):
            st.caption(cal_sentence)
    with tab_errors:
        wrong = mv.misclassified
        if not wrong:
            st.success("No misclassified test images.")
        else:
            st.caption("The highest-loss mistakes, with Grad-CAM: where the model looked for its (wrong) answer.")
            ui.show_plot(plots, "misclassified", width="content")
            st.dataframe(pd.DataFrame(wording.misclassified_table(wrong)), hide_index=True, width="stretch")
