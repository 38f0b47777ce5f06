"""Keyword-only data functions over a Session: jobs, photos to analyse, and trip results.

Transactions: the job functions (`create_job`, `start_job`, `finish_job`, `fail_job`) commit
what they did. `write_trip_result` runs its own transaction from start to commit: pass it a
Session with none open (commit or roll back after earlier reads; sessions from
`db.session.make_sessionmaker` keep the loaded attributes so that reading them does not
open one again). The read functions leave their transaction to the caller.
"""

from __future__ import annotations

import hashlib
import logging
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Literal, TypeVar

import numpy as np
from numpy.typing import NDArray
from scipy.optimize import linear_sum_assignment
from sqlalchemy import Select, delete, exists, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from db.models import Face, FolderCentroid, Job, JobMode, JobStatus, PhotoAnalysis
from db.schemas import (
    FaceOutcome,
    FolderView,
    JobView,
    PhotoOutcome,
    PhotoProblem,
    TripStatus,
    TripWriteSummary,
)
from db.session import SQLITE_BEGIN_OPTION
from db.types import utcnow
from db.webapp import (
    NO_FACE_TAG_ID,
    OTHERS_TAG_ID,
    SHARED_TAG_IDS,
    Photo,
    PhotoTagFace,
    TagFace,
    Trip,
    check_shared_folders,
)
from worker.cluster import MIN_DETECTION_SCORE, cluster_faces, default_threshold
from worker.detect import box_iou, cover_score
from worker.settings import PipelineSettings
from worker.types import ModelInfo, PhotoStatus

__all__ = [
    "FaceOutcome",
    "FolderView",
    "PhotoOutcome",
    "TripNotFound",
    "TripStatus",
    "TripWriteSummary",
    "create_job",
    "fail_job",
    "find_queued_or_running_job",
    "trip_thumbnail_keys",
    "finish_job",
    "get_job",
    "photos_to_analyze",
    "regroup_trip",
    "start_job",
    "store_photo_outcomes",
    "trip_folders",
    "trip_photos",
    "trip_status",
    "write_trip_result",
]

logger = logging.getLogger(__name__)

BOX_MATCH_IOU = 0.5
"""A re-detected face inherits the folder of the old face it overlaps at least this much."""

UNNAMED = ""
"""custom_name of a folder the worker creates: Django's CharField(blank=True) is NOT NULL."""

MAX_ERROR_CHARS = 10_000
_CHUNK = 500


class TripNotFound(LookupError):
    """No trips_trip row has this id."""

    def __init__(self, trip_id: int) -> None:
        super().__init__(f"trip {trip_id} does not exist")
        self.trip_id = trip_id


# ---------------------------------------------------------------------------- reads


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


def get_job(*, session: Session, job_id: int) -> Job | None:
    """The job with this id, or None."""
    return session.get(Job, job_id)


def find_queued_or_running_job(*, session: Session, trip_id: int) -> Job | None:
    """The trip's oldest job still queued, running or waiting for its retry (to avoid
    enqueueing a second one)."""
    pending = [JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.RETRYING]
    stmt = (
        select(Job).where(Job.trip_id == trip_id, Job.status.in_(pending)).order_by(Job.id).limit(1)
    )
    return session.scalars(stmt).first()


# ---------------------------------------------------------------------------- jobs


def create_job(*, session: Session, trip_id: int, mode: str, task_id: str | None = None) -> Job:
    """Record a queued job for a trip and commit (call before enqueueing the task)."""
    job = Job(
        trip_id=trip_id,
        mode=JobMode(mode).value,
        status=JobStatus.QUEUED.value,
        celery_task_id=task_id,
        attempts=0,
        created_at=utcnow(),
    )
    session.add(job)
    session.commit()
    return job


def _model_fields(models: Sequence[ModelInfo]) -> dict[str, object]:
    detectors = [m for m in models if m.role == "detector"]
    embedders = [m for m in models if m.role == "embedder"] or [
        m for m in models if m.role != "detector"
    ]

    def name_and_sha(files: list[ModelInfo]) -> tuple[str | None, str | None]:
        if not files:
            return None, None
        if len(files) == 1:
            return files[0].name, files[0].sha256
        # Several files make one model (MTCNN's three nets): one digest over all of them.
        joined = "".join(m.sha256 for m in files)
        return "+".join(m.name for m in files), hashlib.sha256(joined.encode()).hexdigest()

    detector_name, detector_sha = name_and_sha(detectors)
    embedder_name, embedder_sha = name_and_sha(embedders)
    return {
        "detector_name": detector_name,
        "detector_sha256": detector_sha,
        "embedder_name": embedder_name,
        "embedder_sha256": embedder_sha,
        "models": [{"name": m.name, "role": m.role, "sha256": m.sha256} for m in models],
    }


