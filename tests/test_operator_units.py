"""The operator's pure decisions, table by table, and its membership sync against fakes and
real proxy processes. No Kubernetes needed."""

from __future__ import annotations

import asyncio
import copy
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from harness import ACCESS, proxy_status, wait_for
from kubernetes.client.rest import ApiException

from neoplasma.core.backoff import Backoff, BackoffPolicy
from neoplasma.core.control import IDLE, ProxyChannels
from neoplasma.core.membership import EMPTY, BrokerState, Member, Snapshot, next_snapshot
from neoplasma.core.push import MembershipPusher, PushResult
from neoplasma.core.tiers import Tier
from neoplasma.core.trust import PLAIN, Access, Tokens, bearer_metadata
from neoplasma.operator import conditions as c
from neoplasma.operator import observe as observe_module
from neoplasma.operator.children import (
    broker_deployments,
    desired_children,
    differences,
    index_value,
    plan,
)
from neoplasma.operator.controller import ClusterController, Wakeup
from neoplasma.operator.members import (
    Controlled,
    PodView,
    ProxyTarget,
    broker_members,
    controlled,
    current_replicaset,
    own_pods,
    pod_view,
    proxy_targets,
    ready_count,
)
from neoplasma.operator.metrics import Metrics
from neoplasma.operator.observe import Desired, Indexes, Seen
from neoplasma.operator.settings import Options
from neoplasma.operator.spec import Cluster, parse_spec
from neoplasma.operator.status import Observed, build_status, persisted_version, same_status
from neoplasma.operator.steps import Event, Membership
from neoplasma.operator.sync import (
    NEWS_GATHER,
    Convergence,
    Gathering,
    MembershipSync,
    Refresh,
    catch_up,
    resume_snapshot,
)

REPO = Path(__file__).resolve().parents[1]


# -- pods -> members and targets -------------------------------------------------------------


def pod(
    name: str,
    component: str = "broker",
    *,
    ready: bool = True,
    ip: str = "10.0.0.1",
    deleting: bool = False,
    restarts: int = 0,
    labels: dict[str, str] | None = None,
) -> dict[str, Any]:
    default_labels = {"app.kubernetes.io/name": "neoplasma", "app.kubernetes.io/instance": "demo",
                      "app.kubernetes.io/component": component}
    metadata: dict[str, Any] = {"name": name, "namespace": "ns", "uid": f"uid-{name}",
                                "labels": default_labels if labels is None else labels}
    if deleting:
        metadata["deletionTimestamp"] = "2024-01-01T00:00:00Z"
    status: dict[str, Any] = {
        "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        "containerStatuses": [{"restartCount": restarts}],
    }
    if ip:
        status["podIP"] = ip
    return {"metadata": metadata, "status": status}


@pytest.mark.parametrize(("body", "expected"), [
    (pod("b"), PodView("ns", "demo", "broker", "b", "uid-b", "10.0.0.1", True, False, 0)),
    (pod("p", "proxy", ready=False), PodView("ns", "demo", "proxy", "p", "uid-p", "10.0.0.1", False, False, 0)),
    (pod("b", deleting=True, restarts=2), PodView("ns", "demo", "broker", "b", "uid-b", "10.0.0.1", True, True, 2,
                                                  deletion="2024-01-01T00:00:00Z")),
    (pod("i", "ingest"), PodView("ns", "demo", "ingest", "i", "uid-i", "10.0.0.1", True, False, 0)),
    # Ready without an IP cannot be reached: not ready.
    (pod("b", ip=""), PodView("ns", "demo", "broker", "b", "uid-b", "", False, False, 0)),
    (pod("x", labels={"app.kubernetes.io/name": "other", "app.kubernetes.io/instance": "demo",
                      "app.kubernetes.io/component": "broker"}), None),
    (pod("x", labels={"app.kubernetes.io/name": "neoplasma", "app.kubernetes.io/instance": "demo"}), None),
    (pod("x", "operator"), None),
    ({"metadata": {}}, None),
], ids=["ready broker", "unready proxy", "deleting broker", "ingest reader", "no ip", "other app", "no component",
        "other component", "empty"])
def test_pod_view(body: dict[str, Any], expected: PodView | None) -> None:
    assert pod_view(body) == expected


def owned(obj: dict[str, Any], owner: str, *, controller: bool = True, kind: str = "ReplicaSet") -> dict[str, Any]:
    obj["metadata"]["ownerReferences"] = [{"apiVersion": "apps/v1", "kind": kind, "name": owner,
                                           "uid": owner, "controller": controller}]
    return obj


def deployment(uid: str, component: str, owner: str = "cluster-uid", *, controller: bool = True) -> dict[str, Any]:
    return owned({"kind": "Deployment", "metadata": {"name": uid, "uid": uid, "labels": {
        "app.kubernetes.io/component": component}}}, owner, controller=controller, kind="NeoplasmaCluster")


def test_only_pods_whose_controller_chain_leads_to_the_cluster_count() -> None:
    deployments = [deployment("d-broker", "broker"), deployment("d-proxy", "proxy"),
                   deployment("d-foreign", "broker", owner="other-cluster"),
                   deployment("d-loose", "broker", controller=False),
                   {"kind": "Service", "metadata": {"uid": "svc", "ownerReferences": [
                       {"uid": "cluster-uid", "controller": True}]}}]
    replicasets = [Controlled("rs-broker", "d-broker"), Controlled("rs-proxy", "d-proxy"),
                   Controlled("rs-foreign", "d-foreign"), Controlled("rs-loose", "d-loose"),
                   Controlled("rs-orphan", ""), Controlled("rs-svc", "svc")]
    pods = views(owned(pod("b"), "rs-broker"), owned(pod("p", "proxy"), "rs-proxy"),
                 pod("stray"),  # broker labels, no owner
                 owned(pod("foreign"), "rs-foreign"), owned(pod("loose"), "rs-loose"),
                 owned(pod("orphan"), "rs-orphan"), owned(pod("svc"), "rs-svc"),
                 owned(pod("not-controller"), "rs-broker", controller=False),
                 owned(pod("wrong-tier", "proxy"), "rs-broker"),  # a proxy pod of the broker Deployment
                 owned(pod("unknown-rs"), "rs-unknown"))
    assert [p.name for p in own_pods(pods, replicasets, deployments, "cluster-uid")] == ["b", "p"]
    assert own_pods(pods, replicasets, deployments, "") == []
    assert controlled({"metadata": {"uid": "rs-broker", "ownerReferences": [
        {"uid": "d-broker", "controller": True}]}}) == Controlled("rs-broker", "d-broker")
    assert controlled({"metadata": {"uid": "rs-2", "annotations": {"deployment.kubernetes.io/revision": "2"}}}) == \
        Controlled("rs-2", "", 2)
    assert controlled({"metadata": {"uid": "x", "annotations": {"deployment.kubernetes.io/revision": "-1"}}}) == \
        Controlled("x", "", 0)
    sets = [Controlled("rs-1", "d", 1), Controlled("rs-3", "d", 3), Controlled("rs-9", "other", 9)]
    assert (current_replicaset(sets, "d"), current_replicaset(sets, "none"), current_replicaset(sets, "")) == \
        ("rs-3", "", "")


def views(*bodies: dict[str, Any]) -> list[PodView]:
    found = [pod_view(b) for b in bodies]
    return [v for v in found if v is not None]


def test_ready_brokers_are_members_and_deleting_ones_drain() -> None:
    pods = views(
        pod("b2", ip="10.0.0.2"), pod("b1", ip="10.0.0.1", deleting=True), pod("b3", ready=False),
        pod("p1", "proxy"), pod("b6", ip="fd00::6"),
    )
    assert broker_members(pods) == [
        Member("b1", "10.0.0.1:50051", BrokerState.DRAINING),
        Member("b2", "10.0.0.2:50051", BrokerState.SERVING),
        Member("b6", "[fd00::6]:50051", BrokerState.SERVING),
    ]
    assert ready_count(pods, "broker") == 2  # b1 is going away


