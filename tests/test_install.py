"""`pip install .` gives a working tool: the wheel holds every module, the pages, the Streamlit
config and the migrations, and an installed `workbench ui` serves the app from another directory.

The wheel is installed with ``--no-deps --target`` into a temporary folder put first on
PYTHONPATH; the main venv's interpreter provides the dependencies. The current directory is a
fresh one, so nothing of this checkout can be picked up by accident.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from builders import free_port, stop, wait_for_200

ROOT = Path(__file__).resolve().parents[1]


def _tracked_files() -> list[str]:
    return subprocess.run(["git", "ls-files", "core", "storage", "workbench", "pages", ".streamlit"], cwd=ROOT,
                          capture_output=True, text=True, check=True).stdout.split()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Built from a copy of the tracked files, as from a clean clone: setuptools writes build/ and
    # *.egg-info beside the sources, and a stale build/ could smuggle removed modules into the wheel.
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("wheel")
    for name in ["pyproject.toml", "README.md", *_tracked_files()]:
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, src / name)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                        str(out), str(src)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    (whl,) = out.glob("workbench-*.whl")
    return whl


def test_the_wheel_holds_every_module_the_pages_and_the_migrations(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f.replace("pages/", "workbench/pages/", 1).replace(".streamlit/", "workbench/streamlit_config/", 1)
                for f in _tracked_files() if f.endswith((".py", ".toml", ".ini", ".mako", ".json"))}
    assert expected - names == set()
    assert {"workbench/app.py", "workbench/pages/home.py", "workbench/streamlit_config/config.toml",
            "storage/alembic.ini", "storage/migrations/env.py", "core/bundle_template/predict.py"} <= names
    assert any(n.startswith("storage/migrations/versions/0001_") for n in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "workbench = workbench.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_installed_workbench_ui_serves_the_app_from_another_directory(wheel: Path, tmp_path: Path) -> None:
    target, cwd = tmp_path / "site", tmp_path / "somewhere"
    cwd.mkdir()
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "-q", "--target",
                        str(target), str(wheel)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    env = {k: v for k, v in os.environ.items() if k not in ("WORKBENCH_DATA_DIR", "DATABASE_URL")}
    env["PYTHONPATH"] = str(target)
    launcher = "import sys; from workbench.cli import main; sys.exit(main())"
    version = subprocess.run([sys.executable, "-c", launcher, "--version"], cwd=cwd, env=env, capture_output=True,
                             text=True, timeout=120)
    assert version.returncode == 0 and version.stdout.startswith("workbench "), version.stderr
    probe = ("from workbench.cli import ui; print(ui.APP); "
             "print(ui.shipped_config()['server.enableXsrfProtection'])")
    where = subprocess.run([sys.executable, "-c", probe], cwd=cwd, env=env, capture_output=True, text=True,
                           timeout=120)
    app, xsrf = where.stdout.split()
    assert app == str(target / "workbench" / "app.py") and xsrf == "True", where.stderr  # the installed copy
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", launcher, "ui", "--port", str(port)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        assert wait_for_200(f"http://127.0.0.1:{port}/", proc) == 200
        assert wait_for_200(f"http://127.0.0.1:{port}/_stcore/health", proc) == 200
    finally:
        stop(proc)
