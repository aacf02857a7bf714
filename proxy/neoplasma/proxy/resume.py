"""Resuming a subscriber from a token: replay from the brokers, merged with live events (docs/resume.md)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Protocol

import grpc

from neoplasma.core.events import Event
from neoplasma.core.logs import get_logger
from neoplasma.core.membership import EMPTY
from neoplasma.core.resume import InvalidToken, decode_token, tokens_after
from neoplasma.proxy.hub import Batch, Hub, Subscriber
from neoplasma.proxy.links import BrokerLink, LinkSet
from neoplasma.wire.v1 import neoplasma_pb2 as pb

log = get_logger("proxy.resume")

MAX_HELD = 100_000  # live events kept for one subscriber while it catches up


class Sink(Protocol):
    """How catch-up reaches one subscriber: `send`/`gap` may wait for the connection, `send_now` may not."""

    async def send(self, events: Sequence[Event], tokens: Sequence[bytes]) -> None: ...

    async def gap(self, reason: str) -> None: ...

    def send_now(self, events: Sequence[Event], tokens: Sequence[bytes], gaps: Sequence[str]) -> None: ...


class Holder(Subscriber):
    """Stands in for a resuming subscriber in the hub: its live events are kept, not written."""

    kind = "resuming"

    def __init__(self, target: Subscriber) -> None:
        super().__init__()
        self.target = target
        self.closed = target.closed  # closing the holder (drain, too slow) closes the subscriber
        self.held: list[Event] = []
        self.gaps: list[str] = []

    @property
    def counted_as(self) -> str:
        return self.target.kind

    @staticmethod
    def encode(batch: Batch, indices: list[int]) -> list[Event]:
        return [batch.events[i] for i in indices]

    def deliver(self, encoded: object) -> bool:
        events: list[Event] = encoded  # type: ignore[assignment]
        if len(self.held) + len(events) > MAX_HELD:
            self.slow = True
            return False
        self.held.extend(events)
        return True

    def signal_gap(self, reason: str, token: bytes) -> bool:
        self.gaps.append(reason)
        return True


class Resume:
    """One subscriber's catch-up: the steps of docs/resume.md, "Resuming at a proxy"."""

    def __init__(self, hub: Hub, links: LinkSet, sub: Subscriber, topics: frozenset[str], sink: Sink,
                 wait: float) -> None:
        self.hub, self.links, self.sub, self.topics, self.sink, self.wait = hub, links, sub, topics, sink, wait
        self.position: dict[int, int] = {}  # the client's position while it catches up
        self.gapped = False  # a gap signal went to the subscriber

    async def _gap(self, reason: str) -> None:
        self.gapped = True
        self.hub.metrics.gap_signals += 1
        await self.sink.gap(reason)

    def _resumed(self) -> None:
        self.hub.metrics.resumes.inc("gap" if self.gapped else "exact")

    async def run(self, token: str) -> None:
        """Catch up from `token`; without one (a fresh subscriber whose topics some broker has not
        applied yet), from the proxy's positions now: no id before then claims what it never got."""
        # A restarted proxy learns the cluster id (which a token names) with its first membership.
        await self.links.changed.wait_until(lambda: self.links.applied is not EMPTY, self.wait)
        try:
            client = decode_token(token, self.hub.tag) if token else dict(self.hub.positions)
        except InvalidToken as exc:
            await self._gap(str(exc))
            self.hub.add(self.sub, self.topics)
            self._resumed()
            return
        holder = Holder(self.sub)
        self.hub.add(holder, self.topics)  # the proxy's interest now covers these topics
        swapped = False
        try:
            if not await self.links.changed.wait_until(self.links.settled, self.wait):
                await self._gap("not every broker could be reached in time")
            if not token:  # brokers the proxy had no position for: from where their relays are now
                client = {link.epoch: link.position for link in self.links.links.values() if link.epoch} | client
            skip = await self._replay_all(client)
            if not await self.hub.advanced.wait_until(lambda: self._caught_up(skip), self.wait):
                await self._gap("a broker's relay fell behind")
            # From here to the swap nothing awaits: no live event can slip between.
            if holder.closed.done():
                return
            held = [e for e in holder.held if e.seq > skip.get(e.epoch, 0)]
            self.sink.send_now(held, self._tokens(held), holder.gaps)
            self.hub.swap(holder, self.sub)
            swapped = True
            self.hub.metrics.gap_signals += len(holder.gaps)
            self.gapped = self.gapped or bool(holder.gaps)
            if token:
                self._resumed()
        finally:
            if not swapped:
                self.hub.remove(holder)

    def _caught_up(self, skip: dict[int, int]) -> bool:
        """Every link's relay is past its replay, or the link is gone (a gap if it ended uncleanly,
        which the holder got)."""
        hub = self.hub
        return all(epoch in hub.retired or hub.positions.get(epoch, 0) >= seq for epoch, seq in skip.items())

    async def _replay_all(self, client: dict[int, int]) -> dict[int, int]:
        """Replay what each link's broker has after the client's position; the seq up to which
        live events must be skipped, per epoch."""
        links = [link for link in self.links.links.values() if link.epoch]
        self.position = {link.epoch: client.pop(link.epoch, 0) for link in links}
        skip: dict[int, int] = {}
        for link in links:
            # Always asked, even when the proxy's position is not past the client's: the broker may
            # have accepted events for these topics after that position and before it applied this
            # proxy's interest in them, and those were never relayed.
            skip[link.epoch] = await self._replay(link, self.position[link.epoch])
            self.position[link.epoch] = max(self.position[link.epoch], skip[link.epoch])
        gone = [epoch for epoch, seq in client.items() if self.hub.retired.get(epoch, seq + 1) > seq]
        if gone:
            await self._gap(f"{len(gone)} broker(s) of this position are gone with their retention")
        return skip

    async def _replay(self, link: BrokerLink, after: int) -> int:
        """Deliver `link`'s broker's events after `after`; returns the replay's head."""
        epoch, head = link.epoch, after
        request = pb.ReplayRequest(epoch=epoch, after=after, topics=sorted(self.topics))
        try:
            async for batch in link.replay_stub().Replay(request, timeout=max(self.wait, 30.0),
                                                             metadata=link.access.metadata()):
                head = max(head, batch.head)
                if batch.gap:
                    await self._gap(f"broker {link.member.name} no longer holds every event since this "
                                        "position")
                if batch.events:
                    events = [Event(e.topic, e.data, epoch, e.seq) for e in batch.events]
                    self.hub.metrics.replayed_events += len(events)
                    await self.sink.send(events, self._tokens(events))
        except grpc.aio.AioRpcError as exc:
            log.warning("replay_failed", broker=link.member.name, error=f"{exc.code().name}: {exc.details()}")
            await self._gap(f"broker {link.member.name} could not replay: {exc.code().name}")
            return max(head, self.hub.positions.get(epoch, 0))
        return head

    def _tokens(self, events: Sequence[Event]) -> list[bytes]:
        """The client's token after each of `events` (its own position advances as it catches up)."""
        return tokens_after(self.hub.tag, self.position, events)


def start_resume(resume: Resume, token: str) -> asyncio.Task[None]:
    """Run `resume` beside the connection; a failure ends the subscriber instead of leaving it silent."""
    task = asyncio.get_running_loop().create_task(resume.run(token))

    def done(t: asyncio.Task[None]) -> None:
        if not t.cancelled() and t.exception() is not None:
            log.error("resume_failed", error=repr(t.exception()))
            resume.sub.close("error")

    task.add_done_callback(done)
    return task
