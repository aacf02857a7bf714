"""The SSE port's fast path: the first request of a connection read without aiohttp.

Most of an SSE subscriber's accept cost and of its memory were aiohttp's: its request handler and
parser, the request and response objects, the handler's task and a coroutine waiting for the
stream's end. Here a connection starts with one small protocol object that reads the request head
itself. A plain `GET` over HTTP/1.1 whose target and headers need no decoding is offered to `serve`
(the proxy's SSE subscribe, neoplasma.proxy.server.sse_fast_path); anything else, and whatever
`serve` declines (refusals, other paths, a proxy refusing subscribers), goes with the bytes read so
far to aiohttp's handler, made only then, which answers exactly as it does alone. What `serve` decided
of a request it declined goes along (`FastPath.decision`, taken by `handed_decision`), so that a refused
request is decided once, not again by aiohttp's handler.

Strict and bounded: the request line and each header line within aiohttp's limits, at most
`MAX_FAST_HEADERS` headers, no header twice, no body, `Host` present, only the bytes below in the
target (no `%`, `+`, `;`: nothing to decode), else aiohttp decides.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from email.utils import formatdate
from typing import Any, Protocol, cast

from aiohttp.http import SERVER_SOFTWARE

from neoplasma.proxy.hub import http_chunk

# Bytes a fast target may hold: unreserved, and the delimiters that decode to themselves.
TARGET_BYTES = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~!$'()*,:@/?&="
# Header names (RFC 9110 tokens) and values (visible ASCII, space and tab).
NAME_BYTES = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789!#$%&'*+-.^_`|~"
VALUE_BYTES = bytes(range(0x20, 0x7F)) + b"\t"
MAX_FAST_HEADERS = 64
# Headers that make a request aiohttp's: a body, an upgrade, an expectation. (`Connection` is allowed
# only as `keep-alive`.)
HANDED_OVER = frozenset({"content-length", "transfer-encoding", "upgrade", "expect"})


class Head:
    """A request head the fast path can serve: its path, query (each name's first value, as aiohttp's
    `request.query[name]`) and headers (names lower-cased)."""

    __slots__ = ("headers", "path", "query", "target")

    def __init__(self, target: str, path: str, query: dict[str, str], headers: dict[str, str]) -> None:
        self.target, self.path, self.query, self.headers = target, path, query, headers


def parse_head(head: bytes, max_line: int, max_field: int) -> Head | None:
    """`head` (a request up to, not including, the blank line ending its headers) when it is a plain
    `GET` over HTTP/1.1 that needs no decoding; None for anything else (aiohttp's to answer)."""
    lines = head.split(b"\r\n")
    request_line = lines[0]
    if len(request_line) > max_line or len(lines) > MAX_FAST_HEADERS + 1:
        return None
    parts = request_line.split(b" ")
    if len(parts) != 3 or parts[0] != b"GET" or parts[2] != b"HTTP/1.1":
        return None
    raw = parts[1]
    if not raw.startswith(b"/") or raw.translate(None, TARGET_BYTES):
        return None
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if (len(line) > max_field or not colon or not name or name.translate(None, NAME_BYTES)
                or value.translate(None, VALUE_BYTES)):
            return None
        key = name.decode("ascii").lower()
        if key in headers or key in HANDED_OVER:
            return None
        headers[key] = value.strip(b" \t").decode("ascii")
    if "host" not in headers or headers.get("connection", "keep-alive").lower() != "keep-alive":
        return None
    target = raw.decode("ascii")
    path, _, query_string = target.partition("?")
    query: dict[str, str] = {}
    for part in query_string.split("&"):
        if part:
            key, _, text = part.partition("=")
            query.setdefault(key, text)
    return Head(target, path, query, headers)


_date: tuple[int, bytes] = (0, b"")


def date_header() -> bytes:
    """`Date: ...` and `Server: ...` lines as aiohttp writes them (the date made once a second)."""
    global _date
    now = int(time.time())
    if _date[0] != now:
        _date = (now, b"Date: %s\r\nServer: %s\r\n" % (formatdate(now, usegmt=True).encode(), SERVER_SOFTWARE.encode()))
    return _date[1]


Serve = Callable[[Head, "FastPath"], bool]
# Whether a request waits before it is offered to `serve`: True when the callee took it, to call `offer` later.
Defer = Callable[[Head, "FastPath"], bool]


class Stream(Protocol):
    """What took a connection (FastPath.stream): told when the connection is lost."""

    def lost(self) -> None: ...


class FastPath(asyncio.Protocol):
    """One connection of the SSE port: its first request served by `serve` when it can (a `stream` then
    owns the connection, told when it is lost; it sets `stream` to None when it ends the connection
    itself), else handed to `fallback()` (aiohttp's handler). `write` sends one chunk of the stream and
    waits while the client is behind. With `defer`, a request it takes waits (`parked`, its bytes kept)
    until `offer` hands it to `serve` (or aiohttp) later; its client's further bytes are kept meanwhile,
    up to `head_limit`, beyond which the connection is closed. `serve` may leave in `decision` what it
    decided of a request it declines (with the request's target), for aiohttp's handler (`handed_decision`)."""

    __slots__ = ("_buffer", "_paused", "_waiter", "decision", "defer", "fallback", "head_limit", "inner", "max_field",
                 "max_line", "parked", "serve", "stream", "transport")

    def __init__(self, serve: Serve, fallback: Callable[[], asyncio.Protocol], max_line: int, max_field: int,
                 head_limit: int, defer: Defer | None = None) -> None:
        self.serve, self.fallback, self.defer = serve, fallback, defer
        self.parked = False
        self.max_line, self.max_field, self.head_limit = max_line, max_field, head_limit
        self.transport: asyncio.Transport | None = None
        self.inner: asyncio.Protocol | None = None  # aiohttp's handler, once handed over
        self.stream: Stream | None = None  # set by `serve` when it takes the connection
        self.decision: tuple[str, Any] | None = None  # (target, what `serve` decided) of a declined request
        self._buffer = bytearray()
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self.inner is not None:
            self.inner.data_received(data)
            return
        if self.stream is not None:  # a stream's client has nothing more to say: ignored
            return
        buffer = self._buffer
        if self.parked:
            buffer += data
            if len(buffer) > self.head_limit and self.transport is not None:
                self.transport.close()
            return
        start = max(0, len(buffer) - 3)
        buffer += data
        end = buffer.find(b"\r\n\r\n", start)
        if end < 0:
            if len(buffer) > self.head_limit:
                self._hand_over()
            return
        head = parse_head(bytes(buffer[:end]), self.max_line, self.max_field)
        if head is None:
            self._hand_over()
        elif self.defer is not None and self.defer(head, self):
            self.parked = True
        else:
            self.offer(head)

    def offer(self, head: Head) -> None:
        """Offer the request to `serve` (now, or when a deferred one's time came); aiohttp's if declined.
        Nothing when the connection was lost or handed over meanwhile."""
        self.parked = False
        transport = self.transport
        if self.inner is not None or transport is None or transport.is_closing():
            return
        if not self.serve(head, self):
            self._hand_over()
            return
        self._buffer = bytearray()

    def _hand_over(self) -> None:
        inner = self.inner = self.fallback()
        inner.connection_made(cast(asyncio.Transport, self.transport))
        data, self._buffer = bytes(self._buffer), bytearray()
        if data:
            inner.data_received(data)

    def eof_received(self) -> bool | None:
        if self.inner is None and self.stream is None and self._buffer:
            self.parked = False
            self._hand_over()  # a partial head (or a parked request): aiohttp says what it says of it
        return self.inner.eof_received() if self.inner is not None else None

    def connection_lost(self, exc: Exception | None) -> None:
        if self.inner is not None:
            self.inner.connection_lost(exc)
            return
        stream, self.stream = self.stream, None
        if stream is not None:
            stream.lost()
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(ConnectionResetError("the subscriber's connection was lost"))

    def pause_writing(self) -> None:
        if self.inner is not None:
            self.inner.pause_writing()
        self._paused = True

    def resume_writing(self) -> None:
        if self.inner is not None:
            self.inner.resume_writing()
        self._paused = False
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def write(self, data: bytes) -> None:
        """`data` as one chunk of the stream; returns once the transport takes more (as aiohttp's `write`)."""
        transport = self.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("cannot write to a closed subscriber connection")
        transport.write(http_chunk(data))
        if self._paused:
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter


def handed_decision(transport: asyncio.BaseTransport | None, target: str) -> Any:
    """What the fast path's `serve` decided of the request it declined and handed to aiohttp on this
    connection (`FastPath.decision`), when `target` is that request's; taken once (a later request on the
    connection is decided anew). None: no decision was handed over (aiohttp alone, or another request)."""
    protocol: object = transport.get_protocol() if transport is not None else None
    while protocol is not None and not isinstance(protocol, FastPath):  # under wrappers (their `inner`)
        protocol = getattr(protocol, "inner", None)
    if protocol is None or protocol.decision is None:
        return None
    (decided_target, decision), protocol.decision = protocol.decision, None
    return decision if decided_target == target else None
