"""`neoplasma up`: a whole cluster as child processes on 127.0.0.1.

Brokers and proxies are the real servers; membership reaches the proxies
through the same pusher the operator uses, pushed again every few seconds as the operator does.
With `--redis`, two `ingest-redis` readers sharing a lease feed the brokers. A child that dies is
reported and restarted on the same ports. The operator's metrics (membership convergence, scaling
decisions, pass durations, sizes) are served at /metrics, labelled namespace="local", cluster="local".
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from neoplasma.core.autoscaler import Autoscaler
from neoplasma.core.backoff import BackoffPolicy
from neoplasma.core.control import BrokerChannels
from neoplasma.core.errors import NeoplasmaError, UsageError
from neoplasma.core.lifecycle import serve
from neoplasma.core.load import broker_load, proxy_load
from neoplasma.core.logs import get_logger
from neoplasma.core.membership import BrokerState, Member, Snapshot, next_snapshot
from neoplasma.core.net import PARENT_PID_ENV
from neoplasma.core.push import MembershipPusher
from neoplasma.core.scaling import Load
from neoplasma.core.tiers import Tier
from neoplasma.core.trust import CREDENTIAL_FILE_ENV, Access, Tokens
from neoplasma.operator import metrics as operator_metrics
from neoplasma.operator.sync import Convergence

log = get_logger("up")

READY_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0
RESTART_BACKOFF = BackoffPolicy(initial=1.0, maximum=30.0)  # a failed restart's wait, by the child's restarts
ANTI_ENTROPY = 5.0  # seconds between pushes of the membership to every proxy (the operator's default)
KEY = ("local", "local")  # the namespace and cluster labels of the operator's metrics


class ChildFailed(NeoplasmaError):
    """A broker or proxy did not start serving."""


@dataclass
class Child:
    kind: str  # a Tier, or "ingest-redis"
    name: str
    ports: dict[str, int]  # flag name -> port (0 until first start)
    args: list[str] = field(default_factory=list)  # more options
    endpoints: dict[str, str] = field(default_factory=dict)
    process: asyncio.subprocess.Process | None = None
    credential_file: str = ""  # the cluster credential, passed in the environment (not in argv)
    restarts: int = 0
    draining: bool = False  # being removed: no restart, DRAINING in membership
    workers: int = 1  # a broker's or proxy's --workers (one core each unless `up --workers N`)

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "neoplasma", self.kind, "--name", self.name, "--host", "127.0.0.1",
               *(("--workers", str(self.workers)) if self.kind in ("broker", "proxy") else ())]
        for flag, port in self.ports.items():
            cmd += [f"--{flag}", str(port)]
        return cmd + self.args

    async def start(self) -> None:
        # Own process group: a terminal's Ctrl-C reaches only `up`, which stops children in order.
        # No preexec_fn: running Python between fork and exec can hang on gRPC's threads' locks;
        # the child arranges to die with `up` itself (neoplasma.core.net.die_with_parent).
        self.process = await asyncio.create_subprocess_exec(
            *self.command(), stdout=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL,
            process_group=0, env={**os.environ, PARENT_PID_ENV: str(os.getpid()),
                                  CREDENTIAL_FILE_ENV: self.credential_file})
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
    def __init__(self, brokers: int, proxies: int, credential_file: str, ingest: list[str] | None = None,
                 proxy_args: list[str] | None = None, workers: int = 1) -> None:
        self.credential_file = credential_file
        self.workers = workers  # each broker's and proxy's --workers
        self.proxy_args = proxy_args or []  # more options for every proxy (private topics)
        self.access = Access(Tokens(credential_file))
        self.brokers: list[Child] = []
        self.proxies: list[Child] = []
        self.readers: list[Child] = []
        self._ingest = ingest  # the readers' options (Redis, channels), or None for no readers
        self._initial = {Tier.BROKER: brokers, Tier.PROXY: proxies}
        self._next_index = dict.fromkeys(Tier, 0)
        self.snapshot = Snapshot(0, (), secrets.token_hex(8))  # a new cluster id per run (resume tokens)
        self.pusher = MembershipPusher(access=self.access)
        self.broker_channels = BrokerChannels()  # the brokers' Stats reads (the proxies' Status: the pushes' channels)
        self.stopping = asyncio.Event()  # set on Ctrl-C/SIGTERM (by `up`) or by stop()
        self._watchers: set[asyncio.Task[None]] = set()
        self._membership_lock = asyncio.Lock()
        self.metrics = operator_metrics.Metrics()
        self.convergence = Convergence()
        self._applied: dict[str, int] = {}  # proxy name -> the membership version it last acknowledged
        self.desired = dict(self._initial)
        self.metrics.clusters.set(1)
        self.metrics_address = ""  # host:port of the operator's metrics, once served

    @property
    def children(self) -> list[Child]:
        return self.brokers + self.proxies

    def group(self, kind: Tier) -> list[Child]:
        return self.brokers if kind is Tier.BROKER else self.proxies

    def _new_child(self, kind: Tier) -> Child:
        index = self._next_index[kind]
        self._next_index[kind] += 1
        ports = {"grpc-port": 0, "http-port": 0} if kind is Tier.BROKER else {"http-port": 0, "grpc-port": 0,
                                                                              "control-port": 0}
        return Child(kind, f"{kind}-{index}", ports, self.proxy_args if kind is Tier.PROXY else [],
                     credential_file=self.credential_file, workers=self.workers)

    async def start(self) -> None:
        for kind, n in self._initial.items():
            self.group(kind).extend(self._new_child(kind) for _ in range(n))
        await asyncio.gather(*(c.start() for c in self.children))
        if self._ingest is not None:  # two readers, one active (a lease per cluster), feeding the brokers
            args = [*self._ingest, "--brokers", ",".join(b.endpoints["grpc"] for b in self.brokers),
                    "--lease-key", f"neoplasma:ingest:{self.snapshot.cluster}"]
            self.readers = [Child("ingest-redis", f"ingest-{i}", {"http-port": 0}, args) for i in range(2)]
            await asyncio.gather(*(r.start() for r in self.readers))
        for child in self.children + self.readers:
            self._watch(child)
        await self.push_membership()

    async def push_membership(self, only: Child | None = None) -> None:
        """Build the snapshot from the brokers and push it to every proxy (or only to `only`)."""
        async with self._membership_lock:
            members = [Member(b.name, b.endpoints["grpc"], BrokerState.DRAINING if b.draining
                              else BrokerState.SERVING) for b in self.brokers if b.endpoints]
            previous, self.snapshot = self.snapshot, next_snapshot(self.snapshot, members)
            if self.snapshot is not previous:
                self.convergence.changed(self.snapshot.version, time.monotonic())
            proxies = [only] if only else self.proxies
            targets = {p.name: p.endpoints["control"] for p in proxies if p.endpoints and not p.draining}
            results = await self.pusher.push_all(targets, self.snapshot)
        failed = [name for name, r in results.items() if not r.ok]
        if failed:
            log.warning("membership_not_acknowledged", version=self.snapshot.version, proxies=failed)
        self._applied.update((name, r.applied_version) for name, r in results.items() if r.ok)
        self._observe()

    def _observe(self) -> None:
        """Convergence, sizes and membership, as the operator's metrics give them."""
        def ready(group: list[Child]) -> list[Child]:
            return [c for c in group if c.process is not None and c.process.returncode is None and not c.draining]

        proxies = ready(self.proxies)
        version = self.snapshot.version
        acknowledged = sum(self._applied.get(p.name) == version for p in proxies)
        seconds = self.convergence.check(version, acknowledged == len(proxies), time.monotonic())
        if seconds is not None:
            self.metrics.converged(KEY, seconds)
        self.metrics.sizes(KEY, (self.desired[Tier.BROKER], len(ready(self.brokers))),
                           (self.desired[Tier.PROXY], len(proxies)), version, acknowledged)

    async def reconcile(self, interval: float = ANTI_ENTROPY) -> None:
        """Until stopping: push the membership to every proxy every `interval` seconds (as the
        operator's anti-entropy does), timed as the operator's reconcile passes are."""
        while not self.stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), interval)
            if self.stopping.is_set():
                return
            started = time.perf_counter()
            try:
                await self.push_membership()
            except Exception:  # a bug: say so, count it, go on
                log.error("up_pass_failed", exc_info=True)
                self.metrics.reconciled(KEY, time.perf_counter() - started, ok=False)
            else:
                self.metrics.reconciled(KEY, time.perf_counter() - started, ok=True)

    # -- children come and go ------------------------------------------------------------

    async def add(self, kind: Tier) -> Child:
        child = self._new_child(kind)
        await child.start()
        self.group(kind).append(child)
        self._watch(child)
        await self.push_membership(only=None if kind is Tier.BROKER else child)
        log.info("child_added", child=child.name, **child.endpoints)
        return child

    async def remove(self, kind: Tier) -> None:
        """Remove the newest child of `kind`, draining it first.

        A broker is published as DRAINING (it also refuses publishes once stopping, so
        publishers go elsewhere), stopped (it flushes what it accepted to the proxies, which
        keep their links to it meanwhile), and only then removed from membership. A proxy asks
        its subscribers to reconnect at a paced rate before it exits.
        """
        group: list[Child] = self.group(kind)
        child = group[-1]
        child.draining = True
        if kind is Tier.BROKER:
            await self.push_membership()
        await child.stop()
        group.remove(child)
        if kind is Tier.BROKER:
            await self.push_membership()
        log.info("child_removed", child=child.name)

    def _watch(self, child: Child) -> None:
        task = asyncio.get_running_loop().create_task(self._restart_when_exited(child))
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)

    async def _restart_when_exited(self, child: Child) -> None:
        while True:
            assert child.process is not None
            code = await child.process.wait()
            if self.stopping.is_set() or child.draining:
                return
            child.restarts += 1
            log.error("child_exited", child=child.name, code=code, restarts=child.restarts)
            try:
                await child.start()
            except ChildFailed as exc:
                log.error("child_restart_failed", child=child.name, error=str(exc))
                await asyncio.sleep(RESTART_BACKOFF.delay(child.restarts))
                continue
            log.info("child_restarted", child=child.name)
            if child.kind is Tier.PROXY:  # a fresh proxy knows no brokers yet
                await self.push_membership(only=child)

    # -- autoscaling ----------------------------------------------------------------------

    async def autoscale(self, scaler: Autoscaler, spec: tuple[int, int], interval: float) -> None:
        """Until stopping: every `interval` seconds read the load, let `scaler` (the operator's own
        Autoscaler) decide from `spec` (the sizes asked for), and add or remove children to match."""
        while not self.stopping.is_set():
            loads = {tier: await self.load(tier) for tier in scaler.autoscaled()}
            for change in scaler.step(*spec, loads, time.monotonic()):
                self.metrics.scaled(KEY, change.tier.plural, change.direction)
                load = loads[change.tier]
                log.info("scaling", tier=change.tier, current=change.before, desired=change.after,
                         reason=change.reason, load=load.total, pods_read=load.pods_read)
            self.desired = scaler.sizes(*spec)
            for tier, size in self.desired.items():
                await self._resize(tier, size)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), interval)  # the polling period, cut short by a stop

    async def load(self, kind: Tier) -> Load:
        """The load of the children of `kind` not being removed, read as the operator reads its pods'."""
        if kind is Tier.BROKER:
            addresses = [b.endpoints["grpc"] for b in self.brokers if not b.draining]
            self.broker_channels.prune(addresses)
            return await broker_load(addresses, self.access, self.broker_channels)
        return await proxy_load((p.endpoints["control"] for p in self.proxies if not p.draining), self.access,
                                channels=self.pusher.channels)

    async def _resize(self, kind: Tier, size: int) -> None:
        """Add or remove children of `kind`, one at a time, until there are `size` (or stopping)."""
        group = self.group(kind)
        while len(group) != size and not self.stopping.is_set():
            try:
                await (self.add(kind) if len(group) < size else self.remove(kind))
            except ChildFailed as exc:  # tried again after the next reading
                log.error("child_add_failed", child=kind, error=str(exc))
                return

    async def stop(self) -> None:
        self.stopping.set()
        for task in list(self._watchers):
            task.cancel()
        await asyncio.gather(*(c.stop() for c in self.readers))  # first: they publish what they read
        await asyncio.gather(*(c.stop() for c in self.children))
        await self.pusher.close()
        await self.broker_channels.close()

    def describe(self) -> dict[str, Any]:
        return {
            "credential_file": self.credential_file,
            "brokers": [{"grpc": b.endpoints["grpc"], "http": b.endpoints["http"]} for b in self.brokers],
            "proxies": [{"grpc": p.endpoints["grpc"], "http": p.endpoints["http"],
                         "control": p.endpoints["control"]} for p in self.proxies],
        } | ({"readers": [{"http": r.endpoints["http"]} for r in self.readers]} if self.readers else {}) | (
            {"operator": {"metrics": self.metrics_address}} if self.metrics_address else {})

    def table(self) -> str:
        rows = [("NAME", "GRPC", "HTTP", "CONTROL")]
        for c in self.children + self.readers:
            rows.append((c.name, c.endpoints.get("grpc", "-"), c.endpoints["http"], c.endpoints.get("control", "-")))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
        proxy = self.proxies[0].endpoints if self.proxies else {}
        broker = self.brokers[0].endpoints if self.brokers else {}
        if proxy and broker:
            lines += ["", f"membership version {self.snapshot.version}; try:",
                      f"  neoplasma subscribe --proxy {proxy['http']} demo",
                      f"  neoplasma publish --broker {broker['grpc']} demo:hello '{{\"hi\": 1}}'",
                      f"control and Stats calls need the credential in {self.credential_file}:",
                      f"  grpcurl -plaintext -H \"authorization: Bearer $(cat {self.credential_file})\" ...",
                      *([f"the operator's metrics: http://{self.metrics_address}/metrics"] if self.metrics_address
                        else []),
                      "Ctrl-C stops everything."]
        return "\n".join(lines)


