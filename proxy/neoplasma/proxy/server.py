"""The proxy process: SSE + plasma gRPC for subscribers, ProxyControl for the operator."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

import grpc
from aiohttp import web
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2
from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from neoplasma.core.aio import Cancels
from neoplasma.core.events import Event, batch_entry, batch_trailer, grpc_frame, sse_frame, sse_gap
from neoplasma.core.logs import get_logger
from neoplasma.core.membership import InvalidSnapshot, Member, Snapshot, conflicts, is_stale, snapshot_from_proto
from neoplasma.core.net import Front, HttpServer, add_grpc_port, bind_socket, hostport
from neoplasma.core.resume import MAX_TOKEN_CHARS
from neoplasma.core.scaling import REBALANCE_COOLDOWN
from neoplasma.core.topics import (
    InvalidTopic,
    LimitExceeded,
    check_topics,
    parse_topic_list,
)
from neoplasma.core.trust import (
    CREDENTIAL_REQUIRED,
    Access,
    Guard,
    Rule,
    Tokens,
    grpc_server_credentials,
    refusal,
    server_tls,
)
from neoplasma.core.workers import Place, metrics_body, serve_own_metrics
from neoplasma.plasma.v1 import stream_pb2
from neoplasma.proxy.auth import (
    EXPIRED,
    Forbidden,
    Grant,
    Refused,
    bearer,
    challenge,
    http_token,
    without_token,
)
from neoplasma.proxy.fastpath import Defer, FastPath, Head, Serve, date_header, handed_decision
from neoplasma.proxy.h2server import Call, GrpcServer, Opener, unary
from neoplasma.proxy.hub import (
    LAST_CHUNK,
    BatchSubscriber,
    Hub,
    PlasmaSubscriber,
    SseSubscriber,
    StreamSubscriber,
    Subscriber,
    http_chunk,
)
from neoplasma.proxy.links import LinkSet
from neoplasma.proxy.resume import Resume, ResumeBudget, Sink, start_resume
from neoplasma.proxy.settings import ProxyConfig
from neoplasma.wire.v1 import neoplasma_pb2 as pb
from neoplasma.wire.v1 import neoplasma_pb2_grpc as pb_grpc

log = get_logger("proxy")

HEARTBEAT = b":heartbeat \n\n"
# Drain rates a Drain call may ask for (subscribers asked to reconnect per second): below, a drain that
# never ends (one subscriber a day is no drain); above, far beyond what a proxy can close.
MIN_DRAIN_RATE = 0.1
MAX_DRAIN_RATE = 1e6
# HTTP limits: a Last-Event-ID header, or ?lastEventId= beside the topics (aiohttp's usual 8190 bytes),
# as long as the longest token accepted; longer ones get 400 and one rate-limited warning line.
MAX_HEADER_BYTES = MAX_TOKEN_CHARS + 64
MAX_REQUEST_LINE = 8190 + MAX_TOKEN_CHARS + 64
# A request head longer than this is aiohttp's to read (its limits are per line); browsers' are far shorter.
FAST_HEAD_LIMIT = MAX_REQUEST_LINE + 4 * MAX_HEADER_BYTES
# The end of an SSE stream at its token's `exp`: reconnect with a fresh token and the last id.
SSE_EXPIRED = b"event: neoplasma-expired\ndata: %s\n\n" % json.dumps({"reason": EXPIRED}).encode()
# Not summed over a pod's workers: the version every worker has applied, and the topics (a topic
# subscribed on several workers is one topic: the largest worker's count is the closest known).
POD_METRICS = {"neoplasma_proxy_membership_version": min, "neoplasma_proxy_topics": max}


MAX_KEEP = 10_000_000  # DrainRequest.keep_at_most: far above what a proxy holds
MAX_HOLD = 3600.0  # DrainRequest.hold_seconds
DEFAULT_HOLD = 30.0


@dataclass
class Limit:
    """A rebalance's limit: at most `keep` subscribers until `until` (monotonic)."""

    keep: int
    until: float


