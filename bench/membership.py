"""Membership push at scale: the operator's real controller pushing to 1000 stand-in proxies.

The operator side is the real thing, in this process: a `ClusterController` (operator/controller.py)
with its steps, its `MembershipSync` and `MembershipPusher`, its debounce and read timeout at their
defaults, driven as kopf drives it (a pod change in the index, then `wake(pods=True)`); only the
Kubernetes API is a stand-in (`Api`: the credential Secret, and status writes recorded).

The proxies are stand-ins, one per loopback address 127.1.X.Y on the real control port (each pod
has its own IP, as in a cluster), served by `--standin-processes` processes with grpc.aio: each is
the proxy's own control server (`control_server`, the credential checked by its interceptor) and
its own `ControlServicer` (Apply, and ApplyStream, over which this tree's operator pushes; a `--before`
REF older than it has none, and its operator pushes with Apply) over an object whose `apply` calls
`Proxy.apply` (version checks, refusals and answers as a proxy gives them); only the relay links are
not opened. Behaviours:

- answering: answers at once;
- slow: answers every call (or message of a push's stream) after `--slow-seconds` (1 s);
- frozen: accepts the TCP connection and never answers (no HTTP/2 either).

Per scenario: the membership converged first, then `--changes` times a broker pod turns Ready; for
each answering proxy the time from the pod change being handed to the controller to the operator
holding that proxy's acknowledgement of the new version (debounce included): p50/p99/max over every
(change, proxy). Also: how often each frozen proxy was tried meanwhile, what `status.membership`
says (which proxies lag), the controller's passes, and which changes met the controller's read of
every proxy's Status (the Connections step's, every scale interval), with the p50/p99 of the others;
the operator process's garbage collections (pauses by generation).

    python bench/membership.py                      # 1000 proxies: all answering, then 5 % frozen + 5 % slow
    python bench/membership.py --proxies 200 --changes 3
    python bench/membership.py --gc cpython         # the operator's garbage collector as before settle_heap
    python bench/membership.py --before main --runs 3   # this tree and main's code, alternately, 3 runs each
    python bench/membership.py --standin-nice 10    # the stand-ins at nice 10: the operator first on the CPU

Both sides share this machine's cores: per change the table gives the operator's CPU and the stand-ins'
(a real proxy's control server does the same work on its own pod's CPU). With `--before REF`, each run
of this tree's code is followed by one of REF's (exported with `git archive`, first on PYTHONPATH, the
stand-ins too), each a process of its own running this script, and the load average is given per run.

Prints a table and writes JSON (bench/results/membership.json unless --json says otherwise).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import math
import os
import platform
import random
import secrets
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import psutil

from neoplasma.core.membership import EMPTY, Snapshot
from neoplasma.core.memory import settle_heap
from neoplasma.core.net import raise_fd_limit
from neoplasma.core.push import PushResult
from neoplasma.core.trust import Tokens
from neoplasma.operator import observe
from neoplasma.operator.controller import ClusterController
from neoplasma.operator.members import Controlled, PodView
from neoplasma.operator.observe import Indexes
from neoplasma.operator.render import COMPONENT_LABEL, CONTROL_PORT, CREDENTIAL_KEY, credential_secret_name
from neoplasma.operator.settings import Options
from neoplasma.operator.status import MAX_LAGGING
from neoplasma.proxy.server import ControlServicer, Proxy, control_server
from neoplasma.wire.v1 import neoplasma_pb2 as pb

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the test harness
from harness import trees

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "membership.json"
SCRIPT = str(Path(__file__).resolve())  # run again as a stand-in process
NAMESPACE, NAME, CLUSTER_UID = "bench", "mesh", "uid-bench-cluster"
ANSWERING, SLOW, FROZEN = "answering", "slow", "frozen"


# -- the stand-in proxies (a child process serves a share of them) ---------------------------


class _Links:
    """What `Proxy.apply` uses of the proxy's LinkSet: the applied snapshot and the links' states.
    No relay stream is opened (the brokers of this bench do not exist)."""

    def __init__(self) -> None:
        self.applied: Snapshot = EMPTY

    async def apply(self, snapshot: Snapshot) -> None:
        self.applied = snapshot

    def to_proto(self) -> list[pb.BrokerLink]:
        return [pb.BrokerLink(name=m.name, address=m.address, state=pb.BrokerLink.State.CONNECTED,
                              member_state=m.state.value, interest_synced=True) for m in self.applied.members]


class StandIn:
    """A proxy as its control port shows it: `apply` (after `delay`) and `_answer` are the proxy's own."""

    _answer = Proxy._answer

    def __init__(self, name: str, delay: float) -> None:
        self.name = name
        self.delay = delay
        self.links = _Links()
        self._apply_lock = asyncio.Lock()
        self.hub = _NoHub()

    async def apply(self, message: pb.Membership) -> pb.ApplyResponse:
        if self.delay:
            await asyncio.sleep(self.delay)
        return await Proxy.apply(self, message)  # type: ignore[arg-type]

    def status(self) -> pb.ProxyStatus:
        return pb.ProxyStatus(name=self.name, membership_version=self.links.applied.version,
                              links=self.links.to_proto())


