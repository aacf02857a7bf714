"""Each step of the operator's pass on its own: pure, over one observation (observe.Seen) and a
time. No event loop, no API server, no network: plain function calls (the controller around them
is tested in test_operator_units.py against a fake API, and in test_operator_kube.py for real)."""

from __future__ import annotations

from typing import Any

from test_operator_units import OPTIONS, OWNER, FakePusher, as_served, children_of, resource

from neoplasma.core.autoscaler import Autoscaler
from neoplasma.core.scaling import Load
from neoplasma.core.tiers import Tier
from neoplasma.core.trust import PLAIN, bearer_metadata
from neoplasma.operator.conditions import ReaderSeen
from neoplasma.operator.members import PodView
from neoplasma.operator.observe import Desired, Seen, TrustSeen, Wants
from neoplasma.operator.spec import parse_cluster
from neoplasma.operator.steps import Failing, Steps
from neoplasma.operator.sync import MembershipSync
from neoplasma.wire.v1 import neoplasma_pb2 as pb

NOW = 1000.0
STAMP = "2026-12-07T06:00:00Z"
AUTOSCALE = {"neoplasma.io/autoscale": "true", "neoplasma.io/target-connections-per-broker": "4"}


def body_of(spec: dict[str, Any] | None = None, annotations: dict[str, str] | None = None, generation: int = 1,
            deleting: bool = False) -> dict[str, Any]:
    body = resource(spec or {}, generation=generation)
    body["metadata"] = {**body["metadata"], "annotations": annotations or {},
                        **({"deletionTimestamp": "2026-12-07T05:59:00Z"} if deleting else {})}
    return body


def steps_for(body: dict[str, Any], pusher: FakePusher | None = None) -> Steps:
    sync = MembershipSync(pusher or FakePusher(), clock=lambda: NOW, cluster="owner-uid")  # type: ignore[arg-type]
    return Steps(body, OPTIONS, sync, NOW)


def broker(name: str, ip: str = "10.0.0.1", *, ready: bool = True, deleting: bool = False) -> PodView:
    return PodView("ns", "demo", "broker", name, f"uid-{name}", ip, ready, deleting)


def proxy(name: str, ip: str = "10.0.1.1") -> PodView:
    return PodView("ns", "demo", "proxy", name, f"uid-{name}", ip, True)


def seen_of(steps: Steps, body: dict[str, Any], now: float = NOW, pods: list[PodView] | None = None,
            **parts: Any) -> Seen:
    """The observation of one pass: the resource read by the Resource step, and `parts` as read."""
    desired, _ = steps.resource.step(body)
    return Seen(now, STAMP, body, desired, pods or [], parts.pop("children", []), now, **parts)


# -- Trust ------------------------------------------------------------------------------------


def test_trust_is_read_at_first_then_when_stale_or_due() -> None:
    body = body_of()
    steps = steps_for(body)
    desired, _ = steps.resource.step(body)
    assert steps.trust.to_read(desired, NOW)  # stale at first
    steps.trust.decide(seen_of(steps, body, trust=TrustSeen({"credential": "tok"})), NOW)
    assert not steps.trust.to_read(desired, NOW + 1)  # read and good: not again...
    assert steps.trust.to_read(desired, NOW + OPTIONS.anti_entropy)  # ...until it is due
    deleting, _ = steps_for(body_of(deleting=True)).resource.step(body_of(deleting=True))
    assert not steps_for(body).trust.to_read(deleting, NOW)


def test_trust_makes_the_credential_when_there_is_none_and_uses_it() -> None:
    body = body_of()
    steps = steps_for(body)
    decision = steps.trust.decide(seen_of(steps, body, trust=TrustSeen(None)), NOW)
    assert decision.secret is not None and decision.access is not None
    token = decision.secret["stringData"]["credential"]
    assert len(token) >= 43
    assert decision.secret["metadata"]["ownerReferences"][0]["uid"] == "owner-uid"
    assert [(e.reason, e.message) for e in decision.events] == [
        ("Created", "created Secret demo-credential (the cluster credential)")]
    assert decision.access[Tier.PROXY].metadata() == bearer_metadata(token)
    assert steps.trust.stale  # read back on the next pass


