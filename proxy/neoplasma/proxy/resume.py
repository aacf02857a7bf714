"""Resuming a subscriber from a token: replay from the brokers, merged with live events (docs/resume.md)."""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import NamedTuple, Protocol, TypeVar, runtime_checkable

import grpc

from neoplasma.core.aio import InTurns, Pace, Signal, Turns
from neoplasma.core.events import Event, string_field_size
from neoplasma.core.logs import get_logger
from neoplasma.core.membership import EMPTY
from neoplasma.core.resume import (
    Checkpoint,
    InvalidToken,
    check_checkpoint,
    is_pointer,
    parse_pointer,
    parse_token,
    tokens_after,
)
from neoplasma.core.topics import prefixes
from neoplasma.proxy.hub import Batch, Hub, Mark, Subscriber
from neoplasma.proxy.links import BrokerLink, LinkSet, since_ms
from neoplasma.proxy.settings import CATCH_UP_BYTES_PER_SECOND, MAX_HELD, MAX_HELD_PER_PROXY, MAX_REPLAYS
from neoplasma.wire.v1 import neoplasma_pb2 as pb

T = TypeVar("T")
log = get_logger("proxy.resume")

# Batches a shared replay runs ahead of its slowest reader (the budgets' defaults: proxy/settings.py).
REPLAY_WINDOW = 16
# Batches of a gathered call a reader waits for before it is woken to take them (or the call's end, or its window
# full): its readers each take a few events of most batches, and a thousand of them woken at every batch were a
# thousand task steps (and ten passes of the signal over all of them) per batch.
GATHERED_WAKE = 4
# Replayed events encoded and written to a subscriber in one step of catch-up (a few milliseconds' work:
# between steps the loop serves live events, see `Turns`).
CATCH_UP_STEP = 256
# The topics' bytes one gathered Replay call asks for at most (the request stays far below gRPC's 4 MiB), and
# less when its broker reads smaller messages (`BrokerLink.request_room`: its --max-request-bytes).
GATHER_MAX_BYTES = 256 * 1024
# Resolving another proxy's pointer id (docs/resume.md, "Pointer ids"): brokers asked at most, one after the other
# (a broker the issuer has no relay stream to does not know it), within this many seconds in all.
RESOLVE_BROKERS = 3
RESOLVE_WAIT = 3.0
# Seconds' worth of --catch-up-bytes-per-second written at once after none for a while (as the brokers' REPLAY_BURST):
# a burst of resumes (1000 forged ones, arriving with their connections) starts at the steady rate, not with a whole
# second's worth written as fast as the loop goes.
CATCH_UP_BURST = 0.1
OVER_BUDGET = ("this proxy holds too many events for resuming subscribers (over its budget); "
               "resumed from now")


class ResumeBudget:
    """A proxy's budgets for resuming subscribers: live events held, Replay calls at once, the bytes of
    catch-up written per second (what is left for live events), the loop's time (`turns`: catch-up goes in
    short steps behind live events; `admissions`: the fast path's resuming requests wait for them), and the
    replays in progress, by position, so that resumes asking the same one share it."""

    def __init__(self, max_held: int = MAX_HELD, max_held_per_proxy: int = MAX_HELD_PER_PROXY,
                 max_replays: int = MAX_REPLAYS, catch_up_bytes_per_second: float = CATCH_UP_BYTES_PER_SECOND) -> None:
        self.max_held, self.max_held_per_proxy = max_held, max_held_per_proxy
        self.catch_up = Pace(catch_up_bytes_per_second, CATCH_UP_BURST)  # bytes of replayed event data written
        self.held = 0  # live events held by every Holder of the proxy
        self.replays = asyncio.Semaphore(max_replays)
        self.shared: dict[tuple[str, int, int, frozenset[str]], SharedReplay] = {}
        # Per link (broker name, epoch) and kind ("now": catch-ups from now, from the proxy's positions when they
        # came; "timed": from now by time, from a broker the proxy had no position of; "zero": resumes from seq 0 of
        # that broker, never seen or forged): the Replay call they join until it is made ("zero": while joinable).
        self.gathering: dict[tuple[str, int, str], SharedReplay] = {}
        self.started = 0  # Replay calls made (resumes that shared one made none)
        self.turns = Turns()
        self.admissions = InTurns(self.turns)  # resuming subscribers' requests, set up in turns while they contend

    async def pace(self, size: int) -> None:
        """Wait until `size` more bytes of catch-up fit the proxy's rate (bursts of CATCH_UP_BURST). A catch-up
        cancelled meanwhile (its client left) gives them back: 1000 attackers leaving mid-catch-up otherwise left the
        rate taken for seconds ahead, and the next honest resume waited for bytes nobody sent."""
        wait = self.catch_up.delay(size, asyncio.get_running_loop().time())
        if wait:
            try:
                await asyncio.sleep(wait)
            except asyncio.CancelledError:
                self.catch_up.refund(size)
                raise


