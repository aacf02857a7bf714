"""1000 forged full-retention resumes at once (issue 20, item 3): the broker's and proxy's CPU and the
delivery latency (p50/p99, publish to SSE client) of 100 honest subscribers, quiet and meanwhile.

An honest event's latency is from its publish to its arrival at the subscriber's socket (the kernel's receive
time, SO_TIMESTAMPNS: over loopback, when the proxy wrote it), not to when the bench's process got to read it,
which on a machine of few cores also waits for that process's own turn on a CPU beside the attackers and the
servers; `read_*` give the latency to the read as well (what these figures were before).

A broker with EVENTS retained events (topics `old:0`..`old:999`, ~200 B each) and a proxy; 100 honest SSE
subscribers of topic `h` get an event every 20 ms carrying its publish time. Then 1000 connections resume
with a forged id (the public cluster tag, the broker's epoch, seq 0: a replay of all of retention), all of
topic `old` (one position: shared) or each of its own topic `old:N` (1000 positions: budgets only), and
read what they get. The attackers run in a process of their own, on uvloop, each connection a bare protocol
that counts and discards what it reads: on a machine of few cores what that process spends is taken from the
servers. `--attackers inline`: in the bench's process, beside the honest clients, whose arrival times then also
measure the bench's own loop; `--attackers-nice N`: their process at nice N, so that on a machine of few cores
the servers and the honest clients get the CPU first, and what is left of the tail is the servers'.

Each round starts a fresh broker and proxy and measures quiet, then under attack, side by side; the
figures are medians over `--rounds`, with the ratio busy p99 / quiet p99 (median of the rounds' ratios).
`late_by_window_ms` gives the busy phase's p99 per half second since the attack began (where the tail is),
`after_p99_ms` the p99 over the second in which the attackers leave (their 1000 connections closed at once);
`publish_*_p99_ms` the p99 round trip of the honest Publish calls (the broker's share of the tail), and
`broker_replays` the Replay calls the broker served, `attackers_cpu_s` the attackers' process's CPU meanwhile.
With `--profile DIR`, py-spy records the proxy and broker during the first round's attack (Chrome trace
JSON files in DIR, idle samples included: a timeline). Prints figures and writes JSON
(bench/results/forged_resumes.json). The machine is shared: compare the quiet and busy figures of one run.

With `--before REF`, each round also runs that commit's code (exported with `git archive`, first on
PYTHONPATH), right after this tree's.

Usage: python bench/forged_resumes.py [--events 20000] [--seconds 5] [--rounds 3] [--before REF] [--profile DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import psutil
import uvloop
from connect_rate import Stamped

from neoplasma.core.events import SseReader, varint
from neoplasma.wire.v1 import neoplasma_pb2 as pb
from neoplasma.wire.v1 import neoplasma_pb2_grpc as pb_grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the test harness
from harness import links_ready, proxy_status, start_server, trees, wait_for

ROOT = Path(__file__).resolve().parent.parent
PAYLOAD = json.dumps({"program": 1234, "views": 98765, "pad": "x" * 150}).encode()
ATTACKERS = 1000
HONEST = 100
INTERVAL = 0.02  # between honest events
WINDOW = 0.5  # seconds per entry of late_by_window_ms


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def honest_latency(stub: pb_grpc.BrokerStub, clients: list[StampedSse], seconds: float,
                         publish_ms: list[float] | None = None) -> list[tuple[float, float, float]]:
    """Publish a timestamped event to `h` every 20 ms for `seconds`; (publish time, delay to its arrival at the
    client's socket, delay to the client's read, both in ms) of each client's each event (what has not come within
    30 s counts as 30 s late). `publish_ms`: each Publish call's round trip (ms), appended."""
    for c in clients:
        c.clear()
    sent: list[float] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        at = time.time()
        data = b'{"at":%f,"n":%d}' % (at, len(sent))
        await stub.Publish(pb.PublishRequest(events=[pb.Event(topic="h", data=data)]), timeout=10)
        if publish_ms is not None:
            publish_ms.append(1000 * (time.time() - at))
        sent.append(at)
        await asyncio.sleep(INTERVAL)
    with contextlib.suppress(AssertionError):
        await wait_for(lambda: all(len(c.events) >= len(sent) for c in clients), timeout=30, what="every honest event")
    late = []
    for c in clients:
        got = {e["data"]["n"]: (c.arrived[k], c.read[k]) for k, e in enumerate(list(c.events))}
        late += [(at, 1000 * (got[n][0] - at), 1000 * (got[n][1] - at)) if n in got else (at, 30_000.0, 30_000.0)
                 for n, at in enumerate(sent)]
    return late


