"""Datasets: upload a zip (or CSV), watch the ingest, read the health report, delete."""
from __future__ import annotations

import altair as alt
import pandas as pd
import streamlit as st

from workbench import actions, dataset_fixes, datasets, ui, views
from workbench.status import JobStatus

ui.header("Datasets", "Upload labelled images, check their health, and see how they were split.")

# --- upload ---------------------------------------------------------------------------
with st.expander("Upload a dataset", expanded=False, icon=":material/upload:"):
    st.markdown(
        "A **zip** with one folder per class (`cats/img1.jpg`, `dogs/…`; optional `train/`, `val/`, `test/` "
        "folders above them), or a zip holding a **CSV** with columns `path,label[,split][,group]`. "
        "A CSV alone works for images already on this server."
    )
    st.caption(f"Up to {st.get_option('server.maxUploadSize')} MB through the browser (the server holds an "
               "upload in memory until it is saved). Bigger datasets: copy the folder into the import folder "
               "on the server and add it below, or run `workbench data add FOLDER --name NAME` there.")
    with st.form("upload", clear_on_submit=True):
        upload = st.file_uploader("Zip or CSV", type=["zip", "csv", "tsv"], key="upload_file")
        name = st.text_input("Dataset name", placeholder="e.g. beans-2026", key="upload_name")
        with st.expander("Options"):
            manifest = st.file_uploader("CSV manifest for the zip (optional)", type=["csv", "tsv"],
                                        key="upload_manifest")
            group_regex = st.text_input(
                "Group regex (optional)", placeholder=r"^(patient\d+)_",
                help="Images whose names share the captured group (e.g. one patient) stay in one split.")
            seed = st.number_input("Split seed", min_value=0, value=0, step=1)
        submitted = st.form_submit_button("Upload and check", type="primary", icon=":material/upload:")
    if submitted:
        if upload is None:
            st.error("Choose a zip or CSV file first.")
        else:
            with ui.errors("Could not start the upload"):
                actions.start_ingest(upload, upload.name, name or upload.name.rsplit(".", 1)[0],
                                   csv_upload=manifest, group_regex=group_regex, seed=int(seed))
                st.toast(f"Checking {upload.name}… you can leave this page; the work continues.")


with st.expander("Add a folder already on this server", expanded=False, icon=":material/folder_open:"):
    choices = views.import_choices()
    st.caption(f"Folders, zips and CSV manifests in `{choices.folder}` (set `WORKBENCH_IMPORT_DIR` to use "
               "another). They are read where they are: nothing is copied through the browser.")
    if not choices.entries:
        st.info("The import folder is empty or does not exist yet.", icon=":material/info:")
    else:
        with st.form("import", clear_on_submit=True):
            entry = st.selectbox("Folder or file", choices.entries, key="import_entry")
            import_name = st.text_input("Dataset name (default: the folder's name)", key="import_name")
            if st.form_submit_button("Add and check", type="primary", icon=":material/playlist_add:"):
                with ui.errors("Could not start the import"):
                    actions.start_import(entry, import_name)
                    st.toast(f"Checking {entry}… you can leave this page; the work continues.")


@ui.live_fragment(1, "Could not read the ingest jobs")
def ingest_progress() -> None:
    dismissed = st.session_state.setdefault("dismissed_jobs", set())
    jobs = views.ingest_jobs_to_show(dismissed)
    for j in jobs:
        label = f"**{j.name}** ({j.filename})"
        if j.active:
            frac = j.done / j.total if j.total else 0.0
            st.progress(frac, text=f"{label}: {j.phase or j.status} — {j.done} / {j.total or '?'} files")
            continue
        c1, c2 = st.columns([6, 1])
        if j.status == JobStatus.SUCCEEDED:
            c1.success(f"{label}: ingested {j.done} images.", icon=":material/check_circle:")
        else:
            c1.error(f"{label}: {j.error or 'it stopped without saying why'}")
        if c2.button("Dismiss", key=f"dismiss{j.id}"):
            dismissed.add(j.id)
            st.rerun()
    if any(j.active for j in jobs):
        st.session_state["_ingest_was_running"] = True
    elif st.session_state.pop("_ingest_was_running", False):
        st.rerun()  # an ingest just finished: refresh the list below