class ReplayBatch(NamedTuple):
    events: list[Event]
    head: int
    gap: bool
    sizes: list[int]  # bytes of data in each step (CATCH_UP_STEP events) of it
    # Its steps' frames as sent to readers, by (sink kind, step, position before it): readers at one
    # position (every client of a proxy that died, say) get the same bytes, encoded once.
    encoded: dict[tuple[type, int, tuple[tuple[int, int], ...]], tuple[bytes, dict[int, int]]]
    # Which of its events each subscription key matches (`matching`), made once for all readers of a gathered call.
    by_key: dict[str, list[int]]
    # Answered by another epoch than the one asked (the broker restarted at its address since): nothing of the
    # asked one can be replayed, and its head is not of that epoch.
    restarted: bool = False

    @staticmethod
    def made(events: list[Event], head: int, gap: bool, restarted: bool = False) -> ReplayBatch:
        sizes = [sum(len(e.data) for e in events[k:k + CATCH_UP_STEP]) for k in range(0, len(events), CATCH_UP_STEP)]
        return ReplayBatch(events, head, gap, sizes, {}, {}, restarted)

    def matching(self, topics: frozenset[str], after: int) -> list[Event]:
        """Its events after seq `after` that `topics` match (plasma prefix rule), in order: a reader's part of a
        gathered call, found through an index of the batch's events by subscription key, made by the first reader
        (a thousand readers of their own topic each take their few events, not a pass over all of them)."""
        events, index = self.events, self.by_key
        if not index and events:
            for i, event in enumerate(events):
                for key in prefixes(event.topic):
                    index.setdefault(key, []).append(i)
        hits = [index[t] for t in topics if t in index]
        found = hits[0] if len(hits) == 1 else sorted(set().union(*hits))
        return [events[i] for i in found if events[i].seq > after]


@runtime_checkable
class Framing(Protocol):
    """A sink that can send replayed events as frames encoded once for all readers at one position."""

    def frames(self, events: Sequence[Event], tokens: Sequence[bytes]) -> bytes: ...

    async def send_frames(self, data: bytes) -> None: ...