class UpService:
    """`neoplasma up` for neoplasma.core.lifecycle: the children started and announced as a table (or
    one JSON line); on a stop, the autoscaling loop ends (once a child being added or removed is up
    or gone), then every child is stopped."""

    kind = "up"

    def __init__(self, cluster: LocalCluster, as_json: bool, scaler: Autoscaler, sizes: tuple[int, int],
                 interval: float, metrics_port: int = 0) -> None:
        self.cluster, self.as_json, self.scaler, self.sizes, self.interval = cluster, as_json, scaler, sizes, interval
        self.metrics_port = metrics_port
        self.scaling: asyncio.Task[None] | None = None
        self.reconciling: asyncio.Task[None] | None = None
        self.stop_metrics: Callable[[], None] | None = None

    async def start(self) -> dict[str, Any]:
        try:
            await self.cluster.start()
        except ChildFailed:
            await self.cluster.stop()
            raise
        try:
            port, self.stop_metrics = operator_metrics.serve(self.metrics_port, self.cluster.metrics, "127.0.0.1")
        except OSError as exc:
            await self.cluster.stop()
            raise UsageError(f"--metrics-port {self.metrics_port}: cannot listen there ({exc.strerror}); "
                             "choose another port, or 0 for any free one") from None
        self.cluster.metrics_address = f"127.0.0.1:{port}"
        self.reconciling = asyncio.create_task(self.cluster.reconcile())
        if self.scaler.autoscaled():
            self.scaling = asyncio.create_task(self.cluster.autoscale(self.scaler, self.sizes, self.interval))
        return self.cluster.describe()

    def announce(self, fields: dict[str, Any]) -> None:
        print(json.dumps(fields) if self.as_json else self.cluster.table(), flush=True)

    async def quiesce(self) -> None:
        log.info("up_stopping")

    def deadline(self) -> None:
        return None  # adding or removing a child is bounded by READY_TIMEOUT and STOP_TIMEOUT

    async def drained(self) -> None:
        if self.scaling is not None:
            await self.scaling
        if self.reconciling is not None:
            await self.reconciling  # ends at once: the cluster is stopping

    def pending(self) -> dict[str, Any]:
        return {}

    async def close(self) -> dict[str, Any]:
        await self.cluster.stop()
        if self.stop_metrics is not None:
            await asyncio.to_thread(self.stop_metrics)
        return {"brokers": len(self.cluster.brokers), "proxies": len(self.cluster.proxies)}


