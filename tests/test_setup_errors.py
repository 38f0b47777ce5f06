"""Setup mistakes a newcomer makes, as they type the commands: one or two lines that say
what is wrong and what to do, never a traceback, never the password.

Real servers: the loopback PostgreSQL and MariaDB (a wrong password, a user or database
that does not exist, a port nobody listens on), the web app's real schema, Redis not there.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from sqlalchemy import inspect
from sqlalchemy.engine import make_url

from db.session import make_engine
from tests.plugins.databases import SERVER_URLS, require_server
from tests.support.files import ROOT
from tests.support.services import free_port, no_face_jpeg

AFTERTRIP_FACES = str(Path(sys.executable).with_name("aftertrip-faces"))


def _run(args: list[str], tmp: Path, **settings: str) -> subprocess.CompletedProcess[str]:
    """`aftertrip-faces ARGS` at 100 columns, with these AFTERTRIP_* settings only."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AFTERTRIP_")}
    env.update({f"AFTERTRIP_{k.upper()}": v for k, v in settings.items()})
    env.update(PYTHONPATH=str(ROOT), COLUMNS="100", AFTERTRIP_PHOTO_ROOT=str(tmp))
    return subprocess.run(
        [AFTERTRIP_FACES, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )


def _plain_error(done: subprocess.CompletedProcess[str]) -> list[str]:
    """The command failed with at most two lines, no traceback: those lines."""
    output = (done.stdout + done.stderr).strip()
    assert done.returncode == 2, output
    assert "Traceback" not in output, output
    lines = output.splitlines()
    assert 1 <= len(lines) <= 2 and lines[0].startswith("error: "), output
    return lines


def _url(backend: str, **parts: object) -> str:
    return make_url(SERVER_URLS[backend]).set(**parts).render_as_string(hide_password=False)


def _photo_folder(tmp: Path) -> Path:
    folder = tmp / "album"
    folder.mkdir()
    (folder / "one.jpg").write_bytes(no_face_jpeg())
    return folder


@pytest.mark.services
@pytest.mark.parametrize("backend", ["postgresql", "mariadb"])
def test_every_database_command_names_a_login_that_fails(backend: str, tmp_path: Path) -> None:
    """MariaDB: a wrong password; PostgreSQL (trust on loopback): a user that does not exist."""
    require_server(backend)
    url = (
        _url(backend, password="not-the-password")
        if backend == "mariadb"
        else _url(backend, username=f"nobody_{uuid.uuid4().hex[:6]}", password="not-the-password")
    )
    album = _photo_folder(tmp_path)
    for args in (
        ["db", "upgrade"],
        ["status", "--trip", "1"],
        ["rerun", "--inline", "--trip", "1"],
        ["rerun", "--forget-corrections", "--trip", "1"],
        ["import-trip", str(album)],
    ):
        lines = _plain_error(_run(args, tmp_path, database_url=url))
        assert lines[0].startswith("error: cannot log in to the database "), (args, lines)
        assert ":***@127.0.0.1" in lines[0] and "not-the-password" not in "".join(lines)
        assert lines[1] == (
            "fix the user or password in AFTERTRIP_DATABASE_URL (the web app's DATABASES)"
        )


@pytest.mark.services
@pytest.mark.parametrize("backend", ["postgresql", "mariadb"])
def test_an_unknown_database_and_a_server_not_there_are_named(backend: str, tmp_path: Path) -> None:
    require_server(backend)
    missing = f"no_such_db_{uuid.uuid4().hex[:6]}"
    lines = _plain_error(
        _run(["status", "--trip", "1"], tmp_path, database_url=_url(backend, database=missing))
    )
    assert f"the database in AFTERTRIP_DATABASE_URL={_url(backend, database=missing)}" in lines[0]
    assert "does not exist" in lines[0] and "create it" in lines[1]

    nobody = _url(backend, port=free_port())
    lines = _plain_error(_run(["db", "upgrade"], tmp_path, database_url=nobody))
    assert lines[0].startswith(f"error: cannot reach the database {nobody} (")
    assert "Connection refused" in lines[0] and "is the server running there?" in lines[1]


def test_db_upgrade_before_the_web_app_migrate_says_so_and_changes_nothing(
    empty_db_url: str, tmp_path: Path
) -> None:
    done = _run(["db", "upgrade"], tmp_path, database_url=empty_db_url)
    lines = _plain_error(done)
    assert "the web app's tables trips_trip, photos_tagface, photos_photo" in lines[0]
    assert "nothing was changed" in lines[0]
    assert "`python manage.py migrate` first" in lines[1] and "--with-webapp-tables" in lines[1]
    engine = make_engine(empty_db_url)
    try:
        assert inspect(engine).get_table_names() == []  # no stray aftertrip_alembic_version
    finally:
        engine.dispose()


def test_status_before_db_upgrade_says_to_run_it(webapp_db_url: str, tmp_path: Path) -> None:
    lines = _plain_error(_run(["status", "--trip", "1"], tmp_path, database_url=webapp_db_url))
    assert lines[0].startswith("error: the worker's table aftertrip_job is not in the database")
    assert lines[1] == (
        "run `aftertrip-faces db upgrade` (after the backend's `manage.py migrate`)"
    )


def test_rerun_with_redis_not_there_names_it(tmp_path: Path) -> None:
    port = free_port()
    broker = f"redis://:hush@127.0.0.1:{port}/0"
    lines = _plain_error(_run(["rerun", "--trip", "7"], tmp_path, broker_url=broker))
    assert lines[0].startswith(f"error: cannot reach Redis at redis://:***@127.0.0.1:{port}/0 (")
    assert "hush" not in "".join(lines)
    assert lines[1].startswith("start Redis, or point AFTERTRIP_BROKER_URL")


def test_trip_ids_out_of_range_are_refused_before_the_database(tmp_path: Path) -> None:
    for bad in (str(2**70), "0", "-5"):
        done = _run(["status", "--trip", bad], tmp_path, database_url="sqlite:////nonexistent/x")
        assert done.returncode == 2
        assert f"trip_id must be between 1 and 9223372036854775807 (trips_trip.id), not {bad}" in (
            done.stderr
        )
