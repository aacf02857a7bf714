"""A proxy told to hold at most N subscribers (ProxyControl.Drain with keep_at_most) sheds the excess
at the rate it is given, refuses newcomers and fails readiness while full, and serves as before when
the limit lapses; the moved subscribers resume at the other proxy: 0 lost, 0 duplicated, never a
non-200. Real brokers and proxies on 127.0.0.1; clients that reconnect through a stand-in for
kube-proxy that picks any proxy at random (the worst case: it has not seen readiness yet)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import random
import time
from collections.abc import Callable, Sequence
from typing import Any

import aiohttp
import grpc
import pytest
from harness import AUTH, EventSource, PlasmaClient, Publisher, Server, proxy_status, publish_grpc, wait_for
from test_resume import NativeClient, all_subscribed, cluster, grpc_addresses

from neoplasma.proxy.pod import worker_limits, worker_share
from neoplasma.wire.v1 import neoplasma_pb2 as pb
from neoplasma.wire.v1 import neoplasma_pb2_grpc as pb_grpc


async def drain(proxy: Server, **fields: Any) -> pb.DrainResponse:
    async with grpc.aio.insecure_channel(proxy.endpoints["control"]) as ch:
        reply: pb.DrainResponse = await pb_grpc.ProxyControlStub(ch).Drain(pb.DrainRequest(**fields), timeout=5,
                                                                          metadata=AUTH)
    return reply


async def health(proxy: Server) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.get(f"http://{proxy.endpoints['http']}/healthz") as r:
        return r.status, await r.text()


async def test_shed_moves_the_excess_to_the_other_proxy_exactly_once_and_lapses(start: Any) -> None:
    bs, ps = await cluster(start, 1, 2)
    p0, p1 = ps
    at = {"proxies": [p0]}
    rng = random.Random(7)

    def pick(kind: str) -> str:
        return rng.choice(at["proxies"]).endpoints[kind]

    browsers = [EventSource(lambda: pick("http"), "t").start() for _ in range(24)]
    natives = [NativeClient(lambda: pick("grpc"), ["t"]) for _ in range(6)]
    await wait_for(lambda: all_subscribed(p0, 30, 1), what="30 subscribers at p0")
    publisher = Publisher(grpc_addresses(bs)).start(interval=0.01)
    await wait_for(lambda: all(len(b.events) > 10 for b in browsers), what="events flowing")

    at["proxies"] = [p0, p1]  # from now on a reconnect may land on either
    started = time.monotonic()
    reply = await drain(p0, keep_at_most=15, reconnects_per_second=20, hold_seconds=4)
    assert reply.subscribers_remaining == 30
    await wait_for(lambda: all_subscribed(p1, 15, 1), timeout=15, what="15 subscribers moved to p1")
    took = time.monotonic() - started
    assert took >= 14 / 20, f"15 moves at 20/s take at least 0.7 s, took {took:.2f} s"
    status = await proxy_status(p0.endpoints["control"])
    assert (status.subscribers, status.keep_at_most, status.draining) == (15, 15, False)
    # Full: readiness fails and a newcomer is sent elsewhere with a short retry, never a non-200.
    assert await health(p0) == (503, "full: subscribers are being spread over the proxies\n")
    async with aiohttp.ClientSession() as session, session.get(f"http://{p0.endpoints['http']}/?eventType=t") as r:
        assert r.status == 200 and await r.read() == b"retry: 100\n\n"
    async with grpc.aio.insecure_channel(p0.endpoints["grpc"]) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            async for _ in pb_grpc.SubscriberStub(ch).Subscribe(pb.SubscribeRequest(topics=["t"]), timeout=5):
                pass
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE and "proxy is full" in str(refused.value.details())

    async def lapsed() -> bool:
        return await health(p0) == (200, "ok\n")

    await wait_for(lapsed, timeout=10, what="the limit lapsing after its hold")
    assert (await proxy_status(p0.endpoints["control"])).keep_at_most == 0
    await asyncio.sleep(0.3)  # publishing goes on after the moves
    await delivered_exactly_once(publisher, browsers, natives)
    for c in [*browsers, *natives]:
        await c.close()


async def delivered_exactly_once(publisher: Publisher, browsers: list[EventSource],
                                 natives: Sequence[NativeClient | ChannelNative] = ()) -> None:
    """Stop publishing; every client got every event once, in order, no gap; browsers never a non-200."""
    await publisher.stop()
    await wait_for(lambda: all(publisher.all_received(c.events) for c in [*browsers, *natives]), timeout=30,
                   what="every event at every client")
    for k, b in enumerate(browsers):
        assert set(b.statuses) == {200}, f"browser {k} got {b.statuses}"
        publisher.assert_exactly_once_in_order(b.events, f"browser {k}")
        assert not b.gaps
    for k, n in enumerate(natives):
        publisher.assert_exactly_once_in_order(n.events, f"native {k}")
        assert n.gaps == 0


async def sse_until_closed(address: str) -> bytes:
    """One SSE request over a keep-alive connection, read until the proxy closes the connection."""
    host, port = address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(f"GET /?eventType=t HTTP/1.1\r\nHost: {address}\r\nConnection: keep-alive\r\n\r\n".encode())
        await writer.drain()
        return await reader.read()
    finally:
        writer.close()


async def test_a_moved_or_refused_sse_stream_closes_its_connection(start: Any) -> None:
    """kube-proxy picks a backend per connection: a reconnect over the same keep-alive connection
    would come back to the proxy it was moved from. So the connection of a moved or refused
    stream is closed after it (the request asked for keep-alive)."""
    bs, ps = await cluster(start, 1, 1)
    streams = [asyncio.create_task(sse_until_closed(ps[0].endpoints["http"])) for _ in range(2)]
    await wait_for(lambda: all_subscribed(ps[0], 2, 1), what="2 subscribers")
    await publish_grpc(bs[0].endpoints["grpc"], [("t", {"n": 0})])  # an id each: movable

    async def movable() -> bool:
        return (await proxy_status(ps[0].endpoints["control"])).movable_subscribers == 2

    await wait_for(movable, what="both streams sent an id")
    await drain(ps[0], keep_at_most=1, reconnects_per_second=20, hold_seconds=5)
    done, pending = await asyncio.wait(streams, timeout=10, return_when=asyncio.FIRST_COMPLETED)
    assert len(done) == 1 and len(pending) == 1, "one stream moved, its connection closed"
    assert b"retry: 100" in done.pop().result()
    refused = await asyncio.wait_for(sse_until_closed(ps[0].endpoints["http"]), 10)  # full: refused, closed
    assert b"HTTP/1.1 200" in refused and b"retry: 100" in refused
    pending.pop().cancel()


async def test_a_drain_under_way_changes_pace_when_told_and_a_shed_never_overrides_it(start: Any) -> None:
    _, ps = await cluster(start, 1, 1)
    browsers = [EventSource(lambda: ps[0].endpoints["http"], "t").start() for _ in range(30)]
    await wait_for(lambda: all_subscribed(ps[0], 30, 1), what="30 subscribers")
    started = time.monotonic()
    await drain(ps[0], reconnects_per_second=2)

    async def gone(n: int) -> bool:
        return (await proxy_status(ps[0].endpoints["control"])).subscribers <= n

    await wait_for(lambda: gone(29), what="the first moves")
    await drain(ps[0], keep_at_most=5, reconnects_per_second=1)  # ignored: a drain ends everything
    await drain(ps[0], reconnects_per_second=200)  # the operator's budget grew: faster
    await wait_for(lambda: gone(0), timeout=5, what="the rest at the new pace")
    assert time.monotonic() - started < 3, "30 at 2/s would take 15 s; at 200/s well under a second"
    assert (await proxy_status(ps[0].endpoints["control"])).keep_at_most == 0
    for b in browsers:
        await b.close()


async def test_sigterm_drain_speeds_up_to_end_within_its_limit(start: Any) -> None:
    proxy = start("proxy", "p0", "--drain-rate", "1", "--drain-within", "2")
    browsers = [EventSource(lambda: proxy.endpoints["http"], "t").start() for _ in range(20)]
    await wait_for(lambda: proxy_status(proxy.endpoints["control"]), what="status")

    async def twenty() -> bool:
        return (await proxy_status(proxy.endpoints["control"])).subscribers == 20

    await wait_for(twenty, what="20 subscribers")
    started = time.monotonic()
    assert await asyncio.to_thread(proxy.stop) == 0  # 20 at 1/s would take 20 s: the limit says 2
    assert time.monotonic() - started < 6
    assert "proxy_drain_hurried" in proxy.log()
    for b in browsers:
        await b.close()


@pytest.mark.parametrize(("fields", "problem"), [
    ({"reconnects_per_second": -1.0}, "reconnects_per_second must be a positive number from 0.1 to 1e+06"),
    ({"reconnects_per_second": math.nan}, "reconnects_per_second must be a positive number"),
    ({"reconnects_per_second": 1e7}, "reconnects_per_second must be a positive number from 0.1 to 1e+06"),
    ({"keep_at_most": 5, "reconnects_per_second": 0.01}, "from 0.1 to 1e+06"),
    ({"keep_at_most": 10_000_001}, "keep_at_most must be at most 10000000"),
    ({"keep_at_most": 5, "hold_seconds": -1.0}, "hold_seconds must be between 0 and 3600"),
    ({"keep_at_most": 5, "hold_seconds": math.inf}, "hold_seconds must be between 0 and 3600"),
    ({"keep_at_most": 5, "hold_seconds": 7200.0}, "hold_seconds must be between 0 and 3600"),
    ({"hold_seconds": 10.0}, "hold_seconds is for a limit (keep_at_most)"),
])
async def test_bad_drain_requests_are_refused_whole(start: Any, fields: dict[str, Any], problem: str) -> None:
    proxy = start("proxy", "p0")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await drain(proxy, **fields)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and problem in str(refused.value.details())
    status = await proxy_status(proxy.endpoints["control"])
    assert (status.draining, status.keep_at_most) == (False, 0) and await health(proxy) == (200, "ok\n")
    async with grpc.aio.insecure_channel(proxy.endpoints["control"]) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as unauthenticated:
            await pb_grpc.ProxyControlStub(ch).Drain(pb.DrainRequest(keep_at_most=1), timeout=5)
    assert unauthenticated.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_a_pod_splits_pace_and_limit_over_its_workers() -> None:
    share = worker_share(pb.DrainRequest(reconnects_per_second=90, keep_at_most=100, hold_seconds=30), 4)
    assert (share.reconnects_per_second, share.keep_at_most, share.hold_seconds) == (22.5, 25, 30)
    assert worker_share(pb.DrainRequest(keep_at_most=3), 4).keep_at_most == 1  # never 0: that is a drain
    assert worker_share(pb.DrainRequest(reconnects_per_second=-1), 4).reconnects_per_second == -1  # refused there
    one = pb.DrainRequest(reconnects_per_second=9)
    assert worker_share(one, 1) is one


def test_a_pods_limit_is_split_as_its_workers_unmovable_subscribers_allow() -> None:
    """A limit sheds only movable subscribers: a worker whose subscribers are all plasma streams
    cannot go below them, so the others take its part of the pod's limit (else the pod would stay
    over it, and the operator's round would wait for moves that cannot happen)."""
    def worker(subscribers: int, movable: int) -> pb.ProxyStatus:
        return pb.ProxyStatus(subscribers=subscribers, movable_subscribers=movable)

    assert worker_limits(20, [worker(10, 10)] * 4) == [5, 5, 5, 5]  # as ceil(keep / workers)
    assert worker_limits(21, [worker(10, 10)] * 4) == [6, 6, 6, 6]
    assert worker_limits(12, [worker(10, 0), worker(10, 10)]) == [10, 2]  # (evenly: 6 and 6, the pod at 16)
    assert worker_limits(5, [worker(10, 0), worker(10, 2)]) == [10, 8]  # nothing below what cannot move
    assert worker_limits(3, [worker(0, 0)] * 4) == [1, 1, 1, 1]  # never 0: that is a drain


