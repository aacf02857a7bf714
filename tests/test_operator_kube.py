"""The operator against a real control plane, with real brokers and proxies.

Each test runs `neoplasma operator` as a user would (a subprocess with KUBECONFIG), applies
NeoplasmaClusters with kubectl, and lets the stand-in kubelet run the pods it creates as real
broker and proxy processes on their own loopback addresses. Assertions are on what a user
sees: objects, status, events, and events delivered to subscribers.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import random
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import grpc
import kubernetes.client
import pytest
import yaml
from harness import (
    EventSource,
    Publisher,
    links_ready,
    proxy_status,
    publish_grpc,
    sse,
    stop_process,
    wait_for,
)
from kubeharness.controlplane import ControlPlane, free_port
from kubeharness.kubelet import StandInKubelet
from kubernetes.client.rest import ApiException
from prometheus_client.parser import text_string_to_metric_families

from neoplasma.core.resume import cluster_tag, parse_token
from neoplasma.core.trust import Access, Tokens
from neoplasma.operator.kube import Kube
from neoplasma.operator.status import MAX_LAGGING
from neoplasma.wire.v1 import neoplasma_pb2 as pb
from neoplasma.wire.v1 import neoplasma_pb2_grpc as pb_grpc

pytestmark = [pytest.mark.kube, pytest.mark.timeout(150)]

GROUP, VERSION, PLURAL = "neoplasma.io", "v1alpha1", "neoplasmaclusters"
NEOPLASMA_PODS = "app.kubernetes.io/name=neoplasma"
REPO = Path(__file__).resolve().parents[1]


# -- pieces (also used by tests/bench_membership_convergence.py) ------------------------------


def neoplasma_command(argv: list[str], container: Mapping[str, Any]) -> list[str]:
    """Run a pod's `neoplasma ...` command here, bound to the pod's own loopback address.

    Pods render `--host 0.0.0.0`, which under the stand-in kubelet would be every pod's
    address at once; argparse keeps the last `--host`, so the pod IP (from the downward API
    variable NEOPLASMA_POD_IP) is appended.
    """
    if argv[:1] != ["neoplasma"]:
        raise ValueError(f"container {container.get('name')} runs {argv}, not neoplasma")
    script = 'exec "$@" --host "$NEOPLASMA_POD_IP"'
    return ["/bin/sh", "-c", script, "sh", sys.executable, "-m", "neoplasma", *argv[1:]]


def get_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return str(response.read().decode())


class OperatorProcess:
    """`neoplasma operator` in a subprocess, with its log in a file."""

    def __init__(self, control_plane: ControlPlane, log_path: Path, namespaces: list[str],
                 extra_args: tuple[str, ...] = ()) -> None:
        self.liveness_port = free_port()
        self.log_path = log_path
        args = [sys.executable, "-m", "neoplasma", "operator", "--liveness-port", str(self.liveness_port),
                *extra_args]
        for namespace in namespaces:
            args += ["--namespace", namespace]
        with open(log_path, "ab") as log:
            self.process = subprocess.Popen(
                args, env=control_plane.env(), stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                stdin=subprocess.DEVNULL,
            )

    def healthy(self) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError(f"operator exited with {self.process.returncode}:\n{self.log()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.liveness_port}/healthz", timeout=2) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def wait_healthy(self, timeout: float = 30.0) -> OperatorProcess:
        deadline = time.monotonic() + timeout
        while not self.healthy():
            if time.monotonic() > deadline:
                raise TimeoutError(f"operator not healthy within {timeout} s:\n{self.log()[-3000:]}")
            time.sleep(0.1)
        return self

    def stop(self, timeout: float = 20.0) -> int:
        return stop_process(self.process, timeout=timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


class Clusters:
    """A test's view of NeoplasmaClusters and their children in one namespace."""

    def __init__(self, control_plane: ControlPlane, namespace: str) -> None:
        self.control_plane = control_plane
        self.namespace = namespace
        self.api = control_plane.api_client()
        self.core = kubernetes.client.CoreV1Api(self.api)
        self.apps = kubernetes.client.AppsV1Api(self.api)
        self.custom = kubernetes.client.CustomObjectsApi(self.api)

    def kubectl_apply(self, name: str, spec: dict[str, Any], annotations: Mapping[str, str] | None = None
                      ) -> subprocess.CompletedProcess[str]:
        metadata: dict[str, Any] = {"name": name, "namespace": self.namespace}
        if annotations:
            metadata["annotations"] = dict(annotations)
        manifest = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "NeoplasmaCluster", "metadata": metadata,
                    "spec": spec}
        return subprocess.run(["kubectl", "apply", "-f", "-"], input=yaml.safe_dump(manifest), text=True,
                              capture_output=True, env=self.control_plane.env(), timeout=60)

    def apply(self, name: str, spec: dict[str, Any], annotations: Mapping[str, str] | None = None) -> None:
        result = self.kubectl_apply(name, spec, annotations)
        assert result.returncode == 0, result.stderr

    def get(self, name: str) -> dict[str, Any]:
        obj: dict[str, Any] = self.custom.get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name)
        return obj

    def status(self, name: str) -> dict[str, Any]:
        return dict(self.get(name).get("status") or {})

    def condition(self, name: str, kind: str) -> dict[str, Any]:
        for condition in self.status(name).get("conditions") or []:
            if condition["type"] == kind:
                return dict(condition)
        return {}

    def is_ready(self, name: str) -> bool:
        return self.condition(name, "Ready").get("status") == "True"

    def patch_spec(self, name: str, spec: dict[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name, {"spec": spec})

    def annotate(self, name: str, annotations: Mapping[str, str | None]) -> None:
        """Set (None: remove) annotations of the resource."""
        self.custom.patch_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name,
                                                   {"metadata": {"annotations": dict(annotations)}})

    def events(self, name: str) -> list[Any]:
        return self.core.list_namespaced_event(
            self.namespace, field_selector=f"involvedObject.kind=NeoplasmaCluster,involvedObject.name={name}"
        ).items

    def children(self, name: str) -> dict[tuple[str, str], dict[str, Any]]:
        """Deployments, Services and PodDisruptionBudgets of cluster `name`, by (kind, name)."""
        selector = f"app.kubernetes.io/instance={name}"
        found: dict[tuple[str, str], dict[str, Any]] = {}
        lists = [
            ("Deployment", self.apps.list_namespaced_deployment(self.namespace, label_selector=selector).items),
            ("Service", self.core.list_namespaced_service(self.namespace, label_selector=selector).items),
        ]
        pdbs = self.custom.list_namespaced_custom_object(
            "policy", self.policy_version(), self.namespace, "poddisruptionbudgets", label_selector=selector)["items"]
        for kind, items in lists:
            for item in items:
                found[(kind, item.metadata.name)] = self.api.sanitize_for_serialization(item)
        for item in pdbs:
            found[("PodDisruptionBudget", item["metadata"]["name"])] = item
        return found

    def policy_version(self) -> str:
        groups = kubernetes.client.ApisApi(self.api).get_api_versions().groups
        [policy] = [g for g in groups if g.name == "policy"]
        return str(policy.preferred_version.version)

    def ready_pods(self, name: str, component: str) -> list[Any]:
        pods = self.core.list_namespaced_pod(
            self.namespace, label_selector=f"app.kubernetes.io/instance={name},app.kubernetes.io/component={component}"
        ).items
        return sorted(
            (p for p in pods if p.metadata.deletion_timestamp is None
             and any(c.type == "Ready" and c.status == "True" for c in p.status.conditions or [])),
            key=lambda p: p.metadata.name,
        )

    def access(self, name: str) -> Access:
        """How the operator reaches the cluster's control ports: the credential in its Secret."""
        data = self.core.read_namespaced_secret(f"{name}-credential", self.namespace).data
        return Access(Tokens(given=[base64.b64decode(data["credential"]).decode()]))

    def proxy_controls(self, name: str) -> list[str]:
        return [f"{p.status.pod_ip}:50052" for p in self.ready_pods(name, "proxy")]


