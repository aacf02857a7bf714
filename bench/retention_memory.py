"""What a broker really holds per retained event (issue 20, item 7).

For publish requests of 1, 10 and 1000 events, over HTTP and over gRPC, a fresh broker (one worker,
retention large enough to keep everything) takes EVENTS events of ~200 B (as bench/dataplane.py
publishes); the growth of its RSS over an idle baseline, divided by the events kept, is what it
really holds per event. Beside it: what retention counts (the broker's
`neoplasma_broker_retained_bytes` gauge, where the tree has it) and the growth when retention keeps
almost nothing (`--retention-seconds 0.001`), which is the part not due to retention.

With `--before REF` the same runs are made on that commit too (exported with `git archive` and put
first on PYTHONPATH), interleaved, so the two trees are compared side by side on a shared machine.

Prints a table and writes JSON (bench/results/retention_memory.json).

Usage: python bench/retention_memory.py [--events 20000] [--before 5d773e4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import psutil

from neoplasma.wire.v1 import neoplasma_pb2 as pb
from neoplasma.wire.v1 import neoplasma_pb2_grpc as pb_grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the test harness
from harness import start_server, trees

ROOT = Path(__file__).resolve().parent.parent
PAYLOAD = json.dumps({"program": 1234, "views": 98765, "pad": "x" * 150}).encode()  # ~200 B events
TOPICS = [f"program:{n}:views" for n in range(100)]
CONCURRENCY = 8



def rss(pid: int) -> int:
    return int(psutil.Process(pid).memory_info().rss)


async def retained_bytes(http: str) -> int | None:
    async with aiohttp.ClientSession() as session, session.get(f"http://{http}/metrics") as resp:
        text = await resp.text()
    found = re.search(r"^neoplasma_broker_retained_bytes (\S+)$", text, re.M)
    return int(float(found.group(1))) if found else None


async def publish_http(http: str, requests: int, batch: int) -> None:
    body = lambda n: b"[" + b",".join(  # noqa: E731
        b'{"meta":{"type":"%s"},"data":%s}' % (TOPICS[(n + i) % len(TOPICS)].encode(), PAYLOAD)
        for i in range(batch)) + b"]"
    bodies = [body(n) for n in range(len(TOPICS))]
    async with aiohttp.ClientSession() as session:
        async def worker(k: int) -> None:
            for n in range(k, requests, CONCURRENCY):
                async with session.post(f"http://{http}/publish", data=bodies[n % len(bodies)],
                                        headers={"Content-Type": "application/json"}) as resp:
                    assert resp.status == 200, await resp.text()
        await asyncio.gather(*(worker(k) for k in range(CONCURRENCY)))


async def publish_grpc(address: str, requests: int, batch: int) -> None:
    reqs = [pb.PublishRequest(events=[pb.Event(topic=TOPICS[(n + i) % len(TOPICS)], data=PAYLOAD)
                                      for i in range(batch)]) for n in range(len(TOPICS))]
    async with grpc.aio.insecure_channel(address) as ch:
        stub = pb_grpc.BrokerStub(ch)

        async def worker(k: int) -> None:
            for n in range(k, requests, CONCURRENCY):
                await stub.Publish(reqs[n % len(reqs)], timeout=30)
        await asyncio.gather(*(worker(k) for k in range(CONCURRENCY)))


async def one_run(tmp: Path, env: dict[str, str], how: str, batch: int, events: int,
                  retention: list[str]) -> dict[str, Any]:
    broker = start_server("broker", f"mem-{how}-{batch}", tmp, *retention, env=env)
    try:
        pid = broker.proc.pid
        publish = publish_http if how == "http" else publish_grpc
        address = broker.endpoints["http" if how == "http" else "grpc"]
        await publish(address, 200, 1)  # warm up: connections, caches, first allocations
        idle = rss(pid)
        started = time.monotonic()
        await publish(address, events // batch, batch)
        seconds = time.monotonic() - started
        grown = rss(pid) - idle
        counted = await retained_bytes(broker.endpoints["http"])
        kept = (events // batch) * batch
        return {"idle_rss_mb": round(idle / 2**20, 1), "rss_growth_mb": round(grown / 2**20, 1),
                "bytes_per_event": round(grown / kept, 1), "bytes_per_request": round(grown / (events // batch), 1),
                "counted_bytes_per_event": round(counted / (kept + 200), 1) if counted is not None else None,
                "events_per_second": round(kept / seconds)}
    finally:
        broker.stop()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=20_000, help="events published per run")
    parser.add_argument("--before", default=None, help="also run this commit's code, side by side")
    args = parser.parse_args()
    codes = trees(args.before)
    results: list[dict[str, Any]] = []
    keep_all = ["--retention-bytes", str(1 << 30)]
    keep_none = ["--retention-seconds", "0.001"]
    with tempfile.TemporaryDirectory() as tmp:
        for how in ("http", "grpc"):
            for batch in (1, 10, 1000):
                events = max(args.events, 10 * batch) if batch < 1000 else max(10 * args.events, 10 * batch)
                for tree, env in codes.items():  # interleaved: load on the machine hits both alike
                    kept = await one_run(Path(tmp), env, how, batch, events, keep_all)
                    dropped = await one_run(Path(tmp), env, how, batch, events, keep_none)
                    row = {"tree": tree, "via": how, "batch": batch, "events": events, "retained": kept,
                           "not_retained": dropped}
                    results.append(row)
                    print(f"{tree:>14} {how:>4} batch {batch:>4}: {events:>7} events, "
                          f"RSS +{kept['rss_growth_mb']:6.1f} MB "
                          f"= {kept['bytes_per_event']:7.1f} B/event held (counted "
                          f"{kept['counted_bytes_per_event']}); with retention ~0: +{dropped['rss_growth_mb']:5.1f} MB "
                          f"({kept['events_per_second']} ev/s)", flush=True)
    out = ROOT / "bench" / "results" / "retention_memory.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"payload_bytes": len(PAYLOAD), "results": results}, indent=1))
    print(json.dumps({"payload_bytes": len(PAYLOAD), "results": results}))
    print(f"written to {out}", file=sys.stderr)


if __name__ == "__main__":
    asyncio.run(main())
