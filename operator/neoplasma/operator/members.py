"""Broker and proxy pods as the membership push sees them: pure functions of pod objects.

The operator indexes every pod labelled `app.kubernetes.io/name=neoplasma` as a `PodView`
under its cluster's key `(namespace, instance)`; from those views it takes the members of the
next snapshot (ready brokers) and the proxies to push it to (ready proxies). Labels only find
candidates: `own_pods` keeps the pods whose controller chain (Pod -> ReplicaSet -> Deployment)
leads to a Deployment of their tier that the cluster controls.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from neoplasma.core.membership import BrokerState, Member
from neoplasma.core.net import hostport
from neoplasma.core.tiers import Tier
from neoplasma.operator.render import (
    COMPONENT_LABEL,
    CONTROL_PORT,
    GRPC_PORT,
    INGEST,
    INSTANCE_LABEL,
    NAME_LABEL,
)

COMPONENTS = (*Tier, INGEST)

ClusterKey = tuple[str, str]
"""(namespace, name) of a NeoplasmaCluster; its pods carry the name as instance label."""


@dataclass(frozen=True)
class PodView:
    """What the operator needs to know of one broker, proxy or ingest pod."""

    namespace: str
    instance: str
    component: str  # a Tier, or INGEST
    name: str
    uid: str = ""
    ip: str = ""
    ready: bool = False
    deleting: bool = False
    restarts: int = 0
    owner: str = ""  # the uid of its controller (a ReplicaSet), "" for none
    ready_since: str = ""  # when its Ready condition last changed (RFC 3339; "" unknown)
    deletion: str = ""  # its deletionTimestamp: when it is killed if still running ("" not deleted)


    @property
    def key(self) -> ClusterKey:
        return (self.namespace, self.instance)

    @property
    def incarnation(self) -> str:
        """Changes whenever the pod's process may have started afresh (new pod or restart)."""
        return f"{self.uid}/{self.restarts}/{self.ip}"


@dataclass(frozen=True)
class ProxyTarget:
    """A ready proxy pod: where its control RPC listens, and which incarnation it is."""

    name: str
    address: str
    incarnation: str


def pod_view(pod: Mapping[str, Any]) -> PodView | None:
    """The view of a broker, proxy or ingest pod of a NeoplasmaCluster; None for any other pod."""
    metadata = pod.get("metadata") or {}
    labels = metadata.get("labels") or {}
    component = labels.get(COMPONENT_LABEL)
    instance = labels.get(INSTANCE_LABEL)
    if labels.get(NAME_LABEL) != "neoplasma" or component not in COMPONENTS or not instance:
        return None
    status = pod.get("status") or {}
    condition: Mapping[str, Any] = next((c for c in status.get("conditions") or [] if c.get("type") == "Ready"), {})
    ready = condition.get("status") == "True"
    restarts = sum(int(s.get("restartCount") or 0) for s in status.get("containerStatuses") or [])
    return PodView(
        namespace=str(metadata.get("namespace") or ""),
        instance=str(instance),
        component=Tier(component) if component in tuple(Tier) else INGEST,
        name=str(metadata.get("name") or ""),
        uid=str(metadata.get("uid") or ""),
        ip=str(status.get("podIP") or ""),
        ready=ready and bool(status.get("podIP")),
        deleting=metadata.get("deletionTimestamp") is not None,
        restarts=restarts,
        owner=controller_uid(metadata),
        ready_since=str(condition.get("lastTransitionTime") or ""),
        deletion=str(metadata.get("deletionTimestamp") or ""),
    )


def controller_uid(metadata: Mapping[str, Any]) -> str:
    """The uid of an object's controller (the owner reference with controller: true), or ""."""
    references = metadata.get("ownerReferences") or []
    return next((str(ref.get("uid")) for ref in references if ref.get("controller") is True), "")


@dataclass(frozen=True)
class Controlled:
    """An object (a ReplicaSet) by its uid and its controller's uid, and (a ReplicaSet of a
    Deployment) its revision: the Deployment's current template is its highest."""

    uid: str
    controller: str
    revision: int = 0


REVISION = "deployment.kubernetes.io/revision"


def controlled(obj: Mapping[str, Any]) -> Controlled:
    metadata = obj.get("metadata") or {}
    revision = str((metadata.get("annotations") or {}).get(REVISION) or "0")
    return Controlled(str(metadata.get("uid") or ""), controller_uid(metadata),
                      int(revision) if revision.isdigit() and len(revision) < 19 else 0)


def current_replicaset(replicasets: Iterable[Controlled], deployment_uid: str) -> str:
    """The uid of the ReplicaSet of a Deployment's current template ("" for none known)."""
    mine = [rs for rs in replicasets if rs.controller == deployment_uid and deployment_uid]
    return max(mine, key=lambda rs: rs.revision).uid if mine else ""


def own_pods(pods: Iterable[PodView], replicasets: Iterable[Controlled],
             deployments: Iterable[Mapping[str, Any]], cluster_uid: str) -> list[PodView]:
    """The pods that belong to the cluster `cluster_uid`: controlled by a ReplicaSet that is
    controlled by a Deployment of the pod's tier that the cluster controls. Labels alone (a stray
    pod, or one of a foreign ReplicaSet) never make a member or a push target."""
    tiers: dict[str, str] = {}
    for deployment in deployments:
        metadata = deployment.get("metadata") or {}
        if deployment.get("kind") == "Deployment" and cluster_uid and controller_uid(metadata) == cluster_uid:
            tiers[str(metadata.get("uid"))] = str((metadata.get("labels") or {}).get(COMPONENT_LABEL))
    by_replicaset = {rs.uid: tiers[rs.controller] for rs in replicasets if rs.controller in tiers and rs.uid}
    return [pod for pod in pods if pod.owner and by_replicaset.get(pod.owner) == pod.component]


def broker_members(pods: Iterable[PodView]) -> list[Member]:
    """Ready broker pods as members: SERVING, or DRAINING once the pod is being deleted."""
    return sorted(
        Member(
            pod.name,
            hostport(pod.ip, GRPC_PORT),
            BrokerState.DRAINING if pod.deleting else BrokerState.SERVING,
        )
        for pod in pods
        if pod.component == Tier.BROKER and pod.ready
    )


def proxy_targets(pods: Iterable[PodView]) -> dict[str, ProxyTarget]:
    """Ready proxy pods, by pod name: every one of them gets the membership."""
    return {
        pod.name: ProxyTarget(pod.name, hostport(pod.ip, CONTROL_PORT), pod.incarnation)
        for pod in sorted(pods, key=lambda p: p.name)
        if pod.component == Tier.PROXY and pod.ready
    }


def ready_count(pods: Iterable[PodView], component: str) -> int:
    """Ready pods of `component` that are not being deleted (what status reports as ready)."""
    return sum(1 for pod in pods if pod.component == component and pod.ready and not pod.deleting)
