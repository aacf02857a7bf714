"""One controller per NeoplasmaCluster: children, membership push and status, level-based.

kopf watches NeoplasmaClusters, their children and their pods; its handlers (handlers.py)
only hand the latest cluster object to this module and wake the cluster's controller. Each
controller is one asyncio task that, when woken (or when a timer is due), looks at the whole
current state and converges it:

1. builds the membership from the pods index and lets `MembershipSync` push it (pod changes
   are debounced so a burst of them becomes one version);
2. renders the children and applies the ones missing or differing from the children index
   (server-side apply), deletes broker Deployments no longer rendered;
3. autoscales (annotation `neoplasma.io/autoscale`): on its own timer, reads the ready
   brokers' and proxies' load and lets `Autoscaler` (core.scaling's policy and decision)
   choose the replicas rendered in place of the spec's;
4. writes `status` when it changed.

Annotations are read on every pass: a bad value leaves the last good policy in force, with one
Warning event per distinct set of problems and `AutoscalingPolicyValid=False`.
`neoplasma.io/pause-reconciliation: "true"` stops every change to children (and scaling);
membership is still pushed and status still written (`ReconciliationPaused=True`).

A garbage spec gives one Warning event and a `SpecValid=False` condition per generation, and
nothing is retried until the resource changes. API errors are retried with backoff.
No finalizer is involved: deleting the resource deletes the children through their owner
references (Kubernetes' garbage collector), whether the operator runs or not.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any, cast

import grpc
import kopf
import kubernetes.client

from neoplasma.core.autoscaler import Autoscaler, problems
from neoplasma.core.load import broker_load, proxy_load
from neoplasma.core.logs import get_logger
from neoplasma.core.membership import BrokerState
from neoplasma.core.net import hostport
from neoplasma.core.push import MembershipPusher
from neoplasma.core.scaling import Load
from neoplasma.core.tiers import Tier
from neoplasma.operator import children as ch
from neoplasma.operator import metrics
from neoplasma.operator.conditions import count, now_text
from neoplasma.operator.kube import Kube
from neoplasma.operator.members import ClusterKey, PodView, broker_members, proxy_targets, ready_count
from neoplasma.operator.render import CONTROL_PORT, GRPC_PORT
from neoplasma.operator.spec import Cluster, InvalidSpec, parse_cluster
from neoplasma.operator.status import Observed, build_status, persisted_version, same_status
from neoplasma.operator.sync import MembershipSync
from neoplasma.wire.v1 import neoplasma_pb2 as pb
from neoplasma.wire.v1 import neoplasma_pb2_grpc as pb_grpc

log = get_logger("operator")


@dataclass(frozen=True)
class Options:
    default_image: str
    policy_api: str = "policy/v1"
    debounce: float = 0.2  # seconds a burst of pod changes is gathered into one snapshot
    anti_entropy: float = 5.0  # seconds between pushes of the current snapshot to every proxy
    resync: float = 60.0  # seconds between checks of the children with no event at all
    stats_interval: float = 10.0  # seconds between reads of the brokers' connection counts
    scale_interval: float = 10.0  # seconds between autoscaling decisions (load reads)
    # Seconds a membership push may take before status says MembershipSynced=False (status
    # is not written meanwhile), so that Ready does not flicker on every broker change.
    sync_grace: float = 2.0
    retry_initial: float = 1.0  # first delay after a failed API call, doubling...
    retry_max: float = 60.0  # ...up to this


class Indexes:
    """The live kopf indexes the controllers read: pods and children by cluster key."""

    def __init__(
        self,
        pods: Mapping[ClusterKey, Iterable[PodView]],
        children: Iterable[Mapping[ClusterKey, Iterable[Mapping[str, Any]]]],
    ) -> None:
        self._pods = pods
        self._children = list(children)

    def pods(self, key: ClusterKey) -> list[PodView]:
        return list(self._pods.get(key, ()))

    def children(self, key: ClusterKey) -> list[Mapping[str, Any]]:
        return [obj for index in self._children for obj in index.get(key, ())]


class OperatorState:
    """What the operator holds in memory: one controller per NeoplasmaCluster."""

    def __init__(self, kube: Kube, options: Options) -> None:
        self.kube = kube
        self.options = options
        self.controllers: dict[ClusterKey, ClusterController] = {}
        self._stopping: set[asyncio.Task[None]] = set()

    def cluster_seen(self, event_type: str | None, body: Mapping[str, Any], indexes: Indexes) -> None:
        """A watch event of a NeoplasmaCluster: start, update or stop its controller."""
        metadata = body.get("metadata") or {}
        key: ClusterKey = (str(metadata.get("namespace")), str(metadata.get("name")))
        controller = self.controllers.get(key)
        if event_type == "DELETED":
            if controller is not None:
                self._stop(key)
                log.info("cluster_forgotten", cluster="/".join(key))
            return
        if controller is not None and controller.uid != metadata.get("uid"):
            # Deleted and created again under the same name while we were not looking.
            self._stop(key)
            controller = None
        if controller is None:
            controller = ClusterController(key, body, indexes, self.kube, self.options)
            self.controllers[key] = controller
            metrics.CLUSTERS.set(len(self.controllers))
            controller.start()
        else:
            controller.set_body(body)

    def _stop(self, key: ClusterKey) -> None:
        task = asyncio.get_running_loop().create_task(self.controllers.pop(key).stop())
        metrics.forget(key)
        metrics.CLUSTERS.set(len(self.controllers))
        self._stopping.add(task)
        task.add_done_callback(self._stopping.discard)

    def wake(self, key: ClusterKey, *, pods: bool = False, children: bool = False) -> None:
        controller = self.controllers.get(key)
        if controller is not None:
            controller.wake(pods=pods, children=children)

    async def close(self) -> None:
        controllers, self.controllers = list(self.controllers.values()), {}
        await asyncio.gather(*(c.stop() for c in controllers), *self._stopping, return_exceptions=True)
        self.kube.close()


class ClusterController:
    def __init__(
        self,
        key: ClusterKey,
        body: Mapping[str, Any],
        indexes: Indexes,
        kube: Kube,
        options: Options,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.key = key
        self.label = "/".join(key)
        self.body = _plain(body)
        self.uid = str(self.body["metadata"].get("uid"))
        self.indexes = indexes
        self.kube = kube
        self.options = options
        self.clock = clock
        status = self.body.get("status") or {}
        self.sync = MembershipSync(
            MembershipPusher(timeout=2.0, attempts=3, backoff=0.1, max_backoff=1.0),
            version=persisted_version(status),
            on_progress=self._membership_progress,
            on_failure=self._push_failed,
            label=self.label,
        )
        # The status last written, and the resourceVersion the resource had just before: while
        # the object kopf last gave us is that old, our write is newer than what it shows.
        self._written_status: dict[str, Any] | None = None
        self._written_over: str | None = None
        self._wakeup = asyncio.Event()
        self._pods_seen_at: float | None = None
        self._children_dirty = True
        self._reconciled_generation: int | None = None
        self._reported: set[tuple[str, str]] = set()  # (reason, message) of Warning events sent
        self._warned_pushes: set[tuple[str, int]] = set()
        self._cluster: Cluster | None = None  # as the spec says (the last one that parsed)
        self._effective: Cluster | None = None  # as rendered: with the autoscaler's replicas
        self._reconciled_sizes: tuple[int, ...] | None = None
        self.autoscaler = Autoscaler(status.get("autoscaling"))
        self._paused = False
        self._announced_version = 0
        self._connections: int | None = None
        now = clock()
        self._next_refresh = now + options.anti_entropy
        self._next_stats = now
        self._next_scale = now
        self._next_resync = now + options.resync
        self._children_retry_at: float | None = None
        self._status_due: float | None = None
        self._tick_retry_at: float | None = None
        self._children_failures = 0
        self._status_failures = 0
        self._tick_failures = 0
        self._task: asyncio.Task[None] | None = None

    # -- life cycle ------------------------------------------------------------------------

    def start(self) -> None:
        log.info("cluster_controller_started", cluster=self.label, membership_version=self.sync.snapshot.version)
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"neoplasma:{self.label}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.sync.close()
        log.info("cluster_controller_stopped", cluster=self.label)

    def set_body(self, body: Mapping[str, Any]) -> None:
        self.body = _plain(body)
        self.wake()

    def wake(self, *, pods: bool = False, children: bool = False) -> None:
        if pods and self._pods_seen_at is None:
            self._pods_seen_at = self.clock()
        if children:
            self._children_dirty = True
        self._wakeup.set()

    # -- the loop --------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            timeout = max(0.0, self._next_due() - self.clock())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), timeout)
            if self._pods_seen_at is not None:
                await asyncio.sleep(max(0.0, self._pods_seen_at + self.options.debounce - self.clock()))
            self._wakeup.clear()
            try:
                await self._tick()
                self._tick_failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as error:  # a bug: say so, and try again later (events still wake us)
                self._tick_failures += 1
                delay = self._delay(self._tick_failures)
                self._tick_retry_at = self.clock() + delay
                log.error("cluster_reconcile_failed", exc_info=True, cluster=self.label, retry_in=delay)
                self._warn("ReconcileFailed", f"{_describe(error)}; retrying in {delay:g} s")
            else:
                self._tick_retry_at = None

    def _next_due(self) -> float:
        due = [self._next_refresh, self._next_stats, self._next_resync]
        if self.autoscaler.autoscaled() and not self._paused:
            due.append(self._next_scale)
        for extra in (self.sync.next_retry(), self._children_retry_at, self._status_due, self._tick_retry_at):
            if extra is not None:
                due.append(extra)
        return min(due)

    async def _tick(self) -> None:
        body = self.body
        metadata = body.get("metadata") or {}
        generation = int(metadata.get("generation") or 0)
        spec_error = self._parse(body, generation)
        self._read_policy(metadata.get("annotations") or {})
        now = self.clock()
        refresh = now >= self._next_refresh
        if refresh:
            self._next_refresh = now + self.options.anti_entropy
        if now >= self._next_resync:
            self._next_resync = now + self.options.resync
            self._children_dirty = True
        read_stats = now >= self._next_stats
        if read_stats:
            self._next_stats = now + self.options.stats_interval

        # 1. Membership: first, as it is what the data plane waits for.
        pods = self.indexes.pods(self.key)
        seen_at, self._pods_seen_at = (self._pods_seen_at or now), None
        targets = proxy_targets(pods)
        snapshot = self.sync.update(broker_members(pods), targets, seen_at)
        if refresh:
            self.sync.refresh()
        if snapshot.version != self._announced_version:
            self._announced_version = snapshot.version
            draining = sum(1 for m in snapshot.members if m.state is BrokerState.DRAINING)
            self._event("MembershipChanged", f"membership version {snapshot.version}: "
                        f"{count(len(snapshot.members), 'broker')} ({draining} draining), "
                        f"pushing to {count(len(targets), 'ready proxy')}")

        if metadata.get("deletionTimestamp"):
            self._children_retry_at = self._status_due = None
            return  # being deleted: the garbage collector removes the children

        # 2. Autoscaling, then children.
        if self._paused:
            self._children_retry_at = None  # nothing changes until unpaused
        elif spec_error is None and self._cluster is not None:
            if self.autoscaler.autoscaled() and now >= self._next_scale:
                self._next_scale = now + self.options.scale_interval
                await self._autoscale(self._cluster, pods, now)
            self._effective = self._sized(self._cluster)
        if spec_error is not None:
            self._children_retry_at = None  # nothing to retry until the spec changes
        elif self._effective is not None and not self._paused and self._children_due(generation, now):
            await self._reconcile_children(self._effective, body, generation)

        # 3. Status.
        if read_stats:
            self._connections = await _broker_connections(pods, previous=self._connections)
        await self._write_status(generation, spec_error, pods)

    def _parse(self, body: Mapping[str, Any], generation: int) -> str | None:
        try:
            self._cluster = parse_cluster(body)
        except InvalidSpec as error:
            message = f"NeoplasmaCluster {self.label} (generation {generation}) is invalid: {error}"
            if self._warn("InvalidSpec", f"{message}; fix the resource and apply it again"):
                log.warning("cluster_invalid", cluster=self.label, generation=generation, field=error.field,
                            problem=error.problem)
            return str(error)
        return None

    def _read_policy(self, annotations: Mapping[str, Any]) -> None:
        spec = (self._cluster or Cluster("", "")).spec
        was_paused = self._paused
        self.autoscaler.read({str(k): str(v) for k, v in annotations.items()}, spec.brokers.replicas,
                             spec.proxies.replicas)
        self._paused = self.autoscaler.paused
        if self.autoscaler.errors:
            message = (f"annotations not used: {problems(self.autoscaler.errors)}; "
                       + ("the last good policy stays in force" if self.autoscaler.policy is not None
                          else "no autoscaling until they are fixed"))
            if self._warn("InvalidAnnotation", message):
                log.warning("annotations_invalid", cluster=self.label, problems=problems(self.autoscaler.errors))
        if self._paused != was_paused:
            self._children_dirty = True  # unpaused: converge whatever changed meanwhile
            log.info("reconciliation_paused" if self._paused else "reconciliation_resumed", cluster=self.label)
            self._event("ReconciliationPaused" if self._paused else "ReconciliationResumed",
                        "no change to children until neoplasma.io/pause-reconciliation is removed; membership "
                        "is still pushed to proxies" if self._paused else "converging the children again")

    def _sized(self, cluster: Cluster) -> Cluster:
        """`cluster` with the replicas to render: the spec's, or the autoscaler's."""
        spec = cluster.spec
        sizes = self.autoscaler.sizes(spec.brokers.replicas, spec.proxies.replicas)
        if (sizes[Tier.BROKER], sizes[Tier.PROXY]) == (spec.brokers.replicas, spec.proxies.replicas):
            return cluster
        return replace(cluster, spec=replace(
            spec,
            brokers=replace(spec.brokers, replicas=sizes[Tier.BROKER]),
            proxies=replace(spec.proxies, replicas=sizes[Tier.PROXY]),
        ))

    async def _autoscale(self, cluster: Cluster, pods: list[PodView], now: float) -> None:
        tiers = self.autoscaler.autoscaled()
        loads: dict[Tier, Load | None] = {}
        serving = [p for p in pods if p.ready and not p.deleting and p.ip]
        if Tier.BROKER in tiers:
            loads[Tier.BROKER] = await broker_load(hostport(p.ip, GRPC_PORT) for p in serving
                                                   if p.component == Tier.BROKER)
        if Tier.PROXY in tiers:
            loads[Tier.PROXY] = await proxy_load(hostport(p.ip, CONTROL_PORT) for p in serving
                                                 if p.component == Tier.PROXY)
        spec = cluster.spec
        for change in self.autoscaler.step(spec.brokers.replicas, spec.proxies.replicas, loads, now, now_text()):
            load = loads.get(change.tier)
            log.info("cluster_scaled", cluster=self.label, tier=change.tier.plural, before=change.before,
                     after=change.after, reason=change.reason, load=load.total if load else None,
                     pods_read=load.pods_read if load else 0)
            self._event("ScaledBrokers" if change.tier is Tier.BROKER else "ScaledProxies", change.describe())
            metrics.scaled(self.key, change.tier.plural, change.direction)
            self._children_dirty = True

    def _children_due(self, generation: int, now: float) -> bool:
        if self._children_retry_at is not None:
            return now >= self._children_retry_at
        return (self._children_dirty or generation != self._reconciled_generation
                or _sizes(self._effective) != self._reconciled_sizes)

    async def _reconcile_children(self, cluster: Cluster, body: Mapping[str, Any], generation: int) -> None:
        self._children_dirty = False
        desired = ch.desired_children(
            cluster, body, default_image=self.options.default_image, policy_api=self.options.policy_api
        )
        plan = ch.plan(desired, self.indexes.children(self.key), owner_uid=self.uid)
        try:
            # Independent objects: apply them all at once, then delete what is no longer rendered.
            await asyncio.gather(*(asyncio.to_thread(self.kube.apply, c.manifest) for c in plan.apply))
            for change in plan.apply:
                log.info("child_applied", cluster=self.label, action=change.action, kind=change.key[0],
                         name=change.key[1], fields=list(change.fields))
                self._event("Created" if change.action == "create" else "Updated", change.describe())
            for kind, name in plan.delete:
                await asyncio.to_thread(self.kube.delete, kind, cluster.namespace, name)
                log.info("child_deleted", cluster=self.label, kind=kind, name=name)
                self._event("Deleted", f"deleted {kind} {name}: not needed for {cluster.spec.brokers.replicas} "
                            f"brokers of at most {cluster.spec.brokers.max_per_deployment} per Deployment")
        except Exception as error:  # API errors, or the API out of reach: retried with backoff
            self._children_failures += 1
            delay = self._delay(self._children_failures)
            self._children_retry_at = self.clock() + delay
            log.error("children_failed", cluster=self.label, error=_describe(error), retry_in=delay)
            self._warn("ReconcileFailed", f"applying children failed: {_describe(error)}; retrying in {delay:g} s")
            return
        self._children_retry_at = None
        self._children_failures = 0
        self._reconciled_generation = generation
        self._reconciled_sizes = _sizes(cluster)

    async def _write_status(self, generation: int, spec_error: str | None, pods: list[PodView]) -> None:
        settling = self.sync.settling_since()
        if settling is not None and self.clock() < settling + self.options.sync_grace:
            self._status_due = settling + self.options.sync_grace
            return  # a push under way: written once it is everywhere (or late)
        self._status_due = None
        cluster = self._effective or self._cluster
        desired_brokers = cluster.spec.brokers.replicas if cluster else 0
        desired_proxies = cluster.spec.proxies.replicas if cluster else 0
        spec = self._cluster.spec if self._cluster else None
        errors = self.autoscaler.errors
        observed = Observed(
            generation=generation if spec_error is not None or self._reconciled_generation is None
            else self._reconciled_generation,
            spec_error=spec_error,
            brokers=(desired_brokers, ready_count(pods, Tier.BROKER)),
            proxies=(desired_proxies, ready_count(pods, Tier.PROXY)),
            deployments=ch.broker_deployments(self.indexes.children(self.key)),
            membership=self.sync.progress(),
            connections=self._connections,
            autoscaling=self.autoscaler.status(spec.brokers.replicas, spec.proxies.replicas) if spec else None,
            policy_problems=problems(errors) if errors else None,
            policy_kept=self.autoscaler.policy is not None,
            paused=self._paused,
            seen_generation=generation,
        )
        metrics.observe(self.key, observed)
        version = (self.body.get("metadata") or {}).get("resourceVersion")
        if self._written_status is not None and version == self._written_over:
            current: Mapping[str, Any] = self._written_status
        else:
            current = self.body.get("status") or {}
        status = build_status(observed, current, now_text())
        if same_status(status, current):
            return
        try:
            written = await asyncio.to_thread(self.kube.patch_status, self.key[0], self.key[1], status)
        except Exception as error:  # retried with backoff; membership pushes go on meanwhile
            self._status_failures += 1
            delay = self._delay(self._status_failures)
            self._status_due = self.clock() + delay
            log.error("status_failed", cluster=self.label, error=_describe(error), retry_in=delay)
            self._warn("StatusFailed", f"writing status failed: {_describe(error)}; retrying in {delay:g} s")
            return
        self._status_failures = 0
        if written:
            self._written_status = {**current, **status}
            self._written_over = version
            log.info("status_written", cluster=self.label, generation=generation,
                     ready=status["conditions"][0]["status"], membership=status["membership"],
                     brokers=status["brokers"], proxies=status["proxies"])

    # -- callbacks from the membership sync ------------------------------------------------

    def _membership_progress(self) -> None:
        self._wakeup.set()

    def _push_failed(self, proxy: str, version: int, error: str) -> None:
        if (proxy, version) in self._warned_pushes:
            return
        self._warned_pushes.add((proxy, version))
        self._warn("PushFailed", f"proxy pod {proxy} has not applied membership version {version}: {error}; "
                   "retrying with backoff", once=False)

    # -- events ----------------------------------------------------------------------------

    def _event(self, reason: str, message: str) -> None:
        with contextlib.suppress(LookupError):  # outside kopf (e.g. in a unit test): log only
            kopf.info(self._ref(), reason=reason, message=message)

    def _warn(self, reason: str, message: str, once: bool = True) -> bool:
        """A Warning event (once per distinct reason and message unless `once` is False)."""
        if once and (reason, message) in self._reported:
            return False
        self._reported.add((reason, message))
        with contextlib.suppress(LookupError):
            kopf.warn(self._ref(), reason=reason, message=message)
        return True

    def _ref(self) -> kopf.Body:
        metadata = self.body.get("metadata") or {}
        return kopf.Body(cast(kopf.RawBody, {
            "apiVersion": self.body.get("apiVersion"),
            "kind": self.body.get("kind"),
            "metadata": {key: metadata.get(key) for key in ("name", "namespace", "uid")},
        }))

    def _delay(self, failures: int) -> float:
        return float(min(self.options.retry_initial * 2 ** max(0, failures - 1), self.options.retry_max))


async def _broker_connections(pods: Iterable[PodView], previous: int | None) -> int | None:
    """Sum of the ready brokers' Stats.connections; `previous` when no broker answered."""
    addresses = [hostport(p.ip, GRPC_PORT) for p in pods if p.component == "broker" and p.ready]
    if not addresses:
        return 0

    async def one(address: str) -> int:
        async with grpc.aio.insecure_channel(address) as channel:
            reply = await pb_grpc.BrokerStub(channel).Stats(pb.StatsRequest(), timeout=1.0)
            return int(reply.connections)

    results = await asyncio.gather(*(one(a) for a in addresses), return_exceptions=True)
    counts = [r for r in results if isinstance(r, int)]
    return sum(counts) if counts else previous


def _sizes(cluster: Cluster | None) -> tuple[int, ...] | None:
    if cluster is None:
        return None
    return (cluster.spec.brokers.replicas, cluster.spec.proxies.replicas)


def _plain(body: Mapping[str, Any]) -> dict[str, Any]:
    return copy.deepcopy(dict(body))


def _describe(error: BaseException) -> str:
    if isinstance(error, kubernetes.client.ApiException):
        return f"API error {error.status} {error.reason}: {str(error.body)[:300]}"
    return f"{type(error).__name__}: {error}"
