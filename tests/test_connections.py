"""Connections as a managed resource (operator/neoplasma/operator/connections.py): the annotations,
the rebalance plan, the shared reconnect budget, the grace period. Pure: no event loop, no API."""

from __future__ import annotations

import math
import random
from datetime import UTC, datetime, timedelta

import pytest

from neoplasma.core.autoscaler import Autoscaler, problems
from neoplasma.core.scaling import (
    DEFAULT_MAX_RECONNECTS,
    MAX_RECONNECTS,
    REBALANCE,
    REBALANCE_TOLERANCE,
    ConnectionPolicy,
    parse_connections,
)
from neoplasma.operator.connections import (
    COOLDOWN,
    MAX_GRACE_SECONDS,
    MAX_RECEIVED,
    REBALANCE_SHARE_WITH_DRAINS,
    Connections,
    Limit,
    Operation,
    Pace,
    PodSeen,
    ProxySeen,
    Rebalancer,
    Round,
    covered_subscribers,
    drain_kind,
    grace_seconds,
    max_unavailable,
    plan_rebalance,
    pods_seen,
    received_from_status,
    received_to_status,
    replan,
    share_budget,
    split_rate,
)
from neoplasma.operator.members import PodView
from neoplasma.operator.status import present

READY = 60.0  # seconds every proxy of these tests has been ready


def proxies(*counts: int) -> list[ProxySeen]:
    return [ProxySeen(f"p{i}", n, READY) for i, n in enumerate(counts)]


# -- annotations ------------------------------------------------------------------------------


def test_connection_annotations_default_and_parse() -> None:
    assert parse_connections({}) == (ConnectionPolicy("auto", 0.1, DEFAULT_MAX_RECONNECTS), [])
    policy, errors = parse_connections({REBALANCE: " Plan ", REBALANCE_TOLERANCE: "0.25", MAX_RECONNECTS: "50"})
    assert errors == [] and policy == ConnectionPolicy("plan", 0.25, 50.0)


@pytest.mark.parametrize(("annotation", "value", "problem"), [
    (REBALANCE, "sometimes", "'sometimes' is not one of auto, off, plan, approve"),
    (REBALANCE_TOLERANCE, "1.5", "'1.5' must be below 1"),
    (REBALANCE_TOLERANCE, "-0.1", "'-0.1' must be a positive number"),
    (MAX_RECONNECTS, "0", "'0' must be a positive number"),
    (MAX_RECONNECTS, "0.5", "'0.5' is outside 1..100000 reconnects per second"),
    (MAX_RECONNECTS, "1e9", "'1e9' is outside 1..100000"),
    (MAX_RECONNECTS, "nan", "'nan' must be a positive number"),
    (MAX_RECONNECTS, "lots", "'lots' is not a number"),
    (MAX_RECONNECTS, "9" * 65, "is 65 characters long; values are at most 64"),
])
def test_bad_connection_annotations_are_reported_never_raised(annotation: str, value: str, problem: str) -> None:
    policy, errors = parse_connections({annotation: value})
    assert policy is None and len(errors) == 1
    assert errors[0].annotation == annotation and problem in str(errors[0])


def test_the_autoscaler_reports_bad_connection_annotations_and_keeps_the_last_good_policy() -> None:
    scaler = Autoscaler()
    scaler.read({MAX_RECONNECTS: "100", REBALANCE: "off"}, 1, 2)
    assert scaler.errors == () and scaler.connections == ConnectionPolicy("off", 0.1, 100.0)
    scaler.read({MAX_RECONNECTS: "fast", REBALANCE: "auto"}, 1, 2)
    assert problems(scaler.errors) == "neoplasma.io/max-reconnects-per-second: 'fast' is not a number"
    assert scaler.connections == ConnectionPolicy("off", 0.1, 100.0)  # the last good one, as a whole
    assert scaler.policy is not None  # autoscaling's own policy is unaffected


# -- the plan ---------------------------------------------------------------------------------


def test_after_scale_up_the_hot_proxy_sheds_down_to_the_cap_and_everyone_is_limited() -> None:
    plan = plan_rebalance(proxies(61, 0, 0), 0.1)
    assert plan.cap == 22  # max(ceil(20.33), floor(1.1 x 20.33))
    assert plan.moves == {"p0": 39} and dict(plan.limits) == {"p0": 22, "p1": 22, "p2": 22}
    assert sum(plan.limits.values()) >= 61  # room for every subscriber: the limits cannot deadlock
    assert plan.to_status(20.0) == {"cap": 22, "subscribers": 39, "moves": [{"from": "p0", "subscribers": 39}],
                                    "reconnectsPerSecond": 20.0, "etaSeconds": 2}