def plasma_events(client: PlasmaClient) -> list[dict[str, Any]]:
    return [json.loads(p.data) for p in client.payloads]


async def test_a_limit_sheds_only_subscribers_that_resume_exactly_never_plasma_streams(start: Any) -> None:
    """plasma's gRPC stream carries no position: moved, it would miss what is published while it
    reconnects. A proxy told to keep at most N sheds SSE and native streams that have been sent a
    position, never a plasma stream nor a stream that has none yet; Status says how many are movable."""
    bs, ps = await cluster(start, 1, 2)
    p0, p1 = ps
    at = {"proxy": p0}
    browsers = [EventSource(lambda: at["proxy"].endpoints["http"], "t").start() for _ in range(4)]
    natives = [NativeClient(lambda: at["proxy"].endpoints["grpc"], ["t"]) for _ in range(2)]
    plasmas = [PlasmaClient(p0.endpoints["grpc"]) for _ in range(4)]
    for plasma in plasmas:
        await plasma.subscribe("t")
    await wait_for(lambda: all_subscribed(p0, 10, 1), what="10 subscribers at p0")
    # Nothing published yet: no stream has been sent a position, so none may move.
    status = await proxy_status(p0.endpoints["control"])
    assert (status.subscribers, status.movable_subscribers) == (10, 0)
    await drain(p0, keep_at_most=2, reconnects_per_second=50, hold_seconds=2)
    await asyncio.sleep(0.5)  # (50/s: 8 would be gone in 0.16 s)
    assert (await proxy_status(p0.endpoints["control"])).subscribers == 10

    publisher = Publisher(grpc_addresses(bs)).start(interval=0.01)
    clients: list[Any] = [*browsers, *natives]
    await wait_for(lambda: all(len(c.events) > 3 for c in clients) and all(len(p.payloads) > 3 for p in plasmas),
                   what="events at every subscriber")
    status = await proxy_status(p0.endpoints["control"])
    assert (status.subscribers, status.movable_subscribers) == (10, 6)

    at["proxy"] = p1  # where the moved ones reconnect
    await drain(p0, keep_at_most=2, reconnects_per_second=50, hold_seconds=5)  # 8 over it: only 6 can go
    await wait_for(lambda: all_subscribed(p1, 6, 1), what="the 4 SSE and 2 native streams at p1")
    status = await proxy_status(p0.endpoints["control"])
    assert (status.subscribers, status.movable_subscribers, status.keep_at_most) == (4, 0, 2)
    assert "proxy_shed" in p0.log() and '"unmovable": 4' in p0.log()
    await delivered_exactly_once(publisher, browsers, natives)
    for k, plasma in enumerate(plasmas):  # never moved: every event, on the stream it opened
        await wait_for(lambda plasma=plasma: publisher.all_received(plasma_events(plasma)), what=f"plasma {k}")
        publisher.assert_exactly_once_in_order(plasma_events(plasma), f"plasma {k}")
        assert plasma.error is None and not plasma.ended.is_set()
    for c in [*browsers, *natives, *plasmas]:
        await c.close()


