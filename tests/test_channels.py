"""Kept gRPC channels (neoplasma.core.control): the Drain calls and the brokers' Stats and proxies' Status
reads go over one channel per pod, kept open between calls, or over one channel per call without."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from neoplasma.core import drains
from neoplasma.core.control import IDLE, BrokerChannels, Channels, ProxyChannels, call
from neoplasma.core.load import BATCH, BATCH_WAIT, broker_load, broker_stats, by_address, proxy_load, proxy_statuses
from neoplasma.core.trust import PLAIN, Access
from neoplasma.wire.v1 import neoplasma_pb2 as pb
from neoplasma.wire.v1 import neoplasma_pb2_grpc as pb_grpc


class Pod(pb_grpc.BrokerServicer, pb_grpc.ProxyControlServicer):  # type: ignore[misc]
    """A broker's Stats and a proxy's Status and Drain, counting the connections (peers) they came over."""

    def __init__(self) -> None:
        self.peers: list[str] = []
        self.drains: list[pb.DrainRequest] = []

    async def Stats(self, request: pb.StatsRequest, context: grpc.aio.ServicerContext) -> pb.BrokerStats:  # noqa: N802  (the RPC names)
        self.peers.append(context.peer())
        return pb.BrokerStats(connections=3)

    async def Status(self, request: pb.StatusRequest, context: grpc.aio.ServicerContext) -> pb.ProxyStatus:  # noqa: N802  (the RPC names)
        self.peers.append(context.peer())
        return pb.ProxyStatus(subscribers=5)

    async def Drain(self, request: pb.DrainRequest, context: grpc.aio.ServicerContext) -> pb.DrainResponse:  # noqa: N802  (the RPC names)
        self.peers.append(context.peer())
        self.drains.append(request)
        return pb.DrainResponse()


@pytest.fixture
async def pod() -> AsyncIterator[tuple[Pod, str]]:
    servicer = Pod()
    server = grpc.aio.server()
    pb_grpc.add_BrokerServicer_to_server(servicer, server)
    pb_grpc.add_ProxyControlServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield servicer, f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


async def test_calls_over_kept_channels_share_one_connection_per_pod(pod: tuple[Pod, str]) -> None:
    servicer, address = pod
    brokers, proxies = BrokerChannels(), ProxyChannels()
    for _ in range(3):
        assert (await broker_stats([address], PLAIN, channels=brokers))[address].connections == 3
        assert (await broker_load([address], PLAIN, brokers)).total == 3
        assert (await proxy_statuses([address], PLAIN, channels=proxies))[address].subscribers == 5
        assert (await proxy_load([address], PLAIN, channels=proxies)).total == 5
        assert await drains.send({address: drains.pace(7)}, PLAIN, proxies) == {}
    assert len(brokers) == len(proxies) == 1
    assert len(servicer.peers) == 15 and len(set(servicer.peers)) <= 2  # a connection per set of channels (or one)
    assert [d.reconnects_per_second for d in servicer.drains] == [7, 7, 7]
    await brokers.close()
    await proxies.close()


async def test_without_kept_channels_each_call_has_its_own(pod: tuple[Pod, str]) -> None:
    servicer, address = pod
    for _ in range(2):
        assert (await broker_stats([address], PLAIN))[address].connections == 3
        assert (await proxy_statuses([address], PLAIN))[address].subscribers == 5
        assert await drains.send({address: drains.pace(1)}, PLAIN) == {}
    assert len(servicer.peers) == 6 and len(set(servicer.peers)) > 2  # connections made again (grpc may share one
    # between two channels open at once)


async def test_a_pod_that_does_not_answer_is_left_out_and_its_channel_kept_until_pruned() -> None:
    with __import__("socket").socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{sock.getsockname()[1]}"
    now = [0.0]
    brokers, proxies = BrokerChannels(lambda: now[0]), ProxyChannels(lambda: now[0])
    assert await broker_stats([address], PLAIN, channels=brokers) == {}
    failed = await drains.send({address: drains.pace(1)}, PLAIN, proxies)
    assert failed[address].startswith("UNAVAILABLE")
    assert len(brokers) == len(proxies) == 1
    brokers.prune([])
    assert len(brokers) == 1  # just used
    now[0] += IDLE
    brokers.prune([address])
    assert len(brokers) == 1  # still wanted
    brokers.prune([])
    assert len(brokers) == 0
    await proxies.close()


async def test_call_over_a_channel_of_its_own_closes_it() -> None:
    made: list[Channels[Any]] = []

    def make() -> Channels[Any]:
        made.append(Channels(lambda channel: channel))
        return made[-1]

    async def state(channel: grpc.aio.Channel) -> grpc.ChannelConnectivity:
        return channel.get_state()

    assert await call(None, make, "127.0.0.1:1", PLAIN, state) == grpc.ChannelConnectivity.IDLE
    assert len(made) == 1 and len(made[0]) == 0  # closed after the call
    kept = make()
    await call(kept, make, "127.0.0.1:1", PLAIN, state)
    assert len(made) == 2 and len(kept) == 1  # kept: not made anew, left open
    await kept.close()


async def test_proxy_channels_leave_out_grpc_retries_and_the_bdp_probe() -> None:
    """The proxies' channels carry short unary calls that their callers retry: gRPC's retry filter and BDP
    probe are turned off on them (~20 % of the operator's CPU per push); the brokers' channels keep the defaults."""

    class Recording(Access):
        def channel(self, address: str, options: Any = ()) -> grpc.aio.Channel:
            made.append(dict(options))
            return super().channel(address, options)

    made: list[dict[str, Any]] = []
    access = Recording()
    proxies, brokers = ProxyChannels(), BrokerChannels()
    proxies.stub("127.0.0.1:9", access)
    brokers.stub("127.0.0.1:9", access)
    await proxies.close()
    await brokers.close()
    assert made[0]["grpc.enable_retries"] == 0 and made[0]["grpc.http2.bdp_probe"] == 0
    assert made[1] == {}


async def test_a_gated_read_goes_in_batches_behind_the_gate_and_a_frozen_pod_holds_none() -> None:
    """With a gate (the operator's: a membership change's pushes under way), the reads of 250 pods start 100 at a
    time, each batch only once the gate let it; a pod that never answers holds its batch BATCH_WAIT at most."""
    started: list[str] = []
    seen_by_gate: list[int] = []
    held, at_gate = asyncio.Event(), asyncio.Event()

    async def read(address: str) -> str | None:
        started.append(address)
        if address.endswith("7"):  # frozen: answers nothing until its timeout
            await asyncio.sleep(0.3)
            return None
        return address

    async def gate() -> None:
        seen_by_gate.append(len(started))
        if len(seen_by_gate) == 2:
            at_gate.set()
            await held.wait()  # a change's pushes under way

    addresses = [f"10.0.0.{i}:1" for i in range(250)]
    began = time.monotonic()
    reading = asyncio.ensure_future(by_address(addresses, read, gate))
    await asyncio.wait_for(at_gate.wait(), 5.0)
    for _ in range(10):
        await asyncio.sleep(0)  # the first batch's reads run on meanwhile
    assert len(started) == BATCH  # the second batch waits for the gate
    held.set()
    answers = await asyncio.wait_for(reading, 5.0)
    assert seen_by_gate == [0, 100, 200] and sorted(started) == sorted(addresses)
    assert set(answers) == {a for a in addresses if not a.endswith("7")}
    assert time.monotonic() - began < 0.3 + 0.1 + 3 * BATCH_WAIT + 0.3  # frozen ones overlapped, never in series