class Proxy:
    def __init__(self, config: ProxyConfig) -> None:
        self.config = config
        self.hub = Hub(config.pointer_journal_seconds, config.pointer_journal_bytes)
        self.auth = config.subscriber_auth()
        # Subscriptions refused for want of a token or beyond its topics, and streams ended at `exp`.
        self.auth_outcomes = {"unauthenticated": 0, "forbidden": 0, "expired": 0}
        self.access = Access(config.cluster_tokens(), config.tls_ca, config.tls_server_name)
        self.links = LinkSet(self.hub, config.name, config.max_message_bytes, self.access)
        self.cancels = Cancels()  # resuming subscribers' catch-ups ended when their clients left, a few per pass
        self.resumes = ResumeBudget(config.max_held_events_per_resume, config.max_held_events, config.max_replays,
                                    config.catch_up_bytes_per_second)
        self.draining = False
        self.stopping = False  # a signal to stop came: the drain starts after the drain delay
        self.ready = True  # /healthz; false from the first signal to stop or drain
        self.limit: Limit | None = None  # a rebalance in force (DrainRequest.keep_at_most)
        self.rate = config.drain_rate  # reconnects/s of the drain or shed under way; may be changed meanwhile
        self.deadline: float | None = None  # monotonic: the drain must be done by then
        self._apply_lock = asyncio.Lock()
        self._drain_task: asyncio.Task[None] | None = None
        self._shed_task: asyncio.Task[None] | None = None

    async def apply(self, message: pb.Membership) -> pb.ApplyResponse:
        async with self._apply_lock:
            current = self.links.applied.version
            if is_stale(current, message.version):
                return self._answer(False, f"stale: version {message.version} is older than applied {current}")
            try:
                snapshot = snapshot_from_proto(message)
            except InvalidSnapshot as exc:
                log.outside("membership_refused", version=message.version, reason=str(exc))
                return self._answer(False, f"refused: {exc}")
            if conflicts(self.links.applied, snapshot):
                log.outside("membership_refused", version=message.version, reason="other contents, same version")
                return self._answer(False, f"refused: version {message.version} is applied with other contents; "
                                    "a change needs a newer version")
            if snapshot != self.links.applied:
                await self.links.apply(snapshot)
            return self._answer(True, "")

    def _answer(self, accepted: bool, reason: str) -> pb.ApplyResponse:
        return pb.ApplyResponse(applied_version=self.links.applied.version, accepted=accepted,
                                reason=reason, links=self.links.to_proto())

    def status(self) -> pb.ProxyStatus:
        counts = self.hub.counts()
        limit = self._limit()
        return pb.ProxyStatus(
            name=self.config.name, subscribers=len(self.hub.subscribers), sse_subscribers=counts["sse"],
            grpc_subscribers=counts["plasma"] + counts["batch"], membership_version=self.links.applied.version,
            links=self.links.to_proto(), events_received=self.hub.events_received,
            deliveries=self.hub.deliveries, slow_subscribers_dropped=self.hub.slow_dropped,
            topics=len(self.hub.topics()), draining=self.draining, keep_at_most=limit.keep if limit else 0,
            movable_subscribers=self.hub.movable_count())

    def check_room(self, topics: Sequence[str], leaving: frozenset[str] = frozenset()) -> None:
        """LimitExceeded when `topics` would take the proxy's interest past --max-topics (`leaving`: topics
        the subscriber gives up at the same time, counted as still wanted)."""
        hub, most = self.hub, self.config.max_topics
        new = hub.new_topics(t for t in topics if t not in leaving)
        if new and hub.topic_count() + new > most:
            raise LimitExceeded(f"this proxy's subscribers want {hub.topic_count()} topics; {new} more would pass "
                                f"its limit of {most} (subscribe at another proxy, or to fewer topics)")

    def _limit(self) -> Limit | None:
        """The rebalance limit in force (a lapsed one is forgotten)."""
        if self.limit is not None and time.monotonic() >= self.limit.until:
            log.info("proxy_limit_lapsed", keep=self.limit.keep, subscribers=len(self.hub.subscribers))
            self.limit = None
        return self.limit

    def full(self) -> bool:
        """At or over a rebalance's limit: new subscribers are sent elsewhere, readiness fails."""
        limit = self._limit()
        return limit is not None and len(self.hub.subscribers) >= limit.keep

    def refusing(self) -> bool:
        return self.draining or self.full()

    def drain(self, rate: float, within: float = 0.0) -> None:
        """Stop accepting subscribers and ask the connected ones to reconnect, `rate` per second
        (positive and finite; 0 means the configured drain_rate), faster if needed to be done
        `within` seconds (0: no limit). Called again, it changes the pace of the drain under way."""
        self.draining, self.ready, self.limit = True, False, None
        self.rate = rate or self.config.drain_rate
        if within:
            self.deadline = time.monotonic() + within
        if self._drain_task is None:
            self._drain_task = asyncio.get_running_loop().create_task(self._drain())

    def shed(self, keep: int, rate: float, hold: float) -> None:
        """Rebalance: hold at most `keep` subscribers for `hold` seconds, asking the excess to
        reconnect at `rate` per second (0: the configured drain_rate), movable ones only (they
        resume exactly elsewhere and were not moved here lately: `Subscriber.movable`); with none
        left, the rest stays (the operator plans no more moves than the proxy reports movable).
        A subscriber that resumes here while a limit is in force is taken for a moved one: not
        movable for REBALANCE_COOLDOWN. Ignored while draining."""
        if self.draining or self.stopping:
            return
        self.limit = Limit(keep, time.monotonic() + (hold or DEFAULT_HOLD))
        self.rate = rate or self.config.drain_rate
        if self._shed_task is None or self._shed_task.done():
            self._shed_task = asyncio.get_running_loop().create_task(self._shed())

    async def _shed(self) -> None:
        limit = self._limit()
        log.info("proxy_shedding", subscribers=len(self.hub.subscribers), keep=limit.keep if limit else None,
                 rate=self.rate)
        moved = 0
        hub = self.hub
        candidates: list[Subscriber] = []  # movable when last looked at (looked at again when used up)
        while not self.draining and (limit := self._limit()) is not None and len(hub.subscribers) > limit.keep:
            sub = self._next_movable(candidates)
            if sub is None:
                break
            self._close(sub, "moved")
            moved += 1
            await asyncio.sleep(1.0 / self.rate)
        log.info("proxy_shed", moved=moved, subscribers=len(hub.subscribers), keep=limit.keep if limit else None,
                 unmovable=len(hub.subscribers) - hub.movable_count())

    def _next_movable(self, candidates: list[Subscriber]) -> Subscriber | None:
        """A subscriber still here and movable: from `candidates`, refilled once they are used up
        (one look at every subscriber per refill, not per move); None when there is none."""
        for refill in (False, True):
            if refill:
                candidates[:] = self.hub.movable()
            while candidates:
                sub = candidates.pop()
                if sub in self.hub.subscribers and sub.movable(time.monotonic()):
                    return sub
        return None

    def _close(self, sub: Subscriber, reason: str) -> None:
        self.hub.remove(sub)
        sub.close(reason)

    async def _drain(self) -> None:
        log.info("proxy_draining", subscribers=len(self.hub.subscribers), rate=self.rate)
        hurried = False
        while self.hub.subscribers:  # every one, movable or not: the proxy is going away
            self._close(next(iter(self.hub.subscribers)), "draining")
            interval = 1.0 / self.rate
            if self.deadline is not None and self.hub.subscribers:
                needed = max(0.0, self.deadline - time.monotonic()) / len(self.hub.subscribers)
                if needed < interval:
                    interval = needed
                    if not hurried:
                        hurried = True
                        log.warning("proxy_drain_hurried", subscribers=len(self.hub.subscribers),
                                    rate=self.rate, seconds_left=round(self.deadline - time.monotonic(), 1))
            await asyncio.sleep(interval)
        log.info("proxy_drained")

    async def drained(self) -> None:
        """Return once the drain moved every subscriber away (waiting leaves the drain running)."""
        if self._drain_task is not None:
            await asyncio.wait({self._drain_task})

    def subscribe(self, sub: Subscriber, topics: list[str], token: str, sink: Sink) -> asyncio.Task[None] | None:
        """Add a subscriber: live at once, or after catching up in a task (from a resume token, or
        from the proxy's positions when some broker has not applied its topics yet)."""
        sub.positioned = bool(token)  # (a garbled one is found out by the catch-up: positioned no more)
        if token and self._limit() is not None:  # resumed during a rebalance: it may have been moved here
            sub.settled = time.monotonic() + REBALANCE_COOLDOWN
        if not token and self.links.applied_everywhere(topics):
            self.hub.add(sub, topics)
            return None
        resume = Resume(self.hub, self.links, sub, frozenset(topics), sink, self.config.resume_wait_seconds,
                        self.resumes)
        return start_resume(resume, token)


