"""The Celery app of the worker service.

`celery -A tasks.app worker -Q faces` imports the task module itself (`include`); other
processes that must know the task by name (Flower's API) load `-A tasks.trip` instead.
Importing this module imports no model code, so the web app and admin commands can use it.
"""

from celery import Celery

from tasks.flowerauth import guard_flower_command
from tasks.logs import install_celery_logging
from tasks.settings import get_settings

# `celery -A tasks flower` is Flower's own command: it gets the same login rule as ours.
guard_flower_command()

app = Celery("aftertrip", include=["tasks.trip"])
app.config_from_object("celeryconfig")
# the worker's log lines carry the `extra=` fields (trip_id, job_id, timings)
install_celery_logging(get_settings().log_format)
