"""Hostile and broken inputs: each gets its own clear message, nothing escapes the data dir."""
from __future__ import annotations

import io
import os
import stat
import struct
import zipfile
import zlib
from pathlib import Path

import pytest
from conftest import png_bytes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.images import DEFAULT_MAX_PIXELS
from core.ingest import STORE_LOCK, IngestError, IngestLimits, ingest


def _snapshot(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}


def _two_classes() -> dict[str, bytes]:
    return {"a/1.png": png_bytes(pattern=1), "a/2.png": png_bytes(pattern=2),
            "b/3.png": png_bytes(pattern=3), "b/4.png": png_bytes(pattern=4)}


def test_not_a_zip(tmp_path: Path) -> None:
    f = tmp_path / "photos.zip"
    f.write_text("this is a text file")
    with pytest.raises(IngestError, match="'photos.zip' is not a zip file"):
        ingest(f, tmp_path / "data")


def test_missing_source(tmp_path: Path) -> None:
    with pytest.raises(IngestError, match="source not found"):
        ingest(tmp_path / "nope.zip", tmp_path / "data")


def test_truncated_zip(make_zip, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    z = make_zip(_two_classes())
    z.write_bytes(z.read_bytes()[: z.stat().st_size // 2])
    with pytest.raises(IngestError, match="truncated or corrupt"):
        ingest(z, tmp_path / "data")


def test_corrupt_entry_is_skipped_not_fatal(make_zip, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    files = _two_classes()
    files["b/5.png"] = png_bytes(pattern=5, size=(64, 64))
    z = make_zip(files)
    raw = bytearray(z.read_bytes())
    with zipfile.ZipFile(z) as zf:
        info = zf.getinfo("b/5.png")
    start = info.header_offset + 30 + len(info.filename) + len(info.extra)
    raw[start + 10] ^= 0xFF  # flip compressed bytes -> CRC/inflate error
    z.write_bytes(bytes(raw))
    r = ingest(z, tmp_path / "data")
    reasons = {s.path: s.reason for s in r.skipped}
    assert reasons["b/5.png"].startswith(("corrupt zip entry", "corrupt or truncated image"))
    assert len(r.images) == 4


@pytest.mark.parametrize("name, why", [
    ("../evil.png", "path traversal"),
    ("a/../../evil.png", "path traversal"),
    ("/etc/evil.png", "absolute path"),
    ("C:/evil.png", "absolute path"),
    ("..\\evil.png", "path traversal"),
])
def test_zip_slip_refused(make_zip, tmp_path: Path, name: str, why: str) -> None:  # type: ignore[no-untyped-def]
    files = _two_classes()
    files[name] = png_bytes(pattern=9)
    data = tmp_path / "data"
    with pytest.raises(IngestError, match=f"refusing unsafe zip: entry .*{why}"):
        ingest(make_zip(files), data)
    assert not (tmp_path / "evil.png").exists()
    assert not any((data / "store").rglob("*.png"))  # refused before anything was stored


def test_symlink_entry_refused(tmp_path: Path) -> None:
    z = tmp_path / "link.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for k, v in _two_classes().items():
            zf.writestr(k, v)
        info = zipfile.ZipInfo("a/link.png")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(IngestError, match="'a/link.png' is a symbolic link"):
        ingest(z, tmp_path / "data")


def test_folder_symlinks_not_followed(tmp_path: Path) -> None:
    src = tmp_path / "src"
    for k, v in _two_classes().items():
        (src / k).parent.mkdir(parents=True, exist_ok=True)
        (src / k).write_bytes(v)
    outside = tmp_path / "secret.png"
    outside.write_bytes(png_bytes(pattern=7))
    os.symlink(outside, src / "a" / "sneaky.png")
    r = ingest(src, tmp_path / "data")
    assert {s.path: s.reason for s in r.skipped}["a/sneaky.png"] == "symbolic link (not followed)"
    assert len(r.images) == 4


def test_zip_bomb_total_size(make_zip, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    z = make_zip(_two_classes())
    with pytest.raises(IngestError, match="zip expands to more than 1,000 bytes"):
        ingest(z, tmp_path / "data", limits=IngestLimits(max_total_bytes=1_000))


def test_zip_bomb_entry_count(make_zip, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    files = _two_classes()
    files.update({f"junk/{i}.txt": b"x" for i in range(20)})
    with pytest.raises(IngestError, match="zip has 24 entries, over the limit of 10"):
        ingest(make_zip(files), tmp_path / "data", limits=IngestLimits(max_entries=10))


def test_zip_bomb_compression_ratio(make_zip, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    files = _two_classes()
    files["a/zeros.bmp"] = b"\x00" * (8 * 2**20)  # 8 MiB of zeros deflates ~1000:1
    with pytest.raises(IngestError, match=r"compression ratio of [\d,]+:1, over the limit of 200:1"):
        ingest(make_zip(files), tmp_path / "data")


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IEND", b""))


def _bmp_header_only(width: int, height: int) -> bytes:
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + len(info), 0, 0, 14 + len(info)) + info


# Pillow refuses images over 2 x Image.MAX_IMAGE_PIXELS (178,956,970) itself, before Workbench's
# own check runs; either way the message quotes Workbench's limit and the image's size.
@pytest.mark.parametrize("name, data, max_pixels, size", [
    ("huge.png", _png_header_only(200_000, 200_000), None, "200000x200000 = 40,000,000,000"),
    ("wide.png", _png_header_only(20_000, 10_000), None, "20000x10000 = 200,000,000"),
    ("huge.bmp", _bmp_header_only(30_000, 30_000), None, "30000x30000 = 900,000,000"),
    ("mid.png", _png_header_only(12_000, 10_000), None, "12000x10000 = 120,000,000"),  # ours only
    ("small-limit.png", _png_header_only(5_000, 5_000), 1_000_000, "5000x5000 = 25,000,000"),
    ("raised-limit.png", _png_header_only(20_000, 20_000), 300_000_000, "20000x20000 = 400,000,000"),
], ids=["png-over-pillow-cap", "png-200mp", "bmp-over-pillow-cap", "png-over-ours-only", "small-limit",
        "limit-raised-above-pillow"])
def test_pixel_bomb_message_quotes_workbench_limit(make_zip, tmp_path: Path, name: str, data: bytes,  # type: ignore[no-untyped-def]
                                                  max_pixels: int | None, size: str) -> None:
    files = _two_classes()
    files[f"a/{name}"] = data
    limits = IngestLimits() if max_pixels is None else IngestLimits(max_pixels=max_pixels)
    r = ingest(make_zip(files), tmp_path / "data", limits=limits)
    reason = {s.path: s.reason for s in r.skipped}[f"a/{name}"]
    limit = max_pixels or DEFAULT_MAX_PIXELS
    assert reason == (f"image is {size} pixels, over Workbench's limit of {limit:,} pixels "
                      "(possible decompression bomb)")
    assert "178956970" not in reason and "178,956,970" not in reason  # Pillow's own cap
    assert len(r.images) == 4


@pytest.mark.parametrize("source", ["zip", "folder"])
@pytest.mark.parametrize("name", ["a/empty.png", "a/empty.jpg", "b/empty.dcm", "b/no-extension"])
def test_zero_byte_file_says_empty(make_zip, tmp_path: Path, source: str, name: str) -> None:  # type: ignore[no-untyped-def]
    files = {**_two_classes(), name: b""}
    if source == "zip":
        src = make_zip(files)
    else:
        src = tmp_path / "src"
        for k, v in files.items():
            (src / k).parent.mkdir(parents=True, exist_ok=True)
            (src / k).write_bytes(v)
    r = ingest(src, tmp_path / "data")
    assert {s.path: s.reason for s in r.skipped}[name] == "empty file (0 bytes)"
    assert len(r.images) == 4


def test_non_images_unreadable_and_clutter(make_zip, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    files = _two_classes()
    good = png_bytes(pattern=8, size=(64, 64))
    files.update({
        "a/readme.txt": b"hello",
        "a/broken.png": good[: len(good) // 2],
        "a/anim.gif": _gif(),
        "__MACOSX/a/._1.png": b"\x00\x05\x16\x07",
        "a/.DS_Store": b"\x00\x00\x00\x01Bud1",
        "b/Thumbs.db": b"\xd0\xcf\x11\xe0",
        "b/.ipynb_checkpoints/3-checkpoint.png": png_bytes(pattern=3),
        "loose.png": png_bytes(pattern=11),
    })
    r = ingest(make_zip(files), tmp_path / "data")
    reasons = {s.path: s.reason for s in r.skipped}
    assert reasons["a/readme.txt"] == "not an image (unrecognised file content)"
    assert reasons["a/broken.png"].startswith("corrupt or truncated image")
    assert reasons["a/anim.gif"] == "GIF images are not supported (convert to PNG)"
    for clutter in ("__MACOSX/a/._1.png", "a/.DS_Store", "b/Thumbs.db", "b/.ipynb_checkpoints/3-checkpoint.png"):
        assert reasons[clutter] == "OS clutter"
    assert reasons["loose.png"] == "not inside a class folder"
    assert len(r.images) == 4


def _gif() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, format="GIF")
    return buf.getvalue()


def test_single_class_fatal_and_leaves_no_files(make_zip, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    data = tmp_path / "data"
    z = make_zip({"only/1.png": png_bytes(pattern=1), "only/2.png": png_bytes(pattern=2)})
    with pytest.raises(IngestError, match="need at least 2 classes, found only 'only' \\(2 images\\)"):
        ingest(z, data)
    assert not any(p.is_file() and p.name != STORE_LOCK for p in data.rglob("*"))


def test_no_images_fatal(make_zip, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    z = make_zip({"a/x.txt": b"x", "b/y.txt": b"y"})
    with pytest.raises(IngestError, match="no usable images found .*2x not an image"):
        ingest(z, tmp_path / "data")
    with pytest.raises(IngestError, match="it is empty"):
        ingest(make_zip({}), tmp_path / "data")


def test_failed_ingest_keeps_files_other_datasets_use(make_zip, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    data = tmp_path / "data"
    ok = ingest(make_zip(_two_classes()), data)
    kept = {data / r.store_path for r in ok.images}
    bad = make_zip({"a/1.png": png_bytes(pattern=1), "a/new.png": png_bytes(pattern=42)})
    with pytest.raises(IngestError, match="need at least 2 classes"):
        ingest(bad, data)
    assert {p for p in (data / "store").rglob("*") if p.is_file()} == kept


def test_csv_missing_files_listed_and_bad_csv(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(4):
        (src / f"{i}.png").write_bytes(png_bytes(pattern=i + 1))
    (src / "m.csv").write_text("path,label\n0.png,a\n1.png,a\n2.png,b\n3.png,b\nmissing1.png,a\n../../etc/passwd,b\n")
    r = ingest(src / "m.csv", tmp_path / "data")
    assert r.health["missing_from_csv"] == ["missing1.png"]
    reasons = {s.path: s.reason for s in r.skipped}
    assert "must stay inside the dataset" in reasons["../../etc/passwd"]
    bad = tmp_path / "bad.csv"
    bad.write_text("file_name,klass\n0.png,a\n")
    with pytest.raises(IngestError, match="needs 'path' and 'label' columns"):
        ingest(src, tmp_path / "data", csv=bad)


# A zip of arbitrary entry names (including traversal, absolute, odd unicode) must never
# create anything outside the data dir, whatever ingest decides.
_segment = st.one_of(
    st.sampled_from(["..", ".", "", "a", "b", "__MACOSX", "train", "C:", "~"]),
    st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00/\\"),
            min_size=1, max_size=6),
)
_name = st.builds(lambda segs, lead: lead + "/".join(segs),
                  st.lists(_segment, min_size=1, max_size=4), st.sampled_from(["", "/", "\\", "../"]))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(names=st.lists(_name, min_size=1, max_size=6, unique=True))
def test_property_nothing_written_outside_data_dir(tmp_path_factory: pytest.TempPathFactory,
                                                    names: list[str]) -> None:
    root = tmp_path_factory.mktemp("prop")
    z = root / "in.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for i, n in enumerate(names):
            zf.writestr(zipfile.ZipInfo(n), png_bytes(pattern=i + 1))
        zf.writestr("x/ok.png", png_bytes(pattern=99))
        zf.writestr("y/ok.png", png_bytes(pattern=98))
    data = root / "deep" / "data"
    before = _snapshot(root)
    try:
        r = ingest(z, data)
        for rec in r.images:
            p = (data / rec.store_path).resolve()
            assert p.is_relative_to((data / "store").resolve())
    except IngestError:
        pass
    created = _snapshot(root) - before
    assert all(c.startswith("deep/data") or c == "deep" for c in created), created
    assert not any((data / "tmp").iterdir())
