"""What one pass of a cluster's controller sees, read once at its start (the observe phase).

`observe` reads the cluster's pods and children (kopf's indexes) and the credential and CA Secrets
(when the Trust step wants them); `read_pods` then adds, all under one `timeout`, each ready broker's
Stats once (for the status's connections and the broker load alike), the proxies' Status, and the
ingest readers' /stats. Nothing here decides: steps.py takes the `Seen` and the time and says what to do.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import aiohttp
import kubernetes.client

from neoplasma.core.control import BrokerChannels, ProxyChannels
from neoplasma.core.load import Gate, broker_stats, proxies_load, proxy_statuses
from neoplasma.core.net import hostport
from neoplasma.core.scaling import Load
from neoplasma.core.tiers import Tier
from neoplasma.core.trust import Access
from neoplasma.operator.conditions import ReaderSeen, now_text
from neoplasma.operator.kube import Kube
from neoplasma.operator.members import ClusterKey, Controlled, PodView, own_pods
from neoplasma.operator.render import (
    CA_KEY,
    CONTROL_PORT,
    GRPC_PORT,
    INGEST,
    INGEST_PORTS,
    credential_secret_name,
)
from neoplasma.operator.spec import Cluster

STATS_BYTES = 64 * 1024  # a reader's /stats is far smaller


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

    def replicasets(self, key: ClusterKey) -> list[Controlled]:
        return list(self._replicasets.get(key, ()))

    def children(self, key: ClusterKey) -> list[Mapping[str, Any]]:
        return [obj for index in self._children for obj in index.get(key, ())]


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


@dataclass(frozen=True)
class Wants:
    """What a pass is to read besides pods and children (the steps say, from their timers)."""

    trust: bool = False  # the credential and CA Secrets
    loads: tuple[Tier, ...] = ()  # the tiers whose load the Scaling step decides from
    connections: bool = False  # the brokers' connections, for status
    readers: bool = False  # the ingest readers' /stats
    proxies: bool = False  # every proxy pod's Status, stopping ones too (the Connections step)


@dataclass(frozen=True)
class TrustSeen:
    """The trust material as read: the credential Secret's data (None: there is none), the CA
    of spec.trust.tlsSecret ("" for none), or why reading failed."""

    credential: Mapping[str, str] | None = None
    ca: str = ""
    error: str | None = None
    # spec.subscribers.auth's Secrets by name (None: there is none); None: the spec names none.
    subscriber_secrets: Mapping[str, Mapping[str, str] | None] | None = None


@dataclass(frozen=True)
class Seen:
    """One pass's observation."""

    at: float  # the controller's clock when the pass began
    stamp: str  # the wall-clock time, as status timestamps are written
    body: Mapping[str, Any]
    desired: Desired  # what the resource asks for (steps.Resource)
    pods: list[PodView]
    children: list[Mapping[str, Any]]
    pods_changed_at: float  # when the pod change this pass answers was seen (debounced), else `at`
    wants: Wants = Wants()
    trust: TrustSeen | None = None  # None: not read on this pass
    brokers: Mapping[str, Any] | None = None  # pod name -> its Stats (those that answered); None: not read
    proxy_load: Load | None = None
    readers: list[ReaderSeen] | None = None
    proxies: Mapping[str, Any] | None = None  # pod name -> its Status (those that answered); None: not read
    replicasets: list[Controlled] = field(default_factory=list)


def serving(pods: Iterable[PodView], tier: str) -> list[PodView]:
    """The pods of `tier` taking traffic: ready, not being deleted, with an address."""
    return [p for p in pods if p.component == tier and p.ready and not p.deleting and p.ip]


async def read_trust(kube: Kube, cluster: Cluster) -> TrustSeen:
    try:
        credential = await asyncio.to_thread(kube.read_secret, cluster.namespace, credential_secret_name(cluster.name))
        tls = cluster.spec.trust.tls_secret
        ca = (await asyncio.to_thread(kube.read_secret, cluster.namespace, tls) or {}).get(CA_KEY, "") if tls else ""
        auth = cluster.spec.subscriber_auth
        subscriber_secrets = None if auth is None else {
            ref.name: await asyncio.to_thread(kube.read_secret, cluster.namespace, ref.name)
            for ref in auth.secrets().values()}
    except Exception as error:  # API errors: the Trust step keeps the last credential
        return TrustSeen(error=describe(error))
    return TrustSeen(credential, ca, subscriber_secrets=subscriber_secrets)


