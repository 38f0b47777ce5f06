"""The worker service's Celery app where Celery looks for it: `celery -A tasks ...`.

Celery's `-A tasks` finds `tasks.celery.app` (its `proj/celery.py` convention), so the
commands Celery users type work as they are:

    celery -A tasks worker -Q faces --loglevel INFO
    celery -A tasks flower
    celery -A tasks inspect active

The grouping task is imported here as well (not only when a worker starts), so that Flower's
API can run it by name. `aftertrip-faces worker` / `flower` start the same app.
"""

import tasks.trip  # noqa: F401  (registers aftertrip.group_trip)
from tasks.app import app

__all__ = ["app"]
