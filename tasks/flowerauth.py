"""Flower never serves without a login, however it is started.

`aftertrip-faces flower` checks AFTERTRIP_FLOWER_BASIC_AUTH itself. `celery -A tasks flower`
(or `-A tasks.app`, `-A tasks.trip`) is Flower's own command: it would serve the dashboard and
its task API to anyone. Every one of those loads `tasks.app`, which calls
`guard_flower_command()`; when the process is Flower it

- passes the AfterTrip settings to Flower by the rule both commands share,
  `flower_environment`: AFTERTRIP_FLOWER_BASIC_AUTH / _ADDRESS / _PORT when set, else Flower's
  own FLOWER_BASIC_AUTH / FLOWER_ADDRESS / FLOWER_PORT, else loopback and 5555; and
  FLOWER_UNAUTHENTICATED_API, which would open the task API without a login, never passes;
- once Flower has read its command line, environment and config file, exits with an error that
  says what to set unless basic auth (every entry user:password) or OAuth (`--auth`) is on.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping, MutableMapping, Sequence
from pathlib import Path

from pydantic import SecretStr

logger = logging.getLogger(__name__)

REFUSAL = (
    "Flower can run tasks from its web API, so it never starts without a login: set "
    "AFTERTRIP_FLOWER_BASIC_AUTH=user:password (or Flower's own FLOWER_BASIC_AUTH, "
    "--basic-auth or --auth)"
)


def is_flower_command(argv: Sequence[str]) -> bool:
    """Whether this process is `celery … flower` (the `celery` script or `python -m celery`)."""
    if not argv:
        return False
    program = Path(argv[0])
    is_celery = program.name == "celery" or (
        program.name == "__main__.py" and program.parent.name == "celery"
    )
    return is_celery and "flower" in argv[1:]


def guard_flower_command(
    argv: Sequence[str] | None = None, environ: MutableMapping[str, str] | None = None
) -> bool:
    """In a Flower process, pass the AfterTrip settings to Flower and refuse to serve without
    a login (see the module's docstring). Elsewhere, do nothing. Returns whether it is Flower."""
    argv = sys.argv if argv is None else argv
    environ = os.environ if environ is None else environ
    if not is_flower_command(argv):
        return False
    flower = flower_environment(
        environ,
        basic_auth=environ.get("AFTERTRIP_FLOWER_BASIC_AUTH"),
        address=environ.get("AFTERTRIP_FLOWER_ADDRESS"),
        port=environ.get("AFTERTRIP_FLOWER_PORT"),
    )
    for key in set(environ) - set(flower):
        del environ[key]
    environ.update(flower)
    _check_once_parsed()
    return True


UNAUTHENTICATED_API = "FLOWER_UNAUTHENTICATED_API"


def flower_environment(
    environ: Mapping[str, str],
    *,
    basic_auth: str | None,
    address: str | None,
    port: str | int | None,
) -> dict[str, str]:
    """The environment Flower runs with, by one rule for `aftertrip-faces flower` and
    `celery -A tasks flower`: each AfterTrip setting that is given (`basic_auth`, `address`,
    `port`: AFTERTRIP_FLOWER_BASIC_AUTH, _ADDRESS, _PORT) wins over Flower's own variable
    (FLOWER_BASIC_AUTH, FLOWER_ADDRESS, FLOWER_PORT), which wins over loopback and 5555;
    FLOWER_UNAUTHENTICATED_API is dropped. Whether the login is good enough is checked apart."""
    env = {key: value for key, value in environ.items() if key != UNAUTHENTICATED_API}
    if UNAUTHENTICATED_API in environ:
        logger.warning("%s ignored: Flower's API needs the login too", UNAUTHENTICATED_API)
    if basic_auth:
        if env.get("FLOWER_BASIC_AUTH", basic_auth) != basic_auth:
            logger.warning("FLOWER_BASIC_AUTH ignored: AFTERTRIP_FLOWER_BASIC_AUTH is set")
        env["FLOWER_BASIC_AUTH"] = basic_auth
    for name, ours, default in (("ADDRESS", address, "127.0.0.1"), ("PORT", port, "5555")):
        if ours not in (None, ""):
            env[f"FLOWER_{name}"] = str(ours)
        elif not env.get(f"FLOWER_{name}"):
            env[f"FLOWER_{name}"] = default
    return env


def login_problems(basic_auth: Sequence[str] | None, oauth: str | None) -> list[str]:
    """Why Flower's final options give no login (empty when they do)."""
    from tasks.settings import flower_auth_problems

    if oauth:
        return []
    entries = [entry for value in basic_auth or [] for entry in value.split(",")]
    if not entries:
        return [REFUSAL]
    return [
        problem.replace("AFTERTRIP_FLOWER_BASIC_AUTH", "Flower's basic auth")
        for problem in flower_auth_problems(SecretStr(",".join(entries)))
    ]


def _check_once_parsed() -> None:
    """Check Flower's options after it has parsed them all.

    Flower (2.x, `flower.command.apply_options`) parses its command line, then its config file
    (`--conf`, default flowerconfig.py) if there is one, then its command line again; tornado
    runs parse callbacks after each command-line parse. With a config file the first callback
    comes before the file is read, so the check waits for the second."""
    import flower.options  # noqa: F401  (defines the options this reads)
    from tornado.options import options

    calls = 0

    def check() -> None:
        nonlocal calls
        calls += 1
        config = Path(os.path.abspath(options.conf)) if "conf" in options else None
        if calls == 1 and config is not None and config.is_file():
            return
        problems = login_problems(options.basic_auth, options.auth)
        if problems:
            sys.exit("error: " + "; ".join(problems))

    options.add_parse_callback(check)
