"""Auto: try models and recipes on the user's data within a device budget and a time budget."""
from __future__ import annotations

import altair as alt
import pandas as pd
import streamlit as st

from workbench import search_words, searches, ui, views
from workbench.search_clock import DEFAULT_TIME_BUDGET_MIN

ui.header("Auto", "Workbench tries several models and training settings on your images, keeps the one that "
          "scores best on the validation images within your device's limits, tests it once on the held-out "
          "test images and packages it. It runs in a worker: close the tab whenever you like.")
items = ui.datasets_or_stop("Upload a dataset first.", "datasets.py", "Go to Datasets")
names = [d.name for d in items]
ds_name = st.selectbox("Dataset", names, index=len(names) - 1, key="auto_dataset")
ds = next(d for d in items if d.name == ds_name)

devices = [d["name"] for d in ui.cached_devices()]
c1, c2, c3 = st.columns(3)
device = c1.selectbox("Where the model will run", devices,
                      index=devices.index("this-machine") if "this-machine" in devices else 0, key="auto_device")
latency = c2.number_input("Slowest acceptable time per image (ms, 0 = no limit)", min_value=0.0, value=0.0,
                          step=10.0, key="auto_latency")
time_min = c3.slider("Time for the search (minutes)", 2, 120, DEFAULT_TIME_BUDGET_MIN, key="auto_time")
objective = "macro-f1"
if ds.num_classes == 2:
    find_all = st.toggle("Two classes: rank models by how many positives they find at 95 % specificity "
                         "(few false alarms) instead of the average F1 score", key="auto_sens")
    objective = "sensitivity@spec0.95" if find_all else "macro-f1"
with st.expander("More limits and settings"):
    e1, e2, e3 = st.columns(3)
    memory = e1.number_input("Memory limit (MB, 0 = none)", min_value=0.0, value=0.0, step=50.0, key="auto_mem")
    size = e2.number_input("Model file size limit (MB, 0 = none)", min_value=0.0, value=0.0, step=5.0,
                           key="auto_size")
    precision = e3.selectbox("Number format on the device", ["fp32", "fp16", "int8"], key="auto_precision",
                             help="fp32: full precision · fp16: half the size · int8: a quarter, slightly less "
                                  "accurate")
    f1, f2 = st.columns(2)
    max_trials = f1.number_input("Stop after this many trials (0 = only the time limit)", min_value=0, value=0,
                                 key="auto_trials")
    seed = f2.number_input("Seed", min_value=0, value=0, key="auto_seed")

if st.button("Start the search", type="primary", icon=":material/travel_explore:"):
    with ui.errors("Could not start the search"):
        started = searches.start_search(ds.id, device=device, latency_ms=latency or None, memory_mb=memory or None,
                                        size_mb=size or None, precision=precision, time_budget=float(time_min),
                                        objective=objective, seed=int(seed), max_trials=int(max_trials) or None)
        st.session_state["auto_search"] = started.id
        st.toast(f"Search {started.id} started")

st.divider()


@ui.live_fragment(2, "Could not read the search")
def search_panel() -> None:
    found = searches.list_searches(ds.id)
    if not found:
        st.caption("No searches on this dataset yet.")
        return
    ids = [s.id for s in found]
    wanted = st.session_state.get("auto_search")
    sid = st.selectbox("Search", ids, index=ids.index(wanted) if wanted in ids else 0, key="auto_pick",
                       format_func=lambda i: next(f"Search {s.id} · {s.status} · {s.device}" for s in found
                                                  if s.id == i))
    info = searches.get_search(int(sid))
    head, buttons = st.columns([5, 2])
    head.markdown(f"**Search {info.id}** · {ui.status_label(info.status)} · ranked by {info.objective_label}")
    if info.active and buttons.button("Stop", key=f"stop{info.id}", icon=":material/stop_circle:"):
        with ui.errors("Could not stop the search"):
            searches.cancel_search(info.id)
    elif info.resumable and buttons.button("Resume", key=f"resume{info.id}", icon=":material/play_circle:"):
        with ui.errors("Could not resume the search"):
            searches.resume_search(info.id)
    st.progress(min(1.0, info.spent_s / max(1.0, info.time_budget_s)), text=search_words.progress_line(info))
    if info.active and info.progress:
        st.caption(f"Now: {ui.progress_text(info.progress)}")
    if info.error:
        st.error(info.error)
    rows = pd.DataFrame(search_words.trial_rows(info))
    if not rows.empty:
        scored = rows.dropna(subset=["Validation score", "Speed on the device (ms per image)"])
        if not scored.empty:
            st.altair_chart(alt.Chart(scored).mark_circle(size=90).encode(
                x=alt.X("Speed on the device (ms per image):Q", title="Time per image on the device (ms)"),
                y=alt.Y("Validation score:Q", scale=alt.Scale(zero=False)),
                color=alt.Color("Role:N", title="", scale=alt.Scale(
                    domain=["winner", "finalist", "best for its speed", ""],
                    range=["#d62728", "#ff7f0e", "#1f77b4", "#bbbbbb"])),
                tooltip=["Trial", "Model", "State", "Validation score", "Speed on the device (ms per image)"],
            ).properties(height=260), width="stretch")
            st.caption("Each dot is a trial. Up is better on the validation images, left is faster on the device; "
                       "coloured dots are the best choice for their speed (the Pareto front).")
        shown = ui.plain_rows(search_words.trial_rows(info))
        for row, t in zip(shown, info.trials):  # the test split is small: its figures come with their range
            row["Test accuracy 95 % range"] = views.percent_range(*t.test_accuracy_range or (None, None)) or "—"
        st.dataframe(pd.DataFrame(shown), hide_index=True, width="stretch")
    if info.winner_run_id:
        _winner(info)


def _winner(info: searches.SearchInfo) -> None:
    w = next((t for t in info.trials if t.run_id == info.winner_run_id), None)
    if w is None:
        return
    summary = views.search_summary(info.summary)
    with st.container(border=True):
        st.markdown(f"### Winner: {w.model} (run {w.run_id})")
        m1, m2, m3 = st.columns(3)
        m1.metric("Test accuracy", views.value_with_range(w.test_accuracy, w.test_accuracy_range) or "—",
                  help="Share of the held-out test images it classified correctly (it never saw them); the range "
                       "is where the true figure lies with 95 % confidence, given how few test images there are.")
        m2.metric("Validation score", ui.fmt_num(w.value), help=info.objective_label)
        m3.metric("Time per image", ui.fmt_num(summary.winner_latency_ms, 1) + " ms",
                  help=summary.winner_latency_source)
        cmp = info.versus_start
        if cmp is not None:  # a small validation split can crown a challenger that is no better
            (st.info if cmp.within_noise else st.caption)(cmp.sentence())
        b1, b2 = st.columns(2)
        b1.page_link(str(ui.PAGES_DIR / "evaluate.py"), label="Evaluate the winner", icon=":material/analytics:",
                     query_params={"run": w.run_id})
        with b2:
            if info.bundle_artifact_id:
                ui.download_button(info.bundle_artifact_id, "Download the bundle",
                                   f"{info.dataset}-{w.model.replace('@', '-')}-bundle.zip", key=f"dl{info.id}")


search_panel()
