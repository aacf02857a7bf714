"""Brokers and proxies as real processes: delivery, topics, membership, failures."""

from __future__ import annotations

import asyncio
import json
import struct
from collections.abc import Callable
from typing import Any

import aiohttp
import grpc
import hpack
from harness import (
    KeptTransport,
    PlasmaClient,
    Server,
    apply_membership,
    grpc_request_headers,
    links_ready,
    proxy_status,
    publish_grpc,
    publish_http,
    sse,
    wait_for,
)

from neoplasma.core.events import Event
from neoplasma.core.resume import encode_token
from neoplasma.plasma.v1 import stream_pb2
from neoplasma.proxy.hub import SseSubscriber
from neoplasma.proxy.server import Proxy, ProxyConfig, _heartbeat
from neoplasma.wire.v1 import neoplasma_pb2 as pb


async def cluster(start: Any, brokers: int = 2, proxies: int = 2) -> tuple[list[Any], list[Any]]:
    bs = [start("broker", f"b{i}") for i in range(brokers)]
    ps = [start("proxy", f"p{i}") for i in range(proxies)]
    members = [(b.name, b.endpoints["grpc"]) for b in bs]
    for p in ps:
        reply = await apply_membership(p.endpoints["control"], 1, members)
        assert reply.accepted and reply.applied_version == 1
    return bs, ps



async def publish_until_one_is_dropped(broker: Server, control: str, healthy: Callable[[], int]) -> pb.ProxyStatus:
    """Publish rounds of 200 large events until the proxy drops a slow subscriber, checking after
    each round that the healthy one (`healthy()`: how many it got) received the whole round."""
    payload = "x" * 4000
    total = 0
    for round_ in range(40):
        await publish_grpc(broker.endpoints["grpc"], [("t", payload)] * 200)
        total += 200
        await wait_for(lambda total=total: healthy() == total, timeout=10,
                       what=f"healthy subscriber keeping up (round {round_})")
        status = await proxy_status(control)
        if status.slow_subscribers_dropped:
            break
    return status

async def test_events_from_any_broker_reach_sse_and_plasma_subscribers_once(start: Any) -> None:
    bs, ps = await cluster(start)
    async with sse(ps[0].endpoints["http"], "program:1234") as browser:
        plasma = PlasmaClient(ps[1].endpoints["grpc"])
        await plasma.subscribe("program:1234")
        for p in ps:
            await wait_for(lambda p=p: links_ready(p.endpoints["control"], 2), what="links with interest")
        await publish_grpc(bs[0].endpoints["grpc"], [("program:1234", {"n": 0})])
        status, body = await publish_http(bs[1].endpoints["http"], {"meta": {"type": "program:1234:views"},
                                                                     "data": {"n": 1}})
        assert (status, body) == (200, {"accepted": 1})
        await wait_for(lambda: len(browser.events) >= 2 and len(plasma.payloads) >= 2, what="both events")
        # Nothing more arrives: published once, delivered once.
        await publish_grpc(bs[0].endpoints["grpc"], [("program:1234", {"n": "last"})])
        await wait_for(lambda: len(browser.events) >= 3 and len(plasma.payloads) >= 3, what="marker")
        assert sorted(e["data"]["n"] for e in browser.events[:2]) == [0, 1]
        assert len(browser.events) == 3 and len(plasma.payloads) == 3
        assert sorted(p.data for p in plasma.payloads[:2]) == ['{"n":0}', '{"n":1}']
        await plasma.close()
    async with aiohttp.ClientSession() as session, session.get(f"http://{ps[1].endpoints['http']}/metrics") as resp:
        [rounds] = [float(line.split()[-1]) for line in (await resp.text()).splitlines()
                    if line.startswith("neoplasma_proxy_dispatch_rounds_total ")]
    assert rounds >= 2  # the last event came in a round of its own


