"""Names shared by the worker and its clients; importing this module imports nothing else."""

GROUP_TRIP = "aftertrip.group_trip"
"""The grouping task: `group_trip(trip_id: int, mode: str = "missing")`."""

TAKE_REQUESTS = "aftertrip.take_requests"
"""The task that carries out a trip's open requests (aftertrip_request rows):
`take_requests(trip_id: int)`; a no-op when a job of the trip runs (it follows up) or
nothing is open."""

REQUEST_TABLE = "aftertrip_request"
"""The worker's table of the web app's requests (created by `aftertrip-faces db upgrade`)."""

FACES_QUEUE = "faces"
"""The queue the grouping task is routed to (the default of AFTERTRIP_QUEUE)."""

PROGRESS = "PROGRESS"
"""Custom task state while a job runs; meta = {"stage", "done", "total"}."""

MODES = ("missing", "all")
"""`missing`: analyse only photos without a result for the current embedder; `all`: every one."""

MAX_TRIP_ID = 2**63 - 1
"""The largest trips_trip.id: Django's BigAutoField (bigint on MariaDB and PostgreSQL)."""


def trip_id_problem(trip_id: object) -> "str | None":
    """Why `trip_id` cannot be a trips_trip.id (None when it can): only an integer from 1 to
    MAX_TRIP_ID is one. JSON brings 1.5, "3" and true as well as 3, and a float would be
    rounded by the database into another trip's id; a bigger integer fails in the database."""
    if isinstance(trip_id, bool) or not isinstance(trip_id, int):
        return f"trip_id must be an integer (trips_trip.id), not {trip_id!r}"
    if not 1 <= trip_id <= MAX_TRIP_ID:
        return f"trip_id must be between 1 and {MAX_TRIP_ID} (trips_trip.id), not {trip_id}"
    return None


STAGE_SPAN = {"models": (0, 0), "analyze": (0, 90), "group": (90, 100)}
"""Share of a job's overall percentage each stage covers: analysing photos is nearly all."""


def stage_percent(stage: "str | None", done: int, total: int) -> int:
    """0-100 over a whole job from its stage and its steps done of total (analysing is
    0-90, grouping 90-100)."""
    low, high = STAGE_SPAN.get(stage or "", (0, 0))
    if total <= 0:
        return low
    return low + (high - low) * min(done, total) // total
