"""The subscriber gRPC server, on 127.0.0.1 with an h2 client: its bound on calls per connection
(a real proxy), and its write gathering (in process).

Frames made within `GrpcServer.gathered()` (a dispatch round) leave in at most two socket writes
per connection (the first at once, the rest at the round's end), in order per stream, whatever the
number of calls on the connection.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from typing import Any

import hpack
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import ConnectionTerminated, DataReceived, PingAckReceived, RemoteSettingsChanged, SettingsAcknowledged
from h2.settings import SettingCodes
from harness import grpc_request_headers, h2_client, wait_for
from hyperframe.frame import DataFrame, Frame, GoAwayFrame, HeadersFrame, PingFrame, RstStreamFrame, WindowUpdateFrame

from neoplasma.core.net import hostport
from neoplasma.proxy import h2server
from neoplasma.proxy.h2server import Call, GrpcServer, control_frames


class CountingTransport:
    """Passes writes through to the real transport, counting them."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.writes = inner, 0

    def write(self, data: bytes) -> None:
        self.writes += 1
        self.inner.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


async def served(calls: list[Call]) -> tuple[GrpcServer, socket.socket, asyncio.StreamReader, asyncio.StreamWriter,
                                             H2Connection]:
    """A GrpcServer of one method (`/t.S/M`: its calls appended to `calls`) on 127.0.0.1, its socket, and a raw
    HTTP/2 client connected to it (`h2_client`)."""
    server = GrpcServer({"/t.S/M": calls.append}, max_message_bytes=1 << 20, keepalive=30, max_streams=10)
    sock = socket.create_server(("127.0.0.1", 0))
    await server.start(sock)
    return (server, sock, *await h2_client(hostport(*sock.getsockname()[:2])))


async def test_a_rounds_frames_leave_in_one_write_per_connection_in_order() -> None:
    calls: list[Call] = []
    server, sock, reader, writer, client = await served(calls)
    for _ in range(3):
        client.send_headers(client.get_next_available_stream_id(), grpc_request_headers("/t.S/M"))
    writer.write(client.data_to_send())
    await wait_for(lambda: len(calls) == 3, what="three calls on one connection")
    try:
        connection = next(iter(server.connections))
        counting = connection.transport = CountingTransport(connection.transport)  # type: ignore[assignment]
        with server.gathered():
            for round_ in range(2):
                for call in calls:
                    call.send(b"%d:%d;" % (call.stream_id, round_))
            assert counting.writes == 1  # the first frame at once, the others wait for the round's end
        assert counting.writes == 2

        received: dict[int, bytes] = {call.stream_id: b"" for call in calls}

        async def everything() -> bool:
            data = await reader.read(65536)
            for event in client.receive_data(data):
                if isinstance(event, DataReceived):
                    received[event.stream_id] += event.data
            return all(len(v) == len(b"%d:0;%d:1;" % (k, k)) for k, v in received.items())

        await wait_for(everything, what="every call's frames")
        assert received == {call.stream_id: b"%d:0;%d:1;" % (call.stream_id, call.stream_id) for call in calls}
        with server.gathered():
            pass
        assert counting.writes == 2  # a round with nothing to send writes nothing
    finally:
        writer.close()
        server.stop("test over")
        sock.close()


HEADERS = grpc_request_headers("/proto.StreamService/Events")


def events_stream(client: H2Connection) -> None:
    client.send_headers(client.get_next_available_stream_id(), HEADERS)


async def test_a_connection_opening_more_calls_than_the_proxy_allows_is_cut_off(start: Any) -> None:
    proxy = start("proxy", "p0", "--max-streams-per-connection", "2")
    reader, writer, client = await h2_client(proxy.endpoints["grpc"])
    settings: dict[int, int] = {}
    ended: list[ConnectionTerminated] = []

    async def read(until: Any) -> bool:
        data = await asyncio.wait_for(reader.read(65536), 10)
        for event in client.receive_data(data):
            if isinstance(event, RemoteSettingsChanged):
                settings.update({k: v.new_value for k, v in event.changed_settings.items()})
            elif isinstance(event, ConnectionTerminated):
                ended.append(event)
        writer.write(client.data_to_send())
        return bool(until()) or not data

    await wait_for(lambda: read(lambda: settings), what="the proxy's SETTINGS")
    assert settings[SettingCodes.MAX_CONCURRENT_STREAMS] == 2  # what clients are told, and respect
    for _ in range(2):
        events_stream(client)
    writer.write(client.data_to_send())
    third = hpack.Encoder().encode(HEADERS)  # past the limit (h2 would not send it): framed by hand
    writer.write(struct.pack(">IBI", len(third) << 8 | 1, 4, 5) + third)
    await wait_for(lambda: read(lambda: ended), what="GOAWAY")
    assert ended[0].error_code == 1  # PROTOCOL_ERROR
    assert await asyncio.wait_for(reader.read(), 10) == b""  # and the connection is closed
    writer.close()


