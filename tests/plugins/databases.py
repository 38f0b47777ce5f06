"""Databases for tests on SQLite, PostgreSQL and MariaDB, each test starting from a clean state.

PostgreSQL and MariaDB test databases start from the web app's REAL schema: the dump of what
the AfterTrip backend's own `manage.py migrate` creates (`../shared/webapp-schema/
postgresql.sql` / `mariadb.sql`, every table of the app, no rows) is loaded into an empty
database, then the worker's `db upgrade` runs on top (`db.session.upgrade`: its migrations,
then the shared folders 1 and 2, which the app's migrations do not create). The fixtures
seed no folder themselves. When ../shared is absent (a fresh clone outside the team) they fall
back to `db.webapp.create_webapp_tables`, the project's own copy of the four tables the worker
uses; under CI=true the dumps are required. SQLite (the embedded default) always uses that
copy: the app has no SQLite dump. A pytest plugin (tests/conftest.py): a test asks for the
fixtures by name; `add_trip`, `fresh_database` and the other helpers are imported from here.

- `db_backend` is parametrised over the three backends, so every test that uses one of the
  fixtures below runs on each.
- `db_url` / `db_engine`: a prepared database whose rows are all deleted before each test
  (then `db upgrade` puts folders 1 and 2 back). The database itself is created and migrated
  once per test session and backend, because doing that per test costs over a second on
  MariaDB. Row ids keep counting across tests: assume none but folders 1 and 2.
- `fresh_db_url`: a brand-new prepared database of its own (for a test that alters the
  schema, or runs processes that must not share one); `empty_db_url`: a brand-new database
  with nothing in it; `webapp_db_url`: a brand-new database with the web app's tables only,
  as its own migrations leave it (no shared folders, no worker tables).
- `add_trip` adds the trip's `accounts_group` row too where that table exists (the real
  schema has a foreign key to it).

PostgreSQL and MariaDB are the loopback servers (override with AFTERTRIP_TEST_POSTGRES_URL /
AFTERTRIP_TEST_MARIADB_URL); when one is down its tests are skipped with the reason, and
fail under CI=true. AFTERTRIP_WEBAPP_SCHEMA_DIR overrides where the dumps are read from.
"""

from __future__ import annotations

import atexit
import os
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import Connection, Engine, create_engine, inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from db.models import Base
from db.session import make_engine, upgrade
from db.webapp import Photo, Trip, WebAppBase, create_webapp_tables
from tests.support.files import ROOT

WEBAPP_SCHEMA_DIR = Path(
    os.environ.get("AFTERTRIP_WEBAPP_SCHEMA_DIR", ROOT.parent / "shared" / "webapp-schema")
)
"""Where the web app's schema dumps are: ../shared/webapp-schema of the team's checkout."""


def backend_pins() -> str:
    """The backend's pinned requirements (../shared/webapp-schema/backend-requirements.txt)
    with its commented-out celery and redis lines switched on, as the README tells the
    backend's developers to do; skips the test with the reason when the file is absent,
    fails under CI=true."""
    pins_file = WEBAPP_SCHEMA_DIR / "backend-requirements.txt"
    if not pins_file.is_file():
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but the backend's pins are missing at {pins_file}")
        pytest.skip(f"needs the backend's pinned requirements at {pins_file}")
    return "".join(
        line.removeprefix("# ") if line.startswith(("# celery==", "# redis==")) else line
        for line in pins_file.read_text().splitlines(keepends=True)
    )


WEBAPP_SCHEMA_FILES = {"postgresql": "postgresql.sql", "mariadb": "mariadb.sql"}

POSTGRES_SERVER_URL = os.environ.get(
    "AFTERTRIP_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
MARIADB_SERVER_URL = os.environ.get(
    "AFTERTRIP_TEST_MARIADB_URL", "mysql+pymysql://root@127.0.0.1:3306/test?charset=utf8mb4"
)
SERVER_URLS = {"postgresql": POSTGRES_SERVER_URL, "mariadb": MARIADB_SERVER_URL}

BACKENDS = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param("postgresql", id="postgresql", marks=pytest.mark.services),
    pytest.param("mariadb", id="mariadb", marks=pytest.mark.services),
]

_unreachable: dict[str, str | None] = {}


def _admin_engine(backend: str) -> Engine:
    # AUTOCOMMIT: CREATE/DROP DATABASE cannot run inside a transaction on PostgreSQL.
    return create_engine(
        SERVER_URLS[backend],
        isolation_level="AUTOCOMMIT",
        connect_args={"connect_timeout": 3},
        poolclass=NullPool,
    )


def require_server(backend: str) -> None:
    """Skip (or fail under CI=true) when the backend's loopback server does not answer."""
    if backend == "sqlite":
        return
    if backend not in _unreachable:
        engine = _admin_engine(backend)
        try:
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            _unreachable[backend] = None
        except Exception as exc:  # any driver error means "not there"
            _unreachable[backend] = f"{type(exc).__name__}: {exc}".splitlines()[0]
        finally:
            engine.dispose()
    reason = _unreachable[backend]
    if reason is None:
        return
    where = make_url(SERVER_URLS[backend]).render_as_string()
    message = f"{backend} at {where} is not reachable ({reason})"
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true but {message}")
    pytest.skip(message)


