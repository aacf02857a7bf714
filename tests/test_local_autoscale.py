"""`neoplasma up --autoscale`: the operator's decision code on one machine, with no event lost."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from typing import Any

import grpc
import pytest
from harness import proxy_status, sse, wait_for

from neoplasma.wire.v1 import neoplasma_pb2 as pb
from neoplasma.wire.v1 import neoplasma_pb2_grpc as pb_grpc


@pytest.mark.parametrize(("flags", "message"), [
    (["--target-connections-per-broker", "lots"], "neoplasma.io/target-connections-per-broker: 'lots' is not a number"),
    (["--target-connections-per-broker", "3", "--target-events-per-broker", "0"],
     "neoplasma.io/target-events-per-broker: '0' must be a positive number"),
])
def test_up_refuses_bad_autoscaling_flags(flags: list[str], message: str) -> None:
    result = subprocess.run([sys.executable, "-m", "neoplasma", "up", "--autoscale", *flags],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert message in result.stderr


def test_up_stops_at_once_between_load_readings(run_up: Any) -> None:
    proc, _ = run_up("--brokers", "1", "--proxies", "1", "--autoscale", "--target-connections-per-broker", "3",
                     "--scale-interval", "600")
    proc.send_signal(signal.SIGINT)
    assert proc.wait(20) == 0  # far less than the 600 s until the next reading


async def test_up_scales_brokers_out_by_event_rate(run_up: Any) -> None:
    _, endpoints = run_up("--brokers", "1", "--proxies", "1", "--autoscale", "--target-connections-per-broker", "1000",
                          "--target-events-per-broker", "100", "--max-brokers", "2", "--scale-interval", "0.3")
    control = endpoints["proxies"][0]["control"]
    batch = pb.PublishRequest(events=[pb.Event(topic="rate", data=b"1") for _ in range(50)])
    # One channel, so the broker sees one publisher: with its relay stream that is 2 connections, far below
    # the connection target; only the event-rate target can ask for a second broker.
    async with grpc.aio.insecure_channel(endpoints["brokers"][0]["grpc"]) as channel:
        async def busy_and_scaled_out() -> bool:
            await pb_grpc.BrokerStub(channel).Publish(batch, timeout=5)
            return len((await proxy_status(control)).links) == 2

        await wait_for(busy_and_scaled_out, timeout=30, what="scale-out to 2 brokers by events per second")


async def test_up_scales_brokers_out_and_in_without_losing_events(run_up: Any) -> None:
    _, endpoints = run_up("--brokers", "1", "--proxies", "1", "--autoscale", "--target-connections-per-broker", "3",
                          "--min-brokers", "1", "--max-brokers", "3", "--scale-down-delay", "1s",
                          "--scale-interval", "0.3", env={"NEOPLASMA_PUBLISHER_WINDOW": "2"})
    control, http = endpoints["proxies"][0]["control"], endpoints["proxies"][0]["http"]
    accepted: list[int] = []
    stop_numbered = asyncio.Event()

    async def serving_brokers() -> list[str]:
        status = await proxy_status(control)
        return [link.address for link in status.links if link.member_state == pb.BrokerMember.SERVING]

    async def numbered_publisher() -> None:
        """Publishes 0, 1, 2, ... round-robin over the serving brokers, retrying elsewhere when refused."""
        channels: dict[str, grpc.aio.Channel] = {}
        n, turn = 0, 0
        while not stop_numbered.is_set():
            brokers = await serving_brokers()
            address = brokers[turn % len(brokers)]
            turn += 1
            channel = channels.setdefault(address, grpc.aio.insecure_channel(address))
            event = pb.Event(topic="load", data=json.dumps(n).encode())
            try:
                reply = await pb_grpc.BrokerStub(channel).Publish(pb.PublishRequest(events=[event]), timeout=5)
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
                continue  # refused: not accepted, so it is sent again elsewhere
            assert reply.accepted == 1
            accepted.append(n)
            n += 1
            await asyncio.sleep(0.01)
        for channel in channels.values():
            await channel.close()

    async with sse(http, "load") as subscriber:
        await wait_for(lambda: proxy_status(control), what="proxy status")
        publisher = asyncio.create_task(numbered_publisher())
        # Extra publishers: distinct connections that push broker-0 over its target.
        # (Own subchannel pools: gRPC would otherwise share one TCP connection among them.)
        extra = [grpc.aio.insecure_channel(endpoints["brokers"][0]["grpc"],
                                           options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(6)]
        for channel in extra:
            await pb_grpc.BrokerStub(channel).Publish(pb.PublishRequest(events=[pb.Event(topic="x", data=b"1")]))

        async def brokers_in_membership(n: int) -> bool:
            status = await proxy_status(control)
            return len(status.links) == n and all(link.interest_synced for link in status.links)

        await wait_for(lambda: brokers_in_membership(3), timeout=30, what="scale-out to 3 brokers")
        for channel in extra:
            await channel.close()
        # Load falls (publishers age out after 2 s, then 1 s of low load): back to 2 brokers.
        await wait_for(lambda: brokers_in_membership(2), timeout=30, what="scale-in to 2 brokers")
        stop_numbered.set()
        await publisher
        await wait_for(lambda: len(subscriber.events) >= len(accepted), timeout=20,
                       what="every accepted event delivered")
        received = [e["data"] for e in subscriber.events]
        assert sorted(received) == accepted, "an accepted event was lost or duplicated"
        assert len(accepted) > 50
