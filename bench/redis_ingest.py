"""Redis ingest benchmark: messages/s from one Redis into the cluster (publisher -> Redis ->
`neoplasma ingest-redis` -> brokers), beside plain Redis subscribers as the reference.

The publisher is `redis-benchmark` running `PUBLISH` with pipelining (plasma's message format,
~200 B). Each row is one run with a fresh redis-server on 127.0.0.1:
  - publish only: redis-benchmark's own rate with one plain subscriber attached;
  - redis-py PubSub: a plain Python subscriber (redis.asyncio, hiredis), messages/s;
  - ingest: one reader checking each message and publishing batches to 2 brokers, events/s
    accepted by the brokers, and whether every message got in.
Redis's default `client-output-buffer-limit pubsub 32mb 8mb 60` disconnects a subscriber that
falls behind a burst; the bench lifts it so a reader's backlog shows as lag, not loss.

Usage: python bench/redis_ingest.py [--messages N] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the test harness
from harness import Server, start_server, wait_for

ROOT = Path(__file__).resolve().parent.parent
MESSAGE = json.dumps({"meta": {"type": "program:1234:views"}, "data": {"program": 1234, "views": 98765,
                                                                       "pad": "x" * 120}})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_redis(workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir),
                             "--save", "", "--appendonly", "no", "--client-output-buffer-limit", "pubsub 0 0 0"],
                            stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while socket.socket().connect_ex(("127.0.0.1", port)) != 0:
        if time.monotonic() > deadline:
            raise RuntimeError("redis-server did not start")
        time.sleep(0.02)
    return proc, port


def publish(port: int, n: int) -> float:
    """Publish `n` messages with redis-benchmark; its requests/s."""
    out = subprocess.run(["redis-benchmark", "-p", str(port), "-n", str(n), "-c", "2", "-P", "64", "-q",
                          "PUBLISH", "plasma", MESSAGE], capture_output=True, text=True, check=True).stdout
    return float(re.findall(r"([\d.]+) requests per second", out)[-1])


async def redispy_subscriber(port: int, n: int) -> None:
    """Role: a plain redis-py subscriber; prints its messages/s (first to last message) as JSON."""
    import redis.asyncio as aioredis

    pubsub = aioredis.Redis(port=port).pubsub()
    await pubsub.subscribe("plasma")
    await pubsub.get_message(timeout=5)
    print(json.dumps({"subscribed": True}), flush=True)
    count, first = 0, 0.0
    while count < n:
        if await pubsub.get_message(ignore_subscribe_messages=True, timeout=10) is None:
            break
        count += 1
        first = first or time.perf_counter()
    print(json.dumps({"messages": count, "rate": count / max(time.perf_counter() - first, 1e-9)}), flush=True)


async def ingest_metric(http: str, name: str) -> float:
    async with aiohttp.ClientSession() as session, session.get(f"http://{http}/metrics") as r:
        text = await r.text()
    found = re.findall(rf"^{name} (\S+)$", text, re.M)
    return float(found[0]) if found else 0.0


async def subscribed(http: str) -> bool:
    async with aiohttp.ClientSession() as session, session.get(f"http://{http}/healthz") as r:
        return bool((await r.json())["reason"] == "active: reading Redis")


async def run_ingest(port: int, n: int, workdir: Path) -> dict[str, Any]:
    brokers = [start_server("broker", f"bench-b{i}", workdir) for i in range(2)]
    reader: Server = start_server("ingest-redis", "bench-in", workdir, "--redis", f"127.0.0.1:{port}",
                                  "--channels", "plasma", "--lease", "none", "--brokers",
                                  ",".join(b.endpoints["grpc"] for b in brokers), ports={"http-port": 0})
    http = reader.endpoints["http"]
    try:
        await wait_for(lambda: subscribed(http), what="the reader subscribed")
        loop = asyncio.get_running_loop()
        publishing = loop.run_in_executor(None, publish, port, n)
        samples: list[tuple[float, float]] = []
        while True:
            published = await ingest_metric(http, "neoplasma_ingest_events_published_total")
            samples.append((time.perf_counter(), published))
            stalled = len(samples) > 25 and samples[-25][1] == published and publishing.done()  # 5 s, no progress
            if published >= n or stalled:
                break
            await asyncio.sleep(0.2)
        start = next(t for t, v in samples if v > 0)
        end = next(t for t, v in samples if v == published)
        lag = await ingest_metric(http, "neoplasma_ingest_lag_seconds_sum") / max(
            await ingest_metric(http, "neoplasma_ingest_lag_seconds_count"), 1)
        read = await ingest_metric(http, "neoplasma_ingest_messages_in_total")  # redis-benchmark may send a few more
        return {"published_rate": await publishing, "read": read, "events": published, "lost": read - published,
                "dropped": await ingest_metric(http, "neoplasma_ingest_events_dropped_total"),
                "rate": published / max(end - start, 1e-9), "mean_batch_lag_ms": lag * 1000}
    finally:
        for s in (reader, *brokers):
            s.stop()


def run(n: int) -> dict[str, Any]:
    results: dict[str, Any] = {"messages": n, "message_bytes": len(MESSAGE)}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        redis, port = start_redis(workdir)
        try:
            sub = subprocess.Popen([sys.executable, __file__, "--role", "redispy", "--port", str(port),
                                    "--messages", str(n)], stdout=subprocess.PIPE, text=True)
            assert sub.stdout is not None
            json.loads(sub.stdout.readline())
            results["publish_only"] = {"rate": publish(port, n)}
            results["redis_py_subscriber"] = json.loads(sub.stdout.readline())
            sub.wait()
            results["ingest"] = asyncio.run(run_ingest(port, n, workdir))
        finally:
            redis.terminate()
            redis.wait()
    return results


def table(r: dict[str, Any]) -> str:
    ingest = r["ingest"]
    rows = [("path", "messages/s", "note"),
            ("redis-benchmark PUBLISH (1 plain subscriber)", f"{r['publish_only']['rate']:,.0f}", "the publisher"),
            ("redis-py PubSub subscriber", f"{r['redis_py_subscriber']['rate']:,.0f}",
             f"{r['redis_py_subscriber']['messages']} read"),
            ("ingest-redis -> 2 brokers", f"{ingest['rate']:,.0f}",
             f"{ingest['events']:.0f} accepted, {ingest['lost']:.0f} not ({ingest['dropped']:.0f} dropped: "
             f"buffer full), mean batch lag {ingest['mean_batch_lag_ms']:.1f} ms")]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=500_000)
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "redis_ingest.json")
    parser.add_argument("--role", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "redispy":
        asyncio.run(redispy_subscriber(args.port, args.messages))
        return
    results = run(args.messages)
    print(table(results))
    args.json.parent.mkdir(exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