def test_trust_with_spec_tls_reaches_each_tier_by_its_service_name() -> None:
    body = body_of({"tls": {"secretName": "demo-tls"}})
    steps = steps_for(body)
    decision = steps.trust.decide(seen_of(steps, body, trust=TrustSeen({"credential": " tok\n"}, "PEM")), NOW)
    assert decision.access is not None and decision.secret is None and not decision.events
    assert {tier: (a.ca, a.server_name) for tier, a in decision.access.items()} == {
        Tier.BROKER: ("PEM", "demo-broker.ns.svc"), Tier.PROXY: ("PEM", "demo-proxy.ns.svc")}
    assert decision.access[Tier.BROKER].metadata() == bearer_metadata("tok")


def test_trust_problems_keep_the_last_access_and_are_reported_once() -> None:
    body = body_of()
    steps = steps_for(body)
    empty = seen_of(steps, body, trust=TrustSeen({"other": "x"}))
    first = steps.trust.decide(empty, NOW)
    assert first.access is None and [(e.reason, e.warning) for e in first.events] == [("CredentialFailed", True)]
    assert "has no key 'credential': delete it to have a new one made" in first.events[0].message
    assert steps.trust.decide(empty, NOW + 1).events == []  # the same problem: no news
    failed = seen_of(steps, body, trust=TrustSeen(error="API error 503 Service Unavailable: down"))
    [event] = steps.trust.decide(failed, NOW + 2).events
    assert event.message == ("reading the cluster credential failed: API error 503 Service Unavailable: down; "
                             "keeping the last one")
    assert steps.trust.reach(parse_cluster(body), failed.trust) == {tier: PLAIN for tier in Tier}
    good = TrustSeen({"credential": "tok"})
    assert steps.trust.reach(parse_cluster(body), good)[Tier.BROKER].metadata() == bearer_metadata("tok")


# -- Membership -------------------------------------------------------------------------------


def test_membership_decides_the_snapshot_and_leaves_the_pushes_to_the_act_phase() -> None:
    pusher = FakePusher()
    body = body_of()
    steps = steps_for(body, pusher)
    pods = [broker("b1"), broker("b2", "10.0.0.2", deleting=True), proxy("p1")]
    decision = steps.membership.decide(seen_of(steps, body, pods=pods), NOW)
    assert [(e.reason, e.message) for e in decision.events] == [
        ("MembershipChanged", "membership version 1: 2 brokers (1 draining), pushing to 1 ready proxy")]
    assert decision.push is True and pusher.pushes == []  # deciding starts no push: the act phase does
    assert steps.membership.sync.snapshot.version == 1
    again = steps.membership.decide(seen_of(steps, body, pods=pods), NOW + 1)
    assert again.events == []  # nothing changed (the sync pushes only what is due: tests/test_operator_units.py)
    assert steps.membership.due == steps.membership.sync.next_due()


# -- Scaling ----------------------------------------------------------------------------------


def test_scaling_reads_the_serving_brokers_stats_once_for_its_load() -> None:
    body = body_of({"brokers": {"replicas": 1, "maxPerDeployment": 2}}, {**AUTOSCALE, "neoplasma.io/max-brokers": "3"})
    steps = steps_for(body)
    desired, _ = steps.resource.step(body)
    assert steps.scaling.to_read(desired, NOW) == [Tier.BROKER]
    wants = steps.wants(desired, NOW + OPTIONS.scale_interval)
    assert wants.loads == (Tier.BROKER,) and wants.trust
    pods = [broker("b1"), broker("b2", "10.0.0.2", deleting=True)]
    stats = {"b1": pb.BrokerStats(connections=14, events_in_per_second=5.0), "b2": pb.BrokerStats(connections=99)}
    seen = seen_of(steps, body, pods=pods, wants=Wants(loads=(Tier.BROKER,), connections=True), brokers=stats)
    assert steps.scaling.loads(seen) == {Tier.BROKER: Load(total=14, pods_read=1, events_per_second=5.0)}
    decision = steps.scaling.decide(seen, NOW)
    assert [(e.reason, e.message) for e in decision.events] == [("ScaledBrokers", decision.scaled[0].describe())]
    assert [(c.tier, c.before, c.after) for c in decision.scaled] == [(Tier.BROKER, 1, 3)]
    assert steps.scaling.effective is not None and steps.scaling.effective.spec.brokers.replicas == 3
    autoscaling = steps.resource.autoscaler.status(1, 2)
    assert autoscaling is not None and autoscaling["brokers"]["lastScaleTime"] == STAMP  # the pass's time
    assert steps.status.connections(seen) == 113  # status counts every ready broker, draining too