class _NoHub:
    subscribers: dict[str, Any] = {}


class SlowServicer(ControlServicer):
    """The proxy's ControlServicer, answering every call `delay` seconds late (a push: its StandIn's apply)."""

    async def Status(self, request: pb.StatusRequest, context: Any) -> pb.ProxyStatus:  # noqa: N802
        await asyncio.sleep(self.proxy.delay)  # type: ignore[attr-defined]
        return await super().Status(request, context)


async def serve_standins(spec: dict[str, Any]) -> None:
    """Serve `spec["proxies"]` ([name, host, behaviour]) until stdin closes."""
    tokens = Tokens(given=[spec["credential"]])
    servers, frozen, held = [], [], []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)  # accepted; never read, never answered

    for name, host, behaviour in spec["proxies"]:
        if behaviour == FROZEN:
            frozen.append(await asyncio.start_server(hold, host, CONTROL_PORT, backlog=1024))
            continue
        delay = spec["slow_seconds"] if behaviour == SLOW else 0.0
        servicer = (SlowServicer if delay else ControlServicer)(StandIn(name, delay))  # type: ignore[arg-type]
        server = control_server(servicer, tokens)
        server.add_insecure_port(f"{host}:{CONTROL_PORT}")
        await server.start()
        servers.append(server)
    print(json.dumps({"ready": len(spec["proxies"])}), flush=True)
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    loop.add_reader(sys.stdin.fileno(), done.set)  # the bench closes our stdin (or dies): stop
    await done.wait()
    for s in frozen:
        s.close()
    await asyncio.gather(*(s.stop(None) for s in servers))


# -- the operator side -----------------------------------------------------------------------


class Api:
    """The Kubernetes API as the controller uses it: the credential Secret exists; writes recorded."""

    def __init__(self, credential: str) -> None:
        self.secrets = {credential_secret_name(NAME): {CREDENTIAL_KEY: credential}}
        self.statuses: list[dict[str, Any]] = []
        self.applied = 0

    def apply(self, manifest: dict[str, Any]) -> None:
        self.applied += 1

    def delete(self, kind: str, namespace: str, name: str) -> None:
        pass

    def read_secret(self, namespace: str, name: str) -> dict[str, str] | None:
        return self.secrets.get(name)

    def create_secret(self, manifest: dict[str, Any]) -> None:
        self.secrets.setdefault(manifest["metadata"]["name"], dict(manifest["stringData"]))

    def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> bool:
        self.statuses.append(json.loads(json.dumps(status)))
        return True

    def close(self) -> None:
        pass


def proxy_host(index: int) -> str:
    return f"127.1.{index // 250}.{index % 250 + 1}"


def deployment(uid: str, component: str) -> dict[str, Any]:
    suffix = "proxy" if component == "proxy" else "broker-0"
    return {"kind": "Deployment", "apiVersion": "apps/v1",
            "metadata": {"name": f"{NAME}-{suffix}", "namespace": NAMESPACE, "uid": uid,
                         "labels": {COMPONENT_LABEL: component},
                         "ownerReferences": [{"uid": CLUSTER_UID, "controller": True}]}}


