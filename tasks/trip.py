"""The grouping task: one trip's photos from S3 into the web app's person folders.

`aftertrip.group_trip(trip_id, mode)` takes ids only (checked before anything runs), reads
the photos through the storage layer, runs `worker.pipeline.FacePipeline`, and stores each
photo's outcome as it is made (`STORE_BATCH` photos per transaction), then regroups the trip
and rewrites its folders in one transaction. A job delivered again (acks_late) or retried
continues with the photos it has not stored; thumbnails go to deterministic keys and faces
are unique per (photo, embedder, index), so nothing is stored twice.

One job per trip runs at a time: a Redis lock per trip with a short time to live, renewed
by the job's heartbeat (`tasks.guard`), which also renews the job row's `heartbeat_at`. A
request for a trip that is busy is put back on the queue with a countdown and runs after the
current one. A big job fans out: `aftertrip.analyze_chunk` tasks analyse chunks of its
photos on every free worker while the job takes the chunks no one started, then groups
(docs/scaling.md). Transient errors are retried within a time budget.
"""

from __future__ import annotations

import logging
import random
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from functools import partial
from typing import TYPE_CHECKING, Any

import redis.exceptions
import sqlalchemy.exc
from celery import Task, group
from celery.exceptions import BackendError, Ignore
from celery.signals import worker_process_init
from celery.utils.dispatch import Signal
from redis import Redis
from sqlalchemy.orm import Session, sessionmaker

from db.crud import (
    FaceOutcome,
    PhotoOutcome,
    TripNotFound,
    fail_job,
    finish_job,
    photos_to_analyze,
    regroup_trip,
    start_job,
    store_photo_outcomes,
    trip_thumbnail_keys,
)
from db.jobs import job_is_running, job_stored_photos
from db.session import make_sessionmaker
from db.webapp import Trip
from storage import LocalStore, PhotoStore, S3Store, photo_sources, s3_fetch
from storage.errors import StorageConfigError, StorageError, TransientStorageError
from tasks.app import app
from tasks.guard import JobGuard, JobTimedOut, TripLockLost, install_soft_limit_handler
from tasks.locks import Lease, TripLock, chunk_lease_name
from tasks.names import ANALYZE_CHUNK, GROUP_TRIP, MODES, PROGRESS
from tasks.settings import ServiceSettings, get_settings
from worker.errors import AfterTripError
from worker.types import PhotoStatus

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from worker.pipeline import AnalyzedPhoto, FacePipeline
    from worker.settings import PipelineSettings

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[str, int, int], None]
"""Called as (stage, done, total): stages `models`, `analyze`, `group`."""

RETRYABLE_ERRORS: tuple[type[Exception], ...] = (
    TransientStorageError,
    sqlalchemy.exc.OperationalError,  # connection lost, server restarting, deadlock
    sqlalchemy.exc.InterfaceError,  # connection closed under us
    redis.exceptions.ConnectionError,  # the lock's Redis
    redis.exceptions.TimeoutError,
    TripLockLost,  # another job took the trip: this one runs again after it
)
"""Errors after which the same job may well succeed later: retried with backoff and jitter
for AFTERTRIP_TASK_RETRY_BUDGET seconds from the first of them.

Anything else (a bug, a missing trip, a bad setting, the soft time limit) fails the job at once.
"""

RETRY_SINCE_HEADER = "aftertrip_retry_since"
"""Message header: when (epoch seconds) the job's first retryable error happened."""

analysis_started = Signal(name="aftertrip.analysis_started")
"""Sent by the job's thread once it holds the trip (and its job row) and has listed the
photos to analyse, before the first one is read: an observation point for monitoring, and
what the service tests use to hold a job at a known point."""

photos_stored = Signal(name="aftertrip.photos_stored")
"""Sent after each batch of photo outcomes is stored: trip_id, job_id, photos (in the batch),
chunk (True in an `analyze_chunk` task)."""

