"""Database connections that go silent fail within a bounded time instead of hanging a job.

A connection can go silent without being reset: a NAT or firewall drops its state, a proxy
freezes, a server's host stalls. New connections work, so nothing else notices; the client
waits for an answer forever (libpq has no read timeout, and TCP keepalives are not sent while
a request is unacknowledged... or are answered by a middlebox that still holds the socket).

- PyMySQL has socket timeouts of its own: `read_timeout` and `write_timeout` are set to the
  statement timeout.
- PostgreSQL (psycopg) gets TCP keepalives (a dead host is noticed in about a minute),
  `tcp_user_timeout` (bytes sent and never acknowledged: a link that drops packets) and
  `StatementWatchdog`: a statement, or the pool's pre-ping, still waiting for the server after
  `timeout` seconds has its connection's socket shut down, so the driver sees the connection
  lost, SQLAlchemy drops it from the pool, and the job retries as after any dropped
  connection. (The pre-ping runs on the raw driver connection, outside the engine's statement
  events: before it was watched, a pooled connection gone silent hung the next checkout for
  good, the heartbeat's included.)
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from typing import Any

from sqlalchemy import Engine, event

logger = logging.getLogger(__name__)


def connect_args(
    backend: str, *, connect_timeout: float, statement_timeout: float | None
) -> dict[str, Any]:
    """Driver arguments that bound connecting and, with `statement_timeout`, waiting for the
    server, per database backend."""
    limits: dict[str, Any] = {}
    if backend in ("mysql", "mariadb", "postgresql"):
        limits["connect_timeout"] = max(1, round(connect_timeout))
    if not statement_timeout:
        return limits
    if backend in ("mysql", "mariadb"):
        limits["read_timeout"] = limits["write_timeout"] = max(1, round(statement_timeout))
    elif backend == "postgresql":
        idle = max(1, round(min(30.0, statement_timeout / 2)))
        limits.update(
            keepalives=1,
            keepalives_idle=idle,
            keepalives_interval=max(1, idle // 3),
            keepalives_count=3,
            tcp_user_timeout=max(1000, round(statement_timeout * 1000)),
        )
    return limits


class StatementWatchdog:
    """Shuts down the socket of a connection whose statement has waited over `timeout` s.

    One daemon thread per process (started on first use, again after a fork), woken every
    `timeout / 10` seconds at most; a statement costs two dictionary writes."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._interval = max(0.05, min(5.0, timeout / 10))
        self._lock = threading.Lock()
        self._running: dict[int, tuple[float, int]] = {}  # id(dbapi conn) -> (deadline, fd)
        self._thread: threading.Thread | None = None
        self._pid = 0
        self.broken = 0

    def attach(self, engine: Engine) -> None:
        """Watch every statement `engine` runs, and its pool's pre-pings."""
        event.listen(engine, "before_cursor_execute", self._before)
        event.listen(engine, "after_cursor_execute", self._after)
        event.listen(engine, "handle_error", self._error)
        dialect = engine.dialect
        ping = dialect.do_ping

        def watched_ping(dbapi_connection: Any) -> bool:
            self._start(dbapi_connection)
            try:
                return bool(ping(dbapi_connection))
            finally:
                self._forget(dbapi_connection)

        # The pool's pre-ping runs on the driver's connection, where no engine event fires.
        dialect.do_ping = watched_ping  # type: ignore[method-assign]

    def _before(self, conn: Any, _cursor: Any, *_args: Any) -> None:
        self._start(conn.connection.dbapi_connection)

    def _start(self, dbapi: Any) -> None:
        fileno = getattr(dbapi, "fileno", None)
        if fileno is None:
            return
        try:
            fd = int(fileno())
        except Exception:  # a closed connection: the driver will say so itself
            return
        with self._lock:
            self._running[id(dbapi)] = (time.monotonic() + self.timeout, fd)
        self._ensure_thread()

    def _after(self, conn: Any, *_args: Any) -> None:
        self._forget(conn.connection.dbapi_connection)

    def _error(self, context: Any) -> None:
        if context.connection is not None and context.connection.connection is not None:
            self._forget(context.connection.connection.dbapi_connection)

    def _forget(self, dbapi: Any) -> None:
        with self._lock:
            self._running.pop(id(dbapi), None)

    def _ensure_thread(self) -> None:
        if self._thread is not None and self._pid == os.getpid() and self._thread.is_alive():
            return
        with self._lock:
            if self._pid != os.getpid():  # a forked child inherits no thread, only the table
                self._running.clear()
            self._pid = os.getpid()
            self._thread = threading.Thread(target=self._watch, name="db-watchdog", daemon=True)
            self._thread.start()

    def _watch(self) -> None:
        while True:
            time.sleep(self._interval)
            now = time.monotonic()
            # Under the lock: a statement that ends meanwhile waits here, so its connection
            # cannot be closed (and its descriptor reused) before the socket is shut.
            with self._lock:
                late = [(k, fd) for k, (deadline, fd) in self._running.items() if deadline < now]
                for key, fd in late:
                    del self._running[key]
                    self._break(fd)

    def _break(self, fd: int) -> None:
        """Shut the connection's socket down: the reader blocked on it wakes to a closed
        connection (shutdown acts on the socket, so a duplicate descriptor reaches it)."""
        try:
            dup = socket.socket(fileno=os.dup(fd))
        except OSError:
            return  # closed meanwhile
        with contextlib.closing(dup), contextlib.suppress(OSError):
            dup.shutdown(socket.SHUT_RDWR)
        self.broken += 1
        logger.warning(
            "a database statement waited %.0f s for the server: its connection was closed so "
            "the job retries (AFTERTRIP_DATABASE_STATEMENT_TIMEOUT)",
            self.timeout,
            extra={"timeout_s": self.timeout},
        )
