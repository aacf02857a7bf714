"""Bad input never crashes or stalls anything, and says what was wrong."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import grpc
import pytest
from harness import (
    AUTH,
    PlasmaClient,
    apply_membership,
    links_ready,
    publish_grpc,
    publish_http,
    sse,
    wait_for,
)

from neoplasma.wire.v1 import neoplasma_pb2 as pb
from neoplasma.wire.v1 import neoplasma_pb2_grpc as pb_grpc


@pytest.fixture
def broker(start: Any) -> Any:
    return start("broker", "b0", "--max-event-bytes", "1000")


@pytest.mark.parametrize("body, message", [
    (b"{not json", "body is not valid JSON"),
    (b"[]", "empty list"),
    (b'"just a string"', "expected an object"),
    (b'{"data": 1}', 'missing "meta"'),
    (b'{"meta": {"type": ""}, "data": 1}', "topic is empty"),
    (b'{"meta": {"type": 7}, "data": 1}', 'missing "meta"'),
    (b'{"meta": {"type": "a"}}', 'missing "data"'),
    (b'{"meta": {"type": "a\\u0001b"}, "data": 1}', "control character"),
    (b'{"meta": {"type": "' + b"x" * 300 + b'"}, "data": 1}', "limit is 256"),
    (b'{"meta": {"type": "a"}, "data": "' + b"x" * 2000 + b'"}', "limit is 1000 bytes"),
    (b'[{"meta": {"type": "a"}, "data": 1}, {"meta": {"type": "a,b"}, "data": 1}]', "event 1: meta.type"),
    (b"\xff\xfe", "not valid JSON"),
    (b'{"meta": {"type": "a"}, "data": NaN}', "NaN"),
])
async def test_http_publish_refuses_bad_input(broker: Any, body: bytes, message: str) -> None:
    status, reply = await publish_http(broker.endpoints["http"], body)
    assert status == 400
    assert message in reply["error"] and reply["error"].startswith("nothing published")


@pytest.mark.parametrize("events, message", [
    ([], "no events"),
    ([pb.Event(topic="", data=b"1")], "topic is empty"),
    ([pb.Event(topic="a", data=b"{oops")], "not valid JSON"),
    ([pb.Event(topic="a", data=b"1"), pb.Event(topic="a\nb", data=b"1")], "control character"),
    ([pb.Event(topic="a", data=b"1" * 1001)], "limit is 1000 bytes"),
    ([pb.Event(topic="a", data=b"\xff")], "not valid JSON"),
])
async def test_grpc_publish_refuses_bad_input(broker: Any, events: list[pb.Event], message: str) -> None:
    async with grpc.aio.insecure_channel(broker.endpoints["grpc"]) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await pb_grpc.BrokerStub(ch).Publish(pb.PublishRequest(events=events), timeout=5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert message in (err.value.details() or "")
        stats = await pb_grpc.BrokerStub(ch).Stats(pb.StatsRequest(), timeout=5, metadata=AUTH)
        assert stats.events_in == 0


async def test_garbage_on_the_wire_does_not_hurt(broker: Any, start: Any) -> None:
    proxy = start("proxy", "p0")
    await apply_membership(proxy.endpoints["control"], 1, [("b0", broker.endpoints["grpc"])])
    # Raw garbage at every port, then the servers still serve.
    for address in (*broker.endpoints.values(), *proxy.endpoints.values()):
        if ":" not in address:
            continue
        host, _, port = address.rpartition(":")
        _, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"\x00\xff garbage \r\n\r\n" * 100)
        await writer.drain()
        writer.close()
    # A relay stream with an invalid interest is refused, the broker lives on.
    async with grpc.aio.insecure_channel(broker.endpoints["grpc"]) as ch:
        call = pb_grpc.BrokerStub(ch).Relay(metadata=AUTH)
        await call.write(pb.Interest(add=["bad\ntopic"], replace=True))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in call:
                pass
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    async with sse(proxy.endpoints["http"], "t") as client:
        await wait_for(lambda: links_ready(proxy.endpoints["control"], 1))
        assert await publish_grpc(broker.endpoints["grpc"], [("t", {"ok": True})]) == 1
        await wait_for(lambda: client.events)
    assert broker.proc.poll() is None and proxy.proc.poll() is None


@pytest.mark.parametrize("query, status, text", [
    ("", 400, "specify event queries"),
    ("?eventType=", 400, "event query can't be empty"),
    ("?eventType=,,", 400, "no topic given"),
    ("?eventType=a%01b", 400, "control character"),
    ("?eventType=" + "x" * 300, 400, "limit is 256"),
])
async def test_sse_refuses_bad_subscriptions(start: Any, query: str, status: int, text: str) -> None:
    proxy = start("proxy", "p0")
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://{proxy.endpoints['http']}/{query}") as resp:
            assert resp.status == status
            assert text in await resp.text()


async def test_plasma_grpc_refuses_bad_topic(start: Any) -> None:
    proxy = start("proxy", "p0")
    client = PlasmaClient(proxy.endpoints["grpc"])
    await client.subscribe("ok", "not\tok")
    await asyncio.wait_for(client.ended.wait(), 5)
    assert client.error is not None and client.error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "control character" in (client.error.details() or "")
    await client.close()


async def test_membership_refusals_keep_previous(start: Any) -> None:
    proxy = start("proxy", "p0")
    control = proxy.endpoints["control"]
    ok = await apply_membership(control, 5, [])
    assert ok.accepted and ok.applied_version == 5
    for brokers, reason in [([("a", "h:1"), ("a", "h:2")], "appears twice"),
                            ([("", "h:1")], "no name"),
                            ([("a", "h:99999")], "host:port")]:
        reply = await apply_membership(control, 6, brokers)
        assert not reply.accepted and reason in reply.reason and reply.applied_version == 5
    reply = await apply_membership(control, 6, [("a", "h:1")], state="STATE_UNSPECIFIED")
    assert not reply.accepted and "no state" in reply.reason


async def test_health_and_metrics(start: Any) -> None:
    broker = start("broker", "b0")
    proxy = start("proxy", "p0", "--brokers", broker.endpoints["grpc"])
    await wait_for(lambda: links_ready(proxy.endpoints["control"], 1), what="static --brokers link")
    await publish_grpc(broker.endpoints["grpc"], [("t", 1)])
    async with aiohttp.ClientSession() as session:
        for http in (broker.endpoints["http"], proxy.endpoints["http"]):
            async with session.get(f"http://{http}/healthz") as resp:
                assert resp.status == 200
        async with session.get(f"http://{proxy.endpoints['http']}/hc") as resp:
            assert resp.status == 200
        async with session.get(f"http://{broker.endpoints['http']}/metrics") as resp:
            text = await resp.text()
            assert "neoplasma_broker_events_in_total 1.0" in text
            assert "neoplasma_broker_relay_streams 1.0" in text
        async with session.get(f"http://{proxy.endpoints['http']}/metrics") as resp:
            assert 'neoplasma_proxy_subscribers{kind="sse"} 0.0' in await resp.text()
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    async with grpc.aio.insecure_channel(broker.endpoints["grpc"]) as ch:
        reply = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="neoplasma.v1.Broker"))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    async with grpc.aio.insecure_channel(proxy.endpoints["grpc"]) as ch:  # the subscriber port's health
        reply = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        watch = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(), timeout=5)
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()
    async with grpc.aio.insecure_channel(broker.endpoints["grpc"]) as ch:
        stats = await pb_grpc.BrokerStub(ch).Stats(pb.StatsRequest(), timeout=5, metadata=AUTH)
    assert stats.relay_streams == 1 and stats.publishers == 1 and stats.connections == 2 and stats.events_in == 1
