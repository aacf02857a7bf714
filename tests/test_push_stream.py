"""Membership pushed over a stream kept open to each proxy (ProxyControl.ApplyStream, core.push): acknowledged as
Apply acknowledges, refused as Apply refuses; unary Apply for a proxy without it and while a broken stream waits to be
reopened; a frozen proxy holds only its own push; garbage on a stream ends that stream alone."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from harness import ACCESS, AUTH, CREDENTIAL, proxy_status, wait_for

from neoplasma.core.backoff import BackoffPolicy
from neoplasma.core.membership import EMPTY, Member, Snapshot
from neoplasma.core.push import OLDER_PROXY, MembershipPusher, Reopening
from neoplasma.core.trust import Access, Tokens
from neoplasma.operator.members import ProxyTarget
from neoplasma.operator.sync import MembershipSync
from neoplasma.proxy.server import ControlServicer, Proxy, control_server
from neoplasma.wire.v1 import neoplasma_pb2 as pb
from neoplasma.wire.v1 import neoplasma_pb2_grpc as pb_grpc

SOON = Reopening(BackoffPolicy(initial=0.3, maximum=0.3))  # a broken stream may be reopened 0.3 s after it ended


def snapshot(version: int, port: int = 1) -> Snapshot:
    return Snapshot(version, (Member("b0", f"10.0.0.1:{port}"),))


class Links:
    """What `Proxy.apply` uses of a proxy's links: the applied snapshot (no relay stream is opened)."""

    def __init__(self) -> None:
        self.applied = EMPTY

    async def apply(self, applied: Snapshot) -> None:
        self.applied = applied

    def to_proto(self) -> list[pb.BrokerLink]:
        return []


class Held:
    """A proxy as its control port shows it: `apply` is `Proxy.apply` (its version checks, refusals and answers)."""

    apply = Proxy.apply
    _answer = Proxy._answer

    def __init__(self) -> None:
        self.links = Links()
        self._apply_lock = asyncio.Lock()


class Counted(ControlServicer):
    """The proxy's control servicer, counting unary Apply calls and the streams opened; the streams opened after
    `break_after` of them end with UNAVAILABLE after their first answer (a proxy going away under a stream)."""

    def __init__(self, break_after: int | None = None) -> None:
        super().__init__(Held())  # type: ignore[arg-type]  # (only apply is used)
        self.unary = self.opened = 0
        self.break_after = break_after

    async def Apply(self, request: pb.Membership, context: grpc.aio.ServicerContext) -> pb.ApplyResponse:  # noqa: N802  (the RPC names)
        self.unary += 1
        return await super().Apply(request, context)

    async def ApplyStream(self, request_iterator: object, context: grpc.aio.ServicerContext) -> None:  # noqa: N802  (the RPC names)
        self.opened += 1
        if self.break_after is None or self.opened <= self.break_after:
            return await super().ApplyStream(request_iterator, context)
        await context.write(await self.proxy.apply(await context.read()))
        await context.abort(grpc.StatusCode.UNAVAILABLE, "the proxy is going away")

    @property
    def version(self) -> int:
        return self.proxy.links.applied.version


class Controls:
    """Proxies' control servers (`control_server`, the credential checked) started for servicers."""

    def __init__(self) -> None:
        self.servers: list[grpc.aio.Server] = []

    async def start(self, servicer: pb_grpc.ProxyControlServicer, port: int = 0,
                    credentials: tuple[str, ...] = (CREDENTIAL,)) -> str:
        """Serve `servicer` on 127.0.0.1:`port` (0: any), taking `credentials`; its address."""
        server = control_server(servicer, Tokens(given=credentials))
        port = server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        self.servers.append(server)
        return f"127.0.0.1:{port}"

    async def stop(self, grace: float | None = None) -> None:
        servers, self.servers = self.servers, []
        for server in servers:
            await server.stop(grace)


@pytest.fixture
async def controls() -> AsyncIterator[Controls]:
    started = Controls()
    yield started
    await started.stop()


@pytest.fixture
async def frozen() -> AsyncIterator[str]:
    """An address that accepts TCP connections and never answers (no HTTP/2 either)."""
    held: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    yield f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    for writer in held:
        writer.close()
    server.close()


