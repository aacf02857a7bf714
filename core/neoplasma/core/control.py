"""Channels to the pods' gRPC ports, one per pod, reused by every call made to it.

At 1000 proxies a channel per call costs as much as the call itself (a channel made, connected
and closed for each push, Status read or Drain), so the operator keeps one per proxy for its
membership pushes, its Status reads and its Drain calls (`ProxyChannels`), and one per broker for
its Stats reads (`BrokerChannels`); `neoplasma up` the same. A channel is made for the TLS settings
of the access it is asked with, and made again when they change (the credential goes with each call).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, Generic, TypeVar

import grpc

from neoplasma.core.trust import Access
from neoplasma.wire.v1 import neoplasma_pb2_grpc as pb_grpc

_Tls = tuple[str, str, str]  # what a channel was made for: the CA, the CA file, the server name
IDLE = 30.0  # seconds unused before `prune` may close a channel: longer than any call's timeout
# The proxies' channels carry short unary calls, each retried (or read again) by its caller, and each
# proxy's ApplyStream, whose messages (a membership, ~1 KB) never come near a flow-control window: gRPC's
# own retries (the retry filter, which copies every call's request and metadata) and its BDP probe (a
# ping per burst of data, to size that window) are cost without use there. Off, they took ~20 % of the
# operator's CPU per unary push (0.36 -> 0.29 ms; bench/membership.py).
PROXY_OPTIONS: tuple[tuple[str, Any], ...] = (("grpc.enable_retries", 0), ("grpc.http2.bdp_probe", 0))

Stub = TypeVar("Stub")
Answer = TypeVar("Answer")


def _tls(access: Access) -> _Tls:
    return access.ca, access.ca_file, access.server_name


class Channels(Generic[Stub]):
    """The open channels (and their `make_stub` stubs) to pods' addresses."""

    def __init__(self, make_stub: Callable[[grpc.aio.Channel], Stub],
                 clock: Callable[[], float] = time.monotonic, options: Sequence[tuple[str, Any]] = ()) -> None:
        """`options`: the gRPC channel options of every channel made."""
        self._make_stub, self._clock, self._options = make_stub, clock, options
        self._open: dict[str, tuple[_Tls, grpc.aio.Channel, Stub]] = {}
        self._used: dict[str, float] = {}  # when each address's stub was last asked for
        self._closing: set[asyncio.Task[None]] = set()

    def stub(self, address: str, access: Access) -> Stub:
        """The stub of `address`'s channel, made once for `access`'s TLS settings."""
        self._used[address] = self._clock()
        known = self._open.get(address)
        if known is None or known[0] != _tls(access):
            if known is not None:
                self._close_later(known[1])
            channel = access.channel(address, self._options)
            known = self._open[address] = (_tls(access), channel, self._make_stub(channel))
        return known[2]

    def __len__(self) -> int:
        return len(self._open)

    def prune(self, keep: Iterable[str]) -> None:
        """Close the channels to addresses not in `keep` that no call used for IDLE seconds (so a call under
        way on one, as another caller's to a pod `keep` leaves out, is never cut short)."""
        wanted, idle_since = set(keep), self._clock() - IDLE
        for address in [a for a in self._open if a not in wanted and self._used.get(a, 0.0) <= idle_since]:
            self._used.pop(address, None)
            self._close_later(self._open.pop(address)[1])

    def _close_later(self, channel: grpc.aio.Channel) -> None:
        task = asyncio.get_running_loop().create_task(channel.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        channels, self._open, self._used = [c for _, c, _ in self._open.values()], {}, {}
        for channel in channels:
            await channel.close()
        await asyncio.gather(*self._closing)


class ProxyChannels(Channels[pb_grpc.ProxyControlStub]):
    """Channels to proxies' control addresses (with PROXY_OPTIONS)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(pb_grpc.ProxyControlStub, clock, PROXY_OPTIONS)


class BrokerChannels(Channels[pb_grpc.BrokerStub]):
    """Channels to brokers' gRPC addresses."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(pb_grpc.BrokerStub, clock)


async def call(channels: Channels[Stub] | None, make: Callable[[], Channels[Stub]], address: str, access: Access,
               use: Callable[[Stub], Awaitable[Answer]]) -> Answer:
    """`use` of `address`'s stub: over `channels`, kept open, if given; else over a channel of `make()` for this
    call alone, closed after it."""
    used = channels if channels is not None else make()
    try:
        return await use(used.stub(address, access))
    finally:
        if used is not channels:
            await used.close()
