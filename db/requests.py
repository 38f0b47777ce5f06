"""aftertrip_request rows: the web app's requests to group a trip, taken by the job that
carries them out (`aftertrip_client.request_trip` writes them, in the app's transaction).

A job takes (claims) every open request of its trip at once, so a burst of requests is one
job; it deletes what it took when it ends for good (`db.jobs` does it in the transaction that
records the end). Requests nobody took, or taken by a job that is gone, are what the
worker's sweep queues again (`trips_with_waiting_requests`).

Each function commits what it did, except the reads.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from sqlalchemy import and_, delete, exists, func, or_, select, update
from sqlalchemy.orm import Session

from db.models import Job, JobMode, JobStatus, TripRequest
from db.types import utcnow

logger = logging.getLogger(__name__)

# A job row in one of these states is alive: the requests its task took are its own.
_ALIVE = (JobStatus.QUEUED.value, JobStatus.RUNNING.value, JobStatus.RETRYING.value)


def add_request(*, session: Session, trip_id: int, mode: str) -> TripRequest:
    """Record a request for the trip and commit (what the client does, for the worker's
    own callers and tests)."""
    request = TripRequest(trip_id=trip_id, mode=JobMode(mode).value, requested_at=utcnow())
    session.add(request)
    session.commit()
    return request


def claim_requests(*, session: Session, trip_id: int, task_id: str) -> str | None:
    """Take every open request of the trip for the task `task_id` and commit; the mode to
    run ("all" if any asked for all, else "missing"), or None when there is none.

    Call holding the trip's lock. Open: not taken, taken by this task already (a delivery
    again, or a retry), or taken by a task whose job is not alive (it died before recording
    its end). Requests a job waiting for its retry took stay with it.
    """
    alive_tasks = select(Job.celery_task_id).where(
        Job.trip_id == trip_id,
        Job.status.in_(_ALIVE),
        Job.celery_task_id.is_not(None),
        Job.celery_task_id != task_id,
    )
    session.execute(
        update(TripRequest)
        .where(
            TripRequest.trip_id == trip_id,
            or_(TripRequest.claimed_by.is_(None), TripRequest.claimed_by.not_in(alive_tasks)),
        )
        .values(claimed_by=task_id, claimed_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    modes = set(session.scalars(select(TripRequest.mode).where(TripRequest.claimed_by == task_id)))
    session.commit()
    if not modes:
        return None
    return JobMode.ALL.value if JobMode.ALL.value in modes else JobMode.MISSING.value


def close_requests(*, session: Session, task_id: str | None) -> None:
    """Delete the requests the task took (its job has ended for good); the caller commits,
    with the job's end."""
    if task_id is not None:
        session.execute(delete(TripRequest).where(TripRequest.claimed_by == task_id))


def unclaim_requests(*, session: Session, task_ids: list[str]) -> None:
    """Give back the requests of tasks whose job is gone (stalled): open again, for the next
    job or the sweep. The caller commits."""
    if task_ids:
        session.execute(
            update(TripRequest)
            .where(TripRequest.claimed_by.in_(task_ids))
            .values(claimed_by=None, claimed_at=None)
            .execution_options(synchronize_session=False)
        )


def has_open_requests(*, session: Session, trip_id: int) -> bool:
    """Whether the trip has a request no job has taken (a follow-up job is due)."""
    return bool(
        session.scalar(
            select(exists().where(TripRequest.trip_id == trip_id, TripRequest.claimed_by.is_(None)))
        )
    )


def settle_wait(
    *, session: Session, trip_id: int, settle_seconds: float, max_wait_seconds: float
) -> float:
    """Seconds the trip's open requests should still settle before a job takes them: 0 when
    the newest came `settle_seconds` ago (a burst is over) or the oldest has waited
    `max_wait_seconds` (requests that never stop still get a job), else what is left."""
    if settle_seconds <= 0:
        return 0.0
    oldest, newest = session.execute(
        select(func.min(TripRequest.requested_at), func.max(TripRequest.requested_at)).where(
            TripRequest.trip_id == trip_id, TripRequest.claimed_by.is_(None)
        )
    ).one()
    if newest is None or oldest is None:
        return 0.0
    now = utcnow()
    if (now - oldest).total_seconds() >= max_wait_seconds:
        return 0.0
    # The app's clock wrote requested_at: a skew is clamped to at most one settling.
    left = settle_seconds - (now - newest).total_seconds()
    return min(max(left, 0.0), settle_seconds)


def trips_with_waiting_requests(*, session: Session, grace_seconds: float) -> list[int]:
    """Trips with a request that should have been taken by now: not taken for more than
    `grace_seconds` (its nudge was lost: a broker outage), or taken by a task with no live
    job row for more than that (the task died before starting its job)."""
    since = utcnow() - timedelta(seconds=grace_seconds)
    alive_tasks = select(Job.celery_task_id).where(
        Job.status.in_(_ALIVE), Job.celery_task_id.is_not(None)
    )
    stmt = (
        select(TripRequest.trip_id)
        .where(
            or_(
                and_(TripRequest.claimed_by.is_(None), TripRequest.requested_at < since),
                and_(
                    TripRequest.claimed_by.is_not(None),
                    TripRequest.claimed_at < since,
                    TripRequest.claimed_by.not_in(alive_tasks),
                ),
            )
        )
        .distinct()
        .order_by(TripRequest.trip_id)
    )
    return list(session.scalars(stmt))


def record_progress(*, session: Session, job_id: int, stage: str, done: int, total: int) -> None:
    """Store where a running job is (stage, done of total) on its row, and commit."""
    session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.RUNNING.value)
        .values(stage=stage[:16], progress_done=done, progress_total=total)
    )
    session.commit()
