"""Names shared by the worker and its clients; importing this module imports nothing else."""

GROUP_TRIP = "aftertrip.group_trip"
"""The grouping task: `group_trip(trip_id: int, mode: str = "missing")`."""

ANALYZE_CHUNK = "aftertrip.analyze_chunk"
"""One chunk of a big trip's photos, sent by `group_trip` to every free worker:
`analyze_chunk(trip_id, job_id, split, chunk, photo_ids)`; its results go to the database."""

FACES_QUEUE = "faces"
"""The queue the grouping task is routed to (the default of AFTERTRIP_QUEUE)."""

PROGRESS = "PROGRESS"
"""Custom task state while a job runs; meta = {"stage", "done", "total"}."""

MODES = ("missing", "all")
"""`missing`: analyse only photos without a result for the current embedder; `all`: every one."""