async def test_going_away_lets_the_calls_there_finish_refuses_new_ones_and_closes_after_the_last() -> None:
    """GOAWAY NO_ERROR with the last stream opened: the client's next calls go to a new connection;
    a call it opened before reading it is refused (REFUSED_STREAM: retried elsewhere, never
    processed); the calls already there go on; the connection closes when the last has ended.
    (Frames read raw: h2's client, once it has the GOAWAY, takes nothing more.)"""
    calls: list[Call] = []
    server, sock, reader, writer, client = await served(calls)
    frames: list[Frame] = []
    buffer = bytearray()

    async def read(until: Any) -> bool:
        data = await asyncio.wait_for(reader.read(65536), 10)
        buffer.extend(data)
        while len(buffer) >= 9:
            frame, length = Frame.parse_frame_header(memoryview(buffer[:9]))
            if len(buffer) < 9 + length:
                break
            frame.parse_body(memoryview(buffer[9:9 + length]))
            del buffer[:9 + length]
            frames.append(frame)
        return bool(until()) or not data

    def of(kind: type[Frame]) -> list[Any]:
        return [f for f in frames if isinstance(f, kind)]

    try:
        for _ in range(2):
            client.send_headers(client.get_next_available_stream_id(), grpc_request_headers("/t.S/M"))
        writer.write(client.data_to_send())
        await wait_for(lambda: len(calls) == 2, what="two calls on one connection")
        connection = next(iter(server.connections))
        connection.going_away()
        connection.going_away()  # once only
        late = client.get_next_available_stream_id()  # (sent before the client read the GOAWAY)
        client.send_headers(late, grpc_request_headers("/t.S/M"))
        writer.write(client.data_to_send())
        await wait_for(lambda: read(lambda: of(RstStreamFrame)), what="the refusal")
        [goaway] = of(GoAwayFrame)
        assert (goaway.error_code, goaway.last_stream_id) == (ErrorCodes.NO_ERROR, 3)
        [refused] = of(RstStreamFrame)
        assert (refused.stream_id, refused.error_code) == (late, ErrorCodes.REFUSED_STREAM) and len(calls) == 2
        calls[0].send(b"still here")
        calls[0].end()
        await wait_for(lambda: read(lambda: [f for f in of(HeadersFrame) if "END_STREAM" in f.flags]),
                       what="call 1's trailers")
        assert [f.data for f in of(DataFrame)] == [b"still here"]
        assert server.connections == {connection}  # a call is left
        calls[1].end()
        await wait_for(lambda: read(lambda: False), what="the connection closed after its last call")
        assert not server.connections
    finally:
        writer.close()
        server.stop("test over")
        sock.close()


def test_control_frames_are_only_whole_pings_and_window_updates() -> None:
    ping = PingFrame(0, opaque_data=b"12345678").serialize()
    window = WindowUpdateFrame(3, window_increment=100).serialize()
    assert control_frames(ping + window) == [(6, 0, 0, b"12345678"), (8, 0, 3, struct.pack(">I", 100))]
    assert control_frames(b"") == []
    assert control_frames(ping[:-1]) is None  # cut short
    assert control_frames(ping + window[:5]) is None
    assert control_frames(ping + DataFrame(1, data=b"x").serialize()) is None  # anything else: h2's
    assert control_frames(struct.pack(">IBI", 4 << 8 | 8, 0, 3) + b"\0\0\0\0") is None  # increment 0: h2 says why
    assert control_frames(struct.pack(">IBI", 8 << 8 | 6, 0, 1) + b"12345678") is None  # a PING on a stream


