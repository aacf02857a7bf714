"""Ingest from Redis Pub/Sub (issue 13): plasma's publishers `PUBLISH` to a real redis-server,
two `neoplasma ingest-redis` readers share a lease, and subscribers of the cluster see each
message once."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
import redis.asyncio as aioredis
from harness import CREDENTIAL, PlasmaClient, Server, apply_membership, links_ready, sse, wait_for
from kubeharness.fixtures import unavailable

from neoplasma.core.events import Event, InvalidEvent
from neoplasma.core.trust import PLAIN
from neoplasma.ingest.publisher import BrokerPublisher, Outcome
from neoplasma.ingest.reader import readiness, rejection_kind
from neoplasma.ingest.resp import RedisAddress


@dataclass
class RedisServer:
    port: int
    dir: Path
    password: str | None = None
    proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
                "--save", "", "--appendonly", "no"]
        if self.password:
            args += ["--requirepass", self.password]
        self.proc = subprocess.Popen(args, stdout=(self.dir / "redis.log").open("ab"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while True:  # listening: redis-server prints nothing machine-readable
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start:\n{(self.dir / 'redis.log').read_text()}")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def client(self) -> aioredis.Redis:
        return aioredis.Redis(port=self.port, password=self.password)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[Callable[..., RedisServer]]:
    """Starts redis-server on 127.0.0.1, a free port, in a temp dir (Debian's redis-server)."""
    if shutil.which("redis-server") is None:
        unavailable("Redis ingest tests: no redis-server (apt-get install redis-server, or scripts/test.sh)")
    started: list[RedisServer] = []

    def _start(password: str | None = None) -> RedisServer:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = RedisServer(port, tmp_path, password)
        server.start()
        started.append(server)
        return server

    yield _start
    for server in started:
        server.stop()


def start_reader(start: Any, name: str, redis: RedisServer, brokers: list[Server], *extra: str) -> Server:
    reader: Server = start("ingest-redis", name, "--redis", redis.address, "--channels", "plasma",
                           "--patterns", "events:*", "--brokers", ",".join(b.endpoints["grpc"] for b in brokers),
                           "--lease-ttl", "1", *extra, ports={"http-port": 0})
    return reader


def http(reader: Server | str) -> str:
    return reader if isinstance(reader, str) else reader.endpoints["http"]


async def health(reader: Server | str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session, session.get(f"http://{http(reader)}/healthz") as r:
        body: dict[str, Any] = await r.json()
        assert (r.status == 200) == body["ready"]
        return body


async def stats(reader: Server, token: str | None) -> tuple[int, dict[str, Any]]:
    """The reader's /stats (the operator's view), presenting `token` as the cluster credential."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as session, \
            session.get(f"http://{http(reader)}/stats", headers=headers) as r:
        return r.status, await r.json()


async def metric(reader: Server | str, name: str) -> float:
    """The sum of a metric's samples (every label) on the reader's /metrics."""
    async with aiohttp.ClientSession() as session, session.get(f"http://{http(reader)}/metrics") as r:
        text = await r.text()
    return sum(float(m) for m in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def plasma_message(topic: str, data: Any) -> str:
    return json.dumps({"meta": {"type": topic}, "data": data})


async def cluster(start: Any) -> tuple[list[Server], list[Server]]:
    brokers = [start("broker", f"b{i}") for i in range(2)]
    proxies = [start("proxy", f"p{i}") for i in range(2)]
    for p in proxies:
        await apply_membership(p.endpoints["control"], 1, [(b.name, b.endpoints["grpc"]) for b in brokers])
    return brokers, proxies


async def active_reader(readers: list[Server] | list[str]) -> Any:
    """The reader holding the lease, once it reads (ready: Redis confirmed its subscriptions)."""
    async def find() -> Server | str | None:
        found = [(r, body) for r in readers if (body := await health(r))["active"]]
        assert len(found) <= 1, "two readers active at once"
        return found[0][0] if found and found[0][1]["ready"] else None
    return await wait_for(find, what="an active reader")


async def test_plasma_publishers_reach_sse_and_grpc_subscribers_once(start: Any, redis_server: Any) -> None:
    redis = redis_server()
    brokers, proxies = await cluster(start)
    readers = [start_reader(start, f"in{i}", redis, brokers) for i in range(2)]
    active = await active_reader(readers)
    standby = next(r for r in readers if r is not active)
    assert await health(standby) == {"ready": True, "active": False, "name": standby.name,
                                     "reason": "standby: another reader holds the lease"}
    # /stats is the operator's: only with the cluster credential.
    assert [(await stats(active, token))[0] for token in (None, "wrong")] == [401, 401]
    status, body = await stats(active, CREDENTIAL)
    assert status == 200 and body["active"] and body["ready"] and body["redis"] == f"redis://{redis.address}/0"
    assert (body["redis_error"], body["lease_error"], body["brokers_up"]) == (None, None, 2)
    publisher = redis.client()
    async with sse(proxies[0].endpoints["http"], "program:1234") as browser:
        plasma = PlasmaClient(proxies[1].endpoints["grpc"])
        await plasma.subscribe("program:1234")
        for p in proxies:
            await wait_for(lambda p=p: links_ready(p.endpoints["control"], 2), what="links with interest")
        for n in range(300):  # a channel, a pattern's channel, and bad messages between them
            await publisher.publish("plasma" if n % 2 else "events:views", plasma_message("program:1234:views", n))
        for bad in (b"not json", b'{"data": 1}', b'{"meta": {"type": ""}, "data": 1}', b"\xff\xfe", b"[]"):
            await publisher.publish("plasma", bad)
        await publisher.publish("plasma", plasma_message("program:1234", "last"))
        await publisher.publish("elsewhere", plasma_message("program:1234", "not subscribed"))
        await wait_for(lambda: len(browser.events) >= 301 and len(plasma.payloads) >= 301, what="every message")
        assert sorted(e["data"] for e in browser.events[:-1] if e["data"] != "last") == list(range(300))
        assert len(browser.events) == len(plasma.payloads) == 301
        assert browser.events[0]["meta"] == {"type": "program:1234:views"}
        await plasma.close()
    # Exactly once: the standby read nothing, the active one each message once.
    assert await metric(standby, "neoplasma_ingest_messages_in_total") == 0
    assert await metric(active, "neoplasma_ingest_messages_in_total") == 306
    assert await metric(active, "neoplasma_ingest_messages_rejected_total") == 5
    assert await metric(active, "neoplasma_ingest_events_published_total") == 301
    assert await metric(active, "neoplasma_ingest_lag_seconds_count") >= 1
    rejected = [json.loads(line) for line in active.log().splitlines() if '"message_rejected"' in line]
    assert [r["sample"] for r in rejected] == ["not json", '{"data": 1}', '{"meta": {"type": ""}, "data": 1}',
                                              "[]"]  # b"\xff\xfe" is "not valid JSON" too: logged once per kind


async def test_active_reader_killed_the_standby_takes_over(start: Any, redis_server: Any) -> None:
    redis = redis_server()
    brokers, proxies = await cluster(start)
    readers = [start_reader(start, f"in{i}", redis, brokers) for i in range(2)]
    active = await active_reader(readers)
    publisher = redis.client()
    async with sse(proxies[0].endpoints["http"], "news") as browser:
        await wait_for(lambda: links_ready(proxies[0].endpoints["control"], 2), what="links with interest")
        await publisher.publish("plasma", plasma_message("news", "before"))
        await wait_for(lambda: len(browser.events) == 1, what="the first message")
        active.stop(signal.SIGKILL)
        killed = time.monotonic()
        successor = await active_reader([r for r in readers if r is not active])
        handover = time.monotonic() - killed
        await publisher.publish("plasma", plasma_message("news", "after"))
        await wait_for(lambda: len(browser.events) == 2, what="a message after the hand-over")
    print(f"\nhand-over after the active reader was killed (lease ttl 1s): {handover:.2f}s")
    assert handover < 3.0 and successor is not active
    assert [e["data"] for e in browser.events] == ["before", "after"]


async def test_redis_with_a_password_restarted_mid_stream(start: Any, redis_server: Any, tmp_path: Path) -> None:
    redis = redis_server(password="s3cret")
    (tmp_path / "password").write_text("s3cret\n")
    brokers, proxies = await cluster(start)
    reader = start_reader(start, "in0", redis, brokers, "--redis-password-file", str(tmp_path / "password"))
    wrong = start_reader(start, "in1", redis, brokers, "--lease", "none")  # no password
    await wait_for(lambda: active_reader([reader]), what="the reader active")

    async def refused() -> bool:
        return bool((await health(wrong))["reason"].startswith("cannot read Redis: redis refused: NOAUTH"))

    await wait_for(refused, what="the reader without a password reporting NOAUTH")
    publisher = redis.client()
    async with sse(proxies[1].endpoints["http"], "news") as browser:
        await wait_for(lambda: links_ready(proxies[1].endpoints["control"], 2), what="links with interest")
        for n in range(50):
            await publisher.publish("plasma", plasma_message("news", n))
        await wait_for(lambda: len(browser.events) == 50, what="the messages before the restart")
        redis.stop()
        body = await wait_for(lambda: _not_ready(reader), what="not ready")
        assert "cannot" in body["reason"]
        redis.start()
        await wait_for(lambda: _ready_and_active(reader), timeout=20, what="reading again")
        for n in range(50, 100):
            await publisher.publish("plasma", plasma_message("news", n))
        await wait_for(lambda: len(browser.events) == 100, what="the messages after the restart")
    assert [e["data"] for e in browser.events] == list(range(100))
    assert await metric(reader, "neoplasma_ingest_reconnects_total") >= 1


async def test_up_with_redis_runs_two_readers_feeding_its_brokers(run_up: Any, redis_server: Any) -> None:
    redis = redis_server()
    _, endpoints = run_up("--brokers", "2", "--proxies", "1", "--redis", redis.address, "--redis-channels", "plasma")
    readers = [r["http"] for r in endpoints["readers"]]
    assert len(readers) == 2
    await active_reader(readers)
    proxy = endpoints["proxies"][0]
    publisher = redis.client()
    async with sse(proxy["http"], "news") as browser:
        await wait_for(lambda: links_ready(proxy["control"], 2), what="links with interest")
        for n in range(100):
            await publisher.publish("plasma", plasma_message("news", n))
        await wait_for(lambda: len(browser.events) == 100, what="every message")
    assert sorted(e["data"] for e in browser.events) == list(range(100))
    assert sorted([await metric(r, "neoplasma_ingest_messages_in_total") for r in readers]) == [0, 100]


async def _not_ready(reader: Server) -> dict[str, Any] | None:
    body = await health(reader)
    return None if body["ready"] else body


async def _ready_and_active(reader: Server) -> bool:
    body = await health(reader)
    return bool(body["ready"] and body["active"])


def test_rejection_kinds_and_readiness() -> None:
    assert rejection_kind(InvalidEvent("event 3: data is 2000 bytes; the limit is 10 bytes")) == \
        "data is N bytes; the limit is N bytes"
    assert rejection_kind(InvalidEvent("body is not valid JSON: Expecting value: line 1 column 1 (char 0)")) == \
        "body is not valid JSON"
    assert readiness(False, None, "refused", 0) == (False, "cannot reach the lease: refused")
    assert readiness(False, "down", None, 0) == (True, "standby: another reader holds the lease")
    assert readiness(True, None, None, 0) == (False, "no broker accepts publishes")
    assert readiness(True, None, None, 2) == (True, "active: reading Redis")
    assert readiness(True, None, None, 2, subscribed=False) == (False, "subscribing to Redis")
    assert RedisAddress.parse("rediss://u:p%40ss@h:7000", db=2) == RedisAddress("h", 7000, True, 2, "u", "p@ss")
    with pytest.raises(Exception, match="give the database with --redis-db"):
        RedisAddress.parse("redis://h:1/3")


async def test_senders_that_find_the_buffer_emptied_by_another_publish_nothing() -> None:
    """Two senders linger for a batch to fill; the first takes what came, the second finds nothing:
    it must not publish an empty batch (a broker refuses one, and splitting a refused empty batch
    recursed until the reader crashed: seen in CI after a Redis restart)."""
    bodies: list[bytes] = []
    outcomes: list[Outcome] = []

    async def publish(body: bytes, **_: Any) -> None:
        bodies.append(body)
        if not body:
            raise grpc.aio.AioRpcError(grpc.StatusCode.INVALID_ARGUMENT, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                       "no events")

    publisher = BrokerPublisher(["127.0.0.1:1"], PLAIN, batch_events=10, linger=0.05, in_flight=2,
                                buffer_events=100, timeout=1.0, done=outcomes.append)
    publisher._publish = [publish]
    running = asyncio.create_task(publisher.run())
    publisher.put([Event("t", b"1"), Event("t", b"2"), Event("t", b"3")], time.monotonic())
    assert await publisher.flushed(5.0)
    assert await publisher.changed.wait_until(lambda: not publisher.sending and not publisher.buffer, 5.0)
    assert not running.done(), running.exception()
    assert [o.published for o in outcomes] == [3] and b"" not in bodies
    running.cancel()
    await asyncio.gather(running, return_exceptions=True)