class SharedReplay:
    """One Replay call to a broker, read by every resume that asks the same position while nothing
    of it has been let go: batches are kept until all its readers have taken them and the call needs
    room (it runs at most REPLAY_WINDOW batches ahead of its slowest reader; the gRPC stream waits), so a
    replay that fits the window stays joinable, to its end, while anyone reads it."""

    def __init__(self, budget: ResumeBudget, key: tuple[str, int, int, frozenset[str]], hub: Hub,
                 gathering: tuple[str, int, str] | None = None) -> None:
        self.budget, self.key, self.hub = budget, key, hub
        self.gathering = gathering  # where in `budget.gathering` it is gathered until made (None: not gathered)
        self.batches: list[ReplayBatch] = []
        self.trimmed = 0  # batches every reader has taken, let go
        self.readers: dict[int, int] = {}  # reader -> the index of its next batch
        self._at: dict[int, int] = {}  # index -> how many readers take it next (a few keys: its batches' indices)
        self.done = False
        self.complete = False  # the call ran to its end (not cut short, no error)
        self.error: grpc.aio.AioRpcError | None = None
        self.changed = Signal()
        self.timeout = 30.0  # the call's, set by run
        self.called: int | None = None  # not before the replay's head, once called (None before)
        self.mark: Mark | None = None  # where the hub stood for its topics when it was called
        self._next_reader = 0
        # Gathered (`ResumeBudget.gathering`): the union of its readers' topics and the lowest of their positions
        # (or, by time, when the first of them came: monotonic), asked when the call is made; each reader takes its
        # own part of it (`Resume._replay`).
        self.gathered_topics: set[str] = set()
        self.gathered_after: int | None = None
        self.gathered_since: float | None = None
        self.gathered_bytes = 0  # the topics' size in the request
        self.marked = key[3]  # the topics `mark` is of: its own, or those gathered when it was called

    def gather(self, topics: frozenset[str], after: int, since: float | None = None) -> None:
        """Add a reader's topics and position (or the monotonic time it came) to a gathered call not yet made."""
        new = topics - self.gathered_topics
        self.gathered_topics |= new
        self.gathered_bytes += sum(map(string_field_size, new))
        self.gathered_after = after if self.gathered_after is None else min(self.gathered_after, after)
        if since is not None:
            self.gathered_since = since if self.gathered_since is None else min(self.gathered_since, since)

    def takes(self, topics: frozenset[str], held_from: int, room: int) -> bool:
        """Whether a catch-up of `topics` (whose holder has had the live events after `held_from`) can read this
        gathered call: before it is made, while its request stays within `room` bytes of topics (a first reader
        always); once made, when it asked these topics and can still be joined."""
        if self.called is None:
            more = sum(map(string_field_size, topics - self.gathered_topics))
            return not self.gathered_bytes or self.gathered_bytes + more <= room
        return topics <= self.gathered_topics and self.joinable(held_from)

    def request(self) -> pb.ReplayRequest:
        """A gathered call's request, made now: its readers' topics after the lowest of their positions, and by
        time, what the broker accepted since the first of them came (with slack for the request's way there)."""
        since = 0 if self.gathered_since is None else since_ms(time.monotonic() - self.gathered_since)
        return pb.ReplayRequest(epoch=self.key[1], after=self.gathered_after or 0, topics=sorted(self.gathered_topics),
                                since_ms=since)

    def joinable(self, held_from: int) -> bool:
        """Whether a resume whose holder has had the live events after `held_from` (this broker's position
        when it was added to the hub) may read this replay: nothing of it let go, not cut short, and no event
        for its topics it lacks and the holder did not have: the call not yet made, its head (the broker's,
        when called) not before `held_from`, or no event for its topics dispatched since it was called (and
        they were wanted all along: those between its head and `held_from` were none)."""
        if self.trimmed or (self.done and not self.complete):
            return False
        if self.called is None or self.called >= held_from:
            return True
        return self.mark is not None and self.hub.quiet_since(self.marked, self.mark)

    async def run(self, link: BrokerLink, request: pb.ReplayRequest | None, timeout: float) -> None:
        """Make the call (when its turn comes among the proxy's replays) and keep its batches for the readers.
        `request` None: a gathered call, asking what its readers gathered until then (`gather`)."""
        budget, hub = self.budget, self.hub
        self.timeout = timeout
        try:
            if request is None:  # behind the catch-ups already waiting for their turn: they gather into it first
                await budget.turns.turn()
            async with budget.replays:
                budget.started += 1
                if request is None:
                    # Catch-ups from now (positions differ) gather no more once it is made; readers from seq 0 may
                    # still join it while it can be joined (`Resume._gathered`).
                    if self.gathering is not None and self.gathering[2] != "zero" and budget.gathering.get(
                            self.gathering) is self:
                        del budget.gathering[self.gathering]
                    self.marked = frozenset(self.gathered_topics)
                    request = self.request()
                if self.readers:  # all may have left while it waited for its turn
                    # The broker's head when it is called is not before the proxy's position now.
                    self.called, self.mark = hub.positions.get(self.key[1], 0), hub.mark(self.marked)
                    call = link.replay_stub().Replay(request, timeout=timeout, metadata=link.access.metadata())
                    try:
                        async for batch in call:
                            if not self.batches and not self.trimmed:
                                self.called = max(self.called, batch.head)
                            await budget.turns.turn()
                            self.batches.append(ReplayBatch.made(
                                [Event(e.topic, e.data, request.epoch, e.seq) for e in batch.events], batch.head,
                                batch.gap, batch.epoch != request.epoch))
                            self._trim()
                            await self.changed.wait_until(lambda: not self.readers or len(self.batches) < REPLAY_WINDOW,
                                                          timeout)
                            if not self.readers:
                                break
                        else:
                            self.complete = True
                    finally:
                        call.cancel()
        except grpc.aio.AioRpcError as exc:
            self.error = exc
        finally:
            self.done = True
            if not self.complete or not self.readers:
                self._unshare()
            self.changed.notify()

    def _unshare(self) -> None:
        """No longer joined by resumes asking its position."""
        if self.budget.shared.get(self.key) is self:
            del self.budget.shared[self.key]

    def join(self) -> int:
        """A new reader, from the first batch not let go (read it with `read`, or `leave`)."""
        me = self._next_reader
        self._next_reader += 1
        self.readers[me] = self.trimmed
        self._count(self.trimmed, 1)
        return me

    def leave(self, me: int) -> None:
        index = self.readers.pop(me, None)
        if index is not None:
            self._count(index, -1)
            self._trim()

    def _count(self, index: int, change: int) -> None:
        left = self._at.get(index, 0) + change
        if left:
            self._at[index] = left
        else:
            del self._at[index]

    async def read(self, me: int | None = None, wake: int = 1) -> AsyncIterator[ReplayBatch]:
        """Every batch of the replay, in order (then AioRpcError if the call failed), for reader `me` (`join`;
        None: a new one). Once it has taken every batch so far, it waits for `wake` more (or the call's end, or its
        window full: then the call waits for its readers)."""
        if me is None:
            me = self.join()
        try:
            while True:
                index = self.readers[me]
                if index < self.trimmed + len(self.batches):
                    self.readers[me] = index + 1
                    self._count(index, -1)
                    self._count(index + 1, 1)
                    batch = self.batches[index - self.trimmed]
                    self._trim()
                    yield batch
                    continue
                if self.done:
                    if self.error is not None:
                        raise self.error
                    return
                await self.changed.wait_until(
                    lambda: self.done or self.readers[me] + wake <= self.trimmed + len(self.batches) or (
                        len(self.batches) >= REPLAY_WINDOW and self.readers[me] < self.trimmed + len(self.batches)),
                    self.timeout)
        finally:
            self.leave(me)

    def _trim(self) -> None:
        """Let go of the batches every reader has taken once the call needs room for another (all of them when no
        reader is left, or once it let any go: it can no longer be joined from its start)."""
        readers, batches = self.readers, self.batches
        taken = min(self._at, default=self.trimmed + len(batches)) - self.trimmed  # not a pass over 1000 readers
        if taken > 0 and (self.trimmed or not readers or len(batches) >= REPLAY_WINDOW):
            del batches[:taken]
            self.trimmed += taken
            self._unshare()
        self.changed.notify()