THUMBNAIL_UPLOAD_THREADS = 4

STORE_BATCH = 16
"""Photos stored per transaction while a job analyses: what a killed job loses at most."""

FAN_OUT_POLL_SECONDS = 0.25
"""How often a fanned-out job looks at its chunks' progress while others analyse them."""

Todo = list[tuple[int, str, str]]
"""Photos to analyse: (photos_photo.id, object key, file name)."""


class JobAbandoned(AfterTripError):
    """A job's worker process died too often while running it (out of memory, a crash)."""


class InvalidJobArguments(AfterTripError, ValueError):
    """The message's arguments are not a trip id and a mode: refused before anything runs."""


def check_job_arguments(trip_id: object, mode: object) -> tuple[int, str]:
    """The trip id and mode of a message, or `InvalidJobArguments` saying what is wrong.

    JSON brings 1.5, "3" and true as well as 3: only a positive integer is a trip id (a
    float would be rounded by the database into another trip's id).
    """
    if isinstance(trip_id, bool) or not isinstance(trip_id, int) or trip_id <= 0:
        raise InvalidJobArguments(
            f"trip_id must be a positive integer (trips_trip.id), not {trip_id!r}: "
            "the job was refused and nothing was written"
        )
    if not isinstance(mode, str) or mode not in MODES:
        raise InvalidJobArguments(
            f"mode must be one of {', '.join(MODES)}, not {mode!r}: "
            "the job was refused and nothing was written"
        )
    return trip_id, mode


def thumbnail_folder(prefix: str, trip_id: int) -> str:
    """The folder holding every face thumbnail of a trip."""
    return f"{prefix}{trip_id}/"


def thumbnail_key(prefix: str, trip_id: int, photo_key: str, index: int) -> str:
    """Where a face thumbnail goes: deterministic, so a job run twice overwrites, never adds."""
    return f"{thumbnail_folder(prefix, trip_id)}{photo_key}/{index}.jpg"


def photo_outcome(photo: AnalyzedPhoto, photo_id: int, keys: list[str] | None) -> PhotoOutcome:
    """What `db.crud.write_trip_result` stores for one analysed photo."""
    found = photo.detections
    faces = [
        FaceOutcome(
            box=[float(v) for v in found.boxes[i]],
            landmarks=[[float(x), float(y)] for x, y in found.landmarks[i]],
            score=float(found.scores[i]),
            embedding=photo.embeddings[i],
            thumbnail_key=keys[i] if keys else None,
        )
        for i in range(len(found))
    ]
    return PhotoOutcome(
        photo_id=photo_id,
        status=photo.status.value,
        error=photo.error,
        width=photo.width,
        height=photo.height,
        faces=faces,
    )


@dataclass
class FanOut:
    """How a job hands chunks of its photos to the other workers (the Celery path).

    `send(trip_id, job_id, split, chunks)` queues one `analyze_chunk` task per
    (chunk number, photo ids); `redis` holds the chunk leases.
    """

    chunk_photos: int
    redis: Redis
    owner: str
    lease_ttl: float
    send: Callable[[int, int, str, list[tuple[int, list[int]]]], None]

    def worth_it(self, photos: int) -> bool:
        """Fan out only a job of more than two chunks: a small trip stays one task."""
        return self.chunk_photos > 0 and photos > 2 * self.chunk_photos


@dataclass
class _Work:
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


