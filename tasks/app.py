"""The Celery app of the worker service.

`celery -A tasks.app worker -Q faces` imports the task module itself (`include`); other
processes that must know the task by name (Flower's API) load `-A tasks.trip` instead.
Importing this module imports no model code, so the web app and admin commands can use it.
"""

from celery import Celery

app = Celery("aftertrip", include=["tasks.trip"])
app.config_from_object("celeryconfig")