ingest_progress()

# --- list -----------------------------------------------------------------------------
items = ui.datasets_or_stop("No datasets yet: upload a zip above.")

st.subheader("Your datasets")
st.dataframe(
    pd.DataFrame([{"name": d.name, "images": d.num_images, "classes": d.num_classes,
                   "warnings": len(views.health_view(d).warnings), "created": d.created_at,
                   "source": d.source.rsplit("/", 1)[-1]} for d in items]),
    hide_index=True, width="stretch",
)
names = [d.name for d in items]
# Follow the newest upload (and a version a fix just made): show a dataset this session has not seen.
newest = max(items, key=lambda d: d.id)
if st.session_state.get("_show_dataset") in names:
    st.session_state["dataset_choice"] = st.session_state.pop("_show_dataset")
    st.session_state["_newest_dataset_seen"] = newest.id
elif st.session_state.get("_newest_dataset_seen") != newest.id:
    st.session_state["_newest_dataset_seen"] = newest.id
    st.session_state["dataset_choice"] = newest.name
choice = st.selectbox("Dataset", names, index=names.index(newest.name), key="dataset_choice")
ds = next(d for d in items if d.name == choice)
h = views.health_view(ds)
dups = h.duplicates

c = st.columns(5)
c[0].metric("Images", ds.num_images)
c[1].metric("Classes", ds.num_classes)
c[2].metric("Imbalance", f"{h.imbalance_ratio:.1f}×",
            help="How many times more images the largest class has than the smallest (1× = balanced).")
c[3].metric("Duplicate groups", dups.total_groups,
            help="Sets of images that are the same picture: identical files, or copies resized or re-saved.")
c[4].metric("Skipped files", len(ds.skipped), help="Files that could not be read as images.")
if h.image_kind.kind:
    st.caption(f"These look like: **{h.image_kind.label}** ({h.image_kind.reason}). You can change this on the "
               "Train page; it chooses the augmentation and resolution.")
for w in h.warnings:
    st.warning(w, icon=":material/warning:")
if not h.warnings:
    st.success("No problems found.", icon=":material/check_circle:")

tab_split, tab_dups, tab_shortcuts, tab_fix, tab_samples, tab_sizes, tab_skipped, tab_delete = st.tabs(
    ["Classes & splits", "Duplicates & leakage", "Per class", "Fix & versions", "Samples", "Sizes & colour",
     "Skipped", "Delete"])

with tab_split:
    rows = [{"class": cls, "split": split, "images": n}
            for split, counts in h.split_counts.items() for cls, n in counts.items()]
    if rows:
        df = pd.DataFrame(rows)
        st.altair_chart(
            alt.Chart(df).mark_bar().encode(
                x=alt.X("images:Q", title="images"), y=alt.Y("class:N", sort="-x", title=None),
                color=alt.Color("split:N", sort=["train", "val", "test"]),
                tooltip=["class", "split", "images"]),
            width="stretch")
        table = df.pivot_table(index="class", columns="split", values="images", fill_value=0)
        table = table.reindex(columns=[s for s in ("train", "val", "test") if s in table.columns])
        table["total"] = table.sum(axis=1)
        st.dataframe(table, width="stretch")
    cfg = ds.split_config or {}
    if cfg:
        with st.expander("How the split was made (details)"):
            st.json(cfg, expanded=False)

