"""What the web app calls to queue a grouping job: `enqueue_trip(trip.id)`.

The task is sent by name, so this module imports neither the task nor any model code
(no torch, no onnxruntime): it is cheap to import in a Django process. Call it after the
web app's transaction commits (`transaction.on_commit`), or the worker may not see the photos.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tasks.names import FACES_QUEUE, GROUP_TRIP, MODES

if TYPE_CHECKING:
    from celery import Celery
    from celery.result import AsyncResult


def enqueue_trip(
    trip_id: int, *, mode: str = "missing", app: Celery | None = None, queue: str | None = None
) -> AsyncResult:
    """Queue `aftertrip.group_trip(trip_id, mode)` and return its result handle.

    `app` is any Celery app connected to the same broker (e.g. the web app's own); by default
    the worker service's app. `queue` defaults to AFTERTRIP_QUEUE ("faces").
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    if isinstance(trip_id, bool) or not isinstance(trip_id, int) or trip_id <= 0:
        raise ValueError(f"trip_id must be a positive integer, not {trip_id!r}")
    if app is None:
        from tasks.app import app as service_app

        app = service_app
    if queue is None:
        # Given explicitly so that a web app's own Celery app, without our task_routes,
        # still reaches the workers.
        queue = _configured_queue(app)
    return app.send_task(GROUP_TRIP, args=(trip_id,), kwargs={"mode": mode}, queue=queue)


def _configured_queue(app: Celery) -> str:
    routes = app.conf.task_routes
    route = routes.get(GROUP_TRIP) if isinstance(routes, dict) else None
    if route and route.get("queue"):
        return str(route["queue"])
    return FACES_QUEUE
