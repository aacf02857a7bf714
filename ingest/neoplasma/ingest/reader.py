"""`neoplasma ingest-redis`: plasma's Redis Pub/Sub channels read into the cluster's brokers.

Each message is checked as an HTTP publish body is (plasma's `{"meta": {"type": T}, "data": D}`,
or a list of them); bad ones are counted by kind and logged once per kind with a sample. Good
ones are batched into broker publishes (neoplasma.ingest.publisher). Of the readers sharing a
lease only the holder subscribes (neoplasma.ingest.lease); the others wait, subscribed to
nothing. Redis Pub/Sub keeps no messages: what is published while no reader is subscribed (Redis
down, a hand-over) is lost, as it is for plasma.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from neoplasma.core.aio import Signal
from neoplasma.core.backoff import Backoff, BackoffPolicy
from neoplasma.core.events import InvalidEvent, parse_publish_body
from neoplasma.core.logs import get_logger
from neoplasma.core.net import bind_socket, hostport
from neoplasma.core.trust import Tokens, http_ssl_context
from neoplasma.ingest.lease import Lease, LeaseClock, RedisLease
from neoplasma.ingest.publisher import BrokerPublisher, Outcome
from neoplasma.ingest.resp import Connection, RedisAddress, RedisError
from neoplasma.ingest.settings import IngestConfig

log = get_logger("ingest")

REDIS_BACKOFF = BackoffPolicy(initial=0.2, maximum=10.0, jitter=True)
MAX_KINDS = 32  # distinct kinds of bad message remembered (the rest count as "other")
SAMPLE_BYTES = 200
SUBSCRIBED = (b"subscribe", b"psubscribe")
NOT_SUBSCRIBED = "not subscribed yet"


def rejection_kind(error: InvalidEvent) -> str:
    """A bad message's kind: its error without positions, numbers and details ("data is N bytes...")."""
    text = re.sub(r"^event \d+: ", "", str(error))
    return re.sub(r"\d+", "N", text.split(": ")[0] if ": " in text else text)[:80]


def message_payload(reply: Any) -> bytes | None:
    """The payload of a subscribed connection's reply, None for anything but a message."""
    if isinstance(reply, list):
        if len(reply) == 3 and reply[0] == b"message":
            return bytes(reply[2])
        if len(reply) == 4 and reply[0] == b"pmessage":
            return bytes(reply[3])
    return None


def readiness(active: bool, redis_error: str | None, lease_error: str | None, brokers_up: int,
              subscribed: bool = True) -> tuple[bool, str]:
    """Whether the reader is ready, and why (pure). An active reader is ready only once Redis confirmed
    its subscriptions: what is published before then is not read."""
    if lease_error:
        return False, f"cannot reach the lease: {lease_error}"
    if not active:
        return True, "standby: another reader holds the lease"
    if redis_error:
        return False, f"cannot read Redis: {redis_error}"
    if not subscribed:
        return False, "subscribing to Redis"
    if not brokers_up:
        return False, "no broker accepts publishes"
    return True, "active: reading Redis"


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.messages_in = Counter("neoplasma_ingest_messages_in", "Messages read from Redis", registry=r)
        self.rejected = Counter("neoplasma_ingest_messages_rejected", "Messages refused as invalid, by kind",
                                ["kind"], registry=r)
        self.published = Counter("neoplasma_ingest_events_published", "Events accepted by a broker", registry=r)
        self.dropped = Counter("neoplasma_ingest_events_dropped", "Events dropped: buffer full, no broker",
                               registry=r)
        self.reconnects = Counter("neoplasma_ingest_reconnects", "Connections to Redis lost or refused", registry=r)
        self.lag = Histogram("neoplasma_ingest_lag_seconds", "From reading a batch's first event to its acceptance",
                             buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
                             registry=r)
        self.active = Gauge("neoplasma_ingest_active", "1 while this reader holds the lease and reads", registry=r)
        self.buffered = Gauge("neoplasma_ingest_buffered", "Events read and not yet accepted by a broker",
                              registry=r)
        self.brokers_up = Gauge("neoplasma_ingest_brokers_up", "Brokers not failing publishes", registry=r)


