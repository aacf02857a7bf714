"""Pushing membership snapshots to proxies over their control RPC.

Used as-is by the operator and by the local runtime: one code path for both.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import grpc

from neoplasma.core.logs import get_logger
from neoplasma.core.membership import Snapshot
from neoplasma.wire.v1 import neoplasma_pb2 as pb
from neoplasma.wire.v1 import neoplasma_pb2_grpc as pb_grpc

log = get_logger("push")


@dataclass
class PushResult:
    target: str
    address: str
    ok: bool
    applied_version: int = 0
    error: str = ""
    connected: list[str] = field(default_factory=list)
    attempts: int = 0


class MembershipPusher:
    """Pushes snapshots to proxies concurrently, retrying each with backoff and jitter."""

    def __init__(self, *, timeout: float = 2.0, attempts: int = 5, backoff: float = 0.1,
                 max_backoff: float = 2.0) -> None:
        self.timeout = timeout
        self.attempts = attempts
        self.backoff = backoff
        self.max_backoff = max_backoff
        self._channels: dict[str, grpc.aio.Channel] = {}

    def _stub(self, address: str) -> pb_grpc.ProxyControlStub:
        channel = self._channels.get(address)
        if channel is None:
            channel = grpc.aio.insecure_channel(address)
            self._channels[address] = channel
        return pb_grpc.ProxyControlStub(channel)

    async def push_one(self, target: str, address: str, snapshot: Snapshot) -> PushResult:
        """Push until the proxy runs `snapshot.version` (or newer), or attempts run out."""
        message = snapshot.to_proto()
        result = PushResult(target, address, ok=False)
        delay = self.backoff
        for attempt in range(1, self.attempts + 1):
            result.attempts = attempt
            try:
                reply: pb.ApplyResponse = await self._stub(address).Apply(message, timeout=self.timeout)
            except grpc.aio.AioRpcError as exc:
                result.error = f"{exc.code().name}: {exc.details()}"
            else:
                result.applied_version = reply.applied_version
                result.connected = [link.name for link in reply.links
                                    if link.state == pb.BrokerLink.State.CONNECTED]
                if reply.applied_version >= snapshot.version:
                    result.ok, result.error = True, ""
                    return result
                result.error = f"proxy refused version {snapshot.version}: {reply.reason}"
            if attempt < self.attempts:
                await asyncio.sleep(random.uniform(0, delay))  # full jitter backoff
                delay = min(delay * 2, self.max_backoff)
        log.warning("push_failed", target=target, address=address, version=snapshot.version,
                    error=result.error, attempts=result.attempts)
        return result

    async def push_all(self, targets: Mapping[str, str], snapshot: Snapshot) -> dict[str, PushResult]:
        """Push `snapshot` to every target (name -> control address) at once."""
        started = time.monotonic()
        names = list(targets)
        results = await asyncio.gather(*(self.push_one(n, targets[n], snapshot) for n in names))
        self.prune(targets.values())
        acked = sum(r.ok for r in results)
        log.info("membership_pushed", version=snapshot.version, brokers=len(snapshot.members),
                 proxies=len(names), acknowledged=acked,
                 seconds=round(time.monotonic() - started, 4))
        return dict(zip(names, results, strict=True))

    def prune(self, keep: Iterable[str]) -> None:
        """Close channels to addresses not in `keep`."""
        wanted = set(keep)
        for address in [a for a in self._channels if a not in wanted]:
            channel = self._channels.pop(address)
            asyncio.get_running_loop().create_task(channel.close())

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            await channel.close()
