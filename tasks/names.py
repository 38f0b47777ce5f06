"""Names shared by the worker and its clients (defined in `aftertrip_client.names`, which the
web app installs on its own; re-exported here for the worker's code), and the worker's own."""

from aftertrip_client.names import (
    FACES_QUEUE,
    GROUP_TRIP,
    MODES,
    PROGRESS,
    TAKE_REQUESTS,
    stage_percent,
    trip_id_problem,
)

ANALYZE_CHUNK = "aftertrip.analyze_chunk"
"""One chunk of a big trip's photos, sent by `group_trip` to every free worker:
`analyze_chunk(trip_id, job_id, split, chunk, photo_ids)`; its results go to the database.
Internal to the worker: the web app never sends it."""

__all__ = [
    "ANALYZE_CHUNK",
    "FACES_QUEUE",
    "GROUP_TRIP",
    "MODES",
    "PROGRESS",
    "TAKE_REQUESTS",
    "stage_percent",
    "trip_id_problem",
]
