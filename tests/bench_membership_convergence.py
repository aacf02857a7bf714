"""Membership convergence: how long from a broker change to every proxy running it.

On the real control plane (tests/kubeharness, binaries from scripts/k8s-control-plane.sh), with
the stand-in kubelet running broker and proxy pods as real processes and `neoplasma operator` as
a subprocess, scales the brokers of one NeoplasmaCluster up and down by one, over and over, and
for each change measures

- scale up: the new broker pod turning Ready (seen on a pod watch) -> every ready proxy's
  Status RPC lists it among its links;
- scale down: the leaving broker pod being marked for deletion -> every ready proxy runs a
  membership where it is DRAINING or gone;

and records the operator's own `status.membership.lastConvergenceSeconds` beside it.

    python -m pytest tests/bench_membership_convergence.py -s

(not collected by a plain `pytest`: the file name is not test_*.py) prints median and worst and
writes bench/results/membership_convergence.json. NEOPLASMA_BENCH_CHANGES (default 20),
NEOPLASMA_BENCH_PROXIES (2) and NEOPLASMA_BENCH_BROKERS (brokers before the first scale-up, 1)
change the run.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import kubernetes.client
import kubernetes.watch
import pytest
import test_operator_kube
from harness import proxy_status
from kubeharness.controlplane import wait_for
from kubeharness.kubelet import StandInKubelet
from test_operator_kube import NEOPLASMA_PODS, Clusters, OperatorProcess, neoplasma_command

from neoplasma.wire.v1 import neoplasma_pb2 as pb

pytestmark = [pytest.mark.kube, pytest.mark.timeout(1800)]

clusters = test_operator_kube.clusters  # fixtures
operator = test_operator_kube.operator

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results" / "membership_convergence.json"
NAME = "conv"


class PodClock:
    """Watches broker pods and notes (monotonic) when each turned Ready and was marked deleted."""

    def __init__(self, api: kubernetes.client.ApiClient, namespace: str) -> None:
        self.core = kubernetes.client.CoreV1Api(api)
        self.namespace = namespace
        self.ready_at: dict[str, float] = {}
        self.deleting_at: dict[str, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> PodClock:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        selector = f"app.kubernetes.io/instance={NAME},app.kubernetes.io/component=broker"
        while not self._stop.is_set():
            watch = kubernetes.watch.Watch()
            try:
                for event in watch.stream(self.core.list_namespaced_pod, self.namespace, label_selector=selector,
                                          timeout_seconds=2):
                    now = time.monotonic()
                    pod = event["object"]
                    name = pod.metadata.name
                    ready = any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or [])
                    with self._lock:
                        if ready and name not in self.ready_at:
                            self.ready_at[name] = now
                        if pod.metadata.deletion_timestamp is not None and name not in self.deleting_at:
                            self.deleting_at[name] = now
            except Exception:
                self._stop.wait(0.2)  # the watch failed: start another after a breath

    def when(self, table: str, name: str) -> float | None:
        with self._lock:
            return getattr(self, table).get(name)


@dataclass
class Change:
    index: int
    direction: str  # "up" | "down"
    broker: str
    brokers_after: int
    seconds: float  # pod Ready / marked deleted -> every proxy has it
    operator_seconds: float | None  # status.membership.lastConvergenceSeconds
    version: int


async def every_proxy(controls: list[str], check: Callable[[pb.ProxyStatus], bool],
                      timeout: float = 30.0) -> tuple[float, int]:
    """Poll every proxy's Status until `check(status)` holds for all; (monotonic time, version)."""
    deadline = time.monotonic() + timeout
    while True:
        statuses = await asyncio.gather(*(proxy_status(c) for c in controls))
        if all(check(s) for s in statuses):
            return time.monotonic(), min(s.membership_version for s in statuses)
        if time.monotonic() > deadline:
            raise TimeoutError(f"proxies did not converge within {timeout} s")
        await asyncio.sleep(0.005)  # polling as often as this is the measurement's resolution


def cluster_ready(clusters: Clusters, brokers: int) -> bool:
    return clusters.is_ready(NAME) and (clusters.status(NAME).get("membership") or {}).get("brokers") == brokers


