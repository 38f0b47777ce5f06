"""Group shots from a few metres away: real group photos shrunk onto 12-MP canvases.

`aftertrip-faces bench groupshots` builds, in memory, the set issue 17 describes: each group
photo of the team's data is shrunk (as a camera further back would see it) so that the
median of its faces is 48, 36 or 28 px wide, and pasted onto a 4000x3000 scenery photo; the
album holds those canvases and the full-size originals. Labels come by construction: a shrunk
face's true box is its original box (found by the default detector on the original) scaled
and moved, and its person is whoever that original face is grouped with.

Per face size it reports the share of faces found (a detection with IoU >= 0.4 on the true
box), of faces in their own person's folder (the folder of the original face), misfiled
(in another folder), and the time per 12-MP photo, for each pipeline variant under
comparison, run in one process on the same photos (timings on a shared machine are only
comparable as ratios within one run).

Split: the photos the closer look was tuned on are the g20 summit photos other than the
five largest (`tune`); the results reported are on the held-out `idols` set (photos with two
or more faces in faces-dev/twice, nogizaka and celeba) and the five largest g20 photos
(`g20-largest`).
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from numpy.typing import NDArray
from PIL import Image

from worker.boxes import box_iou
from worker.detect import FaceDetector, load_detector
from worker.images import PHOTO_SUFFIXES, decode_image, image_size
from worker.settings import PipelineSettings
from worker.pipeline import AnalyzedPhoto, FacePipeline, StageTimer, assemble_album
from worker.types import AlbumResult, PhotoSource

logger = logging.getLogger(__name__)

CANVAS = (4000, 3000)
"""A 12-MP phone photo, landscape."""

FACE_SIZES = (48, 36, 28)
"""Median face width on the canvas, in pixels: about 9, 12 and 15 m from a phone camera."""

MATCH_IOU = 0.4
"""A true face is found when a detection overlaps it this much (as in `bench detection`)."""

COUNTED = 0.6
"""Faces narrower than this share of their photo's median face are not counted (strangers
far behind the group: on the canvas they would be under 20 px)."""

IDOL_SETS = ("faces-dev/twice", "faces-dev/nogizaka", "faces-dev/celeba")
LARGEST_G20 = 5


@dataclass(frozen=True)
class GroupPhoto:
    """A real photo with several faces: its file and its faces' boxes in its own pixels."""

    path: Path
    boxes: NDArray[np.float32]
    set: str

    @property
    def median_width(self) -> float:
        """The median face width, in the photo's pixels."""
        return float(np.median(self.boxes[:, 2] - self.boxes[:, 0]))


@dataclass(frozen=True)
class Canvas:
    """One 12-MP photo of the set: JPEG bytes and the true boxes of its counted faces."""

    name: str
    data: bytes
    boxes: NDArray[np.float32]
    original: int
    """Index of the original photo in the list of group photos."""
    faces: NDArray[np.int64]
    """Index of each true box's face among the original's detected faces."""


def _photos(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in PHOTO_SUFFIXES)


def find_group_photos(
    data: Path, detector: FaceDetector, settings: PipelineSettings, split: str
) -> list[GroupPhoto]:
    """The split's photos (`held-out` = idols + the five largest g20, or `tune`) that have
    two or more faces, with their faces found by `detector` in original pixels."""
    g20 = _photos(data / "group-photos" / "g20")
    largest = sorted(
        g20, key=lambda p: -np.prod(image_size(p.read_bytes(), name=p.name))
    )[:LARGEST_G20]
    sets: list[tuple[str, list[Path]]]
    if split == "tune":
        sets = [("g20-tune", [p for p in g20 if p not in largest])]
    else:
        sets = [("idols", [p for s in IDOL_SETS for p in _photos(data / s)])]
        sets.append(("g20-largest", sorted(largest)))
    found = []
    for name, paths in sets:
        for path in paths:
            image = decode_image(
                path.read_bytes(), name=path.name, working_pixels=settings.working_pixels
            )
            faces = detector.detect(image.pixels).scaled(1.0 / image.scale)
            if len(faces) >= 2:
                found.append(GroupPhoto(path, faces.boxes, name))
    return found


