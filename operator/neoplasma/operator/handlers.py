"""kopf handlers: thin shells that feed the per-cluster controllers (controller.py).

What kopf watches, and why:
- NeoplasmaClusters: every event hands the latest object to its controller (started on
  first sight, stopped when the object is gone);
- pods labelled app.kubernetes.io/name=neoplasma: indexed by cluster (readiness, IP,
  deletion) for the membership push; every change wakes the cluster's controller;
- ReplicaSets of those pods: indexed by cluster (uid and controller), so that only pods whose
  controller chain leads to the cluster's Deployments count;
- Deployments, Services, PodDisruptionBudgets and NetworkPolicies managed by the operator:
  indexed by cluster, so that a child edited or deleted by hand is put back at once.

No handler here changes anything itself, so kopf keeps no per-handler state on the resource
and needs no finalizer.
"""

from __future__ import annotations

import logging
import os
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import kopf

from neoplasma.core.tiers import Tier
from neoplasma.operator.children import index_value
from neoplasma.operator.controller import OperatorState
from neoplasma.operator.kube import GROUP, PLURAL, VERSION
from neoplasma.operator.members import ClusterKey, Controlled, PodView, controlled, pod_view
from neoplasma.operator.observe import Indexes
from neoplasma.operator.render import INSTANCE_LABEL, MANAGED_BY, MANAGED_BY_LABEL, NAME_LABEL

NEOPLASMA_PODS = {NAME_LABEL: "neoplasma"}
CHILDREN = {NAME_LABEL: "neoplasma", MANAGED_BY_LABEL: MANAGED_BY}
CHILD_INDEXES = ("neoplasma_deployments", "neoplasma_services", "neoplasma_pdbs", "neoplasma_networkpolicies")
STATE = "neoplasma"  # the operator's state, kept in kopf's memo under this key


def configure(settings: kopf.OperatorSettings) -> None:
    """kopf settings for this operator (run_operator passes them to kopf)."""
    settings.posting.level = logging.INFO  # kopf.info events about what the operator does
    settings.watching.connect_timeout = 10
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330


def state_of(memo: kopf.Memo) -> OperatorState:
    state = memo.get(STATE)
    if not isinstance(state, OperatorState):
        raise kopf.PermanentError("the operator was not set up: start it with `neoplasma operator` "
                                  "(`kopf run` is not supported)")
    return state


@kopf.on.startup()
async def startup(memo: kopf.Memo, **_: Any) -> None:
    """Stop at once under `kopf run`: only `neoplasma operator` sets the operator up."""
    state_of(memo)


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    if STATE in memo:
        await state_of(memo).close()


@kopf.on.probe(id="clusters")
async def clusters(memo: kopf.Memo, **_: Any) -> int:
    """For the liveness endpoint: how many NeoplasmaClusters are being run."""
    return len(state_of(memo).controllers)


# -- indexes ----------------------------------------------------------------------------------


@kopf.index("pods", labels=NEOPLASMA_PODS)
async def neoplasma_pods(body: kopf.Body, **_: Any) -> dict[ClusterKey, PodView]:
    view = pod_view(body)
    return {view.key: view} if view else {}


@kopf.index("apps", "v1", "replicasets", labels=NEOPLASMA_PODS)
async def neoplasma_replicasets(body: kopf.Body, **_: Any) -> dict[ClusterKey, Controlled]:
    key = _cluster_key(body)
    return {key: controlled(body)} if key else {}


@kopf.index("apps", "v1", "deployments", labels=CHILDREN)
async def neoplasma_deployments(body: kopf.Body, **_: Any) -> dict[ClusterKey, dict[str, Any]]:
    return _child_entry(body)


@kopf.index("", "v1", "services", labels=CHILDREN)
async def neoplasma_services(body: kopf.Body, **_: Any) -> dict[ClusterKey, dict[str, Any]]:
    return _child_entry(body)


@kopf.index("policy", "poddisruptionbudgets", labels=CHILDREN)
async def neoplasma_pdbs(body: kopf.Body, **_: Any) -> dict[ClusterKey, dict[str, Any]]:
    return _child_entry(body)


@kopf.index("networking.k8s.io", "v1", "networkpolicies", labels=CHILDREN)
async def neoplasma_networkpolicies(body: kopf.Body, **_: Any) -> dict[ClusterKey, dict[str, Any]]:
    return _child_entry(body)


# -- events -----------------------------------------------------------------------------------


@kopf.on.event(GROUP, VERSION, PLURAL)
async def cluster_event(type: str, body: kopf.Body, memo: kopf.Memo, **kwargs: Any) -> None:
    """`kwargs` holds the indexes above, under their functions' names."""
    indexes = Indexes(kwargs["neoplasma_pods"], [kwargs[name] for name in CHILD_INDEXES],
                      kwargs["neoplasma_replicasets"])
    state_of(memo).cluster_seen(type, body, indexes)


@kopf.on.event("pods", labels=NEOPLASMA_PODS)
async def pod_event(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    view = pod_view(body)
    if view is not None:
        state_of(memo).wake(view.key, pods=True, proxies=view.component == Tier.PROXY)


@kopf.on.event("apps", "v1", "replicasets", labels=NEOPLASMA_PODS)
async def replicaset_event(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    key = _cluster_key(body)
    if key is not None:
        state_of(memo).wake(key, pods=True, proxies=True)  # (a proxy rollout's ReplicaSets)


@kopf.on.event("networking.k8s.io", "v1", "networkpolicies", labels=CHILDREN)
async def networkpolicy_event(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    _wake_owner(body, memo)


@kopf.on.event("apps", "v1", "deployments", labels=CHILDREN)
async def deployment_event(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    _wake_owner(body, memo)


@kopf.on.event("", "v1", "services", labels=CHILDREN)
async def service_event(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    _wake_owner(body, memo)


@kopf.on.event("policy", "poddisruptionbudgets", labels=CHILDREN)
async def pdb_event(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    _wake_owner(body, memo)


# -- helpers ----------------------------------------------------------------------------------


def default_image() -> str:
    """The image of clusters without spec.image: $NEOPLASMA_DEFAULT_IMAGE (the chart sets it to
    the operator's own image), else the published image of this version."""
    configured = os.environ.get("NEOPLASMA_DEFAULT_IMAGE")
    if configured:
        return configured
    try:
        tag = version("neoplasma")
    except PackageNotFoundError:
        tag = "latest"
    return f"ghcr.io/neoplasma/neoplasma:{tag}"


def _cluster_key(body: kopf.Body) -> ClusterKey | None:
    instance = body.metadata.labels.get(INSTANCE_LABEL)
    namespace = body.metadata.namespace
    return (namespace, instance) if instance and namespace else None


def _child_entry(body: kopf.Body) -> dict[ClusterKey, dict[str, Any]]:
    key = _cluster_key(body)
    return {key: index_value(body)} if key else {}


def _wake_owner(body: kopf.Body, memo: kopf.Memo) -> None:
    key = _cluster_key(body)
    if key is not None:
        state_of(memo).wake(key, children=True)