async def test_subscribers_moved_to_a_proxy_are_not_moved_again_from_there(start: Any) -> None:
    """A subscriber that resumes at a proxy while it is under a rebalance's limit (the moved ones
    land then: every proxy has one during a round) is not movable there for 600 s: no subscriber
    is moved twice, whatever the operator remembers."""
    bs, (p0, p1) = await cluster(start, 1, 2)
    at = {"proxy": p0}
    browsers = [EventSource(lambda: at["proxy"].endpoints["http"], "t").start() for _ in range(6)]
    await wait_for(lambda: all_subscribed(p0, 6, 1), what="6 subscribers at p0")
    publisher = Publisher(grpc_addresses(bs)).start(interval=0.01)
    await wait_for(lambda: all(len(b.events) > 3 for b in browsers), what="events at every subscriber")
    at["proxy"] = p1
    await drain(p1, keep_at_most=6, reconnects_per_second=50, hold_seconds=10)  # the receiver's limit
    await drain(p0, keep_at_most=3, reconnects_per_second=50, hold_seconds=10)
    await wait_for(lambda: all_subscribed(p1, 3, 1), what="3 moved to p1")
    assert (await proxy_status(p1.endpoints["control"])).movable_subscribers == 0
    assert (await proxy_status(p0.endpoints["control"])).movable_subscribers == 3  # never moved: movable
    await drain(p1, keep_at_most=1, reconnects_per_second=50, hold_seconds=10)
    await asyncio.sleep(0.5)  # (50/s: 2 would be gone in 0.04 s)
    assert (await proxy_status(p1.endpoints["control"])).subscribers == 3
    await delivered_exactly_once(publisher, browsers)
    for b in browsers:
        await b.close()


