"""Hostile input against a real broker with a real subscriber behind a real proxy.

Each case is refused whole with a clear message, delivers nothing (not even the good events
before the bad one), and leaves the servers serving: an event published right after it is the
first and only one the subscriber sees, and the proxy keeps its membership. The guarded plane
checks credentials, publisher keys and tight limits.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import aiohttp
import grpc
import pytest
from harness import (
    AUTH,
    Server,
    links_ready,
    proxy_status,
    publish_grpc,
    publish_http,
    sse,
    start_server,
    wait_for,
)

from neoplasma.core.trust import bearer_metadata
from neoplasma.plasma.v1 import stream_pb2
from neoplasma.wire.v1 import neoplasma_pb2 as pb
from neoplasma.wire.v1 import neoplasma_pb2_grpc as pb_grpc

GOOD = b'{"meta": {"type": "t"}, "data": {"good": true}}'
_marks = itertools.count()


def batch(data: bytes, topic: bytes = b'"t"') -> bytes:
    """An HTTP batch: a good event for the subscriber first, then the bad one."""
    return b"[" + GOOD + b', {"meta": {"type": ' + topic + b'}, "data": ' + data + b"}]"


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Server]]:
    """One broker and one proxy linked to it, shared by the cases (each checks they still serve)."""
    log_dir: Path = tmp_path_factory.mktemp("hostile")
    broker = start_server("broker", "b0", log_dir)
    proxy = start_server("proxy", "p0", log_dir, "--brokers", broker.endpoints["grpc"])
    yield broker, proxy
    for server in (proxy, broker):
        server.stop()


async def refused_and_nothing_delivered(plane: tuple[Server, Server],
                                        attack: Callable[[Server], Awaitable[tuple[object, str]]],
                                        status: object, message: str, key: str = "") -> None:
    broker, proxy = plane
    async with sse(proxy.endpoints["http"], "t") as client:
        await wait_for(lambda: links_ready(proxy.endpoints["control"], 1), what="the relay link")
        before = {"mark": next(_marks)}  # proves the path works before the hostile request
        assert await publish_grpc(broker.endpoints["grpc"], [("t", before)], key) == 1
        await wait_for(lambda: client.events, what="the event before")
        membership = await proxy_status(proxy.endpoints["control"])

        got_status, got_message = await attack(broker)
        assert (got_status, message in got_message) == (status, True), got_message

        after = {"mark": next(_marks)}
        assert await publish_grpc(broker.endpoints["grpc"], [("t", after)], key) == 1
        await wait_for(lambda: len(client.events) > 1, what="the event after")
        assert [e["data"] for e in client.events] == [before, after]
    now = await proxy_status(proxy.endpoints["control"])  # the proxy kept its membership and serves
    def kept(status: pb.ProxyStatus) -> object:
        return status.membership_version, [(k.name, k.address, k.member_state) for k in status.links], status.draining
    assert kept(now) == kept(membership) and not now.draining
    async with aiohttp.ClientSession() as session:
        for server in plane:
            async with session.get(f"http://{server.endpoints['http']}/healthz") as resp:
                assert resp.status == 200
    assert broker.proc.poll() is None and proxy.proc.poll() is None


@pytest.mark.parametrize("body, message", [
    (batch(nested(100_000)), "body nests too deeply; event data may nest at most 128 levels"),
    (batch(nested(500)), "event 1: data nests 500 levels deep; the limit is 128"),
    (batch(nested(129)), "event 1: data nests 129 levels deep; the limit is 128"),
    (batch(b"1", topic=b'"\\ud800"'), "event 1: meta.type: topic '\\ud800' contains the unpaired surrogate"),
    # Below the subscriber's topic: it used to be routed, and fail after the good event was queued.
    (batch(b"1", topic=b'"t:\\ud800"'), "event 1: meta.type: topic 't:\\ud800' contains the unpaired surrogate"),
    (batch(b'"\\udc00"'), "event 1: data contains the unpaired surrogate '\\udc00'; strings must be valid Unicode"),
    (batch(b'{"\\ud83d": "key"}'), "event 1: data contains the unpaired surrogate '\\ud83d'"),
    (batch(b'"\xed\xa0\x80"'), "event 1: data contains the unpaired surrogate '\\ud800'"),
    (batch(b"[1e400]"), "event 1: data holds a number beyond the range of a double"),
], ids=lambda value: value[:40] if isinstance(value, str) else "input")
async def test_http_publish(plane: tuple[Server, Server], body: bytes, message: str) -> None:
    async def publish(broker: Server) -> tuple[object, str]:
        status, reply = await publish_http(broker.endpoints["http"], body)
        assert reply["error"].startswith("nothing published: ")
        return status, reply["error"]
    await refused_and_nothing_delivered(plane, publish, 400, message)


@pytest.mark.parametrize("data, message", [
    (nested(100_000), "data nests too deeply; event data may nest at most 128 levels"),
    (nested(129), "data nests 129 levels deep; the limit is 128"),
    (b'"\\ud800"', "data contains the unpaired surrogate '\\ud800'; strings must be valid Unicode"),
    (b'{"a": ["\\uDFFF"]}', "data contains the unpaired surrogate '\\udfff'"),
], ids=lambda value: value[:40] if isinstance(value, str) else "input")
async def test_grpc_publish(plane: tuple[Server, Server], data: bytes, message: str) -> None:
    async def publish(broker: Server) -> tuple[object, str]:
        request = pb.PublishRequest(events=[pb.Event(topic="t", data=b'{"good":true}'), pb.Event(topic="t", data=data)])
        async with grpc.aio.insecure_channel(broker.endpoints["grpc"]) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await pb_grpc.BrokerStub(ch).Publish(request, timeout=10)
        assert (refused.value.details() or "").startswith("nothing published: ")
        return refused.value.code(), refused.value.details() or ""
    await refused_and_nothing_delivered(plane, publish, grpc.StatusCode.INVALID_ARGUMENT, message)


# -- the guarded plane: credential, publisher keys, tight limits ---------------------------

KEY = "publisher-key-1"
WRONG = bearer_metadata("not-the-credential")
CONTROL, BROKER = "/neoplasma.v1.ProxyControl/", "/neoplasma.v1.Broker/"
Attack = Callable[[Server, Server], Awaitable[tuple[object, str]]]


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Server]]:
    log_dir: Path = tmp_path_factory.mktemp("guarded")
    keys = log_dir / "keys"
    keys.write_text(f"# publisher keys, one per line\n{KEY}\n\nanother-key\n")
    broker = start_server("broker", "gb0", log_dir, "--publish-keys-file", str(keys), "--max-events-per-request", "3",
                          "--max-interest-topics", "4", "--header-timeout", "1")
    proxy = start_server("proxy", "gp0", log_dir, "--brokers", broker.endpoints["grpc"],
                         "--max-topics-per-subscription", "3", "--max-subscription-changes", "2",
                         "--header-timeout", "1")
    yield broker, proxy
    for server in (proxy, broker):
        server.stop()


def endpoint(server: Server, method: str) -> str:
    return server.endpoints["control" if method.startswith(CONTROL) else "grpc"]


async def unary(server: Server, method: str, request: bytes, metadata: object = ()) -> tuple[object, str]:
    async with grpc.aio.insecure_channel(endpoint(server, method)) as ch:
        try:
            await ch.unary_unary(method)(request, metadata=metadata, timeout=5)
        except grpc.aio.AioRpcError as exc:
            return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


async def stream(server: Server, method: str, messages: list[bytes], metadata: object = ()) -> tuple[object, str]:
    """Write `messages` on a stream (Relay, plasma Events, Replay) and read it to its end."""
    async with grpc.aio.insecure_channel(endpoint(server, method)) as ch:
        call = (ch.unary_stream(method)(messages[0], metadata=metadata, timeout=5) if method.endswith("Replay")
                else ch.stream_stream(method)(metadata=metadata, timeout=5))
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
            if not method.endswith("Replay"):
                for message in messages:
                    await call.write(message)
            async for _ in call:
                pass
        return await call.code(), await call.details() or ""


async def http(server: Server, request: bytes) -> tuple[object, str]:
    """A raw HTTP request; the status and body of the answer."""
    host, _, port = server.endpoints["http"].rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(request)
    answer = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode(errors="replace")


async def slow_headers(server: Server) -> tuple[object, str]:
    """Headers at one byte a second: the server must close the connection within its timeout (1 s)."""
    host, _, port = server.endpoints["http"].rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    started = time.monotonic()
    with contextlib.suppress(ConnectionError):
        for byte in b"GET /healthz HTTP/1.1\r\nHost: x\r\n":
            writer.write(bytes([byte]))
            await writer.drain()
            with contextlib.suppress(TimeoutError):
                if await asyncio.wait_for(reader.read(1), 1.0) == b"":
                    break
    writer.close()
    took = time.monotonic() - started
    return ("closed" if took < 2.5 else "open"), f"after {took:.1f} s"


def bad_utf8_event() -> bytes:
    return b"\x0a\x06" + b"\x0a\x01\xff\x12\x01\x31"  # PublishRequest{events: [Event{topic: "\xff", data: "1"}]}


def membership(address: str) -> bytes:
    return pb.Membership(version=99, brokers=[pb.BrokerMember(name="evil", address=address, state="SERVING")]
                         ).SerializeToString()


def interest(topics: int) -> bytes:
    return pb.Interest(add=[f"i{n}" for n in range(topics)], replace=True).SerializeToString()


def events(n: int) -> bytes:
    return pb.PublishRequest(events=[pb.Event(topic="t", data=b"1")] * n).SerializeToString()


def plasma(*topics: str) -> bytes:
    return stream_pb2.Request(Events=[stream_pb2.EventType(type=t) for t in topics]).SerializeToString()


UNAUTH, INVALID, EXHAUSTED = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.INVALID_ARGUMENT,
                              grpc.StatusCode.RESOURCE_EXHAUSTED)
NEED = "the cluster credential is required"
CASES: list[tuple[str, Attack, object, str]] = [
    ("apply without credential", lambda b, p: unary(p, CONTROL + "Apply", membership("127.0.0.1:1")), UNAUTH, NEED),
    ("apply, wrong credential", lambda b, p: unary(p, CONTROL + "Apply", membership("127.0.0.1:1"), WRONG),
     UNAUTH, NEED),
    ("drain without credential", lambda b, p: unary(p, CONTROL + "Drain", b""), UNAUTH, NEED),
    ("status, wrong credential", lambda b, p: unary(p, CONTROL + "Status", b"", WRONG), UNAUTH, NEED),
    ("stats without credential", lambda b, p: unary(b, BROKER + "Stats", b""), UNAUTH, NEED),
    # Refused as they open, before any message (writing one would race the refusal in the client).
    ("relay without credential", lambda b, p: stream(b, BROKER + "Relay", []), UNAUTH, NEED),
    ("relay, wrong credential", lambda b, p: stream(b, BROKER + "Relay", [], WRONG), UNAUTH, NEED),
    ("replay without credential", lambda b, p: stream(b, BROKER + "Replay", [b""]), UNAUTH, NEED),
    ("apply stream without credential", lambda b, p: stream(p, CONTROL + "ApplyStream", []), UNAUTH, NEED),
    ("apply stream, wrong credential", lambda b, p: stream(p, CONTROL + "ApplyStream", [], WRONG), UNAUTH, NEED),
    ("resolve without credential", lambda b, p: unary(b, BROKER + "Resolve", pb.ResolveRequest(
        pointer="PPPPPPPP").SerializeToString()), UNAUTH, NEED),
    ("resolve, wrong credential", lambda b, p: unary(b, BROKER + "Resolve", b"", WRONG), UNAUTH, NEED),
    ("resolve, not a pointer", lambda b, p: unary(b, BROKER + "Resolve", pb.ResolveRequest(
        pointer="x" * 100).SerializeToString(), AUTH), INVALID, "resolve refused: the resume token is neither a token"),
    ("publish without key", lambda b, p: unary(b, BROKER + "Publish", events(1)), UNAUTH,
     "a publisher key is required"),
    ("publish, wrong key", lambda b, p: unary(b, BROKER + "Publish", events(1), bearer_metadata("nope")),
     UNAUTH, "a publisher key is required"),
    ("http publish without key", lambda b, p: http_publish(b, ""), 401, "a publisher key is required"),
    ("http publish, wrong key", lambda b, p: http_publish(b, "nope"), 401, "a publisher key is required"),
    ("http publish as a form", lambda b, p: http_publish(b, KEY, "application/x-www-form-urlencoded"), 415,
     "the body must be JSON (Content-Type: application/json), not application/x-www-form-urlencoded"),
    ("http publish as text", lambda b, p: http_publish(b, KEY, "text/plain"), 415, "not text/plain"),
    ("http publish, too many events", lambda b, p: http_publish(b, KEY, events=4), 413,
     "the request holds 4 events; the limit is 3"),
    ("publish, too many events", lambda b, p: unary(b, BROKER + "Publish", events(4), bearer_metadata(KEY)),
     EXHAUSTED, "the request holds more than 3 events"),
    ("publish, invalid UTF-8", lambda b, p: unary(b, BROKER + "Publish", bad_utf8_event(), bearer_metadata(KEY)),
     INVALID, "Publish: the request cannot be decoded"),
    ("relay interest too large", lambda b, p: stream(b, BROKER + "Relay", [interest(5)], AUTH), EXHAUSTED,
     "interest refused: 5 topics in one Interest message; the limit is 4"),
    ("relay interest grows too large", lambda b, p: stream(b, BROKER + "Relay", [interest(3), pb.Interest(
        add=["x", "y"]).SerializeToString()], AUTH), EXHAUSTED, "the relay stream would ask for 5 topics; "
     "the limit is 4"),
    ("relay interest, invalid UTF-8", lambda b, p: stream(b, BROKER + "Relay", [b"\x0a\x01\xff"], AUTH),
     INVALID, "Relay: the request cannot be decoded"),
    ("apply, invalid UTF-8", lambda b, p: unary(p, CONTROL + "Apply", b"\x08\x63\x1a\x01\xff", AUTH), INVALID,
     "Apply: the request cannot be decoded"),
    ("apply stream, invalid UTF-8", lambda b, p: stream(p, CONTROL + "ApplyStream", [b"\x08\x63\x1a\x01\xff"], AUTH),
     INVALID, "ApplyStream: the request cannot be decoded"),
    *[(f"drain at {rate}", lambda b, p, rate=rate: unary(
        p, CONTROL + "Drain", pb.DrainRequest(reconnects_per_second=rate).SerializeToString(), AUTH), INVALID,
       "reconnects_per_second must be a positive number") for rate in (-1.0, math.nan, math.inf)],
    ("plasma, invalid UTF-8", lambda b, p: stream(p, "/proto.StreamService/Events", [b"\x0a\x03\x0a\x01\xff"]),
     INVALID, "Events: the request cannot be decoded"),
    ("plasma, too many topics", lambda b, p: stream(p, "/proto.StreamService/Events", [plasma("a", "b", "c", "d")]),
     EXHAUSTED, "4 topics in one subscription; the limit is 3"),
    ("plasma, too many changes", lambda b, p: stream(p, "/proto.StreamService/Events", [plasma("a")] * 3),
     EXHAUSTED, "more than 2 subscription changes in a second"),
    ("native, too many topics", lambda b, p: stream(p, "/neoplasma.v1.Subscriber/Subscribe", [
        pb.SubscribeRequest(topics=["a", "b", "c", "d"]).SerializeToString()]), EXHAUSTED, "the limit is 3"),
    ("sse, too many topics", lambda b, p: http(p, b"GET /?eventType=a,b,c,d HTTP/1.1\r\nHost: x\r\n"
                                              b"Connection: close\r\n\r\n"), 413, "the limit is 3"),
    ("sse over HTTP/1.0", lambda b, p: http(p, b"GET /?eventType=t HTTP/1.0\r\n\r\n"), 426,
     "server-sent events need HTTP/1.1"),
    ("slow headers at the broker", lambda b, p: slow_headers(b), "closed", "after"),
    ("slow headers at the proxy", lambda b, p: slow_headers(p), "closed", "after"),
]


async def http_publish(broker: Server, key: str, content_type: str = "application/json",
                       events: int = 1) -> tuple[object, str]:
    body = [{"meta": {"type": "t"}, "data": {"bad": True}}] * events
    status, reply = await publish_http(broker.endpoints["http"], body, key, content_type)
    return status, reply["error"]


@pytest.mark.parametrize("attack, status, message", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
async def test_guarded(guarded: tuple[Server, Server], attack: Attack, status: object, message: str) -> None:
    await refused_and_nothing_delivered(guarded, lambda broker: attack(*guarded), status, message, KEY)
