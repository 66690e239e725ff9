"""Decode any supported image file into an 8-bit RGB PIL image.

``load_rgb(path)`` is the one function ingest, training and prediction all call, so a
given file always becomes exactly the same pixels everywhere.

Supported: JPEG, PNG (incl. 16-bit, palette, RGBA/LA), BMP, TIFF, WebP, HEIC/HEIF (recent
phones' default, through pillow-heif), DICOM.
GIF is deliberately unsupported (mostly animations/placeholders in practice).
"""
from __future__ import annotations

import io
import os
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, NamedTuple

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Larger than any sensible training image (10k x 10k), small enough that decoding
# cannot exhaust memory (a 100 MP RGB image is ~300 MB).
DEFAULT_MAX_PIXELS = 100_000_000

# PIL format name -> canonical store extension.
SUPPORTED_FORMATS: dict[str, str] = {
    "JPEG": ".jpg",
    "MPO": ".jpg",  # multi-picture JPEG from phones: first frame is a normal JPEG
    "PNG": ".png",
    "BMP": ".bmp",
    "TIFF": ".tif",
    "WEBP": ".webp",
    "HEIF": ".heic",  # needs pillow-heif (a declared dependency); see heif_support()
    "DICOM": ".dcm",
}

GRAYSCALE_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F", "DICOM"}
ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
SIXTEEN_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I"}

PathLike = str | Path
Source = PathLike | bytes  # a file, or a file's bytes (the prediction server checks uploads in memory)


class ImageDecodeError(ValueError):
    """The file is not a supported, intact image. ``str(err)`` is a user-facing reason."""


@dataclass
class DecodedImage:
    image: Image.Image  # 8-bit RGB, EXIF orientation applied
    format: str  # key of SUPPORTED_FORMATS
    mode: str  # original PIL mode, or 'DICOM'
    width: int  # after EXIF orientation
    height: int
    bit_depth: int  # 8 or 16 (16 for 16-bit PNG/TIFF and >8-bit DICOM)

    @property
    def ext(self) -> str:
        return SUPPORTED_FORMATS[self.format]


def heif_support() -> bool:
    """Register pillow-heif's HEIC/HEIF opener with PIL once; False when pillow-heif is missing."""
    global _HEIF_REGISTERED
    if _HEIF_REGISTERED is None:
        try:
            from pillow_heif import register_heif_opener
        except ImportError:
            _HEIF_REGISTERED = False
        else:
            register_heif_opener()
            _HEIF_REGISTERED = True
    return _HEIF_REGISTERED


