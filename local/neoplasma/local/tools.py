"""`neoplasma publish` and `neoplasma subscribe`, for trying a cluster by hand."""

from __future__ import annotations

import aiohttp
import grpc

from neoplasma.core.errors import NeoplasmaError, UsageError
from neoplasma.core.events import InvalidEvent, make_event
from neoplasma.wire.v1 import neoplasma_pb2 as pb
from neoplasma.wire.v1 import neoplasma_pb2_grpc as pb_grpc


class Refused(NeoplasmaError):
    """A broker or proxy could not be reached, or refused the request."""


async def publish(broker: str, topic: str, data: str) -> int:
    try:
        event = make_event(topic, data.encode())
    except InvalidEvent as exc:
        raise UsageError(str(exc)) from None
    async with grpc.aio.insecure_channel(broker) as channel:
        try:
            reply = await pb_grpc.BrokerStub(channel).Publish(
                pb.PublishRequest(events=[pb.Event(topic=event.topic, data=event.data)]), timeout=10)
        except grpc.aio.AioRpcError as exc:
            raise Refused(f"{broker}: {exc.code().name}: {exc.details()}") from None
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
                    raise Refused(f"{resp.status}: {(await resp.text()).strip()}")
                async for raw in resp.content:
                    line = raw.decode().rstrip("\n")
                    if line.startswith("data: "):
                        print(line[6:], flush=True)
                        received += 1
                        if count and received >= count:
                            return 0
    except aiohttp.ClientError as exc:
        raise Refused(f"{url}: {exc}") from None
    return 0
