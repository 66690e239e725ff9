"""Recommend: which EfficientNet fits a latency / memory / size budget on a target device."""
from __future__ import annotations

import altair as alt
import pandas as pd
import streamlit as st

from workbench import actions, datasets, ui, views
from workbench.recommend import THIS_MACHINE
from workbench.status import JobStatus

ui.header("Recommend", "Say where the model will run and what it may cost; get the most accurate variant that fits.")

try:
    devices = {d["name"]: d for d in ui.cached_devices()}
except Exception as exc:  # noqa: BLE001
    ui.show_error("Could not load the device profiles", exc)
    st.stop()
ds_items = []
with ui.errors("Could not list datasets"):
    ds_items = datasets.list_datasets()

with st.form("budget"):
    c1, c2 = st.columns([1, 2])
    device = c1.selectbox("Target device", list(devices), key="rec_device",
                          format_func=lambda n: f"{n} ({devices[n]['kind']})")
    c2.caption(devices[device]["description"] if device in devices else "")
    c = st.columns(4)
    latency = c[0].number_input("Typical time per image (ms, 0 = no limit)", min_value=0.0, value=20.0, step=1.0,
                                key="rec_latency", help=ui.METRIC_HELP["latency_p50"])
    p95 = c[1].number_input("Slow-case time per image (ms, 0 = no limit)", min_value=0.0, value=0.0, step=1.0,
                            key="rec_p95", help=ui.METRIC_HELP["latency_p95"])
    memory = c[2].number_input("Memory (MB, 0 = no limit)", min_value=0.0, value=0.0, step=64.0, key="rec_memory")
    size = c[3].number_input("File size (MB, 0 = no limit)", min_value=0.0, value=0.0, step=1.0, key="rec_size")
    c = st.columns(4)
    precision = c[0].selectbox("Precision", ["fp32", "fp16", "int8"], key="rec_precision")
    params = c[1].number_input("Max parameters (M, 0 = no limit)", min_value=0.0, value=0.0, step=1.0,
                               key="rec_params")
    min_res = c[2].number_input("Min resolution (px, 0 = any)", min_value=0, value=0, step=16, key="rec_minres")
    ds_name = c[3].selectbox("For dataset (optional)", [None] + [d.name for d in ds_items], key="rec_dataset",
                             help="Uses its number of classes and training images: small data favours small models.")
    st.form_submit_button("Recommend", type="primary", icon=":material/recommend:")

budget = views.recommend_budget(
    device=device, latency_ms=latency, latency_p95_ms=p95, memory_mb=memory, size_mb=size, precision=precision,
    max_params_m=params, min_resolution=int(min_res), dataset=next((d for d in ds_items if d.name == ds_name), None))


@ui.live_fragment(1, "Could not read the measurement")
def measure_status() -> None:
    job_id = st.session_state.get("measure_job")
    j = views.job(job_id) if job_id else None
    if j is None:
        return
    if j.active:
        waiting = "queued: starts when the training lane is free (timings taken during a training would be off)"
        st.progress(j.fraction, text=f"Measuring on this machine: {j.phase or waiting}")
    elif j.status == JobStatus.FAILED:
        st.error(f"The measurement failed: {j.error}")
    else:
        if st.session_state.get("measure_applied") != job_id:  # new figures: rank again with them
            st.session_state["measure_applied"] = job_id
            ui.cached_recommendation.clear()
            st.rerun()
        st.success(f"Measured on this machine: {', '.join(j.measured) or 'nothing new'}. Rows whose latency "
                   "comes from 'measured' use these figures; the others use a fit to all measurements.")


if device == THIS_MACHINE:
    m1, m2 = st.columns([1, 3])
    if m1.button("Measure on this machine", icon=":material/speed:", key="rec_measure"):
        with ui.errors("Could not start the measurement"):
            st.session_state["measure_job"] = actions.start_measure(budget)
    m2.caption("Runs ONNX Runtime here, in the background, on a fixed calibration set and on the candidates "
               "that decide the answer (about a minute the first time; figures are cached). It waits for any "
               "training to finish first, so the timings are not distorted.")
    if st.session_state.get("measure_job"):
        measure_status()

try:
    rec = ui.cached_recommendation(budget)
except Exception as exc:  # noqa: BLE001 - BudgetError etc. carry readable messages
    ui.show_error("Could not make a recommendation", exc)
    st.stop()

