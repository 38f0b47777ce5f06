"""Loaded into the test workers (`celery worker -I tests.support.servicehooks`): holds a job at a
known point so that service tests do not depend on how long a job happens to take.

With AFTERTRIP_TEST_HOLD_DIR set, a job that reaches `tasks.analyze.analysis_started` (it holds
its trip's lock and its job row, and has listed its photos) while `<dir>/hold` exists writes
`<dir>/held-<trip>-<job>` and waits until `hold` is removed (at most `HOLD_LIMIT` seconds).
Likewise `<dir>/hold-chunk` holds an `analyze_chunk` task after it stored its first batch
(`held-chunk-<job>-<pid>`): a chunk caught half done; and `<dir>/hold-batch` a job that
analyses its photos itself after each batch it stored (`held-batch-<job>`): a job caught
part way through its photos.

`DUMP_STACKS_SIGNAL` (SIGUSR2, which Celery leaves alone) makes the worker's processes write
every thread's stack to their log: what a test sends a worker that stopped answering.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import time
from pathlib import Path

from tasks.analyze import analysis_started, photos_stored

logger = logging.getLogger(__name__)

HOLD_LIMIT = 300.0
DUMP_STACKS_SIGNAL = signal.SIGUSR2

# Loaded before the pool forks: its processes inherit the handler (written to stderr, the log).
faulthandler.register(DUMP_STACKS_SIGNAL, all_threads=True)


def hold_dir() -> Path | None:
    """The folder of the hold files, if this worker is under test."""
    value = os.environ.get("AFTERTRIP_TEST_HOLD_DIR")
    return Path(value) if value else None


@analysis_started.connect
def _hold(sender: object = None, *, trip_id: int, job_id: int, **_kwargs: object) -> None:
    folder = hold_dir()
    if folder is None or not (folder / "hold").exists():
        return
    (folder / f"held-{trip_id}-{job_id}").write_text(str(os.getpid()))
    logger.info("test hook: holding job %s of trip %s", job_id, trip_id)
    deadline = time.monotonic() + HOLD_LIMIT
    while (folder / "hold").exists() and time.monotonic() < deadline:
        time.sleep(0.05)


@photos_stored.connect
def _hold_chunk(
    sender: object = None, *, trip_id: int, job_id: int, chunk: bool, **_kwargs: object
) -> None:
    folder = hold_dir()
    if folder is not None and not chunk and (folder / "hold-batch").exists():
        _hold_batch(folder, job_id)
        return
    if folder is None or not chunk or not (folder / "hold-chunk").exists():
        return
    (folder / f"held-chunk-{job_id}-{os.getpid()}").write_text(str(os.getpid()))
    logger.info("test hook: holding a chunk of job %s in process %s", job_id, os.getpid())
    deadline = time.monotonic() + HOLD_LIMIT
    while (folder / "hold-chunk").exists() and time.monotonic() < deadline:
        time.sleep(0.05)


def _hold_batch(folder: Path, job_id: int) -> None:
    (folder / f"held-batch-{job_id}").write_text(str(os.getpid()))
    logger.info("test hook: holding job %s after a stored batch", job_id)
    deadline = time.monotonic() + HOLD_LIMIT
    while (folder / "hold-batch").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
