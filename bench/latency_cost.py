"""What measuring delivery latency costs a proxy's fan-out, in process, A/B side by side.

A proxy observes `neoplasma_proxy_delivery_latency_seconds` once per dispatch round and transport
(proxy/neoplasma/proxy/metrics.py). This times `Hub.dispatch` rounds without a broker accept time
(A: nothing observed) and with one (B: observed), alternating A and B round by round on the same
hub, for SSE subscribers whose frames go nowhere ("hub only": the round is only the hub's own work,
matching, encoding and bookkeeping, so B/A overstates what the observation adds) or to /dev/null
with one write(2) per subscriber ("write"; a TCP socket's write costs more still). Prints a table
and writes bench/results/latency_cost.json.

Usage: python bench/latency_cost.py [--rounds N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

from neoplasma.core.events import Event
from neoplasma.proxy.hub import Batch, Hub, SseSubscriber

ROOT = Path(__file__).resolve().parent.parent
CASES = ((100, 1), (1000, 1), (1000, 10), (5000, 10))  # (subscribers, events per round)


class Nowhere(SseSubscriber):
    """An SSE subscriber whose frames are encoded as for a real one, then written to `fd` (or dropped)."""

    def __init__(self, fd: int | None) -> None:
        super().__init__(None, 0)  # type: ignore[arg-type]
        self.fd = fd

    @staticmethod
    def encode(batch: Batch, indices: list[int]) -> bytes:
        return SseSubscriber.encode(batch, indices)

    def deliver(self, encoded: object, position: bool = True) -> bool:
        if self.fd is not None:
            os.write(self.fd, encoded)  # type: ignore[arg-type]
        return True


def run_case(subscribers: int, per_round: int, rounds: int, fd: int | None) -> dict[str, Any]:
    hub = Hub()
    hub.confirm(hub.instance)  # as in a proxy whose brokers took its pointer instance: writes carry pointers
    for _ in range(subscribers):
        hub.add(Nowhere(fd), ["t"])
    data = b'{"program":1234,"views":98765,"pad":"' + b"x" * 150 + b'"}'
    seq = 0
    costs: dict[str, list[float]] = {"without": [], "with": []}
    for i in range(2 * rounds):
        events = []
        for _ in range(per_round):
            seq += 1
            events.append(Event("t", data, 1, seq))
        observed = i % 2 == 1
        accepted = time.time_ns() - 3_000_000 if observed else 0
        started = time.perf_counter()
        hub.dispatch(events, {1: seq}, accepted)
        costs["with" if observed else "without"].append(time.perf_counter() - started)
    assert hub.metrics.latency.count("sse") == rounds * subscribers * per_round
    without, with_ = (statistics.median(costs[k]) * 1e6 for k in ("without", "with"))
    return {"writes": "write" if fd is not None else "hub only", "subscribers": subscribers,
            "events_per_round": per_round, "rounds": rounds,
            "round_us_without": round(without, 2), "round_us_with": round(with_, 2),
            "added_us": round(with_ - without, 2), "ratio": round(with_ / without, 4)}


async def main(rounds: int) -> list[dict[str, Any]]:
    """Every case, hub only and with writes (in a running loop: the hub's subscribers need one)."""
    fd = os.open(os.devnull, os.O_WRONLY)
    try:
        return [run_case(subscribers, per_round, rounds, target) for target in (None, fd)
                for subscribers, per_round in CASES]
    finally:
        os.close(fd)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2000, help="rounds of each kind per case (default 2000)")
    results = asyncio.run(main(parser.parse_args().rounds))
    print(f"{'writes':>8} {'subscribers':>11} {'events/round':>12} {'round us (A)':>13} {'round us (B)':>13} "
          f"{'B/A':>7}")
    for r in results:
        print(f"{r['writes']:>8} {r['subscribers']:>11} {r['events_per_round']:>12} {r['round_us_without']:>13} "
              f"{r['round_us_with']:>13} {r['ratio']:>7}")
    out = ROOT / "bench" / "results" / "latency_cost.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written to {out}")
