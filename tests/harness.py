"""Brokers and proxies as real processes on 127.0.0.1, and clients that talk to them as users do.

For tests and benchmarks: `start_server` starts `neoplasma broker|proxy` on free ports and reads
the endpoints it prints, giving them the cluster credential `CREDENTIAL` (which the control
helpers present: `AUTH` is its gRPC metadata); the clients publish (gRPC, HTTP), subscribe (SSE, plasma's
gRPC stream, an EventSource that resumes as a browser's does) and read or set a proxy's membership over its
control port; `wait_for` polls a condition.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import grpc
from h2.config import H2Configuration
from h2.connection import H2Connection

from neoplasma.core.events import SseReader
from neoplasma.core.trust import CREDENTIAL_ENV, Access, Tokens, bearer_metadata
from neoplasma.plasma.v1 import stream_pb2, stream_pb2_grpc
from neoplasma.wire.v1 import neoplasma_pb2 as pb
from neoplasma.wire.v1 import neoplasma_pb2_grpc as pb_grpc

WORKERS_ENV = "NEOPLASMA_WORKERS"  # the default of --workers
CREDENTIAL = secrets.token_urlsafe(24)  # the cluster credential of servers started here
ACCESS = Access(Tokens(given=[CREDENTIAL]))  # for the operator's and `up`'s clients
AUTH = bearer_metadata(CREDENTIAL)


def niced(nice: int) -> list[str]:
    """The command prefix that runs a process at nice value `nice` (none at 0): benchmarks' load clients,
    which are not the system under test, may leave the cores to it first."""
    return ["nice", "-n", str(nice)] if nice else []


def read_json_line(stream: Any, timeout: float) -> dict[str, Any]:
    """Read one line from a child's stdout, failing after `timeout` seconds."""
    sel = selectors.DefaultSelector()
    sel.register(stream, selectors.EVENT_READ)
    if not sel.select(timeout):
        raise TimeoutError(f"no line within {timeout}s")
    line = stream.readline()
    if not line:
        raise RuntimeError("process exited before printing its line")
    parsed: dict[str, Any] = json.loads(line)
    return parsed


