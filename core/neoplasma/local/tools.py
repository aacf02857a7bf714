"""`neoplasma publish` and `neoplasma subscribe`, for trying a cluster by hand."""

from __future__ import annotations

import sys

import aiohttp
import grpc

from neoplasma.core.events import InvalidEvent, make_event
from neoplasma.wire.v1 import neoplasma_pb2 as pb
from neoplasma.wire.v1 import neoplasma_pb2_grpc as pb_grpc


async def publish(broker: str, topic: str, data: str) -> int:
    try:
        event = make_event(topic, data.encode())
    except InvalidEvent as exc:
        print(f"neoplasma publish: {exc}", file=sys.stderr)
        return 2
    async with grpc.aio.insecure_channel(broker) as channel:
        try:
            reply = await pb_grpc.BrokerStub(channel).Publish(
                pb.PublishRequest(events=[pb.Event(topic=event.topic, data=event.data)]), timeout=10)
        except grpc.aio.AioRpcError as exc:
            print(f"neoplasma publish: {broker}: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    print(f"accepted {reply.accepted}")
    return 0


async def subscribe(proxy: str, topics: list[str], count: int) -> int:
    url = f"http://{proxy}/"
    received = 0
    timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
    try:
        async with aiohttp.ClientSession(timeout=timeout) as session:
            async with session.get(url, params={"eventType": ",".join(topics)}) as resp:
                if resp.status != 200:
                    print(f"neoplasma subscribe: {resp.status}: {(await resp.text()).strip()}", file=sys.stderr)
                    return 1
                async for raw in resp.content:
                    line = raw.decode().rstrip("\n")
                    if line.startswith("data: "):
                        print(line[6:], flush=True)
                        received += 1
                        if count and received >= count:
                            return 0
    except aiohttp.ClientError as exc:
        print(f"neoplasma subscribe: {url}: {exc}", file=sys.stderr)
        return 1
    return 0
