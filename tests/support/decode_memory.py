"""Peak memory of decoding one hostile photo, measured in a fresh process per case.

    python -m tests.support.decode_memory [--cache DIR] [CASE ...]

Each case is a 12000x12000 image (144 Mpx, under the 150 Mpx pixel cap; two are 6000x6000)
in one format and bit depth, made once into DIR (default /tmp/aftertrip-decode-memory). A
child process imports the decoder, reads the file, notes its RSS, decodes with the pipeline's
settings and reports its peak RSS (VmHWM) minus that RSS: the memory the decode itself cost.
docs/reliability.md has the figures.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

SIDE = 12000
DEFAULT_CACHE = Path("/tmp/aftertrip-decode-memory")


def _gradient(dtype: type, top: float) -> np.ndarray:
    """A smooth ramp: compresses to a small file, and decodes to every pixel."""
    row: np.ndarray = np.linspace(0, top, SIDE, dtype=np.float64).astype(dtype)
    return np.broadcast_to(row, (SIDE, SIDE))


def _save(path: Path, make: Callable[[], object], fmt: str, **params: object) -> None:
    from PIL import Image

    im = make()
    assert isinstance(im, Image.Image)
    im.save(path, fmt, **params)


def _cases() -> dict[str, tuple[str, Callable[[Path], None]]]:
    import pillow_heif
    from PIL import Image

    pillow_heif.register_heif_opener()

    def grey16() -> Image.Image:
        return Image.fromarray(np.ascontiguousarray(_gradient(np.uint16, 65535)))

    def grey8() -> Image.Image:
        return Image.fromarray(np.ascontiguousarray(_gradient(np.uint8, 255)))

    def rgb8() -> Image.Image:
        return grey8().convert("RGB")

    def rgba8() -> Image.Image:
        return grey8().convert("RGBA")

    def floaty() -> Image.Image:
        return Image.fromarray(np.ascontiguousarray(_gradient(np.float32, 1.0)))

    return {
        "png-16bit-grey": ("png", lambda p: _save(p, grey16, "PNG")),
        "png-8bit-grey": ("png", lambda p: _save(p, grey8, "PNG")),
        "png-8bit-rgb": ("png", lambda p: _save(p, rgb8, "PNG")),
        "png-8bit-rgba": ("png", lambda p: _save(p, rgba8, "PNG")),
        "tiff-16bit-grey": ("tif", lambda p: _save(p, grey16, "TIFF", compression="tiff_deflate")),
        "tiff-float32": ("tif", lambda p: _save(p, floaty, "TIFF", compression="tiff_deflate")),
        "jpeg-rgb": ("jpg", lambda p: _save(p, rgb8, "JPEG", quality=70)),
        "webp-rgb": ("webp", lambda p: _save(p, rgb8, "WEBP", quality=50, method=0)),
        # 36 Mpx: at 144 Mpx these decoders' two copies are over the default budget
        "webp-rgb-6000": ("webp", lambda p: _save(p, lambda: rgb8().resize((6000, 6000)), "WEBP")),
        "heic-rgb-6000": ("heic", lambda p: _save(p, lambda: rgb8().resize((6000, 6000)), "HEIF")),
        "gif-palette": ("gif", lambda p: _save(p, lambda: grey8().convert("P"), "GIF")),
        "bmp-1bit": ("bmp", lambda p: _save(p, lambda: grey8().convert("1"), "BMP")),
    }


CHILD = r"""
import json, resource, sys
from worker.images import decode_image
from worker.settings import PipelineSettings

def status_kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])

settings = PipelineSettings()
data = open(sys.argv[1], "rb").read()
before = status_kib("VmRSS")
try:
    image = decode_image(data, name=sys.argv[1], **{EXTRA})
    outcome = "ok %dx%d" % (image.pixels.shape[1], image.pixels.shape[0])
except Exception as exc:
    outcome = "%s: %s" % (type(exc).__name__, exc)
# VmHWM, this process's own peak: ru_maxrss would start at the parent's peak (Linux keeps
# it across fork and exec), so a test run from a large pytest process would read that
peak = status_kib("VmHWM")
assert peak <= resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"before_mib": before / 1024, "peak_mib": peak / 1024,
                  "decode_mib": (peak - before) / 1024, "outcome": outcome}))
"""


def decode_kwargs_source() -> str:
    """The keyword arguments the pipeline passes (working size, caps), as Python source."""
    import inspect

    from worker.images import decode_image

    names = inspect.signature(decode_image).parameters
    extra = {
        "working_pixels": "settings.working_pixels",
        "max_image_pixels": "settings.max_image_pixels",
        "max_decoded_bytes": "settings.max_decoded_bytes",
    }
    return "{" + ", ".join(f"{k!r}: {v}" for k, v in extra.items() if k in names) + "}"


def measure(path: Path) -> dict[str, object]:
    """Decode `path` in a fresh process; its RSS before, peak, and the decode's share."""
    code = CHILD.replace("**{EXTRA}", "**" + decode_kwargs_source())
    run = subprocess.run(
        [sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=False
    )
    if run.returncode != 0:
        return {"outcome": f"process failed ({run.returncode}): {run.stderr.strip()[-300:]}"}
    return dict(json.loads(run.stdout.strip().splitlines()[-1]))


def _out(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cases", nargs="*", help="which cases (default: all)")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--make", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    cases = _cases()
    args.cache.mkdir(parents=True, exist_ok=True)
    if args.make:
        suffix, make = cases[args.make]
        make(args.cache / f"{args.make}.{suffix}")
        return 0
    _out("| case | file size | RSS before | peak RSS | decode cost | outcome |")
    _out("|---|---|---|---|---|---|")
    for name in args.cases or list(cases):
        suffix, make = cases[name]
        path = args.cache / f"{name}.{suffix}"
        if not path.exists():  # in a process of its own, so this one stays small
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "tests.support.decode_memory",
                    "--make",
                    name,
                    "--cache",
                    str(args.cache),
                ],
                check=True,
            )
        m = measure(path)
        size = path.stat().st_size / 1e6
        if "peak_mib" in m:
            _out(
                f"| {name} | {size:.1f} MB | {m['before_mib']:.0f} MiB | {m['peak_mib']:.0f} MiB "
                f"| {m['decode_mib']:.0f} MiB | {m['outcome']} |"
            )
        else:
            _out(f"| {name} | {size:.1f} MB | | | | {m['outcome']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
