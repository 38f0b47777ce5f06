"""Helpers for the worker-service tests: Redis on loopback, a Celery client app, a worker.

Import what a module needs: `from tests.support.services import require_redis, ...`.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import pytest
from celery import Celery
from PIL import Image

from tests.support.files import ROOT


def _test_redis_url(base: str, worker: str | None) -> str:
    """`base` in a plain run; under pytest-xdist (`worker` = PYTEST_XDIST_WORKER, "gw<n>"),
    the database below it numbered for the worker (base - 1 - n), so that two test processes
    never share trip locks (`aftertrip:trip:<id>`: every process's databases number their
    trips from 1), queues or results."""
    if not worker:
        return base
    number = int(worker.removeprefix("gw"))
    url = urlsplit(base)
    first = int(url.path.strip("/") or 0)
    db = first - 1 - number
    if db < 1:  # 0 is everyone's default database
        raise RuntimeError(
            f"xdist worker {worker} has no Redis database of its own below {base}: run fewer "
            "workers (-n) or set AFTERTRIP_TEST_REDIS_URL to a higher database"
        )
    return urlunsplit(url._replace(path=f"/{db}"))


REDIS_URL = _test_redis_url(
    os.environ.get("AFTERTRIP_TEST_REDIS_URL", "redis://127.0.0.1:6379/13"),
    os.environ.get("PYTEST_XDIST_WORKER"),
)
"""The Redis database the service tests use (not the default 0, so no one's data is touched):
db 13, or under pytest-xdist one per worker (12 for gw0, 11 for gw1, ...)."""


def require_redis(url: str = REDIS_URL) -> None:
    """Skip (or fail under CI=true) when Redis on loopback does not answer."""
    from redis import Redis
    from redis.exceptions import RedisError

    try:
        Redis.from_url(url, socket_connect_timeout=2).ping()
    except RedisError as exc:
        message = f"Redis at {url} is not reachable ({exc})"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but {message}")
        pytest.skip(message)


def worker_environment(
    *, db_url: str, bucket: str, s3_endpoint: str, queue: str, tmp: Path, **settings: str
) -> dict[str, str]:
    """The environment of a test worker: this process's, less any AFTERTRIP_* of the
    developer's, plus moto's credentials and the stack's settings (SCRFD on the CPU, the
    test Redis); `settings` adds or overrides AFTERTRIP_<NAME> by lowercase name."""
    from tests.plugins.s3 import MOTO_ENV

    env = {k: v for k, v in os.environ.items() if not k.startswith("AFTERTRIP_")}
    env.update(MOTO_ENV)
    env.update(
        {
            "AFTERTRIP_BROKER_URL": REDIS_URL,
            "AFTERTRIP_RESULT_BACKEND": REDIS_URL,
            "AFTERTRIP_DATABASE_URL": db_url,
            "AFTERTRIP_S3_BUCKET": bucket,
            "AFTERTRIP_S3_ENDPOINT_URL": s3_endpoint,
            "AFTERTRIP_QUEUE": queue,
            "AFTERTRIP_DETECTOR": "scrfd",
            "AFTERTRIP_DEVICE": "cpu",
            "AFTERTRIP_MODEL_CACHE_DIR": str(tmp / "models"),
        }
    )
    env.update({f"AFTERTRIP_{name.upper()}": value for name, value in settings.items()})
    return env


def client_app(redis_url: str) -> Celery:
    """A Celery app like the web app's own: same broker, JSON, none of our task routes."""
    app = Celery("aftertrip-test-client", broker=redis_url, backend=redis_url, set_as_current=False)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        broker_connection_retry_on_startup=True,
    )
    return app


def start_worker(
    env: dict[str, str], log: Path, *, queue: str, name: str, concurrency: int = 1
) -> subprocess.Popen[bytes]:
    """A real `celery worker` (prefork) on `queue`, started from the repository root.

    The command line is the one `aftertrip-faces worker` runs, plus quieter cluster chatter
    and the test hooks (`tests.support.servicehooks`, active with AFTERTRIP_TEST_HOLD_DIR).
    """
    from types import SimpleNamespace

    from tasks.admin import worker_argv
    from tasks.settings import ServiceSettings

    args = SimpleNamespace(concurrency=concurrency, loglevel="INFO", hostname=f"{name}@%h")
    argv = worker_argv(ServiceSettings(queue=queue), args)  # type: ignore[arg-type]
    argv += ["--without-gossip", "--without-mingle", "--without-heartbeat"]
    argv += ["--include", "tests.support.servicehooks"]  # holds a job where a test asks it to
    return start_ready_worker(argv, env, log)


def start_ready_worker(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """Run a `celery worker` command line (output to `log`) until it logs " ready."; raise
    with the log's end if it exits or is not ready within two minutes."""
    handle = log.open("wb")
    process = subprocess.Popen(
        argv, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
    )
    handle.close()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"celery worker exited ({process.returncode}):\n{tail(log)}")
        if b" ready." in log.read_bytes():
            return process
        time.sleep(0.2)
    stop_process(process)
    raise RuntimeError(f"celery worker did not become ready:\n{tail(log)}")


def stop_process(process: subprocess.Popen[bytes], timeout: float = 30) -> None:
    """SIGTERM (Celery's warm shutdown), then SIGKILL the whole process group if it hangs."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


def child_pids(pid: int) -> list[int]:
    """The direct children of a process (the prefork pool's workers)."""
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        children.extend(int(p) for p in text)
    return children


def tail(log: Path, lines: int = 60) -> str:
    """The end of a log file, for failure messages."""
    if not log.exists():
        return "(no log)"
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 300) -> None:
    """Poll until `condition()` holds; fail saying `what` did not happen."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def held_jobs(hold_dir: Path) -> list[str]:
    """The `held-<trip>-<job>` files of the jobs the test hook is holding (or held)."""
    return sorted(p.name for p in hold_dir.glob("held-*"))


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def no_face_jpeg() -> bytes:
    """A landscape without people: a smooth sky-to-lake gradient."""
    y, x = np.mgrid[0:480, 0:640]
    pixels = np.stack([80 + x / 8, 120 + y / 6, 200 - y / 5], axis=-1).clip(0, 255)
    out = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(out, "JPEG", quality=90)
    return out.getvalue()


def post_json(url: str, body: dict[str, Any], auth: str | None) -> tuple[int, dict[str, Any]]:
    """POST `body` as JSON (with Basic `auth` "user:password" if given): (status, answer)."""
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    if auth is not None:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, {}
