"""A database connection that goes silent (no reset, new connections still work) fails within
AFTERTRIP_DATABASE_STATEMENT_TIMEOUT instead of hanging the job: real PostgreSQL and MariaDB
behind a TCP proxy that silences the open connections."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.exc import OperationalError

from db.session import make_engine
from db.watchdog import connect_args
from tests.support.faults import TcpProxy

pytestmark = pytest.mark.services

TIMEOUT = 2.0
SERVERS = {
    "postgresql": ("postgresql+psycopg://postgres@127.0.0.1:{port}/test", 5432),
    "mariadb": ("mysql+pymysql://root@127.0.0.1:{port}/test", 3306),
}


@pytest.fixture(params=sorted(SERVERS))
def proxied(request: pytest.FixtureRequest) -> Iterator[tuple[str, TcpProxy, Engine]]:
    url, port = SERVERS[request.param]
    proxy = TcpProxy("127.0.0.1", port).start()
    engine = make_engine(url.format(port=proxy.port), statement_timeout=TIMEOUT)
    try:
        yield request.param, proxy, engine
    finally:
        engine.dispose()
        proxy.close()


def test_a_silent_connection_fails_within_the_statement_timeout(
    proxied: tuple[str, TcpProxy, Engine],
) -> None:
    backend, proxy, engine = proxied
    with engine.connect() as conn:
        assert conn.execute(text("SELECT 1")).scalar() == 1
        proxy.silence()
        start = time.monotonic()
        with pytest.raises(OperationalError):
            conn.execute(text("SELECT 2"))
        waited = time.monotonic() - start
    # the watchdog looks every timeout/10; PyMySQL's socket timeout is rounded to 1 s
    assert TIMEOUT * 0.9 <= waited < TIMEOUT + 3, (backend, waited)
    with engine.connect() as conn:  # the silent one left the pool; a new one works
        assert conn.execute(text("SELECT 3")).scalar() == 3


def test_a_pooled_connection_gone_silent_fails_its_pre_ping_within_the_timeout(
    proxied: tuple[str, TcpProxy, Engine],
) -> None:
    """The next checkout of a pooled connection that went silent while idle: the pool's
    pre-ping (outside the engine's statement events) used to wait for good on PostgreSQL."""
    backend, proxy, engine = proxied
    with engine.connect() as conn:
        assert conn.execute(text("SELECT 1")).scalar() == 1
    proxy.silence()  # the pooled connection, idle now
    start = time.monotonic()
    with engine.connect() as conn:  # pre-ping fails, the pool connects again
        assert conn.execute(text("SELECT 2")).scalar() == 2
    waited = time.monotonic() - start
    assert TIMEOUT * 0.9 <= waited < TIMEOUT + 3, (backend, waited)
    assert proxy.connections_made == 2


def test_a_slow_statement_under_the_timeout_is_left_alone(
    proxied: tuple[str, TcpProxy, Engine],
) -> None:
    backend, _proxy, engine = proxied
    sleep = "SELECT pg_sleep(1)" if backend == "postgresql" else "SELECT SLEEP(1)"
    with engine.connect() as conn:
        for _ in range(3):  # 3 s in all: the timeout is per statement, not per connection
            conn.execute(text(sleep))
        assert conn.execute(text("SELECT 1")).scalar() == 1


def test_connect_args_per_backend() -> None:
    assert connect_args("sqlite", connect_timeout=10, statement_timeout=60) == {}
    assert connect_args("postgresql", connect_timeout=10, statement_timeout=None) == {
        "connect_timeout": 10
    }
    assert connect_args("mysql", connect_timeout=10, statement_timeout=60) == {
        "connect_timeout": 10,
        "read_timeout": 60,
        "write_timeout": 60,
    }
    postgres = connect_args("postgresql", connect_timeout=10, statement_timeout=60)
    assert postgres["keepalives"] == 1 and postgres["keepalives_idle"] == 30
    assert postgres["tcp_user_timeout"] == 60_000  # ms: bytes never acknowledged
