"""A stopping proxy moves its subscribers away gently: paced, with a reason clients act on."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import grpc

from neoplasma.local.harness import AUTH, PlasmaClient, SseClient, proxy_status, wait_for
from neoplasma.wire.v1 import neoplasma_pb2 as pb
from neoplasma.wire.v1 import neoplasma_pb2_grpc as pb_grpc


async def test_drain_is_paced_and_tells_clients_to_reconnect(start: Any) -> None:
    proxy = start("proxy", "p0")
    control, http = proxy.endpoints["control"], proxy.endpoints["http"]
    browsers = [await SseClient(http, "t").start() for _ in range(40)]
    services = [PlasmaClient(proxy.endpoints["grpc"]) for _ in range(10)]
    for s in services:
        await s.subscribe("t")
    await wait_for(lambda: proxy_status(control), what="status")

    async def all_connected() -> bool:
        return (await proxy_status(control)).subscribers == 50

    await wait_for(all_connected, what="50 subscribers")
    ended_at: dict[int, float] = {}

    async def note_end(i: int, event: asyncio.Event) -> None:
        await event.wait()
        ended_at[i] = time.monotonic()

    watchers = [asyncio.create_task(note_end(i, c.ended)) for i, c in enumerate([*browsers, *services])]
    started = time.monotonic()
    async with grpc.aio.insecure_channel(control) as ch:
        reply = await pb_grpc.ProxyControlStub(ch).Drain(pb.DrainRequest(reconnects_per_second=25), timeout=5,
                                                                 metadata=AUTH)
    assert reply.subscribers_remaining == 50
    # While draining: not ready, and new subscribers are sent elsewhere, never with a non-200
    # (EventSource gives up for good on one): a short retry hint and the end of the stream.
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://{http}/healthz") as resp:
            assert resp.status == 503
        async with session.get(f"http://{http}/?eventType=t") as resp:
            assert resp.status == 200 and await resp.read() == b"retry: 250\n\n"
    await asyncio.wait_for(asyncio.gather(*watchers), 15)
    spread = max(ended_at.values()) - started
    assert spread >= 1.5, f"50 subscribers at 25/s should take ~2 s, took {spread:.2f} s (a reconnect storm)"
    for b in browsers:
        assert b.raw.endswith(b"retry: 250\n\n"), "SSE clients get a short retry hint before the stream ends"
    for s in services:
        assert s.error is not None and s.error.code() == grpc.StatusCode.UNAVAILABLE
    assert (await proxy_status(control)).subscribers == 0
    for c in [*browsers, *services]:
        await c.close()
