"""Resumable streams benchmark (docs/resume.md).

Prints figures and writes JSON (bench/results/resume.json):
  - the CPU of the proxy's fan-out alone (Hub.dispatch to 1000 SSE subscribers, in a fresh
    process), this tree and the code before resumable streams (`git merge-base HEAD main`,
    exported to a temporary folder and put first on PYTHONPATH), which load on a shared machine
    disturbs far less than end-to-end figures;
  - the time to serve one resume of 10,000 missed events (SSE, from Last-Event-ID to the last event).

Retention memory per event: bench/retention_memory.py.

End to end, before and after, interleaved with medians: `python bench/dataplane.py --before PYTHON`
(PYTHON: the interpreter of a checkout of the older code, with its own `pip install -e .`).

Usage: python bench/resume.py
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import grpc

from neoplasma.wire.v1 import neoplasma_pb2 as pb
from neoplasma.wire.v1 import neoplasma_pb2_grpc as pb_grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the test harness
from harness import apply_membership, links_ready, start_server, wait_for

ROOT = Path(__file__).resolve().parent.parent

_spec = importlib.util.spec_from_file_location("bench_dataplane", ROOT / "bench" / "dataplane.py")
assert _spec is not None and _spec.loader is not None
bench_dataplane = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_dataplane)
PAYLOAD = json.dumps(bench_dataplane.PAYLOAD).encode()


def baseline_tree() -> Path:
    """The code before resumable streams, exported (not checked out) to a temporary folder."""
    base = subprocess.run(["git", "merge-base", "HEAD", "main"], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.strip()
    folder = Path(tempfile.mkdtemp(prefix="neoplasma-baseline-"))
    archive = subprocess.run(["git", "archive", base], cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder


HUB_PROBE = """
import asyncio, json, sys, time
from neoplasma.core.events import Event
from neoplasma.proxy.hub import Hub, SseSubscriber

class Sink(asyncio.WriteTransport):
    def write(self, data): pass
    def is_closing(self): return False
    def get_write_buffer_size(self): return 0

async def main(payload, rounds, per_round):
    hub = Hub()
    for _ in range(1000):
        hub.add(SseSubscriber(Sink(), 1 << 22), ["program:1234"])
    stamped = "seq" in Event.__dataclass_fields__
    best = float("inf")
    for _ in range(3):
        seq, cpu = 0, 0.0
        for _ in range(rounds):
            events = []
            for _ in range(per_round):
                seq += 1
                events.append(Event("program:1234:views", payload, 7, seq) if stamped
                              else Event("program:1234:views", payload))
            started = time.process_time()
            hub.dispatch(events)
            cpu += time.process_time() - started
        best = min(best, cpu)
    print(json.dumps({"stamped": stamped, "cpu_ms_per_1000_events_to_1000_subscribers":
                      round(1000 * best / (rounds * per_round) * 1000, 2)}))

asyncio.run(main(sys.argv[1].encode(), int(sys.argv[2]), int(sys.argv[3])))
"""


def hub_cpu(tree: Path | None, rounds: int = 300, per_round: int = 10) -> dict[str, Any]:
    """CPU of the proxy's fan-out alone (Hub.dispatch to 1000 SSE subscribers whose sockets take
    everything), in a fresh process: 10 events per round, as 1000 events/s arrive in 10 ms rounds.
    Not disturbed by the load generators sharing the machine, unlike the end-to-end figures."""
    env = dict(os.environ)
    if tree is not None:
        env["PYTHONPATH"] = os.pathsep.join(str(tree / d) for d in ("core", "broker", "proxy", "protos"))
    out = subprocess.run([sys.executable, "-c", HUB_PROBE, PAYLOAD.decode(), str(rounds), str(per_round)],
                         env=env, capture_output=True, text=True, check=True).stdout
    return dict(json.loads(out))


async def resume_time(tmp: Path, missed: int = 10_000) -> dict[str, Any]:
    broker = start_server("broker", "resume-broker", tmp)
    proxy = start_server("proxy", "resume-proxy", tmp)
    try:
        await apply_membership(proxy.endpoints["control"], 1, [(broker.name, broker.endpoints["grpc"])])
        url = f"http://{proxy.endpoints['http']}/?eventType=program:1234"
        async with grpc.aio.insecure_channel(broker.endpoints["grpc"]) as ch, \
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as session:
            stub = pb_grpc.BrokerStub(ch)

            async def publish(n: int) -> None:
                for _ in range(0, n, 100):
                    await stub.Publish(pb.PublishRequest(events=[pb.Event(topic="program:1234:views", data=PAYLOAD)
                                                                 for _ in range(100)]), timeout=10)

            async with session.get(url) as resp:  # a subscriber sees one event, keeps its id, goes away
                await wait_for(lambda: links_ready(proxy.endpoints["control"], 1), timeout=20)
                await publish(100)
                last_id = ""
                async for line in resp.content:
                    if line.startswith(b"id:"):
                        last_id = line[3:].decode().strip()
                        break
            await publish(missed)  # ... and misses these (plus the rest of the first hundred)
            started = time.monotonic()
            got = 0
            async with session.get(url, headers={"Last-Event-ID": last_id}) as resp:
                async for line in resp.content:
                    got += line.startswith(b"data: ")
                    if got >= missed:
                        break
            elapsed = time.monotonic() - started
        return {"missed_events": missed, "received": got, "seconds": round(elapsed, 3),
                "events_per_second": round(got / elapsed)}
    finally:
        broker.stop()
        proxy.stop()


async def main() -> dict[str, Any]:
    tmp = ROOT / "bench" / "results" / "logs"
    tmp.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0],
                                           "load_average": os.getloadavg()}}
    tree = baseline_tree()
    for label, code in (("baseline", tree), ("resumable", None)):
        results[f"hub_dispatch_cpu_{label}"] = hub_cpu(code)
        print(f"fan-out CPU in the hub alone, {label}:", results[f"hub_dispatch_cpu_{label}"], flush=True)
    results["resume_10000_missed"] = await resume_time(tmp)
    print("resume of 10,000 missed events:", results["resume_10000_missed"], flush=True)
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args()
    out = asyncio.run(main())
    path = ROOT / "bench" / "results" / "resume.json"
    path.write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))
    print(f"written to {path}")
