"""The Celery tasks: `aftertrip.take_requests(trip_id)`, `aftertrip.group_trip(trip_id, mode)`
and `aftertrip.analyze_chunk`.

Glue only: each task checks its arguments, opens what it needs through the process's
`tasks.compose.Services` and runs the Celery-free job (`tasks.job.run_trip_job`, or a chunk:
`tasks.fanout.analyze_chunk_body`). Celery's part stays here: the web app's requests taken
(`take_requests`, a no-op while the trip's job runs: that job follows up when it ends), a busy
trip's `group_trip` put back on the queue, retries (`tasks.retry` decides), progress as the
task's state, chunks sent as a group, the soft time limit's signal, a fresh process state after
the pool forks, the sweep of requests whose nudge was lost (`tasks.sweep`).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
import uuid
from functools import partial
from types import FrameType
from typing import Any

import redis.exceptions
from celery import Task, group
from celery.exceptions import BackendError, Ignore, SoftTimeLimitExceeded
from celery.signals import celeryd_after_setup, worker_process_init, worker_ready, worker_shutdown

from db.requests import claim_requests, has_open_requests, settle_wait
from tasks.analyze import ProgressCallback
from tasks.app import app
from tasks.compose import Services
from tasks.fanout import FanOut, analyze_chunk_body
from tasks.guard import SOFT_LIMIT
from tasks.job import InvalidJobArguments, check_job_arguments, finished_result, run_trip_job
from tasks.locks import Lease, TripLock, chunk_lease_name
from tasks.names import ANALYZE_CHUNK, GROUP_TRIP, PROGRESS, TAKE_REQUESTS
from tasks.retry import (
    RETRY_SINCE_HEADER,
    RETRYABLE_ERRORS,
    count_delivery,
    retry_delay,
    retry_since,
)
from tasks.settings import CONCURRENCY_VARIABLE, get_settings

logger = logging.getLogger(__name__)


class GroupTripTask(Task):
    """Base of the tasks: the process's one `Services` (engine, store, pipeline, Redis), made
    on the first job in the pool's child process and shared by `group_trip` and
    `analyze_chunk`."""

    _services: Services | None = None

    @property
    def services(self) -> Services:
        """The process's sessions, store, pipeline and Redis."""
        if GroupTripTask._services is None:
            GroupTripTask._services = Services(get_settings())
        return GroupTripTask._services

    def forget_process_state(self) -> None:
        """Drop what a parent process may have made before forking (each child makes its own)."""
        if GroupTripTask._services is not None:
            GroupTripTask._services.forget()
        GroupTripTask._services = None


def install_soft_limit_handler() -> None:
    """Record the soft time limit's signal (SIGUSR1) before raising `SoftTimeLimitExceeded`
    where the job's thread is, so the job ends as timed out instead of calling the photo it
    was analysing broken (`tasks.guard.JobGuard.check`). Call in the job's process."""
    sig = getattr(signal, "SIGUSR1", None)
    if sig is None or SOFT_LIMIT.installed:
        return
    if threading.current_thread() is not threading.main_thread():
        return  # only the main thread may set handlers (and receives the signal)

    def handler(signum: int, frame: FrameType | None) -> None:
        SOFT_LIMIT.hit = True
        raise SoftTimeLimitExceeded()

    signal.signal(sig, handler)
    SOFT_LIMIT.installed = True


# max_retries=None: the retry budget in time (`tasks.retry.retry_delay`) decides, not a count.
@app.task(bind=True, base=GroupTripTask, name=GROUP_TRIP, max_retries=None)
def group_trip(self: GroupTripTask, trip_id: int, mode: str = "missing") -> dict[str, Any]:
    """Group one trip's photos into person folders (`mode`: "missing" or "all").

    Transient errors (S3, database, Redis, a lost lock) are retried with backoff until
    AFTERTRIP_TASK_RETRY_BUDGET seconds have passed since the first of them.
    """
    trip_id, mode = check_job_arguments(trip_id, mode)
    install_soft_limit_handler()
    services = self.services
    task_id = self.request.id or f"local-{uuid.uuid4()}"
    since = retry_since(self.request)
    try:
        lock = TripLock(services.redis, trip_id, owner=task_id, ttl=services.settings.lock_ttl)
        if not lock.acquire():
            _wait_for_turn(self, trip_id, mode, holder=lock.holder(), retry_since=since)
        try:
            return _run_job(self, trip_id, mode, task_id, lock, since)
        finally:
            lock.release()
            _follow_up(self, trip_id)
    except RETRYABLE_ERRORS as exc:
        _retry(self, exc, trip_id, task_id, since)
        raise  # not reached: _retry raises


