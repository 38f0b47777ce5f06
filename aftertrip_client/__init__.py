"""The web app's side of AfterTrip Faces: queue a trip's grouping and show its progress.

Installs on its own (`pip install ./client`): it depends on Celery only and imports nothing of
the worker (no numpy, torch or onnxruntime), and runs on Python 3.8, the AfterTrip backend's.

    from aftertrip_client import enqueue_trip_on_commit, job_progress

    enqueue_trip_on_commit(trip.id)          # in a Django view: sent once the photos commit
    job_progress(task_id).percent            # "sorting… 40%"

Where the broker is: an `app` argument (the web app's own Celery app), else Django settings
`AFTERTRIP_BROKER_URL` / `AFTERTRIP_RESULT_BACKEND` / `AFTERTRIP_QUEUE` when Django is
configured, else the environment variables of the same names, else the worker's defaults
(redis://127.0.0.1:6379/0 and /1, queue "faces").
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aftertrip_client.names import (
    FACES_QUEUE,
    GROUP_TRIP,
    MAX_TRIP_ID,
    MODES,
    PROGRESS,
    trip_id_problem,
)

if TYPE_CHECKING:
    from celery import Celery
    from celery.result import AsyncResult

__all__ = [
    "FACES_QUEUE",
    "GROUP_TRIP",
    "MAX_TRIP_ID",
    "MODES",
    "PROGRESS",
    "JobProgress",
    "client_app",
    "enqueue_trip",
    "enqueue_trip_on_commit",
    "job_progress",
]

logger = logging.getLogger(__name__)

DEFAULT_BROKER_URL = "redis://127.0.0.1:6379/0"
DEFAULT_RESULT_BACKEND = "redis://127.0.0.1:6379/1"

# Share of the overall percentage each stage covers: analysing photos is nearly all the work.
_STAGE_SPAN = {"models": (0, 0), "analyze": (0, 90), "group": (90, 100)}

_app_lock = threading.Lock()
_default_app: Celery | None = None


def _setting(name: str, default: str) -> str:
    """Django setting `name` when Django is configured, else the environment variable."""
    try:
        from django.conf import settings  # type: ignore[import-not-found,unused-ignore]

        if settings.configured and getattr(settings, name, None):
            return str(getattr(settings, name))
    except ImportError:
        pass
    return os.environ.get(name) or default


def client_app(broker_url: str | None = None, result_backend: str | None = None) -> Celery:
    """A Celery app that talks to the worker: JSON messages only, results kept for progress."""
    from celery import Celery

    app = Celery(
        "aftertrip-client",
        broker=broker_url or _setting("AFTERTRIP_BROKER_URL", DEFAULT_BROKER_URL),
        backend=result_backend or _setting("AFTERTRIP_RESULT_BACKEND", DEFAULT_RESULT_BACKEND),
        set_as_current=False,
    )
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_routes={GROUP_TRIP: {"queue": _setting("AFTERTRIP_QUEUE", FACES_QUEUE)}},
        broker_connection_retry_on_startup=True,
    )
    return app


def _app(app: Celery | None) -> Celery:
    global _default_app
    if app is not None:
        return app
    with _app_lock:
        if _default_app is None:
            _default_app = client_app()
        return _default_app


def _configured_queue(app: Celery) -> str:
    routes = app.conf.task_routes
    route = routes.get(GROUP_TRIP) if isinstance(routes, dict) else None
    if route and route.get("queue"):
        return str(route["queue"])
    return _setting("AFTERTRIP_QUEUE", FACES_QUEUE)


def _check(trip_id: object, mode: object) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    problem = trip_id_problem(trip_id)
    if problem is not None:
        raise ValueError(problem)


def enqueue_trip(
    trip_id: int,
    mode: str = "missing",
    *,
    app: Celery | None = None,
    queue: str | None = None,
    task_id: str | None = None,
) -> AsyncResult:
    """Queue `aftertrip.group_trip(trip_id, mode)`; returns the result handle (`.id` is the
    task id to pass to `job_progress`).

    `mode`: "missing" (photos not analysed yet: after an upload or a delete) or "all".
    `app`: any Celery app on the worker's broker (e.g. the web app's own); by default one
    made by `client_app()`. `queue`: by default the app's route for the task, else
    AFTERTRIP_QUEUE, else "faces". `task_id`: the id to give the task (default: a new
    one). Call it only after the photos are committed (see `enqueue_trip_on_commit`), or the
    worker may not see them.
    """
    _check(trip_id, mode)
    celery_app = _app(app)
    return celery_app.send_task(
        GROUP_TRIP,
        args=(trip_id,),
        kwargs={"mode": mode},
        queue=queue or _configured_queue(celery_app),
        task_id=task_id,
    )


def enqueue_trip_on_commit(
    trip_id: int,
    mode: str = "missing",
    *,
    using: str | None = None,
    app: Celery | None = None,
    queue: str | None = None,
) -> str:
    """Queue the trip's grouping once the current Django transaction commits (at once when
    none is open); nothing is sent if it rolls back. Returns the task id the job will have,
    for `job_progress` (store it with the trip to show "sorting… 40%").

    A broker that cannot be reached then is logged (logger `aftertrip_client`) and does not
    fail the request that already committed: the photos stay unsorted until the next
    enqueue of the trip (the next upload or delete, or the nightly run) picks them up.
    """
    _check(trip_id, mode)
    from django.db import transaction  # type: ignore[import-not-found,unused-ignore]

    task_id = str(uuid.uuid4())

    def send() -> None:
        try:
            enqueue_trip(trip_id, mode, app=app, queue=queue, task_id=task_id)
        except Exception:  # the request has committed: report, never undo it
            logger.exception("could not queue the grouping of trip %s", trip_id)
            return
        logger.info("queued the grouping of trip %s as task %s", trip_id, task_id)

    transaction.on_commit(send, using=using)
    return task_id


@dataclass(frozen=True)
class JobProgress:
    """Where a grouping job stands: Celery's state, and while it runs its stage and counts.

    state: PENDING (queued, or an unknown id), STARTED, PROGRESS, RETRY, SUCCESS or FAILURE.
    stage: "models", "analyze" or "group" while in PROGRESS; done/total count within it.
    percent: 0-100 over the whole job (analysing is 0-90, grouping 90-100).
    result: the job's counts on SUCCESS; error: the exception text on FAILURE/RETRY.
    """

    task_id: str
    state: str
    stage: str | None = None
    done: int = 0
    total: int = 0
    percent: int = 0
    result: dict[str, Any] | None = None
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.state in ("SUCCESS", "FAILURE", "REVOKED")


def _percent(stage: str | None, done: int, total: int) -> int:
    low, high = _STAGE_SPAN.get(stage or "", (0, 0))
    if total <= 0:
        return low
    return low + (high - low) * min(done, total) // total


def job_progress(task_id: str, *, app: Celery | None = None) -> JobProgress:
    """The state of the job `task_id` (from `enqueue_trip(...).id`), read from the result
    backend: what a page shows as "sorting… 40%"."""
    result = _app(app).AsyncResult(task_id)
    state = str(result.state)
    info = result.info
    if state == PROGRESS and isinstance(info, dict):
        stage = info.get("stage")
        done, total = int(info.get("done") or 0), int(info.get("total") or 0)
        return JobProgress(task_id, state, stage, done, total, _percent(stage, done, total))
    if state == "SUCCESS":
        counts = info if isinstance(info, dict) else None
        return JobProgress(task_id, state, percent=100, result=counts)
    if state in ("FAILURE", "RETRY", "REVOKED"):
        error = f"{type(info).__name__}: {info}" if isinstance(info, BaseException) else None
        return JobProgress(task_id, state, error=error)
    return JobProgress(task_id, state)
