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

import cv2
import numpy as np
import pillow_heif
from numpy.typing import NDArray
from PIL import Image, ImageFile, UnidentifiedImageError

from worker.errors import CorruptImage, ImageTooLarge, ImageTooSmall, PhotoError, UnsupportedImage
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


DEFAULT_MAX_DECODED_BYTES = 600_000_000
"""Decoded bytes one photo may take (AFTERTRIP_MAX_DECODED_BYTES): 150 Mpx of 8-bit RGB."""

# Bytes per pixel Pillow stores for a mode (RGB is padded to 4); modes not named take 4.
_STORED_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2}
# Decoders that fill buffers of their own and then copy them into Pillow's image hold the
# pixels several times while they decode: measured 16 bytes/px for WebP, 7.3 for HEIF
# (docs/reliability.md, `python -m tests.support.decode_memory`); AVIF and JPEG XL taken as HEIF.
_DECODER_COPIES = {"WEBP": 4, "HEIF": 2, "AVIF": 2, "JXL": 2}
# A still, opaque WebP is decoded by OpenCV (`_decode_webp`) straight to 3 bytes a pixel:
# measured 6.1 bytes/px at its peak (a 5184x3456 photo: 110 MB, against Pillow's 280 MB).
_OPENCV_WEBP_BYTES = 7


def _opencv_webp(im: Image.Image) -> bool:
    """Whether `im` is a WebP that OpenCV decodes as Pillow would: one frame, no alpha."""
    return im.format == "WEBP" and im.mode == "RGB" and getattr(im, "n_frames", 1) == 1


def decoded_bytes(im: Image.Image) -> int:
    """The memory decoding `im` at its current size (after any JPEG draft) will hold at most."""
    if _opencv_webp(im):
        return im.width * im.height * _OPENCV_WEBP_BYTES
    per_pixel = _STORED_BYTES.get(im.mode, 4)
    return im.width * im.height * per_pixel * _DECODER_COPIES.get(str(im.format), 1)


def _decode_webp(data: bytes, target: tuple[int, int]) -> Image.Image:
    """A still, opaque WebP's pixels at `target` (stored orientation), decoded by OpenCV.

    Pillow decodes WebP through libwebp's animation decoder: an RGBA canvas, a copy of it
    as bytes, then its own image, 16 bytes a pixel in all at the peak; OpenCV's libwebp
    decodes straight to 3 bytes a pixel. The pixels are the same decoder's (libwebp)."""
    bgr = cv2.imdecode(
        np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
    )
    if bgr is None:
        raise ValueError("OpenCV could not decode it")
    if (bgr.shape[1], bgr.shape[0]) != target:
        bgr = cv2.resize(bgr, target, interpolation=cv2.INTER_AREA)
    return Image.fromarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))


class _DecodeBudget:
    """Decoded bytes in flight in this process: a decode waits until its share fits.

    Decode threads (AFTERTRIP_DECODE_WORKERS) would otherwise each hold a large photo at
    once; with this, a process never holds more than one budget of full-size pixels.
    """

    def __init__(self) -> None:
        self._in_use = 0
        self._free = threading.Condition()

    @contextmanager
    def hold(self, cost: int, budget: int) -> Iterator[None]:
        with self._free:
            # a photo alone always fits (costs over the budget are refused before this)
            self._free.wait_for(lambda: self._in_use == 0 or self._in_use + cost <= budget)
            self._in_use += cost
        try:
            yield
        finally:
            with self._free:
                self._in_use -= cost
                self._free.notify_all()


_DECODE_BUDGET = _DecodeBudget()