def run_trip_job(
    *,
    sessions: sessionmaker[Session],
    store: PhotoStore,
    pipeline: FacePipeline,
    settings: PipelineSettings,
    trip_id: int,
    mode: str = "missing",
    task_id: str | None = None,
    thumbnail_prefix: str | None = "faces/",
    on_progress: ProgressCallback | None = None,
    will_retry: Callable[[Exception], bool] | None = None,
    guard: JobGuard | None = None,
    fan_out: FanOut | None = None,
) -> dict[str, Any]:
    """Analyse a trip's photos and rewrite its folders; the body of `group_trip`.

    Records an `aftertrip_job` row (reused when `task_id` is delivered again). Photos are
    stored as they are analysed, `STORE_BATCH` per transaction, so a retried or redelivered
    job continues where the last delivery stopped; the folders are then rewritten in one
    transaction (`db.crud.regroup_trip`). On any error the row is marked failed ("retrying"
    where `will_retry` says the error will be retried) and the error re-raised: the folders
    and links stay as they were, the stored photos stay stored.
    With a `guard`, the row's heartbeat (and the trip lock) are renewed while the job runs,
    the trip's stalled jobs are marked failed first, and the soft time limit or a lost lock
    stops the job between photos. With `fan_out`, a big job's photos are analysed in chunks
    by every free worker, this one included.
    Returns the job id and `TripWriteSummary` counts ("analyzed": the photos this job
    stored, over all its deliveries). Usable without Celery (embedded runs).
    """
    trip_id, mode = check_job_arguments(trip_id, mode)
    progress = on_progress or (lambda stage, done, total: None)
    started = time.perf_counter()
    with sessions() as session:
        if session.get(Trip, trip_id) is None:
            raise TripNotFound(trip_id)
        session.rollback()
        progress("models", 0, 1)
        models = pipeline.models  # loads the models on a process's first job
        if guard is not None:
            guard.take_over_stalled(trip_id=trip_id, task_id=task_id)
        job = start_job(session=session, trip_id=trip_id, mode=mode, task_id=task_id, models=models)
        job_id = job.id
        if guard is not None:
            guard.start(job_id)
        try:
            photos = photos_to_analyze(
                session=session,
                trip_id=trip_id,
                embedder_sha256=pipeline.embedder.sha256,
                mode=mode,  # type: ignore[arg-type]  # checked against MODES above
                job_id=job_id,  # what an earlier delivery of this job stored is kept
            )
            todo: Todo = [
                (p.id, p.s3_key, p.file_name or p.s3_key) for p in photos if not p.key_error
            ]
            refused = [  # a bad file_key fails that photo alone, and is never read
                PhotoOutcome(p.id, PhotoStatus.INVALID_KEY.value, p.key_error, None, None)
                for p in photos
                if p.key_error
            ]
            # End the read transaction: nothing stays open while photos are analysed.
            session.commit()
            logger.info(
                "job analysing %d photos",
                len(todo),
                extra={"trip_id": trip_id, "job_id": job_id, "photos": len(todo), "mode": mode},
            )
            if refused:
                store_photo_outcomes(
                    session=session,
                    trip_id=trip_id,
                    outcomes=refused,
                    embedder=pipeline.embedder,
                    job_id=job_id,
                )
            analysis_started.send(sender=run_trip_job, trip_id=trip_id, job_id=job_id)
            done = 0

            def on_photo() -> None:
                nonlocal done
                done += 1
                progress("analyze", done, len(todo))

            work = _Work(
                sessions=sessions,
                store=store,
                pipeline=pipeline,
                trip_id=trip_id,
                job_id=job_id,
                prefix=thumbnail_prefix,
                check=guard.check if guard is not None else (lambda: None),
                on_photo=on_photo,
            )
            progress("analyze", 0, len(todo))
            if fan_out is not None and guard is not None and fan_out.worth_it(len(todo)):
                _analyze_fanned_out(work, todo, fan_out, guard, progress)
            else:
                _analyze_and_store(work, todo)
            work.check()  # never regroup after the time limit or with the lock lost
            progress("group", 0, 1)
            summary = regroup_trip(
                session=session,
                trip_id=trip_id,
                embedder=pipeline.embedder,
                settings=settings,
                job_id=job_id,
            )
            stored = job_stored_photos(
                session=session, job_id=job_id, embedder_sha256=pipeline.embedder.sha256
            )
            session.commit()
            summary.errors = sum(1 for status in stored.values() if status != "ok")
            counts = {"analyzed": len(stored), **asdict(summary)}
            finish_job(session=session, job_id=job_id, counts=counts)
            progress("group", 1, 1)
        except Exception as exc:
            if guard is not None and guard.timed_out and not isinstance(exc, JobTimedOut):
                exc = guard.timeout_error()  # SoftTimeLimitExceeded wherever it struck
            _record_failure(session, job_id, exc, retrying=bool(will_retry and will_retry(exc)))
            if isinstance(exc, JobTimedOut):
                raise exc from None
            raise
        finally:
            if guard is not None:
                guard.stop()
        # The job has succeeded: nothing from here on may mark it failed.
        if thumbnail_prefix is not None:
            _remove_unused_thumbnails(
                session, store, thumbnail_folder(thumbnail_prefix, trip_id), trip_id, job_id
            )
    logger.info(
        "job done",
        extra={
            "trip_id": trip_id,
            "job_id": job_id,
            "ms": round((time.perf_counter() - started) * 1000),
            **counts,
        },
    )
    return {"trip_id": trip_id, "job_id": job_id, **counts}


