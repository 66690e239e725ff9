"""Home: what Workbench does and the five-step journey."""
from __future__ import annotations

import streamlit as st

from workbench import ui, views

ui.header("Workbench", "Transfer-learning AutoML for image classification — from a zip of labelled images "
          "to a verified ONNX model, in the browser.")

st.markdown(
    "Upload a zip of images sorted into one folder per class (or with a CSV of `path,label`). Workbench checks "
    "the data, recommends the EfficientNet variant that fits your hardware budget, fine-tunes it from ImageNet "
    "weights, evaluates it honestly on held-out images, compares variants, and hands back an ONNX bundle you "
    "can run anywhere with `onnxruntime`."
)

STEPS = [
    ("datasets.py", "1 · Upload your data", "A zip of class folders. Workbench finds duplicates, leakage and "
     "unreadable files and makes a train / val / test split."),
    ("recommend.py", "2 · Pick a model", "Give a latency budget and a target device; get a ranked list of "
     "EfficientNet variants with the margin each leaves."),
    ("train.py", "3 · Train", "Fine-tune one or several variants. Progress is live and survives closing the tab."),
    ("runs.py", "4 · Compare and evaluate", "Leaderboard, accuracy-vs-latency front, confusion matrix, "
     "calibration and Grad-CAM."),
    ("export.py", "5 · Export", "A verified zip with model.onnx, labels, preprocessing and a predict.py."),
]
cols = st.columns(len(STEPS))
for col, (page, title, text) in zip(cols, STEPS):
    with col, st.container(border=True):
        st.markdown(f"**{title}**")
        st.caption(text)
        st.page_link(str(ui.PAGES_DIR / page), label="Open", icon=":material/arrow_forward:")

st.divider()
s = ui.settings()
left, right = st.columns(2)
with left:
    st.markdown("**Where your work is kept**")
    st.markdown(f"Data dir: `{s.data_dir}`  \nDatabase: `{ui.masked_url(s.database_url)}`")
    st.caption("Everything lives there, not in the browser: refreshing or closing the tab loses nothing.")
with right, ui.errors("Could not read the database"):
    counts = views.overview_counts()
    c1, c2, c3 = st.columns(3)
    c1.metric("Datasets", counts.datasets)
    c2.metric("Runs", counts.runs)
    c3.metric("Running now", counts.active)