def start_job(
    *,
    session: Session,
    trip_id: int,
    mode: str,
    task_id: str | None,
    models: Sequence[ModelInfo],
) -> Job:
    """Mark a job running and commit; a redelivered task (same task id) reuses its row.

    `attempts` counts deliveries. A job created earlier by `create_job` with this task id
    is the one started.
    """
    fields = _model_fields(models)
    mode_value = JobMode(mode).value
    for attempt in range(2):
        job = None
        if task_id is not None:
            job = session.scalars(select(Job).where(Job.celery_task_id == task_id)).first()
        if job is not None and job.trip_id != trip_id:
            raise ValueError(f"task {task_id} belongs to trip {job.trip_id}, not {trip_id}")
        if job is None:
            job = Job(trip_id=trip_id, celery_task_id=task_id, attempts=0, created_at=utcnow())
            session.add(job)
        job.mode = mode_value
        job.status = JobStatus.RUNNING.value
        job.attempts += 1
        job.started_at = utcnow()
        job.finished_at = None
        job.error = None
        for key, value in fields.items():
            setattr(job, key, value)
        try:
            session.commit()
        except IntegrityError:
            # The same task delivered twice at once: the other delivery inserted the row.
            session.rollback()
            if attempt or task_id is None:
                raise
            continue
        logger.info(
            "job started",
            extra={"job_id": job.id, "trip_id": trip_id, "attempt": job.attempts, "mode": mode},
        )
        return job
    raise AssertionError("unreachable")


def finish_job(*, session: Session, job_id: int, counts: dict[str, int]) -> None:
    """Mark a job succeeded with its counts, and commit."""
    job = _job_or_raise(session, job_id)
    job.status = JobStatus.SUCCEEDED.value
    job.finished_at = utcnow()
    job.counts = {str(k): int(v) for k, v in counts.items()}
    job.error = None
    session.commit()
    logger.info("job succeeded", extra={"job_id": job_id, "trip_id": job.trip_id})


def fail_job(*, session: Session, job_id: int, error: str, retrying: bool = False) -> None:
    """Mark a job failed with its error, and commit; with `retrying`, the job is to run again
    (a transient error, retries left): it reads "retrying" and stays unfinished.

    Whatever the session had open is rolled back first: this is called after something
    went wrong, and the failure must be recorded even if that left the transaction broken.
    """
    session.rollback()
    job = _job_or_raise(session, job_id)
    job.status = (JobStatus.RETRYING if retrying else JobStatus.FAILED).value
    job.finished_at = None if retrying else utcnow()
    job.error = error[:MAX_ERROR_CHARS]
    session.commit()
    logger.warning(
        "job will be retried" if retrying else "job failed",
        extra={"job_id": job_id, "trip_id": job.trip_id},
    )


def _job_or_raise(session: Session, job_id: int) -> Job:
    job = session.get(Job, job_id)
    if job is None:
        raise LookupError(f"job {job_id} does not exist")
    return job


# ---------------------------------------------------------------------------- status


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
            )
            for j in jobs
        ],
        errors=errors,
    )


# ---------------------------------------------------------------------------- the write


def store_photo_outcomes(
    *,
    session: Session,
    trip_id: int,
    outcomes: Sequence[PhotoOutcome],
    embedder: ModelInfo,
    job_id: int | None,
) -> int:
    """Store one batch of analysed photos in a short transaction of its own; returns how
    many of them failed. Commits; the session must have no transaction open.

    - An outcome with status ok replaces that photo's faces for this embedder, in place by
      face_index (unique per photo, embedder and index: a batch stored twice stores nothing
      twice). A re-detected face takes the folder of the old face its box overlaps
      (IoU >= 0.5) onto its own row at once, so nothing is lost before the next regroup.
    - Any other status records the error and keeps the photo's previous faces.
    - `aftertrip_photo.job_id` records the job, so a retried or redelivered job skips the
      photos it already stored (`photos_to_analyze(job_id=...)`).

    Folders and links are not touched: `regroup_trip` does that.
    """
    _require_no_transaction(session, "store_photo_outcomes")
    with session.begin():
        _begin_immediate(session)
        if session.scalar(select(Trip.id).where(Trip.id == trip_id)) is None:
            raise TripNotFound(trip_id)
        return _store_outcomes(session, trip_id, outcomes, embedder, job_id, utcnow())


