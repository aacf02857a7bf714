"""Memory and protocol limits that hold against real processes whatever a client sends (issue 20).

Each test drives a real broker or proxy on 127.0.0.1 and checks what it holds or answers.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import re
import socket
import threading
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any, cast

import aiohttp
import grpc
import psutil
import pytest
from h2.connection import H2Connection
from h2.events import ConnectionTerminated, DataReceived, ResponseReceived, TrailersReceived
from harness import (
    AUTH,
    EventSource,
    Server,
    SseClient,
    apply_membership,
    grpc_request_headers,
    h2_client,
    links_ready,
    proxy_status,
    publish_grpc,
    publish_http,
    wait_for,
)

from neoplasma.core.aio import InTurns, Turns
from neoplasma.core.events import grpc_frame, varint
from neoplasma.core.logs import OUTSIDE_BURST, OUTSIDE_PER_SECOND, LineBudget
from neoplasma.core.net import hostport
from neoplasma.core.resume import (
    MAX_SEQ,
    MAX_TOKEN_CHARS,
    InvalidToken,
    cluster_tag,
    decode_token,
    epoch_mark,
    positions_check,
)
from neoplasma.plasma.v1 import stream_pb2
from neoplasma.proxy.fastpath import FastPath, Head, parse_head
from neoplasma.proxy.h2server import Call, GrpcServer
from neoplasma.proxy.resume import OVER_BUDGET, ResumeBudget
from neoplasma.proxy.server import sse_deferral
from neoplasma.wire.v1 import neoplasma_pb2 as pb
from neoplasma.wire.v1 import neoplasma_pb2_grpc as pb_grpc

MIB = 1 << 20


async def metric(server: Server, name: str) -> float:
    async with aiohttp.ClientSession() as session, session.get(f"http://{server.endpoints['http']}/metrics") as resp:
        text = await resp.text()
    found = re.search(rf"^{name} (\S+)$", text, re.M)
    assert found, f"no {name} in the metrics"
    return float(found.group(1))


async def proxy_status_field(proxy: Server, field: str, value: int) -> bool:
    return bool(getattr(await proxy_status(proxy.endpoints["control"]), field) == value)


async def proxy_received_more(proxy: Server, than: int) -> bool:
    return (await proxy_status(proxy.endpoints["control"])).events_received > than


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


async def plasma_stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, client: H2Connection,
                        topic: str) -> tuple[int, dict[int, bytes], list[Any]]:
    """Open plasma's Events call on a raw HTTP/2 connection, subscribed to `topic`; returns its stream id,
    the DATA received per stream so far and the connection's other events (filled by `pump`)."""
    stream_id = client.get_next_available_stream_id()
    request = stream_pb2.Request(Events=[stream_pb2.EventType(type=topic)]).SerializeToString()
    client.send_headers(stream_id, grpc_request_headers("/proto.StreamService/Events"))
    client.send_data(stream_id, grpc_frame(request))
    writer.write(client.data_to_send())
    return stream_id, {}, []


async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, client: H2Connection,
               received: dict[int, bytes], other: list[Any]) -> bool:
    """Read once from the connection (False at its end), recording DATA per stream and other events."""
    data = await asyncio.wait_for(reader.read(65536), 10)
    if not data:
        return False
    for event in client.receive_data(data):
        if isinstance(event, DataReceived):
            client.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            received[event.stream_id] = received.get(event.stream_id, b"") + event.data
        else:
            other.append(event)
    writer.write(client.data_to_send())
    return True


