"""Who reads: a lease held by one ingest reader at a time, so each message enters the cluster once.

`Lease` is what a reader needs; `RedisLease` keeps it as a key in the Redis being read (locally
and in tests; in Kubernetes a coordination.k8s.io Lease fits the same interface). The holder
renews it every ttl/3; `LeaseClock` decides, from the last successful renewal alone, until when
the holder may still read: 2/3 of the ttl after that renewal was sent, a third of the ttl before
any other reader can take the lease over.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Protocol

from neoplasma.ingest.resp import Connection, RedisAddress

# Take the lease if it is free, renew it if it is ours: 1 if we hold it now, else 0.
HOLD = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1
end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
return 0
"""
RELEASE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"


class Lease(Protocol):
    ttl: float  # seconds a taken or renewed lease lasts

    async def hold(self) -> bool:
        """Take the lease if it is free or renew it if ours; whether we hold it now.
        Raises (OSError, RedisError, TimeoutError) when the answer is not known."""

    async def release(self) -> None:
        """Give the lease up if we hold it, so another reader takes over at once."""

    def close(self) -> None: ...


@dataclass
class LeaseClock:
    """Until when the holder may read, from its successful renewals (pure; callers pass the clock)."""

    ttl: float
    until: float = 0.0

    def renewed(self, sent_at: float) -> None:
        self.until = sent_at + self.ttl * 2 / 3

    def lost(self) -> None:
        self.until = 0.0

    def holds(self, now: float) -> bool:
        return now < self.until


class RedisLease:
    def __init__(self, address: RedisAddress, key: str, holder: str, ttl: float) -> None:
        self.address = address
        self.key = key
        self.holder = holder
        self.ttl = ttl
        self._conn: Connection | None = None

    async def _call(self, script: str) -> int:
        try:
            if self._conn is None:
                self._conn = await Connection.open(self.address, self.ttl / 3)
            return int(await asyncio.wait_for(self._conn.call(
                "EVAL", script, "1", self.key, self.holder, str(int(self.ttl * 1000))), self.ttl / 3))
        except BaseException:
            self.close()
            raise

    async def hold(self) -> bool:
        return await self._call(HOLD) == 1

    async def release(self) -> None:
        await self._call(RELEASE)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
