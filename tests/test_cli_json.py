"""`--json` on the commands that print results: one parseable JSON document on stdout, messages
elsewhere; `workbench --version`. In-process (``workbench.cli.main``), real files, real SQLite."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from builders import write_images

from workbench.cli import main


def _json(capsys: pytest.CaptureFixture[str], argv: list[str], rc: int = 0) -> object:
    assert main(argv) == rc
    return json.loads(capsys.readouterr().out)


def test_data_and_run_commands_print_json(data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_images(tmp_path / "src", [8, 8])
    added = _json(capsys, ["data", "add", str(tmp_path / "src"), "--name", "tiny", "--json", "--quiet"])
    assert added["name"] == "tiny" and added["num_images"] == 16 and added["classes"] == ["class0", "class1"]
    assert [d["name"] for d in _json(capsys, ["data", "list", "--json"])] == ["tiny"]
    assert _json(capsys, ["data", "report", "tiny", "--json"])["health"]["class_counts"] == {"class0": 8, "class1": 8}
    assert _json(capsys, ["runs", "--json"]) == []
    gc = _json(capsys, ["gc", "--dry-run", "--json", "--grace-hours", "0"])
    assert gc["dry_run"] is True and gc["grace_hours"] == 0 and isinstance(gc["removed"], list)
    assert _json(capsys, ["data", "delete", "tiny", "--json"])["images"] == 16
    assert _json(capsys, ["devices", "--json"])
    assert main(["cancel", "424242", "--json"]) == 2  # bad input: exit 2, message on stderr, nothing on stdout
    captured = capsys.readouterr()
    assert captured.out == "" and "424242" in captured.err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    from workbench import version

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"workbench {version()}"
