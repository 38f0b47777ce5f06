"""The import contract: imports run one way, and no module imports itself round a loop.

worker/ (the pure pipeline and rules) <- db/ (loads and saves) <- tasks/ (the job and the
Celery glue) <- bench/ (benchmarks, a distribution of their own). Every `import` statement
counts, those inside functions and under `TYPE_CHECKING` too: a lazy import is still a
dependency, and a loop of them is still a loop to read.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("worker", "db", "storage", "tasks", "bench", "aftertrip_client")

FORBIDDEN: dict[str, set[str]] = {
    # package (or module) -> what it must not import, directly
    "worker": {"tasks", "db", "storage", "bench", "celery", "kombu", "billiard"}
    | {"sqlalchemy", "alembic", "boto3", "botocore", "redis"},
    "db": {"tasks", "bench", "storage", "celery", "boto3", "redis"},
    "storage": {"tasks", "db", "bench", "celery", "sqlalchemy"},
    "tasks": {"bench"},
    "aftertrip_client": {"worker", "db", "storage", "tasks", "bench"},
}

DB_MAY_USE = {"worker.types", "worker.errors"}
"""db/ decides nothing: of worker/ it uses the plain types and errors only."""

CELERY_FREE = (
    "tasks.analyze",
    "tasks.compose",
    "tasks.fanout",
    "tasks.guard",
    "tasks.job",
    "tasks.locks",
    "tasks.retry",
    "tasks.write",
)
"""The job and what it runs on: no Celery, directly or through other modules of the project."""

CELERY = {"celery", "kombu", "billiard"}


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if "migrations" in parts:
                continue  # Alembic's scripts, loaded by Alembic
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> Iterator[str]:
    """Every module `name` imports: project modules by full name, others by top-level name."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base
                for alias in node.names
            ]
        else:
            continue
        for target in targets:
            if target in MODULES:
                yield target
                continue
            # `import a.b.c` of a project module not listed (a package's attribute): its package.
            parts = target.split(".")
            while len(parts) > 1 and ".".join(parts) not in MODULES:
                parts.pop()
            yield ".".join(parts) if ".".join(parts) in MODULES else target.split(".")[0]


GRAPH = {name: set(_imports(name, path)) - {name} for name, path in MODULES.items()}


def _top(name: str) -> str:
    return name.split(".")[0]


def test_imports_run_one_way() -> None:
    broken = []
    for name, targets in sorted(GRAPH.items()):
        banned = FORBIDDEN.get(_top(name), set())
        for target in sorted(targets):
            if _top(target) in banned:
                broken.append(f"{name} imports {target}")
            if _top(name) == "db" and _top(target) == "worker" and target not in DB_MAY_USE:
                broken.append(f"{name} imports {target} (db/ may use {sorted(DB_MAY_USE)})")
    assert not broken, "\n".join(broken)


def test_the_job_runs_without_celery() -> None:
    broken = []
    for start in CELERY_FREE:
        assert start in MODULES, start
        seen, todo, via = {start}, [start], {start: start}
        while todo:
            module = todo.pop()
            for target in GRAPH.get(module, ()):
                if target in CELERY:
                    broken.append(f"{start} reaches {target} through {via[module]} -> {module}")
                elif target in MODULES and target not in seen:
                    seen.add(target)
                    via[target] = f"{via[module]} -> {target}" if module != start else start
                    todo.append(target)
    assert not broken, "\n".join(broken)


def test_no_import_cycles() -> None:
    """Tarjan's strongly connected components over the project's modules: none of two or
    more modules."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(GRAPH[node] & MODULES.keys()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(GRAPH):
        if node not in index:
            visit(node)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_no_package_cycles() -> None:
    """Between the top-level packages too (tasks -> bench -> tasks was one)."""
    edges = {
        (_top(name), _top(target))
        for name, targets in GRAPH.items()
        for target in targets
        if target in MODULES and _top(name) != _top(target)
    }
    back = sorted((a, b) for a, b in edges if (b, a) in edges)
    assert not back, f"packages importing each other: {back}"


def test_the_contract_sees_a_forbidden_import() -> None:
    """The graph is built from real imports: known edges are in it."""
    assert "tasks.write" in GRAPH["tasks.job"]
    assert "worker.types" in GRAPH["db.trips"]
    assert "celery" in GRAPH["tasks.trip"]
    assert "sqlalchemy" in GRAPH["db.common"]