@pytest.mark.parametrize(("counts", "reason"), [
    ((100,), "fewer than 2 proxies"),
    ((0, 0, 0), "no subscribers"),
    ((21, 20, 20), "balanced: the busiest proxy holds 21, within 1.1 x the average 20.3"),
    ((2, 1), "as even as whole subscribers allow (at most 2 per proxy)"),
])
def test_nothing_to_move(counts: tuple[int, ...], reason: str) -> None:
    plan = plan_rebalance(proxies(*counts), 0.1)
    assert not plan.moves and reason in plan.reason


def test_a_proxy_not_ready_long_enough_is_waited_for() -> None:
    seen = [ProxySeen("p0", 60, READY), ProxySeen("p1", 0, 3.0), ProxySeen("p2", 0, None)]
    plan = plan_rebalance(seen, 0.1)
    assert not plan.moves and plan.reason == "waiting for p1, p2 to be ready for 10 s"


def test_every_proxy_over_the_cap_sheds_the_excess() -> None:
    plan = plan_rebalance(proxies(40, 35, 0, 5), 0.1)
    assert plan.cap == 22 and plan.moves == {"p0": 18, "p1": 13}


def test_what_a_proxy_received_is_not_moved_again_no_ping_pong() -> None:
    """The proxies count subscribers moved to them less than 600 s ago as unmovable: p1 received 30
    of p0's and later holds 40; only its 10 others may go (a proxy that received is no longer
    barred from shedding as a whole: after a scale-in it may hold many subscribers never moved)."""
    received = [ProxySeen("p0", 25, READY), ProxySeen("p1", 40, READY, unmovable=30)]
    again = plan_rebalance(received, 0.1)
    assert again.moves == {"p1": 5} and again.limits["p1"] == 35
    held = plan_rebalance([ProxySeen("p0", 10, READY), ProxySeen("p1", 40, READY, unmovable=40)], 0.1)
    assert not held.moves and "subscribers moved less than 600 s ago are not moved again" in held.reason


def kube_proxy(limits: dict[str, int], counts: dict[str, int], arrivals: int, rng: random.Random,
               lag: int) -> int:
    """Reconnects landing as through a Service: each picks a proxy at random among those the
    endpoints still list (a full proxy stays listed for `lag` more picks: readiness lags); a full
    one refuses it and the client tries again. Returns the bounces."""
    listed_until = {name: math.inf for name in counts}
    picks = bounces = 0
    while arrivals:
        picks += 1
        name = rng.choice([n for n in counts if listed_until[n] > picks])
        if counts[name] >= limits[name]:
            bounces += 1
            listed_until[name] = min(listed_until[name], picks + lag)
            continue
        counts[name] += 1
        arrivals -= 1
    return bounces


@pytest.mark.parametrize("seed", range(20))
def test_moves_land_elsewhere_and_converge_whatever_kube_proxy_picks(seed: int) -> None:
    rng = random.Random(seed)
    counts = {"p0": rng.randint(60, 400), "p1": 0, "p2": 0, "p3": rng.randint(0, 30)}
    plan = plan_rebalance([ProxySeen(n, c, READY) for n, c in counts.items()], 0.1)
    limits = dict(plan.limits)
    total = sum(counts.values())
    for name, n in plan.moves.items():
        counts[name] -= n
    bounces = kube_proxy(limits, counts, plan.moved, rng, lag=10)
    assert sum(counts.values()) == total
    assert max(counts.values()) <= plan.cap <= 1.1 * total / 4 + 1
    assert bounces < plan.moved  # a few per proxy filling up, not one per move


def test_replan_runs_the_shown_plan_for_the_proxies_there_are_now() -> None:
    shown = plan_rebalance(proxies(61, 0, 0), 0.1).to_status(None)
    now = [ProxySeen("p0", 50, READY), ProxySeen("p1", 5, READY), ProxySeen("p3", 0, READY)]
    plan = replan(shown, now)
    assert plan.moves == {"p0": 28} and plan.limits == {"p0": 22, "p1": 22, "p3": 22}
    shrunk = replan(shown, [ProxySeen("p0", 90, READY), ProxySeen("p1", 0, READY)])
    assert shrunk.moves == {"p0": 39} and shrunk.limits["p0"] == 51  # never more than was approved
    assert "unreadable" in replan({"cap": "x"}, now).reason


# -- the budget -------------------------------------------------------------------------------


