"""Train: pick data, augmentation and variants, launch, and watch live progress."""
from __future__ import annotations

import altair as alt
import pandas as pd
import streamlit as st

from workbench import runs, suggestions, ui, views
from workbench.status import RunStatus
from workbench.summary import describe_worker_loss

ui.header("Train", "Fine-tune EfficientNet variants from ImageNet weights. Training runs in a worker process: "
          "close the tab whenever you like.")
items = ui.datasets_or_stop("Upload a dataset first.", "datasets.py", "Go to Datasets")
choices = views.train_choices()
CURVE_METRICS = ["macro_f1", "val_macro_f1", "accuracy", "val_accuracy", "loss", "train_loss", "val_loss"]

qp = st.query_params
names = [d.name for d in items]
ds_name = st.selectbox("Dataset", names, index=len(names) - 1, key="train_dataset")
ds = next(d for d in items if d.name == ds_name)
health = views.health_view(ds)
st.caption(f"{ds.num_images} images · {ds.num_classes} classes · "
           + " · ".join(f"{s} {n}" for s, n in health.split_totals.items()))

kinds = suggestions.image_kind_labels()
guessed = suggestions.guessed_image_kind(ds)
kind_names = list(kinds)
kind = st.selectbox("What are these images?", kind_names, key=f"train_kind_{ds.id}",
                    index=kind_names.index(guessed) if guessed in kinds else len(kind_names) - 1,
                    format_func=lambda k: kinds[k] + (" (our guess)" if k == guessed else ""),
                    help="Chooses the augmentation and the largest useful resolution. Change it if the guess "
                         "is wrong.")
advice = suggestions.training_suggestion(ds, kind)
if guessed and kind == guessed:
    st.caption(f"Guessed from the images: {health.image_kind.reason}.")
with st.expander("Why these settings"):
    for reason in advice.reasons:
        st.markdown(f"- {reason}")

c1, c2, c3 = st.columns(3)
default_variant = qp.get("variant") if qp.get("variant") in choices.variants else choices.default_variant
have_weights = {w["variant"]: w["available"] for w in ui.weights_table()}
variants = c1.multiselect("Variants (one run each)", choices.variants, default=[default_variant],
                          key="train_variants",
                          format_func=lambda v: v if have_weights.get(v, True) else f"{v} (no ImageNet weights here)")
want = str(qp.get("resolution", ""))
useful = [r for r in choices.resolutions if r <= advice.max_resolution] or [min(choices.resolutions)]
want_res = int(want) if want.isdigit() else min(choices.default_resolution, max(useful))
res_options = sorted({*useful, want_res})
resolution = c2.select_slider("Resolution (px)", res_options, value=want_res, key="train_resolution")
recipes = list(choices.recipes)
recipe = c3.selectbox("Recipe", recipes,
                      index=recipes.index(advice.recipe) if advice.recipe in recipes else 0,
                      key=f"train_recipe_{ds.id}",
                      help="quick: seconds to minutes · default: minutes · thorough: longer")

presets = list(choices.presets)
suggested = advice.preset
preset = st.radio("Augmentation preset", presets, horizontal=True, key=f"train_preset_{ds.id}_{kind}",
                  index=presets.index(suggested) if suggested in presets else 0,
                  help="medical: gentle, for scans (no colour changes) · microscopy: any orientation, no colour "
                       "changes (slides, cells, skin) · field: photos taken outdoors · none: resize and crop only")
with st.expander("Preview: what the network will see with this preset", expanded=True):
    with ui.errors("Could not make the preview"):
        sample = tuple(str(s.path) for s in views.dataset_sample(ds.id, ds.classes[:4], per_class=2))
        if sample:
            augmented = ui.augment_grid(sample, preset, min(int(resolution), 160), n=8)
            cols = st.columns(8)
            for i, v in enumerate(augmented):
                cols[i % 8].image(v, width="stretch")

c1, c2 = st.columns(2)
epochs = c1.number_input("Fine-tune epochs (0 = recipe default)", min_value=0, max_value=200, value=0, step=1,
                         key="train_epochs")
batch_label = c2.text_input("Label for this batch of runs (optional)", key="train_label")
if st.button("Launch training", type="primary", icon=":material/rocket_launch:", disabled=not variants):
    with ui.errors("Could not launch training"):
        ids = runs.queue_training(ds.id, variants, int(resolution), preset, recipe, int(epochs) or None,
                                  batch_label or None)
        st.toast(f"Queued {len(ids)} run(s): " + ", ".join(f"#{i}" for i in ids))

st.divider()
st.subheader("Progress")


@ui.live_fragment(2, "Could not read the training progress")
def progress_panel() -> None:
    views.reconcile_runs()
    live = views.live_runs(limit=6)
    if not live:
        st.caption("No runs yet.")
        return
    for lr in live:
        r = lr.run
        with st.container(border=True):
            head, buttons = st.columns([5, 2])
            head.markdown(f"**Run #{r.id}** · {r.dataset} · `{r.variant}@{r.resolution}` · "
                          f"{r.preset} · {ui.status_label(r.status)}")
            if r.status in runs.CANCELLABLE_RUN and not r.cancel_requested:
                if buttons.button("Cancel", key=f"cancel{r.id}", icon=":material/stop_circle:"):
                    with ui.errors("Could not cancel"):
                        runs.cancel_run(r.id)
                        st.toast(f"Cancelling run #{r.id}…")
            elif r.resumable:
                if buttons.button("Resume", key=f"resume{r.id}", icon=":material/play_circle:"):
                    with ui.errors("Could not resume"):
                        runs.resume_run(r.id)
                        st.toast(f"Resuming run #{r.id}…")
            if lr.active:
                text = ui.progress_text(r.progress or {}) + (f" · about {ui.fmt_seconds(lr.eta_s)} left"
                                                             if lr.eta_s is not None else "")
                st.progress(lr.fraction, text=text)
            elif r.status == RunStatus.FAILED:
                st.error(r.error or "Training stopped without saying why.")
            else:
                sm = lr.summary
                bits = []
                if sm.test_accuracy is not None:  # with its 95 % range: the test split is small
                    bits.append(f"test accuracy {sm.test_accuracy_text}")
                if sm.test_macro_f1 is not None:
                    bits.append(f"macro-F1 {sm.test_macro_f1:.2f}")
                if sm.latency_ms is not None:
                    bits.append(f"{sm.latency_ms:.0f} ms per image")
                st.caption(" · ".join(bits + [f"trained in {ui.fmt_seconds(r.train_seconds)}"]))
            for loss in lr.summary.worker_losses:  # workers that died under it, and who took over
                line = describe_worker_loss(loss)
                st.caption(f":material/sync_problem: {line[:1].upper()}{line[1:]}")
            curves = pd.DataFrame(views.run_curves([r.id]))
            if not curves.empty:
                sub = curves[curves["metric"].isin(CURVE_METRICS)]
                if not sub.empty:
                    st.altair_chart(alt.Chart(sub).mark_line(point=True).encode(
                        x="epoch:Q", y="value:Q", color="metric:N", strokeDash="phase:N",
                        tooltip=["metric", "phase", "epoch", "value"]).properties(height=160), width="stretch")
            if lr.events:
                st.caption(" · ".join(lr.events[:2]))


st.caption(ui.METRIC_HELP["macro_f1"])
progress_panel()
