"""Smoke test run by .ci/min-versions inside a venv holding the declared floors.

Imports every module of the package, ingests real images (beans), trains lite0 at 96 px for
one epoch, exports to ONNX (verified against PyTorch), writes a bundle's model card, predicts
with ONNX Runtime. Appends the result to bench/results_min_versions.md.

    python bench/smoke_min_versions.py [installed.txt]
"""
from __future__ import annotations

import importlib
import inspect
import platform
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ROOT.parent / "shared" / "datasets"
RESULTS = ROOT / "bench" / "results_min_versions.md"


def import_everything() -> int:
    n = 0
    for folder in ("core", "storage", "workbench", "pages"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if "bundle_template" in path.parts or "migrations" in path.parts or folder == "pages" \
                    or path.name == "__main__.py" or path == ROOT / "workbench" / "app.py":
                continue  # scripts: pages and app.py run inside Streamlit (their widgets are checked below)
            importlib.import_module(".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"))
            n += 1
    import streamlit as st

    for widget in (st.dataframe, st.altair_chart):  # width="stretch" (pages/)
        assert "width" in inspect.signature(widget).parameters, f"streamlit {st.__version__}: {widget.__name__}"
    return n


def main() -> int:
    started = time.monotonic()
    steps: list[str] = []
    modules = import_everything()
    steps.append(f"imported {modules} modules")

    from core.export import card_front_matter, export_fp32, ort_logits, verify_onnx
    from core.ingest import ingest
    from core.train import make_config, train
    from core.train.checkpoint import load_trained_model
    from core.weights import check_hub, find_weights

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        src = tmp / "beans"
        for label in ("healthy", "bean_rust"):
            (src / label).mkdir(parents=True)
            for p in sorted((DATASETS / "beans" / "train" / label).glob("*.jpg"))[:12]:
                shutil.copyfile(p, src / label / p.name)  # ingest never follows links
        r = ingest(src, tmp / "data")
        assert not r.skipped and len(r.images) == 24, r.skipped
        steps.append(f"ingested {len(r.images)} beans photos")
        classes = r.classes
        samples = {s: [(str(tmp / "data" / im.store_path), classes.index(im.label)) for im in r.images
                       if im.split == s] for s in ("train", "val", "test")}
        cfg = make_config("default", head_epochs=1, finetune_epochs=0, batch_size=8, head_batch_size=8,
                          cache_views=1, num_threads=2)
        assert find_weights("lite0").available
        result = train(samples["train"], classes, "lite0", tmp / "run", cfg, resolution=96,
                       val_samples=samples["val"] or None)
        steps.append(f"trained lite0 at 96 px, 1 epoch: val accuracy {result.best['metrics'].get('accuracy', 0):.2f}")
        tm = load_trained_model(result.best_path)
        onnx_path = export_fp32(tm.model, tmp / "model.onnx", tm.preprocessing, tm.classes, tm.variant)
        test = [Path(p) for p, _ in samples["test"] or samples["val"]]
        ver = verify_onnx(tm.model, onnx_path, test, tm.preprocessing)
        assert ver.passed, ver.reason
        steps.append(f"exported ONNX, verified on {ver.n_images} images (max |diff| {ver.max_abs_logit_diff:.1e})")
        logits = ort_logits(onnx_path, test, tm.preprocessing)
        assert logits.shape == (len(test), len(classes))
        steps.append(f"predicted {len(test)} images with ONNX Runtime")
        assert card_front_matter({"variant": "lite0", "dataset": {"name": "beans"},
                                  "metrics": {"accuracy": 0.5}})[0] == "---"
        hub = check_hub(timeout=2.0)
        steps.append(f"hub check answered in {hub.seconds:.1f} s (reachable: {hub.reachable})")
    elapsed = time.monotonic() - started
    installed = Path(sys.argv[1]).read_text().split() if len(sys.argv) > 1 else []
    lines = [f"## {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, Python {platform.python_version()}: PASSED "
             f"in {elapsed:.0f} s", "", *[f"- {s}" for s in steps], "",
             "Installed: " + ", ".join(f"`{x}`" for x in installed), ""]
    with RESULTS.open("a") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
