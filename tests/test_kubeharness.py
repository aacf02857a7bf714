"""The test harness itself, against the real control plane: kubectl reaches it, and a
Deployment's pod run by the stand-in kubelet becomes Ready, is stopped when deleted, is
restarted when its process dies, and is recreated by the ReplicaSet controller."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path

import kubernetes.client
import pytest
from kubeharness.controlplane import ControlPlane, Manifest, body, json_of, wait_for
from kubeharness.kubelet import StandInKubelet, map_executables
from kubernetes.client.exceptions import ApiException

pytestmark = [pytest.mark.kube, pytest.mark.timeout(180)]

APP = "web"
PORT = 8080


def web_deployment() -> Manifest:
    """A Deployment of one tiny HTTP server that listens on its pod IP."""
    labels = {"app": APP}
    container = {
        "name": "http",
        "image": "python:3.11-slim",
        "command": ["python3", "-m", "http.server", str(PORT), "--bind", "$(POD_IP)"],
        "env": [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
        "ports": [{"name": "http", "containerPort": PORT}],
        "readinessProbe": {"httpGet": {"path": "/", "port": "http"}, "periodSeconds": 1},
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": APP, "labels": labels},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {"containers": [container], "terminationGracePeriodSeconds": 5},
            },
        },
    }


def web_service() -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": APP},
        "spec": {"selector": {"app": APP}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]},
    }


class Cluster:
    """The test's view of its namespace (objects as JSON, as kubectl shows them)."""

    def __init__(self, control_plane: ControlPlane, namespace: str) -> None:
        self.api = control_plane.api_client()
        self.namespace = namespace
        self.core = kubernetes.client.CoreV1Api(self.api)
        self.apps = kubernetes.client.AppsV1Api(self.api)

    def ready_replicas(self) -> int:
        deployment = json_of(self.apps.read_namespaced_deployment(APP, self.namespace, _preload_content=False))
        return int(deployment["status"].get("readyReplicas", 0))

    def pod(self, name: str) -> Manifest | None:
        try:
            return json_of(self.core.read_namespaced_pod(name, self.namespace, _preload_content=False))
        except ApiException as error:
            if error.status == 404:
                return None
            raise

    def ready_pods(self) -> list[Manifest]:
        selector = f"app={APP}"
        pods = json_of(self.core.list_namespaced_pod(self.namespace, label_selector=selector, _preload_content=False))
        return [p for p in pods["items"] if not p["metadata"].get("deletionTimestamp") and _is_ready(p)]

    def wait_for_one_ready_pod(self, timeout: float = 60) -> Manifest:
        wait_for(lambda: self.ready_replicas() == 1, timeout, "Deployment web to have 1 ready replica")
        (pod,) = wait_for(self.ready_pods, timeout, "one Ready pod of Deployment web")
        return pod

    def endpoint_slice_addresses(self) -> set[str]:
        """Ready addresses in Service web's EndpointSlices (discovery.k8s.io, version by discovery)."""
        groups = json_of(kubernetes.client.ApisApi(self.api).get_api_versions(_preload_content=False))["groups"]
        (discovery,) = [g for g in groups if g["name"] == "discovery.k8s.io"]
        slices = kubernetes.client.CustomObjectsApi(self.api).list_namespaced_custom_object(
            "discovery.k8s.io", discovery["preferredVersion"]["version"], self.namespace, "endpointslices",
            label_selector=f"kubernetes.io/service-name={APP}", _preload_content=False,
        )
        return {
            address
            for item in json_of(slices)["items"]
            for endpoint in item.get("endpoints") or []
            if endpoint.get("conditions", {}).get("ready")
            for address in endpoint["addresses"]
        }


def _is_ready(pod: Manifest) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True" for c in pod["status"].get("conditions", []))


def _http_status(ip: str) -> int:
    with urllib.request.urlopen(f"http://{ip}:{PORT}/", timeout=5) as response:
        return int(response.status)


@pytest.fixture
def web(
    control_plane: ControlPlane, namespace: str, kubelet: Callable[..., StandInKubelet]
) -> tuple[Cluster, StandInKubelet]:
    cluster = Cluster(control_plane, namespace)
    stand_in = kubelet(f"app={APP}", command_mapper=map_executables({"python3": [sys.executable]}))
    cluster.apps.create_namespaced_deployment(namespace, body(web_deployment()))
    cluster.core.create_namespaced_service(namespace, body(web_service()))
    return cluster, stand_in


