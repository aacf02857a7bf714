"""Version 3 resume tokens and the checkpoints they are relative to (docs/resume.md, "Checkpoints"): the encoding,
the brokers' store, and resumes through real broker and proxy processes on 127.0.0.1 (exactly once, or the gap
signal then live)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import random
import time
import tracemalloc
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from harness import AUTH, EventSource, Publisher, counters, wait_for
from test_resume import (
    CLUSTER,
    NativeClient,
    Recorder,
    all_subscribed,
    gap_then_live,
    grpc_addresses,
    in_process_broker,
    members,
    push,
    wait_until_true,
)

from neoplasma.broker.server import Broker
from neoplasma.core.events import Event
from neoplasma.core.membership import Member, Snapshot
from neoplasma.core.resume import (
    CHECKPOINT_BASE_OVERHEAD,
    CHECKPOINT_OVERHEAD,
    MAX_CHECKPOINT_BROKERS,
    MAX_CHECKPOINTS_PER_INSTANCE,
    MIN_INSTANCE,
    SHORTEST_BELOW,
    Checkpoint,
    CheckpointStore,
    InvalidToken,
    advance,
    cluster_tag,
    decode_token,
    encode_token,
    parse_token,
    tokens_after,
)
from neoplasma.core.trust import PLAIN
from neoplasma.proxy.hub import Hub
from neoplasma.proxy.links import LinkSet
from neoplasma.wire.v1 import neoplasma_pb2 as pb
from neoplasma.wire.v1 import neoplasma_pb2_grpc as pb_grpc

TAG = cluster_tag(CLUSTER)


# Brokers that start numbering at 200 and 250 million (as after days): version 3 tokens are shorter than version 2
# ones at 2 brokers then (a fresh cluster of fewer than SHORTEST_BELOW brokers may get version 2: the shorter).
DAYS_OLD = ({"NEOPLASMA_TEST_FIRST_SEQ": "200000000"}, {"NEOPLASMA_TEST_FIRST_SEQ": "250000000"})


def days_old_cluster(start: Any, proxies: int, *proxy_args: str) -> tuple[list[Any], list[Any]]:
    bs = [start("broker", f"b{i}", env=DAYS_OLD[i]) for i in range(2)]
    return bs, [start("proxy", f"p{i}", "--drain-retry-ms", "100", *proxy_args) for i in range(proxies)]


def version(token: str) -> int:
    return base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))[0]


def lookup(*checkpoints: Checkpoint) -> Any:
    kept = {(c.instance, c.counter): c for c in checkpoints}
    return lambda instance, counter: kept.get((instance, counter))


def test_version_3_round_trips_with_advances_and_brokers_not_in_the_checkpoint() -> None:
    rng = random.Random(3)
    for _ in range(200):
        n = rng.randint(1, 60)
        epochs = rng.sample(range(1, 2**32), n + 3)
        base = {e: rng.choice([0, rng.randint(1, 2**63)]) for e in epochs[:n]}
        checkpoint = Checkpoint.of(rng.randint(MIN_INSTANCE, 2**24 - 1), rng.randint(1, 2**40), base)
        now = {e: s + rng.choice([0, 1, rng.randint(0, 10**6)]) for e, s in base.items()}
        now.update({e: rng.randint(1, 2**64 - 1) for e in epochs[n:n + rng.randint(0, 3)]})  # joined since
        token = encode_token(TAG, now, checkpoint).decode()
        v2 = encode_token(TAG, now).decode()
        assert token.startswith("A") and (version(token) == 3 or (len(now) < SHORTEST_BELOW and token == v2))
        assert len(token) <= len(v2) or len(now) >= SHORTEST_BELOW
        assert decode_token(token, TAG, now, lookup(checkpoint)) == now
        assert decode_token(v2, TAG, now) == now  # version 2 still (brokers whose marks collide included)
        if version(token) == 3:
            with pytest.raises(InvalidToken):  # not resolvable without its checkpoint
                decode_token(token, TAG, now)
            other = checkpoint._replace(seqs=(*checkpoint.seqs, 1), epochs=(*checkpoint.epochs, 7))
            with pytest.raises(InvalidToken):  # a checkpoint that does not fit it
                decode_token(token, TAG, now, lookup(other))
            wrong = checkpoint._replace(seqs=(checkpoint.seqs[0] + 1, *checkpoint.seqs[1:]))
            with pytest.raises(InvalidToken):  # another one under its name (another process's of its instance)
                decode_token(token, TAG, now, lookup(wrong))
        with pytest.raises(InvalidToken):  # another cluster's
            decode_token(token, cluster_tag("elsewhere"), now, lookup(checkpoint))


def test_tokens_after_a_run_of_events_are_each_as_encode_token_makes_it() -> None:
    """tokens_after makes a run of one broker's tokens from a prefix made once (`_SeqTail`): each is the token
    encode_token makes for the position after that event, whichever version it is, across brokers overtaking
    each other, ties, epoch 0, brokers new to the position and positions crossing a checkpoint."""
    rng = random.Random(5)
    for _ in range(300):
        epochs = rng.sample(range(1, 2**32), rng.randint(1, 9))
        start = {e: rng.choice([0, rng.randint(1, 1000)]) for e in epochs if rng.random() < 0.8}
        checkpoint = None if rng.random() < 0.3 else Checkpoint.of(
            rng.randint(MIN_INSTANCE, 2**24 - 1), rng.randint(1, 2**40),
            {e: rng.randint(0, 1200) for e in rng.sample(epochs, rng.randint(1, len(epochs)))})
        events, seqs = [], dict(start)
        for _ in range(rng.randint(1, 60)):
            epoch = rng.choice([*epochs, 0]) if rng.random() < 0.3 else (events[-1].epoch if events else epochs[0])
            seqs[epoch] = seqs.get(epoch, 0) + rng.choice([0, 1, 1, 2, rng.randint(1, 400)])
            events.append(Event("t", b"1", epoch, seqs[epoch]))
        wanted = None if rng.random() < 0.5 else set(rng.sample(range(len(events)), rng.randint(1, len(events))))
        position, expected = dict(start), {}
        for i, event in enumerate(events):
            advance(position, (event.epoch,), (event.seq,))
            if wanted is None or i in wanted:
                expected[i] = encode_token(TAG, position, checkpoint)
        got = dict(start)
        assert tokens_after(TAG, got, events, wanted, checkpoint) == expected
        assert got == position


def test_version_3_falls_back_to_version_2_where_the_positions_are_not_past_the_checkpoint_or_it_is_shorter(
        ) -> None:
    base = {e: 10_000 * e for e in range(1, SHORTEST_BELOW + 1)}
    checkpoint = Checkpoint.of(MIN_INSTANCE, 5, base)
    assert version(encode_token(TAG, base, checkpoint).decode()) == 3
    assert version(encode_token(TAG, {**base, 1: 1}, checkpoint).decode()) == 2  # behind it (a catch-up's)
    assert version(encode_token(TAG, {e: s for e, s in base.items() if e != 1}, checkpoint).decode()) == 2  # retired
    few = Checkpoint.of(MIN_INSTANCE, 5, {1: 100, 2: 101})  # a fresh cluster of 2: version 2 is shorter
    assert version(encode_token(TAG, {1: 100, 2: 101}, few).decode()) == 2
    old = Checkpoint.of(MIN_INSTANCE, 5, {1: 200_000_000, 2: 250_000_000})  # days old: version 3 is
    assert version(encode_token(TAG, {1: 200_000_000, 2: 250_000_000}, old).decode()) == 3


def test_version_3_is_short_whatever_the_seqs_age_at_60_brokers() -> None:
    rng = random.Random(60)
    for low, high in ((1, 127), (200_000_000, 260_000_000)):
        base = {e: rng.randint(low, high) for e in rng.sample(range(1, 2**32), 60)}
        checkpoint = Checkpoint.of(MIN_INSTANCE + 1, 100_000, base)  # days of checkpoints at one a second
        moved = {e: s + rng.randint(0, 100) for e, s in base.items()}  # under load, a second since the checkpoint
        assert len(encode_token(TAG, moved, checkpoint)) <= 96  # 72 bytes: 12, then a byte per broker
        assert len(encode_token(TAG, base, checkpoint)) <= 27  # nothing moved since: 12 bytes and a bitmap of 0s
        quiet = {e: s + (k < 5) for k, (e, s) in enumerate(base.items())}  # idle: a few brokers moved
        token = encode_token(TAG, quiet, checkpoint)
        assert len(token) <= 34 and decode_token(token.decode(), TAG, quiet, lookup(checkpoint)) == quiet
        assert len(encode_token(TAG, moved)) > 240  # version 2


def test_advances_go_dense_or_sparse_whichever_is_shorter_and_must_fill_the_checkpoint_exactly() -> None:
    rng = random.Random(8)
    for _ in range(500):
        n = rng.randint(1, 70)
        base = {e: rng.randint(0, 2**40) for e in rng.sample(range(1, 2**32), n)}
        checkpoint = Checkpoint.of(MIN_INSTANCE, 9, base)
        moved = rng.random()
        now = {e: s + (rng.choice([1, 200, 10**6]) if rng.random() < moved else 0) for e, s in base.items()}
        token = encode_token(TAG, now, checkpoint).decode()
        assert decode_token(token, TAG, now, lookup(checkpoint)) == now
        if version(token) == 3:
            fewer = Checkpoint.of(MIN_INSTANCE, 9, dict(list(base.items())[:-1])) if n > 1 else None
            more = Checkpoint.of(MIN_INSTANCE, 9, {**base, 5: 0} if 5 not in base else base)
            for wrong in (fewer, more):
                if wrong is not None and wrong != checkpoint:
                    with pytest.raises(InvalidToken):
                        decode_token(token, TAG, now, lookup(wrong))


def test_garbage_version_3_tokens_raise_only_invalid_token() -> None:
    rng = random.Random(33)
    good = encode_token(TAG, {1: 5, 2: 9}, Checkpoint.of(MIN_INSTANCE, 1, {1: 5})).decode()
    raw = base64.urlsafe_b64decode(good + "=" * (-len(good) % 4))
    for _ in range(2000):
        tail = bytes(rng.randrange(256) for _ in range(rng.randint(0, 12)))
        mutated = bytearray(raw[:rng.randint(0, len(raw))]) + tail
        if mutated:
            mutated[0] = 3
        token = base64.urlsafe_b64encode(bytes(mutated)).rstrip(b"=").decode()
        try:
            parsed = parse_token(token, TAG)
            if parsed.checkpoint is not None:
                parsed.completed(Checkpoint.of(MIN_INSTANCE, 1, {1: 5})).resolve({1, 2})
        except InvalidToken:
            pass


def test_a_hub_issues_version_2_until_its_checkpoint_is_stored_and_none_after_it_drew_another_instance() -> None:
    hub = Hub()
    hub.positions.update({e: 200_000_000 + e for e in range(1, 11)})
    assert hub.make_checkpoint() is None  # its instance is not confirmed: brokers would not store under it
    hub.confirm(hub.instance)
    made = hub.make_checkpoint()
    assert made is not None and hub.make_checkpoint() is None  # (nothing moved since)
    assert version(hub.token().decode()) == 2  # not stored by every broker yet
    hub.use_checkpoint(made)
    assert version(hub.token().decode()) == 3 and hub.known_checkpoint(made.instance, made.counter) == made
    hub.redraw(hub.instance)
    assert hub.checkpoint is None and version(hub.token().decode()) == 2
    assert hub.known_checkpoint(made.instance, made.counter) == made  # its tokens still resolve here


def test_the_store_bounds_by_age_bytes_and_count_and_refuses_what_no_proxy_makes() -> None:
    rng = random.Random(5)
    per = 60 + CHECKPOINT_OVERHEAD  # 60 brokers, each advanced by less than 128 since the base
    base = 12 * 60 + CHECKPOINT_BASE_OVERHEAD
    store = CheckpointStore(max_age=300, max_bytes=100 * per + 2 * base)
    vector = {e: e * 1000 for e in range(1, 61)}
    made = {}
    for k in range(1, 151):  # 150 of one instance: the oldest go by bytes
        vector = {e: s + rng.randint(0, 1) for e, s in vector.items()}
        made[k] = Checkpoint.of(MIN_INSTANCE, k, vector)
        store.put(made[k], nonce=7, now=k)
        assert store.bytes <= store.max_bytes
    kept = [k for k in made if store.get(MIN_INSTANCE, k, 150) is not None]
    assert kept == list(range(151 - len(kept), 151)) and 90 <= len(kept) <= 100 and len(store) == len(kept)
    assert all(store.get(MIN_INSTANCE, k, 150) == made[k] for k in kept)  # exactly what was registered
    assert store.get(MIN_INSTANCE, 149, 149 + 300.5) is None  # too old, even before it is evicted
    store.evict(149 + 300.5)
    assert len(store) == 1 and store.bytes == per + base
    store.put(made[150], nonce=7, now=451)  # the same again (a reconnect): fine
    with pytest.raises(ValueError, match="other positions"):
        store.put(Checkpoint.of(MIN_INSTANCE, 150, {1: 1}), nonce=7, now=451)
    store.put(Checkpoint.of(MIN_INSTANCE, 1, {1: 1}), nonce=8, now=452)  # another process holds the instance now
    assert store.get(MIN_INSTANCE, 150, 452) is None and len(store) == 1
    assert store.bytes == 1 + CHECKPOINT_OVERHEAD + 12 + CHECKPOINT_BASE_OVERHEAD
    store.evict(10**6)
    assert len(store) == 0 and store.bytes == 0  # what it counts goes with what it holds
    bad = [Checkpoint(MIN_INSTANCE, 1, (1, 2), (3,)), Checkpoint(MIN_INSTANCE, 0, (1,), (3,)),
           Checkpoint(5, 1, (1,), (3,)), Checkpoint(MIN_INSTANCE, 1, (0,), (3,)),
           Checkpoint(MIN_INSTANCE, 1, (1, 1), (3, 4)),
           Checkpoint(MIN_INSTANCE, 1, (1,), (2**64,)),
           Checkpoint.of(MIN_INSTANCE, 1, {e: 1 for e in range(1, MAX_CHECKPOINT_BROKERS + 2)})]
    for checkpoint in bad:
        with pytest.raises(ValueError):
            store.put(checkpoint, nonce=8, now=355)
    with pytest.raises(ValueError, match="nonce"):
        store.put(Checkpoint.of(MIN_INSTANCE, 2, {1: 1}), nonce=0, now=355)
    many = CheckpointStore(max_age=10**9, max_bytes=1 << 40)
    for k in range(1, MAX_CHECKPOINTS_PER_INSTANCE + 11):
        many.put(Checkpoint.of(MIN_INSTANCE, k, {1: k}), nonce=1, now=k)
    assert many.get(MIN_INSTANCE, 10, 0) is None and many.get(MIN_INSTANCE, 11, 0) is not None
    assert len(many) == MAX_CHECKPOINTS_PER_INSTANCE
    many.evict(10**10)
    assert len(many) == 0 and many.bytes == 0  # what those dropped by count counted went with them


@dataclasses.dataclass
class Plane:
    """Brokers served in this process and a proxy's hub and links on the first two, registering checkpoints."""

    brokers: list[tuple[Broker, grpc.aio.Server, str]]
    hub: Hub
    links: LinkSet
    checkpoints: asyncio.Task[None]

    def apply(self, version: int, count: int) -> Any:
        return self.links.apply(Snapshot(version, tuple(Member(f"b{i}", self.brokers[i][2]) for i in range(count)),
                                         CLUSTER))