def test_concurrent_drains_share_the_budget_and_a_running_rebalance_keeps_a_tenth() -> None:
    ops = [Operation("rollout", "proxy-a", 5000), Operation("scale-in", "proxy-b", 3000),
           Operation("eviction", "proxy-c", 0), Operation("rebalance", "rebalance", 400)]
    shares = share_budget(200, ops)
    rates = [s.rate for s in shares]
    assert rates == pytest.approx([90, 90, 0, 20])
    assert sum(rates) <= 200 + 1e-9 and not any(s.forced for s in shares)
    assert shares[0].to_status() == {"kind": "rollout", "name": "proxy-a", "subscribersLeft": 5000,
                                     "reconnectsPerSecond": 90.0, "etaSeconds": 56}
    assert share_budget(200, [Operation("rebalance", "rebalance", 400)])[0].rate == 200
    assert REBALANCE_SHARE_WITH_DRAINS == 0.1


def test_a_drain_that_would_be_killed_first_gets_what_it_needs_the_others_share_the_rest() -> None:
    ops = [Operation("rollout", "a", 3000, seconds_left=25.0), Operation("scale-in", "b", 10_000, 600.0),
           Operation("scale-in", "c", 10_000, 600.0)]
    shares = share_budget(200, ops)
    assert shares[0].rate == pytest.approx(150) and shares[0].forced  # 3000 in the 20 s before the margin
    assert [s.rate for s in shares[1:]] == pytest.approx([25, 25]) and sum(s.rate for s in shares) == 200
    over = share_budget(100, [Operation("rollout", "a", 3000, 25.0), Operation("rollout", "b", 3000, 25.0)])
    assert [s.rate for s in over] == pytest.approx([150, 150]) and all(s.forced for s in over)
    assert over[0].to_status()["overBudget"] is True


def test_split_rate_is_proportional_so_sources_end_together() -> None:
    assert split_rate(100, {"a": 30, "b": 10, "c": 0}) == {"a": 75, "b": 25}
    assert split_rate(100, {}) == {}


# -- grace period and disruption budget -------------------------------------------------------


def test_grace_period_covers_the_busiest_proxy_at_the_budget_and_changes_only_when_load_doubles() -> None:
    assert covered_subscribers(0) == covered_subscribers(25_000) == 25_000
    assert covered_subscribers(25_001) == covered_subscribers(32_768) == 32_768
    assert grace_seconds(200, 1000, drain_delay=5) == 5 + 125 + 10
    assert grace_seconds(200, 30_000, drain_delay=5) == 5 + math.ceil(32_768 / 200) + 10
    assert grace_seconds(1, 1000, drain_delay=5) == MAX_GRACE_SECONDS  # then drains are sped up (forced)


def test_max_unavailable_lets_as_many_drain_at_once_as_the_budget_allows() -> None:
    assert max_unavailable(200, 25_000, window=125, replicas=20) == 1
    assert max_unavailable(200, 1000, window=125, replicas=20) == 5  # a quarter of the proxies at most
    assert max_unavailable(200, 10_000, window=125, replicas=20) == 2
    assert max_unavailable(200, 0, window=125, replicas=2) == 1


# -- the modes --------------------------------------------------------------------------------


def test_auto_runs_a_round_to_the_end_then_the_receivers_cool_down() -> None:
    rb = Rebalancer()
    orders = rb.step("auto", proxies(61, 0, 0), 0.1, 200.0, None, draining=False, now=1000)
    assert orders.limits == (Limit("p0", 22, 200.0), Limit("p1", 22, 0.1), Limit("p2", 22, 0.1))
    assert orders.status["state"] == "Running" and orders.status["etaSeconds"] == 1
    assert orders.events == ("rebalance started: the busiest proxy holds 61, over 1.1 x the average 20.3: at most "
                             "22 per proxy; moving 39 from p0",)
    assert rb.operation(proxies(40, 10, 11)) == Operation("rebalance", "rebalance", 18)
    mid = rb.step("auto", proxies(40, 10, 11), 0.1, 100.0, None, draining=False, now=1001)
    assert mid.limits[0] == Limit("p0", 22, 100.0) and mid.status["subscribersLeft"] == 18
    done = rb.step("auto", proxies(22, 20, 19), 0.1, None, None, draining=False, now=1003)
    assert done.status["state"] == "Balanced" and rb.current is None
    # The round's limits stay a little longer (subscribers still on their way), then lapse.
    assert [(x.proxy, x.keep, x.hold) for x in done.limits] == [("p0", 22, 10.0), ("p1", 22, 10.0), ("p2", 22, 10.0)]
    assert done.events[0] == "rebalance ended (done): 39 of 39 subscribers moved"
    # What p1 received (its proxy counts it unmovable) stays; it sheds only the rest.
    skewed = rb.step("auto", [*proxies(22)[:1], ProxySeen("p1", 35, READY, unmovable=20), *proxies(0, 0, 4)[2:]],
                     0.1, 200.0, None, draining=False, now=1100)
    assert [(x.proxy, x.keep) for x in skewed.limits] == [("p0", 22), ("p1", 22), ("p2", 22)]
    assert skewed.events[0].endswith("moving 13 from p1")


