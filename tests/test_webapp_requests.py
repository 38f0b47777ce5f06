"""The web app's requests and its per-trip state on the backend's real tables (SQLite,
PostgreSQL, MariaDB): `aftertrip_client.request_trip` / `trip_state` on the app's own DB-API
connection (PyMySQL, psycopg, sqlite3), and the worker's side of the rows (`db.requests`,
`db.jobs`). The real worker and broker outages: tests/test_webapp_service.py."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session

from aftertrip_client import notify_worker, request_trip, trip_state
from db.jobs import fail_job, finish_job, mark_stalled_jobs, start_job
from db.models import Job, TripRequest
from db.requests import (
    claim_requests,
    has_open_requests,
    record_progress,
    trips_with_waiting_requests,
)
from db.types import utcnow
from tests.plugins.databases import add_trip
from tests.support.appdb import app_connection
from tests.support.faults import PrivateRedis
from tests.support.services import free_port

SEOUL = ZoneInfo("Asia/Seoul")


@pytest.fixture
def app_conn(db_url: str) -> Iterator[Any]:
    conn = app_connection(db_url)
    try:
        yield conn
    finally:
        conn.close()


@pytest.fixture
def trip_id(db_engine: Engine) -> int:
    with Session(db_engine) as session:
        trip = add_trip(session)
        session.commit()
        return trip.id


def open_rows(engine: Engine, trip_id: int) -> list[tuple[str, str | None]]:
    with Session(engine) as session:
        rows = session.execute(
            select(TripRequest.mode, TripRequest.claimed_by)
            .where(TripRequest.trip_id == trip_id)
            .order_by(TripRequest.id)
        ).all()
    return [tuple(row) for row in rows]  # type: ignore[misc]


def start(session: Session, trip_id: int, task_id: str, mode: str) -> Job:
    """The job row a worker records when it starts the task `task_id`."""
    return start_job(session=session, trip_id=trip_id, mode=mode, task_id=task_id, models=())


def seoul_now() -> datetime:
    return datetime.now(SEOUL).replace(tzinfo=None)


def test_a_request_commits_with_the_apps_transaction(
    db_engine: Engine, app_conn: Any, trip_id: int
) -> None:
    request_trip(trip_id, connection=app_conn)
    app_conn.rollback()  # the upload failed: no request either
    assert open_rows(db_engine, trip_id) == []
    assert trip_state(trip_id, app_conn).state == "never"
    before = seoul_now()
    request_trip(trip_id, "all", connection=app_conn)
    app_conn.commit()
    assert open_rows(db_engine, trip_id) == [("all", None)]
    state = trip_state(trip_id, app_conn)
    assert state.state == "queued" and state.busy
    # When it was asked, in the app's clock (Seoul, naive): not UTC, nine hours off.
    assert state.at is not None and state.at.tzinfo is None
    assert before - timedelta(seconds=5) <= state.at <= seoul_now() + timedelta(seconds=5)
    app_conn.commit()  # end the read transaction


def test_requests_refuse_bad_arguments_before_writing(app_conn: Any) -> None:
    with pytest.raises(ValueError, match="mode"):
        request_trip(1, "everything", connection=app_conn)
    with pytest.raises(ValueError, match="between 1 and"):
        request_trip(2**70, connection=app_conn)
    with pytest.raises(ValueError, match="between 1 and"):
        trip_state(0, app_conn)


def test_a_burst_is_taken_by_one_job_and_all_wins(
    db_engine: Engine, app_conn: Any, trip_id: int
) -> None:
    for mode in ("missing", "all", "missing"):
        request_trip(trip_id, mode, connection=app_conn)
        app_conn.commit()
    with Session(db_engine) as session:
        assert claim_requests(session=session, trip_id=trip_id, task_id="job-1") == "all"
        # The same task delivered again takes the same requests.
        assert claim_requests(session=session, trip_id=trip_id, task_id="job-1") == "all"
        start(session, trip_id, "job-1", "all")
        # Its job is alive: another task finds nothing open.
        assert claim_requests(session=session, trip_id=trip_id, task_id="job-2") is None
        assert not has_open_requests(session=session, trip_id=trip_id)
    request_trip(trip_id, connection=app_conn)  # arrives while job-1 runs
    app_conn.commit()
    with Session(db_engine) as session:
        assert has_open_requests(session=session, trip_id=trip_id)  # a follow-up is due
        job = session.scalars(select(Job).where(Job.celery_task_id == "job-1")).one()
        finish_job(session=session, job_id=job.id, counts={"photos": 0})
    # job-1's three requests ended with it; the new one waits for the follow-up.
    assert open_rows(db_engine, trip_id) == [("missing", None)]
    with Session(db_engine) as session:
        assert claim_requests(session=session, trip_id=trip_id, task_id="job-2") == "missing"


def test_trip_state_follows_a_job(db_engine: Engine, app_conn: Any, trip_id: int) -> None:
    request_trip(trip_id, connection=app_conn)
    app_conn.commit()
    with Session(db_engine) as session:
        claim_requests(session=session, trip_id=trip_id, task_id="job-a")
    # Taken, its job not started yet (models loading): still queued for the app.
    assert trip_state(trip_id, app_conn).state == "queued"
    app_conn.commit()
    with Session(db_engine) as session:
        job = start_job(
            session=session, trip_id=trip_id, mode="missing", task_id="job-a", models=()
        )
        record_progress(session=session, job_id=job.id, stage="analyze", done=3, total=10)
        job_id = job.id
    state = trip_state(trip_id, app_conn)
    app_conn.commit()
    assert (state.state, state.stage, state.done, state.total) == ("sorting", "analyze", 3, 10)
    assert state.percent == 27 and state.job_id == job_id and not state.queued_next
    request_trip(trip_id, "all", connection=app_conn)
    app_conn.commit()
    assert trip_state(trip_id, app_conn).queued_next
    app_conn.commit()
    with Session(db_engine) as session:
        finish_job(session=session, job_id=job_id, counts={"analyzed": 4, "folders": 2})
        finished = session.get(Job, job_id)
        assert finished is not None and finished.finished_at is not None
        finished_seoul = finished.finished_at.astimezone(SEOUL).replace(tzinfo=None)
    state = trip_state(trip_id, app_conn)
    app_conn.commit()
    assert state.state == "queued"  # the "all" that came meanwhile waits for its job
    with Session(db_engine) as session:
        session.execute(update(TripRequest).values(claimed_by="job-b"))
        session.commit()
        job_b = start(session, trip_id, "job-b", "all")
        finish_job(session=session, job_id=job_b.id, counts={"analyzed": 4, "folders": 2})
        finished = session.get(Job, job_b.id)
        assert finished is not None and finished.finished_at is not None
        finished_seoul = finished.finished_at.astimezone(SEOUL).replace(tzinfo=None)
    done = trip_state(trip_id, app_conn)
    app_conn.commit()
    assert (done.state, done.percent, done.counts) == ("done", 100, {"analyzed": 4, "folders": 2})
    assert done.at is not None and abs(done.at - finished_seoul) < timedelta(seconds=1)
    assert done.as_dict()["at"] == finished_seoul.isoformat(timespec="seconds")
    assert open_rows(db_engine, trip_id) == []


def test_a_failed_job_says_why_and_a_retrying_one_keeps_its_requests(
    db_engine: Engine, app_conn: Any, trip_id: int
) -> None:
    request_trip(trip_id, connection=app_conn)
    app_conn.commit()
    with Session(db_engine) as session:
        claim_requests(session=session, trip_id=trip_id, task_id="job-f")
        job = start_job(
            session=session, trip_id=trip_id, mode="missing", task_id="job-f", models=()
        )
        fail_job(session=session, job_id=job.id, error="S3Error: slow down", retrying=True)
    state = trip_state(trip_id, app_conn)
    app_conn.commit()
    assert state.state == "sorting" and state.error == "S3Error: slow down"
    assert open_rows(db_engine, trip_id) == [("missing", "job-f")]
    with Session(db_engine) as session:
        fail_job(session=session, job_id=job.id, error="TripNotFound: trip 9")
    failed = trip_state(trip_id, app_conn)
    app_conn.commit()
    assert (failed.state, failed.error) == ("failed", "TripNotFound: trip 9")
    assert open_rows(db_engine, trip_id) == []  # a failed request is not tried forever


def test_the_sweep_finds_requests_nobody_took(
    db_engine: Engine, app_conn: Any, trip_id: int
) -> None:
    request_trip(trip_id, connection=app_conn)
    app_conn.commit()
    with Session(db_engine) as session:
        assert trip_id not in trips_with_waiting_requests(session=session, grace_seconds=60)
        assert trip_id in trips_with_waiting_requests(session=session, grace_seconds=0)
        # Taken by a job that then stalled: given back, and swept again.
        claim_requests(session=session, trip_id=trip_id, task_id="job-s")
        job = start_job(
            session=session, trip_id=trip_id, mode="missing", task_id="job-s", models=()
        )
        assert trip_id not in trips_with_waiting_requests(session=session, grace_seconds=0)
        session.execute(
            update(Job).where(Job.id == job.id).values(heartbeat_at=utcnow() - timedelta(hours=1))
        )
        session.commit()
        assert mark_stalled_jobs(session=session, stall_seconds=60, trip_id=trip_id) == [job.id]
        assert trip_id in trips_with_waiting_requests(session=session, grace_seconds=0)
    assert open_rows(db_engine, trip_id) == [("missing", None)]


def test_a_broker_that_is_down_loses_no_request(
    db_engine: Engine, app_conn: Any, trip_id: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No Redis listens: the request is committed and the nudge gives up (logged, no raise)."""
    import aftertrip_client.trips as client_trips

    monkeypatch.setenv("AFTERTRIP_BROKER_URL", f"redis://127.0.0.1:{free_port()}/0")
    monkeypatch.setattr(client_trips, "_nudge_app", None)
    request_trip(trip_id, connection=app_conn)
    app_conn.commit()
    assert notify_worker(trip_id) is False
    assert open_rows(db_engine, trip_id) == [("missing", None)]
    monkeypatch.setattr(client_trips, "_nudge_app", None)


