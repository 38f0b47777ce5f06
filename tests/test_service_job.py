"""The grouping job's body without Celery (`tasks.job.run_trip_job`): the embedded path on
SQLite with a local photo folder, failures that keep previous results, and a retry."""

from __future__ import annotations

import os
import re
import signal
from datetime import timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

from db.jobs import find_queued_or_running_job
from db.models import Face, Job
from db.session import make_sessionmaker
from db.webapp import NO_FACE_TAG_ID, Photo, PhotoTagFace
from storage import LocalStore, TransientStorageError
from storage.errors import StorageError
from tasks.analyze import thumbnail_key
from tasks.guard import JobGuard, JobTimedOut
from tasks.job import InvalidJobArguments, run_trip_job
from tasks.retry import RETRYABLE_ERRORS
from tasks.settings import ServiceSettings
from tests.plugins.databases import add_trip
from worker.images import decode_image

# The embedded path runs on SQLite; the Celery path is tested on the servers (test_service.py).
pytestmark = pytest.mark.parametrize("db_backend", ["sqlite"])


@pytest.fixture(scope="module")
def pipeline():  # noqa: ANN201 - FacePipeline, loaded once for the module
    from worker.pipeline import FacePipeline

    return FacePipeline(ServiceSettings(detector="scrfd", device="cpu", threads=2))


class FlakyStore(LocalStore):
    """A folder whose reads time out while `down` (as S3 does when it throttles)."""

    down = False

    def read(self, key: str) -> bytes:
        if self.down:
            raise TransientStorageError(key, "SlowDown: please reduce your request rate")
        return super().read(key)


def _trip_with_photos(
    db_url: str, store: LocalStore, photos: list[tuple[str, bytes]]
) -> tuple[Engine, sessionmaker[Session], int, list[str]]:
    """A trip whose photos (file name, bytes) are rows and files in `store`."""
    from db.session import make_engine

    engine = make_engine(db_url)
    sessions = make_sessionmaker(engine)
    with sessions() as session:
        trip = add_trip(session)
        rows = []
        for name, data in photos:
            photo = Photo(trip_id=trip.id, file_name=name, url="")
            session.add(photo)
            session.flush()
            store.write(photo.s3_key, data)
            rows.append(photo)
        session.commit()
        return engine, sessions, trip.id, [photo.s3_key for photo in rows]


def _links(sessions, trip_id: int) -> set[tuple[int, int]]:  # noqa: ANN001
    with sessions() as session:
        rows = session.execute(
            select(PhotoTagFace.photo_id, PhotoTagFace.tagface_id)
            .join(Photo)
            .where(Photo.trip_id == trip_id)
        ).all()
        return {(photo_id, tag_id) for photo_id, tag_id in rows}


def _scrfd_job(  # noqa: ANN001
    sessions, store, pipeline, trip_id: int, settings: ServiceSettings | None = None, **kwargs: Any
) -> dict[str, Any]:
    """`run_trip_job` on a trip with the module's pipeline (SCRFD's settings unless given)."""
    return run_trip_job(
        sessions=sessions,
        store=store,
        pipeline=pipeline,
        settings=settings or ServiceSettings(detector="scrfd"),
        trip_id=trip_id,
        **kwargs,
    )