async def test_a_call_cancelled_in_the_read_that_opened_it_ends_only_itself(start: Any) -> None:
    """HEADERS and RST_STREAM of one call in the same read (a UI cancelling a Subscribe right after
    starting it): the other calls on the connection carry on; no traceback is logged."""
    broker = start("broker", "b0")
    proxy = start("proxy", "p0", "--brokers", broker.endpoints["grpc"])
    reader, writer, client = await h2_client(proxy.endpoints["grpc"])
    first, received, other = await plasma_stream(reader, writer, client, "t")
    await wait_for(lambda: links_ready(proxy.endpoints["control"], 1), what="the proxy's relay")
    await wait_for(lambda: proxy_status_field(proxy, "subscribers", 1), what="the subscriber")
    for path in ("/proto.StreamService/Events", "/neoplasma.v1.Subscriber/Subscribe", "/no.Such/Method"):
        cancelled = client.get_next_available_stream_id()
        client.send_headers(cancelled, grpc_request_headers(path))
        client.reset_stream(cancelled)
        writer.write(client.data_to_send())  # one write: the proxy reads both frames at once
    for n in range(3):
        await publish_grpc(broker.endpoints["grpc"], [("t", {"n": n})])
        async def arrived(n: int = n) -> bool:
            return await pump(reader, writer, client, received, other) and b'{"n":%d}' % n in received.get(first, b"")

        await wait_for(arrived, what=f"event {n} on the first call")
    assert not any(isinstance(e, ConnectionTerminated) for e in other)
    writer.close()
    assert "Traceback" not in proxy.log() and '"level": "error"' not in proxy.log()


async def test_a_handler_failing_on_one_call_ends_that_call_only() -> None:
    """An exception in a method's handler (in process: a real h2 connection on 127.0.0.1) ends that call
    with INTERNAL; the connection and its other calls carry on."""
    calls: list[Call] = []

    def boom(call: Call) -> None:
        raise RuntimeError("handler bug")

    server = GrpcServer({"/t.S/M": calls.append, "/t.S/Boom": boom}, max_message_bytes=1 << 20, keepalive=30,
                        max_streams=10)
    sock = socket.create_server(("127.0.0.1", 0))
    await server.start(sock)
    reader, writer, client = await h2_client(hostport(*sock.getsockname()[:2]))
    try:
        client.send_headers(1, grpc_request_headers("/t.S/M"))
        client.send_headers(3, grpc_request_headers("/t.S/Boom"))
        writer.write(client.data_to_send())
        received: dict[int, bytes] = {}
        other: list[Any] = []
        await wait_for(lambda: calls, what="the first call")
        calls[0].send(b"still here")

        async def both() -> bool:
            await pump(reader, writer, client, received, other)
            ended = [e for e in other if isinstance(e, ResponseReceived | TrailersReceived) and e.stream_id == 3]
            return received.get(1) == b"still here" and any(
                (b"grpc-status", b"13") in e.headers for e in ended)

        await wait_for(both, what="INTERNAL on the failed call, data on the other")
        assert not any(isinstance(e, ConnectionTerminated) for e in other)
    finally:
        writer.close()
        server.stop("test over")
        sock.close()


def token_parts(token: str) -> tuple[bytes, bytes]:
    """(the version and check, the first broker's mark) of a real resume token: public, in every SSE `id:`.
    With them any position of that broker can be forged: the check names the brokers, not their positions."""
    raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    return raw[:5], raw[5:7]


def forged(head: bytes, positions: list[tuple[bytes, int]]) -> str:
    """A version 2 token: `head` (version and check), then (mark, seq) per broker."""
    raw = head + b"".join(mark + varint(seq) for mark, seq in positions)
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


async def subscribed_plane(start: Any, *proxy_args: str) -> tuple[Server, Server, EventSource]:
    """A broker, a proxy linked to it and a subscriber of topic t that got one event (and its id)."""
    broker = start("broker", "b0")
    proxy = start("proxy", "p0", "--brokers", broker.endpoints["grpc"], *proxy_args)
    http = proxy.endpoints["http"]
    honest = EventSource(lambda: http, "t").start()
    await wait_for(lambda: proxy_status_field(proxy, "subscribers", 1), what="the subscriber")
    await wait_for(lambda: links_ready(proxy.endpoints["control"], 1), what="the relay")
    await publish_grpc(broker.endpoints["grpc"], [("t", {"n": 0})])
    await wait_for(lambda: honest.events, what="the first event")
    return broker, proxy, honest