def test_no_round_is_planned_while_the_last_ones_subscribers_are_landing() -> None:
    """A round ends when its source is at its limit while the moved subscribers are still reconnecting
    (counted nowhere): no new round from that undercount, whose limits would hold fewer than all of them."""
    rb = Rebalancer()
    rb.step("auto", proxies(60, 0, 0), 0.1, 200.0, None, draining=False, now=1000)
    in_flight = rb.step("auto", proxies(22, 0, 0), 0.1, 200.0, None, draining=False, now=1001)
    assert rb.current is None and in_flight.status["state"] == "Waiting"
    assert [(x.proxy, x.keep) for x in in_flight.limits] == [("p0", 22), ("p1", 22), ("p2", 22)]  # the round's
    assert rb.step("auto", proxies(22, 5, 0), 0.1, 200.0, None, draining=False, now=1005).limits == ()
    landed = rb.step("auto", proxies(22, 20, 18), 0.1, 200.0, None, draining=False, now=1012)
    assert landed.status["state"] == "Balanced" and landed.limits == ()


def test_off_plan_and_approve() -> None:
    assert Rebalancer().step("off", proxies(61, 0), 0.1, 200.0, None, False, 1000).status["state"] == "Off"
    rb = Rebalancer()
    planned = rb.step("plan", proxies(61, 0, 0), 0.1, 200.0, None, draining=False, now=1000)
    assert planned.limits == () and rb.current is None and planned.status["state"] == "Planned"
    assert planned.status["plan"] == {"cap": 22, "subscribers": 39, "moves": [{"from": "p0", "subscribers": 39}],
                                      "reconnectsPerSecond": 200.0, "etaSeconds": 1}
    assert planned.status["reason"].endswith("set neoplasma.io/rebalance=approve to run it")
    # Turned to approve: the plan shown runs, once.
    approved = rb.step("approve", proxies(61, 0, 0), 0.1, 200.0, planned.status, False, 1010)
    assert approved.limits[0] == Limit("p0", 22, 200.0) and approved.status["approval"] is None
    running = rb.step("approve", proxies(40, 10, 11), 0.1, 200.0, approved.status, False, 1011)
    assert running.status["state"] == "Running" and running.status["plan"] == planned.status["plan"]
    done = rb.step("approve", proxies(22, 20, 19), 0.1, 200.0, running.status, False, 1013)
    assert done.status["state"] == "Balanced"
    # Still `approve`: a new plan is shown, not run, until it is set to plan and approve again.
    again = rb.step("approve", [*proxies(22, 20, 19), ProxySeen("p3", 0, READY)], 0.1, 200.0, done.status, False,
                    1100)
    assert again.limits == () and again.status["state"] == "Planned"
    assert "set neoplasma.io/rebalance=plan, then approve" in again.status["reason"]
    assert rb.step("plan", proxies(22, 20, 19, 0), 0.1, 200.0, again.status, False, 1101).limits == ()
    rerun = rb.step("approve", [*proxies(22, 20, 19), ProxySeen("p3", 0, READY)], 0.1, 200.0,
                    {**again.status, "mode": "plan"}, False, 1102)
    assert rerun.limits[0].proxy == "p0" and rerun.status["state"] == "Running"


def test_approve_with_no_plan_shown_shows_it_first_and_a_wait_keeps_the_approval() -> None:
    rb = Rebalancer()
    first = rb.step("approve", proxies(61, 0, 0), 0.1, 200.0, None, draining=False, now=1000)
    assert first.limits == () and first.status["state"] == "Planned" and first.status["approval"] == "pending"
    assert first.status["reason"].endswith("running it next")
    waiting = rb.step("approve", proxies(61, 0, 0), 0.1, 20.0, first.status, draining=True, now=1010)
    assert waiting.status["state"] == "Waiting" and waiting.status["approval"] == "pending"
    ran = rb.step("approve", proxies(61, 0, 0), 0.1, 200.0, waiting.status, draining=False, now=1020)
    assert ran.status["state"] == "Running" and ran.limits and ran.status["approval"] is None
    # Turning it off stops a running round.
    stopped = rb.step("off", proxies(50, 5, 6), 0.1, 200.0, ran.status, draining=False, now=1021)
    assert {x.hold for x in stopped.limits} == {0.5}  # lifted at once
    assert stopped.events[0].startswith("rebalance ended (neoplasma.io/rebalance is off)")


