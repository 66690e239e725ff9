"""pyproject.toml declares what the code imports, and only that, at honest floors."""
from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

from core.trackers import _NEEDS
from core.weights import weight_packages

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
RUNTIME_DIRS = ("core", "workbench", "storage", "pages")
FIRST_PARTY = {"core", "workbench", "storage", "pages"}
# Imported, but provided by a declared dependency on purpose (not worth a floor of their own).
VIA = {"cv2": "albumentations", "starlette": "fastapi", "anyio": "fastapi"}  # anyio: starlette runs on it


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_names(reqs: list[str]) -> dict[str, str]:
    out = {}
    for req in reqs:
        name = re.split(r"[\s\[<>=!~;]", req, maxsplit=1)[0]
        out[_norm(name)] = req
    return out


RUNTIME = _requirement_names(PYPROJECT["project"]["dependencies"])
EXTRAS = {k: _requirement_names(v) for k, v in PYPROJECT["project"]["optional-dependencies"].items()}


def _imports() -> dict[str, str]:
    """Top-level module -> first file importing it, over every runtime source file."""
    found: dict[str, str] = {}
    for folder in RUNTIME_DIRS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            if "bundle_template" in path.parts or "migrations" in path.parts:
                continue
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                for n in names:
                    found.setdefault(n.split(".")[0], str(path.relative_to(ROOT)))
    return found


def test_every_runtime_import_is_declared() -> None:
    dists = packages_distributions()
    optional = {mod for mod, _ in _NEEDS.values()}  # trackers: the `trackers` extra, checked at use
    missing = []
    for module, where in _imports().items():
        if module in FIRST_PARTY or module in sys.stdlib_module_names or module in optional:
            continue
        if module in VIA:
            assert _norm(VIA[module]) in RUNTIME, f"{module} comes through {VIA[module]}, which is not declared"
            continue
        names = {_norm(d) for d in dists.get(module, [module])}
        if not names & set(RUNTIME):
            missing.append(f"{module} (imported in {where}; distributions {sorted(names)})")
    assert not missing, "imported but not declared in [project.dependencies]: " + ", ".join(missing)


@pytest.mark.parametrize("name", ["scikit-image", "onnxscript", "torchvision"])
def test_test_only_packages_are_not_runtime(name: str) -> None:
    assert name not in RUNTIME


def test_known_floors() -> None:
    def floor(name: str) -> tuple[int, ...]:
        m = re.search(r">=\s*([0-9.]+)", RUNTIME[name])
        assert m, f"{name} has no floor: {RUNTIME[name]}"
        return tuple(int(p) for p in m.group(1).split("."))

    assert floor("albumentations") >= (1, 4, 21)  # Compose.set_random_seed, RandomResizedCrop(size=)
    assert floor("streamlit") >= (1, 51)  # width="stretch" on charts and dataframes
    assert floor("torch") >= (2, 5)  # torch.onnx.export(dynamo=False)
    assert floor("pydicom") >= (3, 0)  # pydicom.pixels
    for name in ("timm", "scipy", "huggingface-hub", "pyyaml", "pillow-heif"):
        assert name in RUNTIME, f"{name} is used at run time but not declared"


def test_weight_packages_pinned_to_the_checked_release() -> None:
    for variant, package in weight_packages().items():
        req = RUNTIME[_norm(package.distribution)]
        assert req == f"{package.distribution}=={package.version}", (variant, req)


def test_trackers_extra_and_dev() -> None:
    packages = {_norm(pkg) for _, pkg in _NEEDS.values()}
    assert packages <= set(EXTRAS["trackers"]) and packages <= set(EXTRAS["dev"])
