"""The broker's routing table: which relay stream wants which event.

No I/O here. Each relay stream has a bounded outbox of pre-encoded
`EventBatch` entries; its writer drains the outbox in large messages, so
a busy broker sends few, big messages (adaptive coalescing: whatever piled
up while the previous write was in flight goes out in the next one).

Overflow policy: when a stream's outbox holds `max_outbox_bytes`, further
events for that stream are dropped and counted (`dropped`), and its next
message carries `gap`; other streams and publishers are never blocked by it.

Every message carries the broker's epoch and head (docs/resume.md).

Backfill: a new stream first gets retained events it missed (`backfill`, a `ReplayWalk` its writer walks a
slice at a time, so that no one walk holds the broker's loop); live events routed to it meanwhile are held
(bounded like the outbox) and follow the backfill, so the stream stays in seq order, and its messages
claim no head until the backfill is done.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Collection, Iterable, Sequence

from neoplasma.core.events import Checked, batch_trailer, stamped_entry, string_field, topic_field, varint_field
from neoplasma.core.resume import ReplayWalk
from neoplasma.core.topics import TopicIndex


class RelayStream:
    """One proxy's relay stream as the router sees it."""

    def __init__(self, proxy: str, peer: str, max_outbox_bytes: int, max_request_bytes: int = 0) -> None:
        self.proxy = proxy
        self.peer = peer
        self.max_request_bytes = max_request_bytes  # the largest message the broker reads, told with interest acks
        self.interest: set[str] = set()
        self.max_outbox_bytes = max_outbox_bytes
        self.outbox: list[bytes] = []
        self.outbox_bytes = 0
        self.wake = asyncio.Event()
        self.sent = 0
        self.dropped = 0
        self.interest_applied = 0  # Interest messages applied so far
        self.interest_reported = 0  # ... and the count last sent to the proxy
        self.gap = False  # events were dropped since the last message
        self.head_sent = 0  # the head in the last message
        self.written_at = 0.0  # when the last message was cut (monotonic)
        self.accepted_ns = 0  # when the oldest live event in the outbox was accepted (wall clock, ns)
        self.backfill: ReplayWalk | None = None  # retained events still to queue before live ones
        self.backfilled = 0  # ... and how many it queued
        self.held: list[bytes] = []  # live entries routed while it backfills: they follow it
        self.held_bytes = 0
        self.held_accepted_ns = 0
        self.instance = 0  # the proxy process's instance (`Interest.instance`; 0: none named)
        self.nonce = 0  # ... and its nonce (`Interest.nonce`; 0: a proxy of the version before)
        self.asked_instance = 0  # the instance a later Interest asked to move to (what a refusal names)
        self.queries: list[bytes] = []  # pointer queries (encoded `EventBatch.resolve` fields) for its next message
        self.asked = 0  # pointer queries sent on it and not answered yet
        self.checkpoint_stored = 0  # the counter of the checkpoint stored last (`Interest.checkpoint`) ...
        self.checkpoint_reported = 0  # ... and the one last told to the proxy
        self.checkpoint_refused = ""  # why the last one was refused, to tell the proxy

    def offer(self, entry: bytes) -> bool:
        size = len(entry)
        if self.outbox_bytes + size > self.max_outbox_bytes and self.outbox:
            self.dropped += 1
            self.gap = True
            return False
        self.outbox.append(entry)
        self.outbox_bytes += size
        self.wake.set()
        return True

    def offer_all(self, entries: list[bytes], accepted_ns: int = 0) -> int:
        """`offer` each of `entries` (accepted at `accepted_ns`) in turn (all at once when they fit);
        returns how many were queued (held, while the stream backfills)."""
        if self.backfill is not None:
            return self._hold(entries, accepted_ns)
        if not self.accepted_ns:
            self.accepted_ns = accepted_ns
        size = sum(map(len, entries))
        if self.outbox_bytes + size > self.max_outbox_bytes:
            return sum(map(self.offer, entries))
        self.outbox += entries
        self.outbox_bytes += size
        self.wake.set()
        return len(entries)

    def _hold(self, entries: list[bytes], accepted_ns: int) -> int:
        """Keep live `entries` until the backfill is done (beyond `max_outbox_bytes` held: dropped, a gap)."""
        if not self.held_accepted_ns:
            self.held_accepted_ns = accepted_ns
        queued = 0
        for entry in entries:
            if self.held_bytes + len(entry) > self.max_outbox_bytes and self.held:
                self.dropped += 1
                self.gap = True
                continue
            self.held.append(entry)
            self.held_bytes += len(entry)
            queued += 1
        return queued

    def queue_backfill(self, entries: list[bytes]) -> int:
        """Queue a part of the backfill (what does not fit the outbox is dropped: a gap); once the walk is
        done, the live entries held meanwhile follow, all of them (the outbox may then hold up to twice
        `max_outbox_bytes`). Returns how many backfilled entries were queued."""
        walk = self.backfill
        assert walk is not None, "no backfill under way"
        queued = sum(map(self.offer, entries))
        self.backfilled += queued
        if walk.done:
            self.backfill = None
            self.gap = self.gap or walk.gap
            if self.held:
                if not self.accepted_ns:
                    self.accepted_ns = self.held_accepted_ns
                self.outbox += self.held
                self.outbox_bytes += self.held_bytes
                self.wake.set()
            self.held, self.held_bytes, self.held_accepted_ns = [], 0, 0
        return queued

    @property
    def pending(self) -> int:
        """Bytes still to write (held live events included)."""
        return self.outbox_bytes + self.held_bytes

    def has_news(self, head: int, now: float, head_interval: float) -> bool:
        """Something to send: events, an interest ack, a gap, or (at most every `head_interval`, and not
        while it backfills) a new head."""
        return (bool(self.outbox) or self.interest_reported != self.interest_applied or self.gap or bool(self.queries)
                or self.checkpoint_reported != self.checkpoint_stored or bool(self.checkpoint_refused)
                or (head > self.head_sent and now - self.written_at >= head_interval and self.backfill is None))

    def take(self, max_bytes: int, epoch: int, head: int, now: float) -> tuple[bytes, int]:
        """Remove up to `max_bytes` of entries and return them as one `EventBatch` message.

        The message carries `epoch`, `head` (0 when entries stay behind, or the backfill is not done: they
        are older than it), `gap` after drops, `interest_applied` when it changed since the last one (with
        `max_request_bytes`: what the proxy's Interest and Replay messages must fit), and when
        its oldest live event was accepted (entries left behind keep that time: an upper bound).
        """
        accepted_ns = self.accepted_ns
        if self.backfill is not None:
            head = 0
        if self.outbox_bytes <= max_bytes:
            taken, self.outbox, self.outbox_bytes = self.outbox, [], 0
            self.accepted_ns = 0
        else:
            head = 0
            total, n = 0, 0
            for entry in self.outbox:
                if n and total + len(entry) > max_bytes:
                    break
                total += len(entry)
                n += 1
            taken, self.outbox = self.outbox[:n], self.outbox[n:]
            self.outbox_bytes -= total
        count = len(taken)
        self.sent += count
        if self.interest_reported != self.interest_applied:
            self.interest_reported = self.interest_applied
            taken.append(varint_field(2, self.interest_applied))
            if self.max_request_bytes:
                taken.append(varint_field(9, self.max_request_bytes))  # EventBatch.max_request_bytes
        if self.queries:
            taken += self.queries
            self.queries = []
        if self.checkpoint_reported != self.checkpoint_stored:
            self.checkpoint_reported = self.checkpoint_stored
            taken.append(varint_field(10, self.checkpoint_stored))  # EventBatch.checkpoint_stored
        if self.checkpoint_refused:
            taken.append(string_field(11, self.checkpoint_refused))  # EventBatch.checkpoint_refused
            self.checkpoint_refused = ""
        taken.append(batch_trailer(epoch=epoch, head=head, gap=self.gap, accepted_ns=accepted_ns if count else 0))
        self.gap = False
        self.head_sent = max(self.head_sent, head)
        self.written_at = now
        return b"".join(taken), count