def broker_pod(index: int) -> PodView:
    return PodView(NAMESPACE, NAME, "broker", f"{NAME}-broker-{index}", f"uid-b{index}", f"127.2.{index // 250}."
                   f"{index % 250 + 1}", True, owner="rs-broker")


class Recorder:
    """Wraps the controller's pusher (the real one): when each push ended, how, per proxy."""

    def __init__(self, controller: ClusterController, awaited: set[str], answering: set[str],
                 cpu: Callable[[], tuple[float, float]]) -> None:
        """`answering`: the proxies that answer at once (not slow), whose last acknowledgement of each version is
        when `cpu` (the operator's and the stand-ins' CPU-s so far) is read for `answered`."""
        self.acked: dict[tuple[str, int], float] = {}  # (proxy, version) -> monotonic time of the ack
        self.sent: dict[tuple[str, int], float] = {}  # (proxy, version) -> when its first push began
        self.awaited = awaited  # the proxies whose acknowledgements `everywhere` waits for
        self.answering = answering
        self.answered: dict[int, tuple[float, float]] = {}  # version -> `cpu` once every answering proxy acked it
        self._answering_counts: dict[int, int] = {}
        self._counts: dict[int, int] = {}
        self._everywhere: dict[int, asyncio.Event] = {}
        self.tries: dict[str, int] = {}
        self.failures: dict[str, int] = {}
        pusher = controller.steps.membership.sync.pusher
        push_one = pusher.push_one

        async def recorded(target: str, address: str, snapshot: Snapshot) -> PushResult:
            self.tries[target] = self.tries.get(target, 0) + 1
            self.sent.setdefault((target, snapshot.version), time.monotonic())
            result = await push_one(target, address, snapshot)
            if result.ok and (target, snapshot.version) not in self.acked:
                self.acked[target, snapshot.version] = time.monotonic()
                if target in self.answering:
                    count = self._answering_counts[snapshot.version] = self._answering_counts.get(
                        snapshot.version, 0) + 1
                    if count == len(self.answering):
                        self.answered[snapshot.version] = cpu()
                if target in self.awaited:
                    self._counts[snapshot.version] = self._counts.get(snapshot.version, 0) + 1
                    if self._counts[snapshot.version] == len(self.awaited):
                        self.everywhere(snapshot.version).set()
            else:
                self.failures[target] = self.failures.get(target, 0) + 1
            return result

        pusher.push_one = recorded  # type: ignore[method-assign]

    def everywhere(self, version: int) -> asyncio.Event:
        """Set once every awaited proxy acknowledged `version`."""
        return self._everywhere.setdefault(version, asyncio.Event())


class Reads:
    """When the controller read every proxy's Status (the Connections step's read, every scale interval):
    wraps observe's `proxy_statuses`, the real one, to say which changes met such a read; and what each read
    took: its seconds, the operator's CPU and the stand-ins' over it (a change's pushes meanwhile too)."""

    def __init__(self, standins: list[psutil.Process]) -> None:
        self.spans: list[tuple[float, float]] = []
        self.costs: list[tuple[float, float, float]] = []  # (seconds, operator CPU-s, stand-ins' CPU-s) per read
        read = observe.proxy_statuses

        def standins_cpu() -> float:
            return sum(sum(p.cpu_times()[:2]) for p in standins)

        async def recorded(*args: Any, **kwargs: Any) -> Any:
            index = len(self.spans)
            self.spans.append((time.monotonic(), float("inf")))  # under way (a frozen proxy holds it 2 s)
            cpu, others = time.process_time(), standins_cpu()
            try:
                return await read(*args, **kwargs)
            finally:
                self.spans[index] = (self.spans[index][0], time.monotonic())
                self.costs.append((self.spans[index][1] - self.spans[index][0], time.process_time() - cpu,
                                   standins_cpu() - others))

        self.original = read
        observe.proxy_statuses = recorded  # type: ignore[assignment]

    def met(self, start: float, end: float) -> bool:
        """Whether a read of the proxies' Status overlapped [start, end]."""
        return any(b <= end and e >= start for b, e in self.spans)

    def since(self, at: float) -> float | None:
        """Seconds from the start of the last read begun before `at` to `at` (None: none)."""
        began = [b for b, _ in self.spans if b <= at]
        return round(at - max(began), 3) if began else None

    def close(self) -> None:
        observe.proxy_statuses = self.original  # type: ignore[assignment]