# -- catch-up for resuming subscribers ---------------------------------------------


def deliver_or_close(sub: Subscriber, data: bytes, position: bool) -> None:
    """Catch-up data that the subscriber cannot take (too far behind, or gone) ends it, never vanishes:
    the client comes back with the last token it got and resumes from there. `position`: `data`
    carries one (events do; gap signals alone do not)."""
    if not sub.deliver(data, position):
        sub.close("slow" if sub.slow else "gone")


class ChunkWriter(Protocol):
    """A stream's chunked writer: aiohttp's StreamResponse, or the fast path's connection."""

    async def write(self, data: bytes) -> None: ...


class SseSink:
    def __init__(self, response: ChunkWriter, sub: SseSubscriber) -> None:
        self.response, self.sub = response, sub

    @staticmethod
    def frames(events: Sequence[Event], tokens: Sequence[bytes]) -> bytes:
        return b"".join([sse_frame(token, event) for event, token in zip(events, tokens, strict=True)])

    async def send(self, events: Sequence[Event], tokens: Sequence[bytes]) -> None:
        await self.send_frames(self.frames(events, tokens))

    async def send_frames(self, data: bytes) -> None:
        await self.response.write(data)  # waits while the client is behind
        self.sub.positioned = True  # (frames of events: each with its id)

    async def gap(self, reason: str) -> None:
        await self.response.write(sse_gap(reason))

    def send_now(self, events: Sequence[Event], tokens: Sequence[bytes], gaps: Sequence[str]) -> None:
        data = b"".join(sse_gap(reason) for reason in gaps) + self.frames(events, tokens)
        if data:
            deliver_or_close(self.sub, http_chunk(data), bool(events))


