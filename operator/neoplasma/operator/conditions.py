"""Status conditions of a NeoplasmaCluster, Kubernetes-style: pure functions.

One function per condition type computes it from what the operator observed; `merge` turns
them into the `status.conditions` list, keeping a condition's `lastTransitionTime` unless its
status actually changed (as Kubernetes' own controllers do).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from neoplasma.operator.spec import SubscriberAuth
from neoplasma.proxy.auth import jwks_keys, secret_lines

READY = "Ready"
MEMBERSHIP_SYNCED = "MembershipSynced"
SPEC_VALID = "SpecValid"
AUTOSCALING_POLICY_VALID = "AutoscalingPolicyValid"
RECONCILIATION_PAUSED = "ReconciliationPaused"
INGEST_READY = "IngestReady"  # only while spec.ingest is set
SUBSCRIBER_KEYS_READY = "SubscriberKeysReady"  # only while spec.subscribers.auth is set
MAX_FAILURES_NAMED = 5  # failing proxies named in MembershipSynced's message (a cluster may have 1000)
OWN_TYPES = (READY, MEMBERSHIP_SYNCED, SPEC_VALID, AUTOSCALING_POLICY_VALID, RECONCILIATION_PAUSED, INGEST_READY,
             SUBSCRIBER_KEYS_READY)


@dataclass(frozen=True)
class Condition:
    type: str
    status: bool | None  # None: Unknown
    reason: str
    message: str

    @property
    def status_text(self) -> str:
        return "Unknown" if self.status is None else str(self.status)


@dataclass(frozen=True)
class MembershipProgress:
    """How far the push of the current membership snapshot has got."""

    version: int
    brokers: int
    proxies: int  # ready proxies (push targets)
    acknowledged: int  # of those, how many run `version`
    errors: Mapping[str, str]  # proxy name -> why its last push failed
    last_convergence_seconds: float | None = None
    lagging: tuple[str, ...] = ()  # the ready proxies not running `version`: those failing first, then by name

    @property
    def synced(self) -> bool:
        return self.acknowledged >= self.proxies


@dataclass(frozen=True)
class ReaderSeen:
    """An ingest reader pod as the operator saw it: its /stats (None: not read, `error` says why)."""

    name: str
    stats: Mapping[str, Any] | None = None
    error: str = ""


def now_text(now: datetime | None = None) -> str:
    """A timestamp as Kubernetes writes them (RFC 3339, seconds, UTC)."""
    return (now or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")


def subscriber_keys_problem(auth: SubscriberAuth, secrets: Mapping[str, Mapping[str, str] | None]) -> str | None:
    """What keeps the proxies from using spec.subscribers.auth's keys (None: nothing): a Secret that does not
    exist (the pods cannot start), a key it lacks, or keys the proxies would refuse (checked as they check
    them). `secrets`: each named Secret's data, None for one that does not exist."""
    for path, ref in auth.secrets().items():
        data = secrets.get(ref.name)
        if data is None:
            return f"Secret {ref.name} ({path}) does not exist: proxy pods cannot start until it does"
        if ref.key not in data:
            return f"Secret {ref.name} has no key {ref.key!r} ({path}.key): add it, or name the key that holds them"
        parse = jwks_keys if path.endswith("jwksSecretRef") else secret_lines
        try:
            parse(data[ref.key])
        except ValueError as exc:
            return f"Secret {ref.name} key {ref.key!r} ({path}) cannot be used: {exc}"
    return None


def subscriber_keys_ready(problem: str | None) -> Condition:
    if problem is None:
        return Condition(SUBSCRIBER_KEYS_READY, True, "Ready", "the proxies' subscriber token keys are in place")
    return Condition(SUBSCRIBER_KEYS_READY, False, "SubscriberKeysInvalid", problem)


def spec_valid(error: str | None) -> Condition:
    if error is None:
        return Condition(SPEC_VALID, True, "Valid", "the spec parses and renders")
    return Condition(SPEC_VALID, False, "InvalidSpec", f"{error}; fix the resource and apply it again")


def autoscaling_policy_valid(problems: str | None, have_good_policy: bool, autoscale: bool) -> Condition:
    """From the neoplasma.io/ annotations: `problems` lists what could not be used (None: none)."""
    if problems is None:
        return Condition(AUTOSCALING_POLICY_VALID, True, "Valid",
                         "autoscaling is on" if autoscale else "autoscaling is off")
    kept = ("the last good policy stays in force" if have_good_policy
            else "no annotation set was valid yet: the spec's replicas are used")
    return Condition(AUTOSCALING_POLICY_VALID, False, "InvalidAnnotation", f"{problems}; {kept}")


def reconciliation_paused(paused: bool, seen_generation: int | None = None) -> Condition:
    """`seen_generation`: the newest spec generation the operator has seen (and, paused, not applied)."""
    if paused:
        seen = f" (latest generation seen: {seen_generation})" if seen_generation is not None else ""
        return Condition(RECONCILIATION_PAUSED, True, "PauseAnnotation",
                         'neoplasma.io/pause-reconciliation is "true": no child is created, changed, deleted or '
                         f"scaled{seen}; membership is still pushed to the proxies")
    return Condition(RECONCILIATION_PAUSED, False, "NotPaused", "the operator converges the children")


