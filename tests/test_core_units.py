"""Pure pieces: topics, event encodings, membership, routing and fan-out decisions."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given
from hypothesis import strategies as st

from neoplasma.broker.routing import RelayStream, Router
from neoplasma.core.aio import WAKES_PER_PASS, Cancels, Signal
from neoplasma.core.events import (
    Event,
    SseMessage,
    SseReader,
    batch_entry,
    batch_trailer,
    compact_json,
    plasma_json,
    plasma_payload,
    sse_frame,
    sse_gap,
)
from neoplasma.core.membership import EMPTY, BrokerState, Member, is_stale, next_snapshot
from neoplasma.core.topics import InvalidTopic, TopicIndex, matches, parse_topic_list, prefixes
from neoplasma.plasma.v1 import stream_pb2
from neoplasma.proxy.hub import Hub, PlasmaSubscriber, pause
from neoplasma.wire.v1 import neoplasma_pb2 as pb

segment = st.text(alphabet="abc1", min_size=1, max_size=3)
topic_st = st.lists(segment, min_size=1, max_size=4).map(":".join)


@given(sub=topic_st, topic=topic_st)
def test_prefix_keys_are_exactly_the_matching_subscriptions(sub: str, topic: str) -> None:
    assert (sub in prefixes(topic)) == matches(sub, topic)


def test_plasma_hierarchy() -> None:
    assert matches("program:1234", "program:1234:views")
    assert not matches("program:1234", "program:12345:views")
    assert parse_topic_list("a, b,a,,c") == ["a", "b", "c"]
    with pytest.raises(InvalidTopic):
        parse_topic_list(" , ")


@pytest.mark.parametrize("raw, compact", [
    (b' { "a" : [ 1 , 2.50 ] } ', b'{"a":[1,2.50]}'),
    (b'"keep  spaces in strings"', b'"keep  spaces in strings"'),
    (b'"<tag>&amp;"', b'"\\u003ctag\\u003e\\u0026amp;"'),
    (b'"esc \\" quote"', b'"esc \\" quote"'),
    ('"\u2028"'.encode(), b'"\\u2028"'),
])
def test_compact_json_like_go(raw: bytes, compact: bytes) -> None:
    assert compact_json(raw) == compact


def test_encodings_decode_with_protobuf() -> None:
    e = Event("a:b", b'{"x":1}')
    batch = pb.EventBatch.FromString(batch_entry(e) * 2 + batch_entry(e, 300)
                                     + batch_trailer(epoch=2**32 - 1, head=301, token=b"t", gap=True))
    assert [(x.topic, x.data, x.seq) for x in batch.events] == [("a:b", b'{"x":1}', 0)] * 2 + [
        ("a:b", b'{"x":1}', 300)]
    assert (batch.epoch, batch.head, batch.token, batch.gap) == (2**32 - 1, 301, "t", True)
    payload = stream_pb2.Payload.FromString(plasma_payload(e))
    assert payload.eventType.type == "a:b" and payload.data == '{"x":1}'
    assert sse_frame(b"AQtok", e) == b'id: AQtok\ndata: {"meta":{"type":"a:b"},"data":{"x":1}}\n\n'
    # A topic's part is made once per topic: each event still gets its own data, and the topic as Go writes it.
    odd = "a<b>&c\u2028é\"q"
    assert [plasma_json(Event(odd, d)) for d in (b"1", b"[2]")] == [
        b'{"meta":{"type":"a\\u003cb\\u003e\\u0026c\\u2028\xc3\xa9\\"q"},"data":' + d + b"}" for d in (b"1", b"[2]")]


def test_snapshot_version_bumps_only_on_change() -> None:
    a, b = Member("b0", "h:1"), Member("b1", "h:2")
    s1 = next_snapshot(EMPTY, [b, a])
    assert s1.version == 1 and s1.members == (a, b)
    assert next_snapshot(s1, [a, b]) is s1
    s2 = next_snapshot(s1, [a, Member("b1", "h:2", BrokerState.DRAINING)])
    assert s2.version == 2 and tuple(m for m in s2.members if m.state is BrokerState.SERVING) == (a,)
    assert is_stale(2, 1) and not is_stale(2, 2) and not is_stale(2, 3)


async def test_router_delivers_once_per_stream_and_bounds_slow_streams() -> None:
    router = Router()
    fast, slow = RelayStream("fast", "p1", 10_000), RelayStream("slow", "p2", 100)
    for s in (fast, slow):
        router.attach(s)
    router.update_interest(fast, ["a", "a:b"], [], replace=True)
    router.update_interest(slow, ["a"], [], replace=True)
    _, dropped = router.route([("a:b", b"1"), ("c", b"2")] + [("a", b'"' + b"x" * 40 + b'"')] * 3, 1)
    assert len(fast.outbox) == 4  # a:b once although it matches two keys, plus three a's
    assert dropped == 2 and slow.dropped == 2  # 100-byte outbox holds only the first two
    message, count = fast.take(1 << 20, 7, 5, 0.0)
    decoded = pb.EventBatch.FromString(message)
    assert count == 4 and len(decoded.events) == 4 and decoded.interest_applied == 1
    assert [e.seq for e in decoded.events] == [1, 3, 4, 5] and (decoded.epoch, decoded.head) == (7, 5)
    assert not decoded.gap
    router.update_interest(fast, [], ["a", "a:b"], replace=False)
    assert router.route([("a", b'"' + b"x" * 40 + b'"')], 6) == (0, 1)  # only slow wants it, and it is full
    assert pb.EventBatch.FromString(slow.take(1 << 20, 7, 6, 0.0)[0]).gap  # the proxy is told it lost events
    assert router.route([("a", b"1")], 7) == (1, 0)
    router.detach(fast)
    router.detach(slow)
    assert router.route([("a", b"1")], 8) == (0, 0)


@pytest.mark.parametrize("n_events", [1, 64])
async def test_hub_groups_encode_once_and_drop_slow(n_events: int) -> None:
    changes: list[tuple[set[str], set[str]]] = []
    hub = Hub()
    hub.on_interest_change(lambda add, rem: changes.append((add, rem)))
    subs = [PlasmaProbe(FakeCall(), 10_000) for _ in range(3)]
    tiny = PlasmaProbe(FakeCall(unsent=1), 0)  # already behind: nothing more fits
    for s in subs:
        hub.add(s, ["x"])
    hub.add(tiny, ["x"])
    assert changes == [({"x"}, set())]
    delivered = hub.dispatch([Event("x:y", b"1")] * n_events)
    assert delivered == 3 * n_events
    for s in subs:
        assert [stream_pb2.Payload.FromString(m).data for m in unframe(s.call.sent)] == ["1"] * n_events
    assert not tiny.call.sent
    assert tiny.closed.done() and tiny.closed.result() == "slow" and hub.slow_dropped == 1
    assert PlasmaProbe.encodes == 1  # one encoding for the whole group
    for s in subs:
        hub.remove(s)
    assert changes[-1] == (set(), {"x"}) and hub.topics() == set()
    PlasmaProbe.encodes = 0


def unframe(data: bytes) -> list[bytes]:
    """The messages of a gRPC stream's framed bytes."""
    out = []
    while data:
        assert data[0] == 0
        size = int.from_bytes(data[1:5], "big")
        out.append(data[5:5 + size])
        data = data[5 + size:]
    return out


