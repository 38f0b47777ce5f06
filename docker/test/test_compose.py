"""docker/compose.yaml brought up with podman-compose, one trip grouped through it, then down.

The stack's third-party images cannot be pulled here: docker/test/compose.standins.yaml puts
stand-ins built from Debian packages and PyPI in their place (docker/test/standins/) and
publishes no host ports; the project's own services run as compose.yaml has them.

podman 4.3 (Debian bookworm) cannot wait for a container to be healthy, so podman-compose
(which needs podman 4.6 for that) ignores `condition: service_healthy`: the test brings the
stack up in compose.yaml's dependency order itself, running each health check as it goes.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from imagetest import (
    JOB_TIMEOUT,
    ROOT,
    assert_demo_folders,
    assert_stops,
    import_demo_album,
    imported_trip,
    log,
    podman,
    wait_healthy,
)

COMPOSE = shlex.split(os.environ.get("AFTERTRIP_PODMAN_COMPOSE", "podman-compose"))
FILES = ("docker/compose.yaml", "docker/test/compose.standins.yaml")

pytestmark = pytest.mark.timeout(1800)

# Run in the worker image inside the stack: the web app's client queues the trip and waits,
# then the trip's folders are read from the web app's tables (photo file name -> folder ids).
GROUP_AND_READ = """
import json, os, sys
from sqlalchemy import select
from aftertrip_client import enqueue_trip
from db.session import make_engine
from db.webapp import Photo, PhotoTagFace
trip = int(sys.argv[1])
result = enqueue_trip(trip).get(timeout=int(sys.argv[2]))
engine = make_engine(os.environ["AFTERTRIP_DATABASE_URL"])
with engine.connect() as conn:
    rows = conn.execute(
        select(Photo.file_name, PhotoTagFace.tagface_id)
        .join(PhotoTagFace, PhotoTagFace.photo_id == Photo.id, isouter=True)
        .where(Photo.trip_id == trip)
    ).all()
folders = {}
for name, folder in rows:
    folders.setdefault(name, [])
    if folder is not None:
        folders[name].append(folder)
print(json.dumps({"result": result, "folders": folders}))
"""


@dataclass
class Compose:
    project: str
    env_file: Path
    env: dict[str, str]
    flower_auth: str

    def __call__(self, *args: str, timeout: float = 900) -> str:
        """`podman-compose -p PROJECT --env-file … -f compose.yaml -f standins ARGS`."""
        files = [arg for name in FILES for arg in ("-f", name)]
        argv = [*COMPOSE, "-p", self.project, "--env-file", str(self.env_file), *files, *args]
        done = subprocess.run(
            argv, cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=timeout
        )
        if done.returncode != 0:
            output = done.stdout[-4000:] + done.stderr[-4000:]
            raise AssertionError(f"{shlex.join(argv)}: rc {done.returncode}\n{output}")
        return done.stdout

    def container(self, service: str) -> str:
        """The name of `service`'s container."""
        names = podman(
            "ps", "--all", "--format", "{{.Names}}",
            f"--filter=label=com.docker.compose.project={self.project}",
            f"--filter=label=com.docker.compose.service={service}",
        ).split()  # fmt: skip
        assert len(names) == 1, (service, names)
        return names[0]

    def python(self, script: str, *args: str) -> object:
        """Run `script` in a worker container on the stack's network; its last line, as JSON."""
        out = self("run", "--rm", "--no-deps", "worker-cpu", "python", "-c", script, *args)
        return json.loads(out.strip().splitlines()[-1])

    def up(self, *services: str) -> None:
        """Start `services` only (their dependencies are the test's business)."""
        self("up", "--detach", "--no-deps", *services)


@pytest.fixture(scope="module")
def compose(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Compose]:
    standins = [f"localhost/aftertrip-standin-{name}:test" for name in ("redis", "postgres", "s3")]
    for image in ("aftertrip-faces:cpu", *standins):
        if subprocess.run(["podman", "image", "exists", image], check=False).returncode:
            pytest.fail(f"{image} is not built: run `make image-test`")
    # docker/.env.example's variables, with passwords made for this run.
    flower_auth = f"ops:{secrets.token_hex(8)}"
    env_file = tmp_path_factory.mktemp("compose") / ".env"
    env_file.write_text(
        f"POSTGRES_PASSWORD={secrets.token_hex(12)}\n"
        f"MINIO_ROOT_PASSWORD={secrets.token_hex(12)}\n"
        f"AFTERTRIP_FLOWER_BASIC_AUTH={flower_auth}\n"
    )
    stack = Compose(
        f"aftertrip-image-test-{uuid.uuid4().hex[:6]}", env_file, dict(os.environ), flower_auth
    )
    try:
        yield stack
    finally:
        stack("down", "--volumes", "--timeout", "30")
        left = podman(
            "ps",
            "--all",
            "--format",
            "{{.Names}}",
            f"--filter=label=com.docker.compose.project={stack.project}",
        )
        assert left.strip() == "", f"containers left after down: {left}"


# Flower's API from inside the stack, as the web app's admins would reach it.
FLOWER_WORKERS = """
import base64, json, sys, urllib.request
auth = base64.b64encode(sys.argv[1].encode()).decode()
request = urllib.request.Request(
    "http://flower:5555/api/workers?refresh=1", headers={"Authorization": "Basic " + auth}
)
print(json.dumps(sorted(json.load(urllib.request.urlopen(request, timeout=30)))))
"""


def test_compose_stack_groups_a_trip(compose: Compose) -> None:
    started = time.monotonic()
    compose.up("redis", "postgres", "minio")
    for service in ("redis", "postgres", "minio"):
        wait_healthy(compose.container(service), service, 120)
    log.info("redis, postgres, s3 healthy after %.0f s", time.monotonic() - started)

    # The one-shot services: the bucket, then the worker's migrations (+ the web app's tables).
    compose.up("bucket", "migrate")
    for service in ("bucket", "migrate"):
        name = compose.container(service)
        code = podman("wait", name, timeout=300).strip()
        assert code == "0", f"{service} exited {code}:\n{podman('logs', name)[-3000:]}"
    log.info("bucket and migrate done after %.0f s", time.monotonic() - started)

    compose.up("flower", "worker-cpu")
    worker = compose.container("worker-cpu")
    wait_healthy(worker, "worker-cpu (celery inspect ping)", 240)
    workers = compose.python(FLOWER_WORKERS, compose.flower_auth)
    log.info("Flower's API lists the workers %s", workers)
    assert workers, "Flower lists no worker"
    log.info("worker-cpu healthy, Flower answering after %.0f s", time.monotonic() - started)

    out = compose("run", "--rm", "--no-deps", "worker-cpu", *import_demo_album())
    trip_id = imported_trip(out)
    queued = time.monotonic()
    answer = compose.python(GROUP_AND_READ, str(trip_id), str(JOB_TIMEOUT))
    assert isinstance(answer, dict), answer
    log.info(
        "job through the stack (%.1f s with the client's container): %s",
        time.monotonic() - queued,
        answer["result"],
    )
    assert answer["result"]["photos"] == 4 and answer["result"]["errors"] == 0, answer
    assert_demo_folders({name: set(ids) for name, ids in answer["folders"].items()})
    # compose.yaml stops workers with SIGQUIT: Celery's cold shutdown, where a running job gets
    # AFTERTRIP_WORKER_SOFT_SHUTDOWN_TIMEOUT to finish before it goes back on the queue.
    assert_stops(worker, "Cold shutdown")
    log.info("stack up, trip grouped, worker stopped in %.0f s", time.monotonic() - started)
