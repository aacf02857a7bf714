"""Connect-rate benchmark: how fast one proxy process accepts new SSE subscribers, with and without
TLS, and what a connect storm does to the subscribers already connected.

Real broker + proxy processes on 127.0.0.1 (`--workers 1`: one proxy process, one core at most);
clients are raw asyncio protocols on uvloop in several processes, each connecting from its own
loopback source address (127.0.0.2, .3, ...) so the ephemeral port range is no limit.

Scenarios (each with fresh servers, every wait bounded):
  - rate: N SSE subscriptions (`GET /?eventType=...` until the `200`), C in flight per client
    process: accepts/s over the wall clock and the server's CPU microseconds per accept (the
    wall-clock rate on a shared 2-core machine is the clients' as much as the proxy's; the CPU
    figure gives the rate one core would sustain, `one_core_accepts_per_s`);
  - tls: the same server code (aiohttp on uvloop, `HttpServer`) accepting new connections with and
    without TLS, side by side: the broker's HTTP port (`GET /healthz`, one request per connection),
    plaintext vs `--tls-cert` (the proxy's subscriber ports are plaintext; TLS is put in front);
  - storm: S subscriptions opened at once with each `--storm-backlogs` (100: the old behaviour;
    1024: the default), while W subscribers already connected receive 20 events/s: time to `200` p50/p99/max,
    how many did not get it within the bound, the kernel's listen overflows (TcpExtListenOverflows:
    a counter of the whole network namespace, so other work on the machine adds to it),
    and the watchers' delivery latency p50/p99 before and during the storm.

Prints figures and writes bench/results/connect_rate.json.
With `--before PYTHON` the rate scenario also runs another build's servers (e.g. main's venv), `--rounds`
rounds interleaved (A B, B A, ...), and reports each build's medians and the ratio of CPU per accept;
the storm scenario runs that build's first, then this one's.

Usage: python bench/connect_rate.py [--quick] [--scenarios rate,tls,storm] [--rate-n N] [--storm-n S] [--clients P]
       python bench/connect_rate.py --scenarios rate --before /path/to/main/.venv/bin/python --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import socket
import ssl
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import psutil

from neoplasma.core.net import raise_fd_limit, somaxconn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the test harness
from harness import (
    Server,
    apply_membership,
    links_ready,
    niced,
    read_json_line,
    start_server,
    wait_for,
)

ROOT = Path(__file__).resolve().parent.parent
TOPIC = "storm"

# -- client roles (child processes) -------------------------------------------------------------


class Conn(asyncio.Protocol):
    """One HTTP/1.1 request on a new connection; `ok` resolves when the status line says 200.
    Events after it (SSE) are scanned for `"ts":T,` stamps when `record` is given: (when this process
    read them, latency when read, latency when they reached the socket). A transport gives no arrival
    time, so there both latencies are the read's; `Stamped` reads with the kernel's receive time."""

    def __init__(self, request: bytes, ok: asyncio.Future[float],
                 record: list[tuple[float, float, float]] | None) -> None:
        self.request, self.ok, self.record = request, ok, record
        self.head = b""
        self.tail = b""
        self.count = 0  # stamped events received

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(self.request)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self.received(data, None, None)

    def received(self, data: bytes, first: float | None, last: float | None) -> None:
        """`data` read now; `first` and `last`: when its first and its last segment reached the socket (the
        kernel's times), None if unknown."""
        if not self.ok.done():
            self.head += data
            if b"\r\n" in self.head:
                line = self.head.split(b"\r\n", 1)[0]
                if line.split()[1:2] == [b"200"]:
                    self.ok.set_result(time.monotonic())
                else:
                    self.ok.set_exception(RuntimeError(line.decode(errors="replace")))
            data = self.head
        if self.record is not None:
            now = time.time()
            buf = self.tail + data
            start = 0
            sent: list[float] = []
            while (i := buf.find(b'"ts":', start)) >= 0:
                j = buf.find(b",", i)
                if j < 0:
                    break
                sent.append(float(buf[i + 5:j]))
                start = j
            at = now if first is None or last is None else arrival(buf, len(self.tail), start, first, last)
            self.record.extend((now, now - ts, at - ts) for ts in sent)
            self.count += len(sent)
            self.tail = buf[start:][-64:]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ok.done():
            self.ok.set_exception(ConnectionError(str(exc or "closed before the status line")))


def arrival(buf: bytes, read: int, stamp: int, first: float, last: float) -> float:
    """When the event whose stamp ends at `stamp` in `buf` (an SSE response; this read's bytes from `read` on)
    reached the socket: this read's `first` segment's time if nothing of an earlier write comes before the event
    in the read, its `last` segment's if nothing of a later write comes after it (each write of the server is one
    chunk: frames ending in a blank line, then CRLF), else unknown (nan): a heartbeat before and after it. An
    earlier stamp in the same read gets the same time: an upper bound."""
    end = buf.find(b"\n\n", stamp)
    later = end >= 0 and len(buf) > end + 4
    earlier = buf.find(b"\n\n", read, max(read, buf.rfind(b'"ts":', 0, stamp))) >= 0
    if not later:
        return last
    return math.nan if earlier else first


SO_TIMESTAMPNS = 35  # Linux: receive times as a struct timespec (SCM_TIMESTAMPNS, the same number)
TIMESPEC = struct.Struct("qq")


def received_at(ancillary: list[tuple[int, int, bytes]]) -> float | None:
    """The kernel's receive time in a read's ancillary data (SO_TIMESTAMPNS), None if none."""
    for level, kind, raw in ancillary:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
            seconds, nanoseconds = TIMESPEC.unpack_from(raw)
            return float(seconds + nanoseconds / 1e9)
    return None


class Stamped:
    """A connection read with recvmsg(2) instead of a transport, so that each read comes with the kernel's
    receive time of its (last) segment (SO_TIMESTAMPNS): when the bytes reached this socket, however long
    this process, sharing the CPUs with the server and the other clients, took to read them. Feeds `conn`
    as a transport would. Over loopback that time is the server's write (the kernel delivers it then)."""

    def __init__(self, sock: socket.socket, conn: Conn) -> None:
        self.sock, self.conn = sock, conn
        self.loop = asyncio.get_running_loop()
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        self.ancillary = socket.CMSG_SPACE(TIMESPEC.size)
        sock.send(conn.request)  # a few dozen bytes into an empty send buffer: taken at once
        self.reading = False
        self.resume()

    def pause(self) -> None:
        """Leave the socket alone (what arrives waits in it, with its receive time) until `resume`."""
        if self.reading and self.sock.fileno() >= 0:
            self.loop.remove_reader(self.sock.fileno())
        self.reading = False

    def resume(self) -> None:
        if not self.reading and self.sock.fileno() >= 0:
            self.loop.add_reader(self.sock.fileno(), self.readable)
            self.reading = True

    def readable(self) -> None:
        """Read what is there: first a byte's peek (the time of the first segment), then all (the last's)."""
        try:
            _, first, _, _ = self.sock.recvmsg(1, self.ancillary, socket.MSG_PEEK)
            data, last, _, _ = self.sock.recvmsg(65536, self.ancillary)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.close()
            self.conn.connection_lost(exc)
            return
        if not data:
            self.close()
            self.conn.connection_lost(None)
            return
        self.conn.received(data, received_at(first), received_at(last))

    def close(self) -> None:
        self.pause()
        self.sock.close()


IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)  # Linux