class FakeCall:
    """A gRPC call whose client takes nothing: everything sent stays unsent."""

    def __init__(self, unsent: int = 0) -> None:
        self.ended, self.unsent, self.sent = False, unsent, b""

    def send(self, data: bytes) -> None:
        self.sent += data
        self.unsent += len(data)


class PlasmaProbe(PlasmaSubscriber):
    encodes = 0

    @staticmethod
    def encode(batch, indices):  # type: ignore[no-untyped-def]
        PlasmaProbe.encodes += 1
        return PlasmaSubscriber.encode(batch, indices)


@given(holdings=st.dictionaries(st.integers(0, 5), st.sets(topic_st, max_size=4), max_size=6), topic=topic_st)
def test_topic_index_matches_each_holder_once(holdings: dict[int, set[str]], topic: str) -> None:
    index: TopicIndex[int] = TopicIndex()
    wanted: set[str] = set()
    for holder, topics in holdings.items():
        assert index.add(holder, topics) == topics - wanted
        wanted |= topics
    expected = {h for h, topics in holdings.items() if any(matches(t, topic) for t in topics)}
    assert set(index.matching(topic)) == expected
    for holder, topics in holdings.items():
        index.remove(holder, topics)
    assert index.topics() == set() and not index.matching(topic)


def test_dispatch_pauses_grow_while_the_loop_is_behind_and_shrink_once_it_keeps_up() -> None:
    linger, most, share = 0.005, 0.05, 0.25
    # Keeping up: rounds may take a quarter of the time, never pausing longer than linger.
    assert pause(0.001, 0.0, linger, linger, most, share) == (pytest.approx(0.003), linger)
    assert pause(0.01, 0.0, linger, linger, most, share) == (linger, linger)
    # Behind (ran 20 ms late): the ceiling doubles each time, up to the most, and is waited in full.
    ceiling, pauses = linger, []
    for _ in range(5):
        wait, ceiling = pause(0.001, 0.02 + ceiling, ceiling, linger, most, share)
        pauses.append(wait)
    assert pauses == pytest.approx([0.01, 0.02, 0.04, 0.05, 0.05])
    # Keeping up again: the ceiling halves back to linger.
    ceilings = []
    for _ in range(5):
        _, ceiling = pause(0.0001, 0.0, ceiling, linger, most, share)
        ceilings.append(ceiling)
    assert ceilings == pytest.approx([0.025, 0.0125, 0.00625, 0.005, 0.005])
    # linger 0 never lingers, however late; a most below linger does not shrink linger.
    assert pause(0.01, 1.0, 0.0, 0.0, most, share) == (0.0, 0.0)
    assert pause(0.01, 1.0, 0.1, 0.1, 0.05, share)[1] == pytest.approx(0.1)