async def test_sse_wire_format_matches_plasma(start: Any) -> None:
    bs, ps = await cluster(start, 1, 1)
    async with sse(ps[0].endpoints["http"], "a") as client:
        await wait_for(lambda: links_ready(ps[0].endpoints["control"], 1))
        await publish_http(bs[0].endpoints["http"], {"meta": {"type": "a:b"}, "data": {"x": "<&>", "y": [1, 2]}})
        await wait_for(lambda: client.events)
        raw = bytes(client.raw)
        assert raw.startswith(b"retry: 2000\n")
        frame = raw[len(b"retry: 2000\n"):]
        event_id = client.ids[0]
        assert frame == (b"id: %s\ndata: " % event_id.encode()
                         + b'{"meta":{"type":"a:b"},"data":{"x":"\\u003c\\u0026\\u003e","y":[1,2]}}\n\n')


async def test_prefix_semantics_and_no_duplicates(start: Any) -> None:
    bs, ps = await cluster(start, 1, 1)
    http = ps[0].endpoints["http"]
    async with sse(http, "program:1234,program:1234:views") as both, sse(http, "program:1234") as parent, \
            sse(http, "program:1234:views") as child:
        await wait_for(lambda: links_ready(ps[0].endpoints["control"], 1))
        topics = ["program:1234", "program:1234:views", "program:12345:views", "program", "program:1234:views:x"]
        await publish_grpc(bs[0].endpoints["grpc"], [(t, i) for i, t in enumerate(topics)])
        await publish_grpc(bs[0].endpoints["grpc"], [("program:1234:views", "end")])
        await wait_for(lambda: all(c.events and c.events[-1]["data"] == "end" for c in (both, parent, child)))
        expected_parent = ["program:1234", "program:1234:views", "program:1234:views:x", "program:1234:views"]
        assert both.topics() == expected_parent
        assert parent.topics() == expected_parent
        assert child.topics() == ["program:1234:views", "program:1234:views:x", "program:1234:views"]


async def test_adding_a_broker_by_membership_push(start: Any) -> None:
    b0, b1 = start("broker", "b0"), start("broker", "b1")
    p = start("proxy", "p0")
    control = p.endpoints["control"]
    await apply_membership(control, 1, [("b0", b0.endpoints["grpc"])])
    async with sse(p.endpoints["http"], "t") as client:
        await wait_for(lambda: links_ready(control, 1))
        reply = await apply_membership(control, 2, [("b0", b0.endpoints["grpc"]), ("b1", b1.endpoints["grpc"])])
        assert reply.accepted and reply.applied_version == 2
        await wait_for(lambda: links_ready(control, 2), what="link to the added broker")
        await publish_grpc(b1.endpoints["grpc"], [("t", "via-b1")])
        await wait_for(lambda: client.events, what="event via the new broker")
        assert client.events[0]["data"] == "via-b1"
        # A stale version is ignored, the applied one kept.
        stale = await apply_membership(control, 1, [("b0", b0.endpoints["grpc"])])
        assert not stale.accepted and stale.applied_version == 2 and "stale" in stale.reason
        bad = await apply_membership(control, 3, [("x", "no-port")])
        assert not bad.accepted and bad.applied_version == 2 and "host:port" in bad.reason
        assert (await proxy_status(control)).membership_version == 2


async def test_broker_loss_keeps_others_and_relinks(start: Any) -> None:
    bs, ps = await cluster(start, 2, 1)
    control = ps[0].endpoints["control"]
    async with sse(ps[0].endpoints["http"], "t") as client:
        await wait_for(lambda: links_ready(control, 2))
        b1_ports = {"grpc-port": bs[1].port("grpc"), "http-port": bs[1].port("http")}
        bs[1].stop()
        await publish_grpc(bs[0].endpoints["grpc"], [("t", "from-b0")])
        await wait_for(lambda: client.events, what="delivery from the surviving broker")
        revived = start("broker", "b1", ports=b1_ports)
        await wait_for(lambda: links_ready(control, 2), timeout=15, what="relink to the returning broker")
        await publish_grpc(revived.endpoints["grpc"], [("t", "from-b1-again")])
        await wait_for(lambda: len(client.events) == 2, what="delivery after relink")
        assert [e["data"] for e in client.events] == ["from-b0", "from-b1-again"]


