"""The web app's client (`aftertrip_client`) on its own: Python 3.8 syntax, arguments, progress."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from celery import Celery

import aftertrip_client
from aftertrip_client import PROGRESS, enqueue_trip, enqueue_trip_on_commit, job_progress

ROOT = Path(__file__).resolve().parents[1]


def test_client_source_is_python_3_8() -> None:
    """The backend's image runs Python 3.8: ruff checks the client's syntax against it."""
    done = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--target-version", "py38", "aftertrip_client"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_client_package_imports_nothing_of_the_worker() -> None:
    client_dir = Path(aftertrip_client.__file__).parent
    for source in client_dir.glob("*.py"):
        text = source.read_text()
        for module in ("worker", "tasks", "db", "storage", "numpy", "torch", "onnxruntime"):
            assert f"import {module}" not in text and f"from {module}" not in text, (
                source,
                module,
            )


@pytest.fixture
def app() -> Celery:
    return Celery(
        "test-client", broker="memory://", backend="cache+memory://", set_as_current=False
    )


def test_enqueue_refuses_bad_arguments_before_sending(app: Celery) -> None:
    with pytest.raises(ValueError, match="mode"):
        enqueue_trip(1, "everything", app=app)
    for bad in (0, -3, "7", True, 1.5):
        with pytest.raises(ValueError, match="trip_id"):
            enqueue_trip(bad, app=app)  # type: ignore[arg-type]
    # Out of bigint's range: refused here, not by the worker's database.
    for bad in (2**63, 2**70, -(2**70)):
        with pytest.raises(ValueError, match="between 1 and 9223372036854775807"):
            enqueue_trip(bad, app=app)
        with pytest.raises(ValueError, match="between 1 and 9223372036854775807"):
            enqueue_trip_on_commit(bad, app=app)
    assert enqueue_trip(2**63 - 1, app=app).id  # the largest id a trip can have is sent


def test_job_progress_reads_the_worker_states(app: Celery) -> None:
    task_id = str(uuid.uuid4())
    assert job_progress(task_id, app=app).state == "PENDING"
    backend = app.backend
    backend.store_result(task_id, {"stage": "analyze", "done": 20, "total": 50}, PROGRESS)
    progress = job_progress(task_id, app=app)
    assert (progress.stage, progress.done, progress.total, progress.percent) == (
        "analyze",
        20,
        50,
        36,  # analysing is 0-90 % of the job
    )
    assert not progress.finished
    backend.store_result(task_id, {"stage": "group", "done": 0, "total": 1}, PROGRESS)
    assert job_progress(task_id, app=app).percent == 90
    backend.store_result(task_id, {"trip_id": 7, "photos": 3}, "SUCCESS")
    done = job_progress(task_id, app=app)
    assert done.finished and done.percent == 100 and done.result == {"trip_id": 7, "photos": 3}
    failed_id = str(uuid.uuid4())
    backend.store_result(failed_id, ValueError("trip 7 does not exist"), "FAILURE")
    failed = job_progress(failed_id, app=app)
    assert failed.finished and failed.error == "ValueError: trip 7 does not exist"


def test_enqueue_sends_by_name_to_the_configured_queue(app: Celery) -> None:
    sent: list[tuple[str, dict[str, object]]] = []
    app.send_task = lambda name, **options: sent.append((name, options))  # type: ignore[method-assign,assignment,return-value]
    enqueue_trip(42, "all", app=app, task_id="fixed-id")
    ((name, options),) = sent
    assert name == "aftertrip.group_trip"
    assert options["args"] == (42,) and options["kwargs"] == {"mode": "all"}
    assert options["queue"] == "faces" and options["task_id"] == "fixed-id"
