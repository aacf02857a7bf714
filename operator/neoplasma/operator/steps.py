"""The steps of one NeoplasmaCluster's pass (`Resource`, `Membership`, `Scaling`, `Children`,
`Status`), in the order controller.py runs them.

Each step takes what was observed and returns what to do (events, children to apply, a status
to write); `due` says when it next needs to run (clock time; None: only when woken). No step
does I/O or knows another: the controller does what they say and tells them how it went. Each
keeps its own `Problems`: a Warning when one starts or changes, again if it returns after clearing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from neoplasma.core.autoscaler import Autoscaler, Scaled, problems
from neoplasma.core.backoff import Backoff, BackoffPolicy
from neoplasma.core.membership import BrokerState
from neoplasma.core.scaling import Load
from neoplasma.core.tiers import Tier
from neoplasma.operator import children as ch
from neoplasma.operator.conditions import count, now_text
from neoplasma.operator.members import PodView, broker_members, proxy_targets
from neoplasma.operator.settings import Peers
from neoplasma.operator.spec import Cluster, InvalidSpec, parse_cluster
from neoplasma.operator.status import Observed, build_status, same_status
from neoplasma.operator.sync import MembershipSync


@dataclass(frozen=True)
class Event:
    """A Kubernetes Event to post about the resource."""

    reason: str
    message: str
    warning: bool = False


class Problems:
    """The open problem of each topic (a failing call, a bad annotation, a proxy's push)."""

    def __init__(self) -> None:
        self._open: dict[str, str] = {}

    def news(self, topic: str, problem: str | None) -> bool:
        """Record `problem` (None: cleared) under `topic`; whether it is news to report."""
        before = self._open.pop(topic, None)
        if problem is not None:
            self._open[topic] = problem
        return problem is not None and problem != before

    def keep(self, topics: Iterable[str]) -> None:
        """Clear every topic not in `topics`."""
        self._open = {t: p for t, p in self._open.items() if t in set(topics)}


class Every:
    """A periodic timer: `fire(now)` is true once per `interval` seconds, from `next`."""

    def __init__(self, interval: float, next: float) -> None:
        self.interval = interval
        self.next = next

    def fire(self, now: float) -> bool:
        if now < self.next:
            return False
        self.next = now + self.interval
        return True


def earliest(*times: float | None) -> float | None:
    return min((t for t in times if t is not None), default=None)


@dataclass(frozen=True)
class Desired:
    """What the resource asks for, as read on one pass."""

    generation: int
    cluster: Cluster | None  # the last spec that parsed
    spec_error: str | None  # None: this generation's spec parsed
    paused: bool
    deleting: bool

    @property
    def changeable(self) -> bool:
        """Whether the children may be changed now."""
        return self.spec_error is None and not self.paused and not self.deleting and self.cluster is not None


class Resource:
    """Step 0: the spec and the autoscaling policy (bad annotations keep the last good one)."""

    def __init__(self, autoscaler: Autoscaler, label: str) -> None:
        self.autoscaler = autoscaler
        self.label = label
        self.problems = Problems()
        self._cluster: Cluster | None = None
        self._paused = False

    def step(self, body: Mapping[str, Any]) -> tuple[Desired, list[Event]]:
        metadata = body.get("metadata") or {}
        generation = int(metadata.get("generation") or 0)
        events: list[Event] = []
        spec_error = message = None
        try:
            self._cluster = parse_cluster(body)
        except InvalidSpec as error:
            spec_error = str(error)
            message = (f"NeoplasmaCluster {self.label} (generation {generation}) is invalid: {error}; "
                       "fix the resource and apply it again")
        if self.problems.news("spec", message) and message:
            events.append(Event("InvalidSpec", message, warning=True))
        spec = (self._cluster or Cluster("", "")).spec
        scaler = self.autoscaler
        scaler.read({str(k): str(v) for k, v in (metadata.get("annotations") or {}).items()},
                    spec.brokers.replicas, spec.proxies.replicas)
        if self.problems.news("annotations", problems(scaler.errors) if scaler.errors else None):
            events.append(Event("InvalidAnnotation", f"annotations not used: {problems(scaler.errors)}; " + (
                "the last good policy stays in force" if scaler.policy is not None
                else "no autoscaling until they are fixed"), warning=True))
        if scaler.paused != self._paused:
            self._paused = scaler.paused
            events.append(Event("ReconciliationPaused", "no change to children until neoplasma.io/pause-"
                                "reconciliation is removed; membership is still pushed to proxies") if scaler.paused
                          else Event("ReconciliationResumed", "converging the children again"))
        return Desired(generation, self._cluster, spec_error, scaler.paused,
                       bool(metadata.get("deletionTimestamp"))), events


class Membership:
    """Step 1: the ready brokers as the next snapshot; `MembershipSync` pushes it to the ready
    proxies (and retries each with backoff), and every `anti_entropy` seconds to all of them."""

    def __init__(self, sync: MembershipSync, anti_entropy: float, now: float) -> None:
        self.sync = sync
        self.refresh = Every(anti_entropy, now + anti_entropy)
        self.problems = Problems()
        self._announced = 0

    @property
    def due(self) -> float | None:
        return earliest(self.refresh.next, self.sync.next_retry())

    def step(self, pods: list[PodView], seen_at: float, now: float) -> list[Event]:
        targets = proxy_targets(pods)
        snapshot = self.sync.update(broker_members(pods), targets, seen_at)
        if self.refresh.fire(now):
            self.sync.refresh()
        events: list[Event] = []
        if snapshot.version != self._announced:
            self._announced = snapshot.version
            draining = sum(1 for m in snapshot.members if m.state is BrokerState.DRAINING)
            events.append(Event("MembershipChanged", f"membership version {snapshot.version}: "
                                f"{count(len(snapshot.members), 'broker')} ({draining} draining), "
                                f"pushing to {count(len(targets), 'ready proxy')}"))
        failing = self.sync.progress().errors
        self.problems.keep(failing)
        for proxy, error in failing.items():
            if self.problems.news(proxy, f"version {snapshot.version}"):
                events.append(Event("PushFailed", f"proxy pod {proxy} has not applied membership version "
                                    f"{snapshot.version}: {error}; retrying with backoff", warning=True))
        return events


class Scaling:
    """Step 2: the replicas to render, the spec's or (autoscaling) the autoscaler's, decided
    every `interval` seconds from the load of the autoscaled tiers."""

    def __init__(self, autoscaler: Autoscaler, interval: float, now: float) -> None:
        self.autoscaler = autoscaler
        self.timer = Every(interval, now)
        self.effective: Cluster | None = None  # as last rendered: with the decided replicas

    @property
    def due(self) -> float | None:
        return self.timer.next if self.autoscaler.autoscaled() and not self.autoscaler.paused else None

    def to_read(self, desired: Desired, now: float) -> list[Tier]:
        """The tiers whose load is to be read now for a decision."""
        tiers = self.autoscaler.autoscaled()
        if not tiers or desired.paused or not self.timer.fire(now):
            return []
        return tiers if desired.changeable else []

    def step(self, desired: Desired, loads: Mapping[Tier, Load | None], now: float) -> list[Scaled]:
        if not desired.changeable or desired.cluster is None:
            return []
        spec = desired.cluster.spec
        changes = (self.autoscaler.step(spec.brokers.replicas, spec.proxies.replicas, loads, now, now_text())
                   if loads else [])
        sizes = self.autoscaler.sizes(spec.brokers.replicas, spec.proxies.replicas)
        self.effective = replace(desired.cluster, spec=replace(
            spec, brokers=replace(spec.brokers, replicas=sizes[Tier.BROKER]),
            proxies=replace(spec.proxies, replicas=sizes[Tier.PROXY])))
        return changes


class Children:
    """Step 3: the children rendered from the cluster, applied when they may differ (the
    resource changed, a child changed, the sizes changed, or every `resync` seconds); after a
    failure, not before the backoff says."""

    def __init__(self, retry: BackoffPolicy, resync: float, now: float, *, default_image: str,
                 policy_api: str, operator: Peers) -> None:
        self.retry = Backoff(retry)
        self.resync = Every(resync, now + resync)
        self.problems = Problems()
        self.render: dict[str, Any] = {"default_image": default_image, "policy_api": policy_api, "operator": operator}
        self.dirty = True  # a child changed (or might have): look again
        self.generation: int | None = None  # the generation last converged
        self._converged: tuple[int, int, int] | None = None  # generation and sizes

    @property
    def due(self) -> float | None:
        return earliest(self.resync.next, self.retry.not_before)

    def step(self, desired: Desired, cluster: Cluster | None, body: Mapping[str, Any],
             served: list[Mapping[str, Any]], now: float) -> ch.Plan | None:
        """What to apply and delete now, if it is time to look."""
        if self.resync.fire(now):
            self.dirty = True
        if not desired.changeable or cluster is None:
            self.retry.succeeded()  # nothing to retry until it may change again...
            self.dirty = True  # ...and then whatever changed meanwhile is converged
            return None
        spec = cluster.spec
        if self.retry.not_before is not None:
            go = self.retry.due(now)
        else:
            go = self.dirty or (desired.generation, spec.brokers.replicas, spec.proxies.replicas) != self._converged
        if not go:
            return None
        self.dirty = False
        uid = str((body.get("metadata") or {}).get("uid"))
        return ch.plan(ch.desired_children(cluster, body, **self.render), served, owner_uid=uid)

    def applied(self, desired: Desired, cluster: Cluster) -> None:
        self.retry.succeeded()
        self.problems.news("apply", None)
        self.generation = desired.generation
        self._converged = (desired.generation, cluster.spec.brokers.replicas, cluster.spec.proxies.replicas)

    def failed(self, error: str, now: float) -> list[Event]:
        delay = self.retry.failed(now)
        return [Event("ReconcileFailed", f"applying children failed: {error}; retrying in {delay:g} s", True)
                ] if self.problems.news("apply", error) else []


class Status:
    """Step 4: `status`, written when it changed; while a membership push that has gone well so
    far is under way (up to `grace` seconds), not at all, so that Ready does not flicker."""

    def __init__(self, retry: BackoffPolicy, grace: float, stats_interval: float, now: float) -> None:
        self.retry = Backoff(retry)
        self.grace = grace
        self.stats = Every(stats_interval, now)  # when the brokers' connections are read
        self.problems = Problems()
        self.due_at: float | None = None
        # The status last written, and the resourceVersion the resource had just before: while
        # the object the controller holds is that old, our write is newer than what it shows.
        self._written: tuple[str | None, dict[str, Any]] | None = None
        self._pending: tuple[str | None, dict[str, Any]] | None = None

    @property
    def due(self) -> float | None:
        return earliest(self.stats.next, self.due_at)

    def step(self, observed: Observed, body: Mapping[str, Any], settling_since: float | None,
             now: float) -> dict[str, Any] | None:
        """The status to write now, if any."""
        self.due_at = None
        if settling_since is not None and now < settling_since + self.grace:
            self.due_at = settling_since + self.grace
            return None
        version = (body.get("metadata") or {}).get("resourceVersion")
        if self._written is not None and self._written[0] == version:
            current: Mapping[str, Any] = self._written[1]
        else:
            current = body.get("status") or {}
        status = build_status(observed, current, now_text())
        if same_status(status, current):
            return None
        self._pending = (version, {**current, **status})
        return status

    def written(self, kept: bool) -> None:
        """The write went through (`kept`: the resource still exists)."""
        self.retry.succeeded()
        self.problems.news("write", None)
        if kept:
            self._written = self._pending

    def failed(self, error: str, now: float) -> list[Event]:
        delay = self.retry.failed(now)
        self.due_at = self.retry.not_before
        return [Event("StatusFailed", f"writing status failed: {error}; retrying in {delay:g} s", True)
                ] if self.problems.news("write", error) else []