async def connect(factory: Callable[[], Conn], host: str, port: int, source: str, context: ssl.SSLContext | None,
                  stamped: bool = False) -> tuple[asyncio.BaseTransport | Stamped, Conn]:
    """A connection from address `source`, its port chosen at connect (IP_BIND_ADDRESS_NO_PORT), not at
    bind: a bind to port 0 searches for a port no socket of that address holds, which costs the kernel
    more and more as the ports fill (with tens of thousands of connections, more than the server).
    `stamped`: read by `Stamped` (plaintext only) instead of a transport."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        sock.bind((source, 0))
        sock.setblocking(False)
        await loop.sock_connect(sock, (host, port))
        if stamped:
            conn = factory()
            return Stamped(sock, conn), conn
        return await loop.create_connection(factory, sock=sock, ssl=context,
                                            server_hostname="neoplasma" if context else None)
    except BaseException:
        sock.close()
        raise


async def role_connect(host: str, port: int, source: str, n: int, inflight: int, path: str, hold: bool,
                       timeout: float, out: str, tls_ca: str = "", record: bool = False, stay: float = 0.0,
                       deadline: float = 0.0, first: int = 0, spread: int = 0) -> dict[str, Any]:
    """Open `n` connections from `source`, `inflight` at once (n: all at once), each sending
    `GET path` and waiting (at most `timeout` s) for its 200; keep them open when `hold` (and
    record event latencies when `record`: connections read by `Stamped`, plaintext only) until stdin says
    "stop" (`stop K`: once every connection that got its 200 has read K stamped events, or `timeout`
    seconds passed, so that what was sent is read before the connections close; `read K` waits the same
    way and answers with a line; `quiet` leaves every socket unread until the next command, so that
    this process takes no CPU meanwhile, and answers) or `stay` seconds pass. With a
    `deadline`, no connection is begun more than that many seconds after the start. Connections are
    numbered from `first` (their events are counted by number); a `{i}` in `path` is the number
    modulo `spread` (a topic of `spread` topics)."""
    loop = asyncio.get_running_loop()
    context = ssl.create_default_context(cafile=tls_ca) if tls_ca else None
    if record and tls_ca:
        raise ValueError("recording latencies needs plaintext connections (Stamped reads the socket itself)")
    records: list[tuple[float, float, float]] = []
    took: list[float] = []
    failed: dict[str, int] = {}
    transports: list[asyncio.BaseTransport | Stamped] = []
    conns: dict[int, Conn] = {}
    gate = asyncio.Semaphore(inflight)

    async def one(i: int) -> None:
        request = f"GET {path.replace('{i}', str(i % spread if spread else i))} HTTP/1.1\r\nHost: bench\r\n\r\n"
        request_bytes = request.encode()
        async with gate:
            began = time.monotonic()
            if deadline and began - started > deadline:
                failed["not_begun_by_deadline"] = failed.get("not_begun_by_deadline", 0) + 1
                return
            ok: asyncio.Future[float] = loop.create_future()
            try:
                transport, conn = await asyncio.wait_for(connect(
                    lambda: Conn(request_bytes, ok, records if record else None), host, port, source, context, record),
                    timeout)
                transports.append(transport)
                conns[i] = conn
                took.append(await asyncio.wait_for(ok, max(0.1, timeout - (time.monotonic() - began))) - began)
                if not hold:
                    transport.close()
            except Exception as exc:  # a failure is a figure here, not an error of the bench
                kind = type(exc).__name__
                failed[kind] = failed.get(kind, 0) + 1

    print(json.dumps({"ready": n}), flush=True)
    await loop.run_in_executor(None, sys.stdin.readline)  # "go": every client starts at once
    started = time.monotonic()
    await asyncio.gather(*(one(first + i) for i in range(n)))
    wall = time.monotonic() - started
    print(json.dumps({"connected": len(took), "wall": wall}), flush=True)
    if hold:
        if stay:
            await asyncio.sleep(stay)  # the watch window is the measurement, not synchronisation
        else:
            while True:  # "quiet", "read K" (each answered with a line) ... then "stop [K]"
                words = (await loop.run_in_executor(None, sys.stdin.readline)).split() or ["stop"]
                for t in transports:
                    if isinstance(t, Stamped):
                        t.pause() if words[0] == "quiet" else t.resume()
                if words[0] == "quiet":
                    print(json.dumps({"quiet": len(transports)}), flush=True)
                    continue
                if len(words) > 1:
                    short = await read_up_to(list(conns.values()), int(words[1]), timeout)
                    if words[0] == "read":
                        print(json.dumps({"read": int(words[1]), "short": short}), flush=True)
                if words[0] != "read":
                    break
    for t in transports:
        t.close()
    counts = {i: c.count for i, c in conns.items() if c.ok.done() and not c.ok.exception()}
    return {"took": took, "failed": failed, "wall": wall, "records": records, "counts": counts}


async def read_up_to(conns: list[Conn], events: int, timeout: float) -> int:
    """Return once every connection that got its 200 has read `events` stamped events, or after `timeout` s;
    how many had not (what they did not read by then is missing from the figures)."""
    deadline = time.monotonic() + timeout
    waiting = [c for c in conns if c.ok.done() and not c.ok.exception()]
    while True:
        waiting = [c for c in waiting if c.count < events]
        if not waiting or time.monotonic() >= deadline:
            return len(waiting)
        await asyncio.sleep(0.05)  # polled: the reads happen on this loop meanwhile


def run_role(argv: list[str]) -> None:
    raise_fd_limit()
    import uvloop  # the clients need their speed more than anyone

    args = json.loads(argv[1])
    result = uvloop.run(role_connect(**args))
    Path(args["out"]).write_text(json.dumps(result))  # too large for a line
    print(json.dumps({"result": args["out"]}), flush=True)


class Client:
    def __init__(self, nice: int = 0, **args: Any) -> None:
        self.out = Path(tempfile.mkstemp(prefix="connect-rate-", suffix=".json")[1])  # results: too large a line
        self.proc = subprocess.Popen([*niced(nice), sys.executable, __file__, "--role",
                                      json.dumps({**args, "out": str(self.out)})],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def line(self, timeout: float = 120) -> dict[str, Any]:
        return read_json_line(self.proc.stdout, timeout)

    def say(self, word: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(word + "\n")
        self.proc.stdin.flush()

    def result(self, timeout: float = 120) -> dict[str, Any]:
        while True:
            line = self.line(timeout)
            if "result" in line:
                self.proc.wait(30)
                result = json.loads(self.out.read_text())
                self.out.unlink()
                return dict(result)


def clients(count: int, first_source: int, nice: int = 0, **args: Any) -> list[Client]:
    """`count` client processes at nice value `nice`, each from its own source address
    127.0.0.{first_source + i}, numbering its `n` connections after the previous one's."""
    started = [Client(nice, source=f"127.0.0.{first_source + i}", first=i * args["n"], **args) for i in range(count)]
    for c in started:
        c.line()  # ready
    return started


