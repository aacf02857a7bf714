"""`neoplasma up`: a whole cluster as child processes on 127.0.0.1.

Brokers and proxies are the real servers; membership reaches the proxies
through the same pusher the operator uses. A child that dies is reported and
restarted on the same ports.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import signal
import sys
from dataclasses import dataclass, field

from neoplasma.core.logs import get_logger
from neoplasma.core.membership import EMPTY, Member, Snapshot, next_snapshot
from neoplasma.core.push import MembershipPusher

log = get_logger("up")

READY_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0


class ChildFailed(RuntimeError):
    pass


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM if `up` itself is killed (Linux)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


@dataclass
class Child:
    kind: str  # "broker" | "proxy"
    name: str
    ports: dict[str, int]  # flag name -> port (0 until first start)
    endpoints: dict[str, str] = field(default_factory=dict)
    process: asyncio.subprocess.Process | None = None
    restarts: int = 0

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "neoplasma", self.kind, "--name", self.name, "--host", "127.0.0.1"]
        for flag, port in self.ports.items():
            cmd += [f"--{flag}", str(port)]
        return cmd

    async def start(self) -> None:
        # Own process group: a terminal's Ctrl-C reaches only `up`, which stops children in order.
        self.process = await asyncio.create_subprocess_exec(
            *self.command(), stdout=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL,
            process_group=0, preexec_fn=_die_with_parent)
        assert self.process.stdout is not None
        try:
            line = await asyncio.wait_for(self.process.stdout.readline(), READY_TIMEOUT)
        except TimeoutError:
            self.process.kill()
            raise ChildFailed(f"{self.name} did not start serving within {READY_TIMEOUT:.0f}s") from None
        if not line:
            code = await self.process.wait()
            raise ChildFailed(f"{self.name} exited with code {code} before serving (see its log above)")
        serving = json.loads(line)["serving"]
        self.endpoints = {k: v for k, v in serving.items() if k not in ("kind", "name")}
        for flag in self.ports:  # keep the ports, so a restart comes back where it was
            self.ports[flag] = int(self.endpoints[flag.removesuffix("-port")].rpartition(":")[2])

    async def stop(self) -> None:
        proc = self.process
        if proc is None or proc.returncode is not None:
            return
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), STOP_TIMEOUT)
        except TimeoutError:
            proc.kill()
            await proc.wait()


class LocalCluster:
    def __init__(self, brokers: int, proxies: int) -> None:
        self.brokers = [Child("broker", f"broker-{i}", {"grpc-port": 0, "http-port": 0}) for i in range(brokers)]
        self.proxies = [Child("proxy", f"proxy-{i}", {"http-port": 0, "grpc-port": 0, "control-port": 0})
                        for i in range(proxies)]
        self.snapshot: Snapshot = EMPTY
        self.pusher = MembershipPusher()
        self._stopping = False

    @property
    def children(self) -> list[Child]:
        return self.brokers + self.proxies

    async def start(self) -> None:
        await asyncio.gather(*(c.start() for c in self.children))
        await self.push_membership()

    async def push_membership(self) -> None:
        members = [Member(b.name, b.endpoints["grpc"]) for b in self.brokers if b.endpoints]
        self.snapshot = next_snapshot(self.snapshot, members)
        targets = {p.name: p.endpoints["control"] for p in self.proxies if p.endpoints}
        results = await self.pusher.push_all(targets, self.snapshot)
        failed = [name for name, r in results.items() if not r.ok]
        if failed:
            log.warning("membership_not_acknowledged", version=self.snapshot.version, proxies=failed)

    async def supervise(self) -> None:
        """Restart children that exit until stop() is called."""
        async def watch(child: Child) -> None:
            while not self._stopping:
                assert child.process is not None
                code = await child.process.wait()
                if self._stopping:
                    return
                child.restarts += 1
                log.error("child_exited", child=child.name, code=code, restarts=child.restarts)
                try:
                    await child.start()
                except ChildFailed as exc:
                    log.error("child_restart_failed", child=child.name, error=str(exc))
                    await asyncio.sleep(min(30.0, 0.5 * 2 ** child.restarts))
                    continue
                log.info("child_restarted", child=child.name)
                if child.kind == "proxy":  # a fresh proxy knows no brokers yet
                    await self.pusher.push_all({child.name: child.endpoints["control"]}, self.snapshot)
        await asyncio.gather(*(watch(c) for c in self.children))

    async def stop(self) -> None:
        self._stopping = True
        await asyncio.gather(*(c.stop() for c in self.children))
        await self.pusher.close()

    def describe(self) -> dict[str, list[dict[str, str]]]:
        return {
            "brokers": [{"grpc": b.endpoints["grpc"], "http": b.endpoints["http"]} for b in self.brokers],
            "proxies": [{"grpc": p.endpoints["grpc"], "http": p.endpoints["http"],
                         "control": p.endpoints["control"]} for p in self.proxies],
        }

    def table(self) -> str:
        rows = [("NAME", "GRPC", "HTTP", "CONTROL")]
        for c in self.children:
            rows.append((c.name, c.endpoints["grpc"], c.endpoints["http"], c.endpoints.get("control", "-")))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
        proxy = self.proxies[0].endpoints if self.proxies else {}
        broker = self.brokers[0].endpoints if self.brokers else {}
        if proxy and broker:
            lines += ["", f"membership version {self.snapshot.version}; try:",
                      f"  neoplasma subscribe --proxy {proxy['http']} demo",
                      f"  neoplasma publish --broker {broker['grpc']} demo:hello '{{\"hi\": 1}}'",
                      "Ctrl-C stops everything."]
        return "\n".join(lines)


async def _up(brokers: int, proxies: int, as_json: bool) -> int:
    cluster = LocalCluster(brokers, proxies)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await cluster.start()
    except ChildFailed as exc:
        log.error("up_failed", error=str(exc))
        await cluster.stop()
        print(f"neoplasma up: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(cluster.describe()) if as_json else cluster.table(), flush=True)
    supervisor = asyncio.create_task(cluster.supervise())
    await stop.wait()
    log.info("up_stopping")
    await cluster.stop()
    supervisor.cancel()
    await asyncio.gather(supervisor, return_exceptions=True)
    return 0


def run_up(brokers: int, proxies: int, as_json: bool) -> int:
    if brokers < 1 or proxies < 1:
        print("neoplasma up: need at least one broker and one proxy", file=sys.stderr)
        return 2
    return asyncio.run(_up(brokers, proxies, as_json))
