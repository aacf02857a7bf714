"""Events read by ingest, batched into broker Publish calls (one broker at a time, in order).

Up to `batch_events` events (or what came within `linger` seconds) make one PublishRequest,
`in_flight` of them at a time (1 by default). Every call goes to the same broker while it takes
them: events of different brokers reach subscribers through different relays, so spreading
batches over brokers would reorder what Redis delivered in order. A broker that refuses
(UNAVAILABLE: draining or down) or does not answer is skipped, with backoff, and the batch goes
to the next one, which then stays the one (order may change only at such a failover). While no
broker takes batches, events wait in a buffer of `buffer_events`; beyond
it new events are dropped and counted. A batch a broker refuses as invalid is split in halves
until the bad events are alone, so one bad event costs only itself.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from neoplasma.core.aio import Signal
from neoplasma.core.backoff import Backoff, BackoffPolicy
from neoplasma.core.events import Event, batch_entry
from neoplasma.core.logs import get_logger
from neoplasma.core.net import identity
from neoplasma.core.trust import Access
from neoplasma.wire.v1 import neoplasma_pb2 as pb

log = get_logger("ingest")

PUBLISH = "/neoplasma.v1.Broker/Publish"
BROKER_BACKOFF = BackoffPolicy(initial=0.2, maximum=5.0)


@dataclass
class Outcome:
    """What happened to a batch: counted by the caller (metrics)."""

    published: int = 0
    refused: int = 0  # refused by a broker as invalid
    lag: float = 0.0  # seconds from reading the batch's first event to a broker accepting it


def pick(due: list[bool], start: int) -> int | None:
    """The first broker from `start` (round robin) that may be tried now, or None."""
    n = len(due)
    return next(((start + i) % n for i in range(n) if due[(start + i) % n]), None)


class BrokerPublisher:
    def __init__(self, brokers: list[str], access: Access, *, batch_events: int, linger: float, in_flight: int,
                 buffer_events: int, timeout: float, done: Callable[[Outcome], None]) -> None:
        self.brokers = brokers
        self.batch_events = batch_events
        self.linger = linger
        self.in_flight = in_flight
        self.buffer_events = buffer_events
        self.timeout = timeout
        self.done = done
        self.buffer: deque[tuple[float, Event]] = deque()
        self.dropped = 0
        self.sending = 0  # events in batches being published
        self.backoffs = [Backoff(BROKER_BACKOFF) for _ in brokers]
        self.changed = Signal()
        self._next = 0
        self.access = access  # the publisher key presented and the brokers' TLS
        self._channels = [access.channel(b) for b in brokers]
        self._publish = [ch.unary_unary(PUBLISH, request_serializer=identity,
                                        response_deserializer=pb.PublishResponse.FromString) for ch in self._channels]

    def put(self, events: list[Event], read_at: float) -> None:
        room = self.buffer_events - len(self.buffer)
        if len(events) > room:
            self.dropped += len(events) - max(room, 0)
            events = events[:max(room, 0)]
        self.buffer.extend((read_at, e) for e in events)
        self.changed.notify()

    def pending(self) -> int:
        return len(self.buffer) + self.sending

    def brokers_up(self) -> int:
        return sum(b.failures == 0 for b in self.backoffs)

    async def run(self) -> None:
        """Publish until cancelled."""
        try:
            await asyncio.gather(*(self._sender() for _ in range(self.in_flight)))
        finally:
            for ch in self._channels:
                await ch.close()

    async def flushed(self, timeout: float) -> bool:
        return await self.changed.wait_until(lambda: self.pending() == 0, timeout)

    async def _sender(self) -> None:
        while True:
            while not self.buffer:
                await self.changed.wait_until(lambda: bool(self.buffer), 3600)
            if len(self.buffer) < self.batch_events:
                await self.changed.wait_until(lambda: len(self.buffer) >= self.batch_events, self.linger)
            take = min(self.batch_events, len(self.buffer))
            if not take:  # another sender took everything while this one lingered
                continue
            batch = [self.buffer.popleft() for _ in range(take)]
            self.sending += take
            try:
                await self._deliver(batch)
            finally:
                self.sending -= take
                self.changed.notify()

    async def _deliver(self, batch: list[tuple[float, Event]]) -> None:
        body = b"".join(batch_entry(event) for _, event in batch)
        while True:
            now = time.monotonic()
            index = pick([b.due(now) for b in self.backoffs], self._next)
            if index is None:
                await asyncio.sleep(max(0.0, min(b.not_before or now for b in self.backoffs) - now))
                continue
            self._next = index  # stay with this broker while it takes batches
            try:
                await self._publish[index](body, timeout=self.timeout, metadata=self.access.metadata())
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                    await self._refused(batch, exc)
                    return
                if self.backoffs[index].failures == 0:
                    log.warning("broker_unavailable", broker=self.brokers[index], code=exc.code().name,
                                error=exc.details())
                self.backoffs[index].failed(time.monotonic())
                self._next = (index + 1) % len(self.brokers)
                continue
            if self.backoffs[index].failures:
                log.info("broker_available", broker=self.brokers[index])
            self.backoffs[index].succeeded()
            self.done(Outcome(published=len(batch), lag=time.monotonic() - batch[0][0]))
            return

    async def _refused(self, batch: list[tuple[float, Event]], exc: grpc.aio.AioRpcError) -> None:
        if len(batch) == 1:
            log.warning("event_refused_by_broker", topic=batch[0][1].topic, error=exc.details())
            self.done(Outcome(refused=1))
            return
        half = len(batch) // 2
        await self._deliver(batch[:half])
        await self._deliver(batch[half:])
