"""The autoscaling policy (annotations) and decision: table-driven and property-based."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from neoplasma.core import scaling as sc
from neoplasma.core.scaling import Load, TierPolicy, decide, parse_policy

KW = {"scale_down_delay": 300.0, "tolerance": 0.1, "scale_up_limit": 4}


def test_defaults_from_spec() -> None:
    policy, errors = parse_policy({}, spec_brokers=3, spec_proxies=2)
    assert errors == [] and policy is not None
    assert not policy.autoscale and not policy.paused
    assert (policy.brokers.minimum, policy.brokers.maximum, policy.brokers.target) == (3, 100, None)
    assert (policy.proxies.minimum, policy.proxies.maximum) == (2, 100)
    assert policy.scale_down_delay == 300.0


def test_full_policy() -> None:
    policy, errors = parse_policy({
        sc.AUTOSCALE: "true", sc.TARGET_CONNECTIONS: "500", sc.MIN_BROKERS: "2", sc.MAX_BROKERS: "20",
        sc.TARGET_SUBSCRIBERS: "10000", sc.MIN_PROXIES: "3", sc.MAX_PROXIES: "9", sc.SCALE_DOWN_DELAY: "5m",
        sc.TOLERANCE: "0.2", sc.SCALE_UP_LIMIT: "2", sc.PAUSE: "false", "unrelated/annotation": "x",
    }, 1, 1)
    assert errors == [] and policy is not None
    assert policy.brokers == TierPolicy(500.0, 2, 20)
    assert policy.proxies == TierPolicy(10000.0, 3, 9)
    assert (policy.scale_down_delay, policy.tolerance, policy.scale_up_limit) == (300.0, 0.2, 2)


@pytest.mark.parametrize("annotations, annotation, problem", [
    ({sc.TARGET_CONNECTIONS: "lots"}, sc.TARGET_CONNECTIONS, "not a number"),
    ({sc.TARGET_CONNECTIONS: "-5"}, sc.TARGET_CONNECTIONS, "positive"),
    ({sc.TARGET_CONNECTIONS: "nan"}, sc.TARGET_CONNECTIONS, "positive"),
    ({sc.MIN_BROKERS: "5", sc.MAX_BROKERS: "2"}, sc.MIN_BROKERS, "above"),
    ({sc.MAX_BROKERS: "1000000"}, sc.MAX_BROKERS, "outside"),
    ({sc.MIN_PROXIES: "two"}, sc.MIN_PROXIES, "whole number"),
    ({sc.SCALE_DOWN_DELAY: "5 fortnights"}, sc.SCALE_DOWN_DELAY, "not a duration"),
    ({sc.SCALE_DOWN_DELAY: "48h"}, sc.SCALE_DOWN_DELAY, "longer than a day"),
    ({sc.AUTOSCALE: "perhaps"}, sc.AUTOSCALE, "not a boolean"),
    ({sc.AUTOSCALE: "true"}, sc.AUTOSCALE, "neither"),
    ({sc.TOLERANCE: "1.5"}, sc.TOLERANCE, "below 1"),
])
def test_bad_annotations_name_the_annotation(annotations: dict[str, str], annotation: str, problem: str) -> None:
    policy, errors = parse_policy(annotations, 1, 1)
    assert policy is None
    assert any(e.annotation == annotation and problem in e.problem for e in errors), errors


BROKERS = TierPolicy(target=100.0, minimum=1, maximum=10)


@pytest.mark.parametrize("current, load, replicas, reason", [
    (2, Load(400, 2), 4, "scale up"),         # 200 per pod, target 100: double
    (2, Load(2000, 2), 6, "scale up"),        # wants 20, capped at max 10, and a step of 4
    (2, Load(210, 2), 2, "steady"),           # within 10 % tolerance
    (2, Load(100, 1), 2, "steady"),           # one pod unreadable: the average of those read
    (2, None, 2, "no load readable"),
    (2, Load(0, 0), 2, "no load readable"),
    (0, None, 1, "within bounds"),            # bounds apply before any load is read
    (12, None, 10, "within bounds"),
    (4, Load(40, 4), 4, "waiting"),           # low, but not for long enough
])
def test_decision_table(current: int, load: Load | None, replicas: int, reason: str) -> None:
    decision = decide(BROKERS, current, load, (), now=1000.0, **KW)  # type: ignore[arg-type]
    assert decision.replicas == replicas and reason in decision.reason


def test_scale_down_only_after_the_delay_and_to_the_highest_recent_wish() -> None:
    history: tuple[sc.Recommendation, ...] = ()
    current = 6
    for t, total in [(0, 120), (100, 60), (200, 60), (299, 60)]:
        d = decide(BROKERS, current, Load(total, current), history, now=float(t), **KW)  # type: ignore[arg-type]
        assert d.replicas == current, (t, d)
        history = d.history
    d = decide(BROKERS, current, Load(60, current), history, now=300.0, **KW)  # type: ignore[arg-type]
    assert d.replicas == 2 and "scale down" in d.reason  # wishes in the window: 2 (at 100..300)
    spike = decide(BROKERS, current, Load(600, current), history, now=250.0, **KW)  # type: ignore[arg-type]
    assert spike.history == ()  # high load resets the low run


tier_st = st.builds(lambda lo, span, target: TierPolicy(float(target), lo, lo + span),
                    st.integers(0, 20), st.integers(0, 30), st.integers(1, 1000))


@settings(max_examples=300)
@given(tier=tier_st, current=st.integers(0, 60), totals=st.lists(st.floats(0, 1e6), min_size=1, max_size=8),
       tol=st.sampled_from([0.0, 0.1, 0.3]), limit=st.integers(1, 10))
def test_properties(tier: TierPolicy, current: int, totals: list[float], tol: float, limit: int) -> None:
    history: tuple[sc.Recommendation, ...] = ()
    now = 0.0
    for total in totals:
        before = current
        d = decide(tier, current, Load(total, max(current, 1)), history, now, scale_down_delay=60.0,
                   tolerance=tol, scale_up_limit=limit)
        # never outside min/max
        assert tier.minimum <= d.replicas <= tier.maximum
        ratio = (total / max(current, 1)) / tier.target  # type: ignore[operator]
        if tier.minimum <= before <= tier.maximum:
            # no flapping inside the tolerance band
            if abs(ratio - 1) <= tol:
                assert d.replicas == before
            # scale-up at once, by at most the step limit
            if d.replicas > before:
                assert d.replicas - before <= limit
            # scale-down only after the delay
            if d.replicas < before:
                assert d.history and now - d.history[0].at >= 60.0
        history = d.history
        current = d.replicas
        now += 25.0
