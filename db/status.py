"""What `aftertrip-faces status` shows of a trip: its jobs, counts, failed photos,
corrections in force and folders. Reads only; the caller ends the transaction."""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db.common import TripNotFound
from db.models import Face, Job, LinkRecord, PhotoAnalysis
from db.schemas import CorrectionView, FolderView, JobView, PhotoProblem, TripStatus
from db.webapp import (
    NO_FACE_TAG_ID,
    OTHERS_TAG_ID,
    SHARED_FOLDER_IDS,
    SHARED_TAG_IDS,
    Photo,
    PhotoTagFace,
    TagFace,
    Trip,
)
from worker.types import LinkState, PhotoStatus


def trip_status(
    *, session: Session, trip_id: int, limit: int = 5, embedder_sha256: str | None = None
) -> TripStatus:
    """The trip's recent jobs (newest first), photo and face counts, and failed photos."""
    if session.get(Trip, trip_id) is None:
        raise TripNotFound(trip_id)
    jobs = list(
        session.scalars(
            select(Job).where(Job.trip_id == trip_id).order_by(Job.id.desc()).limit(limit)
        )
    )
    sha = embedder_sha256
    if sha is None:
        sha = next((j.embedder_sha256 for j in jobs if j.embedder_sha256), None)
    live = select(Photo.id).where(Photo.trip_id == trip_id, Photo.deleted_at.is_(None))
    photos = session.scalar(select(func.count()).select_from(live.subquery())) or 0
    analyzed = faces = people = 0
    errors: list[PhotoProblem] = []
    if sha is not None:
        analyzed = (
            session.scalar(
                select(func.count())
                .select_from(PhotoAnalysis)
                .where(
                    PhotoAnalysis.photo_id.in_(live),
                    PhotoAnalysis.embedder_sha256 == sha,
                    PhotoAnalysis.analyzed_at.is_not(None),
                )
            )
            or 0
        )
        faces = (
            session.scalar(
                select(func.count())
                .select_from(Face)
                .where(Face.photo_id.in_(live), Face.embedder_sha256 == sha)
            )
            or 0
        )
        failed = session.execute(
            select(Photo.id, Photo.file_name, PhotoAnalysis.status, PhotoAnalysis.error)
            .join(PhotoAnalysis, PhotoAnalysis.photo_id == Photo.id)
            .where(
                Photo.id.in_(live),
                PhotoAnalysis.embedder_sha256 == sha,
                PhotoAnalysis.status != PhotoStatus.OK.value,
            )
            .order_by(Photo.id)
        )
        errors = [PhotoProblem(pid, name, status, err) for pid, name, status, err in failed]
    people = (
        session.scalar(
            select(func.count(func.distinct(PhotoTagFace.tagface_id))).where(
                PhotoTagFace.photo_id.in_(live), PhotoTagFace.tagface_id.not_in(SHARED_TAG_IDS)
            )
        )
        or 0
    )
    return TripStatus(
        trip_id=trip_id,
        embedder_sha256=sha,
        photos=photos,
        analyzed=analyzed,
        faces=faces,
        people=people,
        jobs=[
            JobView(
                id=j.id,
                mode=j.mode,
                status=j.status,
                celery_task_id=j.celery_task_id,
                attempts=j.attempts,
                created_at=j.created_at,
                started_at=j.started_at,
                finished_at=j.finished_at,
                counts=j.counts,
                error=j.error,
                embedder_name=j.embedder_name,
                heartbeat_at=j.heartbeat_at,
            )
            for j in jobs
        ],
        errors=errors,
        corrections=trip_corrections(session=session, trip_id=trip_id),
    )


def trip_corrections(*, session: Session, trip_id: int) -> list[CorrectionView]:
    """The corrections in force for a trip (links people added or removed), oldest first."""
    rows = session.execute(
        select(LinkRecord, Photo.file_name, Photo.deleted_at, TagFace.custom_name)
        .join(Photo, Photo.id == LinkRecord.photo_id)
        .join(TagFace, TagFace.id == LinkRecord.tagface_id)
        .where(
            LinkRecord.trip_id == trip_id,
            LinkRecord.state.in_([LinkState.ADDED.value, LinkState.REMOVED.value]),
        )
        .order_by(LinkRecord.id)
    ).all()
    return [
        CorrectionView(
            kind=record.state,
            photo_id=record.photo_id,
            file_name=file_name,
            tag_id=record.tagface_id,
            folder_name=name or "",
            job_id=record.job_id,
            noticed_at=record.noticed_at,
            active=deleted_at is None,
        )
        for record, file_name, deleted_at, name in rows
    ]


def trip_folders(*, session: Session, trip_id: int) -> list[FolderView]:
    """The trip's folders (people, then "others" and "no faces") with their photos' files."""
    rows = session.execute(
        select(TagFace.id, TagFace.tag_num, TagFace.custom_name, Photo.file_name)
        .join(PhotoTagFace, PhotoTagFace.tagface_id == TagFace.id)
        .join(Photo, Photo.id == PhotoTagFace.photo_id)
        .where(Photo.trip_id == trip_id, Photo.deleted_at.is_(None))
        .order_by(TagFace.id, Photo.id)
    ).all()
    folders: dict[int, FolderView] = {}
    for tag_id, tag_num, name, file_name in rows:
        label = name or {NO_FACE_TAG_ID: "no faces", OTHERS_TAG_ID: "others"}.get(tag_id, "")
        folder = folders.setdefault(tag_id, FolderView(tag_id, tag_num, label, []))
        folder.photo_files.append(file_name)
    return sorted(folders.values(), key=lambda f: SHARED_FOLDER_IDS.order(f.tag_id))
