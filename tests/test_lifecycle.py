"""neoplasma.core.lifecycle: every server's start, announce, stop on a signal, drain within a
deadline and close, in that order (the servers themselves: tests/test_local_runtime.py,
test_proxy_drain.py, test_workers.py, test_redis_ingest.py run them as processes)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
from pathlib import Path
from typing import Any

import pytest
from harness import start_server, wait_for

from neoplasma.core.lifecycle import serve


class Recorder:
    kind = "test"

    def __init__(self, drain_for: float, deadline: float | None) -> None:
        self.drain_for, self._deadline = drain_for, deadline
        self.steps: list[str] = []

    async def start(self) -> dict[str, Any]:
        self.steps.append("start")
        return {"name": "t", "http": "127.0.0.1:1"}

    async def quiesce(self) -> None:
        self.steps.append("quiesce")

    def deadline(self) -> float | None:
        self.steps.append("deadline")
        return self._deadline

    async def drained(self) -> None:
        self.steps.append("drained")
        await asyncio.sleep(self.drain_for)
        self.steps.append("drained_done")

    def pending(self) -> dict[str, Any]:
        return {"left": 3}

    async def close(self) -> dict[str, Any]:
        self.steps.append("close")
        return {"total": 7}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_a_signal_drains_and_closes_in_order(sig: int, capsys: pytest.CaptureFixture[str]) -> None:
    service = Recorder(drain_for=0.0, deadline=5.0)
    task = asyncio.create_task(serve(service))
    for _ in range(100):
        if service.steps:
            break
        await asyncio.sleep(0.01)
    assert service.steps == ["start"]
    assert json.loads(capsys.readouterr().out) == {"serving": {"kind": "test", "name": "t", "http": "127.0.0.1:1"}}
    os.kill(os.getpid(), sig)
    assert await asyncio.wait_for(task, 5) == 0
    assert service.steps == ["start", "quiesce", "deadline", "drained", "drained_done", "close"]
    # the handlers are gone once it stopped: the loop's own SIGINT handling is back
    assert not asyncio.get_running_loop().remove_signal_handler(signal.SIGTERM)


async def test_the_deadline_cuts_the_drain_short_and_logs_what_was_left(caplog: pytest.LogCaptureFixture) -> None:
    service = Recorder(drain_for=30.0, deadline=0.1)
    stop = asyncio.Event()
    stop.set()
    with caplog.at_level(logging.INFO):
        assert await asyncio.wait_for(serve(service, stop=stop, announced=lambda s, f: None), 5) == 0
    assert service.steps == ["start", "quiesce", "deadline", "drained", "close"]
    events = [(r.getMessage(), getattr(r, "fields", {})) for r in caplog.records]
    assert ("test_drain_timeout", {"left": 3}) in events
    assert ("test_stopped", {"total": 7}) in events
    assert ("test_serving", {"name": "t", "http": "127.0.0.1:1"}) in events


async def test_no_deadline_waits_for_the_drain() -> None:
    service = Recorder(drain_for=0.2, deadline=None)
    stop = asyncio.Event()
    stop.set()
    assert await serve(service, stop=stop, announced=lambda s, f: None) == 0
    assert service.steps[-2:] == ["drained_done", "close"]


async def test_a_failed_start_propagates_without_a_drain() -> None:
    class Refused(Recorder):
        async def start(self) -> dict[str, Any]:
            raise OSError("taken")

    service = Refused(0.0, 1.0)
    with pytest.raises(OSError, match="taken"):
        await serve(service)
    assert service.steps == []
    assert not asyncio.get_running_loop().remove_signal_handler(signal.SIGINT)


@pytest.mark.parametrize("kind", ["broker", "proxy"])
async def test_a_server_process_settles_its_heap_once_serving(kind: str, tmp_path: Path) -> None:
    """`neoplasma broker` and `proxy` freeze what start-up made (`settle_heap`) once they serve: a proxy's full
    garbage collection, visiting the modules' objects with those of 1000 connecting subscribers, held its loop
    65-89 ms in bench/forged_resumes.py."""
    server = start_server(kind, f"settle-{kind}", tmp_path)
    try:
        def settled() -> dict[str, Any] | None:
            for line in server.log().splitlines():
                with contextlib.suppress(ValueError):
                    record = json.loads(line)
                    if record.get("event") == "heap_settled":
                        return dict(record)
            return None

        record = await wait_for(settled, 20, "the heap_settled log line")
        assert record["why"] == f"{kind}_started"
        assert record["frozen_objects"] > 10_000  # the imports (grpc, protobuf, aiohttp): tens of thousands
    finally:
        server.stop()
