"""`neoplasma publish` and `neoplasma subscribe`, for trying a cluster by hand."""

from __future__ import annotations

import sys

import aiohttp
import grpc

from neoplasma.core.errors import NeoplasmaError, UsageError
from neoplasma.core.events import InvalidEvent, SseReader, make_event
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


async def subscribe(proxy: str, topics: list[str], count: int, token: str = "") -> int:
    url = f"http://{proxy}/"
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    received = 0
    timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
    try:
        async with aiohttp.ClientSession(timeout=timeout) as session:
            async with session.get(url, params={"eventType": ",".join(topics)}, headers=headers) as resp:
                if resp.status != 200:
                    raise Refused(f"{resp.status}: {(await resp.text()).strip()}")
                reader, last = SseReader(), ""  # named events (neoplasma-gap, neoplasma-expired): on stderr
                async for chunk in resp.content.iter_any():
                    for message in reader.feed(chunk):
                        if message.name and message.data:
                            print(f"neoplasma subscribe: {message.name}: {message.data}", file=sys.stderr, flush=True)
                            last = message.name
                        elif message.data:
                            print(message.data, flush=True)
                            received += 1
                            if count and received >= count:
                                return 0
    except aiohttp.ClientError as exc:
        raise Refused(f"{url}: {exc}") from None
    if last == "neoplasma-expired":
        raise Refused("the token expired: get a fresh one (neoplasma token) and subscribe again")
    return 0
