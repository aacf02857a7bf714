"""End to end on kind: the image, the Helm chart and the examples, as a user runs them.

A kind cluster (e2e/kind-config.yaml maps the small example's proxy NodePorts 30080/30051 to
127.0.0.1) gets the image built from the Dockerfile (`kind load`), the chart installed with
`helm install`, and the examples applied. Then, from this machine: SSE and gRPC subscribers
through the NodePort receive events published to the brokers; load above the annotations'
thresholds adds brokers; a proxy rollout keeps subscribers served; deleting the clusters and
`helm uninstall` leave nothing behind.

Run with `e2e/run.sh` (or `python -m pytest e2e -v -rs`). Skipped, with the reason, where
Docker (a reachable engine), kind, kubectl or helm is missing. Environment:

- NEOPLASMA_E2E_CLUSTER: kind cluster name (default neoplasma-e2e). An existing cluster of
  that name is used as is (it must have been created with e2e/kind-config.yaml) and kept.
- NEOPLASMA_E2E_IMAGE: image to build and load (default neoplasma:e2e).
- NEOPLASMA_E2E_SKIP_BUILD=1: do not build; the image must exist in the local engine.
- NEOPLASMA_E2E_KEEP=1: keep a cluster this run created (for debugging).
- NEOPLASMA_HELM: helm binary (default: `helm` on PATH, then scripts/k8s-control-plane.sh's).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "charts" / "neoplasma-operator"
EXAMPLES = REPO / "examples"
KIND_CONFIG = REPO / "e2e" / "kind-config.yaml"
CLUSTER = os.environ.get("NEOPLASMA_E2E_CLUSTER", "neoplasma-e2e")
IMAGE = os.environ.get("NEOPLASMA_E2E_IMAGE", "neoplasma:e2e")
RELEASE = "neoplasma-operator"
OPERATOR_NAMESPACE = "neoplasma-system"
NAMESPACE = "neoplasma-e2e"
# The small example's fixed node ports, mapped to the host by e2e/kind-config.yaml.
SSE_URL = "http://127.0.0.1:30080"
GRPC_TARGET = "127.0.0.1:30051"
# gRPC channels share connections unless told not to; each publisher here is its own connection.
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]

T = TypeVar("T")


# -- what this machine has ------------------------------------------------------------------


def find_helm() -> str | None:
    cache = Path(os.environ.get("NEOPLASMA_K8S_CACHE", Path.home() / ".cache/neoplasma/k8s-v1.20.2"))
    for candidate in (os.environ.get("NEOPLASMA_HELM"), shutil.which("helm"), str(cache / "bin" / "helm")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def missing_tools() -> str | None:
    """Why this suite cannot run here, or None."""
    for tool in ("docker", "kind", "kubectl"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if find_helm() is None:
        return "helm is not installed (PATH, NEOPLASMA_HELM, or scripts/k8s-control-plane.sh)"
    try:
        info = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"],
                              capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "the Docker engine does not answer (`docker info` timed out)"
    if info.returncode != 0 or not info.stdout.strip():
        detail = (info.stderr.strip().splitlines() or ["no server version"])[-1]
        return f"no Docker engine is reachable (`docker info`: {detail})"
    return None


_WHY_NOT = missing_tools()
if _WHY_NOT is not None:
    pytest.skip(f"kind end-to-end suite skipped: {_WHY_NOT}", allow_module_level=True)

# Imported only where the suite runs: these need the project installed (pip install -e .[test]).
import aiohttp  # noqa: E402
import grpc  # noqa: E402

from neoplasma.plasma.v1 import stream_pb2, stream_pb2_grpc  # noqa: E402
from neoplasma.wire.v1 import neoplasma_pb2 as pb  # noqa: E402
from neoplasma.wire.v1 import neoplasma_pb2_grpc as pb_grpc  # noqa: E402

HELM = find_helm() or "helm"
pytestmark = pytest.mark.timeout(1800)


# -- commands -------------------------------------------------------------------------------


def run(*args: str, timeout: float = 600, check: bool = True, env: dict[str, str] | None = None,
        input: str | None = None) -> subprocess.CompletedProcess[str]:
    print(f"$ {' '.join(args)}", flush=True)
    result = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, env=env, input=input)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited with {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


def wait_for(condition: Callable[[], T], timeout: float, what: str, interval: float = 1.0) -> T:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = condition()
            if value:
                return value
        except Exception as error:
            last = error
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}") from last


@dataclass
class Kube:
    kubeconfig: Path

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "KUBECONFIG": str(self.kubeconfig)}

    def kubectl(self, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return run("kubectl", *args, env=self.env, **kwargs)

    def helm(self, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return run(HELM, *args, env=self.env, **kwargs)

    def get(self, kind: str, name: str = "", namespace: str = NAMESPACE, selector: str = "") -> Any:
        args = ["get", kind, *([name] if name else []), "-n", namespace, "-o", "json"]
        if selector:
            args += ["-l", selector]
        return json.loads(self.kubectl(*args).stdout)

    def cluster(self, name: str) -> dict[str, Any]:
        found: dict[str, Any] = self.get("neoplasmacluster", name)
        return found

    def condition(self, name: str, kind: str = "Ready") -> str | None:
        for condition in self.cluster(name).get("status", {}).get("conditions", []):
            if condition["type"] == kind:
                return str(condition["status"])
        return None

    def wait_ready(self, name: str, timeout: float = 300) -> None:
        try:
            wait_for(lambda: self.condition(name) == "True", timeout, f"NeoplasmaCluster {name} to be Ready")
        except TimeoutError:
            print(self.kubectl("get", "neoplasmacluster,deploy,pods,svc", "-n", NAMESPACE, "-o", "wide",
                               check=False).stdout)
            print(self.kubectl("logs", "-n", OPERATOR_NAMESPACE, f"deployment/{RELEASE}",
                               "--tail", "80", check=False).stdout)
            raise

    def ready_brokers(self, cluster: str) -> int:
        pods = self.get("pods", selector=f"app.kubernetes.io/instance={cluster},app.kubernetes.io/component=broker")
        return sum(1 for pod in pods["items"] if _pod_ready(pod) and "deletionTimestamp" not in pod["metadata"])

    def wait_rollout(self, deployment: str, timeout: float = 300) -> None:
        self.kubectl("rollout", "status", f"deployment/{deployment}", "-n", NAMESPACE, f"--timeout={int(timeout)}s",
                     timeout=timeout + 30)


def _pod_ready(pod: dict[str, Any]) -> bool:
    conditions = pod.get("status", {}).get("conditions", [])
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


@contextlib.contextmanager
def port_forward(kube: Kube, service: str, *ports: int) -> Iterator[dict[int, int]]:
    """`kubectl port-forward service/NAME :PORT...`: the local port of each remote port."""
    process = subprocess.Popen(
        ["kubectl", "port-forward", "-n", NAMESPACE, f"service/{service}", *(f":{p}" for p in ports)],
        env=kube.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    local: dict[int, int] = {}
    try:
        assert process.stdout is not None
        deadline = time.monotonic() + 30
        while len(local) < len(ports) and time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                break
            match = re.match(r"Forwarding from 127\.0\.0\.1:(\d+) -> (\d+)", line)
            if match:
                local[int(match.group(2))] = int(match.group(1))
        if len(local) < len(ports):
            raise AssertionError(f"kubectl port-forward to {service} did not start (got {local})")
        yield local
    finally:
        process.terminate()
        process.wait(timeout=10)


# -- clients, as users write them -----------------------------------------------------------


@dataclass
class SseSubscriber:
    """An SSE subscriber that reconnects as a browser's EventSource does (after `retry:`)."""

    topics: str
    events: list[dict[str, Any]] = field(default_factory=list)
    connects: int = 0
    failed_connects: int = 0
    _task: asyncio.Task[None] | None = None

    def start(self) -> SseSubscriber:
        self._task = asyncio.create_task(self._run())
        return self

    async def _run(self) -> None:
        retry = 1.0
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=5)) as session:
            while True:
                try:
                    async with session.get(f"{SSE_URL}/", params={"eventType": self.topics}) as response:
                        if response.status != 200:
                            self.failed_connects += 1
                        else:
                            self.connects += 1
                            async for raw in response.content:
                                line = raw.decode().rstrip("\n")
                                if line.startswith("data: "):
                                    self.events.append(json.loads(line[6:]))
                                elif line.startswith("retry: "):
                                    retry = int(line[7:]) / 1000
                except aiohttp.ClientError:
                    self.failed_connects += 1
                await asyncio.sleep(retry)

    def received(self, marker: str) -> bool:
        return any(event.get("data", {}).get("marker") == marker for event in self.events)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


