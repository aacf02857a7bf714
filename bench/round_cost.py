"""What a proxy's dispatch round costs with SSE pointer ids, A/B side by side with another revision, in process.

Times `Hub.dispatch` (the hub's own work: matching, encoding, the pointer journal, handing each SSE subscriber
its write; the writes go nowhere) with 60 brokers' positions (seqs near 10^8: 4-byte varints), ~200-byte
events and SSE subscribers spread over topic groups. Each case runs in a fresh process of this tree and of
`--before REV` (default main, `git archive` exported and put first on its PYTHONPATH), alternating, `--runs`
times; prints the medians of each case's median round (docs/resume.md, "Pointer ids").

Usage: python bench/round_cost.py [--before REV] [--runs 3] [--rounds 3000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# (events per round, SSE subscribers, topic groups): one write of 5 events per subscriber; each event its own write
# (5 events over 10 groups, or 1 event a round); 50 events over 10 groups.
CASES = ((5, 100, 1), (5, 1000, 10), (1, 100, 1), (50, 1000, 10))


class Nowhere:
    """A transport that takes writes and drops them."""

    def is_closing(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return 0

    def write(self, data: bytes) -> None:
        pass


async def measure(events_per_round: int, subscribers: int, groups: int, rounds: int) -> float:
    """The median seconds of a dispatch round in the tree this process imports."""
    from neoplasma.core.events import Event
    from neoplasma.proxy.hub import Hub, SseSubscriber

    hub = Hub()
    hub.set_cluster("bench")
    confirm = getattr(hub, "confirm", None)  # its pointer instance taken by brokers (none here): pointers at once
    if confirm is not None:
        confirm(hub.instance)
    for g in range(groups):
        for _ in range(subscribers // groups):
            hub.add(SseSubscriber(Nowhere(), 1 << 20), [f"t{g}"])  # type: ignore[arg-type]
    epochs = list(range(1000, 1060))
    seqs = {epoch: 100_000_000 for epoch in epochs}
    hub.positions.update(seqs)
    data = b'{"n":1,"kind":"score","program":1234,"text":"' + b"x" * 150 + b'"}'
    times = []
    k = 0
    for _ in range(rounds):
        events = []
        for i in range(events_per_round):
            epoch = epochs[k % 60]
            k += 1
            seqs[epoch] += 1
            events.append(Event(f"t{i % groups}", data, epoch, seqs[epoch]))
        started = time.perf_counter()
        hub.dispatch(events, {})
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def run_case(env: dict[str, str], case: tuple[int, int, int], rounds: int) -> float:
    out = subprocess.run([sys.executable, __file__, "--one", json.dumps([*case, rounds])], env=env, check=True,
                         capture_output=True, text=True).stdout
    return float(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", default="main", help="git revision to compare with")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3000)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        n, subscribers, groups, rounds = json.loads(args.one)
        print(asyncio.run(measure(n, subscribers, groups, rounds)))
        return
    sys.path.insert(0, str(ROOT / "bench"))
    from wire_bytes import exported_tree

    tree = exported_tree(args.before)
    envs = {"now": dict(os.environ),
            "before": {**os.environ, "PYTHONPATH": os.pathsep.join(str(tree / d) for d in
                                                                   ("core", "broker", "proxy", "protos"))}}
    results: dict[str, Any] = {"before": args.before, "runs": args.runs, "rounds": args.rounds, "cases": []}
    for case in CASES:
        got: dict[str, list[float]] = {"now": [], "before": []}
        for _ in range(args.runs):
            for label, env in envs.items():
                got[label].append(run_case(env, case, args.rounds))
        now, before = statistics.median(got["now"]), statistics.median(got["before"])
        n, subscribers, groups = case
        print(f"{n} events a round, {subscribers} SSE subscribers in {groups} group(s): {now * 1e6:.0f} us a round "
              f"now, {before * 1e6:.0f} us on {args.before} ({now / before:.2f}x)", flush=True)
        results["cases"].append({"events_per_round": n, "subscribers": subscribers, "groups": groups,
                                 "now_us": round(now * 1e6, 1), "before_us": round(before * 1e6, 1)})
    path = ROOT / "bench" / "results" / "round_cost.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2))
    print(f"written to {path}")


if __name__ == "__main__":
    main()
