"""Column types shared by the web app's tables and the worker's, portable across backends."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import BigInteger, DateTime, Integer, String, Uuid
from sqlalchemy.dialects import mysql
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator, TypeEngine

# SQLite only auto-increments a column declared exactly INTEGER PRIMARY KEY; Django's
# BigAutoField is "integer ... AUTOINCREMENT" there and bigint everywhere else.
BigId = BigInteger().with_variant(Integer(), "sqlite")


class DjangoUUIDType(TypeDecorator[Any]):
    """Django's UUIDField, read leniently: a `uuid.UUID`, or the raw text when it is not one.

    Native `uuid` on PostgreSQL; `char(32)` hex without dashes elsewhere (what Django writes;
    UUIDs are written that way here too). On MySQL/MariaDB/SQLite the column holds any text,
    and one row's bad value (`../../etc/passwd`) must not make every read of its trip raise:
    such a value is returned as the `str` it is, and `db.webapp.Photo.key_error` says why it
    is refused. Reads hex with or without dashes, so a MariaDB >= 10.7 column that Django 5
    created as native UUID reads correctly too (the worker never writes file_key).
    """

    impl = String(32)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "postgresql":
            return dialect.type_descriptor(Uuid(as_uuid=True))
        return dialect.type_descriptor(String(32))

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        if isinstance(value, uuid.UUID) and dialect.name != "postgresql":
            return value.hex
        return value

    def process_result_value(self, value: Any, dialect: Dialect) -> uuid.UUID | str | None:
        if value is None or isinstance(value, uuid.UUID):
            return value
        try:
            return uuid.UUID(str(value))
        except ValueError:
            return str(value)


DjangoUUID = DjangoUUIDType()

# Like Django with USE_TZ: microsecond datetimes, stored in UTC.
_MYSQL_DATETIME = mysql.DATETIME(fsp=6)


def utcnow() -> datetime:
    """The current time, timezone-aware in UTC."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp stored in UTC and always read back timezone-aware.

    PostgreSQL keeps `timestamp with time zone`; MySQL/MariaDB (`datetime(6)`) and SQLite
    store naive UTC, the way Django does with USE_TZ=True, so the same value reads back
    equal on every backend.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name in ("mysql", "mariadb"):
            return dialect.type_descriptor(_MYSQL_DATETIME)
        return dialect.type_descriptor(DateTime(timezone=True))

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: pass a timezone-aware one (UTC)")
        value = value.astimezone(UTC)
        if dialect.name != "postgresql":
            value = value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)
