"""Pushing membership snapshots to proxies over their control RPC.

Used as-is by the operator and by the local runtime: one code path for both.

A proxy is pushed over its `ApplyStream`, kept open (as Envoy's xDS keeps one stream per proxy): a
message each way on an open stream costs both sides about half of a unary `Apply` call, which at
1000 proxies is most of a change's push (docs/capacity.md, "Membership push at 1000 proxies").
Where there is none, a push is a unary `Apply`: a proxy without the method (UNIMPLEMENTED: an older
one) is pushed with Apply and asked again after OLDER_PROXY seconds; a stream that broke (the proxy
restarted, or did not answer within the push's timeout: then it is closed) is reopened after a
backoff (`Reopening`, pure), with Apply meanwhile; a push whose stream ends under it is made again
with Apply within the same timeout. Opening a stream never waits for the proxy (a frozen one holds
only its own pushes), and no lock is held across a push.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass

import grpc

from neoplasma.core.backoff import Backoff, BackoffPolicy
from neoplasma.core.control import ProxyChannels
from neoplasma.core.logs import get_logger
from neoplasma.core.membership import Snapshot
from neoplasma.core.trust import PLAIN, Access
from neoplasma.wire.v1 import neoplasma_pb2 as pb
from neoplasma.wire.v1 import neoplasma_pb2_grpc as pb_grpc

log = get_logger("push")

RETRY = BackoffPolicy(initial=0.1, maximum=2.0, jitter=True)  # push_all's, per proxy
REOPEN = BackoffPolicy(initial=0.5, maximum=30.0, jitter=True)  # a proxy's stream after it broke (Apply meanwhile)
OLDER_PROXY = 300.0  # seconds a proxy that answered UNIMPLEMENTED is pushed with Apply before its stream is tried again
MAX_UNANSWERED = 16  # messages sent on a stream and not answered yet: more, and the stream is stuck (closed)


@dataclass
class PushResult:
    target: str
    address: str
    ok: bool
    applied_version: int = 0
    error: str = ""


class StreamEnded(Exception):
    """A proxy's ApplyStream ended (`code`, `details`: how) before answering a message sent on it."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code


def reach(access: Access) -> tuple[object, ...]:
    """What a stream is opened with: the credential it presented and the TLS settings of its channel (the operator
    makes a new, equal `Access` each time it reads the credential: that keeps the streams open)."""
    return access.metadata(), access.ca, access.ca_file, access.server_name


class ApplyStream:
    """One proxy's ApplyStream, kept open: messages go out in the order sent, and each answer is the answer to the
    oldest message not yet answered (the proxy answers them in order). Opening it and sending on it never wait for
    the proxy: the call connects, writes and reads in tasks of gRPC's and of its own."""

    def __init__(self, stub: pb_grpc.ProxyControlStub, access: Access) -> None:
        self.reach = reach(access)  # what it was opened with: a stream opened with another credential is replaced
        self.ended: StreamEnded | None = None
        self.ended_at = 0.0  # when (time.monotonic())
        self._requests: asyncio.Queue[pb.Membership | None] = asyncio.Queue()
        self._waiting: deque[asyncio.Future[pb.ApplyResponse]] = deque()
        self._call = stub.ApplyStream(self._each_request(), metadata=access.metadata())
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _each_request(self) -> AsyncIterator[pb.Membership]:
        while (message := await self._requests.get()) is not None:
            yield message

    def send(self, message: pb.Membership) -> asyncio.Future[pb.ApplyResponse]:
        """The proxy's answer to `message`, to come; StreamEnded (raised, or as the future's) when the stream ended
        before it."""
        if self.ended is None and len(self._waiting) >= MAX_UNANSWERED:
            self.close(f"{MAX_UNANSWERED} messages unanswered")
        if self.ended is not None:
            raise self.ended
        answer: asyncio.Future[pb.ApplyResponse] = asyncio.get_running_loop().create_future()
        self._waiting.append(answer)
        self._requests.put_nowait(message)
        return answer

    async def _read(self) -> None:
        try:
            async for reply in self._call:
                if not self._waiting:
                    self.close("the proxy answered a message never sent")
                    return
                answer = self._waiting.popleft()
                if not answer.done():  # (a push that gave up on it cancelled it)
                    answer.set_result(reply)
            self._end(StreamEnded(grpc.StatusCode.OK, "the proxy ended the stream"))
        except grpc.aio.AioRpcError as exc:
            self._end(StreamEnded(exc.code(), exc.details() or ""))
        except asyncio.CancelledError:
            self._end(StreamEnded(grpc.StatusCode.CANCELLED, "the stream was closed"))
            raise

    def _end(self, ended: StreamEnded) -> None:
        if self.ended is None:
            self.ended, self.ended_at = ended, time.monotonic()
            self._requests.put_nowait(None)  # the request iterator ends (gRPC's task reading it with it)
        while self._waiting:
            answer = self._waiting.popleft()
            if not answer.done():
                answer.set_exception(self.ended)

    def close(self, why: str) -> None:
        """End the stream (its unanswered messages fail with `why`)."""
        self._end(StreamEnded(grpc.StatusCode.CANCELLED, why))
        self._call.cancel()
        self._reader.cancel()


