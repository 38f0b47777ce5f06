"""The AfterTrip backend's own tables (../shared/webapp-schema) as the worker finds them.

On the app's fresh database `photos_tagface` is empty: the two shared folders come from
`aftertrip-faces db upgrade`, and no job writes without them.
"""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import Engine, func, inspect, select, text
from sqlalchemy.orm import Session

from db.common import TripDeleted
from db.jobs import start_job
from db.models import Face, Job, PhotoAnalysis
from db.photos import trip_photos
from db.session import make_engine, make_sessionmaker, upgrade
from db.types import DEFAULT_TIME_ZONE, engine_time_zone
from db.webapp import (
    NO_FACE_TAG_ID,
    OTHERS_TAG_ID,
    SHARED_TAG_IDS,
    InvalidFileKey,
    Photo,
    PhotoTagFace,
    SharedFoldersError,
    TagFace,
)
from storage import LocalStore
from tasks.job import run_trip_job
from tasks.settings import ServiceSettings
from tests.plugins.databases import cli_db_upgrade
from tests.support.files import ROOT
from tests.support.trips import (
    CAST,
    People,
    add_cast_trip,
    cast_outcomes,
    folder_links,
    snapshot_rows,
    write_result,
)


def _shared_rows(engine: Engine) -> list[tuple[int, int, str]]:
    with Session(engine) as session:
        rows = session.execute(
            select(TagFace.id, TagFace.tag_num, TagFace.custom_name).order_by(TagFace.id)
        )
        return [tuple(row) for row in rows]  # type: ignore[misc]


def test_db_upgrade_creates_the_shared_folders_once(webapp_db_url: str, db_backend: str) -> None:
    engine = make_engine(webapp_db_url)
    try:
        assert _shared_rows(engine) == [] or db_backend == "sqlite"
        done = cli_db_upgrade(webapp_db_url)
        assert done.returncode == 0, done.stdout + done.stderr
        assert _shared_rows(engine) == [(1, -2, "no faces"), (2, -1, "others")]
        again = cli_db_upgrade(webapp_db_url)  # idempotent
        assert again.returncode == 0, again.stdout + again.stderr
        assert "shared folders created" not in again.stdout
        assert _shared_rows(engine) == [(1, -2, "no faces"), (2, -1, "others")]
        # The next folder the app or the worker makes takes a new id (PostgreSQL: the
        # sequence was moved past the ids given by hand).
        with Session(engine) as session, session.begin():
            folder = TagFace(tag_num=0, custom_name="")
            session.add(folder)
            session.flush()
            assert folder.id > OTHERS_TAG_ID
    finally:
        engine.dispose()


def test_import_trips_group_is_written_in_the_apps_zone(
    webapp_db_url: str, db_backend: str
) -> None:
    """import-trip's `accounts_group` row (made when the app has none) carries the app's naive
    local time on MariaDB, as Django writes with USE_TZ = False; it was naive UTC."""
    from db.types import set_time_zone
    from db.webapp import import_group_id

    engine = make_engine(webapp_db_url)
    try:
        with engine.connect() as conn:
            if not inspect(conn).has_table("accounts_group"):
                pytest.skip("the fallback schema (no dump) has no accounts_group table")
        for zone in ("Asia/Seoul", "UTC"):
            set_time_zone(engine, zone)
            with Session(engine) as session, session.begin():
                session.execute(text("DELETE FROM accounts_group"))
                group_id = import_group_id(session=session)
                raw = session.execute(
                    text("SELECT created_at FROM accounts_group WHERE id = :id"), {"id": group_id}
                ).scalar_one()
            if db_backend == "postgresql":  # timestamptz: the instant, whatever the zone
                assert abs(raw - datetime.now(ZoneInfo("UTC"))) < timedelta(minutes=5)
                continue
            local_now = datetime.now(ZoneInfo(zone)).replace(tzinfo=None)
            assert abs(raw - local_now) < timedelta(minutes=5), (zone, raw, local_now)
    finally:
        engine.dispose()