def _disconnect_others(conn: Connection, backend: str, name: str) -> None:
    """End other sessions on database `name`: a connection a test forgot would hold locks."""
    if backend == "postgresql":
        conn.execute(
            text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = :db AND pid <> pg_backend_pid()"
            ),
            {"db": name},
        )
    elif backend == "mariadb":
        ids = conn.execute(
            text(
                "SELECT id FROM information_schema.processlist "
                "WHERE db = :db AND id <> CONNECTION_ID()"
            ),
            {"db": name},
        ).scalars()
        for connection_id in list(ids):
            try:
                conn.execute(text(f"KILL {int(connection_id)}"))
            except OperationalError:
                pass  # it ended by itself meanwhile


@contextmanager
def fresh_database(backend: str, tmp_path: Path) -> Iterator[str]:
    """The URL of a new, empty database on `backend`, dropped afterwards."""
    require_server(backend)
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path / f'aftertrip-{uuid.uuid4().hex[:8]}.db'}"
        return
    name = f"aftertrip_test_{uuid.uuid4().hex[:12]}"
    admin = _admin_engine(backend)
    try:
        with admin.connect() as conn:
            conn.execute(text(f"CREATE DATABASE {name}"))
        yield (
            make_url(SERVER_URLS[backend]).set(database=name).render_as_string(hide_password=False)
        )
    finally:
        with admin.connect() as conn:
            _disconnect_others(conn, backend, name)
            conn.execute(text(f"DROP DATABASE IF EXISTS {name}"))
        admin.dispose()


def webapp_schema_file(backend: str) -> Path | None:
    """The web app's schema dump for `backend`, None when ../shared is absent (not under CI)."""
    name = WEBAPP_SCHEMA_FILES.get(backend)
    if name is None:
        return None
    path = WEBAPP_SCHEMA_DIR / name
    if path.is_file():
        return path
    if os.environ.get("CI") == "true":
        raise FileNotFoundError(
            f"CI=true but the web app's schema dump is missing at {path}: "
            "the tests start from the AfterTrip backend's real tables"
        )
    return None


def require_webapp_schema(backend: str) -> Path:
    """The dump for `backend`: skipped with a reason when ../shared is absent, failed under CI."""
    try:
        path = webapp_schema_file(backend)
    except FileNotFoundError as exc:
        pytest.fail(str(exc))
    if path is None:
        pytest.skip(
            f"needs the web app's schema dump at {WEBAPP_SCHEMA_DIR / WEBAPP_SCHEMA_FILES[backend]}"
        )
    return path


def _backend_of(url: str) -> str:
    name = make_url(url).get_backend_name()
    return "mariadb" if name == "mysql" else name


def _mariadb_statements(script: str) -> list[str]:
    """The statements of a `mysqldump --no-data` script (no procedures, one per `;` line end)."""
    statements, current = [], []
    for line in script.splitlines():
        # The sandbox-mode line MariaDB >= 10.5.25 dumps begin with: a client command that
        # older clients reject and that means nothing to the server.
        if line.startswith("/*M!999999") or line.startswith("--") or not line.strip():
            continue
        current.append(line)
        if line.rstrip().endswith(";"):
            statements.append("\n".join(current))
            current = []
    if current:
        statements.append("\n".join(current))
    return statements


def load_webapp_schema(url: str, dump: Path) -> None:
    """Load a schema dump of the web app into the (empty) database at `url`.

    Executed through the driver, not the psql/mariadb clients, so no client version matters:
    PostgreSQL takes the whole script in one simple-protocol call (psql's backslash
    meta-commands, such as `\\restrict`, are dropped); MariaDB one statement at a time.
    """
    script = dump.read_text(encoding="utf-8")
    engine = make_engine(url, poolclass=NullPool)
    try:
        with engine.begin() as conn:
            if _backend_of(url) == "postgresql":
                kept = [line for line in script.splitlines() if not line.startswith("\\")]
                conn.exec_driver_sql("\n".join(kept))
            else:
                for statement in _mariadb_statements(script):
                    conn.exec_driver_sql(statement)
    finally:
        engine.dispose()


def create_webapp_schema(url: str) -> None:
    """The web app's tables as its own migrations leave them: the real dump where there is one.

    Falls back to `create_webapp_tables` (the project's copy of the four tables the worker
    uses) on SQLite and where ../shared is absent.
    """
    dump = webapp_schema_file(_backend_of(url))
    if dump is not None:
        load_webapp_schema(url, dump)
        return
    engine = make_engine(url)
    try:
        create_webapp_tables(engine)
    finally:
        engine.dispose()


def prepare_database(url: str) -> None:
    """The web app's tables (see `create_webapp_schema`), then `db upgrade` on top."""
    create_webapp_schema(url)
    upgrade(url)


