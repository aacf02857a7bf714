"""gRPC over HTTP/2 for the subscriber port, on h2, writing responses as framed bytes given.

grpc.aio spends tens of microseconds of Python on every message it writes. Here a call's `send`
takes any number of gRPC messages already framed (5-byte prefix + message; the hub frames each
event once for every subscriber) and writes them as one DATA frame under HTTP/2 flow control, and
a connection's frames of a round leave in at most two socket writes: per subscriber and batch, a
few microseconds, whatever the number of events.

h2 keeps the protocol's state (settings, streams, windows, PING, GOAWAY, headers); only response
DATA frames are built here, debited from h2's outbound windows as its own `send_data` does
(that costs ~13 us a frame). Data a client's window does not take waits in its call (`unsent`).

What clients send back while they read (grpc-go: a BDP PING for about every read with data, and
WINDOW_UPDATEs) is read here too when a read holds only such whole frames (`control_frames`):
h2 would spend ~20 us of Python on each. A PING's ACK then waits for the connection's next
write (the next round's DATA, typically) for at most `ACK_DELAY`, so it costs no socket write of
its own; anything else, or anything h2 is partway through, goes to h2. The ACK leaves behind that
write's frames, not before them: grpc-go sends its BDP PING on the first DATA it reads while no
PING of its is unanswered, so DATA read before the ACK finds one unanswered and sends none; the
next round's DATA does: one PING (one read here) per two rounds instead of one per round, on a
connection of one call (plasma's clients: a stream per connection). On a connection of several
calls the ACK goes behind the round's first frame, and the DATA of the round's second write
draws the next PING, as before.

Frames go to the transport as they are made (a socket write when nothing waits in it); within
`GrpcServer.gathered()` (a dispatch round) a connection's first frame does too, and the rest
wait for the round's end and leave in one write: at most two socket writes per connection and
round, whatever its number of calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from urllib.parse import quote

import grpc
from google.protobuf.message import DecodeError
from h2.config import H2Configuration
from h2.connection import ConnectionState, H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    Event,
    PingAckReceived,
    RemoteSettingsChanged,
    RequestReceived,
    StreamEnded,
    StreamReset,
    WindowUpdated,
)
from h2.exceptions import ProtocolError
from h2.settings import SettingCodes, Settings
from h2.stream import StreamState
from hyperframe.frame import GoAwayFrame

from neoplasma.core.aio import Signal
from neoplasma.core.logs import get_logger
from neoplasma.core.settings import DEFAULT_BACKLOG
from neoplasma.core.trust import undecodable

log = get_logger("proxy.grpc")
Opener = Callable[["Call"], None]
OK = grpc.StatusCode.OK

_CONFIG = H2Configuration(client_side=False, header_encoding=None)
_DATA = struct.Struct(">IBI")  # DATA frame header: length (24 bits) and type 0, flags, stream id
_RESPONSE = [(b":status", b"200"), (b"content-type", b"application/grpc")]
_MESSAGE_SAFE = " !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~"  # grpc-message: printable ASCII but `%` as is
_PING, _WINDOW_UPDATE = 6, 8
_PING_ACK = struct.Struct(">IBI8s")  # a PING frame with the ACK flag: length 8, type 6, flags 1, stream 0
_MAX_WINDOW = 2**31 - 1
_OPEN_STATES = (StreamState.OPEN, StreamState.HALF_CLOSED_REMOTE)
# Longest a PING's ACK waits for the connection's next write (a dispatch round's DATA) before it is
# written alone: a round under load comes within the proxy's --max-linger-seconds (0.05 s).
ACK_DELAY = 0.05
ACK_SLACK = 0.002  # what is due this much later goes too (the loop's clock moves in milliseconds)


def control_frames(data: bytes) -> list[tuple[int, int, int, bytes]] | None:
    """`data` as (type, flags, stream id, payload) if it is nothing but whole, well-formed PING and
    WINDOW_UPDATE frames (window increments of at least 1); otherwise None."""
    frames = []
    pos, end = 0, len(data)
    while pos < end:
        if end - pos < 9:
            return None
        size, kind, flags = data[pos] << 16 | data[pos + 1] << 8 | data[pos + 2], data[pos + 3], data[pos + 4]
        stream_id = int.from_bytes(data[pos + 5:pos + 9], "big") & 0x7FFFFFFF
        payload = data[pos + 9:pos + 9 + size]
        if len(payload) != size:
            return None
        if kind == _PING:
            if size != 8 or stream_id:
                return None
        elif kind == _WINDOW_UPDATE:
            if size != 4 or not int.from_bytes(payload, "big") & 0x7FFFFFFF:
                return None
        else:
            return None
        frames.append((kind, flags, stream_id, payload))
        pos += 9 + size
    return frames


def _ignore(message: bytes | None) -> None:
    pass


def _nothing() -> None:
    pass


class Call:
    """One gRPC call, on one HTTP/2 stream of a `Connection`.

    The method's opener sets `receive` (each request message; None once the client has sent its
    last) and `done` (called once when the call is over, whichever side ended it).
    """

    __slots__ = ("_backlog", "_inbox", "_status", "_torn", "authorization", "connection", "done", "ended", "path",
                 "receive", "stream_id", "waiting")

    def __init__(self, connection: Connection, stream_id: int, path: str, authorization: str | None = None) -> None:
        self.connection, self.stream_id, self.path = connection, stream_id, path
        self.authorization = authorization  # the `authorization` metadata, if sent
        self.receive: Callable[[bytes | None], None] = _ignore
        self.done: Callable[[], None] = _nothing
        self.ended = False
        self.waiting = 0  # bytes in the backlog
        self._inbox = bytearray()  # request bytes not yet a whole message
        self._backlog: list[bytes] = []  # framed messages the client's window has not taken yet
        self._torn = False  # the backlog starts within a message
        self._status: tuple[grpc.StatusCode, str] | None = None  # to send once the backlog is out

    @property
    def unsent(self) -> int:
        """Bytes sent on this call that its client has not taken: waiting for its window, or in
        its connection's buffers (shared by the connection's calls)."""
        return self.waiting + self.connection.buffered()

    async def taken(self, limit: int, timeout: float) -> bool:
        """Wait until at most `limit` bytes sent on this call are unsent, or the call ended (False
        if neither within `timeout` seconds)."""
        return await self.connection.writable.wait_until(lambda: self.ended or self.unsent <= limit, timeout)

    def send(self, data: bytes) -> None:
        """Write framed messages, now or as soon as the client's flow-control window allows."""
        if self.ended or self._status is not None:
            return
        if self.waiting:
            self._backlog.append(data)
            self.waiting += len(data)
            return
        rest = self.connection.write_data(self.stream_id, data)
        if rest:
            self._backlog.append(rest)
            self.waiting = len(rest)
            self._torn = len(rest) < len(data)

    def end(self, code: grpc.StatusCode = OK, message: str = "") -> None:
        """End the call with a status: OK after everything sent, any other at once (what waits
        for the window is dropped; a message cut by the window resets the stream instead)."""
        if self.ended or self._status is not None:
            return
        if code is OK and self.waiting:
            self._status = (code, message)
            return
        if self._torn:
            self.connection.reset(self, ErrorCodes.CANCEL)
        else:
            self.connection.trailers(self, code, message)

    def flush(self) -> None:
        """Write what waits, as far as the window now allows (then the status, if it waits too)."""
        backlog, self._backlog = self._backlog, []
        self.waiting = 0
        for i, data in enumerate(backlog):
            rest = self.connection.write_data(self.stream_id, data)
            if rest:
                self._backlog = [rest, *backlog[i + 1:]]
                self.waiting = sum(map(len, self._backlog))
                self._torn = True
                return
        self._torn = False
        if self._status is not None:
            code, message = self._status
            self._status = None
            self.end(code, message)

    def take(self, data: bytes, max_message: int) -> None:
        """Request bytes arrived: hand over each whole message."""
        inbox = self._inbox
        inbox += data
        while len(inbox) >= 5 and not self.ended:
            size = int.from_bytes(inbox[1:5], "big")
            if inbox[0]:
                self.end(grpc.StatusCode.UNIMPLEMENTED, "compressed requests are not supported")
            elif size > max_message:
                self.end(grpc.StatusCode.RESOURCE_EXHAUSTED, f"the request message is {size} bytes; "
                         f"the limit is {max_message}")
            elif len(inbox) >= 5 + size:
                message = bytes(inbox[5:5 + size])
                del inbox[:5 + size]
                self.receive(message)
                continue
            return