# Pointer instances (docs/resume.md, "Pointer ids"): a broker remembers which proxy process (nonce) holds each
# instance over its relay streams and for CLAIM_SECONDS after the last one ended (longer than any proxy's
# --pointer-journal-seconds and a client's reconnect), at most MAX_CLAIMS instances (the oldest ended forgotten
# first; beyond that, live ones only: a relay naming another is refused for now).
CLAIM_SECONDS = 3600.0
MAX_CLAIMS = 16384


class InstanceTaken(Exception):
    """A relay stream named a pointer instance that another proxy process holds (or held lately) at this broker."""


class _Claim:
    __slots__ = ("ended_at", "live", "nonce")

    def __init__(self, nonce: int) -> None:
        self.nonce = nonce
        self.live = 0  # relay streams naming it now
        self.ended_at = 0.0  # when the last one ended (while live is 0)


class Claims:
    """Which proxy process (its nonce) holds each pointer instance at this broker: while it has relay streams here
    and for `keep_seconds` after the last one ended. No I/O; the caller's clock."""

    def __init__(self, keep_seconds: float = CLAIM_SECONDS, max_claims: int = MAX_CLAIMS) -> None:
        self.keep_seconds, self.max_claims = keep_seconds, max_claims
        self._claims: dict[int, _Claim] = {}
        self._ended: dict[int, None] = {}  # instances held by no stream now, the longest ended first

    def __len__(self) -> int:
        return len(self._claims)

    def holder(self, instance: int, now: float) -> int | None:
        """The nonce of the process that holds `instance` (its streams here, or lately); None: no one."""
        self._forget(now)
        claim = self._claims.get(instance)
        return None if claim is None else claim.nonce

    def take(self, instance: int, nonce: int, now: float) -> None:
        """A relay stream of the process `nonce` names `instance`: it holds it now (a reconnect of the same process
        always may, its old stream still open or not). InstanceTaken when another process holds it; OverflowError
        when MAX_CLAIMS instances are held by live streams."""
        self._forget(now)
        claim = self._claims.get(instance)
        if claim is None:
            if len(self._claims) >= self.max_claims:
                if not self._ended:
                    raise OverflowError(f"{len(self._claims)} proxy instances are held by relay streams here")
                del self._claims[self._pop_oldest_ended()]
            claim = self._claims[instance] = _Claim(nonce)
        elif claim.nonce != nonce:
            raise InstanceTaken(f"proxy instance {instance} is held by another proxy process at this broker")
        claim.live += 1
        self._ended.pop(instance, None)

    def release(self, instance: int, nonce: int, now: float) -> None:
        """A relay stream of `nonce` that named `instance` ended (or moved to another instance)."""
        claim = self._claims.get(instance)
        if claim is None or claim.nonce != nonce or not claim.live:
            return
        claim.live -= 1
        if not claim.live:
            claim.ended_at = now
            self._ended[instance] = None

    def _pop_oldest_ended(self) -> int:
        instance = next(iter(self._ended))
        del self._ended[instance]
        return instance

    def _forget(self, now: float) -> None:
        """Forget the instances that ended over `keep_seconds` ago."""
        cutoff = now - self.keep_seconds
        while self._ended and self._claims[next(iter(self._ended))].ended_at < cutoff:
            del self._claims[self._pop_oldest_ended()]


