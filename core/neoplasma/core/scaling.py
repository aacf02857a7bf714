"""Autoscaling: the policy users annotate, and the scaling decision. Pure: no I/O, no clocks.

The operator and `neoplasma up` both describe a policy as annotations (`up` turns its flags into
the same annotations) and keep it in one `neoplasma.core.autoscaler.Autoscaler`, which calls
`decide` with what they observed; both act on the answer.

The decision follows the Kubernetes HPA: desired = ceil(current * average load / target),
ignored within a tolerance band, scale-up at once (at most `scale-up-limit` pods per step),
scale-down only to the highest recommendation of the last `scale-down-delay` (so load must
stay low for the whole delay), always within min/max. Pods whose load could not be read are
not counted as zero: the average is taken over the pods that answered, and with none, the
current size stands.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from neoplasma.core.text import excerpt

PREFIX = "neoplasma.io/"
AUTOSCALE = PREFIX + "autoscale"
PAUSE = PREFIX + "pause-reconciliation"
TARGET_CONNECTIONS = PREFIX + "target-connections-per-broker"
TARGET_EVENTS = PREFIX + "target-events-per-broker"
MIN_BROKERS, MAX_BROKERS = PREFIX + "min-brokers", PREFIX + "max-brokers"
TARGET_SUBSCRIBERS = PREFIX + "target-subscribers-per-proxy"
MIN_PROXIES, MAX_PROXIES = PREFIX + "min-proxies", PREFIX + "max-proxies"
SCALE_DOWN_DELAY = PREFIX + "scale-down-delay"
TOLERANCE = PREFIX + "tolerance"
SCALE_UP_LIMIT = PREFIX + "scale-up-limit"
# Connections (neoplasma.operator.connections): how subscribers are spread and how fast they may be moved.
REBALANCE = PREFIX + "rebalance"
REBALANCE_TOLERANCE = PREFIX + "rebalance-tolerance"
MAX_RECONNECTS = PREFIX + "max-reconnects-per-second"

DEFAULT_MAX = 100
DEFAULT_SCALE_DOWN_DELAY = 300.0
DEFAULT_TOLERANCE = 0.1
DEFAULT_SCALE_UP_LIMIT = 4
HARD_MAX = 1000  # no annotation may ask for more pods than this
REBALANCE_MODES = ("auto", "off", "plan", "approve")
DEFAULT_REBALANCE_TOLERANCE = 0.1
# Seconds during which a subscriber moved by a rebalance is not moved again: a proxy counts one
# that resumed there while it was under a rebalance's limit (the moved ones land then) as unmovable.
REBALANCE_COOLDOWN = 600.0
# Reconnects the operator may cause per second, over every operation at once. 200/s: a proxy
# resumes a subscriber with one replay request per broker, so 200/s is at most 200 replays/s
# per broker, a small share of what one broker serves (docs/resume.md), and the default proxy
# (25,000 subscribers) drains in about two minutes; a rollout of 10 such proxies in ~21 minutes.
DEFAULT_MAX_RECONNECTS = 200.0
MAX_RECONNECTS_LIMIT = 100_000.0  # more than any proxy could take back at once: refused
MAX_VALUE_LENGTH = 64  # every valid value is a short word or number; longer ones are refused unread


class PolicyError(ValueError):
    """One annotation's value cannot be used."""

    def __init__(self, annotation: str, problem: str) -> None:
        super().__init__(f"{annotation}: {problem}")
        self.annotation = annotation
        self.problem = problem


@dataclass(frozen=True)
class TierPolicy:
    target: float | None  # average load per pod to aim for; None: not autoscaled
    minimum: int
    maximum: int
    target_events: float | None = None  # brokers only: events/s per broker, optional


@dataclass(frozen=True)
class Policy:
    autoscale: bool
    paused: bool
    brokers: TierPolicy
    proxies: TierPolicy
    scale_down_delay: float = DEFAULT_SCALE_DOWN_DELAY
    tolerance: float = DEFAULT_TOLERANCE
    scale_up_limit: int = DEFAULT_SCALE_UP_LIMIT


@dataclass(frozen=True)
class ConnectionPolicy:
    """The connection annotations: rebalancing (`auto`, `off`, `plan`, `approve`), the tolerance
    of the busiest proxy over the average, and the reconnect budget shared by every operation."""

    rebalance: str = "auto"
    tolerance: float = DEFAULT_REBALANCE_TOLERANCE
    max_reconnects: float = DEFAULT_MAX_RECONNECTS