def unary(handle: Callable[[Call, bytes], None]) -> Opener:
    """An opener for a method with one request message: `handle(call, request)` once it is here
    (a request `handle` cannot decode ends the call with INVALID_ARGUMENT)."""
    def open_call(call: Call) -> None:
        def receive(message: bytes | None) -> None:
            call.receive = _ignore
            if message is None:
                call.end(grpc.StatusCode.INTERNAL, "the request message is missing")
                return
            try:
                handle(call, message)
            except DecodeError:
                call.end(grpc.StatusCode.INVALID_ARGUMENT, undecodable(call.path))

        call.receive = receive

    return open_call


class Connection(asyncio.Protocol):
    """One client's HTTP/2 connection and its calls."""

    def __init__(self, server: GrpcServer) -> None:
        self.server = server
        self.h2 = H2Connection(_CONFIG)
        self.h2.local_settings = Settings(client=False, initial_values={  # a client opening more is cut off
            SettingCodes.MAX_CONCURRENT_STREAMS: server.max_streams})
        self.calls: dict[int, Call] = {}
        self.transport: asyncio.WriteTransport | None = None
        self._out: list[bytes] = []  # frames gathered in a round
        self._acks: list[bytes] = []  # PING ACKs waiting for the next write (at most ACK_DELAY)
        self._acks_since = 0.0  # when the first of them came (loop time)
        self._round = 0  # the last round this connection wrote in
        self._pinged = False  # a keepalive PING is unanswered
        self.writable = Signal()  # its calls' unsent data may have dropped (or a call ended)
        self.last_stream: int | None = None  # `going_away`: the last stream the GOAWAY let in

    # -- output --------------------------------------------------------------------------

    def buffered(self) -> int:
        transport = self.transport
        return 0 if transport is None else transport.get_write_buffer_size()

    def _write(self, data: bytes) -> None:
        server = self.server
        if server.gathering is not None:
            if self._round == server.round:  # this round wrote already: the rest leaves at its end
                if not self._out:
                    server.gathering.append(self)
                self._out.append(data)
                return
            self._round = server.round
        if self._acks:  # after `data` (see the module)
            self._acks.insert(0, data)
            data, self._acks = b"".join(self._acks), []
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(data)

    def release(self) -> None:
        """Write the frames gathered in a round, at once."""
        out, self._out = self._out, []
        self._write(b"".join(out))

    def write_acks(self, since: float) -> None:
        """Write the PING ACKs still waiting since `since` (loop time: ACK_DELAY is up)."""
        if self._acks and self._acks_since == since:
            self._write(b"")

    def _emit(self) -> None:
        """Write what h2 has framed."""
        data = self.h2.data_to_send()
        if data:
            self._write(data)

    def write_data(self, stream_id: int, data: bytes) -> bytes:
        """DATA frames of `data` as far as the flow-control windows allow; returns the rest."""
        h2 = self.h2
        stream = h2.streams[stream_id]
        size = min(len(data), h2.outbound_flow_control_window, stream.outbound_flow_control_window)
        if size <= 0:
            return data
        limit = h2.max_outbound_frame_size
        if size == len(data) and size <= limit:
            self._write(_DATA.pack(size << 8, 0, stream_id) + data)
        else:
            self._write(b"".join([_DATA.pack(min(limit, size - start) << 8, 0, stream_id)
                                  + data[start:min(start + limit, size)] for start in range(0, size, limit)]))
        h2.outbound_flow_control_window -= size
        stream.outbound_flow_control_window -= size
        return data[size:]

    def trailers(self, call: Call, code: grpc.StatusCode, message: str) -> None:
        headers = [(b"grpc-status", b"%d" % code.value[0])]
        if message:
            headers.append((b"grpc-message", quote(message, safe=_MESSAGE_SAFE).encode()))
        self.h2.send_headers(call.stream_id, headers, end_stream=True)
        stream = self.h2.streams.get(call.stream_id)
        if stream is not None and not stream.closed:  # the client may stop sending now (RFC 9113 8.1)
            self.h2.reset_stream(call.stream_id, ErrorCodes.NO_ERROR)
        self._emit()
        self._close(call)

    def reset(self, call: Call, error: ErrorCodes) -> None:
        self.h2.reset_stream(call.stream_id, error)
        self._emit()
        self._close(call)

    def _close(self, call: Call) -> None:
        if not call.ended:
            call.ended = True
            self.calls.pop(call.stream_id, None)
            call.done()
            self.writable.notify()
            if self.last_stream is not None and not self.calls:
                self._close_soon()

    def _close_soon(self) -> None:
        """Close after what this turn of the loop writes (a round's gathered frames included)."""
        asyncio.get_running_loop().call_soon(self.close)

    def resume_writing(self) -> None:  # the transport's buffer drained below its low-water mark
        self.writable.notify()

    # -- input ---------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server.connections.add(self)
        self.h2.initiate_connection()
        self._emit()

    def data_received(self, data: bytes) -> None:
        if self._controls(data):
            return
        try:
            events = self.h2.receive_data(data)
        except ProtocolError:  # h2 has framed a GOAWAY saying why
            self._emit()
            self.close()
            return
        for event in events:  # each on its own: what fails ends its stream (or, if connection-wide, the connection)
            try:
                self._on(event)
            except ProtocolError as exc:  # h2 refused what was done for it: a stream the client reset, ...
                self._failed(getattr(event, "stream_id", 0), f"{type(exc).__name__}: {exc}")
            except Exception as exc:  # a method's handler failed on this call: only the call ends
                self._failed(getattr(event, "stream_id", 0), f"{type(exc).__name__}: {exc}", internal=True)
            if self.transport is None or self.transport.is_closing():
                return
        self._emit()

    def _controls(self, data: bytes) -> bool:
        """Take `data` here if it is only PING and WINDOW_UPDATE frames (`control_frames`) that h2 would
        take without a word: between frames (nothing of h2's buffered), the connection open, each
        stream window update for an open call's stream, and no window past its limit. Returns whether
        it did (else h2 is to read it all)."""
        h2 = self.h2
        buffered = h2.incoming_buffer
        if buffered._data or buffered._preamble_len or buffered._headers_buffer:
            return False
        if h2.state_machine.state is ConnectionState.CLOSED:
            return False
        frames = control_frames(data)
        if frames is None:
            return False
        updates: dict[int, int] = {}
        for kind, _, stream_id, payload in frames:
            if kind == _WINDOW_UPDATE:
                updates[stream_id] = updates.get(stream_id, 0) + (int.from_bytes(payload, "big") & 0x7FFFFFFF)
        streams = h2.streams
        for stream_id, increment in updates.items():
            if stream_id:
                stream = streams.get(stream_id)
                if (stream is None or stream_id not in self.calls or stream.state_machine.state not in _OPEN_STATES
                        or stream.outbound_flow_control_window + increment > _MAX_WINDOW):
                    return False
            elif h2.outbound_flow_control_window + increment > _MAX_WINDOW:
                return False
        for kind, flags, _, payload in frames:
            if kind == _PING:
                if flags & 1:
                    self._pinged = False
                else:
                    if not self._acks:
                        self._acks_since = self.server.ack_later(self)
                    self._acks.append(_PING_ACK.pack(8 << 8 | _PING, 1, 0, payload))
        if updates:
            for stream_id, increment in updates.items():
                if stream_id:
                    streams[stream_id].outbound_flow_control_window += increment
                else:
                    h2.outbound_flow_control_window += increment
            self._windows_grew(updates)
        return True

    def _windows_grew(self, stream_ids: Iterable[int]) -> None:
        """Flow-control windows grew: those of `stream_ids`' calls, or (0, a stream that is no call, or new
        settings) the connection's: the calls waiting on them send what they can, and writers look again."""
        ids = set(stream_ids)
        for call in [self.calls[i] for i in ids] if ids <= self.calls.keys() else list(self.calls.values()):
            if call.waiting:
                call.flush()
        self.writable.notify()

    def _failed(self, stream_id: int, error: str, internal: bool = False) -> None:
        """An event could not be handled: end its call (a reset, if its stream is still open), or the
        connection with GOAWAY PROTOCOL_ERROR when it concerns no stream; one rate-limited line."""
        log.outside("h2_event_failed", stream=stream_id, error=error)
        call = self.calls.get(stream_id)
        stream = self.h2.streams.get(stream_id) if stream_id else None
        try:
            if internal and call is not None and stream is not None and not stream.closed:
                call.end(grpc.StatusCode.INTERNAL, "the call failed on the proxy")
            elif stream is not None and not stream.closed:
                self.h2.reset_stream(stream_id, ErrorCodes.INTERNAL_ERROR if internal else ErrorCodes.PROTOCOL_ERROR)
            elif not stream_id:
                self.h2.close_connection(ErrorCodes.PROTOCOL_ERROR)
                self._emit()
                self.close()
        except ProtocolError:  # the stream or connection is past what h2 can still say on it
            pass
        if call is not None:
            self._close(call)

    def _on(self, event: Event) -> None:
        if isinstance(event, DataReceived):
            self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            call = self.calls.get(event.stream_id)
            if call is not None:
                call.take(event.data, self.server.max_message_bytes)
        elif isinstance(event, WindowUpdated | RemoteSettingsChanged):
            self._windows_grew((getattr(event, "stream_id", 0),))
        elif isinstance(event, RequestReceived):
            self._open(event.stream_id, dict(event.headers or ()))
        elif isinstance(event, StreamEnded):
            call = self.calls.get(event.stream_id)
            if call is not None:
                call.receive(None)
        elif isinstance(event, StreamReset):
            call = self.calls.get(event.stream_id)
            if call is not None:
                self._close(call)
        elif isinstance(event, PingAckReceived):
            self._pinged = False
        elif isinstance(event, ConnectionTerminated):
            self.close()

    def _open(self, stream_id: int, headers: dict[bytes, bytes]) -> None:
        stream = self.h2.streams.get(stream_id)
        if stream is None or stream.closed:  # reset in the same read as its HEADERS: a call cancelled at once
            return
        if self.last_stream is not None and stream_id > self.last_stream:  # sent before the client read GOAWAY
            self.h2.reset_stream(stream_id, ErrorCodes.REFUSED_STREAM)  # unprocessed: retried on a new connection
            return
        if not headers.get(b"content-type", b"").startswith(b"application/grpc"):
            self.h2.send_headers(stream_id, [(b":status", b"415")], end_stream=True)
            return
        path = headers.get(b":path", b"").decode("utf-8", "replace")
        authorization = headers.get(b"authorization")
        call = self.calls[stream_id] = Call(self, stream_id, path,
                                            None if authorization is None else authorization.decode("latin-1"))
        self.h2.send_headers(stream_id, _RESPONSE)
        self._emit()  # the response headers go before any DATA frame of the call
        opener = self.server.routes.get(path)
        if opener is None:
            call.end(grpc.StatusCode.UNIMPLEMENTED, f"method {path} not found")
        else:
            opener(call)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        for call in list(self.calls.values()):
            self._close(call)
        self.transport = None

    # -- the connection as a whole -----------------------------------------------------

    def ping(self) -> None:
        """Keepalive: close the connection if the last PING went unanswered, else send one."""
        if self._pinged:
            self.close()
            return
        self._pinged = True
        self.h2.ping(b"keepaliv")
        self._emit()

    def going_away(self) -> None:
        """Graceful GOAWAY (NO_ERROR, last stream = the highest opened so far), once: the client
        opens its next calls on a new connection, which a Service may send to another proxy (a
        retry over this one would come back here), while the calls already here go on. Framed here,
        not by h2: its connection would refuse to send anything more after it. A call the client
        opens meanwhile (before it read the GOAWAY) is refused with REFUSED_STREAM, which it
        retries on its new connection; the connection is closed once its last call has ended."""
        if self.last_stream is not None:
            return
        self.last_stream = self.h2.highest_inbound_stream_id
        self._write(GoAwayFrame(0, last_stream_id=self.last_stream, error_code=ErrorCodes.NO_ERROR).serialize())
        if not self.calls:
            self._close_soon()

    def goaway(self, message: str) -> None:
        """End every call (UNAVAILABLE), say GOAWAY, and close once that is written."""
        for call in list(self.calls.values()):
            call.end(grpc.StatusCode.UNAVAILABLE, message)
        self.h2.close_connection(last_stream_id=self.last_stream)  # (never above one sent before: RFC 9113 6.8)
        self._emit()
        self.close()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class GrpcServer:
    """The gRPC methods `routes` ({path: opener}) on a listening socket, with keepalive PINGs.

    A connection that opens more than `max_streams` calls at once (HTTP/2's MAX_CONCURRENT_STREAMS,
    which clients respect) is ended with GOAWAY PROTOCOL_ERROR."""

    def __init__(self, routes: dict[str, Opener], max_message_bytes: int, keepalive: float, max_streams: int) -> None:
        self.routes, self.max_message_bytes, self.keepalive = routes, max_message_bytes, keepalive
        self.max_streams = max_streams  # calls open at once on one connection (HTTP/2 MAX_CONCURRENT_STREAMS)
        self.connections: set[Connection] = set()
        self.gathering: list[Connection] | None = None  # connections with frames gathered, in a round
        self._acking: deque[tuple[float, Connection]] = deque()  # (since, connection) holding PING ACKs, oldest first
        self._acks_due: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop it serves on (`start`)
        self.round = 0
        self._server: asyncio.Server | None = None
        self._pinger: asyncio.Task[None] | None = None

    async def start(self, sock: socket.socket, backlog: int = DEFAULT_BACKLOG) -> None:
        """Serve on `sock`, bound (`bind_socket`) with listen backlog `backlog`."""
        loop = self._loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: Connection(self), sock=sock, backlog=backlog)
        self._pinger = loop.create_task(self._keepalive())

    @contextlib.contextmanager
    def gathered(self) -> Iterator[None]:
        """A round: within, a connection's first frame is written at once, the others wait; at the end
        each connection writes them at once."""
        gathering: list[Connection] = []
        self.gathering = gathering
        self.round += 1
        try:
            yield
        finally:
            self.gathering = None
            for connection in gathering:
                connection.release()

    def ack_later(self, connection: Connection) -> float:
        """`connection` holds a PING ACK for its next write: written ACK_DELAY from now at the latest.
        Returns now (loop time)."""
        loop = self._loop or asyncio.get_running_loop()
        now = loop.time()
        self._acking.append((now, connection))
        if self._acks_due is None:
            self._acks_due = loop.call_at(now + ACK_DELAY, self._write_acks)
        return now

    def _write_acks(self) -> None:
        """Write the ACKs held ACK_DELAY (those that left with a write meanwhile are passed over); wait for the rest."""
        loop = self._loop or asyncio.get_running_loop()
        acking, due = self._acking, loop.time() - ACK_DELAY + ACK_SLACK
        while acking and acking[0][0] <= due:
            since, connection = acking.popleft()
            connection.write_acks(since)
        self._acks_due = loop.call_at(acking[0][0] + ACK_DELAY, self._write_acks) if acking else None

    async def _keepalive(self) -> None:
        while True:
            await asyncio.sleep(self.keepalive)
            for connection in list(self.connections):
                connection.ping()

    def stop(self, message: str) -> None:
        """Stop listening; end every call with UNAVAILABLE (`message`) and every connection with GOAWAY."""
        if self._server is not None:
            self._server.close()
        if self._pinger is not None:
            self._pinger.cancel()
        for connection in list(self.connections):
            connection.goaway(message)
