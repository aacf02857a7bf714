"""Relay mesh at 60 brokers x 100 proxies (6000 relay streams): memory, idle CPU, and attaching a new broker.

Every proxy holds one relay stream to every broker (proxy/links.py). This bench starts `--brokers`
real broker processes (`neoplasma broker`, as tests/harness.py starts them) and `--proxies` proxies:
`--real-proxies` of them real `neoplasma proxy` processes, the rest stand-ins: `--standin-processes`
processes each running a share of the proxies' relay clients, each one the proxy's own `LinkSet` (its
`BrokerLink`s open, keep and re-open the same Relay streams a proxy does, with its interest and
credential) over a hub of its own, with no subscriber ports. Then:

1. each broker's RSS before any relay, and each real proxy's before its membership;
2. the membership of all the brokers goes to every proxy (real ones through the operator's
   `MembershipPusher`, stand-ins told over a pipe); once every link is connected with its interest
   acknowledged, `--idle-seconds` of quiet: RSS and CPU seconds of every broker and proxy;
3. a new broker starts; the membership with it goes to every proxy at once: the seconds from the push
   to each proxy having it connected (interest acknowledged), p50/p99/max over the proxies.

    flock /work/bench.lock python bench/mesh.py                     # 60 brokers x 100 proxies, 5 real
    python bench/mesh.py --brokers 10 --proxies 20 --real-proxies 2 --idle-seconds 10

Prints a table and writes JSON (bench/results/mesh.json unless --json says otherwise).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import psutil

from neoplasma.core.membership import BrokerState, Member, Snapshot
from neoplasma.core.net import raise_fd_limit
from neoplasma.core.push import MembershipPusher
from neoplasma.core.trust import Access, Tokens
from neoplasma.proxy.hub import Hub
from neoplasma.proxy.links import LinkSet
from neoplasma.proxy.settings import ProxyConfig

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(Path(__file__).resolve())  # run again as a stand-in process
RESULTS = ROOT / "bench" / "results" / "mesh.json"
sys.path.insert(0, str(ROOT / "tests"))  # the test harness
from harness import ACCESS, CREDENTIAL, Server, proxy_status, start_server, stop_process  # noqa: E402

CLUSTER = "bench-mesh"


# -- the stand-in proxies' relay clients (a child process runs a share of them) ----------------


def snapshot(version: int, members: list[list[str]]) -> Snapshot:
    return Snapshot(version, tuple(sorted(Member(n, a, BrokerState.SERVING) for n, a in members)), CLUSTER)


@dataclass(frozen=True)
class OwnConnections(Access):
    """The proxy's Access, but each channel with a subchannel pool of its own: a real proxy is a process of
    its own, with its own TCP connection to each broker; in one process, gRPC would share one connection
    per broker among all the stand-ins (each relay stream is its own all the same)."""

    def channel(self, address: str, options: Sequence[tuple[str, Any]] = ()) -> grpc.aio.Channel:
        return super().channel(address, [*options, ("grpc.use_local_subchannel_pool", 1)])


async def serve_links(names: list[str], credential: str) -> None:
    """Run a LinkSet per name; apply each snapshot read from stdin (one JSON line: version, members);
    answer one JSON line once every link of every LinkSet is connected with its interest acknowledged:
    when each LinkSet got there (monotonic clock, which every process on the machine shares)."""
    access = OwnConnections(Tokens(given=[credential]))
    sets = {name: LinkSet(Hub(), name, ProxyConfig.max_message_bytes, access) for name in names}
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    print(json.dumps({"ready": len(sets), "pid": os.getpid()}), flush=True)
    while line := await reader.readline():
        command = json.loads(line)
        wanted = snapshot(command["version"], command["members"])

        async def settle(links: LinkSet, wanted: Snapshot = wanted, timeout: float = command["timeout"]
                         ) -> float | None:
            await links.apply(wanted)
            done = await links.changed.wait_until(links.settled, timeout)
            return time.monotonic() if done else None

        times = await asyncio.gather(*(settle(links) for links in sets.values()))
        print(json.dumps({"settled": dict(zip(sets, times, strict=True))}), flush=True)
    await asyncio.gather(*(links.close() for links in sets.values()))


# -- the bench -------------------------------------------------------------------------------


class StandIns:
    """One stand-in process and its share of proxy names."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.proc = subprocess.Popen([sys.executable, SCRIPT, "--serve-links", json.dumps(names)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     env={**os.environ, "BENCH_CREDENTIAL": CREDENTIAL})
        self.pid = 0

    async def started(self) -> None:
        line = await self._line(60)
        self.pid = int(line["pid"])

    async def apply(self, version: int, members: list[tuple[str, str]], timeout: float) -> dict[str, float | None]:
        assert self.proc.stdin is not None
        command = {"version": version, "members": members, "timeout": timeout}
        self.proc.stdin.write(json.dumps(command).encode() + b"\n")
        self.proc.stdin.flush()
        answer: dict[str, float | None] = (await self._line(timeout + 30))["settled"]
        return answer

    async def _line(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(self.proc.stdout.readline), timeout)
        if not line:
            raise RuntimeError("a stand-in process ended (see its stderr above)")
        parsed: dict[str, Any] = json.loads(line)
        return parsed

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        stop_process(self.proc, timeout=10)