@app.task(bind=True, base=GroupTripTask, name=TAKE_REQUESTS, max_retries=None)
def take_requests(self: GroupTripTask, trip_id: int) -> dict[str, Any]:
    """Carry out the trip's open requests (aftertrip_request rows the web app wrote) as one
    job, in the mode they ask for ("all" wins over "missing").

    Sent by `aftertrip_client` after the app's commit, by a job that ends while requests
    wait, and by the worker's sweep. Ends at once when the trip's job runs (that job sends
    this again when it ends, so the requests wait seconds, not a lock's wait) or when no
    request is open (another job took them); sends itself again for when a burst of
    requests has settled (AFTERTRIP_REQUEST_SETTLE_SECONDS). Retries as `group_trip` does.
    """
    trip_id, _mode = check_job_arguments(trip_id, "missing")
    install_soft_limit_handler()
    services = self.services
    task_id = self.request.id or f"local-{uuid.uuid4()}"
    since = retry_since(self.request)
    try:
        lock = TripLock(services.redis, trip_id, owner=task_id, ttl=services.settings.lock_ttl)
        if not lock.acquire():
            holder = lock.holder()
            logger.info(
                "trip busy: its running job takes the request when it ends",
                extra={"trip_id": trip_id, "task_id": task_id, "holder": holder},
            )
            return {"trip_id": trip_id, "joined": holder}
        ran = False
        try:
            settle = services.settings.request_settle_seconds
            with services.sessions() as session:
                wait = settle_wait(
                    session=session,
                    trip_id=trip_id,
                    settle_seconds=settle,
                    max_wait_seconds=10 * settle,
                )
                mode = None
                if wait <= 0:
                    mode = claim_requests(session=session, trip_id=trip_id, task_id=task_id)
            if wait > 0:  # a burst may still be coming: one job for all of it
                _settle(self, trip_id, wait)
            if mode is None:
                logger.info("no open request", extra={"trip_id": trip_id, "task_id": task_id})
                return {"trip_id": trip_id, "joined": None}
            ran = True
            return _run_job(self, trip_id, mode, task_id, lock, since)
        finally:
            lock.release()
            if ran:  # only a job's end owes the requests that came meanwhile a follow-up
                _follow_up(self, trip_id)
    except RETRYABLE_ERRORS as exc:
        _retry(self, exc, trip_id, task_id, since)
        raise  # not reached: _retry raises


def _settle(task: GroupTripTask, trip_id: int, wait: float) -> None:
    """Send this request again for when the trip's burst of requests has settled, under the
    same task id (a client following the nudge's `job_progress` keeps following it), and end
    this delivery without a result. A broker that cannot take it is logged: the requests
    stay, and the sweep queues them."""
    logger.info(
        "requests settling for %.1f s", wait, extra={"trip_id": trip_id, "task_id": task.request.id}
    )
    try:
        task.apply_async(
            args=(trip_id,),
            countdown=wait,
            task_id=task.request.id,
            retries=task.request.retries,
            queue=task.services.settings.queue,
        )
    except Exception as exc:  # never lose the rows for this: the sweep has them
        logger.warning("settling request not queued (the sweep will): %s", exc)
    raise Ignore()


def _run_job(
    task: GroupTripTask,
    trip_id: int,
    mode: str,
    task_id: str,
    lock: TripLock,
    since: float | None,
) -> dict[str, Any]:
    """`run_trip_job` with the process's services, holding the trip's `lock`."""
    services = task.services
    settings = services.settings
    guard = services.guard(lock)
    # The lock is renewed from here on, through the models' loading in `run_trip_job` (the
    # job row's heartbeat joins once the row exists): see `JobGuard.start`.
    guard.start()
    try:
        done = finished_result(services.sessions, task_id)
        if done is not None:
            # A duplicate of a job that has ended (e.g. a message Redis put back): its work
            # is done and recorded; running it again would count a delivery and rewrite the
            # folders for nothing.
            logger.warning(
                "job already done: this delivery is a duplicate, its result returned",
                extra={"trip_id": trip_id, "task_id": task_id, "job_id": done["job_id"]},
            )
            return done
        count_delivery(
            services, task_id=task_id, retries=task.request.retries, trip_id=trip_id, mode=mode
        )
        return run_trip_job(
            sessions=services.sessions,
            store=services.store,
            pipeline=services.pipeline,
            settings=settings,
            trip_id=trip_id,
            mode=mode,
            task_id=task_id,
            thumbnail_prefix=settings.s3_thumbnail_prefix,
            on_progress=_progress_reporter(task),
            will_retry=lambda exc: _retry_delay(task, exc, since) is not None,
            guard=guard,
            fan_out=FanOut(
                chunk_photos=settings.chunk_photos,
                redis=services.redis,
                owner=task_id,
                lease_ttl=settings.lock_ttl,
                send=partial(_send_chunks, queue=settings.queue),
            ),
        )
    finally:
        guard.stop()


