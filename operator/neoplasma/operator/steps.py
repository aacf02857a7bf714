"""The steps of one NeoplasmaCluster's pass, pure: `Resource` reads the resource; then, over one
observation (observe.Seen) and the time, `Trust`, `Membership`, `Scaling`, `Connections`,
`Children` and `Status` each return a `Decision` (events, trust material, membership to push,
drains to pace, children to apply, a status to write), in the order of `Steps.sequence()`.

`due` says when a step next needs a pass (clock time; None: only when woken); `to_read` what the
next observation must read for it. No step does I/O: the controller's act phase does what they
decide and tells them how it went. Each keeps its own `Problems`: a Warning when one starts or
changes, again if it returns after clearing.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from neoplasma.core import drains
from neoplasma.core.autoscaler import Autoscaler, Scaled, problems
from neoplasma.core.backoff import Backoff, BackoffPolicy
from neoplasma.core.load import brokers_load
from neoplasma.core.membership import BrokerState
from neoplasma.core.net import hostport
from neoplasma.core.scaling import ConnectionPolicy, Load
from neoplasma.core.tiers import Tier
from neoplasma.core.trust import PLAIN, Access, Tokens
from neoplasma.operator import children as ch
from neoplasma.operator import connections as cx
from neoplasma.operator.conditions import count, subscriber_keys_problem
from neoplasma.operator.members import broker_members, current_replicaset, proxy_targets, ready_count
from neoplasma.operator.observe import Desired, Seen, TrustSeen, Wants, serving
from neoplasma.operator.render import (
    CONTROL_PORT,
    CREDENTIAL_KEY,
    PROXY_DRAIN_DELAY,
    Manifest,
    credential_secret,
    credential_secret_name,
    service_host,
)
from neoplasma.operator.settings import Options
from neoplasma.operator.spec import Cluster, InvalidSpec, parse_cluster
from neoplasma.operator.status import Observed, build_status, same_status
from neoplasma.operator.sync import MembershipSync
from neoplasma.wire.v1 import neoplasma_pb2 as pb


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


@dataclass
class Decision:
    """What one step decided, for the act phase; every part optional."""

    events: list[Event] = field(default_factory=list)
    access: dict[Tier, Access] | None = None  # how to reach the pods from now on (credential, TLS)
    secret: Manifest | None = None  # the credential Secret to create
    push: bool = False  # start the membership pushes that are due (a new version, retries, anti-entropy)
    scaled: list[Scaled] = field(default_factory=list)  # for the metrics
    drains: dict[str, pb.DrainRequest] = field(default_factory=dict)  # control address -> a pace or a limit
    plan: ch.Plan | None = None  # children to apply and delete (Children.applied/failed after)
    observed: Observed | None = None  # for the metrics
    status: dict[str, Any] | None = None  # to write (Status.written/failed after)


class Failing:
    """A pass that raised (a bug): retried with backoff, reported once while it lasts."""

    def __init__(self, retry: BackoffPolicy) -> None:
        self.retry = Backoff(retry)
        self.problems = Problems()

    def failed(self, error: str, now: float) -> tuple[float, list[Event]]:
        """The delay before the next pass, and the events."""
        delay = self.retry.failed(now)
        return delay, [Event("ReconcileFailed", f"{error}; retrying in {delay:g} s", True)
                       ] if self.problems.news("pass", error) else []

    def succeeded(self) -> None:
        self.retry.succeeded()
        self.problems.news("pass", None)


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


def access_for(cluster: Cluster, token: str, ca: str) -> dict[Tier, Access]:
    """How to reach each tier's pods: the credential, and with spec.trust's CA, TLS to the name
    on the tier's certificate."""
    tokens = Tokens(given=[token])
    return {tier: Access(tokens, server_name=service_host(cluster, tier) if ca else "", ca=ca) for tier in Tier}


