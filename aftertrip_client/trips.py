"""Ask for a trip's grouping durably, and read where a trip stands: no task id to keep.

`request_trip` writes a row into the worker's `aftertrip_request` table on the app's own
database connection, inside the app's transaction (an upload and its request commit
together, or neither does), and once that commits sends a nudge to the worker with a short
broker timeout and no retries. A broker that is down costs the request at most about half a
second and loses nothing: the worker's sweep finds the row and carries it out once the
broker is back. Requests for a trip that arrive while one of its jobs is queued or running
are carried out together by one follow-up job (`all` wins over `missing`).

`trip_state` reads the worker's tables on the same connection: queued, sorting (stage and
percent), done (when, with the counts), failed (why).

Python 3.8: no `zoneinfo` is assumed (the app's zone falls back on pytz, which Django
installs), and the SQL is plain DB-API with `%s` placeholders (sqlite3: `?`).
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone, tzinfo
from typing import TYPE_CHECKING, Any

from aftertrip_client.names import (
    FACES_QUEUE,
    MODES,
    REQUEST_TABLE,
    TAKE_REQUESTS,
    stage_percent,
    trip_id_problem,
)

if TYPE_CHECKING:
    from celery import Celery

logger = logging.getLogger("aftertrip_client")

DEFAULT_BROKER_URL = "redis://127.0.0.1:6379/0"
DEFAULT_TIME_ZONE = "Asia/Seoul"

NUDGE_TIMEOUT = 0.3
"""Seconds the nudge may wait to connect to the broker, and again for its answer."""

_nudge_lock = threading.Lock()
_nudge_app: Celery | None = None


def setting(name: str, default: str) -> str:
    """Django setting `name` when Django is configured, else the environment variable."""
    try:
        from django.conf import settings  # type: ignore[import-not-found,unused-ignore]

        if settings.configured and getattr(settings, name, None):
            return str(getattr(settings, name))
    except ImportError:
        pass
    return os.environ.get(name) or default


def check_request(trip_id: object, mode: object) -> None:
    """ValueError unless `trip_id` can be a trips_trip.id and `mode` is a mode."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    problem = trip_id_problem(trip_id)
    if problem is not None:
        raise ValueError(problem)


# ---------------------------------------------------------------------------- connections


def _django_connection(using: str | None) -> Any:
    from django.db import DEFAULT_DB_ALIAS, connections  # type: ignore[import-not-found,unused-ignore]

    return connections[using or DEFAULT_DB_ALIAS]


def _is_django(connection: Any) -> bool:
    return hasattr(connection, "vendor") and hasattr(connection, "alias")


def _vendor(connection: Any) -> str:
    """'mysql', 'postgresql' or 'sqlite': a Django connection's vendor, or a DB-API
    connection's driver (PyMySQL, mysqlclient, psycopg 2 or 3, sqlite3)."""
    if _is_django(connection):
        return str(connection.vendor)
    module = type(connection).__module__.split(".")[0].lower()
    if module in ("pymysql", "mysqldb", "mysql", "mariadb", "_mysql"):
        return "mysql"
    if module.startswith("psycopg"):
        return "postgresql"
    if module in ("sqlite3", "_sqlite3"):
        return "sqlite"
    raise ValueError(f"not a Django connection or a known DB-API connection: {connection!r}")


def _sql(connection: Any, statement: str) -> str:
    return statement.replace("%s", "?") if _vendor(connection) == "sqlite" else statement


def app_time_zone() -> tzinfo:
    """AFTERTRIP_WEBAPP_TIME_ZONE (Django setting or environment; default Asia/Seoul): the
    zone the app reads its naive times in (its TIME_ZONE with USE_TZ = False)."""
    name = setting("AFTERTRIP_WEBAPP_TIME_ZONE", DEFAULT_TIME_ZONE)
    try:
        from zoneinfo import ZoneInfo  # Python >= 3.9

        return ZoneInfo(name)
    except ImportError:
        import pytz  # type: ignore[import-untyped,unused-ignore]  # Django 3.2's own dependency

        return pytz.timezone(name)  # type: ignore[no-any-return,unused-ignore]


def _local_naive(value: datetime | str | None) -> datetime | None:
    """A database time as the app reads it: naive, in its zone. Naive values (MariaDB's
    datetime, which the worker writes in that zone) are as stored."""
    if isinstance(value, str):  # sqlite3 hands back the text the worker stored
        value = datetime.fromisoformat(value)
    if value is None or value.tzinfo is None:
        return value
    return value.astimezone(app_time_zone()).replace(tzinfo=None)


