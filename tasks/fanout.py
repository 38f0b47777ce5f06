"""A big job fanned out: chunks of its photos analysed by every free worker (Celery-free:
the chunks are sent through a callable the Celery task gives; docs/scaling.md)."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from redis import Redis
from sqlalchemy.orm import Session, sessionmaker

from db.jobs import job_is_running, job_stored_photos
from db.photos import photos_to_analyze
from storage import PhotoStore
from tasks.analyze import (
    ProgressCallback,
    Todo,
    Work,
    analysis_started,
    analyze_and_store,
    job_work,
    todo_of,
)
from tasks.guard import JobGuard
from tasks.locks import Lease, chunk_lease_name

if TYPE_CHECKING:
    from worker.pipeline import FacePipeline

logger = logging.getLogger(__name__)

FAN_OUT_POLL_SECONDS = 0.25
"""How often a fanned-out job looks at its chunks' progress while others analyse them."""


@dataclass
class FanOut:
    """How a job hands chunks of its photos to the other workers (the Celery path).

    `send(trip_id, job_id, split, chunks)` queues one `analyze_chunk` task per
    (chunk number, photo ids); `redis` holds the chunk leases.
    """

    chunk_photos: int
    redis: Redis
    owner: str
    lease_ttl: float
    send: Callable[[int, int, str, list[tuple[int, list[int]]]], None]

    def worth_it(self, photos: int) -> bool:
        """Fan out only a job of more than two chunks: a small trip stays one task."""
        return self.chunk_photos > 0 and photos > 2 * self.chunk_photos


def analyze_fanned_out(
    work: Work, todo: Todo, fan_out: FanOut, guard: JobGuard, progress: ProgressCallback
) -> None:
    """Analyse a big job's photos in chunks: each chunk is queued as an `analyze_chunk` task
    for every free worker, and this job takes the chunks no one has started yet (from the
    end of the list, while the other workers start at its head).

    A chunk is taken by holding its lease (renewed each heartbeat): a chunk whose worker died
    has its lease lapse, and this job takes it over and analyses only what it did not store.
    Returns when every photo of `todo` has been stored by this job.
    """
    size = fan_out.chunk_photos
    chunks = [todo[i : i + size] for i in range(0, len(todo), size)]
    split = uuid.uuid4().hex[:8]
    fan_out.send(
        work.trip_id,
        work.job_id,
        split,
        [(n, [p for p, _k, _n in c]) for n, c in enumerate(chunks)],
    )
    logger.info(
        "job fanned out: %d photos in %d chunks",
        len(todo),
        len(chunks),
        extra={"trip_id": work.trip_id, "job_id": work.job_id, "chunks": len(chunks)},
    )
    wanted = {photo_id for photo_id, _key, _name in todo}
    pending = list(range(len(chunks)))
    sha = work.pipeline.embedder.sha256
    own = 0
    known = 0  # photos of `todo` stored, by anyone: the job's progress

    def on_photo() -> None:
        nonlocal known
        known += 1
        progress("analyze", min(known, len(wanted)), len(wanted))

    work = replace(work, on_photo=on_photo)
    while pending:
        work.check()
        with work.sessions() as session:
            stored = job_stored_photos(session=session, job_id=work.job_id, embedder_sha256=sha)
        known = len(wanted & stored.keys())
        progress("analyze", known, len(wanted))
        pending = [n for n in pending if any(p not in stored for p, _k, _n in chunks[n])]
        for n in reversed(pending):
            lease = Lease(
                fan_out.redis,
                chunk_lease_name(work.job_id, split, n),
                owner=fan_out.owner,
                ttl=fan_out.lease_ttl,
            )
            if not lease.acquire():
                continue
            guard.leases.append(lease)
            try:
                with work.sessions() as session:
                    stored = job_stored_photos(
                        session=session, job_id=work.job_id, embedder_sha256=sha
                    )
                own += analyze_and_store(work, [t for t in chunks[n] if t[0] not in stored])
            finally:
                guard.leases.remove(lease)
                lease.release()
            break
        else:
            time.sleep(FAN_OUT_POLL_SECONDS)
    logger.info(
        "job's chunks all stored (%d photos analysed here)",
        own,
        extra={"trip_id": work.trip_id, "job_id": work.job_id},
    )


def analyze_chunk_body(
    *,
    sessions: sessionmaker[Session],
    store: PhotoStore,
    pipeline: FacePipeline,
    lease: Lease,
    guard: JobGuard,
    trip_id: int,
    job_id: int,
    photo_ids: list[int],
    thumbnail_prefix: str | None,
) -> int:
    """One chunk of a fanned-out job: analyse and store the photos of `photo_ids` that the
    job has not stored yet. Does nothing (returns 0) when the job is no longer running or
    another worker holds the chunk. Returns how many photos it stored."""
    with sessions() as session:
        if not job_is_running(session=session, job_id=job_id):
            logger.info("chunk of a job no longer running: skipped", extra={"job_id": job_id})
            return 0
        session.rollback()
    if not lease.acquire():
        logger.info("chunk taken by another worker: skipped", extra={"job_id": job_id})
        return 0
    guard.leases.append(lease)
    guard.start(job_id)
    try:
        wanted = set(photo_ids)
        with sessions() as session:
            photos = photos_to_analyze(
                session=session,
                trip_id=trip_id,
                embedder_sha256=pipeline.embedder.sha256,
                mode="all",
                job_id=job_id,
            )
            todo = todo_of(photos, wanted)
            session.rollback()
        work = job_work(
            sessions, store, pipeline, (trip_id, job_id), thumbnail_prefix, guard, chunk=True
        )
        analysis_started.send(sender=analyze_chunk_body, trip_id=trip_id, job_id=job_id)
        stored = analyze_and_store(work, todo)
    finally:
        guard.stop()
        guard.leases.remove(lease)
        lease.release()
    logger.info(
        "chunk stored %d of its %d photos",
        stored,
        len(photo_ids),
        extra={"trip_id": trip_id, "job_id": job_id},
    )
    return stored
