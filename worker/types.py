"""Typed results that flow between the pipeline's stages."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np
from numpy.typing import NDArray

NO_FACE_GROUP = -2
"""The prototype's group for photos in which no face was found."""

SINGLE_FACE_GROUP = -1
"""The prototype's group for faces seen only once ("others")."""


class PhotoStatus(StrEnum):
    """What happened to one photo; anything but OK carries an error message."""

    OK = "ok"
    CORRUPT = "corrupt"
    UNSUPPORTED = "unsupported"
    TOO_LARGE = "too_large"
    TOO_SMALL = "too_small"
    MISSING = "missing"
    INVALID_KEY = "invalid_key"  # the web app's row names no valid object (file_key not a UUID)
    ERROR = "error"


@dataclass(frozen=True)
class PhotoSource:
    """A photo to process: an id, a display name, and a way to read its bytes lazily."""

    id: str
    name: str
    read: Callable[[], bytes]


@dataclass(frozen=True)
class DecodedImage:
    """A decoded photo: RGB pixels with EXIF orientation applied.

    `pixels` may be smaller than the original (reduced-scale decoding); `scale` maps
    working pixels to original pixels: original = working / scale. `pixels` is read-only
    (it shares the decoder's buffer): copy it to draw on it.
    """

    pixels: NDArray[np.uint8]
    original_width: int
    original_height: int
    scale: float
    format: str


@dataclass(frozen=True)
class Detections:
    """Faces found in one image, in that image's pixel coordinates.

    boxes: (n, 4) x1, y1, x2, y2; scores: (n,); landmarks: (n, 5, 2) x, y of the left eye,
    right eye, nose tip, left and right mouth corners (left/right as seen in the image).
    """

    boxes: NDArray[np.float32]
    scores: NDArray[np.float32]
    landmarks: NDArray[np.float32]

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    @staticmethod
    def empty() -> Detections:
        """No faces."""
        return Detections(
            boxes=np.zeros((0, 4), np.float32),
            scores=np.zeros((0,), np.float32),
            landmarks=np.zeros((0, 5, 2), np.float32),
        )

    def scaled(self, factor: float) -> Detections:
        """The same faces with every coordinate multiplied by `factor`."""
        return Detections(
            boxes=(self.boxes * factor).astype(np.float32),
            scores=self.scores,
            landmarks=(self.landmarks * factor).astype(np.float32),
        )

    def shifted(self, delta: float) -> Detections:
        """The same faces moved by `delta` pixels along both axes."""
        return Detections(
            boxes=(self.boxes + delta).astype(np.float32),
            scores=self.scores,
            landmarks=(self.landmarks + delta).astype(np.float32),
        )

    def concat(self, other: Detections) -> Detections:
        """These faces followed by `other`'s."""
        return Detections(
            np.concatenate([self.boxes, other.boxes]),
            np.concatenate([self.scores, other.scores]),
            np.concatenate([self.landmarks, other.landmarks]),
        )

    def select(self, keep: NDArray[np.bool_] | NDArray[np.intp]) -> Detections:
        """The faces picked by a boolean mask or index array."""
        return Detections(self.boxes[keep], self.scores[keep], self.landmarks[keep])


@dataclass
class FaceResult:
    """One detected face and the group it ended up in."""

    id: int
    photo_id: str
    box: list[float]
    landmarks: list[list[float]]
    score: float
    group: int = SINGLE_FACE_GROUP
    matched_face: int | None = None
    similarity: float | None = None


@dataclass
class PhotoResult:
    """One photo's outcome: status, size and the groups of its faces."""

    id: str
    path: str
    status: PhotoStatus
    error: str | None = None
    width: int | None = None
    height: int | None = None
    face_ids: list[int] = field(default_factory=list)
    group_idx: list[int] = field(default_factory=list)


@dataclass
class PersonGroup:
    """One person folder: its faces, its photos and the face that shows it best."""

    idx: int
    face_ids: list[int]
    photo_ids: list[str]
    cover_face_id: int


@dataclass(frozen=True)
class ModelInfo:
    """Which model file was used: registry name, role, path and sha256."""

    name: str
    role: str
    path: str
    sha256: str


@dataclass
class AlbumResult:
    """Everything `group_album` found: photos, faces, groups and how it got there."""

    photos: list[PhotoResult]
    faces: list[FaceResult]
    embeddings: NDArray[np.float32]
    groups: list[PersonGroup]
    group_idx_list: list[int]
    models: list[ModelInfo]
    settings: dict[str, Any]
    timings: dict[str, float]
