"""`make bench`: run every benchmark in bench/ in turn; each writes its bench/results_*.md.

Long measurements live here, never in the test suite. bench/RESULTS.md collects the
figures with the machine they were measured on.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ORDER = ["bench_model.py", "bench_ingest.py", "bench_recommend.py", "bench_train.py", "bench_export.py"]


def main() -> int:
    failed = []
    for name in ORDER + sorted(p.name for p in HERE.glob("bench_*.py") if p.name not in ORDER):
        script = HERE / name
        if not script.exists():
            continue
        print(f"=== {name}", flush=True)
        if subprocess.call([sys.executable, str(script)], cwd=HERE.parent) != 0:
            failed.append(name)
    print("failed: " + ", ".join(failed) if failed else "all benchmarks ran; see bench/results_*.md")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
