"""Home: what Workbench does and the five-step journey."""
from __future__ import annotations

import streamlit as st

from workbench import ui, views

ui.header("Workbench", "Teach a computer to sort your images — X-rays, slides, leaf photos — from a zip of "
          "examples you have already labelled, in the browser.")

st.markdown(
    "Upload a zip of images sorted into one folder per class (or with a CSV of `path,label`). Workbench checks "
    "the images for problems, suggests a model that is fast enough for your computer, trains it on your "
    "examples, tests it honestly on images it never saw, and gives you a file you can use anywhere."
)
with st.expander("For the technically minded"):
    st.markdown("Transfer learning: EfficientNet models pretrained on ImageNet are fine-tuned on your data; the "
                "result is exported to ONNX, verified against PyTorch, and bundled with a `predict.py` for "
                "`onnxruntime`.")

STEPS = [
    ("datasets.py", "1 · Upload your data", "A zip of class folders. Workbench finds copies, images shared "
     "between training and testing, unreadable files and other problems, and sets images aside for testing."),
    ("recommend.py", "2 · Pick a model", "Say how fast it must answer and on which computer; get the models "
     "that fit, best first."),
    ("train.py", "3 · Train", "Train one or several models. Progress is live and survives closing the tab."),
    ("runs.py", "4 · Compare and evaluate", "Which model scores best, which classes it mixes up, and where in "
     "the image it looked."),
    ("export.py", "5 · Export", "A checked zip with the model, the class names and a ready-made script."),
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
