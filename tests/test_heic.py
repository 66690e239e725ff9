"""HEIC/HEIF photos (recent phones' default): ingest, the shared loader and the bundle's predict.py."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.images import decode, is_heif, load_rgb
from core.ingest import ingest

pillow_heif = pytest.importorskip("pillow_heif")
ROOT = Path(__file__).resolve().parents[1]
# HEVC at quality 90 on a leaf photo: a mean absolute difference of a few grey levels.
MEAN_TOLERANCE = 6.0


@pytest.fixture(scope="module")
def heic_folder(shared_datasets: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Image.Image]]:
    """Real bean-leaf photos (two classes, four each), shrunk and written as HEIC by pillow-heif."""
    root = tmp_path_factory.mktemp("heic") / "photos"
    sources: dict[str, Image.Image] = {}
    for label in ("healthy", "bean_rust"):
        (root / label).mkdir(parents=True)
        for src in sorted((shared_datasets / "beans" / "train" / label).glob("*.jpg"))[:4]:
            with Image.open(src) as im:
                img = im.convert("RGB").resize((128, 128), Image.Resampling.BILINEAR)
            name = f"{label}/{src.stem}.heic"
            pillow_heif.from_pillow(img).save(root / name, quality=90)
            sources[name] = img
    return root, sources


def _mean_abs_diff(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).mean())


def test_heic_files_are_heic(heic_folder: tuple[Path, dict[str, Image.Image]]) -> None:
    root, sources = heic_folder
    for name in sources:
        assert is_heif(root / name)
        assert (root / name).read_bytes()[4:12] in (b"ftypheic", b"ftypmif1")
    assert not is_heif(ROOT / "README.md")


def test_decode_heic_matches_source(heic_folder: tuple[Path, dict[str, Image.Image]]) -> None:
    root, sources = heic_folder
    for name, src in sources.items():
        d = decode(root / name)
        assert (d.format, d.ext, d.image.mode, d.image.size) == ("HEIF", ".heic", "RGB", src.size)
        assert _mean_abs_diff(d.image, src) < MEAN_TOLERANCE
    # The tolerance is not vacuous: another photo of the same set is far off.
    a, b = list(sources.values())[:2]
    assert _mean_abs_diff(a, b) > 3 * MEAN_TOLERANCE


def test_ingest_accepts_heic(heic_folder: tuple[Path, dict[str, Image.Image]], tmp_path: Path) -> None:
    root, sources = heic_folder
    r = ingest(root, tmp_path / "data")
    assert not r.skipped, [s.as_dict() for s in r.skipped]
    assert len(r.images) == len(sources) and r.classes == ["bean_rust", "healthy"]
    for rec in r.images:
        assert rec.store_path.endswith(".heic") and (rec.width, rec.height) == (128, 128)
        stored = load_rgb(tmp_path / "data" / rec.store_path)
        assert _mean_abs_diff(stored, sources[rec.original_name]) < MEAN_TOLERANCE


def _bundle_predict_module():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("bundle_predict", ROOT / "core" / "bundle_template" / "predict.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bundle_predict_reads_heic_like_workbench(heic_folder: tuple[Path, dict[str, Image.Image]]) -> None:
    root, sources = heic_folder
    predict = _bundle_predict_module()
    name = next(iter(sources))
    assert np.array_equal(np.asarray(predict.load_rgb(root / name)), np.asarray(load_rgb(root / name)))
    assert predict.find_images([str(root)]) == sorted(root.rglob("*.heic"))


# Without pillow-heif (blocked in a fresh interpreter): a plain message, not "not an image".
_BLOCK = "import sys; sys.modules['pillow_heif'] = None; "


def test_without_pillow_heif_workbench_says_what_to_install(heic_folder: tuple[Path, dict[str, Image.Image]]) -> None:
    root, sources = heic_folder
    path = root / next(iter(sources))
    code = _BLOCK + (f"from core.images import decode, ImageDecodeError\ntry:\n    decode({str(path)!r})\n"
                     "except ImageDecodeError as e:\n    print('ERR', e)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == ("ERR HEIC/HEIF photo, but the pillow-heif package that reads it is not installed "
                                  "(pip install pillow-heif)"), out.stderr


def test_without_pillow_heif_predict_py_says_what_to_install(heic_folder: tuple[Path, dict[str, Image.Image]]) -> None:
    root, sources = heic_folder
    path = root / next(iter(sources))
    code = _BLOCK + (f"sys.path.insert(0, {str(ROOT / 'core' / 'bundle_template')!r}); import predict; "
                     f"predict.load_rgb({str(path)!r})")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert "is a HEIC/HEIF photo; reading it needs the pillow-heif package: pip install pillow-heif" in out.stderr
