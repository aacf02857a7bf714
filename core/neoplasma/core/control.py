"""Channels to the proxies' control ports, one per proxy, reused by every call made to it.

At 1000 proxies a channel per call costs as much as the call itself (a channel made, connected
and closed for each push or Status read), so the operator keeps one per proxy for its
membership pushes and its Status reads. A channel is made for the TLS settings of the access it
is asked with, and made again when they change (the credential goes with each call).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

import grpc

from neoplasma.core.trust import Access
from neoplasma.wire.v1 import neoplasma_pb2_grpc as pb_grpc

_Tls = tuple[str, str, str]  # what a channel was made for: the CA, the CA file, the server name


def _tls(access: Access) -> _Tls:
    return access.ca, access.ca_file, access.server_name


class ProxyChannels:
    """The open channels (and their stubs) to proxies' control addresses."""

    def __init__(self) -> None:
        self._open: dict[str, tuple[_Tls, grpc.aio.Channel, pb_grpc.ProxyControlStub]] = {}
        self._closing: set[asyncio.Task[None]] = set()

    def stub(self, address: str, access: Access) -> pb_grpc.ProxyControlStub:
        """The stub of `address`'s channel, made once for `access`'s TLS settings."""
        known = self._open.get(address)
        if known is None or known[0] != _tls(access):
            if known is not None:
                self._close_later(known[1])
            channel = access.channel(address)
            known = self._open[address] = (_tls(access), channel, pb_grpc.ProxyControlStub(channel))
        return known[2]

    def __len__(self) -> int:
        return len(self._open)

    def prune(self, keep: Iterable[str]) -> None:
        """Close the channels to addresses not in `keep`."""
        wanted = set(keep)
        for address in [a for a in self._open if a not in wanted]:
            self._close_later(self._open.pop(address)[1])

    def _close_later(self, channel: grpc.aio.Channel) -> None:
        task = asyncio.get_running_loop().create_task(channel.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        channels, self._open = [c for _, c, _ in self._open.values()], {}
        for channel in channels:
            await channel.close()
        await asyncio.gather(*self._closing)
