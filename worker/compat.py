"""The prototype's API, `run_face_recog(images)`, for callers written against it.

Returns `(groups, group_idx_list, images)` with the structure the prototype's README
documents: `groups[i]` has `original_images_idx_list`, `crop_path_list`, `face_list`,
`face2_idx_list`, `face1_idx_list` and `cosine_similarity_list`; every image dict gets
`group_idx` (`[-2]` no face, `-1` for a face seen only once); `group_idx_list` lists the
groups that hold two or more faces. Differences, on purpose: photos are read from local
paths or `file://` URLs unless the caller passes `read` (we never fetch arbitrary URLs);
crops are written only when `crop_dir` is given (else `crop_path_list` holds None); an
album without any face returns `([], [], images)` rather than `(-1, -1, -1)`; a photo
that cannot be read or decoded gets `group_idx: []` and an `error` key.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from worker.cluster import MIN_DETECTION_SCORE, Clustering, cluster_faces, seed_grouping
from worker.errors import PhotoUnreadable
from worker.neardup import follow_near_duplicates
from worker.pipeline import AnalyzedPhoto, FacePipeline, album_small_faces
from worker.rules import photo_groups
from worker.settings import PipelineSettings
from worker.types import SINGLE_FACE_GROUP, PhotoSource, PhotoStatus

logger = logging.getLogger(__name__)

Reader = Callable[[str], bytes]


def read_local(url: str) -> bytes:
    """Bytes of a local path or `file://` URL; other URLs need a caller-supplied reader."""
    if "://" in url and not url.startswith("file://"):
        raise PhotoUnreadable(url, "only local paths and file:// URLs are read; pass read=...")
    path = Path(url.removeprefix("file://"))
    try:
        return path.read_bytes()
    except OSError as exc:
        raise PhotoUnreadable(url, f"cannot read file: {exc.strerror or exc}") from exc


def _source(idx: int, url: str, read: Reader) -> PhotoSource:
    return PhotoSource(id=str(idx), name=url, read=lambda: read(url))


def run_face_recog(
    images: list[dict[str, Any]],
    *,
    settings: PipelineSettings | None = None,
    read: Reader = read_local,
    crop_dir: Path | None = None,
    pipeline: FacePipeline | None = None,
) -> tuple[list[dict[str, Any]], list[int], list[dict[str, Any]]]:
    """Group the faces of `images` ([{"id", "url"}, ...]) the way the prototype reported it."""
    settings = settings or PipelineSettings()
    pipeline = pipeline or FacePipeline(settings)
    sources = [_source(i, str(image["url"]), read) for i, image in enumerate(images)]
    analyzed = list(pipeline.analyze(sources, keep_chips=True))
    out_images = [dict(image) for image in images]

    face_photo: list[int] = []
    chips: list[np.ndarray] = []
    for idx, photo in enumerate(analyzed):
        face_photo.extend([idx] * len(photo.detections))
        if photo.chips is not None:
            chips.extend(photo.chips)
    if not face_photo:
        for image, photo in zip(out_images, analyzed, strict=True):
            _mark(image, photo, [])
        return [], [], out_images

    embeddings = np.concatenate([p.embeddings for p in analyzed]).astype(np.float32)
    crop_paths = _write_crops(chips, face_photo, crop_dir)
    if settings.grouping == "seed":
        groups = _seed_groups(embeddings, settings)
    else:
        small, tiny = album_small_faces(analyzed, settings.small_face)
        clustering = cluster_faces(
            embeddings,
            np.asarray(face_photo, np.int64),
            method=settings.grouping,
            threshold=settings.similarity_threshold,
            embedder=pipeline.embedder.name,
            quality=np.concatenate([p.detections.scores for p in analyzed]),
            min_quality=MIN_DETECTION_SCORE.get(settings.detector),
            small=small,
            tiny=tiny,
        )
        if settings.near_duplicates:
            clustering = follow_near_duplicates(
                clustering,
                embeddings,
                np.asarray(face_photo, np.int64),
                np.concatenate([p.detections.boxes for p in analyzed]),
                small,
            )
        groups = _default_groups(clustering)
    return _prototype_structure(groups, face_photo, chips, crop_paths, analyzed, out_images)


# (faces, matched face or None, similarity) per group, in the prototype's group order
_Groups = list[tuple[list[int], list[int | None], list[float]]]


def _seed_groups(embeddings: np.ndarray, settings: PipelineSettings) -> _Groups:
    threshold = 0.45 if settings.similarity_threshold is None else settings.similarity_threshold
    return [
        (g.faces, g.matched, g.similarity)
        for g in seed_grouping(embeddings @ embeddings.T, threshold)
    ]


def _default_groups(clustering: Clustering) -> _Groups:
    """People first (by label), then one group per face seen once, as the prototype had."""
    groups: _Groups = []
    labels = clustering.labels
    for label in sorted({int(v) for v in labels if v >= 0}):
        faces = [int(i) for i in np.flatnonzero(labels == label)]
        matched: list[int | None] = [None] + [int(clustering.matched_face[i]) for i in faces[1:]]
        sims = [-1.0] + [float(clustering.similarity[i]) for i in faces[1:]]
        groups.append((faces, matched, sims))
    for i in np.flatnonzero(labels < 0):
        groups.append(([int(i)], [None], [-1.0]))
    return groups


def _write_crops(
    chips: list[np.ndarray], face_photo: list[int], crop_dir: Path | None
) -> list[str | None]:
    if crop_dir is None:
        return [None] * len(chips)
    crop_dir.mkdir(parents=True, exist_ok=True)
    paths: list[str | None] = []
    per_photo: dict[int, int] = {}
    for chip, photo in zip(chips, face_photo, strict=True):
        per_photo[photo] = per_photo.get(photo, 0) + 1
        path = crop_dir / f"{photo}_{per_photo[photo]}.jpg"
        Image.fromarray(chip).save(path, quality=95)
        paths.append(str(path))
    return paths


def _mark(image: dict[str, Any], photo: AnalyzedPhoto, labels: list[int]) -> None:
    """Set an image's `group_idx` from its faces' groups (-1: a face seen once)."""
    ok = photo.status is PhotoStatus.OK
    image["group_idx"] = photo_groups(labels, analysed=ok)
    if not ok:
        image["error"] = f"{photo.status.value}: {photo.error}"


def _prototype_structure(
    groups: _Groups,
    face_photo: list[int],
    chips: list[np.ndarray],
    crop_paths: list[str | None],
    analyzed: list[AnalyzedPhoto],
    out_images: list[dict[str, Any]],
) -> tuple[list[dict[str, Any]], list[int], list[dict[str, Any]]]:
    per_image: list[list[int]] = [[] for _ in analyzed]
    out_groups: list[dict[str, Any]] = []
    # Each image's faces in face order, by group; a face alone in its group is seen once.
    face_group: dict[int, int] = {}
    for g_idx, (faces, _, _) in enumerate(groups):
        for face in faces:
            face_group[face] = g_idx if len(faces) > 1 else SINGLE_FACE_GROUP
    for face in sorted(face_group):
        per_image[face_photo[face]].append(face_group[face])
    valid: list[int] = []
    for g_idx, (faces, matched, sims) in enumerate(groups):
        out_groups.append(
            {
                "original_images_idx_list": [face_photo[f] for f in faces],
                "crop_path_list": [crop_paths[f] for f in faces],
                "face_list": [chips[f] for f in faces],
                "face2_idx_list": list(faces),
                "face1_idx_list": [[] if m is None else m for m in matched],
                "cosine_similarity_list": list(sims),
            }
        )
        if len(faces) > 1:
            valid.append(g_idx)
    for idx, (image, photo) in enumerate(zip(out_images, analyzed, strict=True)):
        _mark(image, photo, per_image[idx])
    return out_groups, valid, out_images
