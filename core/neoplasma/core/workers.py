"""Every core of a pod: `--workers N` worker processes serving one server's ports.

The process started as `neoplasma proxy|broker --workers N` (N > 1) becomes a supervisor: it
reserves the server's TCP ports, starts N copies of itself as workers that bind the same ports
with SO_REUSEPORT (the kernel spreads connections over them), restarts a worker that dies (with
backoff), and on SIGTERM passes the signal to every worker and waits for them to drain. Each
worker also serves on private unix sockets in a 0700 folder of the supervisor's (its `control`
gRPC server, and its HTTP app for /metrics): through them the supervisor relays what concerns
the pod as a whole and any worker gathers pod-wide figures (`sum_expositions`). With N = 1 there
is no supervisor: the process serves as it always has.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import multiprocessing
import os
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from neoplasma.core.backoff import Backoff, BackoffPolicy
from neoplasma.core.logs import get_logger
from neoplasma.core.net import PARENT_PID_ENV, HttpServer

log = get_logger("workers")

# In a worker's environment: "INDEX/COUNT/FOLDER" (its place among the pod's workers, and where
# their private sockets are).
WORKER_ENV = "NEOPLASMA_WORKER"
RESTART = BackoffPolicy(initial=0.2, maximum=10.0)
T = TypeVar("T")


# -- how many: the CPUs this process may use ------------------------------------------------


def usable_cpus(affinity: int, cpu_max: str | None = None, cfs_quota: str | None = None,
                cfs_period: str | None = None) -> int:
    """The CPUs a process may use: those it may run on (`affinity`), capped by a cgroup quota,
    given as cgroup v2's `cpu.max` ("max 100000", "150000 100000") or cgroup v1's
    `cpu.cfs_quota_us` (-1: none) and `cpu.cfs_period_us`. A fractional quota rounds down (as Go's
    automaxprocs does: a worker more than the quota only buys throttling); at least 1."""
    quota = period = 0
    if cpu_max is not None and cpu_max.split():
        parts = cpu_max.split()
        if parts[0] != "max" and len(parts) == 2:
            quota, period = int(parts[0]), int(parts[1])
    elif cfs_quota is not None and cfs_period is not None:
        quota, period = int(cfs_quota), int(cfs_period)
    cpus = affinity
    if quota > 0 and period > 0:
        cpus = min(cpus, math.floor(quota / period))
    return max(1, cpus)


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def cpus_now() -> int:
    """`usable_cpus` of this process, read from its affinity and its (container's) cgroup."""
    return usable_cpus(len(os.sched_getaffinity(0)), _read("/sys/fs/cgroup/cpu.max"),
                       _read("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"), _read("/sys/fs/cgroup/cpu/cpu.cfs_period_us"))


# -- a worker's view ------------------------------------------------------------------------


@dataclass(frozen=True)
class Place:
    """A worker's place in its pod: its index, how many workers there are, their sockets' folder."""

    index: int
    count: int
    folder: str

    @staticmethod
    def here() -> Place | None:
        """This process's place, when it is a worker."""
        value = os.environ.get(WORKER_ENV)
        if not value:
            return None
        index, count, folder = value.split("/", 2)
        return Place(int(index), int(count), folder)

    def control(self, index: int | None = None) -> str:
        """The gRPC address of worker `index`'s (default: this one's) private control server."""
        return f"unix:{self.folder}/control-{self.index if index is None else index}.sock"

    def http(self, index: int | None = None) -> str:
        """The path of worker `index`'s (default: this one's) private HTTP socket."""
        return f"{self.folder}/http-{self.index if index is None else index}.sock"


# -- pod-wide figures -------------------------------------------------------------------------


class _Summed(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterable[Metric]:
        return self.families


Combine = Callable[[float, float], float]


def sum_expositions(texts: Iterable[str], combine: Mapping[str, Combine] | None = None) -> bytes:
    """Prometheus expositions of the pod's workers as one: each sample (name and labels) summed
    over the workers, except the families named in `combine`, which are combined as it says (`min`
    for the membership version every worker has applied, `max` for a count of distinct things
    several workers may each hold)."""
    combine = combine or {}
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            families.setdefault(family.name, family)
            mine = values.setdefault(family.name, {})
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                if key in mine:
                    kept = combine.get(family.name)
                    mine[key] = kept(mine[key], sample.value) if kept else mine[key] + sample.value
                else:
                    mine[key] = sample.value
    out = []
    for name, family in families.items():
        summed = Metric(name, family.documentation, family.type, family.unit)
        for (sample_name, labels), value in values[name].items():
            summed.add_sample(sample_name, dict(labels), value)
        out.append(summed)
    registry = CollectorRegistry()
    registry.register(_Summed(out))
    return generate_latest(registry)


async def metrics_body(place: Place | None, local: Callable[[], bytes],
                       combine: Mapping[str, Combine] | None = None) -> bytes:
    """What /metrics answers: this server's own metrics (`local()`), or a worker's pod's, summed."""
    return local() if place is None else await pod_metrics(place, combine)


async def serve_own_metrics(place: Place, local: Callable[[], bytes], header_timeout: float) -> HttpServer:
    """A worker's own /metrics on its private socket, for `pod_metrics`."""

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=local(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(place.http())  # left by a worker before this one
    sock.bind(place.http())
    sock.listen(64)
    sock.setblocking(False)
    server = HttpServer(app, sock, header_timeout)
    await server.start()
    return server


async def pod_metrics(place: Place, combine: Mapping[str, Combine] | None = None) -> bytes:
    """The pod's metrics: every worker's own /metrics (from its private socket), summed."""

    async def one(index: int) -> str:
        async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=place.http(index))) as session:
            async with session.get("http://worker/metrics", timeout=aiohttp.ClientTimeout(total=5)) as resp:
                return await resp.text()

    texts = await asyncio.gather(*(one(i) for i in range(place.count)), return_exceptions=True)
    return sum_expositions((t for t in texts if isinstance(t, str)), combine)


# -- CPU-bound work on other cores (a broker's checks) --------------------------------------------


class Offload:
    """Runs pure CPU-bound calls on `count` worker processes (none: every call runs inline).

    A call runs inline when every worker is busy, so the caller's own core is never idle; a
    broken pool (a worker killed) is replaced after a backoff, calls running inline meanwhile.
    """

    def __init__(self, count: int) -> None:
        self.count = count
        self.busy = 0
        self.restarts = 0
        self._backoff = Backoff(RESTART)
        self._pool = self._new_pool() if count > 0 else None
        self._replacing: asyncio.Task[None] | None = None

    def _new_pool(self) -> ProcessPoolExecutor:
        # spawn, not fork: the parent runs gRPC's threads and an event loop
        return ProcessPoolExecutor(self.count, mp_context=multiprocessing.get_context("spawn"))

    async def start(self) -> None:
        """Start every worker process now rather than on the first calls."""
        if self._pool is not None:
            loop = asyncio.get_running_loop()
            await asyncio.gather(*(loop.run_in_executor(self._pool, os.getpid) for _ in range(self.count)))

    def free(self) -> bool:
        return self._pool is not None and self.busy < self.count

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` in a worker when one is free, else inline."""
        pool = self._pool
        if pool is None or self.busy >= self.count:
            return fn(*args)
        self.busy += 1
        try:
            result = await asyncio.get_running_loop().run_in_executor(pool, fn, *args)
            self._backoff.succeeded()
            return result
        except BrokenProcessPool:
            if self._pool is pool:
                pool.shutdown(wait=False)
                self._pool = None
                self._replacing = asyncio.create_task(self._replace(self._backoff.failed(time.monotonic())))
            return fn(*args)
        finally:
            self.busy -= 1

    async def _replace(self, delay: float) -> None:
        log.warning("offload_worker_died", restart_in=round(delay, 2))
        await asyncio.sleep(delay)
        self._pool = self._new_pool()
        self.restarts += 1
        await self.start()

    def close(self) -> None:
        if self._replacing is not None:
            self._replacing.cancel()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


# -- the supervisor -----------------------------------------------------------------------------


@dataclass
class Worker:
    index: int
    backoff: Backoff = field(default_factory=lambda: Backoff(RESTART))
    proc: asyncio.subprocess.Process | None = None
    endpoints: dict[str, str] = field(default_factory=dict)
    restarts: int = 0
    life: int = 0  # counts its starts: a channel to an earlier life is not reused (it may be in reconnect backoff)


class Supervisor:
    """Runs `count` workers of `argv` (the command line of one worker: `python -m neoplasma TIER ...`),
    restarting any that dies; `started(worker)` runs each time one is serving."""

    def __init__(self, argv: list[str], count: int, started: Callable[[Worker], Awaitable[None]] | None = None,
                 ) -> None:
        self.argv, self.count, self.started = argv, count, started
        self._dir = tempfile.TemporaryDirectory(prefix="neoplasma-workers-")  # 0700
        self.folder = self._dir.name
        self.workers = [Worker(i) for i in range(count)]
        self.stopping = False
        self._watch: list[asyncio.Task[None]] = []

    def place(self, index: int) -> Place:
        return Place(index, self.count, self.folder)

    async def start(self) -> None:
        """Start every worker; return once all are serving."""
        await asyncio.gather(*(self._spawn(w) for w in self.workers))
        self._watch = [asyncio.create_task(self._keep(w)) for w in self.workers]

    async def _spawn(self, worker: Worker) -> None:
        env = {**os.environ, WORKER_ENV: f"{worker.index}/{self.count}/{self.folder}", PARENT_PID_ENV: str(os.getpid())}
        proc = await asyncio.create_subprocess_exec(*self.argv, stdout=asyncio.subprocess.PIPE, env=env)
        worker.proc = proc
        worker.life += 1
        assert proc.stdout is not None
        line = await proc.stdout.readline()  # its `announce`, once serving (nothing when it failed)
        if not line:
            await proc.wait()
            raise WorkerFailed(f"worker {worker.index} exited with {proc.returncode} before serving")
        worker.endpoints = json.loads(line)["serving"]
        if self.started is not None:
            await self.started(worker)

    async def _keep(self, worker: Worker) -> None:
        """Restart `worker` whenever it exits, until stopping."""
        while True:
            assert worker.proc is not None
            code = await worker.proc.wait()
            worker.endpoints = {}  # not serving: nothing of it is ready until it is again
            if self.stopping:
                return
            delay = worker.backoff.failed(time.monotonic())
            log.warning("worker_exited", worker=worker.index, code=code, restart_in=round(delay, 2))
            await asyncio.sleep(delay)
            if self.stopping:
                return
            try:
                await self._spawn(worker)
                worker.restarts += 1
                worker.backoff.succeeded()
            except (WorkerFailed, OSError) as exc:
                log.warning("worker_restart_failed", worker=worker.index, error=str(exc))

    def terminate(self) -> None:
        """SIGTERM to every worker (each drains as a single server does); none is restarted."""
        self.stopping = True
        for proc in self.running():
            proc.send_signal(signal.SIGTERM)

    async def exited(self) -> None:
        """Return once every worker has exited."""
        await asyncio.gather(*(proc.wait() for proc in self.running()))

    async def close(self) -> None:
        """SIGKILL to the workers still running, then release the workers' folder."""
        for proc in self.running():
            proc.kill()
        await self.exited()
        for task in self._watch:
            task.cancel()
        self._dir.cleanup()

    def running(self) -> list[asyncio.subprocess.Process]:
        return [w.proc for w in self.workers if w.proc is not None and w.proc.returncode is None]


class WorkerFailed(RuntimeError):
    """A worker exited before serving."""


def worker_argv(tier: str, options: list[str]) -> list[str]:
    """The command line of one worker of `neoplasma TIER` with `options`."""
    return [sys.executable, "-m", "neoplasma", tier, *options]