def test_scaling_without_loads_renders_the_specs_sizes() -> None:
    body = body_of({"brokers": {"replicas": 2}, "proxies": {"replicas": 3}})
    steps = steps_for(body)
    assert steps.scaling.decide(seen_of(steps, body), NOW).scaled == []
    assert steps.scaling.effective is not None
    assert (steps.scaling.effective.spec.brokers.replicas, steps.scaling.effective.spec.proxies.replicas) == (2, 3)
    assert Autoscaler().autoscaled() == []


# -- Children ---------------------------------------------------------------------------------


def test_children_plan_what_differs_once_until_a_child_changes() -> None:
    body = body_of()
    steps = steps_for(body)
    seen = seen_of(steps, body)
    steps.scaling.decide(seen, NOW)
    first = steps.children.decide(seen, NOW)
    assert first.plan is not None and len(first.plan.apply) == 8 and first.plan.delete == []
    steps.children.applied(seen.desired, steps.scaling.effective)  # type: ignore[arg-type]
    assert steps.children.decide(seen, NOW + 1).plan is None  # converged, nothing changed
    steps.children.dirty = True  # a child changed
    served = [as_served(m) for m in children_of({})]
    assert not steps.children.decide(seen_of(steps, body, children=served), NOW + 2).plan  # holds what is rendered
    assert steps.children.decide(seen, NOW + OPTIONS.resync).plan is not None  # resync: look again
    paused = body_of(annotations={"neoplasma.io/pause-reconciliation": "true"})
    assert steps.children.decide(seen_of(steps, paused), NOW + 3).plan is None


def test_children_after_a_failure_wait_for_the_backoff() -> None:
    body = body_of()
    steps = steps_for(body)
    seen = seen_of(steps, body)
    steps.scaling.decide(seen, NOW)
    assert steps.children.decide(seen, NOW).plan is not None
    [event] = steps.children.failed("API error 503", NOW)
    assert event.reason == "ReconcileFailed" and event.warning
    assert steps.children.decide(seen, NOW).plan is None  # not before the backoff says
    assert steps.children.decide(seen, NOW + OPTIONS.retry_initial).plan is not None
    assert steps.children.failed("API error 503", NOW + OPTIONS.retry_initial) == []  # the same: no news


# -- Status -----------------------------------------------------------------------------------


def test_status_is_built_from_the_observation_and_the_other_steps() -> None:
    body = body_of({"brokers": {"replicas": 2}, "proxies": {"replicas": 2},
                    "ingest": {"redis": {"address": "redis:6379", "channels": ["plasma"]}}})
    steps = steps_for(body)
    desired, _ = steps.resource.step(body)
    wants = steps.wants(desired, NOW)
    assert wants.connections and wants.readers and wants.trust
    pods = [broker("b1"), proxy("p1")]
    seen = seen_of(steps, body, pods=pods, wants=wants, brokers={"b1": pb.BrokerStats(connections=7)},
                   readers=[ReaderSeen("r1", error="refused")])
    steps.scaling.decide(seen, NOW)
    decision = steps.status.decide(seen, NOW)
    assert decision.observed is not None and decision.observed.connections == 7
    assert decision.observed.brokers == (2, 1) and decision.observed.proxies == (2, 1)
    assert decision.observed.ingest == ("redis:6379", [ReaderSeen("r1", error="refused")])
    status = decision.status
    assert status is not None and status["observedGeneration"] == 1
    assert all(c["lastTransitionTime"] == STAMP for c in status["conditions"])
    assert steps.status.to_read(desired, NOW + 1) is False  # the next read of connections is due later
    steps.status.written(True)
    steps_unchanged = steps.status.decide(seen, NOW + 1)
    assert steps_unchanged.status is None and steps_unchanged.observed is not None  # written already


