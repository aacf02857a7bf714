"""The SSE port's fast path (neoplasma.proxy.fastpath): which requests it reads itself, that it hands
everything else to aiohttp with every byte, and that the proxy's answers are the same with it as
with aiohttp alone."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

import pytest
from harness import wait_for
from prometheus_client import CollectorRegistry

from neoplasma.core.net import bind_socket
from neoplasma.proxy.auth import mint
from neoplasma.proxy.fastpath import FastPath, Head, handed_decision, parse_head
from neoplasma.proxy.hub import SseSubscriber
from neoplasma.proxy.server import ProxyService, http_app, sse_port
from neoplasma.proxy.settings import ProxyConfig


def head(text: str, max_line: int = 200, max_field: int = 200) -> Head | None:
    return parse_head(text.replace("\n", "\r\n").encode("latin-1"), max_line, max_field)


def test_a_plain_subscribe_is_read() -> None:
    got = head("GET /events?eventType=a,b&lastEventId=x-_1&eventType=c&&flag HTTP/1.1\n"
               "Host: p\nAUTHORIZATION:  Bearer a.b.c \nConnection: Keep-Alive\nCookie: neoplasma_token=t; x=1")
    assert got is not None
    assert (got.path, got.target) == ("/events", "/events?eventType=a,b&lastEventId=x-_1&eventType=c&&flag")
    assert got.query == {"eventType": "a,b", "lastEventId": "x-_1", "flag": ""}  # the first value, as aiohttp's
    assert got.headers == {"host": "p", "authorization": "Bearer a.b.c", "connection": "Keep-Alive",
                           "cookie": "neoplasma_token=t; x=1"}


@pytest.mark.parametrize("text", [
    "POST /?eventType=a HTTP/1.1\nHost: p",
    "HEAD /?eventType=a HTTP/1.1\nHost: p",
    "GET /?eventType=a HTTP/1.0\nHost: p",
    "GET /?eventType=a HTTP/1.1",  # no Host
    "GET /?eventType=a%2Cb HTTP/1.1\nHost: p",  # anything to decode
    "GET /?eventType=a+b HTTP/1.1\nHost: p",
    "GET /?eventType=a;b HTTP/1.1\nHost: p",
    "GET http://p/?eventType=a HTTP/1.1\nHost: p",
    "GET  /?eventType=a HTTP/1.1\nHost: p",
    "GET /?eventType=a HTTP/1.1\nHost: p\nHost: q",  # a header twice
    "GET /?eventType=a HTTP/1.1\nHost: p\nContent-Length: 0",  # a body
    "GET /?eventType=a HTTP/1.1\nHost: p\nTransfer-Encoding: chunked",
    "GET /?eventType=a HTTP/1.1\nHost: p\nConnection: close",
    "GET /?eventType=a HTTP/1.1\nHost: p\nConnection: Upgrade\nUpgrade: h2c",
    "GET /?eventType=a HTTP/1.1\nHost: p\n folded: value",
    "GET /?eventType=a HTTP/1.1\nHost: p\nBad Name: v",
    "GET /?eventType=a HTTP/1.1\nHost: p\nX: caf\xe9",  # not ASCII
    "GET /?eventType=a HTTP/1.1\nHost: p\nX: a\x00b",
    "GET /?eventType=a HTTP/1.1\nHost: p\nNo-colon",
    "GET /?eventType=" + "a" * 200 + " HTTP/1.1\nHost: p",  # a request line over the limit
    "GET /?eventType=a HTTP/1.1\nHost: p\nX: " + "v" * 200,  # a header line over the limit
    "GET /?eventType=a HTTP/1.1\nHost: p\n" + "\n".join(f"X-{i}: v" for i in range(64)),  # too many
])
def test_anything_else_is_left_to_aiohttp(text: str) -> None:
    assert head(text) is None


class FakeTransport:
    def __init__(self) -> None:
        self.written = bytearray()
        self.closing = False

    def write(self, data: bytes) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True


class Recorder:
    """A stand-in for aiohttp's handler: what it was given."""

    def __init__(self) -> None:
        self.made: Any = None
        self.data = bytearray()
        self.eof = False
        self.lost: list[Exception | None] = []

    def connection_made(self, transport: Any) -> None:
        self.made = transport

    def data_received(self, data: bytes) -> None:
        self.data += data

    def eof_received(self) -> bool:
        self.eof = True
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.append(exc)


