from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import CREDENTIAL, Server, read_json_line, start_server

UpFactory = Callable[..., tuple[subprocess.Popen[bytes], dict[str, Any]]]

pytest_plugins = ["kubeharness.fixtures"]


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
    def _start(kind: str, name: str, *extra: str, ports: dict[str, int] | None = None,
               env: dict[str, str] | None = None) -> Server:
        server = start_server(kind, name, tmp_path, *extra, ports=ports, env=env)
        servers.append(server)
        return server
    return _start


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    rep = yield
    if rep.when == "call":
        item.rep_call = rep  # type: ignore[attr-defined]
    return rep


@pytest.fixture
def run_up(tmp_path: Path) -> Iterator[UpFactory]:
    """Start `neoplasma up ARGS --json` as a user would; returns (process, endpoints). Stopped after."""
    started: list[tuple[subprocess.Popen[bytes], Path]] = []

    def _run(*args: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
        log_path = tmp_path / f"up-{len(started)}.log"
        credential = tmp_path / "credential"  # the harness's, so that its control helpers work
        credential.write_text(CREDENTIAL)
        proc = subprocess.Popen([sys.executable, "-m", "neoplasma", "up", "--json", "--credential-file",
                                 str(credential), *args], stdout=subprocess.PIPE,
                                stderr=log_path.open("wb"), env={**os.environ, **(env or {})})
        started.append((proc, log_path))
        return proc, read_json_line(proc.stdout, 60)

    yield _run
    for proc, log_path in started:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        print(log_path.read_text()[-5000:])