class Sink(Protocol):
    """How catch-up reaches one subscriber: `send`/`gap` may wait for the connection, `send_now` may not."""

    async def send(self, events: Sequence[Event], tokens: Sequence[bytes]) -> None: ...

    async def gap(self, reason: str) -> None: ...

    def send_now(self, events: Sequence[Event], tokens: Sequence[bytes], gaps: Sequence[str]) -> None: ...


class Holder(Subscriber):
    """Stands in for a resuming subscriber in the hub: its live events are kept, not written (or, once `passing`,
    handed on as they come)."""

    kind = "resuming"

    def __init__(self, target: Subscriber, budget: ResumeBudget) -> None:
        super().__init__()
        self.target = target
        self.budget = budget
        self.closed = target.closed  # closing the holder (drain, too slow) closes the subscriber
        self.held: list[Event] = []
        self.gaps: list[str] = []
        self.over = False  # over a budget: holds nothing more; the subscriber resumes from now, with a gap
        # Set when its catch-up is done but not every relay has reached it: live events and gap signals go to it
        # as they come (the catch-up's `pass_on`) instead of being kept.
        self.passing: Callable[[list[Event], list[str]], None] | None = None

    @property
    def counted_as(self) -> str:
        return self.target.kind

    def mover(self) -> Subscriber:
        return self.target

    def movable(self, now: float) -> bool:
        """As its subscriber (held events are written to no one: they give it no position)."""
        return self.target.movable(now)

    @staticmethod
    def encode(batch: Batch, indices: list[int]) -> list[Event]:
        return [batch.events[i] for i in indices]

    def deliver(self, encoded: object, position: bool = True) -> bool:
        events: list[Event] = encoded  # type: ignore[assignment]
        if self.passing is not None:
            self.passing(events, [])
            return True
        if self.over:
            return True
        budget = self.budget
        if len(self.held) + len(events) > budget.max_held or budget.held + len(events) > budget.max_held_per_proxy:
            self.over = True
            self.release()
            return True
        self.held.extend(events)
        budget.held += len(events)
        return True

    def release(self) -> None:
        """Let go of what is held (its count leaves the proxy's budget)."""
        self.budget.held -= len(self.held)
        self.held = []

    def signal_gap(self, reason: str, token: bytes) -> bool:
        if self.passing is not None:
            self.passing([], [reason])
        else:
            self.gaps.append(reason)
        return True