async def test_pings_and_window_updates_are_read_without_h2_and_an_ack_rides_with_the_next_write() -> None:
    """What grpc-go sends while it reads (a PING per read with data, WINDOW_UPDATEs) is taken without
    h2; the PING's ACK leaves with the connection's next write, or alone within ACK_DELAY."""
    calls: list[Call] = []
    server, sock, reader, writer, client = await served(calls)
    client.send_headers(client.get_next_available_stream_id(), grpc_request_headers("/t.S/M"))
    writer.write(client.data_to_send())
    events: list[Any] = []

    async def read(until: Any) -> bool:
        if until():
            return True
        data = await asyncio.wait_for(reader.read(65536), 10)
        events.extend(client.receive_data(data))
        writer.write(client.data_to_send())
        return bool(until()) or not data

    try:
        await wait_for(lambda: len(calls) == 1, what="a call")
        [call] = calls
        connection = next(iter(server.connections))
        await wait_for(lambda: read(lambda: [e for e in events if isinstance(e, RemoteSettingsChanged)]),
                       what="the server's SETTINGS")  # (acknowledged by the next write)
        client.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: 4})  # the call's window takes 4 bytes
        writer.write(client.data_to_send())
        await wait_for(lambda: read(lambda: sum(isinstance(e, SettingsAcknowledged) for e in events) == 2),
                       what="the client's SETTINGS acknowledged")  # so h2 has read all that came before
        assert connection.h2.streams[call.stream_id].outbound_flow_control_window == 4
        by_h2: list[int] = []  # the types of the frames h2 was given
        receive = connection.h2.receive_data

        def counted(data: bytes) -> Any:
            pos = 0
            while pos + 9 <= len(data):
                by_h2.append(data[pos + 3])
                pos += 9 + int.from_bytes(data[pos:pos + 3], "big")
            return receive(data)

        connection.h2.receive_data = counted  # type: ignore[method-assign]
        counting = connection.transport = CountingTransport(connection.transport)  # type: ignore[assignment]
        call.send(b"0123456789")  # 4 bytes go, 6 wait for the window
        assert call.waiting == 6 and counting.writes == 1
        client.ping(b"pingpong")
        writer.write(client.data_to_send())
        await wait_for(lambda: connection._acks, what="the PING read")
        assert counting.writes == 1  # its ACK waits for the next write
        client.increment_flow_control_window(6, call.stream_id)
        writer.write(client.data_to_send())
        await wait_for(lambda: call.waiting == 0, what="the window update read")
        assert counting.writes == 2 and not connection._acks  # the rest of the data, the ACK with it
        await wait_for(lambda: read(lambda: [e for e in events if isinstance(e, PingAckReceived)]),
                       what="the ACK")
        await wait_for(lambda: read(lambda: sum(len(e.data) for e in events if isinstance(e, DataReceived)) == 10),
                       what="the data")
        client.ping(b"pingping")  # no write follows: the ACK goes alone, within ACK_DELAY
        writer.write(client.data_to_send())
        await wait_for(lambda: read(lambda: sum(isinstance(e, PingAckReceived) for e in events) == 2),
                       what="the lone ACK")
        assert counting.writes == 3 and not {6, 8} & set(by_h2)  # no PING, no WINDOW_UPDATE went to h2
    finally:
        writer.close()
        server.stop("test over")
        sock.close()


async def test_a_ping_ack_leaves_after_the_next_rounds_data_and_waits_for_its_own_delay(monkeypatch: Any) -> None:
    """A PING's ACK leaves in the same write as the next round's DATA, behind it (grpc-go then sends its
    next BDP PING a round later: one per two rounds); an ACK held from a PING that came after another's
    (already written) is not written alone when the other's delay is up, only when its own is."""
    monkeypatch.setattr(h2server, "ACK_DELAY", 1.0)  # long enough to tell the two PINGs' delays apart
    calls: list[Call] = []
    server, sock, reader, writer, client = await served(calls)
    client.send_headers(client.get_next_available_stream_id(), grpc_request_headers("/t.S/M"))
    writer.write(client.data_to_send())
    frames: list[tuple[int, int, bytes]] = []  # DATA and PING frames read: (type, flags, payload)
    buffer = bytearray()

    async def read(until: Any) -> bool:
        data = await asyncio.wait_for(reader.read(65536), 10)
        buffer.extend(data)
        while len(buffer) >= 9 and len(buffer) >= 9 + (size := int.from_bytes(buffer[:3], "big")):
            if buffer[3] in (0, 6):
                frames.append((buffer[3], buffer[4], bytes(buffer[9:9 + size])))
            del buffer[:9 + size]
        return bool(until()) or not data

    def ping(payload: bytes) -> None:
        client.ping(payload)
        writer.write(client.data_to_send())

    try:
        await wait_for(lambda: len(calls) == 1, what="a call")
        [call] = calls
        connection = next(iter(server.connections))
        counting = connection.transport = CountingTransport(connection.transport)  # type: ignore[assignment]
        ping(b"first..."), await wait_for(lambda: connection._acks, what="the first PING read")
        with server.gathered():
            call.send(b"round 1")
            assert counting.writes == 1 and not connection._acks  # the round's first write, the ACK with it
        assert counting.writes == 1
        ping(b"second.."), await wait_for(lambda: connection._acks, what="the second PING read")
        await wait_for(lambda: len(server._acking) == 1, what="the first PING's delay up")
        assert counting.writes == 1 and connection._acks  # the second ACK still waits for a write
        with server.gathered():
            call.send(b"round 2")
        assert counting.writes == 2 and not connection._acks
        await wait_for(lambda: read(lambda: len(frames) == 4), what="two rounds' DATA and two ACKs")
        assert frames == [(0, 0, b"round 1"), (6, 1, b"first..."), (0, 0, b"round 2"), (6, 1, b"second..")]
        ping(b"third..."), await wait_for(lambda: read(lambda: len(frames) == 5), what="a lone ACK")
        assert frames[4] == (6, 1, b"third...") and counting.writes == 3  # no write came: alone, ACK_DELAY later
    finally:
        writer.close()
        server.stop("test over")
        sock.close()
