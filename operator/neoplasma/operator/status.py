"""The `status` of a NeoplasmaCluster, built from what the operator observed: pure."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from neoplasma.operator import conditions as c


@dataclass(frozen=True)
class Observed:
    """Everything `status` is made of, as seen by one pass of the cluster's controller."""

    generation: int
    spec_error: str | None  # None: the spec parsed
    brokers: tuple[int, int]  # (desired, ready)
    proxies: tuple[int, int]  # (desired, ready)
    deployments: Sequence[Mapping[str, Any]]
    membership: c.MembershipProgress
    connections: int | None = None  # None: not measured (yet)
    autoscaling: Mapping[str, Any] | None = None  # the autoscaler's sizes (None: autoscaling off)
    policy_problems: str | None = None  # neoplasma.io/ annotations that could not be used
    policy_kept: bool = False  # whether a good policy (from before) is in force despite them
    paused: bool = False
    seen_generation: int | None = None  # the newest generation seen, applied or not
    ingest: tuple[str, Sequence[c.ReaderSeen]] | None = None  # spec.ingest's Redis and its readers (None: unset)
    # status.rebalance and status.reconnects (the Connections step; None: not decided on this pass)
    rebalance: Mapping[str, Any] | None = None
    reconnects: Mapping[str, Any] | None = None
    subscriber_keys: tuple[str | None] | None = None  # spec.subscribers.auth: (its keys' problem or None); None: unset


def build_status(observed: Observed, previous: Mapping[str, Any] | None, now: str) -> dict[str, Any]:
    """The operator's part of `status` (kopf's or others' keys are not touched)."""
    previous = previous or {}
    membership = c.membership_synced(observed.membership)
    ready = c.ready(
        spec_error=observed.spec_error, brokers=observed.brokers, proxies=observed.proxies,
        membership=membership,
    )
    status: dict[str, Any] = {
        "observedGeneration": observed.generation,
        "brokers": {"desired": observed.brokers[0], "ready": observed.brokers[1]},
        "proxies": {"desired": observed.proxies[0], "ready": observed.proxies[1]},
        "deployments": [dict(row) for row in observed.deployments],
        "membership": membership_status(observed.membership, previous.get("membership")),
        "conditions": c.merge(
            previous.get("conditions"),
            [ready, membership, c.spec_valid(observed.spec_error),
             c.autoscaling_policy_valid(observed.policy_problems, observed.policy_kept,
                                        observed.autoscaling is not None),
             c.reconciliation_paused(observed.paused, observed.seen_generation),
             *([c.ingest_ready(observed.ingest[1], observed.ingest[0])] if observed.ingest else []),
             *([c.subscriber_keys_ready(observed.subscriber_keys[0])] if observed.subscriber_keys else [])],
            now,
        ),
        # null removes it (merge patch) once autoscaling is turned off
        "autoscaling": dict(observed.autoscaling) if observed.autoscaling is not None else None,
    }
    if observed.deployments:  # (an empty string would reach the API server as null)
        status["deploymentSizes"] = ",".join(str(row.get("replicas", 0)) for row in observed.deployments)
    connections = observed.connections if observed.connections is not None else previous.get("connections")
    if connections is not None:
        status["connections"] = connections
    for key, section in (("rebalance", observed.rebalance), ("reconnects", observed.reconnects)):
        if section is not None:
            status[key] = present(section, previous.get(key))
    return status


def present(section: Mapping[str, Any], previous: object) -> dict[str, Any]:
    """`section` for a merge patch that replaces `previous` (what the API server holds): a null
    (removing a key) for every key of `previous` that `section` has not (or has as None), at any
    depth (a merge patch merges objects: what is not nulled stays), and only there, so that a
    status compares equal to what the API server keeps (which has no nulls)."""
    had = previous if isinstance(previous, Mapping) else {}
    patch: dict[str, Any] = dict.fromkeys(had)
    for key, value in section.items():
        if isinstance(value, Mapping) and isinstance(had.get(key), Mapping):
            patch[key] = present(value, had[key])
        elif value is not None or key in had:
            patch[key] = value
    return patch


MAX_LAGGING = 10  # proxies named in status.membership.lagging (the count is proxies.ready - acknowledged)


def membership_status(progress: c.MembershipProgress, previous: object) -> dict[str, Any]:
    status: dict[str, Any] = {
        "version": progress.version,
        "brokers": progress.brokers,
        "acknowledged": progress.acknowledged,
        "lagging": list(progress.lagging[:MAX_LAGGING]),  # [] once none lags (a merge patch keeps an absent key)
    }
    seconds = progress.last_convergence_seconds
    if seconds is None and isinstance(previous, Mapping):
        seconds = previous.get("lastConvergenceSeconds")
    if seconds is not None:
        status["lastConvergenceSeconds"] = round(float(seconds), 3)
    return status


def persisted_version(status: Mapping[str, Any] | None) -> int:
    """`status.membership.version` of a resource, 0 when absent or unusable."""
    membership = (status or {}).get("membership")
    version = membership.get("version") if isinstance(membership, Mapping) else None
    return version if isinstance(version, int) and not isinstance(version, bool) and version > 0 else 0


def same_status(new: Mapping[str, Any], old: Mapping[str, Any] | None) -> bool:
    """Whether writing `new` would change nothing (every key of `new` is already so)."""
    return old is not None and all(old.get(key) == value for key, value in new.items())
