"""`helm install` of charts/neoplasma-operator into a real control plane, as a user does.

The chart is installed with the operator watching the test's namespace only (so it never
touches other tests' clusters). The stand-in kubelet runs the operator's pod from the chart's
Deployment exactly as rendered: the image's entry point `neoplasma` becomes `python -m
neoplasma`, with the chart's args, and the process reaches the API server with the token of
the chart's ServiceAccount, so the chart's RBAC is what it gets. A second stand-in kubelet
runs the broker and proxy pods the operator creates. examples/small.yaml must become Ready,
`helm test` must pass, and `helm uninstall` must leave nothing of the release behind.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kubernetes.client
import pytest
import yaml
from kubeharness.controlplane import ControlPlane, free_port, wait_for
from kubeharness.kubelet import StandInKubelet, map_executables
from kubernetes.client import V1Container
from kubernetes.client.rest import ApiException

pytestmark = [pytest.mark.kube, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "charts" / "neoplasma-operator"
SMALL = REPO / "examples" / "small.yaml"
IMAGE_REPOSITORY = "registry.example/neoplasma"
GROUP, VERSION, PLURAL = "neoplasma.io", "v1alpha1", "neoplasmaclusters"


def run_image_command(argv: list[str], container: V1Container) -> list[str]:
    """The neoplasma image's commands, run here: the entry point `neoplasma` (and `python`)
    by this interpreter; a `--host 0.0.0.0` becomes the pod's own loopback address (argparse
    keeps the last --host), as pods here share one network namespace."""
    mapped = map_executables(
        {"neoplasma": [sys.executable, "-m", "neoplasma"], "python": [sys.executable]},
        entrypoints={IMAGE_REPOSITORY: ["neoplasma"]},
    )(argv, container)
    if "--host" in argv:
        return ["/bin/sh", "-c", 'exec "$@" --host "$NEOPLASMA_POD_IP"', "sh", *mapped]
    return mapped


class Release:
    """One installed release of the chart, and what a user sees of it."""

    def __init__(self, control_plane: ControlPlane, namespace: str, helm: str, home: Path) -> None:
        self.control_plane = control_plane
        self.namespace = namespace
        self.name = f"np-{uuid.uuid4().hex[:6]}"
        self.helm_binary = helm
        self.env = {**control_plane.env(), "HELM_CACHE_HOME": str(home / "cache"),
                    "HELM_CONFIG_HOME": str(home / "config"), "HELM_DATA_HOME": str(home / "data")}
        self.api = control_plane.api_client()
        self.core = kubernetes.client.CoreV1Api(self.api)
        self.apps = kubernetes.client.AppsV1Api(self.api)
        self.rbac = kubernetes.client.RbacAuthorizationV1Api(self.api)
        self.custom = kubernetes.client.CustomObjectsApi(self.api)

    def helm(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([self.helm_binary, *args, "--namespace", self.namespace], env=self.env,
                                capture_output=True, text=True, timeout=timeout)
        assert result.returncode == 0, f"helm {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
        return result

    def kubectl(self, *args: str) -> subprocess.CompletedProcess[str]:
        result = self.control_plane.kubectl(*args, "--namespace", self.namespace, check=False)
        assert result.returncode == 0, f"kubectl {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
        return result

    @property
    def fullname(self) -> str:
        return f"{self.name}-neoplasma-operator"

    def service_account_kubeconfig(self, path: Path) -> Path:
        """A kubeconfig with the token of the chart's ServiceAccount (Kubernetes 1.20 keeps it in
        a Secret that kube-controller-manager creates)."""

        def token_secret() -> str:
            account = self.core.read_namespaced_service_account(self.fullname, self.namespace)
            return str(account.secrets[0].name) if account.secrets else ""

        secret = self.core.read_namespaced_secret(
            wait_for(token_secret, 30, f"the token of ServiceAccount {self.fullname}"), self.namespace)
        config = yaml.safe_load(self.control_plane.kubeconfig_path.read_text())
        config["users"] = [{"name": "operator", "user": {"token": base64.b64decode(secret.data["token"]).decode()}}]
        config["contexts"][0]["context"]["user"] = "operator"
        path.write_text(yaml.safe_dump(config))
        path.chmod(0o600)
        return path

    def operator_ready(self) -> bool:
        deployment = self.apps.read_namespaced_deployment(self.fullname, self.namespace)
        return (deployment.status.ready_replicas or 0) == 1

    def cluster(self, name: str) -> dict[str, Any]:
        found: dict[str, Any] = self.custom.get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name)
        return found

    def cluster_ready(self, name: str) -> bool:
        conditions = (self.cluster(name).get("status") or {}).get("conditions") or []
        return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)

    def can(self, verb: str, resource: str) -> bool:
        result = self.control_plane.kubectl(
            "auth", "can-i", verb, resource, "--namespace", self.namespace,
            f"--as=system:serviceaccount:{self.namespace}:{self.fullname}", check=False)
        return result.stdout.strip() == "yes"

    def release_objects(self) -> list[str]:
        """Every object labelled as this release's, in the namespace and cluster-wide."""
        selector = f"app.kubernetes.io/instance={self.name}"
        listings: list[tuple[str, Callable[..., Any]]] = [
            ("Deployment", lambda: self.apps.list_namespaced_deployment(self.namespace, label_selector=selector)),
            ("Pod", lambda: self.core.list_namespaced_pod(self.namespace, label_selector=selector)),
            ("ServiceAccount", lambda: self.core.list_namespaced_service_account(
                self.namespace, label_selector=selector)),
            ("Role", lambda: self.rbac.list_namespaced_role(self.namespace, label_selector=selector)),
            ("RoleBinding", lambda: self.rbac.list_namespaced_role_binding(self.namespace, label_selector=selector)),
            ("ClusterRole", lambda: self.rbac.list_cluster_role(label_selector=selector)),
            ("ClusterRoleBinding", lambda: self.rbac.list_cluster_role_binding(label_selector=selector)),
        ]
        return [f"{kind} {item.metadata.name}" for kind, listing in listings for item in listing().items]