def go(started: list[Client]) -> None:
    for c in started:
        c.say("go")


# -- figures ---------------------------------------------------------------------------------------


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def cpu_seconds(server: Server) -> float:
    times = psutil.Process(server.proc.pid).cpu_times()
    return float(times.user + times.system)


def listen_overflows() -> int:
    lines = Path("/proc/net/netstat").read_text().splitlines()
    for names, values in zip(lines[::2], lines[1::2], strict=True):
        if names.startswith("TcpExt:"):
            return int(dict(zip(names.split(), values.split(), strict=True))["ListenOverflows"])
    return 0


def merged(results: list[dict[str, Any]]) -> tuple[list[float], dict[str, int]]:
    took = [t for r in results for t in r["took"]]
    failed: dict[str, int] = {}
    for r in results:
        for k, v in r["failed"].items():
            failed[k] = failed.get(k, 0) + v
    return took, failed


def medians(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The median of each numeric figure over `runs` (and how many runs)."""
    keys = [k for k, v in runs[0].items() if isinstance(v, int | float) and k not in ("round", "load_average")]
    return {"runs": len(runs), **{k: round(statistics.median(run[k] for run in runs if run[k] is not None), 3)
                                  for k in keys}}


# -- scenarios ------------------------------------------------------------------------------------


async def servers(log_dir: Path, *proxy_args: str, python: str = sys.executable) -> tuple[Server, Server]:
    """A broker and a one-process proxy, run by `python` (another build's interpreter, for --before)."""
    broker = start_server("broker", "b0", log_dir, "--workers", "1", python=python)
    proxy = start_server("proxy", "p0", log_dir, "--workers", "1", *proxy_args, python=python)
    await apply_membership(proxy.endpoints["control"], 1, [(broker.name, broker.endpoints["grpc"])])
    await wait_for(lambda: links_ready(proxy.endpoints["control"], 1), timeout=20)
    return broker, proxy


async def accept_rate(server: Server, which: str, path: str, n: int, procs: int, inflight: int, hold: bool,
                      tls_ca: str = "") -> dict[str, Any]:
    """`n` connections to `server`'s `which` port over `procs` client processes: wall rate and CPU per 1000."""
    started = clients(procs, 2, host="127.0.0.1", port=server.port(which), n=n // procs, inflight=inflight,
                      path=path, hold=hold, timeout=30.0, tls_ca=tls_ca)
    cpu0, overflow0 = cpu_seconds(server), listen_overflows()
    go(started)
    for c in started:
        c.line(60)  # connected
    cpu = cpu_seconds(server) - cpu0
    if hold:
        for c in started:
            c.say("stop")
    results = [c.result() for c in started]
    took, failed = merged(results)
    wall = max(r["wall"] for r in results)
    return {"connections": len(took), "failed": failed, "wall_s": round(wall, 3),
            "accepts_per_s": round(len(took) / wall), "server_cpu_s": round(cpu, 3),
            "server_cpu_us_per_accept": round(1e6 * cpu / max(1, len(took))),
            "one_core_accepts_per_s": round(len(took) / cpu) if cpu else None,
            "to_200_p50_ms": round(1000 * pct(took, 0.5), 1), "to_200_p99_ms": round(1000 * pct(took, 0.99), 1),
            "listen_overflows": listen_overflows() - overflow0}


async def publish_stamped(broker: Server, seconds: float, rate: float, topics: tuple[str, ...] = (TOPIC,)) -> int:
    """Events with a "ts" stamp at `rate` per second for `seconds` (HTTP publish), to each of `topics` in
    turn; how many were sent."""
    sent = 0
    interval, deadline = 1.0 / rate, time.monotonic() + seconds
    next_at = time.monotonic()
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            body = json.dumps([{"meta": {"type": topics[sent % len(topics)]},
                                "data": {"ts": time.time(), "pad": "x" * 150}}])
            async with session.post(f"http://{broker.endpoints['http']}/publish", data=body.encode(),
                                    headers={"Content-Type": "application/json"}) as resp:
                resp.raise_for_status()
            sent += 1
            next_at += interval
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
    return sent


async def storm(log_dir: Path, backlog: int, n: int, procs: int, watchers: int, quick: bool,
                python: str = sys.executable) -> dict[str, Any]:
    broker, proxy = await servers(log_dir, "--listen-backlog", str(backlog), python=python)
    try:
        quiet, bound = (2.0, 20.0) if quick else (3.0, 30.0)
        watch = clients(1, 2 + procs, host="127.0.0.1", port=proxy.port("http"), n=watchers, inflight=watchers,
                        path=f"/?eventType={TOPIC}", hold=True, timeout=30.0, record=True, stay=0.0)
        go(watch)
        watch[0].line(60)
        stormers = clients(procs, 2, host="127.0.0.1", port=proxy.port("http"), n=n // procs, inflight=n // procs,
                           path="/?eventType=idle", hold=True, timeout=bound)
        publishing = asyncio.create_task(publish_stamped(broker, quiet + bound + 2.0, 20.0))
        await asyncio.sleep(quiet)  # the watchers' quiet window: measured, not waited on
        storm_at = time.time()
        overflow0, cpu0 = listen_overflows(), cpu_seconds(proxy)
        go(stormers)
        for c in stormers:  # in a thread: the publisher runs on this loop meanwhile
            await asyncio.to_thread(c.line, bound + 30)
        storm_end = time.time()
        cpu = cpu_seconds(proxy) - cpu0
        overflows = listen_overflows() - overflow0
        sent = await publishing
        for c in [*stormers, *watch]:
            c.say("stop")
        results = [c.result() for c in stormers]
        records = watch[0].result()["records"]
        took, failed = merged(results)
        before = [lat for at, lat, _ in records if at < storm_at]
        during = [lat for at, lat, _ in records if storm_at <= at <= storm_end + 0.5]
        return {"listen_backlog": backlog, "storm": n, "got_200": len(took),
                "not_within_s": {"bound_s": bound, "count": n // procs * procs - len(took), "why": failed},
                "storm_wall_s": round(max(r["wall"] for r in results), 2),
                "to_200_p50_ms": round(1000 * pct(took, 0.5)), "to_200_p99_ms": round(1000 * pct(took, 0.99)),
                "to_200_max_ms": round(1000 * max(took, default=float("nan"))),
                "proxy_cpu_s": round(cpu, 2), "listen_overflows": overflows, "watchers": watchers,
                "watch_before_p50_ms": round(1000 * pct(before, 0.5), 1),
                "watch_before_p99_ms": round(1000 * pct(before, 0.99), 1),
                "watch_during_p50_ms": round(1000 * pct(during, 0.5), 1),
                "watch_during_p99_ms": round(1000 * pct(during, 0.99), 1),
                "watch_during_max_ms": round(1000 * max(during, default=float("nan")), 1),
                "watch_events": len(records), "watch_events_expected": sent * watchers}
    finally:
        proxy.stop()
        broker.stop()


def certificates(folder: Path) -> tuple[str, str, str]:
    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=folder)
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout",
            "ca.key", "-out", "ca.pem", "-days", "1", "-subj", "/CN=bench-ca")
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", "server.key",
            "-out", "server.csr", "-subj", "/CN=neoplasma")
    (folder / "ext").write_text("subjectAltName=IP:127.0.0.1,DNS:neoplasma\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "server.pem", "-days", "1", "-extfile", "ext")
    return str(folder / "ca.pem"), str(folder / "server.pem"), str(folder / "server.key")


async def main(args: argparse.Namespace) -> dict[str, Any]:
    raise_fd_limit()
    out: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "somaxconn": somaxconn(),
                                       "shared": "yes: other work ran at the same time"}}
    scenarios = args.scenarios.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        log_dir = Path(tmp)
        if "rate" in scenarios:
            builds = {"before": args.before, "current": sys.executable} if args.before else {"current": sys.executable}
            runs: dict[str, list[dict[str, Any]]] = {label: [] for label in builds}
            for r in range(args.rounds):  # A B, B A, ...: a drifting machine load favours neither
                for label, python in list(builds.items())[::1 if r % 2 == 0 else -1]:
                    broker, proxy = await servers(log_dir, python=python)
                    try:
                        run = await accept_rate(proxy, "http", f"/?eventType={TOPIC}", args.rate_n, args.clients,
                                                args.inflight, hold=True)
                    finally:
                        proxy.stop()
                        broker.stop()
                    run.update(round=r, load_average=round(os.getloadavg()[0], 2))
                    runs[label].append(run)
                    print(f"rate sse {label}", run, flush=True)
            out["rate_sse"] = {label: medians(mine) for label, mine in runs.items()}
            if args.before:
                out["rate_sse"]["before_python"] = args.before
                out["rate_sse"]["cpu_per_accept_current/before"] = round(
                    out["rate_sse"]["current"]["server_cpu_us_per_accept"]
                    / out["rate_sse"]["before"]["server_cpu_us_per_accept"], 3)
            out["rate_sse_runs"] = runs
            print("rate sse medians", {k: v for k, v in out["rate_sse"].items()}, flush=True)
        if "tls" in scenarios:
            ca, cert, key = certificates(log_dir)
            for name, extra, tls_ca in (("plain", (), ""), ("tls", ("--tls-cert", cert, "--tls-key", key), ca)):
                b = start_server("broker", f"b-{name}", log_dir, "--workers", "1", *extra)
                try:
                    out[f"rate_healthz_{name}"] = await accept_rate(b, "http", "/healthz", args.tls_n, args.clients,
                                                                    args.inflight, hold=False, tls_ca=tls_ca)
                    print(f"rate healthz {name}", out[f"rate_healthz_{name}"], flush=True)
                finally:
                    b.stop()
        for backlog in [int(b) for b in args.storm_backlogs.split(",")] if "storm" in scenarios else ():
            for label, python in (("before", args.before), ("current", sys.executable)):
                if not python:
                    continue
                key_name = f"storm_backlog_{backlog}" + (f"_{label}" if args.before else "")
                out[key_name] = await storm(log_dir, backlog, args.storm_n, args.clients, args.watchers, args.quick,
                                            python)
                print(key_name, out[key_name], flush=True)
    return out