def test_a_new_round_waits_while_pods_drain_and_a_stuck_round_times_out() -> None:
    waiting = Rebalancer().step("auto", proxies(61, 0, 0), 0.1, 20.0, None, draining=True, now=1000)
    assert waiting.limits == () and waiting.status["state"] == "Waiting"
    rb = Rebalancer()
    rb.step("auto", proxies(61, 0, 0), 0.1, 200.0, None, draining=False, now=1000)
    stuck = rb.step("auto", proxies(61, 0, 0), 0.1, 200.0, None, draining=False, now=1000 + 601)
    assert stuck.events[0] == "rebalance ended (not done after 600 s): 0 of 39 subscribers moved"
    assert stuck.status["state"] == "Waiting"  # for the moved ones still landing, then:
    again = rb.step("auto", proxies(61, 0, 0), 0.1, 200.0, None, draining=False, now=1000 + 612)
    assert again.events[0].startswith("rebalance started")  # a source is not cooling: it is asked again


# -- one pass: drains and the rebalance on one budget -----------------------------------------


def test_pods_as_the_connections_step_sees_them() -> None:
    wall = datetime(2026, 1, 1, 0, 1, 0, tzinfo=UTC)
    pods = [PodView("ns", "demo", "proxy", "a", ready=True, owner="rs-2", ready_since="2026-01-01T00:00:30Z"),
            PodView("ns", "demo", "proxy", "b", ready=True, owner="rs-2"),
            PodView("ns", "demo", "proxy", "c", ready=False, owner="rs-2"),
            PodView("ns", "demo", "proxy", "old", ready=True, deleting=True, owner="rs-1",
                    deletion="2026-01-01T00:03:00Z"),
            PodView("ns", "demo", "proxy", "gone", deleting=True, owner="rs-2", deletion="garbage")]
    seen = pods_seen(pods, {"a": (10, 7), "c": (3, 3), "old": (500, 0)}, "rs-2", scaled_in=False, wall=wall)
    assert seen == [PodSeen("a", 10, 30.0, unmovable=3), PodSeen("b", None, 10.0), PodSeen("c", 3, None),
                    PodSeen("old", 500, None, "rollout", 120.0, unmovable=500),
                    PodSeen("gone", None, None, "eviction", None)]
    assert pods_seen(pods[-1:], {}, "rs-2", scaled_in=True, wall=wall)[0].terminating == "scale-in"
    assert drain_kind("rs-1", "", scaled_in=False) == "eviction"  # no current template known
    step = Connections()
    assert [step.scaled_in(n, 140, now) for n, now in ((3, 0), (3, 10), (2, 20), (2, 150), (2, 161))] == [
        False, False, True, True, False]


def test_a_pass_paces_every_drain_and_the_rebalance_within_the_budget() -> None:
    step = Connections()
    policy = ConnectionPolicy("auto", 0.1, 200.0)
    pods = [PodSeen("a", 61, READY), PodSeen("b", 0, READY), PodSeen("c", 0, READY)]
    started = step.step(policy, pods, None, now=1000)
    assert started.paces == () and [(x.proxy, x.keep) for x in started.limits] == [("a", 22), ("b", 22), ("c", 22)]
    assert started.status["reconnects"] == {"budget": 200.0, "reconnectsPerSecond": 200.0, "inProgress": [
        {"kind": "rebalance", "name": "rebalance", "subscribersLeft": 39, "reconnectsPerSecond": 200.0,
         "etaSeconds": 1}]}
    assert step.busiest == 61 and started.notices[0].reason == "Rebalance"
    # A rollout starts meanwhile: two pods drain, the round keeps a tenth, the sum is the budget.
    pods = [PodSeen("a", 50, READY), PodSeen("b", 5, READY), PodSeen("c", 6, READY),
            PodSeen("old-1", 3000, None, "rollout", 100.0), PodSeen("old-2", 1000, None, "eviction", 100.0)]
    both = step.step(policy, pods, None, now=1001)
    assert both.paces == (Pace("old-1", 90.0), Pace("old-2", 90.0))
    assert both.limits[0] == Limit("a", 22, 20.0)
    progress = both.status["reconnects"]
    assert progress["reconnectsPerSecond"] == 200.0
    assert [(e["kind"], e["name"], e["subscribersLeft"]) for e in progress["inProgress"]] == [
        ("rollout", "old-1", 3000), ("eviction", "old-2", 1000), ("rebalance", "rebalance", 28)]
    assert not [n for n in both.notices if n.warning]


