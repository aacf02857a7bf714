"""Pushing membership snapshots to proxies over their control RPC.

Used as-is by the operator and by the local runtime: one code path for both.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import grpc

from neoplasma.core.backoff import BackoffPolicy
from neoplasma.core.control import ProxyChannels
from neoplasma.core.logs import get_logger
from neoplasma.core.membership import Snapshot
from neoplasma.core.trust import PLAIN, Access
from neoplasma.wire.v1 import neoplasma_pb2 as pb
from neoplasma.wire.v1 import neoplasma_pb2_grpc as pb_grpc

log = get_logger("push")

RETRY = BackoffPolicy(initial=0.1, maximum=2.0, jitter=True)  # push_all's, per proxy


@dataclass
class PushResult:
    target: str
    address: str
    ok: bool
    applied_version: int = 0
    error: str = ""


class MembershipPusher:
    """Pushes snapshots to proxies: `push_one` tries once (its caller owns retries, as the
    operator's MembershipSync does); `push_all` retries each proxy with `retry` up to `attempts`."""

    def __init__(self, *, timeout: float = 2.0, attempts: int = 5, retry: BackoffPolicy = RETRY,
                 access: Access = PLAIN, channels: ProxyChannels | None = None) -> None:
        """`channels`: the proxies' channels, to share with other calls to them (Status reads)."""
        self.access = access  # the cluster credential (and TLS) for the proxies' control ports
        self.timeout = timeout
        self.attempts = attempts
        self.retry = retry
        self.channels = channels or ProxyChannels()
        self._message: tuple[Snapshot, pb.Membership] = (Snapshot(-1, ()), pb.Membership())  # the last one sent

    def _stub(self, address: str) -> pb_grpc.ProxyControlStub:
        return self.channels.stub(address, self.access)

    async def push_one(self, target: str, address: str, snapshot: Snapshot) -> PushResult:
        """One push: ok when the proxy runs `snapshot.version` (not refused: the same version with other
        contents is) or newer afterwards."""
        try:
            reply: pb.ApplyResponse = await self._stub(address).Apply(self._proto(snapshot), timeout=self.timeout,
                                                                      metadata=self.access.metadata())
        except grpc.aio.AioRpcError as exc:
            return PushResult(target, address, ok=False, error=f"{exc.code().name}: {exc.details()}")
        if reply.applied_version > snapshot.version or (reply.applied_version == snapshot.version and reply.accepted):
            return PushResult(target, address, ok=True, applied_version=reply.applied_version)
        return PushResult(target, address, ok=False, applied_version=reply.applied_version,
                          error=f"proxy refused version {snapshot.version}: {reply.reason}")

    def _proto(self, snapshot: Snapshot) -> pb.Membership:
        """`snapshot` as the message, made once for all the proxies it goes to."""
        if self._message[0] is not snapshot:
            self._message = (snapshot, snapshot.to_proto())
        return self._message[1]

    async def push_all(self, targets: Mapping[str, str], snapshot: Snapshot) -> dict[str, PushResult]:
        """Push `snapshot` to every target (name -> control address) at once, each retried with backoff."""
        started = time.monotonic()

        async def until_applied(name: str) -> PushResult:
            for failures in range(self.attempts):
                await asyncio.sleep(self.retry.delay(failures))  # no wait before the first
                result = await self.push_one(name, targets[name], snapshot)
                if result.ok:
                    return result
            log.warning("push_failed", target=name, address=targets[name], version=snapshot.version,
                        error=result.error, attempts=self.attempts)
            return result

        names = list(targets)
        results = await asyncio.gather(*(until_applied(n) for n in names))
        self.prune(targets.values())
        log.info("membership_pushed", version=snapshot.version, brokers=len(snapshot.members),
                 proxies=len(names), acknowledged=sum(r.ok for r in results),
                 seconds=round(time.monotonic() - started, 4))
        return dict(zip(names, results, strict=True))

    def prune(self, keep: Iterable[str]) -> None:
        """Close channels to addresses not in `keep`."""
        self.channels.prune(keep)

    async def close(self) -> None:
        await self.channels.close()