def _now_for(connection: Any) -> datetime:
    """Now, as this connection should store it: what Django passes (its own rule), else the
    instant for PostgreSQL's timestamptz and naive app-zone time for a datetime column."""
    if _is_django(connection):
        from django.utils import timezone as django_timezone  # type: ignore[import-not-found,unused-ignore]

        return django_timezone.now()  # type: ignore[no-any-return,unused-ignore]
    now = datetime.now(timezone.utc)
    if _vendor(connection) == "postgresql":
        return now
    return now.astimezone(app_time_zone()).replace(tzinfo=None)


# ---------------------------------------------------------------------------- requests


def request_trip(
    trip_id: int,
    mode: str = "missing",
    *,
    connection: Any = None,
    using: str | None = None,
    app: Celery | None = None,
    queue: str | None = None,
    task_id: str | None = None,
) -> str:
    """Ask for the trip's grouping: a row in the worker's `aftertrip_request`, written in
    the current transaction; returns at once (within about half a second, whatever the
    broker's state). Returns the id the nudge task gets.

    With Django (the default: `connections[using]`), the worker is nudged once the
    transaction commits (at once outside one); nothing is asked if it rolls back. With a
    DB-API `connection` (PyMySQL, psycopg, sqlite3), commit it yourself, then call
    `notify_worker(trip_id)`; without that call the worker's sweep still finds the row
    (AFTERTRIP_REQUEST_SWEEP_SECONDS later). Either way a broker that cannot be reached is
    logged (logger `aftertrip_client`), never raised: the row waits for the sweep.
    """
    check_request(trip_id, mode)
    django = connection is None or _is_django(connection)
    conn = _django_connection(using) if connection is None else connection
    statement = f"INSERT INTO {REQUEST_TABLE} (trip_id, mode, requested_at) VALUES (%s, %s, %s)"
    with _cursor(conn) as cursor:
        cursor.execute(_sql(conn, statement), [trip_id, mode, _now_for(conn)])
    nudge_id = task_id or str(uuid.uuid4())
    if django:
        from django.db import transaction  # type: ignore[import-not-found,unused-ignore]

        def nudge() -> None:
            notify_worker(trip_id, app=app, queue=queue, task_id=nudge_id)

        transaction.on_commit(nudge, using=getattr(conn, "alias", using))
    logger.info("grouping of trip %s requested (%s)", trip_id, mode)
    return nudge_id


class _cursor:
    """`with _cursor(conn) as cursor`: closes the cursor (DB-API cursors are not all
    context managers; Django's are)."""

    def __init__(self, connection: Any) -> None:
        self.cursor = connection.cursor()

    def __enter__(self) -> Any:
        return self.cursor

    def __exit__(self, *exc: object) -> None:
        self.cursor.close()


def _fast_app() -> Celery:
    """The client's own Celery app for nudges: short broker timeouts, no retries."""
    global _nudge_app
    with _nudge_lock:
        if _nudge_app is None:
            from celery import Celery

            app = Celery(
                "aftertrip-client-nudge",
                broker=setting("AFTERTRIP_BROKER_URL", DEFAULT_BROKER_URL),
                set_as_current=False,
            )
            app.conf.update(
                task_serializer="json",
                accept_content=["json"],
                broker_connection_timeout=NUDGE_TIMEOUT,
                broker_connection_retry=False,
                broker_connection_max_retries=0,
                broker_transport_options={
                    "socket_connect_timeout": NUDGE_TIMEOUT,
                    "socket_timeout": NUDGE_TIMEOUT,
                    "max_retries": 0,
                },
                task_publish_retry=False,
            )
            _nudge_app = app
        return _nudge_app


def notify_worker(
    trip_id: int,
    *,
    app: Celery | None = None,
    queue: str | None = None,
    task_id: str | None = None,
) -> bool:
    """Tell the worker the trip has a committed request (sends `aftertrip.take_requests`
    without retries); False, logged, when the broker cannot be reached: the worker's sweep
    then carries the request out once the broker is back. Never raises for the broker.

    `app`: a Celery app of the web app's own (give it short broker timeouts: its own
    settings decide how long a send to a broker that is down waits); by default the
    client's, which waits at most NUDGE_TIMEOUT to connect and again for an answer.
    """
    celery_app = app or _fast_app()
    try:
        celery_app.send_task(
            TAKE_REQUESTS,
            args=(trip_id,),
            queue=queue or setting("AFTERTRIP_QUEUE", FACES_QUEUE),
            task_id=task_id,
            retry=False,
        )
    except Exception as exc:  # any broker failure: the row is committed, the sweep has it
        logger.warning(
            "worker not nudged for trip %s (%s: %s); the request waits for the worker's sweep",
            trip_id,
            type(exc).__name__,
            exc,
        )
        return False
    return True