class StampedSse:
    """An honest SSE subscriber of `topic`, read with recvmsg(2) (connect_rate's `Stamped`), so that each event
    comes with two times: `arrived`, the kernel's receive time of the read that completed it (SO_TIMESTAMPNS: over
    loopback, when the proxy wrote it; for an event read with later bytes, theirs: an upper bound), and `read`, when
    this process got to it (later by however long it waited for a CPU on the cores it shares with the servers
    and the attackers)."""

    def __init__(self, http: str, topic: str) -> None:
        self.http, self.topic = http, topic
        host = http.rpartition(":")[0]
        self.request = f"GET /?eventType={topic} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
        self.events: list[dict[str, Any]] = []
        self.ids: list[str] = []
        self.arrived: list[float] = []
        self.read: list[float] = []
        self.buffer = b""
        self.body = False  # past the response's head
        self.sse = SseReader()
        self.stamped: Stamped | None = None

    async def start(self) -> StampedSse:
        loop = asyncio.get_running_loop()
        host, _, port = self.http.rpartition(":")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        await loop.sock_connect(sock, (host, int(port)))
        self.stamped = Stamped(sock, self)  # type: ignore[arg-type]
        return self

    def clear(self) -> None:
        self.events.clear()
        self.arrived.clear()
        self.read.clear()

    def received(self, data: bytes, first: float | None, last: float | None) -> None:
        now = time.time()
        self.buffer += data
        if not self.body:
            head, sep, rest = self.buffer.partition(b"\r\n\r\n")
            if not sep:
                return
            if head.split()[1:2] != [b"200"]:
                raise RuntimeError(f"honest subscriber refused: {head[:200]!r}")
            self.body, self.buffer = True, rest
        while (end := self.buffer.find(b"\r\n")) >= 0:  # chunked: size, CRLF, data, CRLF
            size = int(self.buffer[:end], 16)
            if len(self.buffer) < end + 2 + size + 2:
                break
            chunk = self.buffer[end + 2:end + 2 + size]
            self.buffer = self.buffer[end + 4 + size:]
            for message in self.sse.feed(chunk):
                if message.id is not None:
                    self.ids.append(message.id)
                if message.data and not message.name:
                    self.events.append(json.loads(message.data))
                    self.arrived.append(now if last is None else last)
                    self.read.append(now)

    def connection_lost(self, exc: Exception | None) -> None:
        pass

    async def close(self) -> None:
        if self.stamped is not None:
            self.stamped.close()


class Reading(asyncio.Protocol):
    """A connection that sends `request`, then reads (and discards) what comes, counting it: no stream buffers
    in between, so that the attackers' process, sharing the cores with the servers, costs what reading the
    bytes does."""

    def __init__(self, request: bytes) -> None:
        self.request, self.got = request, 0
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(self.request)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self.got += len(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)


async def forged(http: str, topic: str, token: str) -> int:
    """One resume with a forged id (none: a plain subscription), reading (and discarding) what it gets until
    cancelled; bytes read."""
    host, _, port = http.rpartition(":")
    resume = f"Last-Event-ID: {token}\r\n" if token else ""
    request = f"GET /?eventType={topic} HTTP/1.1\r\nHost: p\r\n{resume}\r\n".encode()
    transport, conn = await asyncio.get_running_loop().create_connection(lambda: Reading(request), host, int(port))
    try:
        await conn.done
    finally:
        transport.close()
    return conn.got