def test_db_upgrade_refuses_a_person_folder_at_a_shared_id(webapp_db_url: str) -> None:
    engine = make_engine(webapp_db_url)
    try:
        with engine.begin() as conn:
            conn.execute(text("DELETE FROM photos_tagface"))  # SQLite's copy has them
            conn.execute(
                text("INSERT INTO photos_tagface (id, tag_num, custom_name) VALUES (1, 0, 'Mina')")
            )
        done = cli_db_upgrade(webapp_db_url)
        assert done.returncode == 1
        assert "id 1 holds tag_num 0" in done.stdout and "by hand" in done.stdout
        assert _shared_rows(engine) == [(1, 0, "Mina")]  # nothing overwritten
    finally:
        engine.dispose()


def _nothing_written(engine: Engine) -> None:
    with Session(engine) as session:
        assert session.scalar(select(func.count()).select_from(PhotoTagFace)) == 0
        assert session.scalar(select(func.count()).select_from(Face)) == 0
        assert session.scalar(select(func.count()).select_from(PhotoAnalysis)) == 0


def test_job_without_the_shared_folders_writes_nothing(webapp_db_url: str) -> None:
    # The worker's migrations, but not the shared folders: the state a team is in when it
    # ran only the Alembic part, or when someone deleted the rows.
    upgrade(webapp_db_url, shared_folders=False)
    engine = make_engine(webapp_db_url)
    try:
        with engine.begin() as conn:
            conn.execute(text("DELETE FROM photos_tagface"))
        trip_id, photo_ids = add_cast_trip(engine)
        with pytest.raises(SharedFoldersError, match="aftertrip-faces db upgrade"):
            write_result(engine, trip_id, cast_outcomes(People(), photo_ids, CAST))
        _nothing_written(engine)
        assert _shared_rows(engine) == []

        # A person folder at id 2 (what the old worker did): refused too, and named.
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO photos_tagface (id, tag_num, custom_name) "
                    "VALUES (1, -2, 'no faces'), (2, 0, '')"
                )
            )
        with pytest.raises(SharedFoldersError, match="id 2 holds tag_num 0"):
            write_result(engine, trip_id, cast_outcomes(People(), photo_ids, CAST))
        _nothing_written(engine)
    finally:
        engine.dispose()


def test_after_db_upgrade_people_never_take_a_shared_folder(webapp_db_url: str) -> None:
    assert cli_db_upgrade(webapp_db_url).returncode == 0
    engine = make_engine(webapp_db_url)
    try:
        trip_id, photo_ids = add_cast_trip(engine)
        write_result(engine, trip_id, cast_outcomes(People(), photo_ids, CAST))
        links = folder_links(engine, trip_id)
        snapshot = snapshot_rows(engine)
        people = {tag for tag, tag_num, _name in snapshot["tags"] if tag_num >= 0}
        assert len(people) == 3  # A, B, C
        assert not people & SHARED_TAG_IDS
        assert links[photo_ids[4]] == {NO_FACE_TAG_ID}  # the photo without a face
        assert OTHERS_TAG_ID in links[photo_ids[5]]  # D, seen once
        assert _shared_rows(engine)[:2] == [(1, -2, "no faces"), (2, -1, "others")]
    finally:
        engine.dispose()