def test_the_sweep_queues_a_waiting_trip_once_and_not_while_its_job_runs(
    db_url: str, db_engine: Engine, app_conn: Any, trip_id: int, tmp_path: Path
) -> None:
    """`RequestSweep.sweep_once` with a private Redis for the trip locks."""
    from tasks.locks import trip_lock_name
    from tasks.settings import ServiceSettings
    from tasks.sweep import RequestSweep

    redis = PrivateRedis(tmp_path / "redis").start()
    try:
        settings = ServiceSettings(
            database_url=db_url, broker_url=redis.url(0), request_sweep_seconds=0.01
        )
        sent: list[int] = []
        sweep = RequestSweep(settings, send=sent.append)
        request_trip(trip_id, connection=app_conn)
        app_conn.commit()
        time.sleep(0.05)  # older than the sweep's grace
        redis.client().set(trip_lock_name(trip_id), "job-running 1")
        assert sweep.sweep_once() == [] and sent == []  # its running job follows up
        redis.client().delete(trip_lock_name(trip_id))
        assert sweep.sweep_once() == [trip_id] and sent == [trip_id]
        assert sweep.sweep_once() == []  # not again while its message may be on its way
        redis.stop()  # the locks' Redis down: the round fails, logged, nothing raised
        assert RequestSweep(settings, send=sent.append).sweep_once() == []
        assert sent == [trip_id]
    finally:
        redis.stop()