def _retry(
    task: GroupTripTask, exc: Exception, trip_id: int, task_id: str, since: float | None
) -> None:
    """Raise Celery's retry of this delivery after a transient error, or `exc` itself when
    the retry budget is spent."""
    delay = _retry_delay(task, exc, since)
    if delay is None:
        raise exc
    since = since if since is not None else time.time()
    logger.warning(
        "job will be retried in %.0f s: %s",
        delay,
        exc,
        extra={"trip_id": trip_id, "task_id": task_id, "retry_since": since},
    )
    raise task.retry(exc=exc, countdown=delay, headers={RETRY_SINCE_HEADER: since}) from exc


def _follow_up(task: GroupTripTask, trip_id: int) -> None:
    """After a job of the trip released its lock: requests that came while it ran get their
    one follow-up job now. Best-effort: a database or broker that fails here is logged, and
    the sweep queues the trip later."""
    if task.request.called_directly:
        return
    try:
        with task.services.sessions() as session:
            due = has_open_requests(session=session, trip_id=trip_id)
        if due:
            take_requests.apply_async(
                args=(trip_id,),
                queue=task.services.settings.queue,
                retry=True,
                retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5},
            )
            logger.info(
                "follow-up job queued for requests that came meanwhile", extra={"trip_id": trip_id}
            )
    except Exception as exc:  # never fail the job that ended for this; the sweep catches it
        logger.warning("follow-up not queued (the sweep will): %s", exc, extra={"trip_id": trip_id})


def _send_chunks(
    trip_id: int, job_id: int, split: str, chunks: list[tuple[int, list[int]]], *, queue: str
) -> None:
    """Queue one `analyze_chunk` per chunk (a Celery group; results are not kept)."""
    group(
        analyze_chunk.si(trip_id, job_id, split, number, photo_ids).set(queue=queue)
        for number, photo_ids in chunks
    ).apply_async()


@app.task(bind=True, base=GroupTripTask, name=ANALYZE_CHUNK, ignore_result=True)
def analyze_chunk(
    self: GroupTripTask, trip_id: int, job_id: int, split: str, chunk: int, photo_ids: list[int]
) -> int:
    """Analyse and store one chunk of a fanned-out job's photos (see `group_trip`).

    Nothing to retry here: a chunk that fails or whose worker dies releases (or lets lapse)
    its lease, and the job that sent it analyses what the chunk did not store.
    """
    for value in (trip_id, job_id, chunk, *photo_ids):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InvalidJobArguments(f"analyze_chunk takes integer ids, not {value!r}")
    if not isinstance(split, str) or not split.isalnum():
        raise InvalidJobArguments(f"analyze_chunk's split must be a short token, not {split!r}")
    install_soft_limit_handler()
    services = self.services
    owner = self.request.id or f"local-{uuid.uuid4()}"
    name = chunk_lease_name(job_id, split, chunk)
    return analyze_chunk_body(
        sessions=services.sessions,
        store=services.store,
        pipeline=services.pipeline,
        lease=Lease(services.redis, name, owner=owner, ttl=services.settings.lock_ttl),
        guard=services.guard(),
        trip_id=trip_id,
        job_id=job_id,
        photo_ids=list(photo_ids),
        thumbnail_prefix=services.settings.s3_thumbnail_prefix,
    )


def _retry_delay(task: GroupTripTask, exc: Exception, since: float | None) -> float | None:
    """`tasks.retry.retry_delay` for this delivery; never a retry outside a worker."""
    if task.request.called_directly:
        return None
    settings = task.services.settings
    return retry_delay(
        exc,
        since=since,
        retries=task.request.retries,
        budget=settings.task_retry_budget,
        backoff_max=settings.task_retry_backoff_max,
    )