@contextlib.asynccontextmanager
async def checkpointing(monkeypatch: pytest.MonkeyPatch, brokers: int,
                        refusing: int | None = None) -> AsyncIterator[Plane]:
    """`brokers` brokers in this process, their seqs days old (broker `refusing` keeps no checkpoint); a proxy's hub
    (a subscriber of "x") and links settled on the first two, registering a checkpoint every 0.05 s."""
    served = []
    for i in range(brokers):
        monkeypatch.setenv("NEOPLASMA_TEST_FIRST_SEQ", str(200_000_000 + 50_000_000 * i))
        served.append(await in_process_broker(f"b{i}"))
    if refusing is not None:
        def refuse(*args: Any) -> None:
            raise ValueError("this broker keeps none")

        monkeypatch.setattr(served[refusing][0].checkpoints, "put", refuse)
    hub = Hub()
    hub.add(Recorder(), ["x"])
    links = LinkSet(hub, "p0", 1 << 20, PLAIN)
    dispatcher = asyncio.create_task(hub.run_dispatcher())
    plane = Plane(served, hub, links, asyncio.create_task(links.run_checkpoints(0.05)))
    try:
        await plane.apply(1, 2)
        assert await links.changed.wait_until(lambda: links.settled() and hub.issuing, 10)
        yield plane
    finally:
        plane.checkpoints.cancel()
        dispatcher.cancel()
        await links.close()
        for _, server, _ in served:
            await server.stop(None)


