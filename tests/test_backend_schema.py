# ruff: noqa: F811  (pytest fixtures imported from tests.dbfixtures are parameters here)
"""The AfterTrip backend's own tables (../shared/webapp-schema) as the worker finds them.

On the app's fresh database `photos_tagface` is empty: the two shared folders come from
`aftertrip-faces db upgrade`, and no job writes without them.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from sqlalchemy import Engine, func, select, text
from sqlalchemy.orm import Session

from db import crud
from db.models import Face, PhotoAnalysis
from db.session import make_engine, upgrade
from db.webapp import (
    NO_FACE_TAG_ID,
    OTHERS_TAG_ID,
    SHARED_TAG_IDS,
    InvalidFileKey,
    PhotoTagFace,
    SharedFoldersError,
    TagFace,
)
from tests.dbfixtures import (  # noqa: F401  (fixtures)
    db_backend,
    empty_db_url,
    fresh_db_url,
    webapp_db_url,
)
from tests.servicefixtures import ROOT
from tests.test_db import CAST, People, _links, _outcomes, _snapshot, _trip, _write


def _shared_rows(engine: Engine) -> list[tuple[int, int, str]]:
    with Session(engine) as session:
        rows = session.execute(
            select(TagFace.id, TagFace.tag_num, TagFace.custom_name).order_by(TagFace.id)
        )
        return [tuple(row) for row in rows]  # type: ignore[misc]


def _db_upgrade(url: str) -> subprocess.CompletedProcess[str]:
    """`aftertrip-faces db upgrade` as an operator types it (through `python -m`)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AFTERTRIP_")}
    env["AFTERTRIP_DATABASE_URL"] = url
    env["PYTHONPATH"] = str(ROOT)
    env["COLUMNS"] = "400"  # one message per line
    return subprocess.run(
        [sys.executable, "-m", "tasks.cli", "db", "upgrade"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_db_upgrade_creates_the_shared_folders_once(webapp_db_url: str, db_backend: str) -> None:
    engine = make_engine(webapp_db_url)
    try:
        assert _shared_rows(engine) == [] or db_backend == "sqlite"
        done = _db_upgrade(webapp_db_url)
        assert done.returncode == 0, done.stdout + done.stderr
        assert _shared_rows(engine) == [(1, -2, "no faces"), (2, -1, "others")]
        again = _db_upgrade(webapp_db_url)  # idempotent
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


def test_db_upgrade_refuses_a_person_folder_at_a_shared_id(webapp_db_url: str) -> None:
    engine = make_engine(webapp_db_url)
    try:
        with engine.begin() as conn:
            conn.execute(text("DELETE FROM photos_tagface"))  # SQLite's copy has them
            conn.execute(
                text("INSERT INTO photos_tagface (id, tag_num, custom_name) VALUES (1, 0, 'Mina')")
            )
        done = _db_upgrade(webapp_db_url)
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
        trip_id, photo_ids = _trip(engine)
        with pytest.raises(SharedFoldersError, match="aftertrip-faces db upgrade"):
            _write(engine, trip_id, _outcomes(People(), photo_ids, CAST))
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
            _write(engine, trip_id, _outcomes(People(), photo_ids, CAST))
        _nothing_written(engine)
    finally:
        engine.dispose()


def test_after_db_upgrade_people_never_take_a_shared_folder(webapp_db_url: str) -> None:
    assert _db_upgrade(webapp_db_url).returncode == 0
    engine = make_engine(webapp_db_url)
    try:
        trip_id, photo_ids = _trip(engine)
        _write(engine, trip_id, _outcomes(People(), photo_ids, CAST))
        links = _links(engine, trip_id)
        snapshot = _snapshot(engine)
        people = {tag for tag, tag_num, _name in snapshot["tags"] if tag_num >= 0}
        assert len(people) == 3  # A, B, C
        assert not people & SHARED_TAG_IDS
        assert links[photo_ids[4]] == {NO_FACE_TAG_ID}  # the photo without a face
        assert OTHERS_TAG_ID in links[photo_ids[5]]  # D, seen once
        assert _shared_rows(engine)[:2] == [(1, -2, "no faces"), (2, -1, "others")]
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
        trip_id, photo_ids = _trip(engine, 1)
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
            photos = crud.trip_photos(session=session, trip_id=trip_id)
            good, bad = sorted(photos, key=lambda p: p.id)
            assert good.key_error is None and good.s3_key == str(good.file_key)
            assert bad.file_key == "../../etc/passwd"
            assert bad.key_error is not None and "not a UUID" in bad.key_error
            with pytest.raises(InvalidFileKey, match="etc/passwd"):
                bad.s3_key  # noqa: B018  (the property raises)
    finally:
        engine.dispose()