def regroup_trip(
    *,
    session: Session,
    trip_id: int,
    embedder: ModelInfo,
    settings: PipelineSettings,
    job_id: int | None,
) -> TripWriteSummary:
    """Group every stored face of the trip's live photos and rewrite its folders, in one
    transaction. Commits on success; on any exception the previous folders and links stay.
    The session must have no transaction open.

    - All stored faces of the trip's photos that are not deleted are grouped with
      `worker.cluster.cluster_faces`, in (photo_id, face_index) order.
    - Groups are matched one-to-one to the trip's existing folders, first by the folders
      their faces were in, then by mean-embedding similarity (>= the grouping threshold):
      a matched folder keeps its id and custom_name. Other groups get new folders.
    - Links: a face in a group -> its folder; a photo with no face -> folder 1; a photo
      whose faces were each seen once -> folder 2. Deleted photos lose their links.
      Unchanged links keep their rows; unnamed folders left empty are deleted.

    The same stored faces give identical rows, so running it twice changes nothing.
    `errors` of the summary is 0 (stores count failed photos).
    """
    _require_no_transaction(session, "regroup_trip")
    with session.begin():
        _begin_immediate(session)
        regroup = _Regroup(session, trip_id, embedder, settings, job_id)
        regroup.lock()
        return regroup.run(regroup.folder_vectors())


def write_trip_result(
    *,
    session: Session,
    trip_id: int,
    analyzed: Sequence[PhotoOutcome],
    embedder: ModelInfo,
    settings: PipelineSettings,
    job_id: int | None = None,
) -> TripWriteSummary:
    """`store_photo_outcomes` and `regroup_trip` in one transaction (all or nothing).

    Commits on success; on any exception everything is rolled back and the previous faces,
    folders and links stay as they were. The session must have no transaction open.
    Same inputs give identical rows, so a redelivered job changes nothing the second time.
    """
    _require_no_transaction(session, "write_trip_result")
    with session.begin():
        _begin_immediate(session)
        regroup = _Regroup(session, trip_id, embedder, settings, job_id)
        regroup.lock()
        # The folders' directions as the last regroup left them, before the store below
        # rewrites face rows.
        vectors = regroup.folder_vectors()
        errors = _store_outcomes(session, trip_id, analyzed, embedder, job_id, regroup.now)
        session.flush()
        summary = regroup.run(vectors)
        summary.errors = errors
        return summary


def _require_no_transaction(session: Session, name: str) -> None:
    if session.in_transaction():
        raise ValueError(
            f"{name} runs its own transaction: pass a Session with none open "
            "(call session.commit() after earlier reads)"
        )


def _begin_immediate(session: Session) -> None:
    # SQLite: take the write lock at BEGIN. A transaction that reads first and writes
    # later fails at once (no busy wait) if another process is writing meanwhile.
    session.connection(execution_options={SQLITE_BEGIN_OPTION: "IMMEDIATE"})


# -- storing a batch


