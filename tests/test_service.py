"""The worker service end to end: web-app tables, photos in S3 (moto server), the client,
a real `celery worker` (prefork, concurrency 1) and Flower, on PostgreSQL and MariaDB.

One worker per backend serves every test of this module. The detector is SCRFD, the faster
of the two on a CPU; the service does not depend on which detector runs.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from PIL import Image
from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session, sessionmaker

from db.models import Face, Job, PhotoAnalysis
from db.session import make_engine, make_sessionmaker
from db.webapp import NO_FACE_TAG_ID, OTHERS_TAG_ID, Photo, PhotoTagFace, TagFace
from storage import S3Store
from tasks.client import enqueue_trip
from tests.plugins.databases import add_trip, fresh_database, prepare_database
from tests.plugins.s3 import moto_client
from tests.support.files import ROOT
from tests.support.services import (
    REDIS_URL,
    child_pids,
    client_app,
    free_port,
    held_jobs,
    no_face_jpeg,
    post_json,
    require_redis,
    start_worker,
    stop_process,
    tail,
    wait_for,
    worker_environment,
)

pytestmark = [pytest.mark.services, pytest.mark.timeout(900)]


JOB_TIMEOUT = 300
CORRUPT_JPEG = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(range(256)) * 4


@dataclass
class Service:
    """A running worker and everything it talks to, with helpers for the tests."""

    backend: str
    db_url: str
    engine: Engine
    sessions: sessionmaker[Session]
    store: S3Store
    app: Celery
    queue: str
    env: dict[str, str]
    worker: subprocess.Popen[bytes]
    log: Path
    tmp: Path
    task_ids: list[str] = field(default_factory=list)

    @property
    def hold_dir(self) -> Path:
        """Where the test hook looks for `hold` (see tests.support.servicehooks)."""
        return self.tmp / "hold"

    def hold_jobs(self) -> None:
        """From now on, a job that reaches its analysis waits there until `release_jobs`."""
        for old in self.hold_dir.glob("held-*"):
            old.unlink()
        (self.hold_dir / "hold").touch()

    def release_jobs(self) -> None:
        (self.hold_dir / "hold").unlink(missing_ok=True)

    def add_trip(self, photos: list[tuple[str, bytes | None]]) -> tuple[int, list[int]]:
        """A trip with these photos, uploaded under their `str(file_key)`; None = no object."""
        with self.sessions() as session:
            trip = add_trip(session)
            ids = [self._add_photo(session, trip.id, name, data) for name, data in photos]
            session.commit()
            return trip.id, ids

    def add_photo(self, trip_id: int, name: str, data: bytes) -> int:
        with self.sessions() as session:
            photo_id = self._add_photo(session, trip_id, name, data)
            session.commit()
            return photo_id

    def _add_photo(self, session: Session, trip_id: int, name: str, data: bytes | None) -> int:
        photo = Photo(trip_id=trip_id, file_key=uuid.uuid4(), file_name=name, url="")
        session.add(photo)
        session.flush()
        if data is not None:
            self.store.write(photo.s3_key, data, "image/jpeg")
        return photo.id

    def enqueue(self, trip_id: int, mode: str = "missing") -> Any:
        result = enqueue_trip(trip_id, mode=mode, app=self.app, queue=self.queue)
        self.task_ids.append(result.id)
        return result

    def run(self, trip_id: int, mode: str = "missing") -> dict[str, Any]:
        return self.wait(self.enqueue(trip_id, mode))

    def wait(self, result: Any) -> dict[str, Any]:
        try:
            return dict(result.get(timeout=JOB_TIMEOUT))
        except Exception as exc:
            raise AssertionError(f"job failed: {exc!r}\nworker log:\n{tail(self.log)}") from exc

    def links(self, trip_id: int) -> dict[int, set[int]]:
        """photo id -> the person folders it is linked to."""
        with self.sessions() as session:
            rows = session.execute(
                select(PhotoTagFace.photo_id, PhotoTagFace.tagface_id)
                .join(Photo, Photo.id == PhotoTagFace.photo_id)
                .where(Photo.trip_id == trip_id)
            )
            found: dict[int, set[int]] = {}
            for photo_id, tag_id in rows:
                found.setdefault(photo_id, set()).add(tag_id)
            return found

    def snapshot(self, trip_id: int) -> dict[str, Any]:
        """Every row a job writes for a trip, comparable between runs."""
        with self.sessions() as session:
            photo_ids = select(Photo.id).where(Photo.trip_id == trip_id)
            links = sorted(
                session.execute(
                    select(PhotoTagFace.id, PhotoTagFace.photo_id, PhotoTagFace.tagface_id).where(
                        PhotoTagFace.photo_id.in_(photo_ids)
                    )
                ).all()
            )
            tag_ids = {tag for _id, _photo, tag in links}
            tags = sorted(
                session.execute(
                    select(TagFace.id, TagFace.tag_num, TagFace.custom_name).where(
                        TagFace.id.in_(tag_ids)
                    )
                ).all()
            )
            faces = sorted(
                session.execute(
                    select(
                        Face.photo_id, Face.face_index, Face.tagface_id, Face.thumbnail_key
                    ).where(Face.photo_id.in_(photo_ids))
                ).all()
            )
            return {
                "links": [tuple(row) for row in links],
                "tags": [tuple(row) for row in tags],
                "faces": [tuple(row) for row in faces],
            }

    def jobs(self, trip_id: int) -> list[Job]:
        with self.sessions() as session:
            return list(session.scalars(select(Job).where(Job.trip_id == trip_id).order_by(Job.id)))


@pytest.fixture(
    scope="module",
    params=[
        pytest.param("postgresql", id="postgresql"),
        pytest.param("mariadb", id="mariadb"),
    ],
)
def service(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, moto_endpoint: str
) -> Iterator[Service]:
    """Tables, bucket, a unique queue, and one real worker for this backend."""
    backend = str(request.param)
    require_redis()
    tmp = tmp_path_factory.mktemp(f"service-{backend}")
    with fresh_database(backend, tmp) as db_url:
        prepare_database(db_url)
        bucket = f"aftertrip-service-{uuid.uuid4().hex[:10]}"
        s3 = moto_client(moto_endpoint)
        s3.create_bucket(Bucket=bucket)
        # A queue of our own: another test run on this Redis never takes our jobs.
        queue = f"faces-test-{uuid.uuid4().hex[:8]}"
        env = worker_environment(
            db_url=db_url,
            bucket=bucket,
            s3_endpoint=moto_endpoint,
            queue=queue,
            tmp=tmp,
            threads="2",
            lock_wait_seconds="1",
            heartbeat_seconds="1",  # a dead holder's lock is gone 6 s after its last beat
            test_hold_dir=str(tmp / "hold"),
        )
        (tmp / "hold").mkdir()
        log = tmp / "worker.log"
        worker = start_worker(env, log, queue=queue, name=f"test-{backend}")
        engine = make_engine(db_url)
        service = Service(
            backend=backend,
            db_url=db_url,
            engine=engine,
            sessions=make_sessionmaker(engine),
            store=S3Store(bucket, client=s3),
            app=client_app(REDIS_URL),
            queue=queue,
            env=env,
            worker=worker,
            log=log,
            tmp=tmp,
        )
        try:
            yield service
        finally:
            stop_process(worker)
            engine.dispose()
            _forget_redis_keys(service)


def _forget_redis_keys(service: Service) -> None:
    """Delete what this run left in Redis (its queue and results), nobody else's."""
    from redis import Redis

    redis = Redis.from_url(REDIS_URL)
    keys = [service.queue, *(f"celery-task-meta-{task_id}" for task_id in service.task_ids)]
    redis.delete(*keys)


