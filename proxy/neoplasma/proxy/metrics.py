"""What a proxy counts beyond its hub's totals: delivery latency, churn, resumes and gap signals.

Delivery latency runs from a broker's accept of an event (its wall clock, stamped on each relay
batch as the accept time of the batch's oldest live event) to the end of the dispatch round that
wrote it to subscribers' sockets (this proxy's wall clock). It is observed once per dispatch round
and transport, weighted by that round's deliveries over the transport, with the round's oldest
accept time: every delivery is counted, each at an upper bound of its own latency (a round
coalesces up to `--linger-seconds` of events). Catch-up of resuming subscribers is not counted
(replayed events are old by design; `replayed_events` counts them).

Clocks: on one host (`neoplasma up`) both ends read the same clock, so the figure is exact. Across
pods it also holds the offset between the two nodes' clocks, which NTP/chrony keeps to about a
millisecond on cloud nodes (far below the buckets that matter, 25 ms and up); a proxy whose clock
runs behind a broker's could measure less than zero: such a round counts as 0 and in
`neoplasma_proxy_delivery_clock_skew_rounds_total`, so a badly synchronised node is visible.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping

from prometheus_client.core import CounterMetricFamily, Metric

from neoplasma.core.metrics import Counts, WeightedHistogram

# A subscriber's kind (hub.Subscriber.kind) -> its transport label. Others (a resuming
# subscriber's stand-in) are not counted.
TRANSPORTS = {"sse": "sse", "plasma": "plasma", "batch": "native"}
DISCONNECT_REASONS = ("client", "drain", "rebalance", "slow", "expired", "error")
# Why a subscriber was closed (Subscriber.close) -> its disconnect reason; a connection that ends
# without being closed by the proxy was ended by its client.
CLOSED_BECAUSE = {"draining": "drain", "slow": "slow", "gone": "client", "error": "error",
                  "moved": "rebalance", "expired": "expired"}
RESUME_RESULTS = ("exact", "gap")
# How a resume's pointer id (docs/resume.md, "Pointer ids") was resolved: from this process's journal, by the
# process that issued it (through a broker), or not at all (the gap signal).
POINTER_RESULTS = ("local", "remote", "unresolved")
# How a version 3 token's checkpoint (docs/resume.md, "Checkpoints") was found: made or resolved lately by this
# process, asked of a broker, or not at all (the gap signal).
CHECKPOINT_RESULTS = ("local", "remote", "unresolved")


class ProxyMetrics:
    def __init__(self) -> None:
        self.latency = WeightedHistogram(TRANSPORTS.values())
        self.connects = Counts(TRANSPORTS.values())
        self.disconnects = Counts(DISCONNECT_REASONS)
        self.resumes = Counts(RESUME_RESULTS)
        self.pointers = Counts(POINTER_RESULTS)
        self.checkpoints = Counts(CHECKPOINT_RESULTS)
        self.replayed_events = 0
        self.gap_signals = 0
        self.skewed_rounds = 0

    def delivered(self, deliveries: Mapping[str, int], accepted_ns: int) -> None:
        """A dispatch round wrote `deliveries` (by subscriber kind); its oldest event was accepted at
        `accepted_ns` (a broker's wall clock)."""
        seconds = (time.time_ns() - accepted_ns) / 1e9
        if seconds < 0:
            self.skewed_rounds += 1
        for kind, n in deliveries.items():
            transport = TRANSPORTS.get(kind)
            if transport is not None:
                self.latency.observe(transport, seconds, n)

    def connected(self, kind: str) -> None:
        self.connects.inc(TRANSPORTS[kind])

    def disconnected(self, closed_as: str | None) -> None:
        """A subscriber's connection ended; `closed_as` is why the proxy closed it (None: it did not)."""
        self.disconnects.inc(CLOSED_BECAUSE.get(closed_as or "gone", "error"))

    def families(self) -> Iterator[Metric]:
        yield self.latency.family(
            "neoplasma_proxy_delivery_latency_seconds", "From a broker accepting an event to its write to "
            "subscribers' sockets, per delivery (each round's oldest event: an upper bound), by transport",
            "transport")
        yield self.connects.family("neoplasma_proxy_connects", "Subscriber connections accepted, by transport",
                                   "transport")
        yield self.disconnects.family("neoplasma_proxy_disconnects", "Subscriber connections ended, by reason",
                                      "reason")
        yield self.resumes.family("neoplasma_proxy_resumes", "Subscribers resumed from a token: exactly, or "
                                  "with a gap signal", "result")
        yield self.pointers.family("neoplasma_proxy_pointer_resolves", "Resumes from a pointer id: resolved from "
                                   "this process's journal, by the proxy that issued it, or not (a gap signal)",
                                   "result")
        yield self.checkpoints.family("neoplasma_proxy_checkpoint_resolves", "Resumes from a version 3 token: its "
                                      "checkpoint found here, asked of a broker, or not found (a gap signal)",
                                      "result")
        yield CounterMetricFamily("neoplasma_proxy_replayed_events", "Events replayed from brokers' retention "
                                  "to resuming subscribers", value=self.replayed_events)
        yield CounterMetricFamily("neoplasma_proxy_gap_signals", "Gap signals sent to subscribers (events "
                                  "missed that cannot be served)", value=self.gap_signals)
        yield CounterMetricFamily("neoplasma_proxy_delivery_clock_skew_rounds", "Dispatch rounds whose "
                                  "latency measured below zero (this node's clock behind a broker's)",
                                  value=self.skewed_rounds)