# Matched in full against the stripped value. Leading and trailing `\s*` in the pattern would
# make it quadratic: "1" and 64k spaces then "x" backtracks over every split of the spaces.
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h)?")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(annotation: str, text: str) -> float:
    match = _DURATION.fullmatch(text.strip())
    if not match:
        raise PolicyError(annotation, f"{excerpt(text)} is not a duration; use e.g. '300s', '5m' or '1h'")
    seconds = float(match.group(1)) * _UNITS[match.group(2)]
    if seconds > 86400:
        raise PolicyError(annotation, f"{excerpt(text)} is longer than a day")
    return seconds


def _bool(annotation: str, text: str) -> bool:
    value = text.strip().lower()
    if value in ("true", "yes", "1", "on"):
        return True
    if value in ("false", "no", "0", "off", ""):
        return False
    raise PolicyError(annotation, f"{excerpt(text)} is not a boolean; use \"true\" or \"false\"")


def _int(annotation: str, text: str, low: int, high: int) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        raise PolicyError(annotation, f"{excerpt(text)} is not a whole number") from None
    if not low <= value <= high:
        raise PolicyError(annotation, f"{value} is outside {low}..{high}")
    return value


def _positive(annotation: str, text: str) -> float:
    try:
        value = float(text.strip())
    except ValueError:
        raise PolicyError(annotation, f"{excerpt(text)} is not a number") from None
    if not math.isfinite(value) or value <= 0:
        raise PolicyError(annotation, f"{excerpt(text)} must be a positive number")
    return value


T = TypeVar("T")


class _Reader:
    """Reads annotations, collecting every problem instead of stopping at the first."""

    def __init__(self, annotations: Mapping[str, str]) -> None:
        self.annotations = annotations
        self.errors: list[PolicyError] = []

    def get(self, key: str, parse: Callable[[str, str], T], default: T) -> T:
        text = self.annotations.get(key)
        if text is None:
            return default
        try:
            if len(text) > MAX_VALUE_LENGTH:  # refused unread, so any size costs the same
                raise PolicyError(key, f"{excerpt(text)} is {len(text)} characters long; "
                                       f"values are at most {MAX_VALUE_LENGTH}")
            return parse(key, text)
        except PolicyError as exc:
            self.errors.append(exc)
            return default

    def count(self, key: str, default: int, low: int = 0) -> int:
        return self.get(key, lambda k, t: _int(k, t, low, HARD_MAX), default)

    def tier(self, target_key: str, min_key: str, max_key: str, spec: int, events_key: str | None = None
             ) -> TierPolicy:
        target: float | None = self.get(target_key, _positive, None)
        events: float | None = self.get(events_key, _positive, None) if events_key else None
        low = self.count(min_key, min(spec, DEFAULT_MAX))
        high = self.count(max_key, max(DEFAULT_MAX, low))
        if low > high:
            self.errors.append(PolicyError(min_key, f"minimum {low} is above {max_key} {high}"))
        return TierPolicy(target, low, high, events)


def parse_policy(annotations: Mapping[str, str], spec_brokers: int, spec_proxies: int
                 ) -> tuple[Policy | None, list[PolicyError]]:
    """The policy the annotations describe, or None and every problem found.

    Callers keep their last good policy when this returns None.
    """
    read = _Reader(annotations)
    policy = Policy(
        autoscale=read.get(AUTOSCALE, _bool, False),
        paused=read.get(PAUSE, _bool, False),
        brokers=read.tier(TARGET_CONNECTIONS, MIN_BROKERS, MAX_BROKERS, spec_brokers, TARGET_EVENTS),
        proxies=read.tier(TARGET_SUBSCRIBERS, MIN_PROXIES, MAX_PROXIES, spec_proxies),
        scale_down_delay=read.get(SCALE_DOWN_DELAY, parse_duration, DEFAULT_SCALE_DOWN_DELAY),
        tolerance=read.get(TOLERANCE, _fraction, DEFAULT_TOLERANCE),
        scale_up_limit=read.count(SCALE_UP_LIMIT, DEFAULT_SCALE_UP_LIMIT, low=1),
    )
    if policy.autoscale and policy.brokers.target is None and policy.proxies.target is None:
        read.errors.append(PolicyError(AUTOSCALE, f"autoscaling is on but neither {TARGET_CONNECTIONS} nor "
                                                  f"{TARGET_SUBSCRIBERS} is set"))
    return (None, read.errors) if read.errors else (policy, [])


