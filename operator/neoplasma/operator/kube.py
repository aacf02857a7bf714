"""The few Kubernetes API calls the operator makes itself (kopf makes the watches).

Blocking calls of the `kubernetes` client; the controller runs them in threads. Children are
written with server-side apply (field manager `neoplasma-operator`, forced), which creates a
missing object and takes back fields edited by hand in one request.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Any

import kubernetes.client
import kubernetes.config

from neoplasma.operator.render import POLICY_APIS

GROUP = "neoplasma.io"
VERSION = "v1alpha1"
PLURAL = "neoplasmaclusters"
FIELD_MANAGER = "neoplasma-operator"
APPLY = "application/apply-patch+yaml"
MERGE = "application/merge-patch+json"


def api_client() -> kubernetes.client.ApiClient:
    """A client for the cluster the operator runs in, else the one $KUBECONFIG points at."""
    configuration = kubernetes.client.Configuration()
    try:
        kubernetes.config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    return kubernetes.client.ApiClient(configuration)


class Kube:
    def __init__(self, client: kubernetes.client.ApiClient) -> None:
        self.client = client
        self.core = kubernetes.client.CoreV1Api(client)
        self.apps = kubernetes.client.AppsV1Api(client)
        self.custom = kubernetes.client.CustomObjectsApi(client)
        self.networking = kubernetes.client.NetworkingV1Api(client)

    def policy_api(self) -> str:
        """`policy/v1` when the server serves it (Kubernetes 1.21+), else `policy/v1beta1`."""
        groups = kubernetes.client.ApisApi(self.client).get_api_versions().groups or []
        versions = {v.group_version for g in groups if g.name == "policy" for v in g.versions or []}
        return next((api for api in POLICY_APIS if api in versions), POLICY_APIS[-1])

    def apply(self, manifest: Mapping[str, Any]) -> None:
        """Create or update one child (Deployment, Service, PodDisruptionBudget or NetworkPolicy)."""
        kind = manifest["kind"]
        name = manifest["metadata"]["name"]
        namespace = manifest["metadata"]["namespace"]
        options: dict[str, Any] = {"field_manager": FIELD_MANAGER, "force": True, "_content_type": APPLY}
        body = dict(manifest)
        if kind == "Deployment":
            self.apps.patch_namespaced_deployment(name, namespace, body, **options)
        elif kind == "Service":
            self.core.patch_namespaced_service(name, namespace, body, **options)
        elif kind == "NetworkPolicy":
            self.networking.patch_namespaced_network_policy(name, namespace, body, **options)
        elif kind == "PodDisruptionBudget":
            group, version = str(manifest["apiVersion"]).split("/")
            self.custom.patch_namespaced_custom_object(
                group, version, namespace, "poddisruptionbudgets", name, body, **options
            )
        else:
            raise ValueError(f"the operator does not manage children of kind {kind}")

    def delete(self, kind: str, namespace: str, name: str) -> None:
        """Delete a child; its pods go too (background propagation). Gone already is fine."""
        try:
            if kind == "Deployment":
                self.apps.delete_namespaced_deployment(name, namespace, propagation_policy="Background")
            elif kind == "NetworkPolicy":
                self.networking.delete_namespaced_network_policy(name, namespace)
            else:
                raise ValueError(f"the operator only deletes Deployments and NetworkPolicies, not {kind}")
        except kubernetes.client.ApiException as error:
            if error.status != 404:
                raise

    def read_secret(self, namespace: str, name: str) -> dict[str, str] | None:
        """A Secret's data (decoded), or None when there is no such Secret."""
        try:
            secret = self.core.read_namespaced_secret(name, namespace)
        except kubernetes.client.ApiException as error:
            if error.status == 404:
                return None
            raise
        return {str(k): base64.b64decode(v).decode(errors="replace") for k, v in (secret.data or {}).items()}

    def create_secret(self, manifest: Mapping[str, Any]) -> None:
        """Create a Secret; one that exists already (made meanwhile) is kept as it is."""
        try:
            self.core.create_namespaced_secret(manifest["metadata"]["namespace"], dict(manifest))  # type: ignore[arg-type]
        except kubernetes.client.ApiException as error:
            if error.status != 409:
                raise

    def patch_status(self, namespace: str, name: str, status: Mapping[str, Any]) -> bool:
        """Merge `status` into the resource's status; False when the resource is gone."""
        try:
            self.custom.patch_namespaced_custom_object_status(
                GROUP, VERSION, namespace, PLURAL, name, {"status": dict(status)}, _content_type=MERGE
            )
        except kubernetes.client.ApiException as error:
            if error.status == 404:
                return False
            raise
        return True

    def close(self) -> None:
        self.client.close()  # type: ignore[no-untyped-call]