@dataclass
class ShippedTrip:
    trip_id: int
    players: int
    yaoming: int
    gdp: int
    lake: int
    broken: int
    gone: int
    result: dict[str, Any]
    task_id: str


@pytest.fixture(scope="module")
def shipped_trip(
    service: Service, players_jpg: bytes, yaoming_jpg: bytes, gdp_jpg: bytes
) -> ShippedTrip:
    """The three shipped photos, a landscape, a corrupt file and a row without its object,
    grouped once by the worker."""
    trip_id, ids = service.add_trip(
        [
            ("players.jpg", players_jpg),
            ("yaoming.jpg", yaoming_jpg),
            ("gdp.jpg", gdp_jpg),
            ("lake.jpg", no_face_jpeg()),
            ("broken.jpg", CORRUPT_JPEG),
            ("gone.jpg", None),
        ]
    )
    pending = service.enqueue(trip_id)
    result = service.wait(pending)
    players, yaoming, gdp, lake, broken, gone = ids
    return ShippedTrip(
        trip_id, players, yaoming, gdp, lake, broken, gone, result=result, task_id=pending.id
    )


def test_trip_photos_sorted_into_webapp_tables(service: Service, shipped_trip: ShippedTrip) -> None:
    trip = shipped_trip
    assert trip.result["analyzed"] == 6
    assert trip.result["errors"] == 2
    links = service.links(trip.trip_id)
    shared = (links[trip.players] & links[trip.yaoming]) - {NO_FACE_TAG_ID, OTHERS_TAG_ID}
    assert len(shared) == 1, f"Yao Ming's two photos share one folder: {links}"
    assert links[trip.lake] == {NO_FACE_TAG_ID}
    assert links.get(trip.gdp) and NO_FACE_TAG_ID not in links[trip.gdp]
    assert trip.broken not in links and trip.gone not in links

    (job,) = service.jobs(trip.trip_id)
    assert job.status == "succeeded" and job.celery_task_id == trip.task_id
    assert job.counts is not None and job.counts["errors"] == 2
    assert job.embedder_sha256 and job.detector_name == "scrfd_500m_bnkps+mtcnn_onet"

    with service.sessions() as session:
        analyses = session.execute(
            select(PhotoAnalysis.photo_id, PhotoAnalysis.status, PhotoAnalysis.error)
        ).all()
        statuses = {photo_id: status for photo_id, status, _error in analyses}
        errors = {photo_id: error for photo_id, _status, error in analyses}
        thumbnails = set(
            session.scalars(
                select(Face.thumbnail_key).join(Photo).where(Photo.trip_id == trip.trip_id)
            )
        )
    assert statuses[trip.broken] == "corrupt" and errors[trip.broken]
    assert statuses[trip.gone] == "missing" and "no such object" in (errors[trip.gone] or "")
    assert statuses[trip.players] == statuses[trip.lake] == "ok"
    # one thumbnail per face, at its deterministic key, and nothing else
    assert None not in thumbnails
    assert set(service.store.list(f"faces/{trip.trip_id}/")) == thumbnails


