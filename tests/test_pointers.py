"""Pointer ids (docs/resume.md, "Pointer ids"): their form, the journal that resolves them, the hub's writes, and
the broker's bounds on resolving them. The resumes through real processes are in test_resume.py."""

from __future__ import annotations

import asyncio
import base64
import random
import tracemalloc

import pytest
from harness import KeptTransport

from neoplasma.broker import server as broker_server
from neoplasma.broker.routing import Claims, InstanceTaken, RelayStream
from neoplasma.broker.server import MAX_QUERIES_PER_STREAM, Broker
from neoplasma.broker.settings import BrokerConfig
from neoplasma.core.events import Event, SseReader
from neoplasma.core.resume import (
    JOURNAL_CHECKPOINT,
    MAX_INSTANCE,
    MIN_INSTANCE,
    POINTER_CHARS,
    POINTER_SPAN,
    InvalidToken,
    PointerJournal,
    advance,
    cluster_tag,
    encode_pointer,
    encode_token,
    is_pointer,
    parse_pointer,
    pointer_prefix,
)
from neoplasma.proxy.hub import Hub, SseSubscriber
from neoplasma.wire.v1 import neoplasma_pb2 as pb


def test_pointers_are_short_never_tokens_and_read_back() -> None:
    rng = random.Random(3)
    tag = cluster_tag("c")
    for instance in (MIN_INSTANCE, MAX_INSTANCE, *(rng.randint(MIN_INSTANCE, MAX_INSTANCE) for _ in range(200))):
        for counter in (0, 1, POINTER_SPAN - 1, POINTER_SPAN, POINTER_SPAN + 5, rng.randrange(1 << 40)):
            pointer = encode_pointer(pointer_prefix(instance), counter).decode()
            assert len(pointer) == POINTER_CHARS and is_pointer(pointer)
            assert parse_pointer(pointer) == (instance, counter % POINTER_SPAN)
    for _ in range(500):  # every token (version 1 and 2) begins with "A": never taken for a pointer
        positions = {rng.randint(1, 2**32 - 1): rng.randrange(1 << rng.choice((7, 20, 64))) for _ in range(8)}
        assert not is_pointer(encode_token(tag, positions).decode())
    with pytest.raises(ValueError):
        pointer_prefix(MIN_INSTANCE - 1)


def test_garbage_pointers_raise_only_invalid_token() -> None:
    rng = random.Random(5)
    samples = ["", "P", "P" * 7, "P" * 9, "P" * 9000, "P!!!!!!!", "PPPP PPP", "é" * 8, "\x00" * 8, "AAAAAAAA",
               "BAAAAAAA"]
    samples += ["".join(rng.choice("AZaz09-_+/=%!é") for _ in range(rng.randint(1, 12))) for _ in range(3000)]
    for sample in samples:
        try:
            instance, counter = parse_pointer(sample)
        except InvalidToken:
            continue
        assert MIN_INSTANCE <= instance <= MAX_INSTANCE and 0 <= counter < POINTER_SPAN


def simulate(journal: PointerJournal, rounds: int, rng: random.Random, now: float = 0.0,
             step: float = 0.005) -> dict[int, dict[int, int]]:
    """Record `rounds` dispatch rounds as a hub makes them (events of 4 brokers in seq order per broker, heads now
    and then, a broker retired once): returns what the token after each event names, by its counter."""
    positions: dict[int, int] = {}
    seqs = {epoch: 0 for epoch in (11, 22, 33, 44)}
    expected: dict[int, dict[int, int]] = {}
    for r in range(rounds):
        events = []
        for _ in range(rng.choice((1, 1, 2, 5, 30))):
            epoch = rng.choice(list(seqs))
            seqs[epoch] += rng.choice((1, 1, 3))
            events.append(Event("t", b"{}", epoch, seqs[epoch]))
        base = dict(positions)
        first = journal.record(base, [e.epoch for e in events], [e.seq for e in events], now + r * step)
        after = dict(base)
        for k, event in enumerate(events):
            advance(after, [event.epoch], [event.seq])
            expected[first + k] = dict(after)
        positions = after
        if rng.random() < 0.1:  # a head beyond the events (other topics' events at that broker)
            epoch = rng.choice(list(seqs))
            seqs[epoch] += 7
            positions[epoch] = seqs[epoch]
        if r == rounds // 2:
            positions.pop(44, None)  # retired
            del seqs[44]
    return expected