def test_ready_proxies_are_targets_and_a_restart_is_a_new_incarnation() -> None:
    pods = views(pod("p2", "proxy", ip="10.0.0.2"), pod("p1", "proxy", ip="10.0.0.1"),
                 pod("p3", "proxy", ready=False), pod("b1"))
    targets = proxy_targets(pods)
    assert list(targets) == ["p1", "p2"]
    assert targets["p1"].address == "10.0.0.1:50052"
    restarted = proxy_targets(views(pod("p1", "proxy", ip="10.0.0.1", restarts=1)))
    assert restarted["p1"].incarnation != targets["p1"].incarnation


# -- conditions ------------------------------------------------------------------------------


def progress(version: int = 3, brokers: int = 2, proxies: int = 2, acknowledged: int = 2,
             errors: dict[str, str] | None = None, seconds: float | None = None) -> c.MembershipProgress:
    return c.MembershipProgress(version, brokers, proxies, acknowledged, errors or {}, seconds)


@pytest.mark.parametrize(("membership", "status", "reason"), [
    (progress(), True, "AllProxiesApplied"),
    (progress(proxies=0, acknowledged=0), True, "NoReadyProxies"),
    (progress(acknowledged=1), False, "Pushing"),
    (progress(acknowledged=1, errors={"p2": "UNAVAILABLE: down"}), False, "PushFailed"),
])
def test_membership_synced(membership: c.MembershipProgress, status: bool, reason: str) -> None:
    condition = c.membership_synced(membership)
    assert (condition.type, condition.status, condition.reason) == ("MembershipSynced", status, reason)
    assert f"version {membership.version}" in condition.message


@pytest.mark.parametrize(("spec_error", "brokers", "proxies", "membership", "status", "reason", "words"), [
    (None, (2, 2), (2, 2), progress(), True, "AllReady", "2 brokers and 2 proxies ready"),
    ("spec.x: bad", (2, 2), (2, 2), progress(), False, "InvalidSpec", "spec.x: bad"),
    (None, (3, 2), (2, 2), progress(), False, "BrokersNotReady", "2 of 3 brokers ready"),
    (None, (2, 2), (1, 0), progress(proxies=0, acknowledged=0), False, "ProxiesNotReady", "0 of 1 proxy ready"),
    (None, (2, 2), (2, 2), progress(acknowledged=1), False, "MembershipNotSynced", "1 of 2 ready proxies"),
    (None, (0, 0), (0, 0), progress(brokers=0, proxies=0, acknowledged=0), True, "AllReady", "0 brokers"),
])
def test_ready(spec_error: str | None, brokers: tuple[int, int], proxies: tuple[int, int],
               membership: c.MembershipProgress, status: bool, reason: str, words: str) -> None:
    condition = c.ready(spec_error=spec_error, brokers=brokers, proxies=proxies,
                        membership=c.membership_synced(membership))
    assert (condition.status, condition.reason) == (status, reason)
    assert words in condition.message


def test_merge_keeps_transition_time_unless_status_changes() -> None:
    before = [
        {"type": "Ready", "status": "False", "reason": "BrokersNotReady", "message": "m", "lastTransitionTime": "T0"},
        {"type": "MembershipSynced", "status": "True", "reason": "AllProxiesApplied", "message": "m",
         "lastTransitionTime": "T0"},
        {"type": "Autoscaling", "status": "True", "lastTransitionTime": "T0"},  # someone else's
    ]
    merged = c.merge(before, [
        c.Condition("Ready", True, "AllReady", "now ready"),
        c.Condition("MembershipSynced", True, "AllProxiesApplied", "version 4"),
        c.Condition("SpecValid", None, "Unknown", "?"),
    ], now="T1")
    assert [(m["type"], m["status"], m["lastTransitionTime"]) for m in merged] == [
        ("Ready", "True", "T1"), ("MembershipSynced", "True", "T0"), ("SpecValid", "Unknown", "T1"),
        ("Autoscaling", "True", "T0"),
    ]
    assert merged[1]["message"] == "version 4"


@pytest.mark.parametrize(("number", "noun", "text"), [
    (1, "broker", "1 broker"), (2, "broker", "2 brokers"), (0, "ready proxy", "0 ready proxies"),
])
def test_count(number: int, noun: str, text: str) -> None:
    assert c.count(number, noun) == text


# -- children --------------------------------------------------------------------------------

OWNER = {"apiVersion": "neoplasma.io/v1alpha1", "kind": "NeoplasmaCluster",
         "metadata": {"name": "demo", "namespace": "ns", "uid": "owner-uid", "labels": {"team": "a"}}}


def children_of(spec: dict[str, Any]) -> list[dict[str, Any]]:
    cluster = Cluster(name="demo", namespace="ns", spec=parse_spec(spec))
    return desired_children(cluster, OWNER, default_image="img:1", policy_api="policy/v1beta1")


def as_served(manifest: dict[str, Any]) -> dict[str, Any]:
    """What the API server would hold: defaults and status added."""
    served = copy.deepcopy(manifest)
    served["metadata"].update(uid=f"uid-{manifest['metadata']['name']}", resourceVersion="9")
    if manifest["kind"] == "Deployment":
        served["spec"]["progressDeadlineSeconds"] = 600
        container = served["spec"]["template"]["spec"]["containers"][0]
        container.update(imagePullPolicy="IfNotPresent", terminationMessagePath="/dev/termination-log")
        container["readinessProbe"].update(timeoutSeconds=1, successThreshold=1)
        for env in container["env"]:
            env["valueFrom"]["fieldRef"]["apiVersion"] = "v1"
        served["status"] = {"replicas": 1, "readyReplicas": 1}
    if manifest["kind"] == "Service":
        served["spec"].update(clusterIP="10.96.0.10", sessionAffinity="None")
    return served


def test_children_are_owned_by_the_resource() -> None:
    for child in children_of({}):
        assert child["metadata"]["namespace"] == "ns"
        assert child["metadata"]["ownerReferences"] == [{
            "apiVersion": "neoplasma.io/v1alpha1", "kind": "NeoplasmaCluster", "name": "demo",
            "uid": "owner-uid", "controller": True, "blockOwnerDeletion": True,
        }]
        assert child["metadata"]["labels"]["team"] == "a"  # the owner's labels, as kopf.adopt does


def test_plan_is_empty_when_the_server_holds_what_was_rendered() -> None:
    desired = children_of({"brokers": {"replicas": 3, "maxPerDeployment": 2}})
    assert not plan(desired, [index_value(as_served(m)) for m in desired], "owner-uid")


def test_plan_creates_missing_updates_edited_and_deletes_unneeded_broker_deployments() -> None:
    served = [as_served(m) for m in children_of({"brokers": {"replicas": 3, "maxPerDeployment": 2}})]
    desired = children_of({"brokers": {"replicas": 2, "maxPerDeployment": 2}})
    edited = next(s for s in served if s["metadata"]["name"] == "demo-proxy" and s["kind"] == "Deployment")
    edited["spec"]["replicas"] = 7
    missing = [s for s in served if not (s["kind"] == "Service" and s["metadata"]["name"] == "demo-broker")]
    foreign = as_served(served[1])  # demo-broker-1 owned by someone else: never deleted
    foreign["metadata"].update(name="demo-broker-9", ownerReferences=[{"uid": "other"}])
    result = plan(desired, [*missing, foreign], "owner-uid")
    assert [(ch.action, ch.key, ch.fields) for ch in result.apply] == [
        ("create", ("Service", "demo-broker"), ()),
        ("update", ("Deployment", "demo-proxy"), ("spec.replicas",)),
    ]
    assert result.delete == [("Deployment", "demo-broker-1")]
    assert [ch.describe() for ch in result.apply] == [
        "created Service demo-broker", "updated Deployment demo-proxy (spec.replicas)"]