class Trust:
    """Step 1: the cluster credential (a Secret, owned by the resource, made when there is none)
    and spec.trust's CA. Read when stale (at first, after a problem), when a child changed, and
    every `refresh` seconds, so that a replaced Secret is used soon; a problem keeps the last."""

    def __init__(self, refresh: float, now: float) -> None:
        self.access: dict[Tier, Access] = dict.fromkeys(Tier, PLAIN)
        self.timer = Every(refresh, now + refresh)
        self.problems = Problems()
        self.stale = True
        self.subscriber_keys: str | None = None  # what is wrong with spec.subscribers.auth's keys, if anything

    @property
    def due(self) -> float | None:
        return self.timer.next

    def to_read(self, desired: Desired, now: float) -> bool:
        return desired.cluster is not None and not desired.deleting and (self.timer.fire(now) or self.stale)

    def reach(self, cluster: Cluster | None, seen: TrustSeen | None) -> dict[Tier, Access]:
        """The access this pass reads with: from the credential just read, else the last."""
        token = ((seen.credential or {}).get(CREDENTIAL_KEY, "").strip()
                 if seen is not None and seen.error is None else "")
        return access_for(cluster, token, seen.ca) if cluster is not None and token and seen else self.access

    def decide(self, seen: Seen, now: float) -> Decision:
        cluster = seen.desired.cluster
        if seen.trust is None or cluster is None:
            return Decision()
        self.stale = True
        name = credential_secret_name(cluster.name)
        if seen.trust.error is not None:
            return Decision([Event("CredentialFailed", f"reading the cluster credential failed: {seen.trust.error}; "
                                   "keeping the last one", True)] if self.problems.news("trust", seen.trust.error)
                            else [])
        decision = Decision()
        auth = cluster.spec.subscriber_auth
        if auth is not None and seen.trust.subscriber_secrets is not None:  # a condition and an event when unusable
            self.subscriber_keys = subscriber_keys_problem(auth, seen.trust.subscriber_secrets)
            if self.problems.news("subscriber-keys", self.subscriber_keys) and self.subscriber_keys:
                decision.events.append(Event("SubscriberKeysInvalid", self.subscriber_keys, True))
        credential = seen.trust.credential
        if credential is None:
            credential = {CREDENTIAL_KEY: secrets.token_urlsafe(32)}
            decision.secret = ch.adopted([credential_secret(cluster, credential[CREDENTIAL_KEY])], seen.body)[0]
            decision.events.append(Event("Created", f"created Secret {name} (the cluster credential)"))
        token = credential.get(CREDENTIAL_KEY, "").strip()
        problem = None if token else f"Secret {name} has no key {CREDENTIAL_KEY!r}: delete it to have a new one made"
        if self.problems.news("trust", problem) and problem:
            decision.events.append(Event("CredentialFailed", problem, True))
        if problem is None:
            self.stale = decision.secret is not None  # read back once made
            decision.access = access_for(cluster, token, seen.trust.ca)
        return decision


class Membership:
    """Step 2: the ready brokers as the next snapshot; `MembershipSync` pushes it to the ready
    proxies (retrying each with backoff, and pushing it again to each one every `anti_entropy`
    seconds at that proxy's own phase: sync.Refresh)."""

    def __init__(self, sync: MembershipSync) -> None:
        self.sync = sync
        self.problems = Problems()
        self._announced = 0

    @property
    def due(self) -> float | None:
        return self.sync.next_due()

    def decide(self, seen: Seen, now: float) -> Decision:
        """The next snapshot (the act phase pushes it), and its events."""
        targets = proxy_targets(seen.pods)
        snapshot = self.sync.update(broker_members(seen.pods), targets, seen.pods_changed_at)
        decision = Decision(push=True)
        if snapshot.version != self._announced:
            self._announced = snapshot.version
            draining = sum(1 for m in snapshot.members if m.state is BrokerState.DRAINING)
            decision.events.append(Event("MembershipChanged", f"membership version {snapshot.version}: "
                                         f"{count(len(snapshot.members), 'broker')} ({draining} draining), "
                                         f"pushing to {count(len(targets), 'ready proxy')}"))
        failing = self.sync.progress().errors
        self.problems.keep(failing)
        for proxy, error in failing.items():
            if self.problems.news(proxy, f"version {snapshot.version}"):
                decision.events.append(Event("PushFailed", f"proxy pod {proxy} has not applied membership version "
                                             f"{snapshot.version}: {error}; retrying with backoff", warning=True))
        return decision


