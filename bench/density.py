"""Density benchmark: many idle SSE subscribers on one proxy pod, what each costs, and one event to all.

A broker and a proxy pod (`--workers W`, W = subscribers / --per-worker rounded up: a process here may
hold at most 20,000 open files) on 127.0.0.1; the subscribers are raw asyncio protocols on uvloop in
several client processes, each connecting from its own loopback source address (127.0.0.2, .3, ...).
Every wait is bounded.

Figures (printed, and written to bench/results/density_sse.json):
  - subscribers reached, how long connecting them took, and the proxy pod's CPU per subscriber meanwhile;
  - proxy RSS per subscriber (the supervisor and its workers, after minus before);
  - kernel memory per socket: /proc/net/sockstat's TCP buffer pages and the slab caches a TCP
    socket uses (TCP, sock_inode_cache, dentry, filp, eventpoll_epi, eventpoll_pwq) from /proc/slabinfo,
    after minus before, divided by 2 x subscribers (both ends of every connection are on this machine);
  - one event published to their topic once every subscriber is live (a first one, right after the last
    connected, waits for the catch-up of the first subscribers of a topic in a worker: `first_event_to_all`,
    what this figure was before): how many received it, latency p50/p99/max from the publish to the event
    reaching each subscriber's socket (`arrived_*`: the kernel's receive time, SO_TIMESTAMPNS) and to the
    client process reading it (`read_*`: later by however long the clients took to get to that socket).
    `one_event_to_all`: the clients read as the event arrives, on the same 2 cores as the proxy pod (the
    arrival waits for the proxy's share of them, unless `--load-nice 19` runs the clients at the lowest
    priority: then they take only what the pod leaves); `one_event_to_all_clients_quiet`: the clients leave their
    sockets unread until the proxy has written the event to all, so the proxy has the cores to itself, as
    on a node of its own (its subscribers elsewhere);
  - the spread load: each subscriber also wants one of `--spread-topics` topics, and `--spread-rate`
    events per second go to those topics in turn for `--spread-seconds`: deliveries expected (from what
    was sent and who is connected) and received, events lost, latency p50/p99/max (arrived and read).

With `--before PYTHON`: first the same run (without the spread load) with another build's servers.

With `--kind plasma`: plasma gRPC `Events` streams instead, `--per-connection` on each connection
(100,000 streams over 1,000 connections by default), on one proxy process: RSS per stream and one
event to all of them (bench/results/density_plasma.json).

Usage: python bench/density.py [--subscribers N] [--per-worker N] [--per-client N] [--before PYTHON] [--load-nice N]
       [--spread-topics T --spread-rate R --spread-seconds S]
       python bench/density.py --kind plasma [--subscribers N] [--per-connection K]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import psutil
from connect_rate import Client, clients, go, pct, publish_stamped

from neoplasma.core.net import raise_fd_limit

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the test harness
from harness import Server, apply_membership, links_ready, proxy_status, start_server, wait_for

ROOT = Path(__file__).resolve().parent.parent
TOPIC = "density"
SLABS = ("TCP", "sock_inode_cache", "dentry", "filp", "eventpoll_epi", "eventpoll_pwq")


def rss(server: Server) -> int:
    """Resident bytes of a server and its workers."""
    proc = psutil.Process(server.proc.pid)
    total = 0
    for p in (proc, *proc.children(recursive=True)):
        with contextlib.suppress(psutil.NoSuchProcess):
            total += p.memory_info().rss
    return total


def cpu_seconds(server: Server) -> float:
    """CPU seconds (user + system) of a server and its workers."""
    proc = psutil.Process(server.proc.pid)
    total = 0.0
    for p in (proc, *proc.children(recursive=True)):
        with contextlib.suppress(psutil.NoSuchProcess):
            times = p.cpu_times()
            total += times.user + times.system
    return total


def kernel() -> dict[str, int]:
    """TCP buffer bytes (sockstat) and the bytes of the slab caches sockets use (slabinfo, root only)."""
    out: dict[str, int] = {}
    for line in Path("/proc/net/sockstat").read_text().splitlines():
        if line.startswith("TCP:"):
            fields = line.split()[1:]
            values = dict(zip(fields[::2], map(int, fields[1::2]), strict=True))
            out["tcp_sockets"] = values["alloc"]
            out["tcp_buffer_bytes"] = values["mem"] * os.sysconf("SC_PAGE_SIZE")
    with contextlib.suppress(OSError):
        for line in Path("/proc/slabinfo").read_text().splitlines()[2:]:
            name, active, _, size = line.split()[:4]
            if name in SLABS:
                out[f"slab_{name}_bytes"] = int(active) * int(size)
    return out


async def publish_one(broker: Server, topic: str = TOPIC) -> None:
    body = json.dumps([{"meta": {"type": topic}, "data": {"ts": time.time(), "pad": "x" * 150}}])
    async with aiohttp.ClientSession() as session, session.post(
            f"http://{broker.endpoints['http']}/publish", data=body.encode(),
            headers={"Content-Type": "application/json"}) as resp:
        resp.raise_for_status()


async def main(args: argparse.Namespace) -> dict[str, Any]:
    """The SSE density run of this build, and of `--before`'s first when given."""
    machine = {"cpus": os.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / 2**30),
               "shared": "yes: other work ran at the same time"}
    if not args.before:
        return {"machine": machine, **await sse(args, sys.executable)}
    out: dict[str, Any] = {"machine": machine, "before_python": args.before}
    for label, python in (("before", args.before), ("current", sys.executable)):
        # Each build's clients from their own source addresses: the ports the first one's connections
        # leave in TIME_WAIT would slow the second's binds for a minute.
        out[label] = await sse(args, python, spread=label == "current", first_source=2 if label == "before" else 64)
        print(label, json.dumps(out[label]), flush=True)
    return out


