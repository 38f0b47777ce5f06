"""aftertrip_job rows: a job queued, started, finished or failed; its heartbeat; stalled jobs.

Each function commits what it did, except the reads (`get_job`, `find_queued_or_running_job`,
`finished_job`, `job_stored_photos`, `job_last_stored`, `job_is_running`), which leave their
transaction to the caller.

A worker renews `aftertrip_job.heartbeat_at` every few seconds while it runs a job. A row
still `running` whose heartbeat is older than the stall limit has lost its worker (killed,
node gone) or its worker lost the database (it could not record its own failure): the next
job of the trip and `aftertrip-faces status` mark such rows failed, so nothing stays
`running` (or counts as pending) for good.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime, timedelta

from sqlalchemy import func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from db.common import MAX_ERROR_CHARS
from db.models import Job, JobMode, JobStatus, PhotoAnalysis
from db.requests import close_requests, unclaim_requests
from db.types import engine_time_zone, local_time, utcnow
from worker.types import ModelInfo, ModelsUsed

logger = logging.getLogger(__name__)

STALLED_ERROR = (
    "stalled: no heartbeat from its worker since {since} (the worker process died or lost "
    "the database); queue the trip again if no retry follows"
)


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


def finished_job(*, session: Session, task_id: str) -> Job | None:
    """The job of this task id if it has ended for good (`succeeded` or `skipped`), else None.

    A task delivered again after its job ended (Redis putting back a message whose
    acknowledgement it lost, a second copy queued beside a redelivery) is a duplicate: the
    worker returns this row's result instead of running the job again."""
    done = [JobStatus.SUCCEEDED, JobStatus.SKIPPED]
    stmt = select(Job).where(Job.celery_task_id == task_id, Job.status.in_(done)).limit(1)
    return session.scalars(stmt).first()


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
    used = ModelsUsed.of(models)
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
        job.detector_name, job.detector_sha256 = used.detector_name, used.detector_sha256
        job.embedder_name, job.embedder_sha256 = used.embedder_name, used.embedder_sha256
        job.models = used.models
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
    close_requests(session=session, task_id=job.celery_task_id)  # done with the job's end
    session.commit()
    logger.info("job succeeded", extra={"job_id": job_id, "trip_id": job.trip_id})


def skip_job(*, session: Session, job_id: int, reason: str) -> None:
    """Mark a job ended without grouping (`skipped`, with why), and commit. What the job
    wrote before is rolled back first."""
    session.rollback()
    job = _job_or_raise(session, job_id)
    job.status = JobStatus.SKIPPED.value
    job.finished_at = utcnow()
    job.error = reason[:MAX_ERROR_CHARS]
    close_requests(session=session, task_id=job.celery_task_id)
    session.commit()
    logger.warning("job skipped: %s", reason, extra={"job_id": job_id, "trip_id": job.trip_id})


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
    if not retrying:  # a failed job's requests end with it (its error is the answer)
        close_requests(session=session, task_id=job.celery_task_id)
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


def beat_job(*, session: Session, job_id: int) -> None:
    """Record that the job's worker is alive, and commit."""
    session.execute(update(Job).where(Job.id == job_id).values(heartbeat_at=utcnow()))
    session.commit()


def mark_stalled_jobs(
    *,
    session: Session,
    stall_seconds: float,
    trip_id: int | None = None,
    keep_task_id: str | None = None,
) -> list[int]:
    """Mark failed every `running` job (of one trip, or all) whose heartbeat (or start, for a
    job without one) is older than `stall_seconds`; commit and return their ids.

    `keep_task_id`: a job delivered again marks the others, never its own row.
    """
    limit: datetime = utcnow() - timedelta(seconds=stall_seconds)
    last_sign = func.coalesce(Job.heartbeat_at, Job.started_at, Job.created_at)
    stmt = select(Job).where(Job.status == JobStatus.RUNNING.value, last_sign < limit)
    if trip_id is not None:
        stmt = stmt.where(Job.trip_id == trip_id)
    if keep_task_id is not None:
        stmt = stmt.where(or_(Job.celery_task_id.is_(None), Job.celery_task_id != keep_task_id))
    stalled = list(session.scalars(stmt.with_for_update(skip_locked=True)))
    now = utcnow()
    zone = engine_time_zone(session.get_bind().dialect)
    for job in stalled:
        since = job.heartbeat_at or job.started_at or job.created_at
        job.status = JobStatus.FAILED.value
        job.finished_at = now
        job.error = STALLED_ERROR.format(since=local_time(since, zone))
        logger.warning(
            "stalled job marked failed", extra={"job_id": job.id, "trip_id": job.trip_id}
        )
    # What the dead jobs took is open again: the next job of the trip, or the sweep, takes it.
    unclaim_requests(
        session=session, task_ids=[j.celery_task_id for j in stalled if j.celery_task_id]
    )
    session.commit()
    return [job.id for job in stalled]


def job_stored_photos(*, session: Session, job_id: int, embedder_sha256: str) -> dict[int, str]:
    """photo id -> status of every photo whose analysis this job has stored so far (across
    its deliveries and its chunks): its progress, and what is left to analyse."""
    rows = session.execute(
        select(PhotoAnalysis.photo_id, PhotoAnalysis.status).where(
            PhotoAnalysis.job_id == job_id, PhotoAnalysis.embedder_sha256 == embedder_sha256
        )
    )
    return {photo_id: status for photo_id, status in rows}


def job_last_stored(*, session: Session, job_id: int) -> datetime | None:
    """When the job last stored a photo's outcome (any delivery or chunk), None before its
    first: its last sign of progress, as the heartbeat is its last sign of life."""
    return session.scalar(
        select(func.max(PhotoAnalysis.updated_at)).where(PhotoAnalysis.job_id == job_id)
    )


def job_is_running(*, session: Session, job_id: int) -> bool:
    """Whether the job's row still says `running` (a chunk of a finished job does nothing)."""
    status = session.scalar(select(Job.status).where(Job.id == job_id))
    return status == JobStatus.RUNNING.value