class Ingest:
    def __init__(self, config: IngestConfig, address: RedisAddress, lease: Lease | None) -> None:
        self.config = config
        self.address = address
        self.lease = lease
        self.clock = LeaseClock(lease.ttl if lease else 0.0)
        self.metrics = Metrics()
        self.publisher = BrokerPublisher(config.brokers, config.broker_access(), batch_events=config.batch_events,
                                         linger=config.batch_ms / 1000, in_flight=config.in_flight,
                                         buffer_events=config.buffer_events, timeout=config.publish_timeout,
                                         done=self._published)
        self.changed = Signal()  # the lease was taken or lost
        self.redis_error: str | None = NOT_SUBSCRIBED
        self.lease_error: str | None = None
        self.kinds: set[str] = set()
        self.stopping = False
        self._dropped = 0
        self.subscribed = False  # Redis confirmed every SUBSCRIBE/PSUBSCRIBE of the current connection

    @property
    def active(self) -> bool:
        return not self.stopping and (self.lease is None or self.clock.holds(time.monotonic()))

    # -- checking ------------------------------------------------------------------------

    def take(self, replies: list[Any], read_at: float) -> None:
        cfg = self.config
        events = []
        count = 0
        for reply in replies:
            payload = message_payload(reply)
            if payload is None:
                continue
            count += 1
            try:
                events += parse_publish_body(payload, max_bytes=cfg.max_event_bytes,
                                             max_topic_length=cfg.max_topic_length)
            except InvalidEvent as exc:
                self._reject(exc, payload)
        self.metrics.messages_in.inc(count)
        if events:
            self.publisher.put(events, read_at)
            if self.publisher.dropped != self._dropped:
                self.metrics.dropped.inc(self.publisher.dropped - self._dropped)
                self._dropped = self.publisher.dropped

    def _reject(self, error: InvalidEvent, payload: bytes) -> None:
        kind = rejection_kind(error)
        if kind not in self.kinds:
            if len(self.kinds) >= MAX_KINDS:
                kind = "other"
            else:
                self.kinds.add(kind)
                log.warning("message_rejected", kind=kind, error=str(error)[:SAMPLE_BYTES],
                            sample=payload[:SAMPLE_BYTES].decode("utf-8", "replace"))
        self.metrics.rejected.labels(kind).inc()

    def _published(self, outcome: Outcome) -> None:
        if outcome.published:
            self.metrics.published.inc(outcome.published)
            self.metrics.lag.observe(outcome.lag)
        if outcome.refused:
            self.metrics.rejected.labels("refused by broker").inc(outcome.refused)

    # -- the lease -----------------------------------------------------------------------

    async def keep_lease(self, lease: Lease) -> None:
        """Take or renew the lease every ttl/3 until stopping; lose it when renewals fail."""
        while not self.stopping:
            was = self.active
            sent_at = time.monotonic()
            try:
                if await lease.hold():
                    self.clock.renewed(sent_at)
                else:
                    self.clock.lost()
                self.lease_error = None
            except (OSError, RedisError, TimeoutError) as exc:
                self.lease_error = str(exc) or type(exc).__name__
            if self.active != was:
                log.info("lease_taken" if self.active else "lease_lost", reader=self.config.name)
                self.changed.notify()
            await self.changed.wait_until(lambda: self.stopping, lease.ttl / 3)
        self.changed.notify()

    # -- reading -------------------------------------------------------------------------

    async def run(self) -> None:
        """Read Redis while active, until stopping."""
        while not self.stopping:
            self.metrics.active.set(0)
            if not await self.changed.wait_until(lambda: self.active or self.stopping, self._tick()):
                continue
            if self.stopping:
                return
            self.metrics.active.set(1)
            self.redis_error = NOT_SUBSCRIBED
            reading = asyncio.create_task(self.read())
            while self.active:  # read() ends only when cancelled
                await self.changed.wait_until(lambda: not self.active, self._tick())
            reading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reading

    def _tick(self) -> float:
        """How often to look at the lease clock, which runs out without a notify."""
        return self.lease.ttl / 6 if self.lease else 3600.0

    async def read(self) -> None:
        """Subscribe and read until cancelled, reconnecting with backoff."""
        backoff = Backoff(REDIS_BACKOFF)
        cfg = self.config
        while True:
            conn = None
            try:
                conn = await Connection.open(self.address, 5.0)
                for command, names in (("SUBSCRIBE", cfg.channels), ("PSUBSCRIBE", cfg.patterns)):
                    if names:
                        conn.send(command, *names)
                unconfirmed = len(cfg.channels) + len(cfg.patterns)
                while True:
                    replies = await conn.replies()
                    if unconfirmed:
                        unconfirmed -= sum(isinstance(r, list) and r[0] in SUBSCRIBED for r in replies)
                        if not unconfirmed:
                            log.info("redis_subscribed", redis=str(self.address), channels=cfg.channels,
                                     patterns=cfg.patterns)
                            self.redis_error = None
                            self.subscribed = True
                            backoff.succeeded()
                    self.take(replies, time.monotonic())
            except (OSError, RedisError, TimeoutError) as exc:
                self.redis_error = str(exc) or type(exc).__name__
                self.metrics.reconnects.inc()
                delay = backoff.failed(time.monotonic())
                log.warning("redis_unavailable", redis=str(self.address), error=self.redis_error,
                            retry_in=round(delay, 2))
                await asyncio.sleep(delay)
            finally:
                self.subscribed = False
                if conn is not None:
                    conn.close()

    # -- health --------------------------------------------------------------------------

    def health(self) -> tuple[bool, dict[str, Any]]:
        ready, reason = readiness(self.active, self.redis_error, self.lease_error, self.publisher.brokers_up(),
                                  self.subscribed)
        return ready, {"ready": ready, "reason": reason, "active": self.active, "name": self.config.name}

    def stats(self) -> dict[str, Any]:
        """/stats: health and what it is made of (what the operator's IngestReady condition reads)."""
        return {**self.health()[1], "redis": str(self.address), "redis_error": self.redis_error,
                "lease_error": self.lease_error, "brokers_up": self.publisher.brokers_up(),
                "buffered": self.publisher.pending()}

    def refresh(self) -> None:
        self.metrics.buffered.set(self.publisher.pending())
        self.metrics.brokers_up.set(self.publisher.brokers_up())


