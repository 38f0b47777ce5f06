"""The web app's side against a real worker, on the backend's real tables (MariaDB and
PostgreSQL): a broker outage while the app asks, a burst of requests, progress per trip.

The app's part runs as the app runs it: `aftertrip_client.request_trip` on the app's own
DB-API connection (PyMySQL, psycopg), its commit, `notify_worker`, and `trip_state` polled on
that connection. The worker is a real `celery worker` (tests.support.services.start_worker)
on a private `redis-server` that the test stops and starts, a queue of its own and a fresh
database, so the module runs beside anything else (pytest-xdist included).
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

import aftertrip_client.trips as client_trips
from aftertrip_client import TripState, notify_worker, request_trip, trip_state
from db.models import Job, TripRequest
from db.session import make_engine
from db.webapp import Photo
from storage import S3Store
from tests.plugins.databases import (
    add_trip,
    fresh_database,
    load_webapp_schema,
    require_webapp_schema,
)
from tests.plugins.s3 import moto_client
from tests.support.appdb import app_connection
from tests.support.faults import PrivateRedis
from tests.support.services import (
    no_face_jpeg,
    start_worker,
    stop_process,
    tail,
    worker_environment,
)

pytestmark = [pytest.mark.services, pytest.mark.timeout(600)]

SWEEP_SECONDS = 1
SETTLE_SECONDS = 3
JOB_TIMEOUT = 120.0


@dataclass
class Stack:
    backend: str
    db_url: str
    engine: Engine
    redis: PrivateRedis
    bucket: str
    moto_endpoint: str
    queue: str
    log: Path
    holds: Path  # AFTERTRIP_TEST_HOLD_DIR of the worker (tests.support.servicehooks)


@pytest.fixture(
    scope="module",
    params=[pytest.param("mariadb", id="mariadb"), pytest.param("postgresql", id="postgresql")],
)
def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, moto_endpoint: str
) -> Iterator[Stack]:
    """The app's real tables + the worker's migrations, a private Redis, a bucket, a queue, a
    real worker sweeping every second; the client in this process pointed at them."""
    backend = str(request.param)
    dump = require_webapp_schema(backend)
    tmp = tmp_path_factory.mktemp(f"webapp-{backend}")
    redis = PrivateRedis(tmp / "redis").start()
    saved = {k: os.environ.get(k) for k in ("AFTERTRIP_BROKER_URL", "AFTERTRIP_QUEUE")}
    try:
        with fresh_database(backend, tmp) as db_url:
            load_webapp_schema(db_url, dump)
            from db.session import upgrade

            upgrade(db_url)
            bucket = f"aftertrip-webapp-{uuid.uuid4().hex[:10]}"
            moto_client(moto_endpoint).create_bucket(Bucket=bucket)
            queue = f"faces-webapp-{uuid.uuid4().hex[:8]}"
            env = worker_environment(
                db_url=db_url,
                bucket=bucket,
                s3_endpoint=moto_endpoint,
                queue=queue,
                tmp=tmp,
                broker_url=redis.url(0),
                result_backend=redis.url(1),
                request_sweep_seconds=str(SWEEP_SECONDS),
                # A burst is one job if no request comes for this long: wide enough that a
                # slow machine making the five requests of a test still makes them in one.
                request_settle_seconds=str(SETTLE_SECONDS),
                threads="1",
                test_hold_dir=str(tmp / "holds"),
            )
            (tmp / "holds").mkdir()
            log = tmp / "worker.log"
            worker = start_worker(env, log, queue=queue, name=f"webapp-{backend}")
            # The app's settings: the client reads them from the environment (or Django's).
            os.environ["AFTERTRIP_BROKER_URL"] = redis.url(0)
            os.environ["AFTERTRIP_QUEUE"] = queue
            client_trips._nudge_app = None
            engine = make_engine(db_url)
            try:
                yield Stack(
                    backend, db_url, engine, redis, bucket, moto_endpoint, queue, log, tmp / "holds"
                )
            finally:
                redis.start()  # a worker waiting on a broker that is down stops slowly
                stop_process(worker)
                engine.dispose()
    finally:
        client_trips._nudge_app = None
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        redis.stop()


def add_photo_trip(stack: Stack, photos: list[bytes]) -> int:
    """A trip with these photos in the bucket and in photos_photo (as the app's upload)."""
    store = S3Store(stack.bucket, client=moto_client(stack.moto_endpoint))
    with Session(stack.engine) as session:
        trip = add_trip(session)
        for n, data in enumerate(photos):
            photo = Photo(trip_id=trip.id, file_key=uuid.uuid4(), file_name=f"{n}.jpg", url="")
            session.add(photo)
            session.flush()
            store.write(photo.s3_key, data, "image/jpeg")
        session.commit()
        return trip.id


@pytest.fixture
def app_conn(stack: Stack) -> Iterator[Any]:
    """The app's connection; autocommit, as Django's is outside a transaction."""
    conn = app_connection(stack.db_url, autocommit=True)
    try:
        yield conn
    finally:
        conn.close()


def wait_for_state(
    stack: Stack, conn: Any, trip_id: int, done: Any, timeout: float = JOB_TIMEOUT
) -> list[TripState]:
    """Poll `trip_state` (as a progress page does) until `done(state)`; every state seen."""
    seen: list[TripState] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = trip_state(trip_id, conn)
        if not seen or state != seen[-1]:
            seen.append(state)
        if done(state):
            return seen
        time.sleep(0.05)
    raise AssertionError(f"trip {trip_id} never got there: {seen[-5:]}\n{tail(stack.log)}")


def jobs_of(stack: Stack, trip_id: int) -> list[Job]:
    with Session(stack.engine) as session:
        return list(session.scalars(select(Job).where(Job.trip_id == trip_id).order_by(Job.id)))


def open_requests(stack: Stack, trip_id: int) -> int:
    with Session(stack.engine) as session:
        rows = session.scalars(select(TripRequest.id).where(TripRequest.trip_id == trip_id))
        return len(list(rows))


def test_a_request_made_while_redis_is_down_is_carried_out_when_it_is_back(
    stack: Stack, app_conn: Any, yaoming_jpg: bytes
) -> None:
    trip_id = add_photo_trip(stack, [yaoming_jpg, yaoming_jpg, no_face_jpeg()])
    stack.redis.stop()
    try:
        # What the app's upload does: the request in its transaction, the nudge after it.
        request_trip(trip_id, connection=app_conn)
        nudged = notify_worker(trip_id)
        # The nudge gave up on the broker instead of waiting for it; the request is kept.
        assert nudged is False
        assert open_requests(stack, trip_id) == 1
        assert trip_state(trip_id, app_conn).state == "queued"
    finally:
        stack.redis.start()
    # Nobody asks again: the worker's sweep finds the request once Redis is back.
    seen = wait_for_state(stack, app_conn, trip_id, lambda s: not s.busy)
    final = seen[-1]
    assert final.state == "done", (final, tail(stack.log))
    assert final.counts is not None and final.counts["analyzed"] == 3
    assert open_requests(stack, trip_id) == 0
    assert [job.status for job in jobs_of(stack, trip_id)] == ["succeeded"]


def test_five_requests_within_a_second_run_at_most_two_jobs(
    stack: Stack, app_conn: Any, yaoming_jpg: bytes, gdp_jpg: bytes
) -> None:
    trip_id = add_photo_trip(stack, [yaoming_jpg, gdp_jpg, yaoming_jpg, no_face_jpeg()])
    for mode in ("missing", "missing", "all", "missing", "missing"):
        request_trip(trip_id, mode, connection=app_conn)
        notify_worker(trip_id)
        time.sleep(0.1)
    wait_for_state(
        stack,
        app_conn,
        trip_id,
        lambda s: not s.busy and open_requests(stack, trip_id) == 0,
    )
    jobs = jobs_of(stack, trip_id)
    # Every request is closed, so no later message can start another job.
    assert 1 <= len(jobs) <= 2, [(j.id, j.mode, j.status) for j in jobs]
    assert all(job.status == "succeeded" for job in jobs), tail(stack.log)
    assert "all" in [job.mode for job in jobs]  # "all" won where it was coalesced


def held(stack: Stack, prefix: str) -> bool:
    return any(stack.holds.glob(f"{prefix}-*"))


def test_progress_per_trip_moves_from_queued_through_sorting_to_done(
    stack: Stack, app_conn: Any, yaoming_jpg: bytes, gdp_jpg: bytes, players_jpg: bytes
) -> None:
    """The job is held where the test looks (tests.support.servicehooks): as its photos'
    analysis starts, then after its first batch of 16 of its 20 photos is stored."""
    trip_id = add_photo_trip(stack, [yaoming_jpg, gdp_jpg, players_jpg, no_face_jpeg()] * 5)
    request_trip(trip_id, connection=app_conn)
    assert trip_state(trip_id, app_conn).state == "queued"  # asked, not nudged yet
    (stack.holds / "hold").touch()
    (stack.holds / "hold-batch").touch()
    try:
        assert notify_worker(trip_id) is True
        seen = wait_for_state(stack, app_conn, trip_id, lambda s: held(stack, "held"))
        started = wait_for_state(stack, app_conn, trip_id, lambda s: s.state == "sorting")
        assert started[-1].percent == 0
        (stack.holds / "hold").unlink()
        seen += started
        seen += wait_for_state(stack, app_conn, trip_id, lambda s: held(stack, "held-batch"))
        # Held after 16 photos: what the page shows now is part way through the photos.
        part = trip_state(trip_id, app_conn)
        seen.append(part)
        assert part.state == "sorting" and part.stage == "analyze", part
        assert 0 < part.percent < 90 and part.total == 20, part
    finally:
        for name in ("hold", "hold-batch"):
            (stack.holds / name).unlink(missing_ok=True)
    seen += wait_for_state(stack, app_conn, trip_id, lambda s: not s.busy)
    states = [s.state for s in seen]
    assert states[0] == "queued" and states[-1] == "done", states
    sorting = [s.percent for s in seen if s.state == "sorting"]
    assert sorting == sorted(sorting), sorting  # never backwards
    assert len(set(sorting)) >= 2, seen  # the percentage moved
    final = seen[-1]
    assert final.percent == 100 and final.counts is not None and final.counts["analyzed"] == 20
