"""Runs: leaderboard, accuracy-vs-latency front, overlaid training curves, delete a run."""
from __future__ import annotations

import altair as alt
import pandas as pd
import streamlit as st

from workbench import datasets, runs, suggestions, ui, views, wording
from workbench.status import RunStatus

# Chart column headers, from the read model's field names.
COLUMNS = {"accuracy": "validation accuracy", "macro_f1": "validation macro-F1", "latency_ms": "latency ms",
           "size_mb": "size MB", "test_accuracy": "test accuracy", "test_macro_f1": "test macro-F1"}

ui.header("Runs", "Every training run, measured the same way: ranked by validation score, reported on the "
          "held-out test images, with ONNX Runtime latency and size.")
ds_filter = None
with ui.errors("Could not list datasets"):
    ds_names = {d.id: d.name for d in datasets.list_datasets()}
    if ds_names:
        # One dataset at a time (scores of different datasets do not compare); "all" is last.
        newest = views.newest_dataset_id()
        ds_filter = st.selectbox("Dataset", [*ds_names, None], index=list(ds_names).index(newest)
                                 if newest in ds_names else 0, format_func=lambda i: "All datasets" if i is None
                                 else ds_names[i], key="runs_dataset")

c1, c2, c3, c4 = st.columns([2, 1, 2, 1])
sort = c1.selectbox("Sort by", list(views.LEADERBOARD_SORTS), key="runs_sort")
descending = c2.toggle("Descending", value=sort not in views.ASCENDING_BY_DEFAULT, key=f"runs_desc_{sort}")
if sort in views.TEST_SORTS:  # allowed, but the page says why it is not the default
    st.warning(wording.CHOOSE_BY_VALIDATION, icon=":material/visibility_off:")
statuses = c3.multiselect("Status", [str(s) for s in RunStatus], key="runs_status")
page_size = c4.selectbox("Rows", [25, 50, 100], key="runs_rows")

selected: list[int] = []
with ui.errors("Could not read the runs"):
    total = views.count_runs(dataset_id=ds_filter, statuses=statuses)
    if total == 0:
        ui.empty_state("No runs yet: launch one from the Train page.", "train.py", "Train a model")
        st.stop()
    offset, limit = ui.paginate(total, page_size, key="runs_page")
    rows = views.runs_table(offset=offset, limit=limit, sort=sort, descending=descending,
                            dataset_id=ds_filter, statuses=statuses)
    df = pd.DataFrame(wording.leaderboard_table(rows))
    event = st.dataframe(
        df, hide_index=True, width="stretch", on_select="rerun", selection_mode="multi-row", key="runs_table",
        column_config={
            "validation macro-F1": st.column_config.NumberColumn(format="%.3f", help=wording.HELP["val_macro_f1"]),
            "validation accuracy": st.column_config.NumberColumn(format="%.3f", help=wording.HELP["val_accuracy"]),
            "test macro-F1": st.column_config.NumberColumn(format="%.3f", help=ui.METRIC_HELP["macro_f1"]),
            "test accuracy": st.column_config.NumberColumn(format="%.3f", help=ui.METRIC_HELP["accuracy"]),
            "latency ms": st.column_config.NumberColumn(format="%.2f", help=ui.METRIC_HELP["latency_p50"]),
            "size MB": st.column_config.NumberColumn(format="%.1f"),
            "parameters (millions)": st.column_config.NumberColumn(format="%.2f", help=ui.METRIC_HELP["params"]),
            "created": st.column_config.DatetimeColumn(format="YYYY-MM-DD HH:mm"),
        },
    )
    st.caption(f"Runs {offset + 1}–{offset + len(rows)} of {total}. Select rows to overlay their curves below. "
               f"{wording.CHOOSE_BY_VALIDATION} Macro-F1 and accuracy run from 0 to 1 (1 = every image right); "
               "**latency** is the typical time the model takes per image on this machine "
               "(on its processor or its graphics card: see 'latency measured on').")
    selected = [rows[i].run for i in event.selection.rows] if event and event.selection else []
    if margin := views.leaderboard_margin(rows):
        st.info(margin, icon=":material/balance:")
    with st.expander("What the 95 % range means"):
        st.markdown("Test accuracy is measured on a limited number of test images, so it is uncertain: with "
                    "128 images one image is 0.8 points. The range (Wilson score interval) holds the accuracy "
                    "you would see on many more images like these, 19 times out of 20. Two runs are compared "
                    "image by image (McNemar's test on the images only one of them gets right).")

