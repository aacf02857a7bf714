"""Reconnect storm (issue 18): a proxy holding N SSE subscribers dies; they all come back at once with
their ids to the surviving proxy. How long until every one is live again, what the brokers replay,
what the subscribers already on the surviving proxy see, and its memory peak.

A broker and two proxies (A, B; one worker each) on 127.0.0.1, both given the membership. N subscribers
(raw asyncio protocols on uvloop, in --client-processes processes, each from its own loopback source
address) subscribe on A to --topics topics; --watchers more subscribe on B to topic `watch`. A publisher
sends --rate events/s spread over the topics (each event carries its topic's sequence number `n` and its
publish time) and 20 events/s to `watch`. After --quiet-seconds, proxy A is killed (SIGKILL): every
subscriber reconnects at once to B with `Last-Event-ID` (its last `id:`), without waiting the `retry:`
hint (the worst case; a failed attempt waits it), or after a random delay up to --reconnect-spread seconds
(the jitter a client library may add).

Figures (printed, and written to bench/results/storm.json):
  - time from the kill until every resumed subscriber is live (received an event published after the
    kill), and its p50/p99; the lower bound is the time between two events of a topic (topics / rate);
  - lost and duplicated events: per subscriber, the `n` it saw against every `n` published to its topic
    (0 and 0 expected), plus neoplasma-gap signals received;
  - the broker's Replay calls, refusals and replayed bytes during the storm (its /metrics), and B's
    resumes and replayed events (its /metrics);
  - the watchers' delivery latency p50/p99/max (publish to read) quiet (before the kill) and during the
    storm (kill until all live);
  - proxy B's peak RSS (sampled every 50 ms, and the kernel's VmHWM).
Every wait is bounded (--timeout overall). The machine may be shared: compare quiet and storm of one run.

Usage: python bench/storm.py [--subscribers 10000] [--topics 100] [--rate 200] [--timeout 120]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import queue
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import psutil
from connect_rate import cpu_seconds, listen_overflows, pct

from neoplasma.core.net import raise_fd_limit
from neoplasma.wire.v1 import neoplasma_pb2 as pb
from neoplasma.wire.v1 import neoplasma_pb2_grpc as pb_grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the test harness
from harness import Server, apply_membership, links_ready, proxy_status, start_server, wait_for

ROOT = Path(__file__).resolve().parent.parent
WATCH = "watch"


def topic(i: int) -> str:
    return f"storm{i:04d}"


# -- client roles (child processes) -------------------------------------------------------------


class Sub(asyncio.Protocol):
    """One SSE subscriber: HTTP/1.1 with a chunked body, read frame by frame as EventSource does (the
    last `id:` kept); on the end of its connection it reconnects to the role's surviving proxy with
    `Last-Event-ID`."""

    def __init__(self, role: Role, topic: str) -> None:
        self.role, self.topic = role, topic
        self.last_id = ""
        self.seen: list[int] = []  # the `n` of every event received
        self.records: list[tuple[float, float]] = []  # watchers: (arrival, latency)
        self.live_at = 0.0  # when the first event published after the kill arrived
        self.ok_at = 0.0  # when the last connection got its 200
        self.gaps = 0
        self.dropped = False
        self.attempts = 0
        self.statuses: dict[str, int] = {}
        self.retry_ms = 2000
        self.transport: asyncio.Transport | None = None
        self._reset()

    def _reset(self) -> None:
        self.head = b""
        self.in_body = False
        self.chunks = b""
        self.sse = b""

    def request(self) -> bytes:
        resume = f"Last-Event-ID: {self.last_id}\r\n" if self.last_id else ""
        return f"GET /?eventType={self.topic} HTTP/1.1\r\nHost: bench\r\n{resume}\r\n".encode()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._reset()
        self.transport = transport  # type: ignore[assignment]
        transport.write(self.request())

    def data_received(self, data: bytes) -> None:
        if not self.in_body:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            status = self.head.split(b"\r\n", 1)[0].split()[1:2]
            code = status[0].decode() if status else "?"
            self.statuses[code] = self.statuses.get(code, 0) + 1
            data, self.in_body = self.head[end + 4:], True
            if code != "200":
                assert self.transport is not None
                self.transport.close()
                return
            self.ok_at = time.monotonic()
        self.chunks += data
        while True:  # chunked transfer encoding
            line_end = self.chunks.find(b"\r\n")
            if line_end < 0:
                break
            size = int(self.chunks[:line_end].split(b";")[0], 16)
            if len(self.chunks) < line_end + 2 + size + 2:
                break
            self.sse += self.chunks[line_end + 2:line_end + 2 + size]
            self.chunks = self.chunks[line_end + 4 + size:]
        *frames, self.sse = self.sse.split(b"\n\n")
        for frame in frames:
            self.frame(frame)

    def frame(self, frame: bytes) -> None:
        name, data = "", b""
        for line in frame.split(b"\n"):
            field, _, value = line.partition(b": ")
            if field == b"id":
                self.last_id = value.decode()
            elif field == b"event":
                name = value.decode()
            elif field == b"data":
                data = value
            elif field == b"retry":
                self.retry_ms = int(value)
        if name == "neoplasma-gap":
            self.gaps += 1
        elif data:
            event = json.loads(data)["data"]
            now = time.time()
            self.seen.append(int(event["n"]))
            self.role.events += 1
            if self.role.watch:
                self.records.append((now, now - float(event["ts"])))
            elif self.dropped and not self.live_at and float(event["ts"]) > self.role.kill:
                self.live_at = now
                self.role.live += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if not self.in_body:  # reset or closed before the status line
            why = f"closed before the status line: {type(exc).__name__ if exc else 'EOF'}"
            self.statuses[why] = self.statuses.get(why, 0) + 1
        self.dropped = self.role.kill > 0  # live again: on a connection after the kill
        if not self.role.stopping and not self.role.watch:
            delay = random.uniform(0.0, self.role.cfg["spread"])
            asyncio.get_running_loop().create_task(self.role.connect(self, self.role.cfg["port_b"], delay))


class Role:
    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = cfg
        self.watch = bool(cfg["watch"])
        self.kill = 0.0
        self.live = 0
        self.events = 0
        self.stopping = False
        self.subs = [Sub(self, WATCH if self.watch else topic(i % cfg["topics"]))
                     for i in range(cfg["first"], cfg["first"] + cfg["n"])]

    async def connect(self, sub: Sub, port: int, delay: float) -> None:
        """Connect `sub` to `port`; on a refused connection, again after the `retry:` hint."""
        loop = asyncio.get_running_loop()
        await asyncio.sleep(delay)
        while not self.stopping:
            sub.attempts += 1
            try:
                await asyncio.wait_for(loop.create_connection(lambda: sub, "127.0.0.1", port,
                                                              local_addr=(self.cfg["source"], 0)), 30)
                return
            except (TimeoutError, OSError) as exc:
                sub.statuses[type(exc).__name__] = sub.statuses.get(type(exc).__name__, 0) + 1
                await asyncio.sleep(sub.retry_ms / 1000)

    def progress(self) -> None:
        print(json.dumps({"live": self.live, "events": self.events,
                          "open": sum(1 for s in self.subs if s.transport is not None)}), flush=True)

    def summary(self, sent: dict[str, int]) -> dict[str, Any]:
        lost = dup = disorder = subs_lost = subs_dup = 0
        for s in self.subs:
            got = set(s.seen)
            missing = sum(1 for n in range(sent.get(s.topic, 0)) if n not in got)
            extra = len(s.seen) - len(got)
            lost, dup = lost + missing, dup + extra
            subs_lost, subs_dup = subs_lost + (missing > 0), subs_dup + (extra > 0)
            disorder += sum(1 for a, b in zip(s.seen, s.seen[1:], strict=False) if b <= a)
        statuses: dict[str, int] = {}
        for s in self.subs:
            for k, v in s.statuses.items():
                statuses[k] = statuses.get(k, 0) + v
        return {"subscribers": len(self.subs), "received": self.events, "lost": lost, "duplicated": dup,
                "out_of_order": disorder, "subscribers_with_loss": subs_lost, "subscribers_with_duplicates": subs_dup,
                "gaps": sum(s.gaps for s in self.subs), "statuses": statuses,
                "attempts": sum(s.attempts for s in self.subs),
                "live_at": [s.live_at for s in self.subs], "ok_at_wall": [s.ok_at for s in self.subs],
                "records": [r for s in self.subs for r in s.records]}


async def role_main(cfg: dict[str, Any]) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    role = Role(cfg)

    async def ticker() -> None:
        while True:
            await asyncio.sleep(0.1)
            role.progress()

    print(json.dumps({"ready": len(role.subs)}), flush=True)
    await loop.run_in_executor(None, sys.stdin.readline)  # "go"
    gate = asyncio.Semaphore(200)  # the first connections: not what is measured

    async def first(sub: Sub) -> None:
        async with gate:
            await role.connect(sub, cfg["port_a"], 0.0)

    await asyncio.gather(*(first(s) for s in role.subs))
    print(json.dumps({"connected": sum(1 for s in role.subs if s.transport is not None)}), flush=True)
    ticking = asyncio.create_task(ticker())
    sent: dict[str, int] = {}
    while True:
        command = (await loop.run_in_executor(None, sys.stdin.readline)).split(" ", 1)
        if command[0] == "kill":
            role.kill = float(command[1])
            print(json.dumps({"armed": role.kill}), flush=True)
        else:  # "stop SENT": what was published to each topic
            sent = json.loads(command[1]) if len(command) > 1 else {}
            break
    ticking.cancel()
    role.stopping = True
    for s in role.subs:
        if s.transport is not None:
            s.transport.close()
    mono, wall = time.monotonic(), time.time()
    out = role.summary(sent)
    out["ok_at_wall"] = [wall - (mono - t) if t else 0.0 for t in out["ok_at_wall"]]
    return out


def run_role(argv: str) -> None:
    raise_fd_limit()
    import uvloop  # the clients need their speed more than anyone

    cfg = json.loads(argv)
    result = uvloop.run(role_main(cfg))
    Path(cfg["out"]).write_text(json.dumps(result))  # too large for a line
    print(json.dumps({"result": cfg["out"]}), flush=True)


class Client:
    """A role process; a thread keeps the latest of the lines it prints."""

    def __init__(self, **cfg: Any) -> None:
        self.out = Path(tempfile.mkstemp(prefix="storm-", suffix=".json")[1])
        self.proc = subprocess.Popen([sys.executable, __file__, "--role", json.dumps({**cfg, "out": str(self.out)})],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.lines: queue.Queue[dict[str, Any]] = queue.Queue()
        self.latest: dict[str, Any] = {"live": 0, "events": 0, "open": 0}
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            msg = json.loads(line)
            if "live" in msg:
                self.latest = msg
            else:
                self.lines.put(msg)

    def expect(self, key: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            msg = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            if key in msg:
                return msg

    def say(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def result(self, timeout: float) -> dict[str, Any]:
        self.expect("result", timeout)
        self.proc.wait(30)
        result: dict[str, Any] = json.loads(self.out.read_text())
        self.out.unlink()
        return result


# -- the coordinator ------------------------------------------------------------------------------


class Publisher:
    """`rate` events/s round-robin over the topics, each {"n": its topic's sequence, "ts": publish time},
    and 20/s to `watch`, in batches every 50 ms (gRPC)."""

    def __init__(self, broker: str, topics: int, rate: float) -> None:
        self.broker, self.topics, self.rate = broker, topics, rate
        self.sent: dict[str, int] = {}
        self.k = 0
        self.stopped = False
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        owed = 0.0
        async with grpc.aio.insecure_channel(self.broker) as ch:
            stub = pb_grpc.BrokerStub(ch)
            due = loop.time()
            while not self.stopped:
                owed += self.rate * 0.05
                events = []
                for name in [topic(self.k + j) for j in range(int(owed))] + [WATCH]:
                    n = self.sent.get(name, 0)
                    events.append(pb.Event(topic=name, data=json.dumps({"n": n, "ts": time.time()}).encode()))
                    self.sent[name] = n + 1
                self.k = (self.k + int(owed)) % self.topics
                owed -= int(owed)
                await stub.Publish(pb.PublishRequest(events=events), timeout=10)
                due += 0.05
                await asyncio.sleep(max(0.0, due - loop.time()))

    async def stop(self) -> None:
        self.stopped = True
        if self.task:
            await self.task


async def metrics(http: str) -> dict[str, float]:
    """A server's /metrics as {name{labels}: value}."""
    async with aiohttp.ClientSession() as session, session.get(f"http://{http}/metrics") as resp:
        text = await resp.text()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                out[name] = float(value)
    return out


def delta(after: dict[str, float], before: dict[str, float], prefix: str) -> dict[str, float]:
    return {k: after[k] - before.get(k, 0.0) for k in after
            if k.startswith(prefix) and not k.endswith("_created")}


def processes(server: Server) -> list[psutil.Process]:
    proc = psutil.Process(server.proc.pid)
    return [proc, *proc.children(recursive=True)]


def rss(server: Server) -> int:
    total = 0
    for p in processes(server):
        with contextlib.suppress(psutil.NoSuchProcess):
            total += p.memory_info().rss
    return total


def hwm(server: Server) -> int:
    """The kernel's peak resident size (VmHWM) of the server's processes, summed."""
    total = 0
    for p in processes(server):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{p.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1]) * 1024
    return total