def test_reopening_backs_off_after_breaks_waits_long_for_an_older_proxy_and_forgets_what_it_no_longer_pushes() -> None:
    reopening = Reopening(BackoffPolicy(initial=0.5, maximum=2.0), older=300.0)
    assert reopening.may_open("a:1", 0.0)  # never broke
    assert [reopening.ended("a:1", grpc.StatusCode.UNAVAILABLE, 10.0 * n) for n in range(4)] == [0.5, 1.0, 2.0, 2.0]
    assert not reopening.may_open("a:1", 31.9) and reopening.may_open("a:1", 32.0)
    reopening.answered("a:1")  # a stream of it answered: the next break starts over
    assert reopening.ended("a:1", grpc.StatusCode.CANCELLED, 40.0) == 0.5
    assert reopening.ended("b:1", grpc.StatusCode.UNIMPLEMENTED, 0.0) == 300.0
    assert not reopening.may_open("b:1", 299.0) and reopening.may_open("b:1", 300.0)
    reopening.keep({"a:1"})
    assert reopening.may_open("b:1", 0.0)  # forgotten: no longer pushed to
    assert not reopening.may_open("a:1", 40.1)


async def test_pushes_go_over_one_kept_stream_and_are_acknowledged(controls: Controls) -> None:
    servicer = Counted()
    address = await controls.start(servicer)
    pusher = MembershipPusher(access=ACCESS)
    for version in (1, 2, 3):
        result = await pusher.push_one("p0", address, snapshot(version, port=version))
        assert (result.ok, result.applied_version, result.error) == (True, version, "")
    assert servicer.version == 3 and (servicer.opened, servicer.unary) == (1, 0)
    assert pusher.streaming(address)
    await pusher.close()
    assert not pusher.streaming(address)


async def test_a_stream_is_kept_while_the_credential_is_the_same_and_replaced_when_it_changes(
        controls: Controls) -> None:
    servicer = Counted()
    address = await controls.start(servicer, credentials=(CREDENTIAL, "rotated"))  # (as during a rotation)
    pusher = MembershipPusher(access=ACCESS)
    assert (await pusher.push_one("p0", address, snapshot(1))).ok
    pusher.access = Access(Tokens(given=[CREDENTIAL]))  # read again by the operator: equal, not the same object
    assert (await pusher.push_one("p0", address, snapshot(2))).ok
    assert (servicer.opened, servicer.unary) == (1, 0)
    pusher.access = Access(Tokens(given=["rotated"]))
    assert (await pusher.push_one("p0", address, snapshot(3))).ok
    assert (servicer.opened, servicer.unary, servicer.version) == (2, 0, 3)
    await pusher.close()


async def test_what_a_proxy_refuses_is_refused_over_the_stream_which_stays_open(controls: Controls) -> None:
    servicer = Counted()
    address = await controls.start(servicer)
    pusher = MembershipPusher(access=ACCESS)
    assert (await pusher.push_one("p0", address, snapshot(2))).ok
    other = await pusher.push_one("p0", address, snapshot(2, port=9))  # the same version, other brokers
    assert not other.ok and other.applied_version == 2
    assert "refused version 2: refused: version 2 is applied with other contents" in other.error
    invalid = await pusher.push_one("p0", address, Snapshot(3, (Member("b0", "no port"),)))
    assert not invalid.ok and "is not host:port" in invalid.error and invalid.applied_version == 2
    assert (await pusher.push_one("p0", address, snapshot(4))).ok
    assert servicer.version == 4 and (servicer.opened, servicer.unary) == (1, 0)
    await pusher.close()


async def test_a_proxy_without_the_stream_is_pushed_with_apply_and_asked_again_much_later() -> None:
    """An older proxy (no ApplyStream: UNIMPLEMENTED) gets each push by Apply, its first within the same push."""
    servicer, asked = Counted(), []

    class Asked(grpc.aio.ServerInterceptor):  # type: ignore[misc]
        async def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
            asked.append(details.method)
            return await continuation(details)

    older = grpc.aio.server(interceptors=[Asked()])
    older.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("neoplasma.v1.ProxyControl", {
        "Apply": grpc.unary_unary_rpc_method_handler(servicer.Apply, pb.Membership.FromString,
                                                     pb.ApplyResponse.SerializeToString)})])
    address = f"127.0.0.1:{older.add_insecure_port('127.0.0.1:0')}"
    await older.start()
    pusher = MembershipPusher(access=ACCESS)
    try:
        began = time.monotonic()
        for version in (1, 2, 3):
            assert (await pusher.push_one("p0", address, snapshot(version))).ok
        assert time.monotonic() - began < pusher.timeout
        assert servicer.version == 3 and servicer.unary == 3
        assert asked.count("/neoplasma.v1.ProxyControl/ApplyStream") == 1  # not asked again for every push
        assert not pusher.streaming(address)
        assert not pusher.reopening.may_open(address, time.monotonic() + OLDER_PROXY - 1)
        assert pusher.reopening.may_open(address, time.monotonic() + OLDER_PROXY + 1)
    finally:
        await pusher.close()
        await older.stop(None)


