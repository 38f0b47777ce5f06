"""The worker service's settings: the pipeline's, plus broker, database, S3 and limits.

One `ServiceSettings` is built once per process (`get_settings()`) and passed down;
every field is read from `AFTERTRIP_<FIELD>` environment variables.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Self
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, SecretStr, ValidationError, model_validator

from worker.errors import AfterTripError
from worker.settings import PipelineSettings

if TYPE_CHECKING:
    from sqlalchemy import Engine

Environment = Literal["development", "production"]

DEV_DATABASE_URL = "sqlite:///aftertrip-faces.sqlite3"

CONCURRENCY_VARIABLE = "AFTERTRIP_WORKER_CONCURRENCY"


class UnsafeSettingsError(ValueError):
    """A setting is left at a default that is only fit for development."""


class ServiceSettings(PipelineSettings):
    """Everything the Celery worker, the admin commands and Flower need."""

    environment: Environment = Field(
        default="development",
        description="development or production; production refuses development-only defaults.",
    )

    # broker and results
    broker_url: str = Field(
        default="redis://127.0.0.1:6379/0",
        description="Celery broker (Redis) the web app sends jobs to.",
    )
    result_backend: str = Field(
        default="redis://127.0.0.1:6379/1",
        description="Where task states and PROGRESS meta are kept (Flower, `rerun --wait`).",
    )
    lock_url: str | None = Field(
        default=None,
        description="Redis for the one-job-per-trip locks; empty = the broker (if it is Redis).",
    )
    queue: str = Field(default="faces", description="Queue the grouping task is routed to.")

    # the web app's database
    database_url: str = Field(
        default=DEV_DATABASE_URL,
        description="SQLAlchemy URL of the web app's database "
        "(postgresql+psycopg://…, mysql+pymysql://…).",
    )
    webapp_time_zone: str = Field(
        # db.types.DEFAULT_TIME_ZONE, written out: these settings load without SQLAlchemy.
        default="Asia/Seoul",
        description="The web app's time zone: its Django TIME_ZONE when USE_TZ = False "
        "(AfterTrip: Asia/Seoul, the default), UTC when USE_TZ = True. Every time the worker "
        "writes to a MySQL/MariaDB/SQLite datetime column is local time in it (PostgreSQL's "
        "timestamptz stores the instant), and every time `status` shows is in it, named.",
    )
    database_connect_timeout: float = Field(
        default=10.0,
        gt=0,
        description="Seconds to wait for a new database connection before it fails (and the "
        "job retries).",
    )
    database_statement_timeout: float = Field(
        default=60.0,
        ge=0,
        description="Seconds one database statement may wait for the server before its "
        "connection is dropped and the job retries: a connection that went silent (no reset) "
        "fails this soon instead of hanging the job. 0 = wait forever.",
    )

    # storage
    s3_bucket: str | None = Field(
        default=None, description="Bucket holding the trip photos (required)."
    )
    s3_endpoint_url: str | None = Field(
        default=None, description="S3-compatible endpoint (MinIO, …); empty = AWS."
    )
    photo_root: Path | None = Field(
        default=None,
        description="Development only, when no bucket is set: read photos (and write "
        "thumbnails) under this folder, keys being paths in it.",
    )
    s3_thumbnail_prefix: str = Field(
        default="faces/",
        description="Key prefix of face thumbnails: {prefix}{trip}/{photo key}/{i}.jpg.",
    )
    s3_max_pool_connections: int = Field(
        default=16, description="HTTP connections per worker process to S3 (reads run on threads)."
    )
    s3_read_timeout: float = Field(
        default=30.0,
        gt=0,
        description="Seconds an S3 socket read may wait for the next bytes (an answer, or more "
        "of a photo's body) before it fails; a stalled connection is noticed this soon.",
    )
    s3_read_attempts: int = Field(
        default=3,
        ge=1,
        description="Tries of one photo's S3 read whose connection stalled or broke off, with "
        "a short backoff, before the job retries as a whole.",
    )

    # limits and retries
    task_soft_time_limit: int = Field(
        default=3300,
        description="Seconds before a job is asked to stop (it fails and is recorded).",
    )
    task_time_limit: int = Field(
        default=3600, description="Seconds before a job's process is killed (hard limit)."
    )
    task_retry_budget: int = Field(
        default=900,
        description="Seconds after a job's first transient S3, database or Redis error during "
        "which it keeps being retried (with backoff): outages shorter than this lose no job.",
    )
    task_retry_backoff_max: int = Field(
        default=60, description="Longest wait between two retries of a job, seconds."
    )
    task_max_deliveries: int = Field(
        default=3,
        description="Give up on a job whose worker process died this many times "
        "(e.g. killed for memory) instead of redelivering it forever.",
    )
    heartbeat_seconds: float = Field(
        default=10.0,
        description="A running job renews its trip lock and its row's heartbeat this often; "
        "the lock dies 6 beats after its holder, a row with no beat for 12 reads stalled.",
        gt=0,
    )
    chunk_photos: int = Field(
        default=48,
        ge=0,
        description="Fan-out: a job with more than twice this many photos to analyse sends "
        "them in chunks of this size to every free worker; 0 = one task per trip.",
    )
    lock_wait_seconds: int = Field(
        default=20, description="How long a job waits before checking again when its trip is busy."
    )
    request_settle_seconds: float = Field(
        default=1.0,
        ge=0,
        description="A trip's requests start their job once none came for this long (a burst "
        "of uploads and deletes is one job), or once the oldest has waited ten times this. "
        "0 = at once.",
    )
    request_sweep_seconds: float = Field(
        default=10.0,
        ge=0,
        description="Every this many seconds (and at start-up) each worker queues the trips "
        "whose requests (aftertrip_request) no job took for that long: the web app's "
        "requests whose nudge a broker outage lost. 0 = no sweep.",
    )
    worker_soft_shutdown_timeout: float = Field(
        default=60.0,
        description="On SIGQUIT (the containers' stop signal), let a running job finish for "
        "this many seconds, then put it back on the queue for another worker.",
    )
    worker_concurrency: int = Field(
        default=1,
        ge=1,
        description="Worker processes per worker, `aftertrip-faces worker` and `celery -A tasks "
        "worker` alike (1 per GPU); each process's inference threads are the cores divided by "
        "it (AFTERTRIP_THREADS). A `--concurrency N` given to either command wins, threads too.",
    )
    worker_max_memory_per_child: int = Field(
        default=2_500_000,
        description="KiB of resident memory after which a pool process is replaced once its "
        "job ends (Celery's last guard; a CPU worker peaks at about 1.8 GiB whatever the album, "
        "docs/reliability.md); 0 = no limit.",
    )

    # Flower
    flower_basic_auth: SecretStr | None = Field(
        default=None,
        description="user:password[,user2:password2] for Flower; Flower refuses to start without.",
    )
    flower_address: str = Field(default="127.0.0.1", description="Address Flower listens on.")
    flower_port: int = Field(default=5555, description="Port Flower listens on.")

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.task_soft_time_limit >= self.task_time_limit:
            raise UnsafeSettingsError(
                "AFTERTRIP_TASK_SOFT_TIME_LIMIT must be below AFTERTRIP_TASK_TIME_LIMIT, "
                "so a job can record its failure before it is killed"
            )
        try:
            ZoneInfo(self.webapp_time_zone)
        except (ValueError, ZoneInfoNotFoundError):
            raise UnsafeSettingsError(
                f"AFTERTRIP_WEBAPP_TIME_ZONE={self.webapp_time_zone!r} is not an IANA time zone "
                "(e.g. Asia/Seoul, UTC): set it to the web app's Django TIME_ZONE"
            ) from None
        if self.lock_url is None and not self.broker_url.startswith(("redis://", "rediss://")):
            raise UnsafeSettingsError(
                "the per-trip locks need Redis: set AFTERTRIP_LOCK_URL (the broker is not Redis)"
            )
        if self.environment == "production":
            self._refuse_development_defaults()
        return self

    def _refuse_development_defaults(self) -> None:
        problems = []
        if self.database_url.startswith("sqlite"):
            problems.append(
                "AFTERTRIP_DATABASE_URL is SQLite: point it at the web app's PostgreSQL or MySQL"
            )
        if not self.s3_bucket:
            problems.append("AFTERTRIP_S3_BUCKET is not set")
        if self.flower_basic_auth is not None and self.flower_basic_auth.get_secret_value():
            problems.extend(flower_auth_problems(self.flower_basic_auth, min_password=12))
        for path, sha256, name in (
            (self.embedder_path, self.embedder_sha256, "EMBEDDER"),
            (self.scrfd_path, self.scrfd_sha256, "SCRFD"),
        ):
            if path and not sha256:
                problems.append(
                    f"AFTERTRIP_{name}_PATH is given without AFTERTRIP_{name}_SHA256: set it to "
                    f"the file's sha256 (`sha256sum {path}`), so that no other file is loaded"
                )
        if problems:
            raise UnsafeSettingsError(
                "refusing to run with AFTERTRIP_ENVIRONMENT=production: " + "; ".join(problems)
            )

    def database_engine(self, **kwargs: Any) -> Engine:
        """An engine on the web app's database that writes datetimes by its time rule
        (AFTERTRIP_WEBAPP_TIME_ZONE): every engine of the service is made here. `kwargs` go
        to `sqlalchemy.create_engine` (e.g. `poolclass`)."""
        from db.session import make_engine

        return make_engine(
            self.database_url,
            time_zone=self.webapp_time_zone,
            connect_timeout=self.database_connect_timeout,
            statement_timeout=self.database_statement_timeout or None,
            **kwargs,
        )

    @property
    def effective_lock_url(self) -> str:
        """The Redis URL of the per-trip locks."""
        return self.lock_url or self.broker_url

    @property
    def visibility_timeout(self) -> int:
        """Seconds before Redis redelivers an unacknowledged job: longer than any job runs.

        With acks_late a running job's message stays unacknowledged; redelivering it while it
        still runs would start it twice, so this must exceed the hard time limit.
        """
        return self.task_time_limit + 600

    @property
    def lock_ttl(self) -> float:
        """Seconds a trip lock lives after its holder's last heartbeat (renewed each beat)."""
        return self.heartbeat_seconds * 6

    @property
    def stall_seconds(self) -> float:
        """A `running` job row without a heartbeat for this long has lost its worker."""
        return self.heartbeat_seconds * 12

    @property
    def delivery_count_ttl(self) -> int:
        """Seconds the per-task delivery counter is kept (longer than a job with its retries)."""
        return self.task_time_limit + self.task_retry_budget + 3600


