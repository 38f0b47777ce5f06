"""Speed: photos/s and faces/s end to end, per stage, against the same run's floor.

The floor is the work no pipeline can avoid, timed on its own in the same process and on
the same photos: decoding each photo and the detector on it, one after the other, then the
embedder over all their faces' chips in batches. End to end adds reading ahead on threads,
alignment, streaming, grouping and bookkeeping; the goal is to stay within 1.3x of the floor.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from worker.align import align_faces
from worker.images import PHOTO_SUFFIXES, decode_image
from worker.pipeline import FacePipeline, group_album
from worker.settings import PipelineSettings
from worker.types import PhotoSource

logger = logging.getLogger(__name__)


def list_photos(folder: Path, limit: int | None) -> list[Path]:
    """Image files under `folder`, sorted, at most `limit`."""
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in PHOTO_SUFFIXES)
    return files[:limit] if limit else files


def _sources(paths: list[Path]) -> list[PhotoSource]:
    return [PhotoSource(id=str(p), name=p.name, read=p.read_bytes) for p in paths]


def floor_seconds(
    paths: list[Path], pipeline: FacePipeline, settings: PipelineSettings
) -> dict[str, float]:
    """Decode + detector + embedder alone, sequentially, over the same photos.

    The embedder runs once over all chips in its batch size: its forward cost, without the
    pipeline's streaming around it.
    """
    detector, embedder = pipeline.detector, pipeline.arcface
    decode = detect = 0.0
    all_chips = []
    for path in paths:
        t0 = time.perf_counter()
        try:
            image = decode_image(
                path.read_bytes(),
                name=path.name,
                working_pixels=settings.working_pixels,
                max_image_pixels=settings.max_image_pixels,
            )
        except Exception:  # a broken photo costs its decode attempt only
            decode += time.perf_counter() - t0
            continue
        t1 = time.perf_counter()
        found = detector.detect(image.pixels)
        t2 = time.perf_counter()
        decode, detect = decode + t1 - t0, detect + t2 - t1
        # Chips are cut outside the timed region: alignment is pipeline work, not floor.
        all_chips.append(align_faces(image.pixels, found.landmarks, embedder.chip_size))
    chips = (
        np.concatenate(all_chips)
        if all_chips
        else np.zeros((0, embedder.chip_size, embedder.chip_size, 3), np.uint8)
    )
    t3 = time.perf_counter()
    embedder.embed(chips)
    embed = time.perf_counter() - t3
    return {"decode": decode, "detect": detect, "embed": embed, "total": decode + detect + embed}


def speed_benchmark(
    folder: Path, settings: PipelineSettings, *, limit: int | None = None
) -> dict[str, Any]:
    """End-to-end and floor timings for one folder of photos with one detector."""
    paths = list_photos(folder, limit)
    pipeline = FacePipeline(settings)
    _ = pipeline.models  # load models before timing anything
    # Warm-up: first calls allocate arenas and pick kernels.
    if paths:
        list(pipeline.analyze(_sources(paths[:1])))
    # End to end first: it meets each photo's shapes cold (ONNX Runtime plans per input
    # shape), the floor after it warm, so the ratio errs against the pipeline.
    start = time.perf_counter()
    result = group_album(_sources(paths), settings, pipeline=pipeline)
    wall = time.perf_counter() - start
    floor = floor_seconds(paths, pipeline, settings)
    faces = len(result.faces)
    stages = {k: v for k, v in result.timings.items() if k != "total"}
    return {
        "set": folder.name,
        "detector": settings.detector,
        "photos": len(paths),
        "faces": faces,
        "people": len(result.groups),
        "errors": sum(p.status != "ok" for p in result.photos),
        "wall_s": round(wall, 2),
        "photos_per_s": round(len(paths) / wall, 3) if wall else None,
        "faces_per_s": round(faces / wall, 2) if wall else None,
        "stages_s": {k: round(v, 2) for k, v in stages.items()},
        "floor_s": {k: round(v, 2) for k, v in floor.items()},
        "ratio_to_floor": round(wall / floor["total"], 3) if floor["total"] else None,
        "ms_per_face_embed": round(1000 * stages.get("embed", 0.0) / faces, 2) if faces else None,
        "median_faces_per_photo": float(
            np.median([len(p.face_ids) for p in result.photos]) if result.photos else 0
        ),
    }
