"""The operator's Prometheus metrics (`neoplasma operator --metrics-port PORT`, /metrics).

Per cluster (labels `namespace`, `cluster`): desired and ready brokers and proxies, the
membership version and how many proxies run it; scaling decisions counted by tier and
direction. The gauges of a deleted cluster are removed. One `Metrics` per operator, with its
own registry.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from neoplasma.core.tiers import Tier
from neoplasma.operator.members import ClusterKey

if TYPE_CHECKING:
    from neoplasma.operator.status import Observed

LABELS = ("namespace", "cluster")


class Metrics:
    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        self.clusters = Gauge("neoplasma_operator_clusters", "NeoplasmaClusters the operator runs.",
                              registry=registry)
        self.brokers_desired = Gauge("neoplasma_cluster_brokers_desired",
                                     "Brokers the cluster should have (spec or autoscaler).", LABELS, registry=registry)
        self.brokers_ready = Gauge("neoplasma_cluster_brokers_ready", "Ready broker pods.", LABELS, registry=registry)
        self.proxies_desired = Gauge("neoplasma_cluster_proxies_desired",
                                     "Proxies the cluster should have (spec or autoscaler).", LABELS, registry=registry)
        self.proxies_ready = Gauge("neoplasma_cluster_proxies_ready", "Ready proxy pods.", LABELS, registry=registry)
        self.membership_version = Gauge("neoplasma_cluster_membership_version",
                                        "Version of the latest membership snapshot.", LABELS, registry=registry)
        self.membership_acknowledged = Gauge("neoplasma_cluster_membership_acknowledged",
                                             "Ready proxies that applied the latest membership version.", LABELS,
                                             registry=registry)
        self.scaling_decisions = Counter("neoplasma_cluster_scaling_decisions",
                                         "Autoscaler decisions that changed a size.", (*LABELS, "tier", "direction"),
                                         registry=registry)

    def observe(self, key: ClusterKey, observed: Observed) -> None:
        self.brokers_desired.labels(*key).set(observed.brokers[0])
        self.brokers_ready.labels(*key).set(observed.brokers[1])
        self.proxies_desired.labels(*key).set(observed.proxies[0])
        self.proxies_ready.labels(*key).set(observed.proxies[1])
        self.membership_version.labels(*key).set(observed.membership.version)
        self.membership_acknowledged.labels(*key).set(observed.membership.acknowledged)

    def scaled(self, key: ClusterKey, tier: str, direction: str) -> None:
        self.scaling_decisions.labels(*key, tier, direction).inc()

    def forget(self, key: ClusterKey) -> None:
        for gauge in (self.brokers_desired, self.brokers_ready, self.proxies_desired, self.proxies_ready,
                      self.membership_version, self.membership_acknowledged):
            with contextlib.suppress(KeyError):
                gauge.remove(*key)
        for tier in Tier:
            for direction in ("up", "down"):
                with contextlib.suppress(KeyError):
                    self.scaling_decisions.remove(*key, tier.plural, direction)


def serve(port: int, metrics: Metrics) -> None:
    """Serve `metrics` at /metrics on 0.0.0.0:`port` from a background thread."""
    start_http_server(port, addr="0.0.0.0", registry=metrics.registry)