def _report(task: GroupTripTask, meta: dict[str, Any]) -> bool:
    """Set the task's PROGRESS state, best-effort and at once: False (logged) when the result
    backend cannot take it now. One try (`max_retries=0`): Celery's own retries of a state
    write (`result_backend_always_retry`, meant for the job's outcome) held the job ~40 s per
    progress write while Redis was down, then raised BackendStoreError, which must not end a
    job any more than a RedisError does."""
    try:
        task.update_state(state=PROGRESS, meta=meta, max_retries=0)
    except (redis.exceptions.RedisError, OSError, BackendError) as exc:
        logger.warning("progress not reported (result backend unreachable): %s", exc)
        return False
    return True


def _progress_reporter(task: GroupTripTask) -> ProgressCallback:
    """Progress as the task's PROGRESS state; a result backend outage never fails the job."""
    silent_until = 0.0

    def report(stage: str, done: int, total: int) -> None:
        nonlocal silent_until
        if task.request.id is None or time.monotonic() < silent_until:
            return
        if not _report(task, {"stage": stage, "done": done, "total": total}):
            silent_until = time.monotonic() + 10

    return report


def _wait_for_turn(
    task: GroupTripTask, trip_id: int, mode: str, *, holder: str | None, retry_since: float | None
) -> None:
    """Put this request back on the queue to run after the trip's current job.

    Sent again under the same task id (so a client waiting on it keeps waiting) and with
    the same retry count: waiting for a busy trip does not use up retries meant for errors.
    """
    wait = task.services.settings.lock_wait_seconds
    logger.info(
        "trip busy, waiting",
        extra={"trip_id": trip_id, "holder": holder, "task_id": task.request.id, "wait_s": wait},
    )
    if task.request.id is not None:
        _report(task, {"stage": "waiting", "done": 0, "total": 0, "holder": holder})
    task.apply_async(
        args=(trip_id,),
        kwargs={"mode": mode},
        countdown=wait,
        task_id=task.request.id,
        retries=task.request.retries,
        headers={RETRY_SINCE_HEADER: retry_since} if retry_since is not None else None,
    )
    raise Ignore()


@celeryd_after_setup.connect
def _settle_concurrency(sender: object, instance: Any, **_kwargs: object) -> None:
    """The pool's real size is the concurrency each process shares the cores by.

    `celeryconfig.worker_concurrency` is AFTERTRIP_WORKER_CONCURRENCY, but `celery worker
    --concurrency N` overrides it: the pool processes (forked after this) then read N, so
    `worker.runtime.cpu_threads` gives each cores // N threads whichever command started them.
    """
    processes = int(getattr(instance, "concurrency", 0) or 0)
    if processes > 0 and processes != get_settings().worker_concurrency:
        os.environ[CONCURRENCY_VARIABLE] = str(processes)
        get_settings.cache_clear()


@worker_process_init.connect
def _fresh_process_state(**_kwargs: object) -> None:
    group_trip.forget_process_state()
    from worker.runtime import cpu_threads

    settings = get_settings()
    logger.info(
        "pool process ready: %d process(es) x %d inference thread(s)",
        settings.worker_concurrency,
        cpu_threads(settings),
    )


@worker_ready.connect
def _check_setup(**_kwargs: object) -> None:
    """Say at start-up, in one line, what a job would otherwise fail on: the database
    unreachable, a wrong password, the worker's tables missing. The worker runs on (the jobs
    retry while the database is fixed); the check runs beside it, not in its way."""
    from tasks.problems import database_problem

    def check() -> None:
        problem = database_problem(get_settings())
        if problem is not None:
            logger.error("setup problem: %s", problem.replace("\n", " "))

    threading.Thread(target=check, name="aftertrip-setup-check", daemon=True).start()


@worker_ready.connect
def _start_sweep(sender: Any = None, **_kwargs: object) -> None:
    """The sweep of requests whose nudge was lost (a broker outage), in the worker's main
    process: once now, then every AFTERTRIP_REQUEST_SWEEP_SECONDS."""
    from tasks.sweep import RequestSweep

    RequestSweep.start_once(get_settings(), send=_send_take_requests)


@worker_shutdown.connect
def _stop_sweep(**_kwargs: object) -> None:
    from tasks.sweep import RequestSweep

    RequestSweep.stop_running()


def _send_take_requests(trip_id: int) -> None:
    """Queue `take_requests(trip_id)` once, without retries (the sweep tries again later)."""
    take_requests.apply_async(args=(trip_id,), queue=get_settings().queue, retry=False)
