"""Flower never serves without a login, however it is started.

`aftertrip-faces flower` checks AFTERTRIP_FLOWER_BASIC_AUTH itself. `celery -A tasks flower`
(or `-A tasks.app`, `-A tasks.trip`) is Flower's own command: it would serve the dashboard and
its task API to anyone. Every one of those loads `tasks.app`, which calls
`guard_flower_command()`; when the process is Flower it

- passes AFTERTRIP_FLOWER_BASIC_AUTH to Flower (as FLOWER_BASIC_AUTH, unless that is set) and
  AFTERTRIP_FLOWER_ADDRESS / _PORT as Flower's defaults (loopback, 5555), so one set of
  settings serves both commands;
- drops FLOWER_UNAUTHENTICATED_API, which would open the task API without a login;
- once Flower has read its command line, environment and config file, exits with an error that
  says what to set unless basic auth (every entry user:password) or OAuth (`--auth`) is on.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import MutableMapping, Sequence
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
    ours = environ.get("AFTERTRIP_FLOWER_BASIC_AUTH", "")
    if ours and not environ.get("FLOWER_BASIC_AUTH"):
        environ["FLOWER_BASIC_AUTH"] = ours
    environ.setdefault("FLOWER_ADDRESS", environ.get("AFTERTRIP_FLOWER_ADDRESS", "127.0.0.1"))
    environ.setdefault("FLOWER_PORT", environ.get("AFTERTRIP_FLOWER_PORT", "5555"))
    if environ.pop("FLOWER_UNAUTHENTICATED_API", None) is not None:
        logger.warning("FLOWER_UNAUTHENTICATED_API ignored: Flower's API needs the login too")
    _check_once_parsed()
    return True


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
