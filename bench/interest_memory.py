"""Proxy and broker RSS before, during and 10 s after 200 SSE subscriptions of 1000 distinct topics each
close (issue 20, item 4): one client asking for 200,000 topics, which the proxy asks its broker for.

With `--before REF`, the same run is made on that commit's code (exported with `git archive`, first on
PYTHONPATH) after this tree's, side by side. Prints a table and writes JSON
(bench/results/interest_memory.json).

Usage: python bench/interest_memory.py [--before 5d773e4] [--subscriptions 200]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the test harness
from harness import SseClient, links_ready, proxy_status, start_server, trees, wait_for

ROOT = Path(__file__).resolve().parent.parent
MIB = 1 << 20



async def run(tmp: Path, env: dict[str, str], subscriptions: int) -> dict[str, Any]:
    broker = start_server("broker", "interest-b0", tmp, env=env)
    proxy = start_server("proxy", "interest-p0", tmp, "--brokers", broker.endpoints["grpc"], env=env)
    procs = {"proxy": psutil.Process(proxy.proc.pid), "broker": psutil.Process(broker.proc.pid)}

    def rss() -> dict[str, float]:
        return {k: round(p.memory_info().rss / MIB, 1) for k, p in procs.items()}

    try:
        control = proxy.endpoints["control"]
        await wait_for(lambda: links_ready(control, 1), what="the relay")
        before = rss()
        clients = []
        for k in range(subscriptions):
            topics = ",".join(f"{k:x}.{n:x}" for n in range(1000))  # short: the request line stays under 8 KiB
            clients.append(await SseClient(proxy.endpoints["http"], topics).start())
        accepted = sum(c.status == 200 for c in clients)
        await wait_for(lambda: links_ready(control, 1), timeout=60, what="the broker applying the interest")
        topics = (await proxy_status(control)).topics
        during = rss()
        for client in clients:
            await client.close()
        await wait_for(lambda: proxy_status(control), what="status")
        closed = time.monotonic()
        await asyncio.sleep(10)  # the figure is "10 s after they closed"
        after = rss()
        return {"subscriptions": subscriptions, "accepted": accepted, "topics_during": topics,
                "before_mb": before, "during_mb": during, "10s_after_mb": after,
                "topics_after": (await proxy_status(control)).topics, "closed_for_s": round(time.monotonic() - closed)}
    finally:
        proxy.stop()
        broker.stop()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", default=None, help="also run this commit's code, side by side")
    parser.add_argument("--subscriptions", type=int, default=200)
    args = parser.parse_args()
    codes = trees(args.before)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for tree, env in codes.items():
            row = {"tree": tree, **await run(Path(tmp), env, args.subscriptions)}
            results.append(row)
            print(f"{tree:>14}: {row['accepted']}/{row['subscriptions']} accepted, {row['topics_during']} topics; "
                  f"RSS MB before {row['before_mb']}, during {row['during_mb']}, 10 s after {row['10s_after_mb']}",
                  flush=True)
    out = ROOT / "bench" / "results" / "interest_memory.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(json.dumps(results))


if __name__ == "__main__":
    asyncio.run(main())