def _background(path: Path) -> NDArray[np.uint8]:
    rgb = np.asarray(Image.open(path).convert("RGB"))
    return cv2.resize(rgb, CANVAS, interpolation=cv2.INTER_AREA)


def make_canvas(
    photo: GroupPhoto,
    face_width: int,
    background: NDArray[np.uint8],
    rng: np.random.Generator,
    index: int,
) -> Canvas | None:
    """`photo` shrunk so its median face is `face_width` px wide, on `background` (a
    4000x3000 copy is drawn on); None when the shrunk photo would not fit the canvas."""
    original = np.asarray(Image.open(photo.path).convert("RGB"))
    height, width = original.shape[:2]
    # The reference boxes were found on the EXIF-upright photo; these pixels are as stored.
    if (width, height) != image_size(photo.path.read_bytes(), name=photo.path.name):
        return None
    factor = face_width / photo.median_width
    size = (max(1, round(width * factor)), max(1, round(height * factor)))
    if size[0] > CANVAS[0] or size[1] > CANVAS[1]:
        return None
    small = cv2.resize(original, size, interpolation=cv2.INTER_AREA)
    left = int(rng.integers(0, CANVAS[0] - size[0] + 1))
    # people stand in the lower two thirds of a landmark shot
    top_min = min(CANVAS[1] // 3, CANVAS[1] - size[1])
    top = int(rng.integers(top_min, CANVAS[1] - size[1] + 1))
    canvas = background.copy()
    canvas[top : top + size[1], left : left + size[0]] = small
    out = io.BytesIO()
    Image.fromarray(canvas).save(out, "JPEG", quality=90)
    widths = photo.boxes[:, 2] - photo.boxes[:, 0]
    counted = np.flatnonzero(widths >= COUNTED * photo.median_width)
    scale = np.array([size[0] / width, size[1] / height] * 2, np.float32)
    boxes = photo.boxes[counted] * scale + np.array([left, top, left, top], np.float32)
    return Canvas(f"{photo.path.stem}-{face_width}px.jpg", out.getvalue(), boxes, index, counted)


def matches(truth: NDArray[np.float32], found: NDArray[np.float32]) -> NDArray[np.int64]:
    """For each true box, the index of the detection matching it (IoU >= MATCH_IOU, best
    first, each detection used once), or -1."""
    result = np.full(len(truth), -1, np.int64)
    if not len(truth) or not len(found):
        return result
    overlap = box_iou(truth, found)
    for t, d in zip(*np.unravel_index(np.argsort(-overlap, axis=None), overlap.shape), strict=True):
        if overlap[t, d] < MATCH_IOU:
            break
        if result[t] < 0 and d not in result:
            result[t] = d
    return result


def sources(canvases: Sequence[Canvas]) -> list[PhotoSource]:
    """The canvases as photos for the pipeline."""
    return [PhotoSource(c.name, c.name, lambda c=c: c.data) for c in canvases]


@dataclass
class _Tally:
    faces: int = 0
    found: int = 0
    own: int = 0
    misfiled: int = 0
    others: int = 0

    def __add__(self, other: _Tally) -> _Tally:
        return _Tally(
            self.faces + other.faces,
            self.found + other.found,
            self.own + other.own,
            self.misfiled + other.misfiled,
            self.others + other.others,
        )

    def row(self) -> dict[str, Any]:
        found = max(self.found, 1)
        return {
            "faces": self.faces,
            "found": round(self.found / max(self.faces, 1), 3),
            "own_folder": round(self.own / found, 3),
            "misfiled": round(self.misfiled / found, 3),
            "others": round(self.others / found, 3),
        }


def _score(
    canvases: Sequence[Canvas],
    analyzed: Sequence[AnalyzedPhoto],
    originals: Sequence[AnalyzedPhoto],
    photos: Sequence[GroupPhoto],
    album: AlbumResult,
) -> dict[str, _Tally]:
    """Per set: of the canvases' true faces, how many were found, and of those how many sit
    in their original face's folder, in another folder, or in "others"."""
    face_ids: dict[str, list[int]] = {p.id: p.face_ids for p in album.photos}
    group = [f.group for f in album.faces]
    tallies: dict[str, _Tally] = {}
    for canvas, photo in zip(canvases, analyzed, strict=True):
        source = photos[canvas.original]
        tally = tallies.setdefault(source.set, _Tally())
        original = originals[canvas.original]
        # the original's faces as this variant found them, matched to the reference boxes
        reference = matches(source.boxes[canvas.faces], original.detections.boxes)
        found = matches(canvas.boxes, photo.detections.boxes)
        tally.faces += len(canvas.boxes)
        for truth, hit in enumerate(found):
            if hit < 0:
                continue
            tally.found += 1
            mine = group[face_ids[photo.photo_id][hit]]
            ref = reference[truth]
            theirs = group[face_ids[original.photo_id][ref]] if ref >= 0 else -1
            if mine < 0:
                tally.others += 1
            elif mine == theirs:
                tally.own += 1
            else:
                tally.misfiled += 1
    return tallies


def run_groupshots(
    data: Path,
    settings: PipelineSettings,
    *,
    split: str = "held-out",
    limit: int | None = None,
    save: Path | None = None,
) -> dict[str, Any]:
    """The group-shot benchmark: today's detector (`closer_look_min_face` = 0) against
    `settings`, in this process, on the same canvases; see the module's docstring.

    `limit` caps the photos per set; `save` writes the canvases there as JPEGs (to run
    `aftertrip-faces group` on them, e.g. for peak RSS)."""
    today = settings.model_copy(update={"closer_look_min_face": 0})
    variants = {"today": today, "closer look": settings}
    pipelines = {name: FacePipeline(s) for name, s in variants.items()}
    photos = find_group_photos(data, pipelines["today"].detector, today, split)
    if limit:
        photos = [p for p in photos if [q.set for q in photos].index(p.set) + limit > photos.index(p)]
    logger.info("groupshots: %d photos, %d faces", len(photos), sum(len(p.boxes) for p in photos))
    backgrounds = sorted((data / "scenery").glob("*.jpg"))
    originals = [
        PhotoSource(f"original-{i}", p.path.name, p.path.read_bytes)
        for i, p in enumerate(photos)
    ]
    analyzed_originals = {
        name: list(pipe.analyze(originals)) for name, pipe in pipelines.items()
    }
    rows: list[dict[str, Any]] = []
    for width in FACE_SIZES:
        rng = np.random.default_rng(width)
        canvases = [
            c
            for i, p in enumerate(photos)
            if (c := make_canvas(p, width, _background(backgrounds[i % len(backgrounds)]), rng, i))
        ]
        if save is not None:
            save.mkdir(parents=True, exist_ok=True)
            for c in canvases:
                (save / c.name).write_bytes(c.data)
        for name, pipe in pipelines.items():
            timer = StageTimer()
            start = time.perf_counter()
            analyzed = list(pipe.analyze(sources(canvases), timer=timer))
            seconds = time.perf_counter() - start
            album = assemble_album(
                analyzed_originals[name] + analyzed,
                variants[name],
                models=pipe.models,
                timer=timer,
                embedder=pipe.embedder.name,
            )
            tallies = _score(canvases, analyzed, analyzed_originals[name], photos, album)
            for set_name, tally in sorted(tallies.items()):
                rows.append(
                    {"face_px": width, "set": set_name, "variant": name, **tally.row()}
                )
            rows.append(
                {
                    "face_px": width,
                    "set": "all",
                    "variant": name,
                    **sum(tallies.values(), _Tally()).row(),
                    "photos": len(canvases),
                    "ms_per_photo": round(1000 * seconds / max(len(canvases), 1)),
                    "detect_ms_per_photo": round(
                        1000 * timer.seconds.get("detect", 0) / max(len(canvases), 1)
                    ),
                    "faces_found": int(sum(len(p.detections) for p in analyzed)),
                }
            )
            logger.info("groupshots: %s", rows[-1])
    return {"split": split, "limit": limit, "rows": rows}
