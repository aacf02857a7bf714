"""The two tiers of a cluster, under one name everywhere (labels, status keys, `up`)."""

from __future__ import annotations

from enum import StrEnum


class Tier(StrEnum):
    BROKER = "broker"
    PROXY = "proxy"

    @property
    def plural(self) -> str:
        """The key used in status and annotations: "brokers", "proxies"."""
        return "brokers" if self is Tier.BROKER else "proxies"
