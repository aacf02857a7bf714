"""How long the largest allowed publish keeps the broker's event loop busy, checked on the loop and
on a worker thread (as the broker does above OFF_LOOP_BYTES). Prints one JSON line per case.

    python bench/ingest_stall.py
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

from neoplasma.core.events import (
    DEFAULT_MAX_EVENTS_PER_REQUEST,
    DEFAULT_MAX_REQUEST_BYTES,
    check_publish_body,
    make_events,
)


async def worst_stall(check: Callable[[], Any], off_loop: bool) -> tuple[float, float]:
    """(seconds the check took, longest the loop went without running a 1 ms ticker)."""
    gaps: list[float] = []
    done = asyncio.Event()

    async def tick() -> None:
        last = time.perf_counter()
        while not done.is_set():
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    ticker = asyncio.create_task(tick())
    await asyncio.sleep(0.05)
    started = time.perf_counter()
    if off_loop:
        await asyncio.to_thread(check)
    else:
        check()
    took = time.perf_counter() - started
    done.set()
    await ticker
    return took, max(gaps)


async def main() -> None:
    n = DEFAULT_MAX_EVENTS_PER_REQUEST
    pad = "x" * (DEFAULT_MAX_REQUEST_BYTES // n - 80)  # the largest request: every limit nearly reached
    body = json.dumps([{"meta": {"type": "topic:1"}, "data": {"k": pad}} for _ in range(n)]).encode()
    pairs = [("topic:1", json.dumps({"k": pad}).encode())] * n
    for name, check in (("http", lambda: check_publish_body(body)), ("grpc", lambda: make_events(pairs))):
        for off_loop in (False, True):
            took, stall = await worst_stall(check, off_loop)
            print(json.dumps({"path": name, "bytes": len(body), "events": n, "off_loop": off_loop,
                              "check_ms": round(took * 1000), "worst_loop_stall_ms": round(stall * 1000)}))


if __name__ == "__main__":
    asyncio.run(main())
