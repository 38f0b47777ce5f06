"""A grouping job's body, Celery-free: one trip's photos into the web app's person folders.

`run_trip_job` records the job's row, analyses the photos it has not stored yet
(`tasks.analyze`, or fanned out over every free worker: `tasks.fanout`), then regroups the
trip and rewrites its folders in one transaction (`tasks.write.regroup_trip`). The Celery
task (`tasks.trip.group_trip`) and `aftertrip-faces rerun --inline` run it; so do the tests.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import sqlalchemy.exc
from sqlalchemy.orm import Session, sessionmaker

from db.common import TripDeleted, TripNotFound
from db.jobs import (
    fail_job,
    finish_job,
    finished_job,
    job_stored_photos,
    skip_job,
    start_job,
)
from db.models import JobStatus
from db.photos import photos_to_analyze, trip_thumbnail_keys
from db.requests import record_progress
from db.schemas import PhotoOutcome
from db.types import engine_time_zone
from db.webapp import Trip
from storage import PhotoStore
from storage.errors import StorageError
from tasks.analyze import (
    ProgressCallback,
    analysis_started,
    analyze_and_store,
    job_work,
    log_photo_failure,
    thumbnail_folder,
    todo_of,
)
from tasks.fanout import FanOut, analyze_fanned_out
from tasks.guard import JobGuard, JobTimedOut
from tasks.names import MODES, stage_percent, trip_id_problem
from tasks.write import regroup_trip, store_photo_outcomes
from worker.errors import AfterTripError
from worker.types import PhotoStatus

if TYPE_CHECKING:
    from worker.pipeline import FacePipeline
    from worker.settings import PipelineSettings

logger = logging.getLogger(__name__)


class InvalidJobArguments(AfterTripError, ValueError):
    """The message's arguments are not a trip id and a mode: refused before anything runs."""


