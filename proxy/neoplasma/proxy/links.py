"""Relay links: one stream to every broker in the proxy's membership.

Each link learns its broker's epoch and hands stamped events and heads to the
hub. Every relay stream starts with a backfill (docs/resume.md): from the
link's position when it knows the broker's epoch, else what the broker accepted
since the proxy's oldest subscription. A broker that restarted, or is removed
after its relay was lost without a clean end (the broker flushes, sends its
last head and ends the stream when it drains), may have lost events: the
subscribers get the gap signal.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Iterable

import grpc

from neoplasma.core.aio import Signal
from neoplasma.core.backoff import Backoff, BackoffPolicy
from neoplasma.core.bounded import put_newest
from neoplasma.core.events import Event, string_field_size
from neoplasma.core.logs import get_logger
from neoplasma.core.membership import EMPTY, BrokerState, Member, Snapshot
from neoplasma.core.resume import Checkpoint
from neoplasma.core.trust import Access
from neoplasma.proxy.hub import RETIRED_KEPT, Hub
from neoplasma.wire.v1 import neoplasma_pb2 as pb
from neoplasma.wire.v1 import neoplasma_pb2_grpc as pb_grpc

log = get_logger("proxy.links")

LinkState = pb.BrokerLink.State


MAX_BACKFILL_MS = 2**32 - 1  # Interest.backfill_ms is a uint32 (brokers retain at most a day anyway)
REMOVAL_GRACE = 10.0  # seconds a removed broker's connected relay may run on (it is draining: let it flush)
BACKFILL_SLACK = 2.0  # seconds: a busy broker reads a relay's first message late (its clock runs on meanwhile)
RETRY = BackoffPolicy(initial=0.1, maximum=5.0, jitter=True)  # a lost relay stream, reconnected
# A relay stream's HTTP/2 window beyond the message being read, fixed (no BDP probing): what the proxy
# has not read yet waits in the broker's outbox, bounded, where its next message takes all of it. With
# BDP probing gRPC grows the window to megabytes, and a busy proxy, which reads one relay message per
# turn of its loop, would find them queued there as the single-event messages a broker writes when
# it is not held back (at 1000 streams x 100 events/s: up to 0.3 s of events behind).
RELAY_WINDOW = 4096
# Answers to a broker's pointer queries waiting to be written on one relay stream; a query beyond is not answered
# (the broker's Resolve call times out: the resuming subscriber gets the gap signal).
MAX_ANSWERS = 256
# Interest messages a relay stream writes at most one per this many seconds while its changes come faster (the
# rest of the interval gathers them into the next one). A thousand resumes of a topic each, set up one per pass
# of the loop, wrote ~460 messages, each applied and acknowledged by the broker and its acknowledgement checked
# by every waiting resume; now ~45 (bench/forged_resumes.py). A change after a quiet interval goes at once.
INTEREST_INTERVAL = 0.005
# Bytes of a request message beyond its topics (epochs, positions, flags, field headers), kept free when a
# message is fitted to what a broker reads.
REQUEST_OVERHEAD = 64


def since_ms(age: float) -> int:
    """`age` seconds, as the milliseconds a broker is asked to look back (`Interest.backfill_ms`,
    `ReplayRequest.since_ms`): with slack for a busy broker that reads the message late, rounded up."""
    return min(math.ceil((age + BACKFILL_SLACK) * 1000), MAX_BACKFILL_MS)


def interest_parts(added: set[str], removed: set[str], room: int) -> list[tuple[list[str], list[str]]]:
    """An interest change as (add, remove) messages of at most `room` bytes of topics each (a topic larger
    than that goes alone; `room` 0: one message)."""
    parts: list[tuple[list[str], list[str]]] = []
    size = 0
    for kind, topics in ((0, sorted(added)), (1, sorted(removed))):
        for topic in topics:
            field = string_field_size(topic)
            if not parts or (room and size and size + field > room):
                parts.append(([], []))
                size = 0
            parts[-1][kind].append(topic)
            size += field
    return parts


class BrokerLink:
    """Keeps one relay stream to one broker open, resending interest on every (re)connect."""

    def __init__(self, member: Member, hub: Hub, proxy_name: str, backoff: Backoff,
                 max_message_bytes: int, changed: Signal, access: Access) -> None:
        self.member = member
        self.access = access  # the credential presented on Relay and Replay, and TLS
        self.changed = changed  # notified when the link's state or interest acknowledgement changes
        self.epoch = 0  # the broker's epoch, once a relay message named it
        self.position = 0  # the highest seq or head its relay has brought in this epoch
        self.max_request_bytes = 0  # the largest message its broker reads, as it said (0: not said)
        self.peers_room: Callable[[], int] = lambda: 0  # the least request room its LinkSet's other links know
        self.ended_cleanly = True  # the last relay stream ended as a drained broker ends it
        self._replay_channel: grpc.aio.Channel | None = None
        self.hub = hub
        self.proxy_name = proxy_name
        self.backoff = backoff
        self.max_message_bytes = max_message_bytes
        self.state = LinkState.CONNECTING
        self.events_received = 0
        self.last_error = ""
        self._added: set[str] = set()
        self._removed: set[str] = set()
        self._interest_changed = asyncio.Event()
        self._interest_sent = 0  # Interest messages written on the current stream
        self._answers: list[pb.PointerAnswer] = []  # to the broker's pointer queries, to write
        self._interest_applied = 0  # ... and how many the broker says it applied
        self._task: asyncio.Task[None] | None = None
        self.finishing = False  # removed from the membership: no reconnect once the stream ends
        # Pointer instances (docs/resume.md, "Pointer ids"): the one the current stream last named, and the number
        # of the Interest message that named it (acknowledged: the broker took it); `verdict`: the instance the
        # broker took, or could not be asked about (its stream failed otherwise): not refused.
        self._claim = (0, 0)
        self.verdict = 0
        self.on_instance: Callable[[], None] = lambda: None  # a verdict came, or the hub drew another instance
        # Checkpoints (docs/resume.md, "Checkpoints"): the one to register next on the stream, and the counter of the
        # last one the broker stored on the current stream (0: none).
        self._checkpoint: Checkpoint | None = None
        self.checkpoint_stored = 0
        self.on_checkpoint: Callable[[], None] = lambda: None  # the broker stored one

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"link-{self.member.name}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._replay_channel is not None:
            await self._replay_channel.close()

    async def finish(self, grace: float) -> None:
        """Removed from the membership: a connected relay runs on until the broker ends it (a drained
        broker flushes what it accepted, then ends it) or for `grace` seconds; then the link stops."""
        if self.state == LinkState.CONNECTED and self._task is not None:
            self.finishing = True
            await asyncio.wait([self._task], timeout=grace)
        await self.stop()

    def replay_stub(self) -> pb_grpc.BrokerStub:
        """A stub for Replay calls, on a channel of its own that outlives relay streams."""
        if self._replay_channel is None:
            self._replay_channel = self.access.channel(self.member.address, self._options)
        return pb_grpc.BrokerStub(self._replay_channel)

    def interest_changed(self, added: set[str], removed: set[str]) -> None:
        self._added = (self._added - removed) | added
        self._removed = (self._removed - added) | removed
        self._interest_changed.set()

    def retire(self) -> None:
        """The link is going away: its epoch ends (with a gap if the relay did not end cleanly)."""
        if self.epoch:
            if not self.ended_cleanly:
                self.hub.broadcast_gap(f"broker {self.member.name} went away; its events since may be lost")
            self.hub.retire(self.epoch)

    def to_proto(self) -> pb.BrokerLink:
        return pb.BrokerLink(name=self.member.name, address=self.member.address, state=self.state,
                             member_state=self.member.state.value,
                             events_received=self.events_received, last_error=self.last_error,
                             interest_synced=self.interest_synced)

    @property
    def request_room(self) -> int:
        """The bytes of topics one message to its broker may hold (0: its broker did not say)."""
        return self.max_request_bytes and max(self.max_request_bytes - REQUEST_OVERHEAD, 1)

    @property
    def interest_synced(self) -> bool:
        return (self.state == LinkState.CONNECTED and self._interest_applied >= self._interest_sent
                and not self._added and not self._removed)

    @property
    def _options(self) -> list[tuple[str, int]]:
        return [("grpc.max_receive_message_length", 2 * self.max_message_bytes + 65536)]

    @property
    def _relay_options(self) -> list[tuple[str, int]]:
        return [*self._options, ("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", RELAY_WINDOW)]

    async def _run(self) -> None:
        while True:
            self.state = LinkState.CONNECTING
            try:
                async with self.access.channel(self.member.address, self._relay_options) as channel:
                    await self._relay(pb_grpc.BrokerStub(channel))
                self.last_error = "broker ended the relay stream"
                self.ended_cleanly = True
            except grpc.aio.AioRpcError as exc:
                self.last_error = f"{exc.code().name}: {exc.details()}"
                self._failed(exc.code())
            if self.finishing:
                return
            self.state = LinkState.BACKOFF
            self.changed.notify()
            delay = self.backoff.failed(time.monotonic())
            log.warning("relay_lost", broker=self.member.name, address=self.member.address,
                        error=self.last_error, retry_in=round(delay, 3))
            await asyncio.sleep(delay)

    async def _relay(self, stub: pb_grpc.BrokerStub) -> None:
        call = stub.Relay(metadata=self.access.metadata())
        first = True
        self._added, self._removed = set(), set()
        self._answers = []
        self._interest_changed.clear()
        self.checkpoint_stored = 0  # (a restarted broker stores none of the last stream's)
        self._checkpoint = self.hub.proposed  # the latest checkpoint, registered once the stream is open
        self._interest_sent, self._interest_applied = 1, 0
        self._claim = (self.hub.instance, 1)  # what the first message names (a broker not reached: not refused)
        # Where this proxy left off with the broker: it backfills what the last stream did not bring,
        # or (a broker new to this proxy, or restarted) what it accepted since our oldest subscription,
        # measured once the stream is open, plus slack for the time the message takes to be read.
        await call.wait_for_connection()
        age = self.hub.interest_age()
        backfill_ms = since_ms(age) if age else 0
        # In messages the broker reads, when it said what it reads on an earlier stream (or, never heard from,
        # as the proxy's other brokers said), each but the last with `more`: it applies them all, then backfills.
        room = self.request_room or self.peers_room()
        parts = [add for add, _ in interest_parts(self.hub.topics(), set(), room)] or [[]]
        self._interest_sent = len(parts)
        self._claim = (self.hub.instance, len(parts))  # (drawn anew meanwhile, perhaps)
        await call.write(pb.Interest(add=parts[0], replace=True, proxy=self.proxy_name, epoch=self.epoch,
                                     after=self.position, backfill_ms=backfill_ms, instance=self.hub.instance,
                                     nonce=self.hub.nonce, more=len(parts) > 1))
        for k in range(1, len(parts)):
            await call.write(pb.Interest(add=parts[k], more=k < len(parts) - 1))
        if self._checkpoint is not None:
            self._interest_changed.set()
        writer = asyncio.create_task(self._send_interest(call))
        try:
            async for batch in call:  # the broker's first message says it applied our interest
                epoch = batch.epoch
                if first:
                    self._opened(epoch)
                    first = False
                if batch.gap:
                    self.hub.broadcast_gap(f"broker {self.member.name} dropped events for this proxy")
                if batch.resolve:
                    self._answer(batch.resolve)
                if batch.checkpoint_stored:
                    self.checkpoint_stored = batch.checkpoint_stored
                    self.on_checkpoint()
                if batch.checkpoint_refused:
                    log.warning("checkpoint_refused", broker=self.member.name, error=batch.checkpoint_refused)
                events = [Event(e.topic, e.data, epoch, e.seq) for e in batch.events]
                self.events_received += len(events)
                self.position = max(self.position, batch.head, events[-1].seq if events else 0)
                self.hub.submit(events, epoch, batch.head, batch.accepted_unix_nanos)
                if batch.interest_applied:
                    self.max_request_bytes = batch.max_request_bytes
                    self._interest_applied = batch.interest_applied
                    if batch.interest_applied >= self._claim[1] and self.verdict != self._claim[0]:
                        self.verdict = self._claim[0]  # the broker took the instance
                        self.on_instance()
                    self._mark_connected()
                    self.changed.notify()
        finally:
            writer.cancel()
            call.cancel()

    def _opened(self, epoch: int) -> None:
        """A relay stream's first message: end the old epoch if the broker restarted. (Within an epoch
        the broker backfilled from our position, with `gap` if it could not.)"""
        if epoch != self.epoch:
            self.retire()  # with a gap when the old relay was lost
            self.position = 0
        else:
            self.hub.revive(epoch)  # a broker that left the membership and came back
        self.epoch = epoch
        self.ended_cleanly = False

    def _failed(self, code: grpc.StatusCode) -> None:
        """A relay stream failed with `code`: a broker refusing the instance it named (another process holds it)
        has the hub draw another; any other failure leaves it unrefused here."""
        instance = self._claim[0]
        if code == grpc.StatusCode.ALREADY_EXISTS:
            if self.hub.redraw(instance):
                log.warning("pointer_instance_refused", broker=self.member.name, instance=instance,
                            drawn=self.hub.instance)
            self.on_instance()
        elif instance and self.verdict != instance:
            self.verdict = instance
            self.on_instance()

    def register(self, checkpoint: Checkpoint) -> None:
        """Register `checkpoint` with the broker (in the stream's next message; the stream's first, if it is not
        open)."""
        self._checkpoint = checkpoint
        self._interest_changed.set()

    def instance_changed(self) -> None:
        """The hub drew another pointer instance: the current stream names it next (`_send_interest`)."""
        self._interest_changed.set()

    def _mark_connected(self) -> None:
        if self.state != LinkState.CONNECTED:
            self.state = LinkState.CONNECTED
            self.backoff.succeeded()
            self.last_error = ""
            log.info("relay_connected", broker=self.member.name, address=self.member.address)

    def _answer(self, queries: Iterable[pb.PointerQuery]) -> None:
        """Answer the broker's pointer queries from this process's journal (in the next message written)."""
        for query in queries:
            if len(self._answers) >= MAX_ANSWERS:
                log.warning("pointer_queries_dropped", broker=self.member.name, most=MAX_ANSWERS)
                break
            token = self.hub.resolve(query.pointer)
            self._answers.append(pb.PointerAnswer(id=query.id, token=token.decode() if token else ""))
        self._interest_changed.set()

    async def _send_interest(self, call: grpc.aio.StreamStreamCall) -> None:
        """The relay stream's writer: interest changes, and answers to pointer queries (in messages of their own,
        which brokers do not count as interest changes), at most one batch of them per INTEREST_INTERVAL."""
        loop = asyncio.get_running_loop()
        wrote = -math.inf  # when the last batch was written (the loop's clock)
        while True:
            await self._interest_changed.wait()
            if (wait := wrote + INTEREST_INTERVAL - loop.time()) > 0:
                await asyncio.sleep(wait)  # changes coming fast: the rest of the interval's go with this one
            self._interest_changed.clear()
            if self._answers:
                answers, self._answers = self._answers, []
                await call.write(pb.Interest(resolved=answers))
            if self.hub.instance != self._claim[0]:  # drawn anew: acknowledged like an interest change
                self._interest_sent += 1
                self._claim = (self.hub.instance, self._interest_sent)
                await call.write(pb.Interest(instance=self.hub.instance))
            if (checkpoint := self._checkpoint) is not None:  # (after the instance it is stored under)
                self._checkpoint = None
                await call.write(pb.Interest(checkpoint=checkpoint.to_proto()))
            added, removed = self._added, self._removed
            # In messages the broker reads (what it said it reads, less the rest of a message).
            for add, remove in interest_parts(added, removed, self.request_room):
                self._interest_sent += 1
                await call.write(pb.Interest(add=add, remove=remove))
            # Cleared only once written, so `interest_synced` never holds while a change is unsent. The broker's
            # acknowledgement may have been read while the write was in flight (a busy loop runs the reading task
            # first): the link is synced from here, and those waiting for that (`LinkSet.wait_settled`) are told.
            self._added -= added
            self._removed -= removed
            if self.interest_synced:
                self.changed.notify()
            wrote = loop.time()


class LinkSet:
    """The proxy's applied membership and a link per broker in it."""

    def __init__(self, hub: Hub, proxy_name: str, max_message_bytes: int, access: Access) -> None:
        self.hub = hub
        self.access = access
        self.proxy_name = proxy_name
        self.max_message_bytes = max_message_bytes
        self.applied: Snapshot = EMPTY
        self.links: dict[str, BrokerLink] = {}
        self.left: dict[str, tuple[int, int]] = {}  # removed brokers: (epoch, position), should they return
        self.leaving: dict[str, tuple[BrokerLink, asyncio.Task[None]]] = {}  # removed links finishing their relay
        self.changed = Signal()
        self._settling: asyncio.Future[bool] | None = None  # watches for `settled` on behalf of waiters
        self._watched = Signal()  # notified when the watcher is done
        hub.on_interest_change(self._interest_changed)

    def _interest_changed(self, added: set[str], removed: set[str]) -> None:
        for link in self.links.values():
            link.interest_changed(added, removed)

    async def apply(self, snapshot: Snapshot) -> None:
        """Open links to new brokers, close links to gone ones, note state changes."""
        wanted = {m.name: m for m in snapshot.members}
        for name, link in list(self.links.items()):
            member = wanted.get(name)
            if member is None or member.address != link.member.address:
                del self.links[name]
                self.leaving[name] = link, asyncio.create_task(self._leave(name, link), name=f"leave-{name}")
        for name, member in wanted.items():
            existing = self.links.get(name)
            if existing is not None:
                existing.member = member  # SERVING <-> DRAINING: the link stays open
                continue
            link = self.links[name] = BrokerLink(member, self.hub, self.proxy_name, Backoff(RETRY),
                                                 self.max_message_bytes, self.changed, self.access)
            link.peers_room = self.request_room
            link.on_instance = self._instance_news
            link.on_checkpoint = self._checkpoint_news
            old, leaving = self.leaving.pop(name, (None, None))
            if old is not None and leaving is not None:  # back before its old link ended: this one goes on from it
                leaving.cancel()
                await old.stop()
                link.epoch, link.position = old.epoch, old.position
            else:
                link.epoch, link.position = self.left.pop(name, (0, 0))
            link.start()
        self.applied = snapshot
        self.hub.set_cluster(snapshot.cluster)
        self._instance_news()
        self.changed.notify()
        log.info("membership_applied", version=snapshot.version,
                 brokers=[m.name for m in snapshot.members],
                 draining=[m.name for m in snapshot.members if m.state is BrokerState.DRAINING])

    def _instance_news(self) -> None:
        """A link's broker took the pointer instance (or could not be asked), or the hub drew another: the links
        name the hub's instance; once every link's broker took it (none refused), its pointers are issued."""
        hub = self.hub
        for link in self.links.values():
            link.instance_changed()
        if not hub.issuing and self.links and all(link.verdict == hub.instance for link in self.links.values()):
            hub.confirm(hub.instance)

    async def run_checkpoints(self, interval: float) -> None:
        """Every `interval` seconds, while the positions moved, a checkpoint of them registered with every broker
        (docs/resume.md, "Checkpoints")."""
        while True:
            await asyncio.sleep(interval)
            checkpoint = self.hub.make_checkpoint()
            if checkpoint is not None:
                for link in self.links.values():
                    link.register(checkpoint)

    def _checkpoint_news(self) -> None:
        """A broker stored a checkpoint: once every connected link's broker stored the latest, full tokens are
        relative to it (a broker not connected now resolves none of them; the others do)."""
        latest = self.hub.proposed
        if latest is None or latest is self.hub.checkpoint:
            return
        connected = [link for link in self.links.values() if link.state == LinkState.CONNECTED]
        if connected and all(link.checkpoint_stored >= latest.counter for link in connected):
            self.hub.use_checkpoint(latest)

    async def _leave(self, name: str, link: BrokerLink) -> None:
        """A link removed from the membership: finished (see `BrokerLink.finish`), its epoch retired,
        its position remembered should the broker come back."""
        await link.finish(REMOVAL_GRACE)
        link.retire()
        log.info("relay_removed", broker=name, address=link.member.address, ended_cleanly=link.ended_cleanly)
        if link.epoch:
            put_newest(self.left, RETIRED_KEPT, name, (link.epoch, link.position))
        self.leaving.pop(name, None)

    def request_room(self) -> int:
        """The least request room (`BrokerLink.request_room`) any link knows (0: none does): what a broker never
        heard from is taken to read (a cluster's brokers run with the same settings)."""
        return min((link.request_room for link in self.links.values() if link.request_room), default=0)

    def settled(self) -> bool:
        """Membership applied and every link connected with the proxy's interest acknowledged."""
        return self.applied is not EMPTY and self._synced()

    async def wait_settled(self, timeout: float) -> bool:
        """Wait until `settled()` (False after `timeout` seconds). One watcher re-checks it at each change for
        every waiter: a thousand resumes waiting while interest changes one topic at a time cost a thousand
        checks, not a million; once it saw it, its waiters are woken a few per pass of the loop (`Signal`)."""
        if self.settled():
            return True
        if self._settling is None or self._settling.done():
            self._settling = asyncio.ensure_future(self.changed.wait_until(self.settled, math.inf))
            self._settling.add_done_callback(lambda _: self._watched.notify())
        settling = self._settling
        await self._watched.wait_until(settling.done, timeout)
        # Settled when the watcher saw it (it may have changed since, as after any wait), or now.
        return (settling.done() and not settling.cancelled() and settling.exception() is None) or self.settled()

    def _synced(self) -> bool:
        return all(link.interest_synced for link in self.links.values())

    def applied_everywhere(self, topics: Iterable[str]) -> bool:
        """Every link's broker has acknowledged interest in `topics` (with no link, whichever comes
        asks for them in its first message)."""
        return not self.links or (self.hub.wants(topics) and self._synced())

    async def close(self) -> None:
        if self._settling is not None:
            self._settling.cancel()
        leaving, self.leaving = list(self.leaving.values()), {}
        for _, task in leaving:
            task.cancel()
        links = [*self.links.values(), *(link for link, _ in leaving)]
        self.links = {}
        await asyncio.gather(*(link.stop() for link in links))

    def to_proto(self) -> list[pb.BrokerLink]:
        return [self.links[name].to_proto() for name in sorted(self.links)]