def _analyze_and_store(work: _Work, todo: Todo) -> int:
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
                sender=_analyze_and_store,
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
            batch.append(photo_outcome(photo, photo_id, keys))
            photo.thumbnails = []
            work.on_photo()
            if len(batch) >= STORE_BATCH:
                store_batch()
        store_batch()
    return stored


def _analyze_fanned_out(
    work: _Work, todo: Todo, fan_out: FanOut, guard: JobGuard, progress: ProgressCallback
) -> None:
    """Analyse a big job's photos in chunks: each chunk is queued as an `analyze_chunk` task
    for every free worker, and this job takes the chunks no one has started yet (from the
    end of the list, while the other workers start at its head).

    A chunk is taken by holding its lease (renewed each heartbeat): a chunk whose worker died
    has its lease lapse, and this job takes it over and analyses only what it did not store.
    Returns when every photo of `todo` has been stored by this job.
    """
    size = fan_out.chunk_photos
    chunks = [todo[i : i + size] for i in range(0, len(todo), size)]
    split = uuid.uuid4().hex[:8]
    fan_out.send(
        work.trip_id,
        work.job_id,
        split,
        [(n, [p for p, _k, _n in c]) for n, c in enumerate(chunks)],
    )
    logger.info(
        "job fanned out: %d photos in %d chunks",
        len(todo),
        len(chunks),
        extra={"trip_id": work.trip_id, "job_id": work.job_id, "chunks": len(chunks)},
    )
    wanted = {photo_id for photo_id, _key, _name in todo}
    pending = list(range(len(chunks)))
    sha = work.pipeline.embedder.sha256
    own = 0
    known = 0  # photos of `todo` stored, by anyone: the job's progress

    def on_photo() -> None:
        nonlocal known
        known += 1
        progress("analyze", min(known, len(wanted)), len(wanted))

    work = replace(work, on_photo=on_photo)
    while pending:
        work.check()
        with work.sessions() as session:
            stored = job_stored_photos(session=session, job_id=work.job_id, embedder_sha256=sha)
        known = len(wanted & stored.keys())
        progress("analyze", known, len(wanted))
        pending = [n for n in pending if any(p not in stored for p, _k, _n in chunks[n])]
        for n in reversed(pending):
            lease = Lease(
                fan_out.redis,
                chunk_lease_name(work.job_id, split, n),
                owner=fan_out.owner,
                ttl=fan_out.lease_ttl,
            )
            if not lease.acquire():
                continue
            guard.leases.append(lease)
            try:
                with work.sessions() as session:
                    stored = job_stored_photos(
                        session=session, job_id=work.job_id, embedder_sha256=sha
                    )
                own += _analyze_and_store(work, [t for t in chunks[n] if t[0] not in stored])
            finally:
                guard.leases.remove(lease)
                lease.release()
            break
        else:
            time.sleep(FAN_OUT_POLL_SECONDS)
    logger.info(
        "job's chunks all stored (%d photos analysed here)",
        own,
        extra={"trip_id": work.trip_id, "job_id": work.job_id},
    )


