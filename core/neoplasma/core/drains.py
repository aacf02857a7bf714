"""Telling proxies how fast to move subscribers (ProxyControl.Drain): the I/O of the operator's
connections step (neoplasma.operator.connections decides, this sends).

A terminating pod gets the pace of its drain (`keep_at_most` 0); a live one, during a rebalance,
its limit (`keep_at_most`, `hold_seconds`). Each call is independent and idempotent (a limit is
renewed, a pace replaced), so a failed one is simply sent again on the next pass.
"""

from __future__ import annotations

from collections.abc import Mapping

import grpc

from neoplasma.core.control import ProxyChannels, call
from neoplasma.core.load import by_address
from neoplasma.core.trust import PLAIN, Access
from neoplasma.wire.v1 import neoplasma_pb2 as pb
from neoplasma.wire.v1 import neoplasma_pb2_grpc as pb_grpc

TIMEOUT = 2.0


def pace(rate: float) -> pb.DrainRequest:
    """A drain (or the drain under way) at `rate` reconnects per second."""
    return pb.DrainRequest(reconnects_per_second=rate)


def limit(keep: int, rate: float, hold: float) -> pb.DrainRequest:
    """Hold at most `keep` subscribers for `hold` seconds, shedding the excess at `rate`."""
    return pb.DrainRequest(keep_at_most=keep, reconnects_per_second=rate, hold_seconds=hold)


async def send(requests: Mapping[str, pb.DrainRequest], access: Access = PLAIN,
               channels: ProxyChannels | None = None) -> dict[str, str]:
    """Send each control address its request, all at once (over `channels`, kept open, if given, else a
    channel per call); the errors by address (none: {})."""

    async def one(address: str, request: pb.DrainRequest) -> str | None:
        async def drain(stub: pb_grpc.ProxyControlStub) -> None:
            await stub.Drain(request, timeout=TIMEOUT, metadata=access.metadata())

        try:
            await call(channels, ProxyChannels, address, access, drain)
        except grpc.aio.AioRpcError as error:
            return f"{error.code().name}: {error.details()}"
        return None

    return await by_address(requests, lambda a: one(a, requests[a]))
