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


async def by_address(addresses: Iterable[str], read: Callable[[str], Awaitable[_Answer | None]]
                      ) -> dict[str, _Answer]:
    """`read` of every address at once: the answers by address, those that answered."""
    chosen = list(addresses)
    answers = await asyncio.gather(*(read(a) for a in chosen))
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
                         channels: ProxyChannels | None = None) -> dict[str, pb.ProxyStatus]:
    """The Status of each proxy that answered, by control address (one call per proxy; over `channels`,
    kept open, if given, else a channel per call)."""
    return await by_address(control_addresses, lambda a: _proxy_status(a, access, timeout, channels))


def proxies_load(answers: Iterable[pb.ProxyStatus]) -> Load:
    """Subscribers over the proxies' Status."""
    statuses = list(answers)
    return Load(total=float(sum(s.subscribers for s in statuses)), pods_read=len(statuses))


async def proxy_load(control_addresses: Iterable[str], access: Access = PLAIN, timeout: float = TIMEOUT,
                     channels: ProxyChannels | None = None) -> Load:
    """Subscribers over the proxies that answered."""
    return proxies_load((await proxy_statuses(control_addresses, access, timeout, channels)).values())
