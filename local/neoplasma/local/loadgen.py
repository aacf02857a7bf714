"""Publisher load: N distinct publisher connections that publish periodically for a bounded time.

A broker counts the distinct publisher peers it saw within its publisher window, and gRPC shares
one TCP connection between channels to the same target; so every channel here has its own
subchannel pool ("grpc.use_local_subchannel_pool") and is a connection of its own.

    python -m neoplasma.local.loadgen --broker 10.0.0.5:50051 --connections 12 --duration 30 --interval 0.5

In code: `await generate(["10.0.0.5:50051"], connections=12, duration=30)` (or pass a `stop`
event to end it earlier). Connections are spread round-robin over the brokers given.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from neoplasma.wire.v1 import neoplasma_pb2 as pb
from neoplasma.wire.v1 import neoplasma_pb2_grpc as pb_grpc

CHANNEL_OPTIONS = [("grpc.use_local_subchannel_pool", 1)]


@dataclass
class LoadResult:
    connections: int = 0
    accepted: int = 0
    refused: int = 0  # publishes that failed (broker draining, gone, ...)


async def _publisher(address: str, index: int, topic: str, interval: float, until: float, stop: asyncio.Event,
                     result: LoadResult) -> None:
    async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        stub = pb_grpc.BrokerStub(channel)
        n = 0
        while time.monotonic() < until and not stop.is_set():
            event = pb.Event(topic=topic, data=json.dumps({"publisher": index, "n": n}).encode())
            try:
                reply = await stub.Publish(pb.PublishRequest(events=[event]), timeout=5)
                result.accepted += reply.accepted
            except grpc.aio.AioRpcError:
                result.refused += 1
            n += 1
            try:
                await asyncio.wait_for(stop.wait(), max(0.0, min(interval, until - time.monotonic())))
            except TimeoutError:
                pass


async def generate(brokers: Sequence[str], connections: int, duration: float, interval: float = 0.5,
                   topic: str = "loadgen", stop: asyncio.Event | None = None) -> LoadResult:
    """Hold `connections` publisher connections over `brokers` for `duration` seconds (or until `stop`)."""
    if not brokers or connections < 1:
        raise ValueError("need at least one broker and one connection")
    stop = stop or asyncio.Event()
    result = LoadResult(connections=connections)
    until = time.monotonic() + duration
    await asyncio.gather(*(_publisher(brokers[i % len(brokers)], i, topic, interval, until, stop, result)
                           for i in range(connections)))
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--broker", action="append", required=True, help="broker gRPC address (repeatable)")
    parser.add_argument("--connections", type=int, default=10, help="distinct publisher connections")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds to keep publishing")
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between a connection's publishes")
    parser.add_argument("--topic", default="loadgen", help="topic of the events")
    args = parser.parse_args(argv)
    result = asyncio.run(generate(args.broker, args.connections, args.duration, args.interval, args.topic))
    print(json.dumps({"connections": result.connections, "accepted": result.accepted, "refused": result.refused}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
