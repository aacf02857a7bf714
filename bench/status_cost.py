"""What a proxy worker's Status costs in its hub: the subscriber counts by kind and the movable count.

A hub of `--subscribers` SSE subscribers over `--topics` topics (a share of them given a position: movable), in
this process; each Status reads `Hub.counts()` and the movable count (`Hub.movable_count()`, or on a build
without it `len(Hub.movable())`, what Status read then). Prints the median and p99 microseconds per Status over
`--calls` calls, and writes them as JSON to bench/results/status_cost.json (with `--before PYTHON`: the same
measured with another build's interpreter first, side by side).

Usage: python bench/status_cost.py [--subscribers N] [--topics T] [--calls C] [--before PYTHON]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from neoplasma.proxy.hub import Hub, SseSubscriber

ROOT = Path(__file__).resolve().parent.parent


async def measure(subscribers: int, topics: int, calls: int, positioned: float) -> dict[str, Any]:
    hub = Hub()
    for n in range(subscribers):
        sub = SseSubscriber(None, 1 << 20)  # type: ignore[arg-type]  # never written to here
        sub.positioned = n < subscribers * positioned
        hub.add(sub, ["density", f"spread{n % topics}"])
    count = getattr(hub, "movable_count", None) or (lambda: len(hub.movable()))
    took = []
    for _ in range(calls):
        started = time.perf_counter()
        counts, movable = hub.counts(), count()
        took.append((time.perf_counter() - started) * 1e6)
    assert sum(counts.values()) == subscribers and movable == int(subscribers * positioned + 0.999999)
    took.sort()
    return {"subscribers": subscribers, "calls": calls, "median_us": round(statistics.median(took), 1),
            "p99_us": round(took[int(len(took) * 0.99)], 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subscribers", type=int, default=16_700, help="subscribers in the hub (default 16,700)")
    parser.add_argument("--topics", type=int, default=1000, help="topics they spread over (default 1000)")
    parser.add_argument("--calls", type=int, default=200, help="Status reads timed (default 200)")
    parser.add_argument("--before", default="", help="first the same with another build's interpreter")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a single measurement, as JSON
    args = parser.parse_args()
    if not 0 < args.subscribers <= 1_000_000 or not 0 < args.topics <= 100_000 or not 0 < args.calls <= 100_000:
        parser.error("--subscribers must be 1..1,000,000, --topics 1..100,000, --calls 1..100,000")
    if args.one:
        print(json.dumps(asyncio.run(measure(args.subscribers, args.topics, args.calls, 0.5))))
        return
    out: dict[str, Any] = {}
    for label, python in (("before", args.before), ("current", sys.executable)):
        if not python:
            continue
        cmd = [python, __file__, "--one", "--subscribers", str(args.subscribers), "--topics", str(args.topics),
               "--calls", str(args.calls)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=True)
        out[label] = json.loads(done.stdout)
        print(f"{label}: {out[label]}")
    if "before" in out:
        out["ratio_median"] = round(out["before"]["median_us"] / max(out["current"]["median_us"], 0.1), 1)
        print(f"before/current median: {out['ratio_median']}x")
    (ROOT / "bench" / "results").mkdir(exist_ok=True)
    (ROOT / "bench" / "results" / "status_cost.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
