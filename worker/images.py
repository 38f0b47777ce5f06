"""Decode stage: photo bytes -> RGB pixels with EXIF orientation applied, or a specific error."""

from __future__ import annotations

import io
import logging
import math
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pillow_heif
from numpy.typing import NDArray
from PIL import Image, ImageFile, UnidentifiedImageError

from worker.errors import CorruptImage, ImageTooLarge, ImageTooSmall, UnsupportedImage
from worker.types import DecodedImage

try:  # JPEG XL is optional: without the plugin a .jxl photo is reported as unsupported
    import pillow_jxl  # noqa: F401

    HAS_JXL = True
except ImportError:
    HAS_JXL = False

logger = logging.getLogger(__name__)

PHOTO_SUFFIXES = frozenset(
    {
        ".jpg",
        ".jpeg",
        ".png",
        ".webp",
        ".gif",
        ".bmp",
        ".tif",
        ".tiff",
        ".heic",
        ".heif",
        ".avif",
        ".jxl",
    }
)
"""File name endings of the formats `decode_image` reads (for listing folders of photos)."""

pillow_heif.register_heif_opener()  # HEIC/HEIF; Pillow 13 reads AVIF itself

ORIENTATION_TAG = 0x0112
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SIGNATURES = [  # (prefix, offset, name): to tell a damaged photo from something that is no photo
    (b"\xff\xd8\xff", 0, "JPEG"),
    (b"\x89PNG\r\n\x1a\n", 0, "PNG"),
    (b"GIF8", 0, "GIF"),
    (b"WEBP", 8, "WebP"),
    (b"II*\x00", 0, "TIFF"),
    (b"MM\x00*", 0, "TIFF"),
    (b"ftyp", 4, "HEIF/AVIF"),
    (b"\xff\x0a", 0, "JPEG XL"),
    (b"\x00\x00\x00\x0cJXL ", 0, "JPEG XL"),
    (b"BM", 0, "BMP"),
]
_KNOWN = "JPEG, PNG, HEIC, AVIF, WebP, GIF, BMP, TIFF" + (", JPEG XL" if HAS_JXL else "")
_PILLOW_LIMIT_LOCK = threading.Lock()


def _sniff(data: bytes) -> str | None:
    """The format the first bytes claim, or None."""
    return next((n for sig, at, n in _SIGNATURES if data[at : at + len(sig)] == sig), None)


def _why(exc: BaseException) -> str:
    """The first line of a decoder's message, short enough for a user-facing error."""
    lines = str(exc).strip().splitlines()
    return lines[0][:120] if lines else type(exc).__name__


def _mpx(pixels: int) -> str:
    if pixels < 1_000_000:
        return f"{pixels:,} px"
    return f"{pixels / 1e6:.1f}".removesuffix(".0") + " Mpx"


@contextmanager
def _pillow_bomb_check_off() -> Iterator[None]:
    # Pillow's global guard (warning at ~89 Mpx, error at ~179 Mpx) would otherwise answer before
    # our per-call cap is even looked at, and without the size we need in the message. It is off
    # only while a header is parsed (no pixels), under a lock, and restored for everyone else.
    with _PILLOW_LIMIT_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _raise_pillow_limit(max_image_pixels: int) -> None:
    # TIFF and animated PNG/GIF re-run Pillow's check while loading pixels; an image our cap
    # accepted must not be refused (or warned about) there. Only ever raised, never disabled.
    with _PILLOW_LIMIT_LOCK:
        if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < max_image_pixels:
            Image.MAX_IMAGE_PIXELS = max_image_pixels


def _isobmff_truncated(data: bytes) -> bool:
    """Whether a HEIF/AVIF file's top-level boxes run past its end (libheif would fill the
    missing tiles with green instead of failing)."""
    pos = 0
    while pos + 8 <= len(data):
        size, _ = struct.unpack_from(">I4s", data, pos)
        if size == 1:
            if pos + 16 > len(data):
                return True
            size = struct.unpack_from(">Q", data, pos + 8)[0]
        elif size == 0:  # box runs to the end of the file
            return False
        if size < 8:
            return True
        pos += size
    return pos != len(data)


