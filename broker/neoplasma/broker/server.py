"""The broker process: gRPC (Publish, Relay, Stats, health) and HTTP (publish, health, metrics)."""

from __future__ import annotations

import asyncio
import os
import random
import re
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import grpc
from aiohttp import web
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from neoplasma.broker.routing import InstanceTaken, RelayStream, Router
from neoplasma.broker.settings import BrokerConfig
from neoplasma.core.aio import Pace, Turns, wait_event_or_task
from neoplasma.core.events import (
    Checked,
    InvalidEvent,
    RequestTooLarge,
    batch_trailer,
    check_publish_body,
    make_events,
)
from neoplasma.core.logs import get_logger
from neoplasma.core.metrics import LATENCY_BUCKETS
from neoplasma.core.net import HttpServer, add_grpc_port, bind_socket, hostport, identity
from neoplasma.core.resume import (
    MAX_TOKEN_CHARS,
    Checkpoint,
    CheckpointStore,
    InvalidToken,
    ReplayWalk,
    RetentionLog,
    parse_pointer,
)
from neoplasma.core.topics import InvalidTopic, LimitExceeded, check_topic
from neoplasma.core.trust import (
    CREDENTIAL_REQUIRED,
    Guard,
    Rule,
    Tokens,
    grpc_server_credentials,
    http_ssl_context,
    refusal_code,
    refuse,
    server_tls,
)
from neoplasma.core.workers import Offload
from neoplasma.wire.v1 import neoplasma_pb2 as pb
from neoplasma.wire.v1 import neoplasma_pb2_grpc as pb_grpc

log = get_logger("broker")

SERVICE_NAME = "neoplasma.v1.Broker"
# Publish bodies larger than this are checked on a worker thread: the event loop (health, other
# publishers, relay streams) then stalls for at most the body's one orjson.loads (~30 ms at 16 MiB)
# instead of the whole check (~160 ms over HTTP, ~45 ms over gRPC at 16 MiB; bench/ingest_stall.py).
OFF_LOOP_BYTES = 256 * 1024
# With --workers N > 1, publish requests of at least this many bytes are checked by the N - 1 other
# processes (neoplasma.core.workers.Offload) while this one serves; smaller ones cost less inline.
OFFLOAD_BYTES = 4096
JSON_TYPE = re.compile(r"application/([\w.+-]+\+)?json")


# Why a publish was refused (the label of neoplasma_broker_publish_refusals_total).
REFUSALS = ("invalid", "too_large", "unauthenticated", "draining", "media_type")


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.publish_duration = Histogram(
            "neoplasma_broker_publish_duration_seconds", "Publish requests accepted: from the request's arrival "
            "(its handler starting) to its events being accepted, by transport", ["transport"],
            buckets=LATENCY_BUCKETS, registry=r)
        self.refusals = Counter("neoplasma_broker_publish_refusals", "Publish requests refused, by reason",
                                ["reason"], registry=r)
        for reason in REFUSALS:
            self.refusals.labels(reason)
        for transport in ("grpc", "http"):
            self.publish_duration.labels(transport)
        self.retention_limit_bytes = Gauge("neoplasma_broker_retention_limit_bytes",
                                           "Most bytes retained (--retention-bytes)", registry=r)
        self.retention_oldest_age = Gauge("neoplasma_broker_retention_oldest_event_age_seconds",
                                          "Age of the oldest retained event: how far back subscribers can "
                                          "resume (0: nothing retained)", registry=r)
        self.retention_limit_seconds = Gauge("neoplasma_broker_retention_limit_seconds",
                                             "Longest an event is retained (--retention-seconds)", registry=r)
        self.relay_backlog_max = Gauge("neoplasma_broker_relay_backlog_max_bytes",
                                       "Bytes queued for the most backed-up relay stream (one per proxy)",
                                       registry=r)
        self.draining = Gauge("neoplasma_broker_draining", "1 while the broker drains (refusing publishes)",
                              registry=r)
        self.events_in = Counter("neoplasma_broker_events_in", "Events accepted", registry=r)
        self.events_out = Counter("neoplasma_broker_events_out", "Deliveries queued to relay streams",
                                  registry=r)
        self.events_dropped = Counter("neoplasma_broker_events_dropped", "Deliveries dropped: relay outbox full",
                                      registry=r)
        self.events_rejected = Counter("neoplasma_broker_events_rejected", "Published events refused as invalid",
                                       registry=r)
        self.relay_streams = Gauge("neoplasma_broker_relay_streams", "Open relay streams", registry=r)
        self.publishers = Gauge("neoplasma_broker_publishers", "Publishers seen within the activity window", registry=r)
        self.outbox_bytes = Gauge("neoplasma_broker_outbox_bytes", "Bytes queued for relay streams", registry=r)
        self.replays = Counter("neoplasma_broker_replays", "Replay calls served (resuming subscribers' catch-up)",
                               registry=r)
        self.replayed_bytes = Counter("neoplasma_broker_replayed_bytes", "Bytes of retained events Replay calls sent",
                                      registry=r)
        self.replays_refused = Counter("neoplasma_broker_replays_refused", "Replay calls refused: over the budget",
                                       registry=r)
        self.retained_bytes = Gauge("neoplasma_broker_retained_bytes",
                                    "Bytes held by retention for resuming subscribers", registry=r)
        self.retained_events = Gauge("neoplasma_broker_retained_events", "Events held by retention", registry=r)
        self.checkpoints = Gauge("neoplasma_broker_checkpoints", "Proxies' checkpoints stored (version 3 tokens)",
                                 registry=r)
        self.checkpoint_bytes = Gauge("neoplasma_broker_checkpoint_bytes",
                                      "Bytes counted for stored checkpoints (at most --checkpoint-bytes)", registry=r)
        self.checkpoint_registrations = Counter("neoplasma_broker_checkpoint_registrations",
                                                "Checkpoints proxies registered, by outcome", ["outcome"],
                                                registry=r)
        self.checkpoint_lookups = Counter("neoplasma_broker_checkpoint_lookups",
                                          "Checkpoints asked for by resuming proxies (Resolve), by outcome",
                                          ["outcome"], registry=r)
        for outcome in ("stored", "refused"):
            self.checkpoint_registrations.labels(outcome)
        for outcome in ("found", "not_found"):
            self.checkpoint_lookups.labels(outcome)


