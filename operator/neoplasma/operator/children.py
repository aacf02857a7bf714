"""Converging a NeoplasmaCluster's children: pure decisions over desired and actual objects.

`desired_children` is what `render` says, adopted by the resource (owner references, so that
deleting the resource deletes them). `plan` compares it with the objects that exist (as the
operator's index holds them) and says what to apply and what to delete. Comparison is
"desired is a subset of actual": fields the API server adds (defaults, status, allocated
node ports) or other controllers add are left alone; fields the operator renders are put back
when edited by hand.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import kopf

from neoplasma.operator.connections import DrainSizing
from neoplasma.operator.render import (
    BROKER_DEPLOYMENT_LABEL,
    COMPONENT_LABEL,
    DEFAULT_DRAINS,
    INGEST,
    Manifest,
    render,
)
from neoplasma.operator.settings import NO_PEERS, Peers
from neoplasma.operator.spec import Cluster

ChildKey = tuple[str, str]
"""(kind, name) of a child object."""


@dataclass(frozen=True)
class Change:
    """One child to create or update (server-side apply), and why."""

    manifest: Manifest
    action: str  # "create" | "update"
    fields: tuple[str, ...] = ()  # for "update": the rendered fields that differed

    @property
    def key(self) -> ChildKey:
        return child_key(self.manifest)

    def describe(self) -> str:
        kind, name = self.key
        if self.action == "create":
            return f"created {kind} {name}"
        return f"updated {kind} {name} ({', '.join(self.fields) or 'changed'})"


@dataclass(frozen=True)
class Plan:
    apply: list[Change] = field(default_factory=list)
    delete: list[ChildKey] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.apply or self.delete)


def desired_children(
    cluster: Cluster, owner: Mapping[str, Any], *, default_image: str, policy_api: str, operator: Peers = NO_PEERS,
    drains: DrainSizing = DEFAULT_DRAINS,
) -> list[Manifest]:
    """Every child of `cluster`, owned by the NeoplasmaCluster object `owner`."""
    return adopted(render(cluster, default_image=default_image, policy_api=policy_api, operator=operator,
                          drains=drains), owner)


def adopted(manifests: list[Manifest], owner: Mapping[str, Any]) -> list[Manifest]:
    """`manifests` owned by the NeoplasmaCluster object `owner` (deleted with it)."""
    kopf.adopt(manifests, owner=kopf.Body(cast(kopf.RawBody, _owner(owner))))
    return manifests


def plan(desired: Iterable[Manifest], actual: Iterable[Mapping[str, Any]], owner_uid: str) -> Plan:
    """What to apply (missing or differing children) and delete (broker and ingest Deployments
    and NetworkPolicies this cluster owns that are no longer rendered: scaled down, turned off)."""
    existing = {child_key(obj): obj for obj in actual}
    wanted = list(desired)
    changes: list[Change] = []
    for manifest in wanted:
        current = existing.get(child_key(manifest))
        if current is None:
            changes.append(Change(manifest, "create"))
            continue
        fields = differences(manifest, current)
        if fields:
            changes.append(Change(manifest, "update", tuple(fields)))
    wanted_keys = {child_key(m) for m in wanted}
    stale = sorted(
        key for key, obj in existing.items()
        if key not in wanted_keys and owned_by(obj, owner_uid)
        and (key[0] == "NetworkPolicy" or (key[0] == "Deployment" and (_is_broker_deployment(obj) or _is_ingest(obj))))
    )
    return Plan(apply=changes, delete=stale)


def differences(desired: Any, actual: Any, path: str = "", limit: int = 5) -> list[str]:
    """Paths where `desired` is not contained in `actual` (at most `limit` of them).

    Mappings: every key of `desired` must match (an empty or null desired value also matches
    a missing one); lists: same length, item by item; anything else: equal.
    """
    found: list[str] = []
    _diff(desired, actual, path, found, limit)
    return found


def _diff(desired: Any, actual: Any, path: str, found: list[str], limit: int) -> None:
    if len(found) >= limit:
        return
    if isinstance(desired, Mapping):
        if not isinstance(actual, Mapping):
            if desired or actual is not None:
                found.append(path or ".")
            return
        for key, value in desired.items():
            sub = f"{path}.{key}" if path else str(key)
            if key not in actual or actual[key] is None:
                if value not in (None, {}, []):
                    found.append(sub)
                continue
            _diff(value, actual[key], sub, found, limit)
    elif isinstance(desired, list):
        if not isinstance(actual, list) or len(actual) != len(desired):
            if desired or actual:
                found.append(path)
            return
        for index, (want, have) in enumerate(zip(desired, actual, strict=True)):
            _diff(want, have, f"{path}[{index}]", found, limit)
    elif desired != actual:
        found.append(path)


def child_key(obj: Mapping[str, Any]) -> ChildKey:
    return (str(obj.get("kind")), str((obj.get("metadata") or {}).get("name")))


def owned_by(obj: Mapping[str, Any], owner_uid: str) -> bool:
    references = (obj.get("metadata") or {}).get("ownerReferences") or []
    return any(ref.get("uid") == owner_uid for ref in references)


def broker_deployments(actual: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """`status.deployments`: each broker Deployment's name, desired and ready replicas."""
    rows = []
    for obj in actual:
        if obj.get("kind") == "Deployment" and _is_broker_deployment(obj):
            rows.append({
                "name": str(obj["metadata"]["name"]),
                "replicas": int((obj.get("spec") or {}).get("replicas") or 0),
                "ready": int((obj.get("status") or {}).get("readyReplicas") or 0),
            })
    return sorted(rows, key=lambda row: row["name"])


def index_value(obj: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a child object the operator keeps in memory (a plain, deep copy)."""
    metadata = obj.get("metadata") or {}
    kept = {
        "apiVersion": obj.get("apiVersion"),
        "kind": obj.get("kind"),
        "metadata": {
            key: metadata[key]
            for key in ("name", "namespace", "uid", "labels", "annotations", "ownerReferences")
            if key in metadata
        },
        "spec": obj.get("spec"),
        "status": obj.get("status"),
    }
    return copy.deepcopy(kept)


def _is_broker_deployment(obj: Mapping[str, Any]) -> bool:
    labels = (obj.get("metadata") or {}).get("labels") or {}
    return labels.get(COMPONENT_LABEL) == "broker" and BROKER_DEPLOYMENT_LABEL in labels


def _is_ingest(obj: Mapping[str, Any]) -> bool:
    return ((obj.get("metadata") or {}).get("labels") or {}).get(COMPONENT_LABEL) == INGEST


def _owner(body: Mapping[str, Any]) -> dict[str, Any]:
    """Just what `kopf.adopt` reads from the owner (a plain dict, whatever `body` is)."""
    metadata = body.get("metadata") or {}
    return {
        "apiVersion": body.get("apiVersion"),
        "kind": body.get("kind"),
        "metadata": {
            "name": metadata.get("name"),
            "namespace": metadata.get("namespace"),
            "uid": metadata.get("uid"),
            "labels": dict(metadata.get("labels") or {}),
        },
    }
