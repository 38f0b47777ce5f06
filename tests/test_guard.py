"""The job's guard: its lock renewal never waits for the database's heartbeat."""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import pytest
import sqlalchemy.exc

from tasks.guard import JobGuard
from tasks.locks import TripLock
from tests.support.services import REDIS_URL, require_redis

pytestmark = pytest.mark.services


class _StalledSessions:
    """A sessionmaker whose connection has gone silent: the first beat fails at once, every
    later one waits (as on the statement timeout) until the test releases it."""

    def __init__(self) -> None:
        self.calls = 0
        self.release = threading.Event()

    def __call__(self) -> Any:
        self.calls += 1
        if self.calls > 1:
            self.release.wait(60)
        raise sqlalchemy.exc.OperationalError("SELECT 1", {}, TimeoutError("silent"))


def test_the_lock_is_renewed_while_the_database_heartbeat_stalls() -> None:
    """A database beat that waits out its timeouts (70 s with the defaults) used to hold the
    lock's renewal too, and the lock (six beats) lapsed under the running job."""
    from redis import Redis

    require_redis()
    redis = Redis.from_url(REDIS_URL)
    ttl = 3.0  # generous: a loaded machine may pause a thread for a second
    lock = TripLock(redis, 10_000_000 + uuid.uuid4().int % 1_000_000, owner="guarded", ttl=ttl)
    assert lock.acquire()
    sessions = _StalledSessions()
    guard = JobGuard(sessions, heartbeat_seconds=ttl / 6, stall_seconds=120, lock=lock)  # type: ignore[arg-type]
    try:
        guard.start(job_id=1)
        deadline = time.monotonic() + 30
        while sessions.calls < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sessions.calls == 2, "the database beat is stuck"
        time.sleep(3 * ttl)  # the lock's lifetime, three times over, with the database stuck
        assert sessions.calls == 2
        assert lock.holder() == "guarded"
        assert redis.pttl(lock.name) > 0
        guard.check()  # not lost
    finally:
        sessions.release.set()
        guard.stop()
        lock.release()
