"""A worker started as users type it: `celery -A tasks worker -Q faces`.

It runs AFTERTRIP_WORKER_CONCURRENCY pool processes, as `aftertrip-faces worker` does (Celery's
own default is one per CPU, each with the threads meant for the whole machine), each with
the cores divided by the pool's size as inference threads, also under `--concurrency N`; and
it says in one log line when it cannot use its database.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.support.files import ROOT
from tests.support.services import (
    REDIS_URL,
    require_redis,
    start_ready_worker,
    stop_process,
    tail,
)

CELERY = str(Path(sys.executable).with_name("celery"))


def _cores() -> int:
    return max(1, len(os.sched_getaffinity(0)))


def _environment(**settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AFTERTRIP_")}
    env.update(AFTERTRIP_BROKER_URL=REDIS_URL, AFTERTRIP_RESULT_BACKEND=REDIS_URL)
    env.update({f"AFTERTRIP_{k.upper()}": v for k, v in settings.items()}, PYTHONPATH=str(ROOT))
    return env


def _wait_for_lines(log: Path, needle: str, count: int, timeout: float = 60) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        lines = [line for line in log.read_text(errors="replace").splitlines() if needle in line]
        if len(lines) >= count or time.monotonic() > deadline:
            return lines
        time.sleep(0.2)


def _pool_size(env: dict[str, str], hostname: str) -> int:
    """`celery -A tasks inspect stats`: the worker's own word on its pool."""
    done = subprocess.run(
        [CELERY, "-A", "tasks", "inspect", "stats", "-d", hostname, "--json", "--timeout", "10"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    stats = json.loads(done.stdout)
    return int(stats[hostname]["pool"]["max-concurrency"])


@pytest.mark.parametrize("concurrency", [None, 2], ids=["setting", "command-line"])
def test_celery_worker_runs_the_configured_processes_and_threads(
    concurrency: int | None, tmp_path: Path
) -> None:
    require_redis()
    queue = f"i19-{uuid.uuid4().hex[:8]}"
    name = f"{queue}@{os.uname().nodename}"
    # A wrong password: the worker starts anyway and says so in one line at start-up.
    db_url = "mysql+pymysql://aftertrip:not-the-password@127.0.0.1:1/webapp"
    env = _environment(database_url=db_url, queue=queue)
    argv = [CELERY, "-A", "tasks", "worker", "-Q", queue, "--hostname", name]
    argv += ["--loglevel", "INFO", "--without-gossip"]
    if concurrency is not None:
        argv += ["--concurrency", str(concurrency)]
    log = tmp_path / "worker.log"
    worker = start_ready_worker(argv, env, log)
    try:
        processes = concurrency or 1  # AFTERTRIP_WORKER_CONCURRENCY's default
        assert _pool_size(env, name) == processes
        ready = _wait_for_lines(log, "pool process ready", processes)
        threads = max(1, _cores() // processes)
        assert len(ready) == processes, tail(log)
        assert all(f"{processes} process(es) x {threads} inference thread(s)" in r for r in ready)
        problem = _wait_for_lines(log, "setup problem", 1)
        assert problem, tail(log)
        assert (
            "cannot reach the database mysql+pymysql://aftertrip:***@127.0.0.1:1/webapp"
            in (problem[0])
        )
        assert "not-the-password" not in log.read_text()
    finally:
        stop_process(worker)
        from redis import Redis

        Redis.from_url(REDIS_URL).delete(queue)