def check_job_arguments(trip_id: object, mode: object) -> tuple[int, str]:
    """The trip id and mode of a message, or `InvalidJobArguments` saying what is wrong.

    Only an integer from 1 to `MAX_TRIP_ID` is a trip id (`tasks.names.trip_id_problem`):
    anything else is refused before the database is asked.
    """
    problem = trip_id_problem(trip_id)
    if problem is not None:
        raise InvalidJobArguments(f"{problem}: the job was refused and nothing was written")
    if not isinstance(mode, str) or mode not in MODES:
        raise InvalidJobArguments(
            f"mode must be one of {', '.join(MODES)}, not {mode!r}: "
            "the job was refused and nothing was written"
        )
    return trip_id, mode  # type: ignore[return-value]  # an int, checked above


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
    transaction (`tasks.write.regroup_trip`). On any error the row is marked failed ("retrying"
    where `will_retry` says the error will be retried) and the error re-raised: the folders
    and links stay as they were, the stored photos stay stored.
    With a `guard`, the row's heartbeat (and the trip lock) are renewed while the job runs,
    the trip's stalled jobs are marked failed first, and the soft time limit or a lost lock
    stops the job between photos. With `fan_out`, a big job's photos are analysed in chunks
    by every free worker, this one included.
    Returns the job id and `TripWriteSummary` counts ("analyzed": the photos this job
    stored, over all its deliveries). Usable without Celery (embedded runs). A trip the web
    app soft-deleted (before the job, or before its write) is not grouped: the row ends
    `skipped` with the reason, nothing is written to its folders, and the result's "skipped"
    says why.
    """
    trip_id, mode = check_job_arguments(trip_id, mode)
    progress = on_progress or (lambda stage, done, total: None)
    started = time.perf_counter()
    with sessions() as session:
        trip = session.get(Trip, trip_id)
        if trip is None:
            raise TripNotFound(trip_id)
        if trip.deleted_at is not None:
            # Soft-deleted in the web app: recorded as skipped, without loading a model.
            job = start_job(session=session, trip_id=trip_id, mode=mode, task_id=task_id, models=())
            zone = engine_time_zone(session.get_bind().dialect)
            return _skipped(session, job.id, TripDeleted(trip_id, trip.deleted_at, zone))
        session.rollback()
        progress("models", 0, 1)
        models = pipeline.models  # loads the models on a process's first job
        if guard is not None:
            guard.take_over_stalled(trip_id=trip_id, task_id=task_id)
        job = start_job(session=session, trip_id=trip_id, mode=mode, task_id=task_id, models=models)
        job_id = job.id
        progress = _recording_progress(progress, sessions, job_id)
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
            todo = todo_of(photos)
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
            for p in photos:
                if p.key_error:
                    log_photo_failure(
                        (trip_id, job_id),
                        p.id,
                        p.file_key,
                        PhotoStatus.INVALID_KEY.value,
                        p.key_error,
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

            work = job_work(
                sessions,
                store,
                pipeline,
                (trip_id, job_id),
                thumbnail_prefix,
                guard,
                on_photo=on_photo,
            )
            progress("analyze", 0, len(todo))
            if fan_out is not None and guard is not None and fan_out.worth_it(len(todo)):
                analyze_fanned_out(work, todo, fan_out, guard, progress)
            else:
                analyze_and_store(work, todo)
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
        except TripDeleted as exc:  # deleted while its photos were analysed: nothing written
            return _skipped(session, job_id, exc)
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


PROGRESS_WRITE_SECONDS = 0.5
"""A running job stores its progress on its row when its percentage has moved and this long
has passed since the last write, or it moved by `PROGRESS_WRITE_POINTS`, and at every stage."""
PROGRESS_WRITE_POINTS = 5


def _recording_progress(
    progress: ProgressCallback, sessions: sessionmaker[Session], job_id: int
) -> ProgressCallback:
    """`progress`, plus the job row's stage / progress_done / progress_total (what
    `aftertrip_client.trip_state` reads), best-effort: a database that cannot take the write
    is logged and not asked again for ten seconds; the job goes on. At most about twenty
    writes per stage, or two a second."""
    lock = threading.Lock()
    last: dict[str, Any] = {"stage": None, "percent": -1, "at": 0.0, "silent_until": 0.0}

    def report(stage: str, done: int, total: int) -> None:
        progress(stage, done, total)
        now = time.monotonic()
        percent = stage_percent(stage, done, total)
        with lock:
            moved = percent - last["percent"]
            due = (
                stage != last["stage"]
                or done >= total
                or moved >= PROGRESS_WRITE_POINTS
                or (moved > 0 and now - last["at"] >= PROGRESS_WRITE_SECONDS)
            )
            if not due or now < last["silent_until"]:
                return
            last.update(stage=stage, percent=percent, at=now)
            try:
                with sessions() as session:
                    record_progress(
                        session=session, job_id=job_id, stage=stage, done=done, total=total
                    )
            except sqlalchemy.exc.SQLAlchemyError as exc:
                last["silent_until"] = now + 10
                logger.warning("job progress not stored: %s", exc, extra={"job_id": job_id})

    return report


def finished_result(sessions: sessionmaker[Session], task_id: str) -> dict[str, Any] | None:
    """What `run_trip_job` returned for this task id, if its job has already ended
    (succeeded or skipped); None if it has not (or never started). Read under the trip's
    lock, so no delivery of the task is writing meanwhile."""
    with sessions() as session:
        job = finished_job(session=session, task_id=task_id)
        if job is None:
            return None
        if job.status == JobStatus.SKIPPED.value:
            return {"trip_id": job.trip_id, "job_id": job.id, "skipped": job.error or ""}
        return {"trip_id": job.trip_id, "job_id": job.id, **(job.counts or {})}


def _skipped(session: Session, job_id: int, why: TripDeleted) -> dict[str, Any]:
    skip_job(session=session, job_id=job_id, reason=str(why))
    return {"trip_id": why.trip_id, "job_id": job_id, "skipped": str(why)}


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
