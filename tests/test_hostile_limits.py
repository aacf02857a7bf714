"""Memory and protocol limits that hold against real processes whatever a client sends (issue 20).

Each test drives a real broker or proxy on 127.0.0.1 and checks what it holds or answers.
"""

from __future__ import annotations

import asyncio
import re
import socket
import time
from typing import Any

import aiohttp
import psutil
from h2.connection import H2Connection
from h2.events import ConnectionTerminated, DataReceived, ResponseReceived, TrailersReceived

from neoplasma.core.events import grpc_frame
from neoplasma.core.net import hostport
from neoplasma.local.harness import (
    Server,
    grpc_request_headers,
    h2_client,
    links_ready,
    proxy_status,
    publish_grpc,
    wait_for,
)
from neoplasma.plasma.v1 import stream_pb2
from neoplasma.proxy.h2server import Call, GrpcServer

MIB = 1 << 20


async def metric(server: Server, name: str) -> float:
    async with aiohttp.ClientSession() as session, session.get(f"http://{server.endpoints['http']}/metrics") as resp:
        text = await resp.text()
    found = re.search(rf"^{name} (\S+)$", text, re.M)
    assert found, f"no {name} in the metrics"
    return float(found.group(1))


async def proxy_status_field(proxy: Server, field: str, value: int) -> bool:
    return bool(getattr(await proxy_status(proxy.endpoints["control"]), field) == value)


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
