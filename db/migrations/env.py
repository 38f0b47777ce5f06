"""Alembic environment for the worker's tables only (prefix `aftertrip_`).

Run from code by `db.session.upgrade(url)`, which hands over an open connection in
`config.attributes["connection"]`. The Alembic CLI works too:
`alembic -c db/alembic.ini -x url=postgresql+psycopg://... upgrade head`
(or set AFTERTRIP_DATABASE_URL).
"""

from __future__ import annotations

import os
from logging.config import fileConfig
from typing import Any

from alembic import context
from sqlalchemy.engine import Connection

from db.models import Base
from db.session import VERSION_TABLE, make_engine

config = context.config
if config.config_file_name is not None:
    # Only the CLI (alembic.ini) sets up logging; called from code, the caller's stays.
    fileConfig(config.config_file_name, disable_existing_loggers=False)
target_metadata = Base.metadata


def include_name(name: str | None, type_: str, parent_names: Any) -> bool:
    """Autogenerate compares only the worker's tables: the web app's belong to Django."""
    if type_ == "table":
        return name is not None and name.startswith("aftertrip_") and name != VERSION_TABLE
    return True


def _url() -> str:
    url = context.get_x_argument(as_dictionary=True).get("url")
    url = url or config.get_main_option("sqlalchemy.url")
    url = url or os.environ.get("AFTERTRIP_DATABASE_URL")
    if not url:
        raise RuntimeError("no database URL: pass `-x url=...` or set AFTERTRIP_DATABASE_URL")
    return url


def _configure(**kwargs: Any) -> None:
    context.configure(
        target_metadata=target_metadata,
        version_table=VERSION_TABLE,
        include_name=include_name,
        compare_type=True,
        **kwargs,
    )


def _run_on(connection: Connection) -> None:
    # SQLite cannot ALTER most things: later migrations get batch (copy-and-move) mode.
    _configure(connection=connection, render_as_batch=connection.dialect.name == "sqlite")
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_offline() -> None:
    """Emit the SQL instead of running it (`alembic upgrade head --sql`)."""
    _configure(url=_url(), literal_binds=True, dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Run the migrations on the given connection, or on a new one to the configured URL."""
    connection = config.attributes.get("connection")
    if connection is not None:
        _run_on(connection)
        return
    engine = make_engine(_url())
    try:
        with engine.begin() as conn:
            _run_on(conn)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