def _shrink(
    im: Image.Image, target: tuple[int, int], box: tuple[float, float, float, float] | None
) -> tuple[Image.Image, tuple[float, float, float, float] | None]:
    """`im` reduced by a whole factor towards `target` in its own mode, before any conversion
    (a conversion of the full-size pixels would hold a second, wider copy of them)."""
    factor = min(im.width // target[0], im.height // target[1])
    if factor < 2:
        return im, box
    if im.mode in ("1", "P"):
        # Pillow resizes these by nearest neighbour only: stop at about twice the target, so
        # that the final resize (bilinear, after conversion) still smooths
        factor = min(-(-im.width // (2 * target[0])), -(-im.height // (2 * target[1])))
        if factor < 2:
            return im, box
    small = Image.new(im.mode, (-(-im.width // factor), -(-im.height // factor)))
    if im.mode == "P":
        small.putpalette(im.getpalette() or [])
    # In bands: Pillow's reduce() of RGBA/LA premultiplies a full-size copy first, and its
    # resize() of 16-bit modes widens one; a band of rows costs a few MB instead.
    rows = factor * max(1, 2_000_000 // max(1, im.width * factor))
    for top in range(0, im.height, rows):
        band = im.crop((0, top, im.width, min(im.height, top + rows)))
        size = (small.width, -(-band.height // factor))
        if im.mode in ("1", "P"):
            part = band.resize(size, Image.Resampling.NEAREST)
        elif im.mode.startswith("I;16"):  # reduce() does not take 16-bit modes
            part = band.resize(size, Image.Resampling.BOX)
        else:
            part = band.reduce(factor)
        small.paste(part, (0, top // factor))
    if "transparency" in im.info:
        small.info["transparency"] = im.info["transparency"]
    if box is not None:
        box = (box[0] / factor, box[1] / factor, box[2] / factor, box[3] / factor)
    return small, box


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
        # in float32 and in place: float64 temporaries cost 24 bytes a pixel
        grey = np.asarray(im).astype(np.float32)
        if im.mode == "F":
            top = 1.0 if grey.max(initial=0.0) <= 1.0 else 255.0
        else:
            top = 65535.0 if im.mode.startswith("I;16") or grey.max(initial=0) > 255 else 255.0
        grey *= np.float32(255.0 / top)
        grey += np.float32(0.5)
        np.clip(grey, 0, 255, out=grey)
        im = Image.fromarray(grey.astype(np.uint8))
    if im.mode == "RGB":
        return im  # convert() would copy it
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
    max_decoded_bytes: int | None = DEFAULT_MAX_DECODED_BYTES,
    min_side: int = 2,
) -> DecodedImage:
    """Decode photo bytes to upright RGB, at most `working_pixels` pixels when given.

    JPEGs are decoded at a reduced DCT scale when that is enough. A photo whose decoded
    pixels would take more than `max_decoded_bytes` (at that scale, in its own bit depth) is
    refused before any pixel is decoded; the full-size pixels are reduced in their own mode
    before they are converted. Decodes in one process share that budget, so the process
    never holds more full-size pixels than that at once, whatever the photos' format.
    Raises CorruptImage, UnsupportedImage, ImageTooLarge or ImageTooSmall, naming `name`.
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
        jpeg = im.format in ("JPEG", "MPO")
        try:
            box: tuple[float, float, float, float] | None = None
            if jpeg:  # the EXIF orientation is in the header: known before the draft
                orientation = _orientation(im, name)
                width, height = _oriented_size(im, orientation)
                target = _dct_size(width, height, working_pixels) or _working_size(
                    width, height, working_pixels
                )
                stored_target = target[::-1] if orientation >= 5 else target
                if target != (width, height):
                    # DCT scaling decodes 1/2, 1/4 or 1/8 of the pixels, never below the target
                    drafted = im.draft("RGB", stored_target)
                    box = drafted[1] if drafted else None
            cost = decoded_bytes(im)
            if max_decoded_bytes and cost > max_decoded_bytes:
                raise ImageTooLarge(
                    name,
                    f"decoding {im.width}x{im.height} {im.format} ({im.mode}) would take "
                    f"{cost / 1e6:,.0f} MB, over the {max_decoded_bytes / 1e6:,.0f} MB budget "
                    "(AFTERTRIP_MAX_DECODED_BYTES)",
                )
            with _DECODE_BUDGET.hold(cost, max_decoded_bytes or cost):
                if not jpeg:  # may decode: a PNG can keep its EXIF after the pixels
                    orientation = _orientation(im, name)
                    width, height = _oriented_size(im, orientation)
                    target = _working_size(width, height, working_pixels)
                    stored_target = target[::-1] if orientation >= 5 else target
                if _opencv_webp(im):
                    rgb = _decode_webp(data, stored_target)
                else:
                    im.load()
                    small, box = _shrink(im, stored_target, box)
                    if small is not im:
                        im.close()  # frees the full-size pixels now, not when the photo is done
                    rgb = _to_rgb(small)
            if rgb.size != stored_target:
                rgb = rgb.resize(
                    stored_target, Image.Resampling.BILINEAR, box=box, reducing_gap=2.0
                )
            if orientation in _TRANSPOSE:
                rgb = rgb.transpose(_TRANSPOSE[orientation])
            # one copy (Pillow's bytes), read-only: np.array() would copy them once more
            pixels = np.frombuffer(rgb.tobytes(), np.uint8).reshape(rgb.height, rgb.width, 3)
        except (MemoryError, PhotoError):
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
