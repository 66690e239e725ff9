"""core.images.load_rgb / decode on every supported (and unsupported) kind of file."""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from builders import write_dicom
from PIL import Image

from core.images import ImageDecodeError, decode, load_rgb


def _save(im: Image.Image, path: Path, **kw: object) -> Path:
    im.save(path, **kw)
    return path


def test_rgb_jpeg_bmp_tiff_webp(tmp_path: Path) -> None:
    base = Image.new("RGB", (40, 30), (10, 120, 200))
    for ext, fmt in ((".jpg", "JPEG"), (".bmp", "BMP"), (".tif", "TIFF"), (".webp", "WEBP")):
        d = decode(_save(base, tmp_path / f"x{ext}"))
        assert (d.format, d.image.mode, d.image.size, d.mode) == (fmt, "RGB", (40, 30), "RGB")


def test_sixteen_bit_png_scaled_to_8_bit(tmp_path: Path) -> None:
    arr = np.array([[0, 65535], [257 * 128, 1000]], dtype=np.uint16)
    d = decode(_save(Image.fromarray(arr), tmp_path / "g16.png"))
    assert d.mode == "I;16" and d.bit_depth == 16
    px = np.asarray(d.image)
    assert px.shape == (2, 2, 3)
    assert px[0, 0].tolist() == [0, 0, 0] and px[0, 1].tolist() == [255, 255, 255]
    assert px[1, 0, 0] == 128


def test_rgba_composited_on_white(tmp_path: Path) -> None:
    im = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    im.putpixel((0, 0), (0, 0, 255, 255))
    rgb = load_rgb(_save(im, tmp_path / "a.png"))
    assert rgb.getpixel((1, 1)) == (255, 255, 255)  # transparent -> white, not black
    assert rgb.getpixel((0, 0)) == (0, 0, 255)


def test_palette_with_transparency(tmp_path: Path) -> None:
    im = Image.new("P", (4, 4), 0)
    im.putpalette([0, 255, 0] + [0, 0, 0] * 255)
    d = decode(_save(im, tmp_path / "p.png", transparency=0))
    assert d.mode == "P" and d.image.getpixel((0, 0)) == (255, 255, 255)
    im2 = Image.new("P", (4, 4), 0)
    im2.putpalette([0, 255, 0] + [0, 0, 0] * 255)
    assert load_rgb(_save(im2, tmp_path / "p2.png")).getpixel((0, 0)) == (0, 255, 0)


def test_cmyk_and_grayscale(tmp_path: Path) -> None:
    d = decode(_save(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), tmp_path / "c.jpg"))
    assert d.mode == "CMYK" and d.image.mode == "RGB"
    r, g, b = d.image.getpixel((4, 4))
    assert r > 200 and g < 60 and b < 60  # cyan 0, magenta+yellow full = red
    d = decode(_save(Image.new("L", (8, 8), 77), tmp_path / "g.png"))
    assert d.mode == "L" and d.image.getpixel((0, 0)) == (77, 77, 77)


def test_exif_orientation_applied(tmp_path: Path) -> None:
    im = Image.new("RGB", (60, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    d = decode(_save(im, tmp_path / "o.jpg", exif=exif.tobytes()))
    assert (d.width, d.height) == (20, 60) and d.image.size == (20, 60)


def test_dicom_windowing_to_8_bit(tmp_path: Path) -> None:
    arr = np.array([[0, 1000], [2000, 4000]], dtype=np.uint16)
    d = decode(write_dicom(tmp_path / "ct.dcm", arr))
    assert (d.format, d.mode, d.bit_depth, d.ext) == ("DICOM", "DICOM", 16, ".dcm")
    px = np.asarray(d.image)[:, :, 0]
    assert px[0, 0] == 0 and px[1, 1] == 255 and 0 < px[0, 1] < px[1, 0] < 255
    # A narrow window saturates everything outside it.
    px = np.asarray(load_rgb(write_dicom(tmp_path / "w.dcm", arr, window=(1000, 200))))[:, :, 0]
    assert px[0, 0] == 0 and px[1, 0] == 255 and px[1, 1] == 255
    # MONOCHROME1: low values are white.
    px = np.asarray(load_rgb(write_dicom(tmp_path / "m1.dcm", arr, photometric="MONOCHROME1")))
    assert px[0, 0, 0] == 255 and px[1, 1, 0] == 0


def test_real_pydicom_sample() -> None:
    from pydicom.data import get_testdata_file

    d = decode(get_testdata_file("CT_small.dcm"))
    assert d.image.size == (128, 128) and d.image.mode == "RGB"


def _png_header_only(path: Path, width: int, height: int) -> Path:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path


def test_decompression_bomb_refused_before_decoding(tmp_path: Path) -> None:
    bomb = _png_header_only(tmp_path / "bomb.png", 100_000, 100_000)  # 10^10 pixels, 45 bytes
    with pytest.raises(ImageDecodeError, match="decompression bomb"):
        decode(bomb)
    ok = _save(Image.new("RGB", (100, 100)), tmp_path / "ok.png")
    with pytest.raises(ImageDecodeError, match="10,000 pixels, over Workbench.s limit of 5,000 pixels"):
        decode(ok, max_pixels=5_000)


def test_unsupported_and_broken_files(tmp_path: Path) -> None:
    gif = _save(Image.new("RGB", (4, 4)), tmp_path / "a.gif")
    with pytest.raises(ImageDecodeError, match="GIF images are not supported"):
        decode(gif)
    txt = tmp_path / "notes.jpg"
    txt.write_text("hello")
    with pytest.raises(ImageDecodeError, match="not an image"):
        decode(txt)
    good = _save(Image.effect_noise((200, 200), 64).convert("RGB"), tmp_path / "n.jpg", quality=95)
    trunc = tmp_path / "trunc.jpg"
    trunc.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ImageDecodeError, match="corrupt or truncated"):
        decode(trunc)
    bad_dcm = tmp_path / "bad.dcm"
    bad_dcm.write_bytes(b"\x00" * 128 + b"DICM" + b"\x01\x02garbage")
    with pytest.raises(ImageDecodeError, match="DICOM"):
        decode(bad_dcm)
