"""Column types shared by the web app's tables and the worker's, portable across backends."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import BigInteger, DateTime, Integer, Uuid
from sqlalchemy.dialects import mysql
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator, TypeEngine

# SQLite only auto-increments a column declared exactly INTEGER PRIMARY KEY; Django's
# BigAutoField is "integer ... AUTOINCREMENT" there and bigint everywhere else.
BigId = BigInteger().with_variant(Integer(), "sqlite")

# Django's UUIDField: native `uuid` on PostgreSQL, char(32) hex without dashes elsewhere.
# SQLAlchemy's non-native Uuid writes exactly that hex; on reads it accepts hex with or
# without dashes, so a MariaDB >= 10.7 column that Django 5 created as native UUID reads
# correctly too (writing to one would need dashes; the worker never writes file_key).
DjangoUUID = Uuid(as_uuid=True, native_uuid=False).with_variant(Uuid(as_uuid=True), "postgresql")

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