def test_kubectl_reaches_the_apiserver(control_plane: ControlPlane, kubeconfig: Path) -> None:
    assert control_plane.kubectl("get", "--raw", "/readyz").stdout.strip() == "ok"
    version = json.loads(control_plane.kubectl("version", "-o", "json").stdout)
    assert version["serverVersion"]["gitVersion"] == "v1.20.2"
    namespaces = subprocess.run(
        ["kubectl", "--kubeconfig", str(kubeconfig), "get", "namespaces", "-o", "name"],
        capture_output=True, text=True, check=True,
    ).stdout.split()
    assert "namespace/default" in namespaces


def test_deployment_pod_becomes_ready(web: tuple[Cluster, StandInKubelet]) -> None:
    cluster, _ = web
    pod = cluster.wait_for_one_ready_pod()

    status = pod["status"]
    ip = status["podIP"]
    assert ip.startswith("127.") and ip != "127.0.0.1"
    assert pod["spec"]["nodeName"] == "harness-node"
    assert status["phase"] == "Running"
    assert status["podIPs"] == [{"ip": ip}]
    conditions = {c["type"]: c["status"] for c in status["conditions"]}
    assert conditions == {"PodScheduled": "True", "Initialized": "True", "ContainersReady": "True", "Ready": "True"}
    (container,) = status["containerStatuses"]
    assert (container["ready"], container["started"], container["restartCount"]) == (True, True, 0)
    assert _http_status(ip) == 200
    # kube-controller-manager lists the Ready pod in the Service's EndpointSlice. (Not in the
    # v1 Endpoints: Kubernetes 1.20 rejects loopback addresses there.)
    wait_for(lambda: cluster.endpoint_slice_addresses() == {ip}, 30, f"EndpointSlice of Service web to list {ip}")


def test_deleted_pod_is_stopped_and_recreated(web: tuple[Cluster, StandInKubelet]) -> None:
    cluster, stand_in = web
    name = cluster.wait_for_one_ready_pod()["metadata"]["name"]
    process = stand_in.process(name)
    assert process is not None and process.poll() is None

    cluster.core.delete_namespaced_pod(name, cluster.namespace)

    wait_for(lambda: process.poll() is not None, 30, f"process of deleted pod {name} to exit")
    wait_for(lambda: cluster.pod(name) is None, 30, f"pod {name} to be removed")
    new_pod = cluster.wait_for_one_ready_pod()
    assert new_pod["metadata"]["name"] != name
    new_process = stand_in.process(new_pod["metadata"]["name"])
    assert new_process is not None and new_process.poll() is None
    assert _http_status(new_pod["status"]["podIP"]) == 200


def test_exited_process_is_restarted(web: tuple[Cluster, StandInKubelet]) -> None:
    cluster, stand_in = web
    pod = cluster.wait_for_one_ready_pod()
    name = pod["metadata"]["name"]
    process = stand_in.process(name)
    assert process is not None

    os.kill(process.pid, signal.SIGKILL)

    def restarted_and_ready() -> bool:
        current = cluster.pod(name)
        assert current is not None
        (container,) = current["status"]["containerStatuses"]
        return bool(container["restartCount"] == 1 and container["ready"] and _is_ready(current))

    wait_for(restarted_and_ready, 30, f"pod {name} to be restarted and Ready again")
    assert stand_in.process(name) is not process
    assert _http_status(pod["status"]["podIP"]) == 200


def test_control_plane_installs_crds_and_stops_cleanly(tmp_path: Path, control_plane: ControlPlane) -> None:
    crds = tmp_path / "crds"
    crds.mkdir()
    (crds / "widget.yaml").write_text(json.dumps(_widget_crd()))
    plane = ControlPlane(crd_dir=crds)
    plane.start()
    try:
        api = kubernetes.client.CustomObjectsApi(plane.api_client())
        widget: Manifest = {
            "apiVersion": "example.neoplasma.io/v1", "kind": "Widget", "metadata": {"name": "w"}, "spec": {"size": 3}
        }
        api.create_namespaced_custom_object("example.neoplasma.io", "v1", "default", "widgets", widget)
        stored = api.get_namespaced_custom_object("example.neoplasma.io", "v1", "default", "widgets", "w")
        assert stored["spec"] == {"size": 3}  # type: ignore[index]
        processes = plane.processes
        work_dir = plane.work_dir
    finally:
        plane.stop()
    assert len(processes) == 3 and all(p.returncode is not None for p in processes)
    assert work_dir is not None and not work_dir.exists()


def _widget_crd() -> Manifest:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "widgets.example.neoplasma.io"},
        "spec": {
            "group": "example.neoplasma.io",
            "scope": "Namespaced",
            "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
            "versions": [{
                "name": "v1", "served": True, "storage": True,
                "schema": {"openAPIV3Schema": {"type": "object", "properties": {
                    "spec": {"type": "object", "properties": {"size": {"type": "integer"}}},
                }}},
            }],
        },
    }
