"""Fixtures: the images a dependency ships, and the team's data at ../shared."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support.files import SHARED_DATA, vectron_image_path


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
