"""Membership convergence: how long from a broker change to every proxy running it.

Starts a real control plane (tests/kubeharness, binaries from scripts/k8s-control-plane.sh),
the stand-in kubelet running broker and proxy pods as real processes, and `neoplasma operator`
as a subprocess; then scales the brokers of one NeoplasmaCluster up and down by one, over and
over, and for each change measures

- scale up: the new broker pod turning Ready (seen on a pod watch) -> every ready proxy's
  Status RPC lists it among its links;
- scale down: the leaving broker pod being marked for deletion -> every ready proxy runs a
  membership where it is DRAINING or gone;

and records the operator's own `status.membership.lastConvergenceSeconds` beside it.

    python bench/membership_convergence.py [--changes 20] [--proxies 2]

prints median and worst and writes bench/results/membership_convergence.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import kubernetes.client
import kubernetes.watch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from dataplane import proxy_status  # noqa: E402
from kubeharness.controlplane import ControlPlane, wait_for  # noqa: E402
from kubeharness.kubelet import StandInKubelet  # noqa: E402
from test_operator_kube import GROUP, NEOPLASMA_PODS, PLURAL, VERSION, OperatorProcess, neoplasma_command  # noqa: E402

from neoplasma.wire.v1 import neoplasma_pb2 as pb  # noqa: E402

RESULTS = REPO / "bench" / "results" / "membership_convergence.json"
NAMESPACE = "bench"
NAME = "conv"


class PodClock:
    """Watches broker pods and notes (monotonic) when each turned Ready and was marked deleted."""

    def __init__(self, api: kubernetes.client.ApiClient) -> None:
        self.core = kubernetes.client.CoreV1Api(api)
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
                for event in watch.stream(self.core.list_namespaced_pod, NAMESPACE, label_selector=selector,
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
                time.sleep(0.2)

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


def ready_brokers(core: kubernetes.client.CoreV1Api) -> list[Any]:
    pods = core.list_namespaced_pod(
        NAMESPACE, label_selector=f"app.kubernetes.io/instance={NAME},app.kubernetes.io/component=broker").items
    return [p for p in pods if p.metadata.deletion_timestamp is None
            and any(c.type == "Ready" and c.status == "True" for c in p.status.conditions or [])]


def proxy_controls(core: kubernetes.client.CoreV1Api) -> list[str]:
    pods = core.list_namespaced_pod(
        NAMESPACE, label_selector=f"app.kubernetes.io/instance={NAME},app.kubernetes.io/component=proxy").items
    return [f"{p.status.pod_ip}:50052" for p in pods if p.metadata.deletion_timestamp is None
            and any(c.type == "Ready" and c.status == "True" for c in p.status.conditions or [])]


async def every_proxy(controls: list[str], check: Any, timeout: float = 30.0) -> tuple[float, int]:
    """Poll every proxy's Status until `check(status)` holds for all; (monotonic time, version)."""
    deadline = time.monotonic() + timeout
    while True:
        statuses = await asyncio.gather(*(proxy_status(c) for c in controls))
        if all(check(s) for s in statuses):
            return time.monotonic(), min(s.membership_version for s in statuses)
        if time.monotonic() > deadline:
            raise TimeoutError(f"proxies did not converge within {timeout} s")
        await asyncio.sleep(0.005)


def status_of(custom: kubernetes.client.CustomObjectsApi) -> dict[str, Any]:
    obj = custom.get_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, NAME)
    return dict(obj.get("status") or {})


def cluster_ready(custom: kubernetes.client.CustomObjectsApi, brokers: int) -> bool:
    status = status_of(custom)
    ready = any(c["type"] == "Ready" and c["status"] == "True" for c in status.get("conditions") or [])
    return ready and (status.get("membership") or {}).get("brokers") == brokers


async def run(changes: int, proxies: int, low: int) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="neoplasma-bench-"))
    plane = ControlPlane(crd_dir=REPO / "crds").start()
    api = plane.api_client()
    core = kubernetes.client.CoreV1Api(api)
    custom = kubernetes.client.CustomObjectsApi(api)
    core.create_namespace({"metadata": {"name": NAMESPACE}})
    plane.wait_for_default_service_account(NAMESPACE)
    kubelet = StandInKubelet(plane.kubeconfig_path, NAMESPACE, log_dir=work / "pods", label_selector=NEOPLASMA_PODS,
                             command_mapper=neoplasma_command, max_probe_period=0.1).start()
    operator = OperatorProcess(plane, work / "operator.log", [NAMESPACE]).wait_healthy()
    clock = PodClock(api).start()
    results: list[Change] = []
    try:
        custom.create_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, {
            "apiVersion": f"{GROUP}/{VERSION}", "kind": "NeoplasmaCluster", "metadata": {"name": NAME},
            "spec": {"brokers": {"replicas": low}, "proxies": {"replicas": proxies}},
        })
        wait_for(lambda: cluster_ready(custom, low), 90, f"cluster Ready with {low} brokers")
        brokers = low
        for index in range(changes):
            up = index % 2 == 0
            brokers += 1 if up else -1
            change = await one_change(index, up, brokers, core, custom, clock)
            results.append(change)
            print(f"{index + 1:3d} {change.direction:4s} {change.broker:40s} {change.seconds * 1000:7.1f} ms "
                  f"(operator: {change.operator_seconds}) v{change.version}", flush=True)
    finally:
        clock.stop()
        operator.stop()
        kubelet.stop()
        plane.stop()
    return summarise(results, proxies, low)


async def one_change(
    index: int,
    up: bool,
    brokers: int,
    core: kubernetes.client.CoreV1Api,
    custom: kubernetes.client.CustomObjectsApi,
    clock: PodClock,
) -> Change:
    """Scale to `brokers` and measure until every proxy has the broker that came or went."""
    before = {p.metadata.name for p in ready_brokers(core)}
    controls = proxy_controls(core)
    custom.patch_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, NAME,
                                          {"spec": {"brokers": {"replicas": brokers}}})
    if up:
        (broker,) = wait_for(lambda: {p.metadata.name for p in ready_brokers(core)} - before, 60, "a new broker")
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
    wait_for(lambda: cluster_ready(custom, brokers), 60, f"cluster Ready with {brokers} brokers")
    operator_seconds = (status_of(custom).get("membership") or {}).get("lastConvergenceSeconds")
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--changes", type=int, default=20, help="broker changes to measure (default 20)")
    parser.add_argument("--proxies", type=int, default=2, help="proxy pods (default 2)")
    parser.add_argument("--brokers", type=int, default=1, help="brokers before the first scale-up (default 1)")
    args = parser.parse_args()
    summary = asyncio.run(run(args.changes, args.proxies, args.brokers))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(summary, indent=2) + "\n")
    overall = summary["seconds"]
    print(f"\nmembership convergence over {overall['count']} changes, {args.proxies} proxies: "
          f"median {overall['median'] * 1000:.0f} ms, worst {overall['worst'] * 1000:.0f} ms "
          f"(up: median {summary['up_seconds']['median'] * 1000:.0f} ms; "
          f"down: median {summary['down_seconds']['median'] * 1000:.0f} ms; operator-reported median "
          f"{summary['operator_reported_seconds'].get('median', float('nan')) * 1000:.0f} ms)")
    print(f"written to {RESULTS.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