@pytest.mark.parametrize(("desired", "actual", "paths"), [
    ({"a": 1, "b": {"c": [1, 2]}}, {"a": 1, "b": {"c": [1, 2], "d": 0}, "e": 5}, []),
    ({"a": 1}, {"a": 2}, ["a"]),
    ({"a": {"b": [1, 2]}}, {"a": {"b": [1]}}, ["a.b"]),
    ({"a": [{"x": 1}]}, {"a": [{"x": 1, "y": 2}]}, []),
    ({"a": [{"x": 1}]}, {"a": [{"x": 2}]}, ["a[0].x"]),
    ({"r": {}, "l": [], "n": None}, {}, []),
    ({"r": {"x": 1}}, {}, ["r"]),
    ({"a": "1"}, {"a": 1}, ["a"]),
])
def test_differences(desired: Any, actual: Any, paths: list[str]) -> None:
    assert differences(desired, actual) == paths


def test_broker_deployment_rows() -> None:
    served = [index_value(as_served(m)) for m in children_of({"brokers": {"replicas": 3, "maxPerDeployment": 2}})]
    assert broker_deployments(served) == [
        {"name": "demo-broker-0", "replicas": 2, "ready": 1},
        {"name": "demo-broker-1", "replicas": 1, "ready": 1},
    ]


# -- status ----------------------------------------------------------------------------------


def observed(**overrides: Any) -> Observed:
    base: dict[str, Any] = dict(generation=4, spec_error=None, brokers=(2, 2), proxies=(2, 2),
                                deployments=[{"name": "d-broker-0", "replicas": 2, "ready": 2}],
                                membership=progress(seconds=0.25), connections=None)
    base.update(overrides)
    return Observed(**base)


def test_status_reports_counts_membership_and_conditions() -> None:
    status = build_status(observed(), {"connections": 17, "kopf": {"x": 1}}, now="T")
    assert status["observedGeneration"] == 4
    assert status["brokers"] == {"desired": 2, "ready": 2}
    assert status["membership"] == {"version": 3, "brokers": 2, "acknowledged": 2, "lagging": [],
                                    "lastConvergenceSeconds": 0.25}
    assert status["connections"] == 17  # kept until measured again
    assert "kopf" not in status
    assert [(x["type"], x["status"]) for x in status["conditions"]] == [
        ("Ready", "True"), ("MembershipSynced", "True"), ("SpecValid", "True"),
        ("AutoscalingPolicyValid", "True"), ("ReconciliationPaused", "False")]
    assert status["deploymentSizes"] == "2"
    assert status["autoscaling"] is None  # removes it (merge patch) while autoscaling is off
    assert same_status(status, {**status, "kopf": {}})
    assert not same_status(build_status(observed(connections=3), status, now="T"), status)


STANDBY = {"active": False, "ready": True, "reason": "standby: another reader holds the lease", "redis_error": None,
           "lease_error": None, "brokers_up": 1}
READING = {**STANDBY, "active": True, "reason": "active: reading Redis"}


@pytest.mark.parametrize(("readers", "status", "reason", "message"), [
    ([c.ReaderSeen("i-a", STANDBY), c.ReaderSeen("i-b", READING)], True, "Reading",
     "reader i-b reads r:6379; 1 reader standing by"),
    ([c.ReaderSeen("i-a", {**READING, "ready": False, "redis_error": "refused",
                           "reason": "cannot read Redis: refused"}), c.ReaderSeen("i-b", error="timeout")],
     False, "RedisUnreachable", "reader i-a: cannot read Redis: refused"),
    ([c.ReaderSeen("i-a", {**READING, "ready": False, "brokers_up": 0, "reason": "no broker accepts publishes"})],
     False, "BrokersUnavailable", "reader i-a: no broker accepts publishes"),
    ([c.ReaderSeen("i-a", {**STANDBY, "ready": False, "lease_error": "refused",
                           "reason": "cannot reach the lease: refused"})],
     False, "RedisUnreachable", "no reader holds the lease of r:6379; i-a: cannot reach the lease: refused"),
    ([c.ReaderSeen("i-a", STANDBY), c.ReaderSeen("i-b", STANDBY)], False, "NoActiveReader",
     "no reader holds the lease of r:6379 yet (a hand-over takes up to the lease's ttl); 2 readers standing by"),
    ([], False, "NoReader", "no ingest reader pod is running"),
    ([c.ReaderSeen("i-a", error="HTTP 401: no")], False, "ReadersUnreachable",
     "cannot read the readers' /stats: i-a: HTTP 401: no"),
])
def test_ingest_ready(readers: list[c.ReaderSeen], status: bool, reason: str, message: str) -> None:
    assert c.ingest_ready(readers, "r:6379") == c.Condition("IngestReady", status, reason, message)


def test_ingest_ready_is_in_status_while_ingest_is_set_and_goes_with_it() -> None:
    status = build_status(observed(ingest=("r:6379", [c.ReaderSeen("i-a", READING)])), {}, now="T")
    assert [(x["type"], x["status"], x["reason"]) for x in status["conditions"]][-1] == (
        "IngestReady", "True", "Reading")
    after = build_status(observed(), status, now="T2")
    assert "IngestReady" not in [x["type"] for x in after["conditions"]]


def test_plan_deletes_the_ingest_readers_once_spec_ingest_is_unset() -> None:
    ingest = {"ingest": {"redis": {"address": "r", "channels": ["plasma"]}}}
    served = [as_served(m) for m in children_of(ingest)]
    assert ("Deployment", "demo-ingest") in [(m["kind"], m["metadata"]["name"]) for m in served]
    assert not plan(children_of(ingest), served, "owner-uid")
    assert plan(children_of({}), served, "owner-uid").delete == [("Deployment", "demo-ingest")]


def test_status_names_at_most_ten_lagging_proxies_and_the_condition_at_most_five_failures() -> None:
    # 1000 ready proxies, 60 of them failing: status stays small and says which lag.
    errors = {f"p{i:03d}": "DEADLINE_EXCEEDED: Deadline Exceeded" for i in range(0, 120, 2)}
    lagging = (*sorted(errors), "p999")  # failing first, then one whose push is under way
    membership = c.MembershipProgress(7, 3, 1000, 939, errors, lagging=lagging)
    status = build_status(observed(proxies=(1000, 1000), membership=membership), {}, now="T")
    assert status["membership"]["lagging"] == [f"p{i:03d}" for i in range(0, 20, 2)]
    synced = {x["type"]: x for x in status["conditions"]}["MembershipSynced"]
    assert synced["reason"] == "PushFailed"
    assert synced["message"].count("DEADLINE_EXCEEDED") == 5 and "and 55 more" in synced["message"]
    assert len(json.dumps(status)) < 3000
    healed = build_status(observed(), status, now="T2")
    assert healed["membership"]["lagging"] == []  # written as [] (a merge patch would keep an absent key)


def test_status_keeps_the_last_convergence_time() -> None:
    previous = {"membership": {"version": 2, "lastConvergenceSeconds": 1.5}}
    status = build_status(observed(membership=progress(seconds=None)), previous, now="T")
    assert status["membership"]["lastConvergenceSeconds"] == 1.5


@pytest.mark.parametrize(("status", "version"), [
    (None, 0), ({}, 0), ({"membership": {"version": 12}}, 12), ({"membership": {"version": "12"}}, 0),
    ({"membership": {"version": -1}}, 0), ({"membership": "garbage"}, 0), ({"membership": {"version": True}}, 0),
])
def test_persisted_version(status: dict[str, Any] | None, version: int) -> None:
    assert persisted_version(status) == version


