"""A trip's photos: those to analyse, and each analysed photo's faces and status.

The store is split in two around the rule of which folder a re-detected face inherits
(`worker.regroup.inherited_folders`): `load_batch` reads what the photos hold now,
`save_batch` writes the outcomes with the folders the caller worked out. `tasks/write.py`
runs both in one transaction. The reads leave their transaction to the caller.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

import numpy as np
from sqlalchemy import exists, select
from sqlalchemy.orm import Session

from db.common import MAX_ERROR_CHARS, chunks, set_if_changed
from db.models import Face, JobMode, PhotoAnalysis
from db.schemas import PhotoOutcome
from db.webapp import Photo
from worker.types import FoundFace, ModelInfo, OldFace, PhotoStatus

logger = logging.getLogger(__name__)


def trip_photos(*, session: Session, trip_id: int) -> list[Photo]:
    """The trip's photos that are not deleted, ordered by id."""
    stmt = (
        select(Photo).where(Photo.trip_id == trip_id, Photo.deleted_at.is_(None)).order_by(Photo.id)
    )
    return list(session.scalars(stmt))


def photos_to_analyze(
    *,
    session: Session,
    trip_id: int,
    embedder_sha256: str,
    mode: Literal["missing", "all"],
    job_id: int | None = None,
) -> list[Photo]:
    """Photos a job must analyse, ordered by id.

    "missing": not deleted and without a successful analysis for this embedder (new
    photos, and photos whose last analysis failed); "all": every photo not deleted.
    With `job_id`, photos whose result this job already stored are left out too (in both
    modes): a retried or redelivered job continues where it stopped.
    """
    conditions = [Photo.trip_id == trip_id, Photo.deleted_at.is_(None)]
    if JobMode(mode) is JobMode.MISSING:
        done = exists().where(
            PhotoAnalysis.photo_id == Photo.id,
            PhotoAnalysis.embedder_sha256 == embedder_sha256,
            PhotoAnalysis.status == PhotoStatus.OK.value,
        )
        conditions.append(~done)
    if job_id is not None:
        stored = exists().where(
            PhotoAnalysis.photo_id == Photo.id,
            PhotoAnalysis.embedder_sha256 == embedder_sha256,
            PhotoAnalysis.job_id == job_id,
        )
        conditions.append(~stored)
    return list(session.scalars(select(Photo).where(*conditions).order_by(Photo.id)))


def trip_thumbnail_keys(*, session: Session, trip_id: int) -> set[str]:
    """The storage keys of every face thumbnail the trip's face rows point at."""
    rows = session.scalars(
        select(Face.thumbnail_key)
        .join(Photo, Photo.id == Face.photo_id)
        .where(Photo.trip_id == trip_id, Face.thumbnail_key.is_not(None))
    )
    return {key for key in rows if key}


# ---------------------------------------------------------------------------- storing a batch


@dataclass
class StoredBatch:
    """What a batch's photos hold before it is stored (read in the write's transaction)."""

    deleted: dict[int, datetime | None]
    """Each photo of the batch still in the database -> its deleted_at."""
    faces: dict[int, list[Face]] = field(default_factory=dict)
    """This embedder's face rows of each photo, by face_index."""
    analyses: dict[int, PhotoAnalysis] = field(default_factory=dict)

    def old_faces(self, photo_id: int) -> list[OldFace]:
        """This embedder's faces of a photo, as votes."""
        return [OldFace(f.box, f.tagface_id) for f in self.faces.get(photo_id, [])]


def load_batch(
    session: Session, *, trip_id: int, outcomes: Sequence[PhotoOutcome], embedder_sha256: str
) -> StoredBatch:
    """Read the batch's photos, their faces and analyses; refuses a batch naming a photo
    twice or another trip's photo. Photos deleted from the web app while the job ran are
    left out (logged)."""
    ids = [o.photo_id for o in outcomes]
    if len(set(ids)) != len(ids):
        raise ValueError("an outcome appears twice for the same photo")
    batch = StoredBatch(deleted={})
    if not ids:
        return batch
    trips: dict[int, int] = {}
    for chunk in chunks(sorted(ids)):
        rows = session.execute(
            select(Photo.id, Photo.trip_id, Photo.deleted_at).where(Photo.id.in_(chunk))
        )
        for pid, tid, deleted in rows:
            trips[pid] = tid
            batch.deleted[pid] = deleted
    elsewhere = sorted(pid for pid, tid in trips.items() if tid != trip_id)
    if elsewhere:
        raise ValueError(f"photos {elsewhere} belong to other trips, not {trip_id}")
    vanished = sorted(set(ids) - set(trips))
    if vanished:
        # Deleted from the web app while the job ran: nothing left to write to.
        logger.warning(
            "photos vanished during the job", extra={"trip_id": trip_id, "photo_ids": vanished}
        )
    by_photo: dict[int, list[Face]] = defaultdict(list)
    for chunk in chunks(sorted(trips)):
        for face in session.scalars(
            select(Face)
            .where(Face.photo_id.in_(chunk), Face.embedder_sha256 == embedder_sha256)
            .order_by(Face.photo_id, Face.face_index)
        ):
            by_photo[face.photo_id].append(face)
        for stored in session.scalars(
            select(PhotoAnalysis).where(
                PhotoAnalysis.photo_id.in_(chunk), PhotoAnalysis.embedder_sha256 == embedder_sha256
            )
        ):
            batch.analyses[stored.photo_id] = stored
    batch.faces = dict(by_photo)
    return batch


