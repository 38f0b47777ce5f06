"""Celery configuration of the worker service (lowercase keys), read by `tasks.app`.

Values that an operator sets come from `tasks.settings.ServiceSettings` (AFTERTRIP_*
environment variables); the rest is how the grouping task must run to be safe.
"""

import math

from tasks.names import ANALYZE_CHUNK, GROUP_TRIP
from tasks.settings import get_settings

_settings = get_settings()

broker_url = _settings.broker_url
result_backend = _settings.result_backend
broker_connection_retry_on_startup = True

# JSON only: a message is trip id + mode, and pickle would let anyone who can write to the
# broker run code in the worker.
task_serializer = "json"
result_serializer = "json"
accept_content = ["json"]
result_accept_content = ["json"]

task_routes = {
    GROUP_TRIP: {"queue": _settings.queue},
    ANALYZE_CHUNK: {"queue": _settings.queue},
}

# A job is acknowledged only when it ends, so a worker that dies mid-job (OOM, node lost,
# SIGKILL) leaves it to be delivered again; the task is written to be safe to run twice.
task_acks_late = True
task_reject_on_worker_lost = True
# One job per process at a time: a prefetched job would wait behind a long one while
# another worker sits idle.
worker_prefetch_multiplier = 1
# Redis redelivers an unacknowledged message after the visibility timeout; it must be longer
# than any job may run, or a job still running would be started again elsewhere.
broker_transport_options = {"visibility_timeout": _settings.visibility_timeout}
# A running job does not need the broker: after losing the connection (Redis restarted) it
# goes on and completes, instead of being cancelled with a message that Redis may have lost
# with its restart. Its trip lock (renewed each heartbeat, taken again if Redis lost it) keeps
# a second delivery from running beside it; a duplicate delivered later finds the work done.
worker_cancel_long_running_tasks_on_connection_loss = False

# A retry (or a job put back while its trip is busy) is a message sent from the job: while
# Redis is down, keep trying to send it (0.5, 1.5, 2.5, then every 3 s) as long as the job's
# errors are retried (AFTERTRIP_TASK_RETRY_BUDGET) rather than dropping the job; 30 tries,
# about 80 s, fell short of a 5-minute outage.
task_publish_retry = True
task_publish_retry_policy = {
    "max_retries": max(30, math.ceil(_settings.task_retry_budget / 3.0) + 3),
    "interval_start": 0.5,
    "interval_step": 1.0,
    "interval_max": 3.0,
}
# A job's final state and result are stored through Redis outages as long as a job's own
# errors are retried (AFTERTRIP_TASK_RETRY_BUDGET, 900 s): a job that ended while Redis was
# down waits with its outcome until Redis is back, then stores it and is acknowledged. (With 30
# tries, ~40 s, the outcome was dropped, and once Redis was back the client was told the job
# had FAILED with BackendStoreError while its row said succeeded: tests/test_outages.py.)
# Celery sleeps a random 0-3 s between tries, 1.5 s on average. Progress writes try once
# (`tasks.trip._report`).
result_backend_always_retry = True
result_backend_max_sleep_between_retries_ms = 3000
result_backend_max_retries = max(30, math.ceil(_settings.task_retry_budget / 1.5))

# `docker stop` sends SIGQUIT (compose stop_signal): the running job gets this long to
# finish, then is cancelled and requeued at once, instead of waiting out the visibility
# timeout after the container is killed.
worker_soft_shutdown_timeout = _settings.worker_soft_shutdown_timeout

# The last guard on memory: each photo's decode is bounded (AFTERTRIP_MAX_DECODED_BYTES), and
# a pool process that still grew past this is replaced after its job.
worker_max_memory_per_child = _settings.worker_max_memory_per_child or None

# Pool processes: the same whether `celery -A tasks worker` or `aftertrip-faces worker`
# starts it (Celery's own default is one per CPU, each with the inference threads meant for
# the whole machine). Each process's threads are the cores divided by this.
worker_concurrency = _settings.worker_concurrency

task_soft_time_limit = _settings.task_soft_time_limit
task_time_limit = _settings.task_time_limit

# Events and states for Flower and `aftertrip-faces rerun --wait`.
worker_send_task_events = True
task_send_sent_event = True
task_track_started = True
result_extended = True

enable_utc = True
timezone = "UTC"
