"""Analysing photos and storing their outcomes as they come, a batch at a time: what a job
and each chunk of a fanned-out job do (Celery-free).

Photos are read through the storage layer and run through `worker.pipeline.FacePipeline`;
each photo's outcome is stored as it is made (`STORE_BATCH` photos per transaction), so a
retried or redelivered job continues with the photos it has not stored. Thumbnails go to
deterministic keys and faces are unique per (photo, embedder, index): nothing is stored twice.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session, sessionmaker

from db.schemas import PhotoOutcome
from storage import PhotoStore, photo_sources
from tasks.write import store_photo_outcomes
from worker.types import FoundFace, PhotoStatus

if TYPE_CHECKING:
    from db.webapp import Photo
    from tasks.guard import JobGuard
    from worker.pipeline import AnalyzedPhoto, FacePipeline

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[str, int, int], None]
"""Called as (stage, done, total): stages `models`, `analyze`, `group`."""

THUMBNAIL_UPLOAD_THREADS = 4

STORE_BATCH = 16
"""Photos stored per transaction while a job analyses: what a killed job loses at most."""

Todo = list[tuple[int, str, str]]
"""Photos to analyse: (photos_photo.id, object key, file name)."""


class Signal:
    """A point of the job others may watch: `connect` a receiver, and each `send` calls it
    with the sender and keyword arguments. A receiver that raises is logged, never fails
    the job (as Celery's signals)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.receivers: list[Callable[..., Any]] = []

    def connect(self, receiver: Callable[..., Any]) -> Callable[..., Any]:
        """Call `receiver` on each send (usable as a decorator)."""
        self.receivers.append(receiver)
        return receiver

    def disconnect(self, receiver: Callable[..., Any]) -> None:
        """Stop calling `receiver`."""
        self.receivers.remove(receiver)

    def send(self, sender: object, **named: object) -> None:
        """Call every receiver with `sender` and `named`."""
        for receiver in list(self.receivers):
            try:
                receiver(signal=self, sender=sender, **named)
            except Exception:
                logger.exception("receiver of %s failed", self.name)


analysis_started = Signal("aftertrip.analysis_started")
"""Sent by the job's thread once it holds the trip (and its job row) and has listed the
photos to analyse, before the first one is read: an observation point for monitoring, and
what the service tests use to hold a job at a known point."""

photos_stored = Signal("aftertrip.photos_stored")
"""Sent after each batch of photo outcomes is stored: trip_id, job_id, photos (in the batch),
chunk (True in an `analyze_chunk` task)."""


def thumbnail_folder(prefix: str, trip_id: int) -> str:
    """The folder holding every face thumbnail of a trip."""
    return f"{prefix}{trip_id}/"


def thumbnail_key(prefix: str, trip_id: int, photo_key: str, index: int) -> str:
    """Where a face thumbnail goes: deterministic, so a job run twice overwrites, never adds."""
    return f"{thumbnail_folder(prefix, trip_id)}{photo_key}/{index}.jpg"


def photo_outcome(photo: AnalyzedPhoto, photo_id: int, keys: list[str] | None) -> PhotoOutcome:
    """What `tasks.write.store_photo_outcomes` stores for one analysed photo."""
    return PhotoOutcome(
        photo_id=photo_id,
        status=photo.status.value,
        error=photo.error,
        width=photo.width,
        height=photo.height,
        faces=FoundFace.found(photo.detections, photo.embeddings, keys, photo.chip_sizes()),
    )


def log_photo_failure(
    work: Work | tuple[int, int], photo_id: int, key: object, status: str, reason: str | None
) -> None:
    """One log line for a photo the job could not use: its id, S3 key and reason (the same
    are stored in aftertrip_photo and shown by `aftertrip-faces status`). `work` is the job's
    `Work`, or (trip id, job id)."""
    trip_id, job_id = (work.trip_id, work.job_id) if isinstance(work, Work) else work
    logger.warning(
        "photo %s (S3 key %s) failed: %s: %s",
        photo_id,
        key,
        status,
        reason or "-",
        extra={
            "trip_id": trip_id,
            "job_id": job_id,
            "photo_id": photo_id,
            "s3_key": str(key),
            "status": status,
            "reason": reason,
        },
    )


@dataclass
class Work:
    """What analysing a job's photos needs, in one place for the job and its chunks."""

    sessions: sessionmaker[Session]
    store: PhotoStore
    pipeline: FacePipeline
    trip_id: int
    job_id: int
    prefix: str | None
    check: Callable[[], None]
    on_photo: Callable[[], None]
    chunk: bool = False


def job_work(
    sessions: sessionmaker[Session],
    store: PhotoStore,
    pipeline: FacePipeline,
    ids: tuple[int, int],
    prefix: str | None,
    guard: JobGuard | None,
    *,
    on_photo: Callable[[], None] = lambda: None,
    chunk: bool = False,
) -> Work:
    """The `Work` of a job (or of one of its chunks) on a trip: `ids` is (trip id, job id);
    the guard, if any, says when to stop."""
    return Work(
        sessions,
        store,
        pipeline,
        *ids,
        prefix,
        check=guard.check if guard is not None else (lambda: None),
        on_photo=on_photo,
        chunk=chunk,
    )


def todo_of(photos: Iterable[Photo], wanted: Collection[int] | None = None) -> Todo:
    """The photos to read (of `wanted`, if given): those whose file_key names an object."""
    return [
        (p.id, p.s3_key, p.file_name or p.s3_key)
        for p in photos
        if not p.key_error and (wanted is None or p.id in wanted)
    ]


def analyze_and_store(work: Work, todo: Todo) -> int:
    """Run the pipeline over the photos and store their outcomes `STORE_BATCH` at a time;
    face thumbnails upload while the next photos compute. Returns how many were stored.

    `work.check` is called after each photo, before its outcome is kept: it raises to stop
    the job (a photo interrupted by the soft time limit is not recorded as broken).
    """
    if not todo:
        return 0
    ids = {str(photo_id): (photo_id, key) for photo_id, key, _name in todo}
    sources = photo_sources(
        work.store,
        [key for _id, key, _name in todo],
        [name for _id, _key, name in todo],
        ids=[str(photo_id) for photo_id, _key, _name in todo],
    )
    batch: list[PhotoOutcome] = []
    uploads: list[Future[None]] = []
    stored = 0
    embedder = work.pipeline.embedder

    def store_batch() -> None:
        nonlocal stored
        # Every thumbnail is stored before a face row can point at it.
        for upload in uploads:
            upload.result()
        uploads.clear()
        if batch:
            with work.sessions() as session:
                store_photo_outcomes(
                    session=session,
                    trip_id=work.trip_id,
                    outcomes=batch,
                    embedder=embedder,
                    job_id=work.job_id,
                )
            stored += len(batch)
            logger.info(
                "stored a batch of %d photos%s",
                len(batch),
                " (chunk)" if work.chunk else "",
                extra={"trip_id": work.trip_id, "job_id": work.job_id},
            )
            photos_stored.send(
                sender=analyze_and_store,
                trip_id=work.trip_id,
                job_id=work.job_id,
                photos=len(batch),
                chunk=work.chunk,
            )
            batch.clear()

    prefix = work.prefix
    with ThreadPoolExecutor(THUMBNAIL_UPLOAD_THREADS, "thumbnails") as uploader:
        for photo in work.pipeline.analyze(sources, face_thumbnails=prefix is not None):
            work.check()
            photo_id, key = ids[photo.photo_id]
            keys = None
            if prefix is not None and photo.thumbnails:
                count = len(photo.thumbnails)
                keys = [thumbnail_key(prefix, work.trip_id, key, i) for i in range(count)]
                for thumb_key, data in zip(keys, photo.thumbnails, strict=True):
                    uploads.append(uploader.submit(work.store.write, thumb_key, data, "image/jpeg"))
            if photo.status is not PhotoStatus.OK:
                log_photo_failure(work, photo_id, key, photo.status.value, photo.error)
            batch.append(photo_outcome(photo, photo_id, keys))
            photo.thumbnails = []
            work.on_photo()
            if len(batch) >= STORE_BATCH:
                store_batch()
        store_batch()
    return stored
