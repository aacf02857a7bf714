"""Resumable streams (docs/resume.md): real brokers and proxies on 127.0.0.1, clients that reconnect
with their last id as EventSource does; every event arrives exactly once, in order per broker, or
the gap is signalled."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import math
import os
import random
import signal
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
from h2.events import DataReceived, StreamEnded, StreamReset
from harness import (
    ACCESS,
    AUTH,
    CREDENTIAL,
    EventSource,
    KeptTransport,
    Publisher,
    Server,
    counters,
    grpc_request_headers,
    h2_client,
    links_ready,
    proxy_status,
    publish_grpc,
    wait_for,
)

from neoplasma.broker.routing import InstanceTaken, RelayStream
from neoplasma.broker.server import REPLAY_SLICE, Broker, BrokerServicer, relay_handler
from neoplasma.broker.settings import BrokerConfig
from neoplasma.core.aio import Signal
from neoplasma.core.events import Event, varint
from neoplasma.core.membership import Member, Snapshot
from neoplasma.core.resume import (
    EVENT_OVERHEAD,
    MIN_INSTANCE,
    MIN_SEGMENT_BYTES,
    POINTER_CHARS,
    SEGMENT_OVERHEAD,
    InvalidToken,
    ReplayWalk,
    RetentionLog,
    cluster_tag,
    decode_token,
    encode_pointer,
    encode_token,
    epoch_mark,
    is_pointer,
    parse_pointer,
    parse_token,
    positions_check,
)
from neoplasma.core.trust import CREDENTIAL_ENV, PLAIN
from neoplasma.proxy import hub as hub_module
from neoplasma.proxy import links as links_module
from neoplasma.proxy.hub import Batch, BatchSubscriber, Hub, PlasmaSubscriber, SseSubscriber, Subscriber
from neoplasma.proxy.links import LinkSet, LinkState
from neoplasma.proxy.resume import (
    CATCH_UP_STEP,
    GATHERED_WAKE,
    Holder,
    ReplayBatch,
    Resume,
    ResumeBudget,
    SharedReplay,
    resolve_pointer,
    start_resume,
)
from neoplasma.proxy.server import Proxy, SseSink
from neoplasma.proxy.settings import MAX_REPLAYS, ProxyConfig
from neoplasma.wire.v1 import neoplasma_pb2 as pb
from neoplasma.wire.v1 import neoplasma_pb2_grpc as pb_grpc

CLUSTER = "test-cluster"


async def push(proxy: Server, version: int, brokers: list[tuple[str, str, str]], cluster: str = CLUSTER) -> None:
    """Apply membership [(name, address, state)] to `proxy`."""
    msg = pb.Membership(version=version, cluster=cluster,
                        brokers=[pb.BrokerMember(name=n, address=a, state=s) for n, a, s in brokers])
    async with grpc.aio.insecure_channel(proxy.endpoints["control"]) as ch:
        reply = await pb_grpc.ProxyControlStub(ch).Apply(msg, timeout=5, metadata=AUTH)
    assert reply.accepted, reply.reason


def grpc_addresses(brokers: list[Server]) -> list[str]:
    return [b.endpoints["grpc"] for b in brokers]


def members(brokers: list[Server], draining: tuple[str, ...] = ()) -> list[tuple[str, str, str]]:
    return [(b.name, b.endpoints["grpc"], "DRAINING" if b.name in draining else "SERVING") for b in brokers]


class NativeClient:
    """The native gRPC stream, resuming with the last batch's token after any error."""

    def __init__(self, address: Callable[[], str], topics: list[str]) -> None:
        self.address, self.topics = address, topics
        self.token = ""
        self.events: list[dict[str, Any]] = []
        self.gaps = 0
        self.connected = asyncio.Event()
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            try:
                async with grpc.aio.insecure_channel(self.address()) as ch:
                    call = pb_grpc.SubscriberStub(ch).Subscribe(
                        pb.SubscribeRequest(topics=self.topics, resume_token=self.token))
                    self.connected.set()
                    async for batch in call:
                        self.events += [json.loads(e.data) for e in batch.events]
                        self.gaps += batch.gap
                        if batch.token:
                            self.token = batch.token
            except grpc.aio.AioRpcError:
                pass
            self.connected.clear()
            await asyncio.sleep(0.25)

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(BaseException):
            await self._task


async def cluster(start: Any, brokers: int, proxies: int, *broker_args: str) -> tuple[list[Server], list[Server]]:
    bs = [start("broker", f"b{i}", *broker_args) for i in range(brokers)]
    ps = [start("proxy", f"p{i}", "--drain-retry-ms", "100") for i in range(proxies)]
    for p in ps:
        await push(p, 1, members(bs))
    return bs, ps


async def all_subscribed(proxy: Server, n: int, brokers: int) -> bool:
    return (await proxy_status(proxy.endpoints["control"])).subscribers == n and \
        await links_ready(proxy.endpoints["control"], brokers)


async def test_kill9_of_a_proxy_clients_resume_on_the_other_exactly_once(start: Any) -> None:
    bs, ps = await cluster(start, 2, 2)
    target = {"proxy": ps[0]}
    browsers = [EventSource(lambda: target["proxy"].endpoints["http"], "t").start() for _ in range(20)]
    native = NativeClient(lambda: target["proxy"].endpoints["grpc"], ["t"])
    await wait_for(lambda: all_subscribed(ps[0], 21, 2), what="21 subscribers with interest applied")
    publisher = Publisher(grpc_addresses(bs)).start(interval=0.005)
    await wait_for(lambda: all(len(b.events) > 100 for b in browsers), what="events flowing")
    target["proxy"] = ps[1]
    ps[0].proc.kill()  # kill -9: no drain, no goodbye; everyone reconnects to p1 with their last id
    await wait_for(lambda: all_subscribed(ps[1], 21, 2), what="everyone back at p1")
    moved = sum(publisher.sent)
    await wait_for(lambda: sum(publisher.sent) >= moved + 100, what="events published while they are on p1")
    await publisher.stop()
    clients = [*browsers, native]
    await wait_for(lambda: all(publisher.all_received(c.events) for c in clients), timeout=20,
                   what="every event at every client")
    assert sum(publisher.sent) > 200
    for k, b in enumerate(browsers):
        publisher.assert_exactly_once_in_order(b.events, f"browser {k}")
        assert not b.gaps and set(b.statuses) == {200}
    publisher.assert_exactly_once_in_order(native.events, "native")
    assert native.gaps == 0
    for c in clients:
        await c.close()


async def test_sigterm_drain_clients_come_back_to_the_restarted_proxy(start: Any) -> None:
    bs, ps = await cluster(start, 1, 1)
    old = ps[0]
    browsers = [EventSource(lambda: old.endpoints["http"], "t").start() for _ in range(60)]
    await wait_for(lambda: all_subscribed(old, 60, 1), what="60 subscribers")
    publisher = Publisher(grpc_addresses(bs)).start(interval=0.004)
    await wait_for(lambda: all(len(b.events) > 20 for b in browsers), what="events flowing")
    ports = {"grpc-port": old.port("grpc"), "http-port": old.port("http"), "control-port": old.port("control")}
    assert old.stop(signal.SIGTERM) == 0  # drains: readiness fails, then paced closes with `retry:`
    new = start("proxy", "p0", ports=ports)  # restarted on the same ports, as `neoplasma up` does
    await push(new, 1, members(bs))
    await wait_for(lambda: all_subscribed(new, 60, 1), timeout=20, what="everyone back at the restarted proxy")
    await asyncio.sleep(0.3)
    await publisher.stop()
    await wait_for(lambda: all(publisher.all_received(b.events) for b in browsers), timeout=20, what="all events")
    for k, b in enumerate(browsers):
        assert set(b.statuses) == {200}, f"browser {k} got {b.statuses}: EventSource would have given up"
        publisher.assert_exactly_once_in_order(b.events, f"browser {k}")
        assert not b.gaps
    assert all(len(b.statuses) >= 2 for b in browsers)  # each did come back
    for b in browsers:
        await b.close()


async def test_broker_scale_in_under_load_with_resumption(start: Any) -> None:
    bs, ps = await cluster(start, 2, 2)
    target = {"proxy": ps[0]}
    browsers = [EventSource(lambda: target["proxy"].endpoints["http"], "t").start() for _ in range(10)]
    await wait_for(lambda: all_subscribed(ps[0], 10, 2), what="subscribers")
    publisher = Publisher(grpc_addresses(bs)).start(interval=0.005)
    await wait_for(lambda: all(len(b.events) > 50 for b in browsers), what="events flowing")
    for p in ps:  # scale-in: b1 is DRAINING first ...
        await push(p, 2, members(bs, draining=("b1",)))
    target["proxy"] = ps[1]
    ps[0].proc.kill()  # ... while the subscribers' proxy dies mid-relay and they resume at p1
    # Resumed at p1 while b1 still runs: each has event `before + 1` of b1, published only once
    # b1 acknowledged event `before` (which may have been in flight, and relayed by p0, at the kill).
    before = publisher.sent[1]
    await wait_for(lambda: all(publisher.received_from(b.events, 1) > before + 1 for b in browsers),
                   what="resumed at p1")
    assert bs[1].stop(signal.SIGTERM) == 0  # refuses publishes, flushes, ends its relays cleanly
    await publisher.stop(1)
    await push(ps[1], 3, members(bs[:1]))  # ... then removed
    await asyncio.sleep(0.3)
    await publisher.stop()
    with contextlib.suppress(AssertionError):  # the assertions below say what is missing
        await wait_for(lambda: all(publisher.all_received(b.events) for b in browsers), timeout=20)
    for k, b in enumerate(browsers):
        publisher.assert_exactly_once_in_order(b.events, f"browser {k} (gaps: {b.gaps})")
        assert not b.gaps and set(b.statuses) == {200}
    # A client resuming after the broker is gone, with a position that covers all of it: no gap.
    late = EventSource(lambda: ps[1].endpoints["http"], "t", token=browsers[0].last_id).start()
    await wait_for(lambda: all_subscribed(ps[1], 11, 1), what="late resume")
    assert not late.gaps and not late.events
    for b in [*browsers, late]:
        await b.close()


async def test_token_beyond_retention_garbled_or_foreign_gives_the_gap_signal(start: Any) -> None:
    bs, ps = await cluster(start, 1, 1, "--retention-bytes", "4000")
    http = ps[0].endpoints["http"]
    first = EventSource(lambda: http, "t").start()
    await wait_for(lambda: all_subscribed(ps[0], 1, 1), what="subscriber")
    publisher = Publisher(grpc_addresses(bs)).start(interval=0)
    await wait_for(lambda: first.events, what="one event")
    early = first.last_id
    await first.close()
    await wait_for(lambda: publisher.sent[0] > 200, what="retention overrun")  # 200 x ~180 B > 4000 B
    await publisher.stop()
    garbled = EventSource(lambda: http, "t", token="not a token!").start()
    foreign = EventSource(lambda: http, "t", token=encode_token(cluster_tag("elsewhere"), {1: 5}).decode()).start()
    late = EventSource(lambda: http, "t", token=early).start()
    query = EventSource(lambda: http, "t&lastEventId=%25%25").start()  # the query form (a page that reloads)
    clients = [garbled, foreign, late, query]
    await wait_for(lambda: all(c.gaps for c in clients), what="gap signals")
    assert "another cluster" in foreign.gaps[0]["reason"] and "base64" in garbled.gaps[0]["reason"]
    assert "base64" in query.gaps[0]["reason"] and "no longer holds" in late.gaps[0]["reason"]
    assert 0 < len(late.events) < publisher.sent[0]  # what is retained, after the gap signal
    marker = len(late.events)
    publisher = Publisher(grpc_addresses(bs)).start(interval=0.01)
    await wait_for(lambda: all(len(c.events) > (marker if c is late else 0) for c in clients),
                   what="live events after the gap")
    await publisher.stop()
    for c in clients:
        assert set(c.statuses) == {200}
        await c.close()


async def test_native_stream_resumes_with_the_batch_token(start: Any) -> None:
    bs, ps = await cluster(start, 2, 2)
    target = {"proxy": ps[0]}
    client = NativeClient(lambda: target["proxy"].endpoints["grpc"], ["t"])
    await wait_for(lambda: all_subscribed(ps[0], 1, 2), what="subscriber")
    publisher = Publisher(grpc_addresses(bs)).start(interval=0.002)
    await wait_for(lambda: len(client.events) > 100, what="events")
    await client.close()  # gone for a while ...
    await wait_for(lambda: min(publisher.sent) > 300, what="events published meanwhile")
    resumed = NativeClient(lambda: ps[1].endpoints["grpc"], ["t"])  # ... back at another proxy
    resumed.token, resumed.events = client.token, list(client.events)
    await publisher.stop()
    await wait_for(lambda: publisher.all_received(resumed.events), what="every event")
    publisher.assert_exactly_once_in_order(resumed.events, "native")
    assert resumed.gaps == 0
    await resumed.close()


async def stalled_native_stream(address: str, token: str, stall: float, want: int) -> tuple[list[int], bool]:
    """A native stream resuming from `token` whose client takes nothing for `stall` seconds (its 64 KiB
    HTTP/2 window fills), then reads on until `want` events or the end: (their "n"s, whether it ended)."""
    reader, writer, client = await h2_client(address)
    client.send_headers(1, grpc_request_headers("/neoplasma.v1.Subscriber/Subscribe"))
    request = pb.SubscribeRequest(topics=["t"], resume_token=token).SerializeToString()
    client.send_data(1, b"\0" + len(request).to_bytes(4, "big") + request, end_stream=True)
    writer.write(client.data_to_send())
    await asyncio.sleep(stall)  # the load shape (a client that stalls), not a synchronisation
    got: list[int] = []
    inbox, ended = b"", False
    while len(got) < want and not ended:
        data = await asyncio.wait_for(reader.read(1 << 16), 30)
        for event in client.receive_data(data) if data else []:
            if isinstance(event, DataReceived):
                client.acknowledge_received_data(event.flow_controlled_length, 1)
                inbox += event.data
                while len(inbox) >= 5 and len(inbox) >= 5 + (size := int.from_bytes(inbox[1:5], "big")):
                    got += [json.loads(e.data)["n"] for e in pb.EventBatch.FromString(inbox[5:5 + size]).events]
                    inbox = inbox[5 + size:]
            ended |= isinstance(event, StreamEnded | StreamReset)
        ended |= not data
        writer.write(client.data_to_send())
    writer.close()
    return got, ended