def _open(data: bytes, name: str) -> ImageFile.ImageFile:
    """Open the header (no pixels decoded) or raise the error that says what is wrong."""
    if not data:
        raise CorruptImage(name, "empty file (0 bytes)")
    claimed = _sniff(data)
    try:
        with _pillow_bomb_check_off():
            return Image.open(io.BytesIO(data))
    except UnidentifiedImageError as exc:
        if claimed == "JPEG XL" and not HAS_JXL:
            raise UnsupportedImage(
                name, "JPEG XL is not supported here (install pillow-jxl-plugin)"
            ) from exc
        if claimed is not None:
            raise CorruptImage(name, f"damaged or truncated {claimed} file") from exc
        raise UnsupportedImage(
            name, f"not an image: starts with {data[:12]!r}, which is none of {_KNOWN}"
        ) from exc
    except MemoryError:
        raise
    except Exception as exc:  # any decoder failure on untrusted bytes is the file's fault
        raise CorruptImage(name, f"damaged {claimed or 'image'} file ({_why(exc)})") from exc


def _orientation(im: Image.Image, name: str, *, header_only: bool = False) -> int:
    """The EXIF orientation (1..8), 1 when absent or unreadable."""
    if im.format == "PNG" and "exif" not in im.info:
        if header_only:
            return 1
        im.load()  # Pillow finds an eXIf chunk stored after the pixels only by decoding them
    try:
        value = im.getexif().get(ORIENTATION_TAG, 1)
    except Exception as exc:  # broken EXIF should not cost the user the photo
        logger.warning("%s: unreadable EXIF, orientation ignored (%s)", name, exc)
        return 1
    return value if value in _TRANSPOSE else 1


def _oriented_size(im: Image.Image, orientation: int) -> tuple[int, int]:
    width, height = im.size
    return (height, width) if orientation >= 5 else (width, height)


