"""The proxy's fan-out: local subscribers, their topics, and delivery.

No I/O beyond handing bytes to a subscriber. Subscribers with the same set
of topics form a group; each incoming batch is matched once per group, each
event is encoded once per wire format, and each subscriber gets one ready
buffer per batch. Per-subscriber Python work per batch is one `deliver` call.

Slow subscribers: a subscriber whose unsent data exceeds its limit is
disconnected (counted in `slow_dropped`); it never delays the others.
Clients reconnect (EventSource does so by itself; plasma gRPC clients retry
on UNAVAILABLE).

Positions: the hub keeps the proxy's position per broker epoch, advanced as
it dispatches, and names it in resume tokens, encoded once per event (SSE)
or per batch (native), never per subscriber (docs/resume.md). An SSE write's
last event carries the full token, the others a pointer (this process's
instance and the event's number), which its journal resolves.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from typing import ClassVar, NamedTuple

from neoplasma.core.aio import Signal
from neoplasma.core.bounded import put_newest
from neoplasma.core.events import (
    Event,
    batch_entry,
    batch_trailer,
    grpc_frame,
    plasma_payload,
    sse_frame,
    sse_gap,
    sse_pointed_frame,
)
from neoplasma.core.logs import get_logger
from neoplasma.core.memory import give_back
from neoplasma.core.resume import (
    Checkpoint,
    PointerJournal,
    cluster_tag,
    encode_pointer,
    encode_token,
    new_instance,
    new_nonce,
    parse_pointer,
    pointer_prefix,
    tokens_after,
    unwrap_counter,
)
from neoplasma.core.topics import TopicIndex
from neoplasma.proxy.h2server import Call
from neoplasma.proxy.metrics import ProxyMetrics
from neoplasma.proxy.settings import JOURNAL_BYTES, JOURNAL_SECONDS, LINGER, MAX_LINGER

# SSE subscribers a heartbeat is written to per pass of the loop (`Hub.heartbeat_sse`: about a millisecond's work).
HEARTBEAT_SLICE = 100
log = get_logger("proxy.hub")

RETIRED_KEPT = 1024  # ended epochs remembered (with their last position) for resuming subscribers
CHECKPOINTS_KEPT = 1024  # this process's checkpoints it resolves itself (at one a second, 17 minutes' worth)
CHECKPOINTS_CACHED = 256  # other processes' checkpoints resolved lately (a dead proxy's clients resume together)
INSTANCES_KEPT = 16  # pointer instances of this process whose pointers still resolve here (a redraw is rare)


def pause(cost: float, late: float, ceiling: float, linger: float, max_linger: float,
          share: float) -> tuple[float, float]:
    """The pause before the next dispatch round, and the new ceiling on pauses (Hub.run_dispatcher).

    `cost`: the last round's seconds; `late`: how long after it was due the loop ran it; `ceiling`:
    the current cap (`linger` while the loop keeps up). Behind (late by more than the cap): the cap
    doubles, up to `max_linger`, and the next round waits for all of it. Keeping up: the cap halves
    back toward `linger`, and the pause lets rounds take `share` of the time at most."""
    if late > max(ceiling, linger):
        ceiling = min(max(max_linger, linger), max(ceiling, linger) * 2)
        return ceiling, ceiling
    ceiling = max(linger, ceiling / 2)
    return min(ceiling, cost * (1 - share) / share), ceiling


class Batch:
    """One dispatched batch, with each event's encodings made at most once: an SSE event has two, one with the
    full token after it (the last event of a subscriber's write) and one with its pointer (the others)."""

    __slots__ = ("_entry", "_plasma", "_pointed", "_sse", "_tokens", "base", "checkpoint", "events", "first", "hub",
                 "lasts", "pointers")

    def __init__(self, events: Sequence[Event], hub: Hub) -> None:
        self.events = events
        self.hub = hub
        self.base = dict(hub.positions)  # positions before this batch
        self.first = 0  # the journal's number for events[0] (the next ones follow; set by Hub.dispatch)
        self.lasts: set[int] = set()  # the events whose full token is asked (made in one pass when first asked)
        self.pointers = hub.issuing  # whether events that do not end a write get pointers
        self.checkpoint = hub.checkpoint  # what its full tokens are relative to (version 3), if any
        self._tokens: dict[int, bytes] = {}
        self._sse: dict[int, bytes] = {}
        self._pointed: dict[int, bytes] = {}
        self._plasma: dict[int, bytes] = {}
        self._entry: dict[int, bytes] = {}

    def token(self, i: int) -> bytes:
        """The resume token after event `i` (those of `lasts` made in one pass, when the first is asked)."""
        token = self._tokens.get(i)
        if token is None:
            wanted = {i} if self._tokens else self.lasts | {i}
            self._tokens.update(tokens_after(self.hub.tag, dict(self.base), self.events[:max(wanted) + 1], wanted,
                                             self.checkpoint))
            token = self._tokens[i]
        return token

    def sse(self, i: int) -> bytes:
        """Event `i` as an SSE frame with the full token after it."""
        frame = self._sse.get(i)
        if frame is None:
            frame = self._sse[i] = sse_frame(self.token(i), self.events[i])
        return frame

    def sse_pointed(self, i: int) -> bytes:
        """Event `i` as an SSE frame with its pointer as id (resolved by this process's journal); with its full
        token while the hub issues no pointers (its instance not confirmed)."""
        if not self.pointers:
            return self.sse(i)
        frame = self._pointed.get(i)
        if frame is None:
            frame = self._pointed[i] = sse_pointed_frame(encode_pointer(self.hub.pointer_prefix, self.first + i),
                                                         self.events[i])
        return frame

    def plasma(self, i: int) -> bytes:
        """Event `i` as a framed gRPC `Payload` message."""
        payload = self._plasma.get(i)
        if payload is None:
            payload = self._plasma[i] = grpc_frame(plasma_payload(self.events[i]))
        return payload

    def entry(self, i: int) -> bytes:
        entry = self._entry.get(i)
        if entry is None:
            entry = self._entry[i] = batch_entry(self.events[i])
        return entry


LAST_CHUNK = b"0\r\n\r\n"  # the end of a chunked HTTP/1.1 body


def http_chunk(data: bytes) -> bytes:
    """`data` framed as one HTTP/1.1 chunk (SSE responses are chunked)."""
    return b"%x\r\n%s\r\n" % (len(data), data)


class Subscriber:
    """A local subscriber. Subclasses say how a batch is encoded for them.

    Movable: a rebalance may ask it to reconnect elsewhere only if its client would resume there
    exactly, i.e. its protocol carries a position (`resumes`) and the client holds one
    (`positioned`: it came with one, or one was written to it since: an SSE `id:`, a native
    batch's token). plasma's stream carries none; a stream that has been sent no position yet
    would reconnect without one and miss what is published meanwhile. Nor before `settled`
    (monotonic): a subscriber moved here is not moved again within REBALANCE_COOLDOWN.
    """

    kind: ClassVar[str]
    resumes: ClassVar[bool] = False  # the protocol gives the client a position to reconnect with

    def __init__(self) -> None:
        self.topics: frozenset[str] = frozenset()
        self.closed = asyncio.get_running_loop().create_future()
        self.slow = False  # set by deliver() when it refuses for being too far behind
        self._positioned = False
        self.counted_by: Hub | None = None  # the hub whose counters follow its `positioned` (Hub.movable_count)
        self.settled = 0.0  # monotonic: not moved before (see the class)

    @property
    def positioned(self) -> bool:
        """Its client holds a position (see the class)."""
        return self._positioned

    @positioned.setter
    def positioned(self, value: bool) -> None:
        if value != self._positioned:
            self._positioned = value
            if self.counted_by is not None and self.resumes:
                self.counted_by.positioned_changed(value)

    def mover(self) -> Subscriber:
        """The subscriber whose `resumes`, `positioned` and `settled` say whether this one is movable."""
        return self

    def movable(self, now: float) -> bool:
        """Whether a rebalance may move it at monotonic time `now` (see the class)."""
        return self.resumes and self._positioned and now >= self.settled

    @property
    def counted_as(self) -> str:
        return self.kind

    @property
    def closed_as(self) -> str | None:
        """Why the proxy closed this subscriber (`close`), or None: it did not (its client left)."""
        closed = self.closed
        return closed.result() if closed.done() and not closed.cancelled() else None

    @staticmethod
    def encode(batch: Batch, indices: list[int]) -> object:
        raise NotImplementedError

    def deliver(self, encoded: object, position: bool = True) -> bool:
        """Hand over an encoded batch; False means gone or too slow (`slow`): the hub drops it.
        `position`: it carries a position (an event batch always does; a gap signal or a heartbeat
        may not)."""
        raise NotImplementedError

    def signal_gap(self, reason: str, token: bytes) -> bool:
        """Tell the subscriber that events were missed (protocols without a signal: nothing)."""
        return True

    def close(self, reason: str) -> None:
        """Ask the serving coroutine to end this subscriber's connection."""
        if not self.closed.done():
            self.closed.set_result(reason)


class SseSubscriber(Subscriber):
    """Writes straight to the connection's transport: no queue, no coroutine per event."""

    kind = "sse"
    resumes = True

    def __init__(self, transport: asyncio.WriteTransport, max_buffer: int) -> None:
        super().__init__()
        self.transport = transport
        self.max_buffer = max_buffer

    @staticmethod
    def encode(batch: Batch, indices: list[int]) -> bytes:
        """One write: the last event with its full token (a client holds a whole write's last id even when the
        proxy dies), the others with their pointers (a cut mid-write leaves the client holding one)."""
        frames = [batch.sse_pointed(i) for i in indices[:-1]]
        frames.append(batch.sse(indices[-1]))
        return http_chunk(b"".join(frames))

    def deliver(self, encoded: object, position: bool = True) -> bool:
        transport = self.transport
        if transport.is_closing():
            return False
        if transport.get_write_buffer_size() > self.max_buffer:
            self.slow = True
            return False
        transport.write(encoded)  # type: ignore[arg-type]
        if position and not self._positioned:
            self.positioned = True
        return True

    def signal_gap(self, reason: str, token: bytes) -> bool:
        return self.deliver(http_chunk(sse_gap(reason)), position=False)  # (no id: the client keeps its last)


class StreamSubscriber(Subscriber):
    """A gRPC stream: each batch goes to its call as framed messages, in one write."""

    def __init__(self, call: Call, max_unsent: int) -> None:
        super().__init__()
        self.call = call
        self.max_unsent = max_unsent

    def deliver(self, encoded: object, position: bool = True) -> bool:
        call = self.call
        if call.ended:
            return False
        if call.unsent > self.max_unsent:
            self.slow = True
            return False
        call.send(encoded)  # type: ignore[arg-type]
        if position and not self._positioned:
            self.positioned = True
        return True


class PlasmaSubscriber(StreamSubscriber):
    """plasma's `proto.StreamService/Events`: one `Payload` message per event."""

    kind = "plasma"

    @staticmethod
    def encode(batch: Batch, indices: list[int]) -> bytes:
        return b"".join([batch.plasma(i) for i in indices])


class BatchSubscriber(StreamSubscriber):
    """Neoplasma's native stream: one `EventBatch` message per dispatched batch."""

    kind = "batch"
    resumes = True

    @staticmethod
    def encode(batch: Batch, indices: list[int]) -> bytes:
        return grpc_frame(b"".join([batch.entry(i) for i in indices]) + batch_trailer(token=batch.hub.token()))

    def signal_gap(self, reason: str, token: bytes) -> bool:
        return self.deliver(grpc_frame(batch_trailer(token=token, gap=True)))


class Group:
    """Subscribers sharing one topic set, by kind."""

    __slots__ = ("key", "members", "since", "touched")

    def __init__(self, key: frozenset[str]) -> None:
        self.key = key
        self.members: dict[type[Subscriber], set[Subscriber]] = {}
        self.since = time.monotonic()  # when the proxy began wanting these topics
        self.touched = 0  # the last dispatch round (Hub.rounds) that had an event for them


class Mark(NamedTuple):
    """Where the hub stood for one topic set (`Hub.mark`): its group then, and the dispatch rounds done."""

    group: Group | None
    rounds: int


InterestListener = Callable[[set[str], set[str]], None]


class Hub:
    def __init__(self, journal_seconds: float = JOURNAL_SECONDS, journal_bytes: int = JOURNAL_BYTES) -> None:
        self.subscribers: set[Subscriber] = set()
        # Counters kept as subscribers come, go or change (a Status call reads them without a pass over all):
        self._counts = {"sse": 0, "plasma": 0, "batch": 0}  # by `counted_as`
        self._positioned = 0  # subscribers whose mover resumes and is positioned
        self._cooling: set[Subscriber] = set()  # those added with a mover not `settled` then (a rebalance's)
        self._groups: dict[frozenset[str], Group] = {}
        self._index: TopicIndex[Group] = TopicIndex()
        self._listeners: list[InterestListener] = []
        self._pending: list[Event] = []
        self._pending_heads: dict[int, int] = {}
        self._pending_accepted = 0  # the oldest accept time (ns) stamped on a pending relay batch
        self.metrics = ProxyMetrics()
        self._wake = asyncio.Event()
        self._woken_at = 0.0  # when the dispatcher was last woken (loop time)
        self.positions: dict[int, int] = {}  # epoch -> seq: everything up to it was dispatched
        self.retired: dict[int, int] = {}  # ended epochs -> their last position
        self._retiring: set[int] = set()
        self.tag = cluster_tag("")
        self._token: bytes | None = None
        # This process's pointers: its instance (named in its relay streams' first Interest) and what they mean.
        # Pointers are issued once every link's broker has taken the instance (`confirm`), never while another
        # process may hold it; one refused draws another (`redraw`).
        self.nonce = new_nonce()
        self.instance = new_instance()
        self.pointer_prefix = pointer_prefix(self.instance)
        self.issuing = False  # pointers of `instance` are issued
        self.journal = PointerJournal(journal_seconds, journal_bytes)
        # The instances whose pointers this process issued: the event numbers (unwrapped) they named, from first to
        # end (None: still issuing). At most INSTANCES_KEPT, the oldest forgotten.
        self.issued: dict[int, tuple[int, int | None]] = {}
        # Checkpoints (docs/resume.md, "Checkpoints"): the one full tokens are relative to (version 3; None: version
        # 2), the last one made (registered with the brokers, in force once every connected one stored it), those
        # made by this process (at most CHECKPOINTS_KEPT: what its tokens named lately) and those of other processes
        # resolved lately (at most CHECKPOINTS_CACHED).
        self.checkpoint: Checkpoint | None = None
        self.proposed: Checkpoint | None = None
        self.checkpoints: dict[tuple[int, int], Checkpoint] = {}
        self.resolved_checkpoints: dict[tuple[int, int], Checkpoint] = {}
        self._checkpoint_counter = 0
        self.checkpoint_lookups: dict[tuple[int, int], asyncio.Task[Checkpoint | None]] = {}  # asked of brokers now
        self.advanced = Signal()  # notified after every dispatch
        self.rounds = 0  # dispatch rounds so far
        self._topics_high = 0  # the most topics since memory was last given back
        self.events_received = 0
        self.deliveries = 0
        self.slow_dropped = 0
        # Around each round's deliveries: the subscriber gRPC server gathers each connection's frames.
        self.gathered: Callable[[], AbstractContextManager[object]] = contextlib.nullcontext

    # -- interest ----------------------------------------------------------------

    def topics(self) -> set[str]:
        """Every topic some local subscriber wants (what brokers are asked for)."""
        return self._index.topics()

    def topic_count(self) -> int:
        return len(self._index)

    def new_topics(self, topics: Iterable[str]) -> int:
        """How many of `topics` are not yet in the proxy's interest."""
        return self._index.new_keys(topics)

    def wants(self, topics: Iterable[str]) -> bool:
        """Every one of `topics` is already in the proxy's interest."""
        return all(topic in self._index for topic in topics)

    def interest_age(self) -> float:
        """Seconds since the oldest present topic set was first wanted (0 with no subscribers): how far
        back a broker that this proxy has not heard from yet must backfill (links.py)."""
        return time.monotonic() - min((g.since for g in self._groups.values()), default=time.monotonic())

    def mark(self, topics: frozenset[str]) -> Mark:
        """Where the hub stands now for the subscribers of exactly `topics` (see `quiet_since`)."""
        return Mark(self._groups.get(topics), self.rounds)

    def quiet_since(self, topics: frozenset[str], mark: Mark) -> bool:
        """Whether `topics` have been wanted all along since `mark` (the same group of subscribers) and no event
        for them was dispatched since: a subscriber of them added since then missed nothing of them meanwhile."""
        group = self._groups.get(topics)
        return group is not None and group is mark.group and group.touched <= mark.rounds

    def on_interest_change(self, listener: InterestListener) -> None:
        self._listeners.append(listener)

    def _notify(self, added: set[str], removed: set[str]) -> None:
        if added or removed:
            for listener in self._listeners:
                listener(added, removed)

    # -- membership of subscribers ---------------------------------------------------

    def add(self, sub: Subscriber, topics: Iterable[str]) -> None:
        """A new subscriber of `topics`. One already here is refused (ValueError): it would be in two groups and
        get their events twice (`resubscribe` changes its topics)."""
        self._refuse_present(sub)
        self.subscribers.add(sub)
        self._count(sub, 1)
        self._join(sub, frozenset(topics))

    def _refuse_present(self, sub: Subscriber) -> None:
        if sub in self.subscribers:
            raise ValueError(f"subscriber {sub!r} is already in the hub, of topics {sorted(sub.topics)}; "
                             "change its topics with Hub.resubscribe")

    def _count(self, sub: Subscriber, change: int) -> None:
        """Count `sub` in (1) or out (-1) of the counters; its mover's `positioned` is followed while it is in."""
        self._counts[sub.counted_as] += change
        mover = sub.mover()
        mover.counted_by = self if change > 0 else None
        if mover.resumes and mover.positioned:
            self._positioned += change
        if change > 0 and mover.settled > time.monotonic():
            self._cooling.add(sub)
        elif change < 0:
            self._cooling.discard(sub)

    def positioned_changed(self, positioned: bool) -> None:
        """A counted subscriber's mover (that resumes) was given its first position, or lost it."""
        self._positioned += 1 if positioned else -1

    def swap(self, old: Subscriber, new: Subscriber) -> None:
        """Put `new` in `old`'s place (same topics) without touching the proxy's interest. Refused (ValueError)
        unless `old` is in the hub and `new` is not (it would be in two groups, or in one it never leaves)."""
        self._refuse_present(new)
        if old not in self.subscribers:
            raise ValueError(f"subscriber {old!r} is not in the hub: nothing to swap {new!r} in for")
        self.subscribers.discard(old)
        self._count(old, -1)
        self.subscribers.add(new)
        self._count(new, 1)
        new.topics = old.topics
        group = self._groups.get(old.topics)
        if group is None:
            return
        members = group.members[type(old)]
        members.discard(old)
        if not members:
            del group.members[type(old)]
        group.members.setdefault(type(new), set()).add(new)

    def resubscribe(self, sub: Subscriber, topics: Iterable[str]) -> None:
        """Replace `sub`'s topics. One no longer in the hub (dropped as slow while a request of its stream was on
        its way) stays out: put in a group, it would never leave it."""
        if sub in self.subscribers:
            self._leave(sub)
            self._join(sub, frozenset(topics))

    def remove(self, sub: Subscriber) -> None:
        if sub in self.subscribers:
            self.subscribers.discard(sub)
            self._count(sub, -1)
            self._leave(sub)

    def _join(self, sub: Subscriber, key: frozenset[str]) -> None:
        sub.topics = key
        if not key:
            return
        group = self._groups.get(key)
        if group is None:
            group = self._groups[key] = Group(key)
            self._notify(self._index.add(group, key), set())
            self._topics_high = max(self._topics_high, len(self._index))
        group.members.setdefault(type(sub), set()).add(sub)

    def _leave(self, sub: Subscriber) -> None:
        group = self._groups.get(sub.topics)
        if group is None:
            return
        members = group.members.get(type(sub))
        if members is not None:
            members.discard(sub)
            if not members:
                del group.members[type(sub)]
        if group.members:
            return
        del self._groups[group.key]
        self._notify(set(), self._index.remove(group, group.key))

    # -- positions --------------------------------------------------------------------

    def set_cluster(self, cluster: str) -> None:
        self.tag = cluster_tag(cluster)
        self._token = None

    def token(self) -> bytes:
        """The resume token for the current positions (made once per change)."""
        if self._token is None:
            self._token = encode_token(self.tag, self.positions, self.checkpoint)
        return self._token

    def make_checkpoint(self) -> Checkpoint | None:
        """A new checkpoint of the positions, to register with every broker; None when they did not change since the
        last one, or pointers are not issued (the instance, under which brokers store it, is not confirmed)."""
        if not self.issuing or not self.positions:
            return None
        last = self.proposed
        if last is not None and last.instance == self.instance and last.positions() == self.positions:
            return None
        self._checkpoint_counter += 1
        made = self.proposed = Checkpoint.of(self.instance, self._checkpoint_counter, self.positions)
        put_newest(self.checkpoints, CHECKPOINTS_KEPT, (made.instance, made.counter), made)
        return made

    def use_checkpoint(self, checkpoint: Checkpoint) -> None:
        """Every connected broker stored `checkpoint`: full tokens are relative to it from the next one on."""
        if checkpoint.instance == self.instance and checkpoint is not self.checkpoint:
            self.checkpoint = checkpoint
            self._token = None

    def known_checkpoint(self, instance: int, counter: int) -> Checkpoint | None:
        """A checkpoint this process made or resolved lately (None: ask the brokers)."""
        return self.checkpoints.get((instance, counter)) or self.resolved_checkpoints.get((instance, counter))

    def keep_resolved(self, checkpoint: Checkpoint) -> None:
        put_newest(self.resolved_checkpoints, CHECKPOINTS_CACHED, (checkpoint.instance, checkpoint.counter), checkpoint)

    def resolve(self, pointer: str) -> bytes | None:
        """The full token one of this process's pointers stands for; None when it is not one of its pointers (of an
        instance it issued pointers of, numbered while it did) or no longer in its journal (garbled ones included:
        never an error)."""
        try:
            instance, counter = parse_pointer(pointer)
        except ValueError:
            return None
        issued = self.issued.get(instance)
        if issued is None:
            return None
        first, end = issued
        number = unwrap_counter(counter, self.journal.next)
        if not first <= number < (self.journal.next if end is None else end):
            return None
        positions = self.journal.positions_at(counter)
        return None if positions is None else encode_token(self.tag, positions)

    def confirm(self, instance: int) -> None:
        """Every link's broker took `instance` (or could not be reached): if it is still this process's, its
        pointers are issued from the next event on."""
        if instance != self.instance or self.issuing:
            return
        self.issuing = True
        put_newest(self.issued, INSTANCES_KEPT, instance, (self.journal.next, None))
        log.info("pointer_instance_confirmed", instance=instance)

    def redraw(self, refused: int) -> bool:
        """A broker refused `refused`: another process holds it. If it is still this process's instance, draw
        another (the pointers issued of it, if any, still resolve here); returns whether it did."""
        if refused != self.instance:
            return False
        if self.issuing:
            first, _ = self.issued[refused]
            self.issued[refused] = (first, self.journal.next)
        self.issuing = False
        self.checkpoint = self.proposed = None  # brokers store checkpoints under the instance: version 2 till the next
        self._token = None
        while self.instance == refused or self.instance in self.issued:
            self.instance = new_instance()
        self.pointer_prefix = pointer_prefix(self.instance)
        log.warning("pointer_instance_redrawn", refused=refused, instance=self.instance)
        return True

    def retire(self, epoch: int) -> None:
        """A broker epoch ended (its link is gone): after what is pending, keep only its last position."""
        self._retiring.add(epoch)
        self._wake_up()

    def revive(self, epoch: int) -> None:
        """A retired epoch's broker is back (same process): its position counts again."""
        self._retiring.discard(epoch)
        if epoch in self.retired:
            self.positions.setdefault(epoch, self.retired.pop(epoch))
            self._token = None

    def _retire_now(self) -> None:
        for epoch in self._retiring:
            put_newest(self.retired, RETIRED_KEPT, epoch, self.positions.pop(epoch, self.retired.get(epoch, 0)))
        self._retiring.clear()
        self._token = None

    # -- delivery ------------------------------------------------------------------

    def submit(self, events: Sequence[Event], epoch: int = 0, head: int = 0, accepted_ns: int = 0) -> None:
        """Queue events from a relay link (the `head` it reported, and when the broker accepted the
        oldest of them) for the dispatcher."""
        if accepted_ns and events and (not self._pending_accepted or accepted_ns < self._pending_accepted):
            self._pending_accepted = accepted_ns
        self._pending.extend(events)
        if head > self._pending_heads.get(epoch, 0):
            self._pending_heads[epoch] = head
        self._wake_up()

    def _wake_up(self) -> None:
        if not self._wake.is_set():
            self._woken_at = asyncio.get_running_loop().time()
            self._wake.set()

    async def run_dispatcher(self, linger: float = LINGER, share: float = 0.25, max_linger: float = MAX_LINGER) -> None:
        """Deliver whatever piled up since the last round, in one `dispatch`.

        Adaptive coalescing: the next round starts no sooner than the last one's cost allows for
        rounds to take no more than `share` of the time (counted from its end, at most `linger`
        later), so that under load more events join each round: fewer, larger writes per
        subscriber, whose cost is mostly per write (a round's socket writes are made within it).
        An event that finds that time passed goes at once. A quiet proxy's rounds take
        microseconds, and so do its waits.

        A round's writes cost more than the round: what clients send back (gRPC clients answer
        data with WINDOW_UPDATE and PING frames) and everything else the loop does (accepting a
        connect storm, reading relays, or a CPU shared with others) runs between rounds. When the
        loop runs a round later than it was due by more than the pause (it is behind), the pauses
        grow, up to `max_linger`: fewer rounds, more events each, until the loop keeps up; they
        shrink back to `linger` once it does (`pause`). No event waits longer than `max_linger`
        plus the loop's own delay.
        """
        clock = asyncio.get_running_loop().time
        next_round = 0.0
        ceiling = linger
        while True:
            await self._wake.wait()
            if (wait := next_round - clock()) > 0:
                await asyncio.sleep(wait)
            late = clock() - max(next_round, self._woken_at)
            self._wake.clear()
            events, self._pending = self._pending, []
            heads, self._pending_heads = self._pending_heads, {}
            accepted, self._pending_accepted = self._pending_accepted, 0
            started = time.perf_counter()
            self.dispatch(events, heads, accepted)
            wait, ceiling = pause(time.perf_counter() - started, late, ceiling, linger, max_linger, share)
            next_round = clock() + wait

    def dispatch(self, events: Sequence[Event], heads: dict[int, int] | None = None, accepted_ns: int = 0) -> int:
        """Deliver a batch to every matching subscriber, each event once. Returns deliveries.

        Advances the positions by the events' stamps and then by `heads` {epoch: head}. With
        `accepted_ns` (when a broker accepted the oldest event), the round's delivery latency is
        observed once per transport (ProxyMetrics.delivered).
        """
        batch = Batch(events, self)
        self.rounds += 1
        self.events_received += len(events)
        positions = self.positions
        matched: dict[Group, list[int]] = {}
        for i, event in enumerate(events):
            positions[event.epoch] = event.seq
            for group in self._index.matching(event.topic):
                matched.setdefault(group, []).append(i)
        if events:  # what this round's pointers mean
            batch.first = self.journal.record(batch.base, [e.epoch for e in events], [e.seq for e in events],
                                              time.monotonic())
            batch.lasts = ({indices[-1] for indices in matched.values()} if batch.pointers
                           else {i for indices in matched.values() for i in indices})
        for epoch, head in (heads or {}).items():
            if head > positions.get(epoch, 0):
                positions[epoch] = head
        positions.pop(0, None)  # unstamped events (tests, benchmarks) name no broker
        if self._retiring:
            self._retire_now()
        self._token = None
        by_kind: dict[str, int] = {}
        refused: list[Subscriber] = []
        with self.gathered():
            for group, indices in matched.items():
                group.touched = self.rounds
                for kind, members in group.members.items():
                    encoded = kind.encode(batch, indices)
                    delivered = 0
                    for sub in members:
                        if sub.deliver(encoded):
                            delivered += 1
                        else:
                            refused.append(sub)
                    if delivered:
                        by_kind[kind.kind] = by_kind.get(kind.kind, 0) + delivered * len(indices)
        if accepted_ns and by_kind:
            self.metrics.delivered(by_kind, accepted_ns)
        self._drop(refused)
        deliveries = sum(by_kind.values())
        self.deliveries += deliveries
        self.advanced.notify()
        return deliveries

    def _drop(self, subscribers: list[Subscriber]) -> None:
        for sub in subscribers:
            self.slow_dropped += sub.slow
            self.remove(sub)
            sub.close("slow" if sub.slow else "gone")

    def give_back_memory(self) -> bool:
        """Once most of a large interest has gone (under a quarter of its high-water mark, from over 1024
        topics), give the freed heap back to the system (`give_back`); call it now and then (the heartbeat
        does): a departure of many subscribers frees memory over a while. Returns whether it did."""
        count = self.topic_count()
        if self._topics_high <= 1024 or count >= self._topics_high // 4:
            return False
        give_back("interest_shrunk", topics=count, most_topics=self._topics_high)
        self._topics_high = count
        return True

    def broadcast_sse(self, data: bytes, subscribers: Iterable[Subscriber] | None = None) -> None:
        """Write `data` (e.g. a heartbeat comment) to every SSE subscriber (of `subscribers`, those still here), with
        the current token.

        An `id:` without data updates EventSource's last id and fires nothing, so a quiet
        subscriber's id stays within the brokers' retention.
        """
        with_id = bool(self.positions)
        if with_id:
            data = data[:-1] + b"id: " + self.token() + b"\n\n"
        chunk = http_chunk(data)
        here = self.subscribers
        self._drop([sub for sub in (list(here) if subscribers is None else subscribers)
                    if isinstance(sub, SseSubscriber) and sub in here and not sub.deliver(chunk, with_id)])

    async def heartbeat_sse(self, data: bytes, per_pass: int = HEARTBEAT_SLICE) -> None:
        """`broadcast_sse` to the SSE subscribers here now, `per_pass` of them per pass of the loop (each slice with
        the token as it is then: it claims no event that slice's subscribers were not written), so that live events
        are dispatched in between: 1100 subscribers' writes in one step held the loop for 15-25 ms (a heartbeat during
        bench/forged_resumes.py's attack was the honest subscribers' p99), 10,000 for ~150 ms."""
        subscribers = [sub for sub in self.subscribers if isinstance(sub, SseSubscriber)]
        for start in range(0, len(subscribers), per_pass):
            if start:
                await asyncio.sleep(0)
            self.broadcast_sse(data, subscribers[start:start + per_pass])

    def broadcast_gap(self, reason: str) -> None:
        """Tell every subscriber that events were missed (a relay lost events)."""
        token = self.token()
        # Counted where one is written: plasma's stream has none; a resuming one's goes with its catch-up.
        self.metrics.gap_signals += sum(sub.kind in ("sse", "batch") for sub in self.subscribers)
        self._drop([sub for sub in list(self.subscribers) if not sub.signal_gap(reason, token)])

    def counts(self) -> dict[str, int]:
        """Subscribers by kind (kept as they come and go, not counted per call)."""
        return dict(self._counts)

    def movable(self) -> list[Subscriber]:
        """The subscribers a rebalance may move now (`Subscriber.movable`): a pass over all (see `movable_count`)."""
        now = time.monotonic()
        return [sub for sub in self.subscribers if sub.movable(now)]

    def movable_count(self) -> int:
        """len(movable()), from the counters: those positioned, less those still cooling down (moved here lately:
        a pass over only them, forgetting those whose cooldown is over)."""
        now = time.monotonic()
        cooling = 0
        for sub in list(self._cooling):
            mover = sub.mover()
            if now >= mover.settled:
                self._cooling.discard(sub)
            elif mover.resumes and mover.positioned:
                cooling += 1
        return self._positioned - cooling