@dataclass
class GrpcSubscriber:
    """plasma's gRPC stream client; reconnects and resubscribes when the stream ends."""

    topics: list[str]
    payloads: list[dict[str, Any]] = field(default_factory=list)
    connects: int = 0
    _task: asyncio.Task[None] | None = None

    def start(self) -> GrpcSubscriber:
        self._task = asyncio.create_task(self._run())
        return self

    async def _run(self) -> None:
        while True:
            try:
                async with grpc.aio.insecure_channel(GRPC_TARGET, options=OWN_CONNECTION) as channel:
                    call = stream_pb2_grpc.StreamServiceStub(channel).Events()
                    await call.write(stream_pb2.Request(Events=[stream_pb2.EventType(type=t) for t in self.topics]))
                    self.connects += 1
                    async for payload in call:
                        self.payloads.append(json.loads(payload.data))
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(1.0)

    def received(self, marker: str) -> bool:
        return any(p.get("marker") == marker for p in self.payloads)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


async def publish(target: str, topic: str, data: dict[str, Any], channel: grpc.aio.Channel | None = None) -> None:
    request = pb.PublishRequest(events=[pb.Event(topic=topic, data=json.dumps(data).encode())])
    if channel is not None:
        await pb_grpc.BrokerStub(channel).Publish(request, timeout=10)
        return
    async with grpc.aio.insecure_channel(target) as own:
        await pb_grpc.BrokerStub(own).Publish(request, timeout=10)