def _working_size(width: int, height: int, working_pixels: int | None) -> tuple[int, int]:
    """The largest size with the same aspect ratio and at most `working_pixels` pixels."""
    if not working_pixels or width * height <= working_pixels:
        return width, height
    # a hair under the exact factor so that float rounding cannot land one pixel over
    factor = math.sqrt(working_pixels / (width * height)) * (1 - 1e-9)
    h = max(1, int(height * factor))
    w = max(1, min(int(width * factor), working_pixels // h))
    return w, h


def _dct_size(width: int, height: int, working_pixels: int | None) -> tuple[int, int] | None:
    """A JPEG DCT-scaled size (1/2, 1/4, 1/8) that fits `working_pixels` without a resize.

    Resizing after decoding costs more than decoding itself, so a DCT scale that lands
    between half the budget and the budget is used as it is.
    """
    if not working_pixels or width * height <= working_pixels:
        return None
    for denom in (2, 4, 8):
        w, h = -(-width // denom), -(-height // denom)
        if w * h <= working_pixels:
            return (w, h) if w * h >= working_pixels // 2 else None
    return None


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode as 8-bit RGB; transparency is composited on white."""
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if im.mode.startswith("I") or im.mode == "F":
        # Pillow clips wide greyscale to 0..255 instead of scaling it; scale by the type's range
        grey = np.asarray(im).astype(np.float64)
        if im.mode == "F":
            top = 1.0 if grey.max(initial=0.0) <= 1.0 else 255.0
        else:
            top = 65535.0 if im.mode.startswith("I;16") or grey.max(initial=0) > 255 else 255.0
        im = Image.fromarray(np.clip(grey * (255.0 / top) + 0.5, 0, 255).astype(np.uint8))
    return im.convert("RGB")  # L, 1, P, CMYK (incl. Adobe's inverted JPEGs), YCbCr, RGBX


def image_size(data: bytes, *, name: str) -> tuple[int, int]:
    """(width, height) after EXIF orientation, read from the header only."""
    with _open(data, name) as im:
        return _oriented_size(im, _orientation(im, name, header_only=True))


def decode_image(
    data: bytes,
    *,
    name: str,
    working_pixels: int | None = None,
    max_image_pixels: int = 150_000_000,
    min_side: int = 2,
) -> DecodedImage:
    """Decode photo bytes to upright RGB, at most `working_pixels` pixels when given.

    JPEGs are decoded at a reduced DCT scale when that is enough. Raises CorruptImage,
    UnsupportedImage, ImageTooLarge or ImageTooSmall, each naming `name`.
    """
    start = time.perf_counter()
    if ImageFile.LOAD_TRUNCATED_IMAGES:  # someone turned it on: we cannot see truncation then
        logger.warning("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is on: truncated photos decode grey")
    with _open(data, name) as im:
        width, height = im.size  # stored size: orientation swaps sides, not the pixel count
        if width * height > max_image_pixels:
            raise ImageTooLarge(
                name,
                f"{width}x{height} = {_mpx(width * height)}, over the {_mpx(max_image_pixels)}"
                " cap (AFTERTRIP_MAX_IMAGE_PIXELS)",
            )
        if min(width, height) < min_side:
            raise ImageTooSmall(name, f"{width}x{height} is too small (sides under {min_side} px)")
        if im.format in ("HEIF", "AVIF") and _isobmff_truncated(data):
            raise CorruptImage(name, f"truncated {im.format} file")
        _raise_pillow_limit(max_image_pixels)
        try:
            orientation = _orientation(im, name)
            width, height = _oriented_size(im, orientation)
            target = _working_size(width, height, working_pixels)
            dct = _dct_size(width, height, working_pixels)
            if im.format in ("JPEG", "MPO") and dct is not None:
                target = dct
            stored_target = target[::-1] if orientation >= 5 else target
            box = None
            if im.format in ("JPEG", "MPO") and target != (width, height):
                # DCT scaling decodes 1/2, 1/4 or 1/8 of the pixels, never below the target
                drafted = im.draft("RGB", stored_target)
                box = drafted[1] if drafted else None
            im.load()
            rgb = _to_rgb(im)
            if rgb.size != stored_target:
                rgb = rgb.resize(
                    stored_target, Image.Resampling.BILINEAR, box=box, reducing_gap=2.0
                )
            if orientation in _TRANSPOSE:
                rgb = rgb.transpose(_TRANSPOSE[orientation])
            pixels = np.array(rgb, dtype=np.uint8)
        except MemoryError:
            raise
        except Exception as exc:  # truncated or damaged pixel data, whatever the decoder says
            raise CorruptImage(
                name, f"damaged or truncated {im.format} file ({_why(exc)})"
            ) from exc
        fmt = str(im.format)
    ms = (time.perf_counter() - start) * 1000
    logger.debug(
        "decoded %s: %s %dx%d -> %s in %.0f ms", name, fmt, width, height, pixels.shape, ms
    )
    return DecodedImage(
        pixels=pixels,
        original_width=width,
        original_height=height,
        scale=pixels.shape[1] / width,
        format=fmt,
    )


def encode_jpeg(
    pixels: NDArray[np.uint8], *, max_side: int | None = None, quality: int = 85
) -> bytes:
    """RGB pixels as JPEG bytes (thumbnails), scaled down so the longest side <= `max_side`."""
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 uint8 RGB array, got {pixels.dtype} {pixels.shape}")
    im = Image.fromarray(np.ascontiguousarray(pixels))
    if max_side is not None and max(im.size) > max_side:
        factor = max_side / max(im.size)
        size = (max(1, round(im.width * factor)), max(1, round(im.height * factor)))
        im = im.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    out = io.BytesIO()
    im.save(out, "JPEG", quality=quality)
    return out.getvalue()