def test_a_drain_that_must_go_over_the_budget_is_reported_once() -> None:
    step = Connections()
    policy = ConnectionPolicy("off", 0.1, 100.0)
    late = [PodSeen("a", 10, READY), PodSeen("old", 5000, None, "rollout", 30.0)]
    first = step.step(policy, late, None, now=1000)
    assert first.paces == (Pace("old", 200.0),)
    assert first.status["reconnects"]["inProgress"][0]["overBudget"] is True
    warning = [n for n in first.notices if n.warning]
    assert warning[0].reason == "ReconnectBudgetExceeded" and "rollout of old: 5000 subscribers left" in \
        warning[0].message and "raise the budget or the grace period" in warning[0].message
    assert not [n for n in step.step(policy, late, None, now=1001).notices if n.warning]
    assert first.status["rebalance"]["state"] == "Off"


def test_plan_mode_shows_the_plan_with_its_rate_and_moves_nothing() -> None:
    step = Connections()
    pods = [PodSeen("a", 100, READY), PodSeen("b", 0, READY)]
    shown = step.step(ConnectionPolicy("plan", 0.1, 50.0), pods, None, now=1000)
    assert shown.limits == () and shown.status["reconnects"]["inProgress"] == []
    assert shown.status["rebalance"]["plan"] == {"cap": 55, "subscribers": 45, "reconnectsPerSecond": 50.0,
                                                 "etaSeconds": 1, "moves": [{"from": "a", "subscribers": 45}]}
    unread = step.step(ConnectionPolicy("auto", 0.1, 50.0), [PodSeen("a", 100, READY), PodSeen("b", None, READY)],
                       None, now=1001)
    assert unread.limits == () and "waiting for b" in unread.status["rebalance"]["reason"]


def test_approval_is_remembered_not_reread_from_a_lagging_status_and_survives_a_restart() -> None:
    rb = Rebalancer()
    planned = rb.step("plan", proxies(61, 0, 0), 0.1, 200.0, None, draining=False, now=1000)
    ran = rb.step("approve", proxies(61, 0, 0), 0.1, 200.0, planned.status, False, 1010)
    assert ran.limits and ran.status["approval"] is None
    # The resource in hand still shows the status from before the approve: not approved again.
    lagging = rb.step("approve", proxies(40, 10, 11), 0.1, 200.0, planned.status, False, 1011)
    assert lagging.status["approval"] is None
    after = rb.step("approve", proxies(22, 20, 19), 0.1, 200.0, planned.status, False, 1013)
    assert after.status["state"] == "Balanced" and not any("started" in e for e in after.events)
    # A restarted operator goes on from status: an approval still pending runs.
    restarted = Rebalancer().step("approve", proxies(61, 0, 0), 0.1, 200.0,
                                  {**planned.status, "mode": "approve", "approval": "pending"}, False, 2000)
    assert restarted.status["state"] == "Running"


def test_a_source_that_cannot_be_read_keeps_its_round_and_limits_instead_of_ending_it() -> None:
    step = Connections()
    policy = ConnectionPolicy("auto", 0.1, 20.0)
    started = step.step(policy, [PodSeen("a", 60, READY), PodSeen("b", 0, READY), PodSeen("c", 0, READY)], None, 1000)
    unread = step.step(policy, [PodSeen("a", None, None), PodSeen("b", 10, READY), PodSeen("c", 9, READY)], None, 1001)
    assert step.rebalancer.current is not None and unread.limits == started.limits and not unread.notices
    done = step.step(policy, [PodSeen("a", 22, None), PodSeen("b", 19, READY), PodSeen("c", 19, READY)], None, 1003)
    assert step.rebalancer.current is None and done.notices[0].message.startswith("rebalance ended (done)")


# -- subscribers that cannot be moved (plasma gRPC streams, streams with no position yet) -------