@pytest.mark.parametrize("turns", [0, 1, 2])
async def test_a_wait_on_a_signal_is_cancelled_even_as_the_signal_comes(turns: int) -> None:
    """A waiter cancelled just after a notify (the event set, the waiter not yet resumed) ends cancelled:
    asyncio.wait_for on Python 3.11 returned instead, and the waiter waited again (a resuming subscriber
    whose client had left stayed in the hub)."""
    signal = Signal()
    waiter = asyncio.ensure_future(signal.wait_until(lambda: False, 30))
    await asyncio.sleep(0)
    signal.notify()
    for _ in range(turns):
        await asyncio.sleep(0)
    waiter.cancel()
    done, _ = await asyncio.wait({waiter}, timeout=5)
    assert done and waiter.cancelled()


async def test_a_signal_wakes_only_waiters_whose_predicate_holds_a_few_per_pass() -> None:
    """A notify wakes no waiter whose predicate does not hold (the signal checks it: no task step), and those
    whose predicate holds at most WAKES_PER_PASS per pass of the loop, the longest waiting first (a thousand
    resumes reading one replay, or waiting for the links to settle, used to wake in one pass: 20-40 ms)."""
    loop = asyncio.get_running_loop()
    signal, ready, passes = Signal(), [False], [0]
    steps = {"ready": 0, "idle": 0}  # predicate calls made by waiting tasks themselves
    woken_at: list[int] = []

    def predicate(kind: str) -> bool:
        if asyncio.current_task() is not None:
            steps[kind] += 1
        return kind == "ready" and ready[0]

    async def wait(kind: str) -> None:
        assert await signal.wait_until(lambda: predicate(kind), 30)
        woken_at.append(passes[0])

    def tick() -> None:
        passes[0] += 1
        if not stop.done():
            loop.call_soon(tick)

    stop = loop.create_future()
    idle = [asyncio.ensure_future(wait("idle")) for _ in range(50)]
    waiters = [asyncio.ensure_future(wait("ready")) for _ in range(5 * WAKES_PER_PASS)]
    await asyncio.sleep(0)
    assert signal.waiting == 50 + 5 * WAKES_PER_PASS and steps == {"ready": 5 * WAKES_PER_PASS, "idle": 50}
    ready[0] = True
    tick()
    signal.notify()
    await asyncio.wait_for(asyncio.gather(*waiters), 10)
    stop.set_result(None)
    per_pass = [woken_at.count(p) for p in sorted(set(woken_at))]
    assert max(per_pass) <= WAKES_PER_PASS and sum(per_pass) == 5 * WAKES_PER_PASS, per_pass
    assert len(per_pass) >= 5
    assert steps["idle"] == 50, "a waiter whose predicate did not hold was woken"
    assert signal.waiting == 50
    for task in idle:
        task.cancel()
    await asyncio.gather(*idle, return_exceptions=True)
    assert signal.waiting == 0