# Seconds a replay or backfill walks retention (and encodes what it finds) before it lets the broker's loop
# serve others: relay streams' live events wait at most about this long behind any one walk.
REPLAY_SLICE = 0.002
# Seconds' worth of --replay-events-per-second that Replays may walk at once after walking none for a while: a burst
# of resumes (a thousand forged ones) starts at the steady rate, not with a whole second of walking at full speed.
REPLAY_BURST = 0.1
# A Replay's messages hold at most this much (or --max-message-bytes when smaller): a proxy turns each into
# objects in one go, and keeps up to 16 of them for a shared replay's readers.
REPLAY_MESSAGE_BYTES = 256 * 1024
# Pointer ids (docs/resume.md, "Pointer ids"): a Resolve call waits this long for the issuing proxy's answer, and a
# relay stream carries at most this many unanswered queries (a Resolve finding every stream of the instance full is
# refused with RESOURCE_EXHAUSTED).
RESOLVE_TIMEOUT = 2.0
# Seconds a checkpoint is kept beyond --retention-seconds.
CHECKPOINT_SLACK = 60.0
MAX_QUERIES_PER_STREAM = 64


class Broker:
    """State shared by the gRPC and HTTP faces of one broker."""

    def __init__(self, config: BrokerConfig) -> None:
        self.config = config
        self.router = Router()
        self.metrics = Metrics()
        self.draining = False
        self.closing = False  # drained: relay streams send their last head and end
        self.epoch = random.randint(1, 2**32 - 1)
        # The last seq stamped in this epoch. NEOPLASMA_TEST_FIRST_SEQ (test and benchmark only, not a setting) starts
        # the count there, as a broker that has run for days would be (bench/wire_bytes.py --days-old).
        self.seq = max(int(os.environ.get("NEOPLASMA_TEST_FIRST_SEQ", "1")), 1) - 1
        # Proxies' checkpoints (docs/resume.md, "Checkpoints"): kept as long as retention (a token older is a gap
        # anyway) and a minute more, for the clocks of proxy and client.
        self.checkpoints = CheckpointStore(config.retention_seconds + CHECKPOINT_SLACK, config.checkpoint_bytes)
        self.retention = RetentionLog(config.retention_seconds, config.retention_bytes)
        self.replays = asyncio.Semaphore(config.max_replays)
        self.replays_waiting = 0
        # Replays walk retention in turns: one part (REPLAY_SLICE) per pass of the loop, however many run, so that
        # publishes and relay streams' live events wait behind one part at most, not one per replay.
        self.walks = Turns(REPLAY_SLICE)
        self.replay_pace = Pace(config.replay_events_per_second, REPLAY_BURST)  # retained events Replays walk
        self.offload = Offload(config.workers - 1)
        self.events_in = 0
        self.events_out = 0
        self.events_dropped = 0
        self.events_rejected = 0
        self._publishers: dict[str, float] = {}
        self._rate: deque[tuple[float, int]] = deque(maxlen=64)
        self._queries: dict[int, tuple[RelayStream, asyncio.Future[str]]] = {}  # pointer queries awaiting answers
        self._query_ids = 0

    # -- pointer ids -----------------------------------------------------------

    async def resolve(self, pointer: str) -> str | None:
        """The full token a proxy instance's pointer stands for, asked of that instance over its relay streams
        (every one naming it: two processes that drew the same instance must agree); None when none can tell in
        RESOLVE_TIMEOUT. InvalidToken for what is not a pointer; LookupError when no relay stream names its
        instance; OverflowError when every such stream has MAX_QUERIES_PER_STREAM queries unanswered."""
        instance, _ = parse_pointer(pointer)
        streams = [s for s in self.router.instances.get(instance, ()) if s.asked < MAX_QUERIES_PER_STREAM]
        if not streams:
            if instance in self.router.instances:
                raise OverflowError(f"too many pointer queries wait for proxy instance {instance}")
            raise LookupError(f"no proxy instance {instance} is attached to this broker")
        loop = asyncio.get_running_loop()
        asked: list[tuple[int, bytes]] = []
        try:
            for stream in streams:
                self._query_ids += 1
                message = pb.EventBatch(resolve=[pb.PointerQuery(id=self._query_ids, pointer=pointer)])
                query = message.SerializeToString()
                asked.append((self._query_ids, query))
                self._queries[self._query_ids] = (stream, loop.create_future())
                stream.asked += 1
                stream.queries.append(query)
                stream.wake.set()
            futures = [self._queries[k][1] for k, _ in asked]
            await asyncio.wait(futures, timeout=RESOLVE_TIMEOUT)
            tokens = {f.result() for f in futures if f.done() and not f.cancelled()}
        finally:
            for k, query in asked:
                stream, future = self._queries.pop(k)
                stream.asked -= 1
                future.cancel()
                if query in stream.queries:  # never sent (its writer is behind): not sent now
                    stream.queries.remove(query)
        tokens.discard("")
        return tokens.pop() if len(tokens) == 1 else None

    def store_checkpoint(self, stream: RelayStream, given: pb.Checkpoint) -> None:
        """A proxy registered a checkpoint on `stream`: stored under the stream's instance (`checkpoint_stored`),
        or refused with the reason told back (`checkpoint_refused`); either way said in the stream's next message."""
        checkpoint = Checkpoint.from_proto(given)
        try:
            if given.instance != stream.instance:
                raise ValueError(f"the checkpoint names proxy instance {given.instance}, the relay stream "
                                 f"{stream.instance}")
            self.checkpoints.put(checkpoint, stream.nonce, time.monotonic())
        except ValueError as exc:
            self.metrics.checkpoint_registrations.labels("refused").inc()
            log.outside("checkpoint_refused", proxy=stream.proxy, peer=stream.peer, error=str(exc))
            stream.checkpoint_refused = f"checkpoint {given.counter} refused: {exc}"
        else:
            self.metrics.checkpoint_registrations.labels("stored").inc()
            stream.checkpoint_stored = given.counter
        stream.wake.set()

    def answered(self, stream: RelayStream, answers: Iterable[pb.PointerAnswer]) -> None:
        """A proxy's answers to the queries sent down `stream` (others' ids, and oversized tokens, are ignored)."""
        for answer in answers:
            asked = self._queries.get(answer.id)
            if asked is None or asked[0] is not stream or asked[1].done() or len(answer.token) > MAX_TOKEN_CHARS:
                continue
            asked[1].set_result(answer.token)

    # -- publishing ----------------------------------------------------------

    async def check(self, parse: Callable[..., list[Checked]], given: Any, size: int) -> list[Checked]:
        """Published input checked by `parse` within the limits (on a worker thread when large)."""
        cfg = self.config
        limits = {"max_bytes": cfg.max_event_bytes, "max_topic_length": cfg.max_topic_length,
                  "max_events": cfg.max_events_per_request, "max_request_bytes": cfg.max_request_bytes,
                  "max_elements": cfg.max_elements_per_request}
        if size >= OFFLOAD_BYTES and self.offload.free():
            return await self.offload.run(checked_pairs, parse, given, limits)
        if size > OFF_LOOP_BYTES:
            return await asyncio.to_thread(parse, given, **limits)
        return parse(given, **limits)

    def accept(self, events: list[Checked], peer: str) -> int:
        first = self.seq + 1
        n = len(events)
        self.seq += n
        now = time.monotonic()
        queued, dropped = self.router.route(events, first, time.time_ns())
        self.retention.append(first, events, now)
        self.events_in += n
        self.events_out += queued
        self.events_dropped += dropped
        self.metrics.events_in.inc(n)
        if queued:
            self.metrics.events_out.inc(queued)
        if dropped:
            self.metrics.events_dropped.inc(dropped)
        self._publishers[peer] = now
        self._rate.append((now, self.events_in))
        return n

    def holds_after(self, after: int) -> bool:
        """Every event of this epoch after seq `after` is still retained (and `after` is no future seq)."""
        return after <= self.seq and self.retention.covers(after)

    def replay_start(self, request: pb.ReplayRequest, received: float) -> tuple[int, bool]:
        """Where a Replay walk starts (the seq after which it looks) and whether it is a gap from the start:
        after `request.after` (and with `since_ms`, after the events accepted before `received`, when the
        request was read, less that: a replay that waited for its turn still has what was accepted meanwhile),
        up to the head now; another epoch's positions name nothing here (a gap, nothing walked)."""
        if request.epoch != self.epoch:
            return self.seq, True
        after, covered = min(request.after, self.seq), self.holds_after(request.after)
        if request.since_ms:
            since_after, since_covered = self.retention.accepted_since(received - request.since_ms / 1000)
            if since_after >= after:  # only what was accepted since then is asked
                after, covered = since_after, since_covered
        return after, not covered

    def start_backfill(self, stream: RelayStream, first: pb.Interest) -> None:
        """Set a new relay stream to queue what the proxy missed before it (`Interest.epoch`, `after`,
        `backfill_ms`) before any live event: retained events matching its interest, up to the head now
        (walked by `backfill_part`, a slice at a time)."""
        log_ = self.retention
        now = time.monotonic()
        log_.evict(now)
        if first.epoch == self.epoch and first.after:
            after, covered = first.after, self.holds_after(first.after)
        elif first.backfill_ms:
            after, covered = log_.accepted_since(now - first.backfill_ms / 1000)
        else:
            return
        stream.gap = stream.gap or not covered
        if after < self.seq:
            stream.backfill = ReplayWalk(log_, after, self.seq, frozenset(stream.interest))

    def backfill_part(self, stream: RelayStream) -> int:
        """Walk a slice of `stream`'s backfill, queueing what it finds (at most what fits a message beside what
        is queued); returns how many events were queued."""
        walk = stream.backfill
        assert walk is not None, "no backfill under way"
        room = max(self.config.max_message_bytes - stream.outbox_bytes, 1)
        queued = stream.queue_backfill(walk.part(room, *self.slice()))
        self.events_out += queued
        self.metrics.events_out.inc(queued)
        if stream.backfill is None:
            log.info("relay_backfilled", proxy=stream.proxy, events=stream.backfilled, walked=walk.walked,
                     gap=walk.gap)
            self.router.note_flushed()
        return queued

    @staticmethod
    def slice() -> tuple[float, Callable[[], float]]:
        """The deadline and clock of a retention walk's part that starts now (REPLAY_SLICE)."""
        return time.perf_counter() + REPLAY_SLICE, time.perf_counter

    async def pace_replay(self, walked: int) -> None:
        """Let the loop serve others, and keep every Replay's walking together within
        --replay-events-per-second (bursts of REPLAY_BURST)."""
        await asyncio.sleep(self.replay_pace.delay(walked, asyncio.get_running_loop().time()))

    def reject(self, error: InvalidEvent | None, count: int = 1) -> None:
        """A publish refused for `error` (None: a body over --max-request-bytes, never read)."""
        self.events_rejected += count
        self.metrics.events_rejected.inc(count)
        self.refused("too_large" if error is None or isinstance(error, LimitExceeded) else "invalid")

    def refused(self, reason: str) -> None:
        self.metrics.refusals.labels(reason).inc()

    def accepted(self, transport: str, started: float) -> None:
        """A publish request that arrived at `started` (perf_counter) was accepted."""
        self.metrics.publish_duration.labels(transport).observe(time.perf_counter() - started)

    def publishers(self) -> int:
        cutoff = time.monotonic() - self.config.publisher_window
        for peer in [p for p, t in self._publishers.items() if t < cutoff]:
            del self._publishers[peer]
        return len(self._publishers)

    def rate(self) -> float:
        now = time.monotonic()
        recent = [(t, n) for t, n in self._rate if now - t <= 10.0]
        if len(recent) < 2 or recent[-1][0] == recent[0][0]:
            return 0.0
        return (recent[-1][1] - recent[0][1]) / max(now - recent[0][0], 1.0)

    def stats(self) -> pb.BrokerStats:
        publishers = self.publishers()
        streams = len(self.router.streams)
        self.metrics.relay_streams.set(streams)
        self.metrics.publishers.set(publishers)
        self.metrics.outbox_bytes.set(self.router.pending_bytes())
        self.metrics.relay_backlog_max.set(self.router.largest_backlog())
        now = time.monotonic()
        self.retention.evict(now)
        self.metrics.retention_limit_bytes.set(self.retention.max_bytes)
        self.metrics.retention_oldest_age.set(self.retention.oldest_age(now))
        self.metrics.retention_limit_seconds.set(self.retention.max_age)
        self.metrics.draining.set(self.draining)
        self.metrics.retained_bytes.set(self.retention.bytes)
        self.checkpoints.evict(time.monotonic())
        self.metrics.checkpoints.set(len(self.checkpoints))
        self.metrics.checkpoint_bytes.set(self.checkpoints.bytes)
        self.metrics.retained_events.set(self.retention.events)
        return pb.BrokerStats(
            name=self.config.name, connections=publishers + streams, relay_streams=streams,
            publishers=publishers, events_in=self.events_in, events_out=self.events_out,
            events_dropped=self.events_dropped, events_rejected=self.events_rejected,
            draining=self.draining, events_in_per_second=self.rate(),
        )