async def test_a_position_beyond_64_bits_gives_the_gap_signal_then_live_events(start: Any) -> None:
    broker, proxy, honest = await subscribed_plane(start)
    http = proxy.endpoints["http"]
    head, mark = token_parts(honest.last_id)
    clients = [EventSource(lambda: http, "t", token=forged(head, [(mark, seq)])).start()
               for seq in (1 << 64, 1 << 70, (1 << 64) + 5)]
    await wait_for(lambda: all(c.gaps for c in clients), what="the gap signal")
    await wait_for(lambda: proxy_status_field(proxy, "subscribers", 4), what="the forged clients live")
    await publish_grpc(broker.endpoints["grpc"], [("t", {"n": 1})])
    await wait_for(lambda: all({"meta": {"type": "t"}, "data": {"n": 1}} in c.events for c in clients),
                   what="live events after the gap")
    assert all(c.statuses == [200] and not c.connections for c in clients)  # one connection each, no retry loop
    assert all("64 bits" in c.gaps[0]["reason"] for c in clients), clients[0].gaps
    for client in [honest, *clients]:
        await client.close()
    assert '"level": "error"' not in proxy.log()


async def test_long_resume_ids_are_served_and_longer_requests_refused_quietly(start: Any) -> None:
    """A long id (511 brokers at positions 2**49 apart: 6820 characters; MAX_TOKEN_CHARS is 8192, 60 brokers
    need at most 967) resumes from the header and from the query (a gap: those brokers are unknown);
    longer headers and request lines get 400, with no traceback and few log lines."""
    broker, proxy, honest = await subscribed_plane(start)
    http = proxy.endpoints["http"]
    head, _ = token_parts(honest.last_id)
    sixty = forged(head, [(epoch_mark(epoch), MAX_SEQ) for epoch in range(1, 61)])  # 10-byte varints: the bound
    longest = forged(head, [(epoch_mark(epoch), 1 << 49) for epoch in range(1, 512)])
    assert len(sixty) == 967 and len(longest) == 6820 <= MAX_TOKEN_CHARS
    by_header = EventSource(lambda: http, "t", token=longest).start()
    by_query = EventSource(lambda: http, f"t&lastEventId={longest}").start()
    await wait_for(lambda: by_header.gaps and by_query.gaps, what="the gap signal for unknown brokers")
    assert by_header.statuses == by_query.statuses == [200]
    host, _, port = http.rpartition(":")
    started = time.monotonic()
    for request in (b"GET /?eventType=t HTTP/1.1\r\nHost: p\r\nLast-Event-ID: %s\r\n\r\n" % (b"A" * 20_000),
                    b"GET /?eventType=t&lastEventId=%s HTTP/1.1\r\nHost: p\r\n\r\n" % (b"A" * 20_000)):
        for _ in range(100):
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(request)
            assert (await asyncio.wait_for(reader.read(), 10)).startswith(b"HTTP/1.0 400 ")
            writer.close()
    took = time.monotonic() - started
    await publish_grpc(broker.endpoints["grpc"], [("t", {"n": 1})])  # still serving
    await wait_for(lambda: {"meta": {"type": "t"}, "data": {"n": 1}} in by_header.events, what="live events")
    for client in (honest, by_header, by_query):
        await client.close()
    log = proxy.log()
    refused = [line for line in log.splitlines() if "aiohttp" in line]
    assert "Traceback" not in log and '"level": "error"' not in log
    assert 1 <= len(refused) <= OUTSIDE_BURST + OUTSIDE_PER_SECOND * took + 1, len(refused)


def test_the_decoder_refuses_what_uint64_cannot_carry() -> None:
    tag = cluster_tag("c")
    head = b"\x02" + positions_check(tag, (7,))
    assert decode_token(forged(head, [(epoch_mark(7), MAX_SEQ)]), tag, [7]) == {7: MAX_SEQ}
    for seq in (MAX_SEQ + 1, 1 << 70):
        with pytest.raises(InvalidToken, match="beyond 64 bits"):
            decode_token(forged(head, [(epoch_mark(7), seq)]), tag, [7])