def membership_synced(progress: MembershipProgress) -> Condition:
    version = f"membership version {progress.version} ({count(progress.brokers, 'broker')})"
    if progress.proxies == 0:
        return Condition(MEMBERSHIP_SYNCED, True, "NoReadyProxies", f"{version}; no ready proxy to push it to")
    applied = f"{version} applied by {progress.acknowledged} of {count(progress.proxies, 'ready proxy')}"
    if progress.synced:
        return Condition(MEMBERSHIP_SYNCED, True, "AllProxiesApplied", applied)
    if progress.errors:
        failing = sorted(progress.errors.items())
        failures = "; ".join(f"{name}: {error[:200]}" for name, error in failing[:MAX_FAILURES_NAMED])
        more = (f"; and {len(failing) - MAX_FAILURES_NAMED} more (status.membership.lagging names up to 10)"
                if len(failing) > MAX_FAILURES_NAMED else "")
        return Condition(MEMBERSHIP_SYNCED, False, "PushFailed", f"{applied}; retrying {failures}{more}")
    return Condition(MEMBERSHIP_SYNCED, False, "Pushing", applied)


def ready(
    *,
    spec_error: str | None,
    brokers: tuple[int, int],
    proxies: tuple[int, int],
    membership: Condition,
) -> Condition:
    """Ready: the spec is valid, all desired brokers and proxies are ready (given as
    (desired, ready)), and every ready proxy applied the current membership."""
    if spec_error is not None:
        return Condition(READY, False, "InvalidSpec", spec_error)
    problems: list[tuple[str, str]] = []
    for reason, (desired, have), what in (
        ("BrokersNotReady", brokers, "broker"),
        ("ProxiesNotReady", proxies, "proxy"),
    ):
        if have < desired:
            problems.append((reason, f"{have} of {count(desired, what)} ready"))
    if membership.status is not True:
        problems.append(("MembershipNotSynced", membership.message))
    if problems:
        return Condition(READY, False, problems[0][0], "; ".join(message for _, message in problems))
    return Condition(
        READY, True, "AllReady",
        f"{count(brokers[1], 'broker')} and {count(proxies[1], 'proxy')} ready; {membership.message}",
    )


def ingest_ready(readers: Sequence[ReaderSeen], redis: str) -> Condition:
    """IngestReady, from the readers' /stats: True while one holds the lease and reads `redis`;
    else why not (RedisUnreachable, BrokersUnavailable, NoActiveReader, NoReader, ReadersUnreachable)."""
    seen = [r for r in readers if r.stats is not None]
    standby = sum(1 for r in seen if not r.stats or not r.stats.get("active"))
    for reader in seen:
        stats = reader.stats or {}
        if not stats.get("active"):
            continue
        if stats.get("ready"):
            return Condition(INGEST_READY, True, "Reading", f"reader {reader.name} reads {redis}; "
                             f"{count(standby, 'reader')} standing by")
        reason = "RedisUnreachable" if stats.get("redis_error") else "BrokersUnavailable"
        return Condition(INGEST_READY, False, reason, f"reader {reader.name}: {stats.get('reason')}")
    lease = [f"{r.name}: {(r.stats or {}).get('reason')}" for r in seen if (r.stats or {}).get("lease_error")]
    if lease:
        return Condition(INGEST_READY, False, "RedisUnreachable", f"no reader holds the lease of {redis}; "
                         + "; ".join(lease))
    if seen:
        return Condition(INGEST_READY, False, "NoActiveReader", f"no reader holds the lease of {redis} yet (a "
                         f"hand-over takes up to the lease's ttl); {count(len(seen), 'reader')} standing by")
    if not readers:
        return Condition(INGEST_READY, False, "NoReader", "no ingest reader pod is running")
    return Condition(INGEST_READY, False, "ReadersUnreachable", "cannot read the readers' /stats: "
                     + "; ".join(f"{r.name}: {r.error}" for r in readers))


def merge(
    existing: Sequence[Mapping[str, Any]] | None, conditions: Iterable[Condition], now: str
) -> list[dict[str, Any]]:
    """`status.conditions`: ours in order, then any others found in `existing` (untouched; of our
    own types, those not given are dropped: IngestReady once spec.ingest is unset).

    A condition whose status is unchanged keeps its `lastTransitionTime`; reason and message
    are always the current ones.
    """
    previous = {str(c.get("type")): c for c in existing or [] if isinstance(c, Mapping)}
    merged: list[dict[str, Any]] = []
    ours = set()
    for condition in conditions:
        ours.add(condition.type)
        before = previous.get(condition.type)
        changed = before is None or before.get("status") != condition.status_text
        since = now if changed or not before or not before.get("lastTransitionTime") else before["lastTransitionTime"]
        merged.append({
            "type": condition.type,
            "status": condition.status_text,
            "reason": condition.reason,
            "message": condition.message,
            "lastTransitionTime": str(since),
        })
    merged.extend(dict(c) for kind, c in previous.items() if kind not in ours and kind not in OWN_TYPES)
    return merged


def count(number: int, noun: str) -> str:
    """`number` and `noun`, plural unless 1 ("2 brokers", "1 ready proxy")."""
    if number == 1:
        return f"1 {noun}"
    plural = noun[:-1] + "ies" if noun.endswith("y") else noun + "s"
    return f"{number} {plural}"