def test_same_job_twice_gives_identical_rows(service: Service, shipped_trip: ShippedTrip) -> None:
    before = service.snapshot(shipped_trip.trip_id)
    thumbnails_before = service.store.list(f"faces/{shipped_trip.trip_id}/")
    again = service.run(shipped_trip.trip_id, mode="all")
    assert again["analyzed"] == 6
    assert service.snapshot(shipped_trip.trip_id) == before
    nothing_new = service.run(shipped_trip.trip_id, mode="missing")
    assert nothing_new["analyzed"] == 2  # only the two photos that failed are tried again
    assert service.snapshot(shipped_trip.trip_id) == before
    assert service.store.list(f"faces/{shipped_trip.trip_id}/") == thumbnails_before


def test_named_person_keeps_folder_after_new_photos(
    service: Service, shipped_trip: ShippedTrip, yaoming_jpg: bytes
) -> None:
    trip = shipped_trip
    links = service.links(trip.trip_id)
    (yao_tag,) = (links[trip.players] & links[trip.yaoming]) - {NO_FACE_TAG_ID, OTHERS_TAG_ID}
    with service.sessions() as session:
        session.execute(update(TagFace).where(TagFace.id == yao_tag).values(custom_name="Yao Ming"))
        session.commit()
    # The same photo uploaded again re-encoded: a new object with the same face.
    out = io.BytesIO()
    Image.open(io.BytesIO(yaoming_jpg)).save(out, "JPEG", quality=85)
    new_photo = service.add_photo(trip.trip_id, "yaoming-again.jpg", out.getvalue())

    result = service.run(trip.trip_id)
    assert result["analyzed"] == 3  # the new photo and the two that keep failing
    links = service.links(trip.trip_id)
    assert yao_tag in links[new_photo]
    assert yao_tag in links[trip.players] and yao_tag in links[trip.yaoming]
    with service.sessions() as session:
        assert session.get(TagFace, yao_tag).custom_name == "Yao Ming"  # type: ignore[union-attr]