async def test_a_stream_that_breaks_under_a_push_is_made_good_by_apply_then_reopened(controls: Controls) -> None:
    servicer = Counted(break_after=0)  # every stream ends after its first answer
    address = await controls.start(servicer)
    pusher = MembershipPusher(access=ACCESS, reopening=SOON)
    assert (await pusher.push_one("p0", address, snapshot(1))).ok  # over the stream, which then ends
    await wait_for(lambda: not pusher.streaming(address), 5, "the stream's end seen")
    assert (await pusher.push_one("p0", address, snapshot(2))).ok  # Apply: not reopened yet
    assert (servicer.opened, servicer.unary) == (1, 1)
    await asyncio.sleep(0.5)  # past SOON's delay after the stream ended
    assert (await pusher.push_one("p0", address, snapshot(3))).ok  # a new stream, which ends too
    assert (servicer.opened, servicer.unary, servicer.version) == (2, 1, 3)
    servicer.break_after = None  # from now on a stream stays open
    await asyncio.sleep(0.5)
    for version in (4, 5, 6):
        assert (await pusher.push_one("p0", address, snapshot(version))).ok
    assert (servicer.opened, servicer.unary, servicer.version) == (3, 1, 6) and pusher.streaming(address)
    await pusher.close()


async def test_a_proxy_restarted_at_its_address_is_pushed_again(controls: Controls) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    first = Counted()
    address = await controls.start(first, port)
    pusher = MembershipPusher(access=ACCESS, timeout=1.0, reopening=SOON)
    assert (await pusher.push_one("p0", address, snapshot(1))).ok and pusher.streaming(address)
    await controls.stop()  # the proxy goes away; it comes back at the same address
    failed = await pusher.push_one("p0", address, snapshot(2))
    assert not failed.ok and failed.error.startswith("UNAVAILABLE")
    second = Counted()
    await controls.start(second, port)

    async def pushed() -> bool:
        return (await pusher.push_one("p0", address, snapshot(2))).ok

    async def pushed_over_a_stream() -> bool:
        return await pushed() and pusher.streaming(address)

    await wait_for(pushed, 10, "the restarted proxy pushed (Apply, or a new stream)", interval=0.06)
    await wait_for(pushed_over_a_stream, 10, "a push over a new stream", interval=0.06)
    assert second.version == 2 and second.opened == 1
    await pusher.close()


async def test_a_stopping_control_server_ends_its_streams_instead_of_waiting_its_grace(controls: Controls) -> None:
    servicer = Counted()
    address = await controls.start(servicer)
    pusher = MembershipPusher(access=ACCESS)
    assert (await pusher.push_one("p0", address, snapshot(1))).ok and pusher.streaming(address)
    began = time.monotonic()
    await servicer.streams.end()  # as ProxyService.close and the pod's close do, then:
    await controls.stop(grace=0.5)
    assert time.monotonic() - began < 0.4  # not held for the grace by the operator's stream
    await wait_for(lambda: not pusher.streaming(address), 5, "the operator seeing its stream end")
    assert not (await pusher.push_one("p0", address, snapshot(2))).ok  # (by Apply: the proxy is gone)
    await pusher.close()


async def test_a_frozen_proxy_holds_only_its_own_push(controls: Controls, frozen: str) -> None:
    servicer = Counted()
    address = await controls.start(servicer)
    pusher = MembershipPusher(access=ACCESS, timeout=0.5, reopening=Reopening(BackoffPolicy(initial=5, maximum=5)))
    assert (await pusher.push_one("p0", address, snapshot(1))).ok
    ended: dict[str, float] = {}
    began = time.monotonic()

    async def push(name: str, to: str) -> Any:
        result = await pusher.push_one(name, to, snapshot(2))
        ended[name] = time.monotonic() - began
        return result

    good, stuck = await asyncio.gather(push("p0", address), push("frozen", frozen))
    assert good.ok and ended["p0"] < 0.4  # not held by the frozen one's stream (which takes its 0.5 s)
    assert not stuck.ok and stuck.error.startswith("DEADLINE_EXCEEDED") and 0.45 < ended["frozen"] < 1.5
    assert not pusher.streaming(frozen)  # closed, to be reopened after a backoff
    assert not pusher.reopening.may_open(frozen, time.monotonic())
    again = time.monotonic()
    retried = await pusher.push_one("frozen", frozen, snapshot(2))  # by Apply meanwhile, within the timeout
    assert not retried.ok and retried.error.startswith("DEADLINE_EXCEEDED") and time.monotonic() - again < 1.5
    assert not pusher.streaming(frozen)
    await pusher.close()


