"""Reading connection load from brokers (Stats) and proxies (Status) over gRPC.

Shared by the operator and `neoplasma up`. A pod that cannot be read is left out
(`pods_read` says how many answered); it is never counted as zero load.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from typing import TypeVar

import grpc

from neoplasma.core.control import BrokerChannels, ProxyChannels, call
from neoplasma.core.scaling import Load
from neoplasma.core.trust import PLAIN, Access
from neoplasma.wire.v1 import neoplasma_pb2 as pb
from neoplasma.wire.v1 import neoplasma_pb2_grpc as pb_grpc

TIMEOUT = 2.0
# A read with a gate (`by_address`) starts its calls BATCH at a time, the gate awaited before each batch, the next
# batch once this one answered or after BATCH_WAIT seconds (so a frozen pod holds no batch longer than that).
BATCH = 100
BATCH_WAIT = 0.05
Gate = Callable[[], Awaitable[None]]


async def _broker_stats(address: str, access: Access, timeout: float,
                        channels: BrokerChannels | None) -> pb.BrokerStats | None:
    async def read(stub: pb_grpc.BrokerStub) -> pb.BrokerStats:
        stats: pb.BrokerStats = await stub.Stats(pb.StatsRequest(), timeout=timeout, metadata=access.metadata())
        return stats

    try:
        return await call(channels, BrokerChannels, address, access, read)
    except grpc.aio.AioRpcError:
        return None


async def _proxy_status(address: str, access: Access, timeout: float,
                        channels: ProxyChannels | None) -> pb.ProxyStatus | None:
    async def read(stub: pb_grpc.ProxyControlStub) -> pb.ProxyStatus:
        status: pb.ProxyStatus = await stub.Status(pb.StatusRequest(), timeout=timeout, metadata=access.metadata())
        return status

    try:
        return await call(channels, ProxyChannels, address, access, read)
    except grpc.aio.AioRpcError:
        return None


_Answer = TypeVar("_Answer")


async def by_address(addresses: Iterable[str], read: Callable[[str], Awaitable[_Answer | None]],
                     gate: Gate | None = None) -> dict[str, _Answer]:
    """`read` of every address: the answers by address, those that answered. All at once without `gate`; with
    it, BATCH at a time, each batch after `gate()` returned (the operator's: once a membership change's pushes
    under way ended), so that a change coming during a read of 1000 proxies shares the CPU with one batch of
    calls rather than with all of them. Every read is still started within BATCH_WAIT per batch plus the
    gate's waits, and each still has its own timeout."""
    chosen = list(addresses)
    if gate is None:
        answers = await asyncio.gather(*(read(a) for a in chosen))
    else:
        tasks: list[asyncio.Task[_Answer | None]] = []
        for start in range(0, len(chosen), BATCH):
            await gate()
            batch = [asyncio.ensure_future(read(a)) for a in chosen[start:start + BATCH]]
            tasks += batch
            await asyncio.wait(batch, timeout=BATCH_WAIT)
        answers = await asyncio.gather(*tasks)
    return {address: answer for address, answer in zip(chosen, answers, strict=True) if answer is not None}


async def broker_stats(grpc_addresses: Iterable[str], access: Access = PLAIN, timeout: float = TIMEOUT,
                       channels: BrokerChannels | None = None) -> dict[str, pb.BrokerStats]:
    """The Stats of each broker that answered, by address (one call per broker; over `channels`, kept open,
    if given, else a channel per call)."""
    return await by_address(grpc_addresses, lambda a: _broker_stats(a, access, timeout, channels))


def brokers_load(answers: Iterable[pb.BrokerStats]) -> Load:
    """Connections (publishers + relay streams) and events/s over the brokers' Stats."""
    stats = list(answers)
    return Load(total=float(sum(s.connections for s in stats)), pods_read=len(stats),
                events_per_second=sum(s.events_in_per_second for s in stats))


async def broker_load(grpc_addresses: Iterable[str], access: Access = PLAIN,
                      channels: BrokerChannels | None = None) -> Load:
    """Connections (publishers + relay streams) and events/s over the brokers that answered."""
    return brokers_load((await broker_stats(grpc_addresses, access, channels=channels)).values())


async def proxy_statuses(control_addresses: Iterable[str], access: Access = PLAIN, timeout: float = TIMEOUT,
                         channels: ProxyChannels | None = None, gate: Gate | None = None) -> dict[str, pb.ProxyStatus]:
    """The Status of each proxy that answered, by control address (one call per proxy; over `channels`,
    kept open, if given, else a channel per call; in batches behind `gate`, if given: see `by_address`)."""
    return await by_address(control_addresses, lambda a: _proxy_status(a, access, timeout, channels), gate)


def proxies_load(answers: Iterable[pb.ProxyStatus]) -> Load:
    """Subscribers over the proxies' Status."""
    statuses = list(answers)
    return Load(total=float(sum(s.subscribers for s in statuses)), pods_read=len(statuses))


async def proxy_load(control_addresses: Iterable[str], access: Access = PLAIN, timeout: float = TIMEOUT,
                     channels: ProxyChannels | None = None) -> Load:
    """Subscribers over the proxies that answered."""
    return proxies_load((await proxy_statuses(control_addresses, access, timeout, channels)).values())
