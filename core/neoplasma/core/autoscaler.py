"""Autoscaling of one cluster: the policy in force, the sizes decided, and why.

The operator keeps one Autoscaler per NeoplasmaCluster, `neoplasma up` one for its cluster; the
policy and the decision are `neoplasma.core.scaling`'s. This module only keeps what one cluster
needs between steps, and is pure (no I/O, the caller passes clocks and loads):

- the last good policy: annotations that do not parse leave it in force (`errors` says why);
  `neoplasma.io/pause-reconciliation` is honoured even when another annotation is bad;
- per autoscaled tier, the size decided and the HPA history of recommendations; a restarted
  operator starts from the sizes kept in `status.autoscaling`, not from the spec's replicas;
- with `neoplasma.io/autoscale` off, the spec's replicas are used as they are (the min/max
  annotations only apply while autoscaling is on);
- the connection policy (rebalancing, the reconnect budget) is read from the same annotations
  and reported with the same `errors`; a bad value keeps its last good one (or the defaults).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from neoplasma.core.scaling import (
    HARD_MAX,
    PAUSE,
    ConnectionPolicy,
    Decision,
    Load,
    Policy,
    PolicyError,
    Recommendation,
    TierPolicy,
    decide,
    parse_connections,
    parse_policy,
)
from neoplasma.core.tiers import Tier


@dataclass(frozen=True)
class TierSize:
    desired: int
    reason: str
    last_scale_time: str | None = None

    def to_status(self) -> dict[str, Any]:
        status: dict[str, Any] = {"desired": self.desired, "reason": self.reason}
        if self.last_scale_time:
            status["lastScaleTime"] = self.last_scale_time
        return status


@dataclass(frozen=True)
class Scaled:
    """One change of a tier's size, for the Event and the metrics."""

    tier: Tier
    before: int
    after: int
    reason: str

    @property
    def direction(self) -> str:
        return "up" if self.after > self.before else "down"

    def describe(self) -> str:
        return f"{self.tier.plural} {self.before} -> {self.after}: {self.reason}"


class Autoscaler:
    def __init__(self, persisted: object = None) -> None:
        self.policy: Policy | None = None  # the last good policy; None: none seen yet
        self.errors: tuple[PolicyError, ...] = ()  # problems of the current annotations
        self.paused = False
        self.connections = ConnectionPolicy()  # the last good connection policy
        self._sizes: dict[Tier, TierSize] = _persisted_sizes(persisted)
        self._history: dict[Tier, tuple[Recommendation, ...]] = {}

    def read(self, annotations: Mapping[str, str], spec_brokers: int, spec_proxies: int) -> None:
        """Read the annotations (on every reconcile); keep the last good policy on errors."""
        policy, errors = parse_policy(annotations, spec_brokers, spec_proxies)
        connections, connection_errors = parse_connections(annotations)
        self.errors = (*errors, *connection_errors)
        if connections is not None:
            self.connections = connections
        if policy is not None:
            if policy != self.policy:
                self._history.clear()  # recommendations made against other targets do not count
            self.policy = policy
            self.paused = policy.paused
        else:  # a typo elsewhere must not keep a requested pause (or unpause) from happening
            pause_only, pause_errors = parse_policy({PAUSE: annotations[PAUSE]} if PAUSE in annotations else {},
                                                    spec_brokers, spec_proxies)
            if pause_only is not None and not pause_errors:
                self.paused = pause_only.paused
            elif self.policy is not None:
                self.paused = self.policy.paused
        if not self.autoscaled():
            self._sizes.clear()
            self._history.clear()

    def sizes(self, spec_brokers: int, spec_proxies: int) -> dict[Tier, int]:
        """The replicas to run: the spec's, or (autoscaling) the decided ones within bounds."""
        spec = {Tier.BROKER: spec_brokers, Tier.PROXY: spec_proxies}
        if not self.autoscaled():
            return spec
        result: dict[Tier, int] = {}
        for tier in Tier:
            policy = self._tier(tier)
            kept = self._sizes.get(tier)
            current = kept.desired if kept is not None and policy.target is not None else spec[tier]
            bounded = min(max(current, policy.minimum), policy.maximum)
            if policy.target is not None and (kept is None or kept.desired != bounded):
                reason = (f"bounds {policy.minimum}..{policy.maximum}" if bounded != current
                          else "starting from the spec's replicas")
                self._sizes[tier] = TierSize(bounded, reason, kept.last_scale_time if kept else None)
            result[tier] = bounded
        return result

    def autoscaled(self) -> list[Tier]:
        """The tiers with a target (the ones whose load is worth reading); none with autoscaling off.
        A policy that turns autoscaling on names at least one target (neoplasma.core.scaling)."""
        if self.policy is None or not self.policy.autoscale:
            return []
        return [t for t in Tier if self._tier(t).target is not None]

    def step(self, spec_brokers: int, spec_proxies: int, loads: Mapping[Tier, Load | None], now: float,
             wall: str | None = None) -> list[Scaled]:
        """One decision per autoscaled tier from the loads read (`now`: monotonic, `wall`: for status)."""
        if not self.autoscaled() or self.policy is None:
            return []
        current = self.sizes(spec_brokers, spec_proxies)
        changes: list[Scaled] = []
        for tier in self.autoscaled():
            decision: Decision = decide(
                self._tier(tier), current[tier], loads.get(tier), self._history.get(tier, ()), now,
                scale_down_delay=self.policy.scale_down_delay, tolerance=self.policy.tolerance,
                scale_up_limit=self.policy.scale_up_limit,
            )
            self._history[tier] = decision.history
            kept = self._sizes.get(tier)
            if decision.replicas != current[tier]:
                changes.append(Scaled(tier, current[tier], decision.replicas, decision.reason))
                self._sizes[tier] = TierSize(decision.replicas, decision.reason, wall)
            else:
                self._sizes[tier] = TierSize(decision.replicas, decision.reason, kept.last_scale_time if kept else None)
        return changes

    def status(self, spec_brokers: int, spec_proxies: int) -> dict[str, Any] | None:
        """`status.autoscaling` (None with autoscaling off)."""
        if not self.autoscaled():
            return None
        sizes = self.sizes(spec_brokers, spec_proxies)
        status: dict[str, Any] = {}
        for tier in Tier:
            kept = self._sizes.get(tier)
            status[tier.plural] = (kept.to_status() if kept is not None and self._tier(tier).target is not None
                                   else {"desired": sizes[tier], "reason": "not autoscaled: no target annotation"})
        return status

    def _tier(self, tier: Tier) -> TierPolicy:
        assert self.policy is not None
        return self.policy.brokers if tier is Tier.BROKER else self.policy.proxies


def _persisted_sizes(persisted: object) -> dict[Tier, TierSize]:
    """The sizes a previous operator decided, from `status.autoscaling` (garbage ignored)."""
    sizes: dict[Tier, TierSize] = {}
    if not isinstance(persisted, Mapping):
        return sizes
    for tier in Tier:
        entry = persisted.get(tier.plural)
        desired = entry.get("desired") if isinstance(entry, Mapping) else None
        if isinstance(desired, int) and not isinstance(desired, bool) and 0 <= desired <= HARD_MAX:
            assert isinstance(entry, Mapping)
            when = entry.get("lastScaleTime")
            sizes[tier] = TierSize(desired, str(entry.get("reason") or "kept from status"),
                                   when if isinstance(when, str) else None)
    return sizes


def problems(errors: tuple[PolicyError, ...]) -> str:
    """The errors as one message: `annotation: problem; ...` (sorted, so a set reads the same)."""
    return "; ".join(sorted(str(error) for error in errors))
