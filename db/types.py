"""Column types shared by the web app's tables and the worker's, portable across backends."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, tzinfo
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import BigInteger, DateTime, Integer, String, Uuid
from sqlalchemy.dialects import mysql
from sqlalchemy.engine import Dialect, Engine
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

# Django's DateTimeField on MySQL/MariaDB: microsecond datetimes.
_MYSQL_DATETIME = mysql.DATETIME(fsp=6)

DEFAULT_TIME_ZONE = "Asia/Seoul"
"""The zone of naive datetime columns unless told otherwise: the AfterTrip backend's
TIME_ZONE (USE_TZ = False), the default of AFTERTRIP_WEBAPP_TIME_ZONE."""

TIME_ZONE_ATTRIBUTE = "aftertrip_time_zone"
"""The attribute of an engine's dialect holding the zone of its naive datetime columns."""


def utcnow() -> datetime:
    """The current time, timezone-aware in UTC."""
    return datetime.now(UTC)


def set_time_zone(engine: Engine, zone: str | tzinfo) -> None:
    """Store `engine`'s naive datetimes as local time in `zone` (the web app's TIME_ZONE)."""
    setattr(engine.dialect, TIME_ZONE_ATTRIBUTE, ZoneInfo(zone) if isinstance(zone, str) else zone)


def engine_time_zone(dialect: Dialect) -> tzinfo:
    """The zone naive datetime columns hold on this dialect's engine (`DEFAULT_TIME_ZONE`
    unless set)."""
    zone: tzinfo | None = getattr(dialect, TIME_ZONE_ATTRIBUTE, None)
    return zone if zone is not None else ZoneInfo(DEFAULT_TIME_ZONE)


def local_time(moment: datetime | None, zone: tzinfo, *, date: bool = True) -> str:
    """`moment` in `zone`, labelled with the zone, for people: "2026-12-05 14:03:07 KST";
    "-" for None. Every time the worker prints or stores for people is written this way."""
    if moment is None:
        return "-"
    local = moment.astimezone(zone)
    name = local.strftime("%Z")
    if not name or name[0] in "+-":  # a zone without an abbreviation: its offset
        name = "UTC" + local.strftime("%z")[:3] + ":" + local.strftime("%z")[3:]
    return local.strftime("%Y-%m-%d %H:%M:%S " if date else "%H:%M:%S ") + name


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp: always timezone-aware in Python (read back in UTC), stored the web app's way.

    The one time rule of the worker, for its own tables and the web app's alike:
    - PostgreSQL (`timestamp with time zone`) stores the instant;
    - MySQL/MariaDB (`datetime(6)`) and SQLite store naive local time in the engine's zone
      (`set_time_zone`, from AFTERTRIP_WEBAPP_TIME_ZONE): what Django writes with
      USE_TZ = False and that TIME_ZONE (AfterTrip: Asia/Seoul, the default), and naive
      UTC, Django's USE_TZ = True layout, when the zone is UTC.
    So the worker's job times read right next to the app's own, and a naive value the app
    wrote reads back as the instant it meant.
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
        if dialect.name == "postgresql":
            return value.astimezone(UTC)
        return value.astimezone(engine_time_zone(dialect)).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=engine_time_zone(dialect))
        return value.astimezone(UTC)