class Reopening:
    """When a proxy's ApplyStream may be opened again after one ended: with `policy`'s backoff after it broke, reset
    once a stream of it answers; OLDER_PROXY seconds after it answered UNIMPLEMENTED. Pure: callers pass the clock."""

    def __init__(self, policy: BackoffPolicy = REOPEN, older: float = OLDER_PROXY) -> None:
        self.policy, self.older = policy, older
        self._after: dict[str, Backoff] = {}  # address -> its streams' failures (only those with one)

    def may_open(self, address: str, now: float) -> bool:
        backoff = self._after.get(address)
        return backoff is None or backoff.due(now)

    def ended(self, address: str, code: grpc.StatusCode, now: float) -> float:
        """A stream of `address` ended (`code`); returns the seconds before another may be opened."""
        backoff = self._after.setdefault(address, Backoff(self.policy))
        delay = backoff.failed(now) if code != grpc.StatusCode.UNIMPLEMENTED else self.older
        backoff.not_before = now + delay
        return delay

    def answered(self, address: str) -> None:
        self._after.pop(address, None)

    def keep(self, addresses: set[str]) -> None:
        for address in [a for a in self._after if a not in addresses]:
            del self._after[address]


class MembershipPusher:
    """Pushes snapshots to proxies: `push_one` tries once (its caller owns retries, as the
    operator's MembershipSync does); `push_all` retries each proxy with `retry` up to `attempts`."""

    def __init__(self, *, timeout: float = 2.0, attempts: int = 5, retry: BackoffPolicy = RETRY,
                 access: Access = PLAIN, channels: ProxyChannels | None = None,
                 reopening: Reopening | None = None) -> None:
        """`channels`: the proxies' channels, to share with other calls to them (Status reads); `reopening`: when a
        proxy's stream may be opened again (default: REOPEN's backoff, OLDER_PROXY)."""
        self.access = access  # the cluster credential (and TLS) for the proxies' control ports
        self.timeout = timeout
        self.attempts = attempts
        self.retry = retry
        self.channels = channels or ProxyChannels()
        self.reopening = reopening or Reopening()
        self._streams: dict[str, ApplyStream] = {}  # address -> its open stream
        self._message: tuple[Snapshot, pb.Membership] = (Snapshot(-1, ()), pb.Membership())  # the last one sent

    def _stub(self, address: str) -> pb_grpc.ProxyControlStub:
        return self.channels.stub(address, self.access)

    def streaming(self, address: str) -> bool:
        """Whether `address` has a stream open (not known to have ended) for its next push."""
        stream = self._streams.get(address)
        return stream is not None and stream.ended is None

    async def push_one(self, target: str, address: str, snapshot: Snapshot) -> PushResult:
        """One push (within `timeout`): ok when the proxy runs `snapshot.version` (not refused: the same version with
        other contents is) or newer afterwards."""
        message, deadline = self._proto(snapshot), time.monotonic() + self.timeout
        stream = self._stream(address)
        if stream is not None:
            try:
                reply = await asyncio.wait_for(stream.send(message), self.timeout)
            except TimeoutError:
                self._broke(address, stream, f"no answer within {self.timeout} s")
                return PushResult(target, address, ok=False,
                                  error=f"DEADLINE_EXCEEDED: no answer on the stream within {self.timeout} s")
            except StreamEnded:
                self._broke(address, stream)  # then Apply, in the time left
            else:
                self.reopening.answered(address)
                return self._result(target, address, snapshot, reply)
        try:
            reply = await self._stub(address).Apply(message, timeout=max(0.0, deadline - time.monotonic()),
                                                    metadata=self.access.metadata())
        except grpc.aio.AioRpcError as exc:
            return PushResult(target, address, ok=False, error=f"{exc.code().name}: {exc.details()}")
        return self._result(target, address, snapshot, reply)

    def _stream(self, address: str) -> ApplyStream | None:
        """`address`'s open stream; a new one if it has none and may open one; None: push with Apply."""
        stream = self._streams.get(address)
        if stream is not None and stream.reach != reach(self.access):
            stream.close("the credential changed")
            del self._streams[address]
            stream = None
        elif stream is not None and stream.ended is not None:  # it broke since the last push
            self._broke(address, stream)
            stream = None
        if stream is None and self.reopening.may_open(address, time.monotonic()):
            stream = self._streams[address] = ApplyStream(self._stub(address), self.access)
        return stream

    def _broke(self, address: str, stream: ApplyStream, why: str = "") -> None:
        """`stream` of `address` broke (or is closed now for `why`): forgotten, reopened after `reopening`'s delay.
        Counted once, by the first to see it: the other pushes that waited on it, and a stream replaced or pruned on
        purpose, are no longer `address`'s stream."""
        if why:
            stream.close(why)
        if self._streams.get(address) is not stream:
            return
        del self._streams[address]
        assert stream.ended is not None
        delay = self.reopening.ended(address, stream.ended.code, stream.ended_at)
        log.info("push_stream_ended", address=address, error=str(stream.ended), reopen_in=round(delay, 2))

    def _result(self, target: str, address: str, snapshot: Snapshot, reply: pb.ApplyResponse) -> PushResult:
        if reply.applied_version > snapshot.version or (reply.applied_version == snapshot.version and reply.accepted):
            return PushResult(target, address, ok=True, applied_version=reply.applied_version)
        return PushResult(target, address, ok=False, applied_version=reply.applied_version,
                          error=f"proxy refused version {snapshot.version}: {reply.reason}")

    def _proto(self, snapshot: Snapshot) -> pb.Membership:
        """`snapshot` as the message, made once for all the proxies it goes to."""
        if self._message[0] is not snapshot:
            self._message = (snapshot, snapshot.to_proto())
        return self._message[1]

    async def push_all(self, targets: Mapping[str, str], snapshot: Snapshot) -> dict[str, PushResult]:
        """Push `snapshot` to every target (name -> control address) at once, each retried with backoff."""
        started = time.monotonic()

        async def until_applied(name: str) -> PushResult:
            for failures in range(self.attempts):
                await asyncio.sleep(self.retry.delay(failures))  # no wait before the first
                result = await self.push_one(name, targets[name], snapshot)
                if result.ok:
                    return result
            log.warning("push_failed", target=name, address=targets[name], version=snapshot.version,
                        error=result.error, attempts=self.attempts)
            return result

        names = list(targets)
        results = await asyncio.gather(*(until_applied(n) for n in names))
        self.prune(targets.values())
        log.info("membership_pushed", version=snapshot.version, brokers=len(snapshot.members),
                 proxies=len(names), acknowledged=sum(r.ok for r in results),
                 seconds=round(time.monotonic() - started, 4))
        return dict(zip(names, results, strict=True))

    def prune(self, keep: Iterable[str]) -> None:
        """Close the streams and channels to addresses not in `keep`."""
        wanted = set(keep)
        for address in [a for a in self._streams if a not in wanted]:
            self._streams.pop(address).close("the proxy is no longer pushed to")
        self.reopening.keep(wanted)
        self.channels.prune(wanted)

    async def close(self) -> None:
        streams, self._streams = list(self._streams.values()), {}
        for stream in streams:
            stream.close("the pusher is closing")
        await self.channels.close()