class Router:
    def __init__(self) -> None:
        self.streams: set[RelayStream] = set()
        self._index: TopicIndex[RelayStream] = TopicIndex()
        self._flushed = asyncio.Event()
        self._idle: set[RelayStream] = set()  # streams waiting with no timer: woken by the next `route`
        self.instances: dict[int, set[RelayStream]] = {}  # proxy instance -> its relay streams (pointer queries)
        self.claims = Claims()

    def claim(self, stream: RelayStream, instance: int, now: float) -> None:
        """Name `instance` as `stream`'s proxy process's (its first, or a new one it drew): held by that process
        (`stream.nonce`; a proxy of the version before, nonce 0, holds none). InstanceTaken when another process
        holds it (`stream` keeps its instance), OverflowError when no more can be held. For an attached stream
        (else `attach` follows)."""
        if instance and stream.nonce:
            self.claims.take(instance, stream.nonce, now)
        if stream in self.streams:
            self._unname(stream, now)
        stream.instance = instance
        if stream in self.streams and instance:
            self.instances.setdefault(instance, set()).add(stream)

    def _unname(self, stream: RelayStream, now: float) -> None:
        """`stream` no longer names its instance (it ended or moved to another)."""
        same = self.instances.get(stream.instance)
        if same is not None:
            same.discard(stream)
            if not same:
                del self.instances[stream.instance]
        if stream.instance and stream.nonce:
            self.claims.release(stream.instance, stream.nonce, now)

    def attach(self, stream: RelayStream) -> None:
        """Route events to `stream` (its instance, if any, already claimed: `claim`)."""
        self.streams.add(stream)
        if stream.instance:
            self.instances.setdefault(stream.instance, set()).add(stream)

    def idle(self, stream: RelayStream) -> None:
        """`stream` told the latest head and has nothing to send: it waits, without a timer, until
        events come for it, its interest changes, the broker closes, or (`route`) the head moves."""
        self._idle.add(stream)

    def detach(self, stream: RelayStream, now: float | None = None) -> None:
        """Stop routing to `stream`; its instance is held on (`Claims`) from `now` (monotonic; default: the clock)."""
        if stream in self.streams:
            self._unname(stream, time.monotonic() if now is None else now)
        self.streams.discard(stream)
        self._idle.discard(stream)
        self._index.remove(stream, stream.interest)
        stream.interest = set()
        self.note_flushed()

    def update_interest(self, stream: RelayStream, add: Iterable[str], remove: Iterable[str],
                        replace: bool) -> None:
        stream.interest_applied += 1
        stream.wake.set()
        new = set(add) if replace else (stream.interest | set(add)) - set(remove)
        self._index.remove(stream, stream.interest - new)
        self._index.add(stream, new - stream.interest)
        stream.interest = new

    def route(self, events: Sequence[Checked], first_seq: int, accepted_ns: int = 0) -> tuple[int, int]:
        """Queue each event (stamped `first_seq`, +1, ..., accepted at `accepted_ns`) once on every
        stream interested in it.

        Returns (queued, dropped). Idle streams are woken: the head moved, they tell it in head_interval.
        """
        for idle in self._idle:
            idle.wake.set()
        self._idle.clear()
        topics: dict[str, tuple[Collection[RelayStream], bytes]] = {}  # looked up once per topic
        outgoing: defaultdict[RelayStream, list[bytes]] = defaultdict(list)  # offered once per stream
        for seq, (topic, data) in enumerate(events, first_seq):
            found = topics.get(topic)
            if found is None:
                found = topics[topic] = (self._index.matching(topic), topic_field(topic))
            streams, field = found
            if not streams:
                continue
            entry = stamped_entry(field, data, seq)
            for stream in streams:
                outgoing[stream].append(entry)
        queued = sum(stream.offer_all(entries, accepted_ns) for stream, entries in outgoing.items())
        return queued, sum(map(len, outgoing.values())) - queued

    def pending_bytes(self) -> int:
        """Bytes queued for relay streams."""
        return sum(s.pending for s in self.streams)

    def busy(self) -> bool:
        """Some relay stream has events to write or a backfill under way."""
        return any(s.pending or s.backfill is not None for s in self.streams)

    def largest_backlog(self) -> int:
        """The bytes queued for the most backed-up relay stream (0 with none)."""
        return max((s.pending for s in self.streams), default=0)

    def note_flushed(self) -> None:
        """A stream's writer emptied its outbox: wake `flushed()` if all are empty (and no backfill is under way)."""
        if not self.busy():
            self._flushed.set()

    async def flushed(self) -> None:
        """Return once every outbox is empty (events handed to gRPC) and every backfill done."""
        while self.busy():
            self._flushed.clear()
            await self._flushed.wait()