# -- membership versions ---------------------------------------------------------------------

B1, B2 = Member("b1", "10.0.0.1:50051"), Member("b2", "10.0.0.2:50051")


@pytest.mark.parametrize(("persisted", "members", "version"), [
    (0, [], 0),
    (0, [B1], 1),
    (7, [B1], 8),
    (7, [], 8),  # even "no brokers" is news to proxies that had version 7
])
def test_a_restarted_operator_continues_above_the_persisted_version(
    persisted: int, members: list[Member], version: int
) -> None:
    start = resume_snapshot(persisted)
    assert start == EMPTY if persisted == 0 else start.version == persisted
    assert next_snapshot(start, members).version == version


@pytest.mark.parametrize(("version", "applied", "expected"), [
    (5, [], 5), (5, [3, 5], 5), (5, [6], 7), (5, [9, 2], 10),
    # A proxy pinned high: never beyond what proxies accept, no overflow; absurd reports ignored.
    (5, [2**53 - 2], 2**53 - 1), (5, [2**53 - 1], 2**53 - 1), (5, [2**64 - 1, 7], 8), (5, [2**200], 5),
])
def test_catch_up(version: int, applied: list[int], expected: int) -> None:
    snapshot = Snapshot(version, (B1,))
    assert catch_up(snapshot, applied) == Snapshot(expected, (B1,))


def test_convergence_is_measured_from_the_first_unconverged_change() -> None:
    convergence = Convergence()
    convergence.changed(3, seen_at=10.0)
    assert convergence.check(3, all_applied=False, now=10.5) is None
    convergence.changed(4, seen_at=11.0)  # superseded before it converged
    assert convergence.check(3, all_applied=True, now=11.2) is None  # an older version is not enough
    assert convergence.check(4, all_applied=True, now=12.0) == pytest.approx(2.0)
    assert convergence.check(4, all_applied=True, now=13.0) is None  # nothing pending any more
    assert convergence.last_seconds == pytest.approx(2.0)


def test_backoff_doubles_to_a_ceiling_and_resets() -> None:
    backoff = Backoff(BackoffPolicy(initial=0.5, maximum=2.0))
    assert [backoff.failed(now=0.0) for _ in range(4)] == [0.5, 1.0, 2.0, 2.0]
    assert not backoff.due(now=1.0) and backoff.due(now=2.0)
    assert backoff.not_before == 2.0
    backoff.succeeded()
    assert backoff.due(now=0.0) and backoff.not_before is None
    jittered = BackoffPolicy(initial=1.0, maximum=8.0, jitter=True)
    assert [jittered.delay(n, rand=lambda: 0.5) for n in (0, 1, 3, 9)] == [0.0, 0.5, 2.0, 4.0]


# -- the sync loop, against a scripted pusher ------------------------------------------------


class FakePusher:
    """Answers pushes as `answer(target, snapshot)` says; records every push."""

    def __init__(self, answer: Callable[[str, Snapshot], PushResult] | None = None) -> None:
        self.answer = answer or (lambda target, snapshot: PushResult(target, "", True, snapshot.version))
        self.pushes: list[tuple[str, int]] = []
        self.access = PLAIN  # what the controller gives a pusher to reach the proxies with
        self.channels = ProxyChannels()  # the proxies' channels, which the controller's Status reads use

    async def push_one(self, target: str, address: str, snapshot: Snapshot) -> PushResult:
        self.pushes.append((target, snapshot.version))
        await asyncio.sleep(0)
        return self.answer(target, snapshot)

    def prune(self, keep: Any) -> None:
        pass

    async def close(self) -> None:
        pass


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def seen(pods: list[PodView], now: float, **parts: Any) -> Seen:
    """One pass's observation of a valid resource with these pods."""
    desired = Desired(1, None, None, paused=False, deleting=False)
    return Seen(now, "2026-12-07T06:00:00Z", {}, desired, pods, [], now, **parts)


def targets(*names: str, incarnation: str = "1") -> dict[str, ProxyTarget]:
    return {n: ProxyTarget(n, f"{n}:50052", incarnation) for n in names}


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_sync_pushes_each_new_version_to_every_ready_proxy_once() -> None:
    pusher, clock = FakePusher(), Clock()
    sync = MembershipSync(pusher, clock=clock)  # type: ignore[arg-type]
    sync.update([B1], targets("p1", "p2"), seen_at=clock.now)
    sync.push()  # the controller's act phase
    assert sync.settling_since() == clock.now  # pushes under way
    await settle()
    assert sorted(pusher.pushes) == [("p1", 1), ("p2", 1)]
    assert sync.settling_since() is None
    clock.now += 0.3
    sync.update([B1], targets("p1", "p2"), seen_at=clock.now)  # nothing changed: nothing to push
    sync.push()  # the controller's act phase
    await settle()
    assert len(pusher.pushes) == 2
    assert sync.progress() == c.MembershipProgress(1, 1, 2, 2, {}, sync.convergence.last_seconds)
    assert sync.convergence.last_seconds is not None
    for _ in range(2):  # anti-entropy pushes again, version unchanged, each proxy at its own phase
        due = sync.next_due()
        assert due is not None and clock.now < due <= clock.now + 1.5 * sync.refresh.interval
        clock.now = due
        sync.update([B1], targets("p1", "p2"), seen_at=clock.now)
        sync.push()  # the controller's act phase
        await settle()
    assert sorted(pusher.pushes[2:]) == [("p1", 1), ("p2", 1)]
    await sync.close()


async def test_sync_reports_each_convergence_to_the_operators_metrics() -> None:
    pusher, clock, metrics = FakePusher(), Clock(), Metrics()
    key = ("ns", "c")
    sync = MembershipSync(pusher, clock=clock,  # type: ignore[arg-type]
                          on_converged=lambda seconds: metrics.converged(key, seconds))
    sync.update([B1], targets("p1", "p2"), seen_at=clock.now - 1.5)  # the broker change was seen 1.5 s ago
    sync.push()  # the controller's act phase
    await settle()
    sync.update([B1], targets("p1", "p2"), seen_at=clock.now)  # nothing new: no second observation
    sync.push()
    await settle()
    count = metrics.registry.get_sample_value("neoplasma_cluster_membership_convergence_seconds_count",
                                              {"namespace": "ns", "cluster": "c"})
    total = metrics.registry.get_sample_value("neoplasma_cluster_membership_convergence_seconds_sum",
                                              {"namespace": "ns", "cluster": "c"})
    assert (count, total) == (1, 1.5)
    metrics.reconciled(key, 0.02, ok=True)
    metrics.forget(key)
    assert metrics.registry.get_sample_value("neoplasma_operator_reconcile_duration_seconds_count",
                                             {"namespace": "ns", "cluster": "c", "result": "ok"}) is None
    await sync.close()


async def test_sync_retries_a_failed_proxy_with_backoff_and_reports_it() -> None:
    down = {"p2"}
    pusher, clock = FakePusher(lambda t, s: PushResult(t, "", t not in down, 0 if t in down else s.version,
                                                       "UNAVAILABLE: refused" if t in down else "")), Clock()
    sync = MembershipSync(pusher, clock=clock)  # type: ignore[arg-type]
    sync.update([B1, B2], targets("p1", "p2"), seen_at=clock.now)
    sync.push()  # the controller's act phase
    await settle()
    assert (sync.progress().version, sync.progress().errors) == (1, {"p2": "UNAVAILABLE: refused"})
    assert sync.settling_since() is None  # failing: status says so at once
    assert sync.progress().acknowledged == 1 and sync.progress().errors == {"p2": "UNAVAILABLE: refused"}
    retry_at = sync.next_due()
    assert retry_at is not None and retry_at == clock.now + 0.1  # RETRY's first delay, before p1's anti-entropy
    sync.update([B1, B2], targets("p1", "p2"), seen_at=clock.now)  # not due yet
    sync.push()  # the controller's act phase
    await settle()
    assert pusher.pushes.count(("p2", 1)) == 1
    down.clear()
    clock.now = retry_at
    sync.update([B1, B2], targets("p1", "p2"), seen_at=clock.now)
    sync.push()  # the controller's act phase
    await settle()
    assert pusher.pushes.count(("p2", 1)) == 2
    assert sync.progress().acknowledged == 2 and not sync.progress().errors
    assert (sync.next_due() or 0.0) >= clock.now + sync.refresh.interval / 2  # only anti-entropy is due now
    await sync.close()