class BatchSink:
    """Catch-up on the native stream: each replayed batch waits until the client has taken all but half
    of `--max-grpc-buffer` (a catch-up larger than the buffer flows at the client's pace; a client that
    takes nothing for `wait` seconds is dropped as slow)."""

    def __init__(self, sub: BatchSubscriber, wait: float) -> None:
        self.sub, self.wait = sub, wait

    async def send(self, events: Sequence[Event], tokens: Sequence[bytes]) -> None:
        await self.send_frames(self.frames(events, tokens))

    @staticmethod
    def frames(events: Sequence[Event], tokens: Sequence[bytes], gap: bool = False) -> bytes:
        message = b"".join([batch_entry(e) for e in events])
        return grpc_frame(message + batch_trailer(token=tokens[-1] if tokens else b"", gap=gap))

    async def send_frames(self, data: bytes) -> None:
        await self.sub.call.taken(self.sub.max_unsent // 2, self.wait)
        deliver_or_close(self.sub, data, True)

    async def gap(self, reason: str) -> None:
        self.send_now((), (), (reason,))

    def send_now(self, events: Sequence[Event], tokens: Sequence[bytes], gaps: Sequence[str]) -> None:
        if events or gaps:
            deliver_or_close(self.sub, self.frames(events, tokens, bool(gaps)), bool(events))


# -- the subscriber port: plasma's stream, the native stream, health -------------------

CLOSED_AS = {"slow": (grpc.StatusCode.UNAVAILABLE, "subscriber too slow: disconnected; reconnect"),
             "draining": (grpc.StatusCode.UNAVAILABLE, "proxy is shutting down; reconnect"),
             "moved": (grpc.StatusCode.UNAVAILABLE, "subscribers are being spread over the proxies; reconnect"),
             "expired": (grpc.StatusCode.UNAUTHENTICATED, f"{EXPIRED}: reconnect with a fresh token "
                         "(and the last resume token: nothing is lost)")}
SHUTTING_DOWN = "proxy is shutting down; connect to another"
FULL = "proxy is full while subscribers are spread over the proxies; connect to another"
MOVED = frozenset({"draining", "moved"})  # closes that ask the client to come back (elsewhere) soon
REFUSED_TYPE = "neoplasma-refused"  # plasma stream: the eventType of a refused subscription change


def refuse(call: Call, proxy: Proxy) -> None:
    """Refuse a new stream while the proxy is draining or full: UNAVAILABLE, and GOAWAY on its
    connection, so that the client's retry opens a new one, which the Service sends to a ready
    proxy (as a refused SSE request's connection is closed); its other calls go on."""
    call.connection.going_away()
    call.end(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN if proxy.draining else FULL)


def grpc_refusal(refusal: Refused) -> tuple[grpc.StatusCode, str]:
    code = grpc.StatusCode.PERMISSION_DENIED if isinstance(refusal, Forbidden) else grpc.StatusCode.UNAUTHENTICATED
    return code, str(refusal)


def expire_at(proxy: Proxy, grant: Grant | None, sub: Subscriber) -> asyncio.TimerHandle | None:
    """Close `sub` as "expired" when its token expires (None: a subscription that needs no token)."""
    if grant is None:
        return None
    return asyncio.get_running_loop().call_later(max(0.0, grant.expires - time.time()), expire, proxy, sub)


def expire(proxy: Proxy, sub: Subscriber) -> None:
    proxy.auth_outcomes["expired"] += 1
    sub.close("expired")


def _refused(proxy: Proxy, kind: str, refusal: Refused, **fields: object) -> None:
    error = type(refusal).__name__.lower()
    proxy.auth_outcomes[error] += 1
    log.info("subscriber_refused", kind=kind, topic=refusal.topic, error=error, **fields)


def _attach(call: Call, sub: StreamSubscriber, proxy: Proxy, resuming: asyncio.Task[None] | None = None,
            expiry: asyncio.TimerHandle | None = None) -> None:
    """Tie a stream subscriber's life to its call: closing either ends the other."""
    def closed(future: asyncio.Future[str]) -> None:
        reason = future.result()
        if reason in MOVED:  # elsewhere needs a new connection: the client's next call opens one
            call.connection.going_away()
        call.end(*CLOSED_AS.get(reason, (grpc.StatusCode.OK, "")))

    def done() -> None:
        if resuming is not None:
            proxy.cancels.cancel(resuming)
        if expiry is not None:
            expiry.cancel()
        proxy.hub.remove(sub)
        proxy.hub.metrics.disconnected(sub.closed_as)

    proxy.hub.metrics.connected(sub.kind)
    sub.closed.add_done_callback(closed)
    call.done = done


class PlasmaEvents:
    """plasma's `proto.StreamService/Events`, wire-compatible with plasma clients: each request
    replaces the stream's topics (none: unsubscribed); `forceClose` or the client's end of
    requests ends it cleanly.

    Private topics: the call's `authorization` metadata is checked against every request. A refused
    first subscription ends the call (UNAUTHENTICATED / PERMISSION_DENIED); a refused later change
    is answered in the stream, as a `Payload` of type `neoplasma-refused` whose data is the JSON
    refusal, and the stream keeps its previous topics. At the token's `exp` a stream still reading
    private topics ends with UNAUTHENTICATED ("token expired")."""

    def __init__(self, proxy: Proxy, call: Call) -> None:
        self.proxy, self.call = proxy, call
        self.changes: deque[float] = deque(maxlen=proxy.config.max_subscription_changes)
        self.sub = PlasmaSubscriber(call, proxy.config.max_grpc_buffer)
        self.token = bearer(call.authorization)
        self.expiry: asyncio.TimerHandle | None = None
        self.subscribed = False  # a request was applied
        proxy.hub.add(self.sub, ())
        _attach(call, self.sub, proxy)
        call.receive = self.receive
        detach = call.done

        def done() -> None:
            if self.expiry is not None:
                self.expiry.cancel()
            detach()

        call.done = done

    @classmethod
    def open(cls, proxy: Proxy) -> Opener:
        def open_call(call: Call) -> None:
            if proxy.refusing():
                refuse(call, proxy)
            else:
                cls(proxy, call)

        return open_call

    def receive(self, message: bytes | None) -> None:
        cfg = self.proxy.config
        if message is None:  # the client's end of requests: as forceClose
            self.call.end()
            return
        try:
            request = stream_pb2.Request.FromString(message)
            if request.forceClose:
                self.call.end()
                return
            now = time.monotonic()
            if len(self.changes) == self.changes.maxlen and now - self.changes[0] < 1.0:
                raise LimitExceeded(f"more than {cfg.max_subscription_changes} subscription changes in a second")
            self.changes.append(now)
            topics = check_topics((e.type for e in request.Events), cfg.max_topic_length,
                                  cfg.max_topics_per_subscription)
            self.proxy.check_room(topics, self.sub.topics)
        except (InvalidTopic, LimitExceeded, DecodeError) as error:
            self.call.end(*refusal(error, "Events", "subscription"))
            return
        try:
            grant = self.proxy.auth.check(topics, self.token)
        except Refused as refused:
            _refused(self.proxy, "plasma", refused, first=not self.subscribed)
            if not self.subscribed:
                self.call.end(*grpc_refusal(refused))
                return
            code, _ = grpc_refusal(refused)
            self.call.send(grpc_frame(stream_pb2.Payload(
                eventType=stream_pb2.EventType(type=REFUSED_TYPE),
                data=json.dumps({**refused.answer(), "code": code.name})).SerializeToString()))
            return
        self.subscribed = True
        if grant is not None and self.expiry is None:
            self.expiry = asyncio.get_running_loop().call_later(max(0.0, grant.expires - time.time()), self.expire)
        self.proxy.hub.resubscribe(self.sub, topics)  # a new request replaces the set; empty unsubscribes

    def expire(self) -> None:
        """The token expired: end the stream unless what it reads now is public."""
        try:
            self.proxy.auth.check(self.sub.topics, None)
        except Refused:
            expire(self.proxy, self.sub)


def native_subscribe(proxy: Proxy) -> Opener:
    """Neoplasma's native batched stream, `neoplasma.v1.Subscriber/Subscribe`."""
    cfg = proxy.config

    def subscribe(call: Call, message: bytes) -> None:
        if proxy.refusing():
            refuse(call, proxy)
            return
        request = pb.SubscribeRequest.FromString(message)
        try:
            topics = check_topics(request.topics, cfg.max_topic_length, cfg.max_topics_per_subscription)
            proxy.check_room(topics)
        except (InvalidTopic, LimitExceeded) as error:
            call.end(*refusal(error, "Subscribe", "subscription"))
            return
        if not topics:
            call.end(grpc.StatusCode.INVALID_ARGUMENT, "subscription refused: no topics given")
            return
        try:  # a resumed subscription is checked like a new one: resume tokens carry positions, not topics
            grant = proxy.auth.check(topics, bearer(call.authorization))
        except Refused as refused:
            _refused(proxy, "batch", refused)
            call.end(*grpc_refusal(refused))
            return
        sub = BatchSubscriber(call, cfg.max_grpc_buffer)
        sink = BatchSink(sub, cfg.grpc_keepalive)
        resuming = proxy.subscribe(sub, topics, request.resume_token, sink)
        _attach(call, sub, proxy, resuming, expire_at(proxy, grant, sub))

    return unary(subscribe)


class Health:
    """grpc.health.v1.Health (Check and Watch) for the whole server (service "")."""

    def __init__(self) -> None:
        self.status = health_pb2.HealthCheckResponse.SERVING
        self.watchers: set[Call] = set()

    def set(self, status: health_pb2.HealthCheckResponse.ServingStatus.ValueType) -> None:
        self.status = status
        for call in self.watchers:
            call.send(self._answer(""))

    def _answer(self, service: str) -> bytes:
        status = self.status if not service else health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
        return grpc_frame(health_pb2.HealthCheckResponse(status=status).SerializeToString())

    def routes(self) -> dict[str, Opener]:
        def check(call: Call, message: bytes) -> None:
            service = health_pb2.HealthCheckRequest.FromString(message).service
            if service:
                call.end(grpc.StatusCode.NOT_FOUND, f"unknown service {service}")
            else:
                call.send(self._answer(""))
                call.end()

        def watch(call: Call, message: bytes) -> None:
            call.send(self._answer(health_pb2.HealthCheckRequest.FromString(message).service))
            self.watchers.add(call)
            call.done = lambda: self.watchers.discard(call)

        return {"/grpc.health.v1.Health/Check": unary(check), "/grpc.health.v1.Health/Watch": unary(watch)}


def subscriber_server(proxy: Proxy, health: Health) -> GrpcServer:
    """plasma's StreamService, the native Subscriber and health, on one port."""
    cfg = proxy.config
    return GrpcServer({"/proto.StreamService/Events": PlasmaEvents.open(proxy),
                       "/neoplasma.v1.Subscriber/Subscribe": native_subscribe(proxy), **health.routes()},
                      cfg.max_message_bytes, cfg.grpc_keepalive, cfg.max_streams_per_connection)


def control_server(servicer: pb_grpc.ProxyControlServicer, tokens: Tokens | None) -> grpc.aio.Server:
    """A gRPC server (ports not yet added) for ProxyControl, refusing callers without the cluster
    credential: a single proxy's, a worker's private one, or a pod supervisor's."""
    control = grpc.aio.server(interceptors=[Guard({"/neoplasma.v1.ProxyControl/": Rule(tokens, CREDENTIAL_REQUIRED)})],
                              options=[("grpc.so_reuseport", 0)])
    pb_grpc.add_ProxyControlServicer_to_server(servicer, control)
    return control


class ApplyStreams:
    """A control server's ApplyStream calls: each membership read from one is answered, in order, with `apply`'s answer
    (Apply's), until the operator ends the stream. One that cannot be decoded ends that stream alone, with
    INVALID_ARGUMENT (one over the server's message size limit: gRPC ends it with RESOURCE_EXHAUSTED). `end` ends them
    all before the server stops: an operator keeps one open all the time, which the stop would wait its grace for.
    Each stream is ended by its own task (between its reads and writes), never aborted from another, where the abort
    could meet an operation of the stream's own under way (ExecuteBatchError)."""

    STOPPING = "the proxy's control server is stopping"

    def __init__(self, apply: Callable[[pb.Membership], Awaitable[pb.ApplyResponse]]) -> None:
        self._apply = apply
        self._stopping = asyncio.Event()
        self._serving: set[asyncio.Future[Any]] = set()

    async def serve(self, context: grpc.aio.ServicerContext) -> None:
        if self._stopping.is_set():
            await context.abort(grpc.StatusCode.UNAVAILABLE, self.STOPPING)
        task = asyncio.current_task()
        assert task is not None
        self._serving.add(task)
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            while True:
                reading = asyncio.ensure_future(context.read())
                await asyncio.wait((reading, stopping), return_when=asyncio.FIRST_COMPLETED)
                if not reading.done():
                    reading.cancel()
                    await context.abort(grpc.StatusCode.UNAVAILABLE, self.STOPPING)
                try:
                    request = reading.result()
                except DecodeError as exc:
                    await context.abort(*refusal(exc, "ApplyStream", "membership"))
                if request is grpc.aio.EOF:
                    return
                await context.write(await self._apply(request))
        finally:
            stopping.cancel()
            self._serving.discard(task)

    async def end(self, within: float = 1.0) -> None:
        """End every open stream with UNAVAILABLE (the operator pushes again once the server is back, or elsewhere);
        return once they have ended (or after `within` seconds: the server's stop then ends what is left)."""
        self._stopping.set()
        if self._serving:
            await asyncio.wait(set(self._serving), timeout=within)


class ControlServicer(pb_grpc.ProxyControlServicer):
    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.streams = ApplyStreams(proxy.apply)

    async def Apply(self, request: pb.Membership, context: grpc.aio.ServicerContext) -> pb.ApplyResponse:  # noqa: N802
        return await self.proxy.apply(request)

    async def ApplyStream(self, request_iterator: object, context: grpc.aio.ServicerContext) -> None:  # noqa: N802
        await self.streams.serve(context)

    async def Status(self, request: pb.StatusRequest, context: grpc.aio.ServicerContext) -> pb.ProxyStatus:  # noqa: N802
        return self.proxy.status()

    async def Drain(self, request: pb.DrainRequest, context: grpc.aio.ServicerContext) -> pb.DrainResponse:  # noqa: N802
        problem = drain_problem(request)
        if problem:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        proxy = self.proxy
        if request.keep_at_most:
            proxy.shed(request.keep_at_most, request.reconnects_per_second, request.hold_seconds)
        elif proxy.stopping and not proxy.draining:  # in its drain delay: the pace for when it starts
            proxy.rate = request.reconnects_per_second or proxy.rate
        else:
            proxy.drain(request.reconnects_per_second)
        return pb.DrainResponse(subscribers_remaining=len(self.proxy.hub.subscribers))


def drain_problem(request: pb.DrainRequest) -> str:
    """What is wrong with a DrainRequest ("" for nothing): every field is checked before any is used."""
    rate, hold = request.reconnects_per_second, request.hold_seconds
    if not (rate == 0 or MIN_DRAIN_RATE <= rate <= MAX_DRAIN_RATE):  # NaN fails both
        return (f"reconnects_per_second must be a positive number from {MIN_DRAIN_RATE} to {MAX_DRAIN_RATE:g} "
                f"(0: the proxy's default), not {rate}")
    if request.keep_at_most > MAX_KEEP:
        return f"keep_at_most must be at most {MAX_KEEP} (0: drain every subscriber), not {request.keep_at_most}"
    if not 0 <= hold <= MAX_HOLD:  # NaN fails too
        return f"hold_seconds must be between 0 and {MAX_HOLD:g} (0: {DEFAULT_HOLD:g} s), not {hold}"
    if hold and not request.keep_at_most:
        return "hold_seconds is for a limit (keep_at_most); a drain (keep_at_most 0) lasts until the proxy stops"
    return ""


# -- HTTP --------------------------------------------------------------------------


class ProxyCollector(Collector):
    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy

    def collect(self) -> Iterator[Metric]:
        hub = self.proxy.hub
        subs = GaugeMetricFamily("neoplasma_proxy_subscribers", "Connected subscribers", labels=["kind"])
        for kind, n in hub.counts().items():
            subs.add_metric([kind], n)
        yield subs
        yield CounterMetricFamily("neoplasma_proxy_events_received", "Events received from brokers",
                                  value=hub.events_received)
        yield CounterMetricFamily("neoplasma_proxy_deliveries", "Events delivered to subscribers",
                                  value=hub.deliveries)
        yield CounterMetricFamily("neoplasma_proxy_dispatch_rounds", "Dispatch rounds (each writes what came since "
                                  "the last to its subscribers: much of the proxy's work is per round)",
                                  value=hub.rounds)
        yield CounterMetricFamily("neoplasma_proxy_slow_subscribers_dropped", "Subscribers dropped as too slow",
                                  value=hub.slow_dropped)
        yield GaugeMetricFamily("neoplasma_proxy_membership_version", "Applied membership version",
                                value=self.proxy.links.applied.version)
        yield GaugeMetricFamily("neoplasma_proxy_topics", "Topics subscribed locally", value=hub.topic_count())
        ended = CounterMetricFamily("neoplasma_proxy_subscriber_auth", "Subscriptions refused (unauthenticated, "
                                    "forbidden) and streams ended at their token's expiry (expired)",
                                    labels=["outcome"])
        for outcome, n in self.proxy.auth_outcomes.items():
            ended.add_metric([outcome], n)
        yield ended
        yield GaugeMetricFamily("neoplasma_proxy_draining", "1 while the proxy drains its subscribers",
                                value=self.proxy.draining)
        yield GaugeMetricFamily("neoplasma_proxy_pointer_journal_bytes", "Bytes the journal of SSE pointer ids "
                                "counts (--pointer-journal-bytes bounds it)", value=hub.journal.bytes)
        yield from hub.metrics.families()


SSE_PATHS = ("/", "/events")  # where the SSE port serves subscriptions


@dataclass(frozen=True, slots=True)
class SseAdmission:
    """An SSE subscription that may start: its topics, its token's grant (None: none needed), and the
    resume token it came with ("": none)."""

    topics: list[str]
    grant: Grant | None
    resume: str


@dataclass(frozen=True, slots=True)
class SseRefusal:
    """An SSE subscription refused before anything is streamed: a text answer, or a token's refusal."""

    status: int
    text: str = ""
    refused: Refused | None = None


def sse_admission(proxy: Proxy, query: Mapping[str, str], token: str | None, last_event_id: str | None,
                  http11: bool) -> SseAdmission | SseRefusal:
    """Whether an SSE request (its query, token, `Last-Event-ID` and whether it is HTTP/1.1 or later) may
    subscribe; the same decision for the fast path and for aiohttp (a resumed subscription is checked
    like a new one)."""
    cfg = proxy.config
    # plasma's answers, word for word, for a missing or empty query.
    if cfg.event_query not in query:
        return SseRefusal(400, "specify event queries\n")
    raw = query[cfg.event_query]
    if not raw:
        return SseRefusal(400, "event query can't be empty\n")
    try:
        topics = parse_topic_list(raw, cfg.max_topic_length, cfg.max_topics_per_subscription)
        proxy.check_room(topics)
    except (InvalidTopic, LimitExceeded) as exc:
        return SseRefusal(413 if isinstance(exc, LimitExceeded) else 400, f"{exc}\n")
    if not http11:  # SSE here is a chunked stream
        return SseRefusal(426, "server-sent events need HTTP/1.1\n")
    try:
        grant = proxy.auth.check(topics, token)
    except Refused as refused:
        return SseRefusal(refused.status, refused=refused)
    return SseAdmission(topics, grant, last_event_id or query.get("lastEventId", ""))


class SseStream:
    """An admitted SSE subscriber on its connection, whichever server read its request: in the hub (or
    catching up) from its making until `end`."""

    __slots__ = ("expiry", "proxy", "resuming", "sub")

    def __init__(self, proxy: Proxy, transport: asyncio.Transport, writer: ChunkWriter,
                 admission: SseAdmission) -> None:
        self.proxy = proxy
        self.sub = sub = SseSubscriber(transport, proxy.config.max_sse_buffer)
        proxy.hub.metrics.connected(sub.kind)
        self.resuming = proxy.subscribe(sub, admission.topics, admission.resume, SseSink(writer, sub))
        self.expiry = expire_at(proxy, admission.grant, sub)

    def end(self) -> bytes | None:
        """Take the subscriber out of the proxy (once). Returns the SSE text that ends its stream, after
        which the connection is closed; None: abort the connection (its client left, or is not told)."""
        proxy, sub = self.proxy, self.sub
        if self.resuming is not None:
            proxy.cancels.cancel(self.resuming)
        if self.expiry is not None:
            self.expiry.cancel()
        proxy.hub.remove(sub)
        proxy.hub.metrics.disconnected(sub.closed_as)
        reason = sub.closed_as
        if sub.transport.is_closing():
            return None
        # The connection is closed after the stream: a moved client (a browser too) reconnecting over the
        # same keep-alive connection would reach this proxy again, as kube-proxy and most load balancers pick
        # a backend per connection, not per request; an expired one comes back on a new one as well.
        if reason in MOVED:
            return b"retry: %d\n\n" % proxy.config.drain_retry_ms
        if reason == "expired":
            return SSE_EXPIRED
        return None


class FastSseStream(SseStream):
    """An SseStream on the fast path's connection: it ends the connection itself when the proxy closes
    the subscriber, and is ended by the connection's loss."""

    __slots__ = ("conn",)

    def __init__(self, proxy: Proxy, conn: FastPath, transport: asyncio.Transport, admission: SseAdmission) -> None:
        super().__init__(proxy, transport, conn, admission)
        self.conn = conn
        conn.stream = self
        self.sub.closed.add_done_callback(self._closed)

    def _closed(self, _: asyncio.Future[str]) -> None:
        conn = self.conn
        if conn.stream is not self:  # the connection was lost first
            return
        conn.stream = None
        final = self.end()
        transport = self.sub.transport
        if final is None:
            transport.abort()
        else:
            transport.write(http_chunk(final) + LAST_CHUNK)
            transport.close()

    def lost(self) -> None:
        self.sub.closed.remove_done_callback(self._closed)
        self.end()


def sse_fast_path(proxy: Proxy) -> Serve:
    """The fast path's subscribe: a `GET` of SSE_PATHS that `sse_admission` admits, while the proxy takes
    subscribers, is answered here (the answer aiohttp gives, byte for byte but the date); anything else
    is aiohttp's (False), a decided one with its decision (`FastPath.decision`: not decided again)."""
    cfg = proxy.config
    ok = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
          b"Connection: keep-alive\r\nAccess-Control-Allow-Origin: %s\r\nTransfer-Encoding: chunked\r\n"
          % cfg.origin.encode())
    retry = b"\r\n" + http_chunk(b"retry: %d\n" % cfg.retry_ms)

    def serve(head: Head, conn: FastPath) -> bool:
        if head.path not in SSE_PATHS:
            return False
        headers, query = head.headers, head.query
        token = http_token(headers.get("authorization"), query, headers.get("cookie"))
        admission = sse_admission(proxy, query, token, headers.get("last-event-id"), http11=True)
        if isinstance(admission, SseRefusal) or proxy.refusing():
            conn.decision = (head.target, admission)
            return False
        transport = conn.transport
        assert transport is not None  # (data came from it)
        transport.write(ok + date_header() + retry)
        FastSseStream(proxy, conn, transport, admission)
        return True

    return serve


