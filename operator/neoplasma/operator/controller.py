"""One controller per NeoplasmaCluster: a small scheduler and the I/O around steps.py.

kopf's handlers (handlers.py) only hand the latest cluster object to this module and wake the
cluster's controller: one asyncio task that sleeps until woken (a pod change, debounced so a
burst becomes one membership version; a child or the resource changed) or until the earliest
step is `due`, then runs one level-based pass over the current state: `Resource` reads spec
and annotations, `Membership` builds the snapshot (`MembershipSync` pushes it), `Scaling`
decides from the load read here (core.load), `Children`'s plan is applied here (server-side
apply, unneeded broker Deployments deleted), and the status `Status` returns is written here.
The steps decide; this shell does the I/O (API calls in threads, load reads, events, metrics)
and tells each step how it went.

Why not kopf's per-object timers and daemons: the due times move (debounce, each step's
backoff, the push grace, an interval only while autoscaling), pod and child events must wake
the same loop at once, and kopf keeps handler progress on the resource, which this operator
never writes. A plain task per cluster also runs without kopf, as the tests drive it.
No finalizer: deleting the resource deletes the children through their owner references.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import secrets
import ssl
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, cast

import aiohttp
import kopf
import kubernetes.client

from neoplasma.core.autoscaler import Autoscaler, problems
from neoplasma.core.backoff import Backoff, BackoffPolicy
from neoplasma.core.load import broker_load, proxy_load
from neoplasma.core.logs import get_logger
from neoplasma.core.net import hostport
from neoplasma.core.push import MembershipPusher
from neoplasma.core.scaling import Load
from neoplasma.core.tiers import Tier
from neoplasma.core.trust import PLAIN, Access, Tokens
from neoplasma.operator import children as ch
from neoplasma.operator.conditions import ReaderSeen, subscriber_keys_problem
from neoplasma.operator.kube import Kube
from neoplasma.operator.members import ClusterKey, Controlled, PodView, own_pods, ready_count
from neoplasma.operator.metrics import Metrics
from neoplasma.operator.render import (
    CA_KEY,
    CONTROL_PORT,
    CREDENTIAL_KEY,
    GRPC_PORT,
    INGEST,
    INGEST_PORTS,
    NO_PEERS,
    Peers,
    credential_secret,
    credential_secret_name,
    service_host,
)
from neoplasma.operator.spec import Cluster
from neoplasma.operator.status import Observed, persisted_version
from neoplasma.operator.steps import Children, Desired, Event, Membership, Problems, Resource, Scaling, Status, earliest
from neoplasma.operator.sync import MembershipSync

log = get_logger("operator")


@dataclass(frozen=True)
class Options:
    default_image: str
    policy_api: str = "policy/v1"
    operator: Peers = NO_PEERS  # where the operator's pods run (NetworkPolicies let them in)
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

    @property
    def retry(self) -> BackoffPolicy:
        return BackoffPolicy(self.retry_initial, self.retry_max)


class Indexes:
    """The live kopf indexes the controllers read: pods, ReplicaSets and children by cluster key."""

    def __init__(
        self,
        pods: Mapping[ClusterKey, Iterable[PodView]],
        children: Iterable[Mapping[ClusterKey, Iterable[Mapping[str, Any]]]],
        replicasets: Mapping[ClusterKey, Iterable[Controlled]] | None = None,
    ) -> None:
        self._pods = pods
        self._children = list(children)
        self._replicasets = {} if replicasets is None else replicasets  # live (and empty at first): no `or`

    def pods(self, key: ClusterKey, cluster_uid: str) -> list[PodView]:
        """The cluster's own pods: those its Deployments control, through their ReplicaSets."""
        return own_pods(self._pods.get(key, ()), self._replicasets.get(key, ()), self.children(key), cluster_uid)

    def children(self, key: ClusterKey) -> list[Mapping[str, Any]]:
        return [obj for index in self._children for obj in index.get(key, ())]