def start_all(kind: str, names: list[str], log_dir: Path) -> list[Server]:
    """Start servers in parallel (each prints its endpoints when serving)."""
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(lambda n: start_server(kind, n, log_dir), names))


def rss_mb(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


def cpu(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))] if ordered else float("nan")


def summary(values: list[float], digits: int = 2) -> dict[str, float]:
    return {"n": len(values), "median": round(statistics.median(values), digits), "min": round(min(values), digits),
            "max": round(max(values), digits)}


async def push_everywhere(version: int, members: list[tuple[str, str]], real: list[Server], standins: list[StandIns],
                          pusher: MembershipPusher, timeout: float) -> tuple[float, dict[str, float | None]]:
    """Push the membership to every proxy at once; when each one had every link connected."""
    wanted = snapshot(version, [list(m) for m in members])
    started = time.monotonic()
    settled: dict[str, float | None] = {}

    async def real_proxy(server: Server) -> None:
        result = await pusher.push_one(server.name, server.endpoints["control"], wanted)
        if not result.ok:
            raise RuntimeError(f"proxy {server.name} refused the membership: {result.error}")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = await proxy_status(server.endpoints["control"])
            links = {link.name: link for link in status.links}
            if len(links) == len(members) and all(link.interest_synced for link in links.values()):
                settled[server.name] = time.monotonic()
                return
            await asyncio.sleep(0.02)  # the resolution of the real proxies' times
        settled[server.name] = None

    async def standin(group: StandIns) -> None:
        settled.update(await group.apply(version, members, timeout))

    await asyncio.gather(*(real_proxy(s) for s in real), *(standin(g) for g in standins))
    return started, settled