def _store_outcomes(
    session: Session,
    trip_id: int,
    outcomes: Sequence[PhotoOutcome],
    embedder: ModelInfo,
    job_id: int | None,
    now: datetime,
) -> int:
    """Write each outcome's faces and status in the open transaction; returns how many
    photos failed."""
    ids = [o.photo_id for o in outcomes]
    if len(set(ids)) != len(ids):
        raise ValueError("an outcome appears twice for the same photo")
    if not ids:
        return 0
    photos: dict[int, tuple[int, datetime | None]] = {}
    for chunk in _chunks(sorted(ids)):
        rows = session.execute(
            select(Photo.id, Photo.trip_id, Photo.deleted_at).where(Photo.id.in_(chunk))
        )
        photos.update({pid: (tid, deleted) for pid, tid, deleted in rows})
    elsewhere = sorted(pid for pid, (tid, _) in photos.items() if tid != trip_id)
    if elsewhere:
        raise ValueError(f"photos {elsewhere} belong to other trips, not {trip_id}")
    vanished = sorted(set(ids) - set(photos))
    if vanished:
        # Deleted from the web app while the job ran: nothing left to write to.
        logger.warning(
            "photos vanished during the job", extra={"trip_id": trip_id, "photo_ids": vanished}
        )
    present = sorted(photos)
    old_by_photo: dict[int, list[Face]] = defaultdict(list)
    analyses: dict[int, PhotoAnalysis] = {}
    for chunk in _chunks(present):
        for face in session.scalars(
            select(Face)
            .where(Face.photo_id.in_(chunk), Face.embedder_sha256 == embedder.sha256)
            .order_by(Face.photo_id, Face.face_index)
        ):
            old_by_photo[face.photo_id].append(face)
        for stored in session.scalars(
            select(PhotoAnalysis).where(
                PhotoAnalysis.photo_id.in_(chunk), PhotoAnalysis.embedder_sha256 == embedder.sha256
            )
        ):
            analyses[stored.photo_id] = stored
    vote_sources = _vote_sources(session, outcomes, old_by_photo, embedder)
    removed: set[int] = set()
    errors = 0
    for outcome in sorted(outcomes, key=lambda o: o.photo_id):
        if outcome.photo_id not in photos:
            continue
        ok = PhotoStatus(outcome.status) is PhotoStatus.OK
        analysis = analyses.get(outcome.photo_id)
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
                old_by_photo.get(outcome.photo_id, []),
                vote_sources.get(outcome.photo_id, []),
                embedder=embedder,
                now=now,
                live=photos[outcome.photo_id][1] is None,
            )
        else:
            errors += 1
            analysis.error = (outcome.error or outcome.status)[:MAX_ERROR_CHARS]
    if removed:
        # Unlink matches to removed faces here rather than leave it to ON DELETE SET NULL,
        # so the session's rows agree with the database's.
        for chunk in _chunks(sorted(removed)):
            for face in session.scalars(select(Face).where(Face.matched_face_id.in_(chunk))):
                face.matched_face_id = None
    return errors


def _vote_sources(
    session: Session,
    outcomes: Sequence[PhotoOutcome],
    old_by_photo: dict[int, list[Face]],
    embedder: ModelInfo,
) -> dict[int, list[Face]]:
    """The old faces whose folders a photo's re-detected faces inherit, by photo.

    This embedder's faces of the photo; for a photo it never analysed, the faces another
    embedder found there (after a model change the folders carry over too).
    """
    sources = {pid: faces for pid, faces in old_by_photo.items() if faces}
    fresh = [o.photo_id for o in outcomes if o.faces and o.photo_id not in sources]
    for chunk in _chunks(sorted(fresh)):
        others = session.scalars(
            select(Face)
            .where(Face.photo_id.in_(chunk), Face.embedder_sha256 != embedder.sha256)
            .order_by(Face.photo_id, Face.embedder_sha256, Face.face_index)
        )
        for face in others:
            sources.setdefault(face.photo_id, []).append(face)
    return sources


def _replace_faces(
    session: Session,
    outcome: PhotoOutcome,
    old: list[Face],
    vote_sources: list[Face],
    *,
    embedder: ModelInfo,
    now: datetime,
    live: bool,
) -> set[int]:
    """Rewrite a photo's face rows in place by face_index (ids stay, no duplicates).

    Each row's folder becomes that of the old face at the same place (a vote the next
    regroup counts). Returns the ids of the rows removed (the photo has fewer faces now).
    """
    votes = _carry_tags(vote_sources, outcome.faces)
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
        _set_if_changed(row, "tagface_id", votes[index])
        if not live:
            # A deleted photo's faces are not grouped: nothing else will set these.
            row.group_label = row.matched_face_id = row.similarity = None
            row.is_cover = False
    for leftover in by_index.values():
        session.delete(leftover)
    return {face.id for face in by_index.values()}


# -- regrouping


@dataclass
class _Grouped:
    faces: list[Face]
    labels: NDArray[np.int64]
    matched: NDArray[np.int64]
    similarity: NDArray[np.float32]
    vectors: NDArray[np.float32]