class Resume:
    """One subscriber's catch-up: the steps of docs/resume.md, "Resuming at a proxy"."""

    def __init__(self, hub: Hub, links: LinkSet, sub: Subscriber, topics: frozenset[str], sink: Sink,
                 wait: float, budget: ResumeBudget | None = None) -> None:
        self.hub, self.links, self.sub, self.topics, self.sink, self.wait = hub, links, sub, topics, sink, wait
        self.framing = sink if isinstance(sink, Framing) else None  # (a Protocol's isinstance is slow: once)
        self.budget = budget or ResumeBudget()
        self.position: dict[int, int] = {}  # the client's position while it catches up
        self.holder: Holder | None = None
        self.held_from: dict[int, int] = {}
        self.came = 0.0  # when its holder joined the hub (monotonic): it is owed what brokers accepted since
        self.gapped = False  # a gap signal went to the subscriber

    async def _gap(self, reason: str) -> None:
        self.gapped = True
        self.hub.metrics.gap_signals += 1
        await self.sink.gap(reason)

    def _resumed(self) -> None:
        self.hub.metrics.resumes.inc("gap" if self.gapped else "exact")

    async def run(self, token: str) -> None:
        """Catch up from `token`; without one (a fresh subscriber whose topics some broker has not
        applied yet), from the proxy's positions now, or, for a broker it has none of, from now by the
        broker's clock: no id before then claims what it never got."""
        # A restarted proxy learns the cluster id (which a token names) with its first membership.
        await self.links.changed.wait_until(lambda: self.links.applied is not EMPTY, self.wait)
        # Its setup (the token, a Holder, the interest) and, once the links settled, its replay's takes turns
        # behind live events: a thousand resumes arriving at once are set up one per pass of the loop.
        turns = self.budget.turns
        await turns.turn()
        try:
            if is_pointer(token):  # the full token it stands for, from the proxy process that issued it
                token = await resolve_pointer(self.hub, self.links, token)
            parsed = parse_token(token, self.hub.tag) if token else None
            if parsed is not None and parsed.checkpoint is not None:  # version 3: the positions it is relative to
                parsed = parsed.completed(await resolve_checkpoint(self.hub, self.links, *parsed.checkpoint))
        except InvalidToken as exc:  # then from when it came, as one without a token
            self.sub.positioned = False  # what the client holds resumes nowhere exactly
            await self._gap(str(exc))
            parsed = None
            # Live at once when every broker applied its topics; else what one accepts before it applies them
            # would be lost: caught up from when it came, below.
            if self.links.applied_everywhere(self.topics):
                self.hub.add(self.sub, self.topics)
                self._resumed()
                return
        client = dict(self.hub.positions)
        holder = self.holder = Holder(self.sub, self.budget)
        self.hub.add(holder, self.topics)  # the proxy's interest now covers these topics
        self.held_from = dict(self.hub.positions)  # the holder has every live event after these
        self.came = time.monotonic()
        swapped = False
        try:
            if not await self.links.wait_settled(self.wait):
                await self._gap("not every broker could be reached in time")
            await turns.turn()
            unknown, from_now = 0, parsed is None
            if parsed is not None:  # its brokers are named among those known now that the links settled
                try:
                    client, unknown = parsed.resolve(self._known())
                except InvalidToken as exc:  # resumes from when it came, as one without a token does
                    await self._gap(str(exc))
                    client, from_now = dict(self.held_from), True
            if unknown:
                await self._gap(f"{unknown} broker(s) of this position are gone with their retention")
            skip = await self._replay_all(client, from_now)
            if not holder.over and not await self.hub.advanced.wait_until(lambda: self._caught_up(skip), self.wait):
                # A relay behind its replay (its events up to the replay's head still to come): what is held, then
                # each live event after the replay as it comes, until the relay caught up (never one twice).
                self._pass_on(holder, skip)
                await self.hub.advanced.wait_until(lambda: self._caught_up(skip) or holder.closed.done(), math.inf)
            # From here to the swap nothing awaits: no live event can slip between.
            if holder.closed.done():
                return
            if holder.over:  # live from now: what was not held is missed
                holder.gaps.append(OVER_BUDGET)
                self.position = dict(self.hub.positions)
            held = [e for e in holder.held if e.seq > skip.get(e.epoch, 0)]
            self.sink.send_now(held, self._tokens(held), holder.gaps)
            self.hub.swap(holder, self.sub)
            swapped = True
            self.hub.metrics.gap_signals += len(holder.gaps)
            self.gapped = self.gapped or bool(holder.gaps)
            if token:
                self._resumed()
        finally:
            holder.release()
            if not swapped:
                self.hub.remove(holder)

    def _pass_on(self, holder: Holder, skip: dict[int, int]) -> None:
        """Hand the held events after the replays, and from now on each live event after them and each gap signal
        as it comes, to the subscriber (with its own tokens) instead of holding them."""
        def pass_on(events: list[Event], gaps: list[str]) -> None:
            events = [e for e in events if e.seq > skip.get(e.epoch, 0)]
            self.hub.metrics.gap_signals += len(gaps)
            self.gapped = self.gapped or bool(gaps)
            self.sink.send_now(events, self._tokens(events), gaps)

        pass_on(holder.held, holder.gaps)
        holder.release()
        holder.gaps = []
        holder.passing = pass_on

    def _known(self) -> set[int]:
        """The broker epochs this proxy can name: its links', and those it saw end (with their positions)."""
        hub = self.hub
        return {link.epoch for link in self.links.links.values() if link.epoch} | hub.positions.keys() | \
            hub.retired.keys()

    def _caught_up(self, skip: dict[int, int]) -> bool:
        """Every link's relay is past its replay, or the link is gone (a gap if it ended uncleanly,
        which the holder got)."""
        hub = self.hub
        return all(epoch in hub.retired or hub.positions.get(epoch, 0) >= seq for epoch, seq in skip.items())

    async def _replay_all(self, client: dict[int, int], from_now: bool) -> dict[int, int]:
        """Replay what each link's broker has after the client's position; the seq up to which
        live events must be skipped, per epoch. `from_now` (no token: the first subscribers of topics new to
        this proxy), and for the brokers a token holds no position of (seq 0: it never saw anything of them, or
        forged): it joins the link's gathered call, every link's at once, before reading any (`_gathered`); from now,
        a link whose epoch `client` has no position of (the proxy had none when the subscriber came: a link with no
        message read yet, or from a broker that had accepted nothing) by time, from when the subscriber came."""
        links = [link for link in self.links.links.values() if link.epoch]
        timed = {link.epoch for link in links if link.epoch not in client}
        self.position = {link.epoch: client.pop(link.epoch, 0) for link in links}
        kinds = {link.epoch: ("timed" if link.epoch in timed else "now") if from_now
                 else (None if self.position[link.epoch] else "zero") for link in links}
        gathered = {link.epoch: self._gathered(link, kind) for link in links
                    if (kind := kinds[link.epoch]) is not None}
        skip: dict[int, int] = {}
        try:
            for link, epoch in [(link, link.epoch) for link in links]:  # (a link's epoch may change meanwhile)
                # Always asked, even when the proxy's position is not past the client's: the broker may
                # have accepted events for these topics after that position and before it applied this
                # proxy's interest in them, and those were never relayed.
                skip[epoch] = await self._replay(link, epoch, self.position[epoch], gathered.get(epoch))
                self.position[epoch] = skip[epoch]  # not past the broker's head (a forged position)
        finally:
            for shared, me in gathered.values():
                shared.leave(me)
        gone = [epoch for epoch, seq in client.items() if self.hub.retired.get(epoch, seq + 1) > seq]
        if gone:
            await self._gap(f"{len(gone)} broker(s) of this position are gone with their retention")
        return skip

    def _gathered(self, link: BrokerLink, kind: str) -> tuple[SharedReplay, int]:
        """A reader of the Replay call to `link`'s broker that catch-ups of its `kind` gather into (it waits for the
        turns of those that came with this one, then for its turn among the proxy's replays): the union of their
        topics after the lowest of their positions ("now"), or what the broker accepted since the first of them came
        ("timed"), or from seq 0 ("zero"). Joined only after this resume's interest was acknowledged, so the call,
        made later, is past the seq at which the broker applied it (exactly once). Its request stays within
        GATHER_MAX_BYTES of topics and what the broker reads (a topic set larger than that alone goes in a call of
        its own). Catch-ups from seq 0 (a position naming nothing of this broker: every one retained is owed)
        gather apart from those from now: their call asks from seq 0, so the gap it reports is each reader's own;
        and once made, it is joined as a shared replay is (`SharedReplay.joinable`) by those whose topics it asked.
        A thousand resumes from seq 0 of a topic each cost the broker one walk of its retention, not a thousand."""
        budget = self.budget
        where = (link.member.name, link.epoch, kind)
        shared = budget.gathering.get(where)
        room = min(GATHER_MAX_BYTES, link.request_room or GATHER_MAX_BYTES)
        if shared is not None and not shared.takes(self.topics, self.held_from.get(link.epoch, 0), room):
            shared = None
        if shared is None:
            shared = budget.gathering[where] = SharedReplay(budget, (link.member.name, link.epoch, -1, frozenset()),
                                                            self.hub, where)
            asyncio.get_running_loop().create_task(shared.run(link, None, max(self.wait, 30.0)))
        if shared.called is None:
            shared.gather(self.topics, self.position[link.epoch], self.came if kind == "timed" else None)
        return shared, shared.join()

    async def _part(self, shared: SharedReplay, me: int, after: int) -> AsyncIterator[ReplayBatch]:
        """Reader `me`'s part of a gathered replay: the events of its topics after `after` (others asked from
        further back, or for other topics), gathered over the call's messages into steps of CATCH_UP_STEP (one
        write each, not one per message: a topic's few events spread over the whole of retention were a write
        per message); the call's messages as they are when it asked what the call asked. A gap the call reports
        is passed on, after what came before it (for a call from now it may be one of an earlier position than
        this one's: a gap signal too many, never one too few)."""
        topics = self.topics
        events: list[Event] = []
        head: int | None = None
        whole: bool | None = None  # it asked what the call asked (a thousand resumes of one topic from seq 0)
        async for batch in shared.read(me, GATHERED_WAKE):
            if batch.restarted:  # answered by another epoch: nothing of the asked one (`_replay`: a gap)
                yield ReplayBatch.made([], batch.head, batch.gap, True)
                return
            if whole is None:  # the call's topics and position are known once it is made, before its first message
                whole = topics == shared.marked and after <= (shared.gathered_after or 0)
            if whole:  # the call's messages as they are: encoded once for every reader at one position (`_send`)
                yield batch
                continue
            head = batch.head
            if batch.gap:
                if events:
                    yield ReplayBatch.made(events, head, False)
                yield ReplayBatch.made(batch.matching(topics, after), head, True)
                events = []
                continue
            events += batch.matching(topics, after)
            if len(events) >= CATCH_UP_STEP:
                yield ReplayBatch.made(events, head, False)
                events = []
        if head is not None:  # the rest, and the call's head for `_replay` (even with no event of these topics)
            yield ReplayBatch.made(events, head, False)

    def _shared(self, link: BrokerLink, epoch: int, after: int) -> SharedReplay:
        """The replay of `link`'s broker (epoch `epoch`) after `after` for these topics: one in progress that asked
        the same and can still be joined, or a new one (which waits its turn among the proxy's replays)."""
        budget = self.budget
        key = (link.member.name, epoch, after, self.topics)
        shared = budget.shared.get(key)
        if shared is None or not shared.joinable(self.held_from.get(epoch, 0)):
            shared = budget.shared[key] = SharedReplay(budget, key, self.hub)
            request = pb.ReplayRequest(epoch=epoch, after=after, topics=sorted(self.topics))
            asyncio.get_running_loop().create_task(shared.run(link, request, max(self.wait, 30.0)))
        return shared

    async def _replay(self, link: BrokerLink, epoch: int, after: int,
                      gathered: tuple[SharedReplay, int] | None = None) -> int:
        """Deliver the events of `link`'s broker (epoch `epoch`) after `after` (from `gathered`'s call when given,
        else from one asking this position); returns the replay's head (the broker's head when `after` is beyond
        it: a position from elsewhere or forged, signalled as a gap; `after` when the broker restarted since: a
        gap, and the live events held after `after` still go to the subscriber)."""
        head, first = after, True
        batches = self._shared(link, epoch, after).read() if gathered is None else self._part(*gathered, after)
        try:
            async for batch in batches:
                if batch.restarted:
                    await self._gap(f"broker {link.member.name} restarted; what it accepted since this position "
                                    "and had not relayed is gone")
                    return after
                beyond = first and batch.head < after
                if beyond:
                    await self._gap(f"broker {link.member.name} has not reached this position")
                    head = batch.head
                first = False
                head = max(head, batch.head)
                if batch.gap and not beyond:
                    await self._gap(f"broker {link.member.name} no longer holds every event since this "
                                        "position")
                if batch.events:
                    await self._send(batch)
                if self.holder is not None and self.holder.over:  # resumes from now: the rest is not needed
                    return head
        except grpc.aio.AioRpcError as exc:
            log.outside("replay_failed", broker=link.member.name, error=f"{exc.code().name}: {exc.details()}")
            await self._gap(f"broker {link.member.name} could not replay: {exc.code().name}")
            return max(head, self.hub.positions.get(epoch, 0))
        return head

    async def _send(self, batch: ReplayBatch) -> None:
        """Send a replayed batch in steps behind live events (`Turns`), each encoded once for every reader at the
        same position (a Framing sink)."""
        self.hub.metrics.replayed_events += len(batch.events)
        sink, framing = self.sink, self.framing
        for step, size in enumerate(batch.sizes):
            events = batch.events[step * CATCH_UP_STEP:(step + 1) * CATCH_UP_STEP]
            await self.budget.pace(size)
            await self.budget.turns.turn()
            if framing is None:
                await sink.send(events, self._tokens(events))
                continue
            key = (type(sink), step, tuple(sorted(self.position.items())))
            done = batch.encoded.get(key)
            if done is None:
                data = framing.frames(events, self._tokens(events))
                done = batch.encoded[key] = (data, dict(self.position))
            else:
                self.position = dict(done[1])
            await framing.send_frames(done[0])

    def _tokens(self, events: Sequence[Event]) -> list[bytes]:
        """The client's token after each of `events` (its own position advances as it catches up)."""
        return list(tokens_after(self.hub.tag, self.position, events, checkpoint=self.hub.checkpoint).values())