class Taken:
    def __init__(self) -> None:
        self.lost_calls = 0

    def lost(self) -> None:
        self.lost_calls += 1


def fast(serve_ok: bool, limit: int = 1000) -> tuple[FastPath, FakeTransport, list[Recorder], list[Head], Taken]:
    made: list[Recorder] = []
    served: list[Head] = []
    taken = Taken()

    def fallback() -> Any:
        made.append(Recorder())
        return made[-1]

    def serve(h: Head, conn: FastPath) -> bool:
        served.append(h)
        if serve_ok:
            conn.stream = taken
        return serve_ok

    transport = FakeTransport()
    conn = FastPath(serve, fallback, 200, 200, limit)
    conn.connection_made(transport)  # type: ignore[arg-type]
    return conn, transport, made, served, taken


def test_a_served_request_makes_no_aiohttp_handler_and_is_read_in_pieces() -> None:
    conn, _, made, served, taken = fast(True)
    request = b"GET /?eventType=a HTTP/1.1\r\nHost: p\r\n\r\n"
    for i in range(len(request)):  # byte by byte: the blank line found across pieces
        conn.data_received(request[i:i + 1])
    assert [h.query for h in served] == [{"eventType": "a"}] and made == []
    conn.data_received(b"GET /?eventType=b HTTP/1.1\r\nHost: p\r\n\r\n")  # ignored within a stream
    assert len(served) == 1
    conn.connection_lost(None)
    assert taken.lost_calls == 1 and conn.stream is None


def test_a_declined_request_goes_to_aiohttp_with_every_byte() -> None:
    conn, transport, made, served, _ = fast(False)
    request = b"GET /healthz HTTP/1.1\r\nHost: p\r\n\r\nGET /livez HTTP/1.1\r\nHost: p\r\n\r\n"
    conn.data_received(request[:10])
    assert made == []
    conn.data_received(request[10:])
    assert len(served) == 1 and len(made) == 1
    aiohttp = made[0]
    assert aiohttp.made is transport and bytes(aiohttp.data) == request
    conn.data_received(b"more")
    assert conn.eof_received() is True and aiohttp.eof
    conn.connection_lost(None)
    assert bytes(aiohttp.data) == request + b"more" and aiohttp.lost == [None]


def test_an_unparsed_or_endless_head_goes_to_aiohttp() -> None:
    conn, _, made, served, _ = fast(True)
    conn.data_received(b"GET /?eventType=a HTTP/1.0\r\nHost: p\r\n\r\n")
    assert served == [] and bytes(made[0].data).startswith(b"GET /?eventType=a HTTP/1.0")
    conn, _, made, served, _ = fast(True, limit=100)
    conn.data_received(b"GET /?eventType=" + b"a" * 100)
    assert served == [] and len(made) == 1 and len(made[0].data) == 116
    conn, _, made, _, _ = fast(True)
    conn.data_received(b"GET /?eventType=a HTTP/1.1\r\n")
    assert conn.eof_received() is True and made[0].eof and bytes(made[0].data) == b"GET /?eventType=a HTTP/1.1\r\n"


async def test_a_write_waits_while_the_client_is_behind_and_fails_once_it_is_gone() -> None:
    conn, transport, _, _, _ = fast(True)
    await conn.write(b"data: 1\n\n")
    assert bytes(transport.written) == b"9\r\ndata: 1\n\n\r\n"
    conn.pause_writing()
    waiting = asyncio.ensure_future(conn.write(b"x"))
    await asyncio.sleep(0)
    assert not waiting.done()
    conn.resume_writing()
    await asyncio.wait_for(waiting, 5)
    conn.pause_writing()
    waiting = asyncio.ensure_future(conn.write(b"y"))
    await asyncio.sleep(0)
    conn.connection_lost(None)
    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(waiting, 5)
    transport.closing = True
    with pytest.raises(ConnectionResetError):
        await conn.write(b"z")


