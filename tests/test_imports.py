"""The shape of the code: no import cycles among neoplasma's modules, the shared library imports
no tier, and the operator's renderer and spec parser reach the tiers' settings, not their servers.

Read from the sources (ast), every import counted, also the ones inside functions: a cycle
hidden in a function is still a cycle."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def modules() -> dict[str, Path]:
    """Every neoplasma module (generated protobuf modules aside) and its file."""
    package_dir = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    found: dict[str, Path] = {}
    for package, folder in package_dir.items():
        for path in (ROOT / folder).rglob("*.py"):
            if path.name.endswith(("_pb2.py", "_pb2_grpc.py")):
                continue
            parts = (package, *path.relative_to(ROOT / folder).with_suffix("").parts)
            found.setdefault(".".join(parts[:-1] if parts[-1] == "__init__" else parts), path)
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the neoplasma modules it imports (`from a import b` counts a.b when that is a module)."""
    found = modules()
    graph: dict[str, set[str]] = {}
    for name, path in found.items():
        named: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                named.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                named.add(node.module)
                named.update(f"{node.module}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                raise AssertionError(f"{path}: relative import; neoplasma imports by full name")
        graph[name] = {other for other in named if other in found and other != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in graph[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def reached(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for other in graph[todo.pop()] - seen:
            seen.add(other)
            todo.append(other)
    return seen


def test_the_graph_is_read() -> None:
    graph = import_graph()
    assert len(graph) > 60
    assert "neoplasma.core.commands" in graph["neoplasma.broker.cli"]
    assert {"neoplasma.broker.cli", "neoplasma.ingest.cli", "neoplasma.local.cli"} <= graph["neoplasma.cli"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles() -> None:
    assert cycles(import_graph()) == []


def test_the_shared_library_imports_no_tier() -> None:
    graph = import_graph()
    for name in graph:
        if name.startswith("neoplasma.core."):
            shared = ("neoplasma.core", "neoplasma.wire", "neoplasma.plasma")
            tiers = {other for other in reached(graph, name) if not other.startswith(shared)}
            assert not tiers, f"{name} imports {sorted(tiers)}"


def test_only_the_dispatcher_imports_the_tiers_commands() -> None:
    graph = import_graph()
    importers = {name for name, imported in graph.items() if any(other.endswith(".cli") for other in imported)}
    assert importers == {"neoplasma.cli", "neoplasma.__main__"}


def test_the_renderer_and_spec_parser_read_settings_not_servers() -> None:
    graph = import_graph()
    # RedisAddress; the subscriber-token checks (pure: the operator checks keys Secrets with them)
    allowed = {"neoplasma.broker", "neoplasma.proxy", "neoplasma.ingest", "neoplasma.ingest.resp",
               "neoplasma.proxy.auth"}
    for name in ("neoplasma.operator.render", "neoplasma.operator.spec", "neoplasma.operator.settings"):
        servers = {other for other in reached(graph, name) - allowed
                   if other.split(".")[1] in ("broker", "proxy", "ingest") and not other.endswith(".settings")}
        assert not servers, f"{name} imports {sorted(servers)}"


def test_the_operators_controller_does_no_reading_of_its_own() -> None:
    """Observe (observe.py) reads; the controller schedules and acts: no HTTP, TLS or JSON of its own."""
    imported = {alias.split(".")[0] for alias in _all_imports(modules()["neoplasma.operator.controller"])}
    assert not imported & {"aiohttp", "ssl", "json"}


def _all_imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_one_lifecycle_handles_the_signals_of_every_server() -> None:
    """Servers are Services of neoplasma.core.lifecycle: none installs signal handlers of its own."""
    handlers = {name for name, path in modules().items()
                if "add_signal_handler" in path.read_text() or "signal.signal(" in path.read_text()}
    assert handlers == {"neoplasma.core.lifecycle"}