with tab_dups:
    groups = dups.groups
    if not groups:
        st.success("No exact or near-duplicate images.")
    else:
        checked = (" and confirmed pixel by pixel (similarity at least "
                   f"{dups.near_min_correlation:.0%})") if dups.pixel_checked else ""
        st.caption(f"{dups.exact_groups} groups of identical files and {dups.near_groups} groups "
                   f"of near copies (found by a picture fingerprint{checked}). Groups that span train, val and "
                   "test (leakage: the test score would be too good) and groups with different labels come first.")
        offset, limit = ui.paginate(len(groups), 10, key="dup_page")
        page = groups[offset:offset + limit]
        paths = views.store_paths_for(ds.id, [f.sha256 for g in page for f in g.files[:6]])
        for g in page:
            flags = (" · **leakage across splits**" if g.cross_split else "") + \
                    (" · **conflicting labels**" if g.label_conflict else "")
            what = "Identical files" if g.kind == "exact" else "Near copies"
            st.markdown(f"{what} · {g.size} files · in {', '.join(g.splits)}{flags}")
            ui.thumbnail_grid([views.ImageSample(paths[f.sha256], f.caption) for f in g.files[:6] if f.sha256 in paths],
                              columns=6, size=110)

with tab_shortcuts:
    sc = h.shortcuts
    if sc.per_class:
        st.caption("What each class's images look like. If one of these alone tells the classes apart, a model "
                   "may learn it instead of what matters (a shortcut); the warnings above say so.")
        st.dataframe(pd.DataFrame([{
            "class": r.label, "images": r.images, "typical width (px)": r.median_width,
            "typical height (px)": r.median_height, "width / height": r.median_aspect,
            "brightness (0-255)": ui.fmt_num(r.median_brightness, 0),
            "colourfulness (0-255)": ui.fmt_num(r.median_saturation, 0),
            "file formats": ", ".join(f"{k} {v}" for k, v in r.formats.items())} for r in sc.per_class]),
            hide_index=True, width="stretch")
    if sc.factors:
        with st.expander("How well each detail alone predicts the class (details)"):
            st.dataframe(pd.DataFrame([{"detail": f.label, "correct from this alone": f"{f.accuracy:.0%}",
                                        "warning": "yes" if f.warn else "no"} for f in sc.factors]),
                         hide_index=True, width="stretch")
            st.caption(f"Always guessing the largest class: {sc.baseline:.0%} correct. Each detail is "
                       f"checked with a small decision tree and {sc.folds}-fold cross-validation.")
    elif sc.reason:
        st.caption(f"Not checked: {sc.reason}.")


def fixed(result: dataset_fixes.FixResult) -> None:
    """After a fix: say what was created and show the new version."""
    st.session_state["_show_dataset"] = result.dataset.name
    st.session_state["_fix_message"] = result.sentence
    st.rerun()


