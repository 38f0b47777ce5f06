"""Typed values that cross the db/ boundary: what the pipeline found, what was written."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
from numpy.typing import NDArray


@dataclass
class FaceOutcome:
    """One face found in a photo: box x1,y1,x2,y2 and 5 landmarks in original pixels."""

    box: list[float]
    landmarks: list[list[float]]
    score: float
    embedding: NDArray[np.float32]
    thumbnail_key: str | None = None


@dataclass
class PhotoOutcome:
    """One photo after analysis; `status` is a `worker.types.PhotoStatus` value."""

    photo_id: int
    status: str
    error: str | None
    width: int | None
    height: int | None
    faces: list[FaceOutcome] = field(default_factory=list)


@dataclass
class TripWriteSummary:
    """What `write_trip_result` did to a trip.

    photos: photos sorted into folders (not deleted, analysed at least once); faces: faces
    grouped; people: person folders; others / no_face: photos in the shared "others" and
    "no faces" folders; errors: photos of this write whose analysis failed.
    """

    photos: int
    faces: int
    people: int
    others: int
    no_face: int
    errors: int
    tags_created: int
    tags_deleted: int
    links_added: int = 0
    links_removed: int = 0


@dataclass
class JobView:
    """One job as `trip_status` reports it."""

    id: int
    mode: str
    status: str
    celery_task_id: str | None
    attempts: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    counts: dict[str, Any] | None
    error: str | None
    embedder_name: str | None


@dataclass
class PhotoProblem:
    """A photo whose latest analysis failed."""

    photo_id: int
    file_name: str
    status: str
    error: str | None


@dataclass
class FolderView:
    """One folder of a trip as the web app shows it: its tag, name and photos."""

    tag_id: int
    tag_num: int
    name: str
    photo_files: list[str]


@dataclass
class TripStatus:
    """Where a trip stands: recent jobs, how many photos are done, and which failed.

    Counts are for `embedder_sha256` (the latest job's embedder unless one was asked for).
    """

    trip_id: int
    embedder_sha256: str | None
    photos: int
    analyzed: int
    faces: int
    people: int
    jobs: list[JobView]
    errors: list[PhotoProblem]