async def eventually(condition: Callable[[], bool], timeout: float, what: str,
                     tick: Callable[[], Any] | None = None) -> None:
    """Wait for `condition`, calling the coroutine function `tick` (e.g. a publish) each second."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        if tick is not None:
            with contextlib.suppress(grpc.aio.AioRpcError):
                await tick()
        await asyncio.sleep(1.0)


@contextlib.asynccontextmanager
async def subscribers(sse: int, grpc_streams: int, topic: str) -> AsyncIterator[list[Any]]:
    clients: list[Any] = [SseSubscriber(topic).start() for _ in range(sse)]
    clients += [GrpcSubscriber([topic]).start() for _ in range(grpc_streams)]
    try:
        yield clients
    finally:
        for client in clients:
            await client.close()


# -- the cluster, the image, the release ----------------------------------------------------


@pytest.fixture(scope="module")
def kube(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kube]:
    """The kind cluster (created unless it exists), with the image loaded."""
    existing = run("kind", "get", "clusters").stdout.split()
    created = CLUSTER not in existing
    if created:
        run("kind", "create", "cluster", "--name", CLUSTER, "--config", str(KIND_CONFIG), "--wait", "180s",
            timeout=900)
    try:
        kubeconfig = tmp_path_factory.mktemp("kind") / "kubeconfig"
        kubeconfig.write_text(run("kind", "get", "kubeconfig", "--name", CLUSTER).stdout)
        if os.environ.get("NEOPLASMA_E2E_SKIP_BUILD") != "1":
            run("docker", "build", "-t", IMAGE, str(REPO), timeout=1800)
        run("kind", "load", "docker-image", IMAGE, "--name", CLUSTER, timeout=900)
        yield Kube(kubeconfig)
    finally:
        if created and os.environ.get("NEOPLASMA_E2E_KEEP") != "1":
            run("kind", "delete", "cluster", "--name", CLUSTER, check=False, timeout=300)


@pytest.fixture(scope="module")
def release(kube: Kube) -> Iterator[str]:
    """`helm install` of the chart, with the image just loaded; uninstalled at the end."""
    repository, _, tag = IMAGE.rpartition(":")
    kube.helm(
        "install", RELEASE, str(CHART), "--namespace", OPERATOR_NAMESPACE, "--create-namespace",
        "--set", f"image.repository={repository}", "--set", f"image.tag={tag}",
        "--set", "image.pullPolicy=IfNotPresent", "--set", "logLevel=debug", "--wait", "--timeout", "5m",
        timeout=400,
    )
    kube.kubectl("create", "namespace", NAMESPACE, check=False)
    yield RELEASE
    kube.helm("uninstall", RELEASE, "--namespace", OPERATOR_NAMESPACE, "--wait", check=False, timeout=300)


@pytest.fixture(scope="module")
def small(kube: Kube, release: str) -> str:
    kube.kubectl("apply", "-n", NAMESPACE, "-f", str(EXAMPLES / "small.yaml"))
    kube.wait_ready("small")
    return "small"


# -- the tests, in the order a user goes -----------------------------------------------------


def test_operator_runs_from_the_chart(kube: Kube, release: str) -> None:
    deployment = kube.get("deployment", release, namespace=OPERATOR_NAMESPACE)
    assert deployment["status"].get("readyReplicas") == 1
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    assert container["image"] == IMAGE
    assert {"name": "NEOPLASMA_DEFAULT_IMAGE", "value": IMAGE} in container["env"]
    kube.helm("test", release, "--namespace", OPERATOR_NAMESPACE, "--logs", timeout=300)


def test_small_example_becomes_ready_with_the_default_image(kube: Kube, small: str) -> None:
    deployments = kube.get("deployments", selector=f"app.kubernetes.io/instance={small}")["items"]
    assert {d["metadata"]["name"] for d in deployments} == {"small-broker-0", "small-proxy"}
    for deployment in deployments:
        [container] = deployment["spec"]["template"]["spec"]["containers"]
        assert container["image"] == IMAGE
        assert deployment["status"].get("readyReplicas") == deployment["spec"]["replicas"]
    service = kube.get("service", "small-proxy")
    assert {p["name"]: p.get("nodePort") for p in service["spec"]["ports"]} == {"sse": 30080, "grpc": 30051}


def test_production_example_is_accepted(kube: Kube, release: str) -> None:
    """Applied as is; its resource requests may not fit a kind node, so only the operator's
    rendering is checked, not readiness."""
    kube.kubectl("apply", "-n", NAMESPACE, "-f", str(EXAMPLES / "production.yaml"))

    def rendered() -> bool:
        names = {d["metadata"]["name"]: d["spec"]["replicas"]
                 for d in kube.get("deployments", selector="app.kubernetes.io/instance=production")["items"]}
        return names == {"production-broker-0": 3, "production-proxy": 3}

    wait_for(rendered, 120, "the production example's Deployments")
    assert kube.get("service", "production-proxy")["spec"]["type"] == "LoadBalancer"
    kube.kubectl("delete", "-n", NAMESPACE, "-f", str(EXAMPLES / "production.yaml"), "--wait", timeout=300)


def test_sse_and_grpc_subscribers_receive_published_events(kube: Kube, small: str) -> None:
    async def scenario() -> None:
        topic = f"e2e:{uuid.uuid4().hex[:8]}"
        with port_forward(kube, f"{small}-broker", 50051) as local:
            broker = f"127.0.0.1:{local[50051]}"
            async with subscribers(sse=3, grpc_streams=3, topic=topic) as clients:
                marker = "hello"
                await eventually(lambda: all(c.received(marker) for c in clients), 90,
                                 "every SSE and gRPC subscriber to receive the event",
                                 tick=lambda: publish(broker, topic, {"marker": marker}))
                # A topic receives the events of the topics below it, and nothing else.
                await publish(broker, f"{topic}:child", {"marker": "child"})
                await publish(broker, "e2e:other", {"marker": "other"})
                await eventually(lambda: all(c.received("child") for c in clients), 30, "the child topic's event")
                assert not any(c.received("other") for c in clients)

    asyncio.run(scenario())


def test_load_above_the_annotations_adds_brokers(kube: Kube, small: str) -> None:
    """Annotate the small cluster with a low connection target; open more publisher
    connections than one broker should carry; the operator adds brokers up to max-brokers."""
    kube.kubectl(
        "annotate", "--overwrite", "-n", NAMESPACE, f"neoplasmacluster/{small}",
        "neoplasma.io/autoscale=true", "neoplasma.io/target-connections-per-broker=4",
        "neoplasma.io/min-brokers=1", "neoplasma.io/max-brokers=3", "neoplasma.io/scale-down-delay=30s",
    )
    assert kube.ready_brokers(small) == 1

    async def scenario() -> None:
        topic = f"e2e:{uuid.uuid4().hex[:8]}"
        with port_forward(kube, f"{small}-broker", 50051) as local:
            target = f"127.0.0.1:{local[50051]}"
            channels = [grpc.aio.insecure_channel(target, options=OWN_CONNECTION) for _ in range(12)]
            try:
                for channel in channels:
                    await asyncio.wait_for(channel.channel_ready(), 30)

                async def keep_publishing() -> None:
                    for index, channel in enumerate(channels):
                        await publish(target, topic, {"publisher": index}, channel=channel)

                await eventually(lambda: kube.ready_brokers(small) == 3, 300,
                                 "the autoscaler to add brokers up to max-brokers (3)", tick=keep_publishing)
            finally:
                for channel in channels:
                    await channel.close()

    asyncio.run(scenario())
    status = kube.cluster(small)["status"]
    assert status["brokers"]["desired"] == 3
    assert kube.get("deployment", f"{small}-broker-0")["spec"]["replicas"] == 3
    # The proxies learn every new broker through the membership push.
    wait_for(lambda: kube.cluster(small)["status"]["membership"]["brokers"] == 3, 60, "membership of 3 brokers")
    kube.wait_ready(small)


def test_proxy_rollout_keeps_subscribers_served(kube: Kube, small: str) -> None:
    """A spec change rolls the proxies out (one new proxy ready before an old one stops);
    subscribers told to reconnect find a ready proxy, and events keep arriving."""

    async def scenario() -> None:
        topic = f"e2e:{uuid.uuid4().hex[:8]}"
        with port_forward(kube, f"{small}-broker", 50051) as local:
            broker = f"127.0.0.1:{local[50051]}"
            async with subscribers(sse=10, grpc_streams=10, topic=topic) as clients:
                await eventually(lambda: all(c.received("before") for c in clients), 90, "events before the rollout",
                                 tick=lambda: publish(broker, topic, {"marker": "before"}))
                old_proxies = {p["metadata"]["name"] for p in kube.get(
                    "pods", selector=f"app.kubernetes.io/instance={small},app.kubernetes.io/component=proxy")["items"]}
                kube.kubectl("patch", "-n", NAMESPACE, f"neoplasmacluster/{small}", "--type", "merge", "-p",
                             json.dumps({"spec": {"proxies": {"resources": {"requests": {"cpu": "110m",
                                                                                        "memory": "128Mi"}}}}}))


                def proxy_template_changed() -> bool:
                    proxy = kube.get("deployment", f"{small}-proxy")
                    [container] = proxy["spec"]["template"]["spec"]["containers"]
                    return bool(container["resources"].get("requests", {}).get("cpu") == "110m")

                await asyncio.to_thread(wait_for, proxy_template_changed, 60, "the operator to update the proxies")
                # New subscribers keep being admitted while the rollout runs.
                probes = failures = 0
                rollout = asyncio.create_task(asyncio.to_thread(kube.wait_rollout, f"{small}-proxy"))
                async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
                    while not rollout.done():
                        probes += 1
                        try:
                            async with session.get(f"{SSE_URL}/", params={"eventType": topic}) as response:
                                failures += response.status != 200
                        except (TimeoutError, aiohttp.ClientError):
                            failures += 1
                        await asyncio.sleep(0.5)
                await rollout
                new_proxies = {p["metadata"]["name"] for p in kube.get(
                    "pods", selector=f"app.kubernetes.io/instance={small},app.kubernetes.io/component=proxy")["items"]}
                assert not old_proxies & new_proxies, "every proxy pod was replaced"
                assert probes > 0 and failures <= max(1, probes // 20), f"{failures} of {probes} connects failed"
                # Every subscriber, moved or not, is served by the new proxies.
                await eventually(lambda: all(c.received("after") for c in clients), 90, "events after the rollout",
                                 tick=lambda: publish(broker, topic, {"marker": "after"}))
                sse_clients = [c for c in clients if isinstance(c, SseSubscriber)]
                assert sum(c.connects for c in sse_clients) >= 2 * len(sse_clients) - 2, "SSE subscribers reconnected"

    asyncio.run(scenario())
    kube.wait_ready(small)


def test_deleting_clusters_and_uninstalling_cleans_up(kube: Kube, release: str) -> None:
    kube.kubectl("delete", "neoplasmaclusters", "--all", "-n", NAMESPACE, "--wait", "--timeout=180s", timeout=240)
    wait_for(lambda: not kube.get("deployments,services,poddisruptionbudgets",
                                  selector="app.kubernetes.io/name=neoplasma")["items"],
             180, "the clusters' Deployments, Services and PodDisruptionBudgets to be garbage-collected")
    kube.helm("uninstall", release, "--namespace", OPERATOR_NAMESPACE, "--wait", timeout=300)
    selector = f"app.kubernetes.io/instance={release}"
    for kind in ("deployments", "pods", "serviceaccounts", "roles", "rolebindings", "services"):

        def gone(kind: str = kind) -> bool:
            return not kube.get(kind, namespace=OPERATOR_NAMESPACE, selector=selector)["items"]

        wait_for(gone, 120, f"{kind} of the release to be gone")
    for kind in ("clusterroles", "clusterrolebindings"):
        items = json.loads(kube.kubectl("get", kind, "-l", selector, "-o", "json").stdout)["items"]
        assert not items, f"{kind} left behind: {[i['metadata']['name'] for i in items]}"
    # Helm never deletes CRDs from crds/: the custom resources' type outlives the release.
    crd = yaml.safe_load(kube.kubectl("get", "crd", "neoplasmaclusters.neoplasma.io", "-o", "yaml").stdout)
    assert crd["spec"]["group"] == "neoplasma.io"
