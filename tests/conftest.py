"""The test suite's plugins: their fixtures reach every test module by name, unimported.

Helpers (paths, the service harness, trip scenarios) are plain modules in `tests/support/`;
a test module imports those, never another test module (`tests/test_suite_layout.py`).
Under pytest-xdist (`make test`), the hook below orders and groups the tests so that the
long waits overlap (`tests/support/schedule.py`).
"""

from __future__ import annotations

import os

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


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups off the items
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    workerinput = getattr(config, "workerinput", None)
    if workerinput is None:
        return  # not an xdist worker: the collection order, unchanged
    from tests.support.schedule import schedule

    ordered = []
    for unit in schedule(items, int(workerinput["workercount"])):
        for item in unit.items:
            item.add_marker(pytest.mark.xdist_group(unit.group))
            ordered.append(item)
    items[:] = ordered
