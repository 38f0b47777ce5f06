"""The composition root: settings in; the database sessions, the photo store and the pipeline
out. The Celery tasks (`tasks.trip`), `aftertrip-faces rerun --inline` and the other
commands all open what they use here, so each is made one way (Celery-free).

Everything is made lazily, on first use: a Celery worker's prefork parent must not open a
CUDA context, database connections or HTTP pools that its children would inherit.
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from storage import LocalStore, PhotoStore, S3Store, parse_s3_uri, s3_fetch
from storage.errors import StorageConfigError

if TYPE_CHECKING:
    from redis import Redis
    from sqlalchemy import Engine
    from sqlalchemy.orm import Session, sessionmaker

    from tasks.guard import JobGuard
    from tasks.locks import TripLock
    from tasks.settings import ServiceSettings
    from worker.pipeline import FacePipeline
    from worker.settings import PipelineSettings


def open_photo_store(settings: ServiceSettings) -> PhotoStore:
    """The photo store the settings name: the S3 bucket, or a local folder in development."""
    if settings.s3_bucket:
        return S3Store(
            settings.s3_bucket,
            endpoint_url=settings.s3_endpoint_url,
            max_pool_connections=settings.s3_max_pool_connections,
            read_timeout=settings.s3_read_timeout,
            read_attempts=settings.s3_read_attempts,
        )
    if settings.photo_root is not None:
        return LocalStore(settings.photo_root)
    raise StorageConfigError("no photo store: set AFTERTRIP_S3_BUCKET")


def open_album(path: str) -> tuple[PhotoStore, list[str]]:
    """The store and photo keys behind a folder path or an s3://bucket/prefix URI (the
    `group` command's album: no service settings needed)."""
    if path.startswith("s3://"):
        bucket, prefix = parse_s3_uri(path)
        s3 = S3Store(bucket, endpoint_url=os.environ.get("AFTERTRIP_S3_ENDPOINT_URL") or None)
        return s3, [k for k in s3.list(prefix) if not k.endswith("/")]
    root = Path(path)
    if not root.is_dir():
        raise SystemExit(f"error: {path} is not a folder (or an s3://bucket/prefix URI)")
    # A local album is the user's own files: links to photos kept elsewhere are followed.
    local = LocalStore(root, follow_links=True)
    visible = [k for k in local.list("") if not any(p.startswith(".") for p in k.split("/"))]
    return local, visible


def open_pipeline(settings: PipelineSettings, store: PhotoStore | None = None) -> FacePipeline:
    """Detector and embedder (loaded on first use); s3:// model files are read with the
    store's S3 client when it has one."""
    # Imported here: it brings onnxruntime and the models, which Flower, the web app's
    # client and the prefork parent never need.
    from worker.pipeline import FacePipeline

    client = getattr(store, "client", None)
    return FacePipeline(settings, fetch=partial(s3_fetch, client=client))


LOCK_REDIS_TIMEOUT = 5.0
"""Seconds a lock command may wait to connect or for its answer. The lock lives six heartbeats
(60 s by default): a renewal on a link gone silent must fail (and be tried again next beat)
well before that. redis-py 8 has this default; redis-py 5 to 7, which the requirements allow,
have none and wait for good."""


def lock_redis(url: str) -> Redis:
    """A client of the Redis of the per-trip locks, with socket timeouts."""
    from redis import Redis

    return Redis.from_url(
        url, socket_timeout=LOCK_REDIS_TIMEOUT, socket_connect_timeout=LOCK_REDIS_TIMEOUT
    )


class Services:
    """What a process opens once from its settings and keeps: engine and sessions, photo
    store, pipeline, and the Redis of the per-trip locks."""

    def __init__(self, settings: ServiceSettings) -> None:
        self.settings = settings
        self._engine: Engine | None = None
        self._sessions: sessionmaker[Session] | None = None
        self._store: PhotoStore | None = None
        self._pipeline: FacePipeline | None = None
        self._redis: Redis | None = None

    @property
    def sessions(self) -> sessionmaker[Session]:
        """Sessions on the process's one engine."""
        if self._sessions is None:
            from db.session import make_sessionmaker

            self._engine = self.settings.database_engine()
            self._sessions = make_sessionmaker(self._engine)
        return self._sessions

    @property
    def store(self) -> PhotoStore:
        """The photo bucket (or, in development, AFTERTRIP_PHOTO_ROOT)."""
        if self._store is None:
            self._store = open_photo_store(self.settings)
        return self._store

    @property
    def pipeline(self) -> FacePipeline:
        """Detector and embedder, loaded on the first job of this process."""
        if self._pipeline is None:
            self._pipeline = open_pipeline(self.settings, self.store)
        return self._pipeline

    @property
    def redis(self) -> Redis:
        """The Redis of the per-trip locks (`lock_redis`)."""
        if self._redis is None:
            self._redis = lock_redis(self.settings.effective_lock_url)
        return self._redis

    def guard(self, lock: TripLock | None = None) -> JobGuard:
        """A heartbeat and stop checks for one job run (renewing `lock` when given)."""
        from tasks.guard import JobGuard

        return JobGuard(
            self.sessions,
            heartbeat_seconds=self.settings.heartbeat_seconds,
            stall_seconds=self.settings.stall_seconds,
            lock=lock,
            soft_time_limit=self.settings.task_soft_time_limit,
        )

    def close(self) -> None:
        """Close the engine's connections (a command's end)."""
        if self._engine is not None:
            self._engine.dispose()

    def forget(self) -> None:
        """Drop what a parent process made before forking, without closing what the parent
        still uses (each child opens its own)."""
        if self._engine is not None:
            self._engine.dispose(close=False)
        self._engine = self._sessions = self._store = self._pipeline = self._redis = None
