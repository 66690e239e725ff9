"""Fixes from the health report (issue 13): each makes a new, traceable dataset version.

Real bean-leaf images copied into a tmp folder with the user's own train/val/test folders,
with deliberate problems made by copying files: an exact duplicate inside train, an exact
copy of a train image in test (leakage), and a re-encoded, slightly resized copy of a train
image in val (a near-duplicate across splits). File names carry a "patient" prefix (p1_...).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO_ROOT
from PIL import Image

from core.evaluate import leakage_free_metrics
from core.splits import (
    GroupPatternError,
    groups_from_pattern,
    resolve_cross_split,
    suggest_group_patterns,
)

CLASSES = ("healthy", "bean_rust")
# patient -> (class, split): each patient's 3 images are one class and, as uploaded, one split.
PATIENTS = {"p1": ("healthy", "train"), "p2": ("healthy", "train"), "p3": ("healthy", "val"),
            "p4": ("healthy", "test"), "p5": ("bean_rust", "train"), "p6": ("bean_rust", "train"),
            "p7": ("bean_rust", "val"), "p8": ("bean_rust", "test")}


@pytest.fixture(scope="module")
def leaky_folder(tmp_path_factory: pytest.TempPathFactory, shared_datasets: Path) -> Path:
    root = tmp_path_factory.mktemp("leaky") / "leaf-clinic"
    sources = {c: iter(sorted((shared_datasets / "beans" / "train" / c).iterdir())) for c in CLASSES}
    for patient, (cls, split) in PATIENTS.items():
        (root / split / cls).mkdir(parents=True, exist_ok=True)
        for i in range(3):
            shutil.copy(next(sources[cls]), root / split / cls / f"{patient}_leaf{i}.jpg")
    shutil.copy(root / "train/healthy/p1_leaf0.jpg", root / "train/healthy/p1_leaf0_copy.jpg")  # exact, same split
    shutil.copy(root / "train/bean_rust/p5_leaf0.jpg", root / "test/bean_rust/p8_leaf9.jpg")  # exact, leaks
    with Image.open(root / "train/healthy/p2_leaf1.jpg") as im:  # near-duplicate, leaks into val
        im.convert("RGB").resize((im.width - 20, im.height - 20)).save(root / "val/healthy/p3_leaf9.jpg", quality=70)
    return root


@pytest.fixture
def leaky(data_dir: Path, leaky_folder: Path) -> str:
    from workbench import datasets

    return datasets.add_dataset(leaky_folder, "leaky").name


def _rows(name: str) -> list[tuple[str, str, str, str]]:
    from workbench import datasets

    return sorted((i.original_name, i.label, i.split, i.sha256) for i in datasets.dataset_images(name))


def _dataset_names() -> list[str]:
    from workbench import datasets

    return [d.name for d in datasets.list_datasets()]


# --- pure functions -----------------------------------------------------------------------

def test_resolve_cross_split_moves_whole_clusters() -> None:
    splits = ["train", "test", "val", "val", "train", "test", "test"]
    clusters = [1, 1, 2, 2, 3, 3, None]
    assert resolve_cross_split(splits, clusters, "train") == \
        ["train", "train", "val", "val", "train", "train", "test"]
    # cluster 1: tie train/test -> train; cluster 3: tie -> train; cluster 2 already one split.
    assert resolve_cross_split(["test", "test", "train"], [1, 1, 1], "cluster") == ["test"] * 3
    with pytest.raises(ValueError, match="unknown way to resolve leakage"):
        resolve_cross_split(splits, clusters, "delete")


def test_group_pattern_suggestions_and_safe_matching() -> None:
    names = [f"train/healthy/p{i // 3}_leaf{i}.jpg" for i in range(12)] + ["healthy_0001.jpg"]
    suggestions = suggest_group_patterns(names, ["healthy"] * 6 + ["rust"] * 7)
    first = suggestions[0]
    assert (first.pattern, first.groups, first.matched) == (r"^([^_]+)_", 5, 13)
    assert first.description == "the text before the first _"
    # The class name as a prefix ('healthy_0001') is never the only grouping offered.
    assert suggest_group_patterns([f"healthy_{i:04}.jpg" for i in range(9)], ["healthy"] * 9) == []
    assert groups_from_pattern(names[:2] + ["nomatch.jpg"], r"^(p\d+)_") == ["p0", "p0", None]


@pytest.mark.parametrize("pattern, message", [
    ("(p\\d+", "is not a valid regular expression"),
    (r"^p\d+_", "has no group in brackets"),
    (r"^(zzz)\d", "finds no group in any file name"),
    ("", "the group pattern is empty"),
    ("(" + "a" * 300 + ")", "the limit is 200"),
])
def test_bad_group_patterns_are_refused_with_a_message(pattern: str, message: str) -> None:
    with pytest.raises(GroupPatternError, match=message):
        groups_from_pattern(["p1_leaf0.jpg", "p2_leaf1.jpg"], pattern)


def test_catastrophic_pattern_is_stopped_by_the_timeout() -> None:
    with pytest.raises(GroupPatternError, match="took longer than 1 s .* and was stopped"):
        groups_from_pattern(["a" * 60 + "!"] * 3, r"^((a+)+)$", timeout_s=1)


def test_leakage_free_metrics() -> None:
    y = np.array([0, 1, 1, 0])
    logits = np.array([[2.0, 0], [0, 2.0], [2.0, 0], [0, 2.0]])  # right, right, wrong, wrong
    assert leakage_free_metrics(y, logits, [False] * 4, 2) is None
    clean = leakage_free_metrics(y, logits, [True, True, False, False], 2)
    assert clean is not None and clean["n"] == 2 and clean["excluded"] == 2 and clean["accuracy"] == 0.0
    assert leakage_free_metrics(y, logits, [True] * 4, 2) == {"n": 0, "excluded": 4}
    with pytest.raises(ValueError, match="same test images"):
        leakage_free_metrics(y, logits, [True], 2)


# --- the fixes, on real images -----------------------------------------------------------

def test_drop_exact_duplicates_makes_a_traceable_new_version(leaky: str, data_dir: Path) -> None:
    from workbench import dataset_fixes as fixes
    from workbench import datasets

    before = _rows(leaky)
    store_files = sorted(p.name for p in (data_dir / "store").rglob("*.jpg"))
    health = datasets.get_dataset(leaky).health["duplicates"]
    assert health["exact_groups"] == 2 and health["exact_cross_split_groups"] == 1

    res = fixes.drop_exact_duplicates(leaky, by="tester")
    assert res.dataset.name == "leaky v2" and res.version == 2
    assert res.summary == "2 duplicate images removed"
    kept = {k["name"]: k["dropped"] for k in res.change["kept"]}
    # The copy in train is kept; the leaked test copy and the second train copy go.
    assert kept == {"train/healthy/p1_leaf0.jpg": ["train/healthy/p1_leaf0_copy.jpg"],
                    "train/bean_rust/p5_leaf0.jpg": ["test/bean_rust/p8_leaf9.jpg"]}
    assert res.change["by"] == "tester" and res.change["fix"] == "drop_exact_duplicates"
    after = _rows("leaky v2")
    assert len(after) == len(before) - 2
    assert {r[0] for r in before} - {r[0] for r in after} == {"train/healthy/p1_leaf0_copy.jpg",
                                                                "test/bean_rust/p8_leaf9.jpg"}
    assert _rows(leaky) == before  # the old version is intact
    assert sorted(p.name for p in (data_dir / "store").rglob("*.jpg")) == store_files  # nothing copied
    new_health = datasets.get_dataset("leaky v2").health
    assert new_health["duplicates"]["exact_groups"] == 0 and new_health["num_images"] == len(after)
    assert [v.sentence for v in fixes.version_history("leaky v2")] == [
        f"Version 1 of leaky: {len(before)} images uploaded",
        "Version 2 of leaky: 2 duplicate images removed, from version 1"]
    # Deleting the old version keeps every file the new one uses, and its history says so.
    datasets.delete_dataset(leaky)
    assert all(Path(i.path).is_file() for i in datasets.dataset_images("leaky v2"))
    assert [v.sentence for v in fixes.version_history("leaky v2")] == [
        "Version 2 of leaky: 2 duplicate images removed, from a version since deleted"]


@pytest.mark.parametrize("mode, how", [("train", "moved to train"),
                                       ("cluster", "moved so each group sits in one split")])
def test_resolve_leakage_keeps_each_group_in_one_split(leaky: str, mode: str, how: str) -> None:
    from workbench import dataset_fixes as fixes
    from workbench import datasets

    res = fixes.resolve_leakage(leaky, mode, by="tester")
    moved = {m["name"]: m["to"] for m in res.change["moved"]}
    assert res.summary == f"2 leaking groups resolved, 2 images {how}"
    # Both groups hold one train and one held-out image: a tie, which goes to train in either mode.
    assert moved == {"test/bean_rust/p8_leaf9.jpg": "train", "val/healthy/p3_leaf9.jpg": "train"}
    dups = datasets.get_dataset(res.dataset.name).health["duplicates"]
    assert dups["exact_cross_split_groups"] == 0 and dups["near_cross_split_groups"] == 0
    assert len(_rows(res.dataset.name)) == len(_rows(leaky))
    # The leakage is gone for the evaluation too.
    from storage.db import get_sessionmaker
    from workbench.settings import get_settings

    with get_sessionmaker(get_settings().database_url)() as s:
        assert sum(fixes.leaked_test_flags(s, datasets.get_dataset(leaky).id)) == 1
        assert sum(fixes.leaked_test_flags(s, res.dataset.id)) == 0


def test_exclude_and_relabel(leaky: str) -> None:
    from workbench import dataset_fixes as fixes
    from workbench import datasets

    ex = fixes.exclude_files(leaky, ["p1_leaf0_copy.jpg", "test/bean_rust/p8_leaf9.jpg"], by="tester")
    assert ex.summary == "2 images excluded" and ex.dataset.num_images == len(_rows(leaky)) - 2
    assert {d["name"] for d in ex.change["dropped"]} == {"train/healthy/p1_leaf0_copy.jpg",
                                                         "test/bean_rust/p8_leaf9.jpg"}
    rel = fixes.relabel_file(ex.dataset.name, "p2_leaf2.jpg", "bean_rust", by="tester")
    assert rel.dataset.name == "leaky v3" and rel.summary == "p2_leaf2.jpg relabelled from healthy to bean_rust"
    labels = {r[0]: r[1] for r in _rows("leaky v3")}
    assert labels["train/healthy/p2_leaf2.jpg"] == "bean_rust"
    assert {r[0]: r[1] for r in _rows(ex.dataset.name)}["train/healthy/p2_leaf2.jpg"] == "healthy"
    assert datasets.get_dataset("leaky v3").health["class_counts"] == {"bean_rust": 13, "healthy": 12}
    assert [v.version for v in fixes.version_history(leaky)] == [1, 2, 3]


def test_resplit_by_group_keeps_each_patient_in_one_split(leaky: str) -> None:
    from workbench import dataset_fixes as fixes
    from workbench import datasets

    assert fixes.group_pattern_suggestions(leaky)[0].pattern == r"^([^_]+)_"
    res = fixes.resplit_by_group(leaky, r"^([^_]+)_", seed=3, by="tester")
    images = datasets.dataset_images(res.dataset.name)
    split_of: dict[str, set[str]] = {}
    for im in images:
        split_of.setdefault(str(im.group), set()).add(im.split)
    assert set(split_of) == set(PATIENTS) and all(len(s) == 1 for s in split_of.values())
    assert res.dataset.split_config["grouping"]["num_groups"] == 8
    assert res.change["params"] == {"pattern": r"^([^_]+)_", "seed": 3, "fractions": [0.7, 0.15, 0.15]}
    dups = res.dataset.health["duplicates"]
    assert dups["exact_cross_split_groups"] == 0


@pytest.mark.parametrize("fix, message", [
    (lambda f, d: f.exclude_files(d, ["ghost.jpg"], by="t"), "leaky has no image called 'ghost.jpg'"),
    (lambda f, d: f.relabel_file(d, "ghost.jpg", "healthy", by="t"), "leaky has no image called 'ghost.jpg'"),
    (lambda f, d: f.relabel_file(d, "p1_leaf1.jpg", "angular", by="t"), "'angular' is not a class of leaky"),
    (lambda f, d: f.relabel_file(d, "p1_leaf1.jpg", "healthy", by="t"), "is already labelled 'healthy'"),
    (lambda f, d: f.resplit_by_group(d, r"^p\d_", by="t"), "has no group in brackets"),
    (lambda f, d: f.resplit_by_group(d, r"^(zzz)", by="t"), "finds no group in any file name"),
    (lambda f, d: f.resplit_by_group(d, r"^(p)\d", by="t"), "finds only one group ('p')"),
    (lambda f, d: f.resolve_leakage(d, "delete", by="t"), "unknown way to resolve leakage"),
    (lambda f, d: f.exclude_files(d, [f"{s}/{c}/{p}_leaf{i}.jpg" for p, (c, s) in PATIENTS.items()
                                      if c == "healthy" for i in range(3)] + ["p1_leaf0_copy.jpg",
                                      "p3_leaf9.jpg"], by="t"), "would have 1 class(es) left"),
    (lambda f, d: f.drop_exact_duplicates(d, by="t", new_name="leaky"), "a dataset named 'leaky' already exists"),
])
def test_bad_input_changes_nothing(leaky: str, fix, message: str) -> None:  # type: ignore[no-untyped-def]
    from workbench import dataset_fixes as fixes

    before = _rows(leaky)
    with pytest.raises(fixes.FixError, match=message.replace("(", r"\(").replace(")", r"\)")):
        fix(fixes, leaky)
    assert _dataset_names() == ["leaky"] and _rows(leaky) == before


def test_a_fix_with_no_such_finding_says_so(data_dir: Path, shared_datasets: Path, tmp_path: Path) -> None:
    from workbench import dataset_fixes as fixes
    from workbench import datasets

    for cls in CLASSES:
        (tmp_path / "clean" / cls).mkdir(parents=True)
        for f in sorted((shared_datasets / "beans" / "train" / cls).iterdir())[:5]:
            shutil.copy(f, tmp_path / "clean" / cls / f.name)
    datasets.add_dataset(tmp_path / "clean", "clean")
    with pytest.raises(fixes.FixError, match="clean has no exact duplicate images: nothing to remove"):
        fixes.drop_exact_duplicates("clean", by="t")
    with pytest.raises(fixes.FixError, match="no duplicate or near-duplicate images of clean span two splits"):
        fixes.resolve_leakage("clean", "train", by="t")
    assert _dataset_names() == ["clean"]


# --- the CLI (the real `workbench` entry point) and the page --------------------------------

def test_cli_fix_verbs(leaky: str, capsys: pytest.CaptureFixture[str]) -> None:
    from workbench.cli import main

    assert main(["data", "fix", "duplicates", "leaky"]) == 0
    out = capsys.readouterr().out
    assert "created 'leaky v2' (id 2), version 2 from 'leaky': 2 duplicate images removed" in out
    assert "kept train/bean_rust/p5_leaf0.jpg (train), removed test/bean_rust/p8_leaf9.jpg" in out
    assert main(["data", "fix", "leakage", "leaky v2", "--keep", "train"]) == 0
    assert "1 leaking group resolved, 1 image moved to train" in capsys.readouterr().out
    assert main(["data", "fix", "exclude", "leaky", "p1_leaf1.jpg"]) == 0
    assert main(["data", "fix", "relabel", "leaky", "p1_leaf2.jpg", "bean_rust", "--name", "leaky-relabelled"]) == 0
    assert "created 'leaky-relabelled'" in capsys.readouterr().out
    assert main(["data", "fix", "regroup", "leaky"]) == 0
    first = capsys.readouterr().out.splitlines()[1].split()
    assert first[0] == "'^([^_]+)_'" and " ".join(first[1:13]) == \
        "the text before the first _: 8 groups in 27 file names"
    assert main(["data", "fix", "regroup", "leaky", "--pattern", "^([^_]+)_"]) == 0
    capsys.readouterr()
    assert main(["data", "versions", "leaky", "--details"]) == 0
    out = capsys.readouterr().out
    assert "Version 2 of leaky: 2 duplicate images removed, from version 1: 'leaky v2' (id 2)" in out
    assert "Version 3 of leaky: 1 leaking group resolved, 1 image moved to train, from version 2" in out
    assert "(command line)" in out and "moved val/healthy/p3_leaf9.jpg from val to train" in out


@pytest.mark.parametrize("argv, message", [
    (["data", "fix", "exclude", "leaky", "ghost.jpg"], "error: leaky has no image called 'ghost.jpg'"),
    (["data", "fix", "relabel", "leaky", "p1_leaf1.jpg", "angular"], "error: 'angular' is not a class of leaky"),
    (["data", "fix", "regroup", "leaky", "--pattern", "("], "is not a valid regular expression"),
    (["data", "fix", "duplicates", "ghost"], "error: no dataset named 'ghost'"),
])
def test_cli_bad_input_exit_2(leaky: str, capsys: pytest.CaptureFixture[str], argv: list[str],
                              message: str) -> None:
    from workbench.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert _dataset_names() == ["leaky"]


def test_datasets_page_fix_buttons_and_history(leaky: str) -> None:
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(REPO_ROOT / "workbench" / "app.py"), default_timeout=60)
    at.run()
    at.switch_page("../pages/datasets.py").run()
    assert not at.exception and not at.error
    assert any(s.value == r"^([^_]+)_" for s in at.text_input if s.key == "fix_pattern")
    next(b for b in at.button if b.label == "Remove duplicate copies").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert at.selectbox(key="dataset_choice").value == "leaky v2"
    assert any(s.value == "Created leaky v2: 2 duplicate images removed." for s in at.success)
    text = " ".join(m.value for m in at.markdown)
    assert "Version 2 of leaky: 2 duplicate images removed, from version 1" in text
    # On the new version the button has nothing left to do; relabelling an unknown file is refused.
    assert next(b for b in at.button if b.label == "Remove duplicate copies").disabled
    at.text_input(key="fix_relabel_file").input("ghost.jpg")
    next(b for b in at.button if b.label == "Relabel").click().run()
    assert [e.value for e in at.error] == ["**Could not relabel the image.** leaky v2 has no image called "
                                           "'ghost.jpg'"]


# --- the evaluation of a run on a dataset with known leakage --------------------------------

def test_evaluation_reports_the_leakage_free_score(ws, tmp_path: Path) -> None:
    """A real checkpoint evaluated on a copy of its dataset where 2 test images were also filed in
    train: the normal score on all 12 test images, and beside it the score on the other 10."""
    from builders import make_run

    from core.evaluate import EvalItem, evaluate_model
    from core.export import load_trained
    from workbench import dataset_fixes as fixes
    from workbench import datasets
    from workbench.evaluations import evaluate_run

    src = tmp_path / "src"
    shutil.copytree(ws.source, src)
    leaked = sorted((src / "test").rglob("*.jpg"))[:2]
    for f in leaked:
        shutil.copy(f, src / "train" / f.parent.name / f"again_{f.name}")
    info = datasets.add_dataset(src, f"leaky-eval-{tmp_path.name}", settings=ws.settings)
    rid = make_run(ws, info.id)

    m = evaluate_run(rid, settings=ws.settings, session_factory=ws.Session).metrics
    clean = m["leakage_free"]
    assert (m["n"], clean["n"], clean["excluded"]) == (12, 10, 2)
    # The same figure as evaluating the model on the 10 clean test images alone.
    tm = load_trained(ws.checkpoint)
    classes = list(tm.classes)
    items = [EvalItem(i.path, classes.index(i.label)) for i in datasets.dataset_images(info.id, "test",
                                                                                      settings=ws.settings)
             if i.original_name.rsplit("/", 1)[-1] not in {f.name for f in leaked}]
    alone = evaluate_model(tm.model, tm.preprocessing, classes, items).metrics
    assert len(items) == 10 and clean["accuracy"] == pytest.approx(alone["accuracy"])
    assert fixes.leakage_free_sentence(m) == (
        f"2 of 12 test images have a copy or near-copy among the training or validation images; on the other 10 "
        f"the accuracy is {alone['accuracy']:.0%} (with them: {m['accuracy']:.0%}).")
    # On the original, leak-free dataset no test image is flagged, and the page shows no sentence.
    with ws.Session() as s:
        flags = fixes.leaked_test_flags(s, ws.dataset_id)
    assert len(flags) == 12 and not any(flags)
    assert fixes.leakage_free_sentence({k: v for k, v in m.items() if k != "leakage_free"}) is None