# ---------------------------------------------------------------------------- state


@dataclass(frozen=True)
class TripState:
    """Where a trip's grouping stands, read from the worker's tables.

    state: "never" (no job and no request), "queued" (asked for, no job running yet),
    "sorting" (a job runs: `stage` "models", "analyze" or "group", `done`/`total` steps,
    `percent` 0-100), "done" (`at` is when it ended, `counts` its counts), "failed"
    (`error` says why) or "skipped" (the trip was deleted in the app; `error` says so).
    at: naive, in the app's zone (AFTERTRIP_WEBAPP_TIME_ZONE): when the request was made
    (queued), the job started (sorting) or ended (done, failed, skipped).
    queued_next: another grouping is asked for after the running or last one.
    """

    trip_id: int
    state: str
    stage: str | None = None
    done: int = 0
    total: int = 0
    percent: int = 0
    at: datetime | None = None
    counts: dict[str, Any] | None = None
    error: str | None = None
    job_id: int | None = None
    queued_next: bool = False

    @property
    def busy(self) -> bool:
        """Queued or sorting: a page polls again."""
        return self.state in ("queued", "sorting")

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (the time as ISO text)."""
        out = dict(self.__dict__)
        out["at"] = self.at.isoformat(timespec="seconds") if self.at is not None else None
        out["busy"] = self.busy
        return out


_JOB_COLUMNS = (
    "id, status, stage, progress_done, progress_total, started_at, finished_at, counts, "
    "error, celery_task_id, created_at"
)
_FINISHED = {"succeeded": "done", "failed": "failed", "skipped": "skipped"}


def trip_state(trip_id: int, connection: Any = None, *, using: str | None = None) -> TripState:
    """Where the trip's grouping stands (see `TripState`), read on the app's connection
    (Django's `connections[using]` by default, or a DB-API connection)."""
    problem = trip_id_problem(trip_id)
    if problem is not None:
        raise ValueError(problem)
    conn = _django_connection(using) if connection is None else connection
    with _cursor(conn) as cursor:
        cursor.execute(
            _sql(
                conn,
                f"SELECT {_JOB_COLUMNS} FROM aftertrip_job WHERE trip_id = %s "
                "ORDER BY id DESC LIMIT 1",
            ),
            [trip_id],
        )
        job = cursor.fetchone()
        cursor.execute(
            _sql(conn, f"SELECT requested_at, claimed_by FROM {REQUEST_TABLE} WHERE trip_id = %s"),
            [trip_id],
        )
        requests: list[Any] = list(cursor.fetchall())
    latest_task = job[9] if job is not None else None
    # Open: not taken yet, or taken by a task whose job has not started (or is not the latest).
    open_times = [
        row[0] for row in requests if row[1] is None or latest_task is None or row[1] != latest_task
    ]
    waiting = [row[0] for row in requests if row[1] is None]
    first_open = _local_naive(min(open_times)) if open_times else None
    if job is not None and job[1] in ("running", "retrying"):
        stage, done, total = job[2], int(job[3] or 0), int(job[4] or 0)
        return TripState(
            trip_id,
            "sorting",
            stage=stage,
            done=done,
            total=total,
            percent=stage_percent(stage, done, total),
            at=_local_naive(job[5]),
            error=job[8] if job[1] == "retrying" else None,
            job_id=int(job[0]),
            queued_next=bool(waiting),
        )
    if open_times or (job is not None and job[1] == "queued"):
        at = first_open or (_local_naive(job[10]) if job is not None else None)
        return TripState(trip_id, "queued", at=at, job_id=None)
    if job is None:
        return TripState(trip_id, "never")
    state = _FINISHED.get(str(job[1]), str(job[1]))
    return TripState(
        trip_id,
        state,
        stage=None,
        percent=100 if state == "done" else 0,
        at=_local_naive(job[6]),
        counts=_counts(job[7]) if state == "done" else None,
        error=job[8] if state != "done" else None,
        job_id=int(job[0]),
    )


def _counts(value: Any) -> dict[str, Any] | None:
    """The job's JSON counts (a dict from PostgreSQL's json, text from MariaDB's)."""
    if value is None:
        return None
    if isinstance(value, (bytes, str)):
        import json

        loaded = json.loads(value)
        return loaded if isinstance(loaded, dict) else None
    return dict(value) if isinstance(value, dict) else None