class GcPauses:
    """The operator process's garbage collections (gc.callbacks): how long each held the event loop, by
    generation, and when, from `start` to `stop`."""

    def __init__(self) -> None:
        self.pauses: list[tuple[float, int, float, int]] = []  # (began, generation, seconds, objects collected)
        self._began = 0.0

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._began = time.perf_counter()
        else:
            self.pauses.append((self._began, info["generation"], time.perf_counter() - self._began, info["collected"]))

    def start(self) -> None:
        gc.callbacks.append(self._callback)

    def stop(self) -> None:
        gc.callbacks.remove(self._callback)

    def figures(self, seconds: float) -> dict[str, Any]:
        """Per generation: collections, per second, pause p50/p99/max (ms), total; and the pauses over 10 ms."""
        out: dict[str, Any] = {"seconds": round(seconds, 1), "tracked_objects_after": len(gc.get_objects()),
                               "frozen_objects": gc.get_freeze_count(), "thresholds": gc.get_threshold()}
        for generation in range(3):
            ms = [1000 * p[2] for p in self.pauses if p[1] == generation]
            out[f"gen{generation}"] = {"collections": len(ms), "per_second": round(len(ms) / seconds, 2),
                                       "p50_ms": round(pct(ms, 50), 2), "p99_ms": round(pct(ms, 99), 2),
                                       "max_ms": round(max(ms), 1) if ms else None, "total_ms": round(sum(ms))}
        long = [1000 * p[2] for p in self.pauses if p[2] > 0.010]
        out["over_10ms"] = {"count": len(long), "total_ms": round(sum(long))}
        return out


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))] if ordered else float("nan")


async def start_standins(plan: list[tuple[str, str, str]], processes: int, credential: str,
                         slow_seconds: float, nice: int = 0) -> list[subprocess.Popen[bytes]]:
    children = []
    for k in range(processes):
        share = plan[k::processes]
        spec = {"proxies": share, "credential": credential, "slow_seconds": slow_seconds}
        child = subprocess.Popen([sys.executable, SCRIPT, "--serve", json.dumps(spec)],  # noqa: ASYNC220
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 preexec_fn=(lambda: os.nice(nice)) if nice else None)
        children.append(child)
    for child in children:
        assert child.stdout is not None
        line = await asyncio.to_thread(child.stdout.readline)
        if not line:
            raise RuntimeError("a stand-in process did not start (see its stderr above)")
    return children


def stop_standins(children: list[subprocess.Popen[bytes]]) -> None:
    for child in children:
        with contextlib.suppress(OSError):
            assert child.stdin is not None
            child.stdin.close()
    for child in children:
        try:
            child.wait(10)
        except subprocess.TimeoutExpired:
            child.send_signal(signal.SIGKILL)
            child.wait()


async def wait_until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout} s")
        await asyncio.sleep(0.005)  # polling every 5 ms is the resolution of the waits, not of the figures


async def scenario(name: str, args: argparse.Namespace, frozen_share: float, slow_share: float) -> dict[str, Any]:
    n = args.proxies
    rng = random.Random(7)
    order = list(range(n))
    rng.shuffle(order)
    n_frozen, n_slow = round(n * frozen_share), round(n * slow_share)
    behaviour = {i: FROZEN for i in order[:n_frozen]} | {i: SLOW for i in order[n_frozen:n_frozen + n_slow]}
    names = [f"{NAME}-proxy-{i:04d}" for i in range(n)]
    kinds = {names[i]: behaviour.get(i, ANSWERING) for i in range(n)}
    plan = [(names[i], proxy_host(i), kinds[names[i]]) for i in range(n)]
    credential = secrets.token_urlsafe(24)
    children = await start_standins(plan, args.standin_processes, credential, args.slow_seconds, args.standin_nice)
    try:
        return await drive(name, args, names, kinds, credential, [psutil.Process(c.pid) for c in children])
    finally:
        stop_standins(children)