def attack_topics(shared: bool) -> list[str]:
    return ["old" if shared else f"old:{n}" for n in range(ATTACKERS)]


async def attack(http: str, token: str, shared: bool) -> None:
    """The attackers' process: once a line comes on stdin, every forged resume at once, read until SIGTERM."""
    await asyncio.to_thread(sys.stdin.readline)
    tasks = [asyncio.create_task(forged(http, topic, token)) for topic in attack_topics(shared)]
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


class Attack:
    """1000 forged resumes, in a process of its own or in this one (`inline`)."""

    def __init__(self, http: str, token: str, shared: bool, inline: bool, nice: int = 0) -> None:
        self.http, self.token, self.shared, self.inline, self.nice = http, token, shared, inline, nice
        self.tasks: list[asyncio.Task[int]] = []
        self.proc: subprocess.Popen[bytes] | None = None
        self.cpu_before = 0.0

    def ready(self) -> None:
        """Start the attackers' process (its start-up is not the attack: it waits for `start`)."""
        if not self.inline:
            self.proc = subprocess.Popen([sys.executable, __file__, "--attack", self.http, self.token or "-"]
                                         + (["--shared"] if self.shared else []), stdin=subprocess.PIPE,
                                         preexec_fn=(lambda: os.nice(self.nice)) if self.nice else None)

    def start(self) -> None:
        self.cpu_before = self.cpu()
        if self.proc is not None and self.proc.stdin is not None:
            self.proc.stdin.write(b"go\n")
            self.proc.stdin.flush()
        else:
            self.tasks = [asyncio.create_task(forged(self.http, t, self.token)) for t in attack_topics(self.shared)]

    def cpu(self) -> float:
        """The attackers' process's CPU seconds since `start` (nan: inline, in this process)."""
        return cpu(psutil.Process(self.proc.pid)) - self.cpu_before if self.proc is not None else float("nan")

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            await asyncio.to_thread(self.proc.wait, 30)


async def proxy_latency(http: str) -> dict[float, float]:
    """The proxy's SSE delivery latency histogram: cumulative count per bucket bound (seconds)."""
    async with aiohttp.ClientSession() as session, session.get(f"http://{http}/metrics") as resp:
        text = await resp.text()
    out = {}
    for line in text.splitlines():
        if line.startswith("neoplasma_proxy_delivery_latency_seconds_bucket") and 'transport="sse"' in line:
            bound = line.split('le="')[1].split('"')[0]
            out[float(bound)] = float(line.rsplit(" ", 1)[1])
    return out


async def broker_replays(http: str) -> float:
    """Replay calls the broker served (its neoplasma_broker_replays_total)."""
    async with aiohttp.ClientSession() as session, session.get(f"http://{http}/metrics") as resp:
        text = await resp.text()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("neoplasma_broker_replays_total "))


def histogram_p99(before: dict[float, float], after: dict[float, float]) -> float:
    """The bucket bound (ms) below which 99 % of the deliveries between the two fall."""
    bounds = sorted(after)
    total = after[bounds[-1]] - before.get(bounds[-1], 0)
    for bound in bounds:
        if after[bound] - before.get(bound, 0) >= 0.99 * total:
            return bound * 1000
    return float("inf")


def cpu(proc: psutil.Process) -> float:
    return float(sum(proc.cpu_times()[:2]))


