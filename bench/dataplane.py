"""Data-plane benchmark: real broker + proxy processes on 127.0.0.1, load from separate processes.

Prints figures and writes JSON (bench/results/dataplane.json):
  - broker ingest events/s (gRPC Publish batches, one proxy attached and interested);
  - deliveries/s read by 1000 SSE subscribers at 100, 1000 and 2000 events/s (and 100 subscribers
    at 1000 events/s), with publish-to-delivery latency p50/p99 sampled on 50 connections;
  - proxy memory per idle subscriber at 5000 subscribers, SSE and plasma gRPC.

A/B (`--before PYTHON`): another build's servers (that interpreter's `-m neoplasma`) against this
one's, interleaved round by round with the same load generators; SSE 1000 and 100 subscribers
(also with single-event publishes), 100 native gRPC streams at 1000 events/s, plasma gRPC `Events`
streams 100 x 1000 and 1000 x 100 events/s (one connection each, read by a lean HTTP/2 client)
(medians of deliveries/s, events lost, subscribers dropped, latency p50/p99 and proxy/broker CPU
seconds per 1M deliveries); broker ingest flat out with 100-event gRPC and
HTTP publishes, 4 in flight (events/s, broker CPU seconds per 1M events), also by this build with
`--publish-keys-file` and publishers presenting their key; as a table and bench/results/dataplane_ab.json.

Usage: python bench/dataplane.py [--quick] [--before PYTHON [--rounds N] [--scenarios A,B]]
       python bench/dataplane.py --only --scenarios plasma_1000x100 [--rounds N] [--client go] [--load-nice N]
`--client go` reads plasma streams with grpc-go (bench/go/plasmaload, built offline from Debian's
golang-go and golang-google-grpc-dev), as plasma's Go users do; each fan-out also reports what the
proxy handed out but subscribers had not read 4 s after the load, the share of the window its
loop waited for a CPU (a shared machine's doing, not the proxy's), each tier's CPU in cores
(publisher, broker, proxy, subscribers; the whole machine's beside), where events waited (the
broker's relay outbox, the relay stream, the proxy's hub: mean and max of samples every 0.5 s) and
the proxy's own accept-to-write latency (its histogram's buckets). `plasma_1000x25`, `_x50` and
`_x75` (named only) give latency against rate. With grpc-go, latency is to the kernel's receive time
at the client's socket (`latency_ms`) and to grpc-go handing the event over (`read_latency_ms`).
`--load-nice N` runs the subscribers' processes (the load clients that read; not the publisher, whose
stamps start each latency) at nice N: they are not the system under test, and at 19 they take the
cores only when the servers leave them idle, as clients on machines of their own would. Each run
records its nice value; each fan-out also its dispatch rounds per second (the proxy's work is per round).
Every load loop is bounded in count and time; everything stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import hpack
import psutil

from neoplasma.core.net import raise_fd_limit
from neoplasma.core.trust import bearer_metadata
from neoplasma.plasma.v1 import stream_pb2
from neoplasma.wire.v1 import neoplasma_pb2 as pb
from neoplasma.wire.v1 import neoplasma_pb2_grpc as pb_grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the test harness
from harness import (
    AUTH,
    Server,
    apply_membership,
    links_ready,
    niced,
    proxy_status,
    read_json_line,
    start_server,
    wait_for,
)

ROOT = Path(__file__).resolve().parent.parent

PAYLOAD = {"program": 1234, "views": 98765, "pad": "x" * 150}  # ~200 B events


# -- load roles (run in child processes) --------------------------------------------------------


def stamp_latencies(buf: bytes, now: float, record: list[float]) -> int:
    """Record now - ts for every complete `"ts":T,` in `buf`; returns where the last one ended."""
    start = 0
    while (i := buf.find(b'"ts":', start)) >= 0:
        j = buf.find(b",", i)
        if j < 0:
            break
        record.append(now - float(buf[i + 5:j]))
        start = j
    return start


class SseCounter(asyncio.Protocol):
    """Counts SSE events on one connection; optionally records latencies from embedded timestamps."""

    def __init__(self, record: list[float] | None) -> None:
        self.events = 0
        self.record = record
        self.tail = b""

    def data_received(self, data: bytes) -> None:
        self.events += data.count(b"\ndata: ") + (1 if data.startswith(b"data: ") else 0)
        if self.record is not None:
            buf = self.tail + data
            self.tail = buf[stamp_latencies(buf, time.time(), self.record):][-64:]


async def role_sse(http: str, n: int, seconds: float, sample: int) -> dict[str, Any]:
    host, _, port = http.rpartition(":")
    latencies: list[float] = []
    conns: list[SseCounter] = []
    loop = asyncio.get_running_loop()
    for i in range(n):
        transport, proto = await loop.create_connection(
            lambda i=i: SseCounter(latencies if i < sample else None), host, int(port))
        transport.write(b"GET /?eventType=bench HTTP/1.1\r\nHost: b\r\n\r\n")
        conns.append(proto)
    print(json.dumps({"connected": n}), flush=True)
    cpu0 = time.process_time()
    await asyncio.sleep(seconds)  # the load window is the measurement, not synchronisation
    return {"events": sum(c.events for c in conns), "latencies": latencies,
            "cpu_seconds": time.process_time() - cpu0, "read_seconds": seconds}


class PlasmaStreams(asyncio.Protocol):
    """plasma gRPC `Events` streams on one HTTP/2 connection, as a lean client: counts `Payload`
    messages by their gRPC prefixes (Python per frame, not per message, beyond a skip) and records
    latencies from embedded timestamps. Flow control: 1 MiB windows, topped up every 256 KiB."""

    WINDOW, TOP_UP = 1 << 20, 1 << 18

    def __init__(self, streams: int, record: list[float] | None) -> None:
        self.streams, self.record = streams, record
        self.events = self.ended = 0
        self.buf = b""
        self.skip: dict[int, int] = {}  # per stream: message bytes still to pass
        self.head: dict[int, bytes] = {}  # per stream: a prefix cut by a frame's end
        self.unacked: dict[int, int] = {0: 0}
        self.tail = b""
        self.transport: asyncio.Transport | None = None

    @staticmethod
    def frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
        return struct.pack(">IBI", len(payload) << 8 | kind, flags, stream) + payload

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        request = stream_pb2.Request(Events=[stream_pb2.EventType(type="bench")]).SerializeToString()
        out = [b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", self.frame(4, 0, 0, struct.pack(">HI", 4, self.WINDOW)),
               self.frame(8, 0, 0, struct.pack(">I", self.WINDOW))]
        encoder = hpack.Encoder()
        headers = [(":method", "POST"), (":scheme", "http"), (":path", "/proto.StreamService/Events"),
                   (":authority", "bench"), ("content-type", "application/grpc"), ("te", "trailers")]
        message = b"\x00" + struct.pack(">I", len(request)) + request
        for k in range(self.streams):
            sid = 2 * k + 1
            out += [self.frame(1, 4, sid, encoder.encode(headers)), self.frame(0, 0, sid, message)]
            self.skip[sid], self.head[sid], self.unacked[sid] = 0, b"", 0
        transport.write(b"".join(out))  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data
        pos, end, updates = 0, len(buf), []
        while end - pos >= 9:
            size, kind, flags, sid = buf[pos] << 16 | buf[pos + 1] << 8 | buf[pos + 2], buf[pos + 3], buf[pos + 4], \
                int.from_bytes(buf[pos + 5:pos + 9], "big") & 0x7FFFFFFF
            if end - pos - 9 < size:
                break
            payload = buf[pos + 9:pos + 9 + size]
            pos += 9 + size
            if kind == 0 and sid in self.skip:
                self._count(sid, payload)
                for key in (0, sid):
                    self.unacked[key] += size
                    if self.unacked[key] >= self.TOP_UP:
                        updates.append(self.frame(8, 0, key, struct.pack(">I", self.unacked[key])))
                        self.unacked[key] = 0
            elif kind == 4 and not flags & 1:
                updates.append(self.frame(4, 1, 0, b""))
            elif kind == 6 and not flags & 1:
                updates.append(self.frame(6, 1, 0, payload))
            if (flags & 1 and kind in (0, 1)) or kind == 3:  # END_STREAM or RST_STREAM: the stream ended
                self.ended += self.skip.pop(sid, None) is not None
        self.buf = buf[pos:]
        if updates and self.transport is not None:
            self.transport.write(b"".join(updates))

    def _count(self, sid: int, payload: bytes) -> None:
        if self.record is not None:
            data = self.tail + payload
            self.tail = data[stamp_latencies(data, time.time(), self.record):][-64:]
        skip = self.skip[sid]
        if skip >= len(payload):
            self.skip[sid] = skip - len(payload)
            return
        data = self.head[sid] + payload[skip:]
        pos = 0
        while len(data) - pos >= 5:
            pos += 5 + int.from_bytes(data[pos + 1:pos + 5], "big")
            self.events += 1
        if pos > len(data):
            self.skip[sid], self.head[sid] = pos - len(data), b""
        else:
            self.skip[sid], self.head[sid] = 0, data[pos:]


async def role_plasma(grpc_addr: str, n: int, seconds: float, sample: int = 0, per_connection: int = 1
                      ) -> dict[str, Any]:
    """`n` plasma `Events` streams (`per_connection` on each connection), counting events; latencies on
    the first `sample` connections."""
    host, _, port = grpc_addr.rpartition(":")
    latencies: list[float] = []
    loop = asyncio.get_running_loop()
    conns: list[PlasmaStreams] = []
    for i in range(0, n, per_connection):
        _, proto = await loop.create_connection(
            lambda i=i: PlasmaStreams(min(per_connection, n - i), latencies if i < sample else None), host, int(port))
        conns.append(proto)
    print(json.dumps({"connected": n}), flush=True)
    cpu0 = time.process_time()
    await asyncio.sleep(seconds)
    return {"events": sum(c.events for c in conns), "latencies": latencies,
            "streams_ended": sum(c.ended for c in conns), "cpu_seconds": time.process_time() - cpu0,
            "read_seconds": seconds}


async def role_native(grpc_addr: str, n: int, seconds: float, sample: int) -> dict[str, Any]:
    """`n` native `Subscriber.Subscribe` streams, counting events (latencies on the first `sample`)."""
    latencies: list[float] = []
    counts = [0] * n
    async with grpc.aio.insecure_channel(grpc_addr) as channel:
        subscribe = channel.unary_stream("/neoplasma.v1.Subscriber/Subscribe",
                                         request_serializer=pb.SubscribeRequest.SerializeToString,
                                         response_deserializer=pb.EventBatch.FromString)

        async def read(k: int) -> None:
            async for batch in subscribe(pb.SubscribeRequest(topics=["bench"])):
                counts[k] += len(batch.events)
                if k < sample:
                    now = time.time()
                    for e in batch.events:
                        stamp_latencies(e.data, now, latencies)

        readers = [asyncio.create_task(read(k)) for k in range(n)]
        print(json.dumps({"connected": n}), flush=True)
        cpu0 = time.process_time()
        await asyncio.sleep(seconds)
        cpu = time.process_time() - cpu0
        for task in readers:
            task.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
    return {"events": sum(counts), "latencies": latencies, "cpu_seconds": cpu, "read_seconds": seconds}


async def role_publish(broker: str, seconds: float, rate: float, batch: int, inflight: int,
                       http: str = "", key: str = "") -> dict[str, Any]:
    """Publish `batch`-event requests for `seconds` (to the HTTP address `http` when given, with the
    publisher `key` when given); at `rate` events/s, or flat out with `inflight` requests when rate is 0."""
    accepted = 0
    deadline = time.monotonic() + seconds
    cpu0 = time.process_time()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    async with grpc.aio.insecure_channel(broker) as channel, aiohttp.ClientSession(headers=headers) as session:
        stub = pb_grpc.BrokerStub(channel)

        async def send() -> int:
            data = json.dumps({"ts": time.time(), **PAYLOAD})
            if http:
                body = "[" + ",".join([f'{{"meta":{{"type":"bench:x"}},"data":{data}}}'] * batch) + "]"
                async with session.post(f"http://{http}/publish", data=body.encode()) as resp:
                    resp.raise_for_status()
                    return int((await resp.json())["accepted"])
            request = pb.PublishRequest(events=[pb.Event(topic="bench:x", data=data.encode())] * batch)
            reply = await stub.Publish(request, timeout=10, metadata=bearer_metadata(key) if key else None)
            return int(reply.accepted)

        async def worker() -> None:
            nonlocal accepted
            while time.monotonic() < deadline:
                n = await send()  # not `accepted += await ...`: that reads `accepted` before the await
                accepted += n

        if rate <= 0:
            await asyncio.gather(*(worker() for _ in range(inflight)))
        else:  # on schedule, `inflight` requests at most at once
            interval = batch / rate
            next_at = time.monotonic()
            sending: set[asyncio.Task[int]] = set()
            while time.monotonic() < deadline:
                if len(sending) >= inflight:
                    done, sending = await asyncio.wait(sending, return_when=asyncio.FIRST_COMPLETED)
                    accepted += sum(task.result() for task in done)
                sending.add(asyncio.ensure_future(send()))
                next_at += interval
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            accepted += sum(await asyncio.gather(*sending))
    return {"accepted": accepted, "seconds": seconds, "cpu_seconds": time.process_time() - cpu0}


def run_role(argv: list[str]) -> None:
    raise_fd_limit()
    role, args = argv[0], json.loads(argv[1])
    fn = {"sse": role_sse, "plasma": role_plasma, "native": role_native, "publish": role_publish}[role]
    import uvloop  # the load generators need their speed more than anyone

    result = uvloop.run(fn(**args))  # type: ignore[operator]
    print(json.dumps({"result": result}), flush=True)


class Role:
    """A load role in its own process (so the load does not share a core's event loop with us)."""

    def __init__(self, role: str, nice: int = 0, **args: Any) -> None:
        self.proc = subprocess.Popen([*niced(nice), sys.executable, __file__, "--role", role, json.dumps(args)],
                                     stdout=subprocess.PIPE, text=True)

    @classmethod
    def go(cls, grpc_addr: str, n: int, seconds: float, sample: int = 0, per_connection: int = 1, nice: int = 0
           ) -> Role:
        """plasma `Events` streams read by grpc-go (bench/go/plasmaload) instead of the Python role: same lines."""
        role = cls.__new__(cls)
        role.proc = subprocess.Popen([*niced(nice), str(go_client()), "-addr", grpc_addr, "-streams", str(n),
                                      "-per-conn", str(per_connection), "-seconds", str(seconds), "-sample",
                                      str(sample), "-topic", "bench"], stdout=subprocess.PIPE, text=True)
        return role

    def wait_line(self, timeout: float = 120) -> dict[str, Any]:
        return read_json_line(self.proc.stdout, timeout)

    def result(self, timeout: float = 300) -> dict[str, Any]:
        while True:
            line = self.wait_line(timeout)
            if "result" in line:
                self.proc.wait(30)
                return line["result"]


# -- scenarios ------------------------------------------------------------------------------


async def attach(proxy: Server, broker: Server) -> None:
    await apply_membership(proxy.endpoints["control"], 1, [(broker.name, broker.endpoints["grpc"])])
    await wait_for(lambda: links_ready(proxy.endpoints["control"], 1), timeout=20)


async def broker_stats(broker: Server) -> pb.BrokerStats:
    async with grpc.aio.insecure_channel(broker.endpoints["grpc"]) as ch:
        return await pb_grpc.BrokerStub(ch).Stats(pb.StatsRequest(), timeout=5, metadata=AUTH)


async def ingest(broker: Server, seconds: float, transport: str = "grpc", key: str = "") -> dict[str, Any]:
    """Broker ingest flat out: 100-event requests, 4 in flight, over gRPC or HTTP (with the publisher `key`);
    `grpc1`: single-event gRPC requests, 16 in flight."""
    single = transport == "grpc1"
    pub = Role("publish", broker=broker.endpoints["grpc"], http=broker.endpoints["http"] if transport == "http" else "",
               seconds=seconds, rate=0, batch=1 if single else 100, inflight=16 if single else 4, key=key)
    before, cpu0 = await broker_stats(broker), cpu_seconds(broker)
    started = time.monotonic()
    res = pub.result()
    elapsed = time.monotonic() - started
    after, cpu1 = await broker_stats(broker), cpu_seconds(broker)
    events = after.events_in - before.events_in
    return {"scenario": f"ingest_{transport}", "events_per_second": round(events / seconds),
            "accepted": res["accepted"], "dropped": after.events_dropped, "wall_seconds": round(elapsed, 1),
            "broker_cpu_s_per_1m_events": round((cpu1 - cpu0) / max(events, 1) * 1e6, 3)}


def cpu_seconds(server: Server) -> float:
    """CPU seconds of a server process and of its live children (a --workers supervisor's workers)."""
    proc = psutil.Process(server.proc.pid)
    total = 0.0
    for p in (proc, *proc.children(recursive=True)):
        with contextlib.suppress(psutil.NoSuchProcess):
            total += sum(p.cpu_times()[:2])
    return total


GO_SOURCE = ROOT / "bench" / "go" / "plasmaload"
GO_BINARY = ROOT / "bench" / "results" / "plasmaload"
CLIENTS = {"plasma": "python"}  # who reads plasma streams: "python" (PlasmaStreams) or "go" (grpc-go)
LOAD = {"nice": 0}  # the subscribers' processes' nice value (--load-nice)


def go_client() -> Path:
    """bench/go/plasmaload built (once per source change) offline from Debian's packages (golang-go,
    golang-google-grpc-dev: GOPATH /usr/share/gocode)."""
    source = GO_SOURCE / "main.go"
    if not GO_BINARY.exists() or GO_BINARY.stat().st_mtime < source.stat().st_mtime:
        GO_BINARY.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "GOPATH": "/usr/share/gocode", "GO111MODULE": "off", "GOFLAGS": "",
               "GOCACHE": os.environ.get("GOCACHE", str(ROOT / "bench" / "results" / "gocache"))}
        try:
            subprocess.run(["go", "build", "-o", str(GO_BINARY), "."], cwd=GO_SOURCE, env=env, check=True,
                           capture_output=True, text=True, timeout=600)
        except FileNotFoundError:
            sys.exit("--client go needs the Go toolchain and grpc-go: apt-get install golang-go golang-google-grpc-dev")
        except subprocess.CalledProcessError as exc:
            sys.exit(f"building {GO_SOURCE} failed (apt-get install golang-google-grpc-dev?):\n{exc.stderr}")
    return GO_BINARY