async def test_a_stream_that_breaks_under_several_pushes_counts_one_failure(frozen: str) -> None:
    # Two pushes wait on one stream to a frozen proxy; the first to give up closes it and the other then sees it
    # ended: the stream broke once, so its reopening backs off once (0.5 s, not 0.5 s doubled).
    pusher = MembershipPusher(access=ACCESS, timeout=0.3, reopening=Reopening(BackoffPolicy(initial=0.5, maximum=8)))
    results = await asyncio.gather(pusher.push_one("frozen", frozen, snapshot(1)),
                                   pusher.push_one("frozen", frozen, snapshot(2)))
    assert not any(r.ok for r in results) and not pusher.streaming(frozen)
    assert pusher.reopening.ended(frozen, grpc.StatusCode.UNAVAILABLE, time.monotonic()) == 1.0  # the second failure
    await pusher.close()


async def test_garbage_or_an_oversized_message_ends_that_stream_alone(controls: Controls) -> None:
    servicer = Counted()
    address = await controls.start(servicer)
    async with grpc.aio.insecure_channel(address) as channel:
        raw = channel.stream_stream("/neoplasma.v1.ProxyControl/ApplyStream", request_serializer=lambda b: b,
                                    response_deserializer=pb.ApplyResponse.FromString)
        call = raw(metadata=AUTH)
        await call.write(pb.Membership(version=1).SerializeToString())
        assert (await call.read()).applied_version == 1
        await call.write(b"\xff\xff\xff")  # not a Membership
        assert await call.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "ApplyStream: the request cannot be decoded" in (await call.details() or "")
        big = raw(metadata=AUTH)
        await big.write(pb.Membership(version=2, cluster="x" * (5 << 20)).SerializeToString())
        assert await big.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # gRPC's 4 MB limit of a message
        stranger = raw()  # without the cluster credential
        with contextlib.suppress(grpc.aio.AioRpcError):  # (refused before or after its first message)
            await stranger.write(pb.Membership(version=3).SerializeToString())
        assert await stranger.code() == grpc.StatusCode.UNAUTHENTICATED
    pusher = MembershipPusher(access=ACCESS)
    assert (await pusher.push_one("p0", address, snapshot(4))).ok  # the server goes on
    assert servicer.version == 4 and servicer.unary == 0
    await pusher.close()


async def test_the_sync_acknowledges_over_streams_and_names_the_frozen_proxy_lagging(controls: Controls,
                                                                                      frozen: str) -> None:
    servicers = [Counted(), Counted()]
    targets = {f"p{i}": ProxyTarget(f"p{i}", await controls.start(s), "1") for i, s in enumerate(servicers)}
    targets["frozen"] = ProxyTarget("frozen", frozen, "1")
    sync = MembershipSync(MembershipPusher(access=ACCESS, timeout=0.5))
    for version in (1, 2):
        sync.update([Member("b0", f"10.0.0.1:{version}")], targets, seen_at=time.monotonic())
        sync.push()
        await wait_for(lambda: sync.progress().acknowledged == 2 and sync.progress().errors, 5,
                       "the answering proxies acknowledged, the frozen one failed")
        assert [s.version for s in servicers] == [version, version]
    progress = sync.progress()
    assert progress.lagging == ("frozen",) and progress.errors["frozen"].startswith("DEADLINE_EXCEEDED")
    assert [(s.opened, s.unary) for s in servicers] == [(1, 0), (1, 0)]
    await sync.close()


async def test_a_proxy_pod_of_workers_answers_pushes_on_its_stream(start: Any) -> None:
    broker = start("broker", "b0")
    proxy = start("proxy", "p0", "--workers", "2")
    control = proxy.endpoints["control"]
    pusher = MembershipPusher(access=ACCESS)
    members = (Member(broker.name, broker.endpoints["grpc"]),)
    assert (await pusher.push_one("p0", control, Snapshot(1, members))).ok
    assert pusher.streaming(control)  # the pod's supervisor serves the stream
    assert (await proxy_status(control)).membership_version == 1  # the lowest of its workers'
    refused = await pusher.push_one("p0", control, Snapshot(1, (*members, Member("b9", "10.0.0.9:1"))))
    assert not refused.ok and "applied with other contents" in refused.error
    assert (await pusher.push_one("p0", control, Snapshot(2, members))).ok and pusher.streaming(control)
    assert (await proxy_status(control)).membership_version == 2
    await pusher.close()
