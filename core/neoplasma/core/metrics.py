"""Pieces of the tiers' Prometheus metrics that are not prometheus_client's own.

`LATENCY_BUCKETS` resolve 1 ms to 30 s (every tier's latency histograms use them), and
`WeightedHistogram` is a histogram whose one observation may stand for many (a proxy's dispatch
round delivers a batch to many subscribers at once: one observation, weighted by the deliveries,
costs a bisect and a few additions per round, not per delivery). `Counts` holds counters by one
bounded label, every value present from the start (so rates and alerts see zeros, not absence).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

# Seconds: 1 ms .. 30 s, about three buckets per decade.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class WeightedHistogram:
    """Histograms by one label, each observation counted `weight` times. No locking: one event loop."""

    __slots__ = ("_buckets", "_counts", "_sums")

    def __init__(self, values: Iterable[str], buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self._buckets = buckets
        self._counts = {value: [0] * (len(buckets) + 1) for value in values}  # the last one: +Inf
        self._sums = dict.fromkeys(self._counts, 0.0)

    def observe(self, value: str, seconds: float, weight: int = 1) -> None:
        """Count `seconds` (negative ones as 0) `weight` times under the label `value`."""
        seconds = max(seconds, 0.0)
        self._counts[value][bisect.bisect_left(self._buckets, seconds)] += weight
        self._sums[value] += seconds * weight

    def count(self, value: str) -> int:
        return sum(self._counts[value])

    def family(self, name: str, documentation: str, label: str) -> HistogramMetricFamily:
        family = HistogramMetricFamily(name, documentation, labels=[label])
        for value, counts in self._counts.items():
            cumulative, running = [], 0
            for bound, n in zip((*map(str, self._buckets), "+Inf"), counts, strict=True):
                running += n
                cumulative.append((bound, running))
            family.add_metric([value], cumulative, self._sums[value])
        return family


class Counts:
    """Counters by one label whose values are fixed up front."""

    __slots__ = ("values",)

    def __init__(self, values: Iterable[str]) -> None:
        self.values = dict.fromkeys(values, 0)

    def inc(self, value: str, n: int = 1) -> None:
        self.values[value] += n

    def family(self, name: str, documentation: str, label: str) -> CounterMetricFamily:
        family = CounterMetricFamily(name, documentation, labels=[label])
        for value, n in self.values.items():
            family.add_metric([value], n)
        return family

