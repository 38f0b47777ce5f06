"""Minutes-long outages through a real worker (issue 20): Redis down 5 minutes, PostgreSQL
silent 5 minutes, an S3 body stalled mid-read.

    python -m pytest -m soak -v -o log_cli=true --log-cli-level=INFO   # ~6 minutes each

Each test runs one real `celery worker` on a stack of its own (tests/support/faults.py:
private Redis, the shared PostgreSQL and a moto S3 server behind proxies), holds a six-photo
trip's job once it holds its lock and its `running` row (tests/support/servicehooks.py),
injects the fault and lets the job go. Every job must end succeeded once: one job row, every
photo analysed once, no row left `running`, no trip lock left, no message left unacknowledged
in the broker. Each test logs its own times (outage, time to notice, time to finish) for
docs/reliability.md; none asserts on them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.faults import FaultStack, FaultWorker, fault_stack
from tests.support.services import wait_for

pytestmark = [
    pytest.mark.services,
    pytest.mark.faults,
    pytest.mark.soak,
    pytest.mark.timeout(1500),
]

logger = logging.getLogger(__name__)

OUTAGE_SECONDS = 300.0
# Redis comes back between two of the worker's reconnection tries (2 s to 30 s apart, so one
# falls at 300 s after the loss): the job stores its outcome and is acknowledged before the
# worker's consumer has reconnected, which must not matter.
REDIS_OUTAGE_SECONDS = OUTAGE_SECONDS + 15
JOB_TIMEOUT = 600.0


@dataclass
class Outage:
    """A stack of the test's own, the folder of the hold hook and the trip's photos."""

    stack: FaultStack
    hold: Path
    photos: list[tuple[str, bytes | None]]
    worker: FaultWorker | None = None

    def start_worker(self, **env: str) -> FaultWorker:
        self.worker = self.stack.start_worker(
            name="outages",
            # heartbeats each second: the lock is renewed (or found gone) every second
            AFTERTRIP_HEARTBEAT_SECONDS="1",
            AFTERTRIP_TEST_HOLD_DIR=str(self.hold),
            # retried within the default 900 s budget, at most 5 s apart (the test's pace)
            AFTERTRIP_TASK_RETRY_BACKOFF_MAX="5",
            AFTERTRIP_CHUNK_PHOTOS="0",
            **env,
        )
        return self.worker

    def log(self) -> str:
        return self.worker.text() if self.worker is not None else ""

    def held_job(self) -> tuple[Any, int]:
        """A new trip whose job is held by the hook (lock taken, row `running`)."""
        return self.stack.held_job(self.hold, self.photos, timeout=JOB_TIMEOUT)

    def release(self) -> None:
        (self.hold / "hold").unlink(missing_ok=True)

    def check_completed_once(self, trip_id: int, result: dict[str, Any]) -> Any:
        return self.stack.assert_completed_once(trip_id, result, len(self.photos))


@pytest.fixture
def outage(tmp_path: Path, yaoming_jpg: bytes, gdp_jpg: bytes) -> Iterator[Outage]:
    hold = tmp_path / "hold"
    hold.mkdir()
    # six photos, three of each person: gdp.jpg (109 kB) is read over several socket reads
    photos: list[tuple[str, bytes | None]] = [
        (f"{name}-{n}.jpg", data)
        for n in range(3)
        for name, data in (("yaoming", yaoming_jpg), ("gdp", gdp_jpg))
    ]
    with fault_stack(tmp_path / "stack") as stack:
        try:
            yield Outage(stack, hold, photos)
        finally:
            (hold / "hold").unlink(missing_ok=True)


def _finished_while(stack: FaultStack, trip_id: int, until: float, since: float) -> float | None:
    """Sleep until `until` (monotonic); the seconds after `since` at which the trip's job row
    ended meanwhile (read directly from the database), or None."""
    finished: float | None = None
    while time.monotonic() < until:
        if finished is None and stack.job_finished(trip_id):
            finished = time.monotonic() - since
        time.sleep(min(1.0, max(0.0, until - time.monotonic())))
    return finished


def test_redis_down_5_minutes_mid_job(outage: Outage) -> None:
    """Broker, result backend and trip lock (one `redis-server`) stopped for 5 minutes and
    15 s while the job runs: held for the first half (its lock's renewals fail each beat), the
    job then goes on without Redis (progress skipped at once), ends, waits with its outcome
    until Redis is back, and ends succeeded once, acknowledged."""
    outage.start_worker()
    stack = outage.stack
    pending, trip_id = outage.held_job()
    down = time.monotonic()
    stack.redis.stop()  # SIGTERM: the append-only file keeps the queue, as a real broker's
    time.sleep(OUTAGE_SECONDS / 2)  # the job holds its row and (in its own eyes) its lock
    outage.release()
    row_done = _finished_while(stack, trip_id, down + REDIS_OUTAGE_SECONDS, down)
    stack.redis.start()
    back_at = time.time()
    back = time.monotonic()
    result = stack.wait(pending, timeout=JOB_TIMEOUT)
    seen = time.monotonic() - back
    job = outage.check_completed_once(trip_id, result)
    assert job.attempts == 1, (job.attempts, outage.log()[-4000:])
    log = outage.log()
    logger.info(
        "redis came back at %s (the worker log's clock)",
        time.strftime("%H:%M:%S", time.localtime(back_at)),
    )
    logger.info(
        "redis down %.0f s mid-job (job released %.0f s in): job row succeeded %s s into "
        "the outage; success seen by "
        "the client %.1f s after redis came back; %d progress writes skipped, %d lock "
        "renewals failed; attempts %d",
        back - down,
        OUTAGE_SECONDS / 2,
        f"{row_done:.0f}" if row_done is not None else "after the outage,",
        seen,
        log.count("progress not reported"),
        log.count("not renewed"),
        job.attempts,
    )
    # the worker takes new jobs after the outage
    again = stack.wait(stack.enqueue(trip_id), timeout=JOB_TIMEOUT)
    assert again["analyzed"] == 0
    stack.assert_settled(trip_id)


def test_postgres_silent_5_minutes_mid_job(outage: Outage) -> None:
    """The worker's link to PostgreSQL goes silent for 5 minutes: its open connections pass
    no byte and are never reset (for good: a NAT that forgot them), and new connections hang
    (accepted, never answered) until the link is back. The default timeouts
    (AFTERTRIP_DATABASE_STATEMENT_TIMEOUT 60 s, AFTERTRIP_DATABASE_CONNECT_TIMEOUT 10 s) notice
    it; the job retries within its budget and ends succeeded once after the database is back."""
    outage.start_worker()
    stack = outage.stack
    pending, trip_id = outage.held_job()
    retries = outage.log().count("will be retried")
    silent = time.monotonic()
    stack.postgres.silence()  # the connections open now: silent for good
    stack.postgres.freeze()  # new ones: accepted, never answered, until restore()
    outage.release()
    wait_for(
        lambda: "AFTERTRIP_DATABASE_STATEMENT_TIMEOUT" in outage.log(),
        f"the watchdog to break the silent statement\n{outage.log()[-4000:]}",
        timeout=OUTAGE_SECONDS,
    )
    noticed = time.monotonic() - silent
    wait_for(
        lambda: outage.log().count("will be retried") > retries,
        f"the job to retry\n{outage.log()[-4000:]}",
        timeout=OUTAGE_SECONDS,
    )
    retried = time.monotonic() - silent
    assert not pending.ready()
    _finished_while(stack, trip_id, silent + OUTAGE_SECONDS, silent)
    stack.postgres.restore()
    back = time.monotonic()
    result = stack.wait(pending, timeout=JOB_TIMEOUT)
    finished = time.monotonic() - back
    job = outage.check_completed_once(trip_id, result)
    assert job.attempts >= 2, job.attempts
    log = outage.log()
    logger.info(
        "postgres silent %.0f s mid-job: noticed (a statement broken by the watchdog) %.1f s "
        "in, first retry %.1f s in; %d retries, %d statements broken; succeeded %.1f s after "
        "the link came back, attempts %d",
        back - silent,
        noticed,
        retried,
        log.count("will be retried") - retries,
        log.count("AFTERTRIP_DATABASE_STATEMENT_TIMEOUT"),
        finished,
        job.attempts,
    )


S3_READ_TIMEOUT = 5


def test_s3_body_stalled_mid_read(outage: Outage) -> None:
    """The S3 proxy stops forwarding in the middle of a GetObject body (the first answer
    over 32 kB: a gdp.jpg body) and never resets it. With AFTERTRIP_S3_READ_TIMEOUT=5 (30 s by
    default) the read fails after 5 s and that photo is read again; the job is not retried."""
    outage.start_worker(AFTERTRIP_S3_READ_TIMEOUT=str(S3_READ_TIMEOUT))
    stack = outage.stack
    pending, trip_id = outage.held_job()
    stack.s3.stall_next_response(after=32 * 1024)
    released = time.monotonic()
    outage.release()
    wait_for(lambda: "S3 read of" in outage.log(), "the stalled read to be tried again", 120)
    read_again = time.monotonic()
    result = stack.wait(pending, timeout=JOB_TIMEOUT)
    finished = time.monotonic() - released
    assert stack.s3.stalled_at is not None, "a body stalled"
    job = outage.check_completed_once(trip_id, result)
    assert job.attempts == 1, (job.attempts, outage.log()[-4000:])  # one photo, not the job
    log = outage.log()
    assert log.count("S3 read of") == 1, log[-4000:]
    assert "will be retried" not in log
    logger.info(
        "s3 body stalled mid-read: the read failed and was tried again %.1f s after the "
        "stall (AFTERTRIP_S3_READ_TIMEOUT=%d); the job succeeded %.1f s after its release, "
        "attempts %d",
        read_again - stack.s3.stalled_at,
        S3_READ_TIMEOUT,
        finished,
        job.attempts,
    )