def test_failed_job_keeps_previous_results_and_retry_reuses_its_row(
    db_url: str,
    tmp_path: Path,
    pipeline,  # noqa: ANN001
    players_jpg: bytes,
    yaoming_jpg: bytes,
) -> None:
    store = FlakyStore(tmp_path / "photos")
    settings = ServiceSettings(detector="scrfd", photo_root=tmp_path / "photos")
    engine, sessions, trip_id, keys = _trip_with_photos(
        db_url, store, [("players.jpg", players_jpg), ("yaoming.jpg", yaoming_jpg)]
    )
    first_key = keys[0]

    def run(mode: str, task_id: str, retries_left: bool = False) -> dict:
        return _scrfd_job(
            sessions,
            store,
            pipeline,
            trip_id,
            settings,
            mode=mode,
            task_id=task_id,
            will_retry=lambda exc: retries_left and isinstance(exc, RETRYABLE_ERRORS),
        )

    def status(task_id: str) -> tuple[str, str, bool]:
        with sessions() as session:
            job = session.scalars(select(Job).where(Job.celery_task_id == task_id)).one()
            return job.status, job.error or "", job.finished_at is not None

    first = run("missing", "task-1")
    assert first["analyzed"] == 2 and first["people"] >= 1
    before = _links(sessions, trip_id)
    assert before and all(tag != NO_FACE_TAG_ID for _photo, tag in before)
    assert store.read(thumbnail_key("faces/", trip_id, first_key, 0))

    store.down = True
    with pytest.raises(TransientStorageError):
        run("all", "task-2", retries_left=True)
    state, error, finished = status("task-2")
    # A retry is coming: the row says so, and a second request is not enqueued beside it.
    assert state == "retrying" and "SlowDown" in error and not finished
    with sessions() as session:
        assert find_queued_or_running_job(session=session, trip_id=trip_id) is not None
    assert _links(sessions, trip_id) == before, "a failed job leaves the folders as they were"

    store.down = False  # Celery retries the same task id with backoff; now S3 answers
    retried = run("all", "task-2")
    assert retried["analyzed"] == 2
    with sessions() as session:
        job = session.scalars(select(Job).where(Job.celery_task_id == "task-2")).one()
        assert job.status == "succeeded" and job.attempts == 2 and job.error is None
    assert _links(sessions, trip_id) == before

    # The last attempt's transient error, with no retry left, fails the job.
    store.down = True
    with pytest.raises(TransientStorageError):
        run("all", "task-3", retries_left=False)
    state, error, finished = status("task-3")
    assert state == "failed" and "SlowDown" in error and finished
    engine.dispose()