class _Regroup:
    """One regroup of a trip inside an open transaction, split into steps."""

    def __init__(
        self,
        session: Session,
        trip_id: int,
        embedder: ModelInfo,
        settings: PipelineSettings,
        job_id: int | None,
    ) -> None:
        self.session = session
        self.trip_id = trip_id
        self.embedder = embedder
        self.settings = settings
        self.threshold = (
            settings.similarity_threshold
            if settings.similarity_threshold is not None
            else default_threshold(settings.grouping, embedder.name)
        )
        self.job_id = job_id
        self.now = utcnow()

    def lock(self) -> None:
        """Lock the trip row: two writes of one trip then run one after the other, and (on
        MySQL) the snapshot starts after the other's commit. Checks the shared folders."""
        trip = self.session.scalars(
            select(Trip).where(Trip.id == self.trip_id).with_for_update()
        ).first()
        if trip is None:
            raise TripNotFound(self.trip_id)
        check_shared_folders(session=self.session)

    def folder_vectors(self) -> dict[int, NDArray[np.float32]]:
        """Each person folder's direction as the last regroup left it.

        From aftertrip_folder; a folder without a row there (written before it existed)
        gets the mean of the faces it holds now.
        """
        stored = {
            row.tagface_id: row.vector
            for row in self.session.scalars(
                select(FolderCentroid).where(
                    FolderCentroid.trip_id == self.trip_id,
                    FolderCentroid.embedder_sha256 == self.embedder.sha256,
                )
            )
        }
        computed = _tag_vectors(self._faces())
        return {**computed, **stored}

    def _faces(self) -> list[Face]:
        """This embedder's faces of every photo of the trip (deleted ones too)."""
        return list(
            self.session.scalars(
                select(Face)
                .where(
                    Face.photo_id.in_(self._trip_photo_ids()),
                    Face.embedder_sha256 == self.embedder.sha256,
                )
                .order_by(Face.photo_id, Face.face_index)
            )
        )

    def run(self, old_tag_vectors: dict[int, NDArray[np.float32]]) -> TripWriteSummary:
        session = self.session
        deleted_by_photo = dict(
            session.execute(
                select(Photo.id, Photo.deleted_at).where(Photo.trip_id == self.trip_id)
            ).all()
        )
        all_faces = self._faces()
        live_photo_ids = sorted(p for p, deleted in deleted_by_photo.items() if deleted is None)
        grouped = self._group(
            [f for f in all_faces if deleted_by_photo.get(f.photo_id) is None], live_photo_ids
        )
        trip_tags = self._trip_tags()
        group_tags, created = self._assign_tags(grouped, trip_tags, old_tag_vectors)
        self._update_faces(grouped, group_tags, all_faces, deleted_by_photo)
        session.flush()

        analysed_photos = self._analysed_photos()
        desired = _desired_links(analysed_photos, grouped, group_tags)
        added, removed = _replace_links(session, trip_id=self.trip_id, desired=desired)
        doomed = self._delete_empty_tags(trip_tags, set(group_tags.values()))
        self._save_folder_vectors([f for f in all_faces if f.tagface_id not in doomed])

        summary = TripWriteSummary(
            photos=len(analysed_photos),
            faces=len(grouped.faces),
            people=len(group_tags),
            others=sum(1 for _, tag in desired if tag == OTHERS_TAG_ID),
            no_face=sum(1 for _, tag in desired if tag == NO_FACE_TAG_ID),
            errors=0,
            tags_created=created,
            tags_deleted=len(doomed),
            links_added=added,
            links_removed=removed,
        )
        logger.info(
            "trip regrouped",
            extra={"trip_id": self.trip_id, "job_id": self.job_id, **summary.__dict__},
        )
        return summary

    def _trip_photo_ids(self) -> Select[int]:
        return select(Photo.id).where(Photo.trip_id == self.trip_id)

    # -- step 1: grouping

    def _group(self, faces: list[Face], live_photo_ids: list[int]) -> _Grouped:
        if not faces:
            empty = np.zeros(0, np.int64)
            return _Grouped([], empty, empty, np.zeros(0, np.float32), np.zeros((0, 0), np.float32))
        vectors = _stack_vectors(faces)
        dense = {pid: i for i, pid in enumerate(live_photo_ids)}
        photo_index = np.asarray([dense[f.photo_id] for f in faces], np.int64)
        clustering = cluster_faces(
            vectors,
            photo_index,
            method=self.settings.grouping,
            threshold=self.settings.similarity_threshold,
            embedder=self.embedder.name,
            quality=np.asarray([f.score for f in faces], np.float32),
            min_quality=MIN_DETECTION_SCORE.get(self.settings.detector),
        )
        return _Grouped(
            faces, clustering.labels, clustering.matched_face, clustering.similarity, vectors
        )

    # -- step 2: which folder each group is

    def _trip_tags(self) -> dict[int, TagFace]:
        """The trip's person folders: linked to its photos or holding its faces (any embedder)."""
        linked = select(PhotoTagFace.tagface_id).where(
            PhotoTagFace.photo_id.in_(self._trip_photo_ids())
        )
        held = select(Face.tagface_id).where(
            Face.photo_id.in_(self._trip_photo_ids()), Face.tagface_id.is_not(None)
        )
        ids = set(self.session.scalars(linked)) | set(self.session.scalars(held))
        ids -= SHARED_TAG_IDS
        if not ids:
            return {}
        tags = self.session.scalars(select(TagFace).where(TagFace.id.in_(sorted(ids))))
        return {tag.id: tag for tag in tags}

    def _assign_tags(
        self,
        grouped: _Grouped,
        trip_tags: dict[int, TagFace],
        old_tag_vectors: dict[int, NDArray[np.float32]],
    ) -> tuple[dict[int, int], int]:
        """Folder id for each group label; creates folders for new people."""
        labels = sorted({int(x) for x in grouped.labels if x >= 0})
        if not labels:
            return {}, 0
        tag_ids = sorted(trip_tags)
        assigned: dict[int, int] = {}

        # 1) Votes: faces that were already in a folder (kept, or re-detected in place).
        if tag_ids:
            col = {t: j for j, t in enumerate(tag_ids)}
            row = {g: i for i, g in enumerate(labels)}
            votes = np.zeros((len(labels), len(tag_ids)), np.int64)
            for face, label in zip(grouped.faces, grouped.labels, strict=True):
                vote = face.tagface_id
                if label >= 0 and vote in col:
                    votes[row[int(label)], col[vote]] += 1
            # Equal votes (two folders merged into one group): the named folder wins.
            named = np.asarray([trip_tags[t].is_named for t in tag_ids])
            score = 2 * votes + ((votes > 0) & named[None, :])
            for i, j in zip(*linear_sum_assignment(score, maximize=True), strict=True):
                if votes[i, j] > 0:
                    assigned[labels[i]] = tag_ids[j]

        # 2) Similarity of mean embeddings, for groups no face voted for.
        free_groups = [g for g in labels if g not in assigned]
        taken = set(assigned.values())
        free_tags = [t for t in tag_ids if t not in taken and t in old_tag_vectors]
        if free_groups and free_tags:
            means = np.stack(
                [_mean_direction(grouped.vectors[grouped.labels == g]) for g in free_groups]
            )
            olds = np.stack([old_tag_vectors[t] for t in free_tags])
            if means.shape[1] == olds.shape[1]:
                sim = means @ olds.T
                for i, j in zip(*linear_sum_assignment(sim, maximize=True), strict=True):
                    if sim[i, j] >= self.threshold:
                        assigned[free_groups[i]] = free_tags[j]

        # 3) New people: new folders, numbered after the trip's existing ones.
        used_nums = {tag.tag_num for tag in trip_tags.values()}
        created = 0
        for label in labels:
            if label in assigned:
                continue
            tag_num = next(n for n in range(len(used_nums) + 1) if n not in used_nums)
            used_nums.add(tag_num)
            tag = TagFace(tag_num=tag_num, custom_name=UNNAMED)
            self.session.add(tag)
            self.session.flush()
            assigned[label] = tag.id
            created += 1
        return assigned, created

    # -- step 3: faces get their folder, match and cover

    def _update_faces(
        self,
        grouped: _Grouped,
        group_tags: dict[int, int],
        old_faces: list[Face],
        deleted_by_photo: Mapping[int, object],
    ) -> None:
        # The face that shows each person best, by the result file's rule.
        values = cover_score(
            np.array([face.score for face in grouped.faces], np.float64),
            np.array([[f.x1, f.y1, f.x2, f.y2] for f in grouped.faces], np.float64).reshape(-1, 4),
        )
        cover: dict[int, int] = {}
        for i, label in enumerate(grouped.labels):
            if label >= 0 and (int(label) not in cover or values[i] > values[cover[int(label)]]):
                cover[int(label)] = i
        for i, face in enumerate(grouped.faces):
            label = int(grouped.labels[i])
            match = int(grouped.matched[i])
            sim = float(grouped.similarity[i])
            _set_if_changed(face, "group_label", label)
            _set_if_changed(face, "tagface_id", group_tags[label] if label >= 0 else OTHERS_TAG_ID)
            _set_if_changed(
                face, "matched_face_id", grouped.faces[match].id if match >= 0 else None
            )
            _set_if_changed(face, "similarity", sim if np.isfinite(sim) else None)
            _set_if_changed(face, "is_cover", label >= 0 and cover[label] == i)
        for face in old_faces:
            # Faces of deleted photos keep their folder (it remembers the person) but never
            # stand for it.
            if deleted_by_photo.get(face.photo_id) is not None and face.is_cover:
                face.is_cover = False

    # -- step 4: links and empty folders

    def _analysed_photos(self) -> list[int]:
        """Live photos with a successful analysis for this embedder (ordered by id)."""
        rows = self.session.scalars(
            select(PhotoAnalysis.photo_id)
            .join(Photo, Photo.id == PhotoAnalysis.photo_id)
            .where(
                Photo.trip_id == self.trip_id,
                Photo.deleted_at.is_(None),
                PhotoAnalysis.embedder_sha256 == self.embedder.sha256,
                PhotoAnalysis.analyzed_at.is_not(None),
            )
            .order_by(PhotoAnalysis.photo_id)
        )
        return list(rows)

    def _delete_empty_tags(self, trip_tags: dict[int, TagFace], in_use: set[int]) -> set[int]:
        """Delete the trip's unnamed folders that no photo links to any more; returns their ids."""
        candidates = sorted(
            t for t, tag in trip_tags.items() if t not in in_use and not tag.is_named
        )
        if not candidates:
            return set()
        still_linked = set(
            self.session.scalars(
                select(PhotoTagFace.tagface_id).where(PhotoTagFace.tagface_id.in_(candidates))
            )
        )
        doomed = [t for t in candidates if t not in still_linked]
        if not doomed:
            return set()
        # The foreign key would set these NULL too; doing it here keeps the session in step.
        self.session.execute(
            update(Face).where(Face.tagface_id.in_(doomed)).values(tagface_id=None)
        )
        self.session.execute(delete(TagFace).where(TagFace.id.in_(doomed)))
        logger.info("empty folders deleted", extra={"trip_id": self.trip_id, "tag_ids": doomed})
        return set(doomed)

    def _save_folder_vectors(self, faces: list[Face]) -> None:
        """Remember each person folder's direction for the next regroup (aftertrip_folder)."""
        by_tag: dict[int, list[Face]] = defaultdict(list)
        for face in faces:
            if face.tagface_id is not None and face.tagface_id not in SHARED_TAG_IDS:
                by_tag[face.tagface_id].append(face)
        vectors = _tag_vectors(faces)
        rows: dict[int, FolderCentroid | None] = {
            row.tagface_id: row
            for row in self.session.scalars(
                select(FolderCentroid).where(
                    FolderCentroid.trip_id == self.trip_id,
                    FolderCentroid.embedder_sha256 == self.embedder.sha256,
                )
            )
        }
        for tag_id, stale in rows.items():
            if tag_id not in vectors and stale is not None:
                self.session.delete(stale)
        for tag_id in sorted(vectors):
            data = vectors[tag_id].astype("<f4").tobytes()
            row = rows.get(tag_id)
            if row is None:
                row = FolderCentroid(
                    tagface_id=tag_id, embedder_sha256=self.embedder.sha256, trip_id=self.trip_id
                )
                self.session.add(row)
            if row.centroid != data or row.face_count != len(by_tag[tag_id]):
                row.centroid = data
                row.face_count = len(by_tag[tag_id])
                row.updated_at = self.now