async def test_same_version_other_contents_and_unbounded_drain_rates_are_refused(start: Any) -> None:
    broker = start("broker", "b0")
    proxy = start("proxy", "p0")
    control = proxy.endpoints["control"]
    members = [("b0", broker.endpoints["grpc"])]
    assert (await apply_membership(control, 3, members)).accepted
    await wait_for(lambda: links_ready(control, 1), what="the link")
    again = await apply_membership(control, 3, members)  # the same again: idempotent
    assert again.accepted and again.applied_version == 3
    emptied = await apply_membership(control, 3, [])
    assert not emptied.accepted and "version 3 is applied with other contents" in emptied.reason
    assert len((await proxy_status(control)).links) == 1 and await links_ready(control, 1)
    async with grpc.aio.insecure_channel(control) as ch:
        stub = pb_grpc.ProxyControlStub(ch)
        for rate in (1e-300, 0.01, 1e7):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.Drain(pb.DrainRequest(reconnects_per_second=rate), timeout=5, metadata=AUTH)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "must be a positive number from 0.1 to 1e+06" in (refused.value.details() or "")
    status = await proxy_status(control)
    assert not status.draining and status.membership_version == 3
    assert (await apply_membership(control, 4, [])).accepted  # a newer version may empty it


class PeakRss:
    """The peak RSS of a process while within (sampled every 10 ms on a thread)."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.01)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


async def raw_publish(http: str, head: bytes, chunks: Iterator[bytes]) -> tuple[bytes, int]:
    """Send `head`, then `chunks` until the broker answers; (its status line, bytes of body sent)."""
    host, _, port = http.rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    answer = asyncio.ensure_future(reader.readline())
    sent = 0
    try:
        writer.write(head)
        for chunk in chunks:
            if answer.done():
                break
            writer.write(chunk)
            sent += len(chunk)
            with contextlib.suppress(ConnectionError):
                await writer.drain()
        return await asyncio.wait_for(answer, 30), sent
    finally:
        writer.close()


async def test_oversize_publishes_are_refused_as_they_stream_in(start: Any) -> None:
    """Without publisher keys (the default): a 100 MiB chunked body is refused once it passes the limit
    (not read to its end), a 100 MiB Content-Length at once, 16 MiB of tiny events (HTTP and gRPC) before
    they are parsed; the broker's RSS stays within 64 MiB of its idle figure, and it goes on serving."""
    broker = start("broker", "b0")
    http = broker.endpoints["http"]
    head = b"POST /publish HTTP/1.1\r\nHost: b\r\nContent-Type: application/json\r\n"
    chunk = b"[" + b"1," * (MIB // 2 - 1) + b"1"
    tiny = b'{"meta":{"type":"t"},"data":1}'
    events = b"[" + b",".join([tiny] * ((16 * MIB - 4096) // (len(tiny) + 1))) + b"]"
    idle = psutil.Process(broker.proc.pid).memory_info().rss
    with PeakRss(broker.proc.pid) as rss:
        status, sent = await raw_publish(http, head + b"Transfer-Encoding: chunked\r\n\r\n",
                                         (b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(100)))
        assert status.startswith(b"HTTP/1.1 413 ") and sent < 64 * MIB, (status, sent)
        status, sent = await raw_publish(http, head + b"Content-Length: %d\r\n\r\n" % (100 * MIB), iter([chunk]))
        assert status.startswith(b"HTTP/1.1 413 ")
        code, answer = await publish_http(http, events)
        assert code == 413 and "JSON values" in answer["error"], answer
        async with grpc.aio.insecure_channel(broker.endpoints["grpc"]) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await pb_grpc.BrokerStub(ch).Publish(pb.PublishRequest(
                    events=[pb.Event(topic="t", data=b"1")] * ((16 * MIB - 4096) // 8)), timeout=30)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "more than 10000 events" in (refused.value.details() or "")
    assert rss.peak - idle < 64 * MIB, f"peak RSS {(rss.peak - idle) / MIB:.0f} MiB over idle"
    assert await publish_grpc(broker.endpoints["grpc"], [("t", {"still": "serving"})]) == 1


async def resumable_plane(start: Any, *proxy_args: str) -> tuple[Server, Server, str]:
    """A broker and a proxy, a subscriber's id after one event on topic t, and 2000 events it then missed."""
    broker, proxy, first = await subscribed_plane(start, *proxy_args)
    await first.close()
    for k in range(1, 2001, 500):
        await publish_grpc(broker.endpoints["grpc"], [("t", {"n": n}) for n in range(k, k + 500)])
    return broker, proxy, first.last_id


async def test_resumes_from_one_position_share_one_replay(start: Any) -> None:
    """50 browsers resuming from the same id at once (a proxy died): each gets the 2000 missed events
    exactly once, with no gap, and the broker serves far fewer than 50 Replay calls."""
    broker, proxy, token = await resumable_plane(start)
    before = await metric(broker, "neoplasma_broker_replays_total")
    clients = [EventSource(lambda: proxy.endpoints["http"], "t", token=token).start() for _ in range(50)]
    await wait_for(lambda: all(len(c.events) >= 2000 for c in clients), timeout=30, what="every missed event")
    for client in clients:
        assert [e["data"]["n"] for e in client.events] == list(range(1, 2001)) and not client.gaps
        await client.close()
    assert await metric(broker, "neoplasma_broker_replays_total") - before <= 10


async def test_a_resume_set_up_later_shares_the_replay_while_live_events_of_other_topics_flow(start: Any) -> None:
    """Resumes of one position set up one after the other (admitted a slice at a time under a burst), while live
    events of another topic move the proxy's position past the first replay's head: the later one still shares
    the first one's Replay call (nothing of it was let go, and nothing of its topics came since); one that an
    event of its topics came before gets that event exactly once, from a replay of its own."""
    broker, proxy, token = await resumable_plane(start, "--catch-up-bytes-per-second", "4000")
    http = proxy.endpoints["http"]
    other = EventSource(lambda: http, "u").start()  # (a new topic: it catches up too, with a Replay call)
    await wait_for(lambda: proxy_status_field(proxy, "subscribers", 1), what="the subscriber of u")
    await publish_grpc(broker.endpoints["grpc"], [("u", {"n": "ready"})])
    await wait_for(lambda: other.events, what="a live event of u")
    before = await metric(broker, "neoplasma_broker_replays_total")
    first = EventSource(lambda: http, "t", token=token).start()  # caught up at 4 kB/s: seconds
    await wait_for(lambda: first.events, what="the first resume's catch-up")
    await publish_grpc(broker.endpoints["grpc"], [("u", {"n": "live"})])
    await wait_for(lambda: len(other.events) == 2, what="the event of u")  # the proxy is past the replay's head
    second = EventSource(lambda: http, "t", token=token).start()
    await wait_for(lambda: second.events, what="the second resume's catch-up")
    received = (await proxy_status(proxy.endpoints["control"])).events_received
    await publish_grpc(broker.endpoints["grpc"], [("t", {"n": 2001})])
    # The event of t is at the proxy before the third resume comes (else it may share the first's Replay too).
    await wait_for(lambda: proxy_received_more(proxy, received), what="the event of t at the proxy")
    third = EventSource(lambda: http, "t", token=token).start()
    clients = [first, second, third]
    await wait_for(lambda: all(len(c.events) >= 2001 for c in clients), timeout=60, what="every missed event")
    for client in clients:
        assert [e["data"]["n"] for e in client.events] == list(range(1, 2002)) and not client.gaps
    assert await metric(broker, "neoplasma_broker_replays_total") - before == 2
    for client in (*clients, other):
        await client.close()


async def test_a_position_in_the_future_is_a_gap_at_once_then_live(start: Any) -> None:
    broker, proxy, token = await resumable_plane(start)
    head, mark = token_parts(token)
    started = time.monotonic()
    client = EventSource(lambda: proxy.endpoints["http"], "t", token=forged(head, [(mark, 10**12)])).start()
    await wait_for(lambda: client.gaps, what="the gap signal")
    assert time.monotonic() - started < 3 and "has not reached this position" in client.gaps[0]["reason"]
    await wait_for(lambda: proxy_status_field(proxy, "subscribers", 1), what="live")
    await publish_grpc(broker.endpoints["grpc"], [("t", {"n": "live"})])
    await wait_for(lambda: client.events, what="a live event")
    assert [e["data"]["n"] for e in client.events] == ["live"]
    await client.close()


async def test_a_resume_over_the_held_events_budget_is_a_gap_then_live(start: Any) -> None:
    """Live events arriving while a subscriber catches up are held for it, within a budget (here 1 event):
    over it, the subscriber is told (the gap signal) and resumes from now, never dropped as slow."""
    broker, proxy, token = await resumable_plane(start, "--max-held-events-per-resume", "1")
    publishing = True

    async def publish() -> None:  # batches of 5: any batch that reaches the holder is over its budget
        k = 0
        async with grpc.aio.insecure_channel(broker.endpoints["grpc"]) as ch:
            stub = pb_grpc.BrokerStub(ch)
            while publishing:
                await stub.Publish(pb.PublishRequest(events=[
                    pb.Event(topic="t", data=b'{"live":%d}' % (k + i)) for i in range(5)]), timeout=5)
                k += 5

    publisher = asyncio.create_task(publish())
    try:
        client = EventSource(lambda: proxy.endpoints["http"], "t", token=token).start()
        await wait_for(lambda: client.gaps, what="the gap signal")
        assert client.gaps[0]["reason"] == OVER_BUDGET
        await wait_for(lambda: sum("live" in e["data"] for e in client.events) > 10, what="live events after it")
    finally:
        publishing = False
        await publisher
    live = [e["data"]["live"] for e in client.events if "live" in e["data"]]
    assert live == sorted(set(live)) and client.statuses == [200] and not client.connections
    await client.close()


async def test_a_proxys_interest_is_bounded_and_given_back(start: Any) -> None:
    """--max-topics bounds the distinct topics all of a proxy's subscribers want (what it asks every broker
    for), over SSE and gRPC; the room comes back when subscribers leave."""
    broker = start("broker", "b0")
    proxy = start("proxy", "p0", "--brokers", broker.endpoints["grpc"], "--max-topics", "2500")
    http, control = proxy.endpoints["http"], proxy.endpoints["control"]
    first = await SseClient(http, ",".join(f"a{n}" for n in range(1000))).start()
    second = await SseClient(http, ",".join(f"b{n}" for n in range(1000))).start()
    await wait_for(lambda: proxy_status_field(proxy, "topics", 2000), what="2000 topics")
    third = await SseClient(http, ",".join(f"c{n}" for n in range(1000))).start()
    assert third.status == 413 and "want 2000 topics; 1000 more would pass its limit of 2500" in third.body
    shared = await SseClient(http, ",".join(f"a{n}" for n in range(1000))).start()  # nothing new: room enough
    assert shared.status == 200
    reader, writer, client = await h2_client(proxy.endpoints["grpc"])
    stream_id, received, other = await plasma_stream(reader, writer, client, "x")
    request = stream_pb2.Request(Events=[stream_pb2.EventType(type=f"d{n}") for n in range(600)])
    client.send_data(stream_id, grpc_frame(request.SerializeToString()))
    writer.write(client.data_to_send())

    async def refused() -> bool:
        await pump(reader, writer, client, received, other)
        return any(isinstance(e, TrailersReceived | ResponseReceived) and (b"grpc-status", b"8") in e.headers
                   for e in other)

    await wait_for(refused, what="RESOURCE_EXHAUSTED for the plasma stream")
    writer.close()
    for sub in (first, second, shared, third):
        await sub.close()
    await wait_for(lambda: proxy_status_field(proxy, "topics", 0), what="the interest given back")
    again = await SseClient(http, ",".join(f"c{n}" for n in range(1000))).start()
    assert again.status == 200
    await again.close()
    assert (await proxy_status(control)).membership_version == 0


def test_the_outside_line_budget_allows_bursts_then_a_steady_rate_and_counts_what_it_left_out() -> None:
    now = [0.0]
    budget = LineBudget(per_second=5.0, burst=20, clock=lambda: now[0])
    assert [budget.take() for _ in range(20)] == [0] * 20
    assert [budget.take() for _ in range(100)] == [None] * 100  # whatever is sent, no more lines now
    now[0] += 1.0
    assert budget.take() == 100 and [budget.take() for _ in range(4)] == [0] * 4 and budget.take() is None


async def test_catch_up_steps_take_turns_behind_the_loops_other_work() -> None:
    """300 resumes' catch-up, 1 ms of work per step, all ready at once: a timer beside them (the dispatcher,
    a relay read) runs within a few steps, not after all 300 (which a loop running every ready step in one
    pass would do: 300 ms); and each step comes in arrival order, one per pass. Counted in steps between the
    timer's runs, not in seconds, so that a busy machine pausing the process does not change the answer."""
    turns = Turns(slice=0.002)
    between: list[int] = []  # catch-up steps run between two runs of the timer
    order: list[int] = []

    def work(seconds: float) -> None:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            pass

    async def catch_up(n: int) -> None:
        for _ in range(3):
            await turns.turn()
            order.append(n)
            work(0.001)

    async def timer() -> None:
        while len(order) < 900:
            seen = len(order)
            await asyncio.sleep(0.005)
            between.append(len(order) - seen)

    ticking = asyncio.create_task(timer())
    await asyncio.gather(*(catch_up(n) for n in range(300)))
    await ticking
    assert len(between) > 20 and max(between) < 50, f"up to {max(between)} steps ran between two runs of the timer"
    assert order[:300] == list(range(300))  # one step each before anyone's second


async def test_a_step_let_through_is_not_overtaken_by_one_that_finds_the_slice_unused() -> None:
    """A step let through (a new slice begun for it) runs before one that comes in the meantime, in the pass in
    which it was let through, and finds that slice unused: that one used to run first and take the slice, the one
    let through running after it all the same (two slices' work in a row: a broker's replay walks coming back from
    their pacing, say); each step uses up a slice here."""
    now = [0.0]
    turns = Turns(slice=0.002, clock=lambda: now[0])
    order: list[str] = []

    async def step(name: str) -> None:
        await turns.turn()
        order.append(name)
        now[0] += 0.002  # it used up its slice

    first = asyncio.create_task(step("first"))
    await asyncio.sleep(0)  # it waits for its turn, let through in the next pass
    assert turns.waiting == 1
    later = asyncio.create_task(step("later"))  # comes in that pass, after it was let through
    await asyncio.gather(first, later)
    assert order == ["first", "later"]


async def test_a_step_that_cannot_wait_takes_a_slice_at_most_once_per_pass() -> None:
    """`Turns.take` (a callback's step): at once while the slice lasts; a new slice once its pass of the loop is
    over, not within it; never while someone waits for a turn."""
    now = [0.0]
    turns = Turns(slice=0.002, clock=lambda: now[0])
    assert turns.take() and turns.take()  # a slice begun for the first; the second within it
    now[0] += 0.002
    assert not turns.take()  # used up, in the pass that began it
    await asyncio.sleep(0)
    assert turns.take()  # a pass later: a new slice
    now[0] += 0.002
    waiter = asyncio.create_task(turns.turn())
    await asyncio.sleep(0)
    assert turns.waiting == 1 and not turns.take()
    await waiter


async def test_a_burst_of_plain_subscribes_on_the_fast_path_is_served_a_slice_per_pass() -> None:
    """Plain subscribes read in one pass of the loop (a thousand connections arriving at once) are served at once
    for a slice's worth; the rest wait for turns, in arrival order, behind the loop's other work (they were all
    served in that pass, holding honest subscribers' events for tens of milliseconds). Resuming requests wait
    while turns contend, as before; other paths are never deferred."""
    now = [0.0]
    budget = ResumeBudget()
    budget.turns = Turns(slice=0.002, clock=lambda: now[0])
    budget.admissions = InTurns(budget.turns)
    defer = sse_deferral(cast(Any, SimpleNamespace(resumes=budget)))
    served: list[int] = []

    class Conn:
        def __init__(self, n: int) -> None:
            self.n = n

        def offer(self, head: Head) -> None:
            served.append(self.n)
            now[0] += 0.001  # each set-up: a millisecond

    def head(target: str, resume: str = "") -> Head:
        found = parse_head(f"GET {target} HTTP/1.1\r\nHost: p".encode() + (
            f"\r\nLast-Event-ID: {resume}".encode() if resume else b""), 8192, 8192)
        assert found is not None
        return found

    deferred = []
    for n in range(10):
        conn = Conn(n)
        if defer(head("/?eventType=a"), cast(FastPath, conn)):
            deferred.append(n)
        else:
            conn.offer(head("/?eventType=a"))
    assert served == [0, 1] and deferred == list(range(2, 10))  # a slice's worth (2 ms) at once
    assert not defer(head("/metrics"), cast(FastPath, Conn(99)))  # not a subscribe: never deferred
    assert defer(head("/?eventType=a", "AQ"), cast(FastPath, Conn(100)))  # a resume waits behind them
    await wait_for(lambda: len(served) == 11, what="the deferred subscribes served in turns")
    assert served == [*range(10), 100]


async def test_calls_in_turns_run_in_order_a_slice_at_a_time_behind_the_loops_other_work() -> None:
    """300 set-ups of resuming subscribers pushed at once (1 ms each, 300 ms in all) run in arrival order, a slice's
    worth per turn: a timer beside them runs within a few slices, not after all of them; one that fails goes to the
    loop's exception handler and the next ones still run."""
    turns = Turns(slice=0.002)
    calls = InTurns(turns)
    loop = asyncio.get_running_loop()
    late: list[float] = []
    order: list[int] = []
    failed: list[BaseException] = []
    loop.set_exception_handler(lambda _, context: failed.append(context["exception"]))

    def set_up(n: int) -> None:
        order.append(n)
        end = time.perf_counter() + 0.001
        while time.perf_counter() < end:
            pass
        if n == 7:
            raise RuntimeError("seven")

    async def timer() -> None:
        while len(order) < 300:
            due = loop.time() + 0.005
            await asyncio.sleep(0.005)
            late.append(loop.time() - due)

    assert calls.busy()  # no slice running: a call waits for a turn
    ticking = asyncio.create_task(timer())
    for n in range(300):
        calls.push(functools.partial(set_up, n))
    await asyncio.wait_for(ticking, 30)
    loop.set_exception_handler(None)
    assert order == list(range(300)) and len(calls) == 0
    assert [str(e) for e in failed] == ["seven"]
    assert len(late) > 20 and max(late) < 0.1, f"the timer ran up to {max(late):.3f} s late"


async def test_a_proxys_memory_comes_back_after_a_large_interest_leaves(start: Any) -> None:
    """200 SSE subscriptions of 1000 topics each (200,000 topics) take a proxy's memory up; once they close
    (and a heartbeat passed), much of it is back: the index keeps no set per single-holder topic and the
    proxy gives freed heap back to the system (it kept ~92 % of it before, ~45-70 % now: what stays is Python's
    small-object arenas, each held by a few live objects)."""
    broker = start("broker", "b0")
    proxy = start("proxy", "p0", "--brokers", broker.endpoints["grpc"], "--heartbeat", "1", "--max-topics", "250000")
    http, control = proxy.endpoints["http"], proxy.endpoints["control"]
    await wait_for(lambda: links_ready(control, 1), what="the relay")
    process = psutil.Process(proxy.proc.pid)
    before = process.memory_info().rss
    clients = []
    for k in range(200):
        clients.append(await SseClient(http, ",".join(f"{k:x}.{n:x}" for n in range(1000))).start())
    await wait_for(lambda: proxy_status_field(proxy, "topics", 200_000), timeout=60, what="200,000 topics")
    during = process.memory_info().rss
    for client in clients:
        await client.close()
    await wait_for(lambda: proxy_status_field(proxy, "topics", 0), timeout=30, what="the interest given back")
    await wait_for(lambda: re.search(r'"memory_given_back".*"topics": 0,', proxy.log()), timeout=10,
                   what="memory given back at a heartbeat")
    after = process.memory_info().rss
    assert during - before > 15 * MIB, "the subscriptions took too little memory to tell"
    assert after - before < 0.8 * (during - before), (
        f"RSS MB before {before / MIB:.0f}, during {during / MIB:.0f}, after {after / MIB:.0f}")