async def test_sync_pushes_again_to_a_restarted_proxy_and_forgets_gone_ones() -> None:
    pusher, clock = FakePusher(), Clock()
    sync = MembershipSync(pusher, clock=clock)  # type: ignore[arg-type]
    sync.update([B1], targets("p1", "p2"), seen_at=clock.now)
    sync.push()  # the controller's act phase
    await settle()
    sync.update([B1], {**targets("p1"), **targets("p2", incarnation="2")}, seen_at=clock.now)
    sync.push()  # the controller's act phase
    await settle()
    assert pusher.pushes.count(("p2", 1)) == 2 and pusher.pushes.count(("p1", 1)) == 1
    sync.update([B1], targets("p1"), seen_at=clock.now)
    sync.push()  # the controller's act phase
    assert sync.progress().proxies == 1 and sync.progress().acknowledged == 1
    await sync.close()


async def test_sync_wakes_the_controller_for_news_not_for_each_acknowledgement() -> None:
    # 300 proxies acknowledge one by one: one wake-up (the version is everywhere), not 300 passes over them.
    down = {"p007"}
    pusher, clock, wakes = FakePusher(lambda t, s: PushResult(t, "", t not in down, 0 if t in down else s.version,
                                                              "UNAVAILABLE: down" if t in down else "")), Clock(), []
    sync = MembershipSync(pusher, clock=clock, on_progress=lambda: wakes.append(clock.now))  # type: ignore[arg-type]
    names = [f"p{i:03d}" for i in range(300)]
    sync.update([B1], targets(*names), seen_at=clock.now)
    sync.push()
    for _ in range(20):
        await settle()
    assert len(wakes) == 1  # p007 failed: news (status, an Event, its retry)
    assert sync.progress().acknowledged == 299 and sync.progress().lagging == ("p007",)
    down.clear()
    clock.now = sync.next_due() or 0.0
    sync.update([B1], targets(*names), seen_at=clock.now)
    sync.push()
    await wait_for(lambda: len(wakes) == 2, 5, "the recovery told")  # (within NEWS_GATHER of the failure's wake)
    assert len(wakes) == 2  # recovered, and with it the version is everywhere
    assert sync.progress().acknowledged == 300 and sync.progress().lagging == ()
    assert sync.convergence.pending_version is None
    await sync.close()


async def test_sync_gathers_the_news_of_proxies_failing_together_into_one_wake() -> None:
    # 50 frozen proxies' pushes of a change fail together: the first wakes the controller at once, the others are told
    # in one wake NEWS_GATHER later (each one's wake was a pass over every pod: ~30 passes at 1000 proxies).
    down = {f"p{i:03d}" for i in range(0, 1000, 20)}
    pusher = FakePusher(lambda t, s: PushResult(t, "", t not in down, 0 if t in down else s.version,
                                                "DEADLINE_EXCEEDED: frozen" if t in down else ""))
    loop, wakes = asyncio.get_running_loop(), []
    sync = MembershipSync(pusher, on_progress=lambda: wakes.append(loop.time()))  # type: ignore[arg-type]
    names = [f"p{i:03d}" for i in range(1000)]
    sync.update([B1], targets(*names), seen_at=0.0)
    sync.push()
    await wait_for(lambda: len(sync.progress().errors) == len(down), 5, "every frozen push failed")
    await wait_for(lambda: len(wakes) == 2, 5, "the gathered news told")
    assert wakes[1] - wakes[0] >= NEWS_GATHER * 0.9  # (the loop's timer may fire a little early)
    for _ in range(5):
        await asyncio.sleep(NEWS_GATHER / 2)  # (the wakes a change brings are all in; none more come)
    assert len(wakes) == 2
    await sync.close()


def test_news_is_told_at_once_or_gathered_until_the_end_of_the_interval() -> None:
    gathering = Gathering(every=0.05)
    assert gathering.news(10.0) == 0  # the first: at once
    assert gathering.news(10.01) == pytest.approx(0.04)  # then at the end of the interval...
    assert gathering.news(10.02) is None  # ...which tells these too
    gathering.told(10.05)
    assert gathering.news(10.07) == pytest.approx(0.03)
    gathering.told(10.1)
    assert gathering.news(10.2) == 0  # quiet for an interval: at once again


async def test_sync_names_the_lagging_proxies_failing_first() -> None:
    down = {"p3"}
    release = asyncio.Event()

    class Held(FakePusher):
        async def push_one(self, target: str, address: str, snapshot: Snapshot) -> PushResult:
            if target == "p1":
                await release.wait()  # a push under way
            return await super().push_one(target, address, snapshot)

    pusher = Held(lambda t, s: PushResult(t, "", t not in down, 0 if t in down else s.version,
                                          "DEADLINE_EXCEEDED" if t in down else ""))
    sync = MembershipSync(pusher, clock=Clock())  # type: ignore[arg-type]
    sync.update([B1], targets("p1", "p2", "p3"), seen_at=0.0)
    sync.push()
    await settle()
    assert sync.progress().lagging == ("p3", "p1") and sync.progress().acknowledged == 1
    release.set()
    await settle()
    assert sync.progress().lagging == ("p3",)
    sync.update([B1], {**targets("p1", "p2"), **targets("p3", incarnation="2")}, seen_at=0.0)  # p3 restarted
    sync.update([B1], targets("p1"), seen_at=0.0)  # p2 and p3 went away
    assert sync.progress().lagging == () and sync.progress().acknowledged == 1
    await sync.close()


async def test_sync_moves_past_a_version_a_proxy_already_has() -> None:
    # The proxy runs version 9, pushed by an operator that crashed before writing its status.
    pusher = FakePusher(lambda t, s: PushResult(t, "", True, max(9, s.version)))
    sync = MembershipSync(pusher, version=4, clock=Clock())  # type: ignore[arg-type]
    sync.update([B1], targets("p1"), seen_at=0.0)
    sync.push()  # the controller's act phase
    await settle()
    assert pusher.pushes == [("p1", 5), ("p1", 10)]
    assert sync.snapshot == Snapshot(10, (B1,))
    assert sync.progress().acknowledged == 1
    await sync.close()


async def test_every_pushed_snapshot_names_the_cluster_whatever_its_version() -> None:
    clusters: list[str] = []
    pusher = FakePusher(lambda t, s: (clusters.append(s.cluster), PushResult(t, "", True, max(9, s.version)))[1])
    sync = MembershipSync(pusher, version=4, clock=Clock(), cluster="uid-1")  # type: ignore[arg-type]
    assert sync.snapshot.version == 4  # versions as without a cluster id
    sync.update([B1], targets("p1"), seen_at=0.0)
    sync.push()  # the controller's act phase
    await settle()
    sync.update([B1, B2], targets("p1"), seen_at=0.0)
    sync.push()  # the controller's act phase
    await settle()
    assert pusher.pushes == [("p1", 5), ("p1", 10), ("p1", 11)]
    assert sync.snapshot == Snapshot(11, (B1, B2), "uid-1")
    assert set(clusters) == {"uid-1"}
    await sync.close()