def cli() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--role":
        run_role(sys.argv[1:])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small counts (a smoke run)")
    parser.add_argument("--scenarios", default="rate,tls,storm", help="which, comma-separated (default all)")
    parser.add_argument("--rate-n", type=int, default=10_000, help="SSE subscriptions in the rate scenario")
    parser.add_argument("--tls-n", type=int, default=3_000, help="connections in each TLS/plain scenario")
    parser.add_argument("--storm-n", type=int, default=15_000, help="subscriptions opened at once in the storm")
    parser.add_argument("--watchers", type=int, default=500, help="subscribers connected before the storm")
    parser.add_argument("--storm-backlogs", default="100,1024,4096", help="--listen-backlog of the proxy in each "
                        "storm (100: what create_server gave before it was a setting; 1024: the default)")
    parser.add_argument("--clients", type=int, default=4, help="client processes (one source address each)")
    parser.add_argument("--inflight", type=int, default=128, help="connections in flight per client process (rate)")
    parser.add_argument("--before", default="", help="rate and storm: also run another build's servers (that "
                        "interpreter's `-m neoplasma`); rate: interleaved round by round with this one's, medians of "
                        "each; storm: before this one's, each backlog")
    parser.add_argument("--rounds", type=int, default=1, help="rate: rounds (each build once a round)")
    args = parser.parse_args()
    if args.quick:
        args.rate_n, args.tls_n, args.storm_n, args.watchers = 2000, 600, 2000, 100
    result = asyncio.run(main(args))
    path = ROOT / "bench" / "results" / "connect_rate.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    with contextlib.suppress(Exception):
        print(f"written {path.relative_to(ROOT)}")


if __name__ == "__main__":
    cli()