def checked_pairs(parse: Callable[..., list[Checked]], given: Any, limits: dict[str, int]) -> list[Checked]:
    """`parse(given, **limits)`, as an offload worker runs it."""
    return parse(given, **limits)


class BrokerServicer(pb_grpc.BrokerServicer):
    def __init__(self, broker: Broker) -> None:
        self.broker = broker

    async def Publish(self, request: pb.PublishRequest | RequestTooLarge,  # noqa: N802
                      context: grpc.aio.ServicerContext) -> pb.PublishResponse:
        started = time.perf_counter()
        broker = self.broker
        if broker.draining:
            broker.refused("draining")
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                f"broker {broker.config.name} is draining; publish to another broker")
        if isinstance(request, RequestTooLarge):  # counted before it was parsed (publish_request)
            broker.reject(request)
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"nothing published: {request}")
            return pb.PublishResponse()  # not reached: abort raises
        pairs = [(e.topic, e.data) for e in request.events]
        try:
            events = await broker.check(make_events, pairs, request.ByteSize())
        except InvalidEvent as exc:
            broker.reject(exc, len(pairs))
            await context.abort(refusal_code(exc), f"nothing published: {exc}")
        accepted = broker.accept(events, context.peer())
        broker.accepted("grpc", started)
        return pb.PublishResponse(accepted=accepted)

    async def Relay(self, request_iterator: object, context: grpc.aio.ServicerContext) -> None:  # noqa: N802
        broker = self.broker
        cfg = broker.config
        if broker.closing:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"broker {cfg.name} is shutting down")
        stream = RelayStream(proxy="?", peer=context.peer(), max_outbox_bytes=cfg.max_outbox_bytes,
                             max_request_bytes=cfg.max_request_bytes)
        try:
            first = part = await context.read()
            while part is not grpc.aio.EOF:
                self._apply_interest(stream, part)
                if not part.more:  # the first interest is whole (it may come in parts)
                    break
                part = await context.read()
        except BaseException as exc:
            broker.router.detach(stream)  # out of the topic index the parts before were put in
            if isinstance(exc, InvalidTopic | DecodeError | LimitExceeded):
                await refuse(context, exc, "Relay", "interest")
            raise
        if part is grpc.aio.EOF:  # the proxy left before its first interest was whole
            broker.router.detach(stream)
            return
        stream.proxy = first.proxy or context.peer()
        stream.nonce = first.nonce
        try:
            broker.router.claim(stream, first.instance, time.monotonic())
        except (InstanceTaken, OverflowError) as exc:
            broker.router.detach(stream)  # out of the topic index its interest was put in
            await self._refuse_instance(stream, first.instance, exc, context)
        broker.start_backfill(stream, first)  # no await from here to attach: no event slips between
        broker.router.attach(stream)
        log.info("relay_opened", proxy=stream.proxy, peer=stream.peer, topics=len(stream.interest),
                 backfill=stream.backfill is not None, gap=stream.gap)
        reader = asyncio.create_task(self._read_interest(stream, context))
        try:
            while not reader.done():
                if stream.backfill is not None and stream.outbox_bytes < cfg.max_message_bytes:
                    broker.backfill_part(stream)
                    if stream.backfill is not None and stream.outbox_bytes < cfg.max_message_bytes:
                        await asyncio.sleep(0)  # a slice walked: let the loop serve others
                        continue
                now = time.monotonic()
                if not stream.has_news(broker.seq, now, cfg.head_interval):
                    if broker.closing:  # drained: a last head, then a clean end
                        await context.write(batch_trailer(epoch=broker.epoch, head=broker.seq))
                        return
                    stream.wake.clear()
                    # With a head to tell, in head_interval; with none, no timer: the next publish wakes it
                    # (an idle broker with 100 relay streams would otherwise wake 100 times a second).
                    behind = broker.seq > stream.head_sent
                    if not behind:
                        broker.router.idle(stream)
                    await wait_event_or_task(stream.wake, reader, cfg.head_interval if behind else None)
                    continue
                message, _ = stream.take(cfg.max_message_bytes, broker.epoch, broker.seq, now)
                if not stream.outbox:
                    broker.router.note_flushed()
                await context.write(message)
            error = reader.exception()
            if isinstance(error, InvalidTopic | DecodeError | LimitExceeded):
                await refuse(context, error, "Relay", "interest")
            if isinstance(error, InstanceTaken | OverflowError):
                await self._refuse_instance(stream, stream.asked_instance, error, context)
            if error is not None:  # never an OK end: the proxy takes that for a drain and signals no gap
                log.error("relay_failed", proxy=stream.proxy, error=repr(error))
                await context.abort(grpc.StatusCode.INTERNAL, f"relay failed: {error!r}")
        finally:
            reader.cancel()
            broker.router.detach(stream)
            log.info("relay_closed", proxy=stream.proxy, sent=stream.sent, dropped=stream.dropped,
                     pending=len(stream.outbox))

    @staticmethod
    async def _refuse_instance(stream: RelayStream, instance: int, exc: Exception,
                               context: grpc.aio.ServicerContext) -> None:
        """End a relay stream whose proxy named a pointer instance it may not hold here (docs/resume.md, "Pointer
        ids"): ALREADY_EXISTS when another process holds it (the proxy draws another and reconnects)."""
        log.outside("relay_instance_refused", proxy=stream.proxy, peer=stream.peer, instance=instance,
                    error=str(exc))
        if isinstance(exc, InstanceTaken):
            await context.abort(grpc.StatusCode.ALREADY_EXISTS,
                                f"relay refused: {exc}; draw another pointer instance and reconnect")
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"relay refused: {exc}; try again later")

    def _apply_interest(self, stream: RelayStream, msg: pb.Interest) -> None:
        cfg = self.broker.config
        most = cfg.max_interest_topics
        if len(msg.add) + len(msg.remove) > most:
            raise LimitExceeded(f"{len(msg.add) + len(msg.remove)} topics in one Interest message; the limit is {most}")
        for topic in (*msg.add, *msg.remove):
            check_topic(topic, cfg.max_topic_length)
        if len(msg.add) + (0 if msg.replace else len(stream.interest)) > most:  # a cheap bound, then exactly
            after = set(msg.add) if msg.replace else (stream.interest | set(msg.add)) - set(msg.remove)
            if len(after) > most:
                raise LimitExceeded(f"the relay stream would ask for {len(after)} topics; the limit is {most}")
        self.broker.router.update_interest(stream, msg.add, msg.remove, msg.replace)

    async def _read_interest(self, stream: RelayStream, context: grpc.aio.ServicerContext) -> None:
        while True:
            msg = await context.read()
            if msg is grpc.aio.EOF:
                return
            if msg.resolved:  # answers to pointer queries: nothing else (not an interest change)
                self.broker.answered(stream, msg.resolved)
                continue
            if msg.HasField("checkpoint"):  # a checkpoint: nothing else (not an interest change)
                self.broker.store_checkpoint(stream, msg.checkpoint)
                continue
            if msg.instance and msg.instance != stream.instance:  # the proxy drew another instance
                stream.asked_instance = msg.instance
                self.broker.router.claim(stream, msg.instance, time.monotonic())  # InstanceTaken: the stream ends
            self._apply_interest(stream, msg)  # acknowledged like an interest change

    async def Resolve(self, request: pb.ResolveRequest, context: grpc.aio.ServicerContext) -> pb.ResolveResponse:  # noqa: N802
        """The full token a pointer id stands for, asked of the proxy instance that issued it; or a checkpoint, from
        this broker's store (docs/resume.md)."""
        if request.checkpoint:
            return await self._checkpoint(request, context)
        try:
            token = await self.broker.resolve(request.pointer)
        except InvalidToken as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"resolve refused: {exc}")
        except LookupError as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"cannot resolve the pointer: {exc}")
        except OverflowError as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"cannot resolve the pointer now: {exc}")
        if token is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "the proxy that issued the pointer did not resolve it "
                                f"within {RESOLVE_TIMEOUT} s (no longer in its journal, or not its pointer)")
        return pb.ResolveResponse(token=token)

    async def _checkpoint(self, request: pb.ResolveRequest, context: grpc.aio.ServicerContext) -> pb.ResolveResponse:
        """A checkpoint a version 3 token names, from this broker's store (a forged query costs a lookup)."""
        found = self.broker.checkpoints.get(request.instance, request.checkpoint, time.monotonic())
        self.broker.metrics.checkpoint_lookups.labels("not_found" if found is None else "found").inc()
        if found is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no checkpoint {request.checkpoint} of proxy instance "
                                f"{request.instance} is stored here (never registered, evicted, or too old)")
            raise AssertionError("abort raises")
        return pb.ResolveResponse(checkpoint=found.to_proto())

    async def Stats(self, request: pb.StatsRequest, context: grpc.aio.ServicerContext) -> pb.BrokerStats:  # noqa: N802
        return self.broker.stats()

    async def Replay(self, request: pb.ReplayRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:  # noqa: N802
        """The retained events after `request.after` for `request.topics`, up to the head now.

        At most --max-replays run at once (others wait, up to --max-replays-waiting; beyond, refused
        with RESOURCE_EXHAUSTED); each walks retention a part (REPLAY_SLICE seconds) at a time, in messages of up
        to REPLAY_MESSAGE_BYTES, yielding the loop between parts (a replay of all of retention holds one message),
        and the parts of all replays take turns (`Broker.walks`): one per pass of the loop."""
        received = time.monotonic()  # what `since_ms` counts back from (not when its turn comes, below)
        broker = self.broker
        cfg = broker.config
        try:
            topics = frozenset(check_topic(t, cfg.max_topic_length) for t in request.topics)
        except InvalidTopic as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"replay refused: {exc}")
        if broker.replays.locked() and broker.replays_waiting >= cfg.max_replays_waiting:
            broker.metrics.replays_refused.inc()
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"replay refused: {cfg.max_replays} replays "
                                f"run and {broker.replays_waiting} wait on broker {cfg.name}; try again later")
        broker.replays_waiting += 1
        try:
            await broker.replays.acquire()
        finally:
            broker.replays_waiting -= 1
        broker.metrics.replays.inc()
        try:
            head = broker.seq
            broker.retention.evict(time.monotonic())
            after, gap = broker.replay_start(request, received)
            walk = ReplayWalk(broker.retention, after, head, topics, gap=gap)
            plain = batch_trailer(epoch=broker.epoch, head=head)
            most = min(cfg.max_message_bytes, REPLAY_MESSAGE_BYTES)
            message: list[bytes] = []
            size = 0
            signalled = False  # the gap (signalled once, in the first message after it is known)
            while True:
                walked = walk.walked
                await broker.walks.turn()
                entries = walk.part(most - size, *broker.slice())
                message += entries
                size += sum(map(len, entries))
                gap = walk.gap and not signalled
                if size >= most or walk.done or gap:
                    broker.metrics.replayed_bytes.inc(size)
                    yield b"".join(message) + (batch_trailer(epoch=broker.epoch, head=head, gap=True) if gap else plain)
                    signalled = signalled or gap
                    message, size = [], 0
                if walk.done:
                    return
                await broker.pace_replay(walk.walked - walked)  # a part walked: let the loop serve others
        finally:
            broker.replays.release()