def test_a_soft_deleted_trip_is_not_grouped(webapp_db_url: str, tmp_path: Path) -> None:
    """trips_trip.deleted_at set (the app's soft delete): no write touches its folders, and
    its job ends `skipped` with the reason, before any model is loaded."""
    assert cli_db_upgrade(webapp_db_url).returncode == 0
    engine = make_engine(webapp_db_url)
    try:
        trip_id, photo_ids = add_cast_trip(engine)
        with engine.begin() as conn:  # the app's delete: a timestamp, the rows stay
            conn.execute(
                text("UPDATE trips_trip SET deleted_at = :now WHERE id = :id"),
                {"now": datetime(2026, 12, 5, 9, 30), "id": trip_id},
            )
        with pytest.raises(TripDeleted, match=f"trip {trip_id} was deleted in the web app"):
            write_result(engine, trip_id, cast_outcomes(People(), photo_ids, CAST))
        _nothing_written(engine)

        summary = run_trip_job(
            sessions=make_sessionmaker(engine),
            store=LocalStore(tmp_path),
            pipeline=None,  # type: ignore[arg-type]  # a deleted trip needs no model
            settings=ServiceSettings(),
            trip_id=trip_id,
            task_id="deleted-trip",
        )
        assert "was deleted in the web app" in summary["skipped"]
        with Session(engine) as session:
            job = session.scalars(select(Job).where(Job.celery_task_id == "deleted-trip")).one()
            assert job.status == "skipped" and job.finished_at is not None
            assert job.error is not None and "not grouped" in job.error
        _nothing_written(engine)
    finally:
        engine.dispose()


def test_a_file_key_that_is_not_a_uuid_is_read_and_refused(
    db_backend: str, request: pytest.FixtureRequest
) -> None:
    """char(32) holds any text: the row reads, its photo says why it is refused."""
    if db_backend == "postgresql":
        pytest.skip("PostgreSQL's uuid column cannot hold a value that is not a UUID")
    url = request.getfixturevalue("fresh_db_url")
    engine = make_engine(url)
    try:
        trip_id, photo_ids = add_cast_trip(engine, 1)
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO photos_photo (created_at, updated_at, file_key, file_name, url, "
                    "is_sorted_yolo, trip_id) VALUES "
                    "('2024-05-01', '2024-05-01', '../../etc/passwd', 'x.jpg', '', 0, :trip)"
                ),
                {"trip": trip_id},
            )
        with Session(engine) as session:
            photos = trip_photos(session=session, trip_id=trip_id)
            good, bad = sorted(photos, key=lambda p: p.id)
            assert good.key_error is None and good.s3_key == str(good.file_key)
            assert bad.file_key == "../../etc/passwd"
            assert bad.key_error is not None and "not a UUID" in bad.key_error
            with pytest.raises(InvalidFileKey, match="etc/passwd"):
                bad.s3_key  # noqa: B018  (the property raises)
    finally:
        engine.dispose()


SEOUL = ZoneInfo("Asia/Seoul")


def _local(engine: Engine, table: str, row_id: int, column: str) -> datetime:
    """A datetime column as the web app (USE_TZ = False, TIME_ZONE Asia/Seoul) reads it."""
    with engine.connect() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(text("SET TIME ZONE 'Asia/Seoul'"))  # what Django sets per connection
            sql = f"SELECT {column}::timestamp FROM {table} WHERE id = :id"
        else:
            sql = f"SELECT {column} FROM {table} WHERE id = :id"
        value = conn.execute(text(sql), {"id": row_id}).scalar_one()
    if isinstance(value, str):  # SQLite
        value = datetime.fromisoformat(value)
    assert value.tzinfo is None
    return value


