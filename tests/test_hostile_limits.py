"""Memory and protocol limits that hold against real processes whatever a client sends (issue 20).

Each test drives a real broker or proxy on 127.0.0.1 and checks what it holds or answers.
"""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

import aiohttp
import psutil

from neoplasma.local.harness import Server

MIB = 1 << 20


async def metric(server: Server, name: str) -> float:
    async with aiohttp.ClientSession() as session, session.get(f"http://{server.endpoints['http']}/metrics") as resp:
        text = await resp.text()
    found = re.search(rf"^{name} (\S+)$", text, re.M)
    assert found, f"no {name} in the metrics"
    return float(found.group(1))


async def pipelined_publishes(http: str, bodies: list[bytes], connections: int = 4, window: int = 64) -> int:
    """POST each of `bodies` to /publish, `window` at a time on each of `connections` keep-alive connections
    (HTTP/1.1 pipelining: a cheap client, so that the broker is what is measured); returns how many got 200."""
    host, _, port = http.rpartition(":")
    ok = 0

    async def one(share: list[bytes]) -> None:
        nonlocal ok
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            for start in range(0, len(share), window):
                chunk = share[start:start + window]
                writer.write(b"".join(b"POST /publish HTTP/1.1\r\nHost: b\r\nContent-Type: application/json\r\n"
                                      b"Content-Length: %d\r\n\r\n%s" % (len(body), body) for body in chunk))
                answers = b""
                while answers.count(b"HTTP/1.1 ") < len(chunk):
                    data = await asyncio.wait_for(reader.read(1 << 16), 30)
                    assert data, "the broker closed the connection"
                    answers += data
                ok += answers.count(b"HTTP/1.1 200 ")
        finally:
            writer.close()

    await asyncio.gather(*(one(bodies[k::connections]) for k in range(connections)))
    return ok


async def test_retention_holds_what_it_counts(start: Any) -> None:
    """100,000 single-event publishes of ~500 B (50 MB of events) through a broker keeping 32 MiB: its RSS
    stays within 32 MiB (and the newest segment, 1 MiB) plus 8 MiB of slack over its RSS after 2,000
    warm-up publishes (the stated baseline), sampled throughout; retention did evict (it counts what it holds)."""
    broker = start("broker", "b0", "--retention-bytes", str(32 * MIB))
    proc = psutil.Process(broker.proc.pid)
    pad = "x" * 440
    bodies = [b'{"meta":{"type":"room:%d"},"data":{"n":%d,"pad":"%s"}}' % (n % 50, n, pad.encode())
              for n in range(102_000)]
    assert await pipelined_publishes(broker.endpoints["http"], bodies[:2000]) == 2000
    baseline = proc.memory_info().rss
    peak = baseline
    sampling = True

    async def sample() -> None:
        nonlocal peak
        while sampling:
            peak = max(peak, proc.memory_info().rss)
            await asyncio.sleep(0.05)

    sampler = asyncio.create_task(sample())
    started = time.monotonic()
    try:
        assert await pipelined_publishes(broker.endpoints["http"], bodies[2000:]) == 100_000
    finally:
        sampling = False
        await sampler
    peak = max(peak, proc.memory_info().rss)
    took = time.monotonic() - started
    assert peak - baseline <= (32 + 1 + 8) * MIB, (
        f"RSS grew by {(peak - baseline) / MIB:.1f} MiB over {baseline / MIB:.1f} MiB with 32 MiB of retention")
    retained = await metric(broker, "neoplasma_broker_retained_bytes")
    events = await metric(broker, "neoplasma_broker_retained_events")
    assert 31 * MIB <= retained <= 33 * MIB and 50_000 < events < 100_000, (retained, events)
    assert took < 120, f"100,000 publishes took {took:.0f} s"
