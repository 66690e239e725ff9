"""Every refusal of the `workbench` commands exits with the code README.md's "Exit codes and
`--json`" promises (2: bad input), with one plain sentence on stderr and no traceback.

One table, run through the real entry point (``workbench.cli.main``) in-process, with a real data
dir and SQLite. argparse's own refusals leave ``main`` through SystemExit(2), as the console
script does. A refused bundle here is a real zip or folder that is not a Workbench bundle, so no
model has to be trained; tests/test_bundle_hostile.py refuses damaged real bundles the same way.
"""
from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest
from conftest import png_bytes

from workbench.cli import main

EXIT_BAD_INPUT = 2


def _rc(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as done:  # argparse: a bad option or value
        return int(done.code or 0)


@pytest.fixture
def files(data_dir: Path, tmp_path: Path, make_zip, monkeypatch: pytest.MonkeyPatch  # type: ignore[no-untyped-def]
          ) -> dict[str, str]:
    """What the table's argv refer to: an image, a dataset zip, and a refused bundle (zip, folder).
    The working folder is an empty one, where nothing may appear."""
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    image = tmp_path / "leaf.png"
    image.write_bytes(png_bytes(pattern=1))
    not_a_bundle = make_zip({"model.onnx": b"not a model", "labels.json": b"[]"}, name="bundle.zip")
    folder = tmp_path / "bundle-folder"
    folder.mkdir()
    (folder / "labels.json").write_text("[]")
    upload = make_zip({f"{'ab'[i % 2]}/{i}.png": png_bytes(pattern=i + 1) for i in range(8)}, name="toy.zip")
    return {"img": str(image), "zip": str(not_a_bundle), "folder": str(folder), "upload": str(upload)}


# (case, argv, words on stderr). {img}, {zip}, {folder}, {upload}: paths from `files`.
REFUSALS: list[tuple[str, list[str], str]] = [
    # bad options and values (argparse)
    ("no command option", ["predict"], "the following arguments are required"),
    ("unknown option", ["data", "list", "--colour"], "unrecognized arguments: --colour"),
    ("run id not a number", ["cancel", "three"], "RUN must be a run id"),
    ("run id in Arabic-Indic digits", ["cancel", "٣"], "RUN must be a run id"),  # int() would read run 3
    ("search id superscript", ["searches", "delete", "²"], "SEARCH must be a search id"),
    ("evaluate superscript run", ["evaluate", "²"], "RUN must be a run id"),
    ("bad grace hours", ["gc", "--grace-hours", "-1"], "--grace-hours must be 0 or more"),
    ("serve on an open host", ["serve", "1", "--host", "0.0.0.0"], "--allow-remote"),
    # unknown datasets: only ASCII digits are an id, anything else is a name
    ("unknown dataset", ["data", "report", "ghost"], "no dataset named 'ghost'"),
    ("superscript dataset", ["data", "report", "²"], "no dataset named '²'"),
    ("Arabic-Indic dataset", ["data", "delete", "٣"], "no dataset named '٣'"),
    ("unknown dataset id", ["data", "report", "42"], "no dataset named '42'"),
    ("runs of an unknown dataset", ["runs", "--dataset", "ghost"], "No dataset named 'ghost'"),
    ("runs of a superscript dataset", ["runs", "--dataset", "²"], "No dataset named '²'"),
    ("searches of a superscript dataset", ["searches", "--dataset", "²"], "No dataset named '²'"),
    ("versions of a superscript dataset", ["data", "versions", "²"], "no dataset named '²'"),
    # unknown runs
    ("cancel an unknown run", ["cancel", "999"], "No run with id 999"),
    ("evaluate an unknown run", ["evaluate", "999"], "no run with id 999"),
    ("export an unknown run", ["export", "999"], "no run with id 999"),
    ("predict with an unknown run", ["predict", "999", "{img}"], "no run with id 999"),
    ("serve an unknown run", ["serve", "999"], "run 999 has no verified bundle yet"),
    ("predict with a superscript run", ["predict", "²", "{img}"], "'²' is neither a bundle"),
    ("serve a superscript run", ["serve", "²"], "'²' is neither a bundle"),
    # refused bundles
    ("predict with a refused zip", ["predict", "{zip}", "{img}"], "refusing bundle"),
    ("predict with a refused folder", ["predict", "{folder}", "{img}"], "refusing bundle"),
    ("predict --json with a refused zip", ["predict", "{zip}", "{img}", "--json"], "manifest.json: missing"),
    ("serve a refused zip", ["serve", "{zip}"], "manifest.json: missing"),
    ("serve a refused folder", ["serve", "{folder}"], "manifest.json: missing"),
    # bad dataset names
    ("Cyrillic e in a Latin name", ["data", "add", "{upload}", "--name", "b\u0435ans"],
     "U+0435 CYRILLIC SMALL LETTER IE"),
    ("zero-width space", ["data", "add", "{upload}", "--name", "be\u200bans"], "U+200B ZERO WIDTH SPACE"),
    ("byte order mark", ["data", "add", "{upload}", "--name", "\ufeffbeans"], "U+FEFF ZERO WIDTH NO-BREAK SPACE"),
    ("line separator", ["data", "add", "{upload}", "--name", "be\u2028ans"], "U+2028 LINE SEPARATOR"),
    ("Arabic letter mark", ["data", "add", "{upload}", "--name", "beans\u061c-2"], "U+061C ARABIC LETTER MARK"),
    ("all digits", ["data", "add", "{upload}", "--name", "17"], "all digits"),
    ("superscript digits", ["data", "add", "{upload}", "--name", "²"], "all digits"),
]


@pytest.mark.parametrize("argv,words", [c[1:] for c in REFUSALS], ids=[c[0] for c in REFUSALS])
def test_refusals_exit_2_with_a_plain_message(files: dict[str, str], argv: list[str], words: str,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    rc = _rc([a.format(**files) for a in argv])
    out, err = capsys.readouterr()
    assert rc == EXIT_BAD_INPUT, (rc, out, err)
    assert words in err and "Traceback" not in err, err
    if "--json" in argv:
        assert out == ""  # stdout is for the JSON document only
    assert list(Path.cwd().iterdir()) == []


def test_a_refused_name_names_the_character(files: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    assert _rc(["data", "add", files["upload"], "--name", "b\u0435ans", "--quiet"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert ("mixes Latin and Cyrillic letters: '\u0435' (U+0435 CYRILLIC SMALL LETTER IE) is Cyrillic" in err), err
    assert _rc(["data", "list", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []  # nothing was added


def test_superscript_is_a_name_not_an_id(files: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    """`data report ²` used to answer "invalid literal for int()"; a real dataset id still works."""
    assert _rc(["data", "add", files["upload"], "--name", "toy", "--quiet"]) == 0
    capsys.readouterr()
    assert _rc(["data", "report", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["name"] == "toy"
    assert _rc(["data", "report", "¹"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "no dataset named '¹'" in err and "int()" not in err


# --- the one name check, directly ------------------------------------------------------------
REFUSED_NAMES = [
    ("b\u0435ans", "U+0435 CYRILLIC SMALL LETTER IE"),
    ("\u0391lpha", "U+0391 GREEK CAPITAL LETTER ALPHA"),  # Greek capital alpha, then Latin
    ("\u0441\u0430t", "U+0074 LATIN SMALL LETTER T"),  # mostly Cyrillic: the Latin letter is the odd one
    ("be\u200bans", "U+200B ZERO WIDTH SPACE"),
    ("be\u200dans", "U+200D ZERO WIDTH JOINER"),
    ("beans\ufeff2", "U+FEFF ZERO WIDTH NO-BREAK SPACE"),
    ("be\u2028ans", "U+2028 LINE SEPARATOR"),
    ("be\u2029ans", "U+2029 PARAGRAPH SEPARATOR"),
    ("beans\u061c", "U+061C ARABIC LETTER MARK"),
    ("be\u00adans", "U+00AD SOFT HYPHEN"),
    ("be\u2060ans", "U+2060 WORD JOINER"),
    ("be\u3164ans", "U+3164 HANGUL FILLER"),
    ("be\ue000ans", "U+E000"),  # private use: no Unicode name
    ("\uff42eans", "U+FF42 FULLWIDTH LATIN SMALL LETTER B"),
    ("\U0001d41beans", "U+1D41B MATHEMATICAL BOLD SMALL B"),
    ("bell\x07set", "control characters (U+0007)"),  # the older checks still come first
    ("invoice\u202egnp.exe", "text-direction (bidi) control characters (U+202E)"),
]


@pytest.mark.parametrize("name,words", REFUSED_NAMES, ids=[w for _, w in REFUSED_NAMES])
def test_lookalike_and_invisible_names_refused(name: str, words: str) -> None:
    from workbench.datasets import DatasetError, check_name

    with pytest.raises(DatasetError, match=re.escape(words)):
        check_name(name)


@pytest.mark.parametrize("name", ["beans-2026", "café au lait", "пшеница", "σιτάρι", "beans 豆", "猫と犬",
                                  "ｶﾀｶﾅ", "Ærø ß", "set 2", "x²"])
def test_ordinary_names_in_any_one_alphabet_accepted(name: str) -> None:
    from workbench.datasets import check_name

    assert check_name(f"  {name} ") == name


def test_the_web_ui_refuses_a_bad_name_before_copying_the_upload(data_dir: Path) -> None:
    from workbench import actions
    from workbench.datasets import DatasetError

    with pytest.raises(DatasetError, match="U\\+0435 CYRILLIC SMALL LETTER IE"):
        actions.start_ingest(io.BytesIO(b"PK\x05\x06" + bytes(18)), "beans.zip", "b\u0435ans")
    assert not [p for p in data_dir.rglob("*") if p.is_file() and "upload" in p.as_posix()]