def _desired_links(
    analysed_photos: list[int], grouped: _Grouped, group_tags: dict[int, int]
) -> set[tuple[int, int]]:
    """(photo_id, tagface_id) pairs the trip should have.

    As the prototype's `group_idx`: a photo is in each of its people's folders, and also in
    "others" when one of its faces is seen only once; a photo without a face is in "no faces".
    """
    labels_by_photo: dict[int, list[int]] = defaultdict(list)
    for face, label in zip(grouped.faces, grouped.labels, strict=True):
        labels_by_photo[face.photo_id].append(int(label))
    desired: set[tuple[int, int]] = set()
    for photo_id in analysed_photos:
        labels = labels_by_photo.get(photo_id, [])
        if not labels:
            desired.add((photo_id, NO_FACE_TAG_ID))
            continue
        desired.update((photo_id, group_tags[label]) for label in labels if label >= 0)
        if any(label < 0 for label in labels):
            desired.add((photo_id, OTHERS_TAG_ID))
    return desired


def _replace_links(
    session: Session, *, trip_id: int, desired: set[tuple[int, int]]
) -> tuple[int, int]:
    """Make the trip's photos_photo_tag_face rows exactly `desired`; returns (added, removed).

    Only rows that must go are deleted and only missing ones inserted, so unchanged links
    keep their ids.
    """
    trip_photo_ids = select(Photo.id).where(Photo.trip_id == trip_id)
    existing = session.execute(
        select(PhotoTagFace.id, PhotoTagFace.photo_id, PhotoTagFace.tagface_id).where(
            PhotoTagFace.photo_id.in_(trip_photo_ids)
        )
    ).all()
    have = {(photo_id, tag_id) for _, photo_id, tag_id in existing}
    stale = sorted(
        link_id for link_id, photo_id, tag_id in existing if (photo_id, tag_id) not in desired
    )
    for ids in _chunks(stale):
        session.execute(delete(PhotoTagFace).where(PhotoTagFace.id.in_(ids)))
    missing = sorted(desired - have)
    for pairs in _chunks(missing):
        session.execute(insert(PhotoTagFace), [{"photo_id": p, "tagface_id": t} for p, t in pairs])
    return len(missing), len(stale)


