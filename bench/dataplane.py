"""Data-plane benchmark: real broker + proxy processes on 127.0.0.1, load from separate processes.

Prints figures and writes JSON (bench/results/dataplane.json):
  - broker ingest events/s (gRPC Publish batches, one proxy attached and interested);
  - deliveries/s read by 1000 SSE subscribers at 100, 1000 and 2000 events/s (and 100 subscribers
    at 1000 events/s), with publish-to-delivery latency p50/p99 sampled on 50 connections;
  - proxy memory per idle subscriber at 5000 subscribers, SSE and plasma gRPC.

Usage: python bench/dataplane.py [--quick]
Every load loop is bounded in count and time; everything stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import psutil

from neoplasma.core.net import raise_fd_limit
from neoplasma.local.harness import (
    Server,
    apply_membership,
    links_ready,
    proxy_status,
    read_json_line,
    start_server,
    wait_for,
)
from neoplasma.plasma.v1 import stream_pb2, stream_pb2_grpc
from neoplasma.wire.v1 import neoplasma_pb2 as pb
from neoplasma.wire.v1 import neoplasma_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parent.parent

PAYLOAD = {"program": 1234, "views": 98765, "pad": "x" * 150}  # ~200 B events


# -- load roles (run in child processes) --------------------------------------------------------


class SseCounter(asyncio.Protocol):
    """Counts SSE events on one connection; optionally records latencies from embedded timestamps."""

    def __init__(self, record: list[float] | None) -> None:
        self.events = 0
        self.record = record
        self.tail = b""

    def data_received(self, data: bytes) -> None:
        self.events += data.count(b"\ndata: ") + (1 if data.startswith(b"data: ") else 0)
        if self.record is not None:
            now = time.time()
            buf = self.tail + data
            start = 0
            while (i := buf.find(b'"ts":', start)) >= 0:
                j = buf.find(b",", i)
                if j < 0:
                    break
                self.record.append(now - float(buf[i + 5:j]))
                start = j
            self.tail = buf[start:][-64:]


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
    await asyncio.sleep(seconds)  # the load window is the measurement, not synchronisation
    return {"events": sum(c.events for c in conns), "latencies": latencies}


async def role_plasma(grpc_addr: str, n: int, seconds: float) -> dict[str, Any]:
    channel = grpc.aio.insecure_channel(grpc_addr)
    stub = stream_pb2_grpc.StreamServiceStub(channel)
    calls = []
    for _ in range(n):
        call = stub.Events()
        await call.write(stream_pb2.Request(Events=[stream_pb2.EventType(type="bench")]))
        calls.append(call)
    print(json.dumps({"connected": n}), flush=True)
    await asyncio.sleep(seconds)
    for call in calls:
        call.cancel()
    await channel.close()
    return {"events": 0}


async def role_publish(broker: str, seconds: float, rate: float, batch: int, inflight: int) -> dict[str, Any]:
    """Publish `batch`-event requests for `seconds`; at `rate` events/s, or flat out when rate is 0."""
    accepted = 0
    deadline = time.monotonic() + seconds
    async with grpc.aio.insecure_channel(broker) as channel:
        stub = pb_grpc.BrokerStub(channel)

        def request() -> pb.PublishRequest:
            data = json.dumps({"ts": time.time(), **PAYLOAD}).encode()
            return pb.PublishRequest(events=[pb.Event(topic="bench:x", data=data)] * batch)

        async def worker() -> None:
            nonlocal accepted
            while time.monotonic() < deadline:
                accepted += (await stub.Publish(request(), timeout=10)).accepted

        if rate <= 0:
            await asyncio.gather(*(worker() for _ in range(inflight)))
        else:
            interval = batch / rate
            next_at = time.monotonic()
            while time.monotonic() < deadline:
                accepted += (await stub.Publish(request(), timeout=10)).accepted
                next_at += interval
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
    return {"accepted": accepted, "seconds": seconds}


def run_role(argv: list[str]) -> None:
    raise_fd_limit()
    role, args = argv[0], json.loads(argv[1])
    fn = {"sse": role_sse, "plasma": role_plasma, "publish": role_publish}[role]
    import uvloop  # the load generators need their speed more than anyone

    result = uvloop.run(fn(**args))  # type: ignore[operator]
    print(json.dumps({"result": result}), flush=True)


class Role:
    """A load role in its own process (so the load does not share a core's event loop with us)."""

    def __init__(self, role: str, **args: Any) -> None:
        self.proc = subprocess.Popen([sys.executable, __file__, "--role", role, json.dumps(args)],
                                     stdout=subprocess.PIPE, text=True)

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
        return await pb_grpc.BrokerStub(ch).Stats(pb.StatsRequest(), timeout=5)


async def ingest(broker: Server, seconds: float) -> dict[str, Any]:
    pub = Role("publish", broker=broker.endpoints["grpc"], seconds=seconds, rate=0, batch=100, inflight=4)
    before = (await broker_stats(broker)).events_in
    started = time.monotonic()
    res = pub.result()
    elapsed = time.monotonic() - started
    after = await broker_stats(broker)
    return {"events_per_second": round((after.events_in - before) / seconds), "accepted": res["accepted"],
            "dropped": after.events_dropped, "wall_seconds": round(elapsed, 1)}


async def fanout(broker: Server, proxy: Server, subscribers: int, seconds: float, rate: float,
                 sample: int) -> dict[str, Any]:
    subs = Role("sse", http=proxy.endpoints["http"], n=subscribers, seconds=seconds + 4, sample=sample)
    subs.wait_line()

    async def all_connected() -> bool:
        return (await proxy_status(proxy.endpoints["control"])).sse_subscribers == subscribers

    await wait_for(all_connected, timeout=60, what=f"{subscribers} subscribers at the proxy")
    await wait_for(lambda: links_ready(proxy.endpoints["control"], 1), timeout=20)
    status0 = await proxy_status(proxy.endpoints["control"])
    proxy_proc = psutil.Process(proxy.proc.pid)
    cpu0 = sum(proxy_proc.cpu_times()[:2])
    t0 = time.monotonic()
    batch = max(1, int(rate // 100)) if rate else 50  # paced: one request every 10 ms
    pub = Role("publish", broker=broker.endpoints["grpc"], seconds=seconds, rate=rate, batch=batch, inflight=2)
    published = pub.result()["accepted"]
    status1 = await proxy_status(proxy.endpoints["control"])
    elapsed = time.monotonic() - t0
    proxy_cpu = (sum(proxy_proc.cpu_times()[:2]) - cpu0) / elapsed
    res = subs.result()

    async def backlog_drained() -> bool:  # so the next scenario starts from a quiet proxy
        status, stats = await proxy_status(proxy.endpoints["control"]), await broker_stats(broker)
        return status.events_received >= stats.events_out

    await wait_for(backlog_drained, timeout=120, what="the proxy to catch up with the broker")
    lat = sorted(res["latencies"])
    out: dict[str, Any] = {
        "subscribers": subscribers, "published": published,
        "rate_asked": rate or "flat out",
        # What subscribers actually read, over the publishing window (the honest deliveries/s).
        "deliveries_per_second": round(res["events"] / seconds),
        "delivered_all": res["events"] == published * subscribers,
        "received_by_subscribers": res["events"],
        "proxy_handed_to_sockets_per_second": round((status1.deliveries - status0.deliveries) / elapsed),
        "slow_subscribers_dropped": status1.slow_subscribers_dropped - status0.slow_subscribers_dropped,
        "proxy_rss_mb": round(psutil.Process(proxy.proc.pid).memory_info().rss / 2**20, 1),
        "proxy_cpu_cores": round(proxy_cpu, 2),
    }
    if lat:
        out["latency_ms"] = {"p50": round(1000 * lat[len(lat) // 2], 2),
                             "p99": round(1000 * lat[int(len(lat) * 0.99)], 2),
                             "max": round(1000 * lat[-1], 2), "samples": len(lat)}
    return out


async def idle_memory(proxy: Server, kind: str, n: int) -> dict[str, Any]:
    proc = psutil.Process(proxy.proc.pid)
    before = proc.memory_info().rss
    role = (Role("sse", http=proxy.endpoints["http"], n=n, seconds=6, sample=0) if kind == "sse"
            else Role("plasma", grpc_addr=proxy.endpoints["grpc"], n=n, seconds=6))
    role.wait_line(180)

    async def all_connected() -> pb.ProxyStatus | None:
        status = await proxy_status(proxy.endpoints["control"])
        return status if status.subscribers == n else None

    status = await wait_for(all_connected, timeout=60, what=f"{n} subscribers at the proxy")
    after = proc.memory_info().rss
    role.result()
    return {"subscribers": status.subscribers, "rss_before_mb": round(before / 2**20, 1),
            "rss_after_mb": round(after / 2**20, 1), "kb_per_subscriber": round((after - before) / n / 1024, 1)}


async def main(quick: bool) -> dict[str, Any]:
    raise_fd_limit()
    tmp = ROOT / "bench" / "results" / "logs"
    tmp.mkdir(parents=True, exist_ok=True)
    seconds = 4.0 if quick else 10.0
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


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--role":
        run_role(sys.argv[2:])
        sys.exit(0)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="4 s load windows instead of 10 s")
    opts = parser.parse_args()
    out = asyncio.run(main(opts.quick))
    path = ROOT / "bench" / "results" / "dataplane.json"
    path.write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))
    print(f"written to {path}")