def test_a_deferred_request_waits_parked_then_is_served_declined_or_dropped_when_offered() -> None:
    """`defer` takes a request (a resuming one, behind the proxy's turns): nothing is served until `offer`;
    declined then, aiohttp gets every byte, those that came while it waited too; lost meanwhile, nothing."""
    parked: list[tuple[Head, FastPath]] = []

    def defer(h: Head, conn: FastPath) -> bool:
        if "last-event-id" in h.headers:
            parked.append((h, conn))
            return True
        return False

    request = b"GET /?eventType=a HTTP/1.1\r\nHost: p\r\nLast-Event-ID: t\r\n\r\n"
    conn, _, made, served, taken = fast(True)
    conn.defer = defer
    conn.data_received(b"GET /?eventType=a HTTP/1.1\r\nHost: p\r\n\r\n")  # plain: served at once
    assert len(served) == 1 and not parked
    conn, _, made, served, taken = fast(True)
    conn.defer = defer
    conn.data_received(request)
    assert conn.parked and not served and not made and len(parked) == 1
    conn.offer(parked[0][0])
    assert not conn.parked and [h.headers["last-event-id"] for h in served] == ["t"] and conn.stream is taken
    conn, _, made, served, _ = fast(False)  # declined once offered
    conn.defer = defer
    conn.data_received(request)
    conn.data_received(b"GET /livez")  # came while it waited: kept for aiohttp
    conn.offer(parked[-1][0])
    assert len(served) == 1 and bytes(made[0].data) == request + b"GET /livez"
    conn, transport, made, served, _ = fast(True)  # lost while it waited
    conn.defer = defer
    conn.data_received(request)
    conn.connection_lost(None)
    transport.closing = True
    conn.offer(parked[-1][0])
    assert not served and not made
    conn, transport, made, served, _ = fast(True, limit=100)  # a parked client may not send without end
    conn.defer = defer
    conn.data_received(request)
    conn.data_received(b"x" * 100)
    assert transport.closing


def test_a_declined_requests_decision_is_handed_to_aiohttp_once_for_that_request() -> None:
    decided: list[str] = []

    def serve(h: Head, conn: FastPath) -> bool:
        conn.decision = (h.target, f"refused {h.target}")
        decided.append(h.target)
        return False

    conn = FastPath(serve, Recorder, 200, 200, 1000)
    wrapper = FakeTransport()
    wrapper.inner = conn  # type: ignore[attr-defined]  # as net._HeaderDeadline wraps it
    transport = FakeTransport()
    transport.get_protocol = lambda: wrapper  # type: ignore[attr-defined]
    conn.connection_made(transport)  # type: ignore[arg-type]
    conn.data_received(b"GET /?eventType=a HTTP/1.1\r\nHost: p\r\n\r\n")
    assert decided == ["/?eventType=a"] and isinstance(conn.inner, Recorder)
    assert handed_decision(transport, "/?eventType=b") is None  # another request's: not this decision
    assert handed_decision(transport, "/?eventType=a") is None  # (taken: decided anew)
    conn.decision = ("/?eventType=a", "refused")
    assert handed_decision(transport, "/?eventType=a") == "refused"
    assert handed_decision(transport, "/?eventType=a") is None  # once
    assert handed_decision(None, "/") is None
    bare = FakeTransport()
    bare.get_protocol = lambda: Recorder()  # type: ignore[attr-defined]  # aiohttp alone
    assert handed_decision(bare, "/") is None  # type: ignore[arg-type]


# -- the proxy's answers, with the fast path and with aiohttp alone -------------------------------------


