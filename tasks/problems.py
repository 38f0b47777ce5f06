"""Setup mistakes said in one or two lines: what is wrong, where, and what to do.

A command that opens the database or the broker with a wrong password, an unknown database,
a server that is not running, or tables that are not there yet would otherwise end in a
traceback of a hundred lines (SQLAlchemy's, the driver's, kombu's). `explain` turns those
errors into a short message naming the URL (password hidden) and the fix; `tasks.cli.main`
prints it, and the worker logs it at start-up. Errors it does not recognise are left alone.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

if TYPE_CHECKING:
    from tasks.settings import ServiceSettings

WORKER_TABLE_PREFIX = "aftertrip_"

_LOGIN = (
    "access denied",
    "password authentication failed",
    "authentication failed",
    "role ",
    "no password supplied",
)
_UNKNOWN_DATABASE = ("unknown database", 'database "', "does not exist")
_UNREACHABLE = (
    "can't connect",
    "connection refused",
    "could not connect",
    "is the server running",
    "timeout expired",
    "timed out",
    "name or service not known",
    "could not translate host name",
    "no route to host",
    "lost connection",
)
_MISSING_TABLE = (
    re.compile(r"table '[^'.]*\.?([\w$]+)' doesn't exist", re.IGNORECASE),  # MySQL/MariaDB
    re.compile(r'relation "([\w$.]+)" does not exist', re.IGNORECASE),  # PostgreSQL
    re.compile(r"no such table: ([\w$.]+)", re.IGNORECASE),  # SQLite
)

MIGRATE_FIRST = (
    "run the backend's `python manage.py migrate` first, then `aftertrip-faces db upgrade` "
    "(a development database without Django: `aftertrip-faces db upgrade --with-webapp-tables`)"
)


def hide_password(url: str) -> str:
    """`url` with its password shown as ***, for messages and logs."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<a URL that does not parse>"
    if parts.password is None:
        return url
    netloc = parts.netloc.rpartition("@")
    user = netloc[0].partition(":")[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[2]}"))


def _reason(exc: BaseException) -> str:
    """The driver's own words, one line: what the database or Redis said."""
    orig = getattr(exc, "orig", None) or exc
    args: tuple[object, ...] = getattr(orig, "args", ())
    if len(args) == 2 and isinstance(args[0], int) and isinstance(args[1], str):
        text = args[1]  # PyMySQL: (code, message)
    else:
        text = str(orig)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    fatal = [line for line in lines if "FATAL:" in line]
    line = (fatal or lines or [type(orig).__name__])[0]
    line = line.split("FATAL:", 1)[-1].strip()
    return line.removeprefix("connection failed:").strip()


def missing_table(exc: BaseException) -> str | None:
    """The table a "does not exist" error is about, if it is one."""
    text = str(getattr(exc, "orig", None) or exc)
    for pattern in _MISSING_TABLE:
        found = pattern.search(text)
        if found:
            return found.group(1).rpartition(".")[2]
    return None


def explain_database_error(exc: BaseException, database_url: str) -> str | None:
    """One or two lines for a database error a setup mistake causes, or None."""
    import sqlalchemy.exc

    where = hide_password(database_url)
    if isinstance(exc, sqlalchemy.exc.NoSuchModuleError | sqlalchemy.exc.ArgumentError):
        return (
            f"AFTERTRIP_DATABASE_URL={where} is not a database URL this worker can open "
            f"({exc}):\nwrite it as postgresql+psycopg://user:password@host/db or "
            "mysql+pymysql://user:password@host/db"
        )
    if not isinstance(exc, sqlalchemy.exc.DBAPIError):
        return None
    table = missing_table(exc)
    if table is not None:
        if table.startswith(WORKER_TABLE_PREFIX):
            return (
                f"the worker's table {table} is not in the database {where}:\n"
                "run `aftertrip-faces db upgrade` (after the backend's `manage.py migrate`)"
            )
        return f"the web app's table {table} is not in the database {where}:\n{MIGRATE_FIRST}"
    if not isinstance(exc, sqlalchemy.exc.OperationalError | sqlalchemy.exc.InterfaceError):
        return None
    reason = _reason(exc)
    low = reason.lower()
    if any(word in low for word in _UNKNOWN_DATABASE) and "role " not in low:
        return (
            f"the database in AFTERTRIP_DATABASE_URL={where} does not exist ({reason}):\n"
            "create it (the web app's database, after its `manage.py migrate`) or fix the name"
        )
    if any(word in low for word in _LOGIN):
        return (
            f"cannot log in to the database {where} ({reason}):\n"
            "fix the user or password in AFTERTRIP_DATABASE_URL (the web app's DATABASES)"
        )
    if "unable to open database file" in low:
        return (
            f"cannot open the SQLite file of AFTERTRIP_DATABASE_URL={where} ({reason}):\n"
            "does its folder exist, and may this user write there?"
        )
    if any(word in low for word in _UNREACHABLE):
        return (
            f"cannot reach the database {where} ({reason}):\n"
            "is the server running there? Fix the host and port in AFTERTRIP_DATABASE_URL"
        )
    return None


def explain_broker_error(exc: BaseException, settings: ServiceSettings) -> str | None:
    """One or two lines for Redis (broker, results, locks) that cannot be reached, or None."""
    import kombu.exceptions
    import redis.exceptions

    if not isinstance(exc, kombu.exceptions.OperationalError | redis.exceptions.ConnectionError):
        return None
    urls = dict.fromkeys(
        hide_password(url) for url in (settings.broker_url, settings.effective_lock_url)
    )
    if isinstance(exc, redis.exceptions.AuthenticationError) or "auth" in str(exc).lower():
        fix = "fix the password in AFTERTRIP_BROKER_URL (and AFTERTRIP_RESULT_BACKEND)"
    else:
        fix = "start Redis, or point AFTERTRIP_BROKER_URL (and AFTERTRIP_RESULT_BACKEND) at it"
    return f"cannot reach Redis at {', '.join(urls)} ({_reason(exc)}):\n{fix}"


def explain(exc: BaseException, settings: ServiceSettings) -> str | None:
    """What to tell a person about `exc` if a setup mistake caused it (else None)."""
    try:
        return explain_database_error(exc, settings.database_url) or explain_broker_error(
            exc, settings
        )
    except ImportError:  # the embedded install has no SQLAlchemy, Celery or redis
        return None


def database_problem(settings: ServiceSettings) -> str | None:
    """What keeps the worker from using its database, in one or two lines, or None: one
    connection and one read of the worker's job table (run at a worker's start-up)."""
    from sqlalchemy import text

    engine = settings.database_engine()
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1 FROM aftertrip_job WHERE 1 = 0"))
    except Exception as exc:  # noqa: BLE001 - every error is reported, none is raised
        return (
            explain(exc, settings) or f"the database {hide_password(settings.database_url)}: {exc}"
        )
    finally:
        engine.dispose()
    return None