def test_status_waits_for_a_push_under_way_and_says_nothing_while_deleting() -> None:
    pusher = FakePusher()
    body = body_of()
    steps = steps_for(body, pusher)
    seen = seen_of(steps, body, pods=[broker("b1"), proxy("p1")])
    steps.membership.decide(seen, NOW)  # a new version, not yet pushed: settling
    decision = steps.status.decide(seen, NOW)
    assert decision.status is None and steps.status.due_at == NOW + OPTIONS.sync_grace
    assert steps.status.decide(seen, NOW + OPTIONS.sync_grace).status is not None
    deleting = body_of(deleting=True)
    gone = steps.status.decide(seen_of(steps, deleting), NOW)
    assert gone.status is None and gone.observed is None and steps.status.due_at is None


# -- Connections ------------------------------------------------------------------------------


def proxies_seen(unmovable: dict[str, int] | None = None, **subscribers: int) -> dict[str, pb.ProxyStatus]:
    return {name: pb.ProxyStatus(name=name, subscribers=n, movable_subscribers=n - (unmovable or {}).get(name, 0))
            for name, n in subscribers.items()}


def test_connections_read_every_proxy_and_limit_them_while_one_is_hot() -> None:
    body = body_of({"proxies": {"replicas": 3}}, {"neoplasma.io/max-reconnects-per-second": "30"})
    steps = steps_for(body)
    desired, _ = steps.resource.step(body)
    assert steps.wants(desired, NOW).proxies  # read at first, then every scale interval
    pods = [proxy("p0", "10.0.1.1"), proxy("p1", "10.0.1.2"), proxy("p2", "10.0.1.3")]
    seen = seen_of(steps, body, pods=pods, proxies=proxies_seen(p0=60, p1=0, p2=0))
    steps.scaling.decide(seen, NOW)
    decision = steps.connections.decide(seen, NOW)
    assert not steps.wants(desired, NOW + 1).proxies
    planned, _ = steps.resource.step(body_of({"proxies": {"replicas": 3}}, {"neoplasma.io/rebalance": "plan"}))
    assert steps.wants(planned, NOW + 1).proxies  # the annotations changed: at once
    steps.resource.step(body)
    assert decision.drains == {
        "10.0.1.1:50052": pb.DrainRequest(keep_at_most=22, reconnects_per_second=30, hold_seconds=30),
        "10.0.1.2:50052": pb.DrainRequest(keep_at_most=22, reconnects_per_second=0.1, hold_seconds=30),
        "10.0.1.3:50052": pb.DrainRequest(keep_at_most=22, reconnects_per_second=0.1, hold_seconds=30)}
    assert [e.reason for e in decision.events] == ["Rebalance"]
    assert steps.connections.due == NOW + steps.connections.BUSY  # read more often while moving
    status = steps.status.decide(seen, NOW).status
    assert status is not None and status["rebalance"]["state"] == "Running"
    assert "plan" in status["rebalance"] and "approval" not in status["rebalance"]  # no null for a key never set
    assert status["reconnects"]["inProgress"][0]["kind"] == "rebalance"
    assert status["rebalance"]["received"] == [{"proxy": p, "at": "2026-12-07T06:00:00Z"} for p in ("p1", "p2")]


def test_connections_move_only_what_the_proxies_report_movable() -> None:
    body = body_of({"proxies": {"replicas": 3}}, {"neoplasma.io/max-reconnects-per-second": "30"})
    steps = steps_for(body)
    steps.resource.step(body)
    pods = [proxy("p0", "10.0.1.1"), proxy("p1", "10.0.1.2"), proxy("p2", "10.0.1.3")]
    seen = seen_of(steps, body, pods=pods, proxies=proxies_seen({"p0": 50}, p0=60, p1=0, p2=0))
    steps.scaling.decide(seen, NOW)
    decision = steps.connections.decide(seen, NOW)
    assert decision.drains["10.0.1.1:50052"] == pb.DrainRequest(keep_at_most=50, reconnects_per_second=30,
                                                                hold_seconds=30)  # its 10 movable ones
    # Every one of p0's subscribers a plasma stream: nothing to send, and status says why.
    fresh = steps_for(body)
    fresh.resource.step(body)
    stuck = seen_of(fresh, body, pods=pods, proxies=proxies_seen({"p0": 60}, p0=60, p1=0, p2=0))
    fresh.scaling.decide(stuck, NOW)
    assert fresh.connections.decide(stuck, NOW).drains == {}
    rebalance = fresh.connections.rebalance
    assert rebalance is not None and rebalance["state"] == "Unmovable" and rebalance["unmovable"] == 60


