"""Typed values that flow between the pipeline's stages, the folder plan and the database.

`db/` imports from worker/ only this module (and `worker.errors`): the plan's inputs and
outputs are plain values here, so loading and saving never reach into the rules."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
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


@dataclass(frozen=True, kw_only=True)
class FoundFace:
    """One face as the pipeline finds it, the database stores it and the folder plan groups
    it: box x1, y1, x2, y2 and five landmarks (as `Detections`) in original pixels, the
    detector's score, and the embedding. `thumbnail_key`: its thumbnail in the photo store.
    `chip_size`: its size in the pixels its chip was cut from (the decode's working pixels,
    `AnalyzedPhoto.chip_sizes`), what `worker.rules.small_faces` judges; None for a face
    stored before it was kept (then it counts as not small)."""

    box: tuple[float, float, float, float]
    score: float
    embedding: NDArray[np.float32]
    landmarks: tuple[tuple[float, float], ...] = ()
    thumbnail_key: str | None = None
    chip_size: float | None = None

    @staticmethod
    def found(
        detections: Detections,
        embeddings: NDArray[np.float32],
        thumbnail_keys: Sequence[str] | None = None,
        chip_sizes: NDArray[np.float32] | None = None,
    ) -> list[FoundFace]:
        """The faces of one photo's detections, their embeddings, thumbnails and chip sizes
        (all in the same order), in plain floats."""
        return [
            FoundFace(
                box=(float(x1), float(y1), float(x2), float(y2)),
                score=float(detections.scores[i]),
                embedding=embeddings[i],
                landmarks=tuple((float(x), float(y)) for x, y in detections.landmarks[i]),
                thumbnail_key=thumbnail_keys[i] if thumbnail_keys else None,
                chip_size=float(chip_sizes[i]) if chip_sizes is not None else None,
            )
            for i, (x1, y1, x2, y2) in enumerate(detections.boxes)
        ]


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


@dataclass(frozen=True)
class ModelsUsed:
    """The detector and embedder a job ran, as its row records them."""

    detector_name: str | None
    detector_sha256: str | None
    embedder_name: str | None
    embedder_sha256: str | None
    models: list[dict[str, str]]

    @classmethod
    def of(cls, models: Sequence[ModelInfo]) -> ModelsUsed:
        """Name and digest of the detector and of the embedder among `models`.

        A model of several files (MTCNN's three nets) is named by their names joined with
        "+", and identified by one sha256 over their digests.
        """
        detectors = [m for m in models if m.role == "detector"]
        embedders = [m for m in models if m.role == "embedder"] or [
            m for m in models if m.role != "detector"
        ]

        def name_and_sha(files: list[ModelInfo]) -> tuple[str | None, str | None]:
            if not files:
                return None, None
            if len(files) == 1:
                return files[0].name, files[0].sha256
            joined = "".join(m.sha256 for m in files)
            return "+".join(m.name for m in files), hashlib.sha256(joined.encode()).hexdigest()

        detector_name, detector_sha = name_and_sha(detectors)
        embedder_name, embedder_sha = name_and_sha(embedders)
        return cls(
            detector_name=detector_name,
            detector_sha256=detector_sha,
            embedder_name=embedder_name,
            embedder_sha256=embedder_sha,
            models=[{"name": m.name, "role": m.role, "sha256": m.sha256} for m in models],
        )


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


# ---------------------------------------------------------------------------- the folder plan


class LinkState(StrEnum):
    """Whose a photo-to-folder link is, as the worker knows it (aftertrip_link.state)."""

    WORKER = "worker"  # the worker wrote it (and it was there after its last regroup)
    ADDED = "added"  # a person added it: the worker keeps it
    REMOVED = "removed"  # a person removed it: the worker never writes it again


class CorrectionKind(StrEnum):
    """What a person did to a link of the worker's."""

    ADDED = "added"
    REMOVED = "removed"


@dataclass(frozen=True, kw_only=True)
class TripFace(FoundFace):
    """One stored face of a live photo of the trip. `folder`: the person folder it was in
    (its vote)."""

    photo_id: int
    folder: int | None = None


@dataclass(frozen=True)
class Folder:
    """One person folder of the trip (photos_tagface)."""

    id: int
    tag_num: int
    named: bool


@dataclass(frozen=True)
class Correction:
    """A link a person added or removed; a higher `order` is a later correction."""

    photo_id: int
    folder_id: int
    kind: CorrectionKind
    order: int


@dataclass(frozen=True)
class NewFolder:
    """A folder to create; faces and links name it by `key` (negative: -1, -2, ...)."""

    key: int
    tag_num: int


@dataclass(frozen=True)
class SharedFolders:
    """The ids of the two folders every trip shares."""

    no_face: int
    others: int

    def __contains__(self, folder_id: object) -> bool:
        return folder_id in (self.no_face, self.others)

    def order(self, folder_id: int) -> tuple[int, int]:
        """Sort key of a trip's folders: people by id, then "others", then "no faces"."""
        if folder_id == self.others:
            return 1, 0
        if folder_id == self.no_face:
            return 2, 0
        return 0, folder_id


@dataclass(frozen=True)
class GroupingRule:
    """How faces are grouped: `worker.cluster.cluster_faces`'s settings, and the cut (cosine)
    used to match groups to folders by direction and to let new faces follow corrections."""

    method: str
    embedder: str
    threshold: float
    explicit_threshold: float | None = None
    min_quality: float | None = None
    small_face: int = 0
    """`AFTERTRIP_SMALL_FACE`: faces under it (`FoundFace.chip_size`) never found a person
    (0: off)."""
    near_duplicates: bool = False
    """`AFTERTRIP_NEAR_DUPLICATES`: small faces in "others" follow the large face at their place
    in a near-duplicate shot (`worker.neardup.follow_near_duplicates`)."""


@dataclass
class CorrectionOutcome:
    """What the plan did with each correction it was given."""

    honoured: list[Correction] = field(default_factory=list)
    overruled: list[Correction] = field(default_factory=list)
    followers: int = 0
    """Faces that followed a corrected face they are nearest to."""


@dataclass
class FolderPlan:
    """Where every face and photo of the trip goes.

    Per face (in the order given): `labels` (group, -1 alone), `matched` (index of the face it
    was matched to, -1), `similarity`, `folders` (folder id, a `NewFolder.key`, or the shared
    "others" id for a face alone) and `covers`. `group_folders`: folder of each group label.
    """

    labels: NDArray[np.int64]
    matched: NDArray[np.int64]
    similarity: NDArray[np.float32]
    folders: list[int]
    covers: list[bool]
    group_folders: dict[int, int]
    new_folders: list[NewFolder]
    links: set[tuple[int, int]]
    corrections: CorrectionOutcome

    @property
    def people(self) -> int:
        """Person folders in use."""
        return len(set(self.group_folders.values()))


@dataclass(frozen=True)
class OldFace:
    """A face stored before its photo was analysed again: where it was, and its folder."""

    box: Sequence[float]
    folder: int | None


@dataclass(frozen=True)
class LinkRecord:
    """The worker's record of one link (aftertrip_link): its id orders corrections."""

    id: int
    photo_id: int
    folder_id: int
    state: LinkState