async def test_membership_convergence(clusters: Clusters, operator: Callable[..., OperatorProcess],
                                      kubelet: Callable[..., StandInKubelet]) -> None:
    changes = int(os.environ.get("NEOPLASMA_BENCH_CHANGES", "20"))
    proxies = int(os.environ.get("NEOPLASMA_BENCH_PROXIES", "2"))
    low = int(os.environ.get("NEOPLASMA_BENCH_BROKERS", "1"))
    kubelet(NEOPLASMA_PODS, command_mapper=neoplasma_command, max_probe_period=0.1)
    operator()
    clock = PodClock(clusters.api, clusters.namespace).start()
    results: list[Change] = []
    try:
        clusters.apply(NAME, {"brokers": {"replicas": low}, "proxies": {"replicas": proxies}})
        wait_for(lambda: cluster_ready(clusters, low), 90, f"cluster Ready with {low} brokers")
        brokers = low
        for index in range(changes):
            up = index % 2 == 0
            brokers += 1 if up else -1
            change = await one_change(index, up, brokers, clusters, clock)
            results.append(change)
            print(f"{index + 1:3d} {change.direction:4s} {change.broker:40s} {change.seconds * 1000:7.1f} ms "
                  f"(operator: {change.operator_seconds}) v{change.version}", flush=True)
    finally:
        clock.stop()
    summary = summarise(results, proxies, low)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(summary, indent=2) + "\n")
    overall = summary["seconds"]
    print(f"\nmembership convergence over {overall['count']} changes, {proxies} proxies: "
          f"median {overall['median'] * 1000:.0f} ms, worst {overall['worst'] * 1000:.0f} ms "
          f"(up: median {summary['up_seconds']['median'] * 1000:.0f} ms; "
          f"down: median {summary['down_seconds'].get('median', float('nan')) * 1000:.0f} ms; operator-reported "
          f"median {summary['operator_reported_seconds'].get('median', float('nan')) * 1000:.0f} ms)")
    print(f"written to {RESULTS}")
    assert overall["count"] == changes


async def one_change(index: int, up: bool, brokers: int, clusters: Clusters, clock: PodClock) -> Change:
    """Scale to `brokers` and measure until every proxy has the broker that came or went."""
    before = {p.metadata.name for p in clusters.ready_pods(NAME, "broker")}
    controls = clusters.proxy_controls(NAME)
    clusters.patch_spec(NAME, {"brokers": {"replicas": brokers}})
    if up:
        (broker,) = wait_for(lambda: {p.metadata.name for p in clusters.ready_pods(NAME, "broker")} - before, 60,
                             "a new broker")
        started = wait_for(lambda: clock.when("ready_at", broker), 10, "the watch to see it Ready")

        def has_it(s: pb.ProxyStatus) -> bool:
            return broker in {link.name for link in s.links}

        done, version = await every_proxy(controls, has_it)
    else:
        broker = wait_for(lambda: [n for n in before if clock.when("deleting_at", n)], 30,
                          "a broker marked for deletion")[0]
        started = clock.when("deleting_at", broker) or 0.0

        def draining_or_gone(s: pb.ProxyStatus) -> bool:
            states = {link.name: link.member_state for link in s.links}
            return states.get(broker, pb.BrokerMember.State.DRAINING) == pb.BrokerMember.State.DRAINING

        done, version = await every_proxy(controls, draining_or_gone)
    wait_for(lambda: cluster_ready(clusters, brokers), 60, f"cluster Ready with {brokers} brokers")
    operator_seconds = (clusters.status(NAME).get("membership") or {}).get("lastConvergenceSeconds")
    return Change(index, "up" if up else "down", broker, brokers, round(done - started, 4), operator_seconds, version)


def summarise(results: list[Change], proxies: int, low: int) -> dict[str, Any]:
    def stats(values: list[float]) -> dict[str, float]:
        if not values:
            return {}
        ordered = sorted(values)
        return {"count": len(values), "median": round(statistics.median(ordered), 4),
                "p90": round(ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))], 4),
                "worst": round(ordered[-1], 4), "best": round(ordered[0], 4)}

    measured = [r.seconds for r in results]
    reported = [r.operator_seconds for r in results if r.operator_seconds is not None]
    return {
        "what": "broker pod Ready (up) / marked for deletion (down) -> every ready proxy applied it",
        "setup": {"proxies": proxies, "brokers": f"{low}<->{low + 1}", "cpus": os.cpu_count(),
                  "python": platform.python_version(), "kubernetes": "v1.20.2 (tests/kubeharness)",
                  "debounce_seconds": 0.2},
        "seconds": stats(measured),
        "up_seconds": stats([r.seconds for r in results if r.direction == "up"]),
        "down_seconds": stats([r.seconds for r in results if r.direction == "down"]),
        "operator_reported_seconds": stats([float(x) for x in reported]),
        "changes": [asdict(r) for r in results],
    }