def test_connections_pace_a_stopping_pod_and_pause_stops_rebalancing() -> None:
    body = body_of({"proxies": {"replicas": 2}}, {"neoplasma.io/max-reconnects-per-second": "50",
                                                  "neoplasma.io/pause-reconciliation": "true"})
    steps = steps_for(body)
    stopping = PodView("ns", "demo", "proxy", "old", "uid-old", "10.0.1.9", False, True, owner="rs-1",
                       deletion="2026-12-07T06:02:00Z")
    pods = [proxy("p0", "10.0.1.1"), proxy("p1", "10.0.1.2"), stopping]
    seen = seen_of(steps, body, pods=pods, proxies=proxies_seen(p0=60, p1=0, old=900))
    decision = steps.connections.decide(seen, NOW)
    assert decision.drains == {"10.0.1.9:50052": pb.DrainRequest(reconnects_per_second=50)}
    assert steps.connections.rebalance is not None and steps.connections.rebalance["state"] == "Off"
    assert steps.connections.reconnects == {"budget": 50.0, "reconnectsPerSecond": 50.0, "inProgress": [
        {"kind": "eviction", "name": "old", "subscribersLeft": 900, "reconnectsPerSecond": 50.0, "etaSeconds": 18}]}


def test_proxy_drains_are_rendered_from_the_budget_and_a_new_budget_applies_them() -> None:
    body = body_of({"proxies": {"replicas": 2}})
    steps = steps_for(body)
    seen = seen_of(steps, body)
    steps.scaling.decide(seen, NOW)
    plan = steps.children.decide(seen, NOW).plan
    assert plan is not None
    proxy_deployment = next(c.manifest for c in plan.apply if c.manifest["metadata"]["name"] == "demo-proxy")
    assert proxy_deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 140
    cluster = steps.scaling.effective
    assert cluster is not None
    steps.children.applied(seen.desired, cluster)
    assert steps.children.decide(seen, NOW + 1).plan is None
    cheaper = body_of({"proxies": {"replicas": 2}}, {"neoplasma.io/max-reconnects-per-second": "100"})
    seen = seen_of(steps, cheaper, NOW + 2)
    steps.scaling.decide(seen, NOW + 2)
    again = steps.children.decide(seen, NOW + 2).plan
    assert again is not None and any(c.manifest["metadata"]["name"] == "demo-proxy" for c in again.apply)


# -- the pass as a whole ----------------------------------------------------------------------


def test_the_steps_run_in_one_order_over_one_observation() -> None:
    steps = steps_for(body_of())
    assert [type(s).__name__ for s in steps.sequence()] == ["Trust", "Membership", "Scaling", "Connections",
                                                             "Children", "Status"]
    assert steps.due == NOW  # the status's first read of connections
    deleting, _ = steps.resource.step(body_of(deleting=True))
    assert steps.wants(deleting, NOW) == Wants()


def test_a_failing_pass_backs_off_and_is_reported_once_while_it_lasts() -> None:
    failing = Failing(OPTIONS.retry)
    delay, events = failing.failed("KeyError: 'x'", NOW)
    assert delay == OPTIONS.retry_initial
    assert [(e.reason, e.message, e.warning) for e in events] == [
        ("ReconcileFailed", f"KeyError: 'x'; retrying in {delay:g} s", True)]
    delay2, again = failing.failed("KeyError: 'x'", NOW + delay)
    assert delay2 == 2 * delay and again == []
    failing.succeeded()
    assert failing.retry.not_before is None
    assert failing.failed("KeyError: 'x'", NOW)[1] != []  # back after clearing: news again


def test_desired_from_the_resource() -> None:
    steps = steps_for(body_of())
    desired, events = steps.resource.step(body_of(generation=3))
    assert desired == Desired(3, parse_cluster(body_of()), None, False, False) and events == []
    assert OWNER["metadata"]["uid"] == "owner-uid"