async def sse(args: argparse.Namespace, python: str, spread: bool = True, first_source: int = 2) -> dict[str, Any]:
    """Idle SSE subscribers on a proxy pod run by `python`, one event to all, then (with `spread`) the
    spread load; the clients connect from 127.0.0.{first_source}, .{first_source + 1}, ..."""
    raise_fd_limit()
    n = args.subscribers
    workers = max(1, math.ceil(n / args.per_worker))
    procs = max(1, math.ceil(n / args.per_client))
    topics = args.spread_topics
    out: dict[str, Any] = {"subscribers_asked": n, "proxy_workers": workers, "client_processes": procs,
                           "client_nice": args.load_nice}
    with tempfile.TemporaryDirectory() as tmp:
        log_dir = Path(tmp)
        broker = start_server("broker", "b0", log_dir, "--workers", "1", python=python)
        proxy = start_server("proxy", "p0", log_dir, "--workers", str(workers), "--heartbeat",
                             str(args.heartbeat), python=python)
        started: list[Client] = []
        try:
            await apply_membership(proxy.endpoints["control"], 1, [(broker.name, broker.endpoints["grpc"])])
            await wait_for(lambda: links_ready(proxy.endpoints["control"], 1), timeout=30, what="links")
            rss0, kernel0 = rss(proxy), kernel()
            # Each subscriber wants TOPIC (one event to all) and one of `topics` (the spread load).
            started = clients(procs, first_source, args.load_nice, host="127.0.0.1", port=proxy.port("http"),
                              n=n // procs, inflight=args.inflight, path=f"/?eventType={TOPIC},{TOPIC}-{{i}}",
                              spread=topics, hold=True, timeout=60.0, record=True, deadline=args.connect_seconds)

            async def subscribers() -> int:
                return int((await proxy_status(proxy.endpoints["control"])).sse_subscribers)

            async def progress() -> None:
                while True:
                    await asyncio.sleep(10)
                    print(f"{time.monotonic() - t0:.0f} s: {await subscribers()} subscribers", flush=True)

            t0, cpu0 = time.monotonic(), cpu_seconds(proxy)
            go(started)
            reporting = asyncio.create_task(progress())
            for c in started:
                await asyncio.to_thread(c.line, args.connect_seconds + 120)
            connect_s, connect_cpu = time.monotonic() - t0, cpu_seconds(proxy) - cpu0
            reporting.cancel()

            async def all_there() -> bool:
                return await subscribers() >= n // procs * procs

            with contextlib.suppress(AssertionError):  # what it reached is the figure
                await wait_for(all_there, timeout=30, what="every subscriber at the proxy")
            reached = await subscribers()
            rss1, kernel1 = rss(proxy), kernel()
            out.update(subscribers=reached, connect_seconds=round(connect_s, 1),
                       connects_per_second=round(reached / connect_s),
                       proxy_cpu_us_per_connect=round(1e6 * connect_cpu / max(1, reached)),
                       proxy_rss_mb_before=round(rss0 / 2**20, 1), proxy_rss_mb_after=round(rss1 / 2**20, 1),
                       proxy_rss_kb_per_subscriber=round((rss1 - rss0) / max(1, reached) / 1024, 2),
                       kernel_bytes_per_socket={k: round((kernel1[k] - kernel0.get(k, 0)) / max(1, 2 * reached))
                                                for k in kernel1 if k != "tcp_sockets"},
                       tcp_sockets_added=kernel1.get("tcp_sockets", 0) - kernel0.get("tcp_sockets", 0))
            out["kernel_bytes_per_socket"]["total"] = sum(out["kernel_bytes_per_socket"].values())
            print("connected:", {k: v for k, v in out.items() if k != "machine"}, flush=True)

            # The first event comes right after the last subscriber connected: the first subscribers of a topic
            # in a worker may still be catching up from the broker (the proxy's interest did not hold their
            # topics yet), and theirs comes with their catch-up. Once every client has read it, every
            # subscriber is live and idle: the second event is the figure (one_event_to_all), the clients
            # reading their sockets as the events arrive, on the same 2 cores as the proxy. For the third the
            # clients leave their sockets alone until the proxy has written it to every one: the proxy has the
            # cores to itself, as on a node of its own (the kernel's receive times are kept meanwhile).
            deliveries = (await proxy_status(proxy.endpoints["control"])).deliveries
            publish_at: list[float] = []
            for k in (1, 2, 3):
                if k == 3:
                    for c in started:
                        c.say("quiet")
                    for c in started:
                        await asyncio.to_thread(c.line, 120)
                publish_at.append(time.time())
                await publish_one(broker)
                if k == 3:  # polled slowly: a Status costs each worker a pass over its subscribers

                    async def handed(events: int = k) -> bool:
                        try:  # a pod busy writing to 100,000 sockets may not answer within the call's 5 s
                            status = await proxy_status(proxy.endpoints["control"])
                        except grpc.aio.AioRpcError:
                            return False
                        return status.deliveries - deliveries >= events * reached

                    with contextlib.suppress(AssertionError):
                        await wait_for(handed, timeout=60, interval=1.0, what="the event written to every subscriber")
                for c in started:
                    c.say(f"read {k}")
                out[f"unread_event_{k}"] = sum([(await asyncio.to_thread(c.line, 120))["short"] for c in started])
            spread_at = time.time()
            sent = 0
            if spread and args.spread_seconds:
                names = tuple(f"{TOPIC}-{t}" for t in range(topics))
                sent = await publish_stamped(broker, args.spread_seconds, args.spread_rate, names)
                deliveries1 = (await proxy_status(proxy.endpoints["control"])).deliveries

                async def settled() -> bool:  # every delivery the proxy made is handed out (or it stalls)
                    nonlocal deliveries1
                    now = (await proxy_status(proxy.endpoints["control"])).deliveries
                    done, deliveries1 = now == deliveries1, now
                    return done
                with contextlib.suppress(AssertionError):
                    await wait_for(settled, timeout=30, interval=2.0, what="the spread load delivered")
            for c in started:
                c.say("stop 3")  # every subscriber has read the three events to all
            results = [await asyncio.to_thread(c.result, 120) for c in started]
            started = []
            first, second, third = ([rec for r in results for rec in r["records"] if begin <= rec[0] - rec[1] < end]
                                    for begin, end in ((0.0, publish_at[1]), (publish_at[1], publish_at[2]),
                                                       (publish_at[2], spread_at)))  # by when they were sent
            out["first_event_to_all"] = {"received": len(first), "of": reached, **latency_figures(first)}
            out["one_event_to_all"] = {"received": len(second), "of": reached, **latency_figures(second)}
            out["one_event_to_all_clients_quiet"] = {"received": len(third), "of": reached, **latency_figures(third)}
            print("one event to all, the clients quiet:", out["one_event_to_all_clients_quiet"], flush=True)
            print("first event to all (some still catching up):", out["first_event_to_all"], flush=True)
            print("one event to all:", out["one_event_to_all"], flush=True)
            if sent:
                out["spread"] = spread_figures(results, sent, topics, args, spread_at)
                status = await proxy_status(proxy.endpoints["control"])
                out["spread"]["slow_subscribers_dropped"] = status.slow_subscribers_dropped
                print("spread:", out["spread"], flush=True)
        finally:
            for c in started:
                c.proc.kill()
            proxy.stop(timeout=60)
            broker.stop()
    return out


