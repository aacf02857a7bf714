"""The operator's Prometheus metrics (`neoplasma operator --metrics-port PORT`, /metrics).

Per cluster (labels `namespace`, `cluster`): desired and ready brokers and proxies, the
membership version and how many proxies run it; scaling decisions counted by tier and
direction. The gauges of a deleted cluster are removed.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from neoplasma.operator.members import ClusterKey

if TYPE_CHECKING:
    from neoplasma.operator.status import Observed

REGISTRY = CollectorRegistry()
LABELS = ("namespace", "cluster")

CLUSTERS = Gauge("neoplasma_operator_clusters", "NeoplasmaClusters the operator runs.", registry=REGISTRY)
BROKERS_DESIRED = Gauge("neoplasma_cluster_brokers_desired", "Brokers the cluster should have (spec or autoscaler).",
                        LABELS, registry=REGISTRY)
BROKERS_READY = Gauge("neoplasma_cluster_brokers_ready", "Ready broker pods.", LABELS, registry=REGISTRY)
PROXIES_DESIRED = Gauge("neoplasma_cluster_proxies_desired", "Proxies the cluster should have (spec or autoscaler).",
                        LABELS, registry=REGISTRY)
PROXIES_READY = Gauge("neoplasma_cluster_proxies_ready", "Ready proxy pods.", LABELS, registry=REGISTRY)
MEMBERSHIP_VERSION = Gauge("neoplasma_cluster_membership_version", "Version of the latest membership snapshot.",
                           LABELS, registry=REGISTRY)
MEMBERSHIP_ACKNOWLEDGED = Gauge("neoplasma_cluster_membership_acknowledged",
                                "Ready proxies that applied the latest membership version.", LABELS, registry=REGISTRY)
SCALING_DECISIONS = Counter("neoplasma_cluster_scaling_decisions", "Autoscaler decisions that changed a size.",
                            (*LABELS, "tier", "direction"), registry=REGISTRY)
PER_CLUSTER = (BROKERS_DESIRED, BROKERS_READY, PROXIES_DESIRED, PROXIES_READY, MEMBERSHIP_VERSION,
               MEMBERSHIP_ACKNOWLEDGED)


def serve(port: int) -> None:
    """Serve /metrics on 0.0.0.0:`port` from a background thread."""
    start_http_server(port, addr="0.0.0.0", registry=REGISTRY)


def observe(key: ClusterKey, observed: Observed) -> None:
    BROKERS_DESIRED.labels(*key).set(observed.brokers[0])
    BROKERS_READY.labels(*key).set(observed.brokers[1])
    PROXIES_DESIRED.labels(*key).set(observed.proxies[0])
    PROXIES_READY.labels(*key).set(observed.proxies[1])
    MEMBERSHIP_VERSION.labels(*key).set(observed.membership.version)
    MEMBERSHIP_ACKNOWLEDGED.labels(*key).set(observed.membership.acknowledged)


def scaled(key: ClusterKey, tier: str, direction: str) -> None:
    SCALING_DECISIONS.labels(*key, tier, direction).inc()


def forget(key: ClusterKey) -> None:
    for gauge in PER_CLUSTER:
        with contextlib.suppress(KeyError):
            gauge.remove(*key)
    for tier in ("brokers", "proxies"):
        for direction in ("up", "down"):
            with contextlib.suppress(KeyError):
                SCALING_DECISIONS.remove(*key, tier, direction)