def test_the_journal_names_what_the_token_after_each_event_named() -> None:
    """Every pointer of the journal resolves to exactly the positions of the full token after its event, across
    rounds that keep their base whole and those rebuilt from the one before (heads, a retired broker), and across
    the counter's wrap."""
    rng = random.Random(7)
    journal = PointerJournal(max_age=1e9, max_bytes=1 << 30)
    journal.next = POINTER_SPAN - 50  # the counter wraps within the run
    expected = simulate(journal, 3 * JOURNAL_CHECKPOINT + 40, rng)
    assert any(n >= POINTER_SPAN for n in expected) and any(n < POINTER_SPAN for n in expected)
    assert any(r.base is None for r in journal._rounds) and sum(r.base is not None for r in journal._rounds) > 3
    for n, positions in expected.items():
        assert journal.positions_at(n % POINTER_SPAN) == positions, n
    assert journal.positions_at(journal.next % POINTER_SPAN) is None  # not issued yet: reads as too old


def test_the_journal_is_bounded_by_age_bytes_and_events() -> None:
    rng = random.Random(9)
    # Age: rounds every 5 ms over 2 s, 1 s kept.
    aged = PointerJournal(max_age=1.0, max_bytes=1 << 30)
    expected = simulate(aged, 400, rng)
    now = 399 * 0.005
    kept = {n for n, _ in expected.items() if aged.positions_at(n % POINTER_SPAN) is not None}
    assert kept and len(kept) < len(expected)
    oldest = min(kept)
    assert all(n >= oldest for n in kept) and aged._rounds[0].at >= now - 1.0
    for n in kept:  # what is kept still resolves exactly, though the rounds holding its base went
        assert aged.positions_at(n % POINTER_SPAN) == expected[n]
    # Bytes: never over the bound after a round, and what is kept is exact.
    small = PointerJournal(max_age=1e9, max_bytes=20_000)
    expected = simulate(small, 600, rng)
    assert 0 < small.bytes <= 20_000
    kept = {n for n in expected if small.positions_at(n % POINTER_SPAN) is not None}
    assert kept and len(kept) < len(expected)
    assert all(small.positions_at(n % POINTER_SPAN) == expected[n] for n in kept)
    # Events: at most max_events (so that a wrapped counter names one event).
    few = PointerJournal(max_age=1e9, max_bytes=1 << 30, max_events=100)
    simulate(few, 300, rng)
    assert few.events <= 100 + 30  # (a round is dropped whole: at most one round's events beyond)


def test_the_journal_holds_what_it_counts_at_60_brokers() -> None:
    """At 60 brokers, 1000 events/s in rounds of 5 (the bench's load): what the journal counts is what it holds
    (its Python objects measured), and 120 s of it is about 8 MiB (docs/resume.md)."""
    journal = PointerJournal(max_age=120.0, max_bytes=1 << 30)
    epochs = list(range(1_000_000, 1_000_060))
    positions = {e: 100_000_000 for e in epochs}
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for r in range(24_000):  # 200 rounds/s for 120 s
            chosen = [epochs[(5 * r + k) % 60] for k in range(5)]
            seqs = [positions[e] + 1 for e in chosen]
            base = dict(positions)
            journal.record(base, chosen, seqs, r * 0.005)
            advance(positions, chosen, seqs)
            if r % 3 == 0:  # heads of other topics now and then: a base kept whole
                positions[epochs[r % 60]] += 2
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert journal.events == 120_000
    assert 0.8 * journal.bytes <= held <= 1.2 * journal.bytes, (journal.bytes, held)
    assert journal.bytes < 9 << 20, journal.bytes


def chunks(transport: KeptTransport) -> list[bytes]:
    out = []
    for raw in transport.written:
        size, _, rest = raw.partition(b"\r\n")
        out.append(rest[:int(size, 16)])
    return out