@pytest.mark.parametrize("service", ["postgresql"], indirect=True)
def test_same_trip_never_processed_concurrently(
    service: Service, players_jpg: bytes, yaoming_jpg: bytes, gdp_jpg: bytes
) -> None:
    trip_id, _ids = service.add_trip(
        [("players.jpg", players_jpg), ("yaoming.jpg", yaoming_jpg), ("gdp.jpg", gdp_jpg)]
    )
    # A second worker node on the same queue: while the first request is held inside its
    # job (the trip locked), the second is taken by the other worker.
    log = service.tmp / "second-worker.log"
    second = start_worker(service.env, log, queue=service.queue, name="test-second")
    logs = lambda: f"first worker:\n{tail(service.log)}\nsecond worker:\n{tail(log)}"  # noqa: E731
    service.hold_jobs()
    try:
        first_request = service.enqueue(trip_id, mode="all")
        wait_for(lambda: len(held_jobs(service.hold_dir)) == 1, f"the first job\n{logs()}")
        second_request = service.enqueue(trip_id, mode="all")
        waited = lambda: (service.log.read_text() + log.read_text()).count("trip busy, waiting")  # noqa: E731
        wait_for(lambda: waited() >= 1, f"the second request to find the trip busy\n{logs()}")
        assert len(held_jobs(service.hold_dir)) == 1, "the second job never started beside it"
        service.release_jobs()
        results = [service.wait(first_request), service.wait(second_request)]
    finally:
        service.release_jobs()
        stop_process(second)
    assert [r["analyzed"] for r in results] == [3, 3], logs()
    jobs = service.jobs(trip_id)
    spans = [(j.celery_task_id, j.status, j.started_at, j.finished_at) for j in jobs]
    assert len(jobs) == 2 and all(j.status == "succeeded" for j in jobs), spans
    assert {j.celery_task_id for j in jobs} == {first_request.id, second_request.id}, spans
    earlier, later = sorted(jobs, key=lambda j: j.started_at)  # type: ignore[arg-type, return-value]
    assert earlier.celery_task_id == first_request.id, spans
    assert earlier.finished_at is not None and later.started_at is not None
    overlap = f"jobs of one trip overlapped: {spans}\n{logs()}"
    assert earlier.finished_at <= later.started_at, overlap