def cli_db_upgrade(url: str, **env: str) -> subprocess.CompletedProcess[str]:
    """`aftertrip-faces db upgrade` on `url` as an operator runs it (extra AFTERTRIP_* in env)."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("AFTERTRIP_")}
    environ.update(env, AFTERTRIP_DATABASE_URL=url, PYTHONPATH=str(ROOT), COLUMNS="400")
    return subprocess.run(
        [sys.executable, "-m", "tasks.cli", "db", "upgrade"],
        cwd=ROOT,
        env=environ,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _tables_to_clear() -> list[str]:
    """Every worker and web-app table the tests write, children first (no foreign key trips)."""
    tables = [t.name for t in reversed(Base.metadata.sorted_tables)]
    tables += [t.name for t in reversed(WebAppBase.metadata.sorted_tables)]
    # Rows the tests add to the real schema's other tables (see add_trip), and the app's
    # tables that point at photos.
    return ["photos_photo_tag_yolo", *tables, "accounts_group"]


def reset_database(url: str) -> None:
    """Delete every row of the web-app and worker tables; `db upgrade` puts folders 1, 2 back."""
    parsed = make_url(url)
    backend = _backend_of(url)
    engine = make_engine(url)
    try:
        existing = set(inspect(engine).get_table_names())
        with engine.begin() as conn:
            _disconnect_others(conn, backend, str(parsed.database))
            for table in _tables_to_clear():
                if table in existing:
                    conn.execute(text(f"DELETE FROM {table}"))
    finally:
        engine.dispose()
    upgrade(url)


class _PreparedDatabases:
    """One prepared database per backend for the whole test run, made on first use.

    Module state rather than a session fixture, so that importing `db_url` is all a test
    module needs; the databases are dropped when the test process exits.
    """

    def __init__(self) -> None:
        self.urls: dict[str, str] = {}
        self.stack = ExitStack()
        self.tmp_path: Path | None = None

    def url(self, backend: str) -> str:
        if backend not in self.urls:
            if self.tmp_path is None:
                self.tmp_path = Path(self.stack.enter_context(tempfile.TemporaryDirectory()))
            url = self.stack.enter_context(fresh_database(backend, self.tmp_path))
            prepare_database(url)
            self.urls[backend] = url
        return self.urls[backend]

    def close(self) -> None:
        self.stack.close()
        self.urls.clear()
        self.tmp_path = None


_PREPARED = _PreparedDatabases()
atexit.register(_PREPARED.close)


@pytest.fixture(params=BACKENDS)
def db_backend(request: pytest.FixtureRequest) -> str:
    """sqlite, postgresql or mariadb."""
    return str(request.param)


@pytest.fixture
def empty_db_url(db_backend: str, tmp_path: Path) -> Iterator[str]:
    """A brand-new database with nothing in it, dropped after the test."""
    with fresh_database(db_backend, tmp_path) as url:
        yield url


@pytest.fixture
def webapp_db_url(empty_db_url: str) -> str:
    """A brand-new database with the web app's tables only: no shared folders, no worker tables."""
    create_webapp_schema(empty_db_url)
    return empty_db_url


@pytest.fixture
def fresh_db_url(empty_db_url: str) -> str:
    """A brand-new database of its own with the web app's tables and the worker's migrations."""
    prepare_database(empty_db_url)
    return empty_db_url


@pytest.fixture
def db_url(db_backend: str) -> str:
    """A prepared database (web-app tables, worker migrations) with no rows but folders 1, 2."""
    require_server(db_backend)
    url = _PREPARED.url(db_backend)
    reset_database(url)
    return url


@pytest.fixture
def db_engine(db_url: str) -> Iterator[Engine]:
    """An engine on `db_url`, disposed after the test."""
    engine = make_engine(db_url)
    try:
        yield engine
    finally:
        engine.dispose()


def ensure_group(session: Session, group_id: int) -> None:
    """The `accounts_group` row a trip points at, where the real schema has that table."""
    if not inspect(session.connection()).has_table("accounts_group"):
        return
    found = session.execute(
        text("SELECT 1 FROM accounts_group WHERE id = :id"), {"id": group_id}
    ).first()
    if found is None:
        now = datetime.now(UTC).replace(tzinfo=None)
        session.execute(
            text(
                "INSERT INTO accounts_group (id, created_at, updated_at, name) "
                "VALUES (:id, :now, :now, :name)"
            ),
            {"id": group_id, "now": now, "name": f"group {group_id}"},
        )


def add_trip(session: Session, *, place: str = "Jeju", group_id: int = 1) -> Trip:
    """A trip row as the web app would create it (flushed, so it has an id)."""
    ensure_group(session, group_id)
    trip = Trip(place=place, group_id=group_id)
    session.add(trip)
    session.flush()
    return trip


def add_photos(session: Session, trip_id: int, count: int) -> list[Photo]:
    """`count` photo rows of a trip, named photo-<n>.jpg (flushed, ids ascending)."""
    photos = []
    for n in range(count):
        key = uuid.uuid4()
        photo = Photo(
            trip_id=trip_id,
            file_key=key,
            file_name=f"photo-{n}.jpg",
            url=f"https://example.invalid/{key}",
            taken_at=datetime(2024, 5, 1, 9, n % 60, tzinfo=UTC),
        )
        session.add(photo)
        session.flush()
        photos.append(photo)
    return photos
