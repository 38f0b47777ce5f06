"""The test suite's plugins: their fixtures reach every test module by name, unimported.

Helpers (paths, the service harness, trip scenarios) are plain modules in `tests/support/`;
a test module imports those, never another test module (`tests/test_suite_layout.py`).
Under pytest-xdist (`make test`), the hooks below order and group the tests so that the
long waits overlap (`tests/support/schedule.py`).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Several test processes (and their workers, which inherit this) share two cores: OpenMP
    # threads that spin while they wait for a descheduled peer (torch's, for MTCNN) made an
    # MTCNN test 3x slower beside four busy processes (12.6 s passive, 37 s by default).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

pytest_plugins = [
    "tests.plugins.data",
    "tests.plugins.databases",
    "tests.plugins.s3",
]


PLAN_VARIABLE = "AFTERTRIP_TEST_XDIST_PLAN"
"""Where the xdist workers write the schedule for the controller (set by the controller)."""


def pytest_configure(config: pytest.Config) -> None:
    if getattr(config, "workerinput", None) is None and config.getoption("numprocesses", None):
        # the controller of an xdist run: its workers (started after this) inherit the path
        handle, name = tempfile.mkstemp(prefix="aftertrip-xdist-plan-", suffix=".json")
        os.close(handle)
        os.environ[PLAN_VARIABLE] = name


def pytest_unconfigure(config: pytest.Config) -> None:
    if getattr(config, "workerinput", None) is None and PLAN_VARIABLE in os.environ:
        Path(os.environ.pop(PLAN_VARIABLE)).unlink(missing_ok=True)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object | None:
    if config.getvalue("dist") not in ("loadscope", "loadgroup") or PLAN_VARIABLE not in os.environ:
        return None  # pytest-xdist's own
    from tests.support.schedule import plan_scheduler

    return plan_scheduler(config, log, Path(os.environ[PLAN_VARIABLE]))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    workerinput = getattr(config, "workerinput", None)
    if workerinput is None or PLAN_VARIABLE not in os.environ:
        return  # not an xdist worker: the collection order, unchanged
    from tests.support.schedule import schedule, write_plan

    planned = schedule(items, int(workerinput["workercount"]))
    write_plan(Path(os.environ[PLAN_VARIABLE]), planned)
    items[:] = [item for unit in planned for item in unit.items]