class OperatorState:
    """What the operator holds in memory: one controller per NeoplasmaCluster, and the metrics."""

    def __init__(self, kube: Kube, options: Options) -> None:
        self.kube = kube
        self.options = options
        self.metrics = Metrics()
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
            controller = ClusterController(key, body, indexes, self.kube, self.options, metrics=self.metrics)
            self.controllers[key] = controller
            self.metrics.clusters.set(len(self.controllers))
            controller.start()
        else:
            controller.set_body(body)

    def _stop(self, key: ClusterKey) -> None:
        task = asyncio.get_running_loop().create_task(self.controllers.pop(key).stop())
        self.metrics.forget(key)
        self.metrics.clusters.set(len(self.controllers))
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
        *,
        metrics: Metrics | None = None,
        post: Callable[[Event], None] | None = None,
    ) -> None:
        self.key = key
        self.label = "/".join(key)
        self.body = _plain(body)
        self.uid = str(self.body["metadata"].get("uid"))
        self.indexes = indexes
        self.kube = kube
        self.options = options
        self.clock = clock
        self.metrics = metrics or Metrics()
        self._post_event = post or self._kopf_event
        status = self.body.get("status") or {}
        now = clock()
        autoscaler = Autoscaler(status.get("autoscaling"))
        sync = MembershipSync(MembershipPusher(timeout=2.0), version=persisted_version(status),
                              on_progress=self.wake, label=self.label, cluster=self.uid)
        self.resource = Resource(autoscaler, self.label)
        self.membership = Membership(sync, options.anti_entropy, now)
        self.scaling = Scaling(autoscaler, options.scale_interval, now)
        self.children = Children(options.retry, options.resync, now, default_image=options.default_image,
                                 policy_api=options.policy_api, operator=options.operator)
        self.access = {Tier.BROKER: PLAIN, Tier.PROXY: PLAIN}  # how to reach them: credential, TLS
        self._ca_dir = tempfile.TemporaryDirectory(prefix="neoplasma-ca-")
        self._ca = ""  # the CA last written to the file in _ca_dir
        self.status = Status(options.retry, options.sync_grace, options.stats_interval, now)
        self._retry = Backoff(options.retry)  # a pass that failed (a bug)
        self._problems = Problems()
        self._subscriber_keys: tuple[str | None] = (None,)  # spec.subscribers.auth's keys: their problem, if any
        self._wakeup = asyncio.Event()
        self._pods_seen_at: float | None = None
        self._task: asyncio.Task[None] | None = None

    # -- life cycle ------------------------------------------------------------------------

    def start(self) -> None:
        log.info("cluster_controller_started", cluster=self.label,
                 membership_version=self.membership.sync.snapshot.version)
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"neoplasma:{self.label}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.membership.sync.close()
        self._ca_dir.cleanup()
        log.info("cluster_controller_stopped", cluster=self.label)

    def set_body(self, body: Mapping[str, Any]) -> None:
        self.body = _plain(body)
        self.wake()

    def wake(self, *, pods: bool = False, children: bool = False) -> None:
        if pods and self._pods_seen_at is None:
            self._pods_seen_at = self.clock()
        if children:
            self.children.dirty = True
        self._wakeup.set()

    # -- the scheduler ---------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            due = earliest(self.membership.due, self.scaling.due, self.children.due, self.status.due,
                           self._retry.not_before)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), None if due is None else max(0.0, due - self.clock()))
            if self._pods_seen_at is not None:
                await asyncio.sleep(max(0.0, self._pods_seen_at + self.options.debounce - self.clock()))
            self._wakeup.clear()
            try:
                await self._pass()
            except asyncio.CancelledError:
                raise
            except Exception as error:  # a bug: say so, and try again later (events still wake us)
                delay = self._retry.failed(self.clock())
                log.error("cluster_reconcile_failed", exc_info=True, cluster=self.label, retry_in=delay)
                if self._problems.news("pass", _describe(error)):
                    self._post([Event("ReconcileFailed", f"{_describe(error)}; retrying in {delay:g} s", True)])
            else:
                self._retry.succeeded()
                self._problems.news("pass", None)

    async def _pass(self) -> None:
        now = self.clock()
        body = self.body
        desired, events = self.resource.step(body)
        self._post(events)
        if desired.cluster is not None and not desired.deleting:
            await self._trust(desired.cluster)
        pods = self.indexes.pods(self.key, self.uid)
        seen_at, self._pods_seen_at = (self._pods_seen_at or now), None
        self._post(self.membership.step(pods, seen_at, now))
        loads = await _loads(pods, self.scaling.to_read(desired, now), self.access)
        for change in self.scaling.step(desired, loads, now):
            self._post([Event("ScaledBrokers" if change.tier is Tier.BROKER else "ScaledProxies", change.describe())])
            self.metrics.scaled(self.key, change.tier.plural, change.direction)
        plan = self.children.step(desired, self.scaling.effective, body, self.indexes.children(self.key), now)
        if plan is not None and self.scaling.effective is not None:
            await self._apply(plan, desired, self.scaling.effective)
        read = self.status.stats.fire(now) and not desired.deleting
        connections = await _connections(pods, self.access[Tier.BROKER]) if read else None
        if desired.deleting:
            self.status.due_at = None
            return  # being deleted: the garbage collector removes the children
        ingest = desired.cluster.spec.ingest if desired.cluster else None
        readers = await _reader_stats(pods, self.access[Tier.BROKER]) if ingest else []
        observed = self._observed(desired, pods, connections)
        if ingest:
            observed = replace(observed, ingest=(ingest.address, readers))
        self.metrics.observe(self.key, observed)
        status = self.status.step(observed, body, self.membership.sync.settling_since(), self.clock())
        if status is not None:
            await self._write_status(status)

    # -- I/O -------------------------------------------------------------------------------

    async def _trust(self, cluster: Cluster) -> None:
        """Read the cluster credential (creating its Secret, owned by the resource, when there is
        none) and the TLS CA on every pass, so that a replaced Secret is used at once."""
        name = credential_secret_name(cluster.name)
        try:
            data = await asyncio.to_thread(self.kube.read_secret, cluster.namespace, name)
            if data is None:
                secret = ch.adopted([credential_secret(cluster, secrets.token_urlsafe(32))], self.body)[0]
                await asyncio.to_thread(self.kube.create_secret, secret)
                self._post([Event("Created", f"created Secret {name} (the cluster credential)")])
                data = await asyncio.to_thread(self.kube.read_secret, cluster.namespace, name)
            tls = cluster.spec.trust.tls_secret
            ca = (await asyncio.to_thread(self.kube.read_secret, cluster.namespace, tls) or {}).get(CA_KEY, "") \
                if tls else ""
            auth = cluster.spec.subscriber_auth
            if auth is not None:  # spec.subscribers.auth's Secrets: a condition and an event when unusable
                found = {ref.name: await asyncio.to_thread(self.kube.read_secret, cluster.namespace, ref.name)
                         for ref in auth.secrets().values()}
                self._subscriber_keys = (subscriber_keys_problem(auth, found),)
                if self._problems.news("subscriber-keys", self._subscriber_keys[0]) and self._subscriber_keys[0]:
                    self._post([Event("SubscriberKeysInvalid", self._subscriber_keys[0], True)])
        except Exception as error:  # API errors: keep the last credential, try again next pass
            if self._problems.news("trust", _describe(error)):
                self._post([Event("CredentialFailed", f"reading the cluster credential failed: "
                                  f"{_describe(error)}; keeping the last one", True)])
            return
        token = (data or {}).get(CREDENTIAL_KEY, "").strip()
        problem = None if token else f"Secret {name} has no key {CREDENTIAL_KEY!r}: delete it to have a new one made"
        if self._problems.news("trust", problem) and problem:
            self._post([Event("CredentialFailed", problem, True)])
        if problem:
            return
        ca_file = ""
        if ca:
            path = Path(self._ca_dir.name) / "ca.crt"
            if ca != self._ca:  # written when it changes, not read back every pass
                path.write_text(ca)
                self._ca = ca
            ca_file = str(path)
        tokens = Tokens(given=[token])
        self.access = {tier: Access(tokens, ca_file, service_host(cluster, tier) if ca_file else "")
                       for tier in Tier}
        pusher = self.membership.sync.pusher
        if (pusher.access.ca_file, pusher.access.server_name) != (ca_file, self.access[Tier.PROXY].server_name):
            await pusher.close()  # its channels were made for the old TLS settings
        pusher.access = self.access[Tier.PROXY]

    async def _apply(self, plan: ch.Plan, desired: Desired, cluster: Cluster) -> None:
        try:
            # Independent objects: apply them all at once, then delete what is no longer rendered.
            await asyncio.gather(*(asyncio.to_thread(self.kube.apply, c.manifest) for c in plan.apply))
            for change in plan.apply:
                self._post([Event("Created" if change.action == "create" else "Updated", change.describe())])
            for kind, name in plan.delete:
                await asyncio.to_thread(self.kube.delete, kind, cluster.namespace, name)
                self._post([Event("Deleted", f"deleted {kind} {name}: " + (
                    "spec.networkPolicies.enabled is false" if kind == "NetworkPolicy" else
                    "spec.ingest is not set" if name == f"{cluster.name}-{INGEST}" else
                    f"not needed for {cluster.spec.brokers.replicas} brokers of at most "
                    f"{cluster.spec.brokers.max_per_deployment} per Deployment"))])
        except Exception as error:  # API errors, or the API out of reach: retried with backoff
            self._post(self.children.failed(_describe(error), self.clock()))
            log.error("children_failed", cluster=self.label, error=_describe(error))
            return
        self.children.applied(desired, cluster)

    async def _write_status(self, status: dict[str, Any]) -> None:
        try:
            kept = await asyncio.to_thread(self.kube.patch_status, self.key[0], self.key[1], status)
        except Exception as error:  # retried with backoff; membership pushes go on meanwhile
            self._post(self.status.failed(_describe(error), self.clock()))
            log.error("status_failed", cluster=self.label, error=_describe(error))
            return
        self.status.written(kept)
        if kept:
            log.info("status_written", cluster=self.label, generation=status["observedGeneration"],
                     ready=status["conditions"][0]["status"], membership=status["membership"],
                     brokers=status["brokers"], proxies=status["proxies"])

    def _observed(self, desired: Desired, pods: list[PodView], connections: int | None) -> Observed:
        cluster = self.scaling.effective or desired.cluster
        spec = desired.cluster.spec if desired.cluster else None
        autoscaler = self.resource.autoscaler
        converged = self.children.generation
        return Observed(
            generation=desired.generation if desired.spec_error is not None or converged is None else converged,
            spec_error=desired.spec_error,
            brokers=(cluster.spec.brokers.replicas if cluster else 0, ready_count(pods, Tier.BROKER)),
            proxies=(cluster.spec.proxies.replicas if cluster else 0, ready_count(pods, Tier.PROXY)),
            deployments=ch.broker_deployments(self.indexes.children(self.key)),
            membership=self.membership.sync.progress(),
            connections=connections,
            autoscaling=autoscaler.status(spec.brokers.replicas, spec.proxies.replicas) if spec else None,
            policy_problems=problems(autoscaler.errors) if autoscaler.errors else None,
            policy_kept=autoscaler.policy is not None,
            paused=desired.paused,
            seen_generation=desired.generation,
            subscriber_keys=self._subscriber_keys if spec and spec.subscriber_auth else None,
        )

    def _post(self, events: Iterable[Event]) -> None:
        for event in events:
            (log.warning if event.warning else log.info)("cluster_event", cluster=self.label, reason=event.reason,
                                                          message=event.message)
            self._post_event(event)

    def _kopf_event(self, event: Event) -> None:
        metadata = self.body.get("metadata") or {}
        ref = kopf.Body(cast(kopf.RawBody, {
            "apiVersion": self.body.get("apiVersion"),
            "kind": self.body.get("kind"),
            "metadata": {key: metadata.get(key) for key in ("name", "namespace", "uid")},
        }))
        with contextlib.suppress(LookupError):  # outside kopf (e.g. in a unit test): logged only
            (kopf.warn if event.warning else kopf.info)(ref, reason=event.reason, message=event.message)


