"""The web app's side of AfterTrip Faces: ask for a trip's grouping and show where it stands.

Installs on its own (`pip install ./client`): it depends on Celery only and imports nothing of
the worker (no numpy, torch or onnxruntime), and runs on Python 3.8, the AfterTrip backend's.

    from aftertrip_client import request_trip, trip_state

    request_trip(trip.id)                    # in a Django view: committed with the photos
    trip_state(trip.id).percent              # "sorting trip 7… 40%", "sorted at 14:03"

`request_trip` (and `enqueue_trip_on_commit`, which now goes through it) writes a row in the
worker's `aftertrip_request` table in the app's transaction and nudges the worker after the
commit with a short broker timeout: it never waits on a broker that is down, and the worker's
sweep carries the request out once the broker is back. `enqueue_trip` / `job_progress` (a
Celery message and its task id) remain for code outside the app's database.

Where the broker is: an `app` argument (the web app's own Celery app), else Django settings
`AFTERTRIP_BROKER_URL` / `AFTERTRIP_RESULT_BACKEND` / `AFTERTRIP_QUEUE` when Django is
configured, else the environment variables of the same names, else the worker's defaults
(redis://127.0.0.1:6379/0 and /1, queue "faces").
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aftertrip_client.names import (
    FACES_QUEUE,
    GROUP_TRIP,
    MAX_TRIP_ID,
    MODES,
    PROGRESS,
    TAKE_REQUESTS,
)
from aftertrip_client.trips import (
    DEFAULT_BROKER_URL,
    TripState,
    check_request,
    notify_worker,
    request_trip,
    setting,
    stage_percent,
    trip_state,
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
    "TAKE_REQUESTS",
    "JobProgress",
    "TripState",
    "client_app",
    "enqueue_trip",
    "enqueue_trip_on_commit",
    "job_progress",
    "notify_worker",
    "request_trip",
    "trip_state",
]

logger = logging.getLogger(__name__)

DEFAULT_RESULT_BACKEND = "redis://127.0.0.1:6379/1"

_app_lock = threading.Lock()
_default_app: Celery | None = None


def client_app(broker_url: str | None = None, result_backend: str | None = None) -> Celery:
    """A Celery app that talks to the worker: JSON messages only, results kept for progress."""
    from celery import Celery

    app = Celery(
        "aftertrip-client",
        broker=broker_url or setting("AFTERTRIP_BROKER_URL", DEFAULT_BROKER_URL),
        backend=result_backend or setting("AFTERTRIP_RESULT_BACKEND", DEFAULT_RESULT_BACKEND),
        set_as_current=False,
    )
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_routes={GROUP_TRIP: {"queue": setting("AFTERTRIP_QUEUE", FACES_QUEUE)}},
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
    return setting("AFTERTRIP_QUEUE", FACES_QUEUE)


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
    check_request(trip_id, mode)
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
    """Ask for the trip's grouping in the current Django transaction (`request_trip`): a
    request row committed with it, the worker nudged once it commits, nothing asked if it
    rolls back. Returns the id of the nudge task; `trip_state(trip_id)` is the progress to
    show. (`job_progress` of that id follows the job when the nudge runs it, settling first
    under the same id; a request that joins a job already queued or running has a nudge
    that ends at once, SUCCESS with {"trip_id", "joined"}.)

    A broker that cannot be reached is logged (logger `aftertrip_client`) and costs at most
    about half a second: the request row stays, and the worker's sweep carries it out once
    the broker is back.
    """
    return request_trip(trip_id, mode, using=using, app=app, queue=queue)


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


_percent = stage_percent


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