async def test_plasma_grpc_resubscribe_unsubscribe_and_force_close(start: Any) -> None:
    bs, ps = await cluster(start, 1, 1)
    control = ps[0].endpoints["control"]
    client = PlasmaClient(ps[0].endpoints["grpc"])
    await client.subscribe("a")
    await wait_for(lambda: links_ready(control, 1))
    await publish_grpc(bs[0].endpoints["grpc"], [("a", 1), ("b", 2)])
    await wait_for(lambda: client.payloads)
    await client.subscribe("b")  # replaces the set
    await wait_for(lambda: links_ready(control, 1))
    await publish_grpc(bs[0].endpoints["grpc"], [("a", 3), ("b", 4)])
    await wait_for(lambda: len(client.payloads) == 2)
    await client.subscribe()  # empty: unsubscribes
    await wait_for(lambda: links_ready(control, 1))
    await publish_grpc(bs[0].endpoints["grpc"], [("a", 5), ("b", 6)])
    await client.subscribe("b")
    await wait_for(lambda: links_ready(control, 1))
    await publish_grpc(bs[0].endpoints["grpc"], [("b", 7)])
    await wait_for(lambda: len(client.payloads) == 3)
    assert [p.data for p in client.payloads] == ["1", "4", "7"]
    await client.force_close()
    await asyncio.wait_for(client.ended.wait(), 5)
    assert client.error is None  # plasma ends the stream cleanly
    await client.close()


async def test_stalled_subscriber_does_not_delay_others(start: Any) -> None:
    bs, ps = await cluster(start, 1, 1)
    control = ps[0].endpoints["control"]
    # A subscriber that never reads: its socket buffers fill, then the proxy drops it.
    _reader, writer = await asyncio.open_connection("127.0.0.1", ps[0].port("http"))
    writer.write(b"GET /?eventType=t HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    async with sse(ps[0].endpoints["http"], "t") as healthy:
        await wait_for(lambda: links_ready(control, 1))
        status = await publish_until_one_is_dropped(bs[0], control, lambda: len(healthy.events))
        assert status.slow_subscribers_dropped == 1
        assert status.sse_subscribers == 1
    writer.close()


async def test_heartbeat_comments_reach_every_sse_client(start: Any) -> None:
    proxy = start("proxy", "p0", "--heartbeat", "0.2")
    async with sse(proxy.endpoints["http"], "a") as one, sse(proxy.endpoints["http"], "b") as two:
        await wait_for(lambda: len(one.comments) >= 2 and len(two.comments) >= 2, what="heartbeats")
        assert set(one.comments) == {":heartbeat "}


async def test_plasma_grpc_clients_get_every_event_in_order_through_batched_frames(start: Any) -> None:
    bs, ps = await cluster(start, 1, 1)
    control = ps[0].endpoints["control"]
    address = ps[0].endpoints["grpc"]
    shared = grpc.aio.insecure_channel(address)  # two streams on one connection: their frames gathered
    clients = [PlasmaClient(address), PlasmaClient(address, shared), PlasmaClient(address, shared)]
    for client in clients:
        await client.subscribe("t")
    await wait_for(lambda: links_ready(control, 1))
    # Batches of 200 (many messages in a DATA frame), and events beyond one 16 KiB frame.
    sent = [{"n": n, "pad": "x" * (20_000 if n % 97 == 0 else 10)} for n in range(1000)]
    for i in range(0, len(sent), 200):
        await publish_grpc(bs[0].endpoints["grpc"], [("t", data) for data in sent[i:i + 200]])
    await wait_for(lambda: all(len(c.payloads) >= len(sent) for c in clients), what="every event")
    for client in clients:
        assert [json.loads(p.data) for p in client.payloads] == sent
        assert set(client.topics()) == {"t"}
        await client.close()
    await shared.close()


async def stalled_plasma_stream(address: str, topic: str) -> asyncio.StreamWriter:
    """A plasma `Events` stream whose client never reads: its 64 KiB HTTP/2 window and its socket fill."""
    host, _, port = address.rpartition(":")
    _reader, writer = await asyncio.open_connection(host, int(port))
    headers = hpack.Encoder().encode(grpc_request_headers("/proto.StreamService/Events"))
    request = stream_pb2.Request(Events=[stream_pb2.EventType(type=topic)]).SerializeToString()
    message = b"\x00" + len(request).to_bytes(4, "big") + request

    def frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
        return struct.pack(">IBI", len(payload) << 8 | kind, flags, stream) + payload

    writer.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(4, 0, 0, b"") + frame(1, 4, 1, headers)
                 + frame(0, 0, 1, message))
    await writer.drain()
    return writer