def sse_deferral(proxy: Proxy) -> Defer:
    """A resuming subscriber's request (with `Last-Event-ID` or `lastEventId`) on the fast path waits for the
    proxy's turns while they contend (catch-up, other resumes' set-up): a thousand resumes at once are admitted
    a slice at a time, behind live events. A plain subscribe is served at once while nothing waits for a turn
    and a slice's worth at most per pass of the loop (`Turns.take`), the rest in turns too: a thousand read in
    one pass held the loop (honest subscribers' events) for tens of milliseconds."""
    admissions = proxy.resumes.admissions

    def defer(head: Head, conn: FastPath) -> bool:
        if head.headers.get("last-event-id") or head.query.get("lastEventId"):
            if not admissions.busy():
                return False
        elif head.path not in SSE_PATHS or (not len(admissions) and admissions.turns.take()):
            return False
        admissions.push(partial(conn.offer, head))
        return True

    return defer


def sse_port(proxy: Proxy, app: web.Application, sock: socket.socket, fast: bool = True) -> HttpServer:
    """The SSE port's server on `sock`: the fast path first (unless not `fast`), aiohttp for the rest."""
    cfg = proxy.config
    return HttpServer(app, sock, cfg.header_timeout, backlog=cfg.listen_backlog,
                      front=sse_front(proxy) if fast else None, handler_cancellation=True,
                      max_field_size=MAX_HEADER_BYTES, max_line_size=MAX_REQUEST_LINE)