def test_times_follow_the_web_app_time_zone(db_backend: str, fresh_db_url: str) -> None:
    """AFTERTRIP_WEBAPP_TIME_ZONE=Asia/Seoul: what the app writes and what the worker writes
    read alike, in Seoul local time."""
    engine = make_engine(fresh_db_url, time_zone="Asia/Seoul")
    try:
        trip_id, (photo_id,) = add_cast_trip(engine, 1)
        # The app writes its photo now, the way Django does with USE_TZ = False.
        app_now = datetime.now(SEOUL).replace(tzinfo=None, microsecond=0)
        with engine.begin() as conn:
            if engine.dialect.name == "postgresql":
                conn.execute(text("SET LOCAL TIME ZONE 'Asia/Seoul'"))
            conn.execute(
                text("UPDATE photos_photo SET created_at = :t WHERE id = :id"),
                {"t": app_now, "id": photo_id},
            )
        with Session(engine) as session:
            photo = session.get(Photo, photo_id)
            assert photo is not None
            # Read back as the instant the app meant.
            assert photo.created_at == app_now.replace(tzinfo=SEOUL)
            job = start_job(
                session=session, trip_id=trip_id, mode="missing", task_id=None, models=[]
            )
            job_id, started = job.id, job.started_at
        assert started is not None
        # Stored as Seoul local time: the column reads as the instant in Seoul...
        assert _local(engine, "aftertrip_job", job_id, "started_at") == started.astimezone(
            SEOUL
        ).replace(tzinfo=None)
        # ...right next to the app's own time (not 9 hours off, as naive UTC would be).
        gap = _local(engine, "aftertrip_job", job_id, "started_at") - _local(
            engine, "photos_photo", photo_id, "created_at"
        )
        assert timedelta(0) <= gap < timedelta(minutes=10)
    finally:
        engine.dispose()


def test_the_default_time_zone_is_the_backend_s(monkeypatch: pytest.MonkeyPatch) -> None:
    """AfterTrip's Django runs USE_TZ = False, TIME_ZONE = 'Asia/Seoul': the worker's
    default, in the setting and in every engine made without one."""
    monkeypatch.delenv("AFTERTRIP_WEBAPP_TIME_ZONE", raising=False)
    assert ServiceSettings().webapp_time_zone == DEFAULT_TIME_ZONE == "Asia/Seoul"
    engine = make_engine("sqlite://")
    try:
        assert engine_time_zone(engine.dialect) == SEOUL
    finally:
        engine.dispose()


def test_a_time_zone_that_does_not_exist_is_refused() -> None:
    with pytest.raises(ValueError, match="AFTERTRIP_WEBAPP_TIME_ZONE='Seoul'"):
        ServiceSettings(webapp_time_zone="Seoul")
    assert ServiceSettings(webapp_time_zone="Asia/Seoul").webapp_time_zone == "Asia/Seoul"


def _import_trip(url: str, tmp: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    album = tmp / "album"
    album.mkdir(exist_ok=True)
    (album / "a.jpg").write_bytes(b"not decoded by import-trip")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AFTERTRIP_")}
    env.update(
        AFTERTRIP_DATABASE_URL=url,
        AFTERTRIP_PHOTO_ROOT=str(tmp / "photos"),
        PYTHONPATH=str(ROOT),
        COLUMNS="400",
    )
    return subprocess.run(
        [sys.executable, "-m", "tasks.cli", "import-trip", str(album), *extra],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _trip_count(url: str) -> int:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(text("SELECT count(*) FROM trips_trip")).scalar_one())
    finally:
        engine.dispose()


def test_import_trip_refuses_web_app_data_it_did_not_make(
    db_backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    url = request.getfixturevalue("fresh_db_url")
    if db_backend == "sqlite":
        # A development stack: import-trip's own trips never block the next import.
        for _ in range(2):
            done = _import_trip(url, tmp_path)
            assert done.returncode == 0, done.stdout + done.stderr
        engine = make_engine(url)
        try:
            add_cast_trip(engine, 1)  # a trip the app made
        finally:
            engine.dispose()
        reason = "1 trip(s) that import-trip did not make"
    else:
        reason = "django_migrations"  # the real schema: a web app's database
    before = _trip_count(url)
    refused = _import_trip(url, tmp_path)
    assert refused.returncode == 2
    assert reason in refused.stdout and "--allow-webapp-data" in refused.stdout
    assert _trip_count(url) == before  # nothing added
    allowed = _import_trip(url, tmp_path, "--allow-webapp-data")
    assert allowed.returncode == 0, allowed.stdout + allowed.stderr
    assert _trip_count(url) == before + 1