def parse_connections(annotations: Mapping[str, str]) -> tuple[ConnectionPolicy | None, list[PolicyError]]:
    """The connection policy the annotations describe, or None and every problem found
    (callers keep their last good one, as with `parse_policy`)."""
    read = _Reader(annotations)
    policy = ConnectionPolicy(
        rebalance=read.get(REBALANCE, _mode, "auto"),
        tolerance=read.get(REBALANCE_TOLERANCE, _fraction, DEFAULT_REBALANCE_TOLERANCE),
        max_reconnects=read.get(MAX_RECONNECTS, _reconnects, DEFAULT_MAX_RECONNECTS),
    )
    return (None, read.errors) if read.errors else (policy, [])


def _mode(annotation: str, text: str) -> str:
    value = text.strip().lower()
    if value not in REBALANCE_MODES:
        raise PolicyError(annotation, f"{excerpt(text)} is not one of {', '.join(REBALANCE_MODES)}")
    return value


def _reconnects(annotation: str, text: str) -> float:
    value = _positive(annotation, text)
    if value < 1 or value > MAX_RECONNECTS_LIMIT:
        raise PolicyError(annotation, f"{excerpt(text)} is outside 1..{MAX_RECONNECTS_LIMIT:g} reconnects per second")
    return value


def _fraction(annotation: str, text: str) -> float:
    value = _positive(annotation, text) if text.strip() not in ("0", "0.0") else 0.0
    if value >= 1:
        raise PolicyError(annotation, f"{excerpt(text)} must be below 1 (e.g. 0.1 for 10%)")
    return value


# -- the decision --------------------------------------------------------------------------


@dataclass(frozen=True)
class Load:
    """What was observed of one tier: the summed load of the pods that answered."""

    total: float  # connections (brokers) or subscribers (proxies) over the pods read
    pods_read: int
    events_per_second: float = 0.0


@dataclass(frozen=True)
class Recommendation:
    at: float  # seconds, the caller's monotonic clock
    replicas: int


@dataclass(frozen=True)
class Decision:
    replicas: int
    reason: str
    history: tuple[Recommendation, ...] = field(default=())


def decide(tier: TierPolicy, current: int, load: Load | None, history: tuple[Recommendation, ...], now: float,
           *, scale_down_delay: float, tolerance: float, scale_up_limit: int) -> Decision:
    """How many pods a tier should have now. `history` is the previous Decision's."""
    bounded = min(max(current, tier.minimum), tier.maximum)
    if tier.target is None:
        reason = "not autoscaled" if bounded == current else f"bounds {tier.minimum}..{tier.maximum}"
        return Decision(bounded, reason, ())
    if load is None or load.pods_read == 0:
        reason = "no load readable; keeping size" if bounded == current else "no load readable; within bounds"
        return Decision(bounded, reason, history)

    if current > tier.maximum:  # bounds apply at once, whatever the delay
        return Decision(tier.maximum, f"above the maximum {tier.maximum}", ())
    average = load.total / load.pods_read
    ratio = average / tier.target
    if tier.target_events:
        ratio = max(ratio, (load.events_per_second / load.pods_read) / tier.target_events)
    base = max(current, 1)
    raw = base if abs(ratio - 1.0) <= tolerance else math.ceil(base * ratio - 1e-9)
    raw = min(max(raw, tier.minimum), tier.maximum)
    inputs = f"average {average:.1f} per pod over {load.pods_read} read, target {tier.target:g}"

    if raw >= current:  # history holds only an unbroken run of low recommendations
        if raw > current:
            step = min(raw, current + scale_up_limit) if current >= tier.minimum else raw
            return Decision(step, f"scale up: {inputs}", ())
        return Decision(current, f"steady: {inputs}", ())
    kept = (*history, Recommendation(now, raw))
    low_for = now - kept[0].at
    if low_for >= scale_down_delay:
        recent = max(r.replicas for r in kept if now - r.at <= scale_down_delay)  # highest recent wish
        return Decision(recent, f"scale down: {inputs}, low for {low_for:.0f}s", kept)
    return Decision(current, f"waiting: {inputs}; scale down after {scale_down_delay:g}s of low load", kept)
