"""The worker service: the job, its Celery tasks, the web app's client, and the commands.

`trip.py` is the Celery glue over the Celery-free job (`job.py`, `analyze.py`, `fanout.py`,
`write.py`, `retry.py`); `compose.py` opens sessions, store and pipeline for all of them.
Importing this package imports nothing heavy (docs/architecture.md draws the flow).
"""
