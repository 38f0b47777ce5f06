"""A running job's heartbeat, and the jobs whose heartbeat stopped.

A worker renews `aftertrip_job.heartbeat_at` every few seconds while it runs a job. A row
still `running` whose heartbeat is older than the stall limit has lost its worker (killed,
node gone) or its worker lost the database (it could not record its own failure): the next
job of the trip and `aftertrip-faces status` mark such rows failed, so nothing stays
`running` (or counts as pending) for good. Each function commits what it did.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session

from db.models import Job, JobStatus, PhotoAnalysis
from db.types import utcnow

logger = logging.getLogger(__name__)

STALLED_ERROR = (
    "stalled: no heartbeat from its worker since {since} (the worker process died or lost "
    "the database); queue the trip again if no retry follows"
)


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
    for job in stalled:
        since = job.heartbeat_at or job.started_at or job.created_at
        job.status = JobStatus.FAILED.value
        job.finished_at = now
        job.error = STALLED_ERROR.format(since=since.isoformat(timespec="seconds"))
        logger.warning(
            "stalled job marked failed", extra={"job_id": job.id, "trip_id": job.trip_id}
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


def job_is_running(*, session: Session, job_id: int) -> bool:
    """Whether the job's row still says `running` (a chunk of a finished job does nothing)."""
    status = session.scalar(select(Job.status).where(Job.id == job_id))
    return status == JobStatus.RUNNING.value
