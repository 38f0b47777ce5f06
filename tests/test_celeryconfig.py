"""The worker's Celery options keep the README's promise: Redis errors are retried for
AFTERTRIP_TASK_RETRY_BUDGET (900 s), also where Celery does the retrying (a job's outcome, a
retry's message), not only in the job (tests/test_outages.py: Redis down 5 minutes)."""

from __future__ import annotations

import importlib

import pytest
from kombu.utils.functional import fxrange


@pytest.mark.parametrize("budget", [60, 900, 3600])
def test_celery_retries_last_the_retry_budget(budget: int, monkeypatch: pytest.MonkeyPatch) -> None:
    import celeryconfig
    from tasks.settings import get_settings

    monkeypatch.setenv("AFTERTRIP_TASK_RETRY_BUDGET", str(budget))
    get_settings.cache_clear()
    try:
        config = importlib.reload(celeryconfig)
        # a job's outcome: Celery sleeps uniformly in [0, max] between tries once the
        # exponential part has reached max (after ~8 tries)
        mean_sleep = config.result_backend_max_sleep_between_retries_ms / 1000 / 2
        assert config.result_backend_always_retry
        assert config.result_backend_max_retries * mean_sleep >= budget
        # a retry's message: kombu's retry_over_time sleeps fxrange(start, max + start, step)
        policy = config.task_publish_retry_policy
        sleeps = fxrange(
            policy["interval_start"],
            policy["interval_max"] + policy["interval_start"],
            policy["interval_step"],
            repeatlast=True,
        )
        cap = policy["interval_max"]
        waited = sum(min(next(sleeps), cap) for _ in range(policy["max_retries"]))
        assert waited >= budget
    finally:
        monkeypatch.delenv("AFTERTRIP_TASK_RETRY_BUDGET")
        get_settings.cache_clear()
        importlib.reload(celeryconfig)
