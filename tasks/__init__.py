"""The worker service: Celery app and tasks, the web app's client, and admin commands.

Thin by design: a task takes ids, loads what it needs through `db/` and `storage/`, calls
`worker/`, and writes results through `db/`. Importing this package imports nothing heavy.
"""
