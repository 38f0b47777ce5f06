"""Database layer: the web app's tables as they are, the worker's own tables, and the
keyword-only functions (`db.crud`) the Celery tasks call with a Session."""