class ChannelNative:
    """The native stream as a service's client writes it: one channel kept for its life, the call
    made again on it (with the last token) after UNAVAILABLE."""

    def __init__(self, channel: grpc.aio.Channel, topics: list[str]) -> None:
        self.channel, self.topics = channel, topics
        self.token = ""
        self.events: list[dict[str, Any]] = []
        self.refusals: list[str] = []
        self.calls = 0
        self.gaps = 0
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            try:
                self.calls += 1
                call = pb_grpc.SubscriberStub(self.channel).Subscribe(
                    pb.SubscribeRequest(topics=self.topics, resume_token=self.token))
                async for batch in call:
                    self.events += [json.loads(e.data) for e in batch.events]
                    self.gaps += batch.gap
                    self.token = batch.token or self.token
            except grpc.aio.AioRpcError as exc:
                self.refusals.append(f"{exc.code().name}: {exc.details()}")
            await asyncio.sleep(0.05)

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(BaseException):
            await self._task


class Balancer:
    """A stand-in for a Service as kube-proxy makes it: each connection accepted is relayed, whole,
    to the proxy `backend()` names then (per connection, never per call); every one is recorded."""

    def __init__(self, backend: Callable[[], Server]) -> None:
        self.backend = backend
        self.connections: list[str] = []  # the proxy each accepted connection went to
        self._pipes: set[asyncio.Task[None]] = set()

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        proxy = self.backend()
        self.connections.append(proxy.name)
        host, port = proxy.endpoints["grpc"].rsplit(":", 1)
        upstream_reader, upstream_writer = await asyncio.open_connection(host, int(port))

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            try:
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                sink.close()

        pipes = [asyncio.create_task(pipe(reader, upstream_writer)), asyncio.create_task(pipe(upstream_reader, writer))]
        self._pipes.update(pipes)
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*pipes)
        self._pipes.difference_update(pipes)

    async def close(self) -> None:
        self.server.close()
        for task in list(self._pipes):
            task.cancel()