async def test_a_push_failure_is_reported_when_it_starts_and_again_when_it_returns() -> None:
    down = {"p1"}
    pusher = FakePusher(lambda t, s: PushResult(t, "", t not in down, 0 if t in down else s.version,
                                                "UNAVAILABLE: refused" if t in down else ""))
    clock = Clock()
    membership = Membership(MembershipSync(pusher, clock=clock))  # type: ignore[arg-type]
    pods = views(pod("b1"), pod("p1", "proxy"))
    reported: list[Event] = []

    async def passes(n: int = 2) -> None:  # a pass starts the push, the next one sees how it went
        for _ in range(n):
            decision = membership.decide(seen(pods, clock.now), clock.now)
            reported.extend(e for e in decision.events if e.reason == "PushFailed")
            if decision.push:
                membership.sync.push()  # the controller's act phase
            await settle()

    await passes(3)
    assert [(e.warning, e.message) for e in reported] == [
        (True, "proxy pod p1 has not applied membership version 1: UNAVAILABLE: refused; retrying with backoff")]
    down.clear()  # recovers...
    clock.now += 5.0
    await passes()
    assert membership.sync.progress().acknowledged == 1 and len(reported) == 1
    down.add("p1")  # ...and fails again (the anti-entropy push): news again
    assert membership.due is not None
    clock.now = membership.due
    await passes()
    assert len(reported) == 2 and reported[1] == reported[0]
    await membership.sync.close()


def test_anti_entropy_gives_each_proxy_its_own_phase_once_per_interval() -> None:
    refresh = Refresh(interval=5.0, slots=10)
    names = [f"mesh-proxy-{i:04d}" for i in range(1000)]
    per_slot = [0] * 10
    for name in names:
        per_slot[round(refresh.phase(name) / 0.5)] += 1
    assert min(per_slot) >= 60 and max(per_slot) <= 140  # ~100 of 1000 at each of the 10 phases
    for name in names[:50]:
        for confirmed in (0.0, 1.3, 4.99, 100.0):
            due = refresh.due_at(name, confirmed)
            assert confirmed + 2.5 <= due < confirmed + 7.5  # not soon after a confirmation, never long after
            assert (due - refresh.phase(name)) / 5.0 == pytest.approx(round((due - refresh.phase(name)) / 5.0))
            assert refresh.due_at(name, due) == pytest.approx(due + 5.0)  # then every interval, on its phase
    with pytest.raises(ValueError, match="interval > 0"):
        Refresh(interval=0.0)


async def test_anti_entropy_spreads_over_the_interval_and_a_change_pre_empts_it() -> None:
    # 1000 proxies acknowledged a change at once: their anti-entropy pushes come a slot at a time.
    pusher, clock = FakePusher(), Clock()
    sync = MembershipSync(pusher, clock=clock)  # type: ignore[arg-type]
    names = [f"mesh-proxy-{i:04d}" for i in range(1000)]
    sync.update([B1], targets(*names), seen_at=clock.now)
    sync.push()
    for _ in range(5):
        await settle()
    assert len(pusher.pushes) == 1000 and sync.progress().acknowledged == 1000
    confirmed, batches = clock.now, []
    while (due := sync.next_due()) is not None and due < confirmed + 7.5:
        clock.now = due
        before = len(pusher.pushes)
        sync.update([B1], targets(*names), seen_at=clock.now)
        sync.push()
        for _ in range(5):
            await settle()
        batches.append(len(pusher.pushes) - before)
    assert len(batches) == 10 and sum(batches) == 1000 and max(batches) <= 140  # never all at once
    # A change: every proxy gets the new version at once, and no anti-entropy push follows it soon.
    before = len(pusher.pushes)
    sync.update([B1, B2], targets(*names), seen_at=clock.now)
    sync.push()
    for _ in range(5):
        await settle()
    assert pusher.pushes[before:].count(("mesh-proxy-0000", 2)) == 1 and len(pusher.pushes) == before + 1000
    assert (sync.next_due() or 0.0) >= clock.now + 2.5
    await sync.close()


async def test_reads_of_every_proxy_wait_for_a_change_s_pushes_but_not_for_failing_ones() -> None:
    release = asyncio.Event()

    class Held(FakePusher):
        async def push_one(self, target: str, address: str, snapshot: Snapshot) -> PushResult:
            if target == "slow" or (target == "frozen" and self.pushes.count(("frozen", 1)) > 0):
                await release.wait()  # answers late / never again
            return await super().push_one(target, address, snapshot)

    pusher = Held(lambda t, s: PushResult(t, "", t != "frozen", 0 if t == "frozen" else s.version,
                                          "" if t != "frozen" else "DEADLINE_EXCEEDED"))
    clock = Clock()
    sync = MembershipSync(pusher, clock=clock)  # type: ignore[arg-type]
    sync.update([B1], targets("p1", "slow", "frozen"), seen_at=clock.now)
    sync.push()
    await settle()  # frozen failed once: known failing
    clock.now = sync.next_due() or 0.0
    sync.push()  # frozen's retry, under way (held)
    await settle()
    waiting = asyncio.ensure_future(sync.pushed(timeout=5.0))
    await settle()
    assert not waiting.done()  # the push to "slow" is under way
    release.set()
    await asyncio.wait_for(waiting, 1.0)  # ended with it, frozen's retry does not hold it
    started = time.monotonic()
    release.clear()
    sync.update([B1, B2], targets("p1", "slow", "frozen"), seen_at=clock.now)
    sync.push()
    await sync.pushed(timeout=0.05)  # bounded: returns after the timeout though "slow" still holds its push
    assert time.monotonic() - started < 1.0
    release.set()
    await sync.close()


async def test_reads_of_every_proxy_do_not_wait_for_anti_entropy_pushes() -> None:
    release, started = asyncio.Event(), []

    class Held(FakePusher):
        async def push_one(self, target: str, address: str, snapshot: Snapshot) -> PushResult:
            started.append((target, snapshot.version))
            if started.count((target, snapshot.version)) > 1:
                await release.wait()  # an anti-entropy push to a proxy answering late
            return await super().push_one(target, address, snapshot)

    pusher, clock = Held(lambda t, s: PushResult(t, "", True, s.version)), Clock()
    sync = MembershipSync(pusher, clock=clock)  # type: ignore[arg-type]
    sync.update([B1], targets("p1"), seen_at=clock.now)
    sync.push()
    await settle()
    clock.now = sync.next_due() or 0.0
    sync.push()  # anti-entropy: p1 runs the version and is pushed it again (held)
    await settle()
    assert started == [("p1", 1), ("p1", 1)]
    await asyncio.wait_for(sync.pushed(timeout=5.0), 1.0)  # not a change's push: nothing to wait for
    release.set()
    await sync.close()


async def test_a_failed_anti_entropy_push_makes_the_proxy_lag_and_retries_it() -> None:
    down: set[str] = set()
    pusher, clock = FakePusher(lambda t, s: PushResult(t, "", t not in down, 0 if t in down else s.version,
                                                       "UNAVAILABLE: refused" if t in down else "")), Clock()
    sync = MembershipSync(pusher, clock=clock)  # type: ignore[arg-type]
    sync.update([B1], targets("p1"), seen_at=clock.now)
    sync.push()
    await settle()
    down.add("p1")  # restarted unnoticed, or gone: its anti-entropy push fails
    clock.now = sync.next_due() or 0.0
    sync.push()
    await settle()
    assert sync.progress().lagging == ("p1",) and sync.progress().errors == {"p1": "UNAVAILABLE: refused"}
    assert sync.next_due() == clock.now + 0.1  # retried with backoff, not at its next phase
    await sync.close()