async def main(args: argparse.Namespace) -> dict[str, Any]:
    raise_fd_limit()
    t_start = time.monotonic()
    deadline = t_start + args.timeout
    n = args.subscribers
    procs = args.client_processes or max(1, min(4, math.ceil(n / 3000)))
    out: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "load_average_at_start": os.getloadavg(),
                                       "shared": "yes: other work may run at the same time"},
                           "subscribers": n, "topics": args.topics, "rate_per_s": args.rate,
                           "watchers": args.watchers, "client_processes": procs,
                           "reconnect_spread_s": args.reconnect_spread}
    started: list[Client] = []
    with tempfile.TemporaryDirectory() as tmp:
        log_dir = Path(tmp)
        broker = start_server("broker", "b0", log_dir, "--workers", "1")
        proxy_a = start_server("proxy", "pa", log_dir, "--workers", "1")
        proxy_b = start_server("proxy", "pb", log_dir, "--workers", "1")
        publisher = Publisher(broker.endpoints["grpc"], args.topics, args.rate)
        try:
            for proxy in (proxy_a, proxy_b):
                await apply_membership(proxy.endpoints["control"], 1, [(broker.name, broker.endpoints["grpc"])])
                await wait_for(lambda p=proxy: links_ready(p.endpoints["control"], 1), timeout=30, what="links")
            ports = {"port_a": proxy_a.port("http"), "port_b": proxy_b.port("http")}
            share = [n // procs + (i < n % procs) for i in range(procs)]
            storm = [Client(**ports, source=f"127.0.0.{2 + i}", first=sum(share[:i]), n=share[i],
                            topics=args.topics, watch=False, spread=args.reconnect_spread) for i in range(procs)]
            watch = Client(port_a=proxy_b.port("http"), port_b=0, source=f"127.0.0.{2 + procs}", first=0,
                           n=args.watchers, topics=1, watch=True, spread=0.0)
            started = [*storm, watch]
            for c in started:
                c.expect("ready", 60)
                c.say("go")
            connected = sum(c.expect("connected", max(1.0, deadline - time.monotonic()))["connected"] for c in storm)
            watch.expect("connected", 60)
            out["connected_to_a"] = connected

            async def settled() -> bool:  # every subscriber counted and its interest at the broker
                a = await proxy_status(proxy_a.endpoints["control"])
                b = await proxy_status(proxy_b.endpoints["control"])
                return (a.sse_subscribers >= connected and b.sse_subscribers >= args.watchers
                        and await links_ready(proxy_a.endpoints["control"], 1)
                        and await links_ready(proxy_b.endpoints["control"], 1))

            await wait_for(settled, timeout=60, what="every subscriber at its proxy, interest at the broker")
            print(f"{connected} subscribers on A, {args.watchers} watchers on B "
                  f"({time.monotonic() - t_start:.1f} s)", flush=True)
            publisher.start()
            peak_b, rss_b_quiet = 0, rss(proxy_b)
            quiet_end = time.monotonic() + args.quiet_seconds
            while time.monotonic() < quiet_end:  # the quiet window is measured, not waited on
                peak_b = max(peak_b, rss(proxy_b))
                await asyncio.sleep(0.05)
            broker0, b0 = await metrics(broker.endpoints["http"]), await metrics(proxy_b.endpoints["http"])
            overflows0, cpu0, b_procs = listen_overflows(), cpu_seconds(proxy_b), len(processes(proxy_b))
            kill = time.time()
            for c in storm:
                c.say(f"kill {kill!r}")
            for c in storm:
                c.expect("armed", 30)
            for p in processes(proxy_a):
                with contextlib.suppress(psutil.NoSuchProcess):
                    p.send_signal(signal.SIGKILL)
            proxy_a.proc.wait(30)
            killed = time.time()
            print(f"proxy A killed; {connected} subscribers come back to B", flush=True)
            live, last_report = 0, time.monotonic()
            while live < connected and time.monotonic() < deadline - 20:
                peak_b = max(peak_b, rss(proxy_b))
                live = sum(c.latest["live"] for c in storm)
                if time.monotonic() - last_report > 2:
                    print(f"  {time.time() - killed:.1f} s: {live} live, "
                          f"{sum(c.latest['open'] for c in storm)} connected", flush=True)
                    last_report = time.monotonic()
                await asyncio.sleep(0.05)
            storm_end = time.time()
            broker1, b1 = await metrics(broker.endpoints["http"]), await metrics(proxy_b.endpoints["http"])
            rss_b_after, hwm_b = rss(proxy_b), hwm(proxy_b)
            overflows, cpu_b = listen_overflows() - overflows0, cpu_seconds(proxy_b) - cpu0
            await publisher.stop()
            sent = publisher.sent
            expected = [sum(sent.get(topic(i % args.topics), 0) for i in range(c_first, c_first + c_n))
                        for c_first, c_n in ((sum(share[:i]), share[i]) for i in range(procs))]
            with contextlib.suppress(AssertionError):  # what has not arrived by then is lost
                await wait_for(lambda: all(c.latest["events"] >= e for c, e in zip(storm, expected, strict=True))
                               and watch.latest["events"] >= sent.get(WATCH, 0) * args.watchers,
                               timeout=max(5.0, min(20.0, deadline - time.monotonic())),
                               what="every published event at every subscriber", interval=0.1)
            for c in started:
                c.say("stop " + json.dumps(sent))
            results = [c.result(60) for c in storm]
            watched = watch.result(60)
            started = []
        finally:
            for c in started:
                c.proc.kill()
            with contextlib.suppress(Exception):
                await publisher.stop()
            proxy_a.stop(signal.SIGKILL, 5)
            proxy_b.stop(timeout=30)
            broker.stop()

    live_after = [r - kill for res in results for r in res["live_at"] if r]
    ok_after = [t - kill for res in results for t in res["ok_at_wall"] if t and t > kill]
    quiet = [lat for at, lat in watched["records"] if at < kill]
    during = [lat for at, lat in watched["records"] if kill <= at <= storm_end]
    replay = delta(broker1, broker0, "neoplasma_broker_replay")
    out.update({
        "live_again": len(live_after), "not_live_within_bound": connected - len(live_after),
        "time_to_all_live_s": round(max(live_after), 2) if len(live_after) == connected else None,
        "time_to_live_p50_s": round(pct(live_after, 0.5), 2), "time_to_live_p99_s": round(pct(live_after, 0.99), 2),
        "reconnected_200_p50_s": round(pct(ok_after, 0.5), 2),
        "reconnected_200_max_s": round(max(ok_after, default=0), 2),
        "min_interval_between_events_of_a_topic_s": round(args.topics / args.rate, 2),
        "lost": sum(r["lost"] for r in results), "duplicated": sum(r["duplicated"] for r in results),
        "out_of_order": sum(r["out_of_order"] for r in results),
        "subscribers_with_loss": sum(r["subscribers_with_loss"] for r in results),
        "subscribers_with_duplicates": sum(r["subscribers_with_duplicates"] for r in results),
        "gap_signals": sum(r["gaps"] for r in results),
        "events_published": sum(v for k, v in sent.items() if k != WATCH),
        "events_received": sum(r["received"] for r in results), "events_expected": sum(expected),
        "listen_overflows_during_storm": overflows, "proxy_b_cpu_s_during_storm": round(cpu_b, 2),
        "load_average_at_end": os.getloadavg(), "proxy_b_processes": b_procs,
        "connect_attempts": sum(r["attempts"] for r in results),
        "statuses": {k: sum(r["statuses"].get(k, 0) for r in results) for r in results for k in r["statuses"]},
        "broker_replay_metrics_during_storm": replay,
        "proxy_b_resume_metrics_during_storm": delta(b1, b0, "neoplasma_proxy_re"),
        "watchers_lost": watched["lost"], "watchers_duplicated": watched["duplicated"],
        "watch_quiet_p50_ms": round(1000 * pct(quiet, 0.5), 1), "watch_quiet_p99_ms": round(1000 * pct(quiet, 0.99), 1),
        "watch_quiet_samples": len(quiet),
        "watch_storm_p50_ms": round(1000 * pct(during, 0.5), 1),
        "watch_storm_p99_ms": round(1000 * pct(during, 0.99), 1),
        "watch_storm_max_ms": round(1000 * max(during, default=float("nan")), 1), "watch_storm_samples": len(during),
        "proxy_b_rss_mb_quiet": round(rss_b_quiet / 2**20, 1), "proxy_b_rss_mb_peak_sampled": round(peak_b / 2**20, 1),
        "proxy_b_rss_mb_after": round(rss_b_after / 2**20, 1), "proxy_b_vmhwm_mb": round(hwm_b / 2**20, 1),
        "bench_seconds": round(time.monotonic() - t_start, 1)})
    return out


def table(out: dict[str, Any]) -> str:
    replay = out["broker_replay_metrics_during_storm"]
    rows = [
        ("subscribers resumed (on A, then B)", f"{out['connected_to_a']} over {out['topics']} topics, "
                                                f"{out['rate_per_s']} events/s"),
        ("time to all live (from the kill)", f"{out['time_to_all_live_s']} s (p50 {out['time_to_live_p50_s']} s, "
                                             f"p99 {out['time_to_live_p99_s']} s; "
                                             f"{out['not_live_within_bound']} not live)"),
        ("reconnect to 200 on B", f"p50 {out['reconnected_200_p50_s']} s, max {out['reconnected_200_max_s']} s "
                                  f"(listen overflows {out['listen_overflows_during_storm']}, "
                                  f"B's CPU {out['proxy_b_cpu_s_during_storm']} s)"),
        ("lost / duplicated / out of order", f"{out['lost']} / {out['duplicated']} / {out['out_of_order']} "
                                             f"(gap signals {out['gap_signals']})"),
        ("events received / expected", f"{out['events_received']} / {out['events_expected']}"),
        ("broker Replay calls / refused", f"{replay.get('neoplasma_broker_replays_total', 0):.0f} / "
                                          f"{replay.get('neoplasma_broker_replays_refused_total', 0):.0f}"),
        ("broker replayed bytes", f"{replay.get('neoplasma_broker_replayed_bytes_total', 0):.0f}"),
        ("watchers p99 quiet / storm", f"{out['watch_quiet_p99_ms']} / {out['watch_storm_p99_ms']} ms "
                                       f"(max in storm {out['watch_storm_max_ms']} ms)"),
        ("proxy B RSS quiet / peak / VmHWM", f"{out['proxy_b_rss_mb_quiet']} / {out['proxy_b_rss_mb_peak_sampled']}"
                                             f" / {out['proxy_b_vmhwm_mb']} MB"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subscribers", type=int, default=10_000, help="subscribers on proxy A (default 10,000)")
    parser.add_argument("--topics", type=int, default=100, help="topics they subscribe to (default 100)")
    parser.add_argument("--rate", type=float, default=200.0, help="events per second over those topics (default 200)")
    parser.add_argument("--watchers", type=int, default=100, help="subscribers already on proxy B (default 100)")
    parser.add_argument("--quiet-seconds", type=float, default=5.0, help="publishing before the kill (default 5)")
    parser.add_argument("--client-processes", type=int, default=0,
                        help="client processes for the subscribers (default: one per 3,000, at most 4)")
    parser.add_argument("--reconnect-spread", type=float, default=0.0,
                        help="each subscriber reconnects after a random delay up to this many seconds "
                             "(default 0: all at once)")
    parser.add_argument("--timeout", type=float, default=120.0, help="bound on the whole run in seconds (default 120)")
    if len(sys.argv) > 2 and sys.argv[1] == "--role":
        run_role(sys.argv[2])
        return
    args = parser.parse_args()
    out = asyncio.run(main(args))
    path = ROOT / "bench" / "results" / "storm.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))
    print(table(out))
    print(f"written {path.relative_to(ROOT)}")


if __name__ == "__main__":
    cli()