def spread_figures(results: list[dict[str, Any]], sent: int, topics: int, args: argparse.Namespace,
                   since: float) -> dict[str, Any]:
    """What the spread load (`sent` events to `topics` topics in turn, one each) should have delivered to the
    subscribers connected (number i wants topic i % topics, and got the three events to all first) and what they
    received: lost events, and the latency of those received."""
    per_topic = [sent // topics + (t < sent % topics) for t in range(topics)]
    expected = received = short = 0
    for r in results:
        for i, count in r["counts"].items():
            want = 3 + per_topic[int(i) % topics]  # (and the three events to all)
            expected += want
            received += min(count, want)
            short += count < want
    records = [rec for r in results for rec in r["records"] if rec[0] - rec[1] >= since]  # sent since
    return {"topics": topics, "events_per_s": args.spread_rate, "seconds": args.spread_seconds, "events_sent": sent,
            "deliveries_expected": expected, "deliveries_received": received, "lost": expected - received,
            "subscribers_short": short, **latency_figures(records)}


def latency_figures(records: list[list[float]]) -> dict[str, float]:
    """p50/p99/max of the clients' records (read at, latency when read, latency when it reached the socket):
    `arrived_*` from the kernel's receive time, the time the proxy's write put the event in the
    subscriber's socket (what a subscriber on another machine would see, give or take the network);
    `read_*` when the client process read it, later by however long the clients, sharing the 2 cores
    with the proxy, took to get to that socket. A read holding a heartbeat both before and after the
    event (the client got to it that late) gives no time of the event's own: its arrival is unknown,
    left out and counted (`arrival_unknown`; connect_rate.arrival)."""
    out: dict[str, float] = {}
    for name, column in (("arrived", 2), ("read", 1)):
        values = [rec[column] for rec in records if not math.isnan(rec[column])]
        out.update({f"{name}_p50_ms": round(1000 * pct(values, 0.5), 1),
                    f"{name}_p99_ms": round(1000 * pct(values, 0.99), 1),
                    f"{name}_max_ms": round(1000 * max(values, default=float("nan")), 1)})
    out["arrival_unknown"] = sum(math.isnan(rec[2]) for rec in records)  # read with a later write (later_write)
    return out


async def plasma(args: argparse.Namespace) -> dict[str, Any]:
    """Idle plasma gRPC `Events` streams, `--per-connection` on each connection, on one proxy process
    (few connections: few descriptors), read by bench/dataplane.py's lean HTTP/2 client in processes."""
    from dataplane import Role

    raise_fd_limit()
    n, per = args.subscribers, args.per_connection
    procs = max(1, min(6, math.ceil(n / 20_000)))
    out: dict[str, Any] = {"kind": "plasma", "streams_asked": n, "streams_per_connection": per,
                           "proxy_workers": 1, "client_processes": procs}
    with tempfile.TemporaryDirectory() as tmp:
        log_dir = Path(tmp)
        broker = start_server("broker", "b0", log_dir, "--workers", "1")
        proxy = start_server("proxy", "p0", log_dir, "--workers", "1")
        try:
            await apply_membership(proxy.endpoints["control"], 1, [(broker.name, broker.endpoints["grpc"])])
            await wait_for(lambda: links_ready(proxy.endpoints["control"], 1), timeout=30, what="links")
            rss0 = rss(proxy)
            t0 = time.monotonic()
            roles = [Role("plasma", grpc_addr=proxy.endpoints["grpc"], n=n // procs, seconds=args.hold_seconds,
                          sample=n, per_connection=per) for _ in range(procs)]
            for role in roles:
                await asyncio.to_thread(role.wait_line, 300)

            async def streams() -> int:
                return int((await proxy_status(proxy.endpoints["control"])).grpc_subscribers)

            async def all_there() -> bool:
                return await streams() >= n // procs * procs

            with contextlib.suppress(AssertionError):
                await wait_for(all_there, timeout=120, what="every stream at the proxy")
            reached, connect_s = await streams(), time.monotonic() - t0
            rss1 = rss(proxy)
            out.update(streams=reached, connect_seconds=round(connect_s, 1),
                       proxy_rss_mb_before=round(rss0 / 2**20, 1), proxy_rss_mb_after=round(rss1 / 2**20, 1),
                       proxy_rss_kb_per_stream=round((rss1 - rss0) / max(1, reached) / 1024, 2))
            print("connected:", out, flush=True)
            published = time.monotonic()
            await publish_one(broker, "bench")
            results = [await asyncio.to_thread(role.result, args.hold_seconds + 120) for role in roles]
            latencies = [lat for r in results for lat in r["latencies"]]
            out["one_event_to_all"] = {"received": sum(r["events"] for r in results), "of": reached,
                                       "latency_samples": len(latencies),
                                       "p50_ms": round(1000 * pct(latencies, 0.5), 1),
                                       "p99_ms": round(1000 * pct(latencies, 0.99), 1),
                                       "max_ms": round(1000 * max(latencies, default=float("nan")), 1),
                                       "streams_ended": sum(r["streams_ended"] for r in results),
                                       "window_after_publish_s": round(t0 + args.hold_seconds - published, 1)}
            print("one event to all:", out["one_event_to_all"], flush=True)
        finally:
            proxy.stop(timeout=60)
            broker.stop()
    return out


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--subscribers", type=int, default=100_000, help="idle SSE subscribers (default 100,000)")
    parser.add_argument("--per-worker", type=int, default=18_000, help="subscribers per proxy worker process")
    parser.add_argument("--per-client", type=int, default=18_000, help="subscribers per client process")
    parser.add_argument("--inflight", type=int, default=100, help="connections in flight per client process")
    parser.add_argument("--connect-seconds", type=float, default=300.0,
                        help="no connection is begun later than this (what was reached by then is measured)")
    parser.add_argument("--spread-topics", type=int, default=1000, help="SSE: each subscriber also wants one of "
                        "this many topics")
    parser.add_argument("--spread-rate", type=float, default=100.0, help="SSE: events per second over those topics "
                        "after the event to all")
    parser.add_argument("--spread-seconds", type=float, default=60.0, help="SSE: for this long (0: no spread load)")
    parser.add_argument("--before", default="", help="SSE: first the same run (without the spread load) with another "
                        "build's servers (that interpreter's `-m neoplasma`)")
    parser.add_argument("--heartbeat", type=float, default=30.0, help="SSE: the proxy's --heartbeat (default 30 s: "
                        "one to 100,000 subscribers is ~1 s of the pod's CPU, beside whatever event it meets)")
    parser.add_argument("--load-nice", type=int, default=0, choices=range(20), metavar="0-19",
                        help="SSE: run the client processes at this nice value: 19 lets the proxy pod have the "
                        "cores first, as subscribers on machines of their own would (default 0)")
    parser.add_argument("--kind", choices=("sse", "plasma"), default="sse",
                        help="SSE subscribers, or plasma gRPC streams (--per-connection on each connection)")
    parser.add_argument("--per-connection", type=int, default=100, help="plasma streams per connection")
    parser.add_argument("--hold-seconds", type=float, default=120.0,
                        help="plasma: how long the clients hold their streams (connect, measure, one event)")
    args = parser.parse_args()
    result = asyncio.run(main(args) if args.kind == "sse" else plasma(args))
    path = ROOT / "bench" / "results" / f"density_{args.kind}.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"written {path.relative_to(ROOT)}")


if __name__ == "__main__":
    cli()
