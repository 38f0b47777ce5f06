"""The job's guard: its lock renewal never waits for the database's heartbeat."""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import pytest
import sqlalchemy.exc
from redis import Redis

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


def test_a_renewal_on_a_silent_redis_link_fails_instead_of_waiting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The locks' Redis client has socket timeouts (`tasks.compose.lock_redis`): a renewal on
    a link gone silent raises (the guard logs it and tries again next beat) instead of waiting
    for good, as a client of redis-py 5 to 7 without a timeout does (redis-py 8 has one)."""
    import redis.exceptions
    from redis.connection import parse_url

    import tasks.compose
    from tests.support.faults import TcpProxy

    require_redis()
    server = parse_url(REDIS_URL)
    proxy = TcpProxy(server.get("host", "127.0.0.1"), int(server.get("port", 6379))).start()
    monkeypatch.setattr(tasks.compose, "LOCK_REDIS_TIMEOUT", 1.0)
    client = tasks.compose.lock_redis(f"redis://127.0.0.1:{proxy.port}/{int(server.get('db', 0))}")
    lock = TripLock(client, 10_000_000 + uuid.uuid4().int % 1_000_000, owner="silent", ttl=30)
    try:
        assert lock.acquire()
        proxy.silence()
        with pytest.raises(redis.exceptions.TimeoutError):
            lock.renew()
        assert lock.held  # not lost: tried again next beat
    finally:
        proxy.close()
        Redis.from_url(REDIS_URL).delete(lock.name)
