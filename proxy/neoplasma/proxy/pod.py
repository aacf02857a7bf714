"""A proxy pod of several workers (`neoplasma proxy --workers N`, neoplasma.core.workers).

Every worker is a whole proxy (its own links to every broker, its own subscribers: the kernel
spreads subscriber connections over them). The supervisor owns the pod's one control port: it
relays a membership push (Apply, or each message of ApplyStream) and a drain to every worker,
answers Status as the sum of the workers', and pushes the last membership to a worker as soon as
it (re)starts, so none waits for the operator's next push.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from typing import Any

import grpc

from neoplasma.core.logs import get_logger
from neoplasma.core.net import add_grpc_port, bind_socket, hostport
from neoplasma.core.trust import Metadata, Tokens, grpc_server_credentials, server_tls
from neoplasma.core.workers import Supervisor, Worker, worker_argv
from neoplasma.proxy.server import ApplyStreams, control_server, drain_problem
from neoplasma.proxy.settings import ProxyConfig
from neoplasma.wire.v1 import neoplasma_pb2 as pb
from neoplasma.wire.v1 import neoplasma_pb2_grpc as pb_grpc

log = get_logger("proxy")

_CONNECTED = pb.BrokerLink.CONNECTED


def merge_links(per_worker: Sequence[Sequence[pb.BrokerLink]]) -> list[pb.BrokerLink]:
    """The pod's links: one per broker, connected and synced only when every worker's is."""
    merged: dict[str, pb.BrokerLink] = {}
    seen: dict[str, int] = {}
    for links in per_worker:
        for link in links:
            seen[link.name] = seen.get(link.name, 0) + 1
            if link.name not in merged:
                merged[link.name] = pb.BrokerLink()
                merged[link.name].CopyFrom(link)
                continue
            pod = merged[link.name]
            pod.events_received += link.events_received
            pod.interest_synced = pod.interest_synced and link.interest_synced
            if pod.state == _CONNECTED and link.state != _CONNECTED:
                pod.state = link.state
            pod.last_error = pod.last_error or link.last_error
    for name, link in merged.items():
        if seen[name] < len(per_worker):  # some worker has no link to it (yet)
            link.interest_synced = False
            if link.state == _CONNECTED:
                link.state = pb.BrokerLink.CONNECTING
    return sorted(merged.values(), key=lambda link: link.name)


def sum_status(name: str, statuses: Sequence[pb.ProxyStatus]) -> pb.ProxyStatus:
    """The pod's status: counts summed over its workers, the membership version all have applied,
    the topics of its busiest worker (a topic on several workers is one topic)."""
    return pb.ProxyStatus(
        name=name, subscribers=sum(s.subscribers for s in statuses),
        sse_subscribers=sum(s.sse_subscribers for s in statuses),
        grpc_subscribers=sum(s.grpc_subscribers for s in statuses),
        movable_subscribers=sum(s.movable_subscribers for s in statuses),
        membership_version=min((s.membership_version for s in statuses), default=0),
        links=merge_links([s.links for s in statuses]),
        events_received=sum(s.events_received for s in statuses), deliveries=sum(s.deliveries for s in statuses),
        slow_subscribers_dropped=sum(s.slow_subscribers_dropped for s in statuses),
        topics=max((s.topics for s in statuses), default=0), draining=any(s.draining for s in statuses))


def merge_applied(replies: Sequence[pb.ApplyResponse]) -> pb.ApplyResponse:
    """The pod's answer to a push: accepted when every worker accepted it."""
    return pb.ApplyResponse(
        applied_version=min((r.applied_version for r in replies), default=0),
        accepted=bool(replies) and all(r.accepted for r in replies),
        reason=next((r.reason for r in replies if r.reason), ""), links=merge_links([r.links for r in replies]))