async def resolve_pointer(hub: Hub, links: LinkSet, pointer: str) -> str:
    """The full token `pointer` stands for: from this process's journal when it issued it, else asked (`Resolve`) of
    brokers, which ask the issuing process over its relay stream. InvalidToken when it is no pointer, or no one can
    tell (the issuer gone, or the pointer no longer in its journal): the gap signal, then live."""
    try:
        instance, _ = parse_pointer(pointer)
    except InvalidToken:
        hub.metrics.pointers.inc("unresolved")
        raise
    if instance in hub.issued:  # one of this process's pointers (any other is asked of its issuer)
        token = hub.resolve(pointer)
        hub.metrics.pointers.inc("unresolved" if token is None else "local")
        if token is None:
            raise InvalidToken("the resume id is a pointer no longer in this proxy's journal")
        return token.decode()
    remote, errors = await ask_brokers(links, pb.ResolveRequest(pointer=pointer), lambda reply: str(reply.token))
    if remote is not None:
        hub.metrics.pointers.inc("remote")
        return remote
    hub.metrics.pointers.inc("unresolved")
    log.outside("pointer_unresolved", pointer=pointer, errors=errors)
    raise InvalidToken("the resume id is a pointer that the proxy which issued it could not resolve (gone, or "
                       "no longer in its journal)")


