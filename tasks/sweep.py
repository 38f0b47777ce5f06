"""The sweep of the web app's requests whose nudge was lost: the broker was down when the
app asked, so no `take_requests` message exists for them.

A daemon thread in each worker's main process (started when the worker is ready; Celery beat
is not assumed) looks every AFTERTRIP_REQUEST_SWEEP_SECONDS, and once at start-up, for trips
with a request that no job has taken for that long (`db.requests.trips_with_waiting_requests`)
and queues `take_requests` for each, skipping trips whose lock is held (their running job
follows up when it ends). A trip is queued again only after `RESEND_SECONDS` (its message may
still be waiting behind other jobs). A database or broker that is down is logged once per
outage and tried again on the next round. Several workers sweeping send duplicates, which are
harmless: `take_requests` claims under the trip's lock, and a second one finds nothing open.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import ClassVar

from sqlalchemy.pool import NullPool

from db.requests import trips_with_waiting_requests
from db.session import make_sessionmaker
from tasks.locks import trip_lock_name
from tasks.settings import ServiceSettings

logger = logging.getLogger(__name__)

RESEND_SECONDS = 60.0
"""A trip queued by the sweep is not queued again by it for this long."""


class RequestSweep:
    """The sweep thread of this process (at most one: `start_once`)."""

    _running: ClassVar[RequestSweep | None] = None
    _lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, settings: ServiceSettings, send: Callable[[int], None]) -> None:
        self.settings = settings
        self.send = send
        self.interval = settings.request_sweep_seconds
        self._stop = threading.Event()
        self._sent: dict[int, float] = {}
        self._failing = False
        # Its own engine without a pool: nothing of it is inherited by a pool process
        # forked later, and an idle worker holds no connection for it.
        self._sessions = make_sessionmaker(settings.database_engine(poolclass=NullPool))
        self._thread = threading.Thread(
            target=self._run, name="aftertrip-request-sweep", daemon=True
        )

    @classmethod
    def start_once(cls, settings: ServiceSettings, send: Callable[[int], None]) -> None:
        """Start the process's sweep unless it runs or AFTERTRIP_REQUEST_SWEEP_SECONDS is 0."""
        if settings.request_sweep_seconds <= 0:
            return
        with cls._lock:
            if cls._running is None:
                cls._running = cls(settings, send)
                cls._running._thread.start()

    @classmethod
    def stop_running(cls) -> None:
        """Stop the process's sweep (worker shutdown)."""
        with cls._lock:
            if cls._running is not None:
                cls._running._stop.set()
                cls._running = None

    def _run(self) -> None:
        while True:
            self.sweep_once()
            if self._stop.wait(self.interval):
                return

    def sweep_once(self) -> list[int]:
        """One round: queue the trips whose requests wait; returns those queued."""
        try:
            with self._sessions() as session:
                trips = trips_with_waiting_requests(session=session, grace_seconds=self.interval)
            now = time.monotonic()
            due = [t for t in trips if now - self._sent.get(t, -RESEND_SECONDS) >= RESEND_SECONDS]
            queued = []
            for trip_id in self._not_busy(due):
                self.send(trip_id)
                self._sent[trip_id] = now
                queued.append(trip_id)
        except Exception as exc:  # database or broker down: the next round tries again
            if not self._failing:
                logger.warning(
                    "request sweep failed (tried again every %.0f s): %s", self.interval, exc
                )
            self._failing = True
            return []
        if self._failing:
            logger.info("request sweep works again")
        self._failing = False
        self._sent = {t: at for t, at in self._sent.items() if now - at < RESEND_SECONDS}
        if queued:
            logger.info("requests queued by the sweep", extra={"trips": queued})
        return queued

    def _not_busy(self, trips: list[int]) -> list[int]:
        """Those of `trips` whose lock no job holds (one Redis connection for the round)."""
        if not trips:
            return []
        from redis import Redis

        redis = Redis.from_url(self.settings.effective_lock_url, socket_connect_timeout=2)
        try:
            return [t for t in trips if not redis.exists(trip_lock_name(t))]
        finally:
            redis.close()
