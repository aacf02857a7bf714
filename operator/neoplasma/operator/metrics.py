"""The operator's Prometheus metrics (`neoplasma operator --metrics-port PORT`, /metrics).

Per cluster (labels `namespace`, `cluster`): desired and ready brokers and proxies, the
membership version and how many proxies run it; scaling decisions counted by tier and
direction; how long reconcile passes take (by result) and how long each membership change took to
reach every ready proxy (histograms). The series of a deleted cluster are removed. One `Metrics`
per operator (and per `neoplasma up`, which runs the same membership and scaling code), with its
own registry.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from neoplasma.core.metrics import LATENCY_BUCKETS
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
        self.membership_lagging = Gauge("neoplasma_cluster_membership_lagging",
                                        "Ready proxies not running the latest membership version (pushes under way "
                                        "or failing; status.membership.lagging names them).", LABELS,
                                        registry=registry)
        self.scaling_decisions = Counter("neoplasma_cluster_scaling_decisions",
                                         "Autoscaler decisions that changed a size.", (*LABELS, "tier", "direction"),
                                         registry=registry)
        self.reconcile_duration = Histogram("neoplasma_operator_reconcile_duration_seconds",
                                            "Reconcile passes of a cluster, by result (ok, error).",
                                            (*LABELS, "result"), buckets=LATENCY_BUCKETS, registry=registry)
        self.convergence = Histogram("neoplasma_cluster_membership_convergence_seconds",
                                     "From a membership change being seen to every ready proxy running it.",
                                     LABELS, buckets=LATENCY_BUCKETS, registry=registry)

    def observe(self, key: ClusterKey, observed: Observed) -> None:
        self.sizes(key, observed.brokers, observed.proxies, observed.membership.version,
                   observed.membership.acknowledged)
        self.membership_lagging.labels(*key).set(len(observed.membership.lagging))

    def sizes(self, key: ClusterKey, brokers: tuple[int, int], proxies: tuple[int, int], version: int,
              acknowledged: int) -> None:
        """Brokers and proxies (desired, ready), the membership version and the proxies running it."""
        self.brokers_desired.labels(*key).set(brokers[0])
        self.brokers_ready.labels(*key).set(brokers[1])
        self.proxies_desired.labels(*key).set(proxies[0])
        self.proxies_ready.labels(*key).set(proxies[1])
        self.membership_version.labels(*key).set(version)
        self.membership_acknowledged.labels(*key).set(acknowledged)
        for tier in Tier:  # zeros, so that rates read 0 rather than nothing before the first decision
            for direction in ("up", "down"):
                self.scaling_decisions.labels(*key, tier.plural, direction)
        for result in ("ok", "error"):
            self.reconcile_duration.labels(*key, result)

    def reconciled(self, key: ClusterKey, seconds: float, ok: bool) -> None:
        self.reconcile_duration.labels(*key, "ok" if ok else "error").observe(seconds)

    def converged(self, key: ClusterKey, seconds: float) -> None:
        self.convergence.labels(*key).observe(seconds)

    def scaled(self, key: ClusterKey, tier: str, direction: str) -> None:
        self.scaling_decisions.labels(*key, tier, direction).inc()

    def forget(self, key: ClusterKey) -> None:
        for gauge in (self.brokers_desired, self.brokers_ready, self.proxies_desired, self.proxies_ready,
                      self.membership_version, self.membership_acknowledged, self.membership_lagging,
                      self.convergence):
            with contextlib.suppress(KeyError):
                gauge.remove(*key)
        for result in ("ok", "error"):
            with contextlib.suppress(KeyError):
                self.reconcile_duration.remove(*key, result)
        for tier in Tier:
            for direction in ("up", "down"):
                with contextlib.suppress(KeyError):
                    self.scaling_decisions.remove(*key, tier.plural, direction)


def serve(port: int, metrics: Metrics, host: str = "0.0.0.0") -> tuple[int, Callable[[], None]]:
    """Serve `metrics` at /metrics on `host`:`port` from a background thread; returns the port
    bound (0: any free one) and how to stop."""
    server, thread = start_http_server(port, addr=host, registry=metrics.registry)

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(5.0)

    return server.server_port, stop