async def membership_everywhere(clusters: Clusters, name: str, brokers: int, proxies: int) -> dict[str, Any]:
    """True-ish once the resource is Ready with `brokers` brokers in its membership and every
    one of the `proxies` ready proxies runs that version, linked to exactly the ready brokers."""
    status = clusters.status(name)
    membership = status.get("membership") or {}
    if not clusters.is_ready(name) or membership.get("brokers") != brokers or membership.get("acknowledged") != proxies:
        return {}
    broker_names = {p.metadata.name for p in clusters.ready_pods(name, "broker")}
    controls = clusters.proxy_controls(name)
    if len(broker_names) != brokers or len(controls) != proxies:
        return {}
    for control in controls:
        reply = await proxy_status(control, clusters.access(name))
        if reply.membership_version != membership["version"] or {link.name for link in reply.links} != broker_names:
            return {}
    return status


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture
def clusters(control_plane: ControlPlane, namespace: str) -> Clusters:
    return Clusters(control_plane, namespace)


@pytest.fixture
def operator(
    control_plane: ControlPlane, namespace: str, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[..., OperatorProcess]]:
    """`operator()` starts `neoplasma operator --namespace NS` (`operator(all_namespaces=True)`:
    no flag) and waits until its liveness endpoint answers; stopped after the test."""
    started: list[OperatorProcess] = []

    def start(all_namespaces: bool = False, extra_args: tuple[str, ...] = ()) -> OperatorProcess:
        process = OperatorProcess(control_plane, tmp_path / "operator.log", [] if all_namespaces else [namespace],
                                  extra_args)
        started.append(process)
        return process.wait_healthy()

    yield start
    for process in started:
        process.stop()
    if getattr(request.node, "kubeharness_call_failed", False) and started:
        print(f"----- operator log (last 60 lines)\n{chr(10).join(started[-1].log().splitlines()[-60:])}")