# ---------------------------------------------------------------------------- helpers


_T = TypeVar("_T")


def _chunks(items: list[_T], size: int = _CHUNK) -> Iterable[list[_T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _set_if_changed(obj: object, name: str, value: object) -> None:
    # Assigning an equal value still marks the row dirty for some types; skip it so a
    # repeated write issues no UPDATE at all.
    if getattr(obj, name) != value:
        setattr(obj, name, value)


def _fill_face(row: Face, found: FaceOutcome, embedder_name: str) -> None:
    vector = np.asarray(found.embedding, dtype=np.float32).reshape(-1)
    if vector.size == 0 or not np.all(np.isfinite(vector)):
        raise ValueError(f"face of photo {row.photo_id} has an empty or non-finite embedding")
    if len(found.box) != 4:
        raise ValueError(f"face of photo {row.photo_id} has a box of {len(found.box)} values")
    row.x1, row.y1, row.x2, row.y2 = (float(v) for v in found.box)
    row.landmarks = [[float(x), float(y)] for x, y in found.landmarks]
    row.score = float(found.score)
    row.embedding = vector.astype("<f4").tobytes()
    row.embedder_name = embedder_name
    row.thumbnail_key = found.thumbnail_key


def _stack_vectors(faces: list[Face]) -> NDArray[np.float32]:
    vectors = [face.vector for face in faces]
    dims = {v.shape[0] for v in vectors}
    if len(dims) != 1:
        raise ValueError(f"stored embeddings of one embedder differ in length: {sorted(dims)}")
    return np.stack(vectors).astype(np.float32)


def _mean_direction(vectors: NDArray[np.float32]) -> NDArray[np.float32]:
    mean = vectors.astype(np.float64).mean(axis=0)
    norm = np.linalg.norm(mean)
    return (mean / norm if norm > 0 else mean).astype(np.float32)


def _tag_vectors(faces: list[Face]) -> dict[int, NDArray[np.float32]]:
    """Mean embedding direction of each person folder's faces before this write."""
    by_tag: dict[int, list[NDArray[np.float32]]] = defaultdict(list)
    for face in faces:
        if face.tagface_id is not None and face.tagface_id not in SHARED_TAG_IDS:
            by_tag[face.tagface_id].append(face.vector)
    out: dict[int, NDArray[np.float32]] = {}
    for tag_id, vectors in by_tag.items():
        if len({v.shape[0] for v in vectors}) == 1:
            out[tag_id] = _mean_direction(np.stack(vectors))
    return out


def _carry_tags(old: list[Face], new: list[FaceOutcome]) -> list[int | None]:
    """For each new face, the person folder of the old face it overlaps (IoU >= 0.5), one-to-one."""
    votes: list[int | None] = [None] * len(new)
    tagged = [f for f in old if f.tagface_id is not None and f.tagface_id not in SHARED_TAG_IDS]
    if not tagged or not new:
        return votes
    iou = box_iou(
        np.asarray([f.box for f in tagged], np.float64),
        np.asarray([list(f.box) for f in new], np.float64).reshape(-1, 4),
    )
    for i, j in zip(*linear_sum_assignment(iou, maximize=True), strict=True):
        if iou[i, j] >= BOX_MATCH_IOU:
            votes[j] = tagged[i].tagface_id
    return votes


def trip_thumbnail_keys(*, session: Session, trip_id: int) -> set[str]:
    """The storage keys of every face thumbnail the trip's face rows point at."""
    rows = session.scalars(
        select(Face.thumbnail_key)
        .join(Photo, Photo.id == Face.photo_id)
        .where(Photo.trip_id == trip_id, Face.thumbnail_key.is_not(None))
    )
    return {key for key in rows if key}


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
    # People by tag id, then "others" (2), then "no faces" (1).
    return sorted(
        folders.values(),
        key=lambda f: (
            f.tag_id in SHARED_TAG_IDS,
            -f.tag_id if f.tag_id in SHARED_TAG_IDS else f.tag_id,
        ),
    )