async def test_stalled_plasma_stream_is_dropped_without_delaying_others(start: Any) -> None:
    bs, ps = await cluster(start, 1, 1)
    control = ps[0].endpoints["control"]
    stalled = await stalled_plasma_stream(ps[0].endpoints["grpc"], "t")
    healthy = PlasmaClient(ps[0].endpoints["grpc"])
    await healthy.subscribe("t")
    await wait_for(lambda: links_ready(control, 1))

    async def both_subscribed() -> bool:
        return (await proxy_status(control)).grpc_subscribers == 2

    await wait_for(both_subscribed, what="both streams subscribed")
    status = await publish_until_one_is_dropped(bs[0], control, lambda: len(healthy.payloads))
    assert status.slow_subscribers_dropped == 1
    assert status.grpc_subscribers == 1 and healthy.error is None
    stalled.close()
    await healthy.close()


async def test_a_heartbeat_is_written_a_slice_of_subscribers_per_pass_with_the_token_of_its_time() -> None:
    """A heartbeat to 350 SSE subscribers is written to a slice of them per pass of the loop, not to all in one step
    (1100 subscribers' writes held a proxy's loop 15-25 ms: live events waited); a live event dispatched between
    slices reaches all, and each heartbeat's id claims no event its subscriber was not written before it."""
    proxy = Proxy(ProxyConfig(name="p0", heartbeat_seconds=0.01))
    hub = proxy.hub
    hub.set_cluster("c")
    transports = [KeptTransport() for _ in range(350)]
    for transport in transports:
        hub.add(SseSubscriber(transport, 1 << 20), ["t"])
    hub.dispatch([Event("t", b"{}", 9, 1)])
    task = asyncio.create_task(_heartbeat(proxy))

    def beaten() -> int:
        return sum(any(b":heartbeat" in w for w in t.written) for t in transports)

    deadline = asyncio.get_running_loop().time() + 10
    for _ in range(10_000_000):  # passes of the loop until the heartbeat's first slice is written (within 10 s)
        await asyncio.sleep(0)
        if beaten() or asyncio.get_running_loop().time() > deadline:
            break
    first = beaten()
    hub.dispatch([Event("t", b"{}", 9, 2)])  # between the slices
    for _ in range(100):
        await asyncio.sleep(0)
        if beaten() == len(transports):
            break
    task.cancel()
    assert 0 < first < len(transports), first  # before: all 350 in one step
    assert beaten() == len(transports)
    after = {seq: b"id: " + encode_token(hub.tag, {9: seq}) + b"\n" for seq in (1, 2)}
    for transport in transports:
        events = [k for k, w in enumerate(transport.written) if b"data:" in w]
        [beat] = [k for k, w in enumerate(transport.written) if b":heartbeat" in w]
        assert len(events) == 2  # both live events, once each
        if after[2] in transport.written[beat]:  # it claims seq 2: written after that event
            assert beat > events[1]
        else:
            assert after[1] in transport.written[beat]