async def main(args: argparse.Namespace) -> None:
    raise_fd_limit()
    started_at = time.monotonic()
    log_dir = Path(tempfile.mkdtemp(prefix="bench-mesh-"))
    brokers: list[Server] = []
    real: list[Server] = []
    standins: list[StandIns] = []
    pusher = MembershipPusher(access=ACCESS, timeout=10.0)
    result: dict[str, Any] = {}
    try:
        names = [f"broker-{i:02d}" for i in range(args.brokers)]
        print(f"starting {args.brokers} brokers, {args.real_proxies} real proxies, "
              f"{args.proxies - args.real_proxies} stand-in proxies in {args.standin_processes} processes", flush=True)
        brokers = await asyncio.to_thread(start_all, "broker", names, log_dir)
        real = await asyncio.to_thread(start_all, "proxy", [f"proxy-{i:03d}" for i in range(args.real_proxies)],
                                       log_dir)
        others = [f"standin-{i:03d}" for i in range(args.proxies - args.real_proxies)]
        standins = [StandIns(others[k::args.standin_processes]) for k in range(args.standin_processes)
                    if others[k::args.standin_processes]]
        await asyncio.gather(*(g.started() for g in standins))
        await asyncio.sleep(args.settle)  # after start-up: the processes' own first seconds
        broker_rss0 = [rss_mb(b.proc.pid) for b in brokers]
        proxy_rss0 = [rss_mb(p.proc.pid) for p in real]
        standin_rss0 = [rss_mb(g.pid) for g in standins]
        members = [(b.name, b.endpoints["grpc"]) for b in brokers]
        print(f"{time.monotonic() - started_at:.0f} s: pushing {len(members)} brokers to {args.proxies} proxies",
              flush=True)
        t0, settled = await push_everywhere(1, members, real, standins, pusher, args.timeout)
        first = [t - t0 for t in settled.values() if t is not None]
        missing = [n for n, t in settled.items() if t is None]
        print(f"  all links up: {len(first)} proxies, slowest {max(first):.2f} s; not settled: {len(missing)}",
              flush=True)
        # Idle: every stream open, nothing published.
        await asyncio.sleep(args.settle)
        pids = {"broker": [b.proc.pid for b in brokers], "proxy": [p.proc.pid for p in real],
                "standins": [g.pid for g in standins]}
        cpu0 = {k: [cpu(p) for p in v] for k, v in pids.items()}
        idle_started = time.monotonic()
        await asyncio.sleep(args.idle_seconds)
        idle = time.monotonic() - idle_started
        idle_cpu = {k: [(cpu(p) - c) / idle * 100 for p, c in zip(v, cpu0[k], strict=True)] for k, v in pids.items()}
        broker_rss = [rss_mb(p) for p in pids["broker"]]
        proxy_rss = [rss_mb(p) for p in pids["proxy"]]
        standin_rss = [rss_mb(p) for p in pids["standins"]]
        fds = {k: [psutil.Process(p).num_fds() for p in v] for k, v in pids.items()}
        relays = [int((await broker_relays(b)) or 0) for b in brokers[:5]]
        # A new broker: started, then pushed to every proxy at once.
        print(f"{time.monotonic() - started_at:.0f} s: a new broker", flush=True)
        [new] = await asyncio.to_thread(start_all, "broker", [f"broker-{args.brokers:02d}"], log_dir)
        brokers.append(new)
        t1, settled = await push_everywhere(2, [*members, (new.name, new.endpoints["grpc"])], real, standins, pusher,
                                            args.timeout)
        attach = [t - t1 for t in settled.values() if t is not None]
        attach_real = [settled[p.name] - t1 for p in real if settled.get(p.name) is not None]  # type: ignore[operator]
        per_standin = len(others) / max(1, len(standins))
        result = {
            "streams": args.brokers * args.proxies,
            "broker": {"rss_mb_before": summary(broker_rss0, 1), "rss_mb": summary(broker_rss, 1),
                       "kb_per_relay_stream": round(statistics.median(
                           (a - b) * 1024 / args.proxies for a, b in zip(broker_rss, broker_rss0, strict=False)), 1),
                       "idle_cpu_percent": summary(idle_cpu["broker"], 3), "open_files": summary(fds["broker"], 0),
                       "relay_streams_seen_by_stats": relays},
            "proxy": {"rss_mb_before": summary(proxy_rss0, 1), "rss_mb": summary(proxy_rss, 1),
                      "kb_per_link": round(statistics.median(
                          (a - b) * 1024 / args.brokers for a, b in zip(proxy_rss, proxy_rss0, strict=True)), 1),
                      "idle_cpu_percent": summary(idle_cpu["proxy"], 3), "open_files": summary(fds["proxy"], 0)},
            "standin_process": {"proxies_each": round(per_standin, 1), "rss_mb_before": summary(standin_rss0, 1),
                                "rss_mb": summary(standin_rss, 1),
                                "kb_per_link": round(statistics.median(
                                    (a - b) * 1024 / (per_standin * args.brokers)
                                    for a, b in zip(standin_rss, standin_rss0, strict=True)), 1),
                                "idle_cpu_percent": summary(idle_cpu["standins"], 3),
                                "open_files": summary(fds["standins"], 0)},
            "first_membership_all_links_seconds": {"p50": round(pct(first, 50), 3), "max": round(max(first), 3),
                                                   "not_settled": missing},
            "new_broker_attached_seconds": {"n": len(attach), "of": args.proxies, "p50": round(pct(attach, 50), 3),
                                            "p99": round(pct(attach, 99), 3), "max": round(max(attach), 3),
                                            "real_proxies_max": round(max(attach_real), 3) if attach_real else None},
            "idle_seconds": round(idle, 1),
        }
    finally:
        await pusher.close()
        for group in standins:
            group.stop()
        for server in [*real, *brokers]:
            server.stop(timeout=10)
    report = {"what": "relay mesh: every proxy attached to every broker",
              "command": " ".join(["python", "bench/mesh.py", *sys.argv[1:]]),
              "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                          "memory_gib": round(psutil.virtual_memory().total / 2**30), "load_average": os.getloadavg()},
              "setup": {"brokers": args.brokers, "proxies": args.proxies, "real_proxies": args.real_proxies,
                        "standin_processes": args.standin_processes},
              "seconds": round(time.monotonic() - started_at, 1), **result}
    print()
    print(table(report))
    path = Path(args.json)
    await asyncio.to_thread(path.parent.mkdir, parents=True, exist_ok=True)
    await asyncio.to_thread(path.write_text, json.dumps(report, indent=2) + "\n")
    print(f"written to {path}")


