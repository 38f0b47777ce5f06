"""Fault injection against the real worker service (see tests/faultfixtures.py).

The harness's own behaviour first: a cut proxy refuses, a frozen one holds bytes, a restart
of the private Redis keeps its queue.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from pathlib import Path

import pytest

from tests.faultfixtures import PrivateRedis, TcpProxy

pytestmark = [pytest.mark.services, pytest.mark.faults, pytest.mark.timeout(600)]


def _echo_server() -> tuple[socket.socket, int]:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return

            def echo(conn: socket.socket = conn) -> None:
                with conn, contextlib.suppress(OSError):  # the proxy resets it on cut()
                    while data := conn.recv(1024):
                        conn.sendall(data)

            threading.Thread(target=echo, daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return server, server.getsockname()[1]


def test_proxy_cut_refuses_and_restore_reconnects() -> None:
    server, port = _echo_server()
    proxy = TcpProxy("127.0.0.1", port).start()
    try:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as conn:
            conn.sendall(b"hello")
            assert conn.recv(1024) == b"hello"
            proxy.cut()
            # the open connection is reset and a new one refused: the server "died"
            with pytest.raises(OSError):
                conn.sendall(b"again")
                if not conn.recv(1024):
                    raise ConnectionResetError("closed")
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
        proxy.restore()
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as conn:
            conn.sendall(b"back")
            assert conn.recv(1024) == b"back"
    finally:
        proxy.close()
        server.close()


def test_proxy_freeze_holds_bytes_until_restore() -> None:
    server, port = _echo_server()
    proxy = TcpProxy("127.0.0.1", port).start()
    try:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as conn:
            proxy.freeze()
            conn.sendall(b"held")
            conn.settimeout(0.5)
            with pytest.raises(TimeoutError):
                conn.recv(1024)
            proxy.restore()
            conn.settimeout(5)
            assert conn.recv(1024) == b"held"
    finally:
        proxy.close()
        server.close()


def test_private_redis_restart_keeps_the_queue(tmp_path: Path) -> None:
    redis = PrivateRedis(tmp_path).start()
    try:
        redis.client().rpush("faces", b"job")
        redis.restart(0.2)
        assert redis.client().lrange("faces", 0, -1) == [b"job"]
    finally:
        redis.stop()
