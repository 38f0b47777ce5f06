"""The test suite's own shape: fixtures come from the plugins that tests/conftest.py
registers, helpers from tests/support/, and no module imports a test module."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(TESTS.parent).with_suffix("").parts)


def _imports(tree: ast.Module) -> list[tuple[str, list[str]]]:
    """(module, names) of every import in `tree`, also those inside functions."""
    found: list[tuple[str, list[str]]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [alias.name for alias in node.names]
            found.append((node.module, names))
            # `from tests import test_db` imports a module through its package
            found += [(f"{node.module}.{name}", []) for name in names]
    return found


def _is_test_module(module: str) -> bool:
    last = module.rsplit(".", 1)[-1]
    return module.startswith("tests.") and (last.startswith("test_") or last == "conftest")


def _fixtures(path: Path) -> set[str]:
    """Names of the functions `path` decorates with `pytest.fixture`."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.FunctionDef):
            for deco in node.decorator_list:
                target = deco.func if isinstance(deco, ast.Call) else deco
                if isinstance(target, ast.Attribute) and target.attr == "fixture":
                    names.add(node.name)
    return names


def test_no_module_imports_a_test_module() -> None:
    offenders = [
        f"{path.relative_to(TESTS.parent)} imports {module}"
        for path in sorted(TESTS.rglob("*.py"))
        for module, _ in _imports(ast.parse(path.read_text()))
        if _is_test_module(module) and module != _module_name(path)
    ]
    assert offenders == [], "move what they share into tests/support/: " + "; ".join(offenders)


def test_fixtures_come_from_registered_plugins_not_imports() -> None:
    conftest = ast.parse((TESTS / "conftest.py").read_text())
    registered = next(
        ast.literal_eval(node.value)
        for node in conftest.body
        if isinstance(node, ast.Assign)
        and any(isinstance(t, ast.Name) and t.id == "pytest_plugins" for t in node.targets)
    )
    plugins = {_module_name(p) for p in (TESTS / "plugins").glob("*.py") if p.stem != "__init__"}
    assert set(registered) == plugins
    fixtures = {
        name: _fixtures(TESTS.parent.joinpath(*name.split(".")).with_suffix(".py"))
        for name in plugins
    }
    assert all(fixtures.values()), "a module of tests/plugins/ without a fixture is a helper"
    imported = [
        f"{path.name} imports fixture {name} from {module}"
        for path in sorted(TESTS.rglob("*.py"))
        for module, names in _imports(ast.parse(path.read_text()))
        for name in names
        if name in fixtures.get(module, set())
    ]
    assert imported == [], "ask for a fixture by name instead: " + "; ".join(imported)


class _Item:
    """A stand-in for a pytest item: a node id and marker names."""

    def __init__(self, nodeid: str, *marks: str) -> None:
        self.nodeid = nodeid
        self.marks = set(marks)

    def get_closest_marker(self, name: str) -> object | None:
        return name if name in self.marks else None


def test_xdist_schedule_starts_soak_tests_first_each_followed_by_a_quick_module() -> None:
    from tests.support.schedule import schedule

    items = [
        _Item("tests/test_a.py::test_1", "services"),
        _Item("tests/test_a.py::test_2", "services"),
        _Item("tests/test_a.py::test_long", "faults", "soak"),
        _Item("tests/test_b.py::test_1"),
        _Item("tests/test_b.py::test_2"),
        _Item("tests/test_b.py::test_3"),
        _Item("tests/test_c.py::test_fault", "faults"),
        _Item("tests/test_c.py::test_1"),
        _Item("tests/test_d.py::test_long", "soak"),
        _Item("tests/test_e.py::test_1"),
        _Item("tests/test_f.py::test_1", "shared"),
    ]
    units = schedule(items, workers=4)
    names = [[item.nodeid for item in unit.items] for unit in units]
    assert names[:2] == [["tests/test_a.py::test_long"], ["tests/test_d.py::test_long"]]
    assert names[2] == ["tests/test_c.py::test_fault"]  # then the other fault tests
    # the two units after the first four (one per worker) wait behind the soak tests: the
    # smallest modules with nothing but plain tests
    assert names[4:6] == [["tests/test_c.py::test_1"], ["tests/test_e.py::test_1"]]
    # a module's other tests stay together, in order; every test is scheduled once
    assert [
        "tests/test_b.py::test_1",
        "tests/test_b.py::test_2",
        "tests/test_b.py::test_3",
    ] in names
    assert sorted(n for unit in names for n in unit) == sorted(i.nodeid for i in items)
    assert len({unit.group for unit in units}) == len(units)