async def test_proxy_channels_are_made_once_per_proxy_and_again_for_other_tls() -> None:
    clock = Clock()
    channels = ProxyChannels(clock)
    first = channels.stub("10.0.0.1:50052", PLAIN)
    assert channels.stub("10.0.0.1:50052", Access(Tokens(given=["t"]))) is first  # the credential goes per call
    channels.stub("10.0.0.2:50052", PLAIN)
    assert len(channels) == 2
    tls = Access(ca="-----BEGIN CERTIFICATE-----\nnot parsed until a call\n-----END CERTIFICATE-----\n",
                 server_name="demo-proxy")
    assert channels.stub("10.0.0.1:50052", tls) is not first  # other TLS settings: a new channel
    channels.prune(["10.0.0.1:50052"])
    assert len(channels) == 2  # 10.0.0.2's was used just now (by a call that may be under way): kept
    clock.now += IDLE
    channels.prune(["10.0.0.1:50052"])
    assert len(channels) == 1  # unused for IDLE seconds: closed
    await channels.close()
    assert len(channels) == 0


def test_a_pod_change_is_answered_at_once_and_a_burst_once_per_debounce() -> None:
    wakeup = Wakeup()
    assert wakeup.pods_due(0.2) is None  # nothing seen
    wakeup.set(pods_at=10.0)
    assert wakeup.pods_due(0.2) == 10.0  # the first change: at once
    assert wakeup.take(10.0) == 10.0
    wakeup.set(pods_at=10.05)  # another within the debounce...
    wakeup.set(pods_at=10.1)
    assert wakeup.pods_due(0.2) == pytest.approx(10.2)  # ...waits, gathered with the rest of the burst
    assert wakeup.take(10.2) == 10.05
    wakeup.set()  # a wake-up for something else: no wait
    assert wakeup.pods_due(0.2) is None
    wakeup.take(11.0)
    wakeup.set(pods_at=11.5)  # a change after a quiet debounce: at once again
    assert wakeup.pods_due(0.2) == 11.5


# -- the sync loop, against real proxies -----------------------------------------------------


async def test_sync_brings_real_proxies_to_the_brokers(start: Any) -> None:
    brokers = [start("broker", f"b{i}") for i in range(2)]
    proxies = [start("proxy", f"p{i}") for i in range(2)]
    woken = asyncio.Event()
    sync = MembershipSync(MembershipPusher(access=ACCESS), on_progress=woken.set)
    members = [Member(b.name, b.endpoints["grpc"]) for b in brokers]
    ready = {p.name: ProxyTarget(p.name, p.endpoints["control"], "1") for p in proxies}
    sync.update(members, ready, seen_at=asyncio.get_running_loop().time())
    sync.push()  # the controller's act phase
    await wait_for(lambda: sync.progress().acknowledged == 2, 10, "both proxies applied")
    for proxy in proxies:
        status = await proxy_status(proxy.endpoints["control"])
        assert status.membership_version == 1
        assert {link.name for link in status.links} == {"b0", "b1"}
    assert woken.is_set()
    await sync.close()


# -- one cluster's controller, against a fake API -------------------------------------------


class FakeKube:
    """Records what the controller writes; the "server" state is the test's indexes.
    The first `fail_apply` applies and `fail_status` status writes fail (503)."""

    def __init__(self, fail_apply: int = 0, fail_status: int = 0) -> None:
        self.applied: list[tuple[str, str]] = []
        self.deleted: list[tuple[str, str]] = []
        self.statuses: list[dict[str, Any]] = []
        self.secrets: dict[str, dict[str, str]] = {}
        self.failures = {"apply": fail_apply, "status": fail_status}
        self.lock = threading.Lock()  # the controller calls from worker threads

    def _maybe_fail(self, call: str) -> None:
        with self.lock:
            if self.failures[call] > 0:
                self.failures[call] -= 1
                raise ApiException(status=503, reason="Service Unavailable")

    def apply(self, manifest: dict[str, Any]) -> None:
        self._maybe_fail("apply")
        with self.lock:
            self.applied.append((manifest["kind"], manifest["metadata"]["name"]))

    def delete(self, kind: str, namespace: str, name: str) -> None:
        self.deleted.append((kind, name))

    def read_secret(self, namespace: str, name: str) -> dict[str, str] | None:
        return self.secrets.get(name)

    def create_secret(self, manifest: dict[str, Any]) -> None:
        self.secrets.setdefault(manifest["metadata"]["name"], dict(manifest["stringData"]))

    def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> bool:
        self._maybe_fail("status")
        self.statuses.append(copy.deepcopy(status))
        return True

    def close(self) -> None:
        pass


def resource(spec: dict[str, Any], generation: int = 1, version: str = "1") -> dict[str, Any]:
    return {**OWNER, "metadata": {**OWNER["metadata"], "generation": generation, "resourceVersion": version},
            "spec": spec}


OPTIONS = Options(default_image="img:1", policy_api="policy/v1beta1", debounce=0.01, anti_entropy=60,
                  stats_interval=60, resync=60, retry_initial=0.05)
# A pass runs as soon as the controller is woken, and whatever it retries comes back after
# `retry_initial` (then doubling); with every other timer at 60 s, nothing happening over three
# first retry delays after a wake-up means the controller decided to do nothing.
QUIET = 3 * OPTIONS.retry_initial


async def holds_for(predicate: Callable[[], Any], seconds: float, what: str, interval: float = 0.01) -> None:
    """Assert that `predicate` (sync or async) stays true throughout `seconds`: nothing changed."""
    deadline = time.monotonic() + seconds
    while True:
        value = predicate()
        if isinstance(value, Awaitable):
            value = await value
        assert value, f"{what}: changed within {seconds} s"
        if time.monotonic() > deadline:
            return
        await asyncio.sleep(interval)


async def test_controller_reports_a_garbage_spec_once_and_does_not_retry() -> None:
    kube, children = FakeKube(), {}
    body = resource({"proxies": {"service": {"type": "ClusterIP", "nodePorts": {"sse": 30080}}}})
    controller = ClusterController(("ns", "demo"), body, Indexes({}, [children]), kube, OPTIONS)  # type: ignore[arg-type]
    controller.start()
    await wait_for(lambda: kube.statuses, 5, "a status")
    [status] = kube.statuses
    conditions = {x["type"]: x for x in status["conditions"]}
    assert conditions["SpecValid"]["reason"] == "InvalidSpec"
    assert "spec.proxies.service.nodePorts" in conditions["SpecValid"]["message"]
    assert conditions["Ready"]["status"] == "False" and status["observedGeneration"] == 1
    # kopf hands over the resource again (our own status write, say): nothing new happens.
    for version in range(2, 6):
        controller.set_body({**resource(body["spec"], version=str(version)), "status": status})
        await holds_for(lambda: kube.applied == [] and len(kube.statuses) == 1, QUIET, "nothing applied or written")
    # Fixed: children are applied, the condition flips.
    controller.set_body(resource({"proxies": {"service": {"type": "NodePort"}}}, generation=2, version="7"))
    await wait_for(lambda: len(kube.applied) == 8, 5, "8 children applied (6, and 2 NetworkPolicies)")
    await wait_for(lambda: kube.statuses[-1]["observedGeneration"] == 2, 5, "generation 2 observed")
    assert {x["type"]: x["status"] for x in kube.statuses[-1]["conditions"]}["SpecValid"] == "True"
    await controller.stop()