def analyze_chunk_body(
    *,
    sessions: sessionmaker[Session],
    store: PhotoStore,
    pipeline: FacePipeline,
    lease: Lease,
    guard: JobGuard,
    trip_id: int,
    job_id: int,
    photo_ids: list[int],
    thumbnail_prefix: str | None,
) -> int:
    """One chunk of a fanned-out job: analyse and store the photos of `photo_ids` that the
    job has not stored yet. Does nothing (returns 0) when the job is no longer running or
    another worker holds the chunk. Returns how many photos it stored."""
    with sessions() as session:
        if not job_is_running(session=session, job_id=job_id):
            logger.info("chunk of a job no longer running: skipped", extra={"job_id": job_id})
            return 0
        session.rollback()
    if not lease.acquire():
        logger.info("chunk taken by another worker: skipped", extra={"job_id": job_id})
        return 0
    guard.leases.append(lease)
    guard.start(job_id)
    try:
        wanted = set(photo_ids)
        with sessions() as session:
            photos = photos_to_analyze(
                session=session,
                trip_id=trip_id,
                embedder_sha256=pipeline.embedder.sha256,
                mode="all",
                job_id=job_id,
            )
            todo: Todo = [
                (p.id, p.s3_key, p.file_name or p.s3_key)
                for p in photos
                if p.id in wanted and not p.key_error
            ]
            session.rollback()
        work = _Work(
            sessions=sessions,
            store=store,
            pipeline=pipeline,
            trip_id=trip_id,
            job_id=job_id,
            prefix=thumbnail_prefix,
            check=guard.check,
            on_photo=lambda: None,
            chunk=True,
        )
        analysis_started.send(sender=analyze_chunk_body, trip_id=trip_id, job_id=job_id)
        stored = _analyze_and_store(work, todo)
    finally:
        guard.stop()
        guard.leases.remove(lease)
        lease.release()
    logger.info(
        "chunk stored %d of its %d photos",
        stored,
        len(photo_ids),
        extra={"trip_id": trip_id, "job_id": job_id},
    )
    return stored


def _remove_unused_thumbnails(
    session: Session, store: PhotoStore, folder: str, trip_id: int, job_id: int
) -> None:
    """Delete the trip's thumbnails that no face row points at any more: those of faces a
    re-analysis no longer finds, and any an earlier job could not delete.

    Runs after the write has committed, so no row points at a deleted file. The Celery task
    holds the trip's lock, so no other job is uploading into the folder meanwhile; `rerun
    --inline` takes no lock and must not run beside a worker on the same trip. A failure (of
    the database read or the store) is logged and leaves unused files behind, never fails the
    job that has just succeeded."""
    try:
        referenced = trip_thumbnail_keys(session=session, trip_id=trip_id)
        session.commit()
        stale = [key for key in store.list(folder) if key not in referenced]
        if stale:
            store.delete(stale)
    except (StorageError, OSError, sqlalchemy.exc.SQLAlchemyError) as exc:
        session.rollback()
        logger.warning(
            "unused thumbnails not removed: %s", exc, extra={"folder": folder, "job_id": job_id}
        )
        return
    if stale:
        logger.info(
            "unused thumbnails removed",
            extra={"folder": folder, "job_id": job_id, "thumbnails": len(stale)},
        )


def _record_failure(session: Session, job_id: int, exc: Exception, *, retrying: bool) -> None:
    try:
        error = f"{type(exc).__name__}: {exc}"
        fail_job(session=session, job_id=job_id, error=error, retrying=retrying)
    except sqlalchemy.exc.SQLAlchemyError:
        # The database is what failed; the task's own error says more than this one.
        logger.exception("could not record the failure of job %s", job_id)