class Scaling:
    """Step 3: the replicas to render, the spec's or (autoscaling) the autoscaler's, decided
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

    def decide(self, seen: Seen, now: float) -> Decision:
        desired = seen.desired
        if not desired.changeable or desired.cluster is None:
            return Decision()
        spec = desired.cluster.spec
        loads = self.loads(seen)
        changes = (self.autoscaler.step(spec.brokers.replicas, spec.proxies.replicas, loads, now, seen.stamp)
                   if loads else [])
        sizes = self.autoscaler.sizes(spec.brokers.replicas, spec.proxies.replicas)
        self.effective = replace(desired.cluster, spec=replace(
            spec, brokers=replace(spec.brokers, replicas=sizes[Tier.BROKER]),
            proxies=replace(spec.proxies, replicas=sizes[Tier.PROXY])))
        return Decision([Event("ScaledBrokers" if change.tier is Tier.BROKER else "ScaledProxies", change.describe())
                         for change in changes], scaled=changes)

    @staticmethod
    def loads(seen: Seen) -> dict[Tier, Load | None]:
        """The load of the tiers read for a decision: the serving brokers' Stats, the proxies'."""
        loads: dict[Tier, Load | None] = {}
        if Tier.BROKER in seen.wants.loads:
            names = {p.name for p in serving(seen.pods, Tier.BROKER)}
            loads[Tier.BROKER] = brokers_load(s for n, s in (seen.brokers or {}).items() if n in names)
        if Tier.PROXY in seen.wants.loads:
            loads[Tier.PROXY] = seen.proxy_load
        return loads


class Connections:
    """Step 4: subscribers as a managed resource (operator/connections.py). Every proxy pod's
    Status (stopping ones too) is read every `interval` seconds, every `BUSY` seconds while
    subscribers are being moved; each stopping pod gets its pace and, rebalancing, each live one its
    limit, from one reconnect budget; status.rebalance and status.reconnects say what goes on.
    Paused, nothing is rebalanced (drains are still paced: the pods stop anyway)."""

    BUSY = 2.0

    def __init__(self, autoscaler: Autoscaler, scaling: Scaling, interval: float, now: float) -> None:
        self.autoscaler = autoscaler
        self.scaling = scaling
        self.interval = interval
        self.timer = Every(interval, now)
        self.state = cx.Connections()
        self.rebalance: Mapping[str, Any] | None = None  # the last decided status sections
        self.reconnects: Mapping[str, Any] | None = None
        self._policy: ConnectionPolicy | None = None  # the policy of the last decision
        self.stale = True  # pods changed since the last read

    @property
    def due(self) -> float | None:
        return self.timer.next

    def to_read(self, desired: Desired, now: float) -> bool:
        """Every `interval` (or BUSY) seconds, and at once when pods changed (a stopping one gets its
        pace before its drain begins) or the annotations did (approve)."""
        if desired.cluster is None or desired.deleting:
            return False
        read = self.timer.fire(now) or self.stale or self.autoscaler.connections != self._policy
        if read:  # (a pod change while this read is under way makes it stale again: read once more)
            self.stale = False
        return read

    def sizing(self, cluster: Cluster) -> cx.DrainSizing:
        """How the proxy pods drain: from the budget and the busiest proxy seen."""
        return cx.drain_sizing(self.autoscaler.connections.max_reconnects, self.state.busiest, PROXY_DRAIN_DELAY,
                               cluster.spec.proxies.replicas)

    def decide(self, seen: Seen, now: float) -> Decision:
        cluster = self.scaling.effective or seen.desired.cluster
        if seen.proxies is None or cluster is None:
            return Decision()
        policy = self._policy = self.autoscaler.connections
        if seen.desired.paused:
            policy = replace(policy, rebalance="off")
        pods = [p for p in seen.pods if p.component == Tier.PROXY]
        deployment = next((str((c.get("metadata") or {}).get("uid")) for c in seen.children
                           if c.get("kind") == "Deployment" and (c.get("metadata") or {}).get("name")
                           == f"{cluster.name}-proxy"), "")
        scaled_in = self.state.scaled_in(cluster.spec.proxies.replicas, self.sizing(cluster).grace_seconds, now)
        wall = datetime.fromisoformat(seen.stamp)
        proxies = cx.pods_seen(pods, {name: (status.subscribers, status.movable_subscribers)
                                      for name, status in seen.proxies.items()},
                               current_replicaset(seen.replicasets, deployment), scaled_in, wall)
        orders = self.state.step(policy, proxies, (seen.body.get("status") or {}).get("rebalance"), now, wall)
        self.rebalance, self.reconnects = orders.status["rebalance"], orders.status["reconnects"]
        busy = bool(orders.paces or self.state.rebalancer.current)
        self.timer.interval = self.BUSY if busy else self.interval
        self.timer.next = min(self.timer.next, now + self.timer.interval)
        address = {p.name: hostport(p.ip, CONTROL_PORT) for p in pods if p.ip}
        requests = {address[x.proxy]: drains.pace(x.rate) for x in orders.paces if x.proxy in address}
        requests |= {address[x.proxy]: drains.limit(x.keep, x.rate, x.hold) for x in orders.limits
                     if x.proxy in address}
        return Decision([Event(n.reason, n.message, n.warning) for n in orders.notices], drains=requests)


class Children:
    """Step 4: the children rendered from the cluster, applied when they may differ (the
    resource changed, a child changed, the sizes changed, or every `resync` seconds); after a
    failure, not before the backoff says."""

    def __init__(self, options: Options, scaling: Scaling, connections: Connections, now: float) -> None:
        self.scaling = scaling
        self.connections = connections
        retry, resync = options.retry, options.resync
        self.retry = Backoff(retry)
        self.resync = Every(resync, now + resync)
        self.problems = Problems()
        self.render: dict[str, Any] = {"default_image": options.default_image, "policy_api": options.policy_api,
                                       "operator": options.operator}
        self.dirty = True  # a child changed (or might have): look again
        self.generation: int | None = None  # the generation last converged
        self._converged: tuple[int, int, int, cx.DrainSizing] | None = None  # generation, sizes, drains

    @property
    def due(self) -> float | None:
        return earliest(self.resync.next, self.retry.not_before)

    def decide(self, seen: Seen, now: float) -> Decision:
        """What to apply and delete now, if it is time to look."""
        desired, cluster = seen.desired, self.scaling.effective
        if self.resync.fire(now):
            self.dirty = True
        if not desired.changeable or cluster is None:
            self.retry.succeeded()  # nothing to retry until it may change again...
            self.dirty = True  # ...and then whatever changed meanwhile is converged
            return Decision()
        spec = cluster.spec
        if self.retry.not_before is not None:
            go = self.retry.due(now)
        else:
            go = self.dirty or (desired.generation, spec.brokers.replicas, spec.proxies.replicas,
                                self.connections.sizing(cluster)) != self._converged
        if not go:
            return Decision()
        self.dirty = False
        uid = str((seen.body.get("metadata") or {}).get("uid"))
        return Decision(plan=ch.plan(ch.desired_children(cluster, seen.body, drains=self.connections.sizing(cluster),
                                                         **self.render), seen.children, owner_uid=uid))

    def applied(self, desired: Desired, cluster: Cluster) -> None:
        self.retry.succeeded()
        self.problems.news("apply", None)
        self.generation = desired.generation
        self._converged = (desired.generation, cluster.spec.brokers.replicas, cluster.spec.proxies.replicas,
                           self.connections.sizing(cluster))

    def failed(self, error: str, now: float) -> list[Event]:
        delay = self.retry.failed(now)
        return [Event("ReconcileFailed", f"applying children failed: {error}; retrying in {delay:g} s", True)
                ] if self.problems.news("apply", error) else []


class Status:
    """Step 5: `status`, written when it changed; while a membership push that has gone well so
    far is under way (up to `grace` seconds), not at all, so that Ready does not flicker."""

    def __init__(self, options: Options, steps: Steps, now: float) -> None:
        self.steps = steps  # the other steps' state that status reports
        self.retry = Backoff(options.retry)
        self.grace = options.sync_grace
        self.stats = Every(options.stats_interval, now)  # when the brokers' connections are read
        self.problems = Problems()
        self.due_at: float | None = None
        # The status last written, and the resourceVersion the resource had just before: while
        # the object the controller holds is that old, our write is newer than what it shows.
        self._written: tuple[str | None, dict[str, Any]] | None = None
        self._pending: tuple[str | None, dict[str, Any]] | None = None

    @property
    def due(self) -> float | None:
        return earliest(self.stats.next, self.due_at)

    def to_read(self, desired: Desired, now: float) -> bool:
        """Whether the brokers' connections are to be read on this pass."""
        return self.stats.fire(now) and not desired.deleting

    def decide(self, seen: Seen, now: float) -> Decision:
        """The status to write now, if any."""
        self.due_at = None
        if seen.desired.deleting:
            return Decision()  # being deleted: the garbage collector removes the children
        observed = self.observed(seen)
        decision = Decision(observed=observed)
        settling_since = self.steps.membership.sync.settling_since()
        if settling_since is not None and now < settling_since + self.grace:
            self.due_at = settling_since + self.grace
            return decision
        body = seen.body
        version = (body.get("metadata") or {}).get("resourceVersion")
        if self._written is not None and self._written[0] == version:
            current: Mapping[str, Any] = self._written[1]
        else:
            current = body.get("status") or {}
        status = build_status(observed, current, seen.stamp)
        if not same_status(status, current):
            self._pending = (version, {**current, **status})
            decision.status = status
        return decision

    def observed(self, seen: Seen) -> Observed:
        desired, steps = seen.desired, self.steps
        cluster = steps.scaling.effective or desired.cluster
        spec = desired.cluster.spec if desired.cluster else None
        autoscaler = steps.resource.autoscaler
        converged = steps.children.generation
        ingest = desired.cluster.spec.ingest if desired.cluster else None
        return Observed(
            generation=desired.generation if desired.spec_error is not None or converged is None else converged,
            spec_error=desired.spec_error,
            brokers=(cluster.spec.brokers.replicas if cluster else 0, ready_count(seen.pods, Tier.BROKER)),
            proxies=(cluster.spec.proxies.replicas if cluster else 0, ready_count(seen.pods, Tier.PROXY)),
            deployments=ch.broker_deployments(seen.children),
            membership=steps.membership.sync.progress(),
            connections=self.connections(seen),
            autoscaling=autoscaler.status(spec.brokers.replicas, spec.proxies.replicas) if spec else None,
            policy_problems=problems(autoscaler.errors) if autoscaler.errors else None,
            policy_kept=autoscaler.policy is not None,
            paused=desired.paused,
            seen_generation=desired.generation,
            ingest=(ingest.address, seen.readers or []) if ingest else None,
            subscriber_keys=(steps.trust.subscriber_keys,) if spec and spec.subscriber_auth else None,
            rebalance=steps.connections.rebalance,
            reconnects=steps.connections.reconnects,
        )

    @staticmethod
    def connections(seen: Seen) -> int | None:
        """The ready brokers' connections (0 without any; None when not read, or none answered: keep the last)."""
        if not seen.wants.connections or seen.brokers is None:
            return None
        ready = [p for p in seen.pods if p.component == Tier.BROKER and p.ready and p.ip]
        load = brokers_load(seen.brokers.values())
        return int(load.total) if load.pods_read or not ready else None

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


