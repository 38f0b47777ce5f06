"""Engines, sessions and migrations: one engine per process, Alembic run from code."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from db.types import DEFAULT_TIME_ZONE, set_time_zone
from db.watchdog import StatementWatchdog, connect_args
from worker.errors import AfterTripError

logger = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"

VERSION_TABLE = "aftertrip_alembic_version"
"""Alembic's bookkeeping table, prefixed so it never clashes with another tool's."""

SQLITE_BUSY_TIMEOUT_MS = 30_000


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # Let SQLAlchemy, not the driver, say when transactions begin (see _sqlite_begin).
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    # SQLite ignores foreign keys (and their ON DELETE) unless asked, per connection.
    cursor.execute("PRAGMA foreign_keys=ON")
    # The web app and the worker write the same file: wait for its lock instead of failing.
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.close()


SQLITE_BEGIN_OPTION = "aftertrip_sqlite_begin"
"""Execution option naming how a SQLite transaction begins: "DEFERRED" (default) or "IMMEDIATE"."""


def _sqlite_begin(conn: Connection) -> None:
    mode = conn.get_execution_options().get(SQLITE_BEGIN_OPTION, "DEFERRED")
    if mode not in ("DEFERRED", "IMMEDIATE"):
        raise ValueError(f"{SQLITE_BEGIN_OPTION} must be DEFERRED or IMMEDIATE, not {mode!r}")
    conn.exec_driver_sql(f"BEGIN {mode}")


def make_engine(
    url: str,
    *,
    time_zone: str = DEFAULT_TIME_ZONE,
    connect_timeout: float = 10.0,
    statement_timeout: float | None = None,
    **kwargs: Any,
) -> Engine:
    """An engine for `url`: SQLite gets foreign keys, a busy timeout and real transactions
    (BEGIN emitted by SQLAlchemy); servers get pool_pre_ping and a connect timeout, and with
    `statement_timeout` a connection that goes silent fails within about that many seconds
    (socket timeouts on MySQL/MariaDB, keepalives and `StatementWatchdog` on PostgreSQL).

    `time_zone` is the web app's (AFTERTRIP_WEBAPP_TIME_ZONE): naive datetime columns
    (MySQL/MariaDB/SQLite) are written and read as local time in it; see `db.types.UTCDateTime`.
    Extra keyword arguments go to `sqlalchemy.create_engine`.
    """
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        engine = create_engine(parsed, **kwargs)
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin)
    else:
        # A Celery worker idles between jobs longer than servers keep connections open.
        kwargs.setdefault("pool_pre_ping", True)
        limits = connect_args(
            backend, connect_timeout=connect_timeout, statement_timeout=statement_timeout
        )
        kwargs["connect_args"] = {**limits, **kwargs.get("connect_args", {})}
        engine = create_engine(parsed, **kwargs)
        if statement_timeout and backend == "postgresql":
            StatementWatchdog(statement_timeout).attach(engine)
    set_time_zone(engine, time_zone)
    return engine


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    """Sessions that keep loaded attributes after commit (no surprise reloads in a task)."""
    return sessionmaker(engine, expire_on_commit=False)


def alembic_config(url: str | None = None) -> Config:
    """An Alembic Config for the migrations shipped in this package (no alembic.ini needed)."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if url is not None:
        # ConfigParser interpolates '%': a password with one must be doubled.
        config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade(url: str, revision: str = "head", *, shared_folders: bool = True) -> list[int]:
    """Apply the worker's migrations up to `revision`, then create the shared folders.

    This is what `aftertrip-faces db upgrade` runs. The web app's migrations create its tables
    but not the two folders every trip shares (photos_tagface id 1 "no faces", id 2
    "others"); unless `shared_folders` is False, they are added where missing (idempotent; on
    PostgreSQL the id sequence is moved past them) once photos_tagface exists. The web app's
    tables are otherwise never touched. Returns the ids of the folders created.
    Raises `db.webapp.SharedFoldersError` when id 1 or 2 holds a person folder, and
    `WebAppTablesMissing` (before anything is written, not even Alembic's version table) when
    the web app's migrations have not run: the worker's tables point at the app's.
    """
    _require_webapp_tables(url)
    _run_alembic(url, lambda config: command.upgrade(config, revision))
    if not shared_folders:
        return []
    return _ensure_shared_folders(url)


class WebAppTablesMissing(AfterTripError):
    """`db upgrade` before the web app's own migrations: the tables the worker's point at are
    not there yet."""

    def __init__(self, url: str, missing: list[str]) -> None:
        where = make_url(url).render_as_string(hide_password=True)
        super().__init__(
            f"the web app's tables {', '.join(missing)} are not in {where}: nothing was "
            "changed.\nRun the backend's `python manage.py migrate` first, then "
            "`aftertrip-faces db upgrade` (a development database without Django: "
            "`aftertrip-faces db upgrade --with-webapp-tables`)"
        )
        self.missing = missing


def _require_webapp_tables(url: str) -> None:
    from sqlalchemy import inspect

    from db.webapp import WEBAPP_TABLES

    engine = make_engine(url)
    try:
        present = set(inspect(engine).get_table_names())
    finally:
        engine.dispose()
    missing = [table for table in WEBAPP_TABLES if table not in present]
    if missing:
        raise WebAppTablesMissing(url, missing)


def _ensure_shared_folders(url: str) -> list[int]:
    from sqlalchemy import inspect

    from db.webapp import TagFace, ensure_shared_folders

    engine = make_engine(url)
    try:
        if not inspect(engine).has_table(TagFace.__tablename__):
            logger.warning(
                "photos_tagface does not exist yet: the shared folders were not created; "
                "run the web app's migrations, then `aftertrip-faces db upgrade` again"
            )
            return []
        with Session(engine) as session, session.begin():
            return ensure_shared_folders(session=session)
    finally:
        engine.dispose()


def downgrade(url: str, revision: str) -> None:
    """Revert the worker's migrations down to `revision` ("base" drops every worker table)."""
    _run_alembic(url, lambda config: command.downgrade(config, revision))


def current_revision(url: str) -> str | None:
    """The worker schema's Alembic revision in the database at `url`, None if never migrated."""
    from alembic.runtime.migration import MigrationContext

    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE})
            return context.get_current_revision()
    finally:
        engine.dispose()


def _run_alembic(url: str, action: Any) -> None:
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            config = alembic_config(url)
            config.attributes["connection"] = conn
            action(config)
    finally:
        engine.dispose()
    logger.info("migrations applied", extra={"url": make_url(url).render_as_string()})