def flower_auth_problems(auth: SecretStr, *, min_password: int = 1) -> list[str]:
    """What is wrong with AFTERTRIP_FLOWER_BASIC_AUTH (user:password[,user:password]), if
    anything: an empty user or password is refused everywhere, short ones in production."""
    problems = []
    for pair in auth.get_secret_value().split(","):
        user, sep, password = pair.partition(":")
        if not sep or not user.strip() or not password:
            problems.append(
                "AFTERTRIP_FLOWER_BASIC_AUTH has an entry without a user or a password "
                "(expected user:password[,user2:password2])"
            )
        elif len(password) < min_password:
            problems.append(
                f"AFTERTRIP_FLOWER_BASIC_AUTH has a password under {min_password} characters"
            )
    return list(dict.fromkeys(problems))  # each kind of problem once


class SettingsError(AfterTripError):
    """The AFTERTRIP_* environment does not make valid service settings."""


@functools.cache
def get_settings() -> ServiceSettings:
    """The process's one settings object, read from the environment on first use."""
    try:
        return ServiceSettings()
    except ValidationError as exc:
        problems = "; ".join(
            f"AFTERTRIP_{'_'.join(str(p) for p in err['loc']).upper() or 'SETTINGS'}: {err['msg']}"
            if err["loc"]
            else err["msg"]
            for err in exc.errors()
        )
        raise SettingsError(f"invalid settings: {problems}") from exc