async def drive(name: str, args: argparse.Namespace, names: list[str], kinds: Mapping[str, str],
                credential: str, standins: list[psutil.Process]) -> dict[str, Any]:
    key = (NAMESPACE, NAME)
    proxies = [PodView(NAMESPACE, NAME, "proxy", names[i], f"uid-{names[i]}", proxy_host(i), True, owner="rs-proxy")
               for i in range(len(names))]
    brokers = [broker_pod(0), broker_pod(1)]
    pods: dict[tuple[str, str], list[PodView]] = {key: [*brokers, *proxies]}
    children = {key: [deployment("d-proxy", "proxy"), deployment("d-broker", "broker")]}
    replicasets = {key: [Controlled("rs-proxy", "d-proxy", 1), Controlled("rs-broker", "d-broker", 1)]}
    body = {"apiVersion": "neoplasma.io/v1alpha1", "kind": "NeoplasmaCluster",
            "metadata": {"name": NAME, "namespace": NAMESPACE, "uid": CLUSTER_UID, "generation": 1,
                         "resourceVersion": "1"},
            "spec": {"brokers": {"replicas": 2}, "proxies": {"replicas": len(names)}}}
    api = Api(credential)
    options = Options(default_image="img:bench")  # the operator's defaults: debounce, read timeout, retries
    controller = ClusterController(key, body, Indexes(pods, [children], replicasets), api, options,  # type: ignore[arg-type]
                                   post=lambda event: None)
    answering = [p for p in names if kinds[p] != FROZEN]
    process = psutil.Process()

    def cpu() -> tuple[float, float]:
        return sum(process.cpu_times()[:2]), sum(sum(p.cpu_times()[:2]) for p in standins)

    recorder = Recorder(controller, set(answering), {p for p in names if kinds[p] == ANSWERING}, cpu)
    reads = Reads(standins)
    sync = controller.steps.membership.sync
    pauses = GcPauses()
    pauses.start()
    began = time.monotonic()
    controller.start()
    latencies: dict[str, list[float]] = {ANSWERING: [], SLOW: []}
    unread: list[float] = []  # the answering proxies' latencies in the rounds that met no Status read
    rounds: list[dict[str, Any]] = []
    try:
        await wait_until(lambda: sync.snapshot.version >= 1, 30, "the first membership")
        await asyncio.wait_for(recorder.everywhere(sync.snapshot.version).wait(), 60)
        for change in range(args.changes):
            await asyncio.sleep(args.gap)  # let the last change's retries and anti-entropy run as they would
            tries_before = {p: recorder.tries.get(p, 0) for p in names}
            cpu_before, standins_before = cpu()
            index = len(brokers)
            brokers.append(broker_pod(index))
            pods[key].insert(index, brokers[-1])  # the pod watch's index now has it Ready...
            seen = time.monotonic()
            controller.wake(pods=True)  # ...and the handler wakes the controller
            await wait_until(lambda: sync.snapshot.version > 0 and len(sync.snapshot.members) == len(brokers),
                             30, "the new snapshot")
            version = sync.snapshot.version
            await asyncio.wait_for(recorder.everywhere(version).wait(), 60)  # every answering proxy acknowledged
            spent = cpu()
            for p in answering:
                latencies[kinds[p]].append(recorder.acked[(p, version)] - seen)
            fast = [recorder.acked[(p, version)] - seen for p in answering if kinds[p] == ANSWERING]
            rounds.append({"version": version, "p50": round(pct(fast, 50), 4), "p99": round(pct(fast, 99), 4),
                           "max": round(max(fast), 4),
                           # when the pushes began (after the debounce): the first and the last one
                           "pushes_began": [round(min(recorder.sent[p, version] for p in answering) - seen, 4),
                                            round(max(recorder.sent[p, version] for p in answering) - seen, 4)],
                           # until every proxy but the frozen acknowledged (the slow ones: --slow-seconds and more)
                           "operator_cpu_seconds": round(spent[0] - cpu_before, 3),
                           "standins_cpu_seconds": round(spent[1] - standins_before, 3),
                           # until the answering ones (the change's p99) acknowledged
                           "operator_cpu_seconds_answering": round(recorder.answered[version][0] - cpu_before, 3),
                           "standins_cpu_seconds_answering": round(recorder.answered[version][1] - standins_before, 3),
                           "met_status_read": reads.met(seen, seen + max(fast)),
                           # its 1000 answers may still be taking the CPU when it ended just before the change
                           "status_read_began_before": reads.since(seen),
                           "pushes": sum(recorder.tries.get(p, 0) - tries_before[p] for p in names),
                           "frozen_tries": sum(recorder.tries.get(p, 0) - tries_before[p]
                                               for p in names if kinds[p] == FROZEN)})
            if not rounds[-1]["met_status_read"]:
                unread.extend(fast)
            print(f"  {name}: change {change + 1}: v{version} answering p50 {rounds[-1]['p50'] * 1000:.0f} ms "
                  f"p99 {rounds[-1]['p99'] * 1000:.0f} ms max {rounds[-1]['max'] * 1000:.0f} ms"
                  + (" (met a read of every proxy's Status)" if rounds[-1]["met_status_read"] else ""), flush=True)
        # What status and the metrics say once the frozen ones have been retried a while.
        await asyncio.sleep(options.sync_grace + 0.5)
        controller.wake()
        await wait_until(lambda: api.statuses, 10, "a status written")
        await asyncio.sleep(0.5)
    finally:
        await controller.stop()
        reads.close()
        pauses.stop()
    gc_figures = pauses.figures(time.monotonic() - began)
    print(f"  {name}: garbage collections: " + ", ".join(
        f"gen{g} {gc_figures[f'gen{g}']['collections']} (max {gc_figures[f'gen{g}']['max_ms']} ms)" for g in range(3))
        + f"; over 10 ms: {gc_figures['over_10ms']['count']}", flush=True)
    status = api.statuses[-1] if api.statuses else {}
    frozen = sorted(p for p in names if kinds[p] == FROZEN)
    registry = controller.metrics.registry
    labels = {"namespace": NAMESPACE, "cluster": NAME}
    synced = next((c for c in status.get("conditions", []) if c.get("type") == "MembershipSynced"), {})
    return {
        "scenario": name, "proxies": len(names),
        "answering": sum(1 for p in names if kinds[p] == ANSWERING), "slow": sum(1 for p in names if kinds[p] == SLOW),
        "frozen": len(frozen), "changes": args.changes,
        "seconds_to_ack": {kind: {"n": len(v), "p50": round(pct(v, 50), 4), "p99": round(pct(v, 99), 4),
                                  "max": round(max(v), 4) if v else None} for kind, v in latencies.items()},
        "rounds": rounds,
        "garbage_collections": gc_figures,
        # every read (a scenario's first makes what later ones reuse), the medians over those after the first
        "status_reads": {"n": len(reads.costs), "each": [[round(x, 3) for x in c] for c in reads.costs],
                         **{key: round(statistics.median(c[i] for c in reads.costs[1:]), 3)
                            if reads.costs[1:] else None for i, key in enumerate(
                                ("seconds", "operator_cpu_seconds", "standins_cpu_seconds"))}},
        "answering_without_status_read": {"rounds": sum(not r["met_status_read"] for r in rounds),
                                          "p50": round(pct(unread, 50), 4), "p99": round(pct(unread, 99), 4)},
        "frozen_tries_each": sorted({recorder.tries.get(p, 0) for p in frozen}),
        "status_membership": status.get("membership"),
        "status_condition": {k: (v[:300] + f"... ({len(v)} characters)" if isinstance(v, str) and len(v) > 300 else v)
                             for k, v in synced.items()},
        "status_bytes": len(json.dumps(status)),
        "status_lists_lagging": listed_lagging(status, frozen),
        "metrics": {"acknowledged": registry.get_sample_value("neoplasma_cluster_membership_acknowledged", labels),
                    "lagging": registry.get_sample_value("neoplasma_cluster_membership_lagging", labels),
                    "passes": registry.get_sample_value("neoplasma_operator_reconcile_duration_seconds_count",
                                                        {**labels, "result": "ok"}),
                    "pass_seconds": round(registry.get_sample_value(
                        "neoplasma_operator_reconcile_duration_seconds_sum", {**labels, "result": "ok"}) or 0, 2)},
    }