with tab_fix:
    st.caption("Each fix creates a new version of the dataset; this version stays as it is, and runs "
               "trained on it keep using it.")
    if msg := st.session_state.pop("_fix_message", None):
        st.success(msg, icon=":material/check_circle:")
    with ui.errors("Could not read the version history"):
        for v in dataset_fixes.version_history(ds.id):
            by = f" · by {v.created_by}" if v.created_by else ""
            st.markdown(f"- {'**' if v.dataset_id == ds.id else ''}{v.sentence}"
                        f"{'** (shown)' if v.dataset_id == ds.id else ''} · {v.created_at:%Y-%m-%d %H:%M}{by}")
    by_page = "the web page"
    left, right = st.columns(2)
    with left:
        st.markdown("**Duplicate images**")
        st.caption(f"{dups.exact_groups} group(s) of identical files; one image of each is kept "
                   "(the one in train if any).")
        if st.button("Remove duplicate copies", icon=":material/filter_none:", key="fix_duplicates",
                     disabled=not dups.exact_groups):
            with ui.errors("Could not remove the duplicates"):
                fixed(dataset_fixes.drop_exact_duplicates(ds.id, by=by_page))
    with right:
        leaking = dups.leaking_groups
        st.markdown("**Leakage between splits**")
        st.caption(f"{leaking} group(s) of identical or near-identical images sit in more than one split.")
        mode = st.radio("How", list(dataset_fixes.LEAKAGE_MODES), key="fix_leak_mode", horizontal=True,
                        format_func=dataset_fixes.LEAKAGE_MODES.__getitem__)
        if st.button("Resolve leakage", icon=":material/call_split:", key="fix_leakage", disabled=not leaking):
            with ui.errors("Could not resolve the leakage"):
                fixed(dataset_fixes.resolve_leakage(ds.id, mode, by=by_page))
    with st.form("fix_exclude"):
        files = st.text_area("Leave out these images (one file name per line, as in the duplicates tab)",
                             key="fix_exclude_files")
        if st.form_submit_button("Exclude images", icon=":material/hide_image:"):
            with ui.errors("Could not exclude the images"):
                fixed(dataset_fixes.exclude_files(ds.id, files.splitlines(), by=by_page))
    with st.form("fix_relabel"):
        c1, c2 = st.columns(2)
        file = c1.text_input("Image to relabel (file name)", key="fix_relabel_file")
        label = c2.selectbox("New label", ds.classes, key="fix_relabel_label")
        if st.form_submit_button("Relabel", icon=":material/label:"):
            with ui.errors("Could not relabel the image"):
                fixed(dataset_fixes.relabel_file(ds.id, file, str(label), by=by_page))
    st.markdown("**Split again by patient or field**")
    suggestions: list = []
    with ui.errors("Could not suggest group patterns"):
        suggestions = dataset_fixes.group_pattern_suggestions(ds.id)
        if suggestions:
            st.dataframe(pd.DataFrame([{"pattern": s.pattern, "takes": s.description, "groups": s.groups,
                                        "file names matched": s.matched, "e.g.": ", ".join(s.examples)}
                                       for s in suggestions]), hide_index=True, width="stretch")
        else:
            st.caption("No simple pattern in the file names splits them into groups; type your own.")
    with st.form("fix_regroup"):
        pattern = st.text_input("Group pattern (a regular expression; the part in ( ) names the patient or field)",
                                value=suggestions[0].pattern if suggestions else "", key="fix_pattern")
        seed = st.number_input("Split seed", min_value=0, value=0, step=1, key="fix_seed")
        if st.form_submit_button("Split again by group", icon=":material/group_work:"):
            with ui.errors("Could not split the dataset again"):
                fixed(dataset_fixes.resplit_by_group(ds.id, pattern, seed=int(seed), by=by_page))

with tab_samples:
    per_class = st.slider("Images per class", 2, 12, 6)
    ui.thumbnail_grid(views.dataset_sample(ds.id, ds.classes[:30], per_class), columns=6, size=120)
    if len(ds.classes) > 30:
        st.caption(f"Showing the first 30 of {len(ds.classes)} classes.")

with tab_sizes:
    sizes = h.sizes
    if sizes.spreads:
        cols_ = {"p0": "smallest", "p5": "5 %", "p25": "25 %", "p50": "middle", "p75": "75 %", "p95": "95 %",
                 "p100": "largest"}
        table_ = pd.DataFrame(sizes.spreads).T.rename(columns=cols_)
        st.dataframe(table_.round(2), width="stretch")
        st.caption("Columns: the size below which that share of the images falls (middle = half of them).")
        st.caption(f"{sizes.smaller_than_input} images are smaller than {sizes.input_size} px "
                   "on their short side.")
    if h.modes:
        st.altair_chart(alt.Chart(pd.DataFrame({"mode": list(h.modes), "images": list(h.modes.values())}))
                        .mark_bar().encode(x="images:Q", y=alt.Y("mode:N", title="colour mode")), width="stretch")
        st.caption("Colour modes: RGB = colour, L = grayscale, RGBA = colour with transparency, DICOM = scanner file.")

with tab_skipped:
    if ds.skipped:
        st.dataframe(pd.DataFrame(ds.skipped[:1000]), hide_index=True, width="stretch")
    else:
        st.caption("No files were skipped.")

with tab_delete:
    st.markdown(f"Delete **{ds.name}**, its runs, and the stored images no other dataset uses.")
    sure = st.checkbox(f"Yes, delete {ds.name}", key=f"sure{ds.id}")
    if st.button("Delete dataset", type="primary", disabled=not sure, icon=":material/delete:"):
        with ui.errors("Could not delete the dataset"):
            res = datasets.delete_dataset(ds.id)
            st.toast(f"Deleted {res.name}: {res.images} images, {res.files_removed} files removed.")
            st.rerun()