@pytest.mark.parametrize("service", ["mariadb"], indirect=True)
def test_worker_killed_mid_job_is_redelivered(
    service: Service, players_jpg: bytes, yaoming_jpg: bytes, gdp_jpg: bytes
) -> None:
    photos = [("players.jpg", players_jpg), ("yaoming.jpg", yaoming_jpg), ("gdp.jpg", gdp_jpg)]
    trip_id, _ids = service.add_trip(
        [(f"{n}-{name}", data) for n in range(3) for name, data in photos]
    )
    service.run(trip_id)
    before = service.snapshot(trip_id)
    assert before["faces"], "the first run found faces"

    service.hold_jobs()
    try:
        pending = service.enqueue(trip_id, mode="all")
        wait_for(lambda: bool(held_jobs(service.hold_dir)), f"the job\n{tail(service.log)}")
        assert service.snapshot(trip_id) == before, "previous results stay visible during a job"
        (child,) = child_pids(service.worker.pid)
        os.kill(child, signal.SIGKILL)
    finally:
        service.release_jobs()

    result = service.wait(pending)  # delivered again (acks_late + reject_on_worker_lost)
    assert result["analyzed"] == 9
    assert child not in child_pids(service.worker.pid)
    after = service.snapshot(trip_id)
    assert after == before, "no duplicated faces or links after the redelivery"
    job = next(j for j in service.jobs(trip_id) if j.celery_task_id == pending.id)
    assert job.status == "succeeded" and job.attempts == 2
    # the redelivery waited for the dead process's lock to lapse (it was renewed no more)
    assert "trip busy, waiting" in service.log.read_text()


@pytest.mark.parametrize("service", ["postgresql"], indirect=True)
def test_flower_api_reruns_the_task(service: Service, shipped_trip: ShippedTrip) -> None:
    port = free_port()
    auth = "ops:flower-test-password"
    env = {
        **service.env,
        "AFTERTRIP_FLOWER_BASIC_AUTH": auth,
        "AFTERTRIP_FLOWER_ADDRESS": "127.0.0.1",
        "AFTERTRIP_FLOWER_PORT": str(port),
    }
    log = service.tmp / "flower.log"
    with log.open("wb") as handle:
        flower = subprocess.Popen(
            [sys.executable, "-m", "tasks.cli", "flower"],
            cwd=ROOT,
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}/api/task/async-apply/aftertrip.group_trip"
    body = {"args": [shipped_trip.trip_id], "kwargs": {"mode": "missing"}}
    try:
        deadline = time.monotonic() + 120
        while True:  # up once it answers; without credentials it must refuse
            assert flower.poll() is None, f"flower exited:\n{tail(log)}"
            assert time.monotonic() < deadline, f"flower did not start:\n{tail(log)}"
            try:
                status, _ = post_json(url, body, auth=None)
                break
            except (ConnectionError, urllib.error.URLError):
                time.sleep(0.3)
        assert status == 401
        assert post_json(url, body, auth="ops:wrong")[0] == 401
        status, answer = post_json(url, body, auth=auth)
        assert status == 200, tail(log)
        task_id = answer["task-id"]
        service.task_ids.append(task_id)
        service.wait(service.app.AsyncResult(task_id))
    finally:
        stop_process(flower)
    job = next(j for j in service.jobs(shipped_trip.trip_id) if j.celery_task_id == task_id)
    assert job.status == "succeeded"


@pytest.mark.parametrize("service", ["postgresql"], indirect=True)
def test_admin_rerun_wait_and_status(service: Service, shipped_trip: ShippedTrip) -> None:
    """`aftertrip-faces rerun --wait` through the service's own app, then `status`."""
    trip = str(shipped_trip.trip_id)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "tasks.cli", *args],
            cwd=ROOT,
            env={**service.env, "COLUMNS": "200"},
            capture_output=True,
            text=True,
            timeout=JOB_TIMEOUT,
        )

    rerun = cli("rerun", "--trip", trip, "--wait", "--timeout", str(JOB_TIMEOUT))
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr + tail(service.log)
    assert "queued job" in rerun.stdout and "done" in rerun.stdout
    task_id = rerun.stdout.split("queued job ", 1)[1].split()[0]
    service.task_ids.append(task_id)
    job = next(j for j in service.jobs(shipped_trip.trip_id) if j.celery_task_id == task_id)
    assert job.status == "succeeded"

    status = cli("status", "--trip", trip)
    assert status.returncode == 0, status.stderr
    assert f"trip {trip}: " in status.stdout and "succeeded" in status.stdout
    assert "broken.jpg" in status.stdout and "gone.jpg" in status.stdout  # photo errors