def listed_lagging(status: Mapping[str, Any], frozen: list[str]) -> bool | None:
    """Whether status.membership.lagging names frozen proxies only, as many as it may (None: none frozen)."""
    if not frozen:
        return None
    listed = (status.get("membership") or {}).get("lagging") or []
    return set(listed) <= set(frozen) and len(listed) == min(len(frozen), MAX_LAGGING)


def table(results: list[dict[str, Any]], label: str = "") -> str:
    """One row per scenario (per `tree` and run, for results of `--before`)."""
    lines = ["| code (load average) | scenario | proxies (answering/slow/frozen) | answering: p50 / p99 / max | "
             "slow: p50 / p99 | CPU per change: operator + stand-ins, until the answering acknowledged (until all "
             "but the frozen did) | frozen tries each | status lists lagging |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        def median(key: str, rounds: list[dict[str, Any]] = r["rounds"]) -> float:
            return float(statistics.median(x.get(key, math.nan) for x in rounds))  # nan: a JSON without it

        a, s = r["seconds_to_ack"][ANSWERING], r["seconds_to_ack"][SLOW]
        slow = f"{s['p50']:.3f} / {s['p99']:.3f} s" if s["n"] else "-"
        code = r.get("tree", label) + (f" ({r['load_average']:.1f})" if "load_average" in r else "")
        lines.append(f"| {code} | {r['scenario']} | {r['proxies']} ({r['answering']}/{r['slow']}/{r['frozen']}) | "
                     f"{a['p50']:.3f} / {a['p99']:.3f} / {a['max']:.3f} s | {slow} | "
                     f"{median('operator_cpu_seconds_answering'):.2f} + "
                     f"{median('standins_cpu_seconds_answering'):.2f} s "
                     f"({median('operator_cpu_seconds'):.2f} + {median('standins_cpu_seconds'):.2f} s) | "
                     f"{r['frozen_tries_each'] or '-'} | {r['status_lists_lagging'] if r['frozen'] else '-'} |")
    return "\n".join(lines)


async def side_by_side(args: argparse.Namespace, argv: list[str]) -> None:
    """`--before`: this script run `args.runs` times for this tree's code and for REF's, alternately, each in a
    process of its own; one table of them all."""
    codes = trees(args.before)
    rows: list[dict[str, Any]] = []
    for run in range(args.runs):
        for tree, env in codes.items():
            out = Path(args.json).with_suffix(f".{run}.{'before' if env else 'this'}.json")
            print(f"run {run + 1}, {tree}:", flush=True)
            child = await asyncio.create_subprocess_exec(sys.executable, SCRIPT, *argv, "--json", str(out),
                                                         env={**os.environ, **env})
            if await child.wait():
                raise RuntimeError(f"the run of {tree} failed (exit {child.returncode}); see its output above")
            report = json.loads(await asyncio.to_thread(out.read_text))
            rows += [{**r, "tree": tree, "run": run + 1, "load_average": report["machine"]["load_average"][0]}
                     for r in report["scenarios"]]
    print()
    print(table(rows))
    path = Path(args.json)
    await asyncio.to_thread(path.write_text, json.dumps({"before": args.before, "runs": rows}, indent=2) + "\n")
    print(f"written to {path}")


async def main(args: argparse.Namespace) -> None:
    raise_fd_limit()
    if args.gc == "settled":
        settle_heap("bench")  # as `neoplasma operator` does once started
    logging.getLogger("neoplasma").setLevel(logging.ERROR)  # 50 frozen proxies' push failures, each retry
    started = time.monotonic()
    results = []
    for name, frozen, slow in (("all answering", 0.0, 0.0),
                               (f"{args.frozen:.0%} frozen + {args.slow:.0%} slow", args.frozen, args.slow)):
        print(f"scenario: {name}", flush=True)
        results.append(await scenario(name, args, frozen, slow))
    report = {"what": "broker pod Ready handed to the operator's controller -> the operator holds each proxy's "
                      "acknowledgement of the new membership version (debounce included)",
              "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                          "load_average": os.getloadavg(), "memory_gib": round(psutil.virtual_memory().total / 2**30)},
              "settings": {"gc": args.gc, "debounce": Options.debounce, "read_timeout": Options.read_timeout,
                           "standin_processes": args.standin_processes, "standin_nice": args.standin_nice,
                           "slow_seconds": args.slow_seconds},
              "seconds": round(time.monotonic() - started, 1), "scenarios": results}
    print()
    print(table(results, "this run"))
    for r in results:
        print(f"{r['scenario']}: status.membership = {json.dumps(r['status_membership'])[:400]}")
        clear = r["answering_without_status_read"]
        print(f"  answering, the {clear['rounds']} changes that met no read of every proxy's Status: "
              f"p50 {clear['p50']:.3f} s, p99 {clear['p99']:.3f} s")
        reads = r["status_reads"]
        if reads["n"] > 1:
            print(f"  {reads['n']} reads of every proxy's Status: after the first, each {reads['seconds']:.3f} s, CPU "
                  f"{reads['operator_cpu_seconds']:.3f} s the operator's + {reads['standins_cpu_seconds']:.3f} s "
                  f"the stand-ins' (medians; the first: {reads['each'][0]})")
        condition = r["status_condition"]
        print(f"  MembershipSynced: {condition.get('reason')}: {str(condition.get('message'))[:200]}"
              f"; status {r['status_bytes']} bytes; metrics {r['metrics']}")
    path = Path(args.json)
    await asyncio.to_thread(path.parent.mkdir, parents=True, exist_ok=True)
    await asyncio.to_thread(path.write_text, json.dumps(report, indent=2) + "\n")
    print(f"written to {path}")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--proxies", type=int, default=1000, help="stand-in proxies (default 1000)")
    p.add_argument("--changes", type=int, default=5, help="membership changes measured per scenario (default 5)")
    p.add_argument("--frozen", type=float, default=0.05, help="share of proxies frozen in the second scenario")
    p.add_argument("--slow", type=float, default=0.05, help="share of proxies slow in the second scenario")
    p.add_argument("--slow-seconds", type=float, default=1.0, help="how late a slow proxy answers (default 1 s)")
    p.add_argument("--gap", type=float, default=1.0, help="seconds between changes (default 1)")
    p.add_argument("--gc", choices=("settled", "cpython"), default="settled",
                   help="the operator's garbage collector: settled as `neoplasma operator` settles it once started "
                        "(core.memory.settle_heap), or CPython's defaults (what the operator ran with before)")
    p.add_argument("--standin-processes", type=int, default=2, help="processes serving the stand-ins (default 2)")
    p.add_argument("--standin-nice", type=int, default=0, metavar="N", choices=range(20),
                   help="run the stand-ins' processes at nice N (0-19): the operator first on the shared cores")
    p.add_argument("--before", metavar="REF", help="also run git revision REF's code, alternately with this tree's")
    p.add_argument("--runs", type=int, default=1, help="with --before: runs of each (default 1)")
    p.add_argument("--json", default=str(RESULTS),
                   help=f"where to write the JSON (default {RESULTS.relative_to(ROOT)})")
    p.add_argument("--serve", help=argparse.SUPPRESS)  # a stand-in child process
    args = p.parse_args(argv)
    if not args.serve and not 1 <= args.proxies <= 62500:
        p.error("--proxies must be 1..62500 (one loopback address 127.1.X.Y each)")
    return args


def without_side_by_side(argv: list[str]) -> list[str]:
    """`argv` less --before, --runs and --json (a run of `side_by_side` is given its own)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--before", "--runs", "--json"):
            skip = True
        elif not arg.startswith(("--before=", "--runs=", "--json=")):
            out.append(arg)
    return out


if __name__ == "__main__":
    arguments = parse()
    if arguments.serve:
        import uvloop  # the proxy's loop

        raise_fd_limit()
        uvloop.run(serve_standins(json.loads(arguments.serve)))
    elif arguments.before:
        asyncio.run(side_by_side(arguments, without_side_by_side(sys.argv[1:])))
    else:
        asyncio.run(main(arguments))