def http_app(ingest: Ingest, credential: Tokens | None) -> web.Application:
    """/healthz for readiness, /livez for liveness, /metrics for Prometheus (open, as brokers' and
    proxies' are), and /stats for the operator, which only holders of the cluster credential may read."""

    async def stats(request: web.Request) -> web.Response:
        if credential is not None and not credential.allows(request.headers.get("Authorization")):
            return web.json_response({"error": "the cluster credential is required (Authorization: Bearer TOKEN)"},
                                     status=401, headers={"WWW-Authenticate": "Bearer"})
        return web.json_response(ingest.stats())

    async def healthz(request: web.Request) -> web.Response:
        ready, body = ingest.health()
        return web.json_response(body, status=200 if ready else 503)

    async def livez(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")  # the process answers, whether or not Redis does

    async def metrics(request: web.Request) -> web.Response:
        ingest.refresh()
        return web.Response(body=generate_latest(ingest.metrics.registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/livez", livez)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/stats", stats)
    return app


class IngestService:
    """`neoplasma ingest-redis` for neoplasma.core.lifecycle: on a stop, stop reading, hand the
    lease over, then publish what was read (within drain_timeout)."""

    kind = "ingest"

    def __init__(self, config: IngestConfig) -> None:
        self.config = config
        address = config.address()
        self.lease = (RedisLease(address, config.lease_key, config.name, config.lease_ttl)
                      if config.lease == "redis" else None)
        self.ingest = Ingest(config, address, self.lease)

    async def start(self) -> dict[str, Any]:
        config, ingest = self.config, self.ingest
        sock = bind_socket(config.host, config.http_port, "--http-port")
        self.runner = web.AppRunner(http_app(ingest, config.cluster_tokens()), access_log=None, handle_signals=False)
        await self.runner.setup()
        await web.SockSite(self.runner, sock, ssl_context=http_ssl_context(config.tls_cert, config.tls_key)).start()
        self.reading = asyncio.create_task(ingest.run())
        self.publishing = asyncio.create_task(ingest.publisher.run())
        self.leasing = asyncio.create_task(ingest.keep_lease(self.lease)) if self.lease is not None else None
        return {"name": config.name, "redis": str(ingest.address), "http": hostport(config.host, sock.getsockname()[1])}

    async def quiesce(self) -> None:
        self.ingest.stopping = True
        self.ingest.changed.notify()
        await self.reading
        if self.lease is not None and self.leasing is not None:
            await self.leasing
            with contextlib.suppress(OSError, RedisError, TimeoutError):
                await self.lease.release()
            self.lease.close()

    def deadline(self) -> float:
        return self.config.drain_timeout

    async def drained(self) -> None:
        while not await self.ingest.publisher.flushed(60.0):
            pass

    def pending(self) -> dict[str, Any]:
        return {"pending": self.ingest.publisher.pending()}

    async def close(self) -> dict[str, Any]:
        self.publishing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.publishing
        await self.runner.cleanup()
        return {"name": self.config.name}
