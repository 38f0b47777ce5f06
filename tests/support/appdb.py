"""The web app's own database connection, as its driver opens it (what Django wraps): the
connection `aftertrip_client.request_trip` / `trip_state` are given in the tests."""

from __future__ import annotations

import sqlite3
from typing import Any

from sqlalchemy.engine import make_url


def app_connection(url: str, *, autocommit: bool = False) -> Any:
    """A DB-API connection to `url`: sqlite3, psycopg (PostgreSQL) or PyMySQL (MariaDB);
    `autocommit` as Django's connection is outside a transaction."""
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        return sqlite3.connect(str(parsed.database), isolation_level=None if autocommit else "")
    if backend == "postgresql":
        import psycopg

        return psycopg.connect(
            host=parsed.host, port=parsed.port or 5432, user=parsed.username,
            password=parsed.password or "", dbname=parsed.database, autocommit=autocommit,
        )  # fmt: skip
    import pymysql

    return pymysql.connect(
        host=parsed.host or "127.0.0.1", port=parsed.port or 3306, user=parsed.username or "root",
        password=parsed.password or "", database=parsed.database, charset="utf8mb4",
        autocommit=autocommit,
    )  # fmt: skip
