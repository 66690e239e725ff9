"""Workbench: a transfer-learning workbench for image classification.

Python API::

    from workbench import Workbench, Predictor

``Workbench`` (workbench/api.py) drives datasets, training, evaluation and export through the
same services as the CLI and the web UI; ``Predictor`` (workbench/predictor.py) classifies
images with a verified bundle. Both are imported on first use, so ``import workbench`` (and
the ``workbench`` command) stays light.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from workbench.api import RunFailed, RunHandle, Workbench
    from workbench.predictor import PredictionError, Predictor


def version() -> str:
    """The installed distribution's version (the source tree's pyproject when not installed)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("workbench")
    except PackageNotFoundError:  # a bare checkout on PYTHONPATH
        import re
        from pathlib import Path

        pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
        found = re.search(r'^version\s*=\s*"([^"]+)"', pyproject.read_text(), re.M) if pyproject.is_file() else None
        return found.group(1) if found else "unknown"


_LAZY = {"Workbench": "workbench.api", "RunHandle": "workbench.api", "RunFailed": "workbench.api",
         "Predictor": "workbench.predictor", "PredictionError": "workbench.predictor"}


def __getattr__(name: str) -> Any:
    if name == "__version__":
        return version()
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'workbench' has no attribute {name!r}")


__all__ = ["PredictionError", "Predictor", "RunFailed", "RunHandle", "Workbench", "version"]