def other_embedders_faces(
    session: Session, *, photo_ids: Sequence[int], embedder_sha256: str
) -> dict[int, list[OldFace]]:
    """The faces other embedders found in these photos, as votes (by embedder, then index)."""
    found: dict[int, list[OldFace]] = defaultdict(list)
    for chunk in chunks(sorted(photo_ids)):
        for face in session.scalars(
            select(Face)
            .where(Face.photo_id.in_(chunk), Face.embedder_sha256 != embedder_sha256)
            .order_by(Face.photo_id, Face.embedder_sha256, Face.face_index)
        ):
            found[face.photo_id].append(OldFace(face.box, face.tagface_id))
    return dict(found)


def save_batch(
    session: Session,
    batch: StoredBatch,
    outcomes: Sequence[PhotoOutcome],
    *,
    folders: Mapping[int, Sequence[int | None]],
    embedder: ModelInfo,
    job_id: int | None,
    now: datetime,
) -> int:
    """Write each outcome's faces and status in the open transaction; returns how many
    photos failed.

    - An outcome with status ok replaces that photo's faces for this embedder, in place by
      face_index (ids stay, no duplicates); each face row takes its folder from `folders`
      (photo id -> one folder or None per face).
    - Any other status records the error and keeps the photo's previous faces.
    - `aftertrip_photo.job_id` records the job, so a retried or redelivered job skips the
      photos it already stored.
    """
    removed: set[int] = set()
    errors = 0
    for outcome in sorted(outcomes, key=lambda o: o.photo_id):
        if outcome.photo_id not in batch.deleted:
            continue
        ok = PhotoStatus(outcome.status) is PhotoStatus.OK
        analysis = batch.analyses.get(outcome.photo_id)
        if analysis is None:
            analysis = PhotoAnalysis(photo_id=outcome.photo_id, embedder_sha256=embedder.sha256)
            session.add(analysis)
        analysis.embedder_name = embedder.name
        analysis.status = PhotoStatus(outcome.status).value
        analysis.updated_at = now
        analysis.job_id = job_id
        if outcome.width is not None or ok:
            analysis.width, analysis.height = outcome.width, outcome.height
        if ok:
            analysis.error = None
            analysis.face_count = len(outcome.faces)
            analysis.analyzed_at = now
            removed |= _replace_faces(
                session,
                outcome,
                batch.faces.get(outcome.photo_id, []),
                folders.get(outcome.photo_id, [None] * len(outcome.faces)),
                embedder=embedder,
                now=now,
                live=batch.deleted[outcome.photo_id] is None,
            )
        else:
            errors += 1
            analysis.error = (outcome.error or outcome.status)[:MAX_ERROR_CHARS]
    if removed:
        # Unlink matches to removed faces here rather than leave it to ON DELETE SET NULL,
        # so the session's rows agree with the database's.
        for chunk in chunks(sorted(removed)):
            for face in session.scalars(select(Face).where(Face.matched_face_id.in_(chunk))):
                face.matched_face_id = None
    return errors


def _replace_faces(
    session: Session,
    outcome: PhotoOutcome,
    old: list[Face],
    folders: Sequence[int | None],
    *,
    embedder: ModelInfo,
    now: datetime,
    live: bool,
) -> set[int]:
    """Rewrite a photo's face rows in place by face_index (ids stay, no duplicates).

    Returns the ids of the rows removed (the photo has fewer faces now).
    """
    by_index = {face.face_index: face for face in old}
    for index, found in enumerate(outcome.faces):
        row = by_index.pop(index, None)
        if row is None:
            row = Face(
                photo_id=outcome.photo_id,
                face_index=index,
                embedder_sha256=embedder.sha256,
                created_at=now,
                is_cover=False,
            )
            session.add(row)
        _fill_face(row, found, embedder.name)
        set_if_changed(row, "tagface_id", folders[index])
        if not live:
            # A deleted photo's faces are not grouped: nothing else will set these.
            row.group_label = row.matched_face_id = row.similarity = None
            row.is_cover = False
    for leftover in by_index.values():
        session.delete(leftover)
    return {face.id for face in by_index.values()}


def _fill_face(row: Face, found: FoundFace, embedder_name: str) -> None:
    vector = np.asarray(found.embedding, dtype=np.float32).reshape(-1)
    if vector.size == 0 or not np.all(np.isfinite(vector)):
        raise ValueError(f"face of photo {row.photo_id} has an empty or non-finite embedding")
    if len(found.box) != 4:
        raise ValueError(f"face of photo {row.photo_id} has a box of {len(found.box)} values")
    row.x1, row.y1, row.x2, row.y2 = found.box
    row.landmarks = [list(point) for point in found.landmarks]
    row.score = found.score
    row.embedding = vector.astype("<f4").tobytes()
    row.embedder_name = embedder_name
    row.thumbnail_key = found.thumbnail_key
    row.chip_size = found.chip_size