def stop_process(proc: subprocess.Popen[Any], sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
    """Stop a child gracefully (`sig`, then SIGKILL after `timeout` seconds); returns its exit code."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


@dataclass
class Server:
    """A broker or proxy process started as a user would, on free ports."""

    kind: str
    proc: subprocess.Popen[bytes]
    endpoints: dict[str, str]
    log_path: Path
    args: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.endpoints["name"]

    def port(self, which: str) -> int:
        return int(self.endpoints[which].rpartition(":")[2])

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        return stop_process(self.proc, sig, timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_server(kind: str, name: str, log_dir: Path, *extra: str, ports: dict[str, int] | None = None,
                 env: dict[str, str] | None = None, python: str = sys.executable) -> Server:
    """`neoplasma KIND --name NAME EXTRA...` with the cluster credential `CREDENTIAL` (unless `env` changes it),
    run by `python` (another build's interpreter, for A/B benchmarks); one worker unless `extra` or `env` say."""
    ports = ports or ({"grpc-port": 0, "http-port": 0} if kind == "broker"
                      else {"grpc-port": 0, "http-port": 0, "control-port": 0})
    args = [python, "-m", "neoplasma", kind, "--name", name, "--host", "127.0.0.1"]
    for flag, port in ports.items():
        args += [f"--{flag}", str(port)]
    args += list(extra)
    log_path = log_dir / f"{name}.log"
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=log_path.open("ab"),
                            env={**os.environ, CREDENTIAL_ENV: CREDENTIAL, WORKERS_ENV: "1", **(env or {})})
    try:
        line = read_json_line(proc.stdout, 30)
    except Exception:
        proc.kill()
        raise RuntimeError(f"{kind} {name} did not start:\n{log_path.read_text()}") from None
    return Server(kind, proc, line["serving"], log_path, args)


def port_is_free(port: int) -> bool:
    """True when nothing listens on the port (TIME_WAIT leftovers do not count)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


async def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition",
                   interval: float = 0.02) -> Any:
    """Poll `predicate` (sync or async) until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if isinstance(value, Awaitable):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


# -- control ---------------------------------------------------------------------------


async def proxy_status(control: str, access: Access | None = None) -> pb.ProxyStatus:
    """The proxy's status, asked with the harness credential (or `access`)."""
    metadata = access.metadata() if access else AUTH
    async with access.channel(control) if access else grpc.aio.insecure_channel(control) as ch:
        status: pb.ProxyStatus = await pb_grpc.ProxyControlStub(ch).Status(pb.StatusRequest(), timeout=5,
                                                                           metadata=metadata)
    return status


async def apply_membership(control: str, version: int, brokers: list[tuple[str, str]],
                           state: str = "SERVING") -> pb.ApplyResponse:
    msg = pb.Membership(version=version, brokers=[pb.BrokerMember(name=n, address=a, state=state)
                                                  for n, a in brokers])
    async with grpc.aio.insecure_channel(control) as ch:
        reply: pb.ApplyResponse = await pb_grpc.ProxyControlStub(ch).Apply(msg, timeout=5, metadata=AUTH)
    return reply


async def links_ready(control: str, brokers: int, access: Access | None = None) -> bool:
    """True when the proxy is connected to `brokers` brokers with its interest applied."""
    status = await proxy_status(control, access)
    synced = [link for link in status.links if link.interest_synced]
    return len(synced) == brokers == len(status.links)



class KeptTransport(asyncio.WriteTransport):
    """A transport that keeps each write (as an in-process hub's SSE subscriber is written), never full."""

    def __init__(self) -> None:
        super().__init__()
        self.written: list[bytes] = []

    def write(self, data: Any) -> None:
        self.written.append(bytes(data))

    def is_closing(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return 0

    def pointers(self) -> list[str]:
        """The pointer ids written (`id:` without a space), in order."""
        return [line[3:].decode() for line in b"".join(self.written).split(b"\n")
                if line.startswith(b"id:") and not line.startswith(b"id: ")]


# -- publishers --------------------------------------------------------------------


def grpc_request_headers(path: str) -> list[tuple[str, str]]:
    """The HEADERS of a gRPC call to `path` (`/pkg.Service/Method`), as a raw HTTP/2 client sends them."""
    return [(":method", "POST"), (":scheme", "http"), (":authority", "neoplasma"), (":path", path),
            ("content-type", "application/grpc")]


async def h2_client(address: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, H2Connection]:
    """A raw HTTP/2 client connection to `address` (HOST:PORT), its preface and SETTINGS sent."""
    host, _, port = address.rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    client = H2Connection(H2Configuration(client_side=True, header_encoding=None))
    client.initiate_connection()
    writer.write(client.data_to_send())
    return reader, writer, client


async def counters(http: str, name: str, label: str) -> dict[str, float]:
    """A server's counters `name` (its /metrics on `http`), by their one label `label`."""
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://{http}/metrics") as resp:
            text = await resp.text()
    found = re.findall(rf'^{name}\{{{label}="(\w+)"\}} (\S+)$', text, re.M)
    return {value: float(count) for value, count in found}


async def publish_grpc(broker: str, events: list[tuple[str, Any]], key: str = "") -> int:
    """Publish over gRPC, with the publisher `key` when given."""
    req = pb.PublishRequest(events=[pb.Event(topic=t, data=json.dumps(d).encode()) for t, d in events])
    async with grpc.aio.insecure_channel(broker) as ch:
        reply: pb.PublishResponse = await pb_grpc.BrokerStub(ch).Publish(
            req, timeout=10, metadata=bearer_metadata(key) if key else None)
    return reply.accepted


async def publish_http(http: str, body: bytes | Any, key: str = "",
                       content_type: str = "application/json") -> tuple[int, Any]:
    """POST /publish (JSON unless `content_type` says otherwise), with the publisher `key` when given."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": content_type, **({"Authorization": f"Bearer {key}"} if key else {})}
    async with aiohttp.ClientSession() as session:
        async with session.post(f"http://{http}/publish", data=data, headers=headers) as resp:
            return resp.status, await resp.json(content_type=None)


# -- subscribers -------------------------------------------------------------------


class SseClient:
    """An SSE subscriber that records every event it receives: unnamed ones (what a plasma client's
    `onmessage` sees) in `events`, named ones (e.g. `neoplasma-gap`) in `named`."""

    def __init__(self, http: str, topics: str) -> None:
        self.url = f"http://{http}/?eventType={topics}"
        self.events: list[dict[str, Any]] = []
        self.named: list[tuple[str, dict[str, Any]]] = []
        self.ids: list[str] = []
        self.comments: list[str] = []
        self.retry: int | None = None
        self.status: int | None = None
        self.ended = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self.raw = bytearray()

    async def start(self) -> SseClient:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None))
        resp = await self._session.get(self.url)
        self.status = resp.status
        if resp.status == 200:
            self._task = asyncio.create_task(self._read(resp))
        else:
            self.body = await resp.text()
            self.ended.set()
        return self

    async def _read(self, resp: aiohttp.ClientResponse) -> None:
        reader = SseReader()
        reader.comments = self.comments
        try:
            async for chunk in resp.content.iter_any():
                self.raw += chunk
                for message in reader.feed(chunk):
                    if message.id is not None:
                        self.ids.append(message.id)
                    if message.name and message.data:
                        self.named.append((message.name, json.loads(message.data)))  # onmessage never sees these
                    elif message.data:
                        self.events.append(json.loads(message.data))
                self.retry = reader.retry if reader.retry is not None else self.retry
        except (aiohttp.ClientError, asyncio.CancelledError):
            pass
        finally:
            self.ended.set()

    def topics(self) -> list[str]:
        return [e["meta"]["type"] for e in self.events]

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        if self._session:
            await self._session.close()


class PlasmaClient:
    """plasma's gRPC StreamService client, as plasma users write it."""

    def __init__(self, grpc_addr: str, channel: grpc.aio.Channel | None = None) -> None:
        """A stream on its own channel, or on `channel` (several streams on one HTTP/2 connection),
        which its owner closes."""
        self._owned = channel is None
        self.channel = grpc.aio.insecure_channel(grpc_addr) if channel is None else channel
        self.call = stream_pb2_grpc.StreamServiceStub(self.channel).Events()
        self.payloads: list[stream_pb2.Payload] = []
        self.error: grpc.aio.AioRpcError | None = None
        self.ended = asyncio.Event()
        self._task = asyncio.create_task(self._read())

    async def subscribe(self, *topics: str) -> None:
        await self.call.write(stream_pb2.Request(Events=[stream_pb2.EventType(type=t) for t in topics]))

    async def force_close(self) -> None:
        await self.call.write(stream_pb2.Request(forceClose=True))

    async def _read(self) -> None:
        try:
            async for payload in self.call:
                self.payloads.append(payload)
        except grpc.aio.AioRpcError as exc:
            self.error = exc
        finally:
            self.ended.set()

    def topics(self) -> list[str]:
        return [p.eventType.type for p in self.payloads]

    async def close(self) -> None:
        self.call.cancel()
        with contextlib.suppress(BaseException):
            await self._task
        if self._owned:
            await self.channel.close()


class EventSource:
    """An SSE client that behaves like a browser's EventSource: on the end of a stream or a
    network error it reconnects after `retry` ms with `Last-Event-ID` (to `address()`, which may
    change); it records every status and, per connection, the address and the events it gave."""

    def __init__(self, address: Callable[[], str], topics: str, token: str = "") -> None:
        self.address = address
        self.topics = topics
        self.last_id = token
        self.events: list[dict[str, Any]] = []
        self.gaps: list[dict[str, Any]] = []
        self.statuses: list[int] = []
        self.connections: list[tuple[str, int]] = []  # (address, events received there)
        self.retry = 2000
        self.connected = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> EventSource:
        self._task = asyncio.create_task(self._run())
        return self

    async def _run(self) -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as session:
            while True:
                headers = {"Last-Event-ID": self.last_id} if self.last_id else {}
                address, before = self.address(), len(self.events)
                try:
                    async with session.get(f"http://{address}/?eventType={self.topics}", headers=headers) as resp:
                        self.statuses.append(resp.status)
                        if resp.status != 200:
                            return  # EventSource gives up for good
                        self.connected.set()
                        await self._read(resp)
                except aiohttp.ClientError:
                    pass
                self.connections.append((address, len(self.events) - before))
                self.connected.clear()
                await asyncio.sleep(self.retry / 1000)

    async def _read(self, resp: aiohttp.ClientResponse) -> None:
        reader = SseReader(self.last_id)
        async for chunk in resp.content.iter_any():
            for message in reader.feed(chunk):
                if message.data:
                    (self.gaps if message.name == "neoplasma-gap" else self.events).append(json.loads(message.data))
            self.last_id = reader.last_id
            self.retry = reader.retry if reader.retry is not None else self.retry

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task


class Publisher:
    """Publishes {"b": broker index, "n": k} events, k = 0, 1, 2, ... per broker (gRPC address),
    `batch` per request every `interval` seconds (0: as fast as they are accepted)."""

    def __init__(self, brokers: list[str], topic: str = "t") -> None:
        self.brokers = brokers
        self.topic = topic
        self.sent = [0] * len(brokers)
        self.stopped = [False] * len(brokers)
        self._tasks: list[asyncio.Task[None]] = []

    def start(self, interval: float, batch: int = 1) -> Publisher:
        self._tasks = [asyncio.create_task(self._run(i, interval, batch)) for i in range(len(self.brokers))]
        return self

    async def _run(self, i: int, interval: float, batch: int) -> None:
        loop = asyncio.get_running_loop()
        async with grpc.aio.insecure_channel(self.brokers[i]) as ch:
            stub = pb_grpc.BrokerStub(ch)
            due = loop.time()
            while not self.stopped[i]:
                events = [pb.Event(topic=self.topic, data=json.dumps({"b": i, "n": self.sent[i] + k}).encode())
                          for k in range(batch)]
                try:
                    await stub.Publish(pb.PublishRequest(events=events), timeout=5)
                except grpc.aio.AioRpcError as exc:  # a draining broker refuses: that broker is done
                    assert exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED), exc
                    return
                self.sent[i] += batch
                due += interval
                await asyncio.sleep(max(0.0, due - loop.time()))

    async def stop(self, i: int | None = None) -> None:
        for k in range(len(self.brokers)) if i is None else [i]:
            self.stopped[k] = True
        await asyncio.gather(*(self._tasks if i is None else [self._tasks[i]]))

    @staticmethod
    def received_from(events: list[dict[str, Any]], i: int) -> int:
        return sum(1 for e in events if e["data"]["b"] == i)

    def all_received(self, events: list[dict[str, Any]]) -> bool:
        return len(events) >= sum(self.sent)

    def assert_exactly_once_in_order(self, events: list[dict[str, Any]], who: str) -> None:
        for i, sent in enumerate(self.sent):
            got = [e["data"]["n"] if "data" in e else e["n"] for e in events
                   if (e["data"]["b"] if "data" in e else e["b"]) == i]
            assert got == list(range(sent)), (
                f"{who}: broker {i}: {sent} published, {len(got)} received; "
                f"missing {sorted(set(range(sent)) - set(got))[:10]}, "
                f"duplicated {sorted({n for n in got if got.count(n) > 1})[:10]}")


@contextlib.asynccontextmanager
async def sse(http: str, topics: str) -> AsyncIterator[SseClient]:
    client = await SseClient(http, topics).start()
    try:
        yield client
    finally:
        await client.close()



def code_at(ref: str) -> dict[str, str]:
    """The environment in which `python -m neoplasma` runs commit `ref`'s code (exported with `git archive`
    to a temporary folder, its top-level folders first on PYTHONPATH): for benchmarks side by side."""
    root = Path(__file__).resolve().parent.parent
    folder = Path(tempfile.mkdtemp(prefix="neoplasma-at-"))
    archive = subprocess.run(["git", "archive", ref], cwd=root, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return {"PYTHONPATH": os.pathsep.join(str(d) for d in sorted(folder.iterdir()) if (d / "neoplasma").is_dir())}


def trees(before: str | None) -> dict[str, dict[str, str]]:
    """{label: environment}: this tree's code, and `before`'s when given (see `code_at`)."""
    return {"this tree": {}, **({f"at {before}": code_at(before)} if before else {})}
