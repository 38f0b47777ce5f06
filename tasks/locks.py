"""One grouping job per trip at a time, across every worker on every node.

A Redis lock per trip with a short time to live (`ServiceSettings.lock_ttl`, six heartbeats)
that the running job renews on every heartbeat. A holder that dies (SIGKILL, lost node,
Redis restarted under it) stops renewing, and its lock is gone a few beats later: the next
job of the trip, or the same job delivered again, waits at most that long.

The token is the task id plus a delivery nonce: a redelivered task never takes over a lock
that an earlier delivery of itself may still hold (after a broker reconnection, both can be
alive at once); it waits for that lock to be renewed no more, like any other job.
"""

from __future__ import annotations

import logging
import uuid

from redis import Redis
from redis.exceptions import LockError, RedisError
from redis.lock import Lock

logger = logging.getLogger(__name__)


def trip_lock_name(trip_id: int) -> str:
    """The Redis key of a trip's lock."""
    return f"aftertrip:trip:{trip_id}"


def chunk_lease_name(job_id: int, split: str, chunk: int) -> str:
    """The Redis key of the lease on one chunk of a fanned-out job."""
    return f"aftertrip:job:{job_id}:{split}:chunk:{chunk}"


class Lease:
    """A Redis key held by one delivery of a task; lives `ttl` seconds unless renewed."""

    def __init__(self, redis: Redis, name: str, *, owner: str, ttl: float) -> None:
        self.redis = redis
        self.name = name
        self.owner = owner
        self.token = f"{owner} {uuid.uuid4().hex[:12]}"
        # Not thread-local: the heartbeat thread renews what the job's thread acquired.
        self._lock = Lock(redis, name, timeout=ttl, blocking=False, thread_local=False)
        self.held = False

    def acquire(self) -> bool:
        """Take the lock without waiting; True if this delivery now holds it."""
        self.held = bool(self._lock.acquire(blocking=False, token=self.token))
        return self.held

    def renew(self) -> bool:
        """Reset the time to live (called on every heartbeat); False if the lock is lost.

        A lock whose key vanished (Redis restarted without its data) is taken again; one
        that another job holds now is lost for good: the job must not write.
        """
        if not self.held:
            return False
        try:
            self._lock.reacquire()
            return True
        except LockError:
            pass
        # RedisError (Redis down) propagates: the caller tries again on the next beat.
        if self._lock.acquire(blocking=False, token=self.token):
            logger.warning("lease %s was gone (Redis restarted?): taken again", self.name)
            return True
        self.held = False
        logger.error("lease %s lost to %s while task %s ran", self.name, self.holder(), self.owner)
        return False

    def holder(self) -> str | None:
        """The task id holding the lock now, if any."""
        value = self.redis.get(self.name)
        if value is None:
            return None
        text = value.decode() if isinstance(value, bytes) else str(value)
        return text.split(" ", 1)[0]

    def release(self) -> None:
        """Let the next job of this trip run; a lock that already expired is only logged."""
        if not self.held:
            return
        self.held = False
        try:
            self._lock.release()
        except LockError:
            logger.warning("lease %s expired before task %s released it", self.name, self.owner)
        except RedisError as exc:  # it expires by itself a few heartbeats from now
            logger.warning("lease %s not released: %s", self.name, exc)


class TripLock(Lease):
    """The lock of one trip: one grouping job of the trip runs at a time."""

    def __init__(self, redis: Redis, trip_id: int, *, owner: str, ttl: float) -> None:
        super().__init__(redis, trip_lock_name(trip_id), owner=owner, ttl=ttl)
        self.trip_id = trip_id