async def test_native_catch_up_larger_than_the_grpc_buffer_waits_for_a_stalled_client(start: Any) -> None:
    bs, ps = await cluster(start, 1, 1)
    client = NativeClient(lambda: ps[0].endpoints["grpc"], ["t"])
    await wait_for(lambda: all_subscribed(ps[0], 1, 1), what="subscriber")
    await publish_grpc(bs[0].endpoints["grpc"], [("t", {"b": 0, "n": 0})])
    await wait_for(lambda: client.events, what="the first event")
    await client.close()
    await wait_for(lambda: no_subscribers(ps[0]), what="the subscriber gone")
    pad = "x" * 2000
    for first in range(1, 3001, 100):  # 3000 events of ~2 KB: a 6 MiB catch-up, past the 4 MiB --max-grpc-buffer
        await publish_grpc(bs[0].endpoints["grpc"], [("t", {"n": n, "pad": pad}) for n in range(first, first + 100)])
    got, ended = await stalled_native_stream(ps[0].endpoints["grpc"], client.token, stall=1.0, want=3000)
    assert got == list(range(1, 3001)) and not ended  # all of it, in order, on the one stream
    assert (await proxy_status(ps[0].endpoints["control"])).slow_subscribers_dropped == 0


async def no_subscribers(proxy: Server) -> bool:
    return (await proxy_status(proxy.endpoints["control"])).subscribers == 0


class Recorder(Subscriber):
    """A subscriber that keeps what it is given, live or (as its own catch-up sink) replayed."""

    kind = "sse"

    def __init__(self) -> None:
        super().__init__()
        self.events: list[Event] = []
        self.tokens: list[bytes] = []  # the ids it was given while catching up
        self.gaps: list[str] = []

    @staticmethod
    def encode(batch: Batch, indices: list[int]) -> list[Event]:
        return [batch.events[i] for i in indices]

    def deliver(self, encoded: object, position: bool = True) -> bool:
        self.events += encoded  # type: ignore[arg-type]
        return True

    def signal_gap(self, reason: str, token: bytes) -> bool:
        self.gaps.append(reason)
        return True

    async def send(self, events: Sequence[Event], tokens: Sequence[bytes]) -> None:
        self.events += events
        self.tokens += tokens

    async def gap(self, reason: str) -> None:
        self.gaps.append(reason)

    def send_now(self, events: Sequence[Event], tokens: Sequence[bytes], gaps: Sequence[str]) -> None:
        self.gaps += gaps
        self.events += events
        self.tokens += tokens


async def settled_proxy(start: Any) -> tuple[Server, Hub, LinkSet, Any]:
    """A broker process and, in this process, a proxy's hub and links settled on it; the hub's
    dispatcher is stopped, so the heads its relay reports wait until a test starts one."""
    b = start("broker", "b0")
    hub = Hub()
    links = LinkSet(hub, "p0", 1 << 20, ACCESS)
    dispatcher = asyncio.create_task(hub.run_dispatcher())
    await links.apply(Snapshot(1, (Member("b0", b.endpoints["grpc"]),), CLUSTER))
    [link] = links.links.values()
    assert await links.changed.wait_until(links.settled, 10)
    dispatcher.cancel()
    return b, hub, links, link


async def test_resume_replays_what_the_broker_accepted_before_it_applied_the_new_interest(start: Any) -> None:
    """The proxy's position lags the head at which a broker applied the interest of a resuming
    subscriber until the dispatcher (which lingers when busy) takes the acknowledgement. A token at
    or past that stale position still misses what the broker accepted before applying the interest:
    those events were never relayed, so the resume must replay them."""
    b, hub, links, link = await settled_proxy(start)
    await publish_grpc(b.endpoints["grpc"], [("t", {"n": n}) for n in range(20)])  # seq 1..20, not relayed
    decided = asyncio.Event()

    class Probe(Resume):
        def _caught_up(self, skip: dict[int, int]) -> bool:  # first asked once replay is done or skipped
            decided.set()
            return super()._caught_up(skip)

    client = Recorder()  # it saw seq 1..10 at another proxy: the proxy's position (0) is not past that
    resume = Probe(hub, links, client, frozenset({"t"}), client, 10.0)
    task = start_resume(resume, encode_token(hub.tag, {link.epoch: 10}).decode())
    await asyncio.wait_for(decided.wait(), 10)
    dispatcher = asyncio.create_task(hub.run_dispatcher())  # the acknowledgement's head lands only now
    await asyncio.wait_for(task, 10)
    await publish_grpc(b.endpoints["grpc"], [("t", {"n": n}) for n in range(20, 25)])  # live, relayed
    await hub.advanced.wait_until(lambda: len(client.events) >= 15, 10)
    assert [json.loads(e.data)["n"] for e in client.events] == list(range(10, 25)) and not client.gaps
    dispatcher.cancel()
    await links.close()


async def test_resume_ends_when_a_link_is_removed_before_its_relay_caught_up_with_the_gap_if_unclean(
        start: Any) -> None:
    """A broker killed and removed from membership while a resume waits for its relay to reach the
    replay's head: the resume goes on at once, with the gap for the relay lost without a clean end
    (not after the whole wait, with a gap for a relay that "fell behind")."""
    b, hub, links, link = await settled_proxy(start)  # positions cannot reach the replay's head
    await publish_grpc(b.endpoints["grpc"], [("t", {"n": n}) for n in range(5)])
    decided = asyncio.Event()

    class Probe(Resume):
        def _caught_up(self, skip: dict[int, int]) -> bool:
            decided.set()
            return super()._caught_up(skip)

    client = Recorder()
    task = start_resume(Probe(hub, links, client, frozenset({"t"}), client, 30.0),
                        encode_token(hub.tag, {link.epoch: 0}).decode())
    await asyncio.wait_for(decided.wait(), 10)
    b.stop(signal.SIGKILL)
    await links.apply(Snapshot(2, (), CLUSTER))  # removed: once its relay is seen lost, its epoch is retired
    dispatcher = asyncio.create_task(hub.run_dispatcher())
    await asyncio.wait_for(task, 5)
    await asyncio.wait_for(asyncio.gather(*(task for _, task in links.leaving.values())), 5)
    assert [json.loads(e.data)["n"] for e in client.events] == list(range(5))
    assert client.gaps == ["broker b0 went away; its events since may be lost"]
    dispatcher.cancel()
    await links.close()


async def test_a_resume_whose_relay_lags_its_replay_gets_each_event_once(start: Any) -> None:
    """A relay that has not reached the replay's head by the end of the wait (a proxy whose dispatcher is behind, a
    relay backed up): the subscriber is not put on the live path with the relay's events up to that head still to
    come (each would arrive a second time); it gets the later ones passed on by its holder until the relay has
    caught up, then goes live: each event once, and no gap (none was missed)."""
    b, hub, links, link = await settled_proxy(start)  # its dispatcher stopped: positions stay where they are
    budget = ResumeBudget()
    for _ in range(MAX_REPLAYS):  # the replay is made only once these are relayed (they wait in the hub)
        await budget.replays.acquire()
    client = Recorder()
    task = start_resume(Resume(hub, links, client, frozenset({"t"}), client, 0.5, budget),
                        encode_token(hub.tag, {link.epoch: 0}).decode())
    await wait_for(lambda: any(s.readers for s in budget.gathering.values()),  # (from seq 0: gathered)
                   what="the resume's replay waiting for its turn")
    await publish_grpc(b.endpoints["grpc"], [("t", {"n": n}) for n in range(5)])  # relayed (not dispatched) ...
    await wait_for(lambda: link.position >= 5, what="the events relayed")
    for _ in range(MAX_REPLAYS):
        budget.replays.release()  # ... and replayed
    await wait_for(lambda: len(client.events) == 5, what="the replay")
    await asyncio.sleep(1.0)  # the wait for the relay (0.5 s) runs out
    dispatcher = asyncio.create_task(hub.run_dispatcher())  # now the relayed copies come
    await publish_grpc(b.endpoints["grpc"], [("t", {"n": 5})])
    await asyncio.wait_for(task, 10)
    await publish_grpc(b.endpoints["grpc"], [("t", {"n": 6})])
    await hub.advanced.wait_until(lambda: len(client.events) >= 7, 10)
    await asyncio.sleep(0.05)  # time for a duplicate, if any, to arrive too
    assert [json.loads(e.data)["n"] for e in client.events] == list(range(7)) and not client.gaps, client.gaps
    dispatcher.cancel()
    await links.close()


@pytest.mark.parametrize(("raised", "event", "level", "reason"), [
    (ConnectionResetError("cannot write to a closed subscriber connection"), "resume_client_left", logging.INFO,
     "gone"),
    (RuntimeError("a bug"), "resume_failed", logging.ERROR, "error")])
async def test_a_resume_whose_client_left_is_not_logged_as_an_error(
        start: Any, caplog: pytest.LogCaptureFixture, raised: Exception, event: str, level: int, reason: str) -> None:
    """Catch-up writing to a connection its client has closed (it left mid-replay) ends the subscriber
    as gone, with an info line; anything else that ends a catch-up is still an error."""
    b, hub, links, link = await settled_proxy(start)
    await publish_grpc(b.endpoints["grpc"], [("t", {"n": n}) for n in range(5)])

    class Leaving(Recorder):
        async def send(self, events: Sequence[Event], tokens: Sequence[bytes]) -> None:
            raise raised

    client = Leaving()
    with caplog.at_level(logging.INFO, logger="neoplasma.proxy.resume"):
        task = start_resume(Resume(hub, links, client, frozenset({"t"}), client, 10.0),
                            encode_token(hub.tag, {link.epoch: 0}).decode())
        await asyncio.wait({task}, timeout=10)
        assert task.done()
    lines = [(r.getMessage(), r.levelno) for r in caplog.records if r.name == "neoplasma.proxy.resume"]
    assert lines == [(event, level)]
    assert client.closed.done() and client.closed.result() == reason
    await links.close()