class PodControl(pb_grpc.ProxyControlServicer):
    """The pod's ProxyControl: relayed to every worker's private control server."""

    def __init__(self, config: ProxyConfig, tokens: Tokens | None) -> None:
        self.config = config
        self.tokens = tokens
        self.supervisor: Supervisor | None = None
        self.membership: pb.Membership | None = None  # the newest one a worker accepted
        self._stubs: dict[int, tuple[tuple[str, int], grpc.aio.Channel, pb_grpc.ProxyControlStub]] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self.streams = ApplyStreams(self.apply)

    def _metadata(self) -> Metadata:
        return self.tokens.metadata() if self.tokens is not None else ()

    def _stub(self, worker: Worker) -> pb_grpc.ProxyControlStub:
        """The stub of this life of the worker. A restarted worker serves on the same socket path, but
        the channel to its previous life may be in reconnect backoff (calls made while it was dead
        failed to connect) and would fail every call at once, for a second or more: a new life gets a
        new channel, and the old one is closed."""
        life = (worker.endpoints["control"], worker.life)
        known = self._stubs.get(worker.index)
        if known is None or known[0] != life:
            if known is not None:
                task = asyncio.ensure_future(known[1].close())
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)
            channel = grpc.aio.insecure_channel(life[0])
            known = self._stubs[worker.index] = (life, channel, pb_grpc.ProxyControlStub(channel))
        return known[2]

    def _workers(self) -> list[Worker]:
        assert self.supervisor is not None
        return [w for w in self.supervisor.workers if w.endpoints]

    async def _apply(self, worker: Worker, request: pb.Membership, wait_for_ready: bool = False) -> pb.ApplyResponse:
        """The worker's answer to a push; a worker that cannot answer (it died, the supervisor has
        not yet seen it) has not accepted: the supervisor pushes the membership again when it is back."""
        try:
            reply: pb.ApplyResponse = await self._stub(worker).Apply(
                request, timeout=10, metadata=self._metadata(), wait_for_ready=wait_for_ready)
        except grpc.aio.AioRpcError as exc:
            log.warning("worker_unreachable", worker=worker.index, call="Apply", error=exc.code().name)
            return pb.ApplyResponse(accepted=False, reason=f"proxy worker {worker.index} did not answer "
                                                           f"({exc.code().name}); it is being restarted, retry")
        return reply

    async def _status(self, worker: Worker, request: pb.StatusRequest) -> pb.ProxyStatus:
        """The worker's status; a worker that cannot answer counts as one with nothing ready (no
        links, no membership), so the pod's status says it is not ready instead of failing."""
        try:
            status: pb.ProxyStatus = await self._stub(worker).Status(request, timeout=10, metadata=self._metadata())
        except grpc.aio.AioRpcError as exc:
            log.warning("worker_unreachable", worker=worker.index, call="Status", error=exc.code().name)
            return await self._nothing()
        return status

    async def started(self, worker: Worker) -> None:
        """A worker is serving: give it the pod's membership at once (waiting for its control
        socket to accept the connection, not failing at the first refusal)."""
        if self.membership is not None:
            await self._apply(worker, self.membership, wait_for_ready=True)

    async def close(self) -> None:
        """Close the channels to the workers."""
        channels = [known[1] for known in self._stubs.values()]
        self._stubs.clear()
        await asyncio.gather(*(channel.close() for channel in channels), *self._closing)

    async def _nothing(self) -> pb.ProxyStatus:
        return pb.ProxyStatus(name=self.config.name)

    async def apply(self, request: pb.Membership) -> pb.ApplyResponse:
        """A push (Apply's, or a message of ApplyStream) relayed to every worker: the pod's answer."""
        replies = await asyncio.gather(*(self._apply(w, request) for w in self._workers()))
        if any(r.accepted for r in replies) and (self.membership is None or request.version >= self.membership.version):
            self.membership = request
        return merge_applied(replies)

    async def Apply(self, request: pb.Membership, context: grpc.aio.ServicerContext) -> pb.ApplyResponse:  # noqa: N802
        return await self.apply(request)

    async def ApplyStream(self, request_iterator: object, context: grpc.aio.ServicerContext) -> None:  # noqa: N802
        await self.streams.serve(context)

    async def Status(self, request: pb.StatusRequest, context: grpc.aio.ServicerContext) -> pb.ProxyStatus:  # noqa: N802
        # A worker between lives (exited, or restarted and not yet serving) counts as one with
        # nothing ready: the pod is not whole until every worker is back with the membership.
        assert self.supervisor is not None
        statuses = await asyncio.gather(*(self._status(w, request) if w.endpoints else self._nothing()
                                          for w in self.supervisor.workers))
        return sum_status(self.config.name, statuses)

    async def Drain(self, request: pb.DrainRequest, context: grpc.aio.ServicerContext) -> pb.DrainResponse:  # noqa: N802
        problem = drain_problem(request)  # (before it is split: a part of a refused limit could pass)
        if problem:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        workers = self._workers()
        share = worker_share(request, len(workers))
        shares = [share] * len(workers)
        try:
            if share.keep_at_most and len(workers) > 1:  # a limit: split as the workers' unmovable subscribers allow
                statuses = await asyncio.gather(*(self._status(w, pb.StatusRequest()) for w in workers))
                shares = [_with_keep(share, keep) for keep in worker_limits(request.keep_at_most, statuses)]
            replies = await asyncio.gather(*(self._stub(w).Drain(part, timeout=10, metadata=self._metadata())
                                             for w, part in zip(workers, shares, strict=True)))
        except grpc.aio.AioRpcError as exc:  # a refused rate: every worker says the same
            await context.abort(exc.code(), exc.details() or "")
        return pb.DrainResponse(subscribers_remaining=sum(r.subscribers_remaining for r in replies))