async def broker_relays(broker: Server) -> int | None:
    """The relay streams the broker's Stats counts (its connections: publishers + relay streams)."""
    from neoplasma.wire.v1 import neoplasma_pb2 as pb
    from neoplasma.wire.v1 import neoplasma_pb2_grpc as pb_grpc

    async with grpc.aio.insecure_channel(broker.endpoints["grpc"]) as channel:
        stats = await pb_grpc.BrokerStub(channel).Stats(pb.StatsRequest(), timeout=10, metadata=ACCESS.metadata())
    return int(stats.connections)


def table(r: dict[str, Any]) -> str:
    setup, a, first = r["setup"], r["new_broker_attached_seconds"], r["first_membership_all_links_seconds"]

    def row(label: str, x: dict[str, Any], per: str) -> str:
        return (f"| {label} | {x['rss_mb_before']['median']} MB | {x['rss_mb']['median']}, {x['rss_mb']['max']} MB | "
                f"{x[per]} KB | {x['idle_cpu_percent']['median']:.2f} %, {x['idle_cpu_percent']['max']:.2f} % | "
                f"{x['open_files']['median']:.0f} |")

    return "\n".join([
        f"{setup['brokers']} brokers x {setup['proxies']} proxies = {r['streams']} relay streams "
        f"({setup['real_proxies']} real proxies, the rest in {setup['standin_processes']} stand-in processes)",
        "| | RSS before (median) | RSS with the mesh (median, max) | per stream | idle CPU (median, max) "
        "| open files |",
        "|---|---|---|---|---|---|",
        row(f"broker ({setup['proxies']} relays each)", r["broker"], "kb_per_relay_stream"),
        row(f"real proxy ({setup['brokers']} links)", r["proxy"], "kb_per_link"),
        row(f"stand-in process ({r['standin_process']['proxies_each']} proxies)", r["standin_process"], "kb_per_link"),
        f"new broker attached by every proxy: {a['n']} of {a['of']}, p50 {a['p50']:.3f} s, p99 {a['p99']:.3f} s, "
        f"max {a['max']:.3f} s (real proxies' max {a['real_proxies_max']} s)",
        f"first membership ({setup['brokers']} brokers) with every link up: p50 {first['p50']} s, max {first['max']} s",
    ])


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--brokers", type=int, default=60, help="brokers in the mesh (one more is added; default 60)")
    p.add_argument("--proxies", type=int, default=100, help="proxies, real and stand-in (default 100)")
    p.add_argument("--real-proxies", type=int, default=5, help="of them, real proxy processes (default 5)")
    p.add_argument("--standin-processes", type=int, default=3, help="processes running the other proxies' "
                   "relay clients (default 3)")
    p.add_argument("--idle-seconds", type=float, default=20.0, help="the idle window measured (default 20)")
    p.add_argument("--settle", type=float, default=5.0, help="seconds let pass before each measurement (default 5)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds every link may take (default 120)")
    p.add_argument("--json", default=str(RESULTS),
                   help=f"where to write the JSON (default {RESULTS.relative_to(ROOT)})")
    p.add_argument("--serve-links", help=argparse.SUPPRESS)  # a stand-in child process
    args = p.parse_args(argv)
    if not args.serve_links and not 0 <= args.real_proxies <= args.proxies:
        p.error("--real-proxies must be 0..--proxies")
    return args


if __name__ == "__main__":
    arguments = parse()
    if arguments.serve_links:
        import uvloop  # the proxy's loop

        raise_fd_limit()
        uvloop.run(serve_links(json.loads(arguments.serve_links), os.environ["BENCH_CREDENTIAL"]))
    else:
        asyncio.run(main(arguments))