async def read_brokers(pods: list[PodView], access: Access, timeout: float,
                       channels: BrokerChannels | None = None) -> dict[str, Any]:
    """The Stats of every ready broker pod, read once (over `channels`, kept open, if given; those to other
    addresses pruned): by pod name, those that answered."""
    ready = {hostport(p.ip, GRPC_PORT): p.name for p in pods if p.component == Tier.BROKER and p.ready and p.ip}
    if channels is not None:
        channels.prune(ready)
    answers = await broker_stats(ready, access, timeout, channels)
    return {ready[address]: stats for address, stats in answers.items()}


async def read_readers(pods: list[PodView], access: Access, timeout: float) -> list[ReaderSeen]:
    """The /stats of each running ingest reader, read with the cluster credential (and with
    spec.tls over HTTPS, trusting the CA: the readers serve the brokers' certificate)."""
    readers = [p for p in pods if p.component == INGEST and p.ip and not p.deleting]
    if not readers:
        return []
    context = ssl.create_default_context(cadata=access.ca) if access.ca else None
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

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout),
                                     headers=dict(access.metadata())) as session:
        return list(await asyncio.gather(*(read(session, pod) for pod in readers)))


async def observe(kube: Kube, indexes: Indexes, key: ClusterKey, body: Mapping[str, Any], desired: Desired,
                  wants: Wants, at: float, pods_changed_at: float) -> Seen:
    """What a pass reads from the API (kopf's indexes, and the Secrets when wanted): enough for the
    Trust and Membership steps, which must not wait on the pods' own answers (`read_pods`)."""
    pods = indexes.pods(key, str((body.get("metadata") or {}).get("uid")))
    cluster = desired.cluster
    trust = await read_trust(kube, cluster) if wants.trust and cluster is not None else None
    return Seen(at, now_text(), body, desired, pods, indexes.children(key), pods_changed_at, wants, trust,
                replicasets=indexes.replicasets(key))


async def read_pods(seen: Seen, reach: Mapping[Tier, Access], timeout: float,
                    channels: ProxyChannels | None = None, broker_channels: BrokerChannels | None = None,
                    gate: Gate | None = None) -> Seen:
    """`seen` with what its `wants` asks of the pods themselves, all at once under `timeout`: the brokers'
    Stats (over `broker_channels`), the proxies' Status (over `channels`, the ones the pushes use, in batches
    behind `gate` if given: core.load's `by_address`), the ingest readers' /stats. A pod that does not
    answer costs the wait."""
    pods, wants = seen.pods, seen.wants
    brokers = (read_brokers(pods, reach[Tier.BROKER], timeout, broker_channels)
               if wants.connections or Tier.BROKER in wants.loads else _none())
    proxies = (read_proxies(pods, reach[Tier.PROXY], timeout, every=wants.proxies, channels=channels, gate=gate)
               if wants.proxies or Tier.PROXY in wants.loads else _none())
    readers = read_readers(pods, reach[Tier.BROKER], timeout) if wants.readers else _none()
    stats, statuses, seen_readers = await asyncio.gather(brokers, proxies, readers)
    names = {p.name for p in serving(pods, Tier.PROXY)}
    load = (proxies_load(s for n, s in statuses.items() if n in names)
            if statuses is not None and Tier.PROXY in wants.loads else None)
    return replace(seen, brokers=stats, proxy_load=load, readers=seen_readers,
                   proxies=statuses if wants.proxies else None)


async def read_proxies(pods: list[PodView], access: Access, timeout: float, every: bool,
                       channels: ProxyChannels | None = None, gate: Gate | None = None) -> dict[str, Any]:
    """The Status of the serving proxy pods (`every`: of every one with an address, also those not
    ready, as a full one during a rebalance, and those stopping), by pod name."""
    chosen = [p for p in pods if p.component == Tier.PROXY and p.ip and (every or (p.ready and not p.deleting))]
    addresses = {hostport(p.ip, CONTROL_PORT): p.name for p in chosen}
    answers = await proxy_statuses(addresses, access, timeout, channels, gate)
    return {addresses[address]: status for address, status in answers.items()}


async def _none() -> None:
    return None


def describe(error: BaseException) -> str:
    """An error for an Event or a log line (an API error's status, reason and body)."""
    if isinstance(error, kubernetes.client.ApiException):
        return f"API error {error.status} {error.reason}: {str(error.body)[:300]}"
    return f"{type(error).__name__}: {error}"
