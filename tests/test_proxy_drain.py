"""A stopping proxy moves its subscribers away gently: paced, with a reason clients act on."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import grpc
from harness import AUTH, PlasmaClient, SseClient, proxy_status, wait_for

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


async def test_sigterm_with_a_drain_delay_fails_readiness_first_and_keeps_serving_meanwhile(start: Any) -> None:
    proxy = start("proxy", "p0", "--drain-delay", "3")
    control, http = proxy.endpoints["control"], proxy.endpoints["http"]
    early = await SseClient(http, "t").start()
    await wait_for(lambda: proxy_status(control), what="status")
    stopping_at = time.monotonic()
    proxy.proc.terminate()

    async def unready() -> bool:
        async with aiohttp.ClientSession() as session, session.get(f"http://{http}/healthz") as resp:
            return resp.status == 503

    await wait_for(unready, what="readiness failing")
    # Until the load balancer has seen that, a new subscriber is served like any other.
    late = await SseClient(http, "t").start()

    async def both_subscribed() -> bool:
        return (await proxy_status(control)).subscribers == 2

    await wait_for(both_subscribed, what="the late subscriber served")
    assert not early.ended.is_set() and time.monotonic() - stopping_at < 2.5
    # Then the paced drain: both are told to reconnect, and the process ends.
    await asyncio.wait_for(asyncio.gather(early.ended.wait(), late.ended.wait()), 15)
    assert time.monotonic() - stopping_at >= 3
    for client in (early, late):
        assert client.raw.endswith(b"retry: 250\n\n")
        await client.close()
    assert await asyncio.to_thread(proxy.proc.wait, 15) == 0