def test_unmovable_subscribers_count_as_load_but_only_movable_ones_are_moved() -> None:
    """p0 holds 60, 50 of them plasma streams: the average counts them all (cap 22), but p0 can
    shed only its 10 others, so its limit is 50; the limits still hold every subscriber."""
    seen = [ProxySeen("p0", 60, READY, unmovable=50), ProxySeen("p1", 0, READY), ProxySeen("p2", 0, READY)]
    plan = plan_rebalance(seen, 0.1)
    assert plan.cap == 22 and plan.moves == {"p0": 10} and dict(plan.limits) == {"p0": 50, "p1": 22, "p2": 22}
    assert plan.stuck == 28 and sum(plan.limits.values()) >= 60
    assert "cannot resume elsewhere (p0 28): plasma gRPC streams carry no position" in plan.reason
    # Mixed: a proxy with a few unmovable ones sheds down to the cap as before.
    mixed = plan_rebalance([ProxySeen("p0", 60, READY, unmovable=5), *proxies(0, 0, 0)[1:]], 0.1)
    assert mixed.moves == {"p0": 38} and mixed.stuck == 0 and "cannot resume" not in mixed.reason


def test_a_proxy_whose_excess_cannot_move_is_reported_as_unmovable_and_no_round_starts() -> None:
    rb = Rebalancer()
    seen = [ProxySeen("p0", 40, READY, unmovable=40), ProxySeen("p1", 0, READY)]
    for now in (1000, 1002, 1100):  # every pass the same: no round, no event, no limit
        orders = rb.step("auto", seen, 0.1, 200.0, None, draining=False, now=now)
        assert orders.limits == () and orders.events == () and rb.current is None
        assert orders.status["state"] == "Unmovable" and orders.status["unmovable"] == 40
        assert "over the limit of 22, not moved as they cannot resume elsewhere (p0 18)" in orders.status["reason"]
    assert plan_rebalance(seen, 0.1).moves == {}


def test_a_round_ends_when_its_sources_have_nothing_movable_left_over_their_limit() -> None:
    """The round planned 38 moves; 8 movable subscribers left p0 by themselves and the 22 still there
    over its limit are plasma streams: nothing more can move, so the round ends at once (not after
    ROUND_TIMEOUT), and the proxies are not asked to shed what they cannot."""
    rb = Rebalancer()
    rb.step("auto", [ProxySeen("p0", 60, READY, unmovable=10), *proxies(0, 0, 0)[1:]], 0.1, 20.0, None, False, 1000)
    assert rb.current is not None and rb.current.moves == 38
    now = [ProxySeen("p0", 32, READY, unmovable=32), ProxySeen("p1", 10, READY), ProxySeen("p2", 10, READY)]
    assert rb.operation(now) == Operation("rebalance", "rebalance", 0)
    ended = rb.step("auto", now, 0.1, 20.0, None, False, 1003)
    assert rb.current is None and ended.events[0] == "rebalance ended (done): 38 of 38 subscribers moved"
    running = Rebalancer()
    running.step("auto", [ProxySeen("p0", 60, READY, unmovable=10), *proxies(0, 0, 0)[1:]], 0.1, 20.0, None, False,
                 1000)
    mid = running.step("auto", [ProxySeen("p0", 40, READY, unmovable=30), *proxies(0, 10, 10)[1:]], 0.1, 20.0, None,
                       False, 1001)
    assert mid.status["subscribersLeft"] == 10  # 40 held, 30 of them unmovable: 10 more can go, not 18


def test_replan_moves_no_more_than_is_movable() -> None:
    shown = plan_rebalance(proxies(61, 0, 0), 0.1).to_status(None)
    now = [ProxySeen("p0", 61, READY, unmovable=45), ProxySeen("p1", 0, READY), ProxySeen("p2", 0, READY)]
    plan = replan(shown, now)
    assert plan.moves == {"p0": 16} and plan.limits["p0"] == 45


def test_a_pass_reads_unmovable_subscribers_from_the_pods() -> None:
    step = Connections()
    pods = [PodSeen("a", 30, READY, unmovable=30), PodSeen("b", 0, READY), PodSeen("c", 0, READY)]
    orders = step.step(ConnectionPolicy("auto", 0.1, 200.0), pods, None, now=1000)
    assert orders.limits == () and orders.status["rebalance"]["state"] == "Unmovable"
    assert orders.status["rebalance"]["unmovable"] == 30 and orders.status["reconnects"]["inProgress"] == []


# -- status: nothing stale, the round history kept ----------------------------------------------


