"""How `make test` spreads the suite over pytest-xdist workers (`-n N --dist loadscope`).

Most of the suite's wall time is waiting, not computing: the `soak` tests hold a job through
an outage of a minute or more (whole minutes of sleep on a private stack), and on these
2-core machines the rest is CPU-bound. So the run is shaped as

    wall time ~ max(the longest soak test, everything else / the workers left for it)

by three rules (`schedule`), which each xdist worker applies to its items in
`tests/conftest.py` (they all compute the same order, as pytest-xdist requires):

1. A module's tests stay together on one worker, in their own order (as `--dist loadscope`
   does): module-scoped stacks (a real `celery worker`, a loaded model, the backend's
   virtualenv under .cache/) are built once, and no test meets a neighbour of its module
   running beside it in another process.
2. Each `soak` or `faults` test is a unit of its own instead, and the `soak` ones are handed
   out first, so that each starts at once on a worker of its own and they overlap; `faults`
   tests come next. With more `soak` tests than workers, the rest wait their turn (still
   correct, only slower).
3. pytest-xdist gives every worker a second unit at the start (a worker needs to know its
   next test before it runs one). The second units of the workers holding a `soak` test
   wait behind it for minutes, so they are the smallest modules that need no service
   (no `services`, `shared`, `faults` or `soak` test). After that, units go in order to
   whichever worker is free: the biggest modules (by test count) first, then the rest.

The units reach the controller's scheduler (`plan_scheduler`, made by the conftest's
`pytest_xdist_make_scheduler`) through a plan file that the workers write: `--dist loadgroup`
would carry them in `xdist_group` marks, but pytest 9.2's node ids no longer take the group
suffix that pytest-xdist 3.8 adds, so those marks group nothing (pytest-xdist issue 1386).
A node id missing from the plan falls back to its module. Outside xdist (`-p no:xdist`,
`-n0`) nothing is reordered.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

ALONE = ("soak", "faults")
"""Markers whose tests are scheduled as units of their own, first (`soak` before `faults`)."""

NEEDS_SERVICES = ("services", "shared", "faults", "soak")
"""Markers of tests that start servers, load data or wait: never queued behind a soak test."""


class Item(Protocol):
    """What the scheduling needs of a pytest item."""

    nodeid: str

    def get_closest_marker(self, name: str) -> object | None: ...


@dataclass
class Unit:
    """Tests that one worker runs together, in this order (an xdist group)."""

    group: str
    items: list[Item] = field(default_factory=list)

    def marked(self, *names: str) -> bool:
        return any(item.get_closest_marker(name) for item in self.items for name in names)


def _group_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text)


def units(items: Sequence[Item]) -> list[Unit]:
    """The suite as xdist units: one per `soak`/`faults` test, one per module for the rest
    (in the order of first appearance)."""
    found: dict[str, Unit] = {}
    for item in items:
        path = item.nodeid.split("::", 1)[0]
        if any(item.get_closest_marker(name) for name in ALONE):
            group = "alone-" + _group_name(item.nodeid)
        else:
            group = "module-" + _group_name(path)
        found.setdefault(group, Unit(group)).items.append(item)
    return list(found.values())


def schedule(items: Sequence[Item], workers: int) -> list[Unit]:
    """The units in the order the workers should get them (see the module's docstring)."""
    all_units = units(items)
    soak = [u for u in all_units if u.marked("soak")]
    faults = [u for u in all_units if u.marked("faults") and not u.marked("soak")]
    rest = [u for u in all_units if not u.marked(*ALONE)]
    # the biggest modules first, so that none starts last and runs alone (stable: ties keep
    # the collection order)
    rest.sort(key=lambda u: -len(u.items))
    ordered = soak + faults + rest
    if workers <= len(soak):
        return ordered  # soak tests queue behind each other anyway
    # the second unit of each worker that starts a soak test: the smallest plain modules
    quick = sorted((u for u in rest if not u.marked(*NEEDS_SERVICES)), key=lambda u: len(u.items))[
        : len(soak)
    ]
    ordered = [u for u in ordered if u not in quick]
    # xdist hands the second units out in the order of the workers' first ones, so the
    # workers holding the soak tests (the first units) take the quick ones
    return ordered[:workers] + quick + ordered[workers:]


def write_plan(path: Path, planned: Sequence[Unit]) -> None:
    """Write node id -> unit for the controller (whole or not at all: every worker writes
    the same plan, each through a file of its own)."""
    plan = {item.nodeid: unit.group for unit in planned for item in unit.items}
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    partial.write_text(json.dumps(plan))
    partial.replace(path)


def read_plan(path: Path) -> dict[str, str]:
    """The plan the workers wrote (empty if none did)."""
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return {}


def plan_scheduler(config: object, log: object, path: Path) -> object:
    """pytest-xdist's `loadscope` scheduler with the units of the plan at `path` as scopes,
    in the order the workers collected them (never re-sorted by size)."""
    from xdist.scheduler import LoadScopeScheduling

    class PlanScheduling(LoadScopeScheduling):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__(config, log)
            self.config.option.loadscopereorder = False  # the plan's order is the order
            self._plan: dict[str, str] | None = None

        def _split_scope(self, nodeid: str) -> str:
            if self._plan is None:  # first asked once every worker has collected
                self._plan = read_plan(path)
            return self._plan.get(nodeid) or nodeid.split("::", 1)[0]

    return PlanScheduling()