_HEIF_REGISTERED: bool | None = None
_HEIF_BRANDS = {b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1"}


def _head(source: Source, start: int, n: int) -> bytes:
    """``n`` bytes from ``start`` of a file or of bytes; b"" for a file that cannot be read."""
    if isinstance(source, bytes):
        return source[start:start + n]
    try:
        with open(source, "rb") as f:
            f.seek(start)
            return f.read(n)
    except OSError:
        return b""


def _open(source: Source) -> IO[bytes]:
    return io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")


def is_heif(source: Source) -> bool:
    """HEIC/HEIF files open with an ISO-BMFF 'ftyp' box naming a HEIF brand."""
    head = _head(source, 0, 12)
    return head[4:8] == b"ftyp" and head[8:12] in _HEIF_BRANDS


def is_dicom(source: Source) -> bool:
    """DICOM Part 10 files carry 'DICM' at byte 128."""
    return _head(source, 128, 4) == b"DICM"


def _too_many_pixels(width: int, height: int, max_pixels: int) -> ImageDecodeError:
    return ImageDecodeError(
        f"image is {width}x{height} = {width * height:,} pixels, over Workbench's limit of "
        f"{max_pixels:,} pixels (possible decompression bomb)"
    )


def _check_pixels(width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise _too_many_pixels(width, height, max_pixels)


def _header_size(source: Source) -> tuple[int, int] | None:
    """Width and height read from the header alone, without Pillow's own pixel cap.

    Only called after that cap fired inside ``Image.open``, so the message can quote the
    image's real size and Workbench's limit instead of Pillow's internal one. Opening is lazy:
    no pixel data is read.
    """
    Image.init()
    name = "" if isinstance(source, bytes) else str(source)
    with _open(source) as fp:
        prefix = fp.read(16)
        for fmt in list(Image.ID):
            factory, accept = Image.OPEN[fmt]
            try:
                ok = True if accept is None else accept(prefix)
                if isinstance(ok, str) or not ok:  # a str is Pillow's "maybe, with a warning"
                    continue
                fp.seek(0)
                im = factory(fp, name)
                return int(im.size[0]), int(im.size[1])
            except Exception:  # noqa: BLE001 - not this format: try the next one
                continue
    return None


def _bomb_error(source: Source, pillow_message: str, max_pixels: int) -> ImageDecodeError:
    size = _header_size(source)
    if size is None:  # fall back to the pixel count Pillow reports
        m = re.search(r"\((\d+) pixels\)", pillow_message)
        pixels = f"{int(m.group(1)):,} pixels" if m else "too many pixels"
        return ImageDecodeError(
            f"image has {pixels}, over Workbench's limit of {max_pixels:,} pixels "
            "(possible decompression bomb)"
        )
    w, h = size
    if w * h > max_pixels:
        return _too_many_pixels(w, h, max_pixels)
    # Workbench's limit was raised above what the image library agrees to decode.
    return ImageDecodeError(
        f"image is {w}x{h} = {w * h:,} pixels: within Workbench's limit of {max_pixels:,} "
        f"pixels, but over the {2 * (Image.MAX_IMAGE_PIXELS or 0):,} pixels the image library decodes"
    )


def _to_uint8_gray(arr: np.ndarray, max_value: float) -> np.ndarray:
    arr = np.clip(arr.astype(np.float64), 0, max_value)
    return np.round(arr * (255.0 / max_value)).astype(np.uint8)


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I;16") or mode == "I":
        # 16-bit samples scaled linearly (full range 0..65535 -> 0..255): faithful to
        # the file, and identical for every image so intensities stay comparable.
        arr = np.asarray(img)
        return Image.fromarray(_to_uint8_gray(arr, 65535.0), "L").convert("RGB")
    if mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        scaled = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
        return Image.fromarray(np.round(scaled * 255).astype(np.uint8), "L").convert("RGB")
    if mode == "P" or mode == "PA":
        # Palette images may carry transparency: go through RGBA, then composite.
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        # Transparent pixels become white (not black, which is what a plain convert gives).
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    # L, 1, CMYK, YCbCr, LAB, HSV, RGBX ...
    return img.convert("RGB")


def _decode_dicom(path: PathLike, max_pixels: int) -> DecodedImage:
    try:
        import pydicom
        from pydicom.pixels import apply_modality_lut, apply_voi_lut
    except ImportError as e:  # pragma: no cover - pydicom is a hard dependency
        raise ImageDecodeError(f"DICOM support needs pydicom: {e}") from e
    try:
        ds = pydicom.dcmread(str(path))
        rows, cols = int(ds.Rows), int(ds.Columns)
        _check_pixels(cols, rows, max_pixels)
        arr = ds.pixel_array
    except ImageDecodeError:
        raise
    except Exception as e:  # pydicom raises many types for broken/compressed files
        raise ImageDecodeError(f"unreadable DICOM file: {e}") from e
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if frames > 1:
        arr = arr[0]  # first frame of a multi-frame series
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2"))
    bits = int(getattr(ds, "BitsStored", 8) or 8)
    if photometric in ("RGB", "YBR_FULL", "YBR_FULL_422") and arr.ndim == 3:
        rgb = arr.astype(np.uint8) if arr.dtype != np.uint8 else arr
        img = Image.fromarray(rgb, "RGB")
    else:
        values = apply_modality_lut(arr, ds)
        if "WindowCenter" in ds and "WindowWidth" in ds:
            # Use the window the modality chose (e.g. soft tissue for CT).
            values = apply_voi_lut(values, ds)
        values = np.asarray(values, dtype=np.float64)
        lo, hi = float(values.min()), float(values.max())
        scaled = (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)
        if photometric == "MONOCHROME1":  # 0 = white in MONOCHROME1
            scaled = 1.0 - scaled
        img = Image.fromarray(np.round(scaled * 255).astype(np.uint8), "L").convert("RGB")
    return DecodedImage(
        image=img, format="DICOM", mode="DICOM", width=img.width, height=img.height,
        bit_depth=16 if bits > 8 else 8,
    )


def _refuse_before_opening(source: Source) -> None:
    """What needs no image library: an empty file, a HEIC photo this installation cannot read."""
    size = len(source) if isinstance(source, bytes) else os.stat(source).st_size  # a missing file raises
    if size == 0:  # say so plainly rather than "unrecognised content"
        raise ImageDecodeError("empty file (0 bytes)")
    if not heif_support() and is_heif(source):
        raise ImageDecodeError("HEIC/HEIF photo, but the pillow-heif package that reads it is not installed "
                               "(pip install pillow-heif)")


@contextmanager
def _opened(source: Source) -> Iterator[Image.Image]:
    """``Image.open`` (lazy: only the header is read until ``load``) of a supported format; Pillow's
    errors inside the block become ImageDecodeError. Pillow's DecompressionBombError passes through:
    the caller decides what an image that large means."""
    try:
        with warnings.catch_warnings():
            # We enforce our own pixel limit; silence PIL's DecompressionBombWarning.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
                fmt = im.format or "unknown"
                if fmt == "GIF":
                    raise ImageDecodeError("GIF images are not supported (convert to PNG)")
                if fmt not in SUPPORTED_FORMATS:
                    raise ImageDecodeError(f"unsupported image format {fmt}")
                yield im
    except (ImageDecodeError, Image.DecompressionBombError, FileNotFoundError):
        raise
    except UnidentifiedImageError:
        raise ImageDecodeError("not an image (unrecognised file content)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageDecodeError(f"corrupt or truncated image: {e}") from e


class HeaderSize(NamedTuple):
    width: int
    height: int
    frames: int  # frames ``decode`` turns into pixels: 1, except a multi-frame DICOM (pydicom decodes all)

    @property
    def pixels(self) -> int:
        return self.width * self.height * self.frames


def header_size(source: Source) -> HeaderSize:
    """The size the file's header states, without decoding a pixel (Pillow opens lazily; DICOM is
    read without its pixel data), so a decompression bomb costs nothing here. For callers that
    budget decoding work before ``decode`` (the prediction server). Raises ImageDecodeError, with
    ``decode``'s reasons, for what ``decode`` refuses before the pixels: empty, not an image, GIF,
    unsupported format, unreadable DICOM header."""
    _refuse_before_opening(source)
    if is_dicom(source):
        try:
            import pydicom

            with _open(source) as fp:
                ds = pydicom.dcmread(fp, stop_before_pixels=True)
            return HeaderSize(int(ds.Columns), int(ds.Rows), max(1, int(getattr(ds, "NumberOfFrames", 1) or 1)))
        except Exception as e:  # pydicom raises many types for broken files
            raise ImageDecodeError(f"unreadable DICOM file: {e}") from e
    try:
        with _opened(source) as im:
            return HeaderSize(im.width, im.height, 1)  # EXIF orientation may swap them, not their product
    except Image.DecompressionBombError:
        size = _header_size(source)  # over Pillow's own cap: the header still says how large
        if size is None:  # pragma: no cover - Pillow measured it to refuse it
            raise ImageDecodeError("image too large for the image library to open") from None
        return HeaderSize(*size, 1)


def decode(path: PathLike, *, max_pixels: int = DEFAULT_MAX_PIXELS, reduce_to: int | None = None) -> DecodedImage:
    """Fully decode ``path`` (so truncated files are caught) and describe the original.

    ``reduce_to``: a JPEG at least twice that size on its shorter side is decoded at 1/2, 1/4
    or 1/8 scale in the DCT domain (``Image.draft``), keeping both sides >= ``reduce_to``:
    several times faster for phone photos. Training uses it; evaluation never does, so the
    exported model sees exactly the pixels it was validated on.
    Raises ImageDecodeError with a user-facing reason for anything unusable.
    """
    _refuse_before_opening(path)
    if is_dicom(path):
        return _decode_dicom(path, max_pixels)
    try:
        with _opened(path) as im:
            fmt = im.format or "unknown"
            # Header-only size check before decoding any pixels.
            _check_pixels(im.width, im.height, max_pixels)
            if getattr(im, "n_frames", 1) > 1:
                im.seek(0)
            mode = im.mode
            if reduce_to and fmt == "JPEG" and min(im.size) >= 2 * reduce_to:
                im.draft("RGB", (reduce_to, reduce_to))
            im.load()
            bit_depth = 16 if mode in SIXTEEN_BIT_MODES else 8
            oriented = ImageOps.exif_transpose(im)
            rgb = _to_rgb(oriented)
            if rgb is im:
                rgb = im.copy()  # detach from the file handle closed below
    except Image.DecompressionBombError as e:
        raise _bomb_error(path, str(e), max_pixels) from None
    return DecodedImage(
        image=rgb, format=fmt, mode=mode, width=rgb.width, height=rgb.height, bit_depth=bit_depth
    )


def load_rgb(path: PathLike, *, max_pixels: int = DEFAULT_MAX_PIXELS, reduce_to: int | None = None) -> Image.Image:
    """THE image loader: any supported file -> 8-bit RGB PIL image, EXIF orientation applied.

    ``reduce_to``: see ``decode`` (fast reduced JPEG decoding, for training pixels only).
    """
    return decode(path, max_pixels=max_pixels, reduce_to=reduce_to).image


__all__ = [
    "DEFAULT_MAX_PIXELS",
    "SUPPORTED_FORMATS",
    "GRAYSCALE_MODES",
    "ALPHA_MODES",
    "SIXTEEN_BIT_MODES",
    "ImageDecodeError",
    "DecodedImage",
    "decode",
    "HeaderSize",
    "header_size",
    "load_rgb",
    "is_dicom",
    "is_heif",
    "heif_support",
]