class Steps:
    """One cluster's steps. `sequence()` is the order they decide over a pass's observation (a
    new step is one more entry there, and one more part of `Decision` for the act phase)."""

    def __init__(self, body: Mapping[str, Any], options: Options, sync: MembershipSync, now: float) -> None:
        metadata, status = body.get("metadata") or {}, body.get("status") or {}
        autoscaler = Autoscaler(status.get("autoscaling"))
        self.resource = Resource(autoscaler, f"{metadata.get('namespace')}/{metadata.get('name')}")
        self.trust = Trust(options.anti_entropy, now)
        self.membership = Membership(sync)
        self.scaling = Scaling(autoscaler, options.scale_interval, now)
        self.connections = Connections(autoscaler, self.scaling, options.scale_interval, now)
        self.children = Children(options, self.scaling, self.connections, now)
        self.status = Status(options, self, now)

    def sequence(self) -> list[Trust | Membership | Scaling | Connections | Children | Status]:
        return [*self.without_reads(), *self.with_reads()]

    def without_reads(self) -> list[Trust | Membership]:
        """The steps that decide from the API's view alone (pods, Secrets): acted on before the pods'
        own answers are in, so that a slow or frozen pod never delays a membership push."""
        return [self.trust, self.membership]

    def with_reads(self) -> list[Scaling | Connections | Children | Status]:
        """The steps that also need the pods' answers (Stats, Status, /stats)."""
        return [self.scaling, self.connections, self.children, self.status]

    @property
    def due(self) -> float | None:
        return earliest(*(step.due for step in self.sequence()))

    def wants(self, desired: Desired, now: float, pods: bool = True) -> Wants:
        """What the next observation must read (firing the steps' read timers); `pods`: whether the pass
        reads the pods at all (not while another pass's reads are under way: their timers keep)."""
        trust = self.trust.to_read(desired, now)
        if not pods:
            return Wants(trust=trust)
        ingest = desired.cluster is not None and desired.cluster.spec.ingest is not None and not desired.deleting
        return Wants(trust=trust, loads=tuple(self.scaling.to_read(desired, now)),
                     connections=self.status.to_read(desired, now), readers=ingest,
                     proxies=self.connections.to_read(desired, now))