async def test_a_signal_wait_times_out_and_a_failing_predicate_reaches_its_waiter() -> None:
    signal = Signal()
    assert not await signal.wait_until(lambda: False, 0.05)
    assert signal.waiting == 0
    state = {"fail": False}

    def predicate() -> bool:
        if state["fail"]:
            raise ValueError("broken predicate")
        return False

    waiter = asyncio.ensure_future(signal.wait_until(predicate, 30))
    await asyncio.sleep(0)
    state["fail"] = True
    signal.notify()
    with pytest.raises(ValueError, match="broken predicate"):
        await asyncio.wait_for(waiter, 5)


# -- SseReader: the client side of sse_frame, as an EventSource reads it ------------------------------


STREAM = (b": heartbeat\n\nretry: 250\r\n\n" + sse_frame(b"tok-1", Event("a", b'{"n":1}'))
          + sse_gap("gone") + b"data: x\ndata: y\n\n" + b"id: tok-2\n\n" + b"id: bad\0id\ndata: z\n\n")


def test_sse_reader_reads_what_the_proxy_writes_however_the_bytes_are_split() -> None:
    expected = [SseMessage("", '{"meta":{"type":"a"},"data":{"n":1}}', "tok-1"),
                SseMessage("neoplasma-gap", '{"reason": "gone"}', None),
                SseMessage("", "x\ny", None),  # data lines joined; an event without id: keeps the last one
                SseMessage("", "", "tok-2"),  # no data: a browser dispatches nothing, but takes the id
                SseMessage("", "z", None)]  # an id holding NUL is ignored (the HTML spec)
    for cut in range(len(STREAM) + 1):
        reader = SseReader("tok-0")
        got = reader.feed(STREAM[:cut]) + reader.feed(STREAM[cut:])
        assert got == expected, cut
        assert (reader.last_id, reader.retry, reader.comments) == ("tok-2", 250, [": heartbeat"])


def test_sse_reader_keeps_the_last_id_until_an_event_ends() -> None:
    reader = SseReader("tok-0")
    assert reader.feed(b"id: tok-1\ndata: half") == []
    assert reader.last_id == "tok-0"  # a cut before the blank line: the event never happened
    assert reader.feed(b"\n\n") == [SseMessage("", "half", "tok-1")] and reader.last_id == "tok-1"


async def test_cancels_ends_tasks_a_few_per_pass_of_the_loop_in_order() -> None:
    # A thousand subscribers leaving together: their catch-ups are wound down behind other work, not in one pass.
    cancels = Cancels(per_pass=10)
    tasks = [asyncio.create_task(asyncio.sleep(60)) for _ in range(35)]
    finished = asyncio.get_running_loop().create_future()
    finished.set_result(None)
    cancels.cancel(finished)  # (one already done: nothing to do)
    for task in tasks:
        cancels.cancel(task)
    assert len(cancels) == 35 and not any(t.done() for t in tasks)
    patterns = []
    for _ in range(20):
        await asyncio.sleep(0)
        pattern = [t.cancelled() for t in tasks]
        if not patterns or pattern != patterns[-1]:
            patterns.append(pattern)
        if all(pattern):
            break
    counts = [sum(p) for p in patterns]
    assert counts[-1] == 35 and len(cancels) == 0
    assert all(later - earlier <= 10 for earlier, later in zip([0, *counts], counts, strict=False)) and len(counts) >= 4
    assert all(p == sorted(p, reverse=True) for p in patterns)  # in the order given