# --- outages, on a stack of the test's own (tests.support.faults) ------------------------------


def _held_fault_job(
    tmp: Path, stack: Any, photos: list[tuple[str, bytes | None]]
) -> tuple[Any, Any, int]:
    """A worker (1 s heartbeats, the hold hook), a trip, and its job held before analysis."""
    hold = tmp / "hold"
    hold.mkdir()
    worker = stack.start_worker(
        name="outage", AFTERTRIP_HEARTBEAT_SECONDS="1", AFTERTRIP_TEST_HOLD_DIR=str(hold)
    )
    trip_id, _ids = stack.add_trip(photos)
    (hold / "hold").touch()
    pending = stack.enqueue(trip_id, mode="all")
    wait_for(lambda: bool(held_jobs(hold)), f"the job to start\n{worker.tail()}")
    return worker, pending, trip_id


@pytest.mark.faults
def test_redis_restarted_mid_job_the_job_completes(
    tmp_path: Path, players_jpg: bytes, yaoming_jpg: bytes, gdp_jpg: bytes
) -> None:
    """Issue 9 #1: the broker, result backend and lock Redis down 8 s while a job runs."""
    from tests.support.faults import fault_stack

    photos: list[tuple[str, bytes | None]] = [
        ("players.jpg", players_jpg),
        ("yaoming.jpg", yaoming_jpg),
        ("gdp.jpg", gdp_jpg),
    ]
    with fault_stack(tmp_path / "stack") as stack:
        worker, pending, trip_id = _held_fault_job(tmp_path, stack, photos)
        stack.redis.restart(down_for=8)
        (tmp_path / "hold" / "hold").unlink()
        result = stack.wait(pending, timeout=JOB_TIMEOUT)
        assert result["analyzed"] == 3, worker.tail()
        (job,) = stack.jobs(trip_id)
        assert job.status == "succeeded" and job.attempts == 1, worker.tail()
        stack.assert_settled(trip_id)
        stack.assert_no_duplicates(trip_id)
        # and the worker still takes jobs after the restart
        again = stack.wait(stack.enqueue(trip_id), timeout=JOB_TIMEOUT)
        assert again["analyzed"] == 0
        stack.assert_settled(trip_id)


@pytest.mark.faults
def test_database_down_mid_job_is_retried_until_it_is_back(
    tmp_path: Path, players_jpg: bytes, yaoming_jpg: bytes, gdp_jpg: bytes
) -> None:
    """Issue 9 #2: PostgreSQL unreachable for 20 s (more than the old five retries lasted):
    the job retries within its time budget and completes; no row is left `running`."""
    from tests.support.faults import fault_stack

    photos: list[tuple[str, bytes | None]] = [
        ("players.jpg", players_jpg),
        ("yaoming.jpg", yaoming_jpg),
        ("gdp.jpg", gdp_jpg),
    ]
    with fault_stack(tmp_path / "stack") as stack:
        worker, pending, trip_id = _held_fault_job(tmp_path, stack, photos)
        stack.postgres.cut()
        (tmp_path / "hold" / "hold").unlink()
        wait_for(lambda: "will be retried" in worker.text(), f"a retry\n{worker.tail()}")
        time.sleep(20)
        stack.postgres.restore()
        result = stack.wait(pending, timeout=JOB_TIMEOUT)
        assert result["analyzed"] == 3, worker.tail()
        (job,) = stack.jobs(trip_id)
        assert job.status == "succeeded" and job.attempts >= 2, worker.tail()
        stack.assert_settled(trip_id)
        stack.assert_no_duplicates(trip_id)
