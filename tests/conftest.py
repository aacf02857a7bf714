from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from dataplane import Server, start_server

# pytest_plugins = ["kubeharness.fixtures"]


@pytest.fixture
def servers(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[list[Server]]:
    """Started servers, stopped after the test; their logs are printed when it fails."""
    started: list[Server] = []
    yield started
    for server in started:
        server.stop()
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        for server in started:
            print(f"----- {server.name} log -----\n{server.log()[-4000:]}")


@pytest.fixture
def start(servers: list[Server], tmp_path: Path):  # type: ignore[no-untyped-def]
    def _start(kind: str, name: str, *extra: str, ports: dict[str, int] | None = None) -> Server:
        server = start_server(kind, name, tmp_path, *extra, ports=ports)
        servers.append(server)
        return server
    return _start


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    rep = yield
    if rep.when == "call":
        item.rep_call = rep  # type: ignore[attr-defined]
    return rep
