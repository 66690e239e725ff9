"""Ingest on real datasets (read-only, zipped into tmp dirs) and the dataset service."""
from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
from conftest import png_bytes, zip_folder
from sqlalchemy import select, text

from core.ingest import IngestError, ingest
from storage.db import get_sessionmaker
from storage.models import Dataset, Image
from workbench import datasets as svc
from workbench.settings import get_settings


def _store_files(data_dir: Path) -> set[Path]:
    return {p for p in (data_dir / "store").rglob("*") if p.is_file()}


def test_full_rice_leaf_ph_folder(shared_datasets: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    r = ingest(shared_datasets / "rice_leaf_ph", data)
    assert len(r.images) == 276
    assert r.classes == ["bacterial_leaf_blight", "blast", "brown_spot"]
    dups = r.health["duplicates"]
    assert dups["exact_groups"] == 17 and dups["exact_redundant_files"] == 21
    assert dups["exact_cross_split_groups"] == 0  # duplicates kept inside one split
    assert r.health["color"]["alpha"] == 12 and r.health["modes"]["RGBA"] == 12
    skipped = {s.path: s.reason for s in r.skipped}
    assert skipped["_quarantine/brownspot_orig_007"] == "not an image (unrecognised file content)"
    assert r.health["empty_class_folders"] == ["_quarantine"]
    # Content-addressed store: one file per distinct image, all inside data/store.
    assert len(_store_files(data)) == 276 - 21 == len(r.new_files)
    for rec in r.images:
        assert rec.store_path.startswith(f"store/{rec.sha256[:2]}/{rec.sha256}")
        assert (data / rec.store_path).is_file()
    assert list((data / "tmp").iterdir()) == []  # no temp leftovers
    assert any("exact duplicates" in w for w in r.health["warnings"])


def test_hymenoptera_zip_gif_skipped_and_user_split(shared_datasets: Path, tmp_path: Path) -> None:
    z = zip_folder(shared_datasets / "hymenoptera", tmp_path / "hym.zip", prefix="hymenoptera/",
                   limit_per_dir=25)
    r = ingest(z, tmp_path / "data")
    assert {s.path: s.reason for s in r.skipped}["hymenoptera/_quarantine/imageNotFound.gif"] == (
        "GIF images are not supported (convert to PNG)")
    assert r.split_config["mode"] == "user+carved" and r.split_config["carved_from_train"] == ["test"]
    for rec in r.images:
        folder = rec.original_name.split("/")[1]
        if folder == "val":
            assert rec.split == "val"
        else:
            assert rec.split in ("train", "test")
    assert r.split_config["counts"]["test"] > 0


def test_beans_user_split_train_test_respected(shared_datasets: Path, tmp_path: Path) -> None:
    z = zip_folder(shared_datasets / "beans", tmp_path / "beans.zip", limit_per_dir=30)
    r = ingest(z, tmp_path / "data", seed=3)
    assert r.split_config["carved_from_train"] == ["val"]
    for rec in r.images:
        if rec.original_name.startswith("test/"):
            assert rec.split == "test"
        else:
            assert rec.split in ("train", "val")
    counts = r.health["split_counts"]
    assert all(counts["val"][c] > 0 for c in r.classes)  # val carved stratified
    assert sum(counts["test"].values()) == 90


def test_mednist_grayscale_recorded(shared_datasets: Path, tmp_path: Path) -> None:
    src = shared_datasets / "mednist_3k"
    z = zip_folder(src, tmp_path / "m.zip", limit_per_dir=20, include=lambda p: p.suffix == ".jpeg")
    r = ingest(z, tmp_path / "data")
    assert len(r.images) == 120 and r.health["modes"] == {"L": 120}
    assert r.health["color"]["grayscale"] == 120
    assert r.health["sizes"]["share_smaller_than_input"] == 1.0


def test_service_add_list_report_delete_shared_files(shared_datasets: Path, data_dir: Path, tmp_path: Path) -> None:
    z = zip_folder(shared_datasets / "rice_leaf_ph", tmp_path / "rice.zip", limit_per_dir=30)
    info = svc.add_dataset(z, "rice")
    assert info.num_classes == 3 and info.classes == sorted(info.classes)
    with pytest.raises(svc.DatasetError, match="already exists"):
        svc.add_dataset(z, "rice")
    # A second dataset sharing some files (the same images in a folder subset).
    z2 = zip_folder(shared_datasets / "rice_leaf_ph", tmp_path / "rice2.zip", limit_per_dir=10)
    info2 = svc.add_dataset(z2, "rice-small")
    assert [d.name for d in svc.list_datasets()] == ["rice", "rice-small"]
    rep = svc.dataset_report("rice")
    assert rep["health"]["num_images"] == info.num_images and rep["skipped"]
    imgs = svc.dataset_images("rice-small", "train")
    assert imgs and all(i.path.is_file() and i.split == "train" for i in imgs)
    assert all(info2.classes[i.class_index] == i.label for i in imgs)

    before = _store_files(data_dir)
    res = svc.delete_dataset("rice")
    after = _store_files(data_dir)
    shared = {data_dir / i.store_path for i in _rows(data_dir, "rice-small")}
    assert shared <= after  # files still used by rice-small survive
    assert res.files_removed == len(before - after) > 0
    with pytest.raises(svc.DatasetError, match="no dataset named 'rice'"):
        svc.get_dataset("rice")
    svc.delete_dataset(str(info2.id))
    assert _store_files(data_dir) == set()


def _rows(data_dir: Path, name: str) -> list[Image]:
    sm = get_sessionmaker(get_settings().database_url)
    with sm() as s:
        ds = s.scalars(select(Dataset).where(Dataset.name == name)).one()
        return list(s.scalars(select(Image).where(Image.dataset_id == ds.id)))


def test_db_failure_after_storing_removes_only_new_files(data_dir: Path, make_zip) -> None:  # type: ignore[no-untyped-def]
    first = make_zip({"a/1.png": png_bytes(pattern=1), "b/2.png": png_bytes(pattern=2)})
    svc.add_dataset(first, "first")
    existing = _store_files(data_dir)
    sm = get_sessionmaker(get_settings().database_url)
    with sm.begin() as s:  # a real SQLite failure on the image insert
        s.execute(text("CREATE TRIGGER boom BEFORE INSERT ON images BEGIN SELECT RAISE(ABORT, 'disk says no'); END"))
    second = make_zip({"a/1.png": png_bytes(pattern=1), "b/3.png": png_bytes(pattern=3),
                       "b/4.png": png_bytes(pattern=4)})
    with pytest.raises(Exception, match="disk says no"):
        svc.add_dataset(second, "second")
    assert _store_files(data_dir) == existing  # new files gone, shared file kept
    assert [d.name for d in svc.list_datasets()] == ["first"]


def test_csv_manifest_with_groups_and_missing_files(tmp_path: Path) -> None:
    root = tmp_path / "src"
    (root / "imgs").mkdir(parents=True)
    lines = ["path,label,group"]
    for i in range(24):
        (root / "imgs" / f"{i}.png").write_bytes(png_bytes(pattern=i + 1, color=(i * 9, 50, 90)))
        lines.append(f"imgs/{i}.png,{'sick' if i % 2 else 'healthy'},patient{i // 4}")
    lines.append("imgs/ghost.png,sick,patient9")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    r = ingest(root, tmp_path / "data")
    assert len(r.images) == 24 and r.classes == ["healthy", "sick"]
    assert r.health["missing_from_csv"] == ["imgs/ghost.png"]
    assert {"path": "imgs/ghost.png", "reason": "listed in the CSV manifest but not found"} in [
        s.as_dict() for s in r.skipped]
    by_group: dict[str, set[str]] = {}
    for rec in r.images:
        by_group.setdefault(rec.group or "", set()).add(rec.split)
    assert len(by_group) == 6 and all(len(s) == 1 for s in by_group.values())
    # The same manifest passed explicitly from outside the folder (csv=).
    ext = tmp_path / "elsewhere.csv"
    ext.write_text("\n".join(lines[:-1]) + "\n")
    assert len(ingest(root, tmp_path / "data2", csv=ext).images) == 24


def test_group_regex_keeps_groups_in_one_split(make_zip, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    files = {f"{'ab'[i % 2]}/patient{i // 6}_slice{i}.png": png_bytes(pattern=i + 1, color=(i * 5, 9, 9))
             for i in range(60)}
    r = ingest(make_zip(files), tmp_path / "data", group_regex=r"^(patient\d+)_", seed=1)
    groups: dict[str, set[str]] = {}
    for rec in r.images:
        groups.setdefault(str(rec.group), set()).add(rec.split)
    assert len(groups) == 10 and all(len(s) == 1 for s in groups.values())
    assert r.split_config["grouping"]["num_groups"] == 10
    with pytest.raises(IngestError, match="needs a capture group"):
        ingest(make_zip(files), tmp_path / "data", group_regex=r"patient\d+")
    with pytest.raises(IngestError, match="invalid group regex"):
        ingest(make_zip(files), tmp_path / "data", group_regex=r"(unclosed")


def test_unicode_spaces_empty_folder_and_csv_in_zip(make_zip, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    files = {
        "données/chat noir/é 1.png": png_bytes(pattern=1),
        "données/chat noir/日本 2.png": png_bytes(pattern=2),
        "données/chien/3.png": png_bytes(pattern=3),
        "données/chien/4.png": png_bytes(pattern=4),
        "données/vide/": b"",
    }
    r = ingest(make_zip(files), tmp_path / "data")
    assert r.classes == ["chat noir", "chien"] and len(r.images) == 4
    assert r.health["empty_class_folders"] == ["données/vide"]
    assert any("no usable images" in w for w in r.health["warnings"])

    tsv = "path\tlabel\tsplit\n" + "".join(
        f"x/{i}.png\t{'ab'[i % 2]}\t{'train' if i < 6 else 'test'}\n" for i in range(8))
    files = {f"set/x/{i}.png": png_bytes(pattern=i + 1) for i in range(8)}
    files["set/manifest.tsv"] = tsv.encode()
    r = ingest(make_zip(files), tmp_path / "data")
    assert r.split_config["mode"] == "user+carved"
    assert {rec.original_name: rec.split for rec in r.images}["set/x/7.png"] == "test"


def test_splits_are_seeded(make_zip, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    z = make_zip({f"{'abc'[i % 3]}/{i}.png": png_bytes(pattern=i + 1, color=(i, 2 * i, 7)) for i in range(90)})
    s1 = [x.split for x in ingest(z, tmp_path / "d1", seed=7).images]
    s2 = [x.split for x in ingest(z, tmp_path / "d2", seed=7).images]
    s3 = [x.split for x in ingest(z, tmp_path / "d3", seed=8).images]
    assert s1 == s2 and s1 != s3
    zf = zipfile.ZipFile(z)
    assert len(zf.namelist()) == 90


# --- names: control and bidi characters ------------------------------------------------

@pytest.mark.parametrize("name, kind", [
    ("bell\x07set", "control characters (U+0007)"),
    ("two\nlines", "control characters (U+000A)"),
    ("tab\there", "control characters (U+0009)"),
    ("esc\x1b[31mred", "control characters (U+001B)"),
    ("del\x7fete", "control characters (U+007F)"),
    ("c1\x9bcsi", "control characters (U+009B)"),
    ("invoice\u202egnp.exe", "text-direction (bidi) control characters (U+202E)"),
    ("embed\u202aL", "text-direction (bidi) control characters (U+202A)"),
    ("iso\u2066late\u2069", "text-direction (bidi) control characters (U+2066, U+2069)"),
    ("mark\u200fRLM", "text-direction (bidi) control characters (U+200F)"),
    ("mark\u200eLRM", "text-direction (bidi) control characters (U+200E)"),
])
def test_dataset_name_with_control_or_bidi_characters_refused(data_dir: Path, make_zip, name: str,  # type: ignore[no-untyped-def]
                                                              kind: str) -> None:
    z = make_zip({"a/1.png": png_bytes(pattern=1), "b/2.png": png_bytes(pattern=2)})
    with pytest.raises(svc.DatasetError) as err:
        svc.add_dataset(z, name)
    assert str(err.value).startswith(f"dataset name contains {kind}")
    assert svc.list_datasets() == [] and _store_files(data_dir) == set()


@pytest.mark.parametrize("folder, escaped, chars", [
    ("cat\u202egnp.exe", "cat\\u202egnp.exe", ["U+202E"]),
    ("dog\x1b[31m", "dog\\x1b[31m", ["U+001B"]),
    ("\u2067rtl\u2069", "\\u2067rtl\\u2069", ["U+2067", "U+2069"]),
])
def test_class_folder_with_control_or_bidi_characters_kept_and_reported(
    data_dir: Path, make_zip, capsys: pytest.CaptureFixture[str], folder: str, escaped: str,  # type: ignore[no-untyped-def]
    chars: list[str],
) -> None:
    from workbench.cli import main

    z = make_zip({f"{folder}/1.png": png_bytes(pattern=1), f"{folder}/2.png": png_bytes(pattern=2),
                  "plain/3.png": png_bytes(pattern=3), "plain/4.png": png_bytes(pattern=4)})
    info = svc.add_dataset(z, "odd-classes")
    assert folder in info.classes  # the label stays exactly as on disk, so files map back
    assert {i.label for i in svc.dataset_images("odd-classes")} == {folder, "plain"}
    assert info.health["unsafe_class_names"] == [{"display_name": escaped, "characters": chars}]
    warning = next(w for w in info.health["warnings"] if "control or text-direction" in w)
    assert f"'{escaped}'" in warning and folder not in warning
    assert main(["data", "report", "odd-classes"]) == 0
    out = capsys.readouterr().out
    assert escaped in out and folder not in out  # the terminal never receives the raw characters
