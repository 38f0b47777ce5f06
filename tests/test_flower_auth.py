"""Flower needs a login however it is started (`celery -A tasks flower`, `-A tasks.app`, or
`aftertrip-faces flower`): the real `celery` command, a real Flower, answered over HTTP."""

from __future__ import annotations

import base64
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tasks.flowerauth import REFUSAL, is_flower_command, login_problems
from tests.support.services import REDIS_URL

ROOT = Path(__file__).resolve().parents[1]
CELERY = str(Path(sys.executable).parent / "celery")
BROKER = REDIS_URL  # Flower answers HTTP before (and without) its broker


def _env(**extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("AFTERTRIP_", "FLOWER_"))}
    return {
        **base,
        "PYTHONPATH": str(ROOT),
        "AFTERTRIP_BROKER_URL": BROKER,
        "AFTERTRIP_RESULT_BACKEND": BROKER,
        **extra,
    }


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _get(port: int, auth: str | None) -> int:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/tasks")
    if auth is not None:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def _serve(argv: list[str], env: dict[str, str], cwd: Path, port: int) -> subprocess.Popen[str]:
    """Start Flower and wait until it answers on `port` (fails if it exits first)."""
    flower = subprocess.Popen(
        argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline = time.monotonic() + 90
    while True:
        if flower.poll() is not None:
            pytest.fail(f"flower exited {flower.returncode}:\n{flower.stdout.read()}")  # type: ignore[union-attr]
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return flower
        except OSError:
            assert time.monotonic() < deadline, "flower did not start listening"
            time.sleep(0.3)


def _stop(flower: subprocess.Popen[str]) -> None:
    flower.terminate()
    try:
        flower.wait(timeout=30)
    except subprocess.TimeoutExpired:
        flower.kill()
        flower.wait()


def test_the_flower_command_is_told_from_others() -> None:
    assert is_flower_command(["/venv/bin/celery", "-A", "tasks", "flower", "--port=1"])
    assert is_flower_command(["/usr/lib/python3/celery/__main__.py", "-A", "tasks", "flower"])
    assert not is_flower_command(["/venv/bin/celery", "-A", "tasks", "worker", "-Q", "faces"])
    assert not is_flower_command(["/venv/bin/aftertrip-faces", "flower"])  # checks on its own
    assert not is_flower_command(["pytest", "tests/test_flower_auth.py"])


def test_login_problems() -> None:
    assert login_problems(None, "") == [REFUSAL]
    assert login_problems([], None) == [REFUSAL]
    assert login_problems(["ops:secret"], "") == []
    assert login_problems(["ops:secret", "dev:"], "") == [
        "Flower's basic auth has an entry without a user or a password "
        "(expected user:password[,user2:password2])"
    ]
    assert login_problems(None, ".*@example.com") == []  # OAuth is a login too


@pytest.mark.services
@pytest.mark.parametrize("app", ["tasks", "tasks.app"])
def test_celery_flower_without_a_login_refuses_to_start(app: str, tmp_path: Path) -> None:
    port = _free_port()
    run = subprocess.run(
        [CELERY, "-A", app, "flower", "--address=127.0.0.1", f"--port={port}"],
        cwd=tmp_path,
        env=_env(FLOWER_UNAUTHENTICATED_API="true"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode != 0
    assert "AFTERTRIP_FLOWER_BASIC_AUTH=user:password" in run.stderr, run.stdout + run.stderr
    assert "Traceback" not in run.stderr
    with pytest.raises(OSError):  # it never listened
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


@pytest.mark.services
def test_celery_flower_refuses_an_entry_without_a_password(tmp_path: Path) -> None:
    run = subprocess.run(
        [CELERY, "-A", "tasks", "flower", f"--port={_free_port()}", "--basic-auth=ops:"],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode != 0
    assert "without a user or a password" in run.stderr, run.stdout + run.stderr


@pytest.mark.services
def test_celery_flower_takes_the_aftertrip_login_and_address(tmp_path: Path) -> None:
    """Only AFTERTRIP_FLOWER_* set, as for `aftertrip-faces flower`: the same login, the same
    loopback address, and the dashboard refuses anyone without it."""
    port = _free_port()
    env = _env(AFTERTRIP_FLOWER_BASIC_AUTH="ops:flower-test-password")
    env["AFTERTRIP_FLOWER_PORT"] = str(port)
    flower = _serve([CELERY, "-A", "tasks", "flower"], env, tmp_path, port)
    try:
        assert _get(port, None) == 401
        assert _get(port, "ops:wrong") == 401
        assert _get(port, "ops:flower-test-password") == 200
    finally:
        _stop(flower)


@pytest.mark.services
def test_celery_flower_reads_the_login_from_its_config_file(tmp_path: Path) -> None:
    port = _free_port()
    (tmp_path / "flowerconfig.py").write_text('basic_auth = ["ops:from-the-config-file"]\n')
    argv = [CELERY, "-A", "tasks", "flower", "--address=127.0.0.1", f"--port={port}"]
    flower = _serve(argv, _env(), tmp_path, port)
    try:
        assert _get(port, None) == 401
        assert _get(port, "ops:from-the-config-file") == 200
    finally:
        _stop(flower)


@pytest.mark.parametrize(
    "given",
    [
        {"AFTERTRIP_FLOWER_BASIC_AUTH": "ops:aftertrip-password"},
        {
            "AFTERTRIP_FLOWER_BASIC_AUTH": "ops:aftertrip-password",
            "FLOWER_BASIC_AUTH": "flower:flowers-own-password",
            "FLOWER_UNAUTHENTICATED_API": "true",
            "FLOWER_ADDRESS": "0.0.0.0",
            "FLOWER_PORT": "5600",
        },
        {
            "AFTERTRIP_FLOWER_BASIC_AUTH": "ops:aftertrip-password",
            "AFTERTRIP_FLOWER_ADDRESS": "127.0.0.2",
            "AFTERTRIP_FLOWER_PORT": "5700",
            "FLOWER_ADDRESS": "0.0.0.0",
            "FLOWER_PORT": "5600",
        },
    ],
)
def test_both_commands_give_flower_the_same_environment(
    given: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`aftertrip-faces flower` and `celery -A tasks flower` follow one rule
    (`flower_environment`): an AfterTrip setting that is set wins over Flower's own variable,
    which wins over loopback:5555; FLOWER_UNAUTHENTICATED_API never reaches Flower."""
    import tasks.flowerauth
    from tasks.admin import flower_command
    from tasks.flowerauth import guard_flower_command
    from tasks.settings import ServiceSettings

    for key in list(os.environ):
        if key.startswith(("AFTERTRIP_FLOWER_", "FLOWER_")):
            monkeypatch.delenv(key)
    for key, value in given.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(tasks.flowerauth, "_check_once_parsed", lambda: None)
    celerys = dict(given)
    assert guard_flower_command(["celery", "-A", "tasks", "flower"], celerys)
    command = flower_command(ServiceSettings())
    assert command is not None
    argv, ours = command
    names = ("FLOWER_BASIC_AUTH", "FLOWER_ADDRESS", "FLOWER_PORT", "FLOWER_UNAUTHENTICATED_API")
    assert {k: celerys.get(k) for k in names} == {k: ours.get(k) for k in names}
    assert ours["FLOWER_BASIC_AUTH"] == "ops:aftertrip-password"
    assert "FLOWER_UNAUTHENTICATED_API" not in ours
    expected_address = given.get("AFTERTRIP_FLOWER_ADDRESS", given.get("FLOWER_ADDRESS"))
    assert ours["FLOWER_ADDRESS"] == (expected_address or "127.0.0.1")
    assert f"--address={ours['FLOWER_ADDRESS']}" in argv
    assert f"--port={ours['FLOWER_PORT']}" in argv
