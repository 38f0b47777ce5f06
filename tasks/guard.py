"""What watches a running job: its heartbeat, its trip lock and its soft time limit.

`JobGuard` runs two daemon threads that, every `heartbeat_seconds`, renew the trip's lock (and
chunk leases) and the job row's `heartbeat_at`; an outage of either is logged and tried again on
the next beat. Two threads, so that one store's stall never starves the other: a database beat
that waited out its timeouts (a silent connection: the statement timeout, then the connect
timeout, 70 s with the defaults) used to hold the lock's renewal too, and the lock (six beats,
60 s) lapsed under a job still running. The job calls `check()` between photos: it raises
`JobTimedOut` once Celery's soft time limit has struck, and `TripLockLost` once the trip's
lock is held by another job, so a job that lost its turn never writes.

The soft time limit arrives as SIGUSR1, which billiard turns into `SoftTimeLimitExceeded`
wherever the job's thread happens to be: inside one photo's analysis, where the pipeline
would record it as that photo's error. `tasks.trip.install_soft_limit_handler` records the
signal in `SOFT_LIMIT` first, so the job ends as timed out instead of calling the photo broken.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import redis.exceptions
import sqlalchemy.exc
from sqlalchemy.orm import Session, sessionmaker

from db.jobs import beat_job, mark_stalled_jobs
from tasks.locks import Lease, TripLock
from worker.errors import AfterTripError

logger = logging.getLogger(__name__)


class JobTimedOut(AfterTripError):
    """The job ran past AFTERTRIP_TASK_SOFT_TIME_LIMIT; the photos it stored are kept and the
    next job of the trip continues from there."""


class TripLockLost(AfterTripError):
    """Another job holds the trip's lock now (this one could not renew it in time): this job
    stops before writing and is retried."""


class _SoftLimit:
    """Whether the soft time limit struck during the current job of this process (set by
    the signal handler `tasks.trip.install_soft_limit_handler` installs)."""

    def __init__(self) -> None:
        self.hit = False
        self.installed = False


SOFT_LIMIT = _SoftLimit()


class JobGuard:
    """Heartbeat, lock renewal and stop checks of one job run."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        *,
        heartbeat_seconds: float,
        stall_seconds: float,
        lock: TripLock | None = None,
        soft_time_limit: int | None = None,
    ) -> None:
        self.sessions = sessions
        self.heartbeat_seconds = heartbeat_seconds
        self.stall_seconds = stall_seconds
        self.lock = lock
        self.soft_time_limit = soft_time_limit
        self.job_id: int | None = None
        self.leases: list[Lease] = []  # chunk leases held now, renewed like the lock
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        SOFT_LIMIT.hit = False

    def take_over_stalled(self, *, trip_id: int, task_id: str | None) -> list[int]:
        """Mark the trip's other `running` jobs whose heartbeat stopped as failed."""
        with self.sessions() as session:
            return mark_stalled_jobs(
                session=session,
                stall_seconds=self.stall_seconds,
                trip_id=trip_id,
                keep_task_id=task_id,
            )

    def start(self, job_id: int | None = None) -> None:
        """Beat until `stop()`: the leases from now on, the job row's heartbeat once `job_id`
        is given (call again with it when the row exists; the same threads go on), each on
        its own thread.

        The Celery task starts the beat as soon as it holds the trip's lock: loading the
        models on a pool process's first job takes seconds, more than the lock lives
        unrenewed on a busy machine (1 s beats, a 6 s lock, 7 s of loading under load), and a
        lock that lapsed then could go to another delivery of the same job."""
        if job_id is not None:
            self.job_id = job_id
        self.beat()
        if self._threads:
            return
        self._threads = [
            threading.Thread(target=self._every_beat, args=(action,), name=name, daemon=True)
            for action, name in (
                (self.renew_leases, "leases"),
                (self.record_heartbeat, "heartbeat"),
            )
        ]
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        """End the heartbeat (the lock is released by its owner)."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=self.heartbeat_seconds + 10)

    def _every_beat(self, action: Callable[[], None]) -> None:
        while not self._stop.wait(self.heartbeat_seconds):
            action()

    def beat(self) -> None:
        """Renew the lock and the row's heartbeat once; outages are logged, not raised."""
        self.renew_leases()
        self.record_heartbeat()

    def renew_leases(self) -> None:
        """Renew the trip's lock and the chunk leases once (Redis); outages are logged."""
        for lease in [self.lock, *self.leases]:
            if lease is None or not lease.held:
                continue
            try:
                lease.renew()
            except redis.exceptions.RedisError as exc:
                logger.warning("%s not renewed (tried again next beat): %s", lease.name, exc)

    def record_heartbeat(self) -> None:
        """Record the row's heartbeat once (the database); outages are logged."""
        if self.job_id is not None:
            try:
                with self.sessions() as session:
                    beat_job(session=session, job_id=self.job_id)
            except sqlalchemy.exc.SQLAlchemyError as exc:
                logger.warning("job heartbeat not recorded (tried again next beat): %s", exc)

    @property
    def timed_out(self) -> bool:
        """Whether the soft time limit struck during this job."""
        return SOFT_LIMIT.hit

    def timeout_error(self) -> JobTimedOut:
        """The error that ends a job past its soft time limit."""
        limit = f"{self.soft_time_limit} s" if self.soft_time_limit else "its soft time limit"
        return JobTimedOut(
            f"the job ran past {limit} (AFTERTRIP_TASK_SOFT_TIME_LIMIT) and stopped; the "
            "photos it analysed are kept: queue the trip again to continue, or raise the limit"
        )

    def check(self) -> None:
        """Raise if the job must stop now: past its soft time limit, or its lock lost."""
        if SOFT_LIMIT.hit:
            raise self.timeout_error()
        if self.lock is not None and not self.lock.held:
            raise TripLockLost(
                f"the lock of trip {self.lock.trip_id} went to another job; this one stops "
                "before writing and is retried"
            )