class GroupTripTask(Task):
    """Base of the grouping task: what each worker process loads once and keeps.

    Everything is created lazily on the first job, in the pool's child process: never in the
    parent of a prefork pool, whose CUDA context, database connections and HTTP pools would
    not survive the fork. Kept on this base class, so the process's tasks (`group_trip`,
    `analyze_chunk`) share one pipeline, engine and store.
    """

    _engine: Engine | None = None
    _sessions: sessionmaker[Session] | None = None
    _store: PhotoStore | None = None
    _pipeline: FacePipeline | None = None
    _redis: Redis | None = None

    @property
    def settings(self) -> ServiceSettings:
        """The process's settings."""
        return get_settings()

    @property
    def sessions(self) -> sessionmaker[Session]:
        """Sessions on the process's one engine."""
        if GroupTripTask._sessions is None:
            GroupTripTask._engine = self.settings.database_engine()
            GroupTripTask._sessions = make_sessionmaker(GroupTripTask._engine)
        return GroupTripTask._sessions

    @property
    def store(self) -> PhotoStore:
        """The photo bucket (or, in development, AFTERTRIP_PHOTO_ROOT)."""
        if GroupTripTask._store is None:
            GroupTripTask._store = open_photo_store(self.settings)
        return GroupTripTask._store

    @property
    def pipeline(self) -> FacePipeline:
        """Detector and embedder, loaded on the first job of this process."""
        if GroupTripTask._pipeline is None:
            # Imported here: it brings torch and onnxruntime, which Flower, the web app's
            # client and the prefork parent never need.
            from worker.pipeline import FacePipeline

            store = self.store
            client = getattr(store, "client", None)
            GroupTripTask._pipeline = FacePipeline(
                self.settings, fetch=partial(s3_fetch, client=client)
            )
        return GroupTripTask._pipeline

    @property
    def redis(self) -> Redis:
        """The Redis of the per-trip locks."""
        if GroupTripTask._redis is None:
            GroupTripTask._redis = Redis.from_url(self.settings.effective_lock_url)
        return GroupTripTask._redis

    def forget_process_state(self) -> None:
        """Drop what a parent process may have made before forking (each child makes its own)."""
        if GroupTripTask._engine is not None:
            GroupTripTask._engine.dispose(close=False)
        GroupTripTask._engine = GroupTripTask._sessions = GroupTripTask._store = None
        GroupTripTask._pipeline = GroupTripTask._redis = None


def open_photo_store(settings: ServiceSettings) -> PhotoStore:
    """The photo store the settings name: the S3 bucket, or a local folder in development."""
    if settings.s3_bucket:
        return S3Store(
            settings.s3_bucket,
            endpoint_url=settings.s3_endpoint_url,
            max_pool_connections=settings.s3_max_pool_connections,
            read_timeout=settings.s3_read_timeout,
            read_attempts=settings.s3_read_attempts,
        )
    if settings.photo_root is not None:
        return LocalStore(settings.photo_root)
    raise StorageConfigError("no photo store: set AFTERTRIP_S3_BUCKET")


