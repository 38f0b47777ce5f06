"""One grouping job per trip at a time, across every worker on every node.

A Redis lock per trip whose token is the Celery task id. A job whose worker process died
while holding the lock is delivered again with the same task id (acks_late +
reject_on_worker_lost); it finds its own token and takes the lock over instead of waiting
for it to expire.
"""

from __future__ import annotations

import logging

from redis import Redis
from redis.exceptions import LockError
from redis.lock import Lock

logger = logging.getLogger(__name__)


def trip_lock_name(trip_id: int) -> str:
    """The Redis key of a trip's lock."""
    return f"aftertrip:trip:{trip_id}"


class TripLock:
    """The lock of one trip, held by one task id; `timeout` bounds how long a dead holder blocks."""

    def __init__(self, redis: Redis, trip_id: int, *, owner: str, timeout: int) -> None:
        self.redis = redis
        self.trip_id = trip_id
        self.owner = owner
        self.name = trip_lock_name(trip_id)
        self._lock = Lock(redis, self.name, timeout=timeout, blocking=False)

    def acquire(self) -> bool:
        """Take the lock without waiting; True if this task id now holds it."""
        if self._lock.acquire(blocking=False, token=self.owner):
            return True
        if self.holder() == self.owner:
            # Our own earlier delivery died holding it: take it over with a fresh timeout.
            self._lock.local.token = self.owner.encode()
            try:
                self._lock.reacquire()
            except LockError:  # it expired between the two calls: try once more from scratch
                return bool(self._lock.acquire(blocking=False, token=self.owner))
            logger.warning(
                "took over the lock of trip %s from an earlier delivery of task %s",
                self.trip_id,
                self.owner,
            )
            return True
        return False

    def holder(self) -> str | None:
        """The task id holding the lock now, if any."""
        value = self.redis.get(self.name)
        if value is None:
            return None
        return value.decode() if isinstance(value, bytes) else str(value)

    def release(self) -> None:
        """Let the next job of this trip run; a lock that already expired is only logged."""
        try:
            self._lock.release()
        except LockError:
            logger.warning(
                "lock of trip %s expired before task %s released it", self.trip_id, self.owner
            )
