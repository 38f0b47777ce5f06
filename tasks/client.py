"""What the web app calls to queue a grouping job: `enqueue_trip(trip.id)`.

The client lives in `aftertrip_client` (its own distribution, `client/`, which the web app
installs without the worker); this module re-exports it for code that runs beside the worker,
where `enqueue_trip` defaults to the worker service's Celery app (`tasks.app`). Importing it
imports no model code (no torch, no onnxruntime). Call it after the web app's transaction
commits (`enqueue_trip_on_commit`), or the worker may not see the photos. The web app's
own calls, `request_trip` and `trip_state` (a request row and the state per trip, on its
database connection), are re-exported too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import aftertrip_client
from aftertrip_client import (
    JobProgress,
    TripState,
    enqueue_trip_on_commit,
    job_progress,
    notify_worker,
    request_trip,
    trip_state,
)

if TYPE_CHECKING:
    from celery import Celery
    from celery.result import AsyncResult

__all__ = [
    "JobProgress",
    "TripState",
    "enqueue_trip",
    "enqueue_trip_on_commit",
    "job_progress",
    "notify_worker",
    "request_trip",
    "trip_state",
]


def enqueue_trip(
    trip_id: int,
    mode: str = "missing",
    *,
    app: Celery | None = None,
    queue: str | None = None,
    task_id: str | None = None,
) -> AsyncResult:
    """`aftertrip_client.enqueue_trip`, sent through the worker service's app by default."""
    if app is None:
        from tasks.app import app as service_app

        app = service_app
    return aftertrip_client.enqueue_trip(trip_id, mode, app=app, queue=queue, task_id=task_id)