async def answer(port: int, request: bytes) -> bytes:
    """The head and the first body bytes of the answer to `request` (a Content-Length body, or a stream's
    first chunk), the date left out."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        data = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        fields = dict(line.split(b": ", 1) for line in data.split(b"\r\n")[1:] if b": " in line)
        if b"Content-Length" in fields:
            data += await asyncio.wait_for(reader.readexactly(int(fields[b"Content-Length"])), 5)
        elif fields.get(b"Transfer-Encoding") == b"chunked":
            size = await asyncio.wait_for(reader.readuntil(b"\r\n"), 5)
            data += size + await asyncio.wait_for(reader.readexactly(int(size, 16) + 2), 5)
        return b"\r\n".join(line for line in data.split(b"\r\n") if not line.startswith(b"Date: "))
    finally:
        writer.close()


async def test_the_answers_are_aiohttps_and_subscribers_are_served_by_the_fast_path(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("secret-one-that-is-long-enough-for-hs256\n")
    token = mint(b"secret-one-that-is-long-enough-for-hs256", ["user:42"], 60)
    config = ProxyConfig(name="p", host="127.0.0.1", http_port=0, grpc_port=0, control_port=0,
                         subscriber_jwt_keys_file=str(keys), public_topics=["news"], max_topics=3)
    service = ProxyService(config)
    await service.start()
    alone = sse_port(service.proxy, http_app(service.proxy, CollectorRegistry()),
                     bind_socket("127.0.0.1", 0, "--http-port"), fast=False)
    await alone.start()
    requests = [f"GET {target} HTTP/1.1\r\nHost: p\r\n{extra}\r\n".encode() for target, extra in [
        ("/?eventType=news", ""),
        ("/events?eventType=news,user:42&lastEventId=abc", f"Authorization: Bearer {token}\r\n"),
        (f"/?eventType=user:42&token={token}", "Last-Event-ID: xyz\r\n"),
        ("/?eventType=user:42", f"Cookie: a=1; neoplasma_token={token}\r\n"),
        ("/?eventType=user:42", f'Cookie: neoplasma_token=x; neoplasma_token = "{token}" ; b\r\n'),
        ("/?eventType=user:42", f"Cookie: neoplasma_token={token}; neoplasma_token=x\r\n"),  # 401: the last one
        ("/?eventType=user:42", ""),  # 401
        ("/?eventType=user:42", "Authorization: Bearer x.y.z\r\n"),  # 401, invalid token
        (f"/?eventType=user:43&token={token}", ""),  # 403
        ("/?eventType=a,b,c,d", ""),  # 413: past --max-topics
        ("/?eventType=", ""), ("/", ""), ("/?eventType=a%20b", ""), ("/?eventType=..", ""),
        ("/healthz", ""), ("/livez", ""), ("/nope", ""),
    ]] + [b"GET /?eventType=news HTTP/1.0\r\nHost: p\r\n\r\n", b"HEAD /?eventType=news HTTP/1.1\r\nHost: p\r\n\r\n"]
    checks: list[tuple[object, ...]] = []
    check = service.proxy.auth.check

    def counted(*args: Any) -> Any:
        checks.append(args)
        return check(*args)

    service.proxy.auth.check = counted  # type: ignore[method-assign]
    try:
        for request in requests:
            fast_answer, fast_checks = await answer(service.http.port, request), len(checks)
            aiohttp_answer = await answer(alone.port, request)
            assert fast_answer == aiohttp_answer, request
            assert fast_answer.startswith(b"HTTP/1."), fast_answer
            # Decided once on the fast path, refusals too (handed to aiohttp with the decision), as by aiohttp alone.
            assert fast_checks == len(checks) - fast_checks, request
            checks.clear()
        refused = b"GET /?eventType=user:42 HTTP/1.1\r\nHost: p\r\n\r\n"
        assert (await answer(service.http.port, refused)).startswith(b"HTTP/1.1 401") and len(checks) == 1
        # A refusal and the next request on the same connection: the second decided anew.
        reader, writer = await asyncio.open_connection("127.0.0.1", service.http.port)
        writer.write(refused + refused.replace(b"user:42", b"user:43"))
        for topic in (b"user:42", b"user:43"):
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
            assert head.startswith(b"HTTP/1.1 401") and topic in await reader.readexactly(length)
        writer.close()
        assert len(checks) == 3
        # Subscribers left by the clients are gone from the hub; a connected one was served by the fast path.
        reader, writer = await asyncio.open_connection("127.0.0.1", service.http.port)
        writer.write(b"GET /?eventType=news HTTP/1.1\r\nHost: p\r\n\r\n")
        await asyncio.wait_for(reader.readuntil(b"retry: 2000\n\r\n"), 5)
        hub = service.proxy.hub
        await wait_for(lambda: len(hub.subscribers) == 1, what="only the connected subscriber in the hub")
        (sub,) = hub.subscribers
        assert isinstance(sub, SseSubscriber)
        protocol = sub.transport.get_protocol()
        assert isinstance(protocol.inner, FastPath) and protocol.inner.inner is None  # type: ignore[attr-defined]
        assert sub.transport.get_extra_info("socket").getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
        sub.close("moved")  # the proxy ends it: told to come back soon, then the connection closes
        assert await asyncio.wait_for(reader.read(), 5) == b"c\r\nretry: 250\n\n\r\n0\r\n\r\n"
        writer.close()
        assert not hub.subscribers
    finally:
        await alone.stop()
        await service.close()
