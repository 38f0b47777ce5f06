"""What every db/ module shares: the transaction rules, the trip lock, and small helpers."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, tzinfo
from typing import TypeVar

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.session import SQLITE_BEGIN_OPTION
from db.types import engine_time_zone, local_time
from db.webapp import Trip, check_shared_folders

MAX_ERROR_CHARS = 10_000
CHUNK = 500
"""Ids per IN (...) list: well under every backend's limit on bound parameters."""


class TripNotFound(LookupError):
    """No trips_trip row has this id."""

    def __init__(self, trip_id: int) -> None:
        super().__init__(f"trip {trip_id} does not exist")
        self.trip_id = trip_id


class TripDeleted(TripNotFound):
    """The trip is soft-deleted in the web app (trips_trip.deleted_at set): it is not grouped."""

    def __init__(self, trip_id: int, deleted_at: datetime, zone: tzinfo = UTC) -> None:
        LookupError.__init__(
            self,
            f"trip {trip_id} was deleted in the web app (trips_trip.deleted_at "
            f"{local_time(deleted_at, zone)}): not grouped, no folder or link written",
        )
        self.trip_id = trip_id
        self.deleted_at = deleted_at


def require_no_transaction(session: Session, name: str) -> None:
    """Refuse a session with a transaction open: `name` runs one of its own."""
    if session.in_transaction():
        raise ValueError(
            f"{name} runs its own transaction: pass a Session with none open "
            "(call session.commit() after earlier reads)"
        )


def begin_immediate(session: Session) -> None:
    """SQLite: take the write lock at BEGIN. A transaction that reads first and writes later
    fails at once (no busy wait) if another process is writing meanwhile."""
    session.connection(execution_options={SQLITE_BEGIN_OPTION: "IMMEDIATE"})


@contextmanager
def trip_write(
    session: Session, trip_id: int, name: str, *, lock: bool = True, check_shared: bool = True
) -> Iterator[None]:
    """One write transaction of a trip: commits when the block ends, rolls everything back if
    it raises. The session must have none open.

    With `lock`, the trip's row is locked: two writes of one trip then run one after the
    other, and (on MySQL) the snapshot starts after the other's commit, and a trip the web
    app soft-deleted meanwhile raises `TripDeleted` before anything is written; with `check_shared`
    the shared folders are checked too (else a person could be filed as "no faces").
    Without `lock`, the trip must exist.
    """
    require_no_transaction(session, name)
    with session.begin():
        begin_immediate(session)
        if lock:
            found = session.scalars(
                select(Trip).where(Trip.id == trip_id).with_for_update()
            ).first()
            if found is None:
                raise TripNotFound(trip_id)
            if found.deleted_at is not None:
                raise TripDeleted(
                    trip_id, found.deleted_at, engine_time_zone(session.get_bind().dialect)
                )
            if check_shared:
                check_shared_folders(session=session)
        elif session.scalar(select(Trip.id).where(Trip.id == trip_id)) is None:
            raise TripNotFound(trip_id)
        yield


_T = TypeVar("_T")


def chunks(items: list[_T], size: int = CHUNK) -> Iterable[list[_T]]:
    """`items` in lists of at most `size`."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


def set_if_changed(obj: object, name: str, value: object) -> None:
    """Set an attribute only when its value changes.

    Assigning an equal value still marks the row dirty for some types; skipping it lets a
    repeated write issue no UPDATE at all."""
    if getattr(obj, name) != value:
        setattr(obj, name, value)
