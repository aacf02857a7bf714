"""Hostile publishes against a real broker with a real subscriber behind a real proxy.

Each case is refused whole with a clear message, delivers nothing (not even the good events
before the bad one), and leaves the broker serving: an event published right after it is the
first and only one the subscriber sees.
"""

from __future__ import annotations

import itertools
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import aiohttp
import grpc
import pytest

from neoplasma.local.harness import Server, links_ready, publish_grpc, publish_http, sse, start_server, wait_for
from neoplasma.wire.v1 import neoplasma_pb2 as pb
from neoplasma.wire.v1 import neoplasma_pb2_grpc as pb_grpc

GOOD = b'{"meta": {"type": "t"}, "data": {"good": true}}'
_marks = itertools.count()


def batch(data: bytes, topic: bytes = b'"t"') -> bytes:
    """An HTTP batch: a good event for the subscriber first, then the bad one."""
    return b"[" + GOOD + b', {"meta": {"type": ' + topic + b'}, "data": ' + data + b"}]"


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Server]]:
    """One broker and one proxy linked to it, shared by the cases (each checks they still serve)."""
    log_dir: Path = tmp_path_factory.mktemp("hostile")
    broker = start_server("broker", "b0", log_dir)
    proxy = start_server("proxy", "p0", log_dir, "--brokers", broker.endpoints["grpc"])
    yield broker, proxy
    for server in (proxy, broker):
        server.stop()


async def refused_and_nothing_delivered(plane: tuple[Server, Server],
                                        publish: Callable[[Server], Awaitable[tuple[object, str]]],
                                        status: object, message: str) -> None:
    broker, proxy = plane
    async with sse(proxy.endpoints["http"], "t") as client:
        await wait_for(lambda: links_ready(proxy.endpoints["control"], 1), what="the relay link")
        before = {"mark": next(_marks)}  # proves the path works before the hostile request
        assert await publish_grpc(broker.endpoints["grpc"], [("t", before)]) == 1
        await wait_for(lambda: client.events, what="the event before")

        got_status, got_message = await publish(broker)
        assert (got_status, message in got_message) == (status, True), got_message
        assert got_message.startswith("nothing published: ")

        after = {"mark": next(_marks)}
        assert await publish_grpc(broker.endpoints["grpc"], [("t", after)]) == 1
        await wait_for(lambda: len(client.events) > 1, what="the event after")
        assert [e["data"] for e in client.events] == [before, after]
    async with aiohttp.ClientSession() as session, session.get(f"http://{broker.endpoints['http']}/healthz") as resp:
        assert resp.status == 200
    assert broker.proc.poll() is None and proxy.proc.poll() is None


@pytest.mark.parametrize("body, message", [
    (batch(nested(100_000)), "body nests too deeply; event data may nest at most 128 levels"),
    (batch(nested(500)), "event 1: data nests 500 levels deep; the limit is 128"),
    (batch(nested(129)), "event 1: data nests 129 levels deep; the limit is 128"),
    (batch(b"1", topic=b'"\\ud800"'), "event 1: meta.type: topic '\\ud800' contains the unpaired surrogate"),
    # Below the subscriber's topic: it used to be routed, and fail after the good event was queued.
    (batch(b"1", topic=b'"t:\\ud800"'), "event 1: meta.type: topic 't:\\ud800' contains the unpaired surrogate"),
    (batch(b'"\\udc00"'), "event 1: data contains the unpaired surrogate '\\udc00'; strings must be valid Unicode"),
    (batch(b'{"\\ud83d": "key"}'), "event 1: data contains the unpaired surrogate '\\ud83d'"),
    (batch(b'"\xed\xa0\x80"'), "event 1: data contains the unpaired surrogate '\\ud800'"),
    (batch(b"[1e400]"), "event 1: data holds a number beyond the range of a double"),
], ids=lambda value: value[:40] if isinstance(value, str) else "input")
async def test_http_publish(plane: tuple[Server, Server], body: bytes, message: str) -> None:
    async def publish(broker: Server) -> tuple[object, str]:
        status, reply = await publish_http(broker.endpoints["http"], body)
        return status, reply.get("error", "")
    await refused_and_nothing_delivered(plane, publish, 400, message)


@pytest.mark.parametrize("data, message", [
    (nested(100_000), "data nests too deeply; event data may nest at most 128 levels"),
    (nested(129), "data nests 129 levels deep; the limit is 128"),
    (b'"\\ud800"', "data contains the unpaired surrogate '\\ud800'; strings must be valid Unicode"),
    (b'{"a": ["\\uDFFF"]}', "data contains the unpaired surrogate '\\udfff'"),
], ids=lambda value: value[:40] if isinstance(value, str) else "input")
async def test_grpc_publish(plane: tuple[Server, Server], data: bytes, message: str) -> None:
    async def publish(broker: Server) -> tuple[object, str]:
        request = pb.PublishRequest(events=[pb.Event(topic="t", data=b'{"good":true}'), pb.Event(topic="t", data=data)])
        async with grpc.aio.insecure_channel(broker.endpoints["grpc"]) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await pb_grpc.BrokerStub(ch).Publish(request, timeout=10)
        return refused.value.code(), refused.value.details() or ""
    await refused_and_nothing_delivered(plane, publish, grpc.StatusCode.INVALID_ARGUMENT, message)