def sse_front(proxy: Proxy) -> Front:
    """The SSE port's connections: the fast path first (`sse_fast_path`), aiohttp for the rest."""
    serve, defer = sse_fast_path(proxy), sse_deferral(proxy)

    def front(handler: Callable[[], asyncio.Protocol]) -> FastPath:
        return FastPath(serve, handler, MAX_REQUEST_LINE, MAX_HEADER_BYTES, FAST_HEAD_LIMIT, defer)

    return front


def http_app(proxy: Proxy, registry: CollectorRegistry, place: Place | None = None) -> web.Application:
    cfg = proxy.config

    async def sse(request: web.Request) -> web.StreamResponse:
        await proxy.resumes.turns.turn()  # a burst of new connections is set up behind live events
        query = request.query
        admission: SseAdmission | SseRefusal | None = handed_decision(request.transport, request.raw_path)
        if admission is None:  # not decided by the fast path
            admission = sse_admission(proxy, query, http_token(request.headers.get("Authorization"), query,
                                                               request.headers.get("Cookie")),
                                      request.headers.get("Last-Event-ID"), request.version >= (1, 1))
        if isinstance(admission, SseRefusal):
            if (refused := admission.refused) is not None:
                _refused(proxy, "sse", refused, path=without_token(request.path_qs))
                return web.json_response(refused.answer(), status=refused.status, headers={
                    "WWW-Authenticate": challenge(refused), "Access-Control-Allow-Origin": cfg.origin,
                    "Cache-Control": "no-store"})
            upgrade = {"Upgrade": "HTTP/1.1", "Connection": "Upgrade"} if admission.status == 426 else None
            return web.Response(status=admission.status, text=admission.text, headers=upgrade)
        response = web.StreamResponse(headers={
            "Content-Type": "text/event-stream", "Cache-Control": "no-cache",
            "Connection": "keep-alive", "Access-Control-Allow-Origin": cfg.origin,
        })
        response.enable_chunked_encoding()
        await response.prepare(request)
        if proxy.refusing():  # never a non-200 (EventSource would give up): come back soon, elsewhere
            response.force_close()  # (see SseStream.end: elsewhere needs a new connection)
            await response.write(b"retry: %d\n\n" % cfg.drain_retry_ms)
            await response.write_eof()
            return response
        await response.write(b"retry: %d\n" % cfg.retry_ms)
        transport = request.transport
        if transport is None:
            return response
        stream = SseStream(proxy, transport, response, admission)
        try:
            await stream.sub.closed
        finally:
            final = stream.end()
        if final is None:
            transport.abort()
        else:
            response.force_close()
            await response.write(final)
            await response.write_eof()
        return response

    async def healthz(request: web.Request) -> web.Response:
        """Readiness: fails while draining, and while full under a rebalance's limit."""
        if not proxy.ready:
            return web.Response(status=503, text="draining\n")
        if proxy.full():
            return web.Response(status=503, text="full: subscribers are being spread over the proxies\n")
        return web.Response(text="ok\n")

    async def livez(request: web.Request) -> web.Response:
        """Liveness: serving (a proxy that is not ready, draining or full, is alive)."""
        return web.Response(text="ok\n")

    async def metrics(request: web.Request) -> web.Response:
        body = await metrics_body(place, lambda: generate_latest(registry), POD_METRICS)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/", sse)
    app.router.add_get("/events", sse)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/hc", healthz)  # plasma's health check path
    app.router.add_get("/livez", livez)
    app.router.add_get("/metrics", metrics)
    return app