async def test_a_hub_registers_checkpoints_and_issues_version_3_once_every_connected_broker_stored_one(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """In process: a proxy's links register its checkpoint with both brokers; tokens turn version 3 only once both
    stored it, name a broker added after it explicitly, and resolve at each broker from its store."""
    async with checkpointing(monkeypatch, 3) as plane:
        brokers, hub, links = plane.brokers, plane.hub, plane.links
        for broker, _, _ in brokers[:2]:
            broker.accept([("x", b"1")], "publisher")
        assert await wait_until_true(lambda: hub.checkpoint is not None and len(hub.checkpoint.epochs) == 2)
        made = hub.checkpoint
        assert made is not None and set(made.epochs) == set(hub.positions)
        for broker, _, _ in brokers[:2]:  # both brokers hold exactly what the tokens are relative to
            assert broker.checkpoints.get(made.instance, made.counter, time.monotonic()) == made
        token = hub.token().decode()
        assert version(token) == 3
        assert decode_token(token, hub.tag, hub.positions, hub.known_checkpoint) == hub.positions
        # A broker added after the checkpoint: named explicitly until a checkpoint with it is stored everywhere.
        plane.checkpoints.cancel()
        await plane.apply(2, 3)
        assert await links.changed.wait_until(links.settled, 10)
        brokers[2][0].accept([("x", b"2")], "publisher")
        assert await hub.advanced.wait_until(lambda: len(hub.positions) == 3, 10)
        token = hub.token().decode()
        parsed = parse_token(token, hub.tag)
        assert version(token) == 3 and len(parsed.entries) == 1 and hub.checkpoint is made
        assert decode_token(token, hub.tag, hub.positions, hub.known_checkpoint) == hub.positions
        plane.checkpoints = asyncio.create_task(links.run_checkpoints(0.05))
        assert await wait_until_true(lambda: hub.checkpoint is not made)
        assert hub.checkpoint is not None and len(hub.checkpoint.epochs) == 3
        assert len(parse_token(hub.token().decode(), hub.tag).entries) == 0


async def test_a_checkpoint_one_connected_broker_refused_is_never_used(monkeypatch: pytest.MonkeyPatch) -> None:
    """In process: of two brokers, one stores the proxy's checkpoints and the other refuses them (as a broker that
    could not keep them would): the proxy registers them but keeps issuing version 2 tokens."""
    async with checkpointing(monkeypatch, 2, refusing=1) as plane:
        brokers, hub = plane.brokers, plane.hub
        for k in range(5):
            for broker, _, _ in brokers:
                broker.accept([("x", b"%d" % k)], "publisher")
            assert await wait_until_true(lambda k=k: len(brokers[0][0].checkpoints) > k)  # stored at b0 ...
        refused = brokers[1][0].metrics.checkpoint_registrations.labels("refused")._value.get()
        assert refused >= 5 and hub.proposed is not None  # ... refused at b1
        assert hub.checkpoint is None and version(hub.token().decode()) == 2


async def last_ids_are_version_3(clients: list[EventSource]) -> bool:
    return all(c.last_id and version(c.last_id) == 3 for c in clients)


async def test_kill9_of_a_proxy_issuing_version_3_tokens_its_clients_resume_at_another_exactly_once(start: Any) -> None:
    """The point of checkpoints against pointers: the issuing proxy dies (SIGKILL) and its clients, holding version 3
    tokens (SSE ids, the native stream's batch token), resume at another proxy, which resolves the checkpoint at a
    surviving broker: no loss, no duplicates."""
    bs, ps = days_old_cluster(start, 2)
    for p in ps:
        await push(p, 1, members(bs))
    target = {"proxy": ps[0]}
    browsers = [EventSource(lambda: target["proxy"].endpoints["http"], "t").start() for _ in range(10)]
    native = NativeClient(lambda: target["proxy"].endpoints["grpc"], ["t"])
    await wait_for(lambda: all_subscribed(ps[0], 11, 2), what="11 subscribers with interest applied")
    publisher = Publisher(grpc_addresses(bs)).start(interval=0.01)
    await wait_for(lambda: last_ids_are_version_3(browsers), timeout=20, what="version 3 ids")
    await wait_for(lambda: native.token and version(native.token) == 3, timeout=20, what="a version 3 batch token")
    target["proxy"] = ps[1]
    ps[0].proc.kill()
    ps[0].proc.wait()
    await wait_for(lambda: all_subscribed(ps[1], 11, 2), timeout=20, what="everyone back at p1")
    await asyncio.sleep(0.5)  # keep publishing while they are on p1
    await publisher.stop()
    clients = [*browsers, native]
    await wait_for(lambda: all(publisher.all_received(c.events) for c in clients), timeout=20,
                   what="every event at every client")
    for k, b in enumerate(browsers):
        publisher.assert_exactly_once_in_order(b.events, f"browser {k}")
        assert not b.gaps and set(b.statuses) == {200}
    publisher.assert_exactly_once_in_order(native.events, "native")
    assert native.gaps == 0
    resolved = await counters(ps[1].endpoints["http"], "neoplasma_proxy_checkpoint_resolves_total", "result")
    assert resolved["remote"] >= 1 and resolved["unresolved"] == 0, resolved  # others shared a lookup or the cache
    assert resolved["remote"] + resolved["local"] == 11, resolved
    for c in clients:
        await c.close()


async def test_a_broker_added_after_the_checkpoint_is_named_in_the_token_and_resumes_exactly(start: Any) -> None:
    """A broker that joined after the proxy's checkpoint is named in its version 3 tokens explicitly (mark and seq);
    the proxy killed while its clients hold such tokens, they resume at another proxy exactly once."""
    bs, ps = days_old_cluster(start, 2, "--checkpoint-seconds", "5")
    joined = start("broker", "b2", env={"NEOPLASMA_TEST_FIRST_SEQ": "300000000"})
    for p in ps:
        await push(p, 1, members(bs))
    target = {"proxy": ps[0]}
    browsers = [EventSource(lambda: target["proxy"].endpoints["http"], "t,u").start() for _ in range(5)]
    await wait_for(lambda: all_subscribed(ps[0], 5, 2), what="subscribers")
    publisher = Publisher(grpc_addresses(bs)).start(interval=0.02)
    await wait_for(lambda: last_ids_are_version_3(browsers), timeout=30, what="version 3 ids")
    for p in ps:
        await push(p, 2, members([*bs, joined]))
    await wait_for(lambda: all_subscribed(ps[0], 5, 3), timeout=20, what="the third broker linked")
    extra = Publisher([joined.endpoints["grpc"]], topic="u").start(interval=0.02)

    def named_explicitly() -> bool:
        return all(version(b.last_id) == 3 and parse_token(b.last_id, TAG).entries for b in browsers)

    await wait_for(named_explicitly, timeout=20, what="ids naming the new broker beside the checkpoint")
    target["proxy"] = ps[1]
    ps[0].proc.kill()
    ps[0].proc.wait()
    assert named_explicitly()  # what they come back with (EventSource waits 2 s before it reconnects)
    await wait_for(lambda: all_subscribed(ps[1], 5, 3), timeout=20, what="everyone back at p1")
    await publisher.stop()
    await extra.stop()
    await wait_for(lambda: all(len(b.events) >= sum(publisher.sent) + sum(extra.sent) for b in browsers),
                   timeout=20, what="every event")
    for k, b in enumerate(browsers):
        publisher.assert_exactly_once_in_order([e for e in b.events if e["meta"]["type"] == "t"], f"browser {k}")
        extra.assert_exactly_once_in_order([e for e in b.events if e["meta"]["type"] == "u"], f"browser {k}, b2")
        assert not b.gaps and set(b.statuses) == {200}
        await b.close()


async def test_an_unknown_checkpoint_gives_the_gap_signal_then_live_and_a_forged_query_is_not_found(
        start: Any) -> None:
    """A version 3 token whose checkpoint no broker holds (evicted, forged): the gap signal, then live (a 200)."""
    bs, ps = days_old_cluster(start, 2)
    for p in ps:
        await push(p, 1, members(bs))
    first = EventSource(lambda: ps[0].endpoints["http"], "t").start()
    await wait_for(lambda: all_subscribed(ps[0], 1, 2), what="the subscriber")
    publisher = Publisher(grpc_addresses(bs)).start(interval=0.02)
    await wait_for(lambda: last_ids_are_version_3([first]), timeout=20, what="a version 3 id")
    await publisher.stop()
    raw = bytearray(base64.urlsafe_b64decode(first.last_id + "=" * (-len(first.last_id) % 4)))
    raw[5] ^= 0x01  # another instance's
    forged = base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode()
    after = await gap_then_live(ps[1], bs[0], forged, "checkpoint")
    async with grpc.aio.insecure_channel(bs[0].endpoints["grpc"]) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await pb_grpc.BrokerStub(channel).Resolve(pb.ResolveRequest(instance=5, checkpoint=9), metadata=AUTH,
                                                      timeout=10)
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    for c in (first, after):
        await c.close()


async def test_a_version_2_token_still_resumes_exactly(start: Any) -> None:
    """A client holding a version 2 token (issued by a proxy without checkpoints, as before the upgrade) resumes
    exactly at a proxy that issues version 3, then gets version 3 ids."""
    bs, [old] = days_old_cluster(start, 1, "--checkpoint-seconds", "0")
    new = start("proxy", "p1")
    for p in (old, new):
        await push(p, 1, members(bs))
    target = {"proxy": old}
    browsers = [EventSource(lambda: target["proxy"].endpoints["http"], "t").start() for _ in range(5)]
    await wait_for(lambda: all_subscribed(old, 5, 2), what="subscribers")
    publisher = Publisher(grpc_addresses(bs)).start(interval=0.01)
    await wait_for(lambda: all(len(b.events) > 50 for b in browsers), timeout=20, what="events flowing")
    assert all(version(b.last_id) == 2 for b in browsers)
    target["proxy"] = new
    old.proc.kill()
    old.proc.wait()
    await wait_for(lambda: all_subscribed(new, 5, 2), timeout=20, what="everyone back at p1")
    await wait_for(lambda: last_ids_are_version_3(browsers), timeout=20, what="version 3 ids after")
    await publisher.stop()
    await wait_for(lambda: all(publisher.all_received(b.events) for b in browsers), timeout=20, what="every event")
    for k, b in enumerate(browsers):
        publisher.assert_exactly_once_in_order(b.events, f"browser {k}")
        assert not b.gaps
    for b in browsers:
        await b.close()


async def test_a_registration_no_proxy_makes_is_refused_with_the_reason(start: Any) -> None:
    """A checkpoint naming another instance than the stream's, or too many brokers, is refused (told back on the
    stream), never stored; the relay goes on."""
    [b] = [start("broker", "b0")]
    async with grpc.aio.insecure_channel(b.endpoints["grpc"]) as channel:
        call = pb_grpc.BrokerStub(channel).Relay(metadata=AUTH)
        await call.write(pb.Interest(add=["t"], replace=True, proxy="forger", instance=MIN_INSTANCE, nonce=5))
        first = await call.read()
        assert first.interest_applied == 1
        await call.write(pb.Interest(checkpoint=pb.Checkpoint(instance=MIN_INSTANCE + 1, counter=1, epochs=[1],
                                                              seqs=[1])))
        refused = await call.read()
        assert "instance" in refused.checkpoint_refused and not refused.checkpoint_stored
        big = MAX_CHECKPOINT_BROKERS + 1
        await call.write(pb.Interest(checkpoint=pb.Checkpoint(instance=MIN_INSTANCE, counter=1,
                                                              epochs=range(1, big + 1), seqs=[1] * big)))
        refused = await call.read()
        assert "brokers" in refused.checkpoint_refused
        await call.write(pb.Interest(checkpoint=pb.Checkpoint(instance=MIN_INSTANCE, counter=2, epochs=[1, 2],
                                                              seqs=[10, 20])))
        stored = await call.read()
        assert stored.checkpoint_stored == 2 and not stored.checkpoint_refused
        reply = await pb_grpc.BrokerStub(channel).Resolve(pb.ResolveRequest(instance=MIN_INSTANCE, checkpoint=2),
                                                          metadata=AUTH, timeout=10)
        assert list(reply.checkpoint.epochs) == [1, 2] and list(reply.checkpoint.seqs) == [10, 20]
        call.cancel()


def test_the_store_holds_what_it_counts_at_60_brokers() -> None:
    """Checkpoints of 60 brokers, one a second from each of 20 proxy processes for 300 s (a broker's retention), at
    1000 events/s per broker: what the store counts is what it holds (its Python objects measured) within 20 %, and
    about 0.4 KB a checkpoint (docs/resume.md)."""
    store = CheckpointStore(max_age=360.0, max_bytes=1 << 30)
    rng = random.Random(1)
    epochs = rng.sample(range(1, 2**32), 60)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for second in range(300):
            for proxy in range(20):
                vector = {e: 200_000_000 + 1000 * second + rng.randint(0, 999) for e in epochs}
                store.put(Checkpoint.of(MIN_INSTANCE + proxy, second + 1, vector), nonce=proxy + 1, now=second)
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(store) == 6000
    assert 0.8 * store.bytes <= held <= 1.2 * store.bytes, (store.bytes, held, held / len(store))
    assert store.bytes / len(store) < 500, store.bytes / len(store)


def test_the_store_gives_back_exactly_what_was_registered_and_its_count_closes_after_random_operations() -> None:
    rng = random.Random(7)
    store = CheckpointStore(max_age=50, max_bytes=40_000)
    registered: dict[tuple[int, int], Checkpoint] = {}
    nonces = {MIN_INSTANCE + i: 1 for i in range(4)}
    vectors = {instance: {e: rng.randint(0, 1000) for e in range(1, 11)} for instance in nonces}
    counters = dict.fromkeys(nonces, 0)
    hits = 0
    for now in range(2000):
        instance = rng.choice(list(nonces))
        vector = vectors[instance]
        roll = rng.random()
        if roll < 0.05:  # another process takes the instance over
            nonces[instance] += 1
        elif roll < 0.1:  # a broker restarted: another epoch
            del vector[rng.choice(list(vector))]
            vector[rng.randint(11, 2**32 - 1)] = 0
        elif roll < 0.15:  # a position behind (never from one proxy; from a process that took it over, maybe)
            vector[rng.choice(list(vector))] //= 2
        for e in vector:
            vector[e] += rng.choice([0, 1, 300, 70_000])
        counters[instance] += 1
        made = Checkpoint.of(instance, counters[instance], vector)
        store.put(made, nonces[instance], now)
        registered[instance, counters[instance]] = made
        assert store.bytes <= store.max_bytes
        for (i, c), checkpoint in rng.sample(list(registered.items()), min(5, len(registered))):
            found = store.get(i, c, now)
            assert found is None or found == checkpoint
            hits += found is not None
    assert len(store) > 0 and hits > 500, hits
    store.evict(10**9)
    assert len(store) == 0 and store.bytes == 0