@pytest.fixture
def pods(kubelet: Callable[..., StandInKubelet]) -> StandInKubelet:
    """Runs the cluster's broker and proxy pods as real processes."""
    return kubelet(NEOPLASMA_PODS, command_mapper=neoplasma_command, max_probe_period=0.2)


# -- tests ------------------------------------------------------------------------------------


async def test_applied_cluster_gets_its_children_becomes_ready_and_delivers(
    clusters: Clusters, operator: Callable[..., OperatorProcess], pods: StandInKubelet
) -> None:
    operator()
    clusters.apply("demo", {"brokers": {"replicas": 2}, "proxies": {"replicas": 2}})

    status = await wait_for(lambda: membership_everywhere(clusters, "demo", 2, 2), 60, "cluster Ready, 2+2")

    uid = clusters.get("demo")["metadata"]["uid"]
    children = clusters.children("demo")
    assert sorted(children) == [
        ("Deployment", "demo-broker-0"), ("Deployment", "demo-proxy"),
        ("PodDisruptionBudget", "demo-broker"), ("PodDisruptionBudget", "demo-proxy"),
        ("Service", "demo-broker"), ("Service", "demo-proxy"),
    ]
    for (_, child), obj in children.items():
        labels = obj["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "neoplasma", child
        assert labels["app.kubernetes.io/instance"] == "demo", child
        assert labels["app.kubernetes.io/managed-by"] == "neoplasma-operator", child
        [owner] = obj["metadata"]["ownerReferences"]
        assert (owner["kind"], owner["name"], owner["uid"], owner["controller"]) == \
            ("NeoplasmaCluster", "demo", uid, True), child
    assert status["observedGeneration"] == 1
    assert status["brokers"] == {"desired": 2, "ready": 2}
    assert status["proxies"] == {"desired": 2, "ready": 2}
    assert status["deployments"] == [{"name": "demo-broker-0", "replicas": 2, "ready": 2}]
    assert status["membership"]["version"] >= 1
    assert status["membership"]["lastConvergenceSeconds"] >= 0
    assert status["membership"]["lagging"] == []  # (kept by the API server: the CRD's schema has it)
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["MembershipSynced"]["status"] == "True"
    assert conditions["SpecValid"]["status"] == "True"
    reasons = {(e.reason, e.message) for e in clusters.events("demo")}
    assert ("Created", "created Deployment demo-broker-0") in reasons

    # An event published to either broker reaches a subscriber of either proxy.
    brokers = [f"{p.status.pod_ip}:50051" for p in clusters.ready_pods("demo", "broker")]
    proxies = [p.status.pod_ip for p in clusters.ready_pods("demo", "proxy")]
    async with sse(f"{proxies[0]}:8080", "news") as first, sse(f"{proxies[1]}:8080", "news") as second:
        for ip in proxies:
            await wait_for(lambda ip=ip: links_ready(f"{ip}:50052", 2, clusters.access("demo")), 20,
                           f"proxy {ip} linked with interest")
        for index, broker in enumerate(brokers):
            await publish_grpc(broker, [("news:sport", {"from": index})])
        for client in (first, second):
            await wait_for(lambda client=client: len(client.events) >= 2, 20, "both events at both subscribers")
            assert sorted(e["data"]["from"] for e in client.events) == [0, 1]


async def test_scaling_and_replacing_brokers_reaches_every_proxy(
    clusters: Clusters, operator: Callable[..., OperatorProcess], pods: StandInKubelet
) -> None:
    metrics_port = free_port()
    operator(extra_args=("--metrics-port", str(metrics_port)))
    clusters.apply("demo", {"brokers": {"replicas": 1, "maxPerDeployment": 2}, "proxies": {"replicas": 2}})
    before = await wait_for(lambda: membership_everywhere(clusters, "demo", 1, 2), 60, "1 broker, 2 proxies")

    # Scaling up past maxPerDeployment adds a second broker Deployment.
    clusters.patch_spec("demo", {"brokers": {"replicas": 3}})
    grown = await wait_for(lambda: membership_everywhere(clusters, "demo", 3, 2), 60, "3 brokers everywhere")
    assert grown["membership"]["version"] > before["membership"]["version"]
    assert [d["name"] for d in grown["deployments"]] == ["demo-broker-0", "demo-broker-1"]
    assert grown["observedGeneration"] == 2

    # A deleted broker pod leaves the membership; its replacement joins.
    victim = clusters.ready_pods("demo", "broker")[0].metadata.name
    clusters.core.delete_namespaced_pod(victim, clusters.namespace)

    async def victim_gone_everywhere() -> bool:
        for control in clusters.proxy_controls("demo"):
            if victim in {link.name for link in (await proxy_status(control, clusters.access("demo"))).links}:
                return False
        return True

    await wait_for(victim_gone_everywhere, 30, f"{victim} out of every proxy's membership")
    replaced = await wait_for(lambda: membership_everywhere(clusters, "demo", 3, 2), 60, "replacement joined")
    assert replaced["membership"]["version"] > grown["membership"]["version"]
    assert victim not in {p.metadata.name for p in clusters.ready_pods("demo", "broker")}

    # Scaling down removes the broker Deployment no longer needed.
    clusters.patch_spec("demo", {"brokers": {"replicas": 2}})
    shrunk = await wait_for(lambda: membership_everywhere(clusters, "demo", 2, 2), 60, "2 brokers everywhere")
    assert [d["name"] for d in shrunk["deployments"]] == ["demo-broker-0"]
    await wait_for(lambda: ("Deployment", "demo-broker-1") not in clusters.children("demo"), 30,
                   "Deployment demo-broker-1 deleted")

    # A proxy that becomes ready is given the current membership.
    clusters.patch_spec("demo", {"proxies": {"replicas": 3}})
    await wait_for(lambda: membership_everywhere(clusters, "demo", 2, 3), 60, "a third proxy in sync")

    # The operator's metrics saw each membership change converge, and its passes.
    text = await asyncio.to_thread(get_text, f"http://127.0.0.1:{metrics_port}/metrics")
    families = list(text_string_to_metric_families(text))
    labels = {"namespace": clusters.namespace, "cluster": "demo"}
    values = {s.name: s.value for f in families for s in f.samples if s.labels in (labels, {**labels, "result": "ok"})}
    assert values["neoplasma_cluster_membership_convergence_seconds_count"] >= 4  # 1, 3, replaced, 2 brokers
    assert values["neoplasma_operator_reconcile_duration_seconds_count"] > 10
    assert (values["neoplasma_cluster_brokers_ready"], values["neoplasma_cluster_proxies_ready"]) == (2, 3)


def test_hand_edits_are_put_back_and_deleting_the_resource_deletes_children(
    control_plane: ControlPlane, clusters: Clusters, operator: Callable[..., OperatorProcess]
) -> None:
    operator(all_namespaces=True)  # no --namespace: every namespace
    clusters.apply("demo", {"brokers": {"replicas": 1}, "proxies": {"replicas": 1}})
    children = _sync_wait(lambda: len(clusters.children("demo")) == 6 and clusters.children("demo"), 30,
                          "6 children")
    service_uid = children[("Service", "demo-proxy")]["metadata"]["uid"]

    control_plane.kubectl("-n", clusters.namespace, "scale", "deployment/demo-broker-0", "--replicas=4")
    control_plane.kubectl("-n", clusters.namespace, "delete", "service/demo-proxy")
    _sync_wait(lambda: clusters.apps.read_namespaced_deployment("demo-broker-0", clusters.namespace)
               .spec.replicas == 1, 30, "replicas put back to 1")
    _sync_wait(lambda: clusters.core.read_namespaced_service("demo-proxy", clusters.namespace)
               .metadata.uid != service_uid, 30, "Service demo-proxy created again")
    # Events are posted by kopf after the change is made: wait for the one saying what was put back.
    updated = ("Updated", "updated Deployment demo-broker-0 (spec.replicas)")
    reasons = _sync_wait(lambda: (found := {(e.reason, e.message) for e in clusters.events("demo")}) and
                         updated in found and found, 10, "the Updated event")
    assert updated in reasons

    control_plane.kubectl("-n", clusters.namespace, "delete", "neoplasmacluster/demo", "--wait=true")
    _sync_wait(lambda: not clusters.children("demo"), 60, "children removed by the garbage collector")


async def test_proxies_keep_delivering_without_the_operator_and_versions_continue_after_restart(
    clusters: Clusters, operator: Callable[..., OperatorProcess], pods: StandInKubelet
) -> None:
    first = operator()
    clusters.apply("demo", {"brokers": {"replicas": 2}, "proxies": {"replicas": 1}})
    before = await wait_for(lambda: membership_everywhere(clusters, "demo", 2, 1), 60, "cluster Ready")
    assert first.stop() == 0

    brokers = [f"{p.status.pod_ip}:50051" for p in clusters.ready_pods("demo", "broker")]
    [proxy] = [p.status.pod_ip for p in clusters.ready_pods("demo", "proxy")]
    async with sse(f"{proxy}:8080", "news") as client:
        await wait_for(lambda: links_ready(f"{proxy}:50052", 2, clusters.access("demo")), 20,
                       "proxy linked with interest")
        for index, broker in enumerate(brokers):
            await publish_grpc(broker, [("news", {"from": index})])
        await wait_for(lambda: len(client.events) >= 2, 20, "events with the operator stopped")

    operator()

    async def newer_version_everywhere() -> dict[str, Any]:
        status = await membership_everywhere(clusters, "demo", 2, 1)
        return status if status and status["membership"]["version"] > before["membership"]["version"] else {}

    after = await wait_for(newer_version_everywhere, 60, "a higher membership version after the restart")
    assert after["membership"]["brokers"] == 2


class Endpoints:
    """What kube-proxy would route the proxy Service to: the endpoints controller's choice (ready
    pods not being deleted; the API server refuses the loopback pod IPs of the stand-in kubelet
    in real Endpoints), read every 0.1 s. `pick()` is one at random (the last known while none)."""

    def __init__(self, clusters: Clusters, name: str, port: int) -> None:
        self.clusters, self.name, self.port = clusters, name, port
        self.addresses: list[str] = []
        self._task = asyncio.create_task(self._watch())

    def _read(self) -> list[str]:
        return [f"{p.status.pod_ip}:{self.port}" for p in self.clusters.ready_pods(self.name, "proxy")]

    async def _watch(self) -> None:
        while True:
            with contextlib.suppress(ApiException):
                self.addresses = await asyncio.to_thread(self._read) or self.addresses
            await asyncio.sleep(0.1)

    def pick(self) -> str:
        return random.choice(self.addresses)

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(BaseException):
            await self._task


@pytest.mark.timeout(400)
async def test_a_proxy_rollout_under_load_loses_and_repeats_nothing(
    clusters: Clusters, operator: Callable[..., OperatorProcess], pods: StandInKubelet
) -> None:
    subscribers, per_second = 200, 200
    operator()
    clusters.apply("demo", {"brokers": {"replicas": 2}, "proxies": {"replicas": 2}})
    await wait_for(lambda: membership_everywhere(clusters, "demo", 2, 2), 60, "cluster Ready, 2+2")
    old = {p.metadata.name: f"{p.status.pod_ip}:50052" for p in clusters.ready_pods("demo", "proxy")}
    endpoints = Endpoints(clusters, "demo", 8080)
    await wait_for(lambda: len(endpoints.addresses) == 2, 30, "the proxy Service's endpoints")
    browsers = [EventSource(endpoints.pick, "t").start() for _ in range(subscribers)]

    async def subscribed(controls: list[str]) -> bool:
        return sum([(await proxy_status(c, clusters.access("demo"))).subscribers for c in controls]) == subscribers

    await wait_for(lambda: subscribed(list(old.values())), 60, "every subscriber connected")
    for control in old.values():
        await wait_for(lambda control=control: links_ready(control, 2, clusters.access("demo")), 20,
                       "proxies linked with interest")
    brokers = [f"{p.status.pod_ip}:50051" for p in clusters.ready_pods("demo", "broker")]
    publisher = Publisher(brokers).start(interval=0.05, batch=per_second // 20 // len(brokers))
    await wait_for(lambda: all(len(b.events) >= 100 for b in browsers), 60, "events flowing")

    # The rollout: a spec change gives the proxies a new pod template.
    rollout_started, sent_before = time.monotonic(), sum(publisher.sent)
    clusters.patch_spec("demo", {"proxies": {"resources": {"requests": {"cpu": "150m", "memory": "128Mi"}}}})

    async def rolled_out() -> bool:
        ready = {p.metadata.name: f"{p.status.pod_ip}:50052" for p in clusters.ready_pods("demo", "proxy")}
        names = {p.metadata.name for p in clusters.core.list_namespaced_pod(
            clusters.namespace, label_selector="app.kubernetes.io/component=proxy").items}
        return (len(ready) == 2 and not names & set(old) and names == set(ready)
                and await subscribed(list(ready.values())))

    await wait_for(rolled_out, 240, "both proxies replaced and every subscriber on the new ones", interval=0.5)
    rollout_seconds = time.monotonic() - rollout_started
    await asyncio.sleep(1.0)  # live traffic on the new proxies too
    await publisher.stop()
    published = sum(publisher.sent)
    with contextlib.suppress(AssertionError):  # the assertions below say what is missing
        await wait_for(lambda: all(publisher.all_received(b.events) for b in browsers), 60, "every event")
    await endpoints.close()
    for b in browsers:
        await b.close()

    lost = sum(max(0, published - len({(e["data"]["b"], e["data"]["n"]) for e in b.events})) for b in browsers)
    repeated = sum(len(b.events) - len({(e["data"]["b"], e["data"]["n"]) for e in b.events}) for b in browsers)
    reconnects = [c for b in browsers for c in b.connections]
    bounced = sum(1 for _, events in reconnects if events == 0)
    print(f"rollout: {rollout_seconds:.1f} s; {published} events x {subscribers} subscribers; lost {lost}, "
          f"repeated {repeated}; {len(reconnects)} reconnects, {bounced} answered by a draining proxy")
    for k, b in enumerate(browsers):
        assert set(b.statuses) == {200}, f"browser {k} got {b.statuses}: EventSource would have given up"
        assert not b.gaps, f"browser {k}: {b.gaps}"
        publisher.assert_exactly_once_in_order(b.events, f"browser {k}")
        assert len(b.statuses) >= 2  # each did move
    assert (lost, repeated) == (0, 0)
    # Traffic went on through the rollout (what the zeros above are about): at least a quarter of the publisher's
    # nominal rate (on a loaded machine its loop runs late; a publish stalled by the rollout would show here).
    assert published - sent_before >= per_second * rollout_seconds * 0.25
    # The operator names the cluster by its uid: the proxies' tokens are this cluster's (a version 2 token's
    # check names the cluster with the brokers' epochs: that each resumed with no gap above shows it matched).
    uid = clusters.get("demo")["metadata"]["uid"]
    assert all(parse_token(b.last_id, cluster_tag(uid)).version == 2 for b in browsers)
    # Endpoints first, then the drain: few reconnects reach a proxy that is going away.
    assert bounced <= subscribers // 10


@pytest.mark.parametrize(("spec", "complaint"), [
    ({"brokers": {"replicas": -1}}, "spec.brokers.replicas"),
    ({"brokers": {"replicas": "two"}}, "spec.brokers.replicas"),
    ({"proxies": {"service": {"type": "Headless"}}}, "spec.proxies.service.type"),
    ({"proxies": {"service": {"type": "NodePort", "nodePorts": {"sse": 80}}}}, "spec.proxies.service.nodePorts.sse"),
    ({"brokers": {"resources": {"requests": {"cpu": "lots"}}}}, "spec.brokers.resources.requests.cpu"),
])
def test_kubectl_apply_refuses_invalid_resources(clusters: Clusters, spec: dict[str, Any], complaint: str) -> None:
    result = clusters.kubectl_apply("bad", spec)
    assert result.returncode != 0
    assert complaint in result.stderr, result.stderr


def test_garbage_resource_gets_a_warning_and_a_condition_not_a_crash(
    clusters: Clusters, operator: Callable[..., OperatorProcess]
) -> None:
    process = operator()
    # Valid for the schema, not for the operator: node ports need a NodePort Service, and a name
    # this long leaves no room for the children's names.
    clusters.apply("odd", {"proxies": {"service": {"type": "ClusterIP", "nodePorts": {"sse": 30080}}}})
    long_name = "a-name-far-too-long-for-the-deployments-it-would-need"
    clusters.apply(long_name, {})

    for name, field in (("odd", "spec.proxies.service.nodePorts"), (long_name, "metadata.name")):
        _sync_wait(lambda name=name: clusters.condition(name, "SpecValid").get("status") == "False", 30,
                   f"SpecValid=False on {name}")
        spec_valid = clusters.condition(name, "SpecValid")
        assert spec_valid["reason"] == "InvalidSpec" and field in spec_valid["message"]
        assert clusters.condition(name, "Ready")["reason"] == "InvalidSpec"
        assert clusters.status(name)["observedGeneration"] == 1
        [warning] = _sync_wait(lambda name=name: [e for e in clusters.events(name) if e.reason == "InvalidSpec"],
                               30, f"an InvalidSpec event about {name}")
        assert warning.type == "Warning" and field in warning.message
        assert not clusters.children(name)

    # Fixed, it is run like any other; the operator never stopped and did not retry in between.
    clusters.patch_spec("odd", {"proxies": {"service": {"type": "NodePort"}}})
    _sync_wait(lambda: clusters.condition("odd", "SpecValid").get("status") == "True", 30, "SpecValid=True")
    _sync_wait(lambda: len(clusters.children("odd")) == 6, 30, "children of the fixed resource")
    assert process.healthy()
    [warning] = [e for e in clusters.events("odd") if e.reason == "InvalidSpec"]
    assert (warning.count or 1) == 1


def _sync_wait(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = condition()
        except ApiException as error:
            if error.status != 404:
                raise
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


async def answers(control: str, access: Access) -> bool:
    """Whether the proxy answers Status with `access`'s credential."""
    try:
        await proxy_status(control, access)
    except grpc.aio.AioRpcError:
        return False
    return True


def test_the_api_server_keeps_the_lagging_proxies_status_names_and_bounds_them(clusters: Clusters) -> None:
    """status.membership.lagging as the operator writes it (through its own Kube): kept by the CRD's
    schema as written, emptied by a later write, and at most MAX_LAGGING names."""
    clusters.apply("lag", {})
    kube = Kube(clusters.api)
    names = [f"lag-proxy-{i}" for i in range(MAX_LAGGING)]
    assert kube.patch_status(clusters.namespace, "lag", {"membership": {"version": 3, "acknowledged": 990,
                                                                          "lagging": names}})
    assert clusters.status("lag")["membership"]["lagging"] == names
    assert kube.patch_status(clusters.namespace, "lag", {"membership": {"lagging": []}})
    assert clusters.status("lag")["membership"] == {"version": 3, "acknowledged": 990, "lagging": []}
    with pytest.raises(kubernetes.client.ApiException) as refused:
        kube.patch_status(clusters.namespace, "lag", {"membership": {"lagging": [*names, "one-more"]}})
    assert refused.value.status == 422 and "lagging" in str(refused.value.body)


async def test_trust_on_the_control_plane(
    clusters: Clusters, operator: Callable[..., OperatorProcess], pods: StandInKubelet
) -> None:
    """Pushes without the credential are refused and change nothing; a stray pod with broker
    labels never becomes a member; the credential Secret is replaced while a subscriber stays
    connected; the NetworkPolicies are rendered (this control plane has no CNI enforcing them)."""
    operator()
    clusters.apply("demo", {"brokers": {"replicas": 1}, "proxies": {"replicas": 1}})
    before = await wait_for(lambda: membership_everywhere(clusters, "demo", 1, 1), 60, "cluster Ready, 1+1")
    [control] = clusters.proxy_controls("demo")
    [broker] = [f"{p.status.pod_ip}:50051" for p in clusters.ready_pods("demo", "broker")]
    secret = clusters.core.read_namespaced_secret("demo-credential", clusters.namespace)
    [owner] = secret.metadata.owner_references
    uid = clusters.get("demo")["metadata"]["uid"]
    assert (owner.kind, owner.uid, owner.controller) == ("NeoplasmaCluster", uid, True)
    assert len(base64.b64decode(secret.data["credential"])) >= 43  # 32 random bytes, url-safe

    # A push with no credential, or a wrong one, at a version far ahead: refused, nothing kept.
    forged = pb.Membership(version=2**40, brokers=[pb.BrokerMember(name="evil", address="10.9.9.9:1", state="SERVING")])
    async with grpc.aio.insecure_channel(control) as channel:
        for metadata in ((), (("authorization", "Bearer wrong"),)):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await pb_grpc.ProxyControlStub(channel).Apply(forged, timeout=5, metadata=metadata)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    status = await proxy_status(control, clusters.access("demo"))
    assert status.membership_version == before["membership"]["version"]
    assert {link.name for link in status.links} == {p.metadata.name for p in clusters.ready_pods("demo", "broker")}

    # A stray pod with the cluster's broker labels (no owner) runs and gets Ready: never a member.
    # (Not the ReplicaSet's selector, which would adopt an orphan: the labels the operator indexes.)
    labels = {"app.kubernetes.io/name": "neoplasma", "app.kubernetes.io/instance": "demo",
              "app.kubernetes.io/component": "broker"}
    stray = {"metadata": {"name": "stray-broker", "labels": dict(labels)}, "spec": {"containers": [{
        "name": "broker", "image": "x",
        "command": ["neoplasma", "broker", "--grpc-port", "50051", "--http-port", "8080"],
        "env": [{"name": "NEOPLASMA_POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
        "ports": [{"name": "http", "containerPort": 8080}, {"name": "grpc", "containerPort": 50051}],
        "readinessProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 1}}]}}
    clusters.core.create_namespaced_pod(clusters.namespace, stray)
    await wait_for(lambda: len(clusters.ready_pods("demo", "broker")) == 2, 30, "the stray pod Ready")
    clusters.apply("demo", {"brokers": {"replicas": 2}, "proxies": {"replicas": 1}})  # a new membership...
    own = await wait_for(lambda: {p.metadata.name for p in clusters.ready_pods("demo", "broker")} - {"stray-broker"}
                         if len(clusters.ready_pods("demo", "broker")) == 3 else None, 60, "a second own broker")

    async def linked_to_own() -> bool:
        status = await proxy_status(control, clusters.access("demo"))
        return clusters.status("demo").get("membership", {}).get("brokers") == 2 and \
            {link.name for link in status.links} == own
    await wait_for(linked_to_own, 30, "...of the cluster's own brokers only")
    clusters.core.delete_namespaced_pod("stray-broker", clusters.namespace, grace_period_seconds=0)
    await wait_for(lambda: len(clusters.ready_pods("demo", "broker")) == 2, 30, "the stray pod gone")

    # Rotation: replace the Secret; a subscriber stays connected, pushes go on with the new one.
    proxy_ip = control.rsplit(":", 1)[0]
    async with sse(f"{proxy_ip}:8080", "news") as subscriber:
        await wait_for(lambda: links_ready(control, 2, clusters.access("demo")), 20, "proxy linked with interest")
        old = clusters.access("demo")
        clusters.core.patch_namespaced_secret("demo-credential", clusters.namespace,
                                              {"stringData": {"credential": "rotated-credential"}})
        new = clusters.access("demo")
        assert new.metadata() != old.metadata()
        await wait_for(lambda: answers(control, new), 20, "the proxy taking the new credential")
        assert not await answers(control, old)
        clusters.apply("demo", {"brokers": {"replicas": 1}, "proxies": {"replicas": 1}})
        await wait_for(lambda: membership_everywhere(clusters, "demo", 1, 1), 60, "a push with the new credential")
        [broker] = [f"{p.status.pod_ip}:50051" for p in clusters.ready_pods("demo", "broker")]
        await wait_for(lambda: links_ready(control, 1, new), 20, "proxy linked to the broker")
        await publish_grpc(broker, [("news", {"after": "rotation"})])
        await wait_for(lambda: subscriber.events, 20, "the event on the connection opened before the rotation")
        assert [e["data"] for e in subscriber.events] == [{"after": "rotation"}]

    # NetworkPolicies: the Services' ports open, the control port only to the cluster's own pods
    # (and the operator's, when it runs in the cluster with the chart's labels).
    policies = {p.metadata.name: clusters.api.sanitize_for_serialization(p) for p in
                kubernetes.client.NetworkingV1Api(clusters.api).list_namespaced_network_policy(clusters.namespace).items}
    assert set(policies) == {"demo-broker", "demo-proxy"}
    proxy_rules = policies["demo-proxy"]["spec"]["ingress"]
    assert policies["demo-proxy"]["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "proxy"
    assert [sorted(p["port"] for p in rule["ports"]) for rule in proxy_rules] == [[8080, 50051], [50052]]
    assert proxy_rules[1]["from"] == [{"podSelector": {"matchLabels": {
        "app.kubernetes.io/name": "neoplasma", "app.kubernetes.io/instance": "demo"}}}]
    clusters.apply("demo", {"brokers": {"replicas": 1}, "proxies": {"replicas": 1},
                            "networkPolicies": {"enabled": False}})
    await wait_for(lambda: not kubernetes.client.NetworkingV1Api(clusters.api).list_namespaced_network_policy(
        clusters.namespace).items, 30, "NetworkPolicies deleted when turned off")
