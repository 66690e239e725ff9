"""Regenerate docs/screenshots/*.png with a real headless Chromium.

Runs the end-to-end browser test (tests/test_e2e_browser.py) with WORKBENCH_SCREENSHOTS=1:
it starts `streamlit run workbench/app.py` on a free port with a throw-away data dir,
uploads real bean-leaf images, trains lite0, exports, predicts, and saves one screenshot per
page along the way. Needs /usr/bin/chromium and ../shared/datasets/beans. About 3 minutes.

    .venv/bin/python docs/take_screenshots.py
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    env = dict(os.environ, WORKBENCH_SCREENSHOTS="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-s", "tests/test_e2e_browser.py"]
    rc = subprocess.call(cmd, cwd=ROOT, env=env)
    shots = sorted((ROOT / "docs" / "screenshots").glob("*.png"))
    print("\n".join(str(p.relative_to(ROOT)) for p in shots))
    return rc


if __name__ == "__main__":
    sys.exit(main())