# max_retries=None: the retry budget in time (`_retry_delay`) decides, not a count.
@app.task(bind=True, base=GroupTripTask, name=GROUP_TRIP, max_retries=None)
def group_trip(self: GroupTripTask, trip_id: int, mode: str = "missing") -> dict[str, Any]:
    """Group one trip's photos into person folders (`mode`: "missing" or "all").

    Transient errors (S3, database, Redis, a lost lock) are retried with backoff until
    AFTERTRIP_TASK_RETRY_BUDGET seconds have passed since the first of them.
    """
    trip_id, mode = check_job_arguments(trip_id, mode)
    install_soft_limit_handler()
    settings = self.settings
    task_id = self.request.id or f"local-{uuid.uuid4()}"
    retry_since = _retry_since(self)
    try:
        lock = TripLock(self.redis, trip_id, owner=task_id, ttl=settings.lock_ttl)
        if not lock.acquire():
            _wait_for_turn(self, trip_id, mode, holder=lock.holder(), retry_since=retry_since)
        try:
            _count_delivery(self, task_id, trip_id, mode)
            guard = JobGuard(
                self.sessions,
                heartbeat_seconds=settings.heartbeat_seconds,
                stall_seconds=settings.stall_seconds,
                lock=lock,
                soft_time_limit=settings.task_soft_time_limit,
            )
            return run_trip_job(
                sessions=self.sessions,
                store=self.store,
                pipeline=self.pipeline,
                settings=settings,
                trip_id=trip_id,
                mode=mode,
                task_id=task_id,
                thumbnail_prefix=settings.s3_thumbnail_prefix,
                on_progress=_progress_reporter(self),
                will_retry=lambda exc: _retry_delay(self, exc, retry_since) is not None,
                guard=guard,
                fan_out=FanOut(
                    chunk_photos=settings.chunk_photos,
                    redis=self.redis,
                    owner=task_id,
                    lease_ttl=settings.lock_ttl,
                    send=partial(_send_chunks, queue=settings.queue),
                ),
            )
        finally:
            lock.release()
    except RETRYABLE_ERRORS as exc:
        delay = _retry_delay(self, exc, retry_since)
        if delay is None:
            raise
        since = retry_since if retry_since is not None else time.time()
        logger.warning(
            "job will be retried in %.0f s: %s",
            delay,
            exc,
            extra={"trip_id": trip_id, "task_id": task_id, "retry_since": since},
        )
        raise self.retry(exc=exc, countdown=delay, headers={RETRY_SINCE_HEADER: since}) from exc


def _send_chunks(
    trip_id: int, job_id: int, split: str, chunks: list[tuple[int, list[int]]], *, queue: str
) -> None:
    """Queue one `analyze_chunk` per chunk (a Celery group; results are not kept)."""
    group(
        analyze_chunk.si(trip_id, job_id, split, number, photo_ids).set(queue=queue)
        for number, photo_ids in chunks
    ).apply_async()


@app.task(bind=True, base=GroupTripTask, name=ANALYZE_CHUNK, ignore_result=True)
def analyze_chunk(
    self: GroupTripTask, trip_id: int, job_id: int, split: str, chunk: int, photo_ids: list[int]
) -> int:
    """Analyse and store one chunk of a fanned-out job's photos (see `group_trip`).

    Nothing to retry here: a chunk that fails or whose worker dies releases (or lets lapse)
    its lease, and the job that sent it analyses what the chunk did not store.
    """
    for value in (trip_id, job_id, chunk, *photo_ids):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InvalidJobArguments(f"analyze_chunk takes integer ids, not {value!r}")
    if not isinstance(split, str) or not split.isalnum():
        raise InvalidJobArguments(f"analyze_chunk's split must be a short token, not {split!r}")
    install_soft_limit_handler()
    settings = self.settings
    owner = self.request.id or f"local-{uuid.uuid4()}"
    return analyze_chunk_body(
        sessions=self.sessions,
        store=self.store,
        pipeline=self.pipeline,
        lease=Lease(
            self.redis, chunk_lease_name(job_id, split, chunk), owner=owner, ttl=settings.lock_ttl
        ),
        guard=JobGuard(
            self.sessions,
            heartbeat_seconds=settings.heartbeat_seconds,
            stall_seconds=settings.stall_seconds,
            soft_time_limit=settings.task_soft_time_limit,
        ),
        trip_id=trip_id,
        job_id=job_id,
        photo_ids=list(photo_ids),
        thumbnail_prefix=settings.s3_thumbnail_prefix,
    )