def children(release: Release, cluster: str) -> list[str]:
    selector = f"app.kubernetes.io/instance={cluster}"
    return ([f"Deployment {d.metadata.name}" for d in release.apps.list_namespaced_deployment(
                release.namespace, label_selector=selector).items]
            + [f"Service {s.metadata.name}" for s in release.core.list_namespaced_service(
                release.namespace, label_selector=selector).items])


def test_helm_install_runs_the_operator_that_makes_the_small_example_ready(
    control_plane: ControlPlane, namespace: str, kubelet: Callable[..., StandInKubelet], tmp_path: Path, helm: str,
) -> None:
    release = Release(control_plane, namespace, helm, tmp_path / "helm")
    release.helm(
        "install", release.name, str(CHART),
        "--set", f"image.repository={IMAGE_REPOSITORY}",
        "--set", f"watchNamespaces={{{namespace}}}",
        # The stand-in kubelet runs every pod in this machine's network namespace, so the
        # operator's liveness endpoint (on 0.0.0.0) takes a free port.
        "--set", f"healthPort={free_port()}",
    )
    expected_image = f"{IMAGE_REPOSITORY}:0.1.0"
    deployment = release.apps.read_namespaced_deployment(release.fullname, namespace)
    [container] = deployment.spec.template.spec.containers
    assert container.image == expected_image and container.args[:1] == ["operator"]
    assert container.args[-2:] == ["--namespace", namespace]

    # The operator's pod, run with the chart's ServiceAccount and nothing else.
    operator_kubeconfig = release.service_account_kubeconfig(tmp_path / "operator-kubeconfig")
    operator = kubelet(f"app.kubernetes.io/instance={release.name}", command_mapper=run_image_command,
                       extra_env={"KUBECONFIG": str(operator_kubeconfig)})
    wait_for(release.operator_ready, 60, "the operator Deployment to have a ready replica")
    [operator_pod] = operator.pod_names()
    process = operator.process(operator_pod)
    assert process is not None and process.poll() is None
    argv = list(process.args)
    start = argv.index(sys.executable)
    assert argv[start:start + 4] == [sys.executable, "-m", "neoplasma", "operator"], argv

    # The brokers and proxies the operator creates from the example.
    kubelet("app.kubernetes.io/name=neoplasma", command_mapper=run_image_command)
    release.kubectl("apply", "-f", str(SMALL))
    try:
        wait_for(lambda: release.cluster_ready("small"), 120, "NeoplasmaCluster small to be Ready", interval=0.5)
    except TimeoutError:
        print(f"----- operator log\n{operator.log_path(operator_pod).read_text(errors='replace')[-6000:]}")
        print(json.dumps(release.cluster("small").get("status"), indent=2))
        raise
    status = release.cluster("small")["status"]
    assert (status["brokers"]["ready"], status["proxies"]["ready"]) == (1, 2)
    assert sorted(children(release, "small")) == [
        "Deployment small-broker-0", "Deployment small-proxy", "Service small-broker", "Service small-proxy"]
    for child in release.apps.list_namespaced_deployment(namespace, label_selector="app.kubernetes.io/instance=small"
                                                         ).items:
        [child_container] = child.spec.template.spec.containers
        assert child_container.image == expected_image, "NEOPLASMA_DEFAULT_IMAGE is the chart's image"

    # Least privilege, as the API server sees it.
    assert release.can("patch", "deployments.apps") and release.can("create", "events")
    # Secrets: its clusters' credentials, read one by one and created; never listed, changed or deleted.
    assert release.can("get", "secrets") and release.can("create", "secrets")
    assert not any(release.can(verb, "secrets") for verb in ("list", "watch", "update", "patch", "delete"))
    assert not release.can("delete", "services")
    other = control_plane.kubectl("auth", "can-i", "list", "neoplasmaclusters.neoplasma.io", "--namespace",
                                  "default", f"--as=system:serviceaccount:{namespace}:{release.fullname}",
                                  check=False)
    assert other.stdout.strip() == "no", "a restricted operator has no rights outside its namespaces"

    # helm test: the chart's test pod, run by the same stand-in kubelet (and deleted by helm
    # once it succeeded, so its output is read from the stand-in's log).
    tested = release.helm("test", release.name, "--timeout", "90s", timeout=120)
    assert "Phase:          Succeeded" in tested.stdout
    test_log = operator.log_path(f"{release.fullname}-test").read_text()
    assert "CRD neoplasmaclusters.neoplasma.io is established" in test_log
    assert f"namespace {namespace}: 1 NeoplasmaCluster(s)" in test_log

    # Delete the cluster while the operator runs, then uninstall: nothing is left behind.
    release.kubectl("delete", "-f", str(SMALL), "--wait", "--timeout=60s")
    wait_for(lambda: not children(release, "small"), 60, "the small cluster's children to be garbage-collected")
    release.helm("uninstall", release.name, "--wait", "--timeout", "60s", timeout=90)
    wait_for(lambda: not release.release_objects(), 60, "the release's objects to be deleted")
    wait_for(lambda: process.poll() is not None, 30, "the operator process to stop")
    # Helm leaves the CRDs of crds/ in place (the custom resources' type outlives the release).
    crd = kubernetes.client.ApiextensionsV1Api(release.api).read_custom_resource_definition(f"{PLURAL}.{GROUP}")
    assert crd.spec.group == GROUP


def test_install_fails_clearly_on_wrong_values(
    control_plane: ControlPlane, namespace: str, tmp_path: Path, helm: str,
) -> None:
    release = Release(control_plane, namespace, helm, tmp_path / "helm")
    result = subprocess.run(
        [release.helm_binary, "install", release.name, str(CHART), "--namespace", namespace,
         "--set-json", 'watchNamespaces="default"'],
        env=release.env, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode != 0
    assert "watchNamespaces: Invalid type. Expected: array, given: string" in result.stderr
    with pytest.raises(ApiException) as missing:
        release.apps.read_namespaced_deployment(release.fullname, namespace)
    assert missing.value.status == 404