async def test_a_write_gives_its_last_event_the_full_token_and_the_others_pointers_the_hub_resolves() -> None:
    hub = Hub()
    hub.set_cluster("c")
    transport = KeptTransport()
    sub = SseSubscriber(transport, 1 << 20)
    hub.add(sub, ["t"])
    # Before every broker took its instance (`Hub.confirm`), the hub issues no pointers: every event its full token.
    hub.dispatch([Event("t", b"{}", 9, 1), Event("t", b"{}", 9, 2)])
    [unconfirmed] = chunks(transport)
    assert [f.id for f in SseReader().feed(unconfirmed)] == [encode_token(hub.tag, {9: 1}).decode(),
                                                             encode_token(hub.tag, {9: 2}).decode()]
    transport.written.clear()
    hub.confirm(hub.instance)
    other = SseSubscriber(KeptTransport(), 1 << 20)
    hub.add(other, ["u"])
    rng = random.Random(2)
    seqs = {1: 0, 2: 0, 3: 0}
    position: dict[int, int] = {9: 2}
    expected: list[bytes] = []
    for _ in range(40):
        events = []
        for _ in range(rng.randint(1, 8)):
            epoch = rng.choice((1, 2, 3))
            seqs[epoch] += 1
            events.append(Event(rng.choice("tu"), b"{}", epoch, seqs[epoch]))
        for event in events:
            advance(position, [event.epoch], [event.seq])
            if event.topic == "t":
                expected.append(encode_token(hub.tag, position))
        heads = {1: seqs[1] + 3} if rng.random() < 0.3 else {}
        seqs[1] += 3 if heads else 0
        hub.dispatch(events, heads)
        position.update(heads)
    ids: list[bytes] = []
    for chunk in chunks(transport):
        reader = SseReader()
        frames = reader.feed(chunk)
        assert frames and all(f.id for f in frames)
        *pointers, last = [f.id or "" for f in frames]
        assert all(is_pointer(p) and len(p) == POINTER_CHARS for p in pointers) and last.startswith("A")
        assert chunk.count(b"id:") == len(frames) and chunk.count(b"id: ") == 1  # pointers: `id:` without space
        ids += [hub.resolve(p) or b"?" for p in pointers] + [last.encode()]
    assert ids == expected
    assert hub.resolve("PPPPPPPP") is None and hub.resolve("garbage!") is None
    foreign = encode_pointer(pointer_prefix(MIN_INSTANCE if hub.instance != MIN_INSTANCE else MAX_INSTANCE), 1)
    assert hub.resolve(foreign.decode()) is None


