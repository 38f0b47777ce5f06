"""Names shared by the worker and its clients (defined in `aftertrip_client.names`, which the
web app installs on its own; re-exported here for the worker's code)."""

from aftertrip_client.names import FACES_QUEUE, GROUP_TRIP, MODES, PROGRESS

__all__ = ["FACES_QUEUE", "GROUP_TRIP", "MODES", "PROGRESS"]