def test_off_and_every_later_state_show_no_figure_of_an_earlier_one() -> None:
    rb = Rebalancer()
    running = rb.step("auto", proxies(61, 0, 0), 0.1, 200.0, None, draining=False, now=1000).status
    assert {"subscribersLeft", "reconnectsPerSecond", "etaSeconds", "plan"} <= set(running)
    written = present(running, None)
    off = rb.step("off", proxies(50, 5, 6), 0.1, 200.0, written, draining=False, now=1001).status
    assert off["state"] == "Off" and not {"subscribersLeft", "reconnectsPerSecond", "etaSeconds", "plan"} & set(off)
    patch = present(off, written)  # what the merge patch says: the running round's figures removed
    figures = ("subscribersLeft", "reconnectsPerSecond", "etaSeconds", "plan")
    assert {key: patch[key] for key in figures} == dict.fromkeys(figures)
    assert patch["state"] == "Off" and patch["busiest"] == 50 and "approval" not in patch  # (never written)
    # Nested objects too (a merge patch merges them), and a key that was never there gets no null.
    assert present({"plan": {"cap": 3}, "x": None}, {"plan": {"cap": 2, "etaSeconds": 4}}) == {
        "plan": {"cap": 3, "etaSeconds": None}}


WALL = datetime(2026, 12, 7, 9, 0, 0, tzinfo=UTC)


def test_the_receivers_of_rounds_are_kept_in_status_and_read_back_by_a_restarted_operator() -> None:
    first = Rebalancer()
    started = first.step("auto", proxies(60, 0), 0.1, 200.0, None, draining=False, now=1000, wall=WALL)
    assert started.status["received"] == [{"proxy": "p1", "at": "2026-12-07T09:00:00Z"}]  # receiving now
    done = first.step("auto", proxies(30, 25), 0.1, 200.0, started.status, False, 1003,
                      wall=WALL + timedelta(seconds=3))
    assert done.status["received"] == [{"proxy": "p1", "at": "2026-12-07T09:00:03Z"}]  # the round's end
    # The operator restarts at once: the round's moved subscribers may still be landing (counted
    # nowhere), so it waits as the one before would have, instead of planning from an undercount.
    restarted = Rebalancer()
    landing = restarted.step("auto", proxies(45, 10), 0.1, 200.0, done.status, False, now=50.0,
                             wall=WALL + timedelta(seconds=8))
    assert landing.limits == () and landing.status["state"] == "Waiting"
    assert landing.status["received"] == done.status["received"]  # still shown, for the next restart
    assert Rebalancer().step("auto", proxies(45, 10), 0.1, 200.0, None, False, now=50.0).limits  # (forgotten)
    # Later, a new round: what p1 received its proxy holds as unmovable (600 s), the rest may go.
    later = restarted.step("auto", [ProxySeen("p0", 20, READY), ProxySeen("p1", 40, READY, unmovable=25)], 0.1,
                           200.0, landing.status, False, now=150.0, wall=WALL + timedelta(seconds=108))
    assert later.events[0].endswith("moving 7 from p1") and later.limits[1].keep == 33
    assert later.status["received"] == [{"proxy": "p0", "at": "2026-12-07T09:01:48Z"},
                                        {"proxy": "p1", "at": "2026-12-07T09:00:03Z"}]
    assert restarted.step("auto", proxies(30, 30), 0.1, 200.0, later.status, False, now=150.0 + COOLDOWN,
                          wall=WALL + timedelta(seconds=108 + COOLDOWN)).status["received"] == [
        {"proxy": "p0", "at": "2026-12-07T09:11:48Z"}]  # the round ended now; p1's entry, over 600 s old, gone


def test_received_is_bounded_and_what_cannot_be_read_is_left_out() -> None:
    now = 5000.0
    many = [{"proxy": f"p{i}", "at": "2026-12-07T08:59:00Z"} for i in range(MAX_RECEIVED + 50)]
    rounds = received_from_status(many, now, WALL)
    assert len(rounds) == 1 and len(rounds[0].receivers()) == MAX_RECEIVED and rounds[0].ended == now - 60
    odd = [{"proxy": "a", "at": "2026-12-07T09:00:00"},  # no time zone
           {"proxy": "b", "at": "yesterday"}, {"proxy": "", "at": "2026-12-07T09:00:00Z"}, "c",
           {"proxy": "d" * 254, "at": "2026-12-07T09:00:00Z"}, {"proxy": "e", "at": 7},
           {"proxy": "old", "at": "2026-12-07T08:49:00Z"},  # 660 s ago: cooled down
           {"proxy": "ahead", "at": "2026-12-07T09:05:00Z"}]  # a clock ahead: counted as now
    assert [(r.ended, sorted(r.receivers())) for r in received_from_status(odd, now, WALL)] == [(now, ["ahead"])]
    assert received_from_status({"proxy": "x"}, now, WALL) == []
    history = [Round(0, 1, {f"p{i}": 1 for i in range(300)}, frozenset(), 0, ended=now - i) for i in range(3)]
    assert len(received_to_status(history, None, now, WALL)) == MAX_RECEIVED