async def resolve_checkpoint(hub: Hub, links: LinkSet, instance: int, counter: int) -> Checkpoint:
    """The checkpoint a version 3 token names: made or resolved lately by this process, else asked (`Resolve`) of up
    to RESOLVE_BROKERS brokers within RESOLVE_WAIT, which answer from what they store (resumes that name the same
    one while it is asked share the question). InvalidToken when none holds it (never registered, evicted, too old,
    forged): the gap signal, then live."""
    found = hub.known_checkpoint(instance, counter)
    if found is not None:
        hub.metrics.checkpoints.inc("local")
        return found
    key = (instance, counter)
    lookup = hub.checkpoint_lookups.get(key)
    if lookup is None:
        lookup = hub.checkpoint_lookups[key] = asyncio.get_running_loop().create_task(_ask_checkpoint(links, key))
        lookup.add_done_callback(lambda _: hub.checkpoint_lookups.pop(key, None))
    found = await asyncio.shield(lookup)
    if found is None:
        hub.metrics.checkpoints.inc("unresolved")
        raise InvalidToken("the resume token names a checkpoint no broker asked holds (evicted, too old, or not "
                           "this cluster's)")
    hub.keep_resolved(found)
    hub.metrics.checkpoints.inc("remote")
    return found


async def _ask_checkpoint(links: LinkSet, key: tuple[int, int]) -> Checkpoint | None:
    """The checkpoint `key` (instance, counter) as the first broker asked that holds it stores it; None if none."""
    instance, counter = key

    def answer(reply: pb.ResolveResponse) -> Checkpoint:
        checkpoint = Checkpoint.from_proto(reply.checkpoint)
        check_checkpoint(checkpoint)  # (ValueError: the next broker is asked)
        if (checkpoint.instance, checkpoint.counter) != key:
            raise ValueError("answered another checkpoint")
        return checkpoint

    found, errors = await ask_brokers(links, pb.ResolveRequest(instance=instance, checkpoint=counter), answer)
    if found is None:
        log.outside("checkpoint_unresolved", instance=instance, counter=counter, errors=errors)
    return found