async def _loads(pods: list[PodView], tiers: list[Tier], access: Mapping[Tier, Access]) -> dict[Tier, Load | None]:
    """The load of `tiers`, read from their serving pods (core.load)."""
    serving = [p for p in pods if p.ready and not p.deleting and p.ip]
    loads: dict[Tier, Load | None] = {}
    if Tier.BROKER in tiers:
        loads[Tier.BROKER] = await broker_load((hostport(p.ip, GRPC_PORT) for p in serving
                                                if p.component == Tier.BROKER), access[Tier.BROKER])
    if Tier.PROXY in tiers:
        loads[Tier.PROXY] = await proxy_load((hostport(p.ip, CONTROL_PORT) for p in serving
                                              if p.component == Tier.PROXY), access[Tier.PROXY])
    return loads


async def _connections(pods: list[PodView], access: Access) -> int | None:
    """The ready brokers' connections (0 without any; None when none answered: keep the last)."""
    addresses = [hostport(p.ip, GRPC_PORT) for p in pods if p.component == Tier.BROKER and p.ready]
    load = await broker_load(addresses, access)
    return int(load.total) if load.pods_read or not addresses else None


STATS_BYTES = 64 * 1024  # a reader's /stats is far smaller


async def _reader_stats(pods: list[PodView], access: Access) -> list[ReaderSeen]:
    """The /stats of each running ingest reader, read with the cluster credential (and with
    spec.tls over HTTPS, trusting the CA: the readers serve the brokers' certificate)."""
    readers = [p for p in pods if p.component == INGEST and p.ip and not p.deleting]
    if not readers:
        return []
    context = ssl.create_default_context(cafile=access.ca_file) if access.ca_file else None
    scheme = "https" if context else "http"

    async def read(session: aiohttp.ClientSession, pod: PodView) -> ReaderSeen:
        try:
            async with session.get(f"{scheme}://{hostport(pod.ip, INGEST_PORTS['http'])}/stats", ssl=context or True,
                                   server_hostname=access.server_name or None) as response:
                body = await response.content.read(STATS_BYTES)
                if response.status != 200:
                    return ReaderSeen(pod.name, error=f"HTTP {response.status}: {body[:200].decode(errors='replace')}")
                stats = json.loads(body)
        except (aiohttp.ClientError, TimeoutError, ValueError) as error:
            return ReaderSeen(pod.name, error=str(error) or type(error).__name__)
        return ReaderSeen(pod.name, stats) if isinstance(stats, dict) else ReaderSeen(pod.name, error="not an object")

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2.0),
                                     headers=dict(access.metadata())) as session:
        return list(await asyncio.gather(*(read(session, pod) for pod in readers)))


def _plain(body: Mapping[str, Any]) -> dict[str, Any]:
    return copy.deepcopy(dict(body))


def _describe(error: BaseException) -> str:
    if isinstance(error, kubernetes.client.ApiException):
        return f"API error {error.status} {error.reason}: {str(error.body)[:300]}"
    return f"{type(error).__name__}: {error}"