def _retry_since(task: GroupTripTask) -> float | None:
    """When the job's first retryable error happened (from the message), or None."""
    value = getattr(task.request, RETRY_SINCE_HEADER, None)
    if value is None:
        value = (task.request.headers or {}).get(RETRY_SINCE_HEADER)
    try:
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def _retry_delay(task: GroupTripTask, exc: Exception, since: float | None) -> float | None:
    """Seconds to wait before the next try, or None when the error is not retried (not
    transient, the retry budget is spent, or the job runs outside a worker)."""
    if not isinstance(exc, RETRYABLE_ERRORS) or task.request.called_directly:
        return None
    settings = task.settings
    now = time.time()
    spent = now - (since if since is not None else now)
    if spent >= settings.task_retry_budget:
        return None
    # Exponential backoff with jitter, capped, and never past the budget's end by much.
    ceiling = min(settings.task_retry_backoff_max, 2 ** min(task.request.retries + 1, 16))
    return max(1.0, random.uniform(ceiling / 2, ceiling))


def _progress_reporter(task: GroupTripTask) -> ProgressCallback:
    """Progress as the task's PROGRESS state; a result backend outage never fails the job."""
    silent_until = 0.0

    def report(stage: str, done: int, total: int) -> None:
        nonlocal silent_until
        if task.request.id is None or time.monotonic() < silent_until:
            return
        if not _show_progress(task, {"stage": stage, "done": done, "total": total}):
            silent_until = time.monotonic() + 10

    return report


def _show_progress(task: GroupTripTask, meta: dict[str, Any]) -> bool:
    """Write the PROGRESS state, best-effort: False (logged) when the result backend cannot
    take it. Celery retries the write itself (`result_backend_always_retry`) and then raises
    BackendStoreError, which must not end a job any more than a RedisError does."""
    try:
        task.update_state(state=PROGRESS, meta=meta)
        return True
    except (redis.exceptions.RedisError, OSError, BackendError) as exc:
        logger.warning("progress not reported (result backend unreachable): %s", exc)
        return False


def _wait_for_turn(
    task: GroupTripTask, trip_id: int, mode: str, *, holder: str | None, retry_since: float | None
) -> None:
    """Put this request back on the queue to run after the trip's current job.

    Sent again under the same task id (so a client waiting on it keeps waiting) and with
    the same retry count: waiting for a busy trip does not use up retries meant for errors.
    """
    wait = task.settings.lock_wait_seconds
    logger.info(
        "trip busy, waiting",
        extra={"trip_id": trip_id, "holder": holder, "task_id": task.request.id, "wait_s": wait},
    )
    if task.request.id is not None:
        _show_progress(task, {"stage": "waiting", "done": 0, "total": 0, "holder": holder})
    headers = {RETRY_SINCE_HEADER: retry_since} if retry_since is not None else None
    task.apply_async(
        args=(trip_id,),
        kwargs={"mode": mode},
        countdown=wait,
        task_id=task.request.id,
        retries=task.request.retries,
        headers=headers,
    )
    raise Ignore()


def _count_delivery(task: GroupTripTask, task_id: str, trip_id: int, mode: str) -> None:
    """Give up on a job whose worker process keeps dying, instead of redelivering it forever."""
    key = f"aftertrip:task:{task_id}:{task.request.retries}:deliveries"
    deliveries = int(task.redis.incr(key))
    task.redis.expire(key, task.settings.delivery_count_ttl)
    limit = task.settings.task_max_deliveries
    if deliveries <= limit:
        return
    message = (
        f"the worker process died {deliveries - 1} times running this job (out of memory? "
        f"a crash?): giving up after AFTERTRIP_TASK_MAX_DELIVERIES={limit}"
    )
    with task.sessions() as session:
        job = start_job(
            session=session,
            trip_id=trip_id,
            mode=mode,
            task_id=task_id,
            models=task.pipeline.models,
        )
        fail_job(session=session, job_id=job.id, error=message)
    raise JobAbandoned(message)


@worker_process_init.connect
def _fresh_process_state(**_kwargs: object) -> None:
    group_trip.forget_process_state()