# -- process -----------------------------------------------------------------------


def static_snapshot(addresses: list[str]) -> Snapshot:
    """Membership version 0 from `--brokers`: replaced by the first pushed version."""
    return Snapshot(0, tuple(sorted(Member(a, a) for a in addresses)))


async def _heartbeat(proxy: Proxy) -> None:
    while True:
        await asyncio.sleep(proxy.config.heartbeat_seconds)
        await proxy.hub.heartbeat_sse(HEARTBEAT)
        proxy.hub.journal.evict(time.monotonic())  # (rounds evict it too; a quiet proxy's ages out here)
        if proxy.links.settled():  # (a large interest's removal written and acknowledged: its buffers freed too)
            proxy.hub.give_back_memory()


class ProxyService:
    """`neoplasma proxy` (one process, or one of a pod's workers) for neoplasma.core.lifecycle: on a
    stop, fail readiness, let load balancers see it (drain_delay), move subscribers away at a paced
    rate, stop."""

    kind = "proxy"

    def __init__(self, config: ProxyConfig) -> None:
        self.config = config
        self.place = Place.here()  # one of a pod's workers (neoplasma.proxy.pod), or None: the whole proxy
        self.proxy = Proxy(config)
        self.health = Health()
        self.own_metrics: HttpServer | None = None

    async def start(self) -> dict[str, Any]:
        config, proxy, place = self.config, self.proxy, self.place
        if config.brokers:
            await proxy.links.apply(static_snapshot(config.brokers))
        self.subscribers = subscriber_server(proxy, self.health)
        grpc_socket = bind_socket(config.host, config.grpc_port, "--grpc-port", reuse_port=place is not None,
                                  backlog=config.listen_backlog)
        grpc_port = grpc_socket.getsockname()[1]
        self.control_servicer = ControlServicer(proxy)
        self.control = control_server(self.control_servicer, proxy.access.tokens)
        if place is None:
            control_address = hostport(config.host, add_grpc_port(
                self.control, config.host, config.control_port, "--control-port",
                grpc_server_credentials(server_tls(config.tls_cert, config.tls_key))))
        else:  # the pod's control port is its supervisor's, which relays to this private one
            control_address = place.control()
            self.control.add_insecure_port(control_address)
        await self.subscribers.start(grpc_socket, config.listen_backlog)
        proxy.hub.gathered = self.subscribers.gathered
        await self.control.start()

        registry = CollectorRegistry()
        registry.register(ProxyCollector(proxy))
        ProcessCollector(registry=registry)  # process_open_fds and process_max_fds: how near the open-file limit
        self.http = sse_port(proxy, http_app(proxy, registry, place),
                             bind_socket(config.host, config.http_port, "--http-port", reuse_port=place is not None,
                                         backlog=config.listen_backlog))
        await self.http.start()
        if place is not None:
            self.own_metrics = await serve_own_metrics(place, lambda: generate_latest(registry), config.header_timeout)
        self.tasks = [asyncio.create_task(_heartbeat(proxy)),
                      asyncio.create_task(proxy.hub.run_dispatcher(config.linger_seconds,
                                                                   max_linger=config.max_linger_seconds))]
        if config.checkpoint_seconds:
            self.tasks.append(asyncio.create_task(proxy.links.run_checkpoints(config.checkpoint_seconds)))
        return {"name": config.name, "http": hostport(config.host, self.http.port),
                "grpc": hostport(config.host, grpc_port), "control": control_address}

    async def quiesce(self) -> None:
        config, proxy = self.config, self.proxy
        proxy.ready, proxy.stopping, proxy.limit = False, True, None
        if not proxy.draining:  # (a shed's pace is not the drain's; the operator may give one during the delay)
            proxy.rate = config.drain_rate
        self.health.set(health_pb2.HealthCheckResponse.NOT_SERVING)
        if config.drain_delay:
            log.info("proxy_unready", subscribers=len(proxy.hub.subscribers), drain_in=config.drain_delay)
            await asyncio.sleep(config.drain_delay)
        proxy.drain(proxy.rate, config.drain_within)  # the pace the operator gave meanwhile, if it did

    def deadline(self) -> float:
        return max(5.0, (self.config.drain_within or len(self.proxy.hub.subscribers) / self.proxy.rate) + 5.0)

    async def drained(self) -> None:
        await self.proxy.drained()

    def pending(self) -> dict[str, Any]:
        return {"subscribers": len(self.proxy.hub.subscribers)}

    async def close(self) -> dict[str, Any]:
        for task in self.tasks:
            task.cancel()
        self.subscribers.stop(SHUTTING_DOWN)
        await self.control_servicer.streams.end()
        await self.control.stop(grace=0.5)
        await self.proxy.links.close()
        await self.http.stop()
        if self.own_metrics is not None:
            await self.own_metrics.stop()
        return {"deliveries": self.proxy.hub.deliveries}
