"""1000 forged full-retention resumes at once (issue 20, item 3): the broker's CPU and the delivery
latency (p50/p99, publish to SSE client) of 100 honest subscribers, quiet and meanwhile.

A broker with EVENTS retained events (topic `old`, ~200 B each) and a proxy; 100 honest SSE subscribers
of topic `h` get an event every 20 ms carrying its publish time. Then 1000 connections resume with a
forged id (the public cluster tag, the broker's epoch, seq 0: a replay of all of retention), all of
topic `old` (one position: shared) or each of its own topic `old:N` (1000 positions: budgets only), and
read what they get. Prints figures and writes JSON (bench/results/forged_resumes.json). The machine is
shared: compare the quiet and busy figures of one run.

Usage: python bench/forged_resumes.py [--events 20000] [--seconds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import psutil

from neoplasma.core.events import varint
from neoplasma.wire.v1 import neoplasma_pb2 as pb
from neoplasma.wire.v1 import neoplasma_pb2_grpc as pb_grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the test harness
from harness import SseClient, links_ready, proxy_status, start_server, wait_for

ROOT = Path(__file__).resolve().parent.parent
PAYLOAD = json.dumps({"program": 1234, "views": 98765, "pad": "x" * 150}).encode()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def honest_latency(stub: pb_grpc.BrokerStub, clients: list[SseClient], seconds: float) -> list[float]:
    """Publish a timestamped event to `h` every 20 ms for `seconds`; each client's delay for each, in ms."""
    for c in clients:
        c.events.clear()
    sent = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        await stub.Publish(pb.PublishRequest(events=[pb.Event(topic="h", data=b'{"at":%f}' % time.time())]),
                           timeout=10)
        sent += 1
        await asyncio.sleep(0.02)
    with contextlib.suppress(AssertionError):  # what has not come within 30 s counts as 30 s late
        await wait_for(lambda: all(len(c.events) >= sent for c in clients), timeout=30, what="every honest event")
    late = [1000 * (c.arrived[k] - e["data"]["at"]) for c in clients for k, e in enumerate(list(c.events))]
    return late + [30_000.0] * (sent * len(clients) - len(late))


class TimedSse(SseClient):
    """An SseClient that notes when each event arrived."""

    def __init__(self, http: str, topics: str) -> None:
        super().__init__(http, topics)
        self.arrived: list[float] = []
        self.events = _Noting(self.arrived)


class _Noting(list[Any]):
    def __init__(self, times: list[float]) -> None:
        super().__init__()
        self.times = times

    def append(self, item: Any) -> None:
        self.times.append(time.time())
        super().append(item)

    def clear(self) -> None:
        self.times.clear()
        super().clear()


async def forged(http: str, topic: str, token: str) -> int:
    """One resume with a forged id, reading (and discarding) what it gets until cancelled; bytes read."""
    host, _, port = http.rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    got = 0
    try:
        writer.write(f"GET /?eventType={topic} HTTP/1.1\r\nHost: p\r\nLast-Event-ID: {token}\r\n\r\n".encode())
        while data := await reader.read(1 << 16):
            got += len(data)
    finally:
        writer.close()
    return got


async def run(tmp: Path, events: int, seconds: float, shared: bool) -> dict[str, Any]:
    broker = start_server("broker", "forged-b0", tmp)
    proxy = start_server("proxy", "forged-p0", tmp, "--brokers", broker.endpoints["grpc"])
    cpu = psutil.Process(broker.proc.pid)
    try:
        http = proxy.endpoints["http"]
        async with grpc.aio.insecure_channel(broker.endpoints["grpc"]) as ch:
            stub = pb_grpc.BrokerStub(ch)
            for k in range(0, events, 1000):
                await stub.Publish(pb.PublishRequest(events=[pb.Event(topic=f"old:{(k + i) % 1000}", data=PAYLOAD)
                                                             for i in range(1000)]), timeout=30)
            clients = [await TimedSse(http, "h").start() for _ in range(100)]
            await wait_for(lambda: links_ready(proxy.endpoints["control"], 1), what="the relay")
            await wait_for(lambda: proxy_status(proxy.endpoints["control"]), what="status")
            await stub.Publish(pb.PublishRequest(events=[pb.Event(topic="h", data=b'{"at":0}')]), timeout=10)
            await wait_for(lambda: all(c.ids for c in clients), what="an id")
            raw = base64.urlsafe_b64decode(clients[0].ids[-1] + "==")
            # Version, check and the broker's mark, as in every id, then seq 0 (the check names no position).
            token = base64.urlsafe_b64encode(raw[:7] + varint(0)).rstrip(b"=").decode()
            quiet_cpu = sum(cpu.cpu_times()[:2])
            quiet = await honest_latency(stub, clients, seconds)
            quiet_cpu = sum(cpu.cpu_times()[:2]) - quiet_cpu
            busy_cpu = sum(cpu.cpu_times()[:2])
            attackers = [asyncio.create_task(forged(http, "old" if shared else f"old:{n}", token)) for n in range(1000)]
            busy = await honest_latency(stub, clients, seconds)
            busy_cpu = sum(cpu.cpu_times()[:2]) - busy_cpu
            for task in attackers:
                task.cancel()
            got = [t.result() for t in attackers if t.done() and not t.cancelled() and t.exception() is None]
            for c in clients:
                await c.close()
        return {"forged_topics": "one (old)" if shared else "1000 (old:N)", "retained_events": events,
                "quiet_p50_ms": round(percentile(quiet, 0.5), 1), "quiet_p99_ms": round(percentile(quiet, 0.99), 1),
                "busy_p50_ms": round(percentile(busy, 0.5), 1), "busy_p99_ms": round(percentile(busy, 0.99), 1),
                "broker_cpu_s_quiet": round(quiet_cpu, 2), "broker_cpu_s_busy": round(busy_cpu, 2),
                "seconds": seconds, "forged_connections_ended": len(got)}
    finally:
        with contextlib.suppress(Exception):
            proxy.stop()
        broker.stop()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for shared in (True, False):
            row = await run(Path(tmp), args.events, args.seconds, shared)
            results.append(row)
            print(json.dumps(row), flush=True)
    out = ROOT / "bench" / "results" / "forged_resumes.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    asyncio.run(main())