async def in_process_broker(name: str = "b0", max_request_bytes: int | None = None
                            ) -> tuple[Broker, grpc.aio.Server, str]:
    """A broker's relay face served in this process (so a test can reach into it), reading messages of at most
    `max_request_bytes` if given (as `neoplasma broker --max-request-bytes` does)."""
    if max_request_bytes is None:
        broker = Broker(BrokerConfig(name=name))
        server = grpc.aio.server()
    else:
        broker = Broker(BrokerConfig(name=name, max_request_bytes=max_request_bytes))
        server = grpc.aio.server(options=[("grpc.max_receive_message_length", max_request_bytes)])
    server.add_generic_rpc_handlers((relay_handler(BrokerServicer(broker)),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return broker, server, f"127.0.0.1:{port}"


def numbered(*ns: int) -> list[tuple[str, bytes]]:
    return [("x", json.dumps({"n": n}).encode()) for n in ns]


def numbers(events: Sequence[Event]) -> list[int]:
    return [json.loads(e.data)["n"] for e in events]


def in_process_proxy(name: str) -> tuple[Hub, LinkSet, asyncio.Task[None], Recorder]:
    """A proxy's hub (its dispatcher running) and links in this process, with one subscriber of "x"."""
    hub = Hub()
    client = Recorder()
    hub.add(client, ["x"])
    return hub, LinkSet(hub, name, 1 << 20, PLAIN), asyncio.create_task(hub.run_dispatcher()), client


async def test_relay_lost_mid_epoch_ends_with_an_error_and_the_broker_backfills_from_the_proxy_position(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """An OK end of a relay is a drained broker's (everything was relayed): an unexpected error in
    the broker's interest reader must not end the stream that way. The proxy reconnects and the
    broker first sends what it accepted since the proxy's position: nothing lost, no gap."""
    broker, server, address = await in_process_broker()
    hub, links, dispatcher, client = in_process_proxy("p0")
    await links.apply(Snapshot(1, (Member("b0", address),), CLUSTER))
    [link] = links.links.values()
    assert await links.changed.wait_until(links.settled, 10)
    broker.accept(numbered(0), "publisher")
    assert await hub.advanced.wait_until(lambda: len(client.events) == 1, 10)
    update = broker.router.update_interest

    def fail_once(*args: Any) -> None:
        monkeypatch.setattr(broker.router, "update_interest", update)
        raise RuntimeError("a bug")

    monkeypatch.setattr(broker.router, "update_interest", fail_once)
    hub.add(Recorder(), ["y"])  # the broker fails applying this interest
    assert await links.changed.wait_until(lambda: link.state == LinkState.BACKOFF, 10)
    assert link.last_error.startswith("INTERNAL"), link.last_error
    broker.accept(numbered(1, 2), "publisher")  # no relay is open now (no await since BACKOFF was seen)
    assert await links.changed.wait_until(links.settled, 10)
    assert await hub.advanced.wait_until(lambda: len(client.events) >= 3, 10)
    broker.accept(numbered(3), "publisher")
    assert await hub.advanced.wait_until(lambda: len(client.events) >= 4, 10)
    assert numbers(client.events) == [0, 1, 2, 3] and client.gaps == []
    dispatcher.cancel()
    await links.close()
    await server.stop(None)


async def test_a_relay_reopened_with_more_interest_than_the_broker_reads_in_one_message_loses_nothing(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A relay lost and reopened to a broker that reads messages of at most 64 KiB, while the proxy wants 100 KB of
    topics: the first Interest goes in parts the broker reads, all applied before it backfills; what the broker
    accepted while the relay was down reaches every subscriber once (before, the reopened relay was refused for
    its first message, again and again)."""
    broker, server, address = await in_process_broker(max_request_bytes=65536)
    hub = Hub()
    links = LinkSet(hub, "p0", 1 << 20, PLAIN)
    dispatcher = asyncio.create_task(hub.run_dispatcher())
    await links.apply(Snapshot(1, (Member("b0", address),), CLUSTER))
    assert await links.changed.wait_until(links.settled, 10)
    [link] = links.links.values()
    topics = [f"{i:03d}" + "x" * 247 for i in range(400)]
    clients = [Recorder() for _ in topics]
    for client, topic in zip(clients, topics, strict=True):
        hub.add(client, [topic])
    assert await links.changed.wait_until(links.settled, 10)
    broker.accept([(topic, b'{"r": 0}') for topic in topics], "publisher")
    await wait_for(lambda: all(c.events for c in clients), what="the first round")
    update = broker.router.update_interest

    def fail_once(*args: Any) -> None:
        monkeypatch.setattr(broker.router, "update_interest", update)
        raise RuntimeError("a bug")

    monkeypatch.setattr(broker.router, "update_interest", fail_once)
    hub.add(Recorder(), ["y"])  # the broker fails applying this interest: the relay is lost ...
    assert await links.changed.wait_until(lambda: link.state == LinkState.BACKOFF, 10)
    broker.accept([(topic, b'{"r": 1}') for topic in topics], "publisher")  # (no relay open now)
    assert await links.changed.wait_until(links.settled, 10)  # ... and reopened, asking for all 100 KB
    broker.accept([(topic, b'{"r": 2}') for topic in topics], "publisher")  # live
    await wait_for(lambda: all(len(c.events) >= 3 for c in clients), what="every subscriber's events")
    await asyncio.sleep(0.05)  # time for a duplicate, if any, to arrive too
    for client, topic in zip(clients, topics, strict=True):
        assert [(e.topic, json.loads(e.data)["r"]) for e in client.events] == [(topic, r) for r in range(3)]
        assert not client.gaps, client.gaps
    dispatcher.cancel()
    await links.close()
    await server.stop(None)


async def test_a_new_broker_reading_less_than_the_proxys_interest_gets_it_in_parts() -> None:
    """A broker new to a proxy (never heard from) that reads messages of at most 64 KiB, as its other brokers said
    they do, while the proxy wants 100 KB of topics: its relay's first Interest goes in parts, and what it accepted
    before the relay reached it is backfilled to every subscriber once (before: refused, again and again)."""
    _, server0, address0 = await in_process_broker("b0", max_request_bytes=65536)
    b1, server1, address1 = await in_process_broker("b1", max_request_bytes=65536)
    hub = Hub()
    links = LinkSet(hub, "p0", 1 << 20, PLAIN)
    dispatcher = asyncio.create_task(hub.run_dispatcher())
    await links.apply(Snapshot(1, (Member("b0", address0),), CLUSTER))
    assert await links.changed.wait_until(links.settled, 10)
    topics = [f"{i:03d}" + "x" * 247 for i in range(400)]
    clients = [Recorder() for _ in topics]
    for client, topic in zip(clients, topics, strict=True):
        hub.add(client, [topic])
    assert await links.changed.wait_until(links.settled, 10)
    b1.accept([(topic, b'{"r": 0}') for topic in topics], "publisher")  # before the proxy knows b1
    await links.apply(Snapshot(2, (Member("b0", address0), Member("b1", address1)), CLUSTER))
    assert await links.changed.wait_until(links.settled, 10)
    b1.accept([(topic, b'{"r": 1}') for topic in topics], "publisher")  # live
    await wait_for(lambda: all(len(c.events) >= 2 for c in clients), what="every subscriber's events")
    await asyncio.sleep(0.05)  # time for a duplicate, if any, to arrive too
    for client, topic in zip(clients, topics, strict=True):
        assert [(e.topic, json.loads(e.data)["r"]) for e in client.events] == [(topic, 0), (topic, 1)]
        assert not client.gaps, client.gaps
    dispatcher.cancel()
    await links.close()
    await server0.stop(None)
    await server1.stop(None)


async def test_a_burst_of_new_topics_reaches_the_broker_in_a_few_interest_messages(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """400 subscribers of a topic each join one per pass of the loop (as a burst of resumes set up in turns does): the
    relay stream writes their interest in at most one message per INTEREST_INTERVAL (before: about one per pass, 1000
    forged resumes ~460 messages, each applied and acknowledged by the broker), every topic is applied, and live
    events reach each subscriber once."""
    broker, server, address = await in_process_broker()
    hub, links, dispatcher, _ = in_process_proxy("p0")
    await links.apply(Snapshot(1, (Member("b0", address),), CLUSTER))
    assert await links.changed.wait_until(links.settled, 10)
    applied: list[int] = []
    update = broker.router.update_interest

    def counted(stream: RelayStream, add: Sequence[str], remove: Sequence[str], replace: bool) -> None:
        applied.append(len(add))
        update(stream, add, remove, replace)

    monkeypatch.setattr(broker.router, "update_interest", counted)
    clients = [Recorder() for _ in range(400)]
    began = time.monotonic()
    for n, client in enumerate(clients):
        hub.add(client, [f"t{n}"])
        await asyncio.sleep(0)
    assert await links.changed.wait_until(links.settled, 10)
    took = time.monotonic() - began
    assert sum(applied) == 400
    assert len(applied) <= took / links_module.INTEREST_INTERVAL + 2, (len(applied), took)
    broker.accept([(f"t{n}", b'{"n": 1}') for n in range(400)], "publisher")
    await wait_for(lambda: all(c.events for c in clients), what="every subscriber's event")
    await asyncio.sleep(0.05)  # time for a duplicate, if any, to arrive too
    assert [len(c.events) for c in clients] == [1] * 400
    dispatcher.cancel()
    await links.close()
    await server.stop(None)


async def test_a_broker_removed_while_it_drains_delivers_what_it_flushes() -> None:
    """The operator removes a draining broker from the membership (its pod turned unready) while
    the broker still flushes what it accepted: the proxy's link runs on until the broker ends the
    relay cleanly, so those events arrive and no gap is signalled."""
    broker, server, address = await in_process_broker()
    hub, links, dispatcher, client = in_process_proxy("p0")
    await links.apply(Snapshot(1, (Member("b0", address),), CLUSTER))
    assert await links.changed.wait_until(links.settled, 10)
    broker.accept(numbered(0), "publisher")
    assert await hub.advanced.wait_until(lambda: len(client.events) == 1, 10)
    await links.apply(Snapshot(2, (), CLUSTER))
    assert list(links.leaving) == ["b0"]
    broker.accept(numbered(1, 2), "publisher")  # accepted before it stopped taking publishes
    broker.closing = True  # drained: the relay sends its last head and ends with OK
    for stream in broker.router.streams:
        stream.wake.set()
    assert await hub.advanced.wait_until(lambda: len(client.events) >= 3, 10)
    await asyncio.wait_for(asyncio.gather(*(task for _, task in links.leaving.values())), 10)
    assert numbers(client.events) == [0, 1, 2] and client.gaps == [] and not links.leaving
    dispatcher.cancel()
    await links.close()
    await server.stop(None)


async def test_events_a_new_broker_accepted_before_the_relay_reached_it_are_backfilled_once(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A broker added to a proxy that already has subscribers: what it accepted before the proxy's
    relay arrived (publishers find it through its Service first) reaches them, exactly once; a
    broker removed and added back (its readiness flapped) resumes from where the proxy left off."""
    broker, server, address = await in_process_broker()
    hub, links, dispatcher, client = in_process_proxy("p0")
    await links.apply(Snapshot(1, (), CLUSTER))
    broker.accept(numbered(0, 1), "publisher")  # before any relay
    await links.apply(Snapshot(2, (Member("b0", address),), CLUSTER))
    assert await links.changed.wait_until(links.settled, 10)
    broker.accept(numbered(2), "publisher")
    assert await hub.advanced.wait_until(lambda: len(client.events) >= 3, 10)
    await links.apply(Snapshot(3, (), CLUSTER))  # removed (a clean stop of the link: no gap) ...
    broker.accept(numbered(3), "publisher")
    await links.apply(Snapshot(4, (Member("b0", address),), CLUSTER))  # ... and back, same epoch
    assert await links.changed.wait_until(links.settled, 10)
    broker.accept(numbered(4), "publisher")
    assert await hub.advanced.wait_until(lambda: len(client.events) >= 5, 10)
    assert numbers(client.events) == [0, 1, 2, 3, 4]
    # A proxy whose subscribers are younger than the broker's events gets none of them (without the
    # slack for a busy broker, which would let events up to that much older through).
    monkeypatch.setattr(links_module, "BACKFILL_SLACK", 0.0)
    await asyncio.sleep(0.002)  # backfill_ms is whole milliseconds, rounded up: event 4 must be older than that
    hub2, links2, dispatcher2, late = in_process_proxy("p1")
    await links2.apply(Snapshot(1, (Member("b0", address),), CLUSTER))
    assert await links2.changed.wait_until(links2.settled, 10)
    broker.accept(numbered(5), "publisher")
    assert await hub2.advanced.wait_until(lambda: len(late.events) >= 1, 10)
    assert numbers(late.events) == [5] and numbers(client.events[5:]) in ([], [5])
    dispatcher.cancel()
    dispatcher2.cancel()
    await links.close()
    await links2.close()
    await server.stop(None)


async def read_sse_prefix(address: str, topics: str, enough: Callable[[list[dict[str, Any]]], bool],
                          token: str = "") -> tuple[list[dict[str, Any]], str, int]:
    """A raw-socket subscriber that reads 97 bytes at a time, parsing as EventSource does, and cuts the
    connection as soon as `enough(events)`: usually in the middle of one of the proxy's writes. Returns
    the events it parsed, the last id (what EventSource would send back) and how many events of the cut
    write it had not parsed (0 when the cut fell between writes)."""
    host, port = address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(f"GET /?eventType={topics} HTTP/1.1\r\nHost: {address}\r\nLast-Event-ID: {token}\r\n\r\n"
                 .encode())
    raw = bytearray()
    events: list[dict[str, Any]] = []
    last_id, parsed = token, 0  # bytes of the body parsed as whole events
    body = bytearray()
    while not enough(events):
        piece = await asyncio.wait_for(reader.read(97), 10)
        assert piece, "the proxy ended the stream"
        raw += piece
        start = raw.find(b"\r\n\r\n")
        if start < 0:
            continue
        body[:] = b""
        i = start + 4
        while (end := raw.find(b"\r\n", i)) >= 0:  # the chunks' payloads so far (the last one maybe partial)
            size = int(raw[i:end], 16)
            body += raw[end + 2:end + 2 + size]
            i = end + 2 + size + 2
        while (stop := body.find(b"\n\n", parsed)) >= 0 and not enough(events):
            frame = body[parsed:stop].decode()
            parsed = stop + 2
            fields = {name: value.removeprefix(" ") for name, _, value in (line.partition(":") for line in
                                                                           frame.split("\n")) if name}
            last_id = fields.get("id", last_id)
            if "data" in fields and "event" not in fields:
                events.append(json.loads(fields["data"]))
    unparsed = body[parsed:].count(b"data: ")  # of the write being read when cut, seen but not taken
    writer.transport.abort()  # the cut: unread data and all
    return events, last_id, unparsed


async def test_a_cut_in_the_middle_of_a_write_resumes_at_another_proxy_exactly_once(start: Any) -> None:
    """EventSource keeps the id of the last event it parsed whole; a connection cut after the client parsed
    part of one write (many events) must resume after exactly that event: every event has its own id. Inside a
    write that id is a pointer (docs/resume.md, "Pointer ids"): the other proxy has it resolved by the one that
    issued it, through a broker."""
    bs, ps = await cluster(start, 2, 2)
    for p in ps:
        await wait_for(lambda p=p: links_ready(p.endpoints["control"], 2), what="links")
    cuts_mid_write = pointers = 0
    for attempt in range(3):
        need = 7 + 50 * attempt  # where the cut falls: inside the first write, or further on
        first = asyncio.create_task(read_sse_prefix(ps[0].endpoints["http"], "t",
                                                    lambda events, need=need: len(events) >= need))
        # (Or already cut: a fresh subscriber is owed what a broker accepted before it came that p0 has not relayed, up
        # to its position, or by time when it has none: the last attempt's events, published after its subscriber
        # left. With `need` of them it is cut right after it swapped in, between two looks at p0's status.)
        await wait_for(lambda first=first: first.done() or all_subscribed(ps[0], 1, 2), timeout=20,
                       what="the subscriber at p0")
        # 200 events per broker in one request: each reaches the proxy in one relay message, one round, one write.
        for b, broker in enumerate(bs):
            await publish_grpc(broker.endpoints["grpc"], [("t", {"b": b, "n": 200 * attempt + n}) for n in range(200)])
        before, last_id, unparsed = await first
        cuts_mid_write += unparsed > 0
        assert last_id and len(before) == need
        # Cut inside a live write, the client holds a pointer (catch-up writes give every event its full token).
        if unparsed and is_pointer(last_id):
            assert len(last_id) == POINTER_CHARS, last_id
            pointers += 1
        after = EventSource(lambda: ps[1].endpoints["http"], "t", token=last_id).start()
        burst = {(b, 200 * attempt + n) for b in (0, 1) for n in range(200)}

        def complete(before: list[dict[str, Any]] = before, after: EventSource = after,
                     burst: set[tuple[int, int]] = burst) -> bool:
            return {(e["data"]["b"], e["data"]["n"]) for e in [*before, *after.events]} >= burst

        await wait_for(complete, timeout=20, what=f"the rest of attempt {attempt}'s events at p1")
        await asyncio.sleep(0.2)  # time for a duplicate, if any, to arrive too
        await after.close()
        assert not after.gaps, after.gaps
        got = [(e["data"]["b"], e["data"]["n"]) for e in [*before, *after.events]]
        for b in (0, 1):
            # From its first event on, each broker's events exactly once, in order, to the last one published
            # (a fresh subscriber may begin with events accepted just before it came: docs/resume.md).
            seen = [n for k, n in got if k == b]
            assert seen == list(range(seen[0], 200 * (attempt + 1))) and seen[0] <= 200 * attempt, (
                f"attempt {attempt}, broker {b}: lost or repeated: {seen[:5]}...{seen[-5:]} ({len(seen)})")
        await wait_for(lambda: all_subscribed(ps[0], 0, 2), timeout=20, what="the cut subscriber gone from p0")
    assert cuts_mid_write and pointers, "no cut fell inside a live write: the test proved nothing"
    resolved = await counters(ps[1].endpoints["http"], "neoplasma_proxy_pointer_resolves_total", "result")
    assert resolved == {"local": 0, "remote": pointers, "unresolved": 0}, resolved


async def gap_then_live(proxy: Server, broker: Server, token: str, reason: str) -> EventSource:
    """A client of topic "t" resuming at `proxy` (on 2 brokers) with `token`, which cannot be resumed exactly:
    it gets the gap signal (saying `reason`), then live events (from `broker`), with a 200."""
    after = EventSource(lambda: proxy.endpoints["http"], "t", token=token).start()
    await wait_for(lambda: after.gaps, timeout=20, what="the gap signal")
    assert reason in after.gaps[0]["reason"], after.gaps
    await wait_for(lambda: all_subscribed(proxy, 1, 2), timeout=20, what="the resumed subscriber live")
    await publish_grpc(broker.endpoints["grpc"], [("t", {"b": 0, "n": -1})])
    await wait_for(lambda: any(e["data"]["n"] == -1 for e in after.events), timeout=20, what="a live event")
    assert set(after.statuses) == {200}
    return after


async def proxy_on_brokers(start: Any, monkeypatch: pytest.MonkeyPatch,
                           brokers: int) -> tuple[list[Server], Proxy, asyncio.Task[None]]:
    """Broker processes b0, b1, ... and, in this process, a proxy settled on them, its hub's dispatcher running."""
    monkeypatch.setenv(CREDENTIAL_ENV, CREDENTIAL)
    bs = [start("broker", f"b{i}") for i in range(brokers)]
    proxy = Proxy(ProxyConfig(name="p0"))
    dispatcher = asyncio.create_task(proxy.hub.run_dispatcher())
    await proxy.links.apply(Snapshot(1, tuple(Member(b.name, b.endpoints["grpc"]) for b in bs), CLUSTER))
    assert await proxy.links.changed.wait_until(proxy.links.settled, 10)
    return bs, proxy, dispatcher


async def test_a_token_issued_before_version_2_resumes_exactly(
        start: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Clients hold ids across an upgrade: a version 1 token (epochs in full) resumes as it did."""
    bs, proxy, dispatcher = await proxy_on_brokers(start, monkeypatch, 2)
    hub, links = proxy.hub, proxy.links
    epochs = {b.name: link.epoch for b in bs for link in links.links.values() if link.member.name == b.name}
    for b in bs:
        await publish_grpc(b.endpoints["grpc"], [("t", {"b": b.name, "n": n}) for n in range(10)])
    old = v1_token(hub.tag, {epochs["b0"]: 4, epochs["b1"]: 7})  # b0's first 4 and b1's first 7 were seen
    client = Recorder()
    task = proxy.subscribe(client, ["t"], old, client)
    assert task is not None
    await asyncio.wait_for(task, 10)
    got = sorted((e["b"], e["n"]) for e in map(json.loads, (e.data for e in client.events)))
    assert got == [("b0", n) for n in range(4, 10)] + [("b1", n) for n in range(7, 10)] and not client.gaps
    # ... and it is then given version 2 ids (the token it would send next), naming the same brokers.
    assert decode_token(client.tokens[-1].decode(), hub.tag, epochs.values()) == \
        {epochs["b0"]: 10, epochs["b1"]: 10}
    dispatcher.cancel()
    await links.close()


async def test_fresh_subscriber_gets_no_id_before_a_broker_applied_its_topics(
        start: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A subscriber without a token whose topics a broker has not applied yet is not on the live path
    (where a heartbeat's or another topic's id would claim events the broker accepted meanwhile and
    never relayed) until the broker has; it then gets what the broker accepted since it came."""
    [b], proxy, dispatcher = await proxy_on_brokers(start, monkeypatch, 1)
    hub, links = proxy.hub, proxy.links
    [link] = links.links.values()
    await publish_grpc(b.endpoints["grpc"], [("t", {"n": -1})])  # seq 1, before the subscriber came
    assert await hub.advanced.wait_until(lambda: hub.positions.get(link.epoch, 0) >= 1, 10)  # an idle head
    waiting = link._interest_changed  # what the link's interest writer waits on: it stays unsent
    link._interest_changed = asyncio.Event()
    client = Recorder()
    task = proxy.subscribe(client, ["t"], "", client)
    await publish_grpc(b.endpoints["grpc"], [("t", {"n": 0})])  # seq 2: "t" not applied, never relayed
    assert await hub.advanced.wait_until(lambda: hub.positions.get(link.epoch, 0) >= 2, 10)
    assert client not in hub.subscribers and task is not None  # no heartbeat or event id claims seq 2
    waiting.set()  # the interest goes out: the broker applies "t"
    await asyncio.wait_for(task, 10)
    await publish_grpc(b.endpoints["grpc"], [("t", {"n": 1})])  # seq 3, live
    assert await hub.advanced.wait_until(lambda: len(client.events) >= 2, 10)
    assert [json.loads(e.data)["n"] for e in client.events] == [0, 1] and not client.gaps
    assert [decode_token(t.decode(), hub.tag, [link.epoch]) for t in client.tokens] == [{link.epoch: 2}]
    dispatcher.cancel()
    await links.close()


class AckReadFirst:
    """A relay call whose interest changes (after the first interest) are written as under load: the write returns
    only once the link has read and handled the broker's acknowledgement of it (its reading task ran first), and
    what that woke has run (the checks of `LinkSet.changed` it notified, queued before)."""

    def __init__(self, call: Any) -> None:
        self.call = call
        self.counted = 0  # Interest messages written that the broker acknowledges (not answers or checkpoints)
        self.handled = 0  # the acknowledgements the link has handled (and what they woke has run)
        self.read = Signal()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.call, name)

    def __aiter__(self) -> Any:
        return self._batches()

    async def _batches(self) -> Any:
        async for batch in self.call:
            yield batch
            if batch.interest_applied:  # (run once the link asks for the next message: it handled this one)
                asyncio.get_running_loop().call_soon(self._handled, batch.interest_applied)

    def _handled(self, applied: int) -> None:
        self.handled = applied
        self.read.notify()

    async def write(self, message: pb.Interest) -> None:
        await self.call.write(message)
        if message.resolved or message.HasField("checkpoint"):
            return
        self.counted += 1
        if not message.replace and (message.add or message.remove):  # a change (the first interest is read after)
            assert await self.read.wait_until(lambda: self.handled >= self.counted, 10), "never acknowledged"


class AckReadFirstStub(pb_grpc.BrokerStub):
    def __init__(self, channel: grpc.aio.Channel) -> None:
        super().__init__(channel)
        relay = self.Relay
        self.Relay = lambda **kwargs: AckReadFirst(relay(**kwargs))


async def test_an_interest_change_acknowledged_before_its_write_returned_settles_the_links(
        start: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A busy proxy may read a broker's acknowledgement of an interest change before the write of it returns; the
    link is synced only once its writer then clears the change. Whoever waits for the links to settle (a fresh
    subscriber's catch-up) is woken then, not at the end of its wait (the subscriber got nothing for
    --resume-wait-seconds, then a gap signal, while every broker relayed its topics)."""
    monkeypatch.setattr(links_module, "pb_grpc", type("Stubs", (), {"BrokerStub": AckReadFirstStub}))
    bs, proxy, dispatcher = await proxy_on_brokers(start, monkeypatch, 2)
    hub, links = proxy.hub, proxy.links
    assert proxy.config.resume_wait_seconds > 5
    client = Recorder()
    task = proxy.subscribe(client, ["t"], "", client)
    assert task is not None  # not applied at the brokers: it catches up
    await asyncio.wait_for(task, 5)
    assert client in hub.subscribers and not client.gaps, client.gaps
    for b in bs:
        await publish_grpc(b.endpoints["grpc"], [("t", {"b": b.name})])
    assert await hub.advanced.wait_until(lambda: len(client.events) == 2, 10)  # both brokers relay it
    dispatcher.cancel()
    await links.close()


async def test_first_subscribers_of_many_new_topics_share_one_replay_per_broker(
        start: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fresh subscribers of topics new to the proxy that come together catch up from one Replay call per broker
    (their topics gathered), not one per topic set per broker; each gets exactly the events of its own topics
    that the brokers accepted before applying them, once, and no gap."""
    bs, proxy, dispatcher = await proxy_on_brokers(start, monkeypatch, 2)
    hub, links = proxy.hub, proxy.links
    for b in bs:  # seq 1: each link has a position (with none, the catch-ups gather into a call by time instead)
        await publish_grpc(b.endpoints["grpc"], [("other", {"b": b.name, "n": -1})])
    epochs = [link.epoch for link in links.links.values()]
    assert await hub.advanced.wait_until(lambda: all(hub.positions.get(e, 0) >= 1 for e in epochs), 10)
    held = []
    for link in links.links.values():  # the links' interest stays unsent until released below
        held.append(link._interest_changed)
        link._interest_changed = asyncio.Event()
    topics = {i: [f"n{i}"] for i in range(40)} | {40: ["g"], 41: ["n0", "n1"]}  # "g" has "g:x" (prefix rule)
    clients = {i: Recorder() for i in topics}
    tasks = [proxy.subscribe(clients[i], topics[i], "", clients[i]) for i in topics]
    assert all(task is not None for task in tasks)
    await wait_for(lambda: len(hub.subscribers) == len(topics), timeout=10, what="every catch-up holding")

    async def publish_round(r: int) -> None:
        for b in bs:
            await publish_grpc(b.endpoints["grpc"], [(f"n{i}", {"b": b.name, "n": i, "r": r}) for i in range(40)]
                               + [("g:x", {"b": b.name, "n": 40, "r": r}), ("other", {"b": b.name, "n": -1, "r": r})])

    def got(client: Recorder) -> list[tuple[str, int, int]]:
        return sorted((d["b"], d["r"], d["n"]) for d in map(json.loads, (e.data for e in client.events)))

    def wanted(i: int, rounds: int) -> list[tuple[str, int, int]]:
        return sorted((b.name, r, n) for b in bs for r in range(rounds)
                      for n in ([40] if i == 40 else [0, 1] if i == 41 else [i]))

    await publish_round(0)  # accepted before the brokers applied these topics: never relayed, only replayed
    for event in held:
        event.set()
    await publish_round(1)  # while they catch up: replayed or relayed, once
    await asyncio.wait_for(asyncio.gather(*tasks), 20)  # type: ignore[arg-type]
    await publish_round(2)  # live
    await wait_for(lambda: all(len(got(c)) >= len(wanted(i, 3)) for i, c in clients.items()), timeout=20,
                   what="every subscriber's events")
    for i, client in clients.items():  # exactly once each (and only its own topics')
        assert got(client) == wanted(i, 3), i
        assert not client.gaps, client.gaps
    # Before: one call per topic set per broker (84). Now one per broker for those that came together, and a
    # few more for any that settled before the rest had joined.
    assert proxy.resumes.started <= 2 * len(bs), proxy.resumes.started
    dispatcher.cancel()
    await links.close()


@pytest.mark.parametrize("came", ["with_the_first_interest", "before_the_first_message", "with_no_position"])
async def test_fresh_subscriber_gets_what_a_broker_it_had_no_position_of_accepted_after_it_came(
        monkeypatch: pytest.MonkeyPatch, came: str) -> None:
    """A subscriber without a token that comes while a link has no position (a fresh link: its relay not yet
    open, or open with no message read yet; or a broker that had accepted nothing) gets, exactly once, what
    the broker accepted after it came and before it applied its topics (never relayed: only a replay from
    when it came has them), then the live stream; no gap."""
    broker, server, address = await in_process_broker()
    hub = Hub()
    links = LinkSet(hub, "p0", 1 << 20, PLAIN)
    dispatcher = asyncio.create_task(hub.run_dispatcher())
    client = Recorder()
    tasks: list[asyncio.Task[None]] = []

    def subscribe() -> None:
        tasks.append(start_resume(Resume(hub, links, client, frozenset({"x"}), client, 10.0), ""))

    applying = broker.router.update_interest
    applied: list[bool] = []

    def accept_then_apply(stream: RelayStream, add: Any, remove: Any, replace: bool) -> None:
        if "x" in add and not applied:  # the subscriber came (its holder asked for "x"): accepted before "x" applies
            assert client not in hub.subscribers
            broker.accept(numbered(1), "publisher")
            applied.append(replace)
        applying(stream, add, remove, replace)

    monkeypatch.setattr(broker.router, "update_interest", accept_then_apply)
    if came == "before_the_first_message":  # the relay's first Interest (without "x") is read, nothing answered
        opening = broker.start_backfill

        def subscribe_then_open(stream: RelayStream, first: pb.Interest) -> None:
            assert not links.links["b0"].epoch
            subscribe()
            opening(stream, first)

        monkeypatch.setattr(broker, "start_backfill", subscribe_then_open)
    await links.apply(Snapshot(1, (Member("b0", address),), CLUSTER))
    if came == "with_the_first_interest":
        subscribe()  # before the link's task has run: its relay asks for "x" in its first message
    elif came == "with_no_position":  # settled on a broker that accepted nothing: no position for it
        assert await links.changed.wait_until(links.settled, 10)
        [link] = links.links.values()
        assert link.epoch and link.epoch not in hub.positions and not link.position
        subscribe()
    await wait_for(lambda: len(tasks) == 1, what="the subscriber")
    await asyncio.wait_for(tasks[0], 10)
    assert applied == [came == "with_the_first_interest"]  # "x" first applied as the case says
    broker.accept(numbered(2), "publisher")  # live
    await hub.advanced.wait_until(lambda: len(client.events) >= 2, 10)
    await asyncio.sleep(0.05)  # time for a duplicate, if any, to arrive too
    assert numbers(client.events) == [1, 2] and not client.gaps, (numbers(client.events), client.gaps)
    dispatcher.cancel()
    await links.close()
    await server.stop(None)


async def test_a_garbled_token_resumes_from_when_it_came_exactly(start: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A garbled token is the gap signal, then the stream from when the subscriber came, exactly once, as for one
    without a token: what a broker accepted after it came and before it applied its topics is not lost."""
    [b], proxy, dispatcher = await proxy_on_brokers(start, monkeypatch, 1)
    hub, links = proxy.hub, proxy.links
    [link] = links.links.values()
    await publish_grpc(b.endpoints["grpc"], [("other", {"n": -1})])  # a position
    assert await hub.advanced.wait_until(lambda: hub.positions.get(link.epoch, 0) >= 1, 10)
    held, link._interest_changed = link._interest_changed, asyncio.Event()  # "t" stays unsent until released
    client = Recorder()
    task = proxy.subscribe(client, ["t"], "not a token!", client)
    await wait_for(lambda: len(hub.subscribers) == 1, what="the subscriber come")
    await publish_grpc(b.endpoints["grpc"], [("t", {"n": 0})])  # after it came, before "t" applies
    held.set()
    if task is not None:
        await asyncio.wait_for(task, 10)
    assert await links.changed.wait_until(links.settled, 10)
    await publish_grpc(b.endpoints["grpc"], [("t", {"n": 1})])  # live
    await hub.advanced.wait_until(lambda: len(client.events) >= 2, 10)
    await asyncio.sleep(0.05)  # time for a duplicate, if any, to arrive too
    assert [json.loads(e.data)["n"] for e in client.events] == [0, 1]
    assert len(client.gaps) == 1 and "base64" in client.gaps[0], client.gaps
    dispatcher.cancel()
    await links.close()


async def test_a_catch_up_whose_broker_restarted_before_its_replay_keeps_the_live_events_and_is_a_gap() -> None:
    """A broker drained and restarted (a new epoch at the same address) after a fresh subscriber's catch-up joined a
    Replay call for the old epoch and before the call was made: the new process replays nothing of the old epoch
    (a gap: what the old one accepted before applying the topics is gone), and the subscriber still gets every live
    event of both epochs once (before, the call asked the new epoch from the old one's position: some new events
    twice, an old live one dropped, and no gap)."""
    broker, server, address = await in_process_broker()
    hub, budget = Hub(), ResumeBudget()
    links = LinkSet(hub, "p0", 1 << 20, PLAIN)
    dispatcher = asyncio.create_task(hub.run_dispatcher())
    await links.apply(Snapshot(1, (Member("b0", address),), CLUSTER))
    assert await links.changed.wait_until(links.settled, 10)
    [link] = links.links.values()
    old = link.epoch
    broker.accept([("other", b'{"n": -1}')], "publisher")  # a position: the catch-up gathers by seq
    assert await hub.advanced.wait_until(lambda: hub.positions.get(old, 0) >= 1, 10)
    for _ in range(MAX_REPLAYS):  # its call waits for its turn
        await budget.replays.acquire()
    client = Recorder()
    task = start_resume(Resume(hub, links, client, frozenset({"x"}), client, 10.0, budget), "")
    await wait_for(lambda: any(s.readers for s in budget.gathering.values()), what="the catch-up gathered")
    broker.accept(numbered(1), "publisher")  # live (seq 2 of the old epoch): held
    assert await hub.advanced.wait_until(lambda: hub.positions.get(old, 0) >= 2, 10)
    broker.closing = True  # drained: a clean end of the relay (no gap from the link)
    for stream in broker.router.streams:
        stream.wake.set()
    assert await links.changed.wait_until(lambda: link.state == LinkState.BACKOFF, 10) and link.ended_cleanly
    await server.stop(None)
    broker = Broker(BrokerConfig(name="b0"))  # restarted: a new epoch at the same address
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((relay_handler(BrokerServicer(broker)),))
    server.add_insecure_port(address)
    await server.start()
    assert await links.changed.wait_until(lambda: link.epoch == broker.epoch and links.settled(), 10)
    broker.accept(numbered(2, 3), "publisher")  # live (seq 1, 2 of the new epoch): held
    assert await hub.advanced.wait_until(lambda: hub.positions.get(broker.epoch, 0) >= 2, 10)
    for _ in range(MAX_REPLAYS):
        budget.replays.release()
    await asyncio.wait_for(task, 10)
    broker.accept(numbered(4), "publisher")  # live, after the swap
    await hub.advanced.wait_until(lambda: len(client.events) >= 4, 10)
    await asyncio.sleep(0.05)  # time for a duplicate, if any, to arrive too
    assert numbers(client.events) == [1, 2, 3, 4], numbers(client.events)
    assert len(client.gaps) == 1, client.gaps
    dispatcher.cancel()
    await links.close()
    await server.stop(None)


async def test_a_replay_by_time_streams_only_what_the_broker_accepted_since() -> None:
    """`ReplayRequest.since_ms`: of the events after `after`, only those the broker accepted in the last
    `since_ms` milliseconds by its clock when it reads the request; a position past that bound still counts."""
    broker, server, address = await in_process_broker()
    broker.accept(numbered(0, 1), "publisher")  # seq 1, 2
    await asyncio.sleep(0.01)  # time passes: the bound below falls between the two publishes
    between = time.monotonic()
    await asyncio.sleep(0.01)
    broker.accept(numbered(2, 3), "publisher")  # seq 3, 4
    now = time.monotonic()
    since_ms = math.ceil((now - between) * 1000)  # back to `between`, or at most 1 ms before it

    def start_of(after: int, since_ms: int) -> tuple[int, bool]:
        return broker.replay_start(pb.ReplayRequest(epoch=broker.epoch, after=after, since_ms=since_ms), now)

    assert start_of(0, since_ms) == (2, False)  # after seq 2: what was accepted since then
    assert start_of(3, since_ms) == (3, False)  # the position is later
    assert start_of(0, 0) == (0, False)
    assert broker.replay_start(pb.ReplayRequest(epoch=broker.epoch ^ 1, since_ms=since_ms), now) == (4, True)
    async with grpc.aio.insecure_channel(address) as ch:  # what the call streams from there
        batches = [b async for b in pb_grpc.BrokerStub(ch).Replay(
            pb.ReplayRequest(epoch=broker.epoch, after=1, topics=["x"], since_ms=60_000), timeout=5)]
    assert [json.loads(e.data)["n"] for b in batches for e in b.events] == [1, 2, 3]
    assert not any(b.gap for b in batches)
    # A replay that waits for its turn counts back from when the broker read it, not from its turn.
    for _ in range(broker.config.max_replays):
        await broker.replays.acquire()
    broker.accept(numbered(4), "publisher")  # seq 5
    async with grpc.aio.insecure_channel(address) as ch:
        call = pb_grpc.BrokerStub(ch).Replay(
            pb.ReplayRequest(epoch=broker.epoch, after=4, topics=["x"], since_ms=1000), timeout=10)
        replayed = asyncio.create_task(call.read())
        await wait_for(lambda: broker.replays_waiting == 1, what="the replay waiting for its turn")
        await asyncio.sleep(1.5)  # time passes: its turn comes after more than since_ms
        for _ in range(broker.config.max_replays):
            broker.replays.release()
        batch = await asyncio.wait_for(replayed, 5)
    assert [json.loads(e.data)["n"] for e in batch.events] == [4] and not batch.gap
    await server.stop(None)


async def test_a_subscriber_is_in_one_group_at_most() -> None:
    """Adding a subscriber already in the hub (or swapping one in) is refused: it would be in two groups and
    get their events twice. Changing its topics is `resubscribe`; one no longer in the hub is not put back."""
    hub = Hub()
    sub, other = Recorder(), Recorder()
    hub.add(sub, ["a"])
    with pytest.raises(ValueError, match="already"):
        hub.add(sub, ["b"])
    hub.add(other, ["b"])
    with pytest.raises(ValueError, match="already"):
        hub.swap(other, sub)
    hub.dispatch([Event("a", b"1"), Event("b", b"2")])
    assert [e.data for e in sub.events] == [b"1"] and [e.data for e in other.events] == [b"2"]
    hub.resubscribe(sub, ["b"])
    hub.dispatch([Event("a", b"3"), Event("b", b"4")])
    assert [e.data for e in sub.events] == [b"1", b"4"]
    hub.remove(sub)
    hub.resubscribe(sub, ["a"])  # (a late request of a stream already ended)
    hub.dispatch([Event("a", b"5")])
    assert [e.data for e in sub.events] == [b"1", b"4"] and sub not in hub.subscribers
    assert hub.topics() == {"b"}


async def proxy_on_a_small_broker(start: Any, monkeypatch: pytest.MonkeyPatch
                                  ) -> tuple[Server, Proxy, asyncio.Task[None]]:
    """An in-process proxy (its dispatcher running) settled on one broker process that reads messages of at most
    64 KiB (`--max-request-bytes`), with a position there (catch-ups from now gather by seq)."""
    monkeypatch.setenv(CREDENTIAL_ENV, CREDENTIAL)
    b = start("broker", "b0", "--max-request-bytes", "65536")
    proxy = Proxy(ProxyConfig(name="p0"))
    hub, links = proxy.hub, proxy.links
    dispatcher = asyncio.create_task(hub.run_dispatcher())
    await links.apply(Snapshot(1, (Member(b.name, b.endpoints["grpc"]),), CLUSTER))
    assert await links.changed.wait_until(links.settled, 10)
    [link] = links.links.values()
    await publish_grpc(b.endpoints["grpc"], [("other", {"n": -1})])
    assert await hub.advanced.wait_until(lambda: hub.positions.get(link.epoch, 0) >= 1, 10)
    return b, proxy, dispatcher


async def test_gathered_catch_ups_ask_no_more_topics_in_one_call_than_the_broker_reads(
        start: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A broker reads messages of at most its --max-request-bytes (64 KiB here). First subscribers of 100 KB of new
    topics (400 of 250 bytes), whose interest reached the broker in four parts and whose catch-ups then gathered
    while the proxy's Replay calls were all taken: their topics go in calls that the broker reads (before, one
    call of all 100 KB was refused and every one of them got the "could not replay" gap)."""
    b, proxy, dispatcher = await proxy_on_a_small_broker(start, monkeypatch)
    hub, links = proxy.hub, proxy.links
    [link] = links.links.values()
    gathered = 0
    gather = SharedReplay.gather

    def counted(self: SharedReplay, *args: Any) -> None:
        nonlocal gathered
        gathered += 1
        gather(self, *args)

    monkeypatch.setattr(SharedReplay, "gather", counted)
    for _ in range(MAX_REPLAYS):  # the proxy's Replay calls all taken: the catch-ups gather meanwhile
        await proxy.resumes.replays.acquire()
    topics = [f"{i:03d}" + "x" * 247 for i in range(400)]
    clients = [Recorder() for _ in topics]
    tasks = []
    for k in range(0, len(topics), 100):  # each part's interest (25 KB) in one Interest message
        held, link._interest_changed = link._interest_changed, asyncio.Event()
        tasks += [proxy.subscribe(client, [topic], "", client)
                  for client, topic in zip(clients[k:k + 100], topics[k:k + 100], strict=True)]
        await wait_for(lambda k=k: len(hub.subscribers) == k + 100, timeout=10, what="the part's catch-ups holding")
        # Accepted before the broker applied these topics: only a replay has them.
        await publish_grpc(b.endpoints["grpc"], [(topic, {"r": 0}) for topic in topics[k:k + 100]])
        held.set()
        assert await links.changed.wait_until(links.settled, 10)
    await wait_for(lambda: gathered == len(topics), timeout=10, what="every catch-up gathered")
    for _ in range(MAX_REPLAYS):
        proxy.resumes.replays.release()
    await asyncio.wait_for(asyncio.gather(*tasks), 30)  # type: ignore[arg-type]
    for k in range(0, len(topics), 100):  # live
        await publish_grpc(b.endpoints["grpc"], [(topic, {"r": 1}) for topic in topics[k:k + 100]])
    await wait_for(lambda: all(len(c.events) >= 2 for c in clients), timeout=20, what="every subscriber's events")
    await asyncio.sleep(0.05)  # time for a duplicate, if any, to arrive too
    for client, topic in zip(clients, topics, strict=True):
        assert not client.gaps, client.gaps[:1]
        assert [(e.topic, json.loads(e.data)["r"]) for e in client.events] == [(topic, 0), (topic, 1)]
    assert 2 <= proxy.resumes.started <= 3, proxy.resumes.started  # 100 KB of topics in calls within 64 KiB
    dispatcher.cancel()
    await links.close()


async def test_catch_ups_keep_their_requests_within_what_a_broker_reads(
        start: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A broker reads messages of at most its --max-request-bytes (64 KiB here): the Interest changes and the
    Replay calls gathering first subscribers' topics (400 topics of 250 bytes: 100 KB) stay within it, so every
    subscriber gets what the broker accepted before applying its topics, once, and no "could not replay" gap."""
    b, proxy, dispatcher = await proxy_on_a_small_broker(start, monkeypatch)
    hub, links = proxy.hub, proxy.links
    [link] = links.links.values()
    held, link._interest_changed = link._interest_changed, asyncio.Event()  # unsent until released below
    topics = [f"{i:03d}" + "x" * 247 for i in range(400)]
    clients = [Recorder() for _ in topics]
    tasks = [proxy.subscribe(client, [topic], "", client) for client, topic in zip(clients, topics, strict=True)]
    await wait_for(lambda: len(hub.subscribers) == len(topics), timeout=10, what="every catch-up holding")

    async def publish_round(r: int) -> None:
        for k in range(0, len(topics), 100):  # 100 events (27 KB) a request
            await publish_grpc(b.endpoints["grpc"], [(topic, {"r": r}) for topic in topics[k:k + 100]])

    await publish_round(0)  # accepted before the broker applied these topics: only a replay has them
    held.set()
    await asyncio.wait_for(asyncio.gather(*tasks), 30)  # type: ignore[arg-type]
    await publish_round(1)  # live
    await wait_for(lambda: all(len(c.events) >= 2 for c in clients), timeout=20, what="every subscriber's events")
    await asyncio.sleep(0.05)  # time for a duplicate, if any, to arrive too
    for client, topic in zip(clients, topics, strict=True):
        assert [(e.topic, json.loads(e.data)["r"]) for e in client.events] == [(topic, 0), (topic, 1)]
        assert not client.gaps, client.gaps
    assert 2 <= proxy.resumes.started <= 4, proxy.resumes.started  # 100 KB of topics over calls within 64 KiB
    dispatcher.cancel()
    await links.close()


async def test_resumes_from_seq_0_of_a_broker_share_one_replay_of_it(
        start: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Resumes whose token names a broker at seq 0 (nothing of it seen, or forged: a replay of all it retained) with
    topic sets of their own that come together catch up from one Replay call per broker (their topics gathered; it
    asks from seq 0, so no reader gets a gap that is not its own), not one per topic set per broker (1000 forged
    resumes cost a broker 1000 walks of its retention); each gets exactly its own topics' events, once. One whose
    token holds a position of a broker replays that one from it, as before."""
    bs, proxy, dispatcher = await proxy_on_brokers(start, monkeypatch, 2)
    hub, links = proxy.hub, proxy.links
    epochs = {link.member.name: link.epoch for link in links.links.values()}

    async def publish_round(r: int) -> None:
        for b in bs:
            await publish_grpc(b.endpoints["grpc"], [(f"n{i}", {"b": b.name, "n": i, "r": r}) for i in range(40)]
                               + [("g:x", {"b": b.name, "n": 40, "r": r}), ("other", {"b": b.name, "n": -1, "r": r})])

    await publish_round(0)  # retained: seqs 1-42 of each broker
    await publish_round(1)  # seqs 43-84
    held = []
    for link in links.links.values():  # the links' interest stays unsent until released below: they come together
        held.append(link._interest_changed)
        link._interest_changed = asyncio.Event()
    topics = {i: [f"n{i}"] for i in range(40)} | {40: ["g"], 41: ["n0", "n1"]}  # "g" has "g:x" (prefix rule)
    tokens = {i: {epochs["b0"]: 0, epochs["b1"]: 0} for i in topics}
    tokens[41] = {epochs["b0"]: 0, epochs["b1"]: 42}  # saw b1's round 0: b1 replays from there, not gathered
    clients = {i: Recorder() for i in topics}
    tasks = [proxy.subscribe(clients[i], topics[i], encode_token(hub.tag, tokens[i]).decode(), clients[i])
             for i in topics]
    assert all(task is not None for task in tasks)
    await wait_for(lambda: len(hub.subscribers) == len(topics), timeout=10, what="every resume holding")
    for event in held:
        event.set()
    await asyncio.wait_for(asyncio.gather(*tasks), 20)  # type: ignore[arg-type]
    await publish_round(2)  # live

    def got(client: Recorder) -> list[tuple[str, int, int]]:
        return sorted((d["b"], d["r"], d["n"]) for d in map(json.loads, (e.data for e in client.events)))

    def wanted(i: int) -> list[tuple[str, int, int]]:
        return sorted((b.name, r, n) for b in bs for r in range(3) if not (i == 41 and b.name == "b1" and r == 0)
                      for n in ([40] if i == 40 else [0, 1] if i == 41 else [i]))

    await wait_for(lambda: all(len(got(c)) >= len(wanted(i)) for i, c in clients.items()), timeout=20,
                   what="every subscriber's events")
    for i, client in clients.items():  # exactly once each (and only its own topics'), no gap
        assert got(client) == wanted(i), i
        assert not client.gaps, client.gaps
    # Before: one call per topic set per broker (84). Now one per broker for those from seq 0, one for b1 from 42,
    # and a few more for any that settled before the rest had joined.
    assert proxy.resumes.started <= 2 * len(bs) + 1, proxy.resumes.started
    dispatcher.cancel()
    await links.close()


async def test_a_gathered_replays_reader_takes_its_sparse_events_in_steps_not_one_per_message() -> None:
    """A reader of a gathered call whose topic has a few events in each of its messages (1000 resumes of a topic each,
    from seq 0, over all of retention) gets them gathered into steps of CATCH_UP_STEP, each one write, not a
    send per message; the last carries the call's head; a gap comes after what came before it, with its own part.
    The batches' index by subscription key is made once, for all readers."""
    hub, budget = Hub(), ResumeBudget()
    shared = SharedReplay(budget, ("b0", 7, -1, frozenset()), hub)
    messages = 2 * CATCH_UP_STEP + 10
    for m in range(messages):  # one event of "mine:x" (matched by "mine") among 20 per message; a gap in the last
        events = [Event("mine:x" if i == 0 else f"other:{i}", b"{}", 7, 20 * m + i + 1) for i in range(20)]
        shared.batches.append(ReplayBatch.made(events, 99_999, m == messages - 1))
    shared.done = shared.complete = True
    readers = [shared.join() for _ in range(3)]
    first = shared.batches[1]
    parts = []
    for me in readers:
        resume = Resume(hub, None, Recorder(), frozenset({"mine"}), Recorder(), 1.0, budget)  # type: ignore[arg-type]
        parts.append([b async for b in resume._part(shared, me, 20)])  # after seq 20: not the first message's
    for got in parts:
        sizes = [(len(b.events), b.gap) for b in got]
        # messages 1 to 520 (the first is before seq 20) in steps; the gap's message after them, with its own event
        assert sizes == [(CATCH_UP_STEP, False), (CATCH_UP_STEP, False), (8, False), (1, True), (0, False)], sizes
        assert all(b.head == 99_999 for b in got)
        seqs = [e.seq for b in got for e in b.events]
        assert seqs == [20 * m + 1 for m in range(1, messages)]
    assert first.by_key["mine"] == [0] and not shared.batches  # indexed once; let go once all took it


async def test_a_gathered_calls_readers_are_woken_every_few_batches_not_at_each(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """50 readers of a gathered call (resumes of a topic each, from seq 0) each wait for GATHERED_WAKE of its
    batches (or its end) before they are woken to take them, not for each batch (1000 forged resumes of a topic
    each: a thousand task steps, and ten passes of the signal over all of them, per batch); each still gets every
    event of its own topic, in order, once."""
    hub, budget = Hub(), ResumeBudget()
    shared = SharedReplay(budget, ("b0", 7, -1, frozenset()), hub)
    readers = [shared.join() for _ in range(50)]
    waits = 0
    wait_until = shared.changed.wait_until

    async def counted(predicate: Callable[[], bool], timeout: float) -> bool:
        nonlocal waits
        waits += 1
        return await wait_until(predicate, timeout)

    monkeypatch.setattr(shared.changed, "wait_until", counted)

    async def read(n: int) -> list[int]:
        resume = Resume(hub, None, Recorder(), frozenset({f"t{n}"}), Recorder(), 1.0, budget)  # type: ignore[arg-type]
        return [e.seq for batch in [b async for b in resume._part(shared, readers[n], 0)] for e in batch.events]

    tasks = [asyncio.create_task(read(n)) for n in range(50)]
    batches = 12
    for m in range(batches):  # as the call brings them: one, then a few passes of the loop
        shared.batches.append(ReplayBatch.made([Event(f"t{n}", b"{}", 7, 50 * m + n + 1) for n in range(50)], 600,
                                               False))
        shared._trim()
        for _ in range(5):
            await asyncio.sleep(0)
    shared.done = shared.complete = True
    shared.changed.notify()
    got = await asyncio.wait_for(asyncio.gather(*tasks), 10)
    assert got == [[50 * m + n + 1 for m in range(batches)] for n in range(50)]
    assert waits <= 50 * (batches // GATHERED_WAKE + 2), waits  # before: 50 * (batches + 1)


async def test_readers_that_asked_what_a_gathered_call_asked_read_its_messages_as_they_are() -> None:
    """A thousand resumes of one topic from seq 0 gather into one call asking just that: each reads the call's
    messages themselves, so that the frames of each step are encoded once for all of them (`ReplayBatch.encoded`),
    not once per reader (3.4 s of a proxy's CPU per 5 s under bench/forged_resumes.py's one forged position)."""
    hub, budget = Hub(), ResumeBudget()
    shared = SharedReplay(budget, ("b0", 7, -1, frozenset()), hub)
    shared.gather(frozenset({"old"}), 0)
    shared.marked = frozenset(shared.gathered_topics)  # as when the call is made
    batches = [ReplayBatch.made([Event("old:1", b"{}", 7, 2 * m + k + 1) for k in range(2)], 50, False)
               for m in range(3)]
    shared.batches += batches
    shared.done = shared.complete = True
    readers = [shared.join() for _ in range(2)]
    for me, topics in zip(readers, [{"old"}, {"old:1"}], strict=True):
        resume = Resume(hub, None, Recorder(), frozenset(topics), Recorder(), 1.0, budget)  # type: ignore[arg-type]
        got = [b async for b in resume._part(shared, me, 0)]
        if topics == {"old"}:  # what the call asked: its messages themselves
            assert all(a is b for a, b in zip(got, batches, strict=True))
        else:  # a part of its own, gathered into one step
            assert [len(b.events) for b in got] == [6] and not any(b is batches[0] for b in got)


class CountedSse(Recorder):
    resumes = True


class CountedPlasma(Recorder):
    kind = "plasma"


class CountedBatch(Recorder):
    kind = "batch"
    resumes = True


async def test_hub_counters_equal_a_recount_after_random_operations() -> None:
    """`Hub.counts` and `Hub.movable_count` are kept as subscribers come, go, are swapped for their holders, get
    their first position or lose it, some within a rebalance's cooldown: after each step they equal a full pass."""
    rng = random.Random(7)
    hub, budget = Hub(), ResumeBudget()
    assert issubclass(PlasmaSubscriber, Subscriber) and issubclass(BatchSubscriber, Subscriber)
    kinds = (CountedSse, CountedPlasma, CountedBatch)
    present: list[Subscriber] = []
    for step in range(3000):
        op = rng.random()
        if op < 0.3 or not present:
            sub: Subscriber = rng.choice(kinds)()
            sub.positioned = rng.random() < 0.3
            if rng.random() < 0.2:
                sub.settled = time.monotonic() + rng.choice((-1.0, 60.0))  # cooldown over, or not
            if rng.random() < 0.4:  # a resuming one: its holder in the hub, swapped for it later
                sub = Holder(sub, budget)
            hub.add(sub, [f"t{rng.randrange(5)}"])
            present.append(sub)
        elif op < 0.5:
            sub = present.pop(rng.randrange(len(present)))
            hub.remove(sub)
        elif op < 0.65:
            k = rng.randrange(len(present))
            if isinstance(present[k], Holder):
                holder = present[k]
                assert isinstance(holder, Holder)
                hub.swap(holder, holder.target)
                present[k] = holder.target
        elif op < 0.85:
            sub = rng.choice(present)
            sub.mover().positioned = True  # a first position written (or again: no change)
        elif op < 0.9:
            rng.choice(present).mover().positioned = False  # a garbled token found out
        else:
            hub.resubscribe(rng.choice(present), [f"t{rng.randrange(5)}"])
        recount = {"sse": 0, "plasma": 0, "batch": 0}
        for sub in hub.subscribers:
            recount[sub.counted_as] += 1
        assert hub.counts() == recount, step
        assert hub.movable_count() == len(hub.movable()), step
    assert hub.movable_count() > 0 and sum(hub.counts().values()) == len(hub.subscribers) > 0


# -- units ---------------------------------------------------------------------------


def v1_token(tag: bytes, positions: dict[int, int]) -> str:
    """A token as the code before version 2 issued it (clients hold these across an upgrade)."""
    raw = b"\x01" + tag + b"".join(e.to_bytes(4, "big") + varint(positions[e]) for e in sorted(positions))
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def sorted_check_token(tag: bytes, positions: dict[int, int]) -> str:
    """A version 2 token as issued before its check bound the entries' order (the epochs ascending)."""
    entries = sorted(positions.items(), key=lambda entry: (entry[1], entry[0]))
    raw, before = b"\x02" + positions_check(tag, tuple(sorted(positions)), ordered=False), 0
    for epoch, seq in entries:
        raw, before = raw + epoch_mark(epoch) + varint(seq - before), seq
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def test_token_round_trip_and_size() -> None:
    tag = cluster_tag("c")
    for positions in ({}, {1: 0}, {2**32 - 1: 2**63}, {random.randint(1, 2**32 - 1): random.randint(0, 2**40)
                                                       for _ in range(60)}):
        token = encode_token(tag, positions)
        assert decode_token(token.decode(), tag, positions) == positions
        assert decode_token(token.decode(), tag, [*positions, 5, 77, 2**31]) == positions  # other known brokers
        assert b"=" not in token and base64.urlsafe_b64decode(token + b"=" * (-len(token) % 4))[0] == 2
    # 60 brokers, days old, 1 M events apart: the first seq takes 4 bytes, the differences 3 (docs/resume.md).
    sixty = {epoch: 200_000_000 + 1_000_000 * k for k, epoch in enumerate(random.sample(range(1, 2**32), 60))}
    chars = lambda n: -(-n * 4 // 3)  # noqa: E731  unpadded base64
    assert len(encode_token(tag, sixty)) == chars(5 + 60 * 2 + 4 + 59 * 3) == 408
    assert len(v1_token(tag, sixty)) == chars(5 + 60 * (4 + 4)) == 647  # version 1: whole seqs


def test_tokens_issued_before_version_2_are_still_read() -> None:
    tag = cluster_tag("c")
    positions = {random.randint(1, 2**32 - 1): random.randint(0, 2**40) for _ in range(60)}
    assert decode_token(v1_token(tag, positions), tag) == positions  # needs no known brokers: it names them
    assert parse_token(v1_token(tag, positions), tag).resolve([]) == (positions, 0)
    with pytest.raises(InvalidToken, match="another cluster"):
        decode_token(v1_token(tag, positions), cluster_tag("d"))


def test_marks_resolve_through_collisions_and_unknown_brokers_are_counted() -> None:
    tag = cluster_tag("c")
    by_mark: dict[bytes, int] = {}
    for epoch in range(1, 100_000):  # two epochs with one mark (16 bits: a collision within ~300 on average)
        twin = by_mark.setdefault(epoch_mark(epoch), epoch)
        if twin != epoch:
            break
    assert epoch_mark(twin) == epoch_mark(epoch)
    token = encode_token(tag, {twin: 3, 9_999_999: 4}).decode()
    assert decode_token(token, tag, [twin, epoch, 9_999_999]) == {twin: 3, 9_999_999: 4}  # the check picks
    # Both twins in one token: each entry goes to the right one, whichever way round (the check binds the
    # entries' order; a check of the set alone fitted both assignments, and half of them swapped the seqs).
    for positions in ({twin: 3, epoch: 4}, {twin: 4, epoch: 3}):
        both = encode_token(tag, positions).decode()
        assert decode_token(both, tag, [twin, epoch, 9_999_999]) == positions
        assert decode_token(both, tag, [epoch, 9_999_999, twin]) == positions
    # A token issued before the check bound the order (the epochs ascending) is still read when only one
    # assignment fits, and refused (a gap, never a guess) when two twins could be either way round.
    assert decode_token(sorted_check_token(tag, {twin: 3, 9_999_999: 4}), tag, [twin, epoch, 9_999_999]) == {
        twin: 3, 9_999_999: 4}
    assert decode_token(sorted_check_token(tag, {9_999_999: 3, 5: 9}), tag, [5, 9_999_999]) == {9_999_999: 3, 5: 9}
    for positions in ({twin: 3, epoch: 4}, {twin: 4, epoch: 3}):
        with pytest.raises(InvalidToken, match="cannot tell apart"):
            decode_token(sorted_check_token(tag, positions), tag, [twin, epoch])
    # A broker this proxy never saw: the others are taken, the unknown one counted (a gap).
    assert parse_token(token, tag).resolve([twin, 5]) == ({twin: 3}, 1)
    with pytest.raises(InvalidToken, match="not among those known"):
        decode_token(token, tag, [twin])
    with pytest.raises(InvalidToken, match="another cluster"):  # no broker known at all
        parse_token(token, tag).resolve([5, 6])
    with pytest.raises(InvalidToken, match="another cluster"):  # all marks known, but the check says otherwise
        parse_token(encode_token(cluster_tag("d"), {twin: 3, 9_999_999: 4}).decode(), tag).resolve(
            [twin, epoch, 9_999_999])


def test_garbage_tokens_raise_only_invalid_token() -> None:
    tag = cluster_tag("c")
    good = encode_token(tag, {7: 300, 9: 1}).decode()
    samples = ["", "!", "====", "A" * 9000, good[:-1], good[:6], good + "A", "AQ", "\x00\xff",
               v1_token(tag, {7: 1})[:-1]]
    rng = random.Random(8)
    samples += ["".join(rng.choice("AZaz09-_+/=%") for _ in range(rng.randint(1, 60))) for _ in range(2000)]
    samples += [base64.urlsafe_b64encode(bytes([version]) + tag + rng.randbytes(rng.randint(0, 20))).decode()
                for _ in range(1000) for version in (1, 2)]
    for sample in samples:
        try:
            decode_token(sample, tag, [7, 9])
        except InvalidToken:
            pass
    with pytest.raises(InvalidToken, match="another cluster"):
        decode_token(good, cluster_tag("d"), [7, 9])
    with pytest.raises(InvalidToken, match="beyond 64 bits"):
        decode_token(base64.urlsafe_b64encode(b"\x02" + tag + epoch_mark(7) + b"\xff" * 10 + b"\x01").decode(), tag)
    with pytest.raises(InvalidToken, match="beyond 64 bits"):  # each seq within 64 bits, their sum not
        decode_token(base64.urlsafe_b64encode(b"\x02" + tag + (epoch_mark(7) + varint(2**63)) * 2).decode(), tag)


def test_retention_bounds_by_age_and_bytes_and_replays_ranges() -> None:
    log = RetentionLog(max_age=10.0, max_bytes=100_000)
    events = [("a:x" if i % 2 else "b", b"%d" % i) for i in range(1, 101)]
    for i in range(0, 100, 10):  # batches of 10, seq 1..100, one per second
        log.append(i + 1, events[i:i + 10], now=float(i // 10))
    assert log.oldest == 1 and log.covers(0)
    assert log.accepted_since(3.5) == (40, True) and log.accepted_since(-1.0) == (0, True)
    assert log.accepted_since(99.0) == (100, True)  # nothing accepted since: after the last seq
    assert [s for s, _ in log.replay(45, 60, frozenset({"a"}))] == list(range(47, 61, 2))
    assert [e.data for _, e in log.replay(98, 200, frozenset({"a", "b"}))] == [b"99", b"100"]
    log.evict(now=12.5)  # batches accepted before 2.5 s are gone
    assert log.oldest == 31 and not log.covers(29) and log.covers(30)
    assert log.accepted_since(1.5) == (30, False) and log.accepted_since(2.5) == (30, True)
    assert [s for s, _ in log.replay(0, 40, frozenset({"b"}))] == [32, 34, 36, 38, 40]
    small = RetentionLog(max_age=1e9, max_bytes=4 * (MIN_SEGMENT_BYTES + SEGMENT_OVERHEAD))  # four segments
    record = EVENT_OVERHEAD + 1 + 1000  # a one-event request: topic "t", 1000 bytes of data
    for seq in range(1, 1001):
        small.append(seq, [("t", b"%04d" % seq + b"0" * 996)], now=float(seq))
        assert small.bytes <= small.max_bytes
    per = MIN_SEGMENT_BYTES // record  # events in a segment
    assert 3 * per < small.events <= 4 * per
    assert small.oldest == 1001 - small.events and not small.covers(small.oldest - 2)
    replayed = list(small.replay(0, 1000, frozenset({"t"})))
    assert [s for s, _ in replayed] == list(range(small.oldest, 1001))
    assert all(e.data.startswith(b"%04d" % s) for s, e in replayed)
    assert small.accepted_since(0.0) == (small.oldest - 1, False)
    big = RetentionLog(max_age=1e9, max_bytes=1 << 20)  # an event larger than a segment has one of its own
    big.append(1, [("t", b"1"), ("t", b"2" * 200_000), ("t", b"3")], now=0.0)
    assert [e.data[:1] for _, e in big.replay(0, 3, frozenset({"t"}))] == [b"1", b"2", b"3"]
    assert [s for s, _ in big.replay(1, 2, frozenset({"t"}))] == [2]


async def test_idle_relay_reports_head_and_restarted_broker_is_a_new_epoch(start: Any) -> None:
    b = start("broker", "b0")
    async with grpc.aio.insecure_channel(b.endpoints["grpc"]) as ch:
        stub = pb_grpc.BrokerStub(ch)
        relay = stub.Relay(metadata=AUTH)
        await relay.write(pb.Interest(add=["x"], replace=True, proxy="probe"))
        first = await relay.read()
        await stub.Publish(pb.PublishRequest(events=[pb.Event(topic="y", data=b"1")]), timeout=5)
        started = time.monotonic()
        update = await relay.read()  # nothing for "x", but the head moved: an empty batch says so
        assert not update.events and update.epoch == first.epoch and update.head == first.head + 1
        assert time.monotonic() - started < 3
        relay.cancel()
        replay = [m async for m in stub.Replay(pb.ReplayRequest(epoch=first.epoch, after=0, topics=["y"]),
                                               metadata=AUTH)]
        assert [(e.topic, e.seq) for m in replay for e in m.events] == [("y", first.head + 1)]
        other = [m async for m in stub.Replay(pb.ReplayRequest(epoch=first.epoch ^ 1, after=0, topics=["y"]),
                                              metadata=AUTH)]
        assert other[0].gap and not other[0].events
    b.stop()
    again = start("broker", "b0", ports={"grpc-port": b.port("grpc"), "http-port": 0})
    async with grpc.aio.insecure_channel(again.endpoints["grpc"]) as ch:
        old = [m async for m in pb_grpc.BrokerStub(ch).Replay(pb.ReplayRequest(epoch=first.epoch, topics=["y"]),
                                                              metadata=AUTH)]
    assert old[0].gap and old[0].epoch != first.epoch  # a restart is a new epoch: old positions mean nothing


async def test_idle_relay_streams_wait_without_a_timer_and_still_tell_a_moved_head(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A broker's idle relay streams (every proxy has one to every broker: 100 per broker at 100 proxies)
    do not wake every head_interval when there is nothing to tell; a publish on a topic they do not
    want still reaches them as a new head within about head_interval."""
    looked = [0]
    has_news = RelayStream.has_news

    def counted(stream: RelayStream, head: int, now: float, head_interval: float) -> bool:
        looked[0] += 1
        return has_news(stream, head, now, head_interval)

    monkeypatch.setattr(RelayStream, "has_news", counted)
    broker = Broker(BrokerConfig(name="b0", head_interval=0.02))
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((relay_handler(BrokerServicer(broker)),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        relays = [pb_grpc.BrokerStub(channel).Relay() for _ in range(10)]
        for i, relay in enumerate(relays):
            await relay.write(pb.Interest(add=["x"], replace=True, proxy=f"p{i}"))
        firsts = [await relay.read() for relay in relays]
        looked[0] = 0
        await asyncio.sleep(1.0)  # 50 head intervals
        assert looked[0] <= 2 * len(relays)  # (a timer per stream: ~50 looks each)
        broker.accept([("y", b"{}")], "publisher")  # nothing for "x", but the head moved
        started = time.monotonic()
        updates = [await asyncio.wait_for(relay.read(), 5) for relay in relays]
        assert all(not u.events and u.head == f.head + 1 for u, f in zip(updates, firsts, strict=True))
        assert time.monotonic() - started < 1.0
        for relay in relays:
            relay.cancel()
    await server.stop(None)


async def test_catch_up_a_subscriber_cannot_take_ends_it_instead_of_vanishing() -> None:
    """Held or replayed events that a too-slow subscriber cannot take close it ("slow"): its client
    resumes from the last token it got, so nothing is silently skipped."""

    class FullTransport(asyncio.WriteTransport):
        def is_closing(self) -> bool:
            return False

        def get_write_buffer_size(self) -> int:
            return 1 << 30

    sub = SseSubscriber(FullTransport(), max_buffer=1 << 20)
    SseSink(None, sub).send_now([Event("x", b"{}")], [b"token"], ())  # type: ignore[arg-type]
    assert sub.closed.done() and sub.closed.result() == "slow"


async def test_a_large_backfill_does_not_hold_up_another_relays_live_events(start: Any) -> None:
    """A relay stream opening with 200,000 retained events to backfill (a proxy back after a while) gets
    them all, in order, then the live ones accepted meanwhile, while another proxy's subscribers keep
    getting live events within a bound: the broker walks a backfill a slice at a time."""
    broker = start("broker", "b0")
    proxy = start("proxy", "p0", "--brokers", broker.endpoints["grpc"])
    grpc_address = broker.endpoints["grpc"]
    client = EventSource(lambda: proxy.endpoints["http"], "live").start()
    await wait_for(lambda: proxy_status(proxy.endpoints["control"]), what="status")
    await wait_for(lambda: links_ready(proxy.endpoints["control"], 1), what="the relay")
    await wait_for(lambda: client.statuses, what="the subscription")
    payload = b'{"pad":"' + b"x" * 150 + b'"}'
    async with grpc.aio.insecure_channel(grpc_address) as ch:
        stub = pb_grpc.BrokerStub(ch)
        for _ in range(20):  # 200,000 events of `big` (~40 MB) retained
            await stub.Publish(pb.PublishRequest(events=[pb.Event(topic="big", data=payload)] * 10_000), timeout=30)
        relay = stub.Relay(metadata=AUTH)  # a proxy with nothing of this epoch yet: the last minute is backfilled
        await relay.write(pb.Interest(add=["big"], replace=True, proxy="hungry", backfill_ms=60_000))
        seqs: list[int] = []
        heads: list[tuple[int, int]] = []  # (a message's head, events received up to it)

        async def read() -> None:
            async for batch in relay:
                seqs.extend(e.seq for e in batch.events)
                heads.append((batch.head, len(seqs)))

        reader = asyncio.create_task(read())
        late: list[float] = []
        k = 0
        while len(seqs) < 200_000 and k < 1000:  # live events for the other proxy while the backfill goes on
            sent = time.time()
            await stub.Publish(pb.PublishRequest(events=[pb.Event(topic="live", data=b'{"at":%r}' % sent),
                                                         pb.Event(topic="big", data=b'{"live":%d}' % k)]), timeout=10)
            k += 1
            await wait_for(lambda n=k: len(client.events) >= n, timeout=30, what="the live event", interval=0.002)
            late.append(time.time() - sent)
            await asyncio.sleep(0.01)
        await wait_for(lambda: len(seqs) >= 200_000 + k, timeout=30, what="the backfill and the live events")
        reader.cancel()
        relay.cancel()
    assert k < 1000, "the backfill never ended"
    assert seqs == [*range(1, 200_001), *range(200_002, 200_002 + 2 * k, 2)]  # in order, live ones after
    # A head claims every `big` event up to it: none while the backfill is under way.
    assert all(head <= 200_000 + 2 * k and got >= min(head, 200_000) + max(0, head - 200_000) // 2
               for head, got in heads)
    assert k >= 3 and max(late) < 0.5, f"live events for the other proxy waited up to {max(late):.3f} s"
    await client.close()


async def test_replays_walk_retention_one_slice_per_pass_of_the_brokers_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """Four replays of all of retention at once (forged positions) walk it in turns: in one pass of the broker's
    loop, parts start only within one slice (REPLAY_SLICE, 2 ms), not one part per replay, so that a publish or a
    relay stream's live event waits behind about one part at most; each replay still gets every event, in order."""
    broker = Broker(BrokerConfig(name="b0", replay_events_per_second=10_000_000, workers=1))
    payload = b'{"pad":"' + b"x" * 150 + b'"}'
    for _ in range(40):
        broker.accept([("t", payload)] * 1000, "publisher")
    servicer = BrokerServicer(broker)
    passes = 0
    loop = asyncio.get_running_loop()

    def tick() -> None:  # once per pass of the loop
        nonlocal passes
        passes += 1
        loop.call_soon(tick)

    starts: dict[int, list[float]] = {}  # pass -> when each part walked in it started
    walk_part = ReplayWalk.part

    def part(self: ReplayWalk, *args: Any, **kwargs: Any) -> list[bytes]:
        starts.setdefault(passes, []).append(time.perf_counter())
        return walk_part(self, *args, **kwargs)

    monkeypatch.setattr(ReplayWalk, "part", part)

    async def replay() -> list[int]:
        seqs: list[int] = []
        async for message in servicer.Replay(pb.ReplayRequest(epoch=broker.epoch, after=0, topics=["t"]), None):
            seqs.extend(e.seq for e in pb.EventBatch.FromString(message).events)
        return seqs

    loop.call_soon(tick)
    got = await asyncio.gather(*(replay() for _ in range(4)))
    assert all(seqs == list(range(1, 40_001)) for seqs in got)
    assert sum(map(len, starts.values())) > 8
    spread = max(max(at) - min(at) for at in starts.values())
    assert spread < REPLAY_SLICE + 0.0005, f"parts began {spread * 1000:.1f} ms apart in one pass of the loop"


async def test_replays_walk_at_most_a_tenth_of_a_seconds_worth_of_their_rate_at_once() -> None:
    """After a quiet while, Replays may walk a tenth of a second's worth of --replay-events-per-second without
    waiting, then at that rate: a burst of resumes does not start with a second of walking at full speed."""
    broker = Broker(BrokerConfig(name="b0", replay_events_per_second=1000, workers=1))
    loop = asyncio.get_running_loop()
    started = loop.time()
    await broker.pace_replay(100)  # a tenth of a second's worth: at once
    assert loop.time() - started < 0.05
    await broker.pace_replay(100)  # the next tenth waits for its time
    assert loop.time() - started >= 0.09


# -- pointer ids (docs/resume.md, "Pointer ids") -----------------------------------------------------------------


async def cut_with_pointer(proxy: Server, bs: list[Server], attempt: int) -> tuple[list[dict[str, Any]], str]:
    """A raw-socket subscriber at `proxy` cut in the middle of a 200-event write, holding a pointer id (tried up
    to 5 times: the cut may fall between writes). Returns the events it parsed and its pointer."""
    for k in range(5):
        n = 1000 * attempt + 200 * k
        first = asyncio.create_task(read_sse_prefix(proxy.endpoints["http"], "t", lambda events: len(events) >= 7))
        await wait_for(lambda: all_subscribed(proxy, 1, len(bs)), timeout=20, what="the subscriber")
        for b, broker in enumerate(bs):
            await publish_grpc(broker.endpoints["grpc"], [("t", {"b": b, "n": n + i}) for i in range(200)])
        before, last_id, unparsed = await first
        await wait_for(lambda: all_subscribed(proxy, 0, len(bs)), timeout=20, what="the cut subscriber gone")
        if unparsed and is_pointer(last_id):
            return before, last_id
    raise AssertionError("no cut fell inside a write")


async def test_a_pointer_whose_proxy_is_gone_gives_the_gap_signal_then_live(start: Any) -> None:
    """A pointer resolves only while the process that issued it lives: once it is gone (kill -9), a resume from
    one at another proxy gets the gap signal, never silent loss nor a refusal, and then the live events."""
    bs, ps = await cluster(start, 2, 2)
    for p in ps:
        await wait_for(lambda p=p: links_ready(p.endpoints["control"], 2), what="links")
    _, pointer = await cut_with_pointer(ps[0], bs, 0)
    ps[0].proc.kill()
    ps[0].proc.wait()
    await (await gap_then_live(ps[1], bs[0], pointer, "pointer")).close()


async def test_garbled_and_forged_pointers_give_the_gap_signal_then_live(start: Any) -> None:
    """Ids in a pointer's form that no proxy issued, issued by a live proxy but outside its journal, or of no form
    at all: the gap signal, then live; a 200, no error logged, and the broker's Resolve refuses what is no pointer."""
    bs, ps = await cluster(start, 1, 2)
    for p in ps:
        await wait_for(lambda p=p: links_ready(p.endpoints["control"], 1), what="links")
    _, pointer = await cut_with_pointer(ps[0], bs, 0)
    raw = base64.urlsafe_b64decode(pointer)
    outside = base64.urlsafe_b64encode(raw[:3] + bytes(b ^ 0x80 for b in raw[3:])).decode()  # far from its journal
    forged = ["PPPPPPPP", outside, "P" * 9, "Zzzzzzz", "P!!!!!!!", "_" * 8, "P" * 100]
    clients = [EventSource(lambda: ps[1].endpoints["http"], "t", token=f).start() for f in forged]
    await wait_for(lambda: all(c.gaps for c in clients), timeout=20, what="gap signals")
    await wait_for(lambda: all_subscribed(ps[1], len(forged), 1), timeout=20, what="all live")
    await publish_grpc(bs[0].endpoints["grpc"], [("t", {"b": 0, "n": -1})])
    await wait_for(lambda: all(any(e["data"]["n"] == -1 for e in c.events) for c in clients), timeout=20,
                   what="a live event at each")
    for c in clients:
        assert set(c.statuses) == {200}, c.statuses
        await c.close()
    resolved = await counters(ps[1].endpoints["http"], "neoplasma_proxy_pointer_resolves_total", "result")
    assert resolved == {"local": 0, "remote": 0, "unresolved": len(forged)}, resolved
    async with grpc.aio.insecure_channel(bs[0].endpoints["grpc"]) as channel:
        stub = pb_grpc.BrokerStub(channel)
        refusals = (("P" * 9000, grpc.StatusCode.INVALID_ARGUMENT), ("AAAAAAAA", grpc.StatusCode.INVALID_ARGUMENT),
                    ("PPPPPPPP", grpc.StatusCode.NOT_FOUND), (outside, grpc.StatusCode.NOT_FOUND))
        for bad, code in refusals:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.Resolve(pb.ResolveRequest(pointer=bad), metadata=AUTH, timeout=10)
            assert refused.value.code() == code, (bad, refused.value.code())
        assert (await stub.Resolve(pb.ResolveRequest(pointer=pointer), metadata=AUTH, timeout=10)).token.startswith("A")
    for p in ps:
        assert "Traceback" not in p.log() and '"level": "error"' not in p.log()


def drawing(monkeypatch: pytest.MonkeyPatch, *instances: int) -> None:
    """The next hubs made draw `instances` in turn (then at random, as ever): processes that drew the same one."""
    drawn = list(instances)
    real = hub_module.new_instance
    monkeypatch.setattr(hub_module, "new_instance", lambda: drawn.pop(0) if drawn else real())


async def test_processes_that_drew_one_instance_never_resolve_each_others_pointers(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Two proxy processes draw the same pointer instance (1 in 16 million a pair): the second is refused by the
    broker that knows the first and draws another, at every broker (one that took it moves on with it). The first's
    pointer resolves to its token through the brokers while it lives, never from the second's journal (which holds
    the same numbers); once it is gone, and at a third process that draws that instance again, it gives the gap
    signal."""
    shared = MIN_INSTANCE + 12345
    drawing(monkeypatch, shared, shared, shared)
    b0, server0, address0 = await in_process_broker("b0")
    b1, server1, address1 = await in_process_broker("b1")
    hub1, links1, dispatcher1, _ = in_process_proxy("p1")
    hub1.set_cluster(CLUSTER)
    watched = KeptTransport()
    hub1.add(SseSubscriber(watched, 1 << 20), ["p"])  # a topic of its own: the second backfills none of it
    await links1.apply(Snapshot(1, (Member("b0", address0),), CLUSTER))
    assert await links1.changed.wait_until(lambda: links1.settled() and hub1.issuing, 10)
    assert hub1.instance == shared
    b0.accept([("p", b"{}")] * 20, "publisher")  # one relay message, one write of 20 events: 19 pointers
    assert await hub1.advanced.wait_until(lambda: len(watched.pointers()) == 19, 10)
    pointer = watched.pointers()[5]
    token = hub1.resolve(pointer)
    assert token is not None

    hub2, links2, dispatcher2, _ = in_process_proxy("p2")
    hub2.journal.next = hub1.journal.next - 20  # its events numbered as the first's: its journal holds the pointer's
    await links2.apply(Snapshot(1, (Member("b0", address0), Member("b1", address1)), CLUSTER))
    assert await links2.changed.wait_until(lambda: links2.settled() and hub2.issuing, 10)
    assert hub2.instance != shared and shared not in hub2.issued
    assert set(b1.router.instances) == {hub2.instance}  # b1 took the shared one first; the stream moved on
    assert set(b0.router.instances) == {shared, hub2.instance}
    delivered = b0.events_out
    b0.accept(numbered(-1), "publisher")
    assert b0.events_out - delivered == 2  # to the two processes' streams only (none left of the one refused)
    b1.accept(numbered(*range(20)), "publisher")
    assert await hub2.advanced.wait_until(lambda: hub2.journal.next == hub1.journal.next, 10)
    held = hub2.journal.positions_at(parse_pointer(pointer)[1])
    assert held is not None and encode_token(hub2.tag, held) != token  # what its journal would wrongly say
    assert hub2.resolve(pointer) is None
    assert await resolve_pointer(hub2, links2, pointer) == token.decode()  # asked of the first, through b0

    dispatcher1.cancel()
    await links1.close()  # the first process is gone
    assert await wait_until_true(lambda: shared not in b0.router.instances)
    with pytest.raises(InvalidToken):
        await resolve_pointer(hub2, links2, pointer)
    with pytest.raises(LookupError):
        await b0.resolve(pointer)  # known only as lately held: NOT_FOUND, never asked of another process
    assert b0.router.claims.holder(shared, time.monotonic()) == hub1.nonce

    hub3, links3, dispatcher3, _ = in_process_proxy("p3")  # the issuer gone, a third process draws its instance
    await links3.apply(Snapshot(1, (Member("b0", address0),), CLUSTER))
    assert await links3.changed.wait_until(lambda: links3.settled() and hub3.issuing, 10)
    assert hub3.instance != shared
    with pytest.raises(InvalidToken):
        await resolve_pointer(hub3, links3, pointer)
    for dispatcher, links in ((dispatcher2, links2), (dispatcher3, links3)):
        dispatcher.cancel()
        await links.close()
    await server0.stop(None)
    await server1.stop(None)


async def wait_until_true(check: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll `check` (a state another task changes without a signal to wait on) until it holds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


async def test_a_relay_reconnect_of_the_same_process_keeps_its_instance(monkeypatch: pytest.MonkeyPatch) -> None:
    """A proxy process whose relay reconnects, its old stream still attached at the broker or not, keeps its
    instance (a broker tells it by its nonce), and its pointers go on resolving; another process is refused it."""
    broker, server, address = await in_process_broker()
    hub, links, dispatcher, client = in_process_proxy("p0")
    now = time.monotonic()
    lingering = RelayStream("p0", "old connection", 1 << 20)  # its old stream, not yet torn down
    lingering.nonce = hub.nonce
    broker.router.claim(lingering, hub.instance, now)
    broker.router.attach(lingering)
    await links.apply(Snapshot(1, (Member("b0", address),), CLUSTER))
    [link] = links.links.values()
    assert await links.changed.wait_until(lambda: links.settled() and hub.issuing, 10)
    instance = hub.instance
    assert lingering in broker.router.instances[instance] and len(broker.router.instances[instance]) == 2
    broker.router.detach(lingering)
    broker.accept(numbered(0, 1), "publisher")
    assert await hub.advanced.wait_until(lambda: len(client.events) == 2, 10)
    pointer = encode_pointer(hub.pointer_prefix, hub.journal.next - 2).decode()
    token = hub.resolve(pointer)
    assert token is not None
    update = broker.router.update_interest

    def fail_once(*args: Any) -> None:
        monkeypatch.setattr(broker.router, "update_interest", update)
        raise RuntimeError("a bug")

    monkeypatch.setattr(broker.router, "update_interest", fail_once)
    hub.add(Recorder(), ["y"])  # the broker fails applying this: the relay ends, and reconnects
    assert await links.changed.wait_until(lambda: link.state == LinkState.BACKOFF, 10)
    assert await links.changed.wait_until(links.settled, 10)
    assert hub.instance == instance and hub.issuing and link.verdict == instance
    assert await broker.resolve(pointer) == token.decode()  # asked of it over its new stream
    other = RelayStream("p9", "another process", 1 << 20)
    other.nonce = hub.nonce ^ 1
    with pytest.raises(InstanceTaken):
        broker.router.claim(other, instance, time.monotonic())
    dispatcher.cancel()
    await links.close()
    await server.stop(None)


async def test_a_refused_instance_is_drawn_anew_on_every_stream_and_its_pointers_still_resolve_at_home(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A proxy process that issued pointers of its instance reaches a broker where another process holds it: it
    draws another and names it on its open stream, where (drawn again unluckily) another process holds that one
    too: that stream is refused as well, and the third one drawn is taken everywhere. Its pointers of the first
    still resolve from its journal (here only: its streams name its new instance)."""
    first, second = MIN_INSTANCE + 1, MIN_INSTANCE + 2
    drawing(monkeypatch, first, second)
    b0, server0, address0 = await in_process_broker("b0")
    b1, server1, address1 = await in_process_broker("b1")
    now = time.monotonic()
    for broker, instance in ((b1, first), (b0, second)):  # other processes' streams, each holding one
        ghost = RelayStream("elsewhere", "peer", 1 << 20)
        ghost.nonce = 7
        broker.router.claim(ghost, instance, now)
        broker.router.attach(ghost)
    hub, links, dispatcher, client = in_process_proxy("p0")
    await links.apply(Snapshot(1, (Member("b0", address0),), CLUSTER))
    assert await links.changed.wait_until(lambda: links.settled() and hub.issuing, 10)
    assert hub.instance == first
    b0.accept(numbered(0, 1), "publisher")
    assert await hub.advanced.wait_until(lambda: len(client.events) == 2, 10)
    pointer = encode_pointer(hub.pointer_prefix, hub.journal.next - 2).decode()
    token = hub.resolve(pointer)
    assert token is not None
    await links.apply(Snapshot(2, (Member("b0", address0), Member("b1", address1)), CLUSTER))
    assert await links.changed.wait_until(lambda: links.settled() and hub.issuing, 10)
    third = hub.instance
    assert third not in (first, second) and set(hub.issued) == {first, third}
    assert b0.router.instances.keys() == {second, third} and b1.router.instances.keys() == {first, third}
    assert hub.resolve(pointer) == token
    assert await resolve_pointer(hub, links, pointer) == token.decode()
    with pytest.raises(LookupError):
        await b0.resolve(pointer)  # b0 knows `first` only as lately held by this process: asked of no one
    dispatcher.cancel()
    await links.close()
    await server0.stop(None)
    await server1.stop(None)


async def test_a_broker_that_cannot_be_reached_does_not_hold_up_pointers() -> None:
    """Pointers are issued once every link's broker took the instance or could not be asked (its relay failed
    otherwise than by refusing it): a broker down does not leave a proxy with full tokens on every event."""
    _, server, address = await in_process_broker()
    closed = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    gone = f"127.0.0.1:{closed.sockets[0].getsockname()[1]}"
    closed.close()
    await closed.wait_closed()  # nothing listens there now
    hub, links, dispatcher, _ = in_process_proxy("p0")
    await links.apply(Snapshot(1, (Member("b0", address), Member("b1", gone)), CLUSTER))
    assert await links.changed.wait_until(lambda: hub.issuing, 10)
    assert links.links["b1"].state != LinkState.CONNECTED and links.links["b1"].verdict == hub.instance
    dispatcher.cancel()
    await links.close()
    await server.stop(None)


async def test_a_proxy_process_drawing_a_gone_ones_instance_is_refused_it_and_its_pointer_is_a_gap(
        start: Any, tmp_path: Path) -> None:
    """Real processes: a proxy is killed (kill -9) with a client holding one of its pointers; a new proxy process
    draws the same instance (forced by a test-only `sitecustomize`): the brokers refuse it, it draws another (its
    pointers name that one), and the old pointer resumed at it gives the gap signal, read from no journal."""
    shared = MIN_INSTANCE + 4242
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(  # the process's first draw is `shared`, later ones at random
        "import neoplasma.core.resume as resume\n"
        f"_drawn, _real = [{shared}], resume.new_instance\n"
        "resume.new_instance = lambda: _drawn.pop() if _drawn else _real()\n")
    forced = {"PYTHONPATH": os.pathsep.join(filter(None, (str(hook), os.environ.get("PYTHONPATH"))))}
    bs = [start("broker", f"b{i}") for i in range(2)]
    first = start("proxy", "p0", "--drain-retry-ms", "100", env=forced)
    await push(first, 1, members(bs))
    await wait_for(lambda: links_ready(first.endpoints["control"], 2), what="links")
    _, pointer = await cut_with_pointer(first, bs, 0)
    assert parse_pointer(pointer)[0] == shared, "the hook did not force the instance"
    first.proc.kill()
    first.proc.wait()
    second = start("proxy", "p1", "--drain-retry-ms", "100", env=forced)
    await push(second, 1, members(bs))
    await wait_for(lambda: links_ready(second.endpoints["control"], 2), what="links")
    _, own = await cut_with_pointer(second, bs, 1)
    assert parse_pointer(own)[0] != shared  # refused the gone one's instance, it drew another
    assert "pointer_instance_refused" in second.log()
    after = EventSource(lambda: second.endpoints["http"], "t", token=pointer).start()
    await wait_for(lambda: after.gaps, timeout=20, what="the gap signal")
    assert "pointer" in after.gaps[0]["reason"], after.gaps
    resolved = await counters(second.endpoints["http"], "neoplasma_proxy_pointer_resolves_total", "result")
    assert resolved == {"local": 0, "remote": 0, "unresolved": 1}, resolved
    await after.close()


async def test_a_relay_that_ends_or_is_refused_inside_its_first_interest_leaves_nothing_routed_to_it() -> None:
    """The first Interest may come in parts, each applied as it is read: a proxy that goes away after a part,
    or sends a bad one, must not leave the stream in the broker's topic index (events would be queued for
    nobody, and the index would keep its topics)."""
    broker, server, address = await in_process_broker()
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = pb_grpc.BrokerStub(channel)
            ended = stub.Relay()
            await ended.write(pb.Interest(add=["gone"], replace=True, proxy="p", more=True))
            await ended.done_writing()
            assert [batch async for batch in ended] == []  # it ended before its interest was whole
            refused = stub.Relay()
            await refused.write(pb.Interest(add=["bad"], replace=True, proxy="p", more=True))
            await refused.write(pb.Interest(add=["no spaces allowed \x00"], more=False))
            with pytest.raises(grpc.aio.AioRpcError) as error:
                _ = [batch async for batch in refused]
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert await wait_until_true(lambda: not broker.router._index.matching("gone")
                                and not broker.router._index.matching("bad"), 5)
        broker.accept([("gone", b"{}"), ("bad", b"{}")], "publisher")
        assert not broker.router.streams
    finally:
        await server.stop(None)


async def test_catch_ups_cancelled_while_waiting_for_the_rate_give_it_back() -> None:
    """Resumes whose clients left while they waited for the catch-up rate do not hold up the next one: what they took
    of the rate is given back (1000 attackers leaving mid-catch-up took seconds of it ahead)."""
    budget = ResumeBudget(catch_up_bytes_per_second=10_000)
    loop = asyncio.get_running_loop()
    await budget.pace(1000)  # the burst's worth: at once
    waiting = [asyncio.create_task(budget.pace(1000)) for _ in range(20)]  # 0.1 s each: 2 s of the rate ahead
    await asyncio.sleep(0)
    for task in waiting:
        task.cancel()
    await asyncio.gather(*waiting, return_exceptions=True)
    started = loop.time()
    await budget.pace(1000)
    assert loop.time() - started < 0.5  # ~0.1 s: its own share after the first burst, not 2.1 s behind the cancelled


async def test_catch_up_writes_a_tenth_of_a_seconds_worth_of_its_rate_at_once() -> None:
    """After a quiet while, a proxy's catch-up may write a tenth of a second's worth of --catch-up-bytes-per-second
    without waiting, then at that rate (as the brokers' replays walk): 1000 resumes arriving together do not start
    with a whole second's worth written as fast as the loop goes, beside the work of their connections."""
    budget = ResumeBudget(catch_up_bytes_per_second=10_000)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await budget.pace(1000)  # a tenth of a second's worth: at once
    assert loop.time() - started < 0.05
    await budget.pace(1000)  # the next tenth waits for its time
    assert loop.time() - started >= 0.09