async def _up(brokers: int, proxies: int, as_json: bool, scaler: Autoscaler, interval: float,
              credential_file: str, ingest: list[str] | None, proxy_args: list[str], workers: int,
              metrics_port: int) -> int:
    sizes = scaler.sizes(brokers, proxies)  # within the bounds, as the operator starts before any load is read
    cluster = LocalCluster(max(1, sizes[Tier.BROKER]), max(1, sizes[Tier.PROXY]), credential_file, ingest,
                           proxy_args, workers)
    up = UpService(cluster, as_json, scaler, (brokers, proxies), interval, metrics_port)
    return await serve(up, stop=cluster.stopping, announced=lambda _, fields: up.announce(fields))


def run_up(brokers: int, proxies: int, as_json: bool, annotations: dict[str, str] | None = None,
           interval: float = 5.0, credential_file: str = "", ingest: list[str] | None = None,
           proxy_args: list[str] | None = None, workers: int = 1, metrics_port: int = 0) -> int:
    """Run the local cluster; `annotations` are the NeoplasmaCluster autoscaling annotations, `ingest`
    the options of two `ingest-redis` readers (None: no readers), `proxy_args` more options for every
    proxy (private topics), `workers` each broker's and proxy's worker processes. Its cluster credential
    is read from
    `credential_file`, else a new random one (in a 0600 file removed at the end)."""
    if brokers < 1 or proxies < 1:
        raise UsageError("need at least one broker and one proxy")
    scaler = Autoscaler()
    scaler.read(annotations or {}, brokers, proxies)
    if scaler.errors:
        raise UsageError("\n".join(map(str, scaler.errors)))
    if credential_file:
        return asyncio.run(_up(brokers, proxies, as_json, scaler, interval, credential_file, ingest, proxy_args or [],
                               workers, metrics_port))
    fd, path = tempfile.mkstemp(prefix="neoplasma-credential-")  # mode 0600
    try:
        os.write(fd, secrets.token_urlsafe(32).encode() + b"\n")
        os.close(fd)
        return asyncio.run(_up(brokers, proxies, as_json, scaler, interval, path, ingest, proxy_args or [], workers,
                               metrics_port))
    finally:
        os.unlink(path)