best = rec.get("recommended")
if best:
    with st.container(border=True):
        st.markdown(f"### Recommended: `{best['key']}`")
        st.markdown(ui.plain_sentence(rec["reason"]))
        c = st.columns(5)
        c[0].metric("Benchmark accuracy", f"{best['prior_top1']:.0f} %", help=ui.METRIC_HELP["top1_prior"])
        c[1].metric("Typical time per image", f"{best['latency_p50_ms']:.0f} ms" if best["latency_p50_ms"] >= 10
                    else f"{best['latency_p50_ms']:.1f} ms", help=ui.METRIC_HELP["latency_p50"])
        c[2].metric("Model file", f"{best['file_mb']:.0f} MB" if best["file_mb"] >= 10 else f"{best['file_mb']:.1f} MB")
        c[3].metric("Memory", f"{best['memory_mb']:.0f} MB")
        c[4].metric("Parameters", f"{best['params'] / 1e6:.1f} million", help=ui.METRIC_HELP["params"])
        if best.get("base"):
            st.page_link(str(ui.PAGES_DIR / "train.py"), label=f"Train {best['key']}", icon=":material/model_training:",
                         query_params={"variant": best["base"], "resolution": best["resolution"]})
else:
    st.error(f"Nothing fits this budget. {ui.plain_sentence(rec.get('message', ''))}")
for note in rec.get("notes", []):
    st.caption(f"ℹ️ {ui.plain_sentence(note)}")


def table(cands: list[dict]) -> pd.DataFrame:
    rows = []
    for cnd in cands:
        row = {"model": cnd["key"], "benchmark accuracy %": cnd["prior_top1"],
               "typical time per image (ms)": cnd["latency_p50_ms"],
               "slow-case time per image (ms)": cnd["latency_p95_ms"], "model file (MB)": cnd["file_mb"],
               "memory (MB)": cnd["memory_mb"], "parameters (millions)": cnd["params"] / 1e6,
               "GMACs": cnd["gmacs"], "pretrained weights here": "yes" if cnd["weights_available"] else "no",
               "times from": cnd["latency_source"]}
        for ch in cnd["checks"]:
            row[f"room left: {ui.field_label(ch['name']).lower()} (%)"] = ch["margin_pct"]
        if cnd.get("broken"):
            row["why excluded"] = "; ".join(
                f"{ui.field_label(ch['name']).lower()} {ch['value']:.3g} {ch['unit']} (limit {ch['limit']:.3g})"
                for ch in cnd["checks"] if not ch["ok"])
        rows.append(row)
    return pd.DataFrame(rows).fillna("—")


fmt = {k: st.column_config.NumberColumn(format="%.1f") for k in
       ("typical time per image (ms)", "slow-case time per image (ms)", "model file (MB)", "memory (MB)",
        "parameters (millions)", "GMACs", "benchmark accuracy %")}
st.caption(" · ".join(ui.METRIC_HELP[k] for k in ("top1_prior", "gmacs")))
st.subheader(f"Fits the budget ({len(rec['ranked'])})")
if rec["ranked"]:
    st.dataframe(table(rec["ranked"]), hide_index=True, width="stretch", column_config=fmt)
st.subheader(f"Excluded ({len(rec['excluded'])})")
if rec["excluded"]:
    st.dataframe(table(rec["excluded"]), hide_index=True, width="stretch", column_config=fmt)

st.subheader("Accuracy prior vs latency")
pts = pd.DataFrame(
    [{"model": x["key"], "latency ms": round(x["latency_p50_ms"], 1), "top-1 prior %": round(x["prior_top1"], 1),
      "status": "recommended" if best and x["key"] == best["key"] else "fits"} for x in rec["ranked"]]
    + [{"model": x["key"], "latency ms": round(x["latency_p50_ms"], 1), "top-1 prior %": round(x["prior_top1"], 1),
        "status": "excluded"} for x in rec["excluded"]])
if not pts.empty:
    chart = alt.Chart(pts).mark_circle(size=110).encode(
        x=alt.X("latency ms:Q", scale=alt.Scale(type="log"), title="typical time per image (ms, log scale)"),
        y=alt.Y("top-1 prior %:Q", scale=alt.Scale(zero=False), title="benchmark accuracy (%)"),
        color=alt.Color("status:N", scale=alt.Scale(domain=["recommended", "fits", "excluded"],
                                                    range=["#d62728", "#2e7d5b", "#bdbdbd"])),
        tooltip=["model", "latency ms", "top-1 prior %", "status"])
    if budget["latency_ms"]:
        rule = alt.Chart(pd.DataFrame({"budget": [budget["latency_ms"]]})).mark_rule(
            color="#d62728", strokeDash=[6, 4], size=2).encode(x="budget:Q")
        chart = chart + rule
    st.altair_chart(chart, width="stretch")
    st.caption("Dashed line: your time limit. Times are predictions for the chosen device"
               + (" (backed by measurements where shown as 'measured')." if device == THIS_MACHINE else "."))
