"""Which errors a job retries, how long it waits, and when it gives up (Celery-free: the
Celery task in `tasks.trip` asks these and does the retrying)."""

from __future__ import annotations

import logging
import random
import time
from typing import TYPE_CHECKING, Any

import redis.exceptions
import sqlalchemy.exc

from db.jobs import fail_job, start_job
from storage.errors import TransientStorageError
from tasks.guard import TripLockLost
from worker.errors import AfterTripError

if TYPE_CHECKING:
    from tasks.compose import Services

logger = logging.getLogger(__name__)

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


class JobAbandoned(AfterTripError):
    """A job's worker process died too often while running it (out of memory, a crash)."""


def retry_since(request: Any) -> float | None:
    """When the job's first retryable error happened (a Celery request's header), or None."""
    value = getattr(request, RETRY_SINCE_HEADER, None)
    if value is None:
        value = (getattr(request, "headers", None) or {}).get(RETRY_SINCE_HEADER)
    try:
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def retry_delay(
    exc: Exception, *, since: float | None, retries: int, budget: float, backoff_max: float
) -> float | None:
    """Seconds to wait before the next try, or None when the error is not retried (not
    transient, or the retry budget counted from `since` is spent)."""
    if not isinstance(exc, RETRYABLE_ERRORS):
        return None
    now = time.time()
    spent = now - (since if since is not None else now)
    if spent >= budget:
        return None
    # Exponential backoff with jitter, capped, and never past the budget's end by much.
    ceiling = min(backoff_max, 2 ** min(retries + 1, 16))
    return max(1.0, random.uniform(ceiling / 2, ceiling))


def count_delivery(
    services: Services, *, task_id: str, retries: int, trip_id: int, mode: str
) -> None:
    """Give up on a job whose worker process keeps dying, instead of redelivering it forever:
    past AFTERTRIP_TASK_MAX_DELIVERIES deliveries of one try, the job is marked failed and
    `JobAbandoned` raised."""
    settings = services.settings
    key = f"aftertrip:task:{task_id}:{retries}:deliveries"
    deliveries = int(services.redis.incr(key))
    services.redis.expire(key, settings.delivery_count_ttl)
    limit = settings.task_max_deliveries
    if deliveries <= limit:
        return
    message = (
        f"the worker process died {deliveries - 1} times running this job (out of memory? "
        f"a crash?): giving up after AFTERTRIP_TASK_MAX_DELIVERIES={limit}"
    )
    with services.sessions() as session:
        job = start_job(
            session=session,
            trip_id=trip_id,
            mode=mode,
            task_id=task_id,
            models=services.pipeline.models,
        )
        fail_job(session=session, job_id=job.id, error=message)
    raise JobAbandoned(message)
