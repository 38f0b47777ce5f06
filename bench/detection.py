"""Detection: recall on labelled faces, false positives on scenery, time per photo.

- `detection/voc-faces`: 9 PASCAL VOC photos with 43 hand-labelled faces (dlib imglab XML).
  A labelled face is found when a detection overlaps it with IoU >= 0.4 (the labels are
  tight squares, the detectors' boxes taller ones); detections that match no label are
  counted as `extra` (some are real, unlabelled faces: a precision hint, not a precision).
- `scenery`: photos without people: every detection there is a false positive.
- `group-photos/g20`: the first photos of the summit set at the working size: time per photo
  and how many faces each detector finds (no labels).
"""

from __future__ import annotations

import logging
import time
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from worker.boxes import box_iou
from worker.closer import detect_photo
from worker.detect import FaceDetector
from worker.images import PHOTO_SUFFIXES, decode_image
from worker.settings import PipelineSettings
from worker.types import Detections
from worker.zoo import load_detector

logger = logging.getLogger(__name__)

MATCH_IOU = 0.4


def read_imglab(path: Path) -> dict[str, NDArray[np.float32]]:
    """Boxes (n, 4: x1, y1, x2, y2) per image file from a dlib imglab XML file."""
    boxes: dict[str, NDArray[np.float32]] = {}
    for image in ET.parse(path).getroot().iter("image"):
        rows = [
            [
                float(b.get("left", 0)),
                float(b.get("top", 0)),
                float(b.get("left", 0)) + float(b.get("width", 0)),
                float(b.get("top", 0)) + float(b.get("height", 0)),
            ]
            for b in image.iter("box")
            if b.get("ignore", "0") != "1"
        ]
        boxes[image.get("file", "")] = np.asarray(rows, np.float32).reshape(-1, 4)
    return boxes


def photos_in(folder: Path, limit: int | None = None) -> list[Path]:
    """Image files in `folder`, sorted by name, at most `limit`."""
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in PHOTO_SUFFIXES)
    return files[:limit] if limit else files


def _timed_detect(
    detector: FaceDetector, path: Path, settings: PipelineSettings
) -> tuple[Detections, float, float, int]:
    """(faces, scale working/original, detect seconds, working pixels) for one photo."""
    image = decode_image(
        path.read_bytes(),
        name=path.name,
        working_pixels=settings.working_pixels,
        max_image_pixels=settings.max_image_pixels,
    )
    start = time.perf_counter()
    found = detect_photo(detector, image)
    seconds = time.perf_counter() - start
    return found, image.scale, seconds, int(image.pixels.shape[0] * image.pixels.shape[1])


def voc_recall(detector: FaceDetector, folder: Path, settings: PipelineSettings) -> dict[str, Any]:
    labels: dict[str, NDArray[np.float32]] = {}
    for xml in sorted(folder.glob("*.xml")):
        labels.update(read_imglab(xml))
    faces = found = extra = 0
    seconds = 0.0
    missed: list[dict[str, Any]] = []
    for name, truth in sorted(labels.items()):
        detections, scale, took, _ = _timed_detect(detector, folder / name, settings)
        seconds += took
        truth = truth * scale  # labels are in original pixels, detections in working pixels
        overlap = box_iou(truth, detections.boxes)
        hit = overlap.max(axis=1) >= MATCH_IOU if len(detections) else np.zeros(len(truth), bool)
        used = overlap.max(axis=0) >= MATCH_IOU if len(truth) else np.zeros(len(detections), bool)
        faces += len(truth)
        found += int(hit.sum())
        extra += int((~used).sum())
        missed += [
            {"image": name, "box": [round(float(v) / scale) for v in truth[i]]}
            for i in np.flatnonzero(~hit)
        ]
    return {
        "images": len(labels),
        "faces": faces,
        "found": found,
        "recall": round(found / max(faces, 1), 3),
        "extra": extra,
        "missed": missed,
        "ms_per_image": round(1000 * seconds / max(len(labels), 1), 1),
    }


def count_faces(
    detector: FaceDetector, paths: list[Path], settings: PipelineSettings
) -> dict[str, Any]:
    """Faces found per photo and time per photo (for sets without labels)."""
    counts: list[int] = []
    seconds = 0.0
    pixels = 0
    for path in paths:
        detections, _, took, size = _timed_detect(detector, path, settings)
        counts.append(len(detections))
        seconds += took
        pixels += size
    n = max(len(paths), 1)
    return {
        "images": len(paths),
        "faces": int(sum(counts)),
        "images_with_faces": int(sum(c > 0 for c in counts)),
        "faces_per_image": counts,
        "mean_megapixels": round(pixels / n / 1e6, 2),
        "ms_per_image": round(1000 * seconds / n, 1),
    }


def _label(settings: PipelineSettings) -> str:
    parts = [settings.detector, f"min{settings.min_face_size}"]
    if settings.detector == "scrfd":
        parts.append(f"in{settings.scrfd_input_size}")
    if settings.detection_threshold is not None:
        parts.append(f"t{settings.detection_threshold}")
    return "-".join(parts)


def detection_benchmark(
    data_dir: Path,
    settings: PipelineSettings,
    *,
    variants: Sequence[dict[str, Any]] | None = None,
    group_photos: int = 10,
) -> dict[str, Any]:
    """Recall, extra detections, scenery false positives and time per photo, per detector.

    `variants` are settings overrides to compare (default: each detector with `settings`);
    `group_photos` is how many g20 summit photos to time (0 skips them).
    """
    if variants is None:
        variants = [{"detector": "mtcnn"}, {"detector": "scrfd"}]
    results: dict[str, Any] = {"match_iou": MATCH_IOU}
    for overrides in variants:
        run_settings = settings.model_copy(update=overrides)
        detector = load_detector(run_settings)
        # The first call pays one-off costs (allocator, kernel selection): keep it off the clock.
        detector.detect(np.full((240, 320, 3), 128, np.uint8))
        label = _label(run_settings)
        logger.info("detection benchmark: %s", label)
        entry: dict[str, Any] = {
            "voc_faces": voc_recall(detector, data_dir / "detection" / "voc-faces", run_settings),
            "scenery": count_faces(detector, photos_in(data_dir / "scenery"), run_settings),
        }
        g20 = data_dir / "group-photos" / "g20"
        if group_photos and g20.is_dir():
            entry["g20"] = count_faces(detector, photos_in(g20, group_photos), run_settings)
        results[label] = entry
    return results