async def test_controller_applies_only_what_differs_and_deletes_unneeded_broker_deployments() -> None:
    kube = FakeKube()
    children: dict[tuple[str, str], list[dict[str, Any]]] = {}
    served = [index_value(as_served(m)) for m in children_of({"brokers": {"replicas": 3, "maxPerDeployment": 2}})]
    children[("ns", "demo")] = served
    body = resource({"brokers": {"replicas": 2, "maxPerDeployment": 2}})
    controller = ClusterController(("ns", "demo"), body, Indexes({}, [children]), kube, OPTIONS)  # type: ignore[arg-type]
    controller.start()
    await wait_for(lambda: kube.deleted, 5, "a deletion")
    assert kube.deleted == [("Deployment", "demo-broker-1")] and kube.applied == []
    children[("ns", "demo")] = [x for x in served if x["metadata"]["name"] != "demo-broker-1"]
    controller.wake(children=True)
    await holds_for(lambda: kube.deleted == [("Deployment", "demo-broker-1")] and kube.applied == [], QUIET,
                    "nothing more deleted or applied")
    await controller.stop()


async def test_controller_creates_the_credential_once_and_pushes_with_it() -> None:
    kube = FakeKube()
    controller = ClusterController(("ns", "demo"), resource({}), Indexes({}, [{}]), kube, OPTIONS)  # type: ignore[arg-type]
    assert len(vars(controller)) <= 13  # the steps hold the state; the controller schedules and acts (its I/O:
    # the API client, the brokers' channels; the proxies' are the pusher's)
    controller.start()
    await wait_for(lambda: controller.steps.trust.access[Tier.PROXY] is not PLAIN, 5, "the credential read")
    [token] = [kube.secrets["demo-credential"]["credential"]]
    assert len(token) >= 43 and controller.steps.membership.sync.pusher.access.metadata() == bearer_metadata(token)
    kube.secrets["demo-credential"] = {"credential": "rotated"}  # replaced: read again when a child changes
    controller.wake(children=True)
    await wait_for(lambda: controller.steps.membership.sync.pusher.access.metadata() == bearer_metadata("rotated"), 5,
                   "the rotated credential used")
    assert kube.secrets["demo-credential"] == {"credential": "rotated"}  # never overwritten
    await controller.stop()


async def test_controller_pushes_a_membership_change_without_waiting_for_the_proxies_status(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # A proxy that never answers its Status makes the proxies' read take the whole read timeout (here 3 s);
    # a new proxy must get the membership meanwhile, not after it.
    reads: list[str] = []

    async def frozen_statuses(addresses: Any, access: Any = None, timeout: float = 0.0,
                              channels: Any = None, gate: Any = None) -> dict[str, Any]:
        reads.append("started")
        await asyncio.sleep(timeout)
        reads.append("ended")
        return {}

    monkeypatch.setattr(observe_module, "proxy_statuses", frozen_statuses)
    key = ("ns", "demo")
    pods = {key: [PodView("ns", "demo", "broker", "b0", "u-b0", "10.0.0.1", True, owner="rs-b"),
                  PodView("ns", "demo", "proxy", "p0", "u-p0", "10.0.1.1", True, owner="rs-p")]}
    served = {key: [deployment("d-b", "broker", owner="owner-uid"), deployment("d-p", "proxy", owner="owner-uid")]}
    replicasets = {key: [Controlled("rs-b", "d-b"), Controlled("rs-p", "d-p")]}
    options = Options(**{**OPTIONS.__dict__, "read_timeout": 3.0})
    controller = ClusterController(key, resource({}), Indexes(pods, [served], replicasets), FakeKube(),  # type: ignore[arg-type]
                                   options)
    pusher = controller.steps.membership.sync.pusher = FakePusher()  # type: ignore[assignment]
    controller.start()
    await wait_for(lambda: ("p0", 1) in pusher.pushes, 5, "the first membership pushed")
    pods[key].append(PodView("ns", "demo", "proxy", "p1", "u-p1", "10.0.1.2", True, owner="rs-p"))
    controller.wake(pods=True, proxies=True)  # a proxy turned Ready...
    await wait_for(lambda: ("p1", 1) in pusher.pushes, 5, "the membership pushed to the new proxy")
    assert reads == ["started"]  # ...pushed while the first pass's read still waits
    # Once it ended, the pass the pod change asked for runs in full (the proxies' Status read again).
    await wait_for(lambda: reads[2:] == ["started"], 10, "a full pass after the read ended")
    await controller.stop()


async def test_controller_retries_api_failures_with_backoff() -> None:
    kube = FakeKube(fail_apply=3, fail_status=2)
    controller = ClusterController(("ns", "demo"), resource({}), Indexes({}, [{}]), kube, OPTIONS)  # type: ignore[arg-type]
    controller.start()
    await wait_for(lambda: len(set(kube.applied)) == 8, 5, "every child applied in the end")
    await wait_for(lambda: kube.statuses, 5, "a status in the end")
    assert kube.failures == {"apply": 0, "status": 0}
    assert kube.statuses[-1]["observedGeneration"] == 1
    await controller.stop()


async def test_controller_reports_a_failure_once_while_it_lasts_and_again_when_it_returns() -> None:
    kube, events = FakeKube(fail_status=3), []
    controller = ClusterController(("ns", "demo"), resource({}), Indexes({}, [{}]), kube, OPTIONS,  # type: ignore[arg-type]
                                   post=events.append)

    def warnings() -> list[str]:
        return [e.message for e in events if e.warning and e.reason == "StatusFailed"]

    controller.start()
    await wait_for(lambda: kube.statuses, 5, "a status once the API answers again")
    assert kube.failures["status"] == 0  # three attempts failed...
    assert len(warnings()) == 1 and "API error 503 Service Unavailable" in warnings()[0]  # ...one Warning
    kube.failures["status"] = 1  # the same failure comes back
    controller.set_body(resource({"brokers": {"replicas": 2}}, generation=2, version="2"))
    await wait_for(lambda: kube.statuses[-1]["observedGeneration"] == 2, 5, "generation 2 observed")
    assert len(warnings()) == 2 and warnings()[1].startswith("writing status failed: API error 503")
    await controller.stop()


# -- the command ------------------------------------------------------------------------------


def test_operator_without_kubernetes_says_what_to_do(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "KUBECONFIG": str(tmp_path / "missing")}
    with socket.socket() as probe:  # a port known to be free: the default 8080 may be taken on this machine
        probe.bind(("0.0.0.0", 0))
        port = probe.getsockname()[1]
    result = subprocess.run([sys.executable, "-m", "neoplasma", "operator", "--liveness-port", str(port)], env=env,
                            capture_output=True, text=True, timeout=60, cwd=REPO)
    assert result.returncode == 1
    assert "cannot reach Kubernetes" in result.stderr and "KUBECONFIG" in result.stderr


def test_operator_with_its_port_taken_says_what_to_do(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "neoplasma", "operator", "--liveness-port", str(port)],
                                capture_output=True, text=True, timeout=60, cwd=REPO)
    assert result.returncode == 1
    assert f"cannot listen on 0.0.0.0:{port}" in result.stderr and "--liveness-port" in result.stderr


def test_settled_heap_leaves_what_start_up_made_out_of_collections() -> None:
    """settle_heap (what `neoplasma operator` calls once started) freezes the ~90,000 objects the operator's
    imports make, so a full collection no longer visits them, and raises the first threshold. In a child:
    a frozen heap would stay frozen in this process."""
    code = """
import gc, json
import neoplasma.operator.main
from neoplasma.core.memory import YOUNG_THRESHOLD, settle_heap
before = len(gc.get_objects())
settle_heap("test")
print(json.dumps({"before": before, "after": len(gc.get_objects()), "frozen": gc.get_freeze_count(),
                  "young": gc.get_threshold()[0], "expected_young": YOUNG_THRESHOLD}))
"""
    out = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                    timeout=60).stdout.splitlines()[-1])
    assert out["before"] > 50_000, out  # the Kubernetes client, kopf, grpc: what made full collections long
    assert out["frozen"] >= out["before"] * 0.9, out
    assert out["after"] < out["before"] / 10, out
    assert out["young"] == out["expected_young"] > 700, out
