"""Typed values that cross the db/ boundary: what the pipeline found, what was written."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from worker.types import FoundFace


@dataclass
class PhotoOutcome:
    """One photo after analysis; `status` is a `worker.types.PhotoStatus` value."""

    photo_id: int
    status: str
    error: str | None
    width: int | None
    height: int | None
    faces: list[FoundFace] = field(default_factory=list)


@dataclass
class TripWriteSummary:
    """What `write_trip_result` did to a trip.

    photos: photos sorted into folders (not deleted, analysed at least once); faces: faces
    grouped; people: person folders; others / no_face: photos in the shared "others" and
    "no faces" folders; errors: photos of this write whose analysis failed.
    corrections: people's corrections in force (links added or removed in the web app);
    _noticed: those this regroup saw first; _honoured: those it applied; _overruled: those a
    later correction contradicted (they are dropped); _followers: faces that followed a
    corrected face they are nearest to.
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
    corrections: int = 0
    corrections_noticed: int = 0
    corrections_honoured: int = 0
    corrections_overruled: int = 0
    corrections_followers: int = 0


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
    heartbeat_at: datetime | None = None


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
class CorrectionView:
    """A person's correction in force: a link they added or removed in the web app.

    `active`: false while its photo is deleted (it then blocks nothing). `job_id`: the job
    that noticed it.
    """

    kind: str
    photo_id: int
    file_name: str
    tag_id: int
    folder_name: str
    job_id: int | None
    noticed_at: datetime
    active: bool


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
    corrections: list[CorrectionView] = field(default_factory=list)
