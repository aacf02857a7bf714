"""Retry delays: one policy object, one per-thing state, used by every retry loop.

`BackoffPolicy` says how delays grow (exponential from `initial`, capped at `maximum`,
optionally with full jitter); `Backoff` counts the failures of one thing (a relay link, a
proxy's push, an API call) and says when it may be tried again. Pure: callers pass the clock.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class BackoffPolicy:
    initial: float = 0.5  # delay after the first failure (seconds)
    maximum: float = 30.0  # delays never exceed this
    jitter: bool = False  # full jitter: a uniform delay in [0, the exponential delay]

    def __post_init__(self) -> None:
        if not (0 < self.initial <= self.maximum):
            raise ValueError(f"backoff needs 0 < initial <= maximum, got {self.initial} and {self.maximum}")

    def delay(self, failures: int, rand: Callable[[], float] = random.random) -> float:
        """The delay after `failures` consecutive failures (0 before any)."""
        if failures <= 0:
            return 0.0
        delay = min(self.maximum, self.initial * 2.0 ** min(failures - 1, 64))
        return rand() * delay if self.jitter else delay


class Backoff:
    """The consecutive failures of one thing, and when it is due again."""

    def __init__(self, policy: BackoffPolicy) -> None:
        self.policy = policy
        self.failures = 0
        self.not_before: float | None = None  # clock time of the next attempt, while failing

    def failed(self, now: float) -> float:
        """Count a failure at `now`; returns the delay before the next attempt."""
        self.failures += 1
        delay = self.policy.delay(self.failures)
        self.not_before = now + delay
        return delay

    def succeeded(self) -> None:
        self.failures = 0
        self.not_before = None

    def due(self, now: float) -> bool:
        return self.not_before is None or now >= self.not_before
