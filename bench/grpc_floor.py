"""What grpc.aio itself costs a broker per published event: the floor under gRPC ingest.

A do-nothing `Broker.Publish` on grpc.aio (uvloop, one process: it decodes the request, takes each
event's topic and data, and answers) against a real broker (this build, one worker), publish load
from `bench/dataplane.py`'s publisher (100-event gRPC requests, 4 in flight), rounds interleaved.
Prints events/s and server CPU-µs per event (medians) and writes bench/results/grpc_floor.json.

    python bench/grpc_floor.py [--rounds N] [--seconds S]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc

from neoplasma.wire.v1 import neoplasma_pb2 as pb
from neoplasma.wire.v1 import neoplasma_pb2_grpc as pb_grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the test harness
import dataplane  # the load roles and the ingest scenario
from harness import Server, read_json_line, start_server


class Floor(pb_grpc.BrokerServicer):
    """Publish as cheap as grpc.aio allows: decode, take the pairs, count, answer."""

    def __init__(self) -> None:
        self.events = 0

    async def Publish(self, request: pb.PublishRequest, context: grpc.aio.ServicerContext) -> pb.PublishResponse:  # noqa: N802
        pairs = [(e.topic, e.data) for e in request.events]
        self.events += len(pairs)
        return pb.PublishResponse(accepted=len(pairs))

    async def Stats(self, request: pb.StatsRequest, context: grpc.aio.ServicerContext) -> pb.BrokerStats:  # noqa: N802
        return pb.BrokerStats(events_in=self.events)


async def serve() -> None:
    server = grpc.aio.server()
    pb_grpc.add_BrokerServicer_to_server(Floor(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(json.dumps({"serving": {"name": "floor", "grpc": f"127.0.0.1:{port}"}}), flush=True)
    await server.wait_for_termination()


def start_floor(log_dir: Path) -> Server:
    log = log_dir / "floor.log"
    proc = subprocess.Popen([sys.executable, __file__, "--serve"], stdout=subprocess.PIPE, stderr=log.open("ab"))
    return Server("floor", proc, read_json_line(proc.stdout, 30)["serving"], log)


async def main(rounds: int, seconds: float) -> dict[str, Any]:
    log_dir = dataplane.ROOT / "bench" / "results" / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    runs: list[dict[str, Any]] = []
    for r in range(rounds):
        for label in ("floor", "broker") if r % 2 == 0 else ("broker", "floor"):
            server = start_floor(log_dir) if label == "floor" else start_server("broker", "floor-b", log_dir)
            try:
                run = await dataplane.ingest(server, seconds, "grpc")
            finally:
                server.stop()
            run.update(server=label, round=r)
            print(f"round {r} {label:6}: {run['events_per_second']} events/s, "
                  f"{run['broker_cpu_s_per_1m_events']} CPU-µs per event", flush=True)
            runs.append(run)
    medians = {label: {figure: statistics.median(run[figure] for run in runs if run["server"] == label)
                       for figure in ("events_per_second", "broker_cpu_s_per_1m_events")}
               for label in ("floor", "broker")}
    return {"rounds": rounds, "seconds": seconds, "medians": medians, "runs": runs}


if __name__ == "__main__":
    if sys.argv[1:] == ["--serve"]:
        import uvloop

        uvloop.run(serve())
        sys.exit(0)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    opts = parser.parse_args()
    out = asyncio.run(main(opts.rounds, opts.seconds))
    path = dataplane.ROOT / "bench" / "results" / "grpc_floor.json"
    path.write_text(json.dumps(out, indent=2))
    m = out["medians"]
    print(f"grpc.aio floor: {m['floor']['events_per_second']:.0f} events/s, "
          f"{m['floor']['broker_cpu_s_per_1m_events']:.2f} CPU-µs per event; broker: "
          f"{m['broker']['events_per_second']:.0f} events/s, {m['broker']['broker_cpu_s_per_1m_events']:.2f} "
          f"CPU-µs per event; the broker's own work is "
          f"{m['broker']['broker_cpu_s_per_1m_events'] - m['floor']['broker_cpu_s_per_1m_events']:.2f} µs per event")
    print(f"written to {path}")