async def ask_brokers(links: LinkSet, request: pb.ResolveRequest, answer: Callable[[pb.ResolveResponse], T],
                      ) -> tuple[T | None, list[str]]:
    """`Resolve` asked of up to RESOLVE_BROKERS brokers (connected ones first, in random order) within RESOLVE_WAIT:
    the first reply `answer` takes (it raises ValueError for one it does not), or None; and what each said that
    could not be taken. A broker that calls the request invalid ends the asking (every broker would)."""
    candidates = list(links.links.values())
    random.shuffle(candidates)
    candidates.sort(key=lambda link: link.state != pb.BrokerLink.State.CONNECTED)
    deadline = time.monotonic() + RESOLVE_WAIT
    errors: list[str] = []
    for link in candidates[:RESOLVE_BROKERS]:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            reply = await link.replay_stub().Resolve(request, timeout=left, metadata=link.access.metadata())
            return answer(reply), errors
        except grpc.aio.AioRpcError as exc:
            errors.append(f"{link.member.name}: {exc.code().name}")
            if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                break
        except ValueError as exc:
            errors.append(f"{link.member.name}: {exc}")
    return None, errors


def resume_ended(exc: BaseException) -> tuple[str, int, str]:
    """How a catch-up that raised `exc` is logged and why its subscriber is closed: (event, level, reason).
    Writing to a connection its client has closed is a client leaving (info, "gone"), not an error."""
    if isinstance(exc, ConnectionError):
        return "resume_client_left", logging.INFO, "gone"
    return "resume_failed", logging.ERROR, "error"


def start_resume(resume: Resume, token: str) -> asyncio.Task[None]:
    """Run `resume` beside the connection; a failure ends the subscriber instead of leaving it silent."""
    task = asyncio.get_running_loop().create_task(resume.run(token))

    def done(t: asyncio.Task[None]) -> None:
        if not t.cancelled() and (exc := t.exception()) is not None:
            event, level, reason = resume_ended(exc)
            log.outside(event, level, error=repr(exc))
            resume.sub.close(reason)

    task.add_done_callback(done)
    return task