def profile(pid: int, seconds: float, out: Path) -> subprocess.Popen[bytes] | None:
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not os.path.exists(spy):
        print("py-spy not found: no profile", file=sys.stderr)
        return None
    return subprocess.Popen([spy, "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", "500",
                             "--format", "chrometrace", "--idle", "--output", str(out), "--nonblocking"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def run(tmp: Path, env: dict[str, str], events: int, seconds: float, shared: bool, inline: bool, forge: bool,
              profile_dir: Path | None, nice: int = 0) -> dict[str, Any]:
    broker = start_server("broker", "forged-b0", tmp, env=env)
    proxy = start_server("proxy", "forged-p0", tmp, "--brokers", broker.endpoints["grpc"], env=env)
    procs = {"broker": psutil.Process(broker.proc.pid), "proxy": psutil.Process(proxy.proc.pid)}
    try:
        http = proxy.endpoints["http"]
        async with grpc.aio.insecure_channel(broker.endpoints["grpc"]) as ch:
            stub = pb_grpc.BrokerStub(ch)
            for k in range(0, events, 1000):
                await stub.Publish(pb.PublishRequest(events=[pb.Event(topic=f"old:{(k + i) % 1000}", data=PAYLOAD)
                                                             for i in range(1000)]), timeout=30)
            clients = [await StampedSse(http, "h").start() for _ in range(HONEST)]
            await wait_for(lambda: links_ready(proxy.endpoints["control"], 1), what="the relay")
            await wait_for(lambda: proxy_status(proxy.endpoints["control"]), what="status")
            await stub.Publish(pb.PublishRequest(events=[pb.Event(topic="h", data=b'{"at":0,"n":-1}')]), timeout=10)
            await wait_for(lambda: all(c.ids for c in clients), what="an id")
            raw = base64.urlsafe_b64decode(clients[0].ids[-1] + "==")
            # Version, check and the broker's mark, as in every id, then seq 0 (the check names no position).
            token = base64.urlsafe_b64encode(raw[:7] + varint(0)).rstrip(b"=").decode()
            if not forge:
                token = ""
            attack_ = Attack(http, token, shared, inline, nice)
            attack_.ready()
            used = {k: cpu(p) for k, p in procs.items()}
            hist = await proxy_latency(http)
            quiet_publish: list[float] = []
            busy_publish: list[float] = []
            quiet = await honest_latency(stub, clients, seconds, quiet_publish)
            quiet_cpu = {k: cpu(p) - used[k] for k, p in procs.items()}
            quiet_hist = await proxy_latency(http)
            spies = [profile(p.pid, seconds, profile_dir / f"{k}-{'shared' if shared else 'own'}.trace.json")
                     for k, p in procs.items()] if profile_dir else []
            used = {k: cpu(p) for k, p in procs.items()}
            began = time.time()
            attack_.start()
            busy = await honest_latency(stub, clients, seconds, busy_publish)
            busy_cpu = {k: cpu(p) - used[k] for k, p in procs.items()}
            attackers_cpu = attack_.cpu()
            busy_hist = await proxy_latency(http)
            replays = await broker_replays(broker.endpoints["http"])
            after, _ = await asyncio.gather(honest_latency(stub, clients, 1.0), attack_.stop())
            for spy in spies:
                if spy is not None:
                    await asyncio.to_thread(spy.wait, 60)
            for c in clients:
                await c.close()
        windows: dict[int, list[float]] = {}
        for at, ms, _ in busy:
            windows.setdefault(int((at - began) / WINDOW), []).append(ms)
        quiet_ms, busy_ms = [ms for _, ms, _ in quiet], [ms for _, ms, _ in busy]
        quiet_read, busy_read = [ms for _, _, ms in quiet], [ms for _, _, ms in busy]
        return {"quiet_p50_ms": percentile(quiet_ms, 0.5), "quiet_p99_ms": percentile(quiet_ms, 0.99),
                "busy_p50_ms": percentile(busy_ms, 0.5), "busy_p99_ms": percentile(busy_ms, 0.99),
                "read_quiet_p99_ms": percentile(quiet_read, 0.99), "read_busy_p99_ms": percentile(busy_read, 0.99),
                "broker_cpu_s_quiet": quiet_cpu["broker"], "broker_cpu_s_busy": busy_cpu["broker"],
                "proxy_cpu_s_quiet": quiet_cpu["proxy"], "proxy_cpu_s_busy": busy_cpu["proxy"],
                "attackers_cpu_s": attackers_cpu,
                "proxy_quiet_p99_le_ms": histogram_p99(hist, quiet_hist),
                "proxy_busy_p99_le_ms": histogram_p99(quiet_hist, busy_hist), "broker_replays": replays,
                "publish_quiet_p99_ms": percentile(quiet_publish, 0.99),
                "publish_busy_p99_ms": percentile(busy_publish, 0.99),
                "late_by_window_ms": [round(percentile(windows[w], 0.99)) for w in sorted(windows)],
                "after_p99_ms": percentile([ms for _, ms, _ in after], 0.99)}
    finally:
        with contextlib.suppress(Exception):
            proxy.stop()
        broker.stop()


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over rounds (and the median of the rounds' p99 ratios)."""
    out: dict[str, Any] = {}
    for key in rows[0]:
        if key != "late_by_window_ms":
            out[key] = round(statistics.median(r[key] for r in rows), 2)
    out["p99_ratio"] = round(statistics.median(r["busy_p99_ms"] / r["quiet_p99_ms"] for r in rows), 2)
    out["p99_ratios"] = [round(r["busy_p99_ms"] / r["quiet_p99_ms"], 2) for r in rows]
    out["read_p99_ratio"] = round(statistics.median(r["read_busy_p99_ms"] / r["read_quiet_p99_ms"] for r in rows), 2)
    out["read_p99_ratios"] = [round(r["read_busy_p99_ms"] / r["read_quiet_p99_ms"], 2) for r in rows]
    return out


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--mode", choices=("both", "shared", "own"), default="both",
                        help="one forged position for all (shared), one each (own), or both")
    parser.add_argument("--attackers", choices=("process", "inline"), default="process")
    parser.add_argument("--attackers-nice", type=int, default=0, metavar="N",
                        help="run the attackers' process at nice N (1-19): the servers and honest clients first")
    parser.add_argument("--token", choices=("forged", "none"), default="forged",
                        help="none: the 1000 connections subscribe without a token (what connecting alone costs)")
    parser.add_argument("--before", default=None, help="also run this commit's code, round by round beside this")
    parser.add_argument("--profile", type=Path, default=None, help="py-spy the first round's attack into DIR")
    parser.add_argument("--attack", nargs=2, metavar=("HTTP", "TOKEN"), help=argparse.SUPPRESS)
    parser.add_argument("--shared", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.attack:
        await attack(args.attack[0], "" if args.attack[1] == "-" else args.attack[1], args.shared)
        return
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    codes = trees(args.before)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for shared in {"both": (True, False), "shared": (True,), "own": (False,)}[args.mode]:
            rows: dict[str, list[dict[str, Any]]] = {tree: [] for tree in codes}
            for n in range(args.rounds):
                for tree, env in codes.items():  # side by side, round by round
                    row = await run(Path(tmp), env, args.events, args.seconds, shared, args.attackers == "inline",
                                    args.token == "forged", args.profile if n == 0 and not env else None,
                                    args.attackers_nice)
                    rows[tree].append(row)
                    print(json.dumps({"tree": tree, "round": n, **{k: (round(v, 2) if isinstance(v, float) else v)
                                                                   for k, v in row.items()}}), flush=True)
            for tree, tree_rows in rows.items():
                result = {"tree": tree, "forged_topics": "one (old)" if shared else "1000 (old:N)",
                          "token": args.token, "retained_events": args.events, "seconds": args.seconds,
                          "rounds": args.rounds, "attackers": args.attackers,
                          "attackers_nice": args.attackers_nice, **summary(tree_rows)}
                results.append(result)
                print(json.dumps(result), flush=True)
                print(f"{tree:>14}, {result['forged_topics']}: p99 quiet {result['quiet_p99_ms']} ms, under attack "
                      f"{result['busy_p99_ms']} ms: {result['p99_ratio']}x (medians of {args.rounds} rounds); "
                      f"broker CPU {result['broker_cpu_s_busy']} s, proxy {result['proxy_cpu_s_busy']} s "
                      f"per {args.seconds:g} s; as the attackers leave p99 {result['after_p99_ms']} ms", flush=True)
    out = ROOT / "bench" / "results" / "forged_resumes.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    # The attackers' process on uvloop (as the servers are): a client as cheap as Python's gets, since on this
    # machine its CPU is taken from the cores the servers and the honest clients share.
    (uvloop.run if "--attack" in sys.argv else asyncio.run)(main())