def worker_share(request: pb.DrainRequest, workers: int) -> pb.DrainRequest:
    """One worker's part of the pod's drain or limit: the pace divided among the workers, and a
    limit of ceil(keep / workers) each (the kernel spreads new connections evenly over them; a
    limit of 0 would be a drain, so each keeps at least 1). Invalid values pass through unchanged,
    for the workers to refuse with their reason."""
    if workers < 2:
        return request
    share = pb.DrainRequest()
    share.CopyFrom(request)
    if math.isfinite(request.reconnects_per_second) and request.reconnects_per_second > 0:
        share.reconnects_per_second = request.reconnects_per_second / workers
    if request.keep_at_most:
        share.keep_at_most = max(1, math.ceil(request.keep_at_most / workers))
    return share


def worker_limits(keep: int, statuses: Sequence[pb.ProxyStatus]) -> list[int]:
    """Each worker's part of the pod's limit `keep` (the kernel spreads new connections evenly over
    them): an even level, except that a worker is never given less than it cannot shed (its
    unmovable subscribers: a limit sheds only movable ones) nor less than 1 (0 would be a drain).
    They add up to `keep` but for rounding up (at most one per worker), or to what cannot be shed
    when that is more. Without unmovable subscribers: ceil(keep / workers) each."""
    floors = [max(1, s.subscribers - s.movable_subscribers) for s in statuses]
    low, high = 0, max(keep, 1)  # the smallest level at which the parts hold `keep`
    while low < high:
        level = (low + high) // 2
        if sum(max(f, level) for f in floors) >= keep:
            high = level
        else:
            low = level + 1
    return [max(f, low) for f in floors]


def _with_keep(share: pb.DrainRequest, keep: int) -> pb.DrainRequest:
    part = pb.DrainRequest()
    part.CopyFrom(share)
    part.keep_at_most = keep
    return part


class PodService:
    """`neoplasma proxy --workers N` for neoplasma.core.lifecycle: N workers on the subscriber ports,
    one control port. On a stop each worker drains as a single proxy does (readiness, delay, paced
    reconnects); control answers until they are gone."""

    kind = "proxy"

    def __init__(self, config: ProxyConfig) -> None:
        self.config = config

    async def start(self) -> dict[str, Any]:
        config = self.config
        self.held = {flag: bind_socket(config.host, port, flag, reuse_port=True, listen=False)
                     for flag, port in (("--http-port", config.http_port), ("--grpc-port", config.grpc_port))}
        http_port, grpc_port = (int(sock.getsockname()[1]) for sock in self.held.values())
        tokens = config.cluster_tokens()
        self.pod = pod = PodControl(config, tokens)
        # The pod drains at --drain-rate: each worker at its share.
        argv = worker_argv("proxy", config.to_args(http_port=http_port, grpc_port=grpc_port, control_port=0,
                                                   workers=1, drain_rate=config.drain_rate / config.workers))
        self.supervisor = pod.supervisor = Supervisor(argv, config.workers, started=pod.started)
        self.control = control_server(pod, tokens)
        control_port = add_grpc_port(self.control, config.host, config.control_port, "--control-port",
                                     grpc_server_credentials(server_tls(config.tls_cert, config.tls_key)))
        await self.supervisor.start()
        await self.control.start()
        return {"name": config.name, "workers": config.workers, "http": hostport(config.host, http_port),
                "grpc": hostport(config.host, grpc_port), "control": hostport(config.host, control_port)}

    async def quiesce(self) -> None:
        self.supervisor.terminate()

    def deadline(self) -> float:
        return self.config.drain_delay + (self.config.drain_within or 60.0) + 5.0

    async def drained(self) -> None:
        await self.supervisor.exited()

    def pending(self) -> dict[str, Any]:
        return {"workers": len(self.supervisor.running())}

    async def close(self) -> dict[str, Any]:
        await self.supervisor.close()
        await self.pod.streams.end()
        await self.control.stop(grace=0.5)
        await self.pod.close()
        for sock in self.held.values():
            sock.close()
        return {"workers": self.config.workers}