def runqueue_wait(server: Server) -> float:
    """Seconds the server's main thread has waited for a CPU while runnable (/proc/PID/schedstat): on a
    shared machine, how much of a lag is the machine's rather than the server's."""
    try:
        return int(Path(f"/proc/{server.proc.pid}/schedstat").read_text().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return float("nan")


def subscribers_role(kind: str, proxy: Server, n: int, seconds: float, sample: int) -> Role:
    """`n` subscribers of `kind`: SSE, plasma gRPC streams (one connection each; read by grpc-go with
    `--client go`) or native gRPC streams; at nice LOAD["nice"]."""
    nice = LOAD["nice"]
    if kind == "sse":
        return Role("sse", nice, http=proxy.endpoints["http"], n=n, seconds=seconds, sample=sample)
    if kind == "plasma" and CLIENTS["plasma"] == "go":
        return Role.go(proxy.endpoints["grpc"], n, seconds, sample, nice=nice)
    return Role(kind, nice, grpc_addr=proxy.endpoints["grpc"], n=n, seconds=seconds, sample=sample)


async def fanout(broker: Server, proxy: Server, subscribers: int, seconds: float, rate: float,
                 sample: int, kind: str = "sse", batch: int = 0) -> dict[str, Any]:
    """`subscribers` of `kind` read what is published at `rate` events/s, `batch` events a request
    (default: one request every 10 ms)."""
    name = scenario_name(kind, subscribers, rate, batch)
    subs = subscribers_role(kind, proxy, subscribers, seconds + 4, sample)
    subs.wait_line()

    async def all_connected() -> bool:
        return (await proxy_status(proxy.endpoints["control"])).subscribers == subscribers

    await wait_for(all_connected, timeout=60, what=f"{subscribers} subscribers at the proxy")
    await wait_for(lambda: links_ready(proxy.endpoints["control"], 1), timeout=20)
    status0 = await proxy_status(proxy.endpoints["control"])
    hist0 = await delivery_histogram(proxy, kind)
    rounds0 = await dispatch_rounds(proxy)
    cpu0 = cpu_seconds(proxy), cpu_seconds(broker)
    wait0 = runqueue_wait(proxy)
    machine0 = machine_busy()
    t0 = time.monotonic()
    batch = batch or (max(1, int(rate // 100)) if rate else 50)  # by default one request every 10 ms
    pub = Role("publish", broker=broker.endpoints["grpc"], seconds=seconds, rate=rate, batch=batch, inflight=8)
    samples: list[dict[str, int]] = []
    sampler = asyncio.create_task(sample_queues(broker, proxy, samples))
    try:
        pub_res = await asyncio.to_thread(pub.result)  # (the sampler runs meanwhile)
    finally:
        sampler.cancel()
        await asyncio.gather(sampler, return_exceptions=True)
    published = pub_res["accepted"]
    status1 = await proxy_status(proxy.endpoints["control"])
    elapsed = time.monotonic() - t0
    rounds1 = await dispatch_rounds(proxy)
    proxy_cpu = (cpu_seconds(proxy) - cpu0[0]) / elapsed
    broker_cpu = (cpu_seconds(broker) - cpu0[1]) / elapsed
    machine = (machine_busy() - machine0) / elapsed
    proxy_waited = (runqueue_wait(proxy) - wait0) / elapsed
    res = await asyncio.to_thread(subs.result)
    status2 = await proxy_status(proxy.endpoints["control"])

    async def backlog_drained() -> bool:  # so the next scenario starts from a quiet proxy
        status, stats = await proxy_status(proxy.endpoints["control"]), await broker_stats(broker)
        return status.events_received >= stats.events_out

    await wait_for(backlog_drained, timeout=120, what="the proxy to catch up with the broker")
    # CPU per delivery over the whole scenario, backlog included: what each delivery cost.
    cpu1 = cpu_seconds(proxy), cpu_seconds(broker)
    handed = (await proxy_status(proxy.endpoints["control"])).deliveries - status0.deliveries
    lat = sorted(res["latencies"])
    out: dict[str, Any] = {
        "scenario": name, "kind": kind, "subscribers": subscribers, "published": published,
        "rate_asked": rate or "flat out",
        # What subscribers actually read, over the publishing window (the honest deliveries/s).
        "deliveries_per_second": round(res["events"] / seconds),
        "delivered_all": res["events"] == published * subscribers,
        "received_by_subscribers": res["events"],
        "events_lost": published * subscribers - res["events"],
        "streams_ended": res.get("streams_ended", 0),
        "proxy_handed_to_sockets_per_second": round((status1.deliveries - status0.deliveries) / elapsed),
        # Handed to sockets or calls by the proxy but not read by the subscribers 4 s after the load.
        "handed_not_read_after_4s": status2.deliveries - status0.deliveries - res["events"],
        "slow_subscribers_dropped": status1.slow_subscribers_dropped - status0.slow_subscribers_dropped,
        "proxy_rss_mb": round(psutil.Process(proxy.proc.pid).memory_info().rss / 2**20, 1),
        "proxy_cpu_cores": round(proxy_cpu, 2),
        # Share of the window the proxy's loop was runnable but had no CPU (the machine's doing).
        "proxy_runqueue_wait_share": round(proxy_waited, 2),
        "proxy_cpu_s_per_1m_deliveries": round((cpu1[0] - cpu0[0]) / max(handed, 1) * 1e6, 3),
        "broker_cpu_s_per_1m_deliveries": round((cpu1[1] - cpu0[1]) / max(handed, 1) * 1e6, 3),
    }
    out["load_nice"] = LOAD["nice"]
    for key, latencies in (("latency_ms", lat), ("read_latency_ms", sorted(res.get("read_latencies", [])))):
        if latencies:  # (grpc-go: `latencies` at the socket, `read_latencies` as grpc-go hands events over)
            out[key] = {"p50": round(1000 * latencies[len(latencies) // 2], 2),
                        "p99": round(1000 * latencies[int(len(latencies) * 0.99)], 2),
                        "max": round(1000 * latencies[-1], 2), "samples": len(latencies)}
    # Where the time goes: each tier's CPU (cores, over the publishing window; the subscribers' over
    # their reading window, the 4 s after included) beside what the whole machine ran (other jobs too).
    tiers = {"publisher": pub_res.get("cpu_seconds", 0.0) / seconds, "broker": broker_cpu, "proxy": proxy_cpu,
             "subscribers": res.get("cpu_seconds", 0.0) / res.get("read_seconds", seconds + 4)}
    out["cpu_cores"] = {**{k: round(v, 2) for k, v in tiers.items()}, "sum": round(sum(tiers.values()), 2),
                        "machine": round(machine, 2), "machine_cpus": os.cpu_count()}
    # Where events wait: the broker's relay outbox, the relay stream (queued at the broker, not yet at the
    # proxy's link), the proxy's hub (at its link, not yet dispatched); sampled every 0.5 s of the window.
    out["queues"] = {key: {"mean": round(statistics.fmean(s[key] for s in samples)),
                           "max": max(s[key] for s in samples)} for key in QUEUES if samples}
    # From a broker accepting an event to the proxy writing it to sockets (the proxy's own histogram, each
    # round's oldest event: upper bounds); the rest of publish-to-read is the publisher's and the
    # subscribers' (and the sockets' between).
    hist = [b - a for a, b in zip(hist0, await delivery_histogram(proxy, kind), strict=True)]
    # Dispatch rounds (the proxy's work is per round; a build without the counter: nan).
    out["rounds_per_second"] = round((rounds1 - rounds0) / elapsed, 1)
    if sum(hist):
        out["accepted_to_written_ms"] = {"p50": histogram_quantile(hist, 0.5), "p99": histogram_quantile(hist, 0.99)}
    return out


QUEUES = ("broker_outbox_bytes", "relay_events_not_at_proxy", "hub_events_pending")


async def sample_queues(broker: Server, proxy: Server, samples: list[dict[str, int]], every: float = 0.5) -> None:
    """Every `every` seconds until cancelled: where events wait between the broker and the proxy's dispatch."""
    async with aiohttp.ClientSession() as session:
        while True:
            await asyncio.sleep(every)  # a sampling period, not synchronisation
            stats = await broker_stats(broker)  # (sets the broker's outbox gauge)
            status = await proxy_status(proxy.endpoints["control"])
            async with session.get(f"http://{broker.endpoints['http']}/metrics") as resp:
                text = await resp.text()
            outbox = sum(float(line.split()[-1]) for line in text.splitlines()
                         if line.startswith("neoplasma_broker_outbox_bytes"))
            at_links = sum(link.events_received for link in status.links)
            samples.append({"broker_outbox_bytes": int(outbox),
                            "relay_events_not_at_proxy": stats.events_out - at_links,
                            "hub_events_pending": at_links - status.events_received})


HISTOGRAM_BOUNDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, float("inf"))


async def delivery_histogram(proxy: Server, kind: str) -> list[float]:
    """The proxy's delivery latency histogram for `kind`'s transport: counts per bucket (not cumulative)."""
    transport = {"native": "native"}.get(kind, kind)
    async with aiohttp.ClientSession() as session, session.get(f"http://{proxy.endpoints['http']}/metrics") as resp:
        text = await resp.text()
    label = f'transport="{transport}"'
    cumulative = [float(line.split()[-1]) for line in text.splitlines()
                  if line.startswith("neoplasma_proxy_delivery_latency_seconds_bucket{") and label in line]
    if len(cumulative) != len(HISTOGRAM_BOUNDS):
        return [0.0] * len(HISTOGRAM_BOUNDS)
    return [b - a for a, b in zip([0.0, *cumulative], cumulative, strict=False)]


async def dispatch_rounds(proxy: Server) -> float:
    """The proxy's dispatch rounds so far (`neoplasma_proxy_dispatch_rounds_total`; nan if it has no such counter)."""
    async with aiohttp.ClientSession() as session, session.get(f"http://{proxy.endpoints['http']}/metrics") as resp:
        text = await resp.text()
    return next((float(line.split()[-1]) for line in text.splitlines()
                 if line.startswith("neoplasma_proxy_dispatch_rounds_total ")), float("nan"))


def histogram_quantile(counts: list[float], q: float) -> str:
    """The bucket holding quantile `q` of `counts` (per HISTOGRAM_BOUNDS), as "<= X ms"."""
    target, running = q * sum(counts), 0.0
    for bound, n in zip(HISTOGRAM_BOUNDS, counts, strict=True):
        running += n
        if running >= target:
            return f"<= {bound * 1000:g} ms" if bound != float("inf") else "> 30 s"
    return "> 30 s"


def machine_busy() -> float:
    """CPU seconds the whole machine has run (every process, other jobs too)."""
    t = psutil.cpu_times()
    return float(t.user + t.nice + t.system + t.irq + t.softirq + getattr(t, "steal", 0.0))


async def idle_memory(proxy: Server, kind: str, n: int) -> dict[str, Any]:
    proc = psutil.Process(proxy.proc.pid)
    before = proc.memory_info().rss
    role = (Role("sse", http=proxy.endpoints["http"], n=n, seconds=6, sample=0) if kind == "sse"
            else Role("plasma", grpc_addr=proxy.endpoints["grpc"], n=n, seconds=6, per_connection=n))
    role.wait_line(180)

    async def all_connected() -> pb.ProxyStatus | None:
        status = await proxy_status(proxy.endpoints["control"])
        return status if status.subscribers == n else None

    status = await wait_for(all_connected, timeout=60, what=f"{n} subscribers at the proxy")
    after = proc.memory_info().rss
    role.result()
    return {"subscribers": status.subscribers, "rss_before_mb": round(before / 2**20, 1),
            "rss_after_mb": round(after / 2**20, 1), "kb_per_subscriber": round((after - before) / n / 1024, 1)}


async def main(seconds: float) -> dict[str, Any]:
    raise_fd_limit()
    tmp = ROOT / "bench" / "results" / "logs"
    tmp.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]}}
    servers: list[Server] = []
    try:
        broker = start_server("broker", "bench-broker", tmp)
        servers.append(broker)
        proxy = start_server("proxy", "bench-proxy", tmp)
        servers.append(proxy)
        await attach(proxy, broker)
        results["broker_ingest"] = await ingest(broker, seconds)
        print("broker ingest:", results["broker_ingest"], flush=True)
        # Deliveries/s and latency; the subscribers' own process shares the two cores.
        for subs, rate in ((1000, 100), (1000, 1000), (1000, 2000), (100, 1000)):
            key = f"fanout_{subs}_subscribers_at_{rate}eps"
            results[key] = await fanout(broker, proxy, subs, seconds, rate=rate, sample=min(50, subs))
            print(f"fan-out, {subs} SSE subscribers, {rate} events/s:", results[key], flush=True)
        for kind in ("sse", "plasma"):
            fresh = start_server("proxy", f"bench-idle-{kind}", tmp)
            servers.append(fresh)
            results[f"idle_memory_{kind}"] = await idle_memory(fresh, kind, 5000)
            print(f"idle memory, 5000 {kind} subscribers:", results[f"idle_memory_{kind}"], flush=True)
            fresh.stop()
    finally:
        for s in servers:
            s.stop()
    return results


# -- A/B: another build's servers against this one's, same load generators ------------------

# (kind, subscribers, events/s, events per publish request: 0 is one request every 10 ms).
# Rate 0: published flat out, the saturation at which --workers 2 is compared with 1.
AB_FANOUT = (("sse", 1000, 1000, 0), ("sse", 100, 1000, 0), ("sse", 100, 1000, 1), ("native", 100, 1000, 0),
             ("plasma", 100, 1000, 0), ("plasma", 1000, 100, 0), ("sse", 1000, 0, 0), ("native", 100, 0, 0))
AB_INGEST = ("grpc", "http", "grpc1")


def scenario_name(kind: str, subscribers: int, rate: float, batch: int) -> str:
    return f"{kind}_{subscribers}x{rate:g}" + ("_unbatched" if batch == 1 else "")


# Not run unless named: 1000 plasma streams at lower rates, to find where latency meets a bound.
RATE_SWEEP = (("plasma", 1000, 25, 0), ("plasma", 1000, 50, 0), ("plasma", 1000, 75, 0))
AB_SCENARIOS = (*(scenario_name(*case) for case in AB_FANOUT), *(f"ingest_{t}" for t in AB_INGEST))
ALL_SCENARIOS = (*AB_SCENARIOS, *(scenario_name(*case) for case in RATE_SWEEP))
PUBLISH_KEY = "bench-publisher-key"
KEYS = "current+keys"  # this build with --publish-keys-file, publishers presenting their key: ingest only
WORKERS = "current+2w"  # this build with --workers 2 (broker and proxy): with --workers2


def figures(run: dict[str, Any]) -> dict[str, float]:
    if run["scenario"].startswith("ingest"):
        return {"events_per_second": run["events_per_second"],
                "broker_cpu_s_per_1m_events": run["broker_cpu_s_per_1m_events"]}
    lat = run.get("latency_ms", {})
    read = run.get("read_latency_ms", lat)
    return {"deliveries_per_second": run["deliveries_per_second"], "events_lost": run["events_lost"],
            "subscribers_dropped": run["slow_subscribers_dropped"], "streams_ended": run["streams_ended"],
            "handed_not_read_after_4s": run["handed_not_read_after_4s"],
            "latency_p50_ms": lat.get("p50", float("nan")), "latency_p99_ms": lat.get("p99", float("nan")),
            "read_latency_p99_ms": read.get("p99", float("nan")), "rounds_per_second": run["rounds_per_second"],
            "proxy_cpu_s_per_1m_deliveries": run["proxy_cpu_s_per_1m_deliveries"],
            "broker_cpu_s_per_1m_deliveries": run["broker_cpu_s_per_1m_deliveries"],
            "proxy_cpu_cores": run["proxy_cpu_cores"], "proxy_runqueue_wait_share": run["proxy_runqueue_wait_share"],
            **{f"{tier}_cpu_cores": cores for tier, cores in run["cpu_cores"].items() if tier != "machine_cpus"},
            **{f"{queue}_max": q["max"] for queue, q in run["queues"].items()}}


async def ab_round(label: str, python: str, scenarios: list[str], seconds: float, tmp: Path) -> list[dict[str, Any]]:
    """One build's fresh broker and proxy through `scenarios`; the KEYS build's broker demands publisher keys."""
    keys: tuple[str, ...] = ()
    if label == KEYS:
        (tmp / "publish-keys").write_text(PUBLISH_KEY + "\n")
        keys = ("--publish-keys-file", str(tmp / "publish-keys"))
    workers = ("--workers", "2") if label == WORKERS else ()
    broker = start_server("broker", f"ab-{label}-broker", tmp, *keys, *workers, python=python)
    proxy = start_server("proxy", f"ab-{label}-proxy", tmp, *workers, python=python)
    runs = []
    try:
        await attach(proxy, broker)
        for kind, subs, rate, batch in (*AB_FANOUT, *RATE_SWEEP):
            if scenario_name(kind, subs, rate, batch) in scenarios:
                runs.append(await fanout(broker, proxy, subs, seconds, rate, min(50, subs), kind, batch))
        for transport in AB_INGEST:
            if f"ingest_{transport}" in scenarios:
                runs.append(await ingest(broker, seconds, transport, PUBLISH_KEY if keys else ""))
    finally:
        broker.stop()
        proxy.stop()
    return runs


async def compare(before: str, rounds: int, seconds: float, scenarios: list[str], workers: bool = False,
                  ) -> dict[str, Any]:
    """Rounds of before and current (and current with publisher keys, for ingest), each a fresh broker and
    proxy running the scenarios; medians."""
    raise_fd_limit()
    tmp = ROOT / "bench" / "results" / "logs"
    tmp.mkdir(parents=True, exist_ok=True)
    builds = {"before": before, "current": sys.executable}
    if any(s.startswith("ingest") for s in scenarios):
        builds[KEYS] = sys.executable
    if workers:
        builds[WORKERS] = sys.executable
    runs: list[dict[str, Any]] = []
    for r in range(rounds):  # A B, B A, A B, ...: a drifting machine load favours neither
        for label, python in list(builds.items())[::1 if r % 2 == 0 else -1]:
            ours = [s for s in scenarios if label != KEYS or s.startswith("ingest")]
            for run in await ab_round(label, python, ours, seconds, tmp):
                run.update(build=label, round=r, load_average=os.getloadavg()[0])
                print(f"round {r} {label:12} {run['scenario']}:", figures(run),
                      run.get("accepted_to_written_ms"), flush=True)
                runs.append(run)
    table: dict[str, Any] = {}
    for scenario in scenarios:
        mine = [run for run in runs if run["scenario"] == scenario]
        labels = [label for label in builds if any(run["build"] == label for run in mine)]
        table[scenario] = rows = {}
        for figure in figures(mine[0]):
            med = {label: statistics.median([figures(run)[figure] for run in mine if run["build"] == label])
                   for label in labels}
            rows[figure] = {**med, **{f"{label}/before": round(med[label] / med["before"], 3) if med["before"] else None
                                      for label in labels[1:]}}
    return {"machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0],
                        "load_average": [run["load_average"] for run in runs]},
            "before_python": before, "load_nice": LOAD["nice"], "rounds": rounds, "seconds": seconds,
            "medians": table, "runs": runs}


async def only(rounds: int, seconds: float, scenarios: list[str], workers: bool) -> dict[str, Any]:
    """This build alone (and with --workers 2 when `workers`) through `scenarios`, `rounds` times."""
    raise_fd_limit()
    tmp = ROOT / "bench" / "results" / "logs"
    tmp.mkdir(parents=True, exist_ok=True)
    runs: list[dict[str, Any]] = []
    for r in range(rounds):
        for label in ("current", WORKERS) if workers else ("current",):
            for run in await ab_round(label, sys.executable, scenarios, seconds, tmp):
                run.update(build=label, round=r, load_average=os.getloadavg()[0], client=CLIENTS["plasma"])
                print(f"round {r} {label:12} {run['scenario']}:", figures(run),
                      run.get("accepted_to_written_ms"), flush=True)
                runs.append(run)
    return {"machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]}, "seconds": seconds,
            "client": CLIENTS["plasma"], "runs": runs}


def print_table(out: dict[str, Any]) -> None:
    def cell(v: float | None) -> str:
        return "" if v is None else f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3g}"

    print(f"{'scenario':16} {'figure (median)':30} {'before':>9} {'current':>9} {'ratio':>6} {KEYS:>13} {'ratio':>6}"
          f" {WORKERS:>11} {'ratio':>6}")
    for key, rows in out["medians"].items():
        for figure, row in rows.items():
            print(f"{key:16} {figure:30} {cell(row['before']):>9} {cell(row['current']):>9} "
                  f"{row['current/before']!s:>6} {cell(row.get(KEYS)):>13} {row.get(KEYS + '/before', '')!s:>6}"
                  f" {cell(row.get(WORKERS)):>11} {row.get(WORKERS + '/before', '')!s:>6}")
    loads = out["machine"]["load_average"]
    print(f"load average (1 min) during the runs: {min(loads):.2f} .. {max(loads):.2f}; "
          f"the subscribers' processes at nice {out['load_nice']}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--role":
        run_role(sys.argv[2:])
        sys.exit(0)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="4 s load windows instead of 10 s")
    parser.add_argument("--before", metavar="PYTHON",
                        help="A/B instead: this interpreter's build (e.g. another worktree's .venv/bin/python) "
                             "against this one, interleaved; medians to bench/results/dataplane_ab.json")
    parser.add_argument("--client", choices=("python", "go"), default="python",
                        help="who reads plasma gRPC streams: the lean Python HTTP/2 client, or grpc-go "
                        "(bench/go/plasmaload, built from Debian's golang-google-grpc-dev)")
    parser.add_argument("--load-nice", type=int, default=0, choices=range(20), metavar="0-19",
                        help="run the subscribers' processes (not the publisher) at this nice value: 19 lets "
                        "the servers have the cores first (default 0)")
    parser.add_argument("--only", action="store_true",
                        help="only this build, through --scenarios once per round (no A/B); "
                        "bench/results/dataplane_only.json")
    parser.add_argument("--workers2", action="store_true",
                        help=f"also this build with --workers 2 on the broker and the proxy ({WORKERS})")
    parser.add_argument("--rounds", type=int, default=5, help="A/B rounds (default 5)")
    parser.add_argument("--scenarios", default=",".join(AB_SCENARIOS),
                        help=f"A/B scenarios, comma-separated (default all: {','.join(AB_SCENARIOS)}; "
                        f"also: {','.join(ALL_SCENARIOS[len(AB_SCENARIOS):])})")
    opts = parser.parse_args()
    seconds = 4.0 if opts.quick else 10.0
    CLIENTS["plasma"] = opts.client
    LOAD["nice"] = opts.load_nice
    print(f"load clients (subscribers) at nice {opts.load_nice}", flush=True)
    if opts.only:
        scenarios = opts.scenarios.split(",")
        if unknown := set(scenarios) - set(ALL_SCENARIOS):
            parser.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
        out = asyncio.run(only(opts.rounds, seconds, scenarios, opts.workers2))
        path = ROOT / "bench" / "results" / "dataplane_only.json"
    elif opts.before:
        scenarios = opts.scenarios.split(",")
        if unknown := set(scenarios) - set(ALL_SCENARIOS):
            parser.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
        out = asyncio.run(compare(opts.before, opts.rounds, seconds, scenarios, opts.workers2))
        path = ROOT / "bench" / "results" / "dataplane_ab.json"
    else:
        out = asyncio.run(main(seconds))
        path = ROOT / "bench" / "results" / "dataplane.json"
    path.write_text(json.dumps(out, indent=2))
    if opts.before:
        print_table(out)
    elif not opts.only:
        print(json.dumps(out, indent=2))
    print(f"written to {path}")