async def test_the_broker_asks_the_instance_and_bounds_the_queries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Resolve asks every relay stream naming the pointer's instance (in its next message), returns the answer
    its proxy gives on that stream (not another's), gives up after RESOLVE_TIMEOUT, and refuses beyond
    MAX_QUERIES_PER_STREAM unanswered queries."""
    monkeypatch.setattr(broker_server, "RESOLVE_TIMEOUT", 0.2)
    broker = Broker(BrokerConfig(workers=1))
    stream, impostor = RelayStream("p0", "peer", 1 << 20), RelayStream("p1", "peer", 1 << 20)
    stream.instance, impostor.instance = MIN_INSTANCE + 1, MIN_INSTANCE + 2
    broker.router.attach(stream)
    broker.router.attach(impostor)
    pointer = encode_pointer(pointer_prefix(MIN_INSTANCE + 1), 42).decode()
    asked = asyncio.ensure_future(broker.resolve(pointer))
    await asyncio.sleep(0)
    assert stream.has_news(0, 0.0, 1.0) and not impostor.has_news(0, 0.0, 1.0)
    message, _ = stream.take(1 << 20, 7, 0, 0.0)
    [query] = pb.EventBatch.FromString(message).resolve
    assert query.pointer == pointer
    broker.answered(impostor, [pb.PointerAnswer(id=query.id, token="Aforged")])  # not the stream it was asked on
    broker.answered(stream, [pb.PointerAnswer(id=query.id, token="A" * 9000)])  # over MAX_TOKEN_CHARS
    broker.answered(stream, [pb.PointerAnswer(id=query.id, token="Agood")])
    assert await asked == "Agood" and stream.asked == 0
    assert await broker.resolve(pointer) is None  # no answer in time
    with pytest.raises(LookupError):
        await broker.resolve(encode_pointer(pointer_prefix(MIN_INSTANCE + 3), 1).decode())
    with pytest.raises(InvalidToken):
        await broker.resolve(base64.urlsafe_b64encode(b"\x00" * 6).decode())
    waiting = [asyncio.ensure_future(broker.resolve(pointer)) for _ in range(MAX_QUERIES_PER_STREAM)]
    await asyncio.sleep(0)
    assert stream.asked == MAX_QUERIES_PER_STREAM and len(stream.queries) == MAX_QUERIES_PER_STREAM
    with pytest.raises(OverflowError):
        await broker.resolve(pointer)
    assert await asyncio.gather(*waiting) == [None] * MAX_QUERIES_PER_STREAM and stream.asked == 0
    broker.router.detach(stream)
    assert MIN_INSTANCE + 1 not in broker.router.instances


async def test_two_processes_of_one_instance_must_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two proxy processes that drew the same instance: their answers must agree, else no token (the gap signal)."""
    monkeypatch.setattr(broker_server, "RESOLVE_TIMEOUT", 0.5)
    broker = Broker(BrokerConfig(workers=1))
    twins = [RelayStream(f"p{k}", "peer", 1 << 20) for k in range(2)]
    for stream in twins:
        stream.instance = MIN_INSTANCE
        broker.router.attach(stream)
    pointer = encode_pointer(pointer_prefix(MIN_INSTANCE), 7).decode()

    async def answered(first: str, second: str) -> str | None:
        asked = asyncio.ensure_future(broker.resolve(pointer))
        await asyncio.sleep(0)
        for stream, token in zip(twins, (first, second), strict=True):
            message, _ = stream.take(1 << 20, 7, 0, 0.0)
            [query] = pb.EventBatch.FromString(message).resolve
            broker.answered(stream, [pb.PointerAnswer(id=query.id, token=token)])
        return await asked

    assert await answered("Aone", "Atwo") is None
    assert await answered("Aone", "") == "Aone"  # the other does not hold that number
    assert await answered("Aone", "Aone") == "Aone"
    assert await answered("", "") is None


def test_a_broker_holds_each_instance_for_one_process_and_forgets_it_in_time_and_bounds() -> None:
    """Claims: an instance is held by the process (nonce) whose relay stream named it first, over its streams (a
    reconnect of the same process is taken, its old stream still open or not) and `keep_seconds` after the last
    ended; another process is refused meanwhile. At most `max_claims`: the oldest ended forgotten first, then
    none taken while all are live."""
    claims = Claims(keep_seconds=60.0, max_claims=3)
    claims.take(1, 0xA, 0.0)
    claims.take(1, 0xA, 1.0)  # a reconnect while the old stream is still attached
    with pytest.raises(InstanceTaken):
        claims.take(1, 0xB, 2.0)
    claims.release(1, 0xA, 3.0)
    claims.release(1, 0xB, 3.0)  # not its holder: nothing
    with pytest.raises(InstanceTaken):
        claims.take(1, 0xB, 4.0)  # one stream of the holder still open
    claims.release(1, 0xA, 5.0)
    assert claims.holder(1, 64.0) == 0xA
    with pytest.raises(InstanceTaken):
        claims.take(1, 0xB, 64.0)  # ended 59 s ago: still remembered
    claims.take(1, 0xA, 64.5)  # its holder comes back
    claims.release(1, 0xA, 70.0)
    assert claims.holder(1, 130.5) is None and len(claims) == 0  # forgotten after keep_seconds
    claims.take(1, 0xB, 131.0)
    # Bounds: the oldest ended forgotten first to make room, then refused while every one is live.
    claims.take(2, 0xC, 132.0)
    claims.take(3, 0xD, 133.0)
    claims.release(3, 0xD, 134.0)
    claims.release(2, 0xC, 135.0)
    claims.take(4, 0xE, 136.0)
    assert claims.holder(3, 136.0) is None and claims.holder(2, 136.0) == 0xC and len(claims) == 3
    claims.take(5, 0xF, 137.0)
    assert claims.holder(2, 137.0) is None
    with pytest.raises(OverflowError):
        claims.take(6, 0x1, 138.0)
    with pytest.raises(InstanceTaken):
        claims.take(4, 0x1, 138.0)


def test_a_hub_resolves_only_the_pointers_it_issued_and_draws_anew_when_refused() -> None:
    """A hub issues pointers once its instance is confirmed; refused, it draws another and still resolves the
    pointers it issued of the first (the numbers it gave while it held it, not those after)."""
    hub = Hub()
    hub.set_cluster("c")
    hub.dispatch([Event("t", b"{}", 9, 1)])  # before it was confirmed: not its pointer
    unconfirmed = encode_pointer(hub.pointer_prefix, hub.journal.next - 1).decode()
    first = hub.instance
    hub.confirm(first)
    hub.dispatch([Event("t", b"{}", 9, 2)])
    issued = encode_pointer(hub.pointer_prefix, hub.journal.next - 1).decode()
    assert hub.resolve(unconfirmed) is None and hub.resolve(issued) == encode_token(hub.tag, {9: 2})
    assert not hub.redraw(first ^ 1) and hub.instance == first  # not its instance: nothing
    assert hub.redraw(first) and hub.instance != first and not hub.issuing
    hub.dispatch([Event("t", b"{}", 9, 3)])
    after = encode_pointer(pointer_prefix(first), hub.journal.next - 1).decode()  # a number it gave as no pointer
    assert hub.resolve(issued) == encode_token(hub.tag, {9: 2}) and hub.resolve(after) is None
    hub.confirm(first)  # an old verdict: not its instance any more
    assert not hub.issuing
    hub.confirm(hub.instance)
    hub.dispatch([Event("t", b"{}", 9, 4)])
    assert hub.resolve(encode_pointer(hub.pointer_prefix, hub.journal.next - 1).decode()) == encode_token(
        hub.tag, {9: 4})