def test_unknown_trip_and_mode_are_refused(
    db_url: str,
    tmp_path: Path,
    pipeline,  # noqa: ANN001
) -> None:
    from db.common import TripNotFound
    from db.session import make_engine

    engine = make_engine(db_url)
    sessions = make_sessionmaker(engine)
    kwargs = dict(
        sessions=sessions,
        store=LocalStore(tmp_path),
        pipeline=pipeline,
        settings=ServiceSettings(),
    )
    with pytest.raises(TripNotFound):
        run_trip_job(trip_id=999_999, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="mode"):
        run_trip_job(trip_id=1, mode="some", **kwargs)  # type: ignore[arg-type]
    # JSON brings floats, strings and booleans too: refused before the database is read
    for bad in (1.5, "3", True, None):
        with pytest.raises(InvalidJobArguments, match="trip_id must be an integer"):
            run_trip_job(trip_id=bad, **kwargs)  # type: ignore[arg-type]
    # ... and integers no bigint id can be (2**70 used to fail in the database).
    for bad in (0, -2, 2**63, 2**70, -(2**70)):
        with pytest.raises(InvalidJobArguments, match=r"between 1 and 9223372036854775807"):
            run_trip_job(trip_id=bad, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(InvalidJobArguments, match="mode must be one of"):
        run_trip_job(trip_id=1, mode=["all"], **kwargs)  # type: ignore[arg-type]
    with sessions() as session:
        assert session.scalars(select(Job)).first() is None  # no job row for either
    engine.dispose()


def test_reanalysis_with_fewer_faces_removes_their_thumbnails(
    db_url: str,
    tmp_path: Path,
    pipeline,  # noqa: ANN001
    players_jpg: bytes,
    yaoming_jpg: bytes,
) -> None:
    """A photo replaced by one with fewer faces: after the write, thumbnails no face row
    points at are deleted; a store that cannot delete leaves files, not a failed job."""
    store = LocalStore(tmp_path / "photos")
    settings = ServiceSettings(detector="scrfd", photo_root=tmp_path / "photos")
    engine, sessions, trip_id, (key,) = _trip_with_photos(db_url, store, [("p.jpg", players_jpg)])

    def run(task_id: str, target: LocalStore = store) -> dict:
        return run_trip_job(
            sessions=sessions,
            store=target,
            pipeline=pipeline,
            settings=settings,
            trip_id=trip_id,
            mode="all",
            task_id=task_id,
        )

    prefix = thumbnail_key("faces/", trip_id, key, 0).rsplit("/", 1)[0]
    assert run("t1")["faces"] > 5
    # Each face row keeps its size in the pixels its chip was cut from, for the small-face
    # rule of the trip's regroup: its box's longer side in the decode's working pixels.
    working = decode_image(
        players_jpg, name="p.jpg", working_pixels=pipeline.settings.working_pixels
    )
    with sessions() as session:
        rows = session.scalars(select(Face)).all()
    assert [f.chip_size for f in rows] == pytest.approx(
        [max(f.x2 - f.x1, f.y2 - f.y1) * working.scale for f in rows], rel=1e-5
    )
    many = store.list(prefix)
    assert len(many) > 5

    class NoDelete(LocalStore):
        def delete(self, keys) -> None:  # noqa: ANN001
            raise StorageError("AccessDenied: s3:DeleteObject")

    store.write(key, yaoming_jpg)
    assert run("t2", NoDelete(tmp_path / "photos"))["faces"] == 1
    assert store.list(prefix) == many  # left behind, and the job succeeded
    assert run("t3")["faces"] == 1
    assert store.list(prefix) == [thumbnail_key("faces/", trip_id, key, 0)]
    engine.dispose()


def test_soft_time_limit_ends_the_job_as_timed_out(
    db_url: str,
    tmp_path: Path,
    pipeline,  # noqa: ANN001
    players_jpg: bytes,
    yaoming_jpg: bytes,
    gdp_jpg: bytes,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Celery's soft limit (SIGUSR1 -> SoftTimeLimitExceeded) striking inside one photo's
    detection: the job fails as timed out, and that photo is not recorded as broken."""
    from db.models import PhotoAnalysis
    from tasks.trip import install_soft_limit_handler

    store = LocalStore(tmp_path / "photos")
    settings = ServiceSettings(detector="scrfd", photo_root=tmp_path / "photos")
    engine, sessions, trip_id, _keys = _trip_with_photos(
        db_url, store, [("a.jpg", players_jpg), ("b.jpg", yaoming_jpg), ("c.jpg", gdp_jpg)]
    )
    previous = signal.getsignal(signal.SIGUSR1)
    install_soft_limit_handler()
    detector = pipeline.detector
    calls = []

    # the pipeline asks SCRFD's closer look for a photo's faces with the photo's scale
    method = "detect_photo" if hasattr(detector, "detect_photo") else "detect"

    def detect(*args):  # noqa: ANN002, ANN202
        calls.append(1)
        if len(calls) == 2:  # the limit strikes while the second photo is being detected
            os.kill(os.getpid(), signal.SIGUSR1)
        return getattr(type(detector), method)(detector, *args)

    monkeypatch.setattr(detector, method, detect)
    guard = JobGuard(sessions, heartbeat_seconds=30, stall_seconds=60, soft_time_limit=5)
    try:
        with pytest.raises(JobTimedOut, match="AFTERTRIP_TASK_SOFT_TIME_LIMIT"):
            run_trip_job(
                sessions=sessions,
                store=store,
                pipeline=pipeline,
                settings=settings,
                trip_id=trip_id,
                mode="all",
                task_id="slow-1",
                guard=guard,
            )
    finally:
        signal.signal(signal.SIGUSR1, previous)
        import tasks.guard

        tasks.guard.SOFT_LIMIT.installed = False
    with sessions() as session:
        job = session.scalars(select(Job).where(Job.celery_task_id == "slow-1")).one()
        assert job.status == "failed" and (job.error or "").startswith("JobTimedOut")
        assert job.heartbeat_at is not None  # beaten from the start
        errors = session.scalars(select(PhotoAnalysis.error)).all()
        assert not any("SoftTimeLimitExceeded" in (e or "") for e in errors)
    assert not _links(sessions, trip_id), "nothing written by a job past its limit"
    engine.dispose()


def test_stalled_running_row_is_marked_by_the_next_job_and_by_status(
    db_url: str,
    tmp_path: Path,
    pipeline,  # noqa: ANN001
    players_jpg: bytes,
) -> None:
    """A row left `running` by a dead worker (old heartbeat): the next job of the trip marks
    it failed; `mark_stalled_jobs` (what `status` runs) marks any such row; fresh ones stay."""
    from db.jobs import beat_job, mark_stalled_jobs, start_job
    from db.types import local_time, utcnow

    store = LocalStore(tmp_path / "photos")
    settings = ServiceSettings(detector="scrfd", photo_root=tmp_path / "photos")
    engine, sessions, trip_id, _keys = _trip_with_photos(db_url, store, [("a.jpg", players_jpg)])
    with sessions() as session:
        dead = start_job(
            session=session, trip_id=trip_id, mode="all", task_id="dead", models=pipeline.models
        ).id
        alive = start_job(
            session=session, trip_id=trip_id, mode="all", task_id="alive", models=pipeline.models
        ).id
        beat_job(session=session, job_id=alive)
        session.get(Job, dead).heartbeat_at = utcnow() - timedelta(minutes=5)  # type: ignore[union-attr]
        session.commit()
    guard = JobGuard(sessions, heartbeat_seconds=0.2, stall_seconds=120)
    result = run_trip_job(
        sessions=sessions,
        store=store,
        pipeline=pipeline,
        settings=settings,
        trip_id=trip_id,
        task_id="next",
        guard=guard,
    )
    assert result["analyzed"] == 1
    with sessions() as session:
        rows = {j.celery_task_id: j for j in session.scalars(select(Job))}
        assert rows["dead"].status == "failed" and "stalled" in (rows["dead"].error or "")
        # the time in the text is the app's (AFTERTRIP_WEBAPP_TIME_ZONE, default Seoul), labelled
        seoul = local_time(rows["dead"].heartbeat_at, ZoneInfo("Asia/Seoul"))
        assert f"since {seoul} " in (rows["dead"].error or ""), rows["dead"].error
        assert rows["alive"].status == "running"  # its heartbeat is fresh
        assert rows["next"].status == "succeeded" and rows["next"].heartbeat_at is not None
        # status's check with a short limit marks the other one too; never twice
        assert mark_stalled_jobs(session=session, stall_seconds=0) == [alive]
        assert mark_stalled_jobs(session=session, stall_seconds=0) == []
        assert find_queued_or_running_job(session=session, trip_id=trip_id) is None
    engine.dispose()


def test_retried_job_continues_where_the_last_delivery_stopped(
    db_url: str,
    tmp_path: Path,
    pipeline,  # noqa: ANN001
    players_jpg: bytes,
    yaoming_jpg: bytes,
    gdp_jpg: bytes,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Photos are stored as they are analysed (in batches): S3 failing on the fourth read
    loses only what was not stored yet; the same job delivered again reads only the rest,
    then groups the whole trip."""
    import tasks.analyze
    from db.jobs import job_stored_photos

    monkeypatch.setattr(tasks.analyze, "STORE_BATCH", 1)
    monkeypatch.setattr(pipeline.arcface, "batch_size", 1)  # each photo leaves at once
    reads: list[str] = []
    failed: list[str] = []

    class CountingStore(FlakyStore):
        fail_at = 4

        def read(self, key: str) -> bytes:
            reads.append(key)
            if len(reads) == self.fail_at:
                failed.append(key)
                raise TransientStorageError(key, "connection reset")
            return super().read(key)

    store = CountingStore(tmp_path / "photos")
    settings = ServiceSettings(detector="scrfd", photo_root=tmp_path / "photos")
    photos = [("a.jpg", players_jpg), ("b.jpg", yaoming_jpg), ("c.jpg", gdp_jpg)]
    engine, sessions, trip_id, keys = _trip_with_photos(db_url, store, photos * 2)
    key_of = {}
    with sessions() as session:
        for photo in session.scalars(select(Photo).where(Photo.trip_id == trip_id)):
            key_of[photo.id] = photo.s3_key

    def run() -> dict:
        return run_trip_job(
            sessions=sessions,
            store=store,
            pipeline=pipeline,
            settings=settings,
            trip_id=trip_id,
            mode="all",
            task_id="resumed",
        )

    with pytest.raises(TransientStorageError):
        run()
    assert not _links(sessions, trip_id), "no folders before the whole trip is analysed"
    with sessions() as session:
        job = session.scalars(select(Job).where(Job.celery_task_id == "resumed")).one()
        sha = job.embedder_sha256 or ""
        stored = job_stored_photos(session=session, job_id=job.id, embedder_sha256=sha)
    # Reads run ahead on several threads: the fourth read need not be the fourth photo's.
    before = {p for p, k in key_of.items() if keys.index(k) < keys.index(failed[0])}
    assert len(before) >= 2
    assert set(stored) == before, "every photo before the failed read was stored, no other"
    reads.clear()
    store.fail_at = 0
    result = run()
    assert result["analyzed"] == 6 and result["errors"] == 0
    assert sorted(reads) == sorted(set(keys) - {key_of[p] for p in stored})
    with sessions() as session:
        job = session.scalars(select(Job).where(Job.celery_task_id == "resumed")).one()
        assert job.status == "succeeded" and job.attempts == 2
    assert {photo for photo, _tag in _links(sessions, trip_id)} == set(key_of)
    engine.dispose()


def test_fanned_out_job_and_a_chunk_run_twice_store_each_photo_once(
    db_url: str,
    tmp_path: Path,
    pipeline,  # noqa: ANN001
    players_jpg: bytes,
    yaoming_jpg: bytes,
    gdp_jpg: bytes,
) -> None:
    """The fan-out without Celery: chunks of 2 photos; the "other worker" (called from
    `send`) runs chunk 0 twice, the job takes the rest; every photo is read once."""
    from redis import Redis

    from tasks.fanout import FanOut, analyze_chunk_body
    from tasks.locks import Lease, chunk_lease_name
    from tests.support.services import REDIS_URL, require_redis

    require_redis()
    redis = Redis.from_url(REDIS_URL)
    reads: list[str] = []

    class CountingStore(LocalStore):
        def read(self, key: str) -> bytes:
            reads.append(key)
            return super().read(key)

    store = CountingStore(tmp_path / "photos")
    settings = ServiceSettings(detector="scrfd", photo_root=tmp_path / "photos")
    photos = [("a.jpg", players_jpg), ("b.jpg", yaoming_jpg), ("c.jpg", gdp_jpg)]
    engine, sessions, trip_id, keys = _trip_with_photos(db_url, store, photos * 2)
    sent: list[tuple[int, list[int]]] = []
    chunk_results: list[int] = []

    def send(trip: int, job: int, split: str, chunks: list[tuple[int, list[int]]]) -> None:
        sent.extend(chunks)
        number, photo_ids = chunks[0]
        for _delivery in range(2):  # delivered twice: the second stores nothing
            chunk_results.append(
                analyze_chunk_body(
                    sessions=sessions,
                    store=store,
                    pipeline=pipeline,
                    lease=Lease(redis, chunk_lease_name(job, split, number), owner="other", ttl=30),
                    guard=JobGuard(sessions, heartbeat_seconds=5, stall_seconds=60),
                    trip_id=trip,
                    job_id=job,
                    photo_ids=photo_ids,
                    thumbnail_prefix="faces/",
                )
            )

    result = run_trip_job(
        sessions=sessions,
        store=store,
        pipeline=pipeline,
        settings=settings,
        trip_id=trip_id,
        mode="all",
        task_id="fanned",
        guard=JobGuard(sessions, heartbeat_seconds=5, stall_seconds=60),
        fan_out=FanOut(chunk_photos=2, redis=redis, owner="fanned", lease_ttl=30, send=send),
    )
    assert [len(ids) for _n, ids in sent] == [2, 2, 2]
    assert chunk_results == [2, 0]
    assert result["analyzed"] == 6 and result["errors"] == 0
    assert sorted(reads) == sorted(keys), "each photo read (and analysed) once"
    assert {photo for photo, _tag in _links(sessions, trip_id)} and result["people"] >= 1
    engine.dispose()


def test_a_photo_that_fails_logs_its_id_key_and_reason(
    db_url: str,
    tmp_path: Path,
    pipeline,  # noqa: ANN001
    players_jpg: bytes,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from sqlalchemy import text

    store = LocalStore(tmp_path / "photos")
    engine, sessions, trip_id, (good_key,) = _trip_with_photos(
        db_url, store, [("players.jpg", players_jpg)]
    )
    with sessions() as session:
        gone = Photo(trip_id=trip_id, file_name="gone.jpg", url="")  # no object in the store
        session.add(gone)
        session.commit()
        gone_id, gone_key = gone.id, gone.s3_key
    with engine.begin() as conn:  # what a char(32) column lets the app hold
        conn.execute(
            text(
                "INSERT INTO photos_photo (created_at, updated_at, file_key, file_name, url, "
                "is_sorted_yolo, trip_id) VALUES ('2024-05-01', '2024-05-01', "
                "'../../etc/passwd', 'x.jpg', '', 0, :trip)"
            ),
            {"trip": trip_id},
        )
        bad_id = conn.execute(text("SELECT max(id) FROM photos_photo")).scalar_one()
    caplog.set_level("WARNING", logger="tasks")
    summary = _scrfd_job(sessions, store, pipeline, trip_id)
    assert summary["analyzed"] == 3 and summary["errors"] == 2
    failed = {
        r.photo_id: r  # type: ignore[attr-defined]
        for r in caplog.records
        if r.getMessage().startswith("photo ") and " failed: " in r.getMessage()
    }
    assert set(failed) == {gone_id, bad_id}  # one line each; none for the good photo
    assert failed[gone_id].getMessage().startswith(f"photo {gone_id} (S3 key {gone_key}) failed: ")
    assert failed[gone_id].status == "missing" and failed[gone_id].s3_key == gone_key  # type: ignore[attr-defined]
    bad = failed[bad_id].getMessage()
    assert bad.startswith(f"photo {bad_id} (S3 key ../../etc/passwd) failed: invalid_key: ")
    assert "not a UUID" in bad and good_key not in "".join(r.getMessage() for r in failed.values())
    engine.dispose()


def test_a_trip_deleted_while_its_photos_are_analysed_gets_no_links(
    db_url: str,
    tmp_path: Path,
    pipeline,  # noqa: ANN001
    players_jpg: bytes,
) -> None:
    """The web app soft-deletes the trip after the job listed its photos: the regroup's
    write sees it under the trip's lock, writes no folder or link, and the job ends skipped."""
    from sqlalchemy import update

    from db.types import utcnow
    from db.webapp import Trip
    from tasks.analyze import analysis_started

    store = LocalStore(tmp_path / "photos")
    engine, sessions, trip_id, _keys = _trip_with_photos(
        db_url, store, [("players.jpg", players_jpg)]
    )

    def delete_trip(**_named: object) -> None:
        with sessions() as session:
            session.execute(update(Trip).where(Trip.id == trip_id).values(deleted_at=utcnow()))
            session.commit()

    analysis_started.connect(delete_trip)
    try:
        summary = _scrfd_job(sessions, store, pipeline, trip_id, task_id="deleted-meanwhile")
    finally:
        analysis_started.disconnect(delete_trip)
    assert f"trip {trip_id} was deleted in the web app" in summary["skipped"]
    assert re.search(r"deleted_at \d{4}-\d\d-\d\d \d\d:\d\d:\d\d KST\)", summary["skipped"])
    assert _links(sessions, trip_id) == set()
    with sessions() as session:
        job = session.scalars(select(Job).where(Job.celery_task_id == "deleted-meanwhile")).one()
        assert job.status == "skipped" and "not grouped" in (job.error or "")
    engine.dispose()