st.subheader("Accuracy vs latency")
with ui.errors("Could not draw the accuracy-vs-latency chart"):
    points = views.run_points(dataset_id=ds_filter)
    if not points:
        st.caption("Finished, measured runs appear here.")
    else:
        pts = pd.DataFrame(points).rename(columns=COLUMNS)
        front = views.pareto_front(points)
        pts["Pareto front"] = pts["run"].isin(front)
        base = alt.Chart(pts).encode(
            x=alt.X("latency ms:Q", title="typical time per image (ms)"),
            y=alt.Y("validation accuracy:Q", title="validation accuracy", scale=alt.Scale(zero=False)))
        dots = base.mark_circle(size=90).encode(
            color=alt.Color("Pareto front:N", scale=alt.Scale(domain=[True, False], range=["#d62728", "#9e9e9e"])),
            tooltip=["run", "model", "validation accuracy", "validation macro-F1", "test accuracy", "test macro-F1",
                     "latency ms", "size MB"])
        line = alt.Chart(pts[pts["Pareto front"]].sort_values("latency ms")).mark_line(
            color="#d62728", strokeDash=[4, 3]).encode(x="latency ms:Q", y="validation accuracy:Q")
        st.altair_chart(line + dots, width="stretch")
        st.caption(f"Red: the Pareto front ({len(front)} run{'s' if len(front) != 1 else ''}) — no other run is both "
                   "faster and more accurate on the validation images. The test figures are in the tooltip: "
                   f"{wording.CHOOSE_BY_VALIDATION}")

st.subheader("Training curves")
if not selected:
    st.caption("Select one or more rows in the table to overlay their training curves.")
else:
    with ui.errors("Could not read the training curves"):
        curves = pd.DataFrame(views.run_curves(selected))
        if curves.empty:
            st.caption("No per-epoch metrics recorded for these runs yet.")
        else:
            metric = st.selectbox("Metric", suggestions.curve_metric_choices(curves["metric"].unique()),
                                  format_func=wording.curve_label, key="runs_metric")  # validation macro-F1 first
            sub = curves[curves["metric"] == metric]
            st.altair_chart(alt.Chart(sub).mark_line(point=True).encode(
                x=alt.X("epoch:Q", title="round of training"), y=alt.Y("value:Q", title=wording.curve_label(metric)),
                color="run:N", strokeDash="phase:N",
                tooltip=["run", "phase", "epoch", "value"]), width="stretch")
    for rid in selected[:5]:
        c = st.columns(3)
        c[0].page_link(str(ui.PAGES_DIR / "evaluate.py"), label=f"Evaluate run #{rid}", query_params={"run": rid})
        c[1].page_link(str(ui.PAGES_DIR / "export.py"), label=f"Export run #{rid}", query_params={"run": rid})

with st.expander("Delete a run", icon=":material/delete:"):
    with ui.errors("Could not list the runs"):
        choices = views.run_choices()
        ids = list(choices)
        first = next((i for i in selected if i in choices), None)  # a row selected above, if any
        rid = st.selectbox("Run", ids, index=ids.index(first) if first is not None else 0,
                           format_func=lambda i: choices[i], key="delete_run_choice")
        st.markdown(f"Delete run **#{rid}**: its checkpoints, evaluations, exports and bundles. "
                    "A queued or running run must be cancelled first.")
        sure = st.checkbox(f"Yes, delete run #{rid}", key=f"sure_run{rid}")
        if st.button("Delete run", type="primary", disabled=not sure, icon=":material/delete:"):
            with ui.errors("Could not delete the run"):
                gone = runs.delete_run(rid)
                st.toast(f"Deleted run #{gone.run_id}: {gone.files_removed} files removed.")
                st.rerun()
