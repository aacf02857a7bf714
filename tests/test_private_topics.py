"""Private topics on real processes: a broker and proxies on 127.0.0.1 with subscriber token keys, answering
SSE, plasma's gRPC stream and the native stream; expiry mid-stream and resume with a fresh token."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import jwt
import pytest
from harness import AUTH, Publisher, Server, counters, links_ready, proxy_status, publish_grpc, wait_for

from neoplasma.core.trust import bearer_metadata
from neoplasma.plasma.v1 import stream_pb2, stream_pb2_grpc
from neoplasma.proxy.auth import mint
from neoplasma.wire.v1 import neoplasma_pb2 as pb
from neoplasma.wire.v1 import neoplasma_pb2_grpc as pb_grpc

SECRET = b"k" * 40
NEW_SECRET = b"n" * 40
CLUSTER = "private-cluster"


def token(topics: list[str], ttl: float = 600, secret: bytes = SECRET, audience: str = CLUSTER) -> str:
    return mint(secret, topics, ttl, audience)


async def private_cluster(start: Any, tmp_path: Path, *proxy_args: str) -> tuple[Server, Server]:
    keys = tmp_path / "subscriber-keys"
    if not keys.exists():
        keys.write_text(SECRET.decode() + "\n")
    broker = start("broker", "b0")
    proxy = start("proxy", "p0", "--subscriber-jwt-keys-file", str(keys), "--subscriber-jwt-audience", CLUSTER,
                  "--public-topics", "news", *proxy_args)
    msg = pb.Membership(version=1, cluster=CLUSTER, brokers=[
        pb.BrokerMember(name="b0", address=broker.endpoints["grpc"], state="SERVING")])
    async with grpc.aio.insecure_channel(proxy.endpoints["control"]) as ch:
        assert (await pb_grpc.ProxyControlStub(ch).Apply(msg, timeout=5, metadata=AUTH)).accepted
    await wait_for(lambda: links_ready(proxy.endpoints["control"], 1), what="the relay link")
    return broker, proxy


async def sse_answer(http: str, query: str, headers: dict[str, str] | None = None,
                     cookies: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """The status, headers and first bytes of an SSE request (the stream is left at once)."""
    async with aiohttp.ClientSession(cookies=cookies) as session:
        async with session.get(f"http://{http}/?{query}", headers=headers or {}) as resp:
            body = await resp.content.read() if resp.status != 200 else await resp.content.readuntil(b"\n")
            return resp.status, dict(resp.headers), body


async def auth_outcomes(http: str) -> dict[str, float]:
    """The proxy's neoplasma_proxy_subscriber_auth counters, by outcome (a pod's: summed over its workers)."""
    return await counters(http, "neoplasma_proxy_subscriber_auth_total", "outcome")


class Stream:
    """An SSE stream read frame by frame: unnamed events with their ids, and named ones."""

    def __init__(self, http: str, topics: str, bearer: str, last_id: str = "") -> None:
        self.url = f"http://{http}/?eventType={topics}"
        self.headers = {"Authorization": f"Bearer {bearer}", **({"Last-Event-ID": last_id} if last_id else {})}
        self.events: list[dict[str, Any]] = []
        self.named: list[str] = []
        self.last_id = last_id
        self.status = 0
        self.ended = asyncio.Event()
        self.connected = asyncio.Event()
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as session:
                async with session.get(self.url, headers=self.headers) as resp:
                    self.status = resp.status
                    self.connected.set()
                    pending = b""
                    async for chunk in resp.content.iter_any():
                        *frames, pending = (pending + chunk).split(b"\n\n")
                        for frame in frames:
                            self._frame(frame.decode())
        finally:
            self.ended.set()

    def _frame(self, frame: str) -> None:
        fields = dict(line.split(": ", 1) for line in frame.split("\n") if ": " in line)
        if "id" in fields:
            self.last_id = fields["id"]
        if "event" in fields:
            self.named.append(fields["event"])
        elif "data" in fields:
            self.events.append(json.loads(fields["data"]))

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(BaseException):
            await self._task


async def test_sse_answers_before_streaming_and_keeps_tokens_out_of_logs(start: Any, tmp_path: Path) -> None:
    broker, proxy = await private_cluster(start, tmp_path)
    http = proxy.endpoints["http"]
    status, headers, body = await sse_answer(http, "eventType=news,user:42")
    assert status == 401 and headers["WWW-Authenticate"] == 'Bearer realm="neoplasma"'
    assert headers["Content-Type"].startswith("application/json")  # nothing of a stream
    answer = json.loads(body)
    assert answer["error"] == "unauthenticated" and answer["topic"] == "user:42" and "private" in answer["message"]

    late = token(["user:42"], ttl=-10)
    status, headers, body = await sse_answer(http, f"eventType=user:42&token={late}")
    assert status == 401 and 'error="invalid_token"' in headers["WWW-Authenticate"]
    assert "token expired" in json.loads(body)["message"]
    status, headers, body = await sse_answer(http, "eventType=user:42", {"Authorization": "Bearer x.y.z"})
    assert status == 401 and "not a JWT" in json.loads(body)["message"]
    foreign = token(["user:42"], audience="other-cluster")
    status, _, body = await sse_answer(http, f"eventType=user:42&token={foreign}")
    assert status == 401 and "does not name 'private-cluster'" in json.loads(body)["message"]

    good = token(["user:42"])
    status, headers, body = await sse_answer(http, f"eventType=user:42:inbox,user:420&token={good}")
    assert status == 403 and json.loads(body)["topic"] == "user:420"
    assert 'error="insufficient_scope"' in headers["WWW-Authenticate"]
    # A resumed subscription is checked like a new one: a last id widens nothing.
    status, _, body = await sse_answer(http, "eventType=user:43", {"Authorization": f"Bearer {good}",
                                                                   "Last-Event-ID": "AQAAAAA"})
    assert status == 403 and json.loads(body)["topic"] == "user:43"

    for query, sent_headers, cookies in [(f"eventType=user:42&token={good}", None, None),
                                         ("eventType=user:42", {"Authorization": f"Bearer {good}"}, None),
                                         ("eventType=user:42:inbox", None, {"neoplasma_token": good}),
                                         ("eventType=news:sport", None, None)]:
        status, headers, body = await sse_answer(http, query, sent_headers, cookies)
        assert (status, headers["Content-Type"], body) == (200, "text/event-stream", b"retry: 2000\n"), query

    stream = Stream(http, "user:42", good)
    await wait_for(lambda: stream.connected.is_set() and links_ready(proxy.endpoints["control"], 1),
                   what="the subscriber")
    assert await publish_grpc(broker.endpoints["grpc"], [("user:420", 0), ("user:42:inbox", 1)]) == 2
    await wait_for(lambda: stream.events, what="the event")
    assert [e["meta"]["type"] for e in stream.events] == ["user:42:inbox"]
    await stream.close()

    assert await auth_outcomes(http) == {"unauthenticated": 4, "forbidden": 2, "expired": 0}
    log = proxy.log()
    assert '"event": "subscriber_refused"' in log and "token=REDACTED" in log
    assert good not in log and late not in log and foreign not in log


async def test_keys_rotate_through_the_file(start: Any, tmp_path: Path) -> None:
    _, proxy = await private_cluster(start, tmp_path)
    http, keys = proxy.endpoints["http"], tmp_path / "subscriber-keys"
    new = token(["user:42"], secret=NEW_SECRET)
    assert (await sse_answer(http, f"eventType=user:42&token={new}"))[0] == 401
    replacement = tmp_path / "keys.new"
    replacement.write_text(f"{SECRET.decode()}\n{NEW_SECRET.decode()}\n")
    replacement.replace(keys)  # as the kubelet swaps a mounted Secret
    await wait_for(lambda: sse_status(http, new, 200), what="the new key accepted")
    replacement.write_text(f"{NEW_SECRET.decode()}\n")
    replacement.replace(keys)
    await wait_for(lambda: sse_status(http, token(["user:42"]), 401), what="the old key refused")


async def sse_status(http: str, bearer: str, want: int) -> bool:
    return (await sse_answer(http, f"eventType=user:42&token={bearer}"))[0] == want


def plasma_call(channel: grpc.aio.Channel, bearer: str | None) -> Any:
    return stream_pb2_grpc.StreamServiceStub(channel).Events(metadata=bearer_metadata(bearer) if bearer else None)


def plasma_request(*topics: str) -> stream_pb2.Request:
    return stream_pb2.Request(Events=[stream_pb2.EventType(type=t) for t in topics])


async def test_plasma_grpc_refuses_a_change_and_keeps_the_stream(start: Any, tmp_path: Path) -> None:
    broker, proxy = await private_cluster(start, tmp_path)
    async with grpc.aio.insecure_channel(proxy.endpoints["grpc"]) as ch:
        anonymous = plasma_call(ch, None)
        await anonymous.write(plasma_request("user:42"))
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await anonymous.read()
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED and "user:42" in str(refused.value.details())

        outside = plasma_call(ch, token(["user:42"]))
        await outside.write(plasma_request("user:420"))
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await outside.read()
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED and "user:420" in str(refused.value.details())

        call = plasma_call(ch, token(["user:42"]))
        await call.write(plasma_request("user:42"))
        await wait_for(lambda: links_ready(proxy.endpoints["control"], 1), what="the interest")
        await publish_grpc(broker.endpoints["grpc"], [("user:42:inbox", 1)])
        first = await asyncio.wait_for(call.read(), 10)
        assert first.eventType.type == "user:42:inbox"

        await call.write(plasma_request("user:42", "user:420"))  # refused: the stream keeps user:42
        answer = await asyncio.wait_for(call.read(), 10)
        assert answer.eventType.type == "neoplasma-refused"
        refusal = json.loads(answer.data)
        assert (refusal["code"], refusal["topic"]) == ("PERMISSION_DENIED", "user:420")
        await publish_grpc(broker.endpoints["grpc"], [("user:420", 2), ("user:42", 3)])
        after = await asyncio.wait_for(call.read(), 10)
        assert (after.eventType.type, json.loads(after.data)) == ("user:42", 3)

        await call.write(plasma_request("news"))  # public: allowed with or without a token
        await call.write(stream_pb2.Request(forceClose=True))
        assert await asyncio.wait_for(call.read(), 10) == grpc.aio.EOF
        assert await call.code() == grpc.StatusCode.OK


async def native_refusal(address: str, topics: list[str], bearer: str | None) -> tuple[grpc.StatusCode, str]:
    async with grpc.aio.insecure_channel(address) as ch:
        call = pb_grpc.SubscriberStub(ch).Subscribe(pb.SubscribeRequest(topics=topics),
                                                    metadata=bearer_metadata(bearer) if bearer else None)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await asyncio.wait_for(call.read(), 10)
    return refused.value.code(), str(refused.value.details())


async def test_native_stream_answers(start: Any, tmp_path: Path) -> None:
    broker, proxy = await private_cluster(start, tmp_path)
    address = proxy.endpoints["grpc"]
    code, details = await native_refusal(address, ["user:42"], None)
    assert code == grpc.StatusCode.UNAUTHENTICATED and "user:42" in details
    code, details = await native_refusal(address, ["user:42"], "garbage")
    assert code == grpc.StatusCode.UNAUTHENTICATED and "not a JWT" in details
    code, details = await native_refusal(address, ["user:42", "user:43"], token(["user:42"]))
    assert code == grpc.StatusCode.PERMISSION_DENIED and "user:43" in details
    async with grpc.aio.insecure_channel(address) as ch:
        call = pb_grpc.SubscriberStub(ch).Subscribe(pb.SubscribeRequest(topics=["user:42"]),
                                                    metadata=bearer_metadata(token(["user:42"])))
        await wait_for(lambda: links_ready(proxy.endpoints["control"], 1), what="the interest")
        await publish_grpc(broker.endpoints["grpc"], [("user:42", 1)])
        batch = await asyncio.wait_for(call.read(), 10)
        assert [e.topic for e in batch.events] == ["user:42"]
        call.cancel()


async def test_workers_apply_the_policy(start: Any, tmp_path: Path) -> None:
    _, proxy = await private_cluster(start, tmp_path, "--workers", "2")
    for _ in range(6):  # the kernel spreads connections over both workers
        status, _, body = await sse_answer(proxy.endpoints["http"], "eventType=user:42")
        assert status == 401 and json.loads(body)["topic"] == "user:42"
    code, _ = await native_refusal(proxy.endpoints["grpc"], ["user:42"], None)
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert (await auth_outcomes(proxy.endpoints["http"]))["unauthenticated"] == 7  # summed over the workers


async def test_expiry_mid_stream_then_resume_with_a_fresh_token_exactly_once(start: Any, tmp_path: Path) -> None:
    broker, proxy = await private_cluster(start, tmp_path)
    http, address = proxy.endpoints["http"], proxy.endpoints["grpc"]
    publisher = Publisher([broker.endpoints["grpc"]], topic="user:42:inbox")
    expires = int(time.time()) + 3  # whole seconds: `exp` is an integer
    short = jwt.encode({"topics": ["user:42"], "exp": expires, "aud": CLUSTER}, SECRET, algorithm="HS256")

    sse = Stream(http, "user:42", short)
    native: dict[str, Any] = {"events": [], "token": ""}
    plasma_channel = grpc.aio.insecure_channel(address)
    plasma = plasma_call(plasma_channel, short)
    await plasma.write(plasma_request("user:42"))
    async with grpc.aio.insecure_channel(address) as ch:
        call = pb_grpc.SubscriberStub(ch).Subscribe(pb.SubscribeRequest(topics=["user:42"]),
                                                    metadata=bearer_metadata(short))
        await wait_for(lambda: sse.connected.is_set() and links_ready(proxy.endpoints["control"], 1),
                       what="the subscribers")
        publisher.start(interval=0.005)
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            async for batch in call:
                native["events"] += [json.loads(e.data) for e in batch.events]
                native["token"] = batch.token or native["token"]
        assert ended.value.code() == grpc.StatusCode.UNAUTHENTICATED and "token expired" in str(ended.value.details())
    assert time.time() >= expires - 0.1
    with pytest.raises(grpc.aio.AioRpcError) as plasma_ended:  # plasma's stream: no resume, the same end
        async for _ in plasma:
            pass
    assert plasma_ended.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "token expired" in str(plasma_ended.value.details())
    await plasma_channel.close()
    await asyncio.wait_for(sse.ended.wait(), 10)
    assert sse.status == 200 and sse.named == ["neoplasma-expired"]
    assert sse.events and native["events"]

    # Back with a fresh token and the last id: what was published meanwhile arrives, once.
    fresh = token(["user:42"])
    resumed = Stream(http, "user:42", fresh, last_id=sse.last_id)
    async with grpc.aio.insecure_channel(address) as ch:
        call = pb_grpc.SubscriberStub(ch).Subscribe(pb.SubscribeRequest(topics=["user:42"],
                                                                        resume_token=native["token"]),
                                                    metadata=bearer_metadata(fresh))
        await wait_for(lambda: min(publisher.sent) > len(native["events"]) + 100, what="events published meanwhile")
        await publisher.stop()
        while len(native["events"]) < sum(publisher.sent):
            batch = await asyncio.wait_for(call.read(), 10)
            native["events"] += [json.loads(e.data) for e in batch.events]
            assert not batch.gap
        call.cancel()
    await wait_for(lambda: publisher.all_received(sse.events + resumed.events), what="every event over SSE")
    publisher.assert_exactly_once_in_order(sse.events + resumed.events, "SSE")
    publisher.assert_exactly_once_in_order(native["events"], "native")
    assert resumed.named == []
    assert (await auth_outcomes(http))["expired"] == 3  # SSE, native, plasma
    assert (await counters(http, "neoplasma_proxy_disconnects_total", "reason"))["expired"] == 3
    assert (await counters(http, "neoplasma_proxy_resumes_total", "result")) == {"exact": 2, "gap": 0}
    await resumed.close()


async def test_up_passes_the_flags_to_its_proxies_and_token_mints(run_up: Any, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text(SECRET.decode() + "\n")
    _, endpoints = run_up("--brokers", "1", "--proxies", "2", "--subscriber-jwt-keys-file", str(keys),
                          "--public-topics", "demo")
    mint_cli = await asyncio.create_subprocess_exec(sys.executable, "-m", "neoplasma", "token", "--keys-file",
                                                    str(keys), "--topics", "user:42", "--ttl", "10m",
                                                    stdout=subprocess.PIPE)
    minted = (await mint_cli.communicate())[0].decode().strip()
    claims = jwt.decode(minted, SECRET, algorithms=["HS256"])
    assert claims["topics"] == ["user:42"] and 595 <= claims["exp"] - time.time() <= 600
    for proxy in endpoints["proxies"]:
        http = proxy["http"]
        assert (await sse_answer(http, "eventType=user:42"))[0] == 401
        assert (await sse_answer(http, "eventType=demo"))[0] == 200
        assert (await sse_answer(http, f"eventType=user:42:inbox&token={minted}"))[0] == 200

    # `neoplasma subscribe --token` as a user tries it; without one, the proxy's answer.
    http = endpoints["proxies"][0]["http"]
    refused = await asyncio.create_subprocess_exec(sys.executable, "-m", "neoplasma", "subscribe", "--proxy", http,
                                                   "user:42", stderr=subprocess.PIPE)
    assert await refused.wait() != 0
    assert b'401: {"error": "unauthenticated", "topic": "user:42"' in await refused.stderr.read()
    reader = await asyncio.create_subprocess_exec(sys.executable, "-m", "neoplasma", "subscribe", "--proxy", http,
                                                  "--token", minted, "--count", "1", "user:42",
                                                  stdout=subprocess.PIPE)

    async def subscribed() -> bool:
        status = await proxy_status(endpoints["proxies"][0]["control"])
        return status.subscribers >= 1
    await wait_for(subscribed, what="`neoplasma subscribe --token` connected")
    await publish_grpc(endpoints["brokers"][0]["grpc"], [("user:42:inbox", {"hello": 42})])
    printed, _ = await asyncio.wait_for(reader.communicate(), 20)
    assert reader.returncode == 0 and json.loads(printed)["data"] == {"hello": 42}


def test_up_refuses_unusable_key_files(tmp_path: Path) -> None:
    (tmp_path / "short").write_text("short\n")
    missing = str(tmp_path / "missing")
    for args, message in [(["--subscriber-jwt-keys-file", missing], "cannot read subscriber JWT keys"),
                          (["--subscriber-jwt-keys-file", str(tmp_path / "short")], "at least 32 bytes"),
                          (["--public-topics", "a,,b\x01"], "--public-topics")]:
        done = subprocess.run([sys.executable, "-m", "neoplasma", "up", *args], capture_output=True, text=True,
                              timeout=60)
        assert done.returncode != 0 and message in done.stderr, done.stderr