async def test_a_shed_grpc_call_gets_goaway_so_its_retry_opens_a_new_connection_elsewhere(start: Any) -> None:
    """A gRPC channel keeps its HTTP/2 connection: a moved call's retry over it would come back to
    the proxy it left (full: refused, again and again). The proxy sends GOAWAY (NO_ERROR) on the
    shed call's connection: grpcio opens a new connection for the retry, which the Service sends to
    another proxy, while the plasma stream on the old connection goes on."""
    bs, (p0, p1) = await cluster(start, 1, 2)
    backend = {"proxy": p0}
    balancer = Balancer(lambda: backend["proxy"])
    address = await balancer.start()
    channel = grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
    plasma = PlasmaClient(address, channel=channel)
    await plasma.subscribe("t")
    native = ChannelNative(channel, ["t"])
    await wait_for(lambda: all_subscribed(p0, 2, 1), what="a plasma and a native stream at p0")
    assert balancer.connections == ["p0"]  # both calls on one connection
    publisher = Publisher(grpc_addresses(bs)).start(interval=0.01)
    await wait_for(lambda: len(native.events) > 3 and len(plasma.payloads) > 3, what="events on both")

    backend["proxy"] = p1  # kube-proxy sends new connections elsewhere (p0 fails readiness when full)
    await drain(p0, keep_at_most=1, reconnects_per_second=20, hold_seconds=20)
    await wait_for(lambda: all_subscribed(p1, 1, 1), timeout=5, what="the native stream at p1, within a retry or two")
    assert balancer.connections == ["p0", "p1"]  # the retry opened a new connection, which went to p1
    assert native.refusals[0].startswith("UNAVAILABLE: subscribers are being spread") and native.calls <= 3
    during = len(plasma.payloads)
    await wait_for(lambda: len(plasma.payloads) > during + 10, what="the plasma stream going on at p0")
    assert (await proxy_status(p0.endpoints["control"])).subscribers == 1 and plasma.error is None
    await delivered_exactly_once(publisher, [], [native])
    await wait_for(lambda: publisher.all_received(plasma_events(plasma)), what="every event on the plasma stream")
    publisher.assert_exactly_once_in_order(plasma_events(plasma), "plasma")
    await native.close()
    await plasma.close()
    await channel.close()
    await balancer.close()
