"""What the image tests share: podman, waiting, the demo album's expected folders."""

from __future__ import annotations

import logging
import os
import re
import shlex
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from db.webapp import NO_FACE_TAG_ID, OTHERS_TAG_ID

ROOT = Path(__file__).resolve().parents[2]
IMAGE = os.environ.get("AFTERTRIP_IMAGE", "aftertrip-faces:cpu")
GPU_IMAGE = os.environ.get("AFTERTRIP_GPU_IMAGE", "aftertrip-faces:gpu")
PODMAN = shlex.split(os.environ.get("AFTERTRIP_PODMAN", "podman"))
JOB_TIMEOUT = 600
# One-off commands: removed when done, no healthcheck timer (podman would ask systemd for one).
ONE_OFF = ("--rm", "--no-healthcheck")

# The figures are the run's report: `make image-test` shows INFO lines (log_cli).
log = logging.getLogger("image-test")


def podman(*args: str, timeout: float = 600, check: bool = True) -> str:
    """`podman ARGS`; its stdout (with stderr in the error when it fails)."""
    done = subprocess.run(
        [*PODMAN, *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and done.returncode != 0:
        output = done.stdout[-3000:] + done.stderr[-3000:]
        raise AssertionError(f"podman {' '.join(args)}: rc {done.returncode}\n{output}")
    return done.stdout


def free_port() -> int:
    """A TCP port free on the host's loopback now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(condition: Callable[[], bool], what: str, timeout: float) -> None:
    """Poll `condition` every second until it holds; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def healthy(container: str) -> bool:
    """The container's HEALTHCHECK passes now (`podman healthcheck run`: no systemd timers
    run health checks on these machines, so the tests run them)."""
    check = [*PODMAN, "healthcheck", "run", container]
    return subprocess.run(check, capture_output=True, check=False).returncode == 0


def wait_healthy(container: str, what: str, timeout: float) -> None:
    """Run the container's health check every second until it passes."""
    try:
        wait_for(lambda: healthy(container), f"{what} healthy", timeout)
    except AssertionError as error:
        logs = subprocess.run([*PODMAN, "logs", "--tail=30", container], capture_output=True)
        raise AssertionError(f"{error}; its log ends:\n{logs.stdout.decode()[-3000:]}") from None


def import_demo_album(*flags: str) -> list[str]:
    """The command that makes the demo album inside the image (its shipped photos and the
    generated landscape) and imports it as a trip with `import-trip FLAGS`."""
    make = (
        "from pathlib import Path; from worker.demo import build_demo_album; "
        'build_demo_album(Path("/tmp/album"))'
    )
    imp = shlex.join(["aftertrip-faces", "import-trip", *flags, "--place", "Demo", "/tmp/album"])
    return ["sh", "-c", f"python -c {shlex.quote(make)} && {imp}"]


def imported_trip(output: str) -> int:
    """The trip id `import-trip` printed for the 4-photo demo album."""
    found = re.search(r"trip (\d+): 4 photos", output)
    assert found, output
    return int(found.group(1))


def assert_demo_folders(folders: dict[str, set[int]]) -> None:
    """The demo album grouped: Yao Ming's two photos share one person folder, the landscape
    is in "no faces" only. `folders`: photo file name -> folder ids."""
    log.info("folders per photo: %s", {name: sorted(ids) for name, ids in folders.items()})
    assert set(folders) == {"players.jpg", "yaoming.jpg", "gdp.jpg", "lake.jpg"}, folders
    yao = (folders["players.jpg"] & folders["yaoming.jpg"]) - {NO_FACE_TAG_ID, OTHERS_TAG_ID}
    assert len(yao) == 1, f"Yao Ming's two photos share one folder: {folders}"
    assert folders["lake.jpg"] == {NO_FACE_TAG_ID}, folders


def assert_stops(container: str, shutdown: str = "Warm shutdown", stop_timeout: int = 90) -> None:
    """`podman stop` reaches Celery (PID 1) with the container's stop signal; Celery logs
    `shutdown` ("Warm shutdown" for the image's SIGTERM, "Cold shutdown" for compose.yaml's
    SIGQUIT) and exits 0 within the timeout, before any SIGKILL."""
    started = time.monotonic()
    podman("stop", f"--time={stop_timeout}", container, timeout=stop_timeout + 60)
    took = time.monotonic() - started
    signal = podman("inspect", "--format", "{{.Config.StopSignal}}", container).strip()
    code = podman("inspect", "--format", "{{.State.ExitCode}}", container).strip()
    logs = subprocess.run([*PODMAN, "logs", container], capture_output=True, text=True)
    text = logs.stdout + logs.stderr
    assert shutdown in text, text[-3000:]
    assert code == "0", f"exit code {code}\n{text[-3000:]}"
    log.info("podman stop (signal %s): %s in %.1f s, exit 0", signal, shutdown.lower(), took)
