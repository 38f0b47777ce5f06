"""Progress writes are best-effort: a result backend that is down, after Celery's own retries
(`result_backend_always_retry`, which end in BackendStoreError), never ends a job."""

from __future__ import annotations

import logging
import socket
from typing import Any

import pytest
from celery import Celery
from celery.exceptions import BackendStoreError

from tasks.trip import _progress_reporter


def _dead_port() -> int:
    with socket.socket() as sock:  # nobody listens there once it is closed
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_progress_survives_a_result_backend_that_gives_up() -> None:
    app = Celery("progress-test", broker="memory://")
    app.conf.update(
        result_backend=f"redis://127.0.0.1:{_dead_port()}/0",
        result_backend_always_retry=True,
        result_backend_max_retries=1,
        result_backend_max_sleep_between_retries_ms=10,
        redis_socket_connect_timeout=1,
        task_store_eager_result=False,
    )
    seen: dict[str, Any] = {}

    @app.task(bind=True)
    def job(self: Any) -> str:
        try:  # what a job met before: Celery's own retries end in BackendStoreError
            self.update_state(state="PROGRESS", meta={"stage": "analyze"})
        except BackendStoreError as exc:
            seen["raised"] = exc
        report = _progress_reporter(self)
        report("analyze", 1, 40)  # logged, not raised
        report("analyze", 2, 40)  # silent for a while after a failure: no second wait
        return "done"

    assert job.apply(task_id="t-1").get() == "done"
    assert isinstance(seen.get("raised"), BackendStoreError)


def test_a_progress_write_tries_once(caplog: pytest.LogCaptureFixture) -> None:
    """With the worker's own retry policy for a job's outcome (hundreds of tries, minutes),
    a progress write still tries once: Celery's retries held the job ~40 s per progress write
    while Redis was down (tests/test_outages.py measured it)."""
    app = Celery("progress-test", broker="memory://")
    app.conf.update(
        result_backend=f"redis://127.0.0.1:{_dead_port()}/0",
        result_backend_always_retry=True,
        result_backend_max_retries=600,
        result_backend_max_sleep_between_retries_ms=3000,
        redis_socket_connect_timeout=1,
        task_store_eager_result=False,
    )

    @app.task(bind=True)
    def job(self: Any) -> str:
        _progress_reporter(self)("analyze", 1, 40)
        return "done"

    with caplog.at_level(logging.WARNING):
        assert job.apply(task_id="t-2").get() == "done"
    retried = [r for r in caplog.records if "Retrying" in r.getMessage()]
    assert retried == []
    assert any("progress not reported" in r.getMessage() for r in caplog.records)