def _varint(raw: bytes, i: int) -> tuple[int, int]:
    """The protobuf varint at `raw[i:]` and where it ends (past the end of `raw` when truncated)."""
    value = shift = 0
    while i < len(raw) and shift < 64:
        byte = raw[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, i
        shift += 7
    return value, len(raw) + 1


def publish_request(cfg: BrokerConfig) -> Callable[[bytes], pb.PublishRequest | RequestTooLarge]:
    """A PublishRequest deserializer that counts events, and measures each, before parsing: parsing makes
    an object per event (16 MiB of tiny events was 2 million of them and 365 MB), so a request beyond
    the limits is refused from its wire form. What it cannot follow is left to the parser to judge."""
    most_bytes = cfg.max_event_bytes + 4 * cfg.max_topic_length + 32  # data, topic (UTF-8), field headers

    def deserialize(raw: bytes) -> pb.PublishRequest | RequestTooLarge:
        i = events = 0
        while i < len(raw):
            key, i = _varint(raw, i)
            if key != 0x0A:  # not `events` (field 1, length-delimited)
                break
            size, i = _varint(raw, i)
            events += 1
            if events > cfg.max_events_per_request:
                return RequestTooLarge(f"the request holds more than {cfg.max_events_per_request} events "
                                       "(send smaller batches)")
            if size > most_bytes:
                return RequestTooLarge(f"event {events - 1} is {size} bytes; the limit is {cfg.max_event_bytes} "
                                       "bytes of data")
            i += size
        return pb.PublishRequest.FromString(raw)

    return deserialize


def relay_handler(servicer: BrokerServicer) -> grpc.GenericRpcHandler:
    """The Broker service, with relay messages written as ready-made bytes."""
    return grpc.method_handlers_generic_handler(SERVICE_NAME, {
        "Publish": grpc.unary_unary_rpc_method_handler(
            servicer.Publish, request_deserializer=publish_request(servicer.broker.config),
            response_serializer=pb.PublishResponse.SerializeToString),
        "Relay": grpc.stream_stream_rpc_method_handler(
            servicer.Relay, request_deserializer=pb.Interest.FromString, response_serializer=identity),
        "Stats": grpc.unary_unary_rpc_method_handler(
            servicer.Stats, request_deserializer=pb.StatsRequest.FromString,
            response_serializer=pb.BrokerStats.SerializeToString),
        "Replay": grpc.unary_stream_rpc_method_handler(
            servicer.Replay, request_deserializer=pb.ReplayRequest.FromString, response_serializer=identity),
        "Resolve": grpc.unary_unary_rpc_method_handler(
            servicer.Resolve, request_deserializer=pb.ResolveRequest.FromString,
            response_serializer=pb.ResolveResponse.SerializeToString),
    })


# -- HTTP ------------------------------------------------------------------------


async def read_bounded(request: web.Request, most: int) -> bytes | None:
    """The request's body, counted as it arrives: None as soon as it is over `most` bytes (its length
    said so, or its chunks did), without reading the rest."""
    if request.content_length is not None and request.content_length > most:
        return None
    body = bytearray()
    async for chunk in request.content.iter_any():
        body += chunk
        if len(body) > most:
            return None
    return bytes(body)


def http_app(broker: Broker, keys: Tokens | None) -> web.Application:
    cfg = broker.config

    async def publish(request: web.Request) -> web.Response:
        started = time.perf_counter()
        if keys is not None and not keys.allows(request.headers.get("Authorization")):
            broker.refused("unauthenticated")
            return web.json_response({"error": "nothing published: a publisher key is required "
                                      "(Authorization: Bearer KEY)"}, status=401,
                                     headers={"WWW-Authenticate": "Bearer"})
        if not JSON_TYPE.fullmatch(request.content_type):  # a browser form from another site cannot send these
            broker.refused("media_type")
            return web.json_response({"error": f"nothing published: the body must be JSON (Content-Type: "
                                      f"application/json), not {request.content_type}"}, status=415)
        if broker.draining:
            broker.refused("draining")
            return web.json_response({"error": f"broker {cfg.name} is draining; publish to another broker"},
                                     status=503)
        body = await read_bounded(request, cfg.max_request_bytes)
        if body is None:
            broker.reject(None)
            response = web.json_response({"error": f"nothing published: the request is over {cfg.max_request_bytes} "
                                          "bytes (send smaller batches)"}, status=413)
            response.force_close()  # the rest of the body is not read
            return response
        try:
            events = await broker.check(check_publish_body, body, len(body))
        except InvalidEvent as exc:
            broker.reject(exc)
            return web.json_response({"error": f"nothing published: {exc}"},
                                     status=413 if isinstance(exc, LimitExceeded) else 400)
        peer = request.transport.get_extra_info("peername") if request.transport else None
        accepted = broker.accept(events, str(peer))
        broker.accepted("http", started)
        return web.json_response({"accepted": accepted})

    async def healthz(request: web.Request) -> web.Response:
        if broker.draining:
            return web.Response(status=503, text="draining\n")
        return web.Response(text="ok\n")

    async def metrics(request: web.Request) -> web.Response:
        broker.stats()  # refresh gauges
        return web.Response(body=generate_latest(broker.metrics.registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application(client_max_size=cfg.max_request_bytes + 1)  # larger: refused by broker.check
    app.router.add_post("/publish", publish)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    return app


# -- process ---------------------------------------------------------------------


class BrokerService:
    """`neoplasma broker` for neoplasma.core.lifecycle: on a stop, refuse new publishes, let relay
    outboxes empty (within drain_timeout), then end the relay streams and stop."""

    kind = "broker"

    def __init__(self, config: BrokerConfig) -> None:
        self.config = config
        self.broker = Broker(config)
        self.health = health.aio.HealthServicer()

    async def start(self) -> dict[str, Any]:
        config, broker = self.config, self.broker
        await broker.offload.start()
        servicer = BrokerServicer(broker)
        cluster = config.cluster_tokens()
        keys = Tokens.optional(config.publish_keys_file)
        guard = Guard({
            f"/{SERVICE_NAME}/Publish": Rule(keys, "a publisher key is required (authorization: Bearer KEY)",
                                             lambda: broker.refused("unauthenticated")),
            f"/{SERVICE_NAME}/": Rule(cluster, CREDENTIAL_REQUIRED)})
        self.server = grpc.aio.server(interceptors=[guard], options=[
            ("grpc.max_receive_message_length", config.max_request_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes + config.max_event_bytes + 4096),
            ("grpc.so_reuseport", 0),
        ])
        self.server.add_generic_rpc_handlers((relay_handler(servicer),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        tls = server_tls(config.tls_cert, config.tls_key)
        grpc_port = add_grpc_port(self.server, config.host, config.grpc_port, "--grpc-port",
                                  grpc_server_credentials(tls))
        await self.server.start()
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        self.http = HttpServer(http_app(broker, keys),
                               bind_socket(config.host, config.http_port, "--http-port", backlog=config.listen_backlog),
                               config.header_timeout, http_ssl_context(config.tls_cert, config.tls_key),
                               backlog=config.listen_backlog)
        await self.http.start()
        return {"name": config.name, "grpc": hostport(config.host, grpc_port),
                "http": hostport(config.host, self.http.port)}

    async def _set_health(self, status: Any) -> None:
        for service in ("", SERVICE_NAME):
            await self.health.set(service, status)

    async def quiesce(self) -> None:
        self.broker.draining = True
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        log.info("broker_draining", **self.pending())

    def deadline(self) -> float:
        return self.config.drain_timeout

    async def drained(self) -> None:
        await self.broker.router.flushed()

    def pending(self) -> dict[str, Any]:
        return {"pending_bytes": self.broker.router.pending_bytes()}

    async def close(self) -> dict[str, Any]:
        broker = self.broker
        broker.closing = True  # relay streams send their last head and end cleanly
        for stream in broker.router.streams:
            stream.wake.set()
        await self.server.stop(grace=1.0)
        await self.http.stop()
        broker.offload.close()
        return {"events_in": broker.events_in, "events_out": broker.events_out, "dropped": broker.events_dropped}
