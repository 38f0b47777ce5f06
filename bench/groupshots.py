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
import json
import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from numpy.typing import NDArray
from PIL import Image

from bench.env import machine
from worker.boxes import box_iou
from worker.detect import FaceDetector
from worker.images import PHOTO_SUFFIXES, decode_image, image_size
from worker.pipeline import AnalyzedPhoto, FacePipeline, StageTimer, assemble_album
from worker.settings import PipelineSettings
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
    person: NDArray[np.int64] = field(default_factory=lambda: np.zeros(0, np.int64))
    """Each face's person (see `run_groupshots`); filled in once the originals are grouped."""

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
    largest = sorted(g20, key=lambda p: -np.prod(image_size(p.read_bytes(), name=p.name)))[
        :LARGEST_G20
    ]
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
    return np.asarray(cv2.resize(rgb, CANVAS, interpolation=cv2.INTER_AREA), np.uint8)


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
    return [PhotoSource(c.name, c.name, _reader(c.data)) for c in canvases]


def _reader(data: bytes) -> Callable[[], bytes]:
    return lambda: data


@dataclass
class _Tally:
    faces: int = 0
    found: int = 0
    own: int = 0
    misfiled: int = 0
    split: int = 0
    others: int = 0

    def __add__(self, other: _Tally) -> _Tally:
        return _Tally(
            self.faces + other.faces,
            self.found + other.found,
            self.own + other.own,
            self.misfiled + other.misfiled,
            self.split + other.split,
            self.others + other.others,
        )

    def row(self) -> dict[str, Any]:
        found = max(self.found, 1)
        return {
            "faces": self.faces,
            "found": round(self.found / max(self.faces, 1), 3),
            "own_folder": round(self.own / found, 3),
            "misfiled": round(self.misfiled / found, 3),
            "split": round(self.split / found, 3),
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
    in a folder holding an original face of their person, in a folder that holds none, or in
    "others". A person is a face of an original photo together with the original faces that
    today's grouping of the originals alone puts with it (`GroupPhoto.person`): the summit
    leaders are in several photos, and a leader's folders may be split."""
    face_ids: dict[str, list[int]] = {p.id: p.face_ids for p in album.photos}
    group = np.array([f.group for f in album.faces], np.int64)
    person = np.full(len(album.faces), -1 - np.arange(len(album.faces)), np.int64)
    for source, original in zip(photos, originals, strict=True):
        ids = np.asarray(face_ids[original.photo_id], np.int64)
        known = matches(original.detections.boxes, source.boxes)
        person[ids[known >= 0]] = source.person[known[known >= 0]]
    is_original = np.zeros(len(album.faces), bool)
    for original in originals:
        is_original[face_ids[original.photo_id]] = True
    for canvas, photo in zip(canvases, analyzed, strict=True):
        ids = np.asarray(face_ids[photo.photo_id], np.int64)
        found = matches(canvas.boxes, photo.detections.boxes)
        person[ids[found[found >= 0]]] = photos[canvas.original].person[canvas.faces[found >= 0]]
    tallies: dict[str, _Tally] = {}
    for canvas, photo in zip(canvases, analyzed, strict=True):
        source = photos[canvas.original]
        tally = tallies.setdefault(source.set, _Tally())
        found = matches(canvas.boxes, photo.detections.boxes)
        tally.faces += len(canvas.boxes)
        for truth, hit in enumerate(found):
            if hit < 0:
                continue
            tally.found += 1
            mine = group[face_ids[photo.photo_id][hit]]
            me = source.person[canvas.faces[truth]]
            folder = group == mine
            if mine < 0:
                tally.others += 1
            elif me in person[folder & is_original]:
                tally.own += 1
            elif (person[folder] == me).all():
                tally.split += 1  # with faces of its own person only, but not their folder
            else:
                tally.misfiled += 1
                logger.debug("misfiled: %s face %d (%s)", canvas.name, truth, source.set)
    return tallies


def run_groupshots(
    data: Path,
    settings: PipelineSettings,
    *,
    split: str = "held-out",
    limit: int | None = None,
    save: Path | None = None,
    rounds: int = 1,
) -> dict[str, Any]:
    """The group-shot benchmark: today's pipeline (`closer_look_min_face` = 0, `small_face` = 0)
    against
    `settings`, in this process, on the same canvases; see the module's docstring.

    `limit` caps the photos per set; `save` writes the canvases there as JPEGs (to run
    `aftertrip-faces group` on them, e.g. for peak RSS). With `rounds` > 1 the variants
    analyse the canvases that many times, taking turns at going first, and the best wall
    time and CPU time (all threads of the process) of each count; the faces are those of
    the first round (the pipeline is deterministic)."""
    today = settings.model_copy(update={"closer_look_min_face": 0, "small_face": 0})
    variants = {"today": today, "closer look": settings}
    pipelines = {name: FacePipeline(s) for name, s in variants.items()}
    photos = find_group_photos(data, pipelines["today"].detector, today, split)
    if limit:
        photos = [
            p for p in photos if [q.set for q in photos].index(p.set) + limit > photos.index(p)
        ]
    logger.info("groupshots: %d photos, %d faces", len(photos), sum(len(p.boxes) for p in photos))
    backgrounds = sorted((data / "scenery").glob("*.jpg"))
    originals = [
        PhotoSource(f"original-{i}", p.path.name, p.path.read_bytes) for i, p in enumerate(photos)
    ]
    analyzed_originals = {name: list(pipe.analyze(originals)) for name, pipe in pipelines.items()}
    photos = _with_people(photos, analyzed_originals["today"], today, pipelines["today"])
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
        seconds: dict[str, float] = {}
        cpu: dict[str, float] = {}
        scored: dict[str, list[AnalyzedPhoto]] = {}
        timers: dict[str, StageTimer] = {}
        names = list(pipelines)
        for turn in range(max(1, rounds)):
            # the variants take turns, each going first every other round; best wall time
            for name in names if turn % 2 == 0 else names[::-1]:
                timer = StageTimer()
                start, start_cpu = time.perf_counter(), time.process_time()
                analyzed = list(pipelines[name].analyze(sources(canvases), timer=timer))
                wall, used = time.perf_counter() - start, time.process_time() - start_cpu
                if wall < seconds.get(name, np.inf):
                    seconds[name], timers[name] = wall, timer
                cpu[name] = min(cpu.get(name, np.inf), used)
                scored.setdefault(name, analyzed)
        for name, pipe in pipelines.items():
            analyzed, timer = scored[name], timers[name]
            album = assemble_album(
                analyzed_originals[name] + analyzed,
                variants[name],
                models=pipe.models,
                timer=timer,
                embedder=pipe.embedder.name,
                dim=pipe.arcface.dim,
            )
            tallies = _score(canvases, analyzed, analyzed_originals[name], photos, album)
            for set_name, tally in sorted(tallies.items()):
                rows.append({"face_px": width, "set": set_name, "variant": name, **tally.row()})
            per_photo = 1000 / max(len(canvases), 1)
            rows.append(
                {
                    "face_px": width,
                    "set": "all",
                    "variant": name,
                    **sum(tallies.values(), _Tally()).row(),
                    "photos": len(canvases),
                    "ms_per_photo": round(per_photo * seconds[name]),
                    "ratio": round(seconds[name] / seconds["today"], 2),
                    "cpu_ms_per_photo": round(per_photo * cpu[name]),
                    "detect_ms_per_photo": round(per_photo * timer.seconds.get("detect", 0)),
                    "faces_found": int(sum(len(p.detections) for p in analyzed)),
                }
            )
            logger.info("groupshots: %s", rows[-1])
    scenery = {}
    for name, pipe in pipelines.items():
        empty = [_twelve_mp(p) for p in backgrounds]
        scenery[name] = {
            "photos": len(empty),
            "faces": int(sum(len(p.detections) for p in pipe.analyze(empty))),
        }
    return {
        "split": split,
        "limit": limit,
        "rounds": rounds,
        "rows": rows,
        "scenery_12mp": scenery,
        "portraits": portraits(data, pipelines, rounds),
    }


PORTRAITS = ("faces-dev/celeba", 300)
"""The portrait album timed beside the group shots: the InsightFace comparison's CelebA set
(bench/compare_insightface.py), photos of about 0.2 Mpx that the closer look never sees."""


def portraits(
    data: Path, pipelines: dict[str, FacePipeline], rounds: int
) -> dict[str, dict[str, Any]]:
    """Each pipeline on the portrait album (`PORTRAITS`), read into memory first, taking
    turns as the group shots do: photos, faces found, best wall and CPU ms per photo, and
    the wall time's ratio to today's (issue 17: portrait albums no slower)."""
    folder, count = PORTRAITS
    paths = _photos(data / folder)[:count]
    photos = [PhotoSource(p.name, p.name, _reader(p.read_bytes())) for p in paths]
    seconds: dict[str, float] = {}
    cpu: dict[str, float] = {}
    faces: dict[str, int] = {}
    names = list(pipelines)
    for turn in range(max(1, rounds)):
        for name in names if turn % 2 == 0 else names[::-1]:
            start, start_cpu = time.perf_counter(), time.process_time()
            found = sum(len(p.detections) for p in pipelines[name].analyze(photos))
            wall, used = time.perf_counter() - start, time.process_time() - start_cpu
            seconds[name] = min(seconds.get(name, np.inf), wall)
            cpu[name] = min(cpu.get(name, np.inf), used)
            faces[name] = found
    per_photo = 1000 / max(len(photos), 1)
    return {
        name: {
            "photos": len(photos),
            "faces": faces[name],
            "ms_per_photo": round(per_photo * seconds[name], 1),
            "ratio": round(seconds[name] / seconds["today"], 3),
            "cpu_ms_per_photo": round(per_photo * cpu[name], 1),
        }
        for name in names
    }


def table(result: dict[str, Any]) -> list[str]:
    """The result as Markdown: one row per face size, set and variant."""
    out = [
        "| face px | set | pipeline | faces | found | own folder | misfiled | split | others "
        "| ms / 12-MP photo | × today | CPU ms | detect ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        out.append(
            f"| {r['face_px']} | {r['set']} | {r['variant']} | {r['faces']} | {r['found']} | "
            f"{r['own_folder']} | {r['misfiled']} | {r['split']} | {r['others']} | "
            f"{r.get('ms_per_photo', '')} | {r.get('ratio', '')} | "
            f"{r.get('cpu_ms_per_photo', '')} | {r.get('detect_ms_per_photo', '')} |"
        )
    scenery = ", ".join(f"{k} {v['faces']}" for k, v in result["scenery_12mp"].items())
    out += ["", f"Faces found in the 9 scenery photos scaled to 12 MP: {scenery}."]
    if result.get("portraits"):
        first = next(iter(result["portraits"].values()))
        out += [
            "",
            f"Portrait album ({PORTRAITS[0]}, first {first['photos']} photos), same process:",
            "",
            "| pipeline | faces | ms / photo | × today | CPU ms / photo |",
            "|---|---|---|---|---|",
            *(
                f"| {name} | {r['faces']} | {r['ms_per_photo']} | {r['ratio']} | "
                f"{r['cpu_ms_per_photo']} |"
                for name, r in result["portraits"].items()
            ),
        ]
    return out


def write_groupshots(out_dir: Path, result: dict[str, Any]) -> Path:
    """Store the result in `groupshots.json` and its table in RESULTS.md (between markers,
    which `bench.run.write_results` keeps)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "groupshots.json").write_text(json.dumps({"machine": machine(), **result}, indent=1))
    info = machine()
    block = "\n".join(
        [
            "<!-- groupshots -->",
            "## groupshots",
            "",
            f"`aftertrip-faces bench groupshots --split {result['split']}"
            + (f" --limit {result['limit']}" if result["limit"] else "")
            + (f" --rounds {result.get('rounds', 1)}`" if result.get("rounds", 1) > 1 else "`")
            + f", {info.get('date')} at commit `{info.get('commit')}` on {info.get('cpu')}, "
            f"{info.get('cores')} cores. `today` is the pipeline with the closer look and the "
            "small-face rule off (`AFTERTRIP_CLOSER_LOOK_MIN_FACE=0 AFTERTRIP_SMALL_FACE=0`), "
            "run in the same process on the same photos, taking turns; ms: best wall time of "
            "the rounds, × today its ratio, CPU ms: all the process's threads. Found: share of "
            "the true faces; own folder, misfiled (a folder of other people), split (a folder "
            "of its own person's small faces only) and others: shares of the found faces "
            "(bench/groupshots.py).",
            "",
            *table(result),
            "<!-- /groupshots -->",
            "",
        ]
    )
    md = out_dir / "RESULTS.md"
    old = md.read_text() if md.exists() else ""
    if "<!-- groupshots -->" in old:
        old = re.sub(r"<!-- groupshots -->.*?<!-- /groupshots -->\n?", block, old, flags=re.S)
    else:
        old = old.rstrip("\n") + "\n\n" + block
    md.write_text(old)
    return md


def _with_people(
    photos: list[GroupPhoto],
    originals: list[AnalyzedPhoto],
    settings: PipelineSettings,
    pipeline: FacePipeline,
) -> list[GroupPhoto]:
    """The photos with each reference face's person: its folder when today's pipeline groups
    the originals alone, or a person of its own when it stays in "others"."""
    album = assemble_album(
        originals,
        settings,
        models=pipeline.models,
        timer=StageTimer(),
        embedder=pipeline.embedder.name,
        dim=pipeline.arcface.dim,
    )
    by_photo = {p.id: p.face_ids for p in album.photos}
    out, alone = [], len(album.faces)
    for photo, original in zip(photos, originals, strict=True):
        ids = by_photo[original.photo_id]
        known = matches(photo.boxes, original.detections.boxes)
        person = np.empty(len(photo.boxes), np.int64)
        for i, k in enumerate(known):
            group = album.faces[ids[k]].group if k >= 0 else -1
            person[i] = group if group >= 0 else alone
            alone += group < 0
        out.append(GroupPhoto(photo.path, photo.boxes, photo.set, person))
    return out


def _twelve_mp(path: Path) -> PhotoSource:
    """A scenery photo (no one in it) scaled to a 12-MP canvas, as JPEG."""

    def read() -> bytes:
        out = io.BytesIO()
        Image.fromarray(_background(path)).save(out, "JPEG", quality=90)
        return out.getvalue()

    return PhotoSource(f"scenery-{path.stem}", path.name, read)
